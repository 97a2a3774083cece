//! The form content rules compare text in. A tenant app chooses every byte
//! of the prompt, so a literal rule must not be evaded by spellings the
//! model reads the same: compatibility forms (fullwidth letters, ligatures,
//! superscripts: NFKC), characters that render as nothing (zero-width
//! spaces and joiners, soft hyphens, bidi controls, variation selectors,
//! tag characters) and case. Deny literals are folded once, when the bundle
//! is compiled; prompts once per decision.

use unicode_normalization::UnicodeNormalization as _;

/// Default-ignorable code points (Unicode's `Default_Ignorable_Code_Point`,
/// the ranges that occur in text): dropped before matching.
fn ignorable(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// `text` in the form content rules compare: without ignorable characters
/// (before and after NFKC, so one between a letter and its combining mark
/// cannot keep them apart), NFKC, lower-cased, every run of whitespace one
/// space.
pub fn fold(text: &str) -> String {
    let visible: String = text.chars().filter(|c| !ignorable(*c)).collect();
    let mut out = String::with_capacity(visible.len());
    let mut space = false;
    for c in visible.nfkc().filter(|c| !ignorable(*c)) {
        if c.is_whitespace() {
            space = true;
            continue;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        out.extend(c.to_lowercase());
    }
    if space && !out.is_empty() {
        out.push(' ');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::fold;

    #[test]
    fn spellings_the_model_reads_alike_fold_alike() {
        for evasive in [
            "forbidden",
            "FORBIDDEN",
            "for\u{200B}bid\u{00AD}den",
            "ｆｏｒｂｉｄｄｅｎ",
            "forbid\u{FE0F}den",
            "f\u{E0066}orbidden",
            "for\u{202E}bidden",
        ] {
            assert!(
                fold(evasive).contains("forbidden"),
                "{evasive:?} -> {:?}",
                fold(evasive)
            );
        }
        // An invisible character between a letter and its combining mark,
        // and whitespace runs, change nothing.
        assert!(fold("cafe\u{200B}\u{0301} au lait").contains(&fold("café au lait")));
        assert!(fold("kill\n\t  all").contains(&fold("kill all")));
        // Ligatures are compatibility forms: "ﬁ" reads as "fi".
        assert_eq!(fold("\u{FB01}le"), "file");
        assert_eq!(fold("plain text"), "plain text");
    }
}

//! Prompt pieces for the tokenizer.

use super::{PIECE_BYTES, pieces};

#[test]
fn pieces_rejoin_to_the_text_are_bounded_and_cut_before_control_text() {
    let packed = "<end_of_turn>hi ".repeat(10_000);
    let words = "lorem ipsum dolor ".repeat(2_000);
    let one_word = "x".repeat(3 * PIECE_BYTES + 7);
    let wide = format!("{} {}", "é".repeat(PIECE_BYTES), "é".repeat(PIECE_BYTES));
    let cut_point = |c: char| c == '<' || c.is_whitespace();
    for text in [&packed, &words, &one_word, &wide, "short", ""] {
        let parts: Vec<&str> = pieces(text).collect();
        assert_eq!(parts.concat(), *text);
        assert!(parts.iter().all(|p| !p.is_empty()));
        // Bounded, but for one word longer than a piece, which is never cut.
        for p in &parts {
            assert!(
                p.len() <= PIECE_BYTES || !p.chars().skip(1).any(cut_point),
                "{}",
                p.len()
            );
        }
    }
    // Control-token text is never split: every piece of the packed text
    // after the first starts at a `<`.
    assert!(pieces(&packed).skip(1).all(|p| p.starts_with('<')));
    assert!(pieces(&words).skip(1).all(|p| p.starts_with(' ')));
    // A word is never split: a vocabulary that prefixes each call with a
    // space would see `x… forbidden` where policy saw one word.
    assert_eq!(pieces(&one_word).count(), 1);
    let glued = format!("{}forbidden", "x".repeat(PIECE_BYTES));
    assert_eq!(pieces(&glued).count(), 1);
    assert_eq!(pieces("").count(), 0);
}

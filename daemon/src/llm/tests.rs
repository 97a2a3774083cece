//! Prompt pieces for the tokenizer.

use super::{PIECE_BYTES, pieces};

#[test]
fn pieces_rejoin_to_the_text_are_bounded_and_cut_before_control_text() {
    let packed = "<end_of_turn>hi ".repeat(10_000);
    let words = "lorem ipsum dolor ".repeat(2_000);
    let one_word = "x".repeat(3 * PIECE_BYTES + 7);
    let wide = "é".repeat(PIECE_BYTES);
    for text in [&packed, &words, &one_word, &wide, "short", ""] {
        let parts: Vec<&str> = pieces(text).collect();
        assert_eq!(parts.concat(), *text);
        assert!(
            parts
                .iter()
                .all(|p| p.len() <= PIECE_BYTES && !p.is_empty())
        );
    }
    // Control-token text is never split: every piece of the packed text
    // after the first starts at a `<`.
    assert!(pieces(&packed).skip(1).all(|p| p.starts_with('<')));
    assert!(pieces(&words).skip(1).all(|p| p.starts_with(' ')));
    assert_eq!(pieces("").count(), 0);
}

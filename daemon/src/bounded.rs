//! Caller-supplied strings, bounded before they reach policy, the audit or
//! a log line. A tenant chooses these bytes; a record keeps at most a prefix
//! of each and says how long the whole was, so a hostile value costs a
//! bounded record and still leaves evidence of its size.

use std::borrow::Cow;

/// `s` if it is at most `max` bytes; else its longest prefix of at most
/// `max` bytes that ends at a character boundary, with a marker naming the
/// full length. The marker adds at most [`MARKER_BYTES`].
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…[truncated: {} bytes]", &s[..end], s.len()))
}

/// The most bytes [`clip`]'s marker adds.
pub const MARKER_BYTES: usize = "…[truncated: 18446744073709551615 bytes]".len();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_keep_a_prefix_and_their_length() {
        assert_eq!(clip("short", 8), "short");
        let long = "é".repeat(1000);
        let clipped = clip(&long, 9);
        assert_eq!(clipped, "éééé…[truncated: 2000 bytes]");
        assert!(clipped.len() <= 9 + MARKER_BYTES);
        assert!(clip(&"x".repeat(1 << 20), 256).len() <= 256 + MARKER_BYTES);
    }
}

//! Aligned text columns for what transforms and the command line print (`dump`, `prefixes
//! list`, `help`, `inspect`). Cells are padded by hand, never with `{:<width$}`: the standard
//! formatter panics on a width above 65,535 (issue 9: a 65,536-byte tensor name made `inspect`
//! fail with "internal error"), and a column that wide is unreadable anyway. Cells longer than
//! [`MAX_CELL`] characters are shortened in the middle; machine-readable output (`dump`'s
//! `json`, `inspect --json`) keeps them whole.

/// Widest a printed cell (a name, a shape) grows, in characters; longer ones keep their start
/// and end around a `…`.
pub const MAX_CELL: usize = 100;

/// `text` when at most `max` characters, else its first and last characters around `…`, `max`
/// characters in all (the end of a tensor name, `weight` or `bias`, says as much as its start).
pub fn elide(text: &str, max: usize) -> String {
    let count = text.chars().count();
    if count <= max {
        return text.to_owned();
    }
    let keep = max.saturating_sub(1);
    let head = keep.div_ceil(2);
    let tail = keep - head;
    let mut out: String = text.chars().take(head).collect();
    out.push('…');
    out.extend(text.chars().skip(count - tail));
    out
}

/// [`elide`] to [`MAX_CELL`].
pub fn cell(text: &str) -> String {
    elide(text, MAX_CELL)
}

/// The width of the widest of `cells`, in characters.
pub fn width<'a>(cells: impl IntoIterator<Item = &'a str>) -> usize {
    cells.into_iter().map(|c| c.chars().count()).max().unwrap_or(0)
}

/// `text` followed by spaces up to `width` characters (nothing added when it is wider).
pub fn pad_right(text: &str, width: usize) -> String {
    let mut out = text.to_owned();
    out.extend(std::iter::repeat_n(' ', width.saturating_sub(text.chars().count())));
    out
}

/// Spaces up to `width` characters, then `text`.
pub fn pad_left(text: &str, width: usize) -> String {
    let mut out: String = std::iter::repeat_n(' ', width.saturating_sub(text.chars().count())).collect();
    out.push_str(text);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_and_long_text_is_cut_in_the_middle() {
        assert_eq!(elide("layers.0.w", 20), "layers.0.w");
        assert_eq!(elide("abcdefghij", 5), "ab…ij");
        assert_eq!(elide("abcdefghij", 6), "abc…ij");
        assert_eq!(elide("äöüäöü", 3), "ä…ü");
        let long = format!("model.{}.weight", "x".repeat(70_000));
        let shown = cell(&long);
        assert_eq!(shown.chars().count(), MAX_CELL);
        assert!(shown.starts_with("model.xx") && shown.ends_with("xx.weight") && shown.contains('…'));
    }

    /// Issue 9: widths past `u16::MAX` panicked in `format!("{:<width$}")`.
    #[test]
    fn padding_has_no_width_limit() {
        let padded = pad_right("a", 70_000);
        assert_eq!(padded.len(), 70_000);
        assert!(padded.starts_with('a'));
        assert_eq!(pad_left("7", 3), "  7");
        assert_eq!(pad_right("wide", 2), "wide");
        assert_eq!(width(["ab", "äöü", ""]), 3);
    }
}

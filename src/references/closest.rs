//! Suggestions for zero-match errors: the few names closest to a pattern, so messages stay short
//! on checkpoints with thousands of tensors.

/// The `k` names with the smallest Levenshtein distance (over chars) to `pattern_text`, ties
/// broken by name.
/// Regex escapes of punctuation (`\.`) are dropped first so `a\.b` is close to `a.b`.
pub fn closest_names<'a>(pattern_text: &str, names: impl IntoIterator<Item = &'a str>, k: usize) -> Vec<&'a str> {
    let mut pat = String::with_capacity(pattern_text.len());
    let mut chars = pattern_text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && chars.peek().is_some_and(|n| !n.is_alphanumeric()) {
            continue;
        }
        pat.push(c);
    }
    let mut scored: Vec<(usize, &'a str)> = names.into_iter().map(|n| (strsim::levenshtein(&pat, n), n)).collect();
    scored.sort_unstable();
    scored.dedup();
    scored.into_iter().take(k).map(|(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::references::ReferenceError;

    #[test]
    fn picks_nearest_with_deterministic_ties() {
        let names = [
            "model.layers.0.mlp.w",
            "model.layers.1.mlp.w",
            "lm_head.weight",
            "model.embed.weight",
        ];
        let got = closest_names(r"model\.layers\.2\.mlp\.w", names, 2);
        assert_eq!(got, vec!["model.layers.0.mlp.w", "model.layers.1.mlp.w"]);
        assert_eq!(closest_names("lm_head.weigth", names, 1), vec!["lm_head.weight"]);
        assert!(closest_names("x", [], 3).is_empty());
        assert_eq!(closest_names("a", ["b", "b", "c"], 5), vec!["b", "c"]);
        // Plain Levenshtein: a swap of adjacent characters is two edits, so `bx` is nearer `ba`.
        assert_eq!(closest_names("ba", ["ab", "bx"], 1), vec!["bx"]);
    }

    #[test]
    fn no_match_message() {
        let e = ReferenceError::NoMatch {
            pattern: "lm_haed".into(),
            closest: closest_names("lm_haed", ["lm_head", "embed"], 1)
                .into_iter()
                .map(String::from)
                .collect(),
        };
        assert_eq!(e.to_string(), "no tensor matches `lm_haed`; closest: lm_head");
        assert_eq!(
            ReferenceError::NoMatch {
                pattern: "x".into(),
                closest: vec![]
            }
            .to_string(),
            "no tensor matches `x`"
        );
    }
}

//! Errors of the plan layer: the document could not be read, or does not describe a valid plan.

use std::path::PathBuf;

use super::location::Location;
use crate::references::ReferenceError;

/// The plan document is malformed or invalid. Maps to Python's `PlanError`, exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// YAML or JSON syntax error.
    #[error("{origin}: {message}")]
    Syntax {
        /// The file name, or `<string>` / `<override>`.
        origin: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A plan file could not be read.
    #[error("cannot read plan {}", path.display())]
    Read {
        /// The plan file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A plan file is a directory, a device, a FIFO or a socket: refused before reading it.
    #[error("cannot read plan {}: it is {kind}, not a regular file", path.display())]
    NotAFile {
        /// The path given.
        path: PathBuf,
        /// What it is (`a directory`, `a character device`, ...).
        kind: &'static str,
    },
    /// A plan file is larger than [`super::document::MAX_PLAN_BYTES`].
    #[error("cannot read plan {}: it is larger than the {} MiB limit for plan files", path.display(), limit >> 20)]
    TooLarge {
        /// The plan file.
        path: PathBuf,
        /// The limit, in bytes.
        limit: u64,
    },
    /// A document is not a plan: not a mapping, or (from a file) a mapping with none of the plan's
    /// keys, nor a near miss of one. Nothing of its content is quoted (issue 9: `execute:
    /// {path: /etc/shadow}` printed the file's first line as an unknown key).
    #[error("{origin}: not a plan: a plan is a mapping with inputs, transforms or output, and this is {found}")]
    NotAPlan {
        /// The file name, or `<string>`.
        origin: String,
        /// What the document is instead (`a list`, `a mapping without any of those keys`).
        found: &'static str,
    },
    /// A mapping has a key the plan language does not know.
    #[error("{location}: unknown key `{key}`{}; expected one of: {}", did_you_mean(suggestion), expected.join(", "))]
    UnknownKey {
        /// Where the mapping is.
        location: Location,
        /// The unknown key.
        key: String,
        /// The closest known key, if any is close.
        suggestion: Option<String>,
        /// Every key allowed there.
        expected: Vec<String>,
    },
    /// A transform name the engine does not know.
    #[error("{location}: unknown transform `{name}`{}", did_you_mean(suggestion))]
    UnknownTransform {
        /// Where the transform is.
        location: Location,
        /// The unknown name.
        name: String,
        /// The closest known name, if any is close.
        suggestion: Option<String>,
    },
    /// A required key is absent.
    #[error("{location}: missing required key `{key}`")]
    MissingKey {
        /// Where the mapping is.
        location: Location,
        /// The missing key.
        key: String,
    },
    /// A value has the wrong type or an impossible value.
    #[error("{location}: {message}")]
    Invalid {
        /// Where the value is.
        location: Location,
        /// What is wrong, and what was expected.
        message: String,
    },
    /// A tensor reference or rewrite template does not parse.
    #[error("{location}")]
    Reference {
        /// Where the reference is.
        location: Location,
        /// The reference error.
        source: ReferenceError,
    },
    /// A reference names an alias that no input or load defines.
    #[error("{location}: unknown alias `{alias}` (known: {})", known.join(", "))]
    UnknownAlias {
        /// Where the reference is.
        location: Location,
        /// The unknown alias.
        alias: String,
        /// The aliases that exist at that point.
        known: Vec<String>,
    },
    /// A reference has no alias and no default alias exists.
    #[error("{location}: `{reference}` names no alias and the plan has several inputs ({}); write `alias::pattern` or set output.alias", known.join(", "))]
    NoDefaultAlias {
        /// Where the reference is.
        location: Location,
        /// The reference text.
        reference: String,
        /// The aliases that exist.
        known: Vec<String>,
    },
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None => String::new(),
    }
}

impl PlanError {
    /// Shorthand for [`PlanError::Invalid`].
    pub fn invalid(location: &Location, message: impl Into<String>) -> Self {
        PlanError::Invalid {
            location: location.clone(),
            message: message.into(),
        }
    }
}

/// The closest of `candidates` to `word` by edit distance, when it is close enough to be a
/// likely typo (at most a third of the word's length, and at least one edit allowed). The distance
/// counts insertions, deletions, substitutions and swaps of adjacent characters (optimal string
/// alignment), so the common typo `scael` is one edit from `scale`.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (strsim::osa_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(suggest("scael", ["scale", "scale_", "cast"]).as_deref(), Some("scale"));
        assert_eq!(suggest("frmo", ["from", "to"]).as_deref(), Some("from"));
        assert_eq!(suggest("zzzzzz", ["from", "to"]), None);
        // A swap of adjacent characters is one edit (two under plain Levenshtein).
        assert_eq!(suggest("ot", ["to"]).as_deref(), Some("to"));
    }
}

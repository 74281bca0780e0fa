//! The one error type of the references layer. Variants carry the offending text, position or
//! name; wrapping with plan locations (transform index, key) is left to the caller.

use thiserror::Error;

/// Everything that can go wrong while parsing, matching or expanding a tensor reference.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReferenceError {
    /// The plan value has the wrong JSON/YAML type (e.g. a number where a reference is expected).
    #[error("expected {expected}, found {found}")]
    InvalidType {
        /// What was expected, e.g. "a string, list or mapping".
        expected: &'static str,
        /// A short rendering of what was found.
        found: String,
    },
    /// A structured mapping has a key other than `alias`, `path` and `slice`.
    #[error("unknown key `{key}` in structured reference (expected alias, path, slice)")]
    UnknownKey {
        /// The offending key.
        key: String,
    },
    /// A structured mapping lacks a required key.
    #[error("missing key `{key}` in structured reference")]
    MissingKey {
        /// The missing key.
        key: &'static str,
    },
    /// An alias does not match `[A-Za-z_][A-Za-z0-9_.-]*`.
    #[error("invalid alias `{alias}`")]
    InvalidAlias {
        /// The offending alias text.
        alias: String,
    },
    /// The pattern (or template) part of a reference is empty.
    #[error("empty pattern in `{text}`")]
    EmptyPattern {
        /// The whole reference text.
        text: String,
    },
    /// The regex engine rejected a pattern.
    #[error("invalid regex `{pattern}`: {message}")]
    Regex {
        /// The pattern as written in the plan.
        pattern: String,
        /// The regex engine's message.
        message: String,
    },
    /// The regex engine gave up matching a name (its backtracking limit), so whether the name
    /// matches is unknown; silently treating it as "no match" would drop tensors.
    #[error("regex `{pattern}` could not decide whether `{name}` matches: {message}")]
    MatchFailed {
        /// The pattern as written in the plan.
        pattern: String,
        /// The tensor name being matched.
        name: String,
        /// The regex engine's message.
        message: String,
    },
    /// A structured-pattern or list-template token is malformed.
    #[error("invalid token `{token}`: {reason}")]
    InvalidToken {
        /// The offending token.
        token: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// The same capture name is bound twice in one structured pattern.
    #[error("duplicate capture name `{name}`")]
    DuplicateCapture {
        /// The repeated name.
        name: String,
    },
    /// `~x,y::REGEX` names a different number of captures than REGEX has groups.
    #[error("token `{token}` names {names} captures but its regex has {groups} groups")]
    GroupCountMismatch {
        /// The offending token.
        token: String,
        /// How many names the token lists.
        names: usize,
        /// How many groups the regex has.
        groups: usize,
    },
    /// A string template has a malformed escape (e.g. `\g<` without `>`).
    #[error("invalid template `{template}` at {position}: {reason}")]
    BadTemplate {
        /// The template text.
        template: String,
        /// Byte offset of the problem in the template.
        position: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A template refers to a group or capture the source pattern does not have.
    #[error("template refers to unknown group `{group}`")]
    UnknownGroup {
        /// The group number or name as written.
        group: String,
    },
    /// A list template uses a capture of the wrong kind (`$x` on a list, `*x` on a segment).
    #[error("capture `{name}` is {actual}; use {hint}")]
    CaptureKind {
        /// The capture name.
        name: String,
        /// "a list" or "a single segment".
        actual: &'static str,
        /// The token form to use instead.
        hint: String,
    },
    /// A slice string does not parse.
    #[error("invalid slice `{text}`: {reason}")]
    InvalidSlice {
        /// The slice text.
        text: String,
        /// What is wrong.
        reason: String,
    },
    /// A slice has step 0.
    #[error("slice step is zero in dim {dim}")]
    ZeroStep {
        /// The dimension (of the tensor) with the zero step.
        dim: usize,
    },
    /// An integer index is outside the dimension.
    #[error("index {index} is out of range for dim {dim} of size {size}")]
    IndexOutOfRange {
        /// The dimension.
        dim: usize,
        /// The index as written (may be negative).
        index: i64,
        /// The size of that dimension.
        size: usize,
    },
    /// A slice indexes more dimensions than the tensor has.
    #[error("slice has {count} indices but the tensor has {ndim} dims")]
    TooManyIndices {
        /// Number of non-ellipsis indices in the slice.
        count: usize,
        /// The tensor's rank.
        ndim: usize,
    },
    /// No tensor matched a reference; carries the closest names for the message.
    #[error("no tensor matches `{pattern}`{}", closest_suffix(.closest))]
    NoMatch {
        /// The reference text.
        pattern: String,
        /// A few closest names (see [`closest_names`](super::closest_names)).
        closest: Vec<String>,
    },
}

fn closest_suffix(closest: &[String]) -> String {
    if closest.is_empty() {
        String::new()
    } else {
        format!("; closest: {}", closest.join(", "))
    }
}

//! Whole references and targets as written in a plan: splitting `alias::pattern::[slice]`,
//! reading the structured list and mapping forms from plan values, and pairing the result with a
//! [`Selector`] or [`Template`]. Resolving a missing alias to the plan's default is the caller's.

use std::fmt;

use serde_json::Value;

use super::pattern::{render_tokens, token_text, RegexSelector, StructuredPattern};
use super::{ReferenceError, Selector, SliceSpec, Template};

/// A reference that selects tensors: `alias::pattern::[slice]` or a structured form.
#[derive(Debug, Clone)]
pub struct Reference {
    /// The alias, if written; `None` means the plan's default alias.
    pub alias: Option<String>,
    /// What names match.
    pub selector: Selector,
    /// An optional slice applied to every matched tensor.
    pub slice: Option<SliceSpec>,
    /// The reference as written, for messages.
    pub text: String,
}

/// The destination side of a rewrite (`to`, `from_b`, `right`, ...): alias, template, slice.
#[derive(Debug, Clone)]
pub struct Target {
    /// The alias, if written; `None` means the plan's default alias.
    pub alias: Option<String>,
    /// How the destination name is built from the source captures.
    pub template: Template,
    /// An optional slice of the destination written through.
    pub slice: Option<SliceSpec>,
    /// The target as written, for messages.
    pub text: String,
}

/// True for `[A-Za-z_][A-Za-z0-9_.-]*`, the syntax of input aliases.
pub fn is_alias(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || matches!(x, '_' | '.' | '-'))
}

/// The body of a reference once alias and slice are split off.
enum Body {
    Text(String),
    Tokens(Vec<String>),
}

struct Parts {
    alias: Option<String>,
    body: Body,
    slice: Option<SliceSpec>,
    text: String,
}

/// Splits `alias::pattern::[slice]`. Only a trailing `::[...]` without inner brackets is a slice,
/// so character classes such as `layers\.[0-3]\.w` stay in the pattern.
fn split_str(text: &str) -> Result<Parts, ReferenceError> {
    let mut rest = text;
    let mut slice = None;
    if let Some(body) = rest.strip_suffix(']') {
        if let Some(pos) = body.rfind("::[") {
            let inner = &body[pos + 3..];
            if !inner.contains(['[', ']']) {
                slice = Some(SliceSpec::parse(&rest[pos + 2..])?);
                rest = &rest[..pos];
            }
        }
    }
    let mut alias = None;
    if let Some((head, tail)) = rest.split_once("::") {
        if is_alias(head) {
            alias = Some(head.to_string());
            rest = tail;
        }
    }
    if rest.is_empty() {
        return Err(ReferenceError::EmptyPattern { text: text.to_string() });
    }
    Ok(Parts {
        alias,
        body: Body::Text(rest.to_string()),
        slice,
        text: text.to_string(),
    })
}

fn tokens_of(items: &[Value], text: &str) -> Result<Vec<String>, ReferenceError> {
    if items.is_empty() {
        return Err(ReferenceError::EmptyPattern { text: text.to_string() });
    }
    items.iter().map(token_text).collect()
}

fn type_name(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string `{s}`"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

fn split_value(value: &Value) -> Result<Parts, ReferenceError> {
    match value {
        Value::String(s) => split_str(s),
        Value::Array(items) => {
            let tokens = tokens_of(items, "[]")?;
            Ok(Parts {
                alias: None,
                text: render_tokens(&tokens),
                body: Body::Tokens(tokens),
                slice: None,
            })
        }
        Value::Object(map) => {
            if let Some(key) = map.keys().find(|k| !matches!(k.as_str(), "alias" | "path" | "slice")) {
                return Err(ReferenceError::UnknownKey { key: key.clone() });
            }
            let alias = match map.get("alias") {
                None | Some(Value::Null) => None,
                Some(Value::String(a)) if is_alias(a) => Some(a.clone()),
                Some(Value::String(a)) => return Err(ReferenceError::InvalidAlias { alias: a.clone() }),
                Some(other) => {
                    return Err(ReferenceError::InvalidType {
                        expected: "a string alias",
                        found: type_name(other),
                    })
                }
            };
            let (body, body_text) = match map.get("path") {
                None => return Err(ReferenceError::MissingKey { key: "path" }),
                Some(Value::Array(items)) => {
                    let tokens = tokens_of(items, "[]")?;
                    let t = render_tokens(&tokens);
                    (Body::Tokens(tokens), t)
                }
                // A string path is a plain regex pattern (no alias/slice splitting inside it).
                Some(Value::String(s)) if !s.is_empty() => (Body::Text(s.clone()), s.clone()),
                Some(Value::String(_)) => return Err(ReferenceError::EmptyPattern { text: String::new() }),
                Some(other) => {
                    return Err(ReferenceError::InvalidType {
                        expected: "a list or string path",
                        found: type_name(other),
                    })
                }
            };
            let slice = match map.get("slice") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s.trim_start().starts_with('[') => Some(SliceSpec::parse(s)?),
                // `slice: ":8"` reads naturally in YAML; accept it without brackets.
                Some(Value::String(s)) => Some(SliceSpec::parse(&format!("[{s}]"))?),
                Some(other) => {
                    return Err(ReferenceError::InvalidType {
                        expected: "a slice string",
                        found: type_name(other),
                    })
                }
            };
            let mut text = String::new();
            if let Some(a) = &alias {
                text.push_str(a);
                text.push_str("::");
            }
            text.push_str(&body_text);
            if let Some(s) = &slice {
                text.push_str(&format!("::{s}"));
            }
            Ok(Parts {
                alias,
                body,
                slice,
                text,
            })
        }
        other => Err(ReferenceError::InvalidType {
            expected: "a string, list or mapping",
            found: type_name(other),
        }),
    }
}

impl Reference {
    /// Parses a plan value: a string, a token list, or an `{alias, path, slice}` mapping.
    pub fn parse(value: &Value) -> Result<Self, ReferenceError> {
        Self::from_parts(split_value(value)?)
    }

    /// Parses the string form `alias::pattern::[slice]` (alias and slice optional).
    pub fn parse_str(text: &str) -> Result<Self, ReferenceError> {
        Self::from_parts(split_str(text)?)
    }

    fn from_parts(p: Parts) -> Result<Self, ReferenceError> {
        let selector = match &p.body {
            Body::Text(t) => Selector::Regex(RegexSelector::new(t)?),
            Body::Tokens(t) => Selector::Structured(StructuredPattern::new(t)?),
        };
        Ok(Reference {
            alias: p.alias,
            selector,
            slice: p.slice,
            text: p.text,
        })
    }

    /// The alias, or `default` when none was written.
    pub fn alias_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.alias.as_deref().unwrap_or(default)
    }
}

impl Target {
    /// Parses a plan value: a template string, a token list, or an `{alias, path, slice}` mapping.
    pub fn parse(value: &Value) -> Result<Self, ReferenceError> {
        Self::from_parts(split_value(value)?)
    }

    /// Parses the string form `alias::template::[slice]` (alias and slice optional).
    pub fn parse_str(text: &str) -> Result<Self, ReferenceError> {
        Self::from_parts(split_str(text)?)
    }

    fn from_parts(p: Parts) -> Result<Self, ReferenceError> {
        let template = match &p.body {
            Body::Text(t) => Template::parse_string(t)?,
            Body::Tokens(t) => Template::parse_tokens(t)?,
        };
        Ok(Target {
            alias: p.alias,
            template,
            slice: p.slice,
            text: p.text,
        })
    }

    /// The destination name for one match.
    pub fn expand(&self, caps: &super::Captures) -> Result<String, ReferenceError> {
        self.template.expand(caps)
    }

    /// Validates the template's group references against the source selector.
    pub fn check_against(&self, selector: &Selector) -> Result<(), ReferenceError> {
        self.template.check_against(selector)
    }

    /// The alias, or `default` when none was written.
    pub fn alias_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.alias.as_deref().unwrap_or(default)
    }
}

impl fmt::Display for Reference {
    /// The reference as written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Display for Target {
    /// The target as written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn string_forms_split_alias_and_slice() {
        let r = Reference::parse_str(r"ft::model\.layers\.(\d+)\.w::[:8, ::2]").expect("valid");
        assert_eq!(r.alias.as_deref(), Some("ft"));
        assert_eq!(r.selector.to_string(), r"model\.layers\.(\d+)\.w");
        assert_eq!(r.slice.as_ref().map(|s| s.to_string()).as_deref(), Some("[:8, ::2]"));
        let r = Reference::parse_str("w::[1]").expect("valid");
        assert_eq!((r.alias.as_deref(), r.selector.to_string()), (None, "w".to_string()));
        assert!(r.slice.is_some());
        let r = Reference::parse_str("base::a.b").expect("valid");
        assert_eq!((r.alias.as_deref(), r.slice.is_none()), (Some("base"), true));
        assert_eq!(r.alias_or("model"), "base");
        let r = Reference::parse_str(".*").expect("valid");
        assert_eq!((r.alias_or("model"), r.text.as_str()), ("model", ".*"));
    }

    #[test]
    fn character_classes_are_not_slices() {
        let r = Reference::parse_str(r"layers\.[0-3]\.w").expect("valid");
        assert!(r.slice.is_none() && r.alias.is_none());
        assert!(r.selector.is_match("layers.2.w") && !r.selector.is_match("layers.5.w"));
        let r = Reference::parse_str(r"m::w[ab]").expect("valid");
        assert_eq!((r.alias.as_deref(), r.slice.is_none()), (Some("m"), true));
        let r = Reference::parse_str(r"m::w[ab]::[0]").expect("valid");
        assert!(r.selector.is_match("wa") && r.slice.is_some());
        // An alias-shaped prefix needs `::`; a non-alias prefix stays in the pattern.
        let r = Reference::parse_str(r"(a)::b").expect("valid");
        assert!(r.alias.is_none() && r.selector.is_match("a::b"));
    }

    #[test]
    fn structured_forms() {
        let r = Reference::parse(&json!({"alias": "ft", "path": ["model", "layers", "$i", "*rest"], "slice": "[:8]"}))
            .expect("valid");
        assert_eq!(r.alias.as_deref(), Some("ft"));
        assert_eq!(r.text, "ft::[model, layers, $i, *rest]::[:8]");
        assert!(r.selector.is_match("model.layers.0.w"));
        let r = Reference::parse(&json!(["layers", 0, "$p"])).expect("YAML integers are literals");
        assert!(r.selector.is_match("layers.0.w") && r.alias.is_none());
        let r = Reference::parse(&json!({"path": r"a\.\d+", "slice": ":2"})).expect("string path");
        assert!(r.selector.is_match("a.7"));
        assert_eq!(r.slice.map(|s| s.to_string()).as_deref(), Some("[:2]"));
    }

    #[test]
    fn targets() {
        let src = Reference::parse_str(r"ft::model\.(.*)").expect("valid");
        let t = Target::parse(&json!(r"base::\g<0>::[:8]")).expect("valid");
        assert_eq!((t.alias.as_deref(), t.slice.is_some()), (Some("base"), true));
        t.check_against(&src.selector).expect("groups exist");
        let caps = src.selector.captures("model.x").expect("matches");
        assert_eq!(t.expand(&caps), Ok("model.x".into()));
        let t = Target::parse(&json!({"alias": "b", "path": ["new", "*rest"]})).expect("valid");
        let src = Reference::parse(&json!(["old", "*rest"])).expect("valid");
        t.check_against(&src.selector).expect("valid");
        assert_eq!(
            t.expand(&src.selector.captures("old.a.b").expect("matches")),
            Ok("new.a.b".into())
        );
        assert_eq!(
            Target::parse_str("w::[:8]")
                .expect("valid")
                .template
                .literal()
                .as_deref(),
            Some("w")
        );
    }

    #[test]
    fn invalid_type() {
        let e = Reference::parse(&json!(3)).expect_err("number");
        assert_eq!(
            e,
            ReferenceError::InvalidType {
                expected: "a string, list or mapping",
                found: "number 3".into()
            }
        );
        assert!(matches!(
            Reference::parse(&json!([1.5])),
            Err(ReferenceError::InvalidToken { .. })
        ));
        assert!(matches!(
            Reference::parse(&json!({"path": ["a"], "slice": 3})),
            Err(ReferenceError::InvalidType { .. })
        ));
    }

    #[test]
    fn unknown_key() {
        let e = Reference::parse(&json!({"path": ["a"], "slcie": "[0]"})).expect_err("typo");
        assert_eq!(e, ReferenceError::UnknownKey { key: "slcie".into() });
        assert!(e.to_string().contains("slcie"));
    }

    #[test]
    fn missing_key() {
        let e = Target::parse(&json!({"alias": "a"})).expect_err("no path");
        assert_eq!(e, ReferenceError::MissingKey { key: "path" });
    }

    #[test]
    fn invalid_alias() {
        let e = Reference::parse(&json!({"alias": "9x", "path": ["a"]})).expect_err("bad alias");
        assert_eq!(e, ReferenceError::InvalidAlias { alias: "9x".into() });
    }

    #[test]
    fn empty_pattern() {
        assert_eq!(
            Reference::parse_str("ft::").err(),
            Some(ReferenceError::EmptyPattern { text: "ft::".into() })
        );
        assert!(matches!(
            Reference::parse(&json!([])),
            Err(ReferenceError::EmptyPattern { .. })
        ));
        assert!(matches!(
            Reference::parse_str("::[0]"),
            Err(ReferenceError::EmptyPattern { .. })
        ));
    }

    #[test]
    fn bad_slice_suffix() {
        assert!(matches!(
            Reference::parse_str("w::[x]"),
            Err(ReferenceError::InvalidSlice { .. })
        ));
    }
}

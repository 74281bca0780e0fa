//! `help`: describe transforms and assertion operators. Every line is generated from the same
//! tables that validate payloads (`TransformSpec::keys` in [`REGISTRY`] and
//! [`assert::OPERATORS`]), so keys, defaults and help cannot drift apart. The command line's
//! `brainsurgery help [NAME]` prints the same text through [`help_text`].

use serde_json::{Map, Value as Json};

use super::{assert, columns, Context, Flow, StepError, Transform, TransformSpec, REGISTRY};
use crate::plan::error::suggest;
use crate::plan::payload::{Field, FieldKind, Payload};
use crate::plan::{Location, PlanError};
use crate::state::State;

const HELP_FIELDS: &[Field] = &[
    Field::optional(
        "transform",
        FieldKind::Text,
        None,
        "the transform to describe (every transform is listed when absent)",
    ),
    Field::optional(
        "assert",
        FieldKind::Text,
        None,
        "an assertion operator to describe (`equal`, `count`, ...)",
    ),
];

/// `help`.
pub const HELP: TransformSpec = TransformSpec {
    name: "help",
    summary: "describe transforms and assertion operators: `help`, `help: scale_`, `help: {assert: equal}`",
    form: super::Form::Plain,
    fields: HELP_FIELDS,
    parse: parse_help,
};

/// The assertion operators whose payload is not a key table, described here.
const COMBINATORS: &[(&str, &str)] = &[
    (
        "all",
        "a list of assertions; holds when every one holds (an empty list holds)",
    ),
    ("any", "a list of assertions; holds when at least one holds"),
    (
        "not",
        "one assertion; holds when it is false (an invalid pattern or unknown alias is still an error)",
    ),
];

/// What to describe.
#[derive(Debug, Clone)]
enum Topic {
    All,
    Transform(&'static TransformSpec),
    Operator(&'static str),
}

fn transform_topic(name: &str, location: &Location) -> Result<Topic, PlanError> {
    match REGISTRY.iter().copied().find(|s| s.name == name) {
        Some(spec) => Ok(Topic::Transform(spec)),
        None => Err(PlanError::UnknownTransform {
            location: location.clone(),
            name: name.to_owned(),
            suggestion: suggest(name, REGISTRY.iter().map(|s| s.name)),
        }),
    }
}

fn operator_topic(name: &str, location: &Location) -> Result<Topic, PlanError> {
    match assert::OPERATORS.iter().find(|(n, _)| *n == name) {
        Some((op, _)) => Ok(Topic::Operator(op)),
        None => {
            let names: Vec<&str> = assert::OPERATORS.iter().map(|(n, _)| *n).collect();
            let hint = suggest(name, names.iter().copied())
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            Err(PlanError::invalid(
                location,
                format!(
                    "unknown assertion operator `{name}`{hint} expected one of: {}",
                    names.join(", ")
                ),
            ))
        }
    }
}

fn parse_help(value: &Json, cx: &super::ParseContext) -> Result<Box<dyn Transform>, PlanError> {
    let location = &cx.location;
    let topic = match value {
        Json::Null => Topic::All,
        Json::String(name) => transform_topic(name, location)?,
        other => {
            let empty = Json::Object(Map::new());
            let value = if other.is_null() { &empty } else { other };
            let p = Payload::new(value, HELP_FIELDS, location.clone())?;
            match (p.text("transform")?, p.text("assert")?) {
                (None, None) => Topic::All,
                (Some(name), None) => transform_topic(name, &p.at("transform"))?,
                (None, Some(op)) => operator_topic(op, &p.at("assert"))?,
                (Some(_), Some(_)) => {
                    return Err(PlanError::invalid(
                        location,
                        "help takes `transform` or `assert`, not both",
                    ))
                }
            }
        }
    };
    Ok(Box::new(Help { topic }))
}

#[derive(Debug)]
struct Help {
    topic: Topic,
}

impl Transform for Help {
    fn apply(&self, _state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let text = match &self.topic {
            Topic::All => overview(),
            Topic::Transform(spec) => transform_help(spec),
            Topic::Operator(op) => operator_help(op).unwrap_or_default(),
        };
        ctx.emit(text);
        ctx.note("help".to_owned());
        Ok(Flow::Continue)
    }
}

/// Every transform with its summary, then the assertion operators.
pub fn overview() -> String {
    let width = REGISTRY.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let mut lines = vec!["transforms (`help: NAME` describes one):".to_owned()];
    for spec in REGISTRY {
        lines.push(format!("  {}  {}", columns::pad_right(spec.name, width), spec.summary));
    }
    lines.push(format!(
        "assertion operators (`help: {{assert: NAME}}` describes one): {}",
        operator_names().join(", ")
    ));
    lines.join("\n")
}

fn operator_names() -> Vec<&'static str> {
    assert::OPERATORS.iter().map(|(n, _)| *n).collect()
}

/// How help shows whether a key is required, and its default.
fn requirement(field: &Field) -> String {
    match (field.required, field.default) {
        (true, _) => "required".to_owned(),
        (false, Some(default)) => format!("optional (default: {default})"),
        (false, None) => "optional".to_owned(),
    }
}

/// One aligned line per key: name, kind, required or default, doc.
fn field_lines(fields: &[Field]) -> Vec<String> {
    let w0 = fields.iter().map(|f| f.name.len()).max().unwrap_or(0);
    let w1 = fields.iter().map(|f| f.kind.describe().len()).max().unwrap_or(0);
    let w2 = fields.iter().map(|f| requirement(f).chars().count()).max().unwrap_or(0);
    fields
        .iter()
        .map(|f| {
            let need = requirement(f);
            format!(
                "  {}  {}  {}  {}",
                columns::pad_right(f.name, w0),
                columns::pad_right(f.kind.describe(), w1),
                columns::pad_right(&need, w2),
                f.doc
            )
        })
        .collect()
}

/// A transform's summary and keys.
pub fn transform_help(spec: &TransformSpec) -> String {
    let mut lines = vec![format!("{}: {}", spec.name, spec.summary)];
    if spec.name == assert::ASSERT.name {
        lines.push("operators (`help: {assert: NAME}` describes one):".to_owned());
        for (op, fields) in assert::OPERATORS {
            let keys = if fields.is_empty() {
                COMBINATORS
                    .iter()
                    .find(|(n, _)| n == op)
                    .map_or(String::new(), |(_, doc)| doc.to_string())
            } else {
                fields
                    .iter()
                    .map(|f| {
                        if f.required {
                            f.name.to_owned()
                        } else {
                            format!("[{}]", f.name)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            lines.push(format!("  {op}: {keys}"));
        }
    } else if spec.keys().is_empty() {
        lines.push("takes no keys".to_owned());
    } else {
        lines.push("keys:".to_owned());
        lines.extend(field_lines(&spec.keys()));
    }
    lines.join("\n")
}

/// A key as data: name, type (as help shows it), whether required, default and doc.
fn key_data(f: &Field) -> Json {
    serde_json::json!({
        "name": f.name,
        "type": f.kind.describe(),
        "required": f.required,
        "default": f.default,
        "doc": f.doc,
    })
}

/// Every transform as data, from the same tables as help (for Python's
/// `_core.transform_specs()` and, later, the plan builder): name, doc (the summary), form
/// (`plain`, `new`, `in_place`), `in_place`, the twin's name, the keys, and for `assert` its
/// operators.
pub fn specs_data() -> Json {
    let specs = REGISTRY.iter().map(|spec| {
        let mut entry = serde_json::json!({
            "name": spec.name,
            "doc": spec.summary,
            "form": spec.form.as_str(),
            "in_place": spec.form == super::Form::InPlace,
            "twin": spec.twin().map(|t| t.name),
            "keys": spec.keys().iter().map(key_data).collect::<Vec<_>>(),
        });
        if spec.name == assert::ASSERT.name {
            let operators = assert::OPERATORS.iter().map(|(op, fields)| {
                let doc = COMBINATORS.iter().find(|(n, _)| n == op).map(|(_, d)| *d);
                serde_json::json!({
                    "name": op,
                    "doc": doc,
                    "keys": fields.iter().map(key_data).collect::<Vec<_>>(),
                })
            });
            entry["operators"] = Json::Array(operators.collect());
        }
        entry
    });
    Json::Array(specs.collect())
}

/// An assertion operator's keys, or `None` for an unknown operator.
pub fn operator_help(op: &str) -> Option<String> {
    let (name, fields) = assert::OPERATORS.iter().find(|(n, _)| *n == op)?;
    let mut lines = vec![format!("assert {name}:")];
    if fields.is_empty() {
        let doc = COMBINATORS.iter().find(|(n, _)| n == name).map_or("", |(_, d)| d);
        lines.push(format!("  takes {doc}"));
    } else {
        lines.push("keys:".to_owned());
        lines.extend(field_lines(fields));
    }
    Some(lines.join("\n"))
}

/// Help for the words after `brainsurgery help`: nothing (the overview), a transform name, an
/// assertion operator, or `assert OPERATOR`. The error names the unknown word.
pub fn help_text(words: &[&str]) -> Result<String, String> {
    let unknown = |word: &str| {
        let candidates = REGISTRY.iter().map(|s| s.name).chain(operator_names());
        let hint = suggest(word, candidates)
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_default();
        format!("no transform or assertion operator is named `{word}`{hint}")
    };
    match words {
        [] => Ok(overview()),
        ["assert", op] => operator_help(op).ok_or_else(|| unknown(op)),
        [name] => match REGISTRY.iter().find(|s| s.name == *name) {
            Some(spec) => Ok(transform_help(spec)),
            None => operator_help(name).ok_or_else(|| unknown(name)),
        },
        _ => Err(format!(
            "help takes one name (`help scale_`) or `help assert OPERATOR`, got {} words",
            words.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Help cannot silently lack entries: every transform has a summary, every key a doc, and
    /// every key appears in its transform's help.
    #[test]
    fn every_transform_and_key_is_documented() {
        for spec in REGISTRY {
            assert!(!spec.summary.trim().is_empty(), "{} has no summary", spec.name);
            let text = transform_help(spec);
            for field in &spec.keys() {
                assert!(!field.doc.trim().is_empty(), "{}.{} has no doc", spec.name, field.name);
                assert!(text.contains(field.name) && text.contains(field.doc), "{text}");
            }
            assert!(overview().contains(spec.name));
        }
        for (op, fields) in assert::OPERATORS {
            let text = operator_help(op).expect("known operator");
            if fields.is_empty() {
                assert!(
                    COMBINATORS.iter().any(|(n, _)| n == op),
                    "operator {op} has no description"
                );
            }
            for field in *fields {
                assert!(!field.doc.trim().is_empty(), "assert {op}.{} has no doc", field.name);
                assert!(text.contains(field.doc), "{text}");
            }
        }
    }

    #[test]
    fn unknown_names_suggest() {
        let location = Location::root().key("transforms").index(0).key("help");
        let err = parse_help(
            &json!("scal"),
            &crate::transforms::test_support::context(&HELP, &location),
        )
        .map(|_| ())
        .unwrap_err();
        assert!(err.to_string().contains("transforms[0].help"));
        let err = parse_help(
            &json!("scael_"),
            &crate::transforms::test_support::context(&HELP, &location),
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(err.contains("did you mean `scale_`"), "{err}");
        let err = parse_help(
            &json!({"assert": "eqaul"}),
            &crate::transforms::test_support::context(&HELP, &location),
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("transforms[0].help.assert") && err.contains("did you mean `equal`"),
            "{err}"
        );
        let err = parse_help(
            &json!({"transform": "copy", "assert": "equal"}),
            &crate::transforms::test_support::context(&HELP, &location),
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(err.contains("not both"), "{err}");
        assert!(help_text(&["scael_"]).unwrap_err().contains("did you mean `scale_`"));
        assert!(help_text(&["assert", "equal"]).unwrap().contains("eps"));
    }
}

//! Typed access to one transform's payload mapping. Each transform declares its keys once as a
//! `&[Field]` table; the same table rejects unknown keys (with a "did you mean"), checks required
//! keys, and is what `help` prints, so keys, defaults and help cannot drift apart.

use serde_json::{Map, Value};

use super::document::kind_of;
use super::error::{suggest, PlanError};
use super::location::Location;
use crate::dtype::DType;
use crate::references::{Reference, Target};

/// What a payload key holds, for validation messages and help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// A tensor reference (`alias::pattern::[slice]` or a structured pattern).
    Reference,
    /// A rewrite template for destination names.
    Target,
    /// A number.
    Number,
    /// A boolean.
    Bool,
    /// A dtype name.
    DType,
    /// A free-form string.
    Text,
    /// A nested assertion expression.
    Expression,
    /// A list of whole numbers (a shape).
    Shape,
    /// A number or a nested list of numbers (fill values, broadcast NumPy-style).
    Values,
    /// A list of whole numbers (`order`, `sizes`); `Shape` when one may be -1.
    Numbers,
    /// A list of rewrite templates (`split.to`).
    Targets,
    /// A list of tensor references (`concat.from`).
    References,
    /// A list of transforms (`execute.transforms`).
    Transforms,
    /// A whole plan mapping (`execute.plan`).
    Plan,
    /// Aliases with their parameters: a mapping alias → parameters, or a list of aliases
    /// (`merge.models`).
    Models,
    /// A merge parameter: a number, a gradient (a list of numbers) or a list of
    /// `{filter, value}` entries.
    Parameter,
    /// Layer ranges of aliases: a list of `{alias, layers: [start, end]}` (`merge.slices`).
    Slices,
    /// A router initialization: a name (`zeros`, `random`) or a one-key mapping
    /// (`upcycle_moe.router`).
    Router,
    /// A list of aliases (`upcycle_moe.experts_from`).
    Aliases,
    /// A mapping of names to regex patterns (`upcycle_moe.mlp`).
    Patterns,
    /// Dotted paths and their values: a mapping `{path: value}` or a list of `path=value`
    /// texts typed like overrides (`config.set`).
    Settings,
    /// Dotted paths (`config.delete`): one, or a list.
    Paths,
}

impl FieldKind {
    /// How help describes the kind.
    pub fn describe(self) -> &'static str {
        match self {
            FieldKind::Reference => "reference",
            FieldKind::Target => "template",
            FieldKind::Number => "number",
            FieldKind::Bool => "bool",
            FieldKind::DType => "dtype",
            FieldKind::Text => "string",
            FieldKind::Expression => "assertion",
            FieldKind::Shape => "shape",
            FieldKind::Values => "nested list",
            FieldKind::Numbers => "list of numbers",
            FieldKind::Targets => "list of templates",
            FieldKind::References => "list of references",
            FieldKind::Transforms => "list of transforms",
            FieldKind::Plan => "plan",
            FieldKind::Models => "models",
            FieldKind::Parameter => "parameter",
            FieldKind::Slices => "slices",
            FieldKind::Router => "router",
            FieldKind::Aliases => "list of aliases",
            FieldKind::Patterns => "patterns",
            FieldKind::Settings => "settings",
            FieldKind::Paths => "list of paths",
        }
    }
}

/// One key a transform accepts.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// The key.
    pub name: &'static str,
    /// What it holds.
    pub kind: FieldKind,
    /// Whether it must be present.
    pub required: bool,
    /// The default, as help shows it.
    pub default: Option<&'static str>,
    /// One line for help.
    pub doc: &'static str,
    /// The one form of an `X` / `X_` twin family that takes the key (`from` and `to` for `X`,
    /// `target` for `X_`), or `None` when every form does.
    pub only: Option<Form>,
}

/// Which form of an `X` / `X_` twin family a transform is: both forms share one key table (keys
/// one form alone takes are marked with [`Field::only`]) and one parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Not one of a twin pair (`copy`, `dump`).
    Plain,
    /// `X`: writes new tensors (`scale: {from, to, by}`).
    New,
    /// `X_`: changes tensors in place (`scale_: {target, by}`).
    InPlace,
}

impl Form {
    /// The name Python and help use: `plain`, `new` or `in_place`.
    pub fn as_str(self) -> &'static str {
        match self {
            Form::Plain => "plain",
            Form::New => "new",
            Form::InPlace => "in_place",
        }
    }

    /// Whether a transform of this form takes `field`.
    pub fn takes(self, field: &Field) -> bool {
        field.only.is_none_or(|only| only == self)
    }
}

impl Field {
    /// A required key.
    pub const fn required(name: &'static str, kind: FieldKind, doc: &'static str) -> Field {
        Field {
            name,
            kind,
            required: true,
            default: None,
            doc,
            only: None,
        }
    }

    /// An optional key with the default help shows.
    pub const fn optional(
        name: &'static str,
        kind: FieldKind,
        default: Option<&'static str>,
        doc: &'static str,
    ) -> Field {
        Field {
            name,
            kind,
            required: false,
            default,
            doc,
            only: None,
        }
    }

    /// The key as only the new form (`X`) of a twin family takes it.
    pub const fn new_only(self) -> Field {
        Field {
            only: Some(Form::New),
            ..self
        }
    }

    /// The key as only the in-place form (`X_`) of a twin family takes it.
    pub const fn in_place_only(self) -> Field {
        Field {
            only: Some(Form::InPlace),
            ..self
        }
    }
}

/// A transform's payload mapping, validated against its field table.
#[derive(Debug)]
pub struct Payload<'a> {
    map: &'a Map<String, Value>,
    location: Location,
}

impl<'a> Payload<'a> {
    /// Checks `value` is a mapping whose keys are all in `fields` and that every required key is
    /// present. `location` is where the payload sits (`transforms[3].scale_`).
    pub fn new(value: &'a Value, fields: &[Field], location: Location) -> Result<Self, PlanError> {
        let Value::Object(map) = value else {
            return Err(PlanError::invalid(
                &location,
                format!(
                    "expected a mapping with keys {}, got {}",
                    fields.iter().map(|f| f.name).collect::<Vec<_>>().join(", "),
                    kind_of(value)
                ),
            ));
        };
        for key in map.keys() {
            if !fields.iter().any(|f| f.name == key) {
                return Err(PlanError::UnknownKey {
                    location: location.clone(),
                    key: key.clone(),
                    suggestion: suggest(key, fields.iter().map(|f| f.name)),
                    expected: fields.iter().map(|f| f.name.to_owned()).collect(),
                });
            }
        }
        for field in fields.iter().filter(|f| f.required) {
            // `key:` with no value is YAML null: as good as absent.
            if map.get(field.name).is_none_or(Value::is_null) {
                return Err(PlanError::MissingKey {
                    location: location.clone(),
                    key: field.name.to_owned(),
                });
            }
        }
        Ok(Payload { map, location })
    }

    /// Where the payload is.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Where one key of the payload is.
    pub fn at(&self, key: &str) -> Location {
        self.location.key(key)
    }

    /// The raw value of a key.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn require(&self, key: &str) -> Result<&'a Value, PlanError> {
        self.get(key).ok_or_else(|| PlanError::MissingKey {
            location: self.location.clone(),
            key: key.to_owned(),
        })
    }

    /// A required tensor reference.
    pub fn reference(&self, key: &str) -> Result<Reference, PlanError> {
        let value = self.require(key)?;
        Reference::parse(value).map_err(|source| PlanError::Reference {
            location: self.at(key),
            source,
        })
    }

    /// A required rewrite template.
    pub fn target(&self, key: &str) -> Result<Target, PlanError> {
        let value = self.require(key)?;
        Target::parse(value).map_err(|source| PlanError::Reference {
            location: self.at(key),
            source,
        })
    }

    /// An optional number.
    pub fn number(&self, key: &str) -> Result<Option<f64>, PlanError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .map(Some)
                .ok_or_else(|| PlanError::invalid(&self.at(key), "number out of range")),
            Some(other) => Err(PlanError::invalid(
                &self.at(key),
                format!("expected a number, got {} `{}`", kind_of(other), compact(other)),
            )),
        }
    }

    /// A required number.
    pub fn required_number(&self, key: &str) -> Result<f64, PlanError> {
        self.require(key)?;
        self.number(key).map(|n| n.unwrap_or_default())
    }

    /// An optional non-negative whole number.
    pub fn count(&self, key: &str) -> Result<Option<usize>, PlanError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64().map(|n| n as usize)),
            Some(other) => Err(PlanError::invalid(
                &self.at(key),
                format!(
                    "expected a whole number ≥ 0, got {} `{}`",
                    kind_of(other),
                    compact(other)
                ),
            )),
        }
    }

    /// An optional boolean with its default.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, PlanError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(PlanError::invalid(
                &self.at(key),
                format!("expected true or false, got {} `{}`", kind_of(other), compact(other)),
            )),
        }
    }

    /// An optional string.
    pub fn text(&self, key: &str) -> Result<Option<&'a str>, PlanError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(PlanError::invalid(
                &self.at(key),
                format!("expected a string, got {} `{}`", kind_of(other), compact(other)),
            )),
        }
    }

    /// An optional dtype name.
    pub fn dtype(&self, key: &str) -> Result<Option<DType>, PlanError> {
        match self.text(key)? {
            None => Ok(None),
            Some(name) => parse_dtype(name, &self.at(key)).map(Some),
        }
    }

    /// An optional list of whole numbers (a shape).
    pub fn shape(&self, key: &str) -> Result<Option<Vec<usize>>, PlanError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => shape_of(value, &self.at(key)).map(Some),
        }
    }
}

/// Parses a dtype name, with the accepted spellings in the error.
pub fn parse_dtype(name: &str, location: &Location) -> Result<DType, PlanError> {
    DType::parse(name).ok_or_else(|| {
        PlanError::invalid(
            location,
            format!(
                "unknown dtype `{name}`; expected one of float64, float32, float16, bfloat16, float8_e4m3fn, \
                 float8_e5m2, int8, int16, int32, int64, uint8, uint16, uint32, uint64, bool"
            ),
        )
    })
}

/// Reads a list of whole numbers.
pub fn shape_of(value: &Value, location: &Location) -> Result<Vec<usize>, PlanError> {
    let invalid = || {
        PlanError::invalid(
            location,
            format!(
                "expected a shape (a list of whole numbers), got {} `{}`",
                kind_of(value),
                compact(value)
            ),
        )
    };
    let Value::Array(items) = value else {
        return Err(invalid());
    };
    items
        .iter()
        .map(|v| v.as_u64().map(|n| n as usize).ok_or_else(invalid))
        .collect()
}

/// A value printed on one line for messages, cut when long.
pub fn compact(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.chars().count() > 60 {
        let cut: String = text.chars().take(57).collect();
        format!("{cut}...")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIELDS: &[Field] = &[
        Field::required("target", FieldKind::Reference, "tensors"),
        Field::optional("by", FieldKind::Number, Some("1"), "factor"),
        Field::optional("dtype", FieldKind::DType, None, "dtype"),
    ];

    fn loc() -> Location {
        Location::root().key("transforms").index(2).key("scale_")
    }

    #[test]
    fn unknown_key_suggests() {
        let v = json!({"target": "x", "bu": 2});
        let err = Payload::new(&v, FIELDS, loc()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("transforms[2].scale_") && text.contains("`bu`") && text.contains("did you mean `by`"),
            "{text}"
        );
    }

    #[test]
    fn missing_and_wrong_types() {
        let v = json!({"by": 2});
        assert!(Payload::new(&v, FIELDS, loc())
            .unwrap_err()
            .to_string()
            .contains("missing required key `target`"));
        let v = json!({"target": "x", "by": "abc"});
        let p = Payload::new(&v, FIELDS, loc()).unwrap();
        let text = p.number("by").unwrap_err().to_string();
        assert!(
            text.contains("transforms[2].scale_.by") && text.contains("abc"),
            "{text}"
        );
        let v = json!({"target": "x", "dtype": "fp33"});
        let p = Payload::new(&v, FIELDS, loc()).unwrap();
        assert!(p
            .dtype("dtype")
            .unwrap_err()
            .to_string()
            .contains("unknown dtype `fp33`"));
        assert!(Payload::new(&json!("x"), FIELDS, loc()).is_err());
    }

    #[test]
    fn a_required_key_without_value_is_missing() {
        // `dtype:` with nothing after it is YAML null: reported as missing, not a panic later.
        let v = json!({"target": null, "by": 2});
        let err = Payload::new(&v, FIELDS, loc()).unwrap_err().to_string();
        assert!(err.contains("missing required key `target`"), "{err}");
    }

    #[test]
    fn shapes() {
        assert_eq!(shape_of(&json!([2, 3]), &loc()).unwrap(), vec![2, 3]);
        assert!(shape_of(&json!(3), &loc()).is_err());
        assert!(shape_of(&json!([2, -1]), &loc()).is_err());
    }
}

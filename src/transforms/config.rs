//! `config`: edits an alias's JSON sidecars (`config.json`, `generation_config.json`, …) by
//! dotted path, so a checkpoint whose tensors a plan changed carries a config that says so
//! (issue 13 item 4). `set` takes `{path: value}` or `path=value` texts typed like command-line
//! overrides (`num_hidden_layers=12`, `rope_scaling.factor=2.0`); `delete` removes paths;
//! `from` first takes another alias's sidecars (config, tokenizer and all), for an alias a plan
//! built. Without `set`, `delete` or `from` it prints the document. Edits stay in memory (inputs
//! are never modified) and a directory output writes the edited document in place of the file.

use serde_json::{Map, Value};

use super::{Context, Flow, StepError, Transform, TransformSpec};
use crate::plan::document::{kind_of, parse_override_path, parse_yaml, PathStep};
use crate::plan::payload::{Field, FieldKind};
use crate::plan::{Location, PlanError};
use crate::state::State;

const FIELDS: &[Field] = &[
    Field::optional(
        "alias",
        FieldKind::Text,
        Some("the default alias"),
        "the alias whose sidecar to edit",
    ),
    Field::optional("file", FieldKind::Text, Some("config.json"), "the JSON sidecar to edit"),
    Field::optional(
        "from",
        FieldKind::Text,
        None,
        "first take this alias's sidecars (config, tokenizer, …), replacing the alias's own",
    ),
    Field::optional(
        "set",
        FieldKind::Settings,
        None,
        "dotted paths and values: {path: value} or `path=value` texts (typed like overrides)",
    ),
    Field::optional(
        "delete",
        FieldKind::Paths,
        None,
        "dotted paths to remove (each must exist)",
    ),
];

/// `config`.
pub const CONFIG: TransformSpec =
    TransformSpec {
        name: "config",
        summary: "edit an alias's JSON sidecars (config.json) by dotted path; without edits, print it",
        form: super::Form::Plain,
        fields: FIELDS,
        parse: |value, cx| {
            let empty = Value::Object(Map::new());
            let value = if value.is_null() { &empty } else { value };
            let p = cx.payload(value)?;
            let file = p.text("file")?.unwrap_or("config.json").to_owned();
            if file.is_empty() || file.contains('/') || file == "." || file == ".." {
                return Err(PlanError::invalid(
                    &p.at("file"),
                    "expected a file name such as config.json",
                ));
            }
            let mut edits = Vec::new();
            if let Some(set) = p.get("set") {
                let at = p.at("set");
                match set {
                    Value::Object(map) => {
                        for (path, value) in map {
                            edits.push(Edit::Set(steps(path, &at.key(path))?, value.clone(), path.clone()));
                        }
                    }
                    Value::Array(items) => {
                        for (i, item) in items.iter().enumerate() {
                            let here = at.index(i);
                            let Value::String(text) = item else {
                                return Err(PlanError::invalid(
                                    &here,
                                    format!("expected `path=value`, got {}", kind_of(item)),
                                ));
                            };
                            let Some((path, text)) = text.split_once('=') else {
                                return Err(PlanError::invalid(
                                    &here,
                                    format!("expected `path=value`, got `{text}`"),
                                ));
                            };
                            let value = if text.trim().is_empty() {
                                Value::String(String::new())
                            } else {
                                parse_yaml(text, &here.to_string())?
                            };
                            let path = path.trim();
                            edits.push(Edit::Set(steps(path, &here)?, value, path.to_owned()));
                        }
                    }
                    Value::String(_) => return Err(PlanError::invalid(
                        &at,
                        "expected a mapping {path: value} or a list of `path=value`; wrap one `path=value` in a list",
                    )),
                    other => {
                        return Err(PlanError::invalid(
                            &at,
                            format!("expected a mapping or a list, got {}", kind_of(other)),
                        ))
                    }
                }
            }
            if let Some(delete) = p.get("delete") {
                let at = p.at("delete");
                let items: Vec<(Location, &Value)> = match delete {
                    Value::Array(items) => items.iter().enumerate().map(|(i, v)| (at.index(i), v)).collect(),
                    one => vec![(at.clone(), one)],
                };
                for (here, item) in items {
                    let Value::String(path) = item else {
                        return Err(PlanError::invalid(
                            &here,
                            format!("expected a dotted path, got {}", kind_of(item)),
                        ));
                    };
                    edits.push(Edit::Delete(steps(path, &here)?, path.clone()));
                }
            }
            Ok(Box::new(Config {
                alias: p.text("alias")?.map(str::to_owned),
                file,
                from: p.text("from")?.map(str::to_owned),
                edits,
                location: cx.location.clone(),
            }))
        },
    };

fn steps(path: &str, location: &Location) -> Result<Vec<PathStep>, PlanError> {
    parse_override_path(path.trim()).map_err(|message| PlanError::invalid(location, message))
}

#[derive(Debug)]
enum Edit {
    /// Steps, value, the path as written.
    Set(Vec<PathStep>, Value, String),
    /// Steps, the path as written.
    Delete(Vec<PathStep>, String),
}

#[derive(Debug)]
struct Config {
    alias: Option<String>,
    file: String,
    from: Option<String>,
    edits: Vec<Edit>,
    location: Location,
}

impl Transform for Config {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let alias = state.alias_for(self.alias.as_deref(), &self.file, &self.location.key("alias"))?;
        if let Some(from) = &self.from {
            if state.alias(from).is_none() {
                return Err(PlanError::UnknownAlias {
                    location: self.location.key("from"),
                    alias: from.clone(),
                    known: state.alias_names(),
                }
                .into());
            }
            state.copy_sidecars(from, &alias);
        }
        let current = state.sidecar_json(&alias, &self.file)?;
        if self.edits.is_empty() {
            match (&current, &self.from) {
                (_, Some(from)) => ctx.note(format!("config: `{alias}` takes the sidecars of `{from}`")),
                (Some(doc), None) => {
                    ctx.emit(serde_json::to_string_pretty(doc).unwrap_or_default());
                    ctx.note(format!("config: {} of `{alias}` printed", self.file));
                }
                (None, None) => ctx.emit(format!("`{alias}` has no {}", self.file)),
            }
            return Ok(Flow::Continue);
        }
        let mut doc = current.unwrap_or_else(|| Value::Object(Map::new()));
        let mut changed = Vec::new();
        for edit in &self.edits {
            match edit {
                Edit::Set(steps, value, path) => {
                    set(&mut doc, steps, value.clone())
                        .map_err(|why| PlanError::invalid(&self.location.key("set"), format!("`{path}`: {why}")))?;
                    changed.push(format!("{path}={}", value));
                }
                Edit::Delete(steps, path) => {
                    delete(&mut doc, steps).map_err(|why| {
                        PlanError::invalid(
                            &self.location.key("delete"),
                            format!("`{path}`: {why} in {}", self.file),
                        )
                    })?;
                    changed.push(format!("-{path}"));
                }
            }
        }
        state.set_sidecar_json(&alias, &self.file, doc);
        ctx.note(format!("config: {} of `{alias}`: {}", self.file, changed.join(", ")));
        Ok(Flow::Continue)
    }
}

/// Sets the value at `steps`, creating mappings on the way.
fn set(doc: &mut Value, steps: &[PathStep], value: Value) -> Result<(), String> {
    let mut node = doc;
    for step in steps {
        node = match step {
            PathStep::Key(key) => {
                if node.is_null() {
                    *node = Value::Object(Map::new());
                }
                let Value::Object(map) = node else {
                    return Err(format!("`{key}` is under a value that is not a mapping"));
                };
                map.entry(key.as_str()).or_insert(Value::Null)
            }
            PathStep::Index(index) => {
                let Value::Array(list) = node else {
                    return Err(format!("[{index}] indexes a value that is not a list"));
                };
                let len = list.len();
                list.get_mut(*index)
                    .ok_or_else(|| format!("index {index} is past the end of a list of {len}"))?
            }
        };
    }
    *node = value;
    Ok(())
}

/// Removes the value at `steps`, which must exist.
fn delete(doc: &mut Value, steps: &[PathStep]) -> Result<(), String> {
    let Some((last, parents)) = steps.split_last() else {
        return Err("empty path".to_owned());
    };
    let mut node = doc;
    for step in parents {
        node = match (step, node) {
            (PathStep::Key(key), Value::Object(map)) => map.get_mut(key.as_str()).ok_or("no such key")?,
            (PathStep::Index(index), Value::Array(list)) => list.get_mut(*index).ok_or("no such index")?,
            _ => return Err("no such key".to_owned()),
        };
    }
    match (last, node) {
        (PathStep::Key(key), Value::Object(map)) => {
            map.shift_remove(key.as_str()).map(drop).ok_or("no such key".to_owned())
        }
        (PathStep::Index(index), Value::Array(list)) if *index < list.len() => {
            list.remove(*index);
            Ok(())
        }
        _ => Err("no such key".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::RawTransform;
    use serde_json::json;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn step(state: &mut State, ctx: &mut Context, payload: Value) -> Result<Flow, StepError> {
        let raw = RawTransform {
            name: "config".into(),
            payload,
            location: Location::root().key("transforms").index(0),
        };
        crate::transforms::parse(&raw, &Default::default())?.apply(state, ctx)
    }

    /// State with alias `m` (the default) whose sidecars are the files given.
    fn with_files(files: &[std::path::PathBuf]) -> State {
        let mut state = State::default();
        state.ensure_alias("m");
        state.default_alias = Some("m".into());
        state.sidecars_mut("m").unwrap().files = files.to_vec();
        state
    }

    #[test]
    fn sets_deletes_and_prints_by_dotted_path() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        let text = r#"{"num_hidden_layers": 4, "rope_scaling": {"factor": 1.0, "type": "linear"}, "x": [1, 2]}"#;
        std::fs::write(&config, text).unwrap();
        let mut state = with_files(std::slice::from_ref(&config));
        let mut ctx = Context::new(true, Arc::new(AtomicBool::new(false)));
        step(
            &mut state,
            &mut ctx,
            json!({"set": ["num_hidden_layers=12", "rope_scaling.factor=2", "new.deep.key='007'", "x[1]=[3, 4]"], "delete": "rope_scaling.type"}),
        )
        .unwrap();
        let doc = state.sidecar_json("m", "config.json").unwrap().unwrap();
        assert_eq!(
            doc,
            json!({"num_hidden_layers": 12, "rope_scaling": {"factor": 2}, "x": [1, [3, 4]], "new": {"deep": {"key": "007"}}})
        );
        // The input file is untouched; the output writes the edited document in its place.
        assert_eq!(std::fs::read_to_string(&config).unwrap(), text);
        let out = state.alias("m").unwrap().sidecars.to_output();
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], crate::formats::output::Sidecar::Contents { name, .. } if name == "config.json"));

        step(
            &mut state,
            &mut ctx,
            json!({"set": {"torch_dtype": "bfloat16"}, "delete": ["new"]}),
        )
        .unwrap();
        let doc = state.sidecar_json("m", "config.json").unwrap().unwrap();
        assert_eq!(doc["torch_dtype"], "bfloat16");
        assert!(doc.get("new").is_none());
        step(&mut state, &mut ctx, json!({})).unwrap();
        assert!(ctx.output.last().unwrap().contains("\"torch_dtype\": \"bfloat16\""));

        let err = step(&mut state, &mut ctx, json!({"delete": ["missing.key"]})).unwrap_err();
        assert!(
            err.to_string().contains("transforms[0].config.delete") && err.to_string().contains("missing.key"),
            "{err}"
        );
        let err = step(&mut state, &mut ctx, json!({"set": ["x[9]=1"]})).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        let err = step(&mut state, &mut ctx, json!({"set": ["no equals"]})).unwrap_err();
        assert!(err.to_string().contains("path=value"), "{err}");
        let err = step(&mut state, &mut ctx, json!({"alias": "nope"})).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let err = step(&mut state, &mut ctx, json!({"file": "../x.json"})).unwrap_err();
        assert!(err.to_string().contains("file name"), "{err}");
    }

    #[test]
    fn invalid_json_sidecar_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        std::fs::write(&config, "{not json").unwrap();
        let mut state = with_files(std::slice::from_ref(&config));
        let mut ctx = Context::new(true, Arc::new(AtomicBool::new(false)));
        let err = step(&mut state, &mut ctx, json!({"set": {"a": 1}})).unwrap_err();
        assert!(
            err.to_string().contains("config.json") && err.to_string().contains("JSON"),
            "{err}"
        );
    }

    #[test]
    fn from_takes_another_alias_sidecars() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        std::fs::write(&config, r#"{"hidden_size": 8}"#).unwrap();
        let tokenizer = dir.path().join("tokenizer.json");
        std::fs::write(&tokenizer, "{}").unwrap();
        let mut state = with_files(&[config.clone(), tokenizer.clone()]);
        state.set_sidecar_json("m", "generation_config.json", json!({"do_sample": false}));
        state.ensure_alias("merged");
        let mut ctx = Context::new(true, Arc::new(AtomicBool::new(false)));
        step(
            &mut state,
            &mut ctx,
            json!({"alias": "merged", "from": "m", "set": ["num_hidden_layers=2"]}),
        )
        .unwrap();
        let merged = &state.alias("merged").unwrap().sidecars;
        assert_eq!(merged.files, vec![config, tokenizer]);
        assert_eq!(
            merged.json("config.json").unwrap().unwrap(),
            json!({"hidden_size": 8, "num_hidden_layers": 2})
        );
        assert_eq!(
            merged.json("generation_config.json").unwrap().unwrap(),
            json!({"do_sample": false})
        );
        // `m` keeps its own config.
        assert_eq!(
            state.sidecar_json("m", "config.json").unwrap().unwrap(),
            json!({"hidden_size": 8})
        );
        let err = step(&mut state, &mut ctx, json!({"alias": "merged", "from": "nope"})).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}

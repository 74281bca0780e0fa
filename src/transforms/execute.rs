//! `execute`: run a nested plan's transforms in the current state. The nested plan is given
//! inline (`transforms: [...]`), as a plan mapping (`plan: {inputs, transforms, output}`) or as a
//! file (`path: other.yaml`). Nested transforms are parsed when the including plan is parsed, so
//! their errors (and `execute` cycles between files) appear before any data is read; their
//! locations name the place in the including plan (`transforms[3].execute.transforms[1]`).
//!
//! A relative `path` resolves against the directory of the plan file that contains it, else (the
//! command line, Python, the `-i` prompt) the working directory: `plan::paths` rebases a plan
//! file's paths when it is read. Which files are being parsed is the [`ParseScope`] every parser
//! is handed, for finding cycles: the executor makes it from the plan's files and a nested
//! file's transforms parse in a scope that adds it.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::load::save_alias;
use super::{run_steps, Context, Flow, Step, StepError, StepFailure, Transform, TransformSpec};
use crate::plan::payload::{Field, FieldKind};
use crate::plan::{assemble, InputSpec, Location, OutputSpec, Plan, PlanError, PlanSource};
use crate::state::State;

const FIELDS: &[Field] = &[
    Field::optional(
        "transforms",
        FieldKind::Transforms,
        None,
        "a list of transforms, run in place",
    ),
    Field::optional(
        "plan",
        FieldKind::Plan,
        None,
        "a plan mapping (inputs, transforms, output)",
    ),
    Field::optional(
        "path",
        FieldKind::Text,
        None,
        "a plan file (relative to the including plan file's folder)",
    ),
];

/// `execute`.
pub const EXECUTE: TransformSpec = TransformSpec {
    name: "execute",
    summary: "run a nested plan (inline transforms, a plan mapping or a plan file) in the current state",
    form: super::Form::Plain,
    fields: FIELDS,
    parse: |value, cx| {
        let location = &cx.location;
        let p = cx.payload(value)?;
        let given: Vec<&str> = ["transforms", "plan", "path"]
            .into_iter()
            .filter(|k| p.get(k).is_some())
            .collect();
        let [key] = given.as_slice() else {
            return Err(PlanError::invalid(
                location,
                "execute takes exactly one of `transforms` (a list), `plan` (a mapping) or `path` (a plan file)",
            ));
        };
        let value = p.get(key).unwrap_or(&Value::Null);
        let (plan, base, scope) = match *key {
            "transforms" => {
                if !value.is_array() {
                    return Err(PlanError::invalid(&p.at("transforms"), "expected a list of transforms"));
                }
                let doc = serde_json::json!({ "transforms": value });
                (Plan::from_document_at(&doc, location)?, location.clone(), None)
            }
            "plan" => {
                let base = location.key("plan");
                (Plan::from_document_at(value, &base)?, base, None)
            }
            _ => {
                let Value::String(text) = value else {
                    return Err(PlanError::invalid(&p.at("path"), "expected a plan file path"));
                };
                let scope = cx.scope.enter(text, &p.at("path"))?;
                let base = location.key(&format!("path({text})"));
                let resolved = scope.files.last().map(|f| f.resolved.clone()).unwrap_or_default();
                let doc = assemble(&[PlanSource::File(resolved)], &[])?;
                (Plan::from_document_at(&doc, &base)?, base, Some(scope))
            }
        };
        // A nested file's transforms parse in its scope (its own `execute` paths resolve against
        // its directory, and a file reached again is a cycle).
        let scope = scope.as_ref().unwrap_or(cx.scope);
        let steps = plan
            .transforms
            .iter()
            .map(|raw| Step::parse(raw, scope))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Box::new(Execute {
            inputs: plan.inputs,
            output: plan.output,
            sha256: super::plan_sha256_with_nested(&plan.sha256, &steps),
            steps,
            base,
        }))
    },
};

/// A plan file being parsed.
#[derive(Debug, Clone)]
struct PlanFile {
    /// The path, canonical when it exists, for comparing.
    canonical: PathBuf,
    /// The path as resolved (for reading and messages).
    resolved: PathBuf,
    /// The path as the plan wrote it, for the cycle message.
    shown: String,
}

impl PlanFile {
    fn new(path: &Path) -> PlanFile {
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        PlanFile {
            canonical,
            resolved: path.to_path_buf(),
            shown: path.display().to_string(),
        }
    }
}

/// The plan files whose transforms are being parsed, outermost first: a file reached again is a
/// cycle.
#[derive(Debug, Clone, Default)]
pub struct ParseScope {
    files: Vec<PlanFile>,
}

impl ParseScope {
    /// No plan file.
    pub const NONE: ParseScope = ParseScope { files: Vec::new() };

    /// The scope of a plan assembled from `files`: a cycle through any of them is found.
    pub fn of_plan(files: &[PathBuf]) -> ParseScope {
        ParseScope {
            files: files.iter().rev().map(|p| PlanFile::new(p)).collect(),
        }
    }

    /// The scope for parsing the plan file `text` names, refusing a missing file and a cycle.
    fn enter(&self, text: &str, location: &Location) -> Result<ParseScope, PlanError> {
        // A plan file's paths were rebased on its folder when it was read (`plan::paths`); a
        // relative path here came from the command line, Python or the prompt: the working
        // directory's.
        let resolved = PathBuf::from(crate::plan::paths::resolve(text, None));
        match std::fs::metadata(&resolved) {
            Err(_) => {
                return Err(PlanError::invalid(
                    location,
                    format!("plan file `{}` does not exist", resolved.display()),
                ))
            }
            // Issue 9: a device or FIFO is refused before anything opens it.
            Ok(metadata) if !metadata.is_file() => {
                return Err(PlanError::invalid(
                    location,
                    format!(
                        "plan file `{}` is {}, not a regular file",
                        resolved.display(),
                        crate::plan::document::file_kind(&metadata.file_type())
                    ),
                ))
            }
            Ok(_) => {}
        }
        let file = PlanFile {
            shown: text.to_owned(),
            ..PlanFile::new(&resolved)
        };
        if let Some(start) = self.files.iter().position(|f| f.canonical == file.canonical) {
            let mut chain: Vec<&str> = self.files[start..].iter().map(|f| f.shown.as_str()).collect();
            chain.push(&file.shown);
            return Err(PlanError::invalid(
                location,
                format!("execute cycle: {}", chain.join(" → ")),
            ));
        }
        let mut files = self.files.clone();
        files.push(file);
        Ok(ParseScope { files })
    }
}

#[derive(Debug)]
struct Execute {
    inputs: Vec<InputSpec>,
    output: Option<OutputSpec>,
    sha256: String,
    steps: Vec<Step>,
    /// Where the nested plan sits (`transforms[3].execute.plan`).
    base: Location,
}

/// Adds the nested step's location to an error from it. Errors from a nested `execute` already
/// carry the innermost location.
fn locate(step: &Step, error: StepError) -> StepError {
    if step.name == EXECUTE.name {
        return error;
    }
    match error {
        StepError::Transform(source) => StepError::Transform(super::TransformError::Nested {
            location: step.location.clone(),
            name: step.name.clone(),
            source: Box::new(source),
        }),
        StepError::Assertion(mut failure) => {
            failure.message = format!("{} (at {})", failure.message, step.location);
            StepError::Assertion(failure)
        }
        other => other,
    }
}

impl Transform for Execute {
    fn nested_sha256(&self) -> Option<&str> {
        Some(&self.sha256)
    }

    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        // The nested plan's "written" set decides its own output alias; the including plan's
        // set gains what the nested plan wrote.
        let outer_written = std::mem::take(&mut state.written);
        let outer_default = state.default_alias.clone();
        let notices = state.open_inputs(&self.inputs, &self.base)?;
        ctx.notices.extend(notices);
        if let [only] = self.inputs.as_slice() {
            state.default_alias = Some(only.alias.clone());
        }
        // `exit` stops the whole run, nested or not; the nested output is still written.
        let flow = run_steps(&self.steps, state, ctx)
            .map_err(|StepFailure { index, error }| locate(&self.steps[index], error))?;
        if let Some(output) = &self.output {
            let location = self.base.key("output");
            let alias = state.output_alias(output.alias.as_deref(), &self.inputs, &location)?;
            save_alias(state, &alias, output, &location, ctx, Some(&self.sha256))?;
        }
        if self.inputs.len() == 1 {
            state.default_alias = outer_default;
        }
        state.written.extend(outer_written);
        ctx.note(format!("execute: {} nested transforms", self.steps.len()));
        Ok(flow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::RawTransform;

    fn parse_in(payload: Value, scope: &ParseScope) -> Result<Box<dyn Transform>, PlanError> {
        super::super::parse(
            &RawTransform {
                name: "execute".into(),
                payload,
                location: Location::root().key("transforms").index(2),
            },
            scope,
        )
    }

    fn parse(payload: Value) -> Result<Box<dyn Transform>, PlanError> {
        parse_in(payload, &ParseScope::default())
    }

    #[test]
    fn nested_transform_errors_carry_the_nested_location() {
        let step = Step {
            name: "scale_".into(),
            location: Location::root()
                .key("transforms")
                .index(2)
                .key("execute")
                .key("transforms")
                .index(1),
            transform: Box::new(super::super::control::Exit),
        };
        let inner = super::super::TransformError::SliceNotAllowed {
            reference: "w".into(),
            transform: "move",
        };
        let err = locate(&step, StepError::Transform(inner));
        assert!(
            matches!(&err, StepError::Transform(super::super::TransformError::Nested { name, .. }) if name == "scale_"),
            "{err}"
        );
        assert!(
            crate::error::error_chain(&err)
                .starts_with("at transforms[2].execute.transforms[1] (scale_): `w`: move does not take"),
            "{err}"
        );
        let err = parse(serde_json::json!({"transforms": [{"scale_": {"target": "w"}}]})).unwrap_err();
        assert!(
            err.to_string().contains("transforms[2].execute.transforms[0].scale_"),
            "{err}"
        );
    }

    #[test]
    fn cycles_between_files_are_found_when_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        std::fs::write(&a, "transforms:\n  - execute: {path: b.yaml}\n").unwrap();
        std::fs::write(dir.path().join("b.yaml"), "transforms:\n  - execute: {path: a.yaml}\n").unwrap();
        let scope = ParseScope::of_plan(std::slice::from_ref(&a));
        let b = dir.path().join("b.yaml").display().to_string();
        let err = parse_in(serde_json::json!({ "path": b }), &scope).unwrap_err();
        let text = err.to_string();
        // `a.yaml` inside b.yaml was rebased on b.yaml's folder.
        let a = a.display();
        assert!(text.ends_with(&format!("execute cycle: {a} → {b} → {a}")), "{text}");
    }

    /// Issue 14 item 3: a plan file's `execute` path resolves against its folder (rebased when
    /// the file is read), one given as data against the working directory.
    #[test]
    fn relative_paths_resolve_against_the_plan_files_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let plan = dir.path().join("sub").join("plan.yaml");
        std::fs::write(&plan, "transforms:\n  - execute: {path: b.yaml}\n").unwrap();
        std::fs::write(dir.path().join("sub").join("b.yaml"), "transforms:\n  - exit\n").unwrap();
        let loaded = Plan::load(&[PlanSource::File(plan.clone())], &[]).unwrap();
        let scope = ParseScope::of_plan(&loaded.files);
        let raw = &loaded.transforms[0];
        super::super::parse(raw, &scope).unwrap();
        // Given as data, the working directory is the base, where `b.yaml` is not.
        let err = parse(serde_json::json!({"path": "b.yaml"})).unwrap_err();
        assert!(err.to_string().contains("plan file `b.yaml` does not exist"), "{err}");
    }
}

//! `execute`: run a nested plan's transforms in the current state. The nested plan is given
//! inline (`transforms: [...]`), as a plan mapping (`plan: {inputs, transforms, output}`) or as a
//! file (`path: other.yaml`). Nested transforms are parsed when the including plan is parsed, so
//! their errors (and `execute` cycles between files) appear before any data is read; their
//! locations name the place in the including plan (`transforms[3].execute.transforms[1]`).
//!
//! A relative `path` resolves against the directory of the plan file that contains it (for the
//! top-level plan, the first plan file given), else the working directory. Which files are being
//! parsed is tracked per thread by [`parsing_plan`] because a transform's parser only sees its
//! payload and location.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::load::save_alias;
use super::{run_steps, Context, Flow, Step, StepError, StepFailure, Transform, TransformSpec};
use crate::plan::payload::{Field, FieldKind, Payload};
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
        "a plan file (relative to the including plan file's directory)",
    ),
];

/// `execute`.
pub const EXECUTE: TransformSpec = TransformSpec {
    name: "execute",
    summary: "run a nested plan (inline transforms, a plan mapping or a plan file) in the current state",
    fields: FIELDS,
    parse: |value, location| {
        let p = Payload::new(value, FIELDS, location.clone())?;
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
        let (plan, base, file) = match *key {
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
                let frame = enter_file(text, &p.at("path"))?;
                let base = location.key(&format!("path({text})"));
                let doc = assemble(&[PlanSource::File(frame.resolved.clone())], &[])?;
                (Plan::from_document_at(&doc, &base)?, base, Some(frame))
            }
        };
        // Nested transforms parse with the nested file on the stack (its own `execute` paths
        // resolve against its directory, and a file reached again is a cycle).
        let steps = with_frame(file, || {
            plan.transforms.iter().map(Step::parse).collect::<Result<Vec<_>, _>>()
        })?;
        Ok(Box::new(Execute {
            inputs: plan.inputs,
            output: plan.output,
            sha256: plan.sha256,
            steps,
            base,
        }))
    },
};

/// A plan file being parsed.
#[derive(Debug, Clone)]
struct Frame {
    /// The path, canonical when it exists, for comparing.
    canonical: PathBuf,
    /// The path as resolved (for reading and messages).
    resolved: PathBuf,
    /// Its directory, for resolving relative `execute` paths inside it.
    dir: PathBuf,
    /// The path as the plan wrote it, for the cycle message.
    shown: String,
}

thread_local! {
    /// The plan files whose transforms are being parsed, outermost first.
    static FRAMES: RefCell<Vec<Frame>> = const { RefCell::new(Vec::new()) };
}

fn frame_of(path: &Path) -> Frame {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let dir = canonical.parent().map(Path::to_path_buf).unwrap_or_default();
    Frame {
        canonical,
        resolved: path.to_path_buf(),
        dir,
        shown: path.display().to_string(),
    }
}

/// Pops what it pushed, even when parsing panics.
struct Pushed(usize);

impl Drop for Pushed {
    fn drop(&mut self) {
        FRAMES.with(|f| {
            let mut frames = f.borrow_mut();
            let keep = frames.len().saturating_sub(self.0);
            frames.truncate(keep);
        });
    }
}

fn push(frames: Vec<Frame>) -> Pushed {
    let n = frames.len();
    FRAMES.with(|f| f.borrow_mut().extend(frames));
    Pushed(n)
}

fn with_frame<R>(frame: Option<Frame>, f: impl FnOnce() -> R) -> R {
    let _pushed = push(frame.into_iter().collect());
    f()
}

/// Runs `f` (which parses a plan's transforms) with `files` as the plan files being parsed, so
/// nested `execute` paths resolve against the first file's directory and cycles through any of
/// them are found.
pub fn parsing_plan<R>(files: &[PathBuf], f: impl FnOnce() -> R) -> R {
    // The first file ends on top: relative paths resolve against its directory.
    let _pushed = push(files.iter().rev().map(|p| frame_of(p)).collect());
    f()
}

/// Resolves an `execute` path against the including file and refuses a cycle.
fn enter_file(text: &str, location: &Location) -> Result<Frame, PlanError> {
    let given = Path::new(text);
    let resolved = if given.is_absolute() {
        given.to_path_buf()
    } else {
        match FRAMES.with(|f| f.borrow().last().map(|fr| fr.dir.clone())) {
            Some(dir) => dir.join(given),
            None => given.to_path_buf(),
        }
    };
    if !resolved.is_file() {
        return Err(PlanError::invalid(
            location,
            format!("plan file `{}` does not exist", resolved.display()),
        ));
    }
    let frame = Frame {
        shown: text.to_owned(),
        ..frame_of(&resolved)
    };
    let cycle = FRAMES.with(|f| {
        let frames = f.borrow();
        let start = frames.iter().position(|fr| fr.canonical == frame.canonical)?;
        let mut chain: Vec<String> = frames[start..].iter().map(|fr| fr.shown.clone()).collect();
        chain.push(frame.shown.clone());
        Some(chain)
    });
    if let Some(chain) = cycle {
        return Err(PlanError::invalid(
            location,
            format!("execute cycle: {}", chain.join(" → ")),
        ));
    }
    Ok(frame)
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

    fn parse(payload: Value) -> Result<Box<dyn Transform>, PlanError> {
        super::super::parse(&RawTransform {
            name: "execute".into(),
            payload,
            location: Location::root().key("transforms").index(2),
        })
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
        let err = parsing_plan(std::slice::from_ref(&a), || {
            parse(serde_json::json!({"path": "b.yaml"})).map(|_| ())
        })
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("execute cycle: ") && text.ends_with("a.yaml → b.yaml → a.yaml"),
            "{text}"
        );
        // The frames are popped again.
        assert!(FRAMES.with(|f| f.borrow().is_empty()));
    }
}

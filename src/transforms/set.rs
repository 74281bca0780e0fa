//! `set`: the run's flags, as the 0.2 tool's `set` sets them (issue 15 item 7). `dry-run`
//! runs the steps that follow and then forgets them: turning it off restores the state it was
//! turned on in (tensors, aliases and access counts), and while it is on `save` and the plan
//! output write nothing. `preview` prints, before each step runs, what it is about to do (its
//! header-only check); `verbose` prints what each step did. `set: {}` prints the flags. The
//! flags live in the [`State`] (so a prompt session keeps them); the step loop
//! ([`super::run_steps`]) reads `preview` and `verbose`.

use serde_json::Value;

use super::{Context, Flow, StepError, Transform, TransformSpec};
use crate::plan::document::kind_of;
use crate::plan::payload::{Field, FieldKind, Payload};
use crate::plan::{Location, PlanError};
use crate::state::State;

const FIELDS: &[Field] = &[
    Field::optional(
        "dry-run",
        FieldKind::Bool,
        Some("false"),
        "run the steps that follow, then forget them when turned off; nothing is written meanwhile",
    ),
    Field::optional(
        "preview",
        FieldKind::Bool,
        Some("false"),
        "print what each step is about to do before it runs",
    ),
    Field::optional("verbose", FieldKind::Bool, Some("false"), "print what each step did"),
];

/// `set`.
pub const SET: TransformSpec = TransformSpec {
    name: "set",
    summary: "set the run's flags (dry-run, preview, verbose); without keys, print them",
    form: super::Form::Plain,
    fields: FIELDS,
    parse: |value, cx| {
        let empty = Value::Object(Default::default());
        // A bare `set` prints the flags like `set: {}`.
        let value = if value.is_null() { &empty } else { value };
        let p = Payload::new(value, FIELDS, cx.location.clone())?;
        let flag =
            |key: &str| -> Result<Option<bool>, PlanError> { p.get(key).map(|v| boolean(v, &p.at(key))).transpose() };
        Ok(Box::new(Set {
            dry_run: flag("dry-run")?,
            preview: flag("preview")?,
            verbose: flag("verbose")?,
        }))
    },
};

/// A flag's value: a boolean, or (as the 0.2 tool takes them) `t`, `true`, `f`, `false` in any
/// case.
fn boolean(value: &Value, location: &Location) -> Result<bool, PlanError> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "t" | "true" => Ok(true),
            "f" | "false" => Ok(false),
            _ => Err(PlanError::invalid(
                location,
                format!("expected true or false (or T, F), got `{s}`"),
            )),
        },
        other => Err(PlanError::invalid(
            location,
            format!("expected true or false, got {}", kind_of(other)),
        )),
    }
}

#[derive(Debug)]
struct Set {
    dry_run: Option<bool>,
    preview: Option<bool>,
    verbose: Option<bool>,
}

impl Transform for Set {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        if self.dry_run.is_none() && self.preview.is_none() && self.verbose.is_none() {
            let f = &state.flags;
            ctx.emit(format!(
                "set flags: dry-run={}, preview={}, verbose={}",
                f.dry_run.is_some(),
                f.preview,
                f.verbose
            ));
            ctx.note("set: flags printed".to_owned());
            return Ok(Flow::Continue);
        }
        let mut changed = Vec::new();
        match (self.dry_run, state.flags.dry_run.is_some()) {
            (Some(true), false) => {
                let snapshot = state.clone();
                state.flags.dry_run = Some(Box::new(snapshot));
                changed.push("dry-run on");
            }
            (Some(false), true) => {
                let flags = std::mem::take(&mut state.flags);
                let snapshot = flags.dry_run.expect("dry-run is on");
                *state = *snapshot;
                // The other flags are the run's, not the forgotten steps'.
                state.flags.preview = flags.preview;
                state.flags.verbose = flags.verbose;
                changed.push("dry-run off: the steps since it was turned on are forgotten");
            }
            _ => {}
        }
        if let Some(preview) = self.preview {
            state.flags.preview = preview;
            changed.push(if preview { "preview on" } else { "preview off" });
        }
        if let Some(verbose) = self.verbose {
            state.flags.verbose = verbose;
            changed.push(if verbose { "verbose on" } else { "verbose off" });
        }
        ctx.note(if changed.is_empty() {
            "set: flags unchanged".to_owned()
        } else {
            format!("set: {}", changed.join(", "))
        });
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::RawTransform;
    use crate::transforms::test_support::counting;
    use serde_json::json;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn step(state: &mut State, ctx: &mut Context, name: &str, payload: Value) -> Result<Flow, StepError> {
        let raw = RawTransform {
            name: name.into(),
            payload,
            location: Location::root().key("transforms").index(0),
        };
        crate::transforms::parse(&raw, &Default::default())?.apply(state, ctx)
    }

    /// Issue 15 item 7: what runs under dry-run is forgotten when it is turned off; the other
    /// flags stay; `set: {}` prints them.
    #[test]
    fn dry_run_is_forgotten_and_flags_print() {
        let mut state = State::default();
        state.insert("m", "x", counting(&[2], 0));
        state.default_alias = Some("m".into());
        let mut ctx = Context::new(true, Arc::new(AtomicBool::new(false)));
        step(&mut state, &mut ctx, "set", json!({"dry-run": true, "verbose": "T"})).unwrap();
        step(&mut state, &mut ctx, "copy", json!({"from": "x", "to": "y"})).unwrap();
        assert!(state.get("m", "y").is_some());
        step(&mut state, &mut ctx, "set", json!({})).unwrap();
        step(&mut state, &mut ctx, "set", json!({"dry-run": false})).unwrap();
        assert!(state.get("m", "y").is_none() && state.get("m", "x").is_some());
        assert!(state.flags.verbose && state.flags.dry_run.is_none());
        assert_eq!(ctx.output, ["set flags: dry-run=true, preview=false, verbose=true"]);
        let err = step(&mut state, &mut ctx, "set", json!({"preview": "maybe"})).unwrap_err();
        assert!(err.to_string().contains("transforms[0].set.preview"), "{err}");
        let err = step(&mut state, &mut ctx, "set", json!({"dryrun": true})).unwrap_err();
        assert!(err.to_string().contains("dry-run"), "{err}");
    }
}

//! `exit`: stop executing transforms; the output is still written.

use super::{Context, Flow, StepError, Transform, TransformSpec};
use crate::plan::PlanError;
use crate::state::State;

/// `exit`.
pub const EXIT: TransformSpec = TransformSpec {
    name: "exit",
    summary: "stop executing transforms (the output is still written)",
    form: super::Form::Plain,
    fields: &[],
    parse: |value, cx| {
        let location = &cx.location;
        let empty = value.is_null() || value.as_object().is_some_and(|m| m.is_empty());
        if !empty {
            return Err(PlanError::invalid(location, "exit takes no keys"));
        }
        Ok(Box::new(Exit))
    },
};

#[derive(Debug)]
pub(crate) struct Exit;

impl Transform for Exit {
    fn apply(&self, _state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        ctx.note("exit".to_owned());
        Ok(Flow::Exit)
    }
}

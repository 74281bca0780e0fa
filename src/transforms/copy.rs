//! `copy`, `move` and `delete`: transforms that change which names exist, never the bytes.
//! A copy or move is a new name for the same lazy value; no data is read or copied here.

use serde_json::Value;

use super::{count_noun, destinations, Context, Flow, StepError, Transform, TransformError, TransformSpec, Writes};
use crate::plan::payload::{Field, FieldKind};
use crate::plan::{Location, PlanError};
use crate::references::{Reference, Target};
use crate::state::State;

const FROM_TO: &[Field] = &[
    Field::required("from", FieldKind::Reference, "tensors to read (a slice makes a view)"),
    Field::required("to", FieldKind::Target, "destination names, rewritten from each match"),
];

/// `copy`: new tensors with the same values.
pub const COPY: TransformSpec = TransformSpec {
    name: "copy",
    summary: "new tensors with the same values as the matched ones",
    form: super::Form::Plain,
    fields: FROM_TO,
    parse: |value, cx| {
        let p = cx.payload(value)?;
        Ok(Box::new(Copy {
            from: p.reference("from")?,
            to: p.target("to")?,
            location: cx.location.clone(),
        }))
    },
};

/// `move`: rename.
pub const MOVE: TransformSpec = TransformSpec {
    name: "move",
    summary: "rename tensors (no data is copied, ever)",
    form: super::Form::Plain,
    fields: FROM_TO,
    parse: |value, cx| {
        let p = cx.payload(value)?;
        Ok(Box::new(Move {
            from: p.reference("from")?,
            to: p.target("to")?,
            location: cx.location.clone(),
        }))
    },
};

const DELETE_FIELDS: &[Field] = &[
    Field::required("target", FieldKind::Reference, "tensors to remove"),
    Field::optional(
        "missing_ok",
        FieldKind::Bool,
        Some("false"),
        "succeed when nothing matches",
    ),
];

/// `delete`: remove tensors.
pub const DELETE: TransformSpec = TransformSpec {
    name: "delete",
    summary: "remove tensors",
    form: super::Form::Plain,
    fields: DELETE_FIELDS,
    parse: |value, cx| {
        // `delete: pattern` is accepted as shorthand for `delete: {target: pattern}`.
        let (target, missing_ok) = if let Value::String(_) = value {
            let target = Reference::parse(value).map_err(|source| PlanError::Reference {
                location: cx.location.clone(),
                source,
            })?;
            (target, false)
        } else {
            let p = cx.payload(value)?;
            (p.reference("target")?, p.flag("missing_ok", false)?)
        };
        Ok(Box::new(Delete {
            target,
            missing_ok,
            location: cx.location.clone(),
        }))
    },
};

#[derive(Debug)]
struct Copy {
    from: Reference,
    to: Target,
    location: Location,
}

impl Transform for Copy {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let matches = state.select_some(&self.from, &self.location)?;
        let destinations = destinations(state, &matches, &self.to, Writes::New, "copy", &self.location)?;
        for (m, d) in matches.iter().zip(&destinations) {
            state.insert(&d.alias, &d.name, m.tensor.clone());
        }
        ctx.note(format!("copy: {}", count_noun(matches.len())));
        Ok(Flow::Continue)
    }
}

#[derive(Debug)]
struct Move {
    from: Reference,
    to: Target,
    location: Location,
}

impl Transform for Move {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        if self.from.slice.is_some() {
            return Err(TransformError::SliceNotAllowed {
                reference: self.from.text.clone(),
                transform: "move",
            }
            .into());
        }
        // Checked before selecting, like the source's slice.
        if self.to.slice.is_some() {
            return Err(TransformError::SliceNotAllowed {
                reference: self.to.text.clone(),
                transform: "move",
            }
            .into());
        }
        let matches = state.select_some(&self.from, &self.location)?;
        let destinations = destinations(state, &matches, &self.to, Writes::Moved, "move", &self.location)?;
        let removed: Vec<_> = matches
            .iter()
            .map(|m| state.remove(&m.alias, &m.name).expect("matched tensors exist"))
            .collect();
        for ((tensor, order), (d, m)) in removed.into_iter().zip(destinations.iter().zip(&matches)) {
            if d.alias == m.alias {
                state.insert_at(&d.alias, &d.name, tensor, order);
            } else {
                // Moving to another alias appends, like any new tensor there.
                state.insert(&d.alias, &d.name, tensor);
            }
        }
        ctx.note(format!("move: {}", count_noun(matches.len())));
        Ok(Flow::Continue)
    }
}

#[derive(Debug)]
struct Delete {
    target: Reference,
    missing_ok: bool,
    location: Location,
}

impl Transform for Delete {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        if self.target.slice.is_some() {
            return Err(TransformError::SliceNotAllowed {
                reference: self.target.text.clone(),
                transform: "delete",
            }
            .into());
        }
        let matches = if self.missing_ok {
            state.select(&self.target, &self.location)?
        } else {
            state.select_some(&self.target, &self.location)?
        };
        for m in &matches {
            state.remove(&m.alias, &m.name);
        }
        ctx.note(format!("delete: {}", count_noun(matches.len())));
        Ok(Flow::Continue)
    }
}

//! `scale` and `scale_`: multiply floating tensors by a number, computed in f32 (f64 for F64)
//! and rounded to nearest even back. In place through a slice, only the region is scaled.

use std::sync::Arc;

use super::{
    count_noun, new_destinations, require_float, Context, Flow, StepError, Transform, TransformError, TransformSpec,
};
use crate::plan::payload::{Field, FieldKind, Payload};
use crate::plan::{Location, PlanError};
use crate::references::ResolvedSlice;
use crate::references::{Reference, Target};
use crate::state::{Match, State};
use crate::value::{ScaleFn, Tensor};

const SCALE_FIELDS: &[Field] = &[
    Field::required("from", FieldKind::Reference, "tensors to read (may be sliced)"),
    Field::required("to", FieldKind::Target, "destination names"),
    Field::required("by", FieldKind::Number, "the factor"),
];

const SCALE_INPLACE_FIELDS: &[Field] = &[
    Field::required(
        "target",
        FieldKind::Reference,
        "tensors to scale in place (a slice scales only that part)",
    ),
    Field::required("by", FieldKind::Number, "the factor"),
];

fn factor(p: &Payload) -> Result<f64, PlanError> {
    let by = p.required_number("by")?;
    if !by.is_finite() {
        return Err(PlanError::invalid(&p.at("by"), "the factor must be finite"));
    }
    Ok(by)
}

/// `scale`.
pub const SCALE: TransformSpec = TransformSpec {
    name: "scale",
    summary: "new tensors multiplied by a number",
    fields: SCALE_FIELDS,
    parse: |value, location| {
        let p = Payload::new(value, SCALE_FIELDS, location.clone())?;
        Ok(Box::new(Scale {
            from: p.reference("from")?,
            to: Some(p.target("to")?),
            by: factor(&p)?,
            location: location.clone(),
        }))
    },
};

/// `scale_`.
pub const SCALE_: TransformSpec = TransformSpec {
    name: "scale_",
    summary: "multiply tensors by a number in place",
    fields: SCALE_INPLACE_FIELDS,
    parse: |value, location| {
        let p = Payload::new(value, SCALE_INPLACE_FIELDS, location.clone())?;
        Ok(Box::new(Scale {
            from: p.reference("target")?,
            to: None,
            by: factor(&p)?,
            location: location.clone(),
        }))
    },
};

#[derive(Debug)]
struct Scale {
    from: Reference,
    to: Option<Target>,
    by: f64,
    location: Location,
}

fn scaled(m: &Match, tensor: &Tensor, region: Option<ResolvedSlice>, by: f64) -> Result<Tensor, StepError> {
    tensor
        .map(region, Arc::new(ScaleFn(by)))
        .map_err(|e| TransformError::value_of(&m.display(), e))
}

impl Transform for Scale {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let matches = state.select_some(&self.from, &self.location)?;
        for m in &matches {
            require_float(m, "scale")?;
        }
        match &self.to {
            Some(to) => {
                let destinations = new_destinations(state, &matches, to, "scale", &self.location)?;
                for (m, (alias, name)) in matches.iter().zip(&destinations) {
                    state.insert(alias, name, scaled(m, &m.tensor, None, self.by)?);
                }
                ctx.note(format!("scale: {} × {}", count_noun(matches.len()), self.by));
            }
            None => {
                for m in &matches {
                    // Through a slice only the region is scaled; the base is read once.
                    let region = m
                        .slice
                        .clone()
                        .filter(|r| !(r.is_full() && m.tensor.shape == m.base.shape));
                    let tensor = scaled(m, &m.base, region, self.by)?;
                    state.replace(&m.alias, &m.name, tensor);
                }
                ctx.note(format!("scale_: {} × {}", count_noun(matches.len()), self.by));
            }
        }
        Ok(Flow::Continue)
    }
}

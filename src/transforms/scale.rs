//! `scale` and `scale_`: multiply floating tensors by a number, computed in f32 (f64 for F64)
//! and rounded to nearest even back. In place through a slice, only the region is scaled.

use std::sync::Arc;

use super::{
    count_noun, destinations, from_key, require_float, target_key, to_key, Context, Flow, Form, StepError, Transform,
    TransformError, TransformSpec, Twin, Writes,
};
use crate::plan::payload::{Field, FieldKind};
use crate::plan::{Location, PlanError};
use crate::references::ResolvedSlice;
use crate::references::{Reference, Target};
use crate::state::{Match, State};
use crate::value::{ScaleFn, Tensor};

/// `scale` and `scale_`: one key table, one parser.
const TWIN: Twin = Twin {
    new: ("scale", "new tensors multiplied by a number"),
    in_place: ("scale_", "multiply tensors by a number in place"),
    fields: &[
        from_key("tensors to read (may be sliced)"),
        to_key("destination names"),
        target_key("tensors to scale in place (a slice scales only that part)"),
        Field::required("by", FieldKind::Number, "the factor"),
    ],
    parse: |value, cx| {
        let p = cx.payload(value)?;
        let (from, to) = cx.operands(&p)?;
        let by = p.required_number("by")?;
        if !by.is_finite() {
            return Err(PlanError::invalid(&p.at("by"), "the factor must be finite"));
        }
        Ok(Box::new(Scale {
            from,
            to,
            by,
            location: cx.location.clone(),
        }))
    },
};

/// `scale`.
pub const SCALE: TransformSpec = TWIN.spec(Form::New);
/// `scale_`.
pub const SCALE_: TransformSpec = TWIN.spec(Form::InPlace);

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
                let destinations = destinations(state, &matches, to, Writes::New, "scale", &self.location)?;
                for (m, d) in matches.iter().zip(&destinations) {
                    state.insert(&d.alias, &d.name, scaled(m, &m.tensor, None, self.by)?);
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

//! `cast` and `cast_`: change dtype with NumPy `astype` semantics (the kernels live in
//! `kernels::convert`). `only: float` restricts a cast to floating tensors, so a blanket
//! `.*` → bf16 leaves integer buffers (position ids, masks) alone.

use super::arith::converted;
use super::{
    count_noun, destinations, from_key, target_key, to_key, Context, Flow, Form, StepError, Transform, TransformError,
    TransformSpec, Twin, Writes,
};
use crate::dtype::DType;
use crate::plan::payload::{Field, FieldKind};
use crate::plan::{Location, PlanError};
use crate::references::{Reference, Target};
use crate::state::State;

/// `cast` and `cast_`: one key table, one parser.
const TWIN: Twin = Twin {
    new: ("cast", "new tensors converted to another dtype"),
    in_place: ("cast_", "convert tensors to another dtype in place"),
    fields: &[
        from_key("tensors to convert (may be sliced)"),
        to_key("destination names"),
        target_key("tensors to convert in place"),
        // SPEC §9: `cast_` accepts `to` as well as `dtype`.
        Field::optional("to", FieldKind::DType, None, "the new dtype (or `dtype`)").in_place_only(),
        Field::required("dtype", FieldKind::DType, "the new dtype").new_only(),
        Field::optional("dtype", FieldKind::DType, None, "the new dtype (or `to`)").in_place_only(),
        Field::optional(
            "only",
            FieldKind::Text,
            None,
            "`float`: skip matches that are not floating point",
        ),
    ],
    parse: |value, cx| {
        let location = &cx.location;
        let p = cx.payload(value)?;
        let dtype = match cx.spec.form {
            Form::InPlace => match (p.dtype("to")?, p.dtype("dtype")?) {
                (Some(a), Some(b)) if a != b => {
                    return Err(PlanError::invalid(
                        location,
                        format!("`to` ({a}) and `dtype` ({b}) disagree"),
                    ))
                }
                (Some(d), _) | (None, Some(d)) => d,
                (None, None) => {
                    return Err(PlanError::MissingKey {
                        location: location.clone(),
                        key: "dtype".into(),
                    })
                }
            },
            _ => p.dtype("dtype")?.expect("required key"),
        };
        let (from, to) = cx.operands(&p)?;
        let only_float = match p.text("only")? {
            None => false,
            Some("float") => true,
            Some(other) => {
                return Err(PlanError::invalid(
                    &p.at("only"),
                    format!("`only` takes `float`, got `{other}`"),
                ))
            }
        };
        Ok(Box::new(Cast {
            from,
            to,
            dtype,
            only_float,
            location: location.clone(),
        }))
    },
};

/// `cast`: new tensors with another dtype.
pub const CAST: TransformSpec = TWIN.spec(Form::New);
/// `cast_`: convert in place.
pub const CAST_: TransformSpec = TWIN.spec(Form::InPlace);

#[derive(Debug)]
struct Cast {
    from: Reference,
    /// `None` for the in-place form.
    to: Option<Target>,
    dtype: DType,
    only_float: bool,
    location: Location,
}

impl Transform for Cast {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let mut matches = state.select_some(&self.from, &self.location)?;
        if self.only_float {
            matches.retain(|m| m.tensor.dtype.is_float());
        }
        let casts = matches
            .iter()
            .map(|m| converted(&m.tensor, &m.display(), self.dtype, "cast"))
            .collect::<Result<Vec<_>, _>>()?;
        match &self.to {
            Some(to) => {
                let destinations = destinations(state, &matches, to, Writes::New, "cast", &self.location)?;
                for (d, tensor) in destinations.iter().zip(casts) {
                    state.insert(&d.alias, &d.name, tensor);
                }
                ctx.note(format!("cast: {} → {}", count_noun(matches.len()), self.dtype));
            }
            None => {
                if self.from.slice.is_some() {
                    return Err(TransformError::SliceNotAllowed {
                        reference: self.from.text.clone(),
                        transform: "cast_",
                    }
                    .into());
                }
                for (m, tensor) in matches.iter().zip(casts) {
                    state.replace(&m.alias, &m.name, tensor);
                }
                ctx.note(format!("cast_: {} → {}", count_noun(matches.len()), self.dtype));
            }
        }
        Ok(Flow::Continue)
    }
}

//! `cast` and `cast_`: change dtype with NumPy `astype` semantics (the kernels live in
//! `kernels::convert`). `only: float` restricts a cast to floating tensors, so a blanket
//! `.*` → bf16 leaves integer buffers (position ids, masks) alone.

use std::sync::Arc;

use super::{count_noun, new_destinations, Context, Flow, StepError, Transform, TransformError, TransformSpec};
use crate::dtype::DType;
use crate::plan::payload::{Field, FieldKind, Payload};
use crate::plan::{Location, PlanError};
use crate::references::{Reference, Target};
use crate::state::{Match, State};
use crate::value::{Tensor, Value};

const CAST_FIELDS: &[Field] = &[
    Field::required("from", FieldKind::Reference, "tensors to convert (may be sliced)"),
    Field::required("to", FieldKind::Target, "destination names"),
    Field::required("dtype", FieldKind::DType, "the new dtype"),
    Field::optional(
        "only",
        FieldKind::Text,
        None,
        "`float`: skip matches that are not floating point",
    ),
];

const CAST_INPLACE_FIELDS: &[Field] = &[
    Field::required("target", FieldKind::Reference, "tensors to convert in place"),
    Field::optional("to", FieldKind::DType, None, "the new dtype (or `dtype`)"),
    Field::optional("dtype", FieldKind::DType, None, "the new dtype (or `to`)"),
    Field::optional(
        "only",
        FieldKind::Text,
        None,
        "`float`: skip matches that are not floating point",
    ),
];

fn parse_only(p: &Payload) -> Result<bool, PlanError> {
    match p.text("only")? {
        None => Ok(false),
        Some("float") => Ok(true),
        Some(other) => Err(PlanError::invalid(
            &p.at("only"),
            format!("`only` takes `float`, got `{other}`"),
        )),
    }
}

/// `cast`: new tensors with another dtype.
pub const CAST: TransformSpec = TransformSpec {
    name: "cast",
    summary: "new tensors converted to another dtype",
    fields: CAST_FIELDS,
    parse: |value, location| {
        let p = Payload::new(value, CAST_FIELDS, location.clone())?;
        let dtype = p.dtype("dtype")?.expect("required key");
        Ok(Box::new(Cast {
            from: p.reference("from")?,
            to: Some(p.target("to")?),
            dtype,
            only_float: parse_only(&p)?,
            location: location.clone(),
        }))
    },
};

/// `cast_`: convert in place.
pub const CAST_: TransformSpec = TransformSpec {
    name: "cast_",
    summary: "convert tensors to another dtype in place",
    fields: CAST_INPLACE_FIELDS,
    parse: |value, location| {
        let p = Payload::new(value, CAST_INPLACE_FIELDS, location.clone())?;
        // SPEC §9: `cast_` accepts `dtype` as well as `to`.
        let dtype = match (p.dtype("to")?, p.dtype("dtype")?) {
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
        };
        Ok(Box::new(Cast {
            from: p.reference("target")?,
            to: None,
            dtype,
            only_float: parse_only(&p)?,
            location: location.clone(),
        }))
    },
};

#[derive(Debug)]
struct Cast {
    from: Reference,
    /// `None` for the in-place form.
    to: Option<Target>,
    dtype: DType,
    only_float: bool,
    location: Location,
}

/// The lazy cast of a matched tensor.
pub fn cast_tensor(m: &Match, dtype: DType) -> Result<Tensor, TransformError> {
    if m.tensor.dtype == dtype {
        return Ok(m.tensor.clone());
    }
    for d in [m.tensor.dtype, dtype] {
        if !d.is_computable() {
            return Err(TransformError::Unsupported {
                op: "cast",
                tensor: m.display(),
                dtype: d,
            });
        }
    }
    Ok(Tensor {
        dtype,
        shape: m.tensor.shape.clone(),
        value: Arc::new(Value::Cast { base: m.tensor.clone() }),
    })
}

impl Transform for Cast {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let mut matches = state.select_some(&self.from, &self.location)?;
        if self.only_float {
            matches.retain(|m| m.tensor.dtype.is_float());
        }
        let casts = matches
            .iter()
            .map(|m| cast_tensor(m, self.dtype))
            .collect::<Result<Vec<_>, _>>()?;
        match &self.to {
            Some(to) => {
                let destinations = new_destinations(state, &matches, to, "cast", &self.location)?;
                for ((alias, name), tensor) in destinations.iter().zip(casts) {
                    state.insert(alias, name, tensor);
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

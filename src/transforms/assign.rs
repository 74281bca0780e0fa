//! `assign`: write values into existing tensors, whole or through a slice. Writing through a
//! slice is lazy too: the destination becomes "old value with this region replaced", so the rest
//! of the tensor streams from where it is and is never copied through memory.

use std::sync::Arc;

use super::{count_noun, Context, Destinations, Flow, StepError, Transform, TransformError, TransformSpec, Writes};
use crate::plan::payload::{Field, FieldKind};
use crate::plan::Location;
use crate::references::{Reference, Target};
use crate::state::State;
use crate::value::{Tensor, Value};

const FIELDS: &[Field] = &[
    Field::required(
        "from",
        FieldKind::Reference,
        "tensors whose values are written (may be sliced)",
    ),
    Field::required(
        "to",
        FieldKind::Target,
        "existing tensors written into, rewritten from each match (may be sliced)",
    ),
];

/// `assign`.
pub const ASSIGN: TransformSpec = TransformSpec {
    name: "assign",
    summary: "write values into existing tensors (shape and dtype must agree)",
    form: super::Form::Plain,
    fields: FIELDS,
    parse: |value, cx| {
        let p = cx.payload(value)?;
        Ok(Box::new(Assign {
            from: p.reference("from")?,
            to: p.target("to")?,
            location: cx.location.clone(),
        }))
    },
};

#[derive(Debug)]
struct Assign {
    from: Reference,
    to: Target,
    location: Location,
}

impl Transform for Assign {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let matches = state.select_some(&self.from, &self.location)?;
        let mut destinations = Destinations::new(&matches, &self.to, Writes::Existing, "assign", &self.location)?;
        let mut writes = Vec::with_capacity(matches.len());
        for m in &matches {
            // Each match is checked in full before the next one's destination.
            let d = destinations.of(state, m)?;
            let display = format!("{}::{}", d.alias, d.name);
            let dest = d.current.as_ref().expect("an existing destination has a tensor");
            let dest_shape = d.shape().unwrap_or(&dest.shape).to_vec();
            let region = d.region.clone();
            let (alias, name) = (d.alias, d.name);
            if m.tensor.dtype != dest.dtype {
                return Err(TransformError::DTypeMismatch {
                    source_name: m.display(),
                    source_dtype: m.tensor.dtype,
                    destination: display,
                    destination_dtype: dest.dtype,
                }
                .into());
            }
            if m.tensor.shape != dest_shape {
                return Err(TransformError::ShapeMismatch {
                    source_name: m.display(),
                    source_shape: m.tensor.shape.clone(),
                    destination: display,
                    destination_shape: dest_shape,
                }
                .into());
            }
            let tensor = match region {
                Some(region) if !(region.is_full() && region.shape == dest.shape) => {
                    if dest.dtype.size().is_none() {
                        return Err(TransformError::Unsupported {
                            op: "assign through a slice",
                            tensor: display,
                            dtype: dest.dtype,
                        }
                        .into());
                    }
                    Tensor {
                        dtype: dest.dtype,
                        shape: dest.shape.clone(),
                        value: Arc::new(Value::Overwrite {
                            base: dest.clone(),
                            region,
                            with: m.tensor.clone(),
                        }),
                    }
                }
                // A whole-tensor assignment is just the source's value under the old name.
                _ => Tensor {
                    dtype: dest.dtype,
                    shape: dest.shape.clone(),
                    value: m.tensor.value.clone(),
                },
            };
            writes.push((alias, name, tensor));
        }
        for (alias, name, tensor) in writes {
            state.replace(&alias, &name, tensor);
        }
        ctx.note(format!("assign: {}", count_noun(matches.len())));
        Ok(Flow::Continue)
    }
}

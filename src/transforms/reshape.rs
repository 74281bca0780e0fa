//! `reshape` and `reshape_`: give tensors another shape with the same element count. No data
//! moves: a reshaped tensor is the same lazy value read with another shape, because every value
//! reads elements by row-major linear index, whatever shape its tensor carries. The one exception
//! is a [`Value::Op`], whose `read` is handed the tensor's shape; it is wrapped so it keeps seeing
//! its own.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value as Json;

use super::{
    count_noun, destinations, fmt_shape, from_key, target_key, to_key, Context, Flow, Form, StepError, Transform,
    TransformError, TransformSpec, Twin, Writes,
};
use crate::dtype::DType;
use crate::plan::document::kind_of;
use crate::plan::payload::{compact, Field, FieldKind, Payload};
use crate::plan::{Location, PlanError};
use crate::references::{Reference, Target};
use crate::state::{Match, State};
use crate::value::{LazyOp, ReadContext, Tensor, Value, ValueError};

/// `reshape` and `reshape_`: one key table, one parser.
const TWIN: Twin = Twin {
    new: ("reshape", "new tensors with another shape (same elements, row-major)"),
    in_place: ("reshape_", "give tensors another shape in place"),
    fields: &[
        from_key("tensors to reshape (may be sliced)"),
        to_key("destination names"),
        target_key("tensors to reshape in place (no slice)"),
        Field::required(
            "shape",
            FieldKind::Shape,
            "the new shape, a list of whole numbers; one may be -1 (inferred)",
        ),
    ],
    parse: |value, cx| {
        let p = cx.payload(value)?;
        let (from, to) = cx.operands(&p)?;
        Ok(Box::new(Reshape {
            from,
            to,
            shape: parse_shape(&p)?,
            location: cx.location.clone(),
        }))
    },
};

/// `reshape`.
pub const RESHAPE: TransformSpec = TWIN.spec(Form::New);
/// `reshape_`.
pub const RESHAPE_: TransformSpec = TWIN.spec(Form::InPlace);

/// A requested shape: whole numbers, at most one `None` (written `-1`).
fn parse_shape(p: &Payload) -> Result<Vec<Option<usize>>, PlanError> {
    let at = p.at("shape");
    let value = p.get("shape").unwrap_or(&Json::Null);
    let invalid = || {
        PlanError::invalid(
            &at,
            format!(
                "expected a shape (a list of whole numbers, one may be -1), got {} `{}`",
                kind_of(value),
                compact(value)
            ),
        )
    };
    let Json::Array(items) = value else {
        return Err(invalid());
    };
    let dims: Vec<Option<usize>> = items
        .iter()
        .map(|v| match v.as_i64() {
            Some(-1) => Ok(None),
            Some(n) if n >= 0 => Ok(Some(n as usize)),
            _ => Err(invalid()),
        })
        .collect::<Result<_, _>>()?;
    if dims.iter().filter(|d| d.is_none()).count() > 1 {
        return Err(PlanError::invalid(&at, "at most one dimension may be -1"));
    }
    Ok(dims)
}

/// The requested shape as written: `(3, -1)`.
fn written(shape: &[Option<usize>]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| d.map_or_else(|| "-1".to_owned(), |n| n.to_string()))
        .collect();
    match dims.as_slice() {
        [one] => format!("({one},)"),
        _ => format!("({})", dims.join(", ")),
    }
}

/// Resolves the `-1` of `requested` against `numel`, checking the element count.
pub(crate) fn resolve_shape(m: &Match, requested: &[Option<usize>]) -> Result<Vec<usize>, TransformError> {
    let numel = m.tensor.numel();
    let known = requested
        .iter()
        .flatten()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let error = |requested_count: String| TransformError::ElementCount {
        tensor: m.display(),
        shape: m.tensor.shape.clone(),
        requested: format!("{} ({requested_count})", written(requested)),
    };
    let Some(known) = known else {
        return Err(error("too many elements".to_owned()));
    };
    let inferred = if requested.iter().any(Option::is_none) {
        if known == 0 || !numel.is_multiple_of(known) {
            return Err(error(format!("no whole size for -1 gives {numel} elements")));
        }
        Some(numel / known)
    } else {
        None
    };
    let shape: Vec<usize> = requested.iter().map(|d| d.or(inferred).unwrap_or(0)).collect();
    if shape.iter().product::<usize>() != numel {
        return Err(error(format!("{known} elements")));
    }
    Ok(shape)
}

/// Reads an operation's result as another shape: the operation keeps seeing its own shape.
#[derive(Debug)]
struct Reshaped {
    inner: Tensor,
}

impl LazyOp for Reshaped {
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.inner]
    }

    fn name(&self) -> &'static str {
        "reshape"
    }

    fn materialized(&self, seen: &mut HashSet<usize>) -> usize {
        self.inner.materialized(seen)
    }

    fn bytes_to_read(&self, seen: &mut HashSet<usize>) -> u64 {
        self.inner.bytes_to_read(seen)
    }

    fn read(
        &self,
        _dtype: DType,
        _shape: &[usize],
        start: usize,
        out: &mut [u8],
        cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        self.inner.read(start, out, cx)
    }
}

/// `tensor` read with `shape` (same element count): the same lazy value, except operations.
pub fn reshaped(tensor: &Tensor, shape: Vec<usize>) -> Tensor {
    match &*tensor.value {
        // An operation's dtype is byte-sized (checked when it was built), as `Reshaped` needs.
        Value::Op(_) => Tensor {
            dtype: tensor.dtype,
            shape,
            value: Arc::new(Value::Op(Arc::new(Reshaped { inner: tensor.clone() }))),
        },
        _ => Tensor {
            dtype: tensor.dtype,
            shape,
            value: tensor.value.clone(),
        },
    }
}

#[derive(Debug)]
struct Reshape {
    from: Reference,
    /// `None` for the in-place form.
    to: Option<Target>,
    shape: Vec<Option<usize>>,
    location: Location,
}

impl Transform for Reshape {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        if self.to.is_none() && self.from.slice.is_some() {
            return Err(TransformError::SliceNotAllowed {
                reference: self.from.text.clone(),
                transform: "reshape_",
            }
            .into());
        }
        let matches = state.select_some(&self.from, &self.location)?;
        let shapes: Vec<Vec<usize>> = matches
            .iter()
            .map(|m| resolve_shape(m, &self.shape))
            .collect::<Result<_, _>>()?;
        let shown = shapes.first().map(|s| fmt_shape(s)).unwrap_or_default();
        match &self.to {
            Some(to) => {
                let destinations = destinations(state, &matches, to, Writes::New, "reshape", &self.location)?;
                for ((m, d), shape) in matches.iter().zip(&destinations).zip(shapes) {
                    state.insert(&d.alias, &d.name, reshaped(&m.tensor, shape));
                }
                ctx.note(format!("reshape: {} to {shown}", count_noun(matches.len())));
            }
            None => {
                for (m, shape) in matches.iter().zip(shapes) {
                    state.replace(&m.alias, &m.name, reshaped(&m.base, shape));
                }
                ctx.note(format!("reshape_: {} to {shown}", count_noun(matches.len())));
            }
        }
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::references::SliceSpec;
    use crate::transforms::test_support;

    fn matched(shape: &[usize]) -> Match {
        test_support::matched("x", test_support::counting(shape, 0))
    }

    #[test]
    fn infers_minus_one_and_rejects_wrong_counts() {
        let m = matched(&[4, 6]);
        assert_eq!(resolve_shape(&m, &[Some(3), None]).unwrap(), vec![3, 8]);
        assert_eq!(resolve_shape(&m, &[None]).unwrap(), vec![24]);
        let err = resolve_shape(&m, &[Some(5), Some(5)]).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, TransformError::ElementCount { .. }));
        assert!(
            text.contains("`m::x`") && text.contains("(4, 6)") && text.contains("(5, 5)"),
            "{text}"
        );
        assert!(resolve_shape(&m, &[Some(5), None]).is_err());
        assert!(resolve_shape(&m, &[Some(0), None]).is_err());
    }

    #[test]
    fn reshaped_views_and_views_of_reshapes_read_linearly() {
        let m = matched(&[4, 6]);
        let slice = SliceSpec::parse("[1:3, ::2]").unwrap().resolve(&[4, 6]).unwrap();
        let view = crate::transforms::view_of(&m.tensor, &slice, "x").unwrap();
        let flat = reshaped(&view, vec![6]);
        let mut out = vec![0u8; 12];
        flat.read(0, &mut out, &mut ReadContext::default()).unwrap();
        let got: Vec<u16> = out.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(got, vec![6, 8, 10, 12, 14, 16]);
        // A view of a reshaped tensor: rows of the [3, 8] reshape.
        let r = reshaped(&m.tensor, vec![3, 8]);
        let slice = SliceSpec::parse("[1:, 6:]").unwrap().resolve(&[3, 8]).unwrap();
        let view = crate::transforms::view_of(&r, &slice, "x").unwrap();
        let mut out = vec![0u8; 8];
        view.read(0, &mut out, &mut ReadContext::default()).unwrap();
        let got: Vec<u16> = out.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(got, vec![14, 15, 22, 23]);
    }
}

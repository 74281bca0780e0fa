//! `clamp` and `clamp_`: limit floating tensors to `[min, max]` (either bound optional, at least
//! one), computed in f32 with the bounds rounded to f32 (f64 for F64) and rounded to nearest even
//! back, as `np.clip(x.astype(f32), f32(min), f32(max)).astype(dtype)`. NaN stays NaN. In place
//! through a slice, only the region changes, as an in-place map read once per chunk.

use std::collections::HashSet;
use std::sync::Arc;

use super::{
    count_noun, destinations, from_key, require_float, target_key, to_key, Context, Flow, Form, StepError, Transform,
    TransformError, TransformSpec, Twin, Writes,
};
use crate::dtype::DType;
use crate::kernels;
use crate::plan::payload::{Field, FieldKind, Payload};
use crate::plan::{Location, PlanError};
use crate::references::{Reference, Target};
use crate::state::State;
use crate::value::{ElementFn, LazyOp, ReadContext, Tensor, ValueError};

/// Reads and checks the bounds: at least one, finite, `min <= max`.
fn bounds(p: &Payload) -> Result<(Option<f64>, Option<f64>), PlanError> {
    let (min, max) = (p.number("min")?, p.number("max")?);
    if min.is_none() && max.is_none() {
        return Err(PlanError::invalid(p.location(), "clamp needs `min`, `max` or both"));
    }
    for (key, v) in [("min", min), ("max", max)] {
        if v.is_some_and(|v| !v.is_finite()) {
            return Err(PlanError::invalid(&p.at(key), format!("`{key}` must be finite")));
        }
    }
    if let (Some(lo), Some(hi)) = (min, max) {
        if lo > hi {
            return Err(PlanError::invalid(
                p.location(),
                format!("`min` ({lo}) is greater than `max` ({hi})"),
            ));
        }
    }
    Ok((min, max))
}

/// `clamp` and `clamp_`: one key table, one parser.
const TWIN: Twin = Twin {
    new: ("clamp", "new tensors limited to [min, max]"),
    in_place: ("clamp_", "limit tensors to [min, max] in place"),
    fields: &[
        from_key("tensors to read (may be sliced)"),
        to_key("destination names"),
        target_key("tensors to clamp in place (a slice clamps only that part)"),
        Field::optional("min", FieldKind::Number, None, "lower bound (give min, max or both)"),
        Field::optional("max", FieldKind::Number, None, "upper bound (give min, max or both)"),
    ],
    parse: |value, cx| {
        let p = cx.payload(value)?;
        let (min, max) = bounds(&p)?;
        let (from, to) = cx.operands(&p)?;
        Ok(Box::new(Clamp {
            from,
            to,
            min,
            max,
            location: cx.location.clone(),
        }))
    },
};

/// `clamp`.
pub const CLAMP: TransformSpec = TWIN.spec(Form::New);
/// `clamp_`.
pub const CLAMP_: TransformSpec = TWIN.spec(Form::InPlace);

#[derive(Debug)]
struct Clamp {
    from: Reference,
    to: Option<Target>,
    min: Option<f64>,
    max: Option<f64>,
    location: Location,
}

/// The lazy clamp of a floating tensor.
#[derive(Debug)]
pub struct ClampOp {
    base: Tensor,
    min: Option<f64>,
    max: Option<f64>,
}

impl ClampOp {
    /// `base` clamped (same dtype and shape; `base` must be a computable float).
    pub fn tensor(base: Tensor, min: Option<f64>, max: Option<f64>) -> Result<Tensor, ValueError> {
        let (dtype, shape) = (base.dtype, base.shape.clone());
        Tensor::op(dtype, shape, Arc::new(ClampOp { base, min, max }))
    }
}

/// Comparisons rather than `max`/`min`, so NaN (which compares false) passes through.
fn clip<T: PartialOrd + Copy>(x: T, lo: Option<T>, hi: Option<T>) -> T {
    match (lo, hi) {
        (Some(lo), _) if x < lo => lo,
        (_, Some(hi)) if x > hi => hi,
        _ => x,
    }
}

impl LazyOp for ClampOp {
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.base]
    }

    fn name(&self) -> &'static str {
        "clamp"
    }

    fn materialized(&self, seen: &mut HashSet<usize>) -> usize {
        self.base.materialized(seen)
    }

    fn bytes_to_read(&self, seen: &mut HashSet<usize>) -> u64 {
        self.base.bytes_to_read(seen)
    }

    fn read(
        &self,
        dtype: DType,
        _shape: &[usize],
        start: usize,
        out: &mut [u8],
        cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        self.base.read(start, out, cx)?;
        let (lo32, hi32) = (self.min.map(|v| v as f32), self.max.map(|v| v as f32));
        let (lo, hi) = (self.min, self.max);
        kernels::map_in_place(dtype, out, |x| clip(x, lo32, hi32), |x| clip(x, lo, hi));
        Ok(())
    }
}

/// Clamping in place, for [`crate::value::Value::Map`].
#[derive(Debug)]
struct ClampFn {
    min: Option<f64>,
    max: Option<f64>,
}

impl ElementFn for ClampFn {
    fn apply(&self, dtype: DType, _index: usize, values: &mut [u8], _cx: &mut ReadContext) -> Result<(), ValueError> {
        let (lo32, hi32) = (self.min.map(|v| v as f32), self.max.map(|v| v as f32));
        let (lo, hi) = (self.min, self.max);
        kernels::map_in_place(dtype, values, |x| clip(x, lo32, hi32), |x| clip(x, lo, hi));
        Ok(())
    }
}

impl Transform for Clamp {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let name = if self.to.is_some() { "clamp" } else { "clamp_" };
        let matches = state.select_some(&self.from, &self.location)?;
        for m in &matches {
            require_float(m, name)?;
        }
        match &self.to {
            Some(to) => {
                let destinations = destinations(state, &matches, to, Writes::New, name, &self.location)?;
                for (m, d) in matches.iter().zip(&destinations) {
                    let tensor = ClampOp::tensor(m.tensor.clone(), self.min, self.max)
                        .map_err(|e| TransformError::value_of(&m.display(), e))?;
                    state.insert(&d.alias, &d.name, tensor);
                }
            }
            None => {
                for m in &matches {
                    // In place: a map of the base (its region), read once per chunk.
                    let region = m
                        .slice
                        .clone()
                        .filter(|r| !(r.is_full() && m.tensor.shape == m.base.shape));
                    let f = Arc::new(ClampFn {
                        min: self.min,
                        max: self.max,
                    });
                    let tensor = m
                        .base
                        .map(region, f)
                        .map_err(|e| TransformError::value_of(&m.display(), e))?;
                    state.replace(&m.alias, &m.name, tensor);
                }
            }
        }
        ctx.note(format!("{name}: {}", count_noun(matches.len())));
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_nan_and_one_sided_bounds() {
        assert!(clip(f32::NAN, Some(0.0), Some(1.0)).is_nan());
        assert_eq!(clip(5.0f32, None, Some(1.0)), 1.0);
        assert_eq!(clip(-5.0f64, Some(-1.0), None), -1.0);
        assert_eq!(clip(0.5f64, Some(-1.0), Some(1.0)), 0.5);
    }

    #[test]
    fn clamp_op_reads_any_chunk() {
        let values: Vec<f32> = (0..10).map(|i| i as f32 - 5.0).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let base = Tensor::in_memory(DType::F32, vec![10], Arc::new(bytes));
        let t = ClampOp::tensor(base, Some(-2.0), Some(3.0)).unwrap();
        let mut out = vec![0u8; 12];
        t.read(1, &mut out, &mut ReadContext::default()).unwrap();
        let got: Vec<f32> = out
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, vec![-2.0, -2.0, -2.0]);
    }
}

//! `add`, `subtract`, `multiply` (`to = a ∘ b`) and `add_`, `subtract_` (`to ∘= from`): element-wise
//! arithmetic on floating tensors of equal shape, computed in f32 (f64 for F64) and rounded to
//! nearest even back. Operands must have equal dtypes unless `dtype:` names the result dtype, in
//! which case both are converted to it first; nothing is promoted silently. Results are lazy
//! ([`BinaryOp`]); in place (`add_`, `subtract_`) they are maps of the destination's region
//! (`Value::Map`), so the rest of the tensor streams from where it is and chains of edits are read
//! once per level. Also holds [`write_back`] (a region overwritten by values that do not read the
//! destination, as `fill_` writes).

use std::collections::HashSet;
use std::sync::Arc;

use super::view_of;
use super::{
    count_noun, Context, Destinations, Flow, Form, ParseContext, StepError, Transform, TransformError, TransformSpec,
    Twin, Writes,
};
use crate::dtype::DType;
use crate::kernels;
use crate::plan::payload::{Field, FieldKind};
use crate::plan::{Location, PlanError};
use crate::references::{Reference, Target};
use crate::state::{Match, State};
use crate::value::{ElementFn, LazyOp, ReadContext, Tensor, ValueError};

/// The keys of every arithmetic transform: `add` / `subtract` / `multiply` (`to = a ∘ b`) take
/// the new-form keys, `add_` / `subtract_` (`to ∘= from`) the in-place ones.
const FIELDS: &[Field] = &[
    Field::required("from_a", FieldKind::Reference, "left operands (may be sliced)").new_only(),
    Field::required(
        "from_b",
        FieldKind::Target,
        "right operands, rewritten from each `from_a` match (may be sliced)",
    )
    .new_only(),
    Field::required("from", FieldKind::Reference, "operands (may be sliced)").in_place_only(),
    Field::required(
        "to",
        FieldKind::Target,
        "results, rewritten from each match: an existing tensor is overwritten (through a slice if given), a missing one is created",
    )
    .new_only(),
    Field::required(
        "to",
        FieldKind::Target,
        "existing tensors updated in place, rewritten from each match (may be sliced)",
    )
    .in_place_only(),
    Field::optional(
        "dtype",
        FieldKind::DType,
        None,
        "result dtype (a float); both operands are converted to it. Without it the operands' dtypes must be equal",
    )
    .new_only(),
];

/// An element-wise operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// `a + b`.
    Add,
    /// `a - b`.
    Subtract,
    /// `a * b`.
    Multiply,
}

impl BinOp {
    fn f32(self, a: f32, b: f32) -> f32 {
        match self {
            BinOp::Add => a + b,
            BinOp::Subtract => a - b,
            BinOp::Multiply => a * b,
        }
    }

    fn f64(self, a: f64, b: f64) -> f64 {
        match self {
            BinOp::Add => a + b,
            BinOp::Subtract => a - b,
            BinOp::Multiply => a * b,
        }
    }
}

/// Parses every arithmetic transform; the operation is the name's.
fn parse(value: &serde_json::Value, cx: &ParseContext) -> Result<Box<dyn Transform>, PlanError> {
    let p = cx.payload(value)?;
    let name = cx.spec.name;
    let op = match name.trim_end_matches('_') {
        "add" => BinOp::Add,
        "subtract" => BinOp::Subtract,
        _ => BinOp::Multiply,
    };
    let location = cx.location.clone();
    Ok(match cx.spec.form {
        Form::InPlace => Box::new(InPlace {
            name,
            op,
            from: p.reference("from")?,
            to: p.target("to")?,
            location,
        }),
        _ => Box::new(Binary {
            name,
            op,
            from_a: p.reference("from_a")?,
            from_b: p.target("from_b")?,
            to: p.target("to")?,
            dtype: p.dtype("dtype")?,
            location,
        }),
    })
}

const ADD_TWIN: Twin = Twin {
    new: (
        "add",
        "element-wise a + b written to `to` (overwritten if it exists, else created)",
    ),
    in_place: ("add_", "add tensors into existing ones in place (to += from)"),
    fields: FIELDS,
    parse,
};

const SUBTRACT_TWIN: Twin = Twin {
    new: (
        "subtract",
        "element-wise a - b written to `to` (overwritten if it exists, else created)",
    ),
    in_place: ("subtract_", "subtract tensors from existing ones in place (to -= from)"),
    fields: FIELDS,
    parse,
};

/// `add`.
pub const ADD: TransformSpec = ADD_TWIN.spec(Form::New);
/// `add_`.
pub const ADD_: TransformSpec = ADD_TWIN.spec(Form::InPlace);
/// `subtract`.
pub const SUBTRACT: TransformSpec = SUBTRACT_TWIN.spec(Form::New);
/// `subtract_`.
pub const SUBTRACT_: TransformSpec = SUBTRACT_TWIN.spec(Form::InPlace);
/// `multiply` (no in-place form).
pub const MULTIPLY: TransformSpec = TransformSpec {
    name: "multiply",
    summary: "element-wise a * b written to `to` (overwritten if it exists, else created)",
    form: Form::New,
    fields: FIELDS,
    parse,
};

/// The lazy element-wise `a ∘ b` of two tensors of the result's dtype and shape.
#[derive(Debug)]
pub struct BinaryOp {
    op: BinOp,
    a: Tensor,
    b: Tensor,
}

impl BinaryOp {
    /// The result tensor (operands must already have `dtype`, a computable float, and equal shapes).
    pub fn tensor(op: BinOp, a: Tensor, b: Tensor) -> Result<Tensor, ValueError> {
        let (dtype, shape) = (a.dtype, a.shape.clone());
        Tensor::op(dtype, shape, Arc::new(BinaryOp { op, a, b }))
    }
}

fn f32_at(c: &[u8]) -> f32 {
    f32::from_le_bytes([c[0], c[1], c[2], c[3]])
}

fn f64_at(c: &[u8]) -> f64 {
    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
}

impl LazyOp for BinaryOp {
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.a, &self.b]
    }

    fn name(&self) -> &'static str {
        "arithmetic"
    }

    fn materialized(&self, seen: &mut HashSet<usize>) -> usize {
        self.a.materialized(seen).saturating_add(self.b.materialized(seen))
    }

    fn bytes_to_read(&self, seen: &mut HashSet<usize>) -> u64 {
        self.a.bytes_to_read(seen).saturating_add(self.b.bytes_to_read(seen))
    }

    fn read(
        &self,
        dtype: DType,
        _shape: &[usize],
        start: usize,
        out: &mut [u8],
        cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        self.a.read(start, out, cx)?;
        let mut b = cx.take(out.len());
        let result = self.b.read(start, &mut b, cx);
        if result.is_ok() {
            combine(self.op, dtype, out, &b, cx);
        }
        cx.give(b);
        result
    }
}

/// `values ∘= other[index..]`: an in-place binary operation for [`Value::Map`].
#[derive(Debug)]
struct CombineFn {
    op: BinOp,
    /// The right operand, with the shape of the changed region.
    other: Tensor,
}

impl ElementFn for CombineFn {
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.other]
    }

    fn materialized(&self, seen: &mut std::collections::HashSet<usize>) -> usize {
        self.other.materialized(seen)
    }

    fn bytes_to_read(&self, seen: &mut std::collections::HashSet<usize>) -> u64 {
        self.other.bytes_to_read(seen)
    }

    fn apply(&self, dtype: DType, index: usize, values: &mut [u8], cx: &mut ReadContext) -> Result<(), ValueError> {
        let mut b = cx.take(values.len());
        let result = self.other.read(index, &mut b, cx);
        if result.is_ok() {
            combine(self.op, dtype, values, &b, cx);
        }
        cx.give(b);
        result
    }
}

/// `out = out ∘ b` element-wise for float `dtype`: in f64 for F64, else in f32 rounded back once.
fn combine(op: BinOp, dtype: DType, out: &mut [u8], b: &[u8], cx: &mut ReadContext) {
    match dtype {
        DType::F64 => {
            for (o, y) in out.chunks_exact_mut(8).zip(b.chunks_exact(8)) {
                o.copy_from_slice(&op.f64(f64_at(o), f64_at(y)).to_le_bytes());
            }
        }
        DType::F32 => {
            for (o, y) in out.chunks_exact_mut(4).zip(b.chunks_exact(4)) {
                o.copy_from_slice(&op.f32(f32_at(o), f32_at(y)).to_le_bytes());
            }
        }
        _ => {
            // Narrow floats widen exactly to f32 (vectorised for BF16/F16), so one rounding back.
            let n = out.len() / dtype.size().expect("arithmetic results are byte-sized floats");
            let mut fa = cx.take(n * 4);
            let mut fb = cx.take(n * 4);
            kernels::convert(dtype, out, DType::F32, &mut fa);
            kernels::convert(dtype, b, DType::F32, &mut fb);
            for (o, y) in fa.chunks_exact_mut(4).zip(fb.chunks_exact(4)) {
                o.copy_from_slice(&op.f32(f32_at(o), f32_at(y)).to_le_bytes());
            }
            kernels::convert(DType::F32, &fa, dtype, out);
            cx.give(fa);
            cx.give(fb);
        }
    }
}

/// The value of an in-place result for a match: the new whole tensor when the match is whole,
/// else the base with only the selected region replaced by `with` (which has the region's shape).
pub(crate) fn write_back(m: &Match, with: Tensor) -> Result<Tensor, StepError> {
    match &m.slice {
        Some(region) if m.tensor.shape != m.base.shape || !region.is_full() => m
            .base
            .overwrite(region.clone(), with)
            .map_err(|e| TransformError::value_of(&m.display(), e)),
        _ => Ok(with),
    }
}

/// `tensor` converted to `dtype` (lazily), refusing carry-only dtypes and results too large to
/// address.
pub(super) fn converted(
    tensor: &Tensor,
    display: &str,
    dtype: DType,
    op: &'static str,
) -> Result<Tensor, TransformError> {
    if tensor.dtype == dtype {
        return Ok(tensor.clone());
    }
    for d in [tensor.dtype, dtype] {
        if !d.is_computable() {
            return Err(TransformError::Unsupported {
                op,
                tensor: display.to_owned(),
                dtype: d,
            });
        }
    }
    tensor.cast(dtype).map_err(|source| TransformError::ValueOf {
        tensor: display.to_owned(),
        source,
    })
}

/// Refuses non-float (or carry-only) operands of a float operation.
fn require_float_dtype(dtype: DType, display: &str, op: &'static str) -> Result<(), TransformError> {
    if !dtype.is_computable() {
        return Err(TransformError::Unsupported {
            op,
            tensor: display.to_owned(),
            dtype,
        });
    }
    if !dtype.is_float() {
        return Err(TransformError::NotFloat {
            op,
            tensor: display.to_owned(),
            dtype,
        });
    }
    Ok(())
}

#[derive(Debug)]
struct Binary {
    name: &'static str,
    op: BinOp,
    from_a: Reference,
    from_b: Target,
    to: Target,
    dtype: Option<DType>,
    location: Location,
}

impl Transform for Binary {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let matches = state.select_some(&self.from_a, &self.location)?;
        if let Some(dtype) = self.dtype {
            if !dtype.is_float() {
                return Err(crate::plan::PlanError::invalid(
                    &self.location.key("dtype"),
                    format!(
                        "{} computes in floating point; `dtype` must be a float dtype, got {dtype}",
                        self.name
                    ),
                )
                .into());
            }
        }
        let mut destinations = Destinations::new(&matches, &self.to, Writes::Either, self.name, &self.location)?;
        let mut writes = Vec::with_capacity(matches.len());
        for m in &matches {
            // The right operand: `from_b` rewritten from this match, in its alias (or the match's).
            let b_name = self
                .from_b
                .expand(&m.captures)
                .map_err(|source| TransformError::Template {
                    tensor: m.display(),
                    source,
                })?;
            let b_alias = state.alias_for(
                self.from_b.alias.as_deref().or(Some(&m.alias)),
                &self.from_b.text,
                &self.location,
            )?;
            let mut b_display = format!("{b_alias}::{b_name}");
            let Some(b_base) = state.get(&b_alias, &b_name) else {
                return Err(TransformError::OperandMissing {
                    op: self.name,
                    operand: b_display,
                    source_name: m.display(),
                }
                .into());
            };
            state.count_reads(&b_alias, [b_name.as_str()]);
            let b = match &self.from_b.slice {
                None => b_base.clone(),
                Some(spec) => {
                    let region = spec.resolve(&b_base.shape).map_err(|source| TransformError::Slice {
                        tensor: b_display.clone(),
                        source,
                    })?;
                    let view = view_of(b_base, &region, &b_display)?;
                    b_display.push_str("::[...]");
                    view
                }
            };
            let a = &m.tensor;
            if a.shape != b.shape {
                return Err(TransformError::ShapeMismatch {
                    source_name: m.display(),
                    source_shape: a.shape.clone(),
                    destination: b_display,
                    destination_shape: b.shape.clone(),
                }
                .into());
            }
            let result_dtype = match self.dtype {
                Some(d) => d,
                None => {
                    if a.dtype != b.dtype {
                        return Err(TransformError::OperandDTypes {
                            op: self.name,
                            a: m.display(),
                            a_dtype: a.dtype,
                            b: b_display,
                            b_dtype: b.dtype,
                        }
                        .into());
                    }
                    require_float_dtype(a.dtype, &m.display(), self.name)?;
                    a.dtype
                }
            };
            let a = converted(a, &m.display(), result_dtype, self.name)?;
            let b = converted(&b, &b_display, result_dtype, self.name)?;
            // Each match's operands are checked before its destination.
            let dest = destinations.of(state, m)?;
            if let Some(view) = dest.view()? {
                if view.shape != a.shape {
                    return Err(TransformError::ShapeMismatch {
                        source_name: m.display(),
                        source_shape: a.shape.clone(),
                        destination: dest.display.clone(),
                        destination_shape: view.shape,
                    }
                    .into());
                }
            }
            if let Some(current) = &dest.current {
                if current.dtype != result_dtype {
                    return Err(TransformError::DTypeMismatch {
                        source_name: format!("{} {} {}", m.display(), self.name, b_display),
                        source_dtype: result_dtype,
                        destination: dest.display,
                        destination_dtype: current.dtype,
                    }
                    .into());
                }
            }
            let result = BinaryOp::tensor(self.op, a, b).map_err(|e| TransformError::value_of(&m.display(), e))?;
            let tensor = dest.written(result)?;
            writes.push((dest.alias, dest.name, tensor));
        }
        for (alias, name, tensor) in writes {
            state.replace(&alias, &name, tensor);
        }
        ctx.note(format!("{}: {}", self.name, count_noun(matches.len())));
        Ok(Flow::Continue)
    }
}

#[derive(Debug)]
struct InPlace {
    name: &'static str,
    op: BinOp,
    from: Reference,
    to: Target,
    location: Location,
}

impl Transform for InPlace {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let matches = state.select_some(&self.from, &self.location)?;
        let mut destinations = Destinations::new(&matches, &self.to, Writes::Existing, self.name, &self.location)?;
        let mut writes = Vec::with_capacity(matches.len());
        for m in &matches {
            let dest = destinations.of(state, m)?;
            // The destination's value is read (`to ∘= from`).
            state.count_reads(&dest.alias, [dest.name.as_str()]);
            let target = dest.view()?.expect("an existing destination has a tensor");
            let current = dest.current.as_ref().expect("an existing destination has a tensor");
            if target.dtype != m.tensor.dtype {
                return Err(TransformError::OperandDTypes {
                    op: self.name,
                    a: dest.display,
                    a_dtype: target.dtype,
                    b: m.display(),
                    b_dtype: m.tensor.dtype,
                }
                .into());
            }
            if target.shape != m.tensor.shape {
                return Err(TransformError::ShapeMismatch {
                    source_name: m.display(),
                    source_shape: m.tensor.shape.clone(),
                    destination: dest.display,
                    destination_shape: target.shape.clone(),
                }
                .into());
            }
            require_float_dtype(target.dtype, &dest.display, self.name)?;
            // `to ∘= from` as an in-place map of the destination (its region), so the destination
            // is read once per chunk and chains of in-place edits stay linear.
            let region = dest
                .region
                .clone()
                .filter(|r| !(r.is_full() && target.shape == current.shape));
            let f = Arc::new(CombineFn {
                op: self.op,
                other: m.tensor.clone(),
            });
            let tensor = current
                .map(region, f)
                .map_err(|e| TransformError::value_of(&dest.display, e))?;
            writes.push((dest.alias, dest.name, tensor));
        }
        for (alias, name, tensor) in writes {
            state.replace(&alias, &name, tensor);
        }
        ctx.note(format!("{}: {}", self.name, count_noun(matches.len())));
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_tensor(values: &[f32]) -> Tensor {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::in_memory(DType::F32, vec![values.len()], Arc::new(bytes))
    }

    fn read_f32(t: &Tensor) -> Vec<f32> {
        let mut out = vec![0u8; t.nbytes()];
        t.read(0, &mut out, &mut ReadContext::default()).unwrap();
        out.chunks_exact(4).map(f32_at).collect()
    }

    #[test]
    fn binary_ops_compute_elementwise() {
        let a = f32_tensor(&[1.0, 2.0, f32::NAN, -4.0]);
        let b = f32_tensor(&[0.5, -2.0, 1.0, 3.0]);
        let sum = read_f32(&BinaryOp::tensor(BinOp::Add, a.clone(), b.clone()).unwrap());
        assert_eq!(sum[..2], [1.5, 0.0]);
        assert!(sum[2].is_nan());
        let diff = read_f32(&BinaryOp::tensor(BinOp::Subtract, a.clone(), b.clone()).unwrap());
        assert_eq!(diff[3], -7.0);
        let prod = read_f32(&BinaryOp::tensor(BinOp::Multiply, a, b).unwrap());
        assert_eq!(prod[1], -4.0);
    }

    #[test]
    fn narrow_floats_round_once_from_f32() {
        // bf16: 1 + 2^-8 is a tie between 1 and 1 + 2^-7; nearest even gives 1.
        let one: Vec<u8> = [0x3f80u16, 0x3f80].iter().flat_map(|v| v.to_le_bytes()).collect();
        let tiny: Vec<u8> = [0x3b80u16, 0x3c00].iter().flat_map(|v| v.to_le_bytes()).collect(); // 2^-8, 2^-7
        let a = Tensor::in_memory(DType::BF16, vec![2], Arc::new(one));
        let b = Tensor::in_memory(DType::BF16, vec![2], Arc::new(tiny));
        let t = BinaryOp::tensor(BinOp::Add, a, b).unwrap();
        let mut out = vec![0u8; 4];
        t.read(0, &mut out, &mut ReadContext::default()).unwrap();
        assert_eq!(out, [0x80, 0x3f, 0x81, 0x3f]);
    }

    #[test]
    fn operand_dtypes_message_names_both_tensors() {
        let e = TransformError::OperandDTypes {
            op: "add",
            a: "m::a".into(),
            a_dtype: DType::F32,
            b: "m::b".into(),
            b_dtype: DType::F16,
        };
        let text = e.to_string();
        assert!(
            text.contains("m::a") && text.contains("m::b") && text.contains("dtype:"),
            "{text}"
        );
    }

    #[test]
    fn operand_missing_message_names_operand() {
        let e = TransformError::OperandMissing {
            op: "add",
            operand: "m::b".into(),
            source_name: "m::a".into(),
        };
        assert!(e.to_string().contains("`m::b`"));
    }
}

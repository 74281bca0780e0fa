//! `fill` / `fill_` (values shaped like the source: a constant, random noise, or a nested list
//! broadcast NumPy-style) and `zeroes` / `ones` / `rand` (new tensors of a given shape and dtype).
//!
//! Randomness is counter-based: element `i` of a tensor is a SplitMix64 hash of the tensor's seed
//! and `i` alone, so the bytes do not depend on chunking, threads, or which part is read first.
//! A tensor's seed mixes the plan's `seed` (default 0) with the tensor's name (SPEC §4: two
//! matched tensors never receive the same noise). Uniform values are `low + (high - low) * u` in
//! f64, `u` a 53-bit fraction in [0, 1), kept below `high` after rounding to the dtype; normal
//! values use Box–Muller on two counters per element. Values are computed in f64 and rounded once
//! to the dtype. Random fills need a float dtype; constant and tensor fills take any computable
//! dtype, and integer tensors only take whole numbers in range.

use std::sync::Arc;

use serde_json::Value as Json;

use super::arith::write_back;
use super::{
    count_noun, destinations, from_key, target_key, to_key, Context, Flow, Form, StepError, Transform, TransformError,
    TransformSpec, Twin, Writes,
};
use crate::dtype::DType;
use crate::kernels;
use crate::kernels::random::{bits, normal, tensor_seed, unit};
use crate::plan::document::kind_of;
use crate::plan::payload::{compact, Field, FieldKind, Payload};
use crate::plan::{Location, PlanError};
use crate::references::{Reference, Target};
use crate::state::State;
use crate::value::{check_addressable, strides, LazyOp, ReadContext, Tensor, ValueError};

const CONST_NEW_FIELDS: &[Field] = &[
    Field::required("target", FieldKind::Target, "the new tensor's name (alias::name)"),
    Field::required("shape", FieldKind::Shape, "its shape"),
    Field::optional("dtype", FieldKind::DType, Some("float32"), "its dtype"),
];

const RAND_NEW_FIELDS: &[Field] = &[
    Field::required("target", FieldKind::Target, "the new tensor's name (alias::name)"),
    Field::required("shape", FieldKind::Shape, "its shape"),
    Field::optional("dtype", FieldKind::DType, Some("float32"), "its dtype (a float)"),
    Field::optional(
        "distribution",
        FieldKind::Text,
        Some("uniform"),
        "`uniform` or `normal`",
    ),
    Field::optional("low", FieldKind::Number, Some("0"), "uniform lower bound, inclusive"),
    Field::optional("high", FieldKind::Number, Some("1"), "uniform upper bound, exclusive"),
    Field::optional("mean", FieldKind::Number, Some("0"), "normal mean"),
    Field::optional("std", FieldKind::Number, Some("1"), "normal standard deviation"),
    Field::optional(
        "seed",
        FieldKind::Number,
        Some("0"),
        "random seed, mixed with the tensor's name",
    ),
];

/// What a fill writes.
#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Constant(f64),
    Uniform { low: f64, high: f64 },
    Normal { mean: f64, std: f64 },
    Values { shape: Vec<usize>, data: Vec<f64> },
}

/// The option keys of a fill; those not used by the chosen mode must be absent.
const OPTION_KEYS: &[&str] = &["value", "distribution", "low", "high", "mean", "std", "seed", "values"];

fn finite(p: &Payload, key: &str, default: f64) -> Result<f64, PlanError> {
    let v = p.number(key)?.unwrap_or(default);
    if !v.is_finite() {
        return Err(PlanError::invalid(&p.at(key), format!("`{key}` must be finite")));
    }
    Ok(v)
}

fn seed(p: &Payload) -> Result<u64, PlanError> {
    match p.get("seed") {
        None => Ok(0),
        Some(Json::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64().unwrap_or_default()),
        Some(other) => Err(PlanError::invalid(
            &p.at("seed"),
            format!(
                "expected a whole number ≥ 0, got {} `{}`",
                kind_of(other),
                compact(other)
            ),
        )),
    }
}

/// The random distribution of `rand` / `fill mode: rand`, and the keys it uses.
fn random(p: &Payload) -> Result<(Mode, &'static [&'static str]), PlanError> {
    match p.text("distribution")?.unwrap_or("uniform") {
        "uniform" => {
            let (low, high) = (finite(p, "low", 0.0)?, finite(p, "high", 1.0)?);
            if low >= high {
                return Err(PlanError::invalid(
                    p.location(),
                    format!("`low` ({low}) must be below `high` ({high})"),
                ));
            }
            Ok((Mode::Uniform { low, high }, &["distribution", "low", "high", "seed"]))
        }
        "normal" => {
            let (mean, std) = (finite(p, "mean", 0.0)?, finite(p, "std", 1.0)?);
            if std < 0.0 {
                return Err(PlanError::invalid(&p.at("std"), "`std` must be ≥ 0"));
            }
            Ok((Mode::Normal { mean, std }, &["distribution", "mean", "std", "seed"]))
        }
        other => Err(PlanError::invalid(
            &p.at("distribution"),
            format!("`distribution` takes `uniform` or `normal`, got `{other}`"),
        )),
    }
}

/// Reads `mode` and the keys it uses, refusing keys that belong to another mode.
fn parse_mode(p: &Payload) -> Result<(Mode, u64), PlanError> {
    let mode_name = p.text("mode")?.unwrap_or("constant");
    let (mode, used): (Mode, &[&str]) = match mode_name {
        "constant" => {
            let Some(value) = p.number("value")? else {
                return Err(PlanError::MissingKey {
                    location: p.location().clone(),
                    key: "value".into(),
                });
            };
            (Mode::Constant(value), &["value"])
        }
        "rand" => random(p)?,
        "tensor" => {
            let Some(values) = p.get("values") else {
                return Err(PlanError::MissingKey {
                    location: p.location().clone(),
                    key: "values".into(),
                });
            };
            let (shape, data) = nested(values, &p.at("values"))?;
            (Mode::Values { shape, data }, &["values"])
        }
        other => {
            return Err(PlanError::invalid(
                &p.at("mode"),
                format!("`mode` takes `constant`, `rand` or `tensor`, got `{other}`"),
            ))
        }
    };
    reject_unused(p, used, &format!("mode `{mode_name}`"))?;
    Ok((mode, seed(p)?))
}

fn reject_unused(p: &Payload, used: &[&str], what: &str) -> Result<(), PlanError> {
    for key in OPTION_KEYS {
        if p.get(key).is_some() && !used.contains(key) {
            return Err(PlanError::invalid(
                &p.at(key),
                format!("`{key}` does not apply to {what}"),
            ));
        }
    }
    Ok(())
}

/// A number or a rectangular nested list of numbers (booleans count as 0/1): shape and values.
pub(crate) fn nested(value: &Json, location: &Location) -> Result<(Vec<usize>, Vec<f64>), PlanError> {
    match value {
        Json::Number(n) => Ok((Vec::new(), vec![n.as_f64().unwrap_or(f64::NAN)])),
        Json::Bool(b) => Ok((Vec::new(), vec![f64::from(u8::from(*b))])),
        Json::Array(items) => {
            let mut inner: Option<Vec<usize>> = None;
            let mut data = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let (shape, values) = nested(item, &location.index(i))?;
                match &inner {
                    None => inner = Some(shape),
                    Some(first) if *first != shape => {
                        return Err(PlanError::invalid(
                            &location.index(i),
                            "values must be a rectangular nested list (rows of equal length)",
                        ))
                    }
                    Some(_) => {}
                }
                data.extend(values);
            }
            let mut shape = vec![items.len()];
            shape.extend(inner.unwrap_or_default());
            Ok((shape, data))
        }
        other => Err(PlanError::invalid(
            location,
            format!(
                "expected a number or a nested list of numbers, got {} `{}`",
                kind_of(other),
                compact(other)
            ),
        )),
    }
}

/// `fill` and `fill_`: one key table, one parser.
const TWIN: Twin = Twin {
    new: (
        "fill",
        "new tensors shaped like the matched ones, filled with a constant, noise or values",
    ),
    in_place: ("fill_", "overwrite tensors in place with a constant, noise or values"),
    fields: &[
        from_key("tensors whose shape and dtype are used (may be sliced)"),
        to_key("destination names"),
        target_key("tensors overwritten in place (a slice fills only that part)"),
        Field::optional(
            "mode",
            FieldKind::Text,
            Some("constant"),
            "`constant`, `rand` or `tensor`",
        ),
        Field::optional("value", FieldKind::Number, None, "the constant (mode constant)"),
        Field::optional(
            "distribution",
            FieldKind::Text,
            Some("uniform"),
            "`uniform` or `normal` (mode rand)",
        ),
        Field::optional("low", FieldKind::Number, Some("0"), "uniform lower bound, inclusive"),
        Field::optional("high", FieldKind::Number, Some("1"), "uniform upper bound, exclusive"),
        Field::optional("mean", FieldKind::Number, Some("0"), "normal mean"),
        Field::optional("std", FieldKind::Number, Some("1"), "normal standard deviation"),
        Field::optional(
            "seed",
            FieldKind::Number,
            Some("0"),
            "random seed, mixed with each tensor's name",
        ),
        Field::optional(
            "values",
            FieldKind::Values,
            None,
            "values broadcast NumPy-style to the shape (mode tensor)",
        ),
    ],
    parse: |value, cx| {
        let p = cx.payload(value)?;
        let (mode, seed) = parse_mode(&p)?;
        let (from, to) = cx.operands(&p)?;
        Ok(Box::new(Fill {
            from,
            to,
            mode,
            seed,
            location: cx.location.clone(),
        }))
    },
};

/// `fill`.
pub const FILL: TransformSpec = TWIN.spec(Form::New);
/// `fill_`.
pub const FILL_: TransformSpec = TWIN.spec(Form::InPlace);

fn parse_new(
    name: &'static str,
    value: &Json,
    location: &Location,
    fields: &[Field],
) -> Result<Box<dyn Transform>, PlanError> {
    let p = Payload::new(value, fields, location.clone())?;
    let target = p.target("target")?;
    let Some(plain) = target.template.literal() else {
        return Err(PlanError::invalid(
            &p.at("target"),
            format!(
                "`{}` must be a plain name (it has nothing to rewrite from)",
                target.text
            ),
        ));
    };
    if target.slice.is_some() {
        return Err(PlanError::invalid(
            &p.at("target"),
            format!("{name} does not take a slice"),
        ));
    }
    let shape = p.shape("shape")?.unwrap_or_default();
    let dtype = p.dtype("dtype")?.unwrap_or(DType::F32);
    if check_addressable("filling", dtype, &shape).is_err() {
        return Err(PlanError::invalid(
            &p.at("shape"),
            format!(
                "shape {shape:?} of {dtype} is too large to address (over {} bytes)",
                isize::MAX
            ),
        ));
    }
    let (mode, seed) = match name {
        "zeroes" => (Mode::Constant(0.0), 0),
        "ones" => (Mode::Constant(1.0), 0),
        _ => {
            let (mode, used) = random(&p)?;
            reject_unused(
                &p,
                used,
                &format!("distribution `{}`", p.text("distribution")?.unwrap_or("uniform")),
            )?;
            (mode, seed(&p)?)
        }
    };
    Ok(Box::new(New {
        name,
        alias: target.alias.clone(),
        tensor_name: plain,
        text: target.text.clone(),
        shape,
        dtype,
        mode,
        seed,
        location: location.clone(),
    }))
}

/// `zeroes`.
pub const ZEROES: TransformSpec = TransformSpec {
    name: "zeroes",
    summary: "a new tensor of zeros",
    form: super::Form::Plain,
    fields: CONST_NEW_FIELDS,
    parse: |value, cx| parse_new("zeroes", value, &cx.location, CONST_NEW_FIELDS),
};

/// `ones`.
pub const ONES: TransformSpec = TransformSpec {
    name: "ones",
    summary: "a new tensor of ones",
    form: super::Form::Plain,
    fields: CONST_NEW_FIELDS,
    parse: |value, cx| parse_new("ones", value, &cx.location, CONST_NEW_FIELDS),
};

/// `rand`.
pub const RAND: TransformSpec = TransformSpec {
    name: "rand",
    summary: "a new tensor of deterministic random values (uniform or normal)",
    form: super::Form::Plain,
    fields: RAND_NEW_FIELDS,
    parse: |value, cx| parse_new("rand", value, &cx.location, RAND_NEW_FIELDS),
};

/// How noise is drawn, with bounds already rounded to the dtype.
#[derive(Debug, Clone, Copy)]
enum Noise {
    /// `low + span * u`, at most `cap` (the largest dtype value below `high`).
    Uniform { low: f64, span: f64, cap: f64 },
    /// `mean + std * z`.
    Normal { mean: f64, std: f64 },
}

impl Noise {
    fn value(self, seed: u64, i: u64) -> f64 {
        match self {
            Noise::Uniform { low, span, cap } => (low + span * unit(bits(seed, i))).min(cap),
            Noise::Normal { mean, std } => mean + std * normal(seed, i),
        }
    }
}

/// Lazily generated noise: element `i` depends on `(seed, i)` only.
#[derive(Debug)]
pub struct NoiseOp {
    seed: u64,
    noise: Noise,
}

/// Elements per generated block: 4 KiB of f64 on the stack.
const BLOCK: usize = 512;

impl LazyOp for NoiseOp {
    fn name(&self) -> &'static str {
        "random fill"
    }

    fn read(
        &self,
        dtype: DType,
        _shape: &[usize],
        start: usize,
        out: &mut [u8],
        _cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        let size = dtype.size().expect("random fills are byte-sized floats");
        let mut wide = [0u8; BLOCK * 8];
        for (b, block) in out.chunks_mut(BLOCK * size).enumerate() {
            let first = (start + b * BLOCK) as u64;
            let n = block.len() / size;
            for (j, w) in wide[..n * 8].chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&self.noise.value(self.seed, first + j as u64).to_le_bytes());
            }
            kernels::convert(DType::F64, &wide[..n * 8], dtype, block);
        }
        Ok(())
    }
}

/// Values broadcast to the result's shape: element bytes in the result dtype and, per result
/// dimension, the source stride (0 where broadcast).
#[derive(Debug)]
pub struct BroadcastOp {
    bytes: Vec<u8>,
    strides: Vec<usize>,
}

impl LazyOp for BroadcastOp {
    fn name(&self) -> &'static str {
        "fill"
    }

    fn read(
        &self,
        dtype: DType,
        shape: &[usize],
        start: usize,
        out: &mut [u8],
        _cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        let size = dtype.size().expect("fills are byte-sized");
        if self.bytes.len() == size {
            for o in out.chunks_exact_mut(size) {
                o.copy_from_slice(&self.bytes);
            }
            return Ok(());
        }
        // An odometer over the result index, carrying the source offset along.
        let out_strides = strides(shape);
        let mut index: Vec<usize> = shape
            .iter()
            .zip(&out_strides)
            .map(|(&d, &s)| (start / s.max(1)) % d.max(1))
            .collect();
        let mut offset: usize = index.iter().zip(&self.strides).map(|(i, s)| i * s).sum();
        for o in out.chunks_exact_mut(size) {
            o.copy_from_slice(&self.bytes[offset * size..(offset + 1) * size]);
            for d in (0..shape.len()).rev() {
                index[d] += 1;
                offset += self.strides[d];
                if index[d] < shape[d] {
                    break;
                }
                offset -= self.strides[d] * index[d];
                index[d] = 0;
            }
        }
        Ok(())
    }
}

/// Exclusive range of whole numbers an integer dtype holds, as f64 (exact powers of two).
fn int_range(dtype: DType) -> (f64, f64) {
    let bits = dtype.bits() as i32;
    match dtype {
        DType::Bool => (0.0, 2.0),
        DType::I8 | DType::I16 | DType::I32 | DType::I64 => (-(2f64.powi(bits - 1)), 2f64.powi(bits - 1)),
        _ => (0.0, 2f64.powi(bits)),
    }
}

/// Encodes fill values in `dtype`, refusing what an integer dtype cannot hold exactly.
fn encode(values: &[f64], dtype: DType, display: &str) -> Result<Vec<u8>, TransformError> {
    if dtype.is_integer() {
        let (lo, hi) = int_range(dtype);
        if let Some(v) = values.iter().find(|v| v.fract() != 0.0 || **v < lo || **v >= hi) {
            return Err(TransformError::FillValue {
                tensor: display.to_owned(),
                dtype,
                reason: format!("{v} is not a whole number in [{lo}, {})", hi - 1.0),
            });
        }
    }
    Ok(kernels::from_f64_slice(dtype, values))
}

/// `x` rounded to `dtype` (a computable float).
fn rounded(dtype: DType, x: f64) -> f64 {
    kernels::to_f64_vec(dtype, &kernels::from_f64_slice(dtype, &[x]))
        .first()
        .copied()
        .unwrap_or(f64::NAN)
}

/// The largest `dtype` value below `x` (`x` representable and finite): one step down in the
/// sign-magnitude encoding every float dtype here uses.
fn below(dtype: DType, x: f64) -> f64 {
    let bytes = kernels::from_f64_slice(dtype, &[x]);
    let mut word = [0u8; 8];
    word[..bytes.len()].copy_from_slice(&bytes);
    let raw = u64::from_le_bytes(word);
    let sign = 1u64 << (dtype.bits() - 1);
    let stepped = if x > 0.0 {
        raw - 1
    } else if x == 0.0 {
        sign | 1
    } else {
        raw + 1
    };
    let stepped = stepped.to_le_bytes();
    rounded_bytes(dtype, &stepped[..bytes.len()])
}

fn rounded_bytes(dtype: DType, bytes: &[u8]) -> f64 {
    kernels::to_f64_vec(dtype, bytes).first().copied().unwrap_or(f64::NAN)
}

/// The lazy fill of one tensor.
fn filled(
    mode: &Mode,
    seed: u64,
    dtype: DType,
    shape: &[usize],
    name: &str,
    display: &str,
    op: &'static str,
) -> Result<Tensor, TransformError> {
    if !dtype.is_computable() {
        return Err(TransformError::Unsupported {
            op,
            tensor: display.to_owned(),
            dtype,
        });
    }
    let noise = match mode {
        Mode::Constant(v) => {
            let bytes = encode(&[*v], dtype, display)?;
            let op = BroadcastOp {
                bytes,
                strides: vec![0; shape.len()],
            };
            return built(Tensor::op(dtype, shape.to_vec(), Arc::new(op)), display);
        }
        Mode::Values { shape: vshape, data } => {
            let fits = vshape.len() <= shape.len()
                && vshape
                    .iter()
                    .rev()
                    .zip(shape.iter().rev())
                    .all(|(&v, &s)| v == s || v == 1);
            if !fits {
                return Err(TransformError::FillValue {
                    tensor: display.to_owned(),
                    dtype,
                    reason: format!(
                        "values of shape {} do not broadcast to {}",
                        super::fmt_shape(vshape),
                        super::fmt_shape(shape)
                    ),
                });
            }
            let bytes = encode(data, dtype, display)?;
            let vstrides = strides(vshape);
            let lead = shape.len() - vshape.len();
            let strides = (0..shape.len())
                .map(|d| match d.checked_sub(lead) {
                    Some(k) if vshape[k] != 1 => vstrides[k],
                    _ => 0,
                })
                .collect();
            return built(
                Tensor::op(dtype, shape.to_vec(), Arc::new(BroadcastOp { bytes, strides })),
                display,
            );
        }
        Mode::Uniform { low, high } => {
            if !dtype.is_float() {
                return Err(TransformError::NotFloat {
                    op,
                    tensor: display.to_owned(),
                    dtype,
                });
            }
            let (lo, hi) = (rounded(dtype, *low), rounded(dtype, *high));
            if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                return Err(TransformError::FillValue {
                    tensor: display.to_owned(),
                    dtype,
                    reason: format!("[{low}, {high}) is empty or not finite in {dtype}"),
                });
            }
            Noise::Uniform {
                low: lo,
                span: hi - lo,
                cap: below(dtype, hi),
            }
        }
        Mode::Normal { mean, std } => {
            if !dtype.is_float() {
                return Err(TransformError::NotFloat {
                    op,
                    tensor: display.to_owned(),
                    dtype,
                });
            }
            Noise::Normal { mean: *mean, std: *std }
        }
    };
    let op = NoiseOp {
        seed: tensor_seed(seed, name),
        noise,
    };
    built(Tensor::op(dtype, shape.to_vec(), Arc::new(op)), display)
}

/// A fill's tensor, or the error naming the tensor filled.
fn built(tensor: Result<Tensor, ValueError>, display: &str) -> Result<Tensor, TransformError> {
    tensor.map_err(|source| TransformError::ValueOf {
        tensor: display.to_owned(),
        source,
    })
}

#[derive(Debug)]
struct Fill {
    from: Reference,
    to: Option<Target>,
    mode: Mode,
    seed: u64,
    location: Location,
}

impl Transform for Fill {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let op = if self.to.is_some() { "fill" } else { "fill_" };
        let matches = state.select_some(&self.from, &self.location)?;
        match &self.to {
            Some(to) => {
                let destinations = destinations(state, &matches, to, Writes::New, op, &self.location)?;
                let mut tensors = Vec::with_capacity(matches.len());
                for (m, d) in matches.iter().zip(&destinations) {
                    let t = &m.tensor;
                    tensors.push(filled(
                        &self.mode, self.seed, t.dtype, &t.shape, &d.name, &d.display, op,
                    )?);
                }
                for (d, tensor) in destinations.iter().zip(tensors) {
                    state.insert(&d.alias, &d.name, tensor);
                }
            }
            None => {
                let mut writes = Vec::with_capacity(matches.len());
                for m in &matches {
                    let t = &m.tensor;
                    let with = filled(&self.mode, self.seed, t.dtype, &t.shape, &m.name, &m.display(), op)?;
                    writes.push(write_back(m, with)?);
                }
                for (m, tensor) in matches.iter().zip(writes) {
                    state.replace(&m.alias, &m.name, tensor);
                }
            }
        }
        ctx.note(format!("{op}: {}", count_noun(matches.len())));
        Ok(Flow::Continue)
    }
}

#[derive(Debug)]
struct New {
    name: &'static str,
    alias: Option<String>,
    tensor_name: String,
    text: String,
    shape: Vec<usize>,
    dtype: DType,
    mode: Mode,
    seed: u64,
    location: Location,
}

impl Transform for New {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let alias = match &self.alias {
            // Writing to a new alias creates it, as for every creating transform.
            Some(alias) => alias.clone(),
            None => state.alias_for(None, &self.text, &self.location)?,
        };
        let display = format!("{alias}::{}", self.tensor_name);
        if state.get(&alias, &self.tensor_name).is_some() {
            return Err(TransformError::DestinationExists {
                destination: display,
                source_name: self.name.to_owned(),
            }
            .into());
        }
        let tensor = filled(
            &self.mode,
            self.seed,
            self.dtype,
            &self.shape,
            &self.tensor_name,
            &display,
            self.name,
        )?;
        state.insert(&alias, &self.tensor_name, tensor);
        ctx.note(format!("{}: {display} {}", self.name, super::fmt_shape(&self.shape)));
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(t: &Tensor, chunk: usize) -> Vec<u8> {
        let size = t.dtype.size().unwrap();
        let mut out = vec![0u8; t.nbytes()];
        let mut cx = ReadContext::default();
        for (k, c) in out.chunks_mut(chunk * size).enumerate() {
            t.read(k * chunk, c, &mut cx).unwrap();
        }
        out
    }

    fn f64s(dtype: DType, bytes: &[u8]) -> Vec<f64> {
        kernels::to_f64_vec(dtype, bytes)
    }

    #[test]
    fn noise_does_not_depend_on_chunking() {
        for mode in [
            Mode::Uniform { low: -1.0, high: 1.0 },
            Mode::Normal { mean: 0.0, std: 1.0 },
        ] {
            for dtype in [DType::F32, DType::BF16, DType::F64] {
                let t = filled(&mode, 7, dtype, &[37, 29], "w", "m::w", "rand").unwrap();
                let whole = read_all(&t, t.numel());
                for chunk in [1, 3, 64, 511, 513, 1000] {
                    assert_eq!(read_all(&t, chunk), whole, "{mode:?} {dtype} chunk {chunk}");
                }
            }
        }
    }

    #[test]
    fn seeds_are_distinct_per_name_and_seed() {
        let mode = Mode::Normal { mean: 0.0, std: 1.0 };
        let a = read_all(&filled(&mode, 0, DType::F32, &[64], "a", "a", "rand").unwrap(), 64);
        let b = read_all(&filled(&mode, 0, DType::F32, &[64], "b", "b", "rand").unwrap(), 64);
        let a1 = read_all(&filled(&mode, 1, DType::F32, &[64], "a", "a", "rand").unwrap(), 64);
        let a_again = read_all(&filled(&mode, 0, DType::F32, &[64], "a", "a", "rand").unwrap(), 64);
        assert_ne!(a, b);
        assert_ne!(a, a1);
        assert_eq!(a, a_again);
    }

    #[test]
    fn uniform_stays_in_range_and_has_the_right_moments() {
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F8E4M3] {
            let t = filled(
                &Mode::Uniform { low: -0.5, high: 2.0 },
                3,
                dtype,
                &[100_000],
                "u",
                "u",
                "rand",
            )
            .unwrap();
            let v = f64s(dtype, &read_all(&t, 4096));
            assert!(v.iter().all(|&x| (-0.5..2.0).contains(&x)), "{dtype}");
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            assert!((mean - 0.75).abs() < 0.03, "{dtype} mean {mean}");
        }
    }

    #[test]
    fn normal_has_the_right_moments() {
        let t = filled(
            &Mode::Normal { mean: 1.0, std: 2.0 },
            0,
            DType::F64,
            &[100_000],
            "n",
            "n",
            "rand",
        )
        .unwrap();
        let v = f64s(DType::F64, &read_all(&t, 4096));
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            (mean - 1.0).abs() < 0.03 && (var.sqrt() - 2.0).abs() < 0.03,
            "{mean} {var}"
        );
    }

    #[test]
    fn broadcast_values_like_numpy() {
        let mode = Mode::Values {
            shape: vec![3, 1],
            data: vec![1.0, 2.0, 3.0],
        };
        let t = filled(&mode, 0, DType::F32, &[2, 3, 2], "x", "x", "fill").unwrap();
        for chunk in [1, 5, 12] {
            let v = f64s(DType::F32, &read_all(&t, chunk));
            assert_eq!(v, [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        }
        let bad = Mode::Values {
            shape: vec![2],
            data: vec![1.0, 2.0],
        };
        let err = filled(&bad, 0, DType::F32, &[3], "x", "m::x", "fill").unwrap_err();
        assert!(matches!(err, TransformError::FillValue { .. }) && err.to_string().contains("m::x"));
    }

    #[test]
    fn integer_fills_need_whole_numbers_in_range() {
        let err = filled(&Mode::Constant(2.5), 0, DType::I32, &[2], "x", "m::x", "fill").unwrap_err();
        assert!(err.to_string().contains("2.5"), "{err}");
        assert!(filled(&Mode::Constant(256.0), 0, DType::U8, &[2], "x", "x", "fill").is_err());
        assert!(filled(&Mode::Constant(-128.0), 0, DType::I8, &[2], "x", "x", "fill").is_ok());
        let err = filled(
            &Mode::Normal { mean: 0.0, std: 1.0 },
            0,
            DType::I64,
            &[2],
            "x",
            "m::x",
            "rand",
        )
        .unwrap_err();
        assert!(matches!(err, TransformError::NotFloat { .. }));
    }

    #[test]
    fn below_steps_one_unit_down() {
        assert_eq!(below(DType::F32, 1.0), f64::from(f32::from_bits(1.0f32.to_bits() - 1)));
        assert_eq!(below(DType::BF16, 1.0), 1.0 - 2f64.powi(-8));
        assert!(below(DType::F32, 0.0) < 0.0);
        assert!(below(DType::F64, -1.0) < -1.0);
    }
}

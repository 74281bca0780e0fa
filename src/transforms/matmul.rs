//! `matmul`: new tensors `to = a @ b` for 2-D floating tensors, or batched ones (`(..., m, k) @
//! (..., k, n)` with equal leading dimensions; nothing is broadcast). `from_b` and `to` are
//! templates expanded from each match of `from_a`. The product is computed by faer in f32 (f64
//! for F64 tensors) and rounded to nearest even back to the operands' dtype.
//!
//! A product needs both operands whole, so [`MatmulOp`] computes it once, on the first read, and
//! serves every chunk from the kept result. The computation runs on its own thread with its own
//! thread pool: the reading threads belong to the writer's pool, and letting faer's parallel
//! jobs share that pool would let a waiting thread pick up another chunk of the same product.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use super::view_of;
use super::TransformSpec;
use super::{count_noun, destinations, require_float, Context, Flow, StepError, Transform, TransformError, Writes};
use crate::dtype::DType;
use crate::linalg::Real;
use crate::memory::{Element, Scratch};
use crate::plan::payload::{Field, FieldKind};
use crate::plan::Location;
use crate::references::{Reference, Target};
use crate::state::{Match, State};
use crate::value::{read_real_scratch, real_scratch, LazyOp, ReadContext, Tensor, ValueError};

const MATMUL_FIELDS: &[Field] = &[
    Field::required(
        "from_a",
        FieldKind::Reference,
        "left operands (may be sliced): (m, k) or (..., m, k)",
    ),
    Field::required(
        "from_b",
        FieldKind::Target,
        "right operand for each match of from_a (a template, may be sliced): (k, n) or (..., k, n)",
    ),
    Field::required("to", FieldKind::Target, "destination names"),
];

/// `matmul`.
pub const MATMUL: TransformSpec = TransformSpec {
    name: "matmul",
    summary: "new tensors a @ b (2-D or batched, floating point)",
    form: super::Form::Plain,
    fields: MATMUL_FIELDS,
    parse: |value, cx| {
        let p = cx.payload(value)?;
        Ok(Box::new(Matmul {
            from_a: p.reference("from_a")?,
            from_b: p.target("from_b")?,
            to: p.target("to")?,
            location: cx.location.clone(),
        }))
    },
};

#[derive(Debug)]
struct Matmul {
    from_a: Reference,
    from_b: Target,
    to: Target,
    location: Location,
}

/// The right operand of `a`'s product: `from_b` expanded from its captures, sliced if asked.
fn operand_b(state: &State, a: &Match, from_b: &Target) -> Result<(String, Tensor), TransformError> {
    let name = from_b.expand(&a.captures).map_err(|source| TransformError::Template {
        tensor: a.display(),
        source,
    })?;
    let alias = from_b.alias.clone().unwrap_or_else(|| a.alias.clone());
    let display = format!("{alias}::{name}");
    let Some(tensor) = state.get(&alias, &name) else {
        return Err(TransformError::MissingOperand {
            operand: display,
            source_name: a.display(),
        });
    };
    match &from_b.slice {
        None => Ok((display, tensor.clone())),
        Some(spec) => {
            let slice = spec.resolve(&tensor.shape).map_err(|source| TransformError::Slice {
                tensor: display.clone(),
                source,
            })?;
            let view = view_of(tensor, &slice, &display)?;
            Ok((format!("{display}::[...]"), view))
        }
    }
}

/// The product's dimensions `(batch, m, k, n)` and shape, or why the operands do not multiply.
fn product_shape(
    a: &Tensor,
    a_name: &str,
    b: &Tensor,
    b_name: &str,
) -> Result<([usize; 4], Vec<usize>), TransformError> {
    let error = |reason: String| TransformError::MatmulShapes {
        a: a_name.to_owned(),
        a_shape: a.shape.clone(),
        b: b_name.to_owned(),
        b_shape: b.shape.clone(),
        reason,
    };
    let (ra, rb) = (a.shape.len(), b.shape.len());
    if ra < 2 || rb < 2 {
        return Err(error("both operands need at least 2 dimensions".to_owned()));
    }
    if ra != rb || a.shape[..ra - 2] != b.shape[..rb - 2] {
        return Err(error(
            "batched operands need equal leading dimensions (nothing is broadcast)".to_owned(),
        ));
    }
    let (m, k, k2, n) = (a.shape[ra - 2], a.shape[ra - 1], b.shape[rb - 2], b.shape[rb - 1]);
    if k != k2 {
        return Err(error(format!("inner dimensions differ ({k} and {k2})")));
    }
    let batch: usize = a.shape[..ra - 2].iter().product();
    let mut shape = a.shape[..ra - 2].to_vec();
    shape.extend([m, n]);
    Ok(([batch, m, k, n], shape))
}

impl Transform for Matmul {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let matches = state.select_some(&self.from_a, &self.location)?;
        let mut products = Vec::with_capacity(matches.len());
        for a in &matches {
            require_float(a, "matmul")?;
            let (b_name, b) = operand_b(state, a, &self.from_b)?;
            if b.dtype != a.tensor.dtype {
                return Err(TransformError::DTypeMismatch {
                    source_name: b_name,
                    source_dtype: b.dtype,
                    destination: a.display(),
                    destination_dtype: a.tensor.dtype,
                }
                .into());
            }
            let (dims, shape) = product_shape(&a.tensor, &a.display(), &b, &b_name)?;
            products.push((b, dims, shape));
        }
        let destinations = destinations(state, &matches, &self.to, Writes::New, "matmul", &self.location)?;
        for ((a, dest), (b, dims, shape)) in matches.iter().zip(&destinations).zip(products) {
            let m = a;
            let tensor = product(&a.tensor, &b, dims, shape, ctx.threads)
                .map_err(|e| TransformError::value_of(&m.display(), e))?;
            state.insert(&dest.alias, &dest.name, tensor);
        }
        ctx.note(format!("matmul: {}", count_noun(matches.len())));
        Ok(Flow::Continue)
    }
}

/// The lazy product `a @ b` with dimensions `(batch, m, k, n)`, computed on `threads` threads
/// (0: one per core).
fn product(a: &Tensor, b: &Tensor, dims: [usize; 4], shape: Vec<usize>, threads: usize) -> Result<Tensor, ValueError> {
    Tensor::op(
        a.dtype,
        shape,
        Arc::new(MatmulOp {
            a: a.clone(),
            b: b.clone(),
            dims,
            threads,
            result: Mutex::new(None),
        }),
    )
}

/// A product computed once on first read; chunks are served from the kept result.
#[derive(Debug)]
pub struct MatmulOp {
    a: Tensor,
    b: Tensor,
    /// `(batch, m, k, n)`.
    dims: [usize; 4],
    /// Threads computing the product (the run's `--threads`; 0: one per core).
    threads: usize,
    /// The product in the operands' dtype, once computed: within the run's memory budget, else
    /// in its arena.
    result: Mutex<Option<Arc<Scratch>>>,
}

/// `c = a @ b` per batch, row-major.
fn multiply<T: faer::traits::ComplexField + Copy + Default>(
    a: &[T],
    b: &[T],
    c: &mut [T],
    [batch, m, k, n]: [usize; 4],
    one: T,
    par: Par,
) {
    if m * n == 0 {
        return;
    }
    for i in 0..batch {
        let lhs = MatRef::from_row_major_slice(&a[i * m * k..(i + 1) * m * k], m, k);
        let rhs = MatRef::from_row_major_slice(&b[i * k * n..(i + 1) * k * n], k, n);
        let dst = MatMut::from_row_major_slice_mut(&mut c[i * m * n..(i + 1) * m * n], m, n);
        matmul(dst, Accum::Replace, lhs, rhs, one, par);
    }
}

impl MatmulOp {
    /// Computes the product in the operands' dtype.
    fn compute(&self, threads: usize, mut cx: ReadContext) -> Result<Scratch, ValueError> {
        let dtype = self.a.dtype;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| ValueError::Compute {
                op: "matmul",
                reason: e.to_string(),
            })?;
        let par = Par::rayon(threads);
        if dtype == DType::F64 {
            self.compute_in::<f64>(&pool, par, &mut cx)
        } else {
            self.compute_in::<f32>(&pool, par, &mut cx)
        }
    }

    /// The product computed in `T`, in the operands' dtype. Operands and product are buffers of
    /// the run's budget, spilling to its arena when it cannot hold them.
    fn compute_in<T: Real + Element>(
        &self,
        pool: &rayon::ThreadPool,
        par: Par,
        cx: &mut ReadContext,
    ) -> Result<Scratch, ValueError> {
        let a = read_real_scratch::<T>(&self.a, "matmul", cx)?;
        let b = read_real_scratch::<T>(&self.b, "matmul", cx)?;
        let [batch, m, _, n] = self.dims;
        // Checked: the product's size is known to fit in its dtype, not in the wider T.
        let wide = [batch, m, n, std::mem::size_of::<T>()]
            .iter()
            .try_fold(1usize, |p, &d| p.checked_mul(d))
            .ok_or(ValueError::OutOfMemory {
                op: "matmul",
                bytes: usize::MAX,
            })?;
        let mut c = cx.alloc("matmul", wide)?;
        pool.install(|| {
            multiply(
                a.typed::<T>(),
                b.typed::<T>(),
                c.typed_mut::<T>(),
                self.dims,
                T::of(1.0),
                par,
            )
        });
        drop((a, b));
        let result = if self.a.dtype == T::DTYPE {
            c
        } else {
            real_scratch(c.typed::<T>(), self.a.dtype, "matmul", cx)?
        };
        result.settle();
        Ok(result)
    }

    /// The product, computed on the first call (other readers wait for it).
    fn result(&self, cx: &ReadContext) -> Result<Arc<Scratch>, ValueError> {
        let mut slot = self.result.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(result) = &*slot {
            return Ok(result.clone());
        }
        let threads = match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        // A plain thread: joining it blocks without running other jobs of the caller's pool. It
        // reads the operands, which recurse once per operation stacked on them: with the default
        // 2 MiB stack, 5,000 in-place edits before a matmul overflowed it (issue 9).
        let cx = cx.fork();
        let computed = std::thread::scope(|s| {
            std::thread::Builder::new()
                .stack_size(crate::value::ENGINE_STACK_BYTES)
                .spawn_scoped(s, || self.compute(threads, cx))
                .map_err(|e| ValueError::Compute {
                    op: "matmul",
                    reason: format!("cannot start the product's thread: {e}"),
                })?
                .join()
                .map_err(|_| ValueError::Compute {
                    op: "matmul",
                    reason: "the matrix product panicked".into(),
                })
        })??;
        let result = Arc::new(computed);
        *slot = Some(result.clone());
        Ok(result)
    }
}

impl LazyOp for MatmulOp {
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.a, &self.b]
    }

    fn name(&self) -> &'static str {
        "matmul"
    }

    fn release(&self) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn materialized(&self, seen: &mut HashSet<usize>) -> usize {
        // An upper bound of the peak: both operands and the product as f32 (f64), and the
        // product's bytes in the result dtype, which are kept for every reader.
        let [batch, m, k, n] = self.dims;
        let wide = if self.a.dtype == DType::F64 { 8 } else { 4 };
        let operands = batch.saturating_mul(m.saturating_mul(k).saturating_add(k.saturating_mul(n)));
        let product = batch.saturating_mul(m).saturating_mul(n);
        let result = product.saturating_mul(self.a.dtype.size().unwrap_or(wide));
        let peak = operands
            .saturating_add(product)
            .saturating_mul(wide)
            .saturating_add(result);
        peak.saturating_add(self.a.materialized(seen))
            .saturating_add(self.b.materialized(seen))
    }

    fn bytes_to_read(&self, seen: &mut HashSet<usize>) -> u64 {
        // The product is computed once and kept: its operands are read once.
        if !seen.insert(self as *const Self as usize) {
            return 0;
        }
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
        if out.is_empty() {
            return Ok(());
        }
        let size = dtype.size().ok_or(ValueError::NoByteSize { op: "matmul", dtype })?;
        let result = self.result(cx)?;
        result.read_into(start * size, out).map_err(|e| ValueError::Compute {
            op: "matmul",
            reason: format!("the product could not be read: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_tensor(shape: &[usize], f: impl Fn(usize) -> f32) -> Tensor {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n).flat_map(|i| f(i).to_le_bytes()).collect();
        Tensor::in_memory(DType::F32, shape.to_vec(), Arc::new(bytes))
    }

    fn values(t: &Tensor) -> Vec<f32> {
        let mut out = vec![0u8; t.nbytes()];
        t.read(0, &mut out, &mut ReadContext::default()).unwrap();
        out.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn small_products_match_the_definition() {
        let a = f32_tensor(&[2, 2, 3], |i| i as f32);
        let b = f32_tensor(&[2, 3, 2], |i| (i as f32) - 3.0);
        let (dims, shape) = product_shape(&a, "a", &b, "b").unwrap();
        assert_eq!((dims, shape.clone()), ([2, 2, 3, 2], vec![2, 2, 2]));
        let got = values(&product(&a, &b, dims, shape, 1).unwrap());
        let (av, bv) = (values(&a), values(&b));
        let mut expected = Vec::new();
        for z in 0..2 {
            for i in 0..2 {
                for j in 0..2 {
                    expected.push(
                        (0..3)
                            .map(|t| av[z * 6 + i * 3 + t] * bv[z * 6 + t * 2 + j])
                            .sum::<f32>(),
                    );
                }
            }
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn inner_dimension_mismatch_is_refused() {
        let a = f32_tensor(&[2, 3], |_| 0.0);
        let b = f32_tensor(&[4, 2], |_| 0.0);
        let err = product_shape(&a, "m::a", &b, "m::b").unwrap_err();
        assert!(matches!(err, TransformError::MatmulShapes { .. }));
        let text = err.to_string();
        assert!(
            text.contains("`m::a` (2, 3)") && text.contains("`m::b` (4, 2)") && text.contains("inner dimensions"),
            "{text}"
        );
        assert!(product_shape(&a, "a", &f32_tensor(&[3], |_| 0.0), "b").is_err());
    }

    #[test]
    fn missing_operand_message() {
        let err = TransformError::MissingOperand {
            operand: "m::b".into(),
            source_name: "m::a".into(),
        };
        assert_eq!(err.to_string(), "`m::b` (rewritten from `m::a`) does not exist");
    }

    #[test]
    fn thread_count_does_not_change_the_product() {
        let (m, k, n) = (300, 257, 190);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104_729) % 997) as f32 / 91.0 - 5.0).collect();
        let mut seq = vec![0f32; m * n];
        multiply(&a, &b, &mut seq, [1, m, k, n], 1.0f32, Par::Seq);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let mut par = vec![0f32; m * n];
        pool.install(|| multiply(&a, &b, &mut par, [1, m, k, n], 1.0f32, Par::rayon(2)));
        assert!(seq.iter().zip(&par).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

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
use crate::value::{narrow_scratch, read_real_scratch, LazyOp, ReadContext, Tensor, ValueError};

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
    state.count_reads(&alias, [name.as_str()]);
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

/// `c = a @ b` per batch, row-major: what each panel of [`multiply_in_panels`] computes.
#[cfg(test)]
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

/// Bytes of one operand's share of a panel (see [`panel_sizes`]).
const PANEL_BYTES: usize = 8 << 20;

/// Rows of `a` and columns of `b` per panel: `a`'s rows and `c`'s whole rows (a panel's pages
/// span every column of `c`) within [`PANEL_BYTES`], and `b` whole when it is within twice that,
/// else packed `PANEL_BYTES` of its columns at a time; multiples of 64 where 64 fit. A function of
/// the shape alone: faer's bits depend on the shapes it is given, and the product must not
/// depend on the budget or where the operands are.
fn panel_sizes([_, m, k, n]: [usize; 4], width: usize) -> [usize; 2] {
    // Below 64 only when 64 would not fit (a very long inner dimension).
    let fit = |per: usize, all: usize| {
        let count = PANEL_BYTES / per.max(1);
        (if count >= 64 { count / 64 * 64 } else { count.max(1) }).min(all.max(1))
    };
    let columns = if k.saturating_mul(n).saturating_mul(width) <= 2 * PANEL_BYTES {
        n.max(1)
    } else {
        fit(k.saturating_mul(width), n)
    };
    let rows = fit(k.saturating_add(n).saturating_mul(width), m);
    [rows, columns]
}

/// `c = a @ b` per batch, row-major, panel by panel (`rows` of `a`, `columns` of `b` at a time),
/// the pages of each spilled panel handed back once used: a product of operands in the arena
/// keeps one panel resident, not the operands. When `columns` is less than `n`, `b`'s columns
/// are packed into a buffer of the budget with `pread`s.
fn multiply_in_panels<T: Real + Element>(
    a: &Scratch,
    b: &Scratch,
    c: &mut Scratch,
    [batch, m, k, n]: [usize; 4],
    [rows, columns]: [usize; 2],
    par: Par,
    cx: &ReadContext,
) -> Result<(), ValueError> {
    if m * n == 0 {
        return Ok(());
    }
    let width = std::mem::size_of::<T>();
    let (rows, columns) = (rows.clamp(1, m), columns.clamp(1, n));
    let packing = columns < n;
    let mut packed = if packing {
        Some(cx.alloc("matmul", k * columns * width)?)
    } else {
        None
    };
    // Whole rows of `b` read per `pread` while packing (~1 MiB).
    let rows_per_read = (crate::value::CHUNK_BYTES / (n * width).max(1)).clamp(1, k.max(1));
    let mut row_bytes = Vec::new();
    let scratch_error = |e: std::io::Error| ValueError::Compute {
        op: "matmul",
        reason: format!("the arena could not be read: {e}"),
    };
    for z in 0..batch {
        let (ao, bo, co) = (z * m * k, z * k * n, z * m * n);
        for j0 in (0..n).step_by(columns) {
            let j1 = (j0 + columns).min(n);
            let q = j1 - j0;
            let rhs = match packed.as_mut() {
                Some(packed) => {
                    let dst = packed.typed_mut::<T>();
                    for t0 in (0..k).step_by(rows_per_read) {
                        cx.check()?;
                        let t1 = (t0 + rows_per_read).min(k);
                        row_bytes.resize((t1 - t0) * n * width, 0);
                        b.read_into((bo + t0 * n) * width, &mut row_bytes)
                            .map_err(scratch_error)?;
                        for t in t0..t1 {
                            let from = ((t - t0) * n + j0) * width;
                            let src = &row_bytes[from..from + q * width];
                            for (x, bytes) in dst[t * q..(t + 1) * q].iter_mut().zip(src.chunks_exact(width)) {
                                *x = T::from_le(bytes);
                            }
                        }
                    }
                    MatRef::from_row_major_slice(&packed.typed::<T>()[..k * q], k, q)
                }
                None => MatRef::from_row_major_slice(&b.typed::<T>()[bo..bo + k * n], k, n),
            };
            for i0 in (0..m).step_by(rows) {
                cx.check()?;
                let i1 = (i0 + rows).min(m);
                let lhs = MatRef::from_row_major_slice(&a.typed::<T>()[ao + i0 * k..ao + i1 * k], i1 - i0, k);
                let out = &mut c.typed_mut::<T>()[co + i0 * n + j0..co + (i1 - 1) * n + j1];
                let dst = row_major_mut(out, i1 - i0, q, n);
                matmul(dst, Accum::Replace, lhs, rhs, T::of(1.0), par);
                a.settle_range((ao + i0 * k) * width, (i1 - i0) * k * width);
                c.settle_range((co + i0 * n) * width, (i1 - i0) * n * width);
            }
        }
        if !packing {
            b.settle_range(bo * width, k * n * width);
        }
    }
    Ok(())
}

/// A row-major `rows × columns` view of `slice` whose rows start `stride` elements apart. Not
/// faer's `from_row_major_slice_with_stride_mut`: in faer 0.24.4 it swaps the strides (views the
/// transpose), so products through it wrote outside the panel.
fn row_major_mut<T>(slice: &mut [T], rows: usize, columns: usize, stride: usize) -> MatMut<'_, T> {
    MatMut::from_column_major_slice_with_stride_mut(slice, columns, rows, stride).transpose_mut()
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
        let panels = panel_sizes(self.dims, std::mem::size_of::<T>());
        pool.install(|| multiply_in_panels::<T>(&a, &b, &mut c, self.dims, panels, par, cx))?;
        drop((a, b));
        let result = if self.a.dtype == T::DTYPE {
            c
        } else {
            narrow_scratch::<T>(&c, self.a.dtype, "matmul", cx)?
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

    fn resident(&self, limit: u64, seen: &mut HashSet<usize>) -> u64 {
        // Operands and product beyond the budget are in the arena, and a panel of them is
        // mapped in at a time.
        let spilled = self.materialized(&mut HashSet::new()) as u64 > limit;
        let [_, _, k, n] = self.dims;
        let wide = if self.a.dtype == DType::F64 { 8 } else { 4 };
        let [_, columns] = panel_sizes(self.dims, wide);
        // A panel of `a` and of the product; `b` whole when it is not packed.
        let b_whole = if columns < n {
            0
        } else {
            k.saturating_mul(n).saturating_mul(wide)
        };
        let own = if spilled {
            PANEL_BYTES.saturating_add(b_whole) as u64
        } else {
            0
        };
        own.saturating_add(self.a.resident(limit, seen))
            .saturating_add(self.b.resident(limit, seen))
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
    use std::sync::atomic::AtomicBool;

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

    /// Operands copied into buffers of `memory` (its arena when the budget is 0).
    fn scratch_of(values: &[f32], memory: &Arc<crate::memory::Memory>) -> Scratch {
        let mut s = memory.alloc("matmul", values.len() * 4).unwrap();
        s.typed_mut::<f32>().copy_from_slice(values);
        s
    }

    #[test]
    fn panels_are_computed_in_place_in_memory_and_in_the_arena() {
        // Tails of one row and one column included; in memory and in the arena, packed and not.
        let dir = std::env::temp_dir();
        for limit in [0, u64::MAX] {
            let memory = Arc::new(crate::memory::Memory::new(limit, dir.clone()));
            let cx = ReadContext::for_run(Arc::new(AtomicBool::new(false)), memory.clone());
            for (batch, m, k, n) in [(1, 97, 300, 61), (2, 33, 1031, 129), (1, 257, 64, 5)] {
                let a: Vec<f32> = (0..batch * m * k)
                    .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
                    .collect();
                let b: Vec<f32> = (0..batch * k * n)
                    .map(|i| ((i * 104_729) % 997) as f32 / 91.0 - 5.0)
                    .collect();
                let (sa, sb) = (scratch_of(&a, &memory), scratch_of(&b, &memory));
                assert_eq!(sa.in_arena(), limit == 0);
                for panels in [[1, 1], [16, 7], [m - 1, n], [m, n - 1], [m, n]] {
                    // The panels' products, each by itself: what the panels must give.
                    let mut expected = vec![0f32; batch * m * n];
                    for z in 0..batch {
                        for i0 in (0..m).step_by(panels[0]) {
                            for j0 in (0..n).step_by(panels[1]) {
                                let (i1, j1) = ((i0 + panels[0]).min(m), (j0 + panels[1]).min(n));
                                let lhs: Vec<f32> = a[(z * m + i0) * k..(z * m + i1) * k].to_vec();
                                let rhs: Vec<f32> = (0..k)
                                    .flat_map(|t| b[(z * k + t) * n + j0..(z * k + t) * n + j1].to_vec())
                                    .collect();
                                let mut out = vec![0f32; (i1 - i0) * (j1 - j0)];
                                multiply(&lhs, &rhs, &mut out, [1, i1 - i0, k, j1 - j0], 1.0f32, Par::Seq);
                                for i in i0..i1 {
                                    let row = &out[(i - i0) * (j1 - j0)..(i - i0 + 1) * (j1 - j0)];
                                    expected[(z * m + i) * n + j0..(z * m + i) * n + j1].copy_from_slice(row);
                                }
                            }
                        }
                    }
                    let mut sc = memory.alloc("matmul", batch * m * n * 4).unwrap();
                    multiply_in_panels::<f32>(&sa, &sb, &mut sc, [batch, m, k, n], panels, Par::Seq, &cx).unwrap();
                    assert!(
                        sa.typed::<f32>() == &a[..] && sb.typed::<f32>() == &b[..],
                        "operands unchanged"
                    );
                    let same = expected
                        .iter()
                        .zip(sc.typed::<f32>())
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{batch}x{m}x{k}x{n} in panels {panels:?}, limit {limit}");
                }
            }
        }
    }

    #[test]
    fn panels_are_a_few_megabytes_whatever_the_shape() {
        let [rows, columns] = panel_sizes([1, 4096, 4096, 4096], 4);
        assert_eq!([rows, columns], [256, 512]);
        assert_eq!(panel_sizes([1, 10, 10, 10], 4), [10, 10]);
        assert_eq!(panel_sizes([1, 0, 0, 0], 4), [1, 1]);
        // A long inner dimension: panels within the bytes, down to one row or column.
        assert_eq!(panel_sizes([1, 1000, 1 << 20, 1000], 4), [1, 2]);
        assert_eq!(panel_sizes([1, 1000, 1 << 16, 1000], 4), [31, 32]);
    }

    #[test]
    fn thread_count_does_not_change_the_product() {
        let (m, k, n) = (300, 257, 190);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104_729) % 997) as f32 / 91.0 - 5.0).collect();
        let memory = Arc::new(crate::memory::Memory::new(u64::MAX, std::env::temp_dir()));
        let cx = ReadContext::for_run(Arc::new(AtomicBool::new(false)), memory.clone());
        let (sa, sb) = (scratch_of(&a, &memory), scratch_of(&b, &memory));
        let product = |panels: [usize; 2], threads: usize| {
            let mut c = memory.alloc("matmul", m * n * 4).unwrap();
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let par = if threads == 1 { Par::Seq } else { Par::rayon(threads) };
            pool.install(|| multiply_in_panels::<f32>(&sa, &sb, &mut c, [1, m, k, n], panels, par, &cx))
                .unwrap();
            c.typed::<f32>().to_vec()
        };
        for panels in [[m, n], [64, 64]] {
            let (seq, par) = (product(panels, 1), product(panels, 2));
            assert!(
                seq.iter().zip(&par).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{panels:?}"
            );
        }
    }
}

//! Dense linear algebra for low-rank factorization, on faer: the exact thin SVD, a seeded
//! randomized SVD (Halko, Martinsson & Tropp 2011, Algorithm 4.4: a Gaussian range finder with
//! oversampling and power iterations, each step re-orthonormalized by QR), rank selection
//! (fixed, by share of energy, by singular-value threshold) and the error a truncation makes.
//!
//! Matrices are row-major slices, as tensors store them. Every buffer is allocated fallibly (a
//! matrix that does not fit is an error, never an abort). faer's SVD splits its reductions into as
//! many parts as the parallelism it is given says, so that is fixed ([`PARTS`]) whatever the
//! thread count: the caller's pool only decides how many threads run those parts, and results
//! are bit-identical for any `--threads` (tested). Callers run these functions inside their pool.

use faer::diag::DiagMut;
use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::matmul::matmul;
use faer::linalg::{householder, qr, svd};
use faer::{Accum, Conj, MatMut, MatRef, Par};

use crate::dtype::DType;
use crate::kernels::random;

/// How many parts faer splits parallel work into. Its SVD and QR sum their reductions per part,
/// so results depend on this number, not on the threads that run the parts (tested): fixing it
/// keeps the bytes identical for any `--threads` (not across CPU families: faer picks its SIMD
/// kernels at run time). Two, because more parts than
/// cores spin: the randomized rank-64 SVD of a 4096 × 14336 matrix on 2 cores took 1.12 s with
/// 2 parts, 1.22 s with 4 and 1.32 s with 8 (one batch, fuzzers running beside it). Larger
/// machines would gain from factoring several matrices at once, each in 2 parts (not done yet).
pub const PARTS: usize = 2;

fn par() -> Par {
    Par::rayon(PARTS)
}

/// Bytes of rows per panel of a pass over a matrix ([`Rows`]).
pub const PANEL_BYTES: usize = 16 << 20;

/// A row-major `m × n` matrix that passes (norm, products with it, the residual) go through a
/// panel of rows at a time, telling `release` which elements each finished with: a matrix in the
/// scratch arena hands back those pages, so a pass keeps one panel resident, not the matrix.
/// Panels are a function of the shape alone, so results do not depend on where the matrix is.
#[derive(Clone, Copy)]
pub struct Rows<'a, T> {
    data: &'a [T],
    m: usize,
    n: usize,
    /// Rows per panel.
    per: usize,
    release: Option<&'a (dyn Fn(usize, usize) + Sync)>,
}

impl<'a, T> Rows<'a, T> {
    /// The matrix `data` (`m × n`, row-major; `data` holds at least `m · n` elements).
    pub fn new(data: &'a [T], m: usize, n: usize) -> Rows<'a, T> {
        debug_assert!(data.len() >= m * n);
        Rows {
            data,
            m,
            n,
            per: {
                // Multiples of 64 rows where 64 fit, else as many as fit (at least one).
                let count = PANEL_BYTES / (n * std::mem::size_of::<T>()).max(1);
                if count >= 64 {
                    count / 64 * 64
                } else {
                    count.max(1)
                }
            },
            release: None,
        }
    }

    /// Panels of `per` rows (tests: several panels of a small matrix).
    #[cfg(test)]
    fn with_panel_rows(self, per: usize) -> Rows<'a, T> {
        Rows { per, ..self }
    }

    /// Calls `release(start, end)` for the elements of each panel a pass finished with.
    pub fn releasing(self, release: &'a (dyn Fn(usize, usize) + Sync)) -> Rows<'a, T> {
        Rows {
            release: Some(release),
            ..self
        }
    }

    /// `(m, n)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.m, self.n)
    }

    /// The whole matrix (passes that need it at once: the exact SVD).
    pub fn all(&self) -> &'a [T] {
        &self.data[..self.m * self.n]
    }

    /// `(first row, rows)` of each panel, in order: [`PANEL_BYTES`] of rows.
    fn panels(&self) -> impl Iterator<Item = (usize, usize)> {
        let (per, m) = (self.per.max(1), self.m);
        (0..m).step_by(per).map(move |first| (first, per.min(m - first)))
    }

    /// Rows `[first, first + rows)`.
    fn panel(&self, first: usize, rows: usize) -> &'a [T] {
        &self.data[first * self.n..(first + rows) * self.n]
    }

    /// Tells `release` a pass is done with rows `[first, first + rows)`.
    fn done(&self, first: usize, rows: usize) {
        if let Some(release) = self.release {
            release(first * self.n, (first + rows) * self.n);
        }
    }
}

/// Why a factorization failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinalgError {
    /// A buffer could not be allocated.
    #[error("not enough memory for {what} ({bytes} bytes)")]
    OutOfMemory {
        /// What the buffer was for.
        what: &'static str,
        /// Its size.
        bytes: usize,
    },
    /// faer's SVD did not converge.
    #[error("the SVD did not converge")]
    NoConvergence,
    /// The matrix holds NaN or an infinity.
    #[error("the matrix holds a non-finite value (NaN or infinity) at row {row}, column {column}")]
    NonFinite {
        /// Its row.
        row: usize,
        /// Its column.
        column: usize,
    },
}

/// The real types dense work runs in: f32, and f64 for F64 tensors (SPEC §7: never half
/// precision).
pub trait Real: faer::traits::RealField + Copy + Default + Send + Sync + 'static {
    /// The tensor dtype of this type.
    const DTYPE: DType;
    /// The nearest value of this type.
    fn of(x: f64) -> Self;
    /// The value as f64 (exact).
    fn wide(self) -> f64;
    /// The value of little-endian bytes (`size_of::<Self>()` of them).
    fn from_le(bytes: &[u8]) -> Self;
    /// Appends the little-endian bytes.
    fn put_le(self, out: &mut [u8]);
}

impl Real for f32 {
    const DTYPE: DType = DType::F32;
    fn of(x: f64) -> Self {
        x as f32
    }
    fn wide(self) -> f64 {
        f64::from(self)
    }
    fn from_le(bytes: &[u8]) -> Self {
        f32::from_le_bytes(bytes.try_into().unwrap_or([0; 4]))
    }
    fn put_le(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
}

impl Real for f64 {
    const DTYPE: DType = DType::F64;
    fn of(x: f64) -> Self {
        x
    }
    fn wide(self) -> f64 {
        self
    }
    fn from_le(bytes: &[u8]) -> Self {
        f64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]))
    }
    fn put_le(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
}

/// A vector of `len` copies of `value`, or [`LinalgError::OutOfMemory`].
pub fn try_vec<T: Clone>(what: &'static str, len: usize, value: T) -> Result<Vec<T>, LinalgError> {
    let oom = || LinalgError::OutOfMemory {
        what,
        bytes: len.saturating_mul(std::mem::size_of::<T>()),
    };
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| oom())?;
    v.resize(len, value);
    Ok(v)
}

fn scratch(what: &'static str, req: StackReq) -> Result<MemBuffer, LinalgError> {
    MemBuffer::try_new(req).map_err(|_| LinalgError::OutOfMemory {
        what,
        bytes: req.size_bytes(),
    })
}

/// A (possibly truncated) thin SVD `A ≈ U diag(s) Vᵀ` of an `m × n` matrix, `k` terms, singular
/// values non-increasing.
#[derive(Debug, Clone)]
pub struct Svd<T> {
    /// Rows of A.
    pub m: usize,
    /// Columns of A.
    pub n: usize,
    /// Left singular vectors, `m × k`, column-major.
    pub u: Vec<T>,
    /// Singular values, `k`.
    pub s: Vec<T>,
    /// Right singular vectors, `n × k`, column-major.
    pub v: Vec<T>,
}

impl<T: Real> Svd<T> {
    /// The number of terms kept.
    pub fn k(&self) -> usize {
        self.s.len()
    }

    /// U as a matrix.
    pub fn u(&self) -> MatRef<'_, T> {
        MatRef::from_column_major_slice(&self.u, self.m, self.k())
    }

    /// V as a matrix.
    pub fn v(&self) -> MatRef<'_, T> {
        MatRef::from_column_major_slice(&self.v, self.n, self.k())
    }

    /// The first `r` terms only.
    pub fn truncate(&mut self, r: usize) {
        let r = r.min(self.k());
        self.s.truncate(r);
        self.u.truncate(self.m * r);
        self.v.truncate(self.n * r);
    }
}

/// The squared Frobenius norm (summed in f64), or where the first non-finite value is. The two
/// halves of the panels are summed side by side ([`halves`]), each in eight lanes (a
/// single running sum waits on every addition: 55 ms of a 224 MiB matrix against ~20), and
/// added in a fixed order: the same sum whatever the threads.
pub fn frobenius_sq<T: Real>(a: Rows<'_, T>) -> Result<f64, LinalgError> {
    let sum = |panels: &[(usize, usize)]| -> Result<f64, LinalgError> {
        let mut total = 0.0f64;
        for &(first, rows) in panels {
            let panel = a.panel(first, rows);
            let mut lanes = [0.0f64; 8];
            let whole = panel.chunks_exact(8);
            let tail = whole.remainder();
            for chunk in whole {
                for (lane, &x) in lanes.iter_mut().zip(chunk) {
                    *lane += x.wide() * x.wide();
                }
            }
            let mut part = lanes.iter().sum::<f64>();
            part += tail.iter().map(|&x| x.wide() * x.wide()).sum::<f64>();
            if !part.is_finite() {
                // A NaN or infinity (or squares overflowing f64, which leave no culprit).
                if let Some(i) = panel.iter().position(|x| !x.wide().is_finite()) {
                    return Err(LinalgError::NonFinite {
                        row: first + i / a.n.max(1),
                        column: i % a.n.max(1),
                    });
                }
            }
            total += part;
            a.done(first, rows);
        }
        Ok(total)
    };
    match halves(&a) {
        None => sum(&a.panels().collect::<Vec<_>>()),
        Some([first, second]) => {
            let (first, second) = rayon::join(|| sum(&first), || sum(&second));
            // The first half's error first, as a single pass would find it.
            Ok(first? + second?)
        }
    }
}

/// The exact thin SVD of the row-major `m × n` matrix `a`: `min(m, n)` terms.
pub fn exact<T: Real>(a: &[T], m: usize, n: usize) -> Result<Svd<T>, LinalgError> {
    // The row-major A is the column-major Aᵀ (n × m), the layout faer's SVD prefers; Aᵀ's SVD
    // V' S U'ᵀ gives A's with the roles of the vectors swapped.
    let at = MatRef::from_column_major_slice(a, n, m);
    thin_svd_into(at, par()).map(|(u_t, s, v_t)| Svd {
        m,
        n,
        u: v_t,
        s,
        v: u_t,
    })
}

/// `(U, s, V)`, the matrices column-major.
type Triple<T> = (Vec<T>, Vec<T>, Vec<T>);

/// The thin SVD of a column-major matrix.
fn thin_svd_into<T: Real>(a: MatRef<'_, T>, par: Par) -> Result<Triple<T>, LinalgError> {
    let (rows, cols) = a.shape();
    let p = rows.min(cols);
    let mut u = try_vec("singular vectors", rows * p, T::default())?;
    let mut v = try_vec("singular vectors", cols * p, T::default())?;
    let mut s = try_vec("singular values", p, T::default())?;
    if p == 0 {
        return Ok((u, s, v));
    }
    let compute = svd::ComputeSvdVectors::Thin;
    let mut mem = scratch(
        "SVD workspace",
        svd::svd_scratch::<T>(rows, cols, compute, compute, par, Default::default()),
    )?;
    svd::svd(
        a,
        DiagMut::from_slice_mut(&mut s),
        Some(MatMut::from_column_major_slice_mut(&mut u, rows, p)),
        Some(MatMut::from_column_major_slice_mut(&mut v, cols, p)),
        par,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .map_err(|_| LinalgError::NoConvergence)?;
    Ok((u, s, v))
}

/// Replaces the column-major `m × k` matrix `y` (m ≥ k) by an orthonormal basis of its range
/// (the thin Q of its QR decomposition).
fn orthonormalize<T: Real>(y: &mut [T], m: usize, k: usize, par: Par) -> Result<(), LinalgError> {
    if k == 0 {
        return Ok(());
    }
    let block = qr::no_pivoting::factor::recommended_block_size::<T>(m, k);
    let mut coeff = try_vec("QR workspace", block * k, T::default())?;
    let req = StackReq::any_of(&[
        qr::no_pivoting::factor::qr_in_place_scratch::<T>(m, k, block, par, Default::default()),
        householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<T>(m, block, k),
    ]);
    let mut mem = scratch("QR workspace", req)?;
    qr::no_pivoting::factor::qr_in_place(
        MatMut::from_column_major_slice_mut(y, m, k),
        MatMut::from_column_major_slice_mut(&mut coeff, block, k),
        par,
        MemStack::new(&mut mem),
        Default::default(),
    );
    // The Householder basis is the strictly lower part with a unit diagonal; Q = H₁…H_k I.
    let mut basis = try_vec("QR workspace", m * k, T::default())?;
    for j in 0..k {
        basis[j * m + j] = T::of(1.0);
        basis[j * m + j + 1..(j + 1) * m].copy_from_slice(&y[j * m + j + 1..(j + 1) * m]);
    }
    y.fill(T::default());
    for j in 0..k {
        y[j * m + j] = T::of(1.0);
    }
    householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
        MatRef::from_column_major_slice(&basis, m, k),
        MatRef::from_column_major_slice(&coeff, block, k),
        Conj::No,
        MatMut::from_column_major_slice_mut(y, m, k),
        par,
        MemStack::new(&mut mem),
    );
    Ok(())
}

/// Settings of the randomized SVD.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Randomized {
    /// Extra columns of the test matrix beyond the rank (Halko et al. suggest 5–10).
    pub oversample: usize,
    /// Power iterations, each sharpening the spectrum's decay (needed when it is flat).
    pub power_iterations: usize,
    /// Seed of the Gaussian test matrix.
    pub seed: u64,
}

impl Default for Randomized {
    fn default() -> Self {
        Randomized {
            oversample: 10,
            power_iterations: 2,
            seed: 0,
        }
    }
}

/// `c = lhs @ rhs` (column-major `c`, overwritten).
fn product<T: Real>(c: &mut [T], rows: usize, cols: usize, lhs: MatRef<'_, T>, rhs: MatRef<'_, T>, par: Par) {
    matmul(
        MatMut::from_column_major_slice_mut(c, rows, cols),
        Accum::Replace,
        lhs,
        rhs,
        T::of(1.0),
        par,
    );
}

/// The rows of `a` in two runs, one per part ([`PARTS`]): the panels in two runs of
/// consecutive panels (as even as whole panels allow), or a single panel's rows in two halves;
/// `None` for a single row. A function of the shape alone, so the parts' sums are the same
/// whatever the threads; each part runs with faer sequential inside (faer splitting a product
/// synchronises its threads per call, which costs more than the product for small matrices).
fn halves<T>(a: &Rows<'_, T>) -> Option<[Vec<(usize, usize)>; 2]> {
    let mut first: Vec<(usize, usize)> = a.panels().collect();
    match first.len() {
        0 => None,
        1 if a.m < 2 => None,
        1 => {
            let top = a.m / 2;
            Some([vec![(0, top)], vec![(top, a.m - top)]])
        }
        _ => {
            let second = first.split_off(first.len() / 2);
            Some([first, second])
        }
    }
}

/// Below this many elements, a QR or SVD of a sketch runs sequentially: faer's parallel
/// factorizations synchronise their threads per column block, which small matrices do not
/// repay (extracting LoRA adapters from 1024-wide projections spent a quarter of its time in
/// faer's barriers). A function of the shape alone, as results depend on the parts.
const PARALLEL_FROM: usize = 1 << 20;

/// How faer runs a factorization of a `rows × cols` sketch ([`PARALLEL_FROM`]).
fn par_for(rows: usize, cols: usize) -> Par {
    if rows.saturating_mul(cols) < PARALLEL_FROM {
        Par::Seq
    } else {
        par()
    }
}

/// `c = A x` (column-major `m × k` `c`, overwritten), panel by panel. Each half of the rows
/// ([`halves`]) is multiplied by one part (`rayon::join`: side by side on two threads, one
/// after the other on one), faer sequential inside: faer splitting each tall-skinny panel
/// product synchronised its threads per panel and scaled 1.5× on 2 cores. Each output row is
/// computed the same way whatever the threads.
fn a_times<T: Real>(c: &mut [T], a: Rows<'_, T>, x: MatRef<'_, T>, par: Par) {
    let k = x.ncols();
    // Rows `base..` of the product are `out`; multiplies `panels` into them.
    let run = |mut out: MatMut<'_, T>, panels: &[(usize, usize)], base: usize, par: Par| {
        for &(first, rows) in panels {
            let lhs = MatRef::from_row_major_slice(a.panel(first, rows), rows, a.n);
            matmul(
                out.as_mut().subrows_mut(first - base, rows),
                Accum::Replace,
                lhs,
                x,
                T::of(1.0),
                par,
            );
            a.done(first, rows);
        }
    };
    let c = MatMut::from_column_major_slice_mut(c, a.m, k);
    match halves(&a) {
        None => run(c, &a.panels().collect::<Vec<_>>(), 0, par),
        Some([top, bottom]) => {
            let split = bottom[0].0;
            let (upper, lower) = c.split_at_row_mut(split);
            rayon::join(
                || run(upper, &top, 0, Par::Seq),
                || run(lower, &bottom, split, Par::Seq),
            );
        }
    }
}

/// `c = Aᵀ x` (column-major `n × k` `c`, overwritten), summed panel by panel. Each part sums
/// its half of the rows' products in order (as [`a_times`]) and the second half's sum is added
/// to the first's: the same sums whatever the threads.
fn a_transposed_times<T: Real>(c: &mut [T], a: Rows<'_, T>, x: MatRef<'_, T>, par: Par) -> Result<(), LinalgError> {
    let k = x.ncols();
    let sum = |out: &mut [T], panels: &[(usize, usize)], par: Par| {
        let mut out = MatMut::from_column_major_slice_mut(out, a.n, k);
        if panels.is_empty() {
            out.fill(T::default());
        }
        for (i, &(first, rows)) in panels.iter().enumerate() {
            let lhs = MatRef::from_row_major_slice(a.panel(first, rows), rows, a.n).transpose();
            let accum = if i == 0 { Accum::Replace } else { Accum::Add };
            matmul(out.as_mut(), accum, lhs, x.subrows(first, rows), T::of(1.0), par);
            a.done(first, rows);
        }
    };
    match halves(&a) {
        None => sum(c, &a.panels().collect::<Vec<_>>(), par),
        Some([first, second]) => {
            let mut part = try_vec("product workspace", a.n * k, T::default())?;
            rayon::join(|| sum(c, &first, Par::Seq), || sum(&mut part, &second, Par::Seq));
            for (total, &p) in c.iter_mut().zip(&part) {
                *total += p;
            }
        }
    }
    Ok(())
}

/// The leading `rank` terms of the SVD of the row-major `m × n` matrix `a` by the randomized
/// range finder. When the sketch would not be smaller than the matrix, the exact SVD is
/// computed instead (and truncated).
pub fn randomized<T: Real>(a: Rows<'_, T>, rank: usize, settings: Randomized) -> Result<Svd<T>, LinalgError> {
    let (m, n) = (a.m, a.n);
    let par = par();
    let p = m.min(n);
    let k = rank.saturating_add(settings.oversample).min(p);
    if k >= p {
        let mut svd = exact(a.all(), m, n)?;
        svd.truncate(rank);
        return Ok(svd);
    }
    let mut omega = try_vec("random test matrix", n * k, T::default())?;
    // Counter-based draws: the same values however the work is split (a third of a pass's time
    // on one thread for 14336 × 74).
    {
        use rayon::prelude::*;
        const DRAWS: usize = 1 << 14;
        omega.par_chunks_mut(DRAWS).enumerate().for_each(|(c, chunk)| {
            for (i, x) in chunk.iter_mut().enumerate() {
                *x = T::of(random::normal(settings.seed, (c * DRAWS + i) as u64));
            }
        });
    }
    // Q: an orthonormal basis of range(A Ω), sharpened by power iterations (Aᵀ, then A).
    let mut q = try_vec("range basis", m * k, T::default())?;
    a_times(&mut q, a, MatRef::from_column_major_slice(&omega, n, k), par);
    orthonormalize(&mut q, m, k, par_for(m, k))?;
    let mut z = omega;
    for _ in 0..settings.power_iterations {
        a_transposed_times(&mut z, a, MatRef::from_column_major_slice(&q, m, k), par)?;
        orthonormalize(&mut z, n, k, par_for(n, k))?;
        a_times(&mut q, a, MatRef::from_column_major_slice(&z, n, k), par);
        orthonormalize(&mut q, m, k, par_for(m, k))?;
    }
    // Bᵀ = Aᵀ Q (n × k) = W S Xᵀ, so A ≈ Q B = (Q X) S Wᵀ.
    a_transposed_times(&mut z, a, MatRef::from_column_major_slice(&q, m, k), par)?;
    let (w, s, x) = thin_svd_into(MatRef::from_column_major_slice(&z, n, k), par_for(n, k))?;
    drop(z);
    let mut u = try_vec("singular vectors", m * k, T::default())?;
    product(
        &mut u,
        m,
        k,
        MatRef::from_column_major_slice(&q, m, k),
        MatRef::from_column_major_slice(&x, k, k),
        par_for(m, k),
    );
    let mut svd = Svd { m, n, u, s, v: w };
    svd.truncate(rank);
    Ok(svd)
}

/// How many terms to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankRule {
    /// Exactly this many.
    Fixed(usize),
    /// The fewest whose share of Σσ² (the squared Frobenius norm) reaches this fraction.
    Energy(f64),
    /// Those whose singular value is at least this.
    Threshold(f64),
}

/// The rank `rule` picks from the singular values `s` (non-increasing) of a matrix whose squared
/// Frobenius norm is `total_sq`, at most `max_rank` and `s.len()`, and at least 1 when the matrix
/// has a term.
pub fn choose_rank<T: Real>(s: &[T], total_sq: f64, rule: RankRule, max_rank: Option<usize>) -> usize {
    let cap = max_rank.unwrap_or(usize::MAX).min(s.len());
    let r = match rule {
        RankRule::Fixed(r) => r,
        RankRule::Energy(share) => {
            let goal = share * total_sq;
            let mut kept = 0.0;
            let mut r = s.len();
            for (i, &x) in s.iter().enumerate() {
                kept += x.wide() * x.wide();
                if kept >= goal {
                    r = i + 1;
                    break;
                }
            }
            r
        }
        RankRule::Threshold(t) => s.iter().take_while(|x| x.wide() >= t).count(),
    };
    // A factor of rank 0 is no factor (PEFT refuses r = 0): at least one term is kept.
    r.min(cap).max(usize::from(cap > 0))
}

/// What a rank-`r` truncation keeps and loses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quality {
    /// Terms kept.
    pub rank: usize,
    /// Share of the squared Frobenius norm kept, Σ_{i<r} σᵢ² / ‖A‖²_F (1 for a zero matrix).
    pub energy: f64,
    /// ‖A − A_r‖_F / ‖A‖_F (0 for a zero matrix).
    pub relative_error: f64,
    /// ‖A − A_r‖²_F, absolute (what a smaller rank adds to is known from it without cancelling).
    pub error_sq: f64,
    /// ‖A‖²_F.
    pub total_sq: f64,
}

impl Quality {
    /// The quality of keeping `rank` terms whose squares sum to `kept_sq`, leaving `error_sq`,
    /// of a matrix with squared norm `total_sq`.
    pub fn new(rank: usize, kept_sq: f64, error_sq: f64, total_sq: f64) -> Quality {
        if total_sq <= 0.0 {
            return Quality {
                rank,
                energy: 1.0,
                relative_error: 0.0,
                error_sq: 0.0,
                total_sq: 0.0,
            };
        }
        Quality {
            rank,
            energy: (kept_sq / total_sq).min(1.0),
            relative_error: (error_sq.max(0.0) / total_sq).sqrt(),
            error_sq,
            total_sq,
        }
    }

    /// The quality of keeping only the first `rank` (≤ this rank) of `s`, the singular values
    /// this quality kept: the dropped terms add their squares to the error.
    pub fn at_rank<T: Real>(&self, s: &[T], rank: usize) -> Quality {
        let sq = |v: &[T]| v.iter().map(|x| x.wide() * x.wide()).sum::<f64>();
        let rank = rank.min(self.rank).min(s.len());
        let dropped = sq(&s[rank..self.rank.min(s.len())]);
        Quality::new(rank, sq(&s[..rank]), self.error_sq + dropped, self.total_sq)
    }
}

/// The quality of keeping the first `rank` terms of `svd`, an SVD of the row-major `m × n`
/// matrix `a` with squared norm `total_sq`. When `svd` is complete (every singular value), the
/// error is the sum of the dropped σᵢ², which does not cancel. Otherwise (randomized) it is
/// ‖A‖² − Σ_{i<r} σᵢ² (exact for orthonormal factors, since those σ are QᵀA's), unless that is
/// below 0.25% of ‖A‖² (a relative error under 5%), where the subtraction loses the digits that
/// matter: then ‖A − U_r S_r V_rᵀ‖² is measured, in row blocks.
pub fn quality<T: Real>(a: Rows<'_, T>, svd: &Svd<T>, rank: usize, total_sq: f64) -> Result<Quality, LinalgError> {
    let sq = |v: &[T]| v.iter().map(|x| x.wide() * x.wide()).sum::<f64>();
    let rank = rank.min(svd.k());
    let kept = sq(&svd.s[..rank]);
    let complete = svd.k() == svd.m.min(svd.n);
    let error = if complete {
        sq(&svd.s[rank..])
    } else {
        let estimate = (total_sq - kept).max(0.0);
        if estimate < 0.0025 * total_sq {
            residual_sq(a, svd, rank)?
        } else {
            estimate
        }
    };
    Ok(Quality::new(rank, kept, error, total_sq))
}

/// ‖A − U_r S_r V_rᵀ‖²_F, computed 64 rows at a time (summed in f64).
fn residual_sq<T: Real>(a: Rows<'_, T>, svd: &Svd<T>, rank: usize) -> Result<f64, LinalgError> {
    let (m, n) = (svd.m, svd.n);
    const ROWS: usize = 64;
    let mut block = try_vec("residual block", ROWS.min(m) * n, T::default())?;
    let mut us = try_vec("residual block", ROWS.min(m) * rank, T::default())?;
    let v = MatRef::from_column_major_slice(&svd.v[..n * rank], n, rank);
    let mut sum = 0.0f64;
    for (panel_first, panel_rows) in a.panels() {
        let panel = a.panel(panel_first, panel_rows);
        for offset in (0..panel_rows).step_by(ROWS) {
            let first = panel_first + offset;
            let rows = ROWS.min(panel_rows - offset);
            let block = &mut block[..rows * n];
            block.copy_from_slice(&panel[offset * n..(offset + rows) * n]);
            let us = &mut us[..rows * rank];
            for i in 0..rows {
                for t in 0..rank {
                    us[i * rank + t] = svd.u[t * m + first + i] * svd.s[t];
                }
            }
            matmul(
                MatMut::from_row_major_slice_mut(block, rows, n),
                Accum::Add,
                MatRef::from_row_major_slice(us, rows, rank),
                v.transpose(),
                T::of(-1.0),
                par(),
            );
            sum += block.iter().map(|x| x.wide() * x.wide()).sum::<f64>();
        }
        a.done(panel_first, panel_rows);
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row-major `m × n` matrix with singular values `sigma` (non-increasing) and
    /// pseudo-random orthonormal vectors, built from two QRs.
    fn with_spectrum(m: usize, n: usize, sigma: &[f64], seed: u64) -> Vec<f64> {
        let k = sigma.len();
        let mut u: Vec<f64> = (0..m * k).map(|i| random::normal(seed, i as u64)).collect();
        let mut v: Vec<f64> = (0..n * k).map(|i| random::normal(seed + 1, i as u64)).collect();
        orthonormalize(&mut u, m, k, Par::Seq).unwrap();
        orthonormalize(&mut v, n, k, Par::Seq).unwrap();
        let mut a = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                a[i * n + j] = (0..k).map(|t| u[t * m + i] * sigma[t] * v[t * n + j]).sum();
            }
        }
        a
    }

    fn reconstruct(svd: &Svd<f64>) -> Vec<f64> {
        let (m, n, k) = (svd.m, svd.n, svd.k());
        let mut a = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                a[i * n + j] = (0..k).map(|t| svd.u[t * m + i] * svd.s[t] * svd.v[t * n + j]).sum();
            }
        }
        a
    }

    #[test]
    fn exact_svd_reconstructs_wide_and_tall_matrices() {
        for (m, n) in [(7, 5), (5, 7), (1, 4), (6, 6)] {
            let a: Vec<f64> = (0..m * n).map(|i| random::normal(3, i as u64)).collect();
            let svd = exact(&a, m, n).unwrap();
            assert_eq!(svd.k(), m.min(n));
            assert!(svd.s.windows(2).all(|w| w[0] >= w[1]));
            let back = reconstruct(&svd);
            let err = a.iter().zip(&back).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
            assert!(err < 1e-12, "{m}x{n}: {err}");
        }
    }

    #[test]
    fn orthonormalize_gives_orthonormal_columns() {
        let (m, k) = (50, 8);
        let mut y: Vec<f64> = (0..m * k).map(|i| random::normal(9, i as u64)).collect();
        orthonormalize(&mut y, m, k, Par::Seq).unwrap();
        for a in 0..k {
            for b in 0..k {
                let dot: f64 = (0..m).map(|i| y[a * m + i] * y[b * m + i]).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-12, "{a},{b}: {dot}");
            }
        }
    }

    #[test]
    fn randomized_recovers_a_low_rank_matrix_exactly() {
        let sigma = [9.0, 5.0, 2.0, 1.0];
        let a = with_spectrum(120, 80, &sigma, 5);
        let svd = randomized(Rows::new(&a, 120, 80), 4, Randomized::default()).unwrap();
        for (got, want) in svd.s.iter().zip(sigma) {
            assert!((got - want).abs() < 1e-9, "{got} {want}");
        }
        let a = Rows::new(&a, 120, 80);
        let q = quality(a, &svd, 4, frobenius_sq(a).unwrap()).unwrap();
        assert!(q.relative_error < 1e-12 && (q.energy - 1.0).abs() < 1e-12, "{q:?}");
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (m, n) = (300, 260);
        let a: Vec<f32> = (0..m * n).map(|i| random::normal(11, i as u64) as f32).collect();
        let pool = |threads| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let same = |x: &Svd<f32>, y: &Svd<f32>| x.u == y.u && x.s == y.s && x.v == y.v;
        let one = pool(1).install(|| exact(&a, m, n)).unwrap();
        for threads in [2, 3, 8] {
            assert!(
                same(&one, &pool(threads).install(|| exact(&a, m, n)).unwrap()),
                "{threads}"
            );
        }
        // Products and QR run on the pool's threads: large enough that faer splits them.
        let (m, n) = (1500, 1100);
        let a: Vec<f32> = (0..m * n).map(|i| random::normal(12, i as u64) as f32).collect();
        let settings = Randomized::default();
        let one = pool(1)
            .install(|| randomized(Rows::new(&a, m, n), 40, settings))
            .unwrap();
        for threads in [2, 3, 8] {
            let other = pool(threads)
                .install(|| randomized(Rows::new(&a, m, n), 40, settings))
                .unwrap();
            assert!(same(&one, &other), "{threads}");
        }
        // Several panels: the products and the norm split by halves of them.
        let rows = || Rows::new(&a, m, n).with_panel_rows(96);
        let one = pool(1).install(|| randomized(rows(), 40, settings)).unwrap();
        let norm = pool(1).install(|| frobenius_sq(rows())).unwrap();
        for threads in [2, 3, 8] {
            let other = pool(threads).install(|| randomized(rows(), 40, settings)).unwrap();
            assert!(same(&one, &other), "panels, {threads}");
            assert_eq!(pool(threads).install(|| frobenius_sq(rows())).unwrap(), norm);
        }
        // A sketch large enough for faer's parallel QR ([`PARALLEL_FROM`]).
        let (rows, k) = (PARALLEL_FROM / 16 + 7, 16);
        assert!(matches!(par_for(rows, k), Par::Rayon(_)));
        let y: Vec<f32> = (0..rows * k).map(|i| random::normal(13, i as u64) as f32).collect();
        let basis = |threads| {
            let mut y = y.clone();
            pool(threads)
                .install(|| orthonormalize(&mut y, rows, k, par_for(rows, k)))
                .unwrap();
            y
        };
        let one = basis(1);
        for threads in [2, 3] {
            assert!(basis(threads) == one, "QR, {threads}");
        }
    }

    #[test]
    fn passes_go_panel_by_panel_and_release_each() {
        let (m, n) = (300, 260);
        let a: Vec<f64> = (0..m * n).map(|i| random::normal(13, i as u64)).collect();
        let released = std::sync::Mutex::new(Vec::new());
        let release = |start: usize, end: usize| released.lock().unwrap().push((start, end));
        let whole = randomized(Rows::new(&a, m, n), 20, Randomized::default()).unwrap();
        let rows = Rows::new(&a, m, n).with_panel_rows(64).releasing(&release);
        let panels = randomized(rows, 20, Randomized::default()).unwrap();
        for (x, y) in whole.s.iter().zip(&panels.s) {
            assert!((x - y).abs() < 1e-9 * whole.s[0], "{x} {y}");
        }
        // Six passes (A Ω, two power iterations of Aᵀ and A, Aᵀ Q), five panels each; the two
        // halves of a pass run side by side, so its releases interleave (each half in order).
        let passes = released.lock().unwrap().clone();
        assert_eq!(passes.len(), 6 * 5);
        let mut first_pass = passes[..5].to_vec();
        first_pass.sort_unstable();
        assert_eq!(
            first_pass,
            [
                (0, 64 * n),
                (64 * n, 128 * n),
                (128 * n, 192 * n),
                (192 * n, 256 * n),
                (256 * n, 300 * n)
            ]
        );
        let position = |panel| passes[..5].iter().position(|&p| p == panel).unwrap();
        assert!(position((0, 64 * n)) < position((64 * n, 128 * n)));
        assert!(position((128 * n, 192 * n)) < position((192 * n, 256 * n)));
        assert!(position((192 * n, 256 * n)) < position((256 * n, 300 * n)));
        let total = frobenius_sq(rows).unwrap();
        let expected: f64 = a.iter().map(|x| x * x).sum();
        assert!((total - expected).abs() < 1e-9 * expected);
        let q = quality(rows, &panels, 20, total).unwrap();
        let q_whole = quality(Rows::new(&a, m, n), &whole, 20, total).unwrap();
        assert!(
            (q.relative_error - q_whole.relative_error).abs() < 1e-9,
            "{q:?} {q_whole:?}"
        );
    }

    #[test]
    fn rank_rules() {
        let s = [4.0f64, 2.0, 1.0, 0.5];
        let total: f64 = s.iter().map(|x| x * x).sum(); // 21.25
        assert_eq!(choose_rank(&s, total, RankRule::Fixed(2), None), 2);
        assert_eq!(choose_rank(&s, total, RankRule::Fixed(9), None), 4);
        assert_eq!(choose_rank(&s, total, RankRule::Energy(0.75), None), 1); // 16/21.25
        assert_eq!(choose_rank(&s, total, RankRule::Energy(0.94), None), 2); // 20/21.25
        assert_eq!(choose_rank(&s, total, RankRule::Energy(0.95), None), 3); // 21/21.25
        assert_eq!(choose_rank(&s, total, RankRule::Energy(0.95), Some(1)), 1);
        assert_eq!(choose_rank(&s, total, RankRule::Threshold(1.0), None), 3);
        assert_eq!(choose_rank(&s, total, RankRule::Threshold(10.0), None), 1);
        let q = Quality::new(4, total, 0.0, total).at_rank(&s, 2);
        assert!((q.energy - 20.0 / 21.25).abs() < 1e-15);
        assert!((q.relative_error - (1.25f64 / 21.25).sqrt()).abs() < 1e-15);
        assert_eq!(Quality::new(1, 0.0, 0.0, 0.0).relative_error, 0.0);
    }

    #[test]
    fn non_finite_values_are_found() {
        let a = [1.0f32, 2.0, f32::NAN, 4.0];
        assert_eq!(
            frobenius_sq(Rows::new(&a, 2, 2)),
            Err(LinalgError::NonFinite { row: 1, column: 0 })
        );
    }
}

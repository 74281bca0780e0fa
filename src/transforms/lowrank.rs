//! `phlora` and `phlora_`: low-rank factors of 2-D tensors by SVD (SPEC §7), with the 0.2 tool's
//! keys and semantics: `phlora` writes `A = sqrt(S_r)·V_rᵀ` (r × n) to `target_a` and
//! `B = U_r·sqrt(S_r)` (m × r) to `target_b`, so `B @ A` is the best rank-r approximation, and
//! deletes the original unless `delete_original: false`; `phlora_` replaces W by `B @ A`.
//!
//! The rank is `rank`, or chosen per tensor by `energy` (share of Σσ² kept) or `threshold`
//! (smallest σ kept), at most `max_rank`. The SVD runs in f32 (f64 for F64 tensors) whatever the
//! stored dtype, exact or randomized ([`crate::linalg`]); factors are rounded once to the source
//! dtype, and `phlora_`'s product is computed in f32 chunk by chunk when written, from the factors
//! (the matrix is never held twice). Factorizations run one tensor at a time when the step
//! executes, so a step holds one matrix and its factors; each reports its rank, energy kept and
//! relative Frobenius error in the run report. The [`Factorizer`] (rank rule, method) is shared
//! with the LoRA transforms.

use std::collections::HashSet;
use std::sync::Arc;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use super::{count_noun, destinations, require_float, Context, Flow, Form, StepError, Transform, TransformError};
use super::{TransformSpec, Twin, Writes};
use crate::dtype::DType;
use crate::kernels::random::tensor_seed;
use crate::linalg::{self, LinalgError, Quality, RankRule, Real, Rows, Svd, PANEL_BYTES};
use crate::memory::{Element, Scratch};
use crate::plan::payload::{Field, FieldKind, Payload};
use crate::plan::{Location, PlanError};
use crate::references::{Reference, Target};
use crate::state::{Match, State};
use crate::value::{read_real_scratch, real_scratch, LazyOp, ReadContext, Tensor, ValueError};

/// One factorized tensor, as the run report lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Factorization {
    /// The transform (`phlora`, `extract_lora`).
    pub op: &'static str,
    /// The factorized tensor (`alias::name`; for `extract_lora` the module).
    pub tensor: String,
    /// Its shape `(m, n)`.
    pub shape: (usize, usize),
    /// `exact` or `randomized`.
    pub method: &'static str,
    /// What the kept rank keeps and loses.
    pub quality: Quality,
}

/// What the command line prints about `list`: one summary line (ranks, least energy kept,
/// largest relative error and where), and with `full` a row per tensor.
pub fn factorization_lines(list: &[Factorization], full: bool) -> Vec<String> {
    use super::columns::{cell, pad_left, pad_right, width};
    let Some(worst) = list
        .iter()
        .max_by(|a, b| a.quality.relative_error.total_cmp(&b.quality.relative_error))
    else {
        return Vec::new();
    };
    let ranks = list.iter().map(|f| f.quality.rank);
    let (low, high) = (ranks.clone().min().unwrap_or(0), ranks.max().unwrap_or(0));
    let least_energy = list.iter().map(|f| f.quality.energy).fold(1.0, f64::min);
    let rank = if low == high {
        format!("rank {low}")
    } else {
        format!("ranks {low}–{high}")
    };
    let mut lines = vec![format!(
        "factorized {}: {rank}, energy kept ≥ {:.2}%, relative error ≤ {:.4} (`{}`)",
        count_noun(list.len()),
        least_energy * 100.0,
        worst.quality.relative_error,
        cell(&worst.tensor)
    )];
    if full {
        let mut rows: Vec<[String; 6]> = vec![[
            "tensor".to_owned(),
            "shape".to_owned(),
            "method".to_owned(),
            "rank".to_owned(),
            "energy".to_owned(),
            "rel. error".to_owned(),
        ]];
        rows.extend(list.iter().map(|f| {
            [
                cell(&f.tensor),
                format!("{}×{}", f.shape.0, f.shape.1),
                f.method.to_owned(),
                f.quality.rank.to_string(),
                format!("{:.2}%", f.quality.energy * 100.0),
                format!("{:.4}", f.quality.relative_error),
            ]
        }));
        let w: Vec<usize> = (0..6).map(|c| width(rows.iter().map(|r| r[c].as_str()))).collect();
        for r in &rows {
            lines.push(format!(
                "  {}  {}  {}  {}  {}  {}",
                pad_right(&r[0], w[0]),
                pad_left(&r[1], w[1]),
                pad_right(&r[2], w[2]),
                pad_left(&r[3], w[3]),
                pad_left(&r[4], w[4]),
                pad_left(&r[5], w[5])
            ));
        }
    }
    lines
}

// ---- the rank rule and method, shared with the LoRA transforms ----

/// The `rank` key (a number here; `extract_lora` also takes a list).
pub(crate) const RANK: Field = Field::optional(
    "rank",
    FieldKind::Number,
    None,
    "rank r of the factors (one of rank, energy, threshold)",
);
/// The `energy` key.
pub(crate) const ENERGY: Field = Field::optional(
    "energy",
    FieldKind::Number,
    None,
    "keep the fewest terms whose share of Σσ² reaches this (0 < energy ≤ 1)",
);
/// The `threshold` key.
pub(crate) const THRESHOLD: Field = Field::optional(
    "threshold",
    FieldKind::Number,
    None,
    "keep the terms whose singular value is at least this",
);
/// The `max_rank` key.
pub(crate) const MAX_RANK: Field = Field::optional(
    "max_rank",
    FieldKind::Number,
    None,
    "most terms kept by energy or threshold",
);
/// The `method` key.
pub(crate) const METHOD: Field = Field::optional(
    "method",
    FieldKind::Text,
    Some("auto"),
    "exact, randomized, or auto (randomized when the rank is small against the matrix)",
);
/// The `oversample` key.
pub(crate) const OVERSAMPLE: Field = Field::optional(
    "oversample",
    FieldKind::Number,
    Some("10"),
    "randomized SVD: extra test vectors beyond the rank",
);
/// The `power_iterations` key.
pub(crate) const POWER_ITERATIONS: Field = Field::optional(
    "power_iterations",
    FieldKind::Number,
    Some("2"),
    "randomized SVD: power iterations (more for flat spectra)",
);
/// The `seed` key.
pub(crate) const SEED: Field = Field::optional(
    "seed",
    FieldKind::Number,
    Some("0"),
    "randomized SVD: seed, mixed with each tensor's name",
);

/// How the SVD is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// Randomized when the rank (or `max_rank`) is small against the matrix, else exact.
    Auto,
    /// Always the exact thin SVD.
    Exact,
    /// Always the randomized range finder.
    Randomized,
}

/// The smallest side from which `auto` considers the randomized SVD: below it, the exact SVD
/// takes milliseconds.
const RANDOMIZED_FROM: usize = 256;

/// A rank rule and how the SVD is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Factorizer {
    /// Which rank is kept.
    pub rule: RankRule,
    /// At most this many terms.
    pub max_rank: Option<usize>,
    /// Exact, randomized or auto.
    pub method: Method,
    /// The randomized SVD's settings (its seed is mixed with each tensor's name).
    pub settings: linalg::Randomized,
}

/// A positive whole number at `key`, if given.
fn positive(p: &Payload, key: &str) -> Result<Option<usize>, PlanError> {
    match p.count(key)? {
        Some(0) => Err(PlanError::invalid(&p.at(key), "must be at least 1")),
        other => Ok(other),
    }
}

impl Factorizer {
    /// Reads the rule and method keys; `rank` is read by the caller when it takes other forms
    /// (`fixed`: the rank, if the caller read it).
    pub fn parse(p: &Payload, fixed: Option<usize>) -> Result<Factorizer, PlanError> {
        let energy = p.number("energy")?;
        let threshold = p.number("threshold")?;
        let given: Vec<&str> = [
            ("rank", fixed.is_some()),
            ("energy", energy.is_some()),
            ("threshold", threshold.is_some()),
        ]
        .iter()
        .filter(|(_, present)| *present)
        .map(|(k, _)| *k)
        .collect();
        let rule = match (fixed, energy, threshold) {
            _ if given.len() > 1 => {
                return Err(PlanError::invalid(
                    p.location(),
                    format!("give one of rank, energy and threshold, not {}", given.join(" and ")),
                ))
            }
            (Some(r), _, _) => RankRule::Fixed(r),
            (_, Some(e), _) if e > 0.0 && e <= 1.0 => RankRule::Energy(e),
            (_, Some(_), _) => return Err(PlanError::invalid(&p.at("energy"), "must be above 0 and at most 1")),
            (_, _, Some(t)) if t.is_finite() && t >= 0.0 => RankRule::Threshold(t),
            (_, _, Some(_)) => return Err(PlanError::invalid(&p.at("threshold"), "must be a finite number ≥ 0")),
            _ => {
                return Err(PlanError::invalid(
                    p.location(),
                    "give one of rank, energy and threshold",
                ))
            }
        };
        let max_rank = positive(p, "max_rank")?;
        if max_rank.is_some() && matches!(rule, RankRule::Fixed(_)) {
            return Err(PlanError::invalid(
                &p.at("max_rank"),
                "max_rank bounds energy and threshold; with rank it has no effect",
            ));
        }
        let method = match p.text("method")? {
            None | Some("auto") => Method::Auto,
            Some("exact") => Method::Exact,
            Some("randomized") => Method::Randomized,
            Some(other) => {
                return Err(PlanError::invalid(
                    &p.at("method"),
                    format!("unknown method `{other}`; expected auto, exact or randomized"),
                ))
            }
        };
        if method == Method::Randomized && !matches!(rule, RankRule::Fixed(_)) && max_rank.is_none() {
            return Err(PlanError::invalid(
                &p.at("method"),
                "the randomized SVD needs a rank to aim for: give rank, or max_rank with energy or threshold",
            ));
        }
        let defaults = linalg::Randomized::default();
        // Each power iteration is two passes over the matrix; past a few dozen nothing changes.
        const MOST_ITERATIONS: usize = 64;
        let power_iterations = p.count("power_iterations")?.unwrap_or(defaults.power_iterations);
        if power_iterations > MOST_ITERATIONS {
            return Err(PlanError::invalid(
                &p.at("power_iterations"),
                format!("at most {MOST_ITERATIONS}"),
            ));
        }
        let settings = linalg::Randomized {
            oversample: p.count("oversample")?.unwrap_or(defaults.oversample),
            power_iterations,
            seed: p.count("seed")?.map_or(defaults.seed, |s| s as u64),
        };
        Ok(Factorizer {
            rule,
            max_rank,
            method,
            settings,
        })
    }

    /// The rank aimed for (the fixed rank, or `max_rank`), if there is one.
    fn target(&self) -> Option<usize> {
        match self.rule {
            RankRule::Fixed(r) => Some(r),
            _ => self.max_rank,
        }
    }

    /// The rank an `m × n` matrix gets when it is known before its values are (a fixed rank),
    /// else the most it can get.
    pub fn rank_bound(&self, m: usize, n: usize) -> usize {
        self.target().unwrap_or(usize::MAX).min(m.min(n))
    }

    /// An upper bound of the bytes factorizing one `m × n` matrix of `width`-byte reals holds in
    /// memory at once. The exact SVD: the matrix twice (it works on a copy) and the singular
    /// vectors. The randomized SVD: its sketches, residual blocks, and the panel of the matrix a
    /// pass is at (the matrix itself is a buffer of the budget, or in the arena when the budget
    /// cannot hold it).
    pub fn workspace(&self, m: usize, n: usize, width: usize) -> usize {
        let p = m.min(n);
        let matrix = m.saturating_mul(n);
        let elements = if self.randomized_for(m, n) {
            let k = self.rank_bound(m, n).saturating_add(self.settings.oversample).min(p);
            let panel = matrix.min(n.saturating_mul((PANEL_BYTES / width / n.max(1)).max(64)));
            m.saturating_add(n)
                .saturating_mul(k)
                .saturating_mul(3)
                .saturating_add(n.saturating_mul(128))
                .saturating_add(panel)
        } else {
            matrix
                .saturating_mul(2)
                .saturating_add(m.saturating_add(n).saturating_mul(p))
        };
        elements.saturating_mul(width)
    }

    /// Bytes the second part of a randomized SVD's products packs beside [`Factorizer::workspace`]
    /// when it runs on several threads (at most the matrix); 0 for the exact SVD.
    pub fn second_part(&self, m: usize, n: usize, width: usize) -> usize {
        if self.randomized_for(m, n) {
            packing_bytes().min(m.saturating_mul(n).saturating_mul(width))
        } else {
            0
        }
    }

    /// Bytes of the `m × n` matrix the randomized SVD holds beside its workspace (in the
    /// budget, or the arena beyond it); 0 for the exact SVD, whose workspace counts it.
    pub fn held(&self, m: usize, n: usize, width: usize) -> usize {
        if self.randomized_for(m, n) {
            m.saturating_mul(n).saturating_mul(width)
        } else {
            0
        }
    }

    /// Whether the randomized SVD is used for an `m × n` matrix.
    fn randomized_for(&self, m: usize, n: usize) -> bool {
        let p = m.min(n);
        match (self.method, self.target()) {
            (Method::Exact, _) | (_, None) => false,
            (Method::Randomized, Some(_)) => true,
            (Method::Auto, Some(r)) => {
                p >= RANDOMIZED_FROM && r.saturating_add(self.settings.oversample).saturating_mul(4) <= p
            }
        }
    }

    /// Factorizes the row-major `m × n` matrix `a` (named `name`, which seeds the randomized
    /// SVD's test matrix) on `pool`, keeping the rank the rule picks.
    pub fn factor<T: Real>(
        &self,
        a: Rows<'_, T>,
        name: &str,
        pool: &rayon::ThreadPool,
    ) -> Result<(Svd<T>, Quality, &'static str), LinalgError> {
        let (m, n) = a.shape();
        let total = pool.install(|| linalg::frobenius_sq(a))?;
        let randomized = self.randomized_for(m, n);
        let mut svd = pool.install(|| match (randomized, self.target()) {
            (true, Some(target)) => {
                let settings = linalg::Randomized {
                    seed: tensor_seed(self.settings.seed, name),
                    ..self.settings
                };
                linalg::randomized(a, target.min(m.min(n)), settings)
            }
            _ => linalg::exact(a.all(), m, n),
        })?;
        let rank = linalg::choose_rank(&svd.s, total, self.rule, self.max_rank);
        let quality = pool.install(|| linalg::quality(a, &svd, rank, total))?;
        svd.truncate(rank);
        Ok((svd, quality, if randomized { "randomized" } else { "exact" }))
    }
}

/// The matrix a factorization works on: read (converted) into the run's budget or arena, or,
/// for a tensor stored contiguously in its file in the work type already (an F32 matrix factored
/// in f32) whose bytes the budget holds, a populated read-only map of them, counted against the
/// budget: no copy and no fresh pages to fault in.
enum MatrixValues {
    Read(Scratch),
    Mapped(
        crate::formats::mapped::GuardedMap,
        #[allow(dead_code)] crate::memory::Reservation,
    ),
}

impl MatrixValues {
    fn of<T: Real + Element>(t: &Tensor, op: &'static str, cx: &mut ReadContext) -> Result<MatrixValues, ValueError> {
        // Little-endian targets only: the file's bytes are the values as they are.
        if t.dtype == T::DTYPE && t.nbytes() > 0 && cfg!(target_endian = "little") {
            if let Some((file, offset)) = t.as_stored() {
                let len = t.nbytes();
                if let Some(reservation) = cx.memory().reserve(len) {
                    if let Ok(map) = file.map_range(offset, len, true) {
                        if map.as_ptr().cast::<T>().is_aligned() {
                            cx.count_read(len);
                            return Ok(MatrixValues::Mapped(map, reservation));
                        }
                    }
                }
            }
        }
        Ok(MatrixValues::Read(read_real_scratch::<T>(t, op, cx)?))
    }

    fn typed<T: Element>(&self) -> &[T] {
        match self {
            MatrixValues::Read(scratch) => scratch.typed::<T>(),
            MatrixValues::Mapped(map, _) => {
                // SAFETY: the map is aligned for `T` (checked when made) and holds whole `T`s
                // of plain numbers (every bit pattern a value), little-endian as the file's.
                unsafe { std::slice::from_raw_parts(map.as_ptr().cast::<T>(), map.len() / std::mem::size_of::<T>()) }
            }
        }
    }

    /// Hands back the pages of bytes `[start, start + len)` (the arena's; the budget's and a
    /// map's stay until dropped).
    fn settle_range(&self, start: usize, len: usize) {
        if let MatrixValues::Read(scratch) = self {
            scratch.settle_range(start, len);
        }
    }

    /// Drops the matrix; an error when a mapped file shrank while it was read.
    fn finish(self) -> Result<(), ValueError> {
        match self {
            MatrixValues::Read(_) => Ok(()),
            MatrixValues::Mapped(map, _) => Ok(map.check()?),
        }
    }
}

/// A thread pool for the factorizations of one step: `threads` (0: one per core).
pub(crate) fn factor_pool(threads: usize) -> Result<rayon::ThreadPool, TransformError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| {
            TransformError::Value(ValueError::Compute {
                op: "factorization",
                reason: format!("cannot start its threads: {e}"),
            })
        })
}

/// How many matrices a step factors at once: one per thread, as far as the largest of the
/// matrices' `sizes` (bytes each holds while factored) of that many fit `budget` together
/// (else fewer, down to one). Reading and converting a matrix is one thread's work, so whole
/// matrices per thread beat splitting each one's passes (`extract_lora` of the 0.94 GiB BF16
/// pair of the benchmark: 4.2 s → 2.5 s on 2 cores).
pub(crate) fn workers(threads: usize, sizes: &[usize], budget: u64) -> usize {
    let mut largest = sizes.to_vec();
    largest.sort_unstable_by(|a, b| b.cmp(a));
    let budget = usize::try_from(budget).unwrap_or(usize::MAX);
    let together = |n: usize| largest.iter().take(n).fold(0usize, |sum, &b| sum.saturating_add(b));
    let mut workers = threads.min(sizes.len()).max(1);
    while workers > 1 && together(workers) > budget {
        workers -= 1;
    }
    workers
}

/// The sum of the `workers` largest of `sizes`: what factoring that many at once holds.
pub(crate) fn largest_together(sizes: &[usize], workers: usize) -> usize {
    let mut largest = sizes.to_vec();
    largest.sort_unstable_by(|a, b| b.cmp(a));
    largest
        .iter()
        .take(workers)
        .fold(0usize, |sum, &b| sum.saturating_add(b))
}

/// Records the workspace `workers` factorizations at once hold (the largest of `workspaces`
/// together), named after the largest one (`name_of` its index), when there are several.
pub(crate) fn need_workspaces_at_once(
    ctx: &mut Context,
    workspaces: &[usize],
    workers: usize,
    name_of: impl Fn(usize) -> String,
) {
    if workers < 2 {
        return;
    }
    let largest = workspaces
        .iter()
        .enumerate()
        .max_by_key(|&(i, &b)| (b, std::cmp::Reverse(i)))
        .map_or(0, |(i, _)| i);
    ctx.need_workspace(
        largest_together(workspaces, workers),
        &format!("{} and {} more at once", name_of(largest), workers - 1),
    );
}

/// Counts, for the estimate, what one factorization run on a pool of several threads holds
/// beside its workspace and matrix: its products' second part packs operand blocks of its own
/// (`second_part(i)`, see [`Factorizer::second_part`]). Not part of the workspace the run
/// reserves and the check refuses by (the packing is faer's, outside the budget and the arena,
/// and depends on the CPU), and not capped by the budget like the matrix.
pub(crate) fn need_second_part(ctx: &mut Context, count: usize, workers: usize, second_part: impl Fn(usize) -> usize) {
    if workers < 2 && ctx.threads != 1 {
        let most = (0..count).map(second_part).max().unwrap_or(0);
        ctx.unbudgeted = ctx.unbudgeted.max(most);
    }
}

/// What one matrix product packs its operand blocks into while it runs: faer sizes them by the
/// last-level cache, about half of it (measured: the second part of a rank-64 randomized SVD of
/// 2048×8192 F32 added 16 MiB of peak RSS on a CPU with 32 MiB of L3). Read from Linux's cache
/// description; 16 MiB where there is none.
fn packing_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        let size = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size").ok();
        let l3 = size.and_then(|text| {
            let text = text.trim();
            let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
            let n: usize = digits.parse().ok()?;
            Some(match unit {
                "K" => n << 10,
                "M" => n << 20,
                _ => n,
            })
        });
        l3.map_or(16 << 20, |l3| l3 / 2)
    })
}

/// `factor(item, pool, reads)` for every item, results in the items' order, on `workers`
/// threads: each takes the next item and works on it with a pool of its own thread, so no more
/// than `workers` items are in hand at once (rayon would start another item in a thread
/// waiting on a join). An item's factors must not depend on the pool ([`crate::linalg`] splits
/// work by shape). On failure, the error of the first failed item in order, as one thread
/// would report it: items are taken in order and each one taken is finished.
pub(crate) fn in_parallel<I: Sync, R: Send>(
    items: &[I],
    workers: usize,
    reads: &ReadContext,
    factor: impl Fn(&I, &rayon::ThreadPool, &mut ReadContext) -> Result<R, StepError> + Sync,
) -> Result<Vec<R>, StepError> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    type Done<R> = (usize, Result<R, StepError>);
    /// Stops the other workers when its worker ends early: an error, or a panic unwinding.
    struct StopOthers<'a>(&'a AtomicBool, bool);
    impl Drop for StopOthers<'_> {
        fn drop(&mut self) {
            if !self.1 {
                self.0.store(true, Ordering::Relaxed);
            }
        }
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let factor = &factor;
    let (setup, mut done, panic) = std::thread::scope(|scope| {
        let mut setup: Option<StepError> = None;
        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers {
            let mut reads = reads.fork();
            let (next, failed) = (&next, &failed);
            // The engine's stack: reading a lazy tensor recurses once per operation stacked
            // on it (`ENGINE_STACK_BYTES`), and the workers read their matrices.
            let spawned = std::thread::Builder::new()
                .stack_size(crate::value::ENGINE_STACK_BYTES)
                .spawn_scoped(scope, move || -> Result<Vec<Done<R>>, StepError> {
                    let mut guard = StopOthers(failed, false);
                    let pool = factor_pool(1)?;
                    let mut done = Vec::new();
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        let result = reads
                            .check()
                            .map_err(|_| StepError::Cancelled)
                            .and_then(|()| factor(item, &pool, &mut reads));
                        if result.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        done.push((i, result));
                    }
                    guard.1 = true;
                    Ok(done)
                });
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    setup.get_or_insert(StepError::from(TransformError::Value(ValueError::Compute {
                        op: "factorization",
                        reason: format!("cannot start its threads: {e}"),
                    })));
                    break;
                }
            }
        }
        let (mut all, mut panic) = (Vec::with_capacity(items.len()), None);
        for handle in handles {
            match handle.join() {
                Ok(Ok(done)) => all.extend(done),
                Ok(Err(e)) => {
                    setup.get_or_insert(e);
                }
                Err(p) => panic = Some(p),
            }
        }
        (setup, all, panic)
    });
    if let Some(panic) = panic {
        std::panic::resume_unwind(panic);
    }
    // A worker that could not start fails the step before any module's own error.
    if let Some(e) = setup {
        return Err(e);
    }
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, result)| result).collect()
}

/// The matrix `(m, n)` of a match, or the error for a tensor that is not 2-D.
pub(crate) fn matrix_shape(m: &Match, op: &'static str) -> Result<(usize, usize), TransformError> {
    match m.tensor.shape[..] {
        [rows, cols] => Ok((rows, cols)),
        _ => Err(TransformError::NotMatrix {
            op,
            tensor: m.display(),
            shape: m.tensor.shape.clone(),
        }),
    }
}

/// The factors `B = U·sqrt(S)` (m × r) and `A = sqrt(S)·Vᵀ` (r × n), row-major.
pub(crate) fn split_factors<T: Real>(svd: &Svd<T>) -> (Vec<T>, Vec<T>) {
    let (m, n, r) = (svd.m, svd.n, svd.k());
    let roots: Vec<T> = svd.s.iter().map(|&s| T::of(s.wide().sqrt())).collect();
    let mut b = Vec::with_capacity(m * r);
    for i in 0..m {
        b.extend((0..r).map(|t| svd.u[t * m + i] * roots[t]));
    }
    let mut a = Vec::with_capacity(r * n);
    for (t, &root) in roots.iter().enumerate() {
        a.extend(svd.v[t * n..(t + 1) * n].iter().map(|&x| x * root));
    }
    (b, a)
}

/// A tensor the plan check cannot compute (factors whose values need the SVD): its shape and
/// dtype are right, reading it is an error. A check never reads values; a run never builds it.
/// It counts the bytes the run will keep for it in memory.
#[derive(Debug)]
pub(crate) struct Deferred(pub &'static str, pub usize);

impl LazyOp for Deferred {
    fn name(&self) -> &'static str {
        self.0
    }

    fn materialized(&self, _: &mut HashSet<usize>) -> usize {
        self.1
    }

    fn read(&self, _: DType, _: &[usize], _: usize, _: &mut [u8], _: &mut ReadContext) -> Result<(), ValueError> {
        Err(ValueError::Compute {
            op: self.0,
            reason: "its values are computed only when the plan runs".into(),
        })
    }
}

/// Reused blocks of reals for lazy operations that compute whole rows per read: a fresh
/// multi-megabyte vector per 1 MiB chunk went back to the kernel on every free (glibc maps large
/// blocks), and `merge_lora` spent six times its user time zeroing pages. The spare block is kept
/// per thread (one per element type), so what is kept is bounded by the writing threads, not by
/// the number of tensors computed.
pub(crate) trait Pooled: Copy + Default + 'static {
    /// Runs `f` with this thread's spare block.
    fn with_spare<R>(f: impl FnOnce(&mut Vec<Self>) -> R) -> R;

    /// A block of `len` elements (values unspecified): this thread's spare one when there is,
    /// else allocated fallibly.
    fn take(op: &'static str, len: usize) -> Result<Vec<Self>, ValueError> {
        let mut block = Self::with_spare(std::mem::take);
        if block.capacity() < len {
            block.clear();
            block.try_reserve_exact(len).map_err(|_| ValueError::OutOfMemory {
                op,
                bytes: len.saturating_mul(std::mem::size_of::<Self>()),
            })?;
        }
        block.resize(len, Self::default());
        Ok(block)
    }

    /// Keeps `block` as this thread's spare (the larger of it and the one kept).
    fn give(block: Vec<Self>) {
        Self::with_spare(|spare| {
            if block.capacity() > spare.capacity() {
                *spare = block;
            }
        });
    }
}

thread_local! {
    static SPARE_F32: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static SPARE_F64: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Pooled for f32 {
    fn with_spare<R>(f: impl FnOnce(&mut Vec<Self>) -> R) -> R {
        SPARE_F32.with(|spare| f(&mut spare.borrow_mut()))
    }
}

impl Pooled for f64 {
    fn with_spare<R>(f: impl FnOnce(&mut Vec<Self>) -> R) -> R {
        SPARE_F64.with(|spare| f(&mut spare.borrow_mut()))
    }
}

/// Writes `values` into `out` in `dtype` (rounded once), through `scratch` bytes.
pub(crate) fn encode_into<T: Real>(values: &[T], dtype: DType, scratch: &mut Vec<u8>, out: &mut [u8]) {
    let width = std::mem::size_of::<T>();
    scratch.resize(std::mem::size_of_val(values), 0);
    for (x, w) in values.iter().zip(scratch.chunks_exact_mut(width)) {
        x.put_le(w);
    }
    crate::kernels::convert(T::DTYPE, scratch, dtype, out);
}

/// `B @ A` from row-major factors kept in `T`, computed for the rows a read covers and rounded
/// once to the tensor's dtype: the rank-r reconstruction streams like any other value.
#[derive(Debug)]
pub(crate) struct LowRankOp<T> {
    /// `m × r`, in `T`, from the run's memory budget (or its arena).
    b: Scratch,
    /// `r × n`, likewise.
    a: Scratch,
    /// `(m, r, n)`.
    dims: (usize, usize, usize),
    work: std::marker::PhantomData<T>,
}

impl<T: Real + Element> LowRankOp<T> {
    /// The product of `b` (`m × r`) and `a` (`r × n`), copied into buffers of the run's budget.
    pub(crate) fn new(b: &[T], a: &[T], dims: (usize, usize, usize), cx: &ReadContext) -> Result<Self, ValueError> {
        let copy = |values: &[T]| -> Result<Scratch, ValueError> {
            let mut buf = cx.alloc("low-rank product", std::mem::size_of_val(values))?;
            buf.typed_mut::<T>().copy_from_slice(values);
            buf.settle();
            Ok(buf)
        };
        Ok(LowRankOp {
            b: copy(b)?,
            a: copy(a)?,
            dims,
            work: std::marker::PhantomData,
        })
    }
}

impl<T: Real + Pooled + Element + std::fmt::Debug> LazyOp for LowRankOp<T> {
    fn name(&self) -> &'static str {
        "low-rank product"
    }

    fn materialized(&self, _: &mut HashSet<usize>) -> usize {
        self.a.len() + self.b.len()
    }

    fn read(
        &self,
        dtype: DType,
        _: &[usize],
        start: usize,
        out: &mut [u8],
        cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        let (m, r, n) = self.dims;
        let size = dtype.size().ok_or(ValueError::NoByteSize { op: self.name(), dtype })?;
        let count = out.len() / size;
        if count == 0 || n == 0 {
            return Ok(());
        }
        if !dtype.is_computable() {
            return Err(ValueError::NoByteSize { op: self.name(), dtype });
        }
        let (first, last) = (start / n, (start + count).div_ceil(n).min(m));
        let rows = last - first;
        let mut block = T::take(self.name(), rows * n)?;
        matmul(
            MatMut::from_row_major_slice_mut(&mut block, rows, n),
            Accum::Replace,
            MatRef::from_row_major_slice(&self.b.typed::<T>()[first * r..last * r], rows, r),
            MatRef::from_row_major_slice(self.a.typed::<T>(), r, n),
            T::of(1.0),
            Par::Seq,
        );
        let from = start - first * n;
        let mut scratch = cx.take(0);
        encode_into(&block[from..from + count], dtype, &mut scratch, out);
        cx.give(scratch);
        T::give(block);
        Ok(())
    }
}

// ---- phlora / phlora_ ----

const TWIN: Twin = Twin {
    new: ("phlora", "low-rank factors A and B of 2-D tensors by SVD (B @ A ≈ W)"),
    in_place: ("phlora_", "replace 2-D tensors by their best rank-r approximation"),
    fields: &[
        Field::required(
            "target",
            FieldKind::Reference,
            "2-D floating tensors to factorize (no slice)",
        ),
        Field::required(
            "target_a",
            FieldKind::Target,
            "destination of A = sqrt(S_r)·V_rᵀ (r × n), rewritten from target",
        )
        .new_only(),
        Field::required(
            "target_b",
            FieldKind::Target,
            "destination of B = U_r·sqrt(S_r) (m × r), rewritten from target",
        )
        .new_only(),
        RANK,
        ENERGY,
        THRESHOLD,
        MAX_RANK,
        METHOD,
        OVERSAMPLE,
        POWER_ITERATIONS,
        SEED,
        Field::optional(
            "delete_original",
            FieldKind::Bool,
            Some("true"),
            "delete the factorized tensor",
        )
        .new_only(),
        Field::optional(
            "require_missing_dest",
            FieldKind::Bool,
            Some("true"),
            "refuse destinations that exist (false: overwrite them)",
        )
        .new_only(),
    ],
    parse: |value, cx| {
        let p = cx.payload(value)?;
        let target = p.reference("target")?;
        if target.slice.is_some() {
            return Err(PlanError::invalid(
                &p.at("target"),
                "phlora factors whole tensors: remove the slice",
            ));
        }
        let factorizer = Factorizer::parse(&p, positive(&p, "rank")?)?;
        let outputs = match cx.spec.form {
            Form::InPlace => None,
            _ => {
                let (a, b) = (p.target("target_a")?, p.target("target_b")?);
                for (key, t) in [("target_a", &a), ("target_b", &b)] {
                    if t.slice.is_some() {
                        return Err(PlanError::invalid(
                            &p.at(key),
                            "phlora writes whole tensors: remove the slice",
                        ));
                    }
                }
                Some(Outputs {
                    a,
                    b,
                    delete_original: p.flag("delete_original", true)?,
                    overwrite: !p.flag("require_missing_dest", true)?,
                })
            }
        };
        Ok(Box::new(Phlora {
            target,
            outputs,
            factorizer,
            location: cx.location.clone(),
        }))
    },
};

/// `phlora`.
pub const PHLORA: TransformSpec = TWIN.spec(Form::New);
/// `phlora_`.
pub const PHLORA_: TransformSpec = TWIN.spec(Form::InPlace);

#[derive(Debug)]
struct Outputs {
    a: Target,
    b: Target,
    delete_original: bool,
    overwrite: bool,
}

#[derive(Debug)]
struct Phlora {
    target: Reference,
    /// `None` for `phlora_`.
    outputs: Option<Outputs>,
    factorizer: Factorizer,
    location: Location,
}

/// What factoring one matrix gives: for `phlora` the factors in its dtype, for `phlora_` its
/// reconstruction (computed from f32 (f64) factors when written).
enum Factored {
    Factors { a: Tensor, b: Tensor },
    Product(Tensor),
}

impl Phlora {
    fn op(&self) -> &'static str {
        if self.outputs.is_some() {
            "phlora"
        } else {
            "phlora_"
        }
    }

    /// Factorizes one matrix in `T`.
    fn factored<T: Real + Pooled + Element + std::fmt::Debug>(
        &self,
        m: &Match,
        (rows, cols): (usize, usize),
        pool: &rayon::ThreadPool,
        reads: &mut ReadContext,
    ) -> Result<(Factored, Factorization), StepError> {
        let display = m.display();
        // Within the run's memory budget, else in its arena, whose pages each pass of the
        // randomized SVD hands back panel by panel; or mapped where it lies.
        let values =
            MatrixValues::of::<T>(&m.tensor, self.op(), reads).map_err(|e| TransformError::value_of(&display, e))?;
        let width = std::mem::size_of::<T>();
        let release = |start: usize, end: usize| values.settle_range(start * width, (end - start) * width);
        let matrix = Rows::new(values.typed::<T>(), rows, cols).releasing(&release);
        let factored = self.factorizer.factor(matrix, &m.name, pool);
        // A mapped file that shrank meanwhile read as zeros: what was computed must not be used
        // (and that, not what the zeros made of the factorization, is the error to report).
        values.finish().map_err(|e| TransformError::value_of(&display, e))?;
        let (svd, quality, method) = factored.map_err(|source| TransformError::Factorization {
            tensor: display.clone(),
            source,
        })?;
        let rank = quality.rank;
        let (b, a) = split_factors(&svd);
        drop(svd);
        let dtype = m.tensor.dtype;
        // Within the run's memory budget, else in its arena.
        let factored = if self.outputs.is_some() {
            let bytes =
                |v: &[T]| real_scratch(v, dtype, self.op(), reads).map_err(|e| TransformError::value_of(&display, e));
            Factored::Factors {
                a: Tensor::in_memory(dtype, vec![rank, cols], Arc::new(bytes(&a)?)),
                b: Tensor::in_memory(dtype, vec![rows, rank], Arc::new(bytes(&b)?)),
            }
        } else {
            let op =
                LowRankOp::new(&b, &a, (rows, rank, cols), reads).map_err(|e| TransformError::value_of(&display, e))?;
            Factored::Product(
                Tensor::op(dtype, vec![rows, cols], Arc::new(op)).map_err(|e| TransformError::value_of(&display, e))?,
            )
        };
        let factorization = Factorization {
            op: self.op(),
            tensor: display,
            shape: (rows, cols),
            method,
            quality,
        };
        Ok((factored, factorization))
    }

    /// [`Phlora::factored`] in the work type of the match's dtype.
    fn factor_match(
        &self,
        m: &Match,
        shape: (usize, usize),
        pool: &rayon::ThreadPool,
        reads: &mut ReadContext,
    ) -> Result<(Factored, Factorization), StepError> {
        if m.tensor.dtype == DType::F64 {
            self.factored::<f64>(m, shape, pool, reads)
        } else {
            self.factored::<f32>(m, shape, pool, reads)
        }
    }

    /// Placeholders of the right shapes for the plan check, where no value is read.
    fn deferred(&self, m: &Match, (rows, cols): (usize, usize)) -> Result<Factored, StepError> {
        let rank = self.factorizer.rank_bound(rows, cols);
        let dtype = m.tensor.dtype;
        let size = dtype.size().unwrap_or(4);
        let factors = rows.saturating_add(cols).saturating_mul(rank);
        let tensor = |shape: Vec<usize>, bytes: usize| {
            Tensor::op(dtype, shape, Arc::new(Deferred(self.op(), bytes)))
                .map_err(|e| TransformError::value_of(&m.display(), e))
        };
        Ok(if self.outputs.is_some() {
            Factored::Factors {
                a: tensor(vec![rank, cols], rank.saturating_mul(cols).saturating_mul(size))?,
                b: tensor(vec![rows, rank], rows.saturating_mul(rank).saturating_mul(size))?,
            }
        } else {
            // `phlora_` keeps the factors in f32 (f64) to compute the product when written.
            Factored::Product(tensor(vec![rows, cols], factors.saturating_mul(size.max(4)))?)
        })
    }
}

impl Transform for Phlora {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let op = self.op();
        let matches = state.select_some(&self.target, &self.location)?;
        let mut shapes = Vec::with_capacity(matches.len());
        // What factoring each match holds: its workspace, and its matrix beside it.
        let mut sizes = Vec::with_capacity(matches.len());
        for m in &matches {
            require_float(m, op)?;
            let (rows, cols) = matrix_shape(m, op)?;
            if let RankRule::Fixed(r) = self.factorizer.rule {
                if r > rows.min(cols) {
                    // The 0.2 tool clamps the rank to min(m, n); plans written for it rely on it.
                    ctx.notices.push(format!(
                        "{op}: rank {r} is more than `{}` {rows}×{cols} has; using {}",
                        m.display(),
                        rows.min(cols)
                    ));
                }
            }
            shapes.push((rows, cols));
            let width = if m.tensor.dtype == DType::F64 { 8 } else { 4 };
            let (workspace, held) = (
                self.factorizer.workspace(rows, cols, width),
                self.factorizer.held(rows, cols, width),
            );
            ctx.need_workspace(workspace, &m.display());
            ctx.held = ctx.held.max(held);
            sizes.push((workspace, held));
        }
        let budget = ctx.reads.memory().limit();
        let whole: Vec<usize> = sizes.iter().map(|&(w, h)| w.saturating_add(h)).collect();
        let workers = workers(ctx.threads, &whole, budget);
        // That many matrices and workspaces at once.
        let (workspaces, helds): (Vec<usize>, Vec<usize>) = sizes.iter().copied().unzip();
        need_workspaces_at_once(ctx, &workspaces, workers, |i| matches[i].display());
        let width = |i: usize| if matches[i].tensor.dtype == DType::F64 { 8 } else { 4 };
        let second = |i: usize| self.factorizer.second_part(shapes[i].0, shapes[i].1, width(i));
        need_second_part(ctx, matches.len(), workers, second);
        if workers > 1 {
            ctx.held = ctx.held.max(largest_together(&helds, workers));
        }
        let writes = |overwrite: bool| if overwrite { Writes::Either } else { Writes::New };
        let targets = match &self.outputs {
            Some(o) => {
                let a = destinations(state, &matches, &o.a, writes(o.overwrite), op, &self.location)?;
                let b = destinations(state, &matches, &o.b, writes(o.overwrite), op, &self.location)?;
                // Every factor of the step has its own destination, across matches too.
                let mut seen: std::collections::HashMap<(&str, &str), String> = std::collections::HashMap::new();
                for (m, (a, b)) in matches.iter().zip(a.iter().zip(&b)) {
                    for (d, key) in [(a, "target_a"), (b, "target_b")] {
                        let here = format!("{} ({key})", m.display());
                        if let Some(first) = seen.insert((&d.alias, &d.name), here.clone()) {
                            return Err(TransformError::Collision {
                                destination: d.display.clone(),
                                first,
                                second: here,
                            }
                            .into());
                        }
                    }
                }
                Some((a, b))
            }
            None => None,
        };
        // Each match is read whole to be factored (in the check: will be).
        ctx.log_reads(matches.iter().map(|m| &m.tensor));
        let mut results = Vec::with_capacity(matches.len());
        if !ctx.evaluate {
            for (m, &shape) in matches.iter().zip(&shapes) {
                results.push(self.deferred(m, shape)?);
            }
        } else if workers > 1 {
            let items: Vec<(&Match, (usize, usize))> = matches.iter().zip(shapes.iter().copied()).collect();
            let each = |&(m, shape): &(&Match, (usize, usize)), pool: &rayon::ThreadPool, reads: &mut ReadContext| {
                self.factor_match(m, shape, pool, reads)
            };
            for (factored, factorization) in in_parallel(&items, workers, &ctx.reads, each)? {
                results.push(factored);
                ctx.factorizations.push(factorization);
            }
        } else {
            let pool = factor_pool(ctx.threads)?;
            for (m, &shape) in matches.iter().zip(&shapes) {
                if ctx.cancelled() {
                    return Err(StepError::Cancelled);
                }
                let (factored, factorization) = self.factor_match(m, shape, &pool, &mut ctx.reads)?;
                results.push(factored);
                ctx.factorizations.push(factorization);
            }
        }
        match (&targets, &self.outputs) {
            (Some((a, b)), Some(o)) => {
                // Originals go first, so one that is another match's destination (with
                // require_missing_dest: false) never removes a factor written by this step.
                if o.delete_original {
                    for m in &matches {
                        state.remove(&m.alias, &m.name);
                    }
                }
                for ((a, b), factored) in a.iter().zip(b).zip(results) {
                    if let Factored::Factors { a: fa, b: fb } = factored {
                        state.insert(&a.alias, &a.name, fa);
                        state.insert(&b.alias, &b.name, fb);
                    }
                }
            }
            _ => {
                for (m, factored) in matches.iter().zip(results) {
                    if let Factored::Product(product) = factored {
                        state.replace(&m.alias, &m.name, product);
                    }
                }
            }
        }
        let how = match self.factorizer.rule {
            RankRule::Fixed(r) => format!("rank {r}"),
            RankRule::Energy(e) => format!("energy {e}"),
            RankRule::Threshold(t) => format!("σ ≥ {t}"),
        };
        let pending = if ctx.evaluate {
            ""
        } else {
            " (ranks by energy or threshold are known when the plan runs)"
        };
        let pending = if matches!(self.factorizer.rule, RankRule::Fixed(_)) {
            ""
        } else {
            pending
        };
        ctx.note(format!(
            "{op}: {} factorized, {how}{pending}",
            count_noun(matches.len())
        ));
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_stored_matrix_is_mapped_when_aligned_and_read_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        let values = [1.5f32, -2.0, 3.25, 0.5];
        let mut bytes = vec![0u8; 4];
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        bytes.push(0);
        std::fs::write(&path, &bytes).unwrap();
        let file = Arc::new(crate::formats::SourceFile::open(&path).unwrap());
        let mut cx = ReadContext::default();
        for (offset, mapped) in [(4u64, true), (1, false)] {
            let t = Tensor::stored(DType::F32, vec![2, 2], file.clone(), offset);
            let before = cx.bytes_read();
            let m = MatrixValues::of::<f32>(&t, "phlora", &mut cx).unwrap();
            assert_eq!(matches!(m, MatrixValues::Mapped(..)), mapped, "offset {offset}");
            assert_eq!(cx.bytes_read() - before, 16, "offset {offset}");
            if mapped {
                assert_eq!(m.typed::<f32>(), &values);
            } else {
                // The unaligned bytes at offset 1, read and converted as they are.
                let want: Vec<f32> = bytes[1..17]
                    .chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                assert_eq!(m.typed::<f32>(), &want[..]);
            }
            m.finish().unwrap();
        }
        // Another dtype than the work type is read (converted).
        let t = Tensor::stored(DType::F32, vec![2, 2], file.clone(), 4);
        let m = MatrixValues::of::<f64>(&t, "phlora", &mut cx).unwrap();
        assert!(matches!(m, MatrixValues::Read(_)));
        assert_eq!(m.typed::<f64>(), &[1.5, -2.0, 3.25, 0.5]);
    }

    use super::*;
    use crate::kernels::random;

    #[test]
    fn factors_multiply_back_to_the_truncation() {
        let (m, n) = (9, 6);
        let a: Vec<f64> = (0..m * n).map(|i| random::normal(1, i as u64)).collect();
        let svd = linalg::exact(&a, m, n).unwrap();
        let mut trunc = svd.clone();
        trunc.truncate(3);
        let (b, af) = split_factors(&trunc);
        let op = LowRankOp::new(&b, &af, (m, 3, n), &ReadContext::default()).unwrap();
        let mut out = vec![0u8; m * n * 8];
        // Reads that start and end inside rows.
        let mut cx = ReadContext::default();
        for (start, len) in [(0, m * n), (5, 13), (17, 1)] {
            op.read(DType::F64, &[m, n], start, &mut out[..len * 8], &mut cx)
                .unwrap();
            for k in 0..len {
                let (i, j) = ((start + k) / n, (start + k) % n);
                let want: f64 = (0..3)
                    .map(|t| trunc.u[t * m + i] * trunc.s[t] * trunc.v[t * n + j])
                    .sum();
                let got = f64::from_le_bytes(out[k * 8..k * 8 + 8].try_into().unwrap());
                assert!((got - want).abs() < 1e-12, "{start}+{k}: {got} {want}");
            }
        }
    }

    #[test]
    fn auto_picks_randomized_only_for_small_ranks_of_large_matrices() {
        let f = |rule, max_rank| Factorizer {
            rule,
            max_rank,
            method: Method::Auto,
            settings: linalg::Randomized::default(),
        };
        assert!(f(RankRule::Fixed(64), None).randomized_for(4096, 14336));
        assert!(!f(RankRule::Fixed(64), None).randomized_for(256, 4096));
        assert!(!f(RankRule::Fixed(8), None).randomized_for(100, 100));
        assert!(!f(RankRule::Energy(0.9), None).randomized_for(4096, 4096));
        assert!(f(RankRule::Energy(0.9), Some(32)).randomized_for(4096, 4096));
        assert_eq!(f(RankRule::Fixed(64), None).rank_bound(10, 50), 10);
        assert_eq!(f(RankRule::Energy(0.9), None).rank_bound(10, 50), 10);
    }
}

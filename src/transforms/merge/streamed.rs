//! Merges computed chunk by chunk, never holding a tensor whole (issue 13 item 5): `linear` and
//! the task-arithmetic family except DELLA. Each merged element depends on the same element of
//! every input and on a few figures of the whole tensor — which entries magnitude pruning keeps
//! (TIES, breadcrumbs) and the L1 norms that rescaling restores (DARE) — so those figures are
//! found first, by passes over the inputs' chunks ([`Figures`]), and each chunk the writer asks
//! for is then computed from the same chunk of every input, in parallel with the others.
//!
//! Each element is computed in the work type (f32, or f64 when every input is F64), the sums in
//! model order, and the L1 norms of rescaling in f64 in element order, so the result does not
//! depend on chunking or threads.
//!
//! Magnitude pruning keeps positions `[lo, hi)` of the entries ordered by the bits of |δ|
//! (complemented for TIES, which keeps the largest), ties by index. Each bound is found by a
//! radix select over keys streamed from the inputs ([`Bound`]): a histogram of the keys' top 16
//! bits, then of the next 16 bits of those in the bucket holding the bound, until few enough
//! remain to gather; where that leaves a key with many copies (deltas of bf16 weights repeat
//! values), a last pass finds the copy at the bound's rank, stopping there.

#[cfg(target_arch = "x86_64")]
use super::simd;
use super::{uniform, MergeOp, Method, Resolved, Sparsify, Work};
use crate::dtype::DType;
use crate::kernels;
use crate::value::{stream, ReadContext, ValueError, CHUNK_BYTES};

/// Elements per block: a block of every input and of the work buffers stays in cache.
const BLOCK: usize = 2 * 1024;

/// Gathered keys beyond which a bound takes another histogram round (16 bytes each).
pub(super) const GATHER: usize = 1 << 16;

/// Sample keys a bracket is chosen from, at most, and the length of each run of them.
const SAMPLE: usize = 1 << 20;
const SAMPLE_RUN: usize = 512;

/// Entries of a tensor small enough to be its own sample.
const WHOLE: usize = 1 << 16;

/// The runs of entries a tensor of `n` entries is sampled in, and their length: the whole
/// tensor up to [`WHOLE`] entries, else evenly spaced runs of [`SAMPLE_RUN`]: at least 16,384
/// entries, one in 32 from 2¹⁹ entries on, at most [`SAMPLE`] (a quantile of 2²⁰ keys is known
/// to about 0.05%).
pub(super) fn sample_runs(n: usize) -> (usize, usize) {
    if n <= WHOLE {
        return (1, n);
    }
    ((n / 32).clamp(WHOLE / 4, SAMPLE).div_ceil(SAMPLE_RUN), SAMPLE_RUN)
}

/// Keys a bracket of a tensor of `n` entries may gather (16 bytes each) before the radix select
/// takes over. A bracket spans ten standard deviations of a quantile of its sample of `s` keys,
/// about 5/√s of them (1.4% of a tensor of 2²² entries, 0.5% from 2²⁵ entries on, where the
/// sample reaches [`SAMPLE`]): 1 in 128 keys, at least 2²⁰ and at most 2²³ (128 MiB; a tensor
/// of more than about 1.7·10⁹ entries then falls back to the radix select).
fn gather_cap(n: usize) -> usize {
    (n / 128).clamp(1 << 20, 1 << 23)
}

/// Bits of the key a histogram round looks at.
const RADIX: u32 = 16;

/// Whether merges of `method` are computed chunk by chunk.
pub(super) fn streams(method: Method) -> bool {
    match method {
        Method::Linear => true,
        Method::TaskArithmetic { sparsify, .. } => sparsify != Some(Sparsify::RankedRandom),
        _ => false,
    }
}

/// The most memory a streamed merge of `inputs` tensors of `n` elements takes besides the
/// writer's chunk, `pruned` of them by magnitude or at random: a chunk of every input and a
/// block of work buffers, and per pruned model a sample of keys, a histogram, the keys a
/// bracket may gather and the blocks it counts (at most: sparse masks need none of it).
/// `widen` is how many times wider the widest input's elements are than the result's (at least
/// 1): a chunk of the result reads that many bytes of each input.
pub(super) fn workspace(method: Method, inputs: usize, pruned: usize, n: usize, widen: usize) -> usize {
    let chunks = inputs * (CHUNK_BYTES * widen.max(1) + BLOCK * 8) + 3 * BLOCK * 8;
    // TIES keeps the largest entries (one bound), breadcrumbs those between two.
    let bounds = match method {
        Method::TaskArithmetic {
            sparsify: Some(Sparsify::Magnitude),
            ..
        } => 1,
        Method::TaskArithmetic {
            sparsify: Some(Sparsify::Outliers),
            ..
        } => 2,
        _ => return chunks,
    };
    let (runs, run) = sample_runs(n);
    let per_bound = runs * run * 8 + (1 << RADIX) * 8 + n.min(gather_cap(n)) * 16 + n / BLOCK * 32;
    chunks + pruned * bounds * per_bound
}

/// How one model's delta is pruned.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mask {
    /// Every entry kept.
    All,
    /// Entries whose `(key, index)` lies in `[low, high)` kept (none when `empty`).
    Magnitude {
        flip: u64,
        low: (u64, usize),
        high: (u64, usize),
        empty: bool,
    },
    /// Entries with `uniform(seed, index) < density` kept (DARE).
    Random { seed: u64, density: f64 },
}

/// The figures of a whole tensor a streamed merge needs: per merged model, its mask and the
/// factor rescaling its kept entries to the delta's L1 norm (`None`: left as they are).
#[derive(Debug)]
pub(super) struct Figures {
    masks: Vec<Mask>,
    factors: Vec<Option<f64>>,
}

/// The ordering key of a delta entry: the bits of |δ|, complemented by `flip` for a descending
/// order.
#[inline(always)]
fn key<T: Work>(x: T, flip: u64) -> u64 {
    x.abs_bits() ^ flip
}

/// The unsigned integers keys are compared as, at their own width ([`Work::Key`]).
pub(super) trait KeyWord: Copy + Ord + std::fmt::Debug {
    /// The largest key.
    const MAX: u64;
    /// `k`, which is at most [`KeyWord::MAX`].
    fn narrow(k: u64) -> Self;
    fn wide(self) -> u64;
    fn wrapping_add(self, other: Self) -> Self;
    fn wrapping_sub(self, other: Self) -> Self;
}

impl KeyWord for u32 {
    const MAX: u64 = u32::MAX as u64;
    #[inline(always)]
    fn narrow(k: u64) -> u32 {
        k as u32
    }
    #[inline(always)]
    fn wide(self) -> u64 {
        u64::from(self)
    }
    #[inline(always)]
    fn wrapping_add(self, other: u32) -> u32 {
        u32::wrapping_add(self, other)
    }
    #[inline(always)]
    fn wrapping_sub(self, other: u32) -> u32 {
        u32::wrapping_sub(self, other)
    }
}

impl KeyWord for u64 {
    const MAX: u64 = u64::MAX;
    #[inline(always)]
    fn narrow(k: u64) -> u64 {
        k
    }
    #[inline(always)]
    fn wide(self) -> u64 {
        self
    }
    #[inline(always)]
    fn wrapping_add(self, other: u64) -> u64 {
        u64::wrapping_add(self, other)
    }
    #[inline(always)]
    fn wrapping_sub(self, other: u64) -> u64 {
        u64::wrapping_sub(self, other)
    }
}

/// The keys of `delta`'s entries.
fn keys_of<T: Work>(delta: &[T], flip: u64, keys: &mut [u64]) {
    #[inline(always)]
    fn portable<T: Work>(delta: &[T], flip: u64, keys: &mut [u64]) {
        for (k, &x) in keys.iter_mut().zip(delta) {
            *k = key(x, flip);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn keys_avx2<T: Work>(delta: &[T], flip: u64, keys: &mut [u64]) {
        portable(delta, flip, keys)
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { keys_avx2(delta, flip, keys) };
    }
    portable(delta, flip, keys)
}

impl Mask {
    /// Whether entry `index` of value `x` is kept.
    #[inline(always)]
    fn keeps<T: Work>(&self, x: T, index: usize) -> bool {
        match *self {
            Mask::All => true,
            Mask::Magnitude { flip, low, high, empty } => between(key(x, flip), index, low, high) & !empty,
            Mask::Random { seed, density } => uniform(seed, index as u64) < density,
        }
    }
}

/// Whether `(k, index)` lies in `[low, high)`, without branching (which entries survive is a
/// coin toss per element).
#[inline(always)]
fn between(k: u64, index: usize, low: (u64, usize), high: (u64, usize)) -> bool {
    let above = (k > low.0) | ((k == low.0) & (index >= low.1));
    let below = (k < high.0) | ((k == high.0) & (index < high.1));
    above & below
}

/// One bound of a magnitude mask being found: the entry at position `pos` of model `model`'s
/// delta entries ordered by `(key, index)`.
#[derive(Debug)]
pub(super) struct Bound {
    model: usize,
    pos: usize,
    flip: u64,
    /// Bits of the keys.
    width: u32,
    /// Keys whose bits above `shift` equal `prefix` hold positions `below..below + remaining`.
    prefix: u64,
    shift: u32,
    below: usize,
    remaining: usize,
    /// The bound's key and how many entries of that key precede it in index order, once known.
    key: Option<(u64, usize)>,
    /// Its index, once found.
    index: Option<usize>,
    counts: Vec<usize>,
    gathered: Vec<(u64, usize)>,
    /// Entries of the bound's key seen so far in the last pass.
    seen: usize,
    /// The keys around the bound in a sample, tried first ([`Bracket`]).
    bracket: Option<Bracket>,
    /// The AVX2 bracket pass's record of vectors with keys in between.
    #[cfg(target_arch = "x86_64")]
    hits: simd::Hits,
}

/// A first guess from a sample of the keys: `lo ≤ key ≤ hi` holds the bound. One pass counts
/// the keys below `lo`, equal to `lo` and to `hi` (per block, to find a copy's index later by
/// reading one block) and gathers those in between; where the bound lies outside, or too many
/// lie in between, the radix select starts over.
#[derive(Debug)]
struct Bracket {
    lo: u64,
    hi: u64,
    under: usize,
    /// Per block of the pass: its first index, length, and copies of `lo` and of `hi` in it.
    blocks: Vec<(usize, usize, usize, usize)>,
    inside: Vec<(u64, usize)>,
    /// The most keys `inside` may hold ([`gather_cap`]).
    cap: usize,
    overflow: bool,
    done: bool,
}

/// The block holding the `rank`-th copy of `key`, from per-block copy counts.
fn copy_in_blocks(
    blocks: &[(usize, usize, usize, usize)],
    key: u64,
    mut rank: usize,
    copies: impl Fn(&(usize, usize, usize, usize)) -> usize,
) -> Found {
    for block in blocks {
        let c = copies(block);
        if rank < c {
            return Found::Copy {
                key,
                rank,
                start: block.0,
                len: block.1,
            };
        }
        rank -= c;
    }
    Found::Missed
}

/// Where a bracket pass found the bound.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Found {
    /// The `rank`-th copy of `key` (in index order), in the block `start..start + len`.
    Copy {
        key: u64,
        rank: usize,
        start: usize,
        len: usize,
    },
    /// Nowhere the pass can tell: the radix select starts over.
    Missed,
    /// Key and index known.
    Known,
    /// The passes disagree: the inputs changed while they were read.
    Changed,
}

/// What a pass does for one bound.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Bracket,
    Histogram,
    Gather,
    Index,
    Done,
}

impl Bound {
    pub(super) fn new(model: usize, pos: usize, flip: u64, width: u32, n: usize) -> Bound {
        Bound {
            model,
            pos,
            flip,
            width,
            prefix: 0,
            shift: width,
            below: 0,
            remaining: n,
            key: None,
            index: None,
            counts: Vec::new(),
            gathered: Vec::new(),
            seen: 0,
            bracket: None,
            #[cfg(target_arch = "x86_64")]
            hits: simd::Hits::default(),
        }
    }

    fn phase(&self, gather: usize) -> Phase {
        if self.bracket.as_ref().is_some_and(|b| !b.done) {
            return Phase::Bracket;
        }
        match (self.key, self.index) {
            (_, Some(_)) => Phase::Done,
            (Some(_), None) => Phase::Index,
            (None, None) if self.remaining <= gather => Phase::Gather,
            (None, None) => Phase::Histogram,
        }
    }

    fn in_range(&self, k: u64) -> bool {
        self.shift >= 64 || k >> self.shift == self.prefix
    }

    /// Takes one block of keys (entries `start..`) into the current phase; `false` once the
    /// bound needs no more of this pass.
    fn take(&mut self, phase: Phase, start: usize, keys: &[u64]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2.
            return unsafe { self.take_avx2(phase, start, keys) };
        }
        self.take_portable(phase, start, keys)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn take_avx2(&mut self, phase: Phase, start: usize, keys: &[u64]) -> bool {
        self.take_portable(phase, start, keys)
    }

    #[inline(always)]
    fn take_portable(&mut self, phase: Phase, start: usize, keys: &[u64]) -> bool {
        match phase {
            // Bracket passes take the models' values ([`Bound::take_bracket`]).
            Phase::Bracket => false,
            Phase::Histogram => {
                let next = self.shift - RADIX;
                let mask = (1u64 << RADIX) - 1;
                if self.shift == self.width {
                    // The first round: every key is in range.
                    for &k in keys {
                        self.counts[((k >> next) & mask) as usize] += 1;
                    }
                } else {
                    for &k in keys {
                        if k >> self.shift == self.prefix {
                            self.counts[((k >> next) & mask) as usize] += 1;
                        }
                    }
                }
                true
            }
            Phase::Gather => {
                for (i, &k) in keys.iter().enumerate() {
                    if self.in_range(k) {
                        self.gathered.push((k, start + i));
                    }
                }
                true
            }
            Phase::Index => {
                let (value, rank) = self.key.unwrap_or_default();
                for (i, &k) in keys.iter().enumerate() {
                    if k == value {
                        if self.seen == rank {
                            self.index = Some(start + i);
                            return false;
                        }
                        self.seen += 1;
                    }
                }
                true
            }
            Phase::Done => false,
        }
    }

    /// Takes one block of a bracket pass: the keys of `model − base` (entries `start..`),
    /// computed here rather than stored (the pass every TIES and breadcrumbs merge makes:
    /// one loop over the values, eight f32 keys per AVX2 register).
    fn take_bracket<T: Work>(&mut self, start: usize, base: &[T], model: &[T]) {
        let flip = self.flip;
        #[cfg(target_arch = "x86_64")]
        let hits = &mut self.hits;
        let Some(b) = self.bracket.as_mut() else {
            return;
        };
        let keys = BracketKeys::<T::Key>::of(b);
        let n = base.len().min(model.len());
        let mut tracking = keys.track;
        #[cfg(target_arch = "x86_64")]
        let counts = if !avx2() {
            bracket_runs(b, &keys, flip, start, base, model, &mut tracking)
        } else if T::DTYPE == DType::F32 {
            // SAFETY: `T` is f32 (its dtype says so: the only `Work` type of that dtype),
            // so the slices are f32 slices; the CPU has AVX2.
            let (base, model) = unsafe {
                (
                    std::slice::from_raw_parts(base.as_ptr().cast::<f32>(), n),
                    std::slice::from_raw_parts(model.as_ptr().cast::<f32>(), n),
                )
            };
            let wide = |k: T::Key| k.wide() as u32;
            let simd_keys = simd::BracketKeys {
                flip: flip as u32,
                lo: wide(keys.lo),
                hi: wide(keys.hi),
                count_hi: keys.count_hi,
                first: wide(keys.first),
                // Nothing to gather: a span of 0 (the kernel then only counts).
                span: if keys.track { wide(keys.span) } else { 0 },
            };
            let inside = |at: usize, mask: u32, lanes: &[u32; 8]| {
                tracking = keys.track && gather(b, start + at, mask, |i| u64::from(lanes[i]));
                tracking
            };
            if avx512() {
                // SAFETY: as above; the CPU has the AVX-512 extensions.
                unsafe { simd::bracket_f32_avx512(base, model, simd_keys, hits, inside) }
            } else {
                unsafe { simd::bracket_f32(base, model, simd_keys, hits, inside) }
            }
        } else {
            // SAFETY: the CPU has AVX2.
            unsafe { bracket_runs_avx2(b, &keys, flip, start, base, model, &mut tracking) }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let counts = bracket_runs(b, &keys, flip, start, base, model, &mut tracking);
        let (done, mut u, mut l, mut h) = counts;
        for i in done..n {
            let k = model[i].minus(base[i]).key(flip);
            u += usize::from(k < keys.lo);
            l += usize::from(k == keys.lo);
            h += usize::from(k == keys.hi && keys.count_hi);
            if tracking && keys.inside(k) {
                tracking = gather(b, start + i, 1, |_| k.wide());
            }
        }
        b.under += u;
        b.blocks.push((start, n, l, h));
    }

    /// Prepares the bound for a pass in `phase`.
    fn begin(&mut self, phase: Phase) {
        match phase {
            Phase::Bracket => {}
            Phase::Histogram => {
                self.counts.clear();
                self.counts.resize(1 << RADIX, 0);
            }
            Phase::Gather => self.gathered.clear(),
            Phase::Index => self.seen = 0,
            Phase::Done => {}
        }
    }

    /// Narrows the bound after a pass in `phase`.
    fn finish(&mut self, phase: Phase) -> Found {
        match phase {
            Phase::Bracket => return self.finish_bracket(),
            Phase::Histogram => {
                let next = self.shift - RADIX;
                let mut bucket = 0;
                for (b, &c) in self.counts.iter().enumerate() {
                    if self.below + c > self.pos {
                        bucket = b;
                        break;
                    }
                    self.below += c;
                }
                self.remaining = self.counts[bucket];
                self.prefix = (self.prefix << RADIX) | bucket as u64;
                self.shift = next;
                if self.shift == 0 {
                    self.key = Some((self.prefix, self.pos - self.below));
                }
                self.counts = Vec::new();
            }
            Phase::Gather => {
                // Gathered in index order: a stable sort by key orders them by (key, index).
                let mut gathered = std::mem::take(&mut self.gathered);
                gathered.sort_by_key(|&(k, _)| k);
                let Some(&(k, i)) = self.pos.checked_sub(self.below).and_then(|at| gathered.get(at)) else {
                    return Found::Changed;
                };
                self.key = Some((k, 0));
                self.index = Some(i);
            }
            Phase::Index if self.index.is_none() => return Found::Changed,
            Phase::Index | Phase::Done => {}
        }
        Found::Known
    }

    /// Where the bracket pass put the bound.
    fn finish_bracket(&mut self) -> Found {
        let Some(mut b) = self.bracket.take() else {
            return Found::Missed;
        };
        b.done = true;
        let (lo_copies, hi_copies) = b.blocks.iter().fold((0, 0), |(l, h), &(_, _, cl, ch)| (l + cl, h + ch));
        // Entries in key order: under `lo`, copies of `lo`, strictly between, copies of `hi`.
        let hi_copies = if b.hi == b.lo { 0 } else { hi_copies };
        let pos = self.pos;
        let lo_end = b.under + lo_copies;
        let inside_end = lo_end + b.inside.len();
        let found = if pos < b.under {
            Found::Missed
        } else if pos < lo_end {
            copy_in_blocks(&b.blocks, b.lo, pos - b.under, |&(_, _, cl, _)| cl)
        } else if b.overflow {
            // How many lie in between is unknown.
            Found::Missed
        } else if pos < inside_end {
            let (k, i) = *b.inside.select_nth_unstable(pos - lo_end).1;
            self.key = Some((k, 0));
            self.index = Some(i);
            Found::Known
        } else if pos < inside_end + hi_copies {
            copy_in_blocks(&b.blocks, b.hi, pos - inside_end, |&(_, _, _, ch)| ch)
        } else {
            Found::Missed
        };
        if found == Found::Missed {
            // Back to a radix select over every key.
            self.bracket = None;
        } else {
            self.bracket = Some(Bracket {
                blocks: Vec::new(),
                inside: Vec::new(),
                ..b
            });
        }
        found
    }

    /// The bound as `(key, index)`.
    fn found(&self) -> (u64, usize) {
        (self.key.map_or(0, |(k, _)| k), self.index.unwrap_or(0))
    }
}

/// A bracket's ends as keys of the work type's width ([`Bracket`]).
#[derive(Debug, Clone, Copy)]
struct BracketKeys<K> {
    lo: K,
    hi: K,
    /// Whether copies of `hi` count: not when `hi` lies above every key (no upper end).
    count_hi: bool,
    /// Whether keys in between are gathered (room left, and a key can lie in between).
    track: bool,
    /// `lo < k < hi` as one unsigned comparison: `k − first < span`.
    first: K,
    span: K,
}

impl<K: KeyWord> BracketKeys<K> {
    fn of(b: &Bracket) -> BracketKeys<K> {
        // `lo` is a key (or 0); `hi` may lie above every key (no upper end): then it equals
        // none, and every key above `lo` lies in between.
        let open = b.hi > K::MAX;
        let lo = K::narrow(b.lo);
        let hi = K::narrow(b.hi.min(K::MAX));
        let one = K::narrow(1);
        BracketKeys {
            lo,
            hi,
            count_hi: !open,
            track: !b.overflow && b.hi > b.lo.saturating_add(1),
            first: lo.wrapping_add(one),
            span: if open {
                K::narrow(K::MAX).wrapping_sub(lo)
            } else {
                hi.wrapping_sub(lo).wrapping_sub(one)
            },
        }
    }

    #[inline(always)]
    fn inside(&self, k: K) -> bool {
        k.wrapping_sub(self.first) < self.span
    }
}

/// Gathers the entries of `mask` (bit i: entry `at + i`, key `key(i)`) into the bracket;
/// `false` once it overflowed (then it holds nothing and gathers no more).
#[inline(always)]
fn gather(b: &mut Bracket, at: usize, mut mask: u32, key: impl Fn(usize) -> u64) -> bool {
    while mask != 0 {
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        if b.inside.len() == b.cap {
            b.overflow = true;
            b.inside = Vec::new();
            return false;
        }
        b.inside.push((key(i), at + i));
    }
    true
}

/// The bracket pass's portable loop, in runs of 16 counted lane by lane (f64 keys, and CPUs
/// without AVX2): the entries done and the three counts, as [`simd::bracket_f32`].
#[inline(always)]
fn bracket_runs<T: Work>(
    b: &mut Bracket,
    keys: &BracketKeys<T::Key>,
    flip: u64,
    start: usize,
    base: &[T],
    model: &[T],
    tracking: &mut bool,
) -> (usize, usize, usize, usize) {
    const RUN: usize = 16;
    let n = base.len().min(model.len());
    let whole = n - n % RUN;
    let mut under = [0u32; RUN];
    let mut at_lo = [0u32; RUN];
    let mut at_hi = [0u32; RUN];
    let hi_counts = u32::from(keys.count_hi);
    let mut lanes = [keys.lo; RUN];
    for (r, (bs, ms)) in base[..whole]
        .chunks_exact(RUN)
        .zip(model[..whole].chunks_exact(RUN))
        .enumerate()
    {
        let mut inside = 0u32;
        for i in 0..RUN {
            let k = ms[i].minus(bs[i]).key(flip);
            lanes[i] = k;
            under[i] += u32::from(k < keys.lo);
            at_lo[i] += u32::from(k == keys.lo);
            at_hi[i] += u32::from(k == keys.hi) & hi_counts;
            inside |= u32::from(keys.inside(k)) << i;
        }
        if *tracking && inside != 0 {
            *tracking = gather(b, start + r * RUN, inside, |i| lanes[i].wide());
        }
    }
    let sum = |c: [u32; RUN]| c.iter().map(|&x| x as usize).sum::<usize>();
    (whole, sum(under), sum(at_lo), sum(at_hi))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bracket_runs_avx2<T: Work>(
    b: &mut Bracket,
    keys: &BracketKeys<T::Key>,
    flip: u64,
    start: usize,
    base: &[T],
    model: &[T],
    tracking: &mut bool,
) -> (usize, usize, usize, usize) {
    bracket_runs(b, keys, flip, start, base, model, tracking)
}

/// Work buffers of one block: the base and each model's delta in the work type, and the sums
/// of a task-arithmetic merge.
struct Block<T> {
    base: Vec<T>,
    deltas: Vec<Vec<T>>,
    elected: Vec<T>,
    mixed: Vec<T>,
    kept_weight: Vec<T>,
}

impl<T: Work> Block<T> {
    fn new(models: usize) -> Block<T> {
        Block {
            base: Vec::new(),
            deltas: vec![Vec::new(); models],
            elected: Vec::new(),
            mixed: Vec::new(),
            kept_weight: Vec::new(),
        }
    }

    /// Converts `n` elements of `dtype` in `raw` into `out`.
    fn convert(dtype: DType, raw: &[u8], out: &mut Vec<T>, n: usize) {
        fit(out, n);
        kernels::convert(dtype, raw, T::DTYPE, T::bytes_mut(out));
    }
}

impl MergeOp {
    /// The tensor-wide figures, found once by passes over the inputs.
    pub(super) fn figures<T: Work>(&self, cx: &mut ReadContext) -> Result<Figures, ValueError> {
        self.figures_with::<T>(GATHER, cx)
    }

    /// [`MergeOp::figures`] with `gather` as the gathering threshold (tests force every phase).
    pub(super) fn figures_with<T: Work>(&self, gather: usize, cx: &mut ReadContext) -> Result<Figures, ValueError> {
        let models = self.params.len();
        let mut figures = Figures {
            masks: vec![Mask::All; models],
            factors: vec![None; models],
        };
        let Method::TaskArithmetic {
            sparsify: Some(method), ..
        } = self.method
        else {
            return Ok(figures);
        };
        let n = self.inputs[0].numel();
        if n == 0 {
            return Ok(figures);
        }
        let mut bounds = Vec::new();
        let mut magnitude = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            if p.density >= 1.0 {
                continue;
            }
            match method {
                Sparsify::Magnitude | Sparsify::Outliers => {
                    let (flip, lo, hi) = kept_positions::<T>(method, p, n);
                    if lo >= hi {
                        // Nothing kept: no bound to find.
                        magnitude.push((i, flip, None, None, true));
                        continue;
                    }
                    let lower = (lo > 0 && lo < n).then(|| {
                        bounds.push(Bound::new(i, lo, flip, T::WIDTH, n));
                        bounds.len() - 1
                    });
                    let upper = (hi < n).then(|| {
                        bounds.push(Bound::new(i, hi, flip, T::WIDTH, n));
                        bounds.len() - 1
                    });
                    magnitude.push((i, flip, lower, upper, lo >= hi));
                }
                Sparsify::Random => {
                    figures.masks[i] = Mask::Random {
                        seed: self.seeds[i],
                        density: p.density,
                    }
                }
                Sparsify::RankedRandom => {}
            }
        }
        self.select::<T>(&mut bounds, gather, cx)?;
        for (i, flip, lower, upper, empty) in magnitude {
            figures.masks[i] = Mask::Magnitude {
                flip,
                low: lower.map_or((0, 0), |b| bounds[b].found()),
                high: upper.map_or((u64::MAX, usize::MAX), |b| bounds[b].found()),
                empty,
            };
        }
        if self.rescale {
            self.rescale_factors::<T>(&mut figures, cx)?;
        }
        Ok(figures)
    }

    /// Streams the base and the models in `models` block by block, handing `f` each block's
    /// first index, the base and the models' values in the work type; stops when `f` returns
    /// `false`.
    fn values<T: Work>(
        &self,
        models: &[usize],
        cx: &mut ReadContext,
        mut f: impl FnMut(usize, &[T], &[Vec<T>]) -> Result<bool, ValueError>,
    ) -> Result<(), ValueError> {
        let mut tensors = vec![&self.inputs[0]];
        tensors.extend(models.iter().map(|&m| &self.inputs[m + 1]));
        let sizes: Vec<usize> = tensors.iter().map(|t| t.dtype.size().unwrap_or(1)).collect();
        let mut block = Block::<T>::new(models.len());
        let mut start = 0;
        stream(&tensors, cx, |chunks| {
            let n = chunks[0].len() / sizes[0];
            for at in (0..n).step_by(BLOCK) {
                let len = BLOCK.min(n - at);
                let raw = |t: usize| &chunks[t][at * sizes[t]..(at + len) * sizes[t]];
                Block::convert(tensors[0].dtype, raw(0), &mut block.base, len);
                for (j, values) in block.deltas.iter_mut().enumerate() {
                    Block::convert(tensors[j + 1].dtype, raw(j + 1), values, len);
                }
                if !f(start + at, &block.base, &block.deltas)? {
                    return Ok(false);
                }
            }
            start += n;
            Ok(true)
        })
    }

    /// Finds every bound, all of them in the same passes over the inputs: first a bracket
    /// from a sample of each model's keys, then (where that misses) the radix select.
    fn select<T: Work>(&self, bounds: &mut [Bound], gather: usize, cx: &mut ReadContext) -> Result<(), ValueError> {
        if bounds.is_empty() {
            return Ok(());
        }
        if gather >= GATHER {
            self.bracket::<T>(bounds, cx)?;
        }
        let mut keys = vec![0u64; BLOCK];
        let mut delta = Vec::<T>::new();
        loop {
            let phases: Vec<Phase> = bounds.iter().map(|b| b.phase(gather)).collect();
            if phases.iter().all(|&p| p == Phase::Done) {
                return Ok(());
            }
            for (b, &p) in bounds.iter_mut().zip(&phases) {
                b.begin(p);
            }
            let mut active: Vec<bool> = phases.iter().map(|&p| p != Phase::Done).collect();
            let mut models: Vec<usize> = bounds
                .iter()
                .zip(&active)
                .filter(|(_, &a)| a)
                .map(|(b, _)| b.model)
                .collect();
            models.dedup();
            self.values::<T>(&models, cx, |start, base, values| {
                for (slot, &m) in models.iter().enumerate() {
                    let mut keyed = false;
                    for (j, b) in bounds.iter_mut().enumerate() {
                        if b.model != m || !active[j] {
                            continue;
                        }
                        let len = base.len();
                        if phases[j] == Phase::Bracket {
                            b.take_bracket(start, base, &values[slot]);
                            continue;
                        }
                        if !keyed {
                            delta.clear();
                            delta.extend_from_slice(&values[slot]);
                            minus_base(&mut delta, base);
                            keys_of(&delta, b.flip, &mut keys[..len]);
                            keyed = true;
                        }
                        active[j] = b.take(phases[j], start, &keys[..len]);
                    }
                }
                Ok(active.iter().any(|&a| a))
            })?;
            for (b, &p) in bounds.iter_mut().zip(&phases) {
                match b.finish(p) {
                    Found::Copy { key, rank, start, len } => {
                        let index = self.copy_index::<T>(b.model, b.flip, key, rank, start, len, cx)?;
                        b.key = Some((key, rank));
                        b.index = Some(index);
                    }
                    Found::Changed => return Err(self.changed()),
                    Found::Known | Found::Missed => {}
                }
            }
            cx.check()?;
        }
    }

    /// Sets each bound's bracket from a sample of its model's keys ([`sample_runs`]); a tensor
    /// of at most [`WHOLE`] entries is its own sample, and its bounds are selected from it.
    fn bracket<T: Work>(&self, bounds: &mut [Bound], cx: &mut ReadContext) -> Result<(), ValueError> {
        let n = self.inputs[0].numel();
        let (runs, run) = sample_runs(n);
        let mut models: Vec<usize> = bounds.iter().map(|b| b.model).collect();
        models.dedup();
        let flips: Vec<u64> = models
            .iter()
            .map(|&m| bounds.iter().find(|b| b.model == m).map_or(0, |b| b.flip))
            .collect();
        let mut samples: Vec<Vec<u64>> = vec![Vec::with_capacity(runs * run); models.len()];
        for r in 0..runs {
            let start = (r as u128 * (n - run) as u128 / runs as u128) as usize;
            self.keys_at::<T>(&models, &flips, start, run, &mut samples, cx)?;
        }
        for (m, mut sample) in models.into_iter().zip(samples) {
            if runs * run == n && runs == 1 {
                // The whole tensor, in index order: select each bound by (key, index).
                let mut keyed: Vec<(u64, usize)> = sample.into_iter().zip(0..).collect();
                for b in bounds.iter_mut().filter(|b| b.model == m) {
                    let (k, i) = *keyed.select_nth_unstable(b.pos).1;
                    b.key = Some((k, 0));
                    b.index = Some(i);
                }
                continue;
            }
            let s = sample.len();
            for b in bounds.iter_mut().filter(|b| b.model == m) {
                // The bound's place in the sample, give or take five standard deviations of a
                // sample quantile (and two entries).
                let q = b.pos as f64 / n as f64;
                let at = (q * s as f64) as usize;
                let margin = (5.0 * (s as f64 * q * (1.0 - q)).sqrt()).ceil() as usize + 2;
                let lo = if at <= margin {
                    0
                } else {
                    *sample.select_nth_unstable(at - margin).1
                };
                let hi = if at + margin >= s {
                    u64::MAX
                } else {
                    *sample.select_nth_unstable(at + margin).1
                };
                b.bracket = Some(Bracket {
                    lo,
                    hi,
                    under: 0,
                    blocks: Vec::new(),
                    inside: Vec::new(),
                    cap: gather_cap(n),
                    overflow: false,
                    done: false,
                });
            }
        }
        Ok(())
    }

    /// Appends to `keys[j]` the keys of model `models[j]`'s delta entries `start..start + len`
    /// (`flips[j]` its key flip), reading the base once.
    fn keys_at<T: Work>(
        &self,
        models: &[usize],
        flips: &[u64],
        start: usize,
        len: usize,
        keys: &mut [Vec<u64>],
        cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        let mut base = Vec::<T>::new();
        let mut delta = Vec::<T>::new();
        let inputs = std::iter::once(0).chain(models.iter().map(|&m| m + 1));
        for (slot, i) in inputs.enumerate() {
            let input = &self.inputs[i];
            let width = input.dtype.size().ok_or(ValueError::NoByteSize {
                op: "merge",
                dtype: input.dtype,
            })?;
            let mut raw = cx.take(len * width);
            let read = input.read(start, &mut raw, cx);
            if read.is_ok() {
                Block::convert(input.dtype, &raw, if slot == 0 { &mut base } else { &mut delta }, len);
            }
            cx.give(raw);
            read?;
            if slot > 0 {
                minus_base(&mut delta, &base);
                let out = &mut keys[slot - 1];
                let at = out.len();
                out.resize(at + len, 0);
                keys_of(&delta, flips[slot - 1], &mut out[at..]);
            }
        }
        Ok(())
    }

    /// The index of the `rank`-th entry of key `key` in model `m`'s entries `start..start + len`.
    #[allow(clippy::too_many_arguments)]
    fn copy_index<T: Work>(
        &self,
        m: usize,
        flip: u64,
        key: u64,
        rank: usize,
        start: usize,
        len: usize,
        cx: &mut ReadContext,
    ) -> Result<usize, ValueError> {
        let mut keys = vec![Vec::new()];
        self.keys_at::<T>(&[m], &[flip], start, len, &mut keys, cx)?;
        keys[0]
            .iter()
            .enumerate()
            .filter(|(_, &k)| k == key)
            .nth(rank)
            .map(|(i, _)| start + i)
            .ok_or_else(|| self.changed())
    }

    /// The error of passes over the inputs that disagree.
    fn changed(&self) -> ValueError {
        ValueError::Compute {
            op: "merge",
            reason: format!("`{}`: the inputs changed while they were read", self.tensor),
        }
    }

    /// The factors rescaling each pruned model's kept entries to its delta's L1 norm (MergeKit
    /// leaves the entries alone when either norm is below 1e-7).
    fn rescale_factors<T: Work>(&self, figures: &mut Figures, cx: &mut ReadContext) -> Result<(), ValueError> {
        let models: Vec<usize> = (0..figures.masks.len())
            .filter(|&i| figures.masks[i] != Mask::All)
            .collect();
        if models.is_empty() {
            return Ok(());
        }
        let mut before = vec![0.0f64; models.len()];
        let mut after = vec![0.0f64; models.len()];
        self.values::<T>(&models, cx, |start, base, values| {
            for (slot, &m) in models.iter().enumerate() {
                let mask = figures.masks[m];
                for (i, (&v, &b)) in values[slot].iter().zip(base).enumerate() {
                    let x = v.minus(b);
                    let a = x.wide().abs();
                    before[slot] += a;
                    after[slot] += if mask.keeps(x, start + i) { a } else { 0.0 };
                }
            }
            Ok(true)
        })?;
        for (slot, &m) in models.iter().enumerate() {
            if before[slot] >= 1e-7 && after[slot] >= 1e-7 {
                figures.factors[m] = Some(before[slot] / after[slot]);
            }
        }
        Ok(())
    }

    /// Elements `[start, start + out.len() / size)` of the merged tensor, in `dtype`.
    pub(super) fn read_streamed<T: Work>(
        &self,
        figures: &Figures,
        dtype: DType,
        start: usize,
        out: &mut [u8],
        cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        let size = dtype.size().ok_or(ValueError::NoByteSize { op: "merge", dtype })?;
        let n = out.len() / size;
        // The inputs' elements of the whole range, one read each, then converted and merged a
        // block at a time.
        let mut raw = Vec::with_capacity(self.inputs.len());
        for input in &self.inputs {
            let width = input.dtype.size().ok_or(ValueError::NoByteSize {
                op: "merge",
                dtype: input.dtype,
            })?;
            let mut buf = cx.take(n * width);
            if let Err(e) = input.read(start, &mut buf, cx) {
                cx.give(buf);
                raw.into_iter().for_each(|(b, _)| cx.give(b));
                return Err(e);
            }
            raw.push((buf, width));
        }
        let combine = Combine::<T>::new(self);
        let mut block = Block::<T>::new(self.inputs.len() - 1);
        let mut merged: Vec<T> = Vec::new();
        for at in (0..n).step_by(BLOCK) {
            let len = BLOCK.min(n - at);
            for (i, (buf, width)) in raw.iter().enumerate() {
                let target = if i == 0 {
                    &mut block.base
                } else {
                    &mut block.deltas[i - 1]
                };
                Block::convert(self.inputs[i].dtype, &buf[at * width..(at + len) * width], target, len);
            }
            fit(&mut merged, len);
            combine.run(Some((figures, start + at)), &mut block, &mut merged);
            kernels::convert(
                T::DTYPE,
                T::bytes(&merged),
                dtype,
                &mut out[at * size..(at + len) * size],
            );
        }
        raw.into_iter().for_each(|(b, _)| cx.give(b));
        Ok(())
    }
}

/// One tensor's merge of a block, in the work type: for linear `Σ wᵢ·mᵢ` (over `Σ wᵢ` with
/// `normalize`); for task arithmetic (MergeKit generalized_task_arithmetic.py) the deltas
/// pruned and rescaled as the [`Figures`] say, weighted, with a sign election (`consensus`: only
/// entries whose sign equals that of `Σ wᵢ·δᵢ`, ≥ 0 counting as +, are summed, and `normalize`
/// divides by the weights of those kept, 1 where none is), times `lambda`, plus the base.
struct Combine<T> {
    weights: Vec<T>,
    /// Linear, or task arithmetic with or without an election.
    linear: bool,
    consensus: bool,
    normalize: bool,
    /// `1 / Σ wᵢ` (linear with `normalize`), else the divisor without election.
    divisor: T,
    lambda: T,
}

impl<T: Work> Combine<T> {
    fn new(op: &MergeOp) -> Combine<T> {
        let total: f64 = op.params.iter().map(|p| p.weight).sum();
        let (linear, consensus) = match op.method {
            Method::TaskArithmetic { consensus, .. } => (false, consensus),
            _ => (true, false),
        };
        let weights = op
            .params
            .iter()
            .map(|p| {
                T::of(if linear && op.normalize {
                    p.weight / total
                } else {
                    p.weight
                })
            })
            .collect();
        Combine {
            weights,
            linear,
            consensus,
            normalize: op.normalize,
            divisor: T::of(if total.abs() < 1e-8 { 1.0 } else { total }),
            lambda: T::of(op.lambda),
        }
    }

    /// Merges a block into `merged`. With `prune` (the figures, and the block's first index)
    /// the block holds the models, turned into pruned deltas first; without, their deltas.
    fn run(&self, prune: Option<(&Figures, usize)>, block: &mut Block<T>, merged: &mut [T]) {
        #[cfg(target_arch = "x86_64")]
        if avx512() {
            // SAFETY: the CPU has these AVX-512 extensions.
            return unsafe { self.run_avx512(prune, block, merged) };
        }
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2.
            return unsafe { self.run_avx2(prune, block, merged) };
        }
        self.block(prune, block, merged)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, prune: Option<(&Figures, usize)>, block: &mut Block<T>, merged: &mut [T]) {
        self.block(prune, block, merged)
    }

    /// [`Combine::block`] in 512-bit registers (8% less CPU for the TIES benchmark on an AMD
    /// EPYC with AVX-512; the same bits).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    unsafe fn run_avx512(&self, prune: Option<(&Figures, usize)>, block: &mut Block<T>, merged: &mut [T]) {
        self.block(prune, block, merged)
    }

    #[inline(always)]
    fn block(&self, prune: Option<(&Figures, usize)>, block: &mut Block<T>, merged: &mut [T]) {
        let zero = T::of(0.0);
        if self.linear {
            merged.fill(zero);
            let models = std::iter::once(&block.base).chain(block.deltas.iter());
            for (&w, m) in self.weights.iter().zip(models) {
                for (a, &x) in merged.iter_mut().zip(m) {
                    *a += w * x;
                }
            }
            return;
        }
        let len = merged.len();
        if let Some((figures, first)) = prune {
            for (i, delta) in block.deltas.iter_mut().enumerate() {
                prune_delta(figures.masks[i], figures.factors[i], first, &block.base, delta);
            }
        }
        // Two to four models (most merges): one loop over the elements, the models unrolled.
        let fused = match block.deltas.len() {
            1 => self.fused::<1>(&block.base, &block.deltas, merged),
            2 => self.fused::<2>(&block.base, &block.deltas, merged),
            3 => self.fused::<3>(&block.base, &block.deltas, merged),
            4 => self.fused::<4>(&block.base, &block.deltas, merged),
            _ => false,
        };
        if fused {
            return;
        }
        fit(&mut block.elected, len);
        fit(&mut block.mixed, len);
        fit(&mut block.kept_weight, len);
        let (el, mx, kw) = (&mut block.elected, &mut block.mixed, &mut block.kept_weight);
        mx.fill(zero);
        if self.consensus {
            el.fill(zero);
            kw.fill(zero);
            for (d, &w) in block.deltas.iter().zip(&self.weights) {
                for (e, &x) in el.iter_mut().zip(d) {
                    *e += w * x;
                }
            }
            for (d, &w) in block.deltas.iter().zip(&self.weights) {
                for (((m, v), &e), &x) in mx.iter_mut().zip(kw.iter_mut()).zip(el.iter()).zip(d) {
                    let wd = w * x;
                    // sign(wd) equals the elected sign (≥ 0 counts as +; zero has none).
                    let agree = if e >= zero { wd > zero } else { wd < zero };
                    // Selects rather than branches (the sign is a coin toss per element).
                    *m += if agree { wd } else { zero };
                    *v += if agree { w } else { zero };
                }
            }
            let one = T::of(1.0);
            for (((r, &b), &m), &v) in merged.iter_mut().zip(&block.base).zip(mx.iter()).zip(kw.iter()) {
                let v = if v == zero { one } else { v };
                let m = if self.normalize { m / v } else { m };
                *r = b + self.lambda * m;
            }
        } else {
            for (d, &w) in block.deltas.iter().zip(&self.weights) {
                for (m, &x) in mx.iter_mut().zip(d) {
                    *m += w * x;
                }
            }
            for ((r, &b), &m) in merged.iter_mut().zip(&block.base).zip(mx.iter()) {
                let m = if self.normalize { m / self.divisor } else { m };
                *r = b + self.lambda * m;
            }
        }
    }
}

impl<T: Work> Combine<T> {
    /// [`Combine::block`]'s task arithmetic after pruning, for `M` models, in one loop: the
    /// same operations in the same order, so the same bits. `false` (nothing done) when the
    /// block does not hold `M` models.
    #[inline(always)]
    fn fused<const M: usize>(&self, base: &[T], deltas: &[Vec<T>], merged: &mut [T]) -> bool {
        let len = merged.len();
        if deltas.len() != M || self.weights.len() != M || base.len() < len || deltas.iter().any(|d| d.len() < len) {
            return false;
        }
        let zero = T::of(0.0);
        let one = T::of(1.0);
        let w: [T; M] = std::array::from_fn(|i| self.weights[i]);
        let d: [&[T]; M] = std::array::from_fn(|i| &deltas[i][..len]);
        let base = &base[..len];
        let (lambda, divisor) = (self.lambda, self.divisor);
        if self.consensus {
            for j in 0..len {
                let mut e = zero;
                for i in 0..M {
                    e += w[i] * d[i][j];
                }
                // sign(w·δ) equals the elected sign (≥ 0 counts as +; zero has none).
                let positive = e >= zero;
                let (mut m, mut v) = (zero, zero);
                for i in 0..M {
                    let wd = w[i] * d[i][j];
                    let agree = (positive & (wd > zero)) | (!positive & (wd < zero));
                    m += if agree { wd } else { zero };
                    v += if agree { w[i] } else { zero };
                }
                let v = if v == zero { one } else { v };
                let m = if self.normalize { m / v } else { m };
                merged[j] = base[j] + lambda * m;
            }
        } else {
            for j in 0..len {
                let mut m = zero;
                for i in 0..M {
                    m += w[i] * d[i][j];
                }
                let m = if self.normalize { m / divisor } else { m };
                merged[j] = base[j] + lambda * m;
            }
        }
        true
    }
}

/// Turns one model's values into its pruned delta in place: `m − base`, entries the mask drops
/// set to +0, the kept ones times the rescaling factor.
#[inline(always)]
fn prune_delta<T: Work>(mask: Mask, factor: Option<f64>, first: usize, base: &[T], delta: &mut [T]) {
    match mask {
        Mask::All => {
            for (d, &b) in delta.iter_mut().zip(base) {
                *d = d.minus(b);
            }
        }
        Mask::Magnitude { flip, low, high, empty } => {
            if empty {
                delta.fill(T::of(0.0));
                return;
            }
            let last = first + delta.len();
            if !(first..last).contains(&low.1) && !(first..last).contains(&high.1) {
                // Neither bound's index falls in the block: each end is `≥`/`>` (`<`/`≤`) for
                // the whole block, and the mask is one range of keys, `a ≤ key < b`.
                let a = u128::from(low.0) + u128::from(low.1 > first);
                let b = u128::from(high.0) + u128::from(high.1 >= last);
                let b = b.min(u128::from(T::Key::MAX) + 1);
                if a >= b {
                    delta.fill(T::of(0.0));
                } else if a == 0 && b > u128::from(T::Key::MAX) {
                    for (d, &b) in delta.iter_mut().zip(base) {
                        *d = d.minus(b);
                    }
                } else {
                    // 0 ≤ a ≤ Key::MAX and 0 < b − a ≤ Key::MAX here.
                    let (a, span) = (T::Key::narrow(a as u64), T::Key::narrow((b - a) as u64));
                    for (d, &b) in delta.iter_mut().zip(base) {
                        let x = d.minus(b);
                        *d = x.kept(x.key(flip).wrapping_sub(a) < span);
                    }
                }
                if let Some(f) = factor {
                    let f = T::of(f);
                    for d in delta.iter_mut() {
                        *d *= f;
                    }
                }
                return;
            }
            // The bounds' indices relative to the block (saturated), so the loop compares
            // narrow lanes: the key and the position in the block.
            let relative = |index: usize| u32::try_from(index.saturating_sub(first)).unwrap_or(u32::MAX);
            let (low_at, high_at) = (relative(low.1), relative(high.1));
            for ((d, &b), j) in delta.iter_mut().zip(base).zip(0u32..) {
                let x = d.minus(b);
                *d = x.kept(x.between(flip, (low.0, low_at), (high.0, high_at), j));
            }
        }
        Mask::Random { seed, density } => {
            for (j, (d, &b)) in delta.iter_mut().zip(base).enumerate() {
                let x = d.minus(b);
                *d = x.kept(uniform(seed, (first + j) as u64) < density);
            }
        }
    }
    if let Some(f) = factor {
        let f = T::of(f);
        for d in delta.iter_mut() {
            *d *= f;
        }
    }
}

/// Merges the pruned `deltas` of whole tensors into `base` (DELLA, which prunes whole rows).
pub(super) fn combine_whole<T: Work>(
    op: &MergeOp,
    deltas: &[&[T]],
    base: &mut [T],
    cx: &mut ReadContext,
) -> Result<(), ValueError> {
    let combine = Combine::<T>::new(op);
    let mut block = Block::<T>::new(deltas.len());
    let mut merged = Vec::new();
    for start in (0..base.len()).step_by(BLOCK) {
        cx.check()?;
        let end = (start + BLOCK).min(base.len());
        block.base.clear();
        block.base.extend_from_slice(&base[start..end]);
        for (d, whole) in block.deltas.iter_mut().zip(deltas) {
            d.clear();
            d.extend_from_slice(&whole[start..end]);
        }
        fit(&mut merged, end - start);
        combine.run(None, &mut block, &mut merged);
        base[start..end].copy_from_slice(&merged);
    }
    Ok(())
}

/// Whether the CPU has AVX2. The hot loops have a copy compiled for it (`…_avx2`): the same
/// operations in wider registers and no fused multiply-add (Rust never contracts `a * b + c`
/// into one), so the results are those of the portable code, bit for bit.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

/// Whether the CPU has the AVX-512 extensions the combine's copy for them (`…_avx512`) is
/// compiled with; the same bits as [`avx2`]'s copies.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512dq")
}

/// `delta −= base`, element by element.
fn minus_base<T: Work>(delta: &mut [T], base: &[T]) {
    #[inline(always)]
    fn portable<T: Work>(delta: &mut [T], base: &[T]) {
        for (d, &b) in delta.iter_mut().zip(base) {
            *d = d.minus(b);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn minus_avx2<T: Work>(delta: &mut [T], base: &[T]) {
        portable(delta, base)
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { minus_avx2(delta, base) };
    }
    portable(delta, base)
}

/// Sizes `values` to `len` elements (contents unspecified; filled only when growing).
fn fit<T: Work>(values: &mut Vec<T>, len: usize) {
    if values.len() != len {
        values.resize(len, T::of(0.0));
    }
}

/// Whether magnitude pruning of `n` entries with `p` has a bound to find (it keeps some, not all).
pub(super) fn has_bound(method: Sparsify, p: &Resolved, n: usize) -> bool {
    if p.density >= 1.0 || n == 0 {
        return false;
    }
    let (_, lo, hi) = kept_positions::<f32>(method, p, n);
    lo < hi && ((lo > 0 && lo < n) || hi < n)
}

/// Magnitude pruning's kept positions of the `(key, index)` order of `n` entries, and the key
/// flip giving that order: TIES keeps the `density` share of largest |δ| (a descending order,
/// the first positions); breadcrumbs drops the `gamma` share of largest and the smallest
/// (MergeKit sparsify.py).
fn kept_positions<T: Work>(method: Sparsify, p: &Resolved, n: usize) -> (u64, usize, usize) {
    if method == Sparsify::Magnitude {
        let flip = u64::MAX >> (64 - T::WIDTH);
        return (flip, 0, (p.density * n as f64).floor() as usize);
    }
    let target = (p.density * n as f64).floor() as i64;
    let mut top = (p.gamma * n as f64).floor() as i64;
    let mut bottom = n as i64 - target - top;
    if bottom < 0 {
        top += bottom;
        bottom = 0;
    }
    (0, bottom.max(0) as usize, (n as i64 - top.max(0)) as usize)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::value::Tensor;

    fn tensor<T: Work>(values: &[T]) -> Tensor {
        Tensor::in_memory(T::DTYPE, vec![values.len()], Arc::new(T::bytes(values).to_vec()))
    }

    fn op<T: Work>(method: &str, base: &[T], models: &[Vec<T>], density: f64, rescale: bool) -> MergeOp {
        let mut inputs = vec![tensor(base)];
        inputs.extend(models.iter().map(|m| tensor(m)));
        let params = (0..models.len())
            .map(|i| Resolved {
                weight: 0.3 + 0.4 * i as f64,
                density,
                gamma: 0.1,
                epsilon: 0.1,
            })
            .collect();
        MergeOp {
            method: Method::of(method).unwrap(),
            inputs,
            uses_base: true,
            params,
            seeds: (0..models.len() as u64).map(|i| 17 + i).collect(),
            normalize: true,
            rescale,
            lambda: 1.0,
            t: 0.0,
            flatten: true,
            row_wise: false,
            select_topk: 1.0,
            max_iter: 10,
            tol: 1e-5,
            tensor: "m::w".into(),
            largest: Arc::new(AtomicUsize::new(0)),
            workspace: Arc::new(AtomicUsize::new(0)),
            result: Mutex::new(None),
            figures: Mutex::new(None),
        }
    }

    /// Values from a few levels, so |δ| repeats (as deltas of bf16 weights do).
    fn tied(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| ((crate::kernels::random::bits(seed, i as u64) % 7) as f32 - 3.0) * 0.5)
            .collect()
    }

    /// Indices kept at positions `[lo, hi)` of the entries sorted by (key, index).
    fn reference_kept(delta: &[f32], flip: u64, lo: usize, hi: usize) -> Vec<bool> {
        let mut order: Vec<usize> = (0..delta.len()).collect();
        order.sort_by_key(|&i| (key(delta[i], flip), i));
        let mut kept = vec![false; delta.len()];
        for &i in &order[lo.min(hi)..hi] {
            kept[i] = true;
        }
        kept
    }

    /// Values of many levels: few repeated keys.
    fn spread(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| crate::kernels::random::normal(seed, i as u64) as f32)
            .collect()
    }

    /// A bracket pass over one block, as the definition says (no runs, no SIMD).
    fn bracket_reference(b: &Bracket, flip: u64, start: usize, base: &[f32], model: &[f32]) -> Bracket {
        let mut out = Bracket {
            blocks: Vec::new(),
            inside: Vec::new(),
            ..*b
        };
        let (mut at_lo, mut at_hi) = (0, 0);
        for (i, (&m, &x)) in model.iter().zip(base).enumerate() {
            let k = key(m - x, flip);
            out.under += usize::from(k < b.lo);
            at_lo += usize::from(k == b.lo);
            at_hi += usize::from(k == b.hi);
            if !out.overflow && b.lo < k && k < b.hi {
                if out.inside.len() == out.cap {
                    out.overflow = true;
                    out.inside = Vec::new();
                } else {
                    out.inside.push((k, start + i));
                }
            }
        }
        out.blocks.push((start, base.len(), at_lo, at_hi));
        out
    }

    #[test]
    fn the_bracket_pass_counts_as_its_definition() {
        // Every path of `take_bracket` (AVX2 where the CPU has it, runs of 16, the tail) on
        // repeated and spread values, brackets open above, at 0, empty between, and a gather
        // cap that overflows mid-block.
        for (seed, n) in [(1u64, 2048usize), (2, 2047), (3, 13), (4, 777), (5, 5000)] {
            let base: Vec<f32> = if seed % 2 == 0 { tied(n, seed) } else { spread(n, seed) };
            let model: Vec<f32> = if seed % 2 == 0 {
                tied(n, seed + 10)
            } else {
                spread(n, seed + 10)
            };
            for flip in [0u64, u64::from(u32::MAX)] {
                let mut keys: Vec<u64> = model.iter().zip(&base).map(|(&m, &x)| key(m - x, flip)).collect();
                keys.sort_unstable();
                let q = |f: f64| keys[((n - 1) as f64 * f) as usize];
                let brackets = [
                    (q(0.4), q(0.6)),
                    (q(0.5), u64::MAX),
                    (0, q(0.3)),
                    (q(0.2), q(0.2)),
                    (q(0.2), q(0.2) + 1),
                    (0, u64::MAX),
                    (u64::from(u32::MAX), u64::MAX),
                ];
                for (lo, hi) in brackets {
                    for cap in [1 << 20, 5] {
                        let bracket = Bracket {
                            lo,
                            hi,
                            under: 3,
                            blocks: Vec::new(),
                            inside: Vec::new(),
                            cap,
                            overflow: false,
                            done: false,
                        };
                        let want = bracket_reference(&bracket, flip, 100, &base, &model);
                        let mut b = Bound::new(0, 0, flip, 32, n);
                        b.bracket = Some(bracket);
                        b.take_bracket(100, &base, &model);
                        let got = b.bracket.unwrap();
                        let what = format!("seed {seed} n {n} flip {flip:x} lo {lo} hi {hi} cap {cap}");
                        assert_eq!(
                            (got.under, &got.blocks, got.overflow),
                            (want.under, &want.blocks, want.overflow),
                            "{what}"
                        );
                        assert_eq!(got.inside, want.inside, "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn bounds_match_a_stable_sort_in_every_phase() {
        // Its own sample, and sampled (a bracket pass, and the radix select where it misses).
        for (n, gathers) in [(3 * BLOCK + 123, &[0, 64, GATHER][..]), (WHOLE + 4321, &[GATHER][..])] {
            for (base, models) in [
                (tied(n, 1), vec![tied(n, 2), tied(n, 3)]),
                (spread(n, 1), vec![spread(n, 2), tied(n, 3)]),
            ] {
                check_bounds(n, &base, &models, gathers);
            }
        }
    }

    fn check_bounds(n: usize, base: &[f32], models: &[Vec<f32>], gathers: &[usize]) {
        for method in ["ties", "breadcrumbs"] {
            for density in [0.0, 0.1, 0.5, 0.9] {
                let merge = op(method, base, models, density, false);
                for &gather in gathers {
                    let figures = merge.figures_with::<f32>(gather, &mut ReadContext::default()).unwrap();
                    for (m, model) in models.iter().enumerate() {
                        let delta: Vec<f32> = model.iter().zip(base).map(|(x, b)| x - b).collect();
                        let sparsify = if method == "ties" {
                            Sparsify::Magnitude
                        } else {
                            Sparsify::Outliers
                        };
                        let (flip, lo, hi) = kept_positions::<f32>(sparsify, &merge.params[m], n);
                        let want = reference_kept(&delta, flip, lo, hi);
                        let got: Vec<bool> = (0..n).map(|i| figures.masks[m].keeps(delta[i], i)).collect();
                        assert!(got == want, "{method} density {density} gather {gather} model {m}");
                    }
                }
            }
        }
    }

    /// Runs one bracket pass over `keys` (in blocks of 4) for the bound at `pos`.
    fn bracket_pass(keys: &[u64], pos: usize, lo: u64, hi: u64) -> (Found, Bound) {
        let mut b = Bound::new(0, pos, 0, 32, keys.len());
        b.bracket = Some(Bracket {
            lo,
            hi,
            under: 0,
            blocks: Vec::new(),
            inside: Vec::new(),
            cap: 1 << 20,
            overflow: false,
            done: false,
        });
        assert_eq!(b.phase(GATHER), Phase::Bracket);
        // Deltas whose keys (f32 bits, no flip) are `keys`: the values over a zero base.
        let values: Vec<f32> = keys.iter().map(|&k| f32::from_bits(k as u32)).collect();
        let base = vec![0.0f32; keys.len()];
        for (i, (block, zero)) in values.chunks(4).zip(base.chunks(4)).enumerate() {
            b.take_bracket(4 * i, zero, block);
        }
        (b.finish(Phase::Bracket), b)
    }

    #[test]
    fn a_bracket_finds_the_bound_or_hands_over() {
        // Sorted by (key, index): 1@1 1@6 | 3@0 3@4 3@8 | 5@2 | 7@3 7@7 | 9@5
        let keys = [3, 1, 5, 7, 3, 9, 1, 7, 3];
        // Strictly between lo and hi: gathered, key and index known.
        let (found, b) = bracket_pass(&keys, 5, 3, 7);
        assert_eq!((found, b.key, b.index), (Found::Known, Some((5, 0)), Some(2)));
        // On copies of lo: the block holding the copy, to read, and its rank there.
        let (found, _) = bracket_pass(&keys, 4, 3, 7);
        assert_eq!(
            found,
            Found::Copy {
                key: 3,
                rank: 0,
                start: 8,
                len: 1
            }
        );
        // On copies of hi.
        let (found, _) = bracket_pass(&keys, 7, 3, 7);
        assert_eq!(
            found,
            Found::Copy {
                key: 7,
                rank: 0,
                start: 4,
                len: 4
            }
        );
        // lo = hi.
        let (found, _) = bracket_pass(&keys, 3, 3, 3);
        assert_eq!(
            found,
            Found::Copy {
                key: 3,
                rank: 0,
                start: 4,
                len: 4
            }
        );
        // Below lo or above hi: the radix select starts over, from every key.
        for (pos, lo, hi) in [(1, 3, 7), (8, 3, 7), (0, 5, 5)] {
            let (found, b) = bracket_pass(&keys, pos, lo, hi);
            assert_eq!(found, Found::Missed);
            assert!(b.bracket.is_none());
            assert_eq!(b.phase(GATHER), Phase::Gather);
            assert_eq!(b.phase(0), Phase::Histogram);
        }
    }

    #[test]
    fn chunks_agree_with_the_whole_tensor() {
        let n = 2 * BLOCK + 77;
        let base: Vec<f32> = tied(n, 4).iter().map(|x| x * 0.01).collect();
        let models: Vec<Vec<f32>> = (5..8).map(|s| tied(n, s)).collect();
        for method in [
            "ties",
            "dare_ties",
            "breadcrumbs_ties",
            "task_arithmetic",
            "dare_linear",
        ] {
            let merge = op(method, &base, &models, 0.4, true);
            let figures = merge.figures::<f32>(&mut ReadContext::default()).unwrap();
            let read = |start: usize, len: usize| {
                let mut out = vec![0u8; len * 2];
                merge
                    .read_streamed::<f32>(&figures, DType::BF16, start, &mut out, &mut ReadContext::default())
                    .unwrap();
                out
            };
            let whole = read(0, n);
            let mut pieces = Vec::new();
            for (start, len) in [(0, 5), (5, BLOCK), (5 + BLOCK, n - 5 - BLOCK)] {
                pieces.extend(read(start, len));
            }
            assert!(whole == pieces, "{method}");
            // Element by element, from the masks as `Mask::keeps` reads them (the block loops
            // compare narrower lanes) and the merge's formula (against NumPy in
            // tests/transforms/test_merge.py).
            let Method::TaskArithmetic { consensus, .. } = merge.method else {
                unreachable!()
            };
            let mut want = vec![0f32; n];
            for (j, w) in want.iter_mut().enumerate() {
                let deltas: Vec<f32> = (0..models.len())
                    .map(|i| {
                        let x = models[i][j] - base[j];
                        let kept = if figures.masks[i].keeps(x, j) { x } else { 0.0 };
                        figures.factors[i].map_or(kept, |f| kept * f as f32)
                    })
                    .collect();
                let weights: Vec<f32> = merge.params.iter().map(|p| p.weight as f32).collect();
                let elected: f32 = deltas.iter().zip(&weights).fold(0.0, |e, (d, w)| e + w * d);
                let (mut mixed, mut kept_weight) = (0f32, 0f32);
                for (d, &wt) in deltas.iter().zip(&weights) {
                    let wd = wt * d;
                    let agree = !consensus || if elected >= 0.0 { wd > 0.0 } else { wd < 0.0 };
                    mixed += if agree { wd } else { 0.0 };
                    kept_weight += if agree { wt } else { 0.0 };
                }
                let total: f32 = weights.iter().sum();
                let divisor = if consensus {
                    if kept_weight == 0.0 {
                        1.0
                    } else {
                        kept_weight
                    }
                } else {
                    total
                };
                *w = base[j] + mixed / divisor;
            }
            let mut want_bytes = vec![0u8; 2 * n];
            kernels::convert(DType::F32, f32::bytes(&want), DType::BF16, &mut want_bytes);
            assert!(whole == want_bytes, "{method}");
        }
    }

    #[test]
    fn f64_inputs_select_on_64_bit_keys() {
        let n = BLOCK + 5;
        let base: Vec<f64> = tied(n, 8).iter().map(|&x| f64::from(x)).collect();
        let models = vec![tied(n, 9).iter().map(|&x| f64::from(x) + 1e-12).collect::<Vec<f64>>()];
        let merge = op("ties", &base, &models, 0.3, false);
        for gather in [0, GATHER] {
            let figures = merge.figures_with::<f64>(gather, &mut ReadContext::default()).unwrap();
            let delta: Vec<f64> = models[0].iter().zip(&base).map(|(x, b)| x - b).collect();
            let kept = (0..n).filter(|&i| figures.masks[0].keeps(delta[i], i)).count();
            assert_eq!(kept, (0.3 * n as f64).floor() as usize, "gather {gather}");
        }
    }
}

//! AVX2 kernel of the bracket pass of streamed TIES/breadcrumbs merges over f32 values: the
//! pass every magnitude-pruned merge makes over every input, where the portable loop, however
//! written, left the "which keys lie in between" mask to scalar extraction (LLVM does not form
//! `movemask` from it) and cost as much as the merge itself. Same keys, same counts, same
//! gathered entries as the portable loop (tests compare them on random data).

#![allow(unused_unsafe)]

use std::arch::x86_64::*;

/// What [`bracket_f32`] counts against, keys being `bits(|m − b|) ^ flip` (u32).
#[derive(Debug, Clone, Copy)]
pub(super) struct BracketKeys {
    pub flip: u32,
    pub lo: u32,
    pub hi: u32,
    /// Whether copies of `hi` are counted (not when the bracket has no upper end).
    pub count_hi: bool,
    /// `lo < k < hi` is `k − first < span` (unsigned).
    pub first: u32,
    pub span: u32,
}

/// Vectors of eight [`bracket_f32`] handed over in one run at most.
const RUN: usize = 256;

/// Where [`bracket_f32`] records the vectors with keys in between: kept by the caller, so the
/// kernel does not clear 11 KiB of stack per call.
#[derive(Debug, Default)]
pub(super) struct Hits {
    at: Vec<usize>,
    mask: Vec<u32>,
    keys: Vec<[u32; 8]>,
}

impl Hits {
    fn resize(&mut self, n: usize) {
        if self.at.len() < n {
            self.at.resize(n, 0);
            self.mask.resize(n, 0);
            self.keys.resize(n, [0; 8]);
        }
    }
}

/// Counts over the whole vectors of eight of `model − base`: keys below `lo`, equal to `lo`,
/// equal to `hi`; for each vector with keys in between, hands `inside` the vector's first
/// entry, the mask of those keys (bit i: entry i) and the keys, until it returns `false`.
/// Returns the entries done (a multiple of eight) and the three counts.
///
/// # Safety
/// AVX2 must be available.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn bracket_f32(
    base: &[f32],
    model: &[f32],
    keys: BracketKeys,
    hits: &mut Hits,
    mut inside: impl FnMut(usize, u32, &[u32; 8]) -> bool,
) -> (usize, usize, usize, usize) {
    let n = base.len().min(model.len());
    let whole = n - n % 8;
    // SAFETY: every load reads eight f32 at `i < whole ≤ len` of both slices; AVX2 is
    // available (the caller's contract).
    unsafe {
        let abs = _mm256_set1_epi32(i32::MAX);
        let flip = _mm256_set1_epi32(keys.flip as i32);
        let lo = _mm256_set1_epi32(keys.lo as i32);
        let hi = _mm256_set1_epi32(keys.hi as i32);
        let first = _mm256_set1_epi32(keys.first as i32);
        // `t < span` (unsigned) as `min(t, span − 1) == t`; a span of 0 holds nothing.
        let track = keys.span > 0;
        let last = _mm256_set1_epi32(keys.span.wrapping_sub(1) as i32);
        let (mut u, mut l, mut h) = (0usize, 0usize, 0usize);
        let mut tracking = track;
        // Vectors with keys in between, recorded without a branch (the next slot is taken only
        // when the mask is not empty) and handed over after each run of `RUN` vectors: a call
        // inside the loop would make every register caller-saved there. Few constants, so
        // that the counts stay in registers.
        let hits_of = hits;
        hits_of.resize(RUN);
        let (hit_at, hit_mask, hit_keys) = (&mut hits_of.at, &mut hits_of.mask, &mut hits_of.keys);
        let mut i = 0;
        while i < whole {
            let end = whole.min(i + 8 * RUN);
            let first_i = i;
            // Counts of keys ≥ lo (those below are the rest), = lo, = hi.
            let (mut at_least, mut at_lo, mut at_hi) =
                (_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256());
            let mut hits = 0;
            // The key of the eight entries at `i`, counted (comparison masks are −1 per true
            // lane: subtracting counts them).
            macro_rules! count {
                () => {{
                    let d = _mm256_sub_ps(
                        _mm256_loadu_ps(model.as_ptr().add(i)),
                        _mm256_loadu_ps(base.as_ptr().add(i)),
                    );
                    let k = _mm256_xor_si256(_mm256_and_si256(_mm256_castps_si256(d), abs), flip);
                    at_least = _mm256_sub_epi32(at_least, _mm256_cmpeq_epi32(_mm256_max_epu32(k, lo), k));
                    at_lo = _mm256_sub_epi32(at_lo, _mm256_cmpeq_epi32(k, lo));
                    at_hi = _mm256_sub_epi32(at_hi, _mm256_cmpeq_epi32(k, hi));
                    k
                }};
            }
            // Two loops rather than a test inside one: with the test, LLVM kept the counts in
            // memory.
            if tracking {
                while i < end {
                    let k = count!();
                    let t = _mm256_sub_epi32(k, first);
                    let mask = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_min_epu32(t, last), t)))
                        as u32;
                    _mm256_storeu_si256(hit_keys.as_mut_ptr().add(hits).cast(), k);
                    *hit_at.as_mut_ptr().add(hits) = i;
                    *hit_mask.as_mut_ptr().add(hits) = mask;
                    hits += usize::from(mask != 0);
                    i += 8;
                }
            } else {
                while i < end {
                    count!();
                    i += 8;
                }
            }
            let mut c = [[0u32; 8]; 3];
            _mm256_storeu_si256(c[0].as_mut_ptr().cast(), at_least);
            _mm256_storeu_si256(c[1].as_mut_ptr().cast(), at_lo);
            _mm256_storeu_si256(c[2].as_mut_ptr().cast(), at_hi);
            let [at_least, at_lo, at_hi] = c.map(|lanes| lanes.iter().map(|&x| x as usize).sum::<usize>());
            u += (i - first_i) - at_least;
            l += at_lo;
            if keys.count_hi {
                h += at_hi;
            }
            for j in 0..hits {
                if !tracking {
                    break;
                }
                tracking = inside(hit_at[j], hit_mask[j], &hit_keys[j]);
            }
        }
        (whole, u, l, h)
    }
}

/// [`bracket_f32`] in 512-bit registers with mask registers: sixteen entries per step, the
/// unsigned comparisons direct (about 30% less of the pass's CPU on an AMD EPYC). Vectors with keys
/// in between are handed over as two halves of eight, in order, so `inside` sees what
/// [`bracket_f32`] would hand it, up to the last 8–15 entries, which this kernel leaves to the
/// caller's tail (done one by one).
///
/// # Safety
/// AVX-512 F, BW, VL and DQ must be available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub(super) unsafe fn bracket_f32_avx512(
    base: &[f32],
    model: &[f32],
    keys: BracketKeys,
    hits: &mut Hits,
    mut inside: impl FnMut(usize, u32, &[u32; 8]) -> bool,
) -> (usize, usize, usize, usize) {
    let n = base.len().min(model.len());
    let whole = n - n % 16;
    // SAFETY: every load reads sixteen f32 at `i < whole ≤ len` of both slices; each step
    // records at most two halves in `hits`, sized for a run of `RUN` halves; the extensions are
    // available (the caller's contract).
    unsafe {
        let abs = _mm512_set1_epi32(i32::MAX);
        let flip = _mm512_set1_epi32(keys.flip as i32);
        let lo = _mm512_set1_epi32(keys.lo as i32);
        let hi = _mm512_set1_epi32(keys.hi as i32);
        let first = _mm512_set1_epi32(keys.first as i32);
        let span = _mm512_set1_epi32(keys.span as i32);
        let one = _mm512_set1_epi32(1);
        let (mut u, mut l, mut h) = (0usize, 0usize, 0usize);
        let mut tracking = keys.span > 0;
        // One more slot: a step's 512-bit store of keys reaches the slot after its own.
        hits.resize(RUN + 1);
        let (hit_at, hit_mask, hit_keys) = (&mut hits.at, &mut hits.mask, &mut hits.keys);
        let mut i = 0;
        while i < whole {
            // RUN halves of eight: RUN / 2 steps of sixteen.
            let end = whole.min(i + 8 * RUN);
            let first_i = i;
            let (mut at_least, mut at_lo, mut at_hi) =
                (_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512());
            let mut hits = 0;
            macro_rules! count {
                () => {{
                    let d = _mm512_sub_ps(
                        _mm512_loadu_ps(model.as_ptr().add(i)),
                        _mm512_loadu_ps(base.as_ptr().add(i)),
                    );
                    let k = _mm512_xor_si512(_mm512_and_si512(_mm512_castps_si512(d), abs), flip);
                    at_least = _mm512_mask_add_epi32(at_least, _mm512_cmpge_epu32_mask(k, lo), at_least, one);
                    at_lo = _mm512_mask_add_epi32(at_lo, _mm512_cmpeq_epi32_mask(k, lo), at_lo, one);
                    at_hi = _mm512_mask_add_epi32(at_hi, _mm512_cmpeq_epi32_mask(k, hi), at_hi, one);
                    k
                }};
            }
            if tracking {
                while i < end {
                    let k = count!();
                    let mask = u32::from(_mm512_cmplt_epu32_mask(_mm512_sub_epi32(k, first), span));
                    let (low, high) = (mask & 0xff, mask >> 8);
                    _mm512_storeu_si512(hit_keys.as_mut_ptr().add(hits).cast(), k);
                    *hit_at.as_mut_ptr().add(hits) = i;
                    *hit_mask.as_mut_ptr().add(hits) = low;
                    hits += usize::from(low != 0);
                    // The upper half goes to the next slot: its keys are the second eight
                    // stored above when the lower half took no slot, else stored again.
                    _mm256_storeu_si256(
                        hit_keys.as_mut_ptr().add(hits).cast(),
                        _mm512_extracti64x4_epi64::<1>(k),
                    );
                    *hit_at.as_mut_ptr().add(hits) = i + 8;
                    *hit_mask.as_mut_ptr().add(hits) = high;
                    hits += usize::from(high != 0);
                    i += 16;
                }
            } else {
                while i < end {
                    count!();
                    i += 16;
                }
            }
            let sum = |v: __m512i| _mm512_reduce_add_epi32(v) as u32 as usize;
            u += (i - first_i) - sum(at_least);
            l += sum(at_lo);
            if keys.count_hi {
                h += sum(at_hi);
            }
            for j in 0..hits {
                if !tracking {
                    break;
                }
                tracking = inside(hit_at[j], hit_mask[j], &hit_keys[j]);
            }
        }
        (whole, u, l, h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a kernel counts (below `lo`, at `lo`, at `hi`) and the `(index, key)` of the entries
    /// in between it hands over (until `stop_after` hand-overs, if given), its tail of fewer
    /// than a vector's entries done one by one as the caller does.
    type Pass = (usize, usize, usize, Vec<(usize, u32)>);

    fn pass(wide: bool, base: &[f32], model: &[f32], keys: BracketKeys, stop_after: Option<usize>) -> Pass {
        let mut seen = Vec::new();
        let mut calls = 0;
        let mut tracking = keys.span > 0;
        let inside = |at: usize, mask: u32, lanes: &[u32; 8]| {
            seen.extend((0..8).filter(|i| mask & (1 << i) != 0).map(|i| (at + i, lanes[i])));
            calls += 1;
            tracking = stop_after.is_none_or(|n| calls < n);
            tracking
        };
        let mut hits = Hits::default();
        // SAFETY: the caller checked the CPU's extensions.
        let (done, mut u, mut l, mut h) = unsafe {
            if wide {
                bracket_f32_avx512(base, model, keys, &mut hits, inside)
            } else {
                bracket_f32(base, model, keys, &mut hits, inside)
            }
        };
        for i in done..base.len() {
            let k = ((model[i] - base[i]).to_bits() & 0x7fff_ffff) ^ keys.flip;
            u += usize::from(k < keys.lo);
            l += usize::from(k == keys.lo);
            h += usize::from(k == keys.hi && keys.count_hi);
            if tracking && k.wrapping_sub(keys.first) < keys.span {
                seen.push((i, k));
            }
        }
        (u, l, h, seen)
    }

    #[test]
    fn the_avx512_kernel_counts_and_hands_over_what_the_avx2_kernel_does() {
        let has = |f: &str| match f {
            "avx2" => is_x86_feature_detected!("avx2"),
            _ => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
            }
        };
        if !has("avx2") || !has("avx512") {
            eprintln!("skipped: this CPU lacks AVX2 or AVX-512");
            return;
        }
        let value = |seed: u64, i: usize| crate::kernels::random::normal(seed, i as u64) as f32;
        // Repeated values (a bf16-like grid) so that keys equal the bracket ends often.
        let grid = |x: f32| (x * 8.0).round() / 8.0;
        // Stops land early: near the end of a length whose tail is 8–15 entries, the AVX-512
        // kernel leaves eight entries to the tail that the AVX2 kernel hands over as one vector,
        // and a stop counted in hand-overs would differ (the caller's stop, a gather cap, does not).
        for len in [0, 7, 16, 33, 2048, 2064, 5000] {
            let base: Vec<f32> = (0..len).map(|i| grid(value(1, i))).collect();
            let model: Vec<f32> = (0..len).map(|i| grid(value(2, i))).collect();
            let key = |x: f32| x.to_bits() & 0x7fff_ffff;
            for (flip, lo, hi, count_hi) in [
                (0, key(0.25), key(1.0), true),
                (0, key(0.0), key(0.125), false),
                (
                    u32::MAX >> 1,
                    key(0.5) ^ (u32::MAX >> 1),
                    key(0.125) ^ (u32::MAX >> 1),
                    true,
                ),
                (0, key(2.0), key(2.0), true),
            ] {
                let (first, span) = (lo.wrapping_add(1), hi.saturating_sub(lo).saturating_sub(1));
                let keys = BracketKeys {
                    flip,
                    lo,
                    hi,
                    count_hi,
                    first,
                    span,
                };
                for stop_after in [None, Some(1), Some(3)] {
                    assert_eq!(
                        pass(true, &base, &model, keys, stop_after),
                        pass(false, &base, &model, keys, stop_after),
                        "len {len}, lo {lo:#x}, hi {hi:#x}, stop after {stop_after:?}"
                    );
                }
            }
        }
    }
}

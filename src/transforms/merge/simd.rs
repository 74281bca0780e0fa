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

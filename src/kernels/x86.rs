//! AVX2 + F16C kernels for the hot 16-bit paths (BF16/F16 ↔ F32, BF16 ↔ F16, scale), eight
//! elements per vector. Each kernel handles the whole vectors of its input and returns how many
//! elements it did; the caller finishes the tail with the scalar codec, which produces the same
//! bits (tests in `mod.rs` check this byte for byte).
//!
//! Loads and stores are unaligned (`loadu`/`storeu`), so any byte offset from a file read works.
//! Rounding: `_mm256_cvtps_ph` with an explicit round-to-nearest-even immediate (MXCSR's rounding
//! mode is ignored); bf16 uses the integer `+0x7fff + lsb` trick, identical to
//! `scalar::f32_to_bf16`.
//!
//! Measured on the 2-core dev VM (1 MiB chunks, in cache, release; `kernel_speed` test), in
//! source+destination GB/s: BF16→F16 59 (the portable path: 10), F16→BF16 29 (6), BF16→F32 98
//! (31), F32→BF16 52 (15), F16→F32 98 (18), F32→F16 84 (23); scale BF16 24 (10), F16 59 (8),
//! F32 146 (46).

// Intrinsics are safe to call inside `#[target_feature]` functions on recent compilers but not
// on the crate's MSRV (1.85), so kernel bodies sit in one `unsafe` block each.
#![allow(unused_unsafe)]

use std::arch::x86_64::*;

/// True when the CPU has everything these kernels use. `is_x86_feature_detected!` caches its
/// answer in an atomic, so checking once per 1 MiB chunk costs nothing measurable.
#[inline]
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
}

/// Eight bf16 at `p` (unaligned) widened to f32.
///
/// # Safety
/// AVX2 must be available and `p..p+16` readable.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load_bf16(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes; `loadu` has no alignment requirement.
    unsafe {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

/// Eight f32 rounded to bf16 (nearest even; NaN → quiet NaN as `scalar::f32_to_bf16`).
///
/// # Safety
/// AVX2 must be available.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn to_bf16(v: __m256) -> __m128i {
    // SAFETY: register-only intrinsics; the caller guarantees AVX2.
    unsafe {
        let bits = _mm256_castps_si256(v);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, bias));
        let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x40));
        let abs = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fff_ffff));
        let is_nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f80_0000));
        let r = _mm256_blendv_epi8(rounded, quiet, is_nan);
        // Every lane is in 0..=0xffff, so the unsigned-saturating pack is exact.
        _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r))
    }
}

/// Eight f16 at `p` (unaligned) widened to f32.
///
/// # Safety
/// F16C must be available and `p..p+16` readable.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load_f16(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
}

/// Eight f32 rounded to f16, nearest even.
///
/// # Safety
/// F16C must be available.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn to_f16(v: __m256) -> __m128i {
    // SAFETY: register-only intrinsic; the caller guarantees F16C.
    unsafe { _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v) }
}

/// Defines a kernel converting 8 × `$in` bytes to 8 × `$out` bytes per step.
macro_rules! convert_kernel {
    ($(#[$doc:meta])* $name:ident, $in:literal, $out:literal, |$p:ident, $q:ident| $body:expr) => {
        $(#[$doc])*
        ///
        /// Returns the number of elements converted (a multiple of 8); the caller converts the rest.
        ///
        /// # Safety
        /// AVX2 and F16C must be available (`available()`). Slices may have any alignment;
        /// only whole elements that fit in both are touched.
        #[target_feature(enable = "avx2,f16c")]
        pub(crate) unsafe fn $name(src: &[u8], dst: &mut [u8]) -> usize {
            let n = (src.len() / $in).min(dst.len() / $out) / 8 * 8;
            let s = src.as_ptr();
            let d = dst.as_mut_ptr();
            let mut i = 0;
            while i < n {
                // SAFETY: i + 8 <= n, so bytes [i*$in, (i+8)*$in) of `src` and
                // [i*$out, (i+8)*$out) of `dst` are in bounds; loads/stores are unaligned; the
                // caller guarantees the CPU features.
                unsafe {
                    let $p = s.add(i * $in);
                    let $q = d.add(i * $out);
                    $body;
                }
                i += 8;
            }
            n
        }
    };
}

convert_kernel!(
    /// bf16 → f32.
    bf16_to_f32, 2, 4, |p, q| _mm256_storeu_ps(q as *mut f32, load_bf16(p))
);
convert_kernel!(
    /// f32 → bf16, nearest even.
    f32_to_bf16, 4, 2, |p, q| _mm_storeu_si128(
        q as *mut __m128i,
        to_bf16(_mm256_loadu_ps(p as *const f32))
    )
);
convert_kernel!(
    /// f16 → f32.
    f16_to_f32, 2, 4, |p, q| _mm256_storeu_ps(q as *mut f32, load_f16(p))
);
convert_kernel!(
    /// f32 → f16, nearest even.
    f32_to_f16, 4, 2, |p, q| _mm_storeu_si128(
        q as *mut __m128i,
        to_f16(_mm256_loadu_ps(p as *const f32))
    )
);
convert_kernel!(
    /// bf16 → f16 through an exact f32, so a single rounding.
    bf16_to_f16, 2, 2, |p, q| _mm_storeu_si128(q as *mut __m128i, to_f16(load_bf16(p)))
);
convert_kernel!(
    /// f16 → bf16 through an exact f32, so a single rounding.
    f16_to_bf16, 2, 2, |p, q| _mm_storeu_si128(q as *mut __m128i, to_bf16(load_f16(p)))
);

/// Defines an in-place kernel multiplying 8 elements of `$size` bytes per step in f32.
macro_rules! scale_kernel {
    ($(#[$doc:meta])* $name:ident, $size:literal, |$p:ident, $by:ident| $body:expr) => {
        $(#[$doc])*
        ///
        /// Returns the number of elements done (a multiple of 8); the caller does the rest.
        ///
        /// # Safety
        /// AVX2 and F16C must be available (`available()`). Any alignment.
        #[target_feature(enable = "avx2,f16c")]
        pub(crate) unsafe fn $name(buf: &mut [u8], by: f32) -> usize {
            let n = buf.len() / $size / 8 * 8;
            let b = buf.as_mut_ptr();
            // SAFETY: register-only; the caller guarantees AVX.
            let $by = unsafe { _mm256_set1_ps(by) };
            let mut i = 0;
            while i < n {
                // SAFETY: i + 8 <= n, so bytes [i*$size, (i+8)*$size) are in bounds; unaligned
                // loads/stores; the caller guarantees the CPU features.
                unsafe {
                    let $p = b.add(i * $size);
                    $body;
                }
                i += 8;
            }
            n
        }
    };
}

scale_kernel!(
    /// bf16 × `by` in f32, rounded back nearest even.
    scale_bf16, 2, |p, by| _mm_storeu_si128(
        p as *mut __m128i,
        to_bf16(_mm256_mul_ps(load_bf16(p), by))
    )
);
scale_kernel!(
    /// f16 × `by` in f32, rounded back nearest even.
    scale_f16, 2, |p, by| _mm_storeu_si128(
        p as *mut __m128i,
        to_f16(_mm256_mul_ps(load_f16(p), by))
    )
);
scale_kernel!(
    /// f32 × `by`.
    scale_f32, 4, |p, by| _mm256_storeu_ps(
        p as *mut f32,
        _mm256_mul_ps(_mm256_loadu_ps(p as *const f32), by)
    )
);

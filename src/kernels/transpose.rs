//! Out-of-place transpose of a small column-major tile into rows, the inner step of `permute`'s
//! banded transpose. 2- and 4-byte elements go through 8×8 / 4×4 register transposes (SSE2,
//! which every x86_64 CPU has): one load per eight (four) elements instead of one per element,
//! which took a fifth of a 2 GiB BF16 transpose's CPU time. Other sizes and the edges of a tile
//! are copied element by element; the result is the same bytes either way (test below).

/// Transposes `tile`, `n` runs of `h` elements of `size` bytes (run `j` at `tile[j * h * size..]`),
/// into `h` rows of `n` elements: element `j` of row `t` at `dst[(t * ld + j) * size..]`.
///
/// # Panics
/// If `tile` holds fewer than `n * h` elements or `dst` ends before the last row's end.
pub fn transpose_tile(size: usize, tile: &[u8], h: usize, n: usize, dst: &mut [u8], ld: usize) {
    if h == 0 || n == 0 {
        return;
    }
    assert!(tile.len() >= n * h * size && dst.len() >= ((h - 1) * ld + n) * size && ld >= n);
    let (t_done, j_done) = simd(size, tile, h, n, dst, ld);
    // Rows below the register blocks, then the columns right of them.
    copy_elements(size, tile, h, (t_done, h), (0, n), dst, ld);
    copy_elements(size, tile, h, (0, t_done), (j_done, n), dst, ld);
}

/// Element by element: rows `rows.0..rows.1`, columns `cols.0..cols.1`.
fn copy_elements(
    size: usize,
    tile: &[u8],
    h: usize,
    rows: (usize, usize),
    cols: (usize, usize),
    dst: &mut [u8],
    ld: usize,
) {
    fn typed<const N: usize>(
        tile: &[u8],
        h: usize,
        rows: (usize, usize),
        cols: (usize, usize),
        dst: &mut [u8],
        ld: usize,
    ) {
        for t in rows.0..rows.1 {
            let row = &mut dst[(t * ld + cols.0) * N..(t * ld + cols.1) * N];
            for (j, d) in (cols.0..cols.1).zip(row.chunks_exact_mut(N)) {
                let at = (j * h + t) * N;
                d.copy_from_slice(&tile[at..at + N]);
            }
        }
    }
    match size {
        1 => typed::<1>(tile, h, rows, cols, dst, ld),
        2 => typed::<2>(tile, h, rows, cols, dst, ld),
        4 => typed::<4>(tile, h, rows, cols, dst, ld),
        8 => typed::<8>(tile, h, rows, cols, dst, ld),
        _ => {
            for t in rows.0..rows.1 {
                for j in cols.0..cols.1 {
                    let (at, to) = ((j * h + t) * size, (t * ld + j) * size);
                    dst[to..to + size].copy_from_slice(&tile[at..at + size]);
                }
            }
        }
    }
}

/// The register-blocked part: returns how many rows and columns it did (whole blocks).
#[cfg(target_arch = "x86_64")]
fn simd(size: usize, tile: &[u8], h: usize, n: usize, dst: &mut [u8], ld: usize) -> (usize, usize) {
    match size {
        2 => x86::blocks(tile, h, n, dst, ld, x86::transpose_u16),
        4 => x86::blocks(tile, h, n, dst, ld, x86::transpose_u32),
        _ => (0, 0),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn simd(_: usize, _: &[u8], _: usize, _: usize, _: &mut [u8], _: usize) -> (usize, usize) {
    (0, 0)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Sixteen bytes at `bytes[at..]`, bounds-checked.
    #[inline(always)]
    fn load(bytes: &[u8], at: usize) -> __m128i {
        let v: &[u8; 16] = bytes[at..at + 16].try_into().expect("sixteen bytes");
        // SAFETY: `v` is sixteen readable bytes; the load is unaligned; SSE2 is part of x86_64.
        unsafe { _mm_loadu_si128(v.as_ptr().cast()) }
    }

    #[inline(always)]
    fn store(bytes: &mut [u8], at: usize, v: __m128i) {
        let d: &mut [u8; 16] = (&mut bytes[at..at + 16]).try_into().expect("sixteen bytes");
        // SAFETY: `d` is sixteen writable bytes; the store is unaligned; SSE2 is part of x86_64.
        unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), v) }
    }

    /// The whole `K × K` blocks of the tile, each loaded as `K` registers (one per run), turned
    /// by `transpose` and stored as `K` row pieces; elements of `16 / K` bytes. Returns the rows
    /// and columns done.
    #[inline]
    pub(super) fn blocks<const K: usize>(
        tile: &[u8],
        h: usize,
        n: usize,
        dst: &mut [u8],
        ld: usize,
        transpose: impl Fn([__m128i; K]) -> [__m128i; K],
    ) -> (usize, usize) {
        let size = 16 / K;
        let (rows, cols) = (h - h % K, n - n % K);
        for t in (0..rows).step_by(K) {
            for j in (0..cols).step_by(K) {
                let runs = std::array::from_fn(|k| load(tile, ((j + k) * h + t) * size));
                for (i, v) in transpose(runs).into_iter().enumerate() {
                    store(dst, ((t + i) * ld + j) * size, v);
                }
            }
        }
        (rows, cols)
    }

    /// Eight registers of eight 2-byte lanes, transposed: lanes paired across neighbouring
    /// registers, after which the pairs of the even and of the odd registers are two 4×4
    /// transposes of 4-byte lanes.
    #[inline(always)]
    pub(super) fn transpose_u16(a: [__m128i; 8]) -> [__m128i; 8] {
        // SAFETY: SSE2 is part of x86_64; the unpacks only move lanes between registers.
        let (low, high) = unsafe {
            (
                std::array::from_fn(|k| _mm_unpacklo_epi16(a[2 * k], a[2 * k + 1])),
                std::array::from_fn(|k| _mm_unpackhi_epi16(a[2 * k], a[2 * k + 1])),
            )
        };
        let (low, high) = (transpose_u32(low), transpose_u32(high));
        std::array::from_fn(|i| if i < 4 { low[i] } else { high[i - 4] })
    }

    /// Four registers of four 4-byte lanes, transposed.
    #[inline(always)]
    pub(super) fn transpose_u32(a: [__m128i; 4]) -> [__m128i; 4] {
        // SAFETY: SSE2 is part of x86_64; the unpacks only move lanes between registers.
        unsafe {
            let b0 = _mm_unpacklo_epi32(a[0], a[1]);
            let b1 = _mm_unpackhi_epi32(a[0], a[1]);
            let b2 = _mm_unpacklo_epi32(a[2], a[3]);
            let b3 = _mm_unpackhi_epi32(a[2], a[3]);
            [
                _mm_unpacklo_epi64(b0, b2),
                _mm_unpackhi_epi64(b0, b2),
                _mm_unpacklo_epi64(b1, b3),
                _mm_unpackhi_epi64(b1, b3),
            ]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_the_element_by_element_transpose_for_every_size_and_edge() {
        for size in [1usize, 2, 3, 4, 8] {
            for (h, n) in [(1, 1), (7, 9), (8, 8), (16, 24), (17, 13), (33, 70), (4, 3)] {
                let tile: Vec<u8> = (0..n * h * size).map(|i| (i * 7 + i / 251) as u8).collect();
                for ld in [n, n + 5] {
                    let mut got = vec![0xAAu8; ((h - 1) * ld + n) * size];
                    let mut want = got.clone();
                    transpose_tile(size, &tile, h, n, &mut got, ld);
                    copy_elements(size, &tile, h, (0, h), (0, n), &mut want, ld);
                    assert_eq!(got, want, "size {size}, {h}×{n}, ld {ld}");
                    // Element (t, j) is run j's element t.
                    let (t, j) = (h - 1, n - 1);
                    assert_eq!(&got[(t * ld + j) * size..][..size], &tile[(j * h + t) * size..][..size]);
                }
            }
        }
    }
}

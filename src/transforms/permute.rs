//! `permute`: reorder a tensor's dimensions (NumPy `transpose(order)`); the result is stored
//! contiguous in the new order. The lazy [`PermuteOp`] produces any chunk of the result by reading
//! only the source elements it needs:
//!
//! - dimensions are first simplified (size-1 dimensions dropped, neighbours that stay adjacent in
//!   the source merged), so e.g. `[0, 2, 1, 3]` on `(a, b, c, d)` is a batched transpose of
//!   `(b, c)` blocks with runs of `d`;
//! - when the last (merged) output dimension is contiguous in the source, each output row is one
//!   source read ("rows");
//! - when the second-to-last one is (a batched 2-D transpose), a chunk is a band of output rows:
//!   the matching column block of the source is read in runs, one per source row, in tiles of at
//!   most [`TILE_ELEMS`] elements, and scattered row by row ("tiles");
//! - any other order reads the whole source into memory once (the only case that must, since a
//!   chunk's elements are scattered over the source without contiguous runs) and gathers from it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use serde_json::Value as Json;

use super::{count_noun, destinations, Context, Flow, StepError, Transform, TransformError, TransformSpec, Writes};
use crate::dtype::DType;
use crate::formats::LazyMap;
use crate::memory::Scratch;
use crate::plan::document::kind_of;
use crate::plan::payload::{compact, Field, FieldKind};
use crate::plan::{Location, PlanError};
use crate::references::{Reference, Target};
use crate::state::{Match, State};
use crate::value::{strides, LazyOp, ReadContext, Tensor, Value, ValueError, CHUNK_BYTES};

/// Elements of the source read per tile before they are scattered: 64 KiB of BF16, well within
/// L2 together with the output band it is written into.
const TILE_ELEMS: usize = 1 << 15;

const PERMUTE_FIELDS: &[Field] = &[
    Field::required("from", FieldKind::Reference, "tensors to permute (may be sliced)"),
    Field::required("to", FieldKind::Target, "destination names"),
    Field::required(
        "order",
        FieldKind::Numbers,
        "the source dimension for each result dimension, a permutation of 0..ndim (negatives count from the end)",
    ),
];

/// `permute`.
pub const PERMUTE: TransformSpec = TransformSpec {
    name: "permute",
    summary: "new tensors with dimensions reordered (stored contiguous)",
    form: super::Form::Plain,
    fields: PERMUTE_FIELDS,
    parse: |value, cx| {
        let p = cx.payload(value)?;
        let order = p.get("order").unwrap_or(&Json::Null);
        let items = match order {
            Json::Array(items) => items.iter().map(Json::as_i64).collect::<Option<Vec<i64>>>(),
            _ => None,
        };
        let Some(order_list) = items else {
            return Err(PlanError::invalid(
                &p.at("order"),
                format!(
                    "expected a list of dimension indices, got {} `{}`",
                    kind_of(order),
                    compact(order)
                ),
            ));
        };
        Ok(Box::new(Permute {
            from: p.reference("from")?,
            to: p.target("to")?,
            order: order_list,
            location: cx.location.clone(),
        }))
    },
};

#[derive(Debug)]
struct Permute {
    from: Reference,
    to: Target,
    order: Vec<i64>,
    location: Location,
}

/// `order` normalised against `m`'s dimensions, or why it is not a permutation.
fn resolve_order(m: &Match, order: &[i64]) -> Result<Vec<usize>, TransformError> {
    let ndim = m.tensor.shape.len();
    let error = || TransformError::NotPermutation {
        tensor: m.display(),
        shape: m.tensor.shape.clone(),
        order: order.to_vec(),
    };
    if order.len() != ndim {
        return Err(error());
    }
    let mut seen = vec![false; ndim];
    let mut out = Vec::with_capacity(ndim);
    for &d in order {
        let d = if d < 0 { d + ndim as i64 } else { d };
        if d < 0 || d >= ndim as i64 || seen[d as usize] {
            return Err(error());
        }
        seen[d as usize] = true;
        out.push(d as usize);
    }
    Ok(out)
}

impl Transform for Permute {
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError> {
        let matches = state.select_some(&self.from, &self.location)?;
        let mut orders = Vec::with_capacity(matches.len());
        for m in &matches {
            orders.push(resolve_order(m, &self.order)?);
            if m.tensor.dtype.size().is_none() {
                return Err(TransformError::Unsupported {
                    op: "permute",
                    tensor: m.display(),
                    dtype: m.tensor.dtype,
                }
                .into());
            }
        }
        let destinations = destinations(state, &matches, &self.to, Writes::New, "permute", &self.location)?;
        for ((m, d), order) in matches.iter().zip(&destinations).zip(&orders) {
            let tensor = permuted(&m.tensor, order).map_err(|e| TransformError::value_of(&m.display(), e))?;
            state.insert(&d.alias, &d.name, tensor);
        }
        ctx.note(format!("permute: {} by {:?}", count_noun(matches.len()), self.order));
        Ok(Flow::Continue)
    }
}

/// The lazy permutation of `source` (`order` is a valid permutation of its dimensions).
pub fn permuted(source: &Tensor, order: &[usize]) -> Result<Tensor, ValueError> {
    let shape: Vec<usize> = order.iter().map(|&d| source.shape[d]).collect();
    if order.iter().enumerate().all(|(i, &d)| i == d) {
        return Ok(source.clone());
    }
    let src_strides = strides(&source.shape);
    // Simplify: drop size-1 dimensions, merge neighbours that stay adjacent in the source.
    let mut dims: Vec<usize> = Vec::new();
    let mut dim_strides: Vec<usize> = Vec::new();
    for (&d, &len) in order.iter().zip(&shape) {
        if len == 1 {
            continue;
        }
        let stride = src_strides[d];
        match (dims.last_mut(), dim_strides.last_mut()) {
            (Some(prev_len), Some(prev_stride)) if *prev_stride == stride * len => {
                *prev_len *= len;
                *prev_stride = stride;
            }
            _ => {
                dims.push(len);
                dim_strides.push(stride);
            }
        }
    }
    if dims.is_empty() {
        dims.push(1);
        dim_strides.push(1);
    }
    let r = dims.len();
    let mode = if dim_strides[r - 1] == 1 {
        Mode::Rows
    } else if r >= 2 && dim_strides[r - 2] == 1 {
        Mode::Tiles
    } else {
        Mode::Whole
    };
    Tensor::op(
        source.dtype,
        shape,
        Arc::new(PermuteOp {
            source: source.clone(),
            dims,
            strides: dim_strides,
            mode,
            whole: Mutex::new(None),
            gathered: std::sync::atomic::AtomicUsize::new(0),
            bands: Mutex::new(Vec::new()),
            spare: Arc::default(),
            band_pass: std::sync::atomic::AtomicUsize::new(0),
            bands_mapped: Arc::default(),
            mapped: match &*source.value {
                Value::Stored { file, offset } => Some(LazyMap::new(file.clone(), *offset, source.nbytes(), true)),
                _ => None,
            },
        }),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Rows,
    Tiles,
    Whole,
}

/// A permuted tensor: the (simplified) output dimensions and the source stride of each.
#[derive(Debug)]
pub struct PermuteOp {
    source: Tensor,
    dims: Vec<usize>,
    strides: Vec<usize>,
    mode: Mode,
    /// The whole source, read once, for orders that cannot stream: within the run's memory
    /// budget, else in its arena.
    whole: Mutex<Option<Arc<Scratch>>>,
    /// Bytes gathered from an arena copy since its pages were last given back.
    gathered: std::sync::atomic::AtomicUsize,
    /// A stored source's bytes mapped, for tiles: a run of a few elements per source row is a
    /// copy from the page cache instead of a system call (8192 `pread`s of 128 bytes per chunk of
    /// an 8192×2048 BF16 transpose ran at 0.27 GB/s). Unmapped once every element has been served,
    /// so mapped pages do not pile up in the resident set across a plan.
    /// `None` for a source that is not stored.
    mapped: Option<LazyMap>,
    /// For a stored source too large for a mapping within the memory budget: the bands of source
    /// rows read last (see [`PermuteOp::read_banded`]), newest last.
    bands: Mutex<Vec<Arc<Band>>>,
    /// Buffers of bands dropped, for the next bands (a new band's pages are faulted in and
    /// zeroed).
    spare: Spare,
    /// Bytes served through bands in the current pass over the tensor.
    band_pass: std::sync::atomic::AtomicUsize,
    /// Band buffers mapped so far (the others were reused).
    bands_mapped: Arc<std::sync::atomic::AtomicUsize>,
}

/// Band buffers kept for reuse.
type Spare = Arc<Mutex<SparePool>>;

/// Buffers of dropped bands, kept while a pass over the tensor is in progress (`open`: from the
/// first band taken to the last byte served; a band dropped after that is unmapped).
#[derive(Debug, Default)]
struct SparePool {
    buffers: Vec<BandBuffer>,
    open: bool,
}

impl SparePool {
    /// Closes the pool and hands back its buffers, to be unmapped outside the lock.
    fn close(spare: &Spare) -> Vec<BandBuffer> {
        let mut pool = spare.lock().unwrap_or_else(|e| e.into_inner());
        pool.open = false;
        std::mem::take(&mut pool.buffers)
    }
}

/// A band's bytes: an anonymous mapping of its own, so a dropped band's memory leaves the
/// resident set at once (32 MB buffers from the allocator stayed in its heaps now and then: a
/// third band's worth of peak RSS on the 256 MB transpose).
#[derive(Debug)]
struct BandBuffer {
    map: memmap2::MmapMut,
    len: usize,
}

impl BandBuffer {
    /// `len` bytes: a spare buffer large enough, else a new mapping.
    fn take(spare: &Spare, len: usize, mapped: &std::sync::atomic::AtomicUsize) -> Result<BandBuffer, ValueError> {
        let mut spare = spare.lock().unwrap_or_else(|e| e.into_inner());
        spare.open = true;
        let fits = spare.buffers.iter().enumerate().filter(|(_, b)| b.map.len() >= len);
        if let Some((i, _)) = fits.min_by_key(|(_, b)| b.map.len()) {
            let mut buffer = spare.buffers.swap_remove(i);
            buffer.len = len;
            return Ok(buffer);
        }
        drop(spare);
        mapped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let map = memmap2::MmapMut::map_anon(len.max(1)).map_err(|_| ValueError::OutOfMemory {
            op: "permute",
            bytes: len,
        })?;
        Ok(BandBuffer { map, len })
    }

    fn bytes(&self) -> &[u8] {
        &self.map[..self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map[..self.len]
    }
}

/// Output rows `[q0, q0 + width)` of one plane of a tiled permutation, read from the source and
/// stored in output order; set once read (`None` if reading failed).
#[derive(Debug)]
struct Band {
    plane: usize,
    q0: usize,
    width: usize,
    bytes: std::sync::OnceLock<Option<BandBuffer>>,
    /// Element size, and output bytes served from the band so far (dropped once all served).
    size: usize,
    served: std::sync::atomic::AtomicUsize,
    /// The band's bytes counted against the run's budget while it is kept (`None` when the
    /// budget is spent: the bands of all readers stay near a quarter of it by their width).
    _budget: Option<crate::memory::Reservation>,
    /// Where the buffer goes when the band is dropped.
    spare: Spare,
}

impl Drop for Band {
    fn drop(&mut self) {
        if let Some(Some(bytes)) = self.bytes.take() {
            let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
            // At most a buffer per reader: the bands kept never need more at once.
            if spare.open && spare.buffers.len() < band_readers() {
                spare.buffers.push(bytes);
            }
        }
    }
}

impl Band {
    /// The bytes read (empty until then, which [`PermuteOp::band`] never hands out).
    fn bytes(&self) -> &[u8] {
        self.bytes.get().and_then(Option::as_ref).map_or(&[], BandBuffer::bytes)
    }
}

/// The last (output) dimension of simplified dimensions `dims`.
fn cols_of(dims: &[usize]) -> usize {
    dims.last().copied().unwrap_or(1)
}

/// Readers sharing the bands: the threads of the pool reading (each works on its own range of
/// chunks, so each needs its own band), at least two; two outside a pool (an assertion, a
/// product's operand, a read from Python), where one thread reads.
fn band_readers() -> usize {
    match rayon::current_thread_index() {
        Some(_) => rayon::current_num_threads().max(2),
        None => 2,
    }
}

impl PermuteOp {
    /// The mapped bytes of a stored source (mapped on first use), or `None` to read instead.
    fn mapping(&self) -> Option<Arc<crate::formats::mapped::GuardedMap>> {
        self.mapped.as_ref()?.get()
    }

    /// Counts served bytes; drops the mapping once the whole tensor has been served.
    fn served(&self, bytes: usize) {
        if let Some(map) = &self.mapped {
            map.served(bytes, self.source.nbytes());
        }
    }

    /// Whether tiles come from bands read with `pread` rather than from a mapping: for a stored
    /// source larger than a quarter of the memory budget. A transpose touches every source row
    /// for each chunk, and the kernel maps the cached neighbours of each touched page too, so a
    /// mapping makes the whole source resident within one chunk whatever the budget.
    fn banded(&self, cx: &ReadContext) -> bool {
        self.mapped.is_some() && self.source.nbytes() as u64 > cx.memory().limit() / 4
    }

    /// Elements `[start, ..)` of a tiled permutation through bands: each band holds `width`
    /// consecutive output rows of a plane, in output order, sized so the bands kept take a
    /// quarter of the budget together; serving a chunk is a copy.
    fn read_banded(&self, size: usize, start: usize, out: &mut [u8], cx: &mut ReadContext) -> Result<(), ValueError> {
        let r = self.dims.len();
        let (rows, cols) = (self.dims[r - 2], self.dims[r - 1]);
        let plane = rows * cols;
        let budget = usize::try_from(cx.memory().limit()).unwrap_or(usize::MAX);
        // At most TILE_ELEMS / 8 rows, so eight source runs fit the tile `read_band` reads them
        // into (narrow outputs of long source rows would otherwise take a tile as large as a band).
        let width = (budget / 4 / band_readers() / (cols * size).max(1)).clamp(1, rows.min(TILE_ELEMS / 8));
        let n = out.len() / size;
        let mut done = 0;
        while done < n {
            cx.check()?;
            let pos = start + done;
            let (p, within) = (pos / plane, pos % plane);
            let q0 = within / cols - within / cols % width;
            let band = self.band(p, q0, width.min(rows - q0), size, cx)?;
            let from = within - q0 * cols;
            let count = (band.width * cols - from).min(n - done);
            out[done * size..(done + count) * size].copy_from_slice(&band.bytes()[from * size..(from + count) * size]);
            self.band_served(&band, count * size);
            done += count;
        }
        Ok(())
    }

    /// Counts `bytes` of output served from `band`; a band that has served all its rows is
    /// dropped (a pass over the tensor reads each band once; eviction bounds the rest).
    fn band_served(&self, band: &Arc<Band>, bytes: usize) {
        let total = band.width * cols_of(&self.dims) * (band.size);
        let served = band.served.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed) + bytes;
        if served >= total {
            self.bands
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|b| !Arc::ptr_eq(b, band));
        }
        // Every byte served once: a pass is over. What is left (a band begun for rows another
        // thread served, the spare buffers) is unmapped, outside the locks.
        let nbytes = self.source.nbytes();
        let passed = self.band_pass.fetch_add(bytes, std::sync::atomic::Ordering::AcqRel) + bytes;
        if passed >= nbytes {
            self.band_pass.fetch_sub(nbytes, std::sync::atomic::Ordering::AcqRel);
            let left = std::mem::take(&mut *self.bands.lock().unwrap_or_else(|e| e.into_inner()));
            drop(left);
            drop(SparePool::close(&self.spare));
        }
    }

    /// The band of output rows `[q0, q0 + width)` of plane `plane`: kept, or read now. The lock
    /// is held only to find or enter the band: a thread needing the same band waits for its one
    /// read, a thread needing another band reads it meanwhile.
    fn band(
        &self,
        plane: usize,
        q0: usize,
        width: usize,
        size: usize,
        cx: &mut ReadContext,
    ) -> Result<Arc<Band>, ValueError> {
        loop {
            cx.check()?;
            let band = {
                let mut bands = self.bands.lock().unwrap_or_else(|e| e.into_inner());
                match bands
                    .iter()
                    .find(|b| b.plane == plane && b.q0 == q0 && b.width == width)
                {
                    Some(band) => band.clone(),
                    None => {
                        // One band per reader: the oldest no reader holds makes room (a band
                        // begun by one thread and left for another, where the writer split the
                        // chunks, is read again when that thread gets to it). Keeping it instead
                        // measured 94 MiB instead of 64 on the 256 MB transpose.
                        if bands.len() >= band_readers() {
                            let idle = bands.iter().position(|b| Arc::strong_count(b) == 1);
                            bands.remove(idle.unwrap_or(0));
                        }
                        let band = Arc::new(Band {
                            plane,
                            q0,
                            width,
                            bytes: std::sync::OnceLock::new(),
                            size,
                            served: std::sync::atomic::AtomicUsize::new(0),
                            _budget: cx.memory().reserve(cols_of(&self.dims) * width * size),
                            spare: self.spare.clone(),
                        });
                        bands.push(band.clone());
                        band
                    }
                }
            };
            let mut failure = None;
            let read = band
                .bytes
                .get_or_init(|| match self.read_band(plane, q0, width, size, cx) {
                    Ok(bytes) => Some(bytes),
                    Err(e) => {
                        failure = Some(e);
                        None
                    }
                });
            if read.is_some() {
                return Ok(band);
            }
            // A failed read is forgotten; the thread whose read failed reports its error, and a
            // thread that waited for it reads the band itself (and meets its own error).
            self.bands
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|b| !Arc::ptr_eq(b, &band));
            if let Some(e) = failure {
                return Err(e);
            }
        }
    }

    /// Reads the band of output rows `[q0, q0 + width)` of plane `plane`, in output order: the
    /// source runs (`width` elements each, one per output column) are read a block at a time
    /// into a small tile and scattered from there into the band's rows, so the band is written
    /// in whole cache lines (scattering each run across all rows of the band went through the
    /// caches once per element: 13 s for a 2 GiB BF16 transpose on one thread).
    fn read_band(
        &self,
        plane: usize,
        q0: usize,
        width: usize,
        size: usize,
        cx: &mut ReadContext,
    ) -> Result<BandBuffer, ValueError> {
        let r = self.dims.len();
        let cols = self.dims[r - 1];
        let col_stride = self.strides[r - 1];
        let first = self.offset_of(plane, r - 2) + q0;
        // A buffer of a dropped band, else a new one; every byte is written below.
        let mut buffer = BandBuffer::take(&self.spare, cols * width * size, &self.bands_mapped)?;
        let bytes = buffer.bytes_mut();
        // A multiple of eight runs: whole register blocks of the transpose.
        let block = ((TILE_ELEMS / width).max(8) & !7).min(cols);
        let mut tile = cx.take(block * width * size);
        let mut result = Ok(());
        let mut c0 = 0;
        while c0 < cols {
            let c1 = cols.min(c0 + block);
            // Each source byte is read once (the dense reads of tiles would read the gaps too).
            result = cx.check().and_then(|()| {
                if col_stride == width {
                    return self
                        .source
                        .read(first + c0 * width, &mut tile[..(c1 - c0) * width * size], cx);
                }
                (c0..c1)
                    .zip(tile.chunks_exact_mut(width * size))
                    .try_for_each(|(c, run)| self.source.read(first + c * col_stride, run, cx))
            });
            if result.is_err() {
                break;
            }
            crate::kernels::transpose::transpose_tile(size, &tile, width, c1 - c0, &mut bytes[c0 * size..], cols);
            c0 = c1;
        }
        cx.give(tile);
        result.map(|()| buffer)
    }

    /// The source offset of the first element of output row `row` over `dims[..k]`.
    fn offset_of(&self, mut index: usize, k: usize) -> usize {
        let mut offset = 0;
        for d in (0..k).rev() {
            offset += (index % self.dims[d]) * self.strides[d];
            index /= self.dims[d];
        }
        offset
    }

    fn read_rows(&self, size: usize, start: usize, out: &mut [u8], cx: &mut ReadContext) -> Result<(), ValueError> {
        let r = self.dims.len();
        let len = self.dims[r - 1];
        let n = out.len() / size;
        let mut done = 0;
        while done < n {
            let pos = start + done;
            let (row, col) = (pos / len, pos % len);
            let count = (len - col).min(n - done);
            let src = self.offset_of(row, r - 1) + col;
            self.source
                .read(src, &mut out[done * size..(done + count) * size], cx)?;
            done += count;
        }
        Ok(())
    }

    fn read_tiles(&self, size: usize, start: usize, out: &mut [u8], cx: &mut ReadContext) -> Result<(), ValueError> {
        let r = self.dims.len();
        let (rows, cols) = (self.dims[r - 2], self.dims[r - 1]);
        let col_stride = self.strides[r - 1];
        let plane = rows * cols;
        let end = start + out.len() / size;
        let mut pos = start;
        while pos < end {
            let (p, u0) = (pos / plane, pos % plane);
            let u1 = plane.min(u0 + (end - pos));
            let base = self.offset_of(p, r - 2);
            // Output position of plane-local index u is `u - u0 + shift`.
            let shift = pos - start;
            let (q_lo, q_hi) = (u0 / cols, u1.div_ceil(cols));
            let h = q_hi - q_lo;
            let (c_lo, c_hi) = if h == 1 {
                (u0 - q_lo * cols, u1 - q_lo * cols)
            } else {
                (0, cols)
            };
            let block = (TILE_ELEMS / h).clamp(1, c_hi - c_lo);
            let mut tile = cx.take(block * h * size);
            let mut c0 = c_lo;
            let mut result = Ok(());
            while c0 < c_hi {
                let c1 = c_hi.min(c0 + block);
                result = self.read_tile(base + q_lo, col_stride, h, c0, c1, &mut tile, size, cx);
                if result.is_err() {
                    break;
                }
                for t in 0..h {
                    let q = q_lo + t;
                    // Columns of this row inside both the block and the chunk.
                    let lo = c0.max(u0.saturating_sub(q * cols));
                    let hi = c1.min(u1.saturating_sub(q * cols));
                    if lo >= hi {
                        continue;
                    }
                    let at = q * cols + lo - u0 + shift;
                    let dst = &mut out[at * size..(at + hi - lo) * size];
                    scatter_row(size, &tile, h, t, lo - c0, dst);
                }
                c0 = c1;
            }
            cx.give(tile);
            result?;
            pos += u1 - u0;
        }
        Ok(())
    }

    /// Reads source runs `[first + c * stride, + h)` for columns `c0..c1` into `tile`
    /// (column-major: run `c - c0` at `(c - c0) * h`), in one read when the runs are dense.
    #[allow(clippy::too_many_arguments)]
    fn read_tile(
        &self,
        first: usize,
        stride: usize,
        h: usize,
        c0: usize,
        c1: usize,
        tile: &mut [u8],
        size: usize,
        cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        let count = c1 - c0;
        if let Some(map) = self.mapping() {
            for j in 0..count {
                let src = (first + (c0 + j) * stride) * size;
                match map.get(src..src + h * size) {
                    Some(run) => tile[j * h * size..(j + 1) * h * size].copy_from_slice(run),
                    None => {
                        return Err(ValueError::Compute {
                            op: "permute",
                            reason: "a source run lies outside the mapped tensor".into(),
                        })
                    }
                }
            }
            map.check()?;
            cx.count_read(count * h * size);
            return Ok(());
        }
        let span = (count - 1) * stride + h;
        if stride <= 4 * h && span * size <= 4 * CHUNK_BYTES {
            let mut tmp = cx.take(span * size);
            let result = self.source.read(first + c0 * stride, &mut tmp, cx);
            if result.is_ok() {
                for j in 0..count {
                    let from = j * stride * size;
                    tile[j * h * size..(j + 1) * h * size].copy_from_slice(&tmp[from..from + h * size]);
                }
            }
            cx.give(tmp);
            return result;
        }
        for j in 0..count {
            let src = first + (c0 + j) * stride;
            self.source.read(src, &mut tile[j * h * size..(j + 1) * h * size], cx)?;
        }
        Ok(())
    }

    fn read_whole(&self, size: usize, start: usize, out: &mut [u8], cx: &mut ReadContext) -> Result<(), ValueError> {
        let whole = {
            let mut slot = self.whole.lock().unwrap_or_else(|e| e.into_inner());
            match &*slot {
                Some(whole) => whole.clone(),
                None => {
                    let total = self.source.numel();
                    let mut whole = cx.alloc("permute", total * size)?;
                    // In chunks through a reused buffer: written into the arena with `pwrite`,
                    // so a spilled copy does not pass through the resident set.
                    let per = (CHUNK_BYTES / size).max(1);
                    let mut chunk = cx.take(per.min(total) * size);
                    let mut at = 0;
                    let mut result = Ok(());
                    while at < total && result.is_ok() {
                        let n = per.min(total - at);
                        result = self.source.read(at, &mut chunk[..n * size], cx).and_then(|()| {
                            whole
                                .write_at(at * size, &chunk[..n * size])
                                .map_err(|e| ValueError::Compute {
                                    op: "permute",
                                    reason: format!("the scratch arena could not be written: {e}"),
                                })
                        });
                        at += n;
                    }
                    cx.give(chunk);
                    result?;
                    let whole = Arc::new(whole);
                    *slot = Some(whole.clone());
                    whole
                }
            }
        };
        self.gather(&whole, size, start, out);
        // The gather touches pages all over an arena copy; they are given back each time about
        // a sixteenth of the budget has been gathered, so the resident set stays near the budget
        // (an estimate: a scattered gather touches more pages than it copies bytes).
        if whole.in_arena() {
            let budget = cx.memory().limit() as usize;
            let gathered = self.gathered.fetch_add(out.len(), std::sync::atomic::Ordering::Relaxed) + out.len();
            if gathered >= (budget / 16).max(CHUNK_BYTES) {
                self.gathered.store(0, std::sync::atomic::Ordering::Relaxed);
                whole.settle();
            }
        }
        Ok(())
    }

    /// Copies elements `[start, ..)` of the permutation of `whole` (the source) into `out`.
    fn gather(&self, whole: &Scratch, size: usize, start: usize, out: &mut [u8]) {
        let whole = whole.bytes();
        let r = self.dims.len();
        let n = out.len() / size;
        let mut index = vec![0usize; r];
        let mut rest = start;
        for d in (0..r).rev() {
            index[d] = rest % self.dims[d];
            rest /= self.dims[d];
        }
        let mut src: usize = index.iter().zip(&self.strides).map(|(i, s)| i * s).sum();
        for k in 0..n {
            out[k * size..(k + 1) * size].copy_from_slice(&whole[src * size..(src + 1) * size]);
            // Odometer step.
            for d in (0..r).rev() {
                index[d] += 1;
                src += self.strides[d];
                if index[d] < self.dims[d] {
                    break;
                }
                src -= self.strides[d] * self.dims[d];
                index[d] = 0;
            }
        }
    }
}

/// Copies row `t` of a column-major tile (runs of `h` elements) from column `c` on into `dst`.
fn scatter_row(size: usize, tile: &[u8], h: usize, t: usize, c: usize, dst: &mut [u8]) {
    fn typed<const N: usize>(tile: &[u8], h: usize, t: usize, c: usize, dst: &mut [u8]) {
        for (j, d) in dst.chunks_exact_mut(N).enumerate() {
            let at = ((c + j) * h + t) * N;
            d.copy_from_slice(&tile[at..at + N]);
        }
    }
    match size {
        1 => typed::<1>(tile, h, t, c, dst),
        2 => typed::<2>(tile, h, t, c, dst),
        4 => typed::<4>(tile, h, t, c, dst),
        8 => typed::<8>(tile, h, t, c, dst),
        _ => {
            for (j, d) in dst.chunks_exact_mut(size).enumerate() {
                let at = ((c + j) * h + t) * size;
                d.copy_from_slice(&tile[at..at + size]);
            }
        }
    }
}

impl LazyOp for PermuteOp {
    fn inputs(&self) -> Vec<&Tensor> {
        vec![&self.source]
    }

    fn release(&self) {
        *self.whole.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // Taken under the locks, unmapped outside them.
        let bands = std::mem::take(&mut *self.bands.lock().unwrap_or_else(|e| e.into_inner()));
        drop(bands);
        drop(SparePool::close(&self.spare));
        self.band_pass.store(0, std::sync::atomic::Ordering::Release);
    }

    fn name(&self) -> &'static str {
        "permute"
    }

    fn materialized(&self, seen: &mut HashSet<usize>) -> usize {
        // Orders that cannot stream hold the whole source; the others a chunk at a time.
        let own = if self.mode == Mode::Whole {
            self.source.nbytes()
        } else {
            0
        };
        own.saturating_add(self.source.materialized(seen))
    }

    fn resident(&self, limit: u64, seen: &mut HashSet<usize>) -> u64 {
        // A transpose of a stored source reads it through bands taking a quarter of the budget,
        // or (within a quarter of it) touches every page of its mapping.
        let own = match (&self.mode, &self.mapped) {
            (Mode::Tiles, Some(_)) => (self.source.nbytes() as u64).min(limit / 4),
            _ => 0,
        };
        own.saturating_add(self.source.resident(limit, seen))
    }

    fn bytes_to_read(&self, seen: &mut HashSet<usize>) -> u64 {
        // Every mode reads the source once; the whole-tensor mode keeps it for later readers.
        if self.mode == Mode::Whole && !seen.insert(self as *const Self as usize) {
            return 0;
        }
        self.source.bytes_to_read(seen)
    }

    fn read(
        &self,
        dtype: DType,
        _shape: &[usize],
        start: usize,
        out: &mut [u8],
        cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        let Some(size) = dtype.size() else {
            return Ok(());
        };
        if out.is_empty() {
            return Ok(());
        }
        match self.mode {
            Mode::Rows => self.read_rows(size, start, out, cx),
            Mode::Tiles if self.banded(cx) => self.read_banded(size, start, out, cx),
            Mode::Tiles => {
                self.read_tiles(size, start, out, cx)?;
                self.served(out.len());
                Ok(())
            }
            Mode::Whole => self.read_whole(size, start, out, cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n as u32).flat_map(|v| v.to_le_bytes()).collect();
        Tensor::in_memory(DType::U32, shape.to_vec(), Arc::new(bytes))
    }

    /// The permutation computed the obvious way.
    fn naive(shape: &[usize], order: &[usize]) -> Vec<u32> {
        let src = strides(shape);
        let out_shape: Vec<usize> = order.iter().map(|&d| shape[d]).collect();
        let n: usize = shape.iter().product();
        (0..n)
            .map(|mut i| {
                let mut offset = 0;
                for k in (0..out_shape.len()).rev() {
                    offset += (i % out_shape[k]) * src[order[k]];
                    i /= out_shape[k];
                }
                offset as u32
            })
            .collect()
    }

    fn read_all(t: &Tensor, chunk: usize) -> Vec<u32> {
        let n = t.numel();
        let mut got = Vec::new();
        let mut cx = ReadContext::default();
        let mut start = 0;
        while start < n {
            let k = chunk.min(n - start);
            let mut out = vec![0u8; k * 4];
            t.read(start, &mut out, &mut cx).unwrap();
            got.extend(out.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())));
            start += k;
        }
        got
    }

    #[test]
    fn every_order_matches_the_naive_permutation_in_any_chunking() {
        let cases: &[(&[usize], &[usize])] = &[
            (&[5, 7], &[1, 0]),
            (&[1, 7], &[1, 0]),
            (&[3, 4, 5], &[0, 2, 1]),
            (&[3, 4, 5], &[2, 0, 1]),
            (&[3, 4, 5], &[1, 2, 0]),
            (&[3, 4, 5], &[2, 1, 0]),
            (&[3, 4, 5], &[1, 0, 2]),
            (&[2, 3, 4, 5], &[0, 2, 1, 3]),
            (&[2, 3, 1, 5], &[3, 2, 0, 1]),
            (&[300, 7], &[1, 0]),
        ];
        for (shape, order) in cases {
            let t = permuted(&source(shape), order).unwrap();
            let expected = naive(shape, order);
            for chunk in [1, 3, 7, 20, 64, 10_000] {
                assert_eq!(read_all(&t, chunk), expected, "{shape:?} by {order:?}, chunk {chunk}");
            }
        }
    }

    /// A stored `shape` tensor of u32 counting up, in `dir`.
    fn stored_counting(dir: &std::path::Path, shape: &[usize]) -> Tensor {
        let path = dir.join("w.bin");
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n as u32).flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = Arc::new(crate::formats::SourceFile::open(&path).unwrap());
        Tensor::stored(DType::U32, shape.to_vec(), file, 0)
    }

    /// Reads `t` in chunks of `chunk` elements, in `order` of the chunks, on `threads` threads of
    /// a pool (0: the calling thread), under a budget of `limit` bytes.
    fn read_banded_chunks(t: &Tensor, chunk: usize, threads: usize, limit: u64, dir: &std::path::Path) -> Vec<u32> {
        use rayon::prelude::*;
        let memory = Arc::new(crate::memory::Memory::new(limit, dir.to_path_buf()));
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let n = t.numel();
        let starts: Vec<usize> = (0..n).step_by(chunk).collect();
        let read = |start: usize| {
            let mut cx = ReadContext::for_run(cancel.clone(), memory.clone());
            let mut out = vec![0u8; chunk.min(n - start) * 4];
            t.read(start, &mut out, &mut cx).unwrap();
            out
        };
        let parts: Vec<Vec<u8>> = if threads == 0 {
            starts.iter().map(|&s| read(s)).collect()
        } else {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| starts.par_iter().map(|&s| read(s)).collect())
        };
        parts
            .concat()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn banded_reads_equal_the_permutation_and_leave_no_buffers_after_a_pass() {
        // 3 planes of 300×500 u32 transposed under a 1 MB budget: bands of a few output rows, a
        // narrower last band per plane, chunks across band and plane boundaries, one reader or
        // a pool's.
        let dir = tempfile::tempdir().unwrap();
        let shape = [3usize, 300, 500];
        let expected = naive(&shape, &[0, 2, 1]);
        for (chunk, threads) in [(4096, 0), (777, 0), (777, 2), (1000, 3)] {
            let t = permuted(&stored_counting(dir.path(), &shape), &[0, 2, 1]).unwrap();
            assert_eq!(read_banded_chunks(&t, chunk, threads, 1 << 20, dir.path()), expected);
            let Value::Op(op) = &*t.value else {
                panic!("a permutation is an operation")
            };
            // Debug shows the kept bands and spare buffers: none once every byte was served.
            let state = format!("{op:?}");
            assert!(state.contains("bands: Mutex { data: [],"), "bands left: {state}");
            assert!(state.contains("buffers: [],"), "buffers left: {state}");
        }
    }

    #[test]
    fn one_reader_reuses_two_band_buffers_for_a_whole_pass() {
        // 512×1024 u32 → 1024 output rows of 2 KiB; a 256 KiB budget gives bands of 32 rows
        // (64 KiB), and chunks of one band each end where a band ends.
        let dir = tempfile::tempdir().unwrap();
        let t = permuted(&stored_counting(dir.path(), &[512, 1024]), &[1, 0]).unwrap();
        let got = read_banded_chunks(&t, 32 * 512, 0, 256 << 10, dir.path());
        assert_eq!(got, naive(&[512, 1024], &[1, 0]));
        let Value::Op(op) = &*t.value else {
            panic!("a permutation is an operation")
        };
        let state = format!("{op:?}");
        assert!(
            state.contains("bands_mapped: 1") || state.contains("bands_mapped: 2"),
            "{state}"
        );
    }

    #[test]
    fn a_stored_source_that_shrinks_mid_read_is_an_error_not_a_fault() {
        // 512×512 u32 transposed: tiles read through the guarded map of the stored bytes.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        let (rows, cols) = (512usize, 512usize);
        let bytes: Vec<u8> = (0..(rows * cols) as u32).flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = Arc::new(crate::formats::SourceFile::open(&path).unwrap());
        let stored = Tensor::stored(DType::U32, vec![rows, cols], file, 0);
        let t = permuted(&stored, &[1, 0]).unwrap();
        let mut cx = ReadContext::default();
        let mut first = vec![0u8; 4 * cols];
        t.read(0, &mut first, &mut cx).unwrap();
        assert_eq!(&first[4..8], &(cols as u32).to_le_bytes());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let mut rest = vec![0u8; 4 * (rows * cols - cols)];
        let err = t.read(cols, &mut rest, &mut cx).unwrap_err();
        assert!(crate::error::error_chain(&err).contains("shrank"), "{err}");
    }

    #[test]
    fn rejects_non_permutations() {
        let t = source(&[2, 3, 4]);
        let m = Match {
            alias: "m".into(),
            name: "x".into(),
            tensor: t.clone(),
            base: t,
            slice: None,
            captures: Reference::parse_str("x").unwrap().selector.captures("x").unwrap(),
        };
        assert_eq!(resolve_order(&m, &[2, 0, -2]).unwrap(), vec![2, 0, 1]);
        for bad in [&[0, 1][..], &[0, 1, 1], &[0, 1, 3], &[0, 1, -4]] {
            let err = resolve_order(&m, bad).unwrap_err();
            assert!(matches!(err, TransformError::NotPermutation { .. }));
            let text = err.to_string();
            assert!(text.contains("`m::x`") && text.contains("(2, 3, 4)"), "{text}");
        }
    }
}

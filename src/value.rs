//! Lazy tensor values (SPEC §8.2). A transform never computes bytes: it builds a [`Tensor`], a
//! description of where the bytes come from (a stored range of an input file, a view, a cast, a
//! scale, a write through a slice). Bytes are produced only when a tensor is written or a value
//! assertion inspects it, chunk by chunk, through [`Tensor::read`] into caller-owned buffers.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::dtype::{checked_numel, DType};
use crate::formats::{FormatError, LazyMap, SourceFile, TensorEntry};
use crate::kernels;
use crate::linalg::Real;
use crate::memory::{Element, Memory, MemoryError, Scratch};
use crate::references::ResolvedSlice;

/// Bytes per streaming chunk: about a core's L2 (SPEC §8: 1 MiB chunks were 1.3–5× faster than
/// 16–64 MiB buffers). A multiple of every element size.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Stack for threads that read lazy values: the engine's worker (command line, Python), the
/// writer pool and matmul's operand reader; compute-only pools (faer's) keep the default.
/// Reading recurses once per operation stacked on a tensor (a plan applying 1000 in-place edits
/// to one tensor nests 1000 deep), which overflowed rayon's 2 MiB default. A level takes 608
/// bytes in release (`tests::stack_per_chain_level`), so 64 MiB covers ~110k levels. It is
/// reserved, not committed: a thread's RSS grows only with the depth it reaches, which is why
/// the writer threads keep it (their count is what is bounded, `executor::MAX_THREADS_PER_CORE`).
pub const ENGINE_STACK_BYTES: usize = 64 << 20;

/// A strided read whose covering span is at most this many bytes reads the span once and
/// gathers; a sparser one reads element by element.
const GATHER_SPAN_LIMIT: usize = 4 * CHUNK_BYTES;

/// A run of a stored strided tensor whose elements are at most this many elements apart is read
/// as one span and gathered (at most this much read amplification); sparser runs are gathered
/// from a memory map, where only the touched pages are read.
const SPAN_GATHER_MAX_STRIDE: usize = 8;

/// Why a lazy value cannot be built or read: the value layer's error.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    /// An input's bytes could not be read.
    #[error(transparent)]
    Read(#[from] FormatError),
    /// The run was interrupted (Ctrl-C) while values were read.
    #[error("interrupted")]
    Cancelled,
    /// A computation could not complete (a worker pool could not start, a computation
    /// panicked); not the user's input.
    #[error("{op} failed: {reason}")]
    Compute {
        /// The operation.
        op: &'static str,
        /// What happened.
        reason: String,
    },
    /// The dtype has no whole-byte element size (sub-byte floats): such tensors are carried
    /// through whole, never sliced, converted or computed on.
    #[error("{op} cannot compute on {dtype} tensors: they are carried through unchanged only")]
    NoByteSize {
        /// The operation refused.
        op: &'static str,
        /// The dtype.
        dtype: DType,
    },
    /// Memory for a tensor computed whole (a product, a permutation that cannot stream) could
    /// not be had.
    #[error("{op} needs {bytes} bytes of memory at once, and they could not be allocated")]
    OutOfMemory {
        /// The operation.
        op: &'static str,
        /// The bytes asked for.
        bytes: usize,
    },
    /// The memory budget and the scratch arena could not hold a tensor computed whole.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A result would take more bytes than memory addresses reach (more than `isize::MAX`):
    /// no file or buffer can hold it.
    #[error("{op} would make a {dtype} tensor of shape {shape:?}, too large to address")]
    TooLarge {
        /// The operation refused.
        op: &'static str,
        /// The result's dtype.
        dtype: DType,
        /// The result's shape.
        shape: Vec<usize>,
    },
}

/// Refuses a result of `shape` and `dtype` whose byte size overflows or exceeds `isize::MAX`
/// (the most any buffer or file offset can hold), so sizes computed later never wrap.
pub fn check_addressable(op: &'static str, dtype: DType, shape: &[usize]) -> Result<(), ValueError> {
    let bytes = checked_numel(shape).and_then(|numel| dtype.nbytes(numel));
    match bytes {
        Some(b) if b <= isize::MAX as usize => Ok(()),
        _ => Err(ValueError::TooLarge {
            op,
            dtype,
            shape: shape.to_vec(),
        }),
    }
}

/// A vector of `len` copies of `fill`, or an error when the memory cannot be had: for whole
/// tensors computed in memory, whose size the input decides (a failed plain allocation aborts
/// the process, skipping every cleanup).
pub fn try_filled<T: Clone>(op: &'static str, len: usize, fill: T) -> Result<Vec<T>, ValueError> {
    let mut v = Vec::new();
    let bytes = len.saturating_mul(std::mem::size_of::<T>());
    v.try_reserve_exact(len)
        .map_err(|_| ValueError::OutOfMemory { op, bytes })?;
    v.resize(len, fill);
    Ok(v)
}

/// An owned byte buffer a [`Value::Memory`] tensor reads from (a NumPy array handed over by
/// Python, a constant).
pub trait Bytes: Send + Sync + std::fmt::Debug {
    /// The bytes, little-endian, row-major.
    fn bytes(&self) -> &[u8];

    /// Whether the memory is the host's own, lent to the engine (an array handed in from
    /// Python): a view of it may be handed back. The engine's own bytes are copied out instead,
    /// since a consumer that ignores read-only flags (torch through DLPack) could change them.
    fn lent_by_host(&self) -> bool {
        false
    }

    /// Copies bytes `[start, start + out.len())` into `out` (an arena region reads its file,
    /// so streaming a spilled tensor out does not map its pages).
    fn read_into(&self, start: usize, out: &mut [u8]) -> Result<(), ValueError> {
        copy_from(self.bytes(), start, out)
    }
}

impl Bytes for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl Bytes for Scratch {
    fn bytes(&self) -> &[u8] {
        Scratch::bytes(self)
    }

    fn read_into(&self, start: usize, out: &mut [u8]) -> Result<(), ValueError> {
        Scratch::read_into(self, start, out).map_err(|e| ValueError::Compute {
            op: "reading",
            reason: format!("the scratch arena could not be read: {e}"),
        })
    }
}

/// A lazy operation defined outside this module (one file per transform family): element-wise
/// arithmetic, generated values, permutations, products. It produces the elements of the tensor
/// it describes on demand, like every other [`Value`].
pub trait LazyOp: Send + Sync + std::fmt::Debug {
    /// The operation's name in messages (`concatenation`, `permute`).
    fn name(&self) -> &'static str;

    /// Fills `out` with elements `[start, start + out.len() / dtype.size())` of the result, in
    /// row-major order. `dtype` and `shape` are the result's, as recorded in its [`Tensor`].
    fn read(
        &self,
        dtype: DType,
        shape: &[usize],
        start: usize,
        out: &mut [u8],
        cx: &mut ReadContext,
    ) -> Result<(), ValueError>;

    /// The tensors the operation reads (for releasing what they keep once it has been written);
    /// empty where not listed, which stops the release there.
    fn inputs(&self) -> Vec<&Tensor> {
        Vec::new()
    }

    /// Drops what the operation keeps for later readers (a product, a permutation's source
    /// copy): called once nothing will read it again in this run. A later read computes it
    /// again.
    fn release(&self) {}

    /// Bytes this operation holds in memory at once when read (a product computed whole, a
    /// permutation that cannot stream), its operands' included; 0 for streaming operations.
    /// Tensors whose bytes are reused are counted once per distinct operation.
    fn materialized(&self, _seen: &mut HashSet<usize>) -> usize {
        0
    }

    /// Bytes of input files reading the whole result once reads (see
    /// [`Tensor::bytes_to_read`]): its operands' for a streaming operation; an operation that
    /// computes its result once and keeps it counts its operands only when it first enters
    /// `seen` (by address). 0 for operations that read no input (fills, noise).
    fn bytes_to_read(&self, _seen: &mut HashSet<usize>) -> u64 {
        0
    }

    /// Bytes resident while the result is read under a budget of `limit` bytes beyond what
    /// [`LazyOp::materialized`] counts: a transpose's bands, or the pages of a mapped source it
    /// touches all of (page cache, not allocations, but in the resident set). Its inputs' (as
    /// listed by [`LazyOp::inputs`]) by default.
    fn resident(&self, limit: u64, seen: &mut HashSet<usize>) -> u64 {
        self.inputs().iter().map(|t| t.resident(limit, seen)).sum()
    }
}

/// An element-wise function applied in place (see [`Value::Map`]).
pub trait ElementFn: Send + Sync + std::fmt::Debug {
    /// Transforms `values` in place: elements `[index, index + n)` of the changed region (of the
    /// whole tensor without a region), in row-major order of the region, holding the base's
    /// values. `index` lets functions with a second operand read the matching elements of it.
    fn apply(&self, dtype: DType, index: usize, values: &mut [u8], cx: &mut ReadContext) -> Result<(), ValueError>;

    /// Bytes its operands compute whole in memory (see [`LazyOp::materialized`]).
    fn materialized(&self, _seen: &mut HashSet<usize>) -> usize {
        0
    }

    /// The tensors it reads (a second operand), none by default.
    fn inputs(&self) -> Vec<&Tensor> {
        Vec::new()
    }

    /// Bytes of input files its operands read (see [`LazyOp::bytes_to_read`]); 0 without any.
    fn bytes_to_read(&self, _seen: &mut HashSet<usize>) -> u64 {
        0
    }
}

/// Multiplication by a factor, computed in f32 (f64 for F64) and rounded back.
#[derive(Debug)]
pub struct ScaleFn(pub f64);

impl ElementFn for ScaleFn {
    fn apply(&self, dtype: DType, _index: usize, values: &mut [u8], _cx: &mut ReadContext) -> Result<(), ValueError> {
        kernels::scale_in_place(dtype, values, self.0);
        Ok(())
    }
}

/// A tensor: its dtype and shape, and how to produce its bytes.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// Where the bytes come from.
    pub value: Arc<Value>,
}

/// How a tensor's bytes are produced.
#[derive(Debug)]
pub enum Value {
    /// Contiguous bytes of an input file starting at `offset`.
    Stored {
        /// The file.
        file: Arc<SourceFile>,
        /// Absolute byte offset of the first element.
        offset: u64,
    },
    /// Elements of an input file at arbitrary non-negative strides (a non-contiguous PyTorch
    /// tensor: transposed, stepped, expanded, a narrow view of a larger storage).
    Strided(StridedSource),
    /// Bytes held in memory.
    Memory(Arc<dyn Bytes>),
    /// An operation implemented by a transform family.
    Op(Arc<dyn LazyOp>),
    /// A slice of `base` (same dtype).
    View {
        /// The viewed tensor.
        base: Tensor,
        /// The selection, resolved against `base.shape`.
        slice: ResolvedSlice,
    },
    /// `base` converted to the tensor's dtype.
    Cast {
        /// The source.
        base: Tensor,
    },
    /// `base` with an element-wise function applied in place to the elements of `region`, or to
    /// all of them (same dtype and shape as `base`): `scale_`, `clamp_`, `add_` through a slice.
    Map {
        /// The source.
        base: Tensor,
        /// The elements changed (resolved against `base.shape`); `None` for all.
        region: Option<ResolvedSlice>,
        /// The function.
        f: Arc<dyn ElementFn>,
    },
    /// `base` with the elements selected by `region` replaced by `with` (same dtype; `with` has
    /// the region's shape): a write through a slice.
    Overwrite {
        /// The tensor written into.
        base: Tensor,
        /// The selection, resolved against `base.shape`.
        region: ResolvedSlice,
        /// The values written.
        with: Tensor,
    },
}

/// Where a strided stored tensor's elements are: element `(i_0, …, i_k)` starts at byte
/// `offset + Σ i_d·strides_d·itemsize` of `file`. The reader of the format checked that every
/// element lies inside the file.
#[derive(Debug)]
pub struct StridedSource {
    /// The file.
    pub file: Arc<SourceFile>,
    /// Absolute byte offset of the first element.
    pub offset: u64,
    /// The shape the strides belong to. Elements are served in its row-major order; a reshape
    /// of the tensor keeps this value (and so this shape), as it keeps every other value.
    pub shape: Vec<usize>,
    /// Element strides, one per dimension of `shape`.
    pub strides: Vec<usize>,
    /// The bytes from the first element to the end of the last one, mapped for runs too sparse
    /// to read as a span (a transposed matrix: one `pread` per element would be a system call
    /// per element); unmapped once every element has been served.
    map: LazyMap,
}

impl StridedSource {
    /// Fills `out` with `count` elements starting `first` elements into the extent, `stride`
    /// elements apart.
    fn gather(
        &self,
        size: usize,
        first: usize,
        stride: usize,
        count: usize,
        out: &mut [u8],
        cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        if stride == 1 {
            return Ok(self.file.read_at(self.offset + (first * size) as u64, out)?);
        }
        if stride == 0 {
            let (head, rest) = out.split_at_mut(size);
            self.file.read_at(self.offset + (first * size) as u64, head)?;
            for dst in rest.chunks_exact_mut(size) {
                dst.copy_from_slice(head);
            }
            return Ok(());
        }
        let span = (count - 1) * stride + 1;
        if stride <= SPAN_GATHER_MAX_STRIDE && span * size <= GATHER_SPAN_LIMIT {
            let mut tmp = cx.take(span * size);
            let result = self.file.read_at(self.offset + (first * size) as u64, &mut tmp);
            if result.is_ok() {
                for (j, dst) in out.chunks_exact_mut(size).enumerate() {
                    let at = j * stride * size;
                    dst.copy_from_slice(&tmp[at..at + size]);
                }
            }
            cx.give(tmp);
            return Ok(result?);
        }
        let mapped = self.map.get();
        let map = mapped.as_deref().map(|m| &m[..]).unwrap_or_default();
        for (j, dst) in out.chunks_exact_mut(size).enumerate() {
            let at = (first + j * stride) * size;
            match map.get(at..at + size) {
                Some(bytes) => dst.copy_from_slice(bytes),
                None => self.file.read_at(self.offset + at as u64, dst)?,
            }
        }
        if let Some(mapped) = &mapped {
            mapped.check()?;
        }
        Ok(())
    }
}

/// Reads elements `[start, ..)` of a strided stored tensor in row-major order, one run along the
/// last dimension at a time.
fn read_strided(
    source: &StridedSource,
    size: usize,
    start: usize,
    out: &mut [u8],
    cx: &mut ReadContext,
) -> Result<(), ValueError> {
    let shape = &source.shape;
    let k = shape.len();
    let (Some(&row_len), Some(&last_stride)) = (shape.last(), source.strides.last()) else {
        return Ok(source.file.read_at(source.offset, out)?); // a scalar
    };
    if row_len == 0 {
        return Ok(());
    }
    let mut remaining = out.len() / size;
    let mut pos = start;
    let mut written = 0;
    while remaining > 0 {
        let (row, col) = (pos / row_len, pos % row_len);
        let mut rest = row;
        let mut row_offset = 0usize;
        for d in (0..k - 1).rev() {
            row_offset += (rest % shape[d]) * source.strides[d];
            rest /= shape[d];
        }
        let count = (row_len - col).min(remaining);
        let dst = &mut out[written * size..(written + count) * size];
        source.gather(size, row_offset + col * last_stride, last_stride, count, dst, cx)?;
        pos += count;
        written += count;
        remaining -= count;
    }
    Ok(())
}

/// A tensor stored in chunks (a distributed checkpoint's tensor saved by several ranks), read
/// by streaming each run of elements from the chunk holding it: no buffer of the whole tensor.
#[derive(Debug)]
struct Assembled {
    /// Each chunk's offset in the whole tensor and its elements, sorted by offset. The reader
    /// checked that they tile the tensor exactly.
    chunks: Vec<(Vec<usize>, Tensor)>,
    /// The chunk the last run came from: the next run is most often in it or the next one.
    hint: std::sync::atomic::AtomicUsize,
}

impl Assembled {
    /// The chunk holding the element at `index`.
    fn find(&self, index: &[usize]) -> Option<usize> {
        let holds = |c: usize| {
            self.chunks.get(c).is_some_and(|(offsets, t)| {
                index
                    .iter()
                    .zip(offsets.iter().zip(&t.shape))
                    .all(|(&i, (&o, &s))| o <= i && i < o + s)
            })
        };
        let hint = self.hint.load(Ordering::Relaxed);
        let found = [hint, hint + 1]
            .into_iter()
            .find(|&c| holds(c))
            .or_else(|| (0..self.chunks.len()).find(|&c| holds(c)))?;
        self.hint.store(found, Ordering::Relaxed);
        Some(found)
    }
}

impl LazyOp for Assembled {
    fn name(&self) -> &'static str {
        "assembling a tensor from its chunks"
    }

    fn read(
        &self,
        dtype: DType,
        shape: &[usize],
        start: usize,
        out: &mut [u8],
        cx: &mut ReadContext,
    ) -> Result<(), ValueError> {
        let size = element_size(dtype, self.name())?;
        let numel = checked_numel(shape).unwrap_or(usize::MAX);
        let k = shape.len();
        let mut index = vec![0usize; k];
        let (mut pos, mut written) = (start, 0usize);
        let mut remaining = out.len() / size;
        if start.checked_add(remaining).is_none_or(|end| end > numel) {
            return Err(ValueError::Compute {
                op: self.name(),
                reason: format!("elements {start}.. lie past the end of the tensor's {numel}"),
            });
        }
        while remaining > 0 {
            let mut rest = pos;
            for d in (0..k).rev() {
                index[d] = rest % shape[d];
                rest /= shape[d];
            }
            let c = self.find(&index).ok_or_else(|| ValueError::Compute {
                op: self.name(),
                reason: format!("no chunk holds element {index:?}"),
            })?;
            let (offsets, chunk) = &self.chunks[c];
            // Trailing dimensions the chunk spans whole run on together: elements stay
            // consecutive in the chunk and in the tensor until the next one out along `d - 1`.
            let mut d = k;
            let mut inner = 1usize;
            while d > 0 && chunk.shape[d - 1] == shape[d - 1] {
                d -= 1;
                inner *= shape[d];
            }
            let run = if d == 0 {
                numel - pos
            } else {
                let m = d - 1;
                (offsets[m] + chunk.shape[m] - index[m]) * inner - pos % inner
            };
            let count = run.min(remaining);
            let mut local = 0usize;
            for d in 0..k {
                local = local * chunk.shape[d] + (index[d] - offsets[d]);
            }
            chunk.read(local, &mut out[written * size..(written + count) * size], cx)?;
            pos += count;
            written += count;
            remaining -= count;
        }
        Ok(())
    }

    fn inputs(&self) -> Vec<&Tensor> {
        self.chunks.iter().map(|(_, t)| t).collect()
    }

    fn bytes_to_read(&self, seen: &mut HashSet<usize>) -> u64 {
        self.chunks.iter().map(|(_, t)| t.bytes_to_read(seen)).sum()
    }
}

/// The value of an entry naming a file its checkpoint does not have: every read fails.
#[derive(Debug)]
struct Missing(String);

impl LazyOp for Missing {
    fn name(&self) -> &'static str {
        "reading"
    }

    fn read(&self, _: DType, _: &[usize], _: usize, _: &mut [u8], _: &mut ReadContext) -> Result<(), ValueError> {
        Err(ValueError::Compute {
            op: "reading",
            reason: format!("tensor {:?} names a file its checkpoint does not have", self.0),
        })
    }
}

/// What one reading thread carries through every read: reusable buffers for temporaries (so
/// steady-state streaming allocates nothing), the run's interruption flag, checked between
/// chunks by [`stream`] and by operations that compute a whole tensor, the run's count of
/// bytes read from input files, and the run's memory budget and arena, which tensors computed
/// whole are allocated from (the last three shared by every context forked from one).
#[derive(Debug, Default)]
pub struct ReadContext {
    pool: Vec<Vec<u8>>,
    cancel: Option<Arc<AtomicBool>>,
    bytes_read: Arc<AtomicU64>,
    memory: Arc<Memory>,
}

impl ReadContext {
    /// A context that stops reading with [`ValueError::Cancelled`] once `cancel` is set.
    pub fn cancellable(cancel: Arc<AtomicBool>) -> ReadContext {
        ReadContext {
            pool: Vec::new(),
            cancel: Some(cancel),
            bytes_read: Arc::default(),
            memory: Arc::default(),
        }
    }

    /// A context for a run: `cancel` as for [`ReadContext::cancellable`], whole tensors
    /// allocated from `memory`.
    pub fn for_run(cancel: Arc<AtomicBool>, memory: Arc<Memory>) -> ReadContext {
        ReadContext {
            memory,
            ..ReadContext::cancellable(cancel)
        }
    }

    /// The run's memory budget and arena.
    pub fn memory(&self) -> &Arc<Memory> {
        &self.memory
    }

    /// A zeroed buffer for a tensor `op` computes whole, within the run's budget or in its
    /// arena.
    pub fn alloc(&self, op: &'static str, len: usize) -> Result<Scratch, ValueError> {
        Ok(self.memory.alloc(op, len)?)
    }

    /// A fresh context (no buffers) sharing this one's interruption flag, for another thread.
    pub fn fork(&self) -> ReadContext {
        ReadContext {
            pool: Vec::new(),
            cancel: self.cancel.clone(),
            bytes_read: self.bytes_read.clone(),
            memory: self.memory.clone(),
        }
    }

    /// Counts `bytes` read from an input file (tensor data: a byte read twice counts twice).
    pub fn count_read(&self, bytes: usize) {
        self.bytes_read.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Bytes of input files read through this context and every context forked from it.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// [`ValueError::Cancelled`] once the run was interrupted.
    pub fn check(&self) -> Result<(), ValueError> {
        match &self.cancel {
            Some(flag) if flag.load(Ordering::Relaxed) => Err(ValueError::Cancelled),
            _ => Ok(()),
        }
    }

    /// A buffer of exactly `len` bytes (contents unspecified).
    pub fn take(&mut self, len: usize) -> Vec<u8> {
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    /// Returns a buffer for reuse.
    pub fn give(&mut self, buf: Vec<u8>) {
        self.pool.push(buf);
    }
}

/// Row-major element strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

impl Tensor {
    /// A tensor stored contiguously in an input file.
    pub fn stored(dtype: DType, shape: Vec<usize>, file: Arc<SourceFile>, offset: u64) -> Tensor {
        Tensor {
            dtype,
            shape,
            value: Arc::new(Value::Stored { file, offset }),
        }
    }

    /// The tensor an input entry describes, contiguous, strided or in chunks, read from the
    /// checkpoint's `files` (an entry's file index is into them). An index outside `files` (a
    /// reader's bug) gives a tensor whose reads fail.
    pub fn from_entry(entry: &TensorEntry, files: &[Arc<SourceFile>]) -> Tensor {
        if let Some(pieces) = &entry.pieces {
            let chunks = pieces
                .iter()
                .map(|p| (p.offsets.clone(), Tensor::from_entry(&p.entry, files)))
                .collect();
            return Tensor {
                dtype: entry.dtype,
                shape: entry.shape.clone(),
                value: Arc::new(Value::Op(Arc::new(Assembled {
                    chunks,
                    hint: std::sync::atomic::AtomicUsize::new(0),
                }))),
            };
        }
        let Some(file) = files.get(entry.file).cloned() else {
            let missing: Arc<dyn LazyOp> = Arc::new(Missing(entry.name.clone()));
            return Tensor {
                dtype: entry.dtype,
                shape: entry.shape.clone(),
                value: Arc::new(Value::Op(missing)),
            };
        };
        Tensor::from_file_entry(entry, file)
    }

    /// [`Tensor::from_entry`] of an entry stored in one piece, in `file`.
    fn from_file_entry(entry: &TensorEntry, file: Arc<SourceFile>) -> Tensor {
        let value = match &entry.strides {
            None => Value::Stored {
                file,
                offset: entry.offset,
            },
            Some(strides) => Value::Strided(StridedSource {
                map: LazyMap::new(
                    file.clone(),
                    entry.offset,
                    usize::try_from(entry.extent()).unwrap_or(usize::MAX),
                    false,
                ),
                file,
                offset: entry.offset,
                shape: entry.shape.clone(),
                strides: strides.clone(),
            }),
        };
        Tensor {
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            value: Arc::new(value),
        }
    }

    /// `self` with `f` applied in place to `region` (resolved against `self.shape`), or to every
    /// element.
    pub fn map(&self, region: Option<ResolvedSlice>, f: Arc<dyn ElementFn>) -> Result<Tensor, ValueError> {
        element_size(self.dtype, "element-wise operations")?;
        Ok(self.derived(
            self.dtype,
            self.shape.clone(),
            Value::Map {
                base: self.clone(),
                region,
                f,
            },
        ))
    }

    /// `self` converted to `dtype`.
    pub fn cast(&self, dtype: DType) -> Result<Tensor, ValueError> {
        element_size(self.dtype, "casting")?;
        element_size(dtype, "casting")?;
        check_addressable("casting", dtype, &self.shape)?;
        Ok(self.derived(dtype, self.shape.clone(), Value::Cast { base: self.clone() }))
    }

    /// `self` with the elements `region` selects (resolved against `self.shape`) replaced by
    /// `with` (same dtype, the region's shape).
    pub fn overwrite(&self, region: ResolvedSlice, with: Tensor) -> Result<Tensor, ValueError> {
        element_size(self.dtype, "writing through a slice")?;
        Ok(self.derived(
            self.dtype,
            self.shape.clone(),
            Value::Overwrite {
                base: self.clone(),
                region,
                with,
            },
        ))
    }

    /// A tensor produced by a lazy operation: one of byte-sized `dtype` (whole elements are
    /// what every operation computes on).
    pub fn op(dtype: DType, shape: Vec<usize>, op: Arc<dyn LazyOp>) -> Result<Tensor, ValueError> {
        element_size(dtype, op.name())?;
        check_addressable(op.name(), dtype, &shape)?;
        Ok(Tensor {
            dtype,
            shape,
            value: Arc::new(Value::Op(op)),
        })
    }

    fn derived(&self, dtype: DType, shape: Vec<usize>, value: Value) -> Tensor {
        Tensor {
            dtype,
            shape,
            value: Arc::new(value),
        }
    }

    /// A tensor whose bytes are in memory (`bytes.len()` must equal the tensor's byte size).
    pub fn in_memory(dtype: DType, shape: Vec<usize>, bytes: Arc<dyn Bytes>) -> Tensor {
        Tensor {
            dtype,
            shape,
            value: Arc::new(Value::Memory(bytes)),
        }
    }

    /// A view of the elements `slice` selects (resolved against `self.shape`), or the tensor
    /// itself when the slice selects everything.
    pub fn view(&self, slice: &ResolvedSlice) -> Result<Tensor, ValueError> {
        if slice.is_full() && slice.shape == self.shape {
            return Ok(self.clone());
        }
        element_size(self.dtype, "slicing")?;
        Ok(self.derived(
            self.dtype,
            slice.shape.clone(),
            Value::View {
                base: self.clone(),
                slice: slice.clone(),
            },
        ))
    }

    /// Bytes computing this tensor holds in memory at once (see [`LazyOp::materialized`]),
    /// through every value it is built on; `seen` lists operations already counted (by
    /// address), so a result read twice counts once.
    pub fn materialized(&self, seen: &mut HashSet<usize>) -> usize {
        match &*self.value {
            Value::Stored { .. } | Value::Strided(_) | Value::Memory(_) => 0,
            Value::Op(op) => {
                let key = Arc::as_ptr(op) as *const () as usize;
                if !seen.insert(key) {
                    return 0;
                }
                op.materialized(seen)
            }
            Value::View { base, .. } | Value::Cast { base } => base.materialized(seen),
            // A second operand (`add_` of a product) is computed whole too.
            Value::Map { base, f, .. } => base.materialized(seen).saturating_add(f.materialized(seen)),
            Value::Overwrite { base, with, .. } => base.materialized(seen).saturating_add(with.materialized(seen)),
        }
    }

    /// Levels of computation between this tensor's bytes and its inputs' (0 for stored bytes,
    /// one per cast, element-wise edit or operation stacked on them): a writing thread holds a
    /// chunk-sized temporary per level, at most two of them.
    pub fn levels(&self) -> usize {
        self.levels_within(2)
    }

    /// [`Tensor::levels`], looking `depth` levels down at most (values shared in a chain of
    /// edits are not walked once per path).
    fn levels_within(&self, depth: usize) -> usize {
        if depth == 0 {
            return 0;
        }
        let below = |t: &Tensor| t.levels_within(depth - 1);
        match &*self.value {
            Value::Stored { .. } | Value::Memory(_) => 0,
            Value::Strided(_) => 1,
            Value::View { base, .. } => base.levels_within(depth),
            Value::Cast { base } | Value::Map { base, .. } => 1 + below(base),
            Value::Overwrite { base, with, .. } => 1 + below(base).max(below(with)),
            Value::Op(op) => 1 + op.inputs().iter().map(|t| below(t)).max().unwrap_or(0),
        }
    }

    /// Bytes resident while this tensor is read beyond what it materializes (see
    /// [`LazyOp::resident`]), each operation counted once.
    pub fn resident(&self, limit: u64, seen: &mut HashSet<usize>) -> u64 {
        match &*self.value {
            Value::Stored { .. } | Value::Strided(_) | Value::Memory(_) => 0,
            Value::Op(op) => {
                let key = Arc::as_ptr(op) as *const () as usize;
                if !seen.insert(key) {
                    return 0;
                }
                op.resident(limit, seen)
            }
            Value::View { base, .. } | Value::Cast { base } | Value::Map { base, .. } => base.resident(limit, seen),
            Value::Overwrite { base, with, .. } => {
                base.resident(limit, seen).saturating_add(with.resident(limit, seen))
            }
        }
    }

    /// Bytes of input files reading the whole tensor once reads, from its lazy value alone
    /// (nothing is read): stored elements at their stored size, a view the share of its base
    /// it selects (exact for a contiguous selection of a stored tensor; a stepped one reads
    /// covering spans, which this does not count), a cast its base's, element-wise edits and
    /// writes through a slice their base and operands, operations what they say
    /// ([`LazyOp::bytes_to_read`]). `seen` lists operations already counted that keep their
    /// result (see there).
    pub fn bytes_to_read(&self, seen: &mut HashSet<usize>) -> u64 {
        match &*self.value {
            Value::Stored { .. } | Value::Strided(_) => self.nbytes() as u64,
            Value::Memory(_) => 0,
            Value::Cast { base } => base.bytes_to_read(seen),
            Value::View { base, .. } => {
                // The viewed share of the base's bytes; u128, so the product cannot overflow.
                let (part, whole) = (self.numel() as u128, base.numel() as u128);
                let of_base = base.bytes_to_read(seen) as u128;
                (of_base * part)
                    .checked_div(whole)
                    .map_or(0, |bytes| u64::try_from(bytes).unwrap_or(u64::MAX))
            }
            Value::Map { base, f, .. } => base.bytes_to_read(seen).saturating_add(f.bytes_to_read(seen)),
            Value::Overwrite { base, with, .. } => base.bytes_to_read(seen).saturating_add(with.bytes_to_read(seen)),
            Value::Op(op) => op.bytes_to_read(seen),
        }
    }

    /// Releases what operations computed whole for this tensor keep ([`LazyOp::release`]), down
    /// through the values only this tensor holds: called once it has been written, so the
    /// memory or arena space goes to the tensors computed next. A value another tensor also
    /// holds (a view of the product kept elsewhere) is left alone.
    pub fn release_unshared(&self) {
        self.release_unshared_besides(0);
    }

    /// [`Tensor::release_unshared`] when `others` more holders of this tensor's value are known
    /// to be done with it (the log of a step's reads).
    pub fn release_unshared_besides(&self, others: usize) {
        if Arc::strong_count(&self.value) > 1 + others {
            return;
        }
        match &*self.value {
            Value::Op(op) => {
                if Arc::strong_count(op) == 1 {
                    op.release();
                    // Inputs only this operation holds (the product under `permute(a @ b)`).
                    for input in op.inputs() {
                        input.release_unshared();
                    }
                }
            }
            Value::View { base, .. } | Value::Cast { base } | Value::Map { base, .. } => base.release_unshared(),
            Value::Overwrite { base, with, .. } => {
                base.release_unshared();
                with.release_unshared();
            }
            Value::Stored { .. } | Value::Strided(_) | Value::Memory(_) => {}
        }
    }

    /// Whether the value is computed (an operation, or a view, cast or edit of one may be):
    /// not bytes of a file or of memory as they are.
    pub fn computes(&self) -> bool {
        !matches!(
            &*self.value,
            Value::Stored { .. } | Value::Strided(_) | Value::Memory(_)
        )
    }

    /// The address of this tensor's value: tensors sharing a value (copies) have the same.
    pub fn value_address(&self) -> usize {
        Arc::as_ptr(&self.value) as *const () as usize
    }

    /// Adds the addresses of this tensor's value and of every value it is computed from.
    pub fn collect_values(&self, into: &mut HashSet<usize>) {
        if !into.insert(self.value_address()) {
            return;
        }
        match &*self.value {
            Value::Op(op) => op.inputs().into_iter().for_each(|t| t.collect_values(into)),
            Value::View { base, .. } | Value::Cast { base } => base.collect_values(into),
            Value::Map { base, f, .. } => {
                base.collect_values(into);
                f.inputs().into_iter().for_each(|t| t.collect_values(into));
            }
            Value::Overwrite { base, with, .. } => {
                base.collect_values(into);
                with.collect_values(into);
            }
            Value::Stored { .. } | Value::Strided(_) | Value::Memory(_) => {}
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        // Saturating: a shape too large to address is refused where it is made, and a size that
        // never fits must not wrap to a small one.
        checked_numel(&self.shape).unwrap_or(usize::MAX)
    }

    /// Size in bytes.
    pub fn nbytes(&self) -> usize {
        self.dtype.nbytes(self.numel()).unwrap_or(usize::MAX)
    }

    /// Whether the bytes are a stored range of a file, copied through unchanged.
    pub fn as_stored(&self) -> Option<(&Arc<SourceFile>, u64)> {
        match &*self.value {
            Value::Stored { file, offset } => Some((file, *offset)),
            _ => None,
        }
    }

    /// Reads bytes `[byte_start, byte_start + out.len())` of the tensor: stored and in-memory
    /// tensors of every dtype (sub-byte ones are carried through whole), computed ones in whole
    /// elements.
    pub fn read_bytes(&self, byte_start: usize, out: &mut [u8], cx: &mut ReadContext) -> Result<(), ValueError> {
        if out.is_empty() {
            return Ok(());
        }
        match &*self.value {
            Value::Stored { file, offset } => {
                cx.count_read(out.len());
                Ok(file.read_at(offset + byte_start as u64, out)?)
            }
            Value::Memory(bytes) => bytes.read_into(byte_start, out),
            _ => {
                let size = element_size(self.dtype, "reading")?;
                self.read(byte_start / size, out, cx)
            }
        }
    }

    /// Fills `out` with elements `[start, start + out.len() / itemsize)` of the tensor in
    /// row-major order.
    pub fn read(&self, start: usize, out: &mut [u8], cx: &mut ReadContext) -> Result<(), ValueError> {
        let size = element_size(self.dtype, "reading elements")?;
        if out.is_empty() {
            return Ok(());
        }
        match &*self.value {
            Value::Stored { file, offset } => {
                cx.count_read(out.len());
                Ok(file.read_at(offset + (start * size) as u64, out)?)
            }
            Value::Strided(source) => {
                cx.count_read(out.len());
                let result = read_strided(source, size, start, out, cx);
                source.map.served(out.len(), self.nbytes());
                result
            }
            Value::Memory(bytes) => bytes.read_into(start * size, out),
            Value::Cast { base } => {
                let n = out.len() / size;
                let base_size = element_size(base.dtype, "casting")?;
                let mut tmp = cx.take(n * base_size);
                let result = base.read(start, &mut tmp, cx);
                if result.is_ok() {
                    kernels::convert(base.dtype, &tmp, self.dtype, out);
                }
                cx.give(tmp);
                result
            }
            Value::Map { base, region, f } => read_map(base, region.as_ref(), &**f, self.dtype, size, start, out, cx),
            Value::View { base, slice } => read_view(base, slice, size, start, out, cx),
            Value::Overwrite { base, region, with } => read_overwrite(base, region, with, size, start, out, cx),
            Value::Op(op) => op.read(self.dtype, &self.shape, start, out, cx),
        }
    }

    /// The tensor's statistics (extremes, mean, non-finite counts), streamed.
    pub fn stats(&self, cx: &mut ReadContext) -> Result<kernels::Stats, ValueError> {
        let mut stats = kernels::Stats::default();
        self.stream(cx, |chunk| {
            kernels::accumulate_stats(self.dtype, chunk, &mut stats);
            Ok::<(), ValueError>(())
        })?;
        Ok(stats)
    }

    /// Streams the whole tensor through `f` (see [`stream`]).
    pub fn stream<E: From<ValueError>>(
        &self,
        cx: &mut ReadContext,
        mut f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        stream(&[self], cx, |chunks| f(chunks[0]).map(|()| true))
    }
}

/// Streams the elements of `t` converted to `T` (as [`kernels::convert`] does), handing `f` the
/// index of each run's first element and the run's little-endian `T` bytes: the one loop behind
/// [`read_real`], [`subtract_real`] and [`read_real_scratch`].
fn stream_real<T: Real>(
    t: &Tensor,
    op: &'static str,
    cx: &mut ReadContext,
    mut f: impl FnMut(usize, &[u8]) -> Result<(), ValueError>,
) -> Result<(), ValueError> {
    // Carry-only dtypes (sub-byte floats, complex, F8_E8M0) have no conversion to compute with.
    if !t.dtype.is_computable() {
        return Err(ValueError::NoByteSize { op, dtype: t.dtype });
    }
    let width = std::mem::size_of::<T>();
    let size = element_size(t.dtype, op)?;
    let mut converted = Vec::new();
    let mut at = 0;
    t.stream(cx, |chunk| {
        let n = chunk.len() / size;
        converted.resize(n * width, 0);
        kernels::convert(t.dtype, chunk, T::DTYPE, &mut converted);
        f(at, &converted)?;
        at += n;
        Ok::<(), ValueError>(())
    })
}

/// Reads a whole tensor as `T` values (f32, or f64), converted as [`kernels::convert`] does:
/// for operations that need every element at once (products, factorizations).
pub fn read_real<T: Real>(t: &Tensor, op: &'static str, cx: &mut ReadContext) -> Result<Vec<T>, ValueError> {
    let width = std::mem::size_of::<T>();
    let mut values = Vec::new();
    if t.dtype.is_computable() {
        values
            .try_reserve_exact(t.numel())
            .map_err(|_| ValueError::OutOfMemory {
                op,
                bytes: t.numel().saturating_mul(width),
            })?;
    }
    stream_real::<T>(t, op, cx, |_, converted| {
        values.extend(converted.chunks_exact(width).map(T::from_le));
        Ok(())
    })?;
    Ok(values)
}

/// Subtracts the elements of `t`, converted as [`read_real`] converts them, from `values` (one
/// per element of `t`), streaming: `a − b` of two whole tensors without holding `b` whole.
pub fn subtract_real<T: Real>(
    values: &mut [T],
    t: &Tensor,
    op: &'static str,
    cx: &mut ReadContext,
) -> Result<(), ValueError> {
    if values.len() != t.numel() {
        return Err(ValueError::Compute {
            op,
            reason: format!("{} values to subtract {} elements from", values.len(), t.numel()),
        });
    }
    let width = std::mem::size_of::<T>();
    stream_real::<T>(t, op, cx, |at, converted| {
        let n = converted.len() / width;
        for (v, bytes) in values[at..at + n].iter_mut().zip(converted.chunks_exact(width)) {
            *v -= T::from_le(bytes);
        }
        Ok(())
    })
}

/// [`read_real`] into a buffer from the run's budget (or its arena): the elements of `t` as
/// `T`, for work that needs a whole tensor at once (a product's operands).
pub fn read_real_scratch<T: Real + Element>(
    t: &Tensor,
    op: &'static str,
    cx: &mut ReadContext,
) -> Result<Scratch, ValueError> {
    if !t.dtype.is_computable() {
        return Err(ValueError::NoByteSize { op, dtype: t.dtype });
    }
    let width = std::mem::size_of::<T>();
    let mut out = cx.alloc(op, t.numel().saturating_mul(width))?;
    stream_real::<T>(t, op, cx, |at, converted| {
        out.write_at(at * width, converted).map_err(|e| scratch_error(op, e))
    })?;
    Ok(out)
}

/// [`real_bytes`] into a buffer from the run's budget (or its arena).
pub fn real_scratch<T: Real>(
    values: &[T],
    dtype: DType,
    op: &'static str,
    cx: &ReadContext,
) -> Result<Scratch, ValueError> {
    narrowed::<T>(values.len(), dtype, op, cx, |start, chunk| {
        let n = chunk.len() / std::mem::size_of::<T>();
        for (x, w) in values[start..start + n]
            .iter()
            .zip(chunk.chunks_exact_mut(std::mem::size_of::<T>()))
        {
            x.put_le(w);
        }
        Ok(())
    })
}

/// [`real_scratch`] of values of `T` held in a buffer: read a chunk at a time (`pread` from the
/// arena), so narrowing a spilled result does not map it into the resident set.
pub fn narrow_scratch<T: Real>(
    wide: &Scratch,
    dtype: DType,
    op: &'static str,
    cx: &ReadContext,
) -> Result<Scratch, ValueError> {
    let width = std::mem::size_of::<T>();
    narrowed::<T>(wide.len() / width, dtype, op, cx, |start, chunk| {
        wide.read_into(start * width, chunk).map_err(|e| scratch_error(op, e))
    })
}

/// `count` values of `T` rounded to `dtype` into a buffer from the run's budget (or its arena),
/// a chunk at a time: `fill(start, bytes)` puts the little-endian bytes of values
/// `[start, start + bytes.len() / size_of::<T>())` into `bytes`.
fn narrowed<T: Real>(
    count: usize,
    dtype: DType,
    op: &'static str,
    cx: &ReadContext,
    mut fill: impl FnMut(usize, &mut [u8]) -> Result<(), ValueError>,
) -> Result<Scratch, ValueError> {
    if !dtype.is_computable() {
        return Err(ValueError::NoByteSize { op, dtype });
    }
    let width = std::mem::size_of::<T>();
    let size = element_size(dtype, op)?;
    let mut out = cx.alloc(op, count.saturating_mul(size))?;
    let per_chunk = (CHUNK_BYTES / width).max(1);
    let mut chunk = vec![0u8; per_chunk.min(count) * width];
    let mut narrow = vec![0u8; per_chunk.min(count) * size];
    for start in (0..count).step_by(per_chunk) {
        let n = per_chunk.min(count - start);
        let (chunk, narrow) = (&mut chunk[..n * width], &mut narrow[..n * size]);
        fill(start, chunk)?;
        kernels::convert(T::DTYPE, chunk, dtype, narrow);
        out.write_at(start * size, narrow).map_err(|e| scratch_error(op, e))?;
    }
    Ok(out)
}

/// A failed write to (or read of) the scratch arena.
fn scratch_error(op: &'static str, e: std::io::Error) -> ValueError {
    ValueError::Compute {
        op,
        reason: format!("the scratch arena could not be written: {e}"),
    }
}

/// The bytes of `values` in `dtype`, rounded to nearest even (a float dtype).
pub fn real_bytes<T: Real>(values: &[T], dtype: DType, op: &'static str) -> Result<Vec<u8>, ValueError> {
    if !dtype.is_computable() {
        return Err(ValueError::NoByteSize { op, dtype });
    }
    let width = std::mem::size_of::<T>();
    let size = element_size(dtype, op)?;
    let mut out = try_filled(op, values.len().saturating_mul(size), 0u8)?;
    let mut wide = vec![0u8; CHUNK_BYTES.min(std::mem::size_of_val(values))];
    let per_chunk = (CHUNK_BYTES / width).max(1);
    for (part, dst) in values.chunks(per_chunk).zip(out.chunks_mut(per_chunk * size)) {
        let wide = &mut wide[..std::mem::size_of_val(part)];
        for (x, w) in part.iter().zip(wide.chunks_exact_mut(width)) {
            x.put_le(w);
        }
        kernels::convert(T::DTYPE, wide, dtype, dst);
    }
    Ok(out)
}

/// The byte size of `dtype`'s elements, or the error refusing `op` on a dtype without one.
fn element_size(dtype: DType, op: &'static str) -> Result<usize, ValueError> {
    dtype.size().ok_or(ValueError::NoByteSize { op, dtype })
}

/// Copies `out.len()` bytes of `bytes` from `start`.
fn copy_from(bytes: &[u8], start: usize, out: &mut [u8]) -> Result<(), ValueError> {
    let src = start
        .checked_add(out.len())
        .and_then(|end| bytes.get(start..end))
        .ok_or_else(|| ValueError::Compute {
            op: "reading",
            reason: format!("bytes {start}.. lie past the end of a {}-byte buffer", bytes.len()),
        })?;
    out.copy_from_slice(src);
    Ok(())
}

/// The byte ranges `(start, len)` of at most [`CHUNK_BYTES`] that a tensor of `nbytes` bytes is
/// streamed in: the one chunking of every reader (writing, assertions, `diff`, `dump`).
pub fn chunks(nbytes: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..nbytes.div_ceil(CHUNK_BYTES)).map(move |i| {
        let start = i * CHUNK_BYTES;
        (start, CHUNK_BYTES.min(nbytes - start))
    })
}

/// Streams `tensors` (of one element count) in lockstep through `f`, one chunk each at a time,
/// and stops early when `f` returns `false`: the one chunk loop behind value assertions, `diff`,
/// `dump` statistics and operations that read a whole operand; writing reads the same [`chunks`]
/// in parallel. A chunk holds the same elements of every tensor, at most [`CHUNK_BYTES`] of the
/// widest; tensors of one dtype without a byte size (carried through only) are streamed as raw
/// bytes. Checks for interruption before each chunk.
pub fn stream<E: From<ValueError>>(
    tensors: &[&Tensor],
    cx: &mut ReadContext,
    mut f: impl FnMut(&[&[u8]]) -> Result<bool, E>,
) -> Result<(), E> {
    let Some(first) = tensors.first() else {
        return Ok(());
    };
    // Element sizes, or 1 for raw bytes of one carry-only dtype.
    let (sizes, units): (Vec<usize>, usize) = match tensors.iter().map(|t| t.dtype.size()).collect::<Option<Vec<_>>>() {
        Some(sizes) => (sizes, first.numel()),
        None if tensors.iter().all(|t| t.dtype == first.dtype) => (vec![1; tensors.len()], first.nbytes()),
        None => {
            let odd = tensors.iter().find(|t| t.dtype.size().is_none()).unwrap_or(first);
            return Err(ValueError::NoByteSize {
                op: "comparing with another dtype",
                dtype: odd.dtype,
            }
            .into());
        }
    };
    let widest = sizes.iter().copied().max().unwrap_or(1);
    // Shapes made by transforms are checked when made (`check_addressable`); this guards the
    // rest, so a size never wraps to a short (vacuously passing) stream.
    let Some(total) = units.checked_mul(widest).filter(|&b| b <= isize::MAX as usize) else {
        return Err(ValueError::TooLarge {
            op: "reading",
            dtype: first.dtype,
            shape: first.shape.clone(),
        }
        .into());
    };
    let mut bufs: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&size| cx.take(CHUNK_BYTES.min(units.saturating_mul(size))))
        .collect();
    let result = (|| -> Result<(), E> {
        for (start, len) in chunks(total) {
            cx.check()?;
            let (start, n) = (start / widest, len / widest);
            for ((t, &size), buf) in tensors.iter().zip(&sizes).zip(bufs.iter_mut()) {
                let chunk = &mut buf[..n * size];
                if size == 1 && t.dtype.size().is_none() {
                    t.read_bytes(start, chunk, cx)?;
                } else {
                    t.read(start, chunk, cx)?;
                }
            }
            let views: Vec<&[u8]> = bufs.iter().zip(&sizes).map(|(b, &size)| &b[..n * size]).collect();
            if !f(&views)? {
                break;
            }
        }
        Ok(())
    })();
    for buf in bufs {
        cx.give(buf);
    }
    result
}

/// Reads elements `[start, ..)` of a view of `base`. Output rows run along the base's last
/// dimension; each row is one contiguous read, or one span read plus a gather for a step.
fn read_view(
    base: &Tensor,
    slice: &ResolvedSlice,
    size: usize,
    start: usize,
    out: &mut [u8],
    cx: &mut ReadContext,
) -> Result<(), ValueError> {
    let dims = &slice.dims;
    let Some(last) = dims.last() else {
        return base.read(start, out, cx);
    };
    let row_len = last.len;
    if row_len == 0 {
        return Ok(());
    }
    let strides = strides(&base.shape);
    let k = dims.len();
    let mut remaining = out.len() / size;
    let mut pos = start;
    let mut written = 0;
    while remaining > 0 {
        let (row, col) = (pos / row_len, pos % row_len);
        let mut rest = row;
        let mut row_offset = 0usize;
        for d in (0..k - 1).rev() {
            let sel = &dims[d];
            let i = rest % sel.len;
            rest /= sel.len;
            row_offset += index_at(sel.start, sel.step, i) * strides[d];
        }
        let count = (row_len - col).min(remaining);
        let dst = &mut out[written * size..(written + count) * size];
        let first = index_at(last.start, last.step, col);
        if last.step == 1 {
            base.read(row_offset + first, dst, cx)?;
        } else {
            let step = last.step.unsigned_abs();
            let lowest = if last.step > 0 {
                first
            } else {
                first - (count - 1) * step
            };
            let span = (count - 1) * step + 1;
            if span * size <= GATHER_SPAN_LIMIT {
                let mut tmp = cx.take(span * size);
                let result = base.read(row_offset + lowest, &mut tmp, cx);
                if result.is_ok() {
                    for j in 0..count {
                        let at = index_at(first, last.step, j) - lowest;
                        dst[j * size..(j + 1) * size].copy_from_slice(&tmp[at * size..(at + 1) * size]);
                    }
                }
                cx.give(tmp);
                result?;
            } else {
                for j in 0..count {
                    base.read(
                        row_offset + index_at(first, last.step, j),
                        &mut dst[j * size..(j + 1) * size],
                        cx,
                    )?;
                }
            }
        }
        pos += count;
        written += count;
        remaining -= count;
    }
    Ok(())
}

/// The base index of the `i`-th selected element of a dimension selection.
fn index_at(start: usize, step: isize, i: usize) -> usize {
    (start as isize + step * i as isize) as usize
}

/// The position within a dimension selection of base index `i`, if `i` is selected.
fn position_in(start: usize, step: isize, len: usize, i: usize) -> Option<usize> {
    let delta = i as isize - start as isize;
    if step == 0 || delta % step != 0 {
        return None;
    }
    let j = delta / step;
    (j >= 0 && (j as usize) < len).then_some(j as usize)
}

/// Reads elements `[start, ..)` of `base` with `region` overwritten by `with`: the base range
/// Visits the runs of `region` (resolved against `shape`) that fall in elements
/// `[start, end)` of the base: `visit(region_index, out_offset, count, step)` — `count` region
/// elements starting at region linear index `region_index`, the first at element `out_offset`
/// of the chunk and each next one `step` elements further (negative for a reversed slice).
fn for_each_region_run(
    shape: &[usize],
    region: &ResolvedSlice,
    start: usize,
    end: usize,
    mut visit: impl FnMut(usize, usize, usize, isize) -> Result<(), ValueError>,
) -> Result<(), ValueError> {
    let dims = &region.dims;
    let Some(last) = dims.last() else {
        // A scalar: the region is the whole (one-element) tensor.
        return if start < end { visit(0, 0, 1, 1) } else { Ok(()) };
    };
    let k = dims.len();
    let row_len = shape[k - 1];
    if row_len == 0 || last.len == 0 || start >= end {
        return Ok(());
    }
    for row in start / row_len..=(end - 1) / row_len {
        // Which region row (if any) this base row is.
        let mut rest = row;
        let mut region_row = 0;
        let mut multiplier = 1;
        let mut selected = true;
        for d in (0..k - 1).rev() {
            let i = rest % shape[d];
            rest /= shape[d];
            match position_in(dims[d].start, dims[d].step, dims[d].len, i) {
                Some(j) => {
                    region_row += j * multiplier;
                    multiplier *= dims[d].len;
                }
                None => {
                    selected = false;
                    break;
                }
            }
        }
        if !selected {
            continue;
        }
        let row_start = row * row_len;
        let lo = start.max(row_start) - row_start;
        let hi = end.min(row_start + row_len) - row_start;
        // Region columns j whose base column lies in [lo, hi).
        let (s, step) = (last.start as isize, last.step);
        let (j_min, j_max) = if step > 0 {
            let j_min = (lo as isize - s + step - 1).div_euclid(step).max(0);
            let j_max = (hi as isize - 1 - s).div_euclid(step).min(last.len as isize - 1);
            (j_min, j_max)
        } else {
            let a = -step;
            let j_min = (s - (hi as isize - 1) + a - 1).div_euclid(a).max(0);
            let j_max = (s - lo as isize).div_euclid(a).min(last.len as isize - 1);
            (j_min, j_max)
        };
        if j_min > j_max {
            continue;
        }
        let (j_min, count) = (j_min as usize, (j_max - j_min + 1) as usize);
        let first = row_start + index_at(last.start, step, j_min) - start;
        visit(region_row * last.len + j_min, first, count, step)?;
    }
    Ok(())
}

/// Reads elements `[start, ..)` of `base` with `region` overwritten by `with`: the base range
/// first, then the region's runs in the chunk from `with`.
fn read_overwrite(
    base: &Tensor,
    region: &ResolvedSlice,
    with: &Tensor,
    size: usize,
    start: usize,
    out: &mut [u8],
    cx: &mut ReadContext,
) -> Result<(), ValueError> {
    base.read(start, out, cx)?;
    let end = start + out.len() / size;
    for_each_region_run(&base.shape, region, start, end, |index, first, count, step| {
        let mut tmp = cx.take(count * size);
        let result = with.read(index, &mut tmp, cx);
        if result.is_ok() {
            for t in 0..count {
                let at = (first as isize + step * t as isize) as usize;
                out[at * size..(at + 1) * size].copy_from_slice(&tmp[t * size..(t + 1) * size]);
            }
        }
        cx.give(tmp);
        result
    })
}

/// Reads elements `[start, ..)` of `base` with `f` applied in place to the elements of `region`
/// (all of them without a region). The base is read once: an in-place edit through a slice
/// costs one level of reading, not two, so chains of edits stay linear in their length.
#[allow(clippy::too_many_arguments)]
fn read_map(
    base: &Tensor,
    region: Option<&ResolvedSlice>,
    f: &dyn ElementFn,
    dtype: DType,
    size: usize,
    start: usize,
    out: &mut [u8],
    cx: &mut ReadContext,
) -> Result<(), ValueError> {
    base.read(start, out, cx)?;
    let Some(region) = region else {
        return f.apply(dtype, start, out, cx);
    };
    let end = start + out.len() / size;
    for_each_region_run(&base.shape, region, start, end, |index, first, count, step| {
        if step == 1 {
            return f.apply(dtype, index, &mut out[first * size..(first + count) * size], cx);
        }
        let mut tmp = cx.take(count * size);
        for t in 0..count {
            let at = (first as isize + step * t as isize) as usize;
            tmp[t * size..(t + 1) * size].copy_from_slice(&out[at * size..(at + 1) * size]);
        }
        let result = f.apply(dtype, index, &mut tmp, cx);
        if result.is_ok() {
            for t in 0..count {
                let at = (first as isize + step * t as isize) as usize;
                out[at * size..(at + 1) * size].copy_from_slice(&tmp[t * size..(t + 1) * size]);
            }
        }
        cx.give(tmp);
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_impossible_allocation_is_an_error_not_an_abort() {
        match try_filled("test", usize::MAX / 4, 0u32) {
            Err(ValueError::OutOfMemory { op: "test", .. }) => {}
            other => panic!("{:?}", other.map(|v| v.len())),
        }
        assert_eq!(try_filled("test", 3, 7u8).unwrap(), [7, 7, 7]);
    }

    /// Issue 10 review: reading a carry-only dtype as reals asserted in the conversion kernel.
    #[test]
    fn carry_only_dtypes_are_not_read_as_reals() {
        for dtype in [DType::C64, DType::F8E8M0, DType::F4] {
            let t = Tensor::in_memory(dtype, vec![2], Arc::new(vec![0u8; 16]));
            let got = read_real::<f32>(&t, "test", &mut ReadContext::default());
            assert!(matches!(got, Err(ValueError::NoByteSize { .. })), "{dtype}");
            assert!(matches!(
                real_bytes(&[1.0f32], dtype, "test"),
                Err(ValueError::NoByteSize { .. })
            ));
        }
    }
    use crate::references::SliceSpec;

    /// Records how deep in the stack the innermost function of a chain runs.
    #[derive(Debug, Default)]
    struct StackProbe(std::sync::atomic::AtomicUsize);

    impl ElementFn for StackProbe {
        fn apply(
            &self,
            _dtype: DType,
            _index: usize,
            _values: &mut [u8],
            _cx: &mut ReadContext,
        ) -> Result<(), ValueError> {
            let here = 0u8;
            self.0.store(std::ptr::addr_of!(here) as usize, Ordering::Relaxed);
            Ok(())
        }
    }

    /// The stack one level of a lazy chain takes when read (the basis of [`ENGINE_STACK_BYTES`]):
    /// `cargo test --release --lib stack_per_chain_level -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement; run in release"]
    fn stack_per_chain_level() {
        let depth = 10_000;
        let probe = Arc::new(StackProbe::default());
        let base = Tensor::in_memory(DType::F32, vec![1024], Arc::new(vec![0u8; 4096]));
        let mut t = base.map(None, probe.clone()).unwrap();
        for _ in 1..depth {
            t = t.map(None, Arc::new(ScaleFn(1.0))).unwrap();
        }
        let used = std::thread::Builder::new()
            .stack_size(ENGINE_STACK_BYTES)
            .spawn(move || {
                let top = 0u8;
                let mut out = vec![0u8; 4096];
                t.read(0, &mut out, &mut ReadContext::default()).unwrap();
                std::ptr::addr_of!(top) as usize - probe.0.load(Ordering::Relaxed)
            })
            .unwrap()
            .join()
            .unwrap();
        println!("{depth} levels: {used} bytes of stack, {} per level", used / depth);
    }

    fn memory_u16(shape: &[usize], offset: u16) -> Tensor {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n)
            .flat_map(|i| (i as u16).wrapping_add(offset).to_le_bytes())
            .collect();
        Tensor::in_memory(DType::U16, shape.to_vec(), Arc::new(bytes))
    }

    fn values(t: &Tensor, start: usize, n: usize) -> Vec<u16> {
        let mut out = vec![0u8; n * 2];
        t.read(start, &mut out, &mut ReadContext::default()).unwrap();
        out.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
    }

    /// Base linear indices of a selection in result order, computed the slow obvious way.
    fn naive_indices(slice: &ResolvedSlice, base_shape: &[usize]) -> Vec<usize> {
        let strides = strides(base_shape);
        let mut out = vec![0usize];
        for (d, sel) in slice.dims.iter().enumerate() {
            let mut next = Vec::new();
            for &prefix in &out {
                for j in 0..sel.len {
                    next.push(prefix + index_at(sel.start, sel.step, j) * strides[d]);
                }
            }
            out = next;
        }
        out
    }

    const SLICES: &[&str] = &[
        "[:]",
        "[1]",
        "[:, 2:5]",
        "[::2]",
        "[::-1]",
        "[1:3, ::-2, 1:]",
        "[-1, :, 4]",
        "[:, 1, ::3]",
        "[2:2]",
        "[0, 0, 0]",
        "[..., ::-1]",
        "[3:0:-1, 1:4]",
    ];

    #[test]
    fn views_read_like_numpy_indexing_in_any_chunking() {
        let shape = [4, 5, 6];
        let base = memory_u16(&shape, 7);
        let all = values(&base, 0, 120);
        for text in SLICES {
            let slice = SliceSpec::parse(text).unwrap().resolve(&shape).unwrap();
            let expected: Vec<u16> = naive_indices(&slice, &shape).iter().map(|&i| all[i]).collect();
            let view = Tensor {
                dtype: DType::U16,
                shape: slice.shape.clone(),
                value: Arc::new(Value::View {
                    base: base.clone(),
                    slice: slice.clone(),
                }),
            };
            assert_eq!(view.numel(), expected.len(), "{text}");
            for chunk in [1, 2, 3, 7, 200] {
                let mut got = Vec::new();
                let mut start = 0;
                while start < expected.len() {
                    let n = chunk.min(expected.len() - start);
                    got.extend(values(&view, start, n));
                    start += n;
                }
                assert_eq!(got, expected, "slice {text}, chunk {chunk}");
            }
        }
    }

    #[test]
    fn overwrites_replace_exactly_the_region() {
        let shape = [4, 5, 6];
        let base = memory_u16(&shape, 0);
        for text in SLICES {
            let region = SliceSpec::parse(text).unwrap().resolve(&shape).unwrap();
            let with = memory_u16(&region.shape, 1000);
            let mut expected = values(&base, 0, 120);
            let replacement = values(&with, 0, with.numel());
            for (j, &i) in naive_indices(&region, &shape).iter().enumerate() {
                expected[i] = replacement[j];
            }
            let written = Tensor {
                dtype: DType::U16,
                shape: shape.to_vec(),
                value: Arc::new(Value::Overwrite {
                    base: base.clone(),
                    region: region.clone(),
                    with: with.clone(),
                }),
            };
            for chunk in [1, 5, 6, 11, 120] {
                let mut got = Vec::new();
                let mut start = 0;
                while start < 120 {
                    let n = chunk.min(120 - start);
                    got.extend(values(&written, start, n));
                    start += n;
                }
                assert_eq!(got, expected, "region {text}, chunk {chunk}");
            }
        }
    }

    /// Adds 1000 to each element it touches (u16): visible, exact, and order-independent.
    #[derive(Debug)]
    struct Bump;

    impl ElementFn for Bump {
        fn apply(&self, _: DType, _: usize, values: &mut [u8], _: &mut ReadContext) -> Result<(), ValueError> {
            for c in values.chunks_exact_mut(2) {
                let v = u16::from_le_bytes([c[0], c[1]]).wrapping_add(1000);
                c.copy_from_slice(&v.to_le_bytes());
            }
            Ok(())
        }
    }

    #[test]
    fn maps_change_exactly_the_region_and_chains_stay_linear() {
        let shape = [4, 5, 6];
        let base = memory_u16(&shape, 0);
        for text in SLICES {
            let region = SliceSpec::parse(text).unwrap().resolve(&shape).unwrap();
            let mut expected = values(&base, 0, 120);
            for &i in &naive_indices(&region, &shape) {
                expected[i] = expected[i].wrapping_add(1000);
            }
            let mapped = base.map(Some(region.clone()), Arc::new(Bump)).unwrap();
            for chunk in [1, 5, 7, 120] {
                let mut got = Vec::new();
                let mut start = 0;
                while start < 120 {
                    let n = chunk.min(120 - start);
                    got.extend(values(&mapped, start, n));
                    start += n;
                }
                assert_eq!(got, expected, "region {text}, chunk {chunk}");
            }
        }
        // 200 edits through a slice: exponential re-reading would never finish.
        let region = SliceSpec::parse("[1:3, ::2]").unwrap().resolve(&shape).unwrap();
        let mut t = base.clone();
        for _ in 0..200 {
            t = t.map(Some(region.clone()), Arc::new(Bump)).unwrap();
        }
        let got = values(&t, 0, 120);
        let mut expected = values(&base, 0, 120);
        for &i in &naive_indices(&region, &shape) {
            expected[i] = expected[i].wrapping_add((200u32 * 1000 % 65536) as u16);
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn cast_and_scale_read_through_kernels() {
        let bytes: Vec<u8> = [1.5f32, -2.0, 3.25].iter().flat_map(|v| v.to_le_bytes()).collect();
        let base = Tensor::in_memory(DType::F32, vec![3], Arc::new(bytes));
        let scaled = base.map(None, Arc::new(ScaleFn(2.0))).unwrap();
        let cast = scaled.cast(DType::F64).unwrap();
        let mut out = vec![0u8; 24];
        cast.read(0, &mut out, &mut ReadContext::default()).unwrap();
        let got: Vec<f64> = out
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, vec![3.0, -4.0, 6.5]);
        let mut seen = Vec::new();
        base.stream(&mut ReadContext::default(), |c| {
            seen.extend_from_slice(c);
            Ok::<(), ValueError>(())
        })
        .unwrap();
        assert_eq!(seen.len(), 12);
    }
    /// A strided tensor over a file of u16 values 0, 1, 2, ... (after 3 bytes of padding, so
    /// elements are unaligned as in legacy files).
    fn strided_u16(dir: &std::path::Path, offset: usize, shape: &[usize], strides: &[usize]) -> (Tensor, Vec<u16>) {
        let path = dir.join(format!("s{offset}-{shape:?}-{strides:?}.bin"));
        let numel: usize = shape.iter().product();
        let last: usize = shape.iter().zip(strides).map(|(d, s)| (d - 1) * s).sum();
        let mut bytes = vec![0xee; 3];
        bytes.extend((0..offset + last + 1).flat_map(|i| (i as u16).to_le_bytes()));
        std::fs::write(&path, &bytes).unwrap();
        let entry = TensorEntry {
            name: "t".into(),
            dtype: DType::U16,
            shape: shape.to_vec(),
            file: 0,
            offset: 3 + 2 * offset as u64,
            nbytes: 2 * numel as u64,
            strides: Some(strides.to_vec()),
            pieces: None,
        };
        let file = Arc::new(SourceFile::open(&path).unwrap());
        // The naive gather: each row-major index turned into a storage index.
        let expected = (0..numel)
            .map(|mut i| {
                let mut at = offset;
                for d in (0..shape.len()).rev() {
                    at += (i % shape[d]) * strides[d];
                    i /= shape[d];
                }
                at as u16
            })
            .collect();
        (Tensor::from_entry(&entry, &[file]), expected)
    }

    #[test]
    fn strided_reads_gather_like_the_naive_index_in_any_chunking() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(usize, &[usize], &[usize])] = &[
            (0, &[4, 3], &[1, 4]),        // transposed
            (1, &[3, 4], &[8, 2]),        // x[:, ::2]
            (0, &[5, 3], &[1, 0]),        // expanded
            (9, &[3, 2], &[4, 1]),        // narrow view at an offset
            (2, &[4, 2, 3], &[1, 12, 4]), // permuted 3-D
            (0, &[2, 1, 3], &[3, 77, 1]), // size-1 dimension
            (5, &[50, 40], &[1, 50]),     // runs too sparse for a span read: the mapped path
            (0, &[3, 700], &[1, 3]),      // span read of long rows
            (0, &[6, 2, 2], &[0, 0, 0]),  // one element repeated
        ];
        for &(offset, shape, strides) in cases {
            let (t, expected) = strided_u16(dir.path(), offset, shape, strides);
            assert!(matches!(&*t.value, Value::Strided(_)));
            let n = expected.len();
            for chunk in [1, 2, 3, 7, 64, n] {
                // Twice: the mapping is dropped after a full pass and must come back.
                for _ in 0..2 {
                    let mut got = Vec::new();
                    let mut start = 0;
                    while start < n {
                        let len = chunk.min(n - start);
                        got.extend(values(&t, start, len));
                        start += len;
                    }
                    assert_eq!(got, expected, "{shape:?} {strides:?}, chunk {chunk}");
                }
            }
            let mut raw = vec![0u8; 2 * n];
            t.read_bytes(0, &mut raw, &mut ReadContext::default()).unwrap();
            assert_eq!(
                raw,
                values(&t, 0, n)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn a_reshaped_strided_tensor_reads_the_same_elements_in_order() {
        // Reshaping keeps the value with a new shape: elements must still follow the source
        // layout's row-major order (and a larger rank must not index past the strides).
        let dir = tempfile::tempdir().unwrap();
        let (t, expected) = strided_u16(dir.path(), 0, &[4, 3], &[1, 4]);
        for shape in [vec![12], vec![2, 6], vec![1, 2, 2, 3]] {
            let reshaped = Tensor {
                dtype: t.dtype,
                shape,
                value: t.value.clone(),
            };
            assert_eq!(values(&reshaped, 0, 12), expected, "{:?}", reshaped.shape);
        }
    }
}

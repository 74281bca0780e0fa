//! Checkpoint files on disk (SPEC §6): opening inputs read-only (a file, or a directory whose
//! files are told apart by name), listing their tensors with absolute byte offsets, and the one
//! error type of this layer. Header parsing lives in [`safetensors`], [`torch`] and [`numpy`],
//! the atomic writer in [`output`]. Reading tensor bytes, computing on them and
//! deciding what to write belong to the executor; this layer only says where bytes are and
//! where they go.

#![deny(missing_docs)]

pub mod dcp;
pub mod mapped;
pub mod numpy;
pub mod output;
pub mod pickle;
pub mod safetensors;
pub mod torch;
pub mod torch_legacy;
pub mod torch_output;
pub mod zip;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::dtype::DType;

use self::safetensors::HeaderError;

/// Name of the weight index of a sharded safetensors directory.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// Errors of the formats layer: reading checkpoints and writing outputs.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// An operating-system call on `path` failed (open, read, write, rename, ...). A full
    /// filesystem says so in words: "No space left on device" alone reads like a bug.
    #[error("{}", io_message(path, source))]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error; its kind tells "not found" from "permission denied".
        #[source]
        source: io::Error,
    },
    /// The safetensors header of `path` is malformed.
    #[error("invalid safetensors header in {}", path.display())]
    Header {
        /// The file whose header was rejected.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: HeaderError,
    },
    /// A NumPy `.npy`/`.npz` input is malformed or uses a feature that is refused.
    #[error("cannot read NumPy file {}", path.display())]
    Numpy {
        /// The input file.
        path: PathBuf,
        /// What is wrong, naming the tensor when there is one; an I/O error keeps its kind.
        #[source]
        source: numpy::NpyError,
    },
    /// A tensor's dtype has no NumPy equivalent, so it cannot be written to `.npz`.
    #[error("output tensor {name:?} of dtype {dtype} cannot be stored in .npz (NumPy has no such type); cast it first, e.g. to float32")]
    NpzDtype {
        /// The tensor name.
        name: String,
        /// Its dtype.
        dtype: DType,
    },
    /// A `.npy` output was asked for an alias that does not hold exactly one tensor.
    #[error("a .npy file holds exactly one tensor, and the alias written has {count}; write .npz for several")]
    NpyCount {
        /// How many tensors the alias has.
        count: usize,
    },
    /// A tensor's dtype has no PyTorch equivalent, so it cannot be written to `.bin/.pt/.pth`.
    #[error("output tensor {name:?} of dtype {dtype} cannot be stored in a PyTorch file (torch has no such dtype); cast it to one torch has, e.g. bfloat16, or write safetensors")]
    TorchDtype {
        /// The tensor name.
        name: String,
        /// Its dtype.
        dtype: DType,
    },
    /// The pickle inside a PyTorch checkpoint was refused; the message names the offending
    /// global or opcode (nothing in it is ever imported or executed).
    #[error("refused pickle in {}: {reason}", path.display())]
    Pickle {
        /// The checkpoint file.
        path: PathBuf,
        /// What the unpickler refused.
        reason: pickle::PickleError,
    },
    /// A PyTorch checkpoint is malformed or uses something not supported yet.
    #[error("invalid PyTorch checkpoint {}: {reason}", path.display())]
    Torch {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it, naming the entry or tensor.
        reason: String,
    },
    /// A PyTorch Distributed Checkpoint directory is malformed or uses something not supported.
    #[error("invalid PyTorch Distributed Checkpoint {}: {reason}", path.display())]
    Dcp {
        /// The file concerned (`.metadata`, a `.distcp` file).
        path: PathBuf,
        /// What is wrong, naming the tensor or chunk.
        reason: String,
    },
    /// The zip archive of a PyTorch checkpoint is malformed or unreadable.
    #[error("invalid PyTorch checkpoint {}", path.display())]
    TorchArchive {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with the archive; an I/O error keeps its kind.
        #[source]
        source: zip::ZipError,
    },
    /// The input is in a format this build cannot read.
    #[error("cannot read {}: {format} reading is not available yet", path.display())]
    Unsupported {
        /// The input path.
        path: PathBuf,
        /// The format recognised from the name (`"PyTorch"`, `"NumPy"`).
        format: &'static str,
    },
    /// A directory input holds no weight files (training state and `training_args.bin` are not
    /// weights).
    #[error("no weight files (*.safetensors, *.bin, *.pt, *.pth, *.npy, *.npz) in directory {}", path.display())]
    NoWeights {
        /// The directory.
        path: PathBuf,
    },
    /// The weight index of a sharded directory is malformed.
    #[error("invalid weight index {}: {reason}", path.display())]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The weight index names a shard that does not exist.
    #[error("weight index {} names missing shard {}", index.display(), file.display())]
    IndexFileMissing {
        /// The index file.
        index: PathBuf,
        /// The shard it names.
        file: PathBuf,
    },
    /// The weight index places a tensor in a shard that does not hold it.
    #[error("weight index {} puts tensor {tensor:?} in {}, which does not contain it", index.display(), file.display())]
    IndexTensorMissing {
        /// The index file.
        index: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The shard the index names.
        file: PathBuf,
    },
    /// Two input files hold a tensor of the same name.
    #[error("tensor {name:?} is in both {} and {}", first.display(), second.display())]
    DuplicateTensor {
        /// The tensor name.
        name: String,
        /// The earlier file (in input order).
        first: PathBuf,
        /// The later file.
        second: PathBuf,
    },
    /// A size budget such as `"5GB"` could not be parsed.
    #[error("invalid size {text:?}: expected a whole number with an optional unit (KB, MB, GB, TB)")]
    InvalidSize {
        /// The text given.
        text: String,
    },
    /// The same name was given twice to the writer.
    #[error("output tensor {name:?} is listed twice")]
    DuplicateOutputTensor {
        /// The tensor name.
        name: String,
    },
    /// An output tensor name cannot be stored (`__metadata__` is reserved by the format).
    #[error("output tensor name {name:?} is reserved")]
    ReservedTensorName {
        /// The tensor name.
        name: String,
    },
    /// An output tensor's byte size cannot be represented, or is not a whole number of bytes
    /// (sub-byte dtypes), which the safetensors format rejects.
    #[error("output tensor {name:?} of dtype {dtype} and shape {shape:?} has no valid byte size")]
    InvalidTensorSize {
        /// The tensor name.
        name: String,
        /// Its dtype.
        dtype: DType,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// The filesystem a run writes to has less free space than the run needs: refused before
    /// anything is read or written.
    #[error(
        "not enough free space on the filesystem of {}: the run needs {needed} bytes ({}) and {available} bytes ({}) are free; free some space, write elsewhere, or skip this check with --no-space-check (space_check=False in Python)",
        path.display(),
        indicatif::HumanBytes(*needed),
        indicatif::HumanBytes(*available)
    )]
    NoSpace {
        /// A path on that filesystem (the output, or the scratch directory).
        path: PathBuf,
        /// Bytes the run writes there.
        needed: u64,
        /// Bytes free there for this user.
        available: u64,
    },
    /// The output path cannot be used as asked.
    #[error("invalid output path {}: {reason}", path.display())]
    InvalidOutput {
        /// The output path.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
    /// A JSON sidecar (`config.json`, …) cannot be read or parsed.
    #[error("invalid sidecar {}: {reason}", path.display())]
    Sidecar {
        /// The sidecar file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A LoRA adapter directory is not one `merge_lora` can read (its config, its tensor names).
    #[error("invalid LoRA adapter {}: {reason}", path.display())]
    Adapter {
        /// The adapter directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The message of [`FormatError::Io`].
fn io_message(path: &Path, source: &io::Error) -> String {
    match source.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => format!(
            "the disk is full: no space left on the filesystem of {}",
            path.display()
        ),
        _ => format!("i/o error on {}", path.display()),
    }
}

impl FormatError {
    /// Wraps an `io::Error` with the path it concerns.
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        FormatError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One input file opened read-only.
#[derive(Debug)]
pub struct SourceFile {
    /// The file's path as opened.
    pub path: PathBuf,
    /// Its length in bytes when opened.
    pub len: u64,
    file: File,
    /// SHA-256 (hex) of its header bytes, set by the reader that parses them (issue 8): the
    /// whole prefix of a safetensors file (length and JSON), the central directory of a zip
    /// (PyTorch, `.npz`), everything before the data of a `.npy`, and the pickles before the
    /// first storage of a legacy PyTorch file.
    header_sha256: OnceLock<String>,
}

impl SourceFile {
    /// Opens `path` read-only; a directory is refused with `io::ErrorKind::IsADirectory`.
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
        let meta = file.metadata().map_err(|e| FormatError::io(path, e))?;
        if meta.is_dir() {
            return Err(FormatError::io(
                path,
                io::Error::new(io::ErrorKind::IsADirectory, "is a directory"),
            ));
        }
        Ok(SourceFile {
            path: path.to_path_buf(),
            len: meta.len(),
            file,
            header_sha256: OnceLock::new(),
        })
    }

    /// Records the file's header bytes (the first record wins; readers that parse the header
    /// again see the same bytes).
    pub(crate) fn record_header(&self, bytes: &[u8]) {
        use sha2::{Digest, Sha256};
        self.header_sha256
            .get_or_init(|| Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect());
    }

    /// SHA-256 (hex) of the header bytes, once a reader has parsed them.
    pub fn header_sha256(&self) -> Option<&str> {
        self.header_sha256.get().map(String::as_str)
    }

    /// Reads exactly `buf.len()` bytes at `offset` (pread, so threads can share the file).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), FormatError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| FormatError::io(&self.path, e))
    }

    /// Guarded read-only memory map of the whole file (see [`SourceFile::map_range`]).
    pub fn map(&self) -> Result<mapped::GuardedMap, FormatError> {
        let len = usize::try_from(self.len)
            .map_err(|_| FormatError::io(&self.path, io::Error::from(io::ErrorKind::OutOfMemory)))?;
        self.map_range(0, len, false)
    }

    /// Read-only memory map of `len` bytes at `offset` for the engine's reads; `populate` reads
    /// them in ahead (`MAP_POPULATE`). Guarded: if the file shrinks meanwhile, reads past its
    /// new end give zeros instead of SIGBUS and [`mapped::GuardedMap::check`] reports it.
    pub fn map_range(&self, offset: u64, len: usize, populate: bool) -> Result<mapped::GuardedMap, FormatError> {
        let map = self.map_unguarded(offset, len, populate)?;
        mapped::GuardedMap::new(map, self.path.clone())
            .ok_or_else(|| FormatError::io(&self.path, io::Error::other("too many guarded memory maps at once")))
    }

    /// Copy-on-write memory map of the whole file for the views handed to Python (issue 11):
    /// private pages, so a write through a view (torch ignores NumPy's read-only flag: an
    /// optimizer step on `torch.from_dlpack(ck[name])` after `load_state_dict(assign=True)`)
    /// lands in this process's copy of the page, never in the file and never as SIGSEGV, as
    /// `torch.load(mmap=True)` maps. Untouched pages stay shared with the page cache. Not
    /// guarded, as `numpy.memmap` is not: a view read after the file shrank faults (documented).
    ///
    /// The private mapping reserves no swap (`MAP_NORESERVE`): otherwise Linux charges all of it
    /// against the commit limit and refuses a file larger than RAM plus swap. Where it is refused
    /// anyway, the view falls back to a shared read-only mapping (a write through it faults).
    pub fn map_for_views(&self) -> Result<memmap2::MmapRaw, FormatError> {
        let len = usize::try_from(self.len)
            .map_err(|_| FormatError::io(&self.path, io::Error::from(io::ErrorKind::OutOfMemory)))?;
        let mut options = memmap2::MmapOptions::new();
        options.len(len).no_reserve_swap();
        // SAFETY: a private mapping of a file opened read-only: writes through it never reach
        // the file. A file that shrinks while mapped faults on access (documented for views).
        match unsafe { options.map_copy(&self.file) } {
            Ok(map) => Ok(memmap2::MmapRaw::from(map)),
            Err(_) => self.map_unguarded(0, len, false).map(memmap2::MmapRaw::from),
        }
    }

    /// The engine's read-only maps (views take [`SourceFile::map_for_views`]).
    fn map_unguarded(&self, offset: u64, len: usize, populate: bool) -> Result<memmap2::Mmap, FormatError> {
        let mut options = memmap2::MmapOptions::new();
        options.offset(offset).len(len);
        if populate {
            options.populate();
        }
        // SAFETY: the map is read-only and the file was opened read-only, so this process never
        // writes through it. A file that shrinks while mapped faults on access; the engine's
        // maps are guarded against that (`mapped`), views handed to Python are not.
        unsafe { options.map(&self.file) }.map_err(|e| FormatError::io(&self.path, e))
    }

    /// The open file, for callers that issue their own reads (`copy_file_range`, `pread`).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Bytes of an input file mapped on first use and unmapped again once a pass over them has
/// been served, so mapped pages do not pile up in the resident set across a plan: the one lazy
/// cache of mapped input bytes, for reads too sparse for `pread` (a transposed matrix, a tile of
/// a permute: one system call per element or short run).
#[derive(Debug)]
pub struct LazyMap {
    file: Arc<SourceFile>,
    offset: u64,
    len: usize,
    populate: bool,
    mapped: Mutex<Option<Arc<mapped::GuardedMap>>>,
    /// Bytes served since the mapping was made.
    served: AtomicUsize,
}

impl LazyMap {
    /// `len` bytes of `file` at `offset`, not mapped yet; `populate` as for
    /// [`SourceFile::map_range`].
    pub fn new(file: Arc<SourceFile>, offset: u64, len: usize, populate: bool) -> Self {
        LazyMap {
            file,
            offset,
            len,
            populate,
            mapped: Mutex::new(None),
            served: AtomicUsize::new(0),
        }
    }

    /// The mapped bytes, mapped on first use; `None` if mapping fails (callers read instead).
    pub fn get(&self) -> Option<Arc<mapped::GuardedMap>> {
        let mut slot = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(map) = &*slot {
            return Some(map.clone());
        }
        let map = Arc::new(self.file.map_range(self.offset, self.len, self.populate).ok()?);
        *slot = Some(map.clone());
        Some(map)
    }

    /// Counts `bytes` served of a pass of `total` bytes; drops the mapping once a pass is
    /// complete.
    pub fn served(&self, bytes: usize, total: usize) {
        // One thread completes each pass: it takes the pass's bytes off the count (keeping what
        // other threads added meanwhile) and drops the mapping.
        let mut current = self.served.load(Ordering::Relaxed);
        loop {
            let sum = current.saturating_add(bytes);
            let (next, done) = if sum >= total {
                (sum - total, true)
            } else {
                (sum, false)
            };
            match self
                .served
                .compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    if done {
                        *self.mapped.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                    return;
                }
                Err(now) => current = now,
            }
        }
    }
}

/// One tensor of an input checkpoint, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Tensor name as stored.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (empty for a scalar; may contain 0).
    pub shape: Vec<usize>,
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// Absolute byte offset of the tensor's first element in its file.
    pub offset: u64,
    /// Number of bytes the tensor's elements take (numel × item size, also when strided).
    pub nbytes: u64,
    /// Element strides of a non-contiguous tensor (a PyTorch view saved as is); `None` for
    /// row-major contiguous bytes. Every element lies inside the file (checked by the reader).
    pub strides: Option<Vec<usize>>,
    /// A tensor stored in several chunks (a PyTorch Distributed Checkpoint saved by several
    /// ranks): the chunks, which tile the tensor exactly (checked by the reader). `file`,
    /// `offset` and `strides` then describe the first chunk only, for listings; readers of the
    /// bytes must assemble the chunks. `None` for a tensor stored in one piece.
    pub pieces: Option<Arc<[Piece]>>,
}

/// One chunk of a tensor stored in several ([`TensorEntry::pieces`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Index of the chunk's first element in the whole tensor, per dimension.
    pub offsets: Vec<usize>,
    /// The chunk's elements in its file (its shape is the chunk's; never pieces itself).
    pub entry: TensorEntry,
}

impl TensorEntry {
    /// Bytes from the first to the last byte of the tensor's elements: `nbytes` when contiguous.
    pub fn extent(&self) -> u64 {
        let Some(strides) = &self.strides else {
            return self.nbytes;
        };
        let item = self.dtype.size().unwrap_or(1) as u64;
        if self.nbytes == 0 {
            return 0;
        }
        let last: u64 = self
            .shape
            .iter()
            .zip(strides)
            .map(|(&d, &s)| (d as u64).saturating_sub(1).saturating_mul(s as u64))
            .fold(0, u64::saturating_add);
        last.saturating_add(1).saturating_mul(item)
    }
}

/// The checkpoint formats, read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.safetensors` files.
    Safetensors,
    /// PyTorch `.bin`/`.pt`/`.pth` files (`torch.save`).
    PyTorch,
    /// NumPy `.npy`/`.npz` files.
    NumPy,
    /// PyTorch Distributed Checkpoint directories (`.metadata` and `*.distcp`).
    Dcp,
}

/// Every fact about one format, in one row of [`Format::TABLE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormatInfo {
    /// The format this row describes.
    pub format: Format,
    /// Its name in messages: `safetensors`, `PyTorch`, `NumPy`.
    pub name: &'static str,
    /// Lower-case names a plan may give it as `format:` (`torch`, `npz`, ...).
    pub keys: &'static [&'static str],
    /// File extensions of its files, lower case with the dot.
    pub extensions: &'static [&'static str],
    /// The weight index of a sharded directory (`model.safetensors.index.json`).
    pub index_name: Option<&'static str>,
    /// File name of an unsharded directory output (`model.safetensors`).
    pub single_name: Option<&'static str>,
    /// Shard file names are `<stem>-NNNNN-of-NNNNN.<extension>`.
    pub shard_parts: Option<(&'static str, &'static str)>,
}

impl Format {
    /// Every format, one row each, in the order a directory holding several is read by.
    pub const TABLE: [FormatInfo; 4] = [
        FormatInfo {
            format: Format::Safetensors,
            name: "safetensors",
            keys: &["safetensors"],
            extensions: &[".safetensors"],
            index_name: Some(INDEX_NAME),
            single_name: Some("model.safetensors"),
            shard_parts: Some(("model", "safetensors")),
        },
        FormatInfo {
            format: Format::PyTorch,
            name: "PyTorch",
            keys: &["torch", "pytorch"],
            extensions: &[".bin", ".pt", ".pth"],
            index_name: Some(TORCH_INDEX_NAME),
            single_name: Some("pytorch_model.bin"),
            shard_parts: Some(("pytorch_model", "bin")),
        },
        FormatInfo {
            format: Format::NumPy,
            name: "NumPy",
            keys: &["npz", "numpy", "npy"],
            extensions: &[".npy", ".npz"],
            index_name: None,
            single_name: None,
            shard_parts: None,
        },
        // A directory told apart by its `.metadata` file, not by file names: no extension.
        FormatInfo {
            format: Format::Dcp,
            name: "DCP",
            keys: &["dcp"],
            extensions: &[],
            index_name: None,
            single_name: None,
            shard_parts: None,
        },
    ];

    /// This format's row of [`Format::TABLE`].
    pub fn info(self) -> &'static FormatInfo {
        &Format::TABLE[self as usize]
    }

    /// The format's name in messages: `safetensors`, `PyTorch`, `NumPy`.
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The format a plan's `format:` value names (case-insensitive).
    pub fn parse(key: &str) -> Option<Format> {
        let lower = key.to_ascii_lowercase();
        Format::TABLE
            .iter()
            .find(|f| f.keys.contains(&lower.as_str()))
            .map(|f| f.format)
    }

    /// The format a file name's extension indicates, if it is one of ours.
    pub fn of_name(name: &str) -> Option<Format> {
        let lower = name.to_ascii_lowercase();
        Format::TABLE
            .iter()
            .find(|f| f.extensions.iter().any(|ext| lower.ends_with(ext)))
            .map(|f| f.format)
    }

    /// The weight index a sharded directory of this format may have.
    fn index_name(self) -> Option<&'static str> {
        self.info().index_name
    }

    /// Refuses the first tensor this format cannot hold, naming it: the one writability check,
    /// read from names and dtypes alone so a check finds it before anything is computed.
    /// `bare_npy` asks for a `.npy` file, which holds exactly one tensor.
    pub fn check_writable<'a>(
        self,
        tensors: impl Iterator<Item = (&'a str, DType)>,
        bare_npy: bool,
    ) -> Result<(), FormatError> {
        let mut count = 0;
        for (name, dtype) in tensors {
            count += 1;
            let info = dtype.info();
            match self {
                Format::Safetensors if name == "__metadata__" => {
                    return Err(FormatError::ReservedTensorName { name: name.to_owned() })
                }
                Format::PyTorch | Format::Dcp if info.torch.is_none() => {
                    return Err(FormatError::TorchDtype {
                        name: name.to_owned(),
                        dtype,
                    })
                }
                Format::NumPy if info.numpy.is_none() => {
                    return Err(FormatError::NpzDtype {
                        name: name.to_owned(),
                        dtype,
                    })
                }
                _ => {}
            }
        }
        if bare_npy && count != 1 {
            return Err(FormatError::NpyCount { count });
        }
        Ok(())
    }

    /// Reads one file's tensors (entries carry `file_index`) and its `__metadata__` (only
    /// safetensors has any).
    fn read(self, file: &SourceFile, file_index: usize) -> Result<FileContents, FormatError> {
        Ok(match self {
            Format::Safetensors => {
                let header = safetensors::read_header(file)?;
                FileContents {
                    tensors: safetensors_entries(header.tensors, header.data_start, file_index),
                    metadata: header.metadata,
                    skipped: Vec::new(),
                }
            }
            Format::PyTorch => {
                let (tensors, skipped) = torch::read_file(file, file_index)?;
                FileContents {
                    tensors,
                    metadata: BTreeMap::new(),
                    skipped,
                }
            }
            Format::NumPy => FileContents {
                tensors: numpy::read_tensors(file, file_index)?,
                metadata: BTreeMap::new(),
                skipped: Vec::new(),
            },
            Format::Dcp => return Err(dcp_part(&file.path)),
        })
    }
}

/// An opened input checkpoint: its files, its tensors and the files beside them.
#[derive(Debug)]
pub struct Checkpoint {
    /// The path the user gave (file or directory).
    pub path: PathBuf,
    /// The format of its weight files.
    pub format: Format,
    /// The weight files, sorted by file name.
    pub files: Vec<Arc<SourceFile>>,
    /// Every tensor, files in order; within a file by data offset (safetensors, NumPy) or in
    /// state-dict order (PyTorch).
    pub tensors: Vec<TensorEntry>,
    /// `__metadata__` of the first file (empty when it has none).
    pub metadata: BTreeMap<String, String>,
    /// Non-weight regular files directly in a directory input (config, tokenizer, ...), sorted;
    /// empty for a file input.
    pub sidecars: Vec<PathBuf>,
    /// Whether the user gave a directory.
    pub is_directory: bool,
    /// What the user should know about how a directory was read (files of another format or
    /// training state left out), one sentence each; shown as notices, never errors.
    pub notices: Vec<String>,
}

/// Name of the weight index of a sharded PyTorch directory (Hugging Face).
pub const TORCH_INDEX_NAME: &str = "pytorch_model.bin.index.json";

/// Pickles the Hugging Face Trainer writes beside the weights that describe the run rather
/// than hold weights: never loaded (`training_args.bin` pickles a `TrainingArguments`, which the
/// restricted unpickler refuses), but copied to a directory output like `config.json`.
const TRAINING_METADATA: &[&str] = &["training_args.bin"];

/// File stems (before `.bin`/`.pt`/`.pth`) of training state written by the Hugging Face
/// Trainer, Accelerate and DeepSpeed: optimizer moments, LR scheduler, gradient scaler, sampler
/// and RNG states. A stem equal to one of these or starting with it plus `_` (`rng_state_3`,
/// `optimizer_1`) is training state, as is a stem ending in `optim_states` (DeepSpeed ZeRO).
/// Neither loaded nor copied: it describes the weights before surgery.
const TRAINING_STATE_STEMS: &[&str] = &[
    "optimizer",
    "scheduler",
    "lr_scheduler",
    "scaler",
    "sampler",
    "rng_state",
    "random_states",
];

/// What a file directly in a checkpoint directory is, decided by its name alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    /// Weights of one of the formats we read.
    Weights(Format),
    /// Training state: neither loaded nor copied (a notice names it).
    TrainingState,
    /// Weights of another framework, or a weight index: not copied.
    NotCopied,
    /// Anything else (config, tokenizer, README, `training_args.bin`): copied to a directory
    /// output.
    Sidecar,
}

/// Classifies a file of a checkpoint directory by name.
fn classify(name: &str) -> FileKind {
    // Other frameworks' weights are not sidecars either: copied beside edited weights they would
    // be stale, often large, and a TF/Flax/ONNX/GGUF loader would pick up the unedited model.
    const OTHER_WEIGHTS: &[&str] = &[
        ".h5",
        ".msgpack",
        ".onnx",
        ".onnx_data",
        ".gguf",
        ".ggml",
        ".ckpt",
        ".pdparams",
        ".ot",
        ".tflite",
        ".keras",
        ".pkl",
        ".pickle",
        ".joblib",
        ".index.json",
        ".onnx.data",
        ".tar",
    ];
    // Named inside the file name: TensorFlow checkpoints (`model.ckpt.data-00000-of-00001`,
    // `.ckpt.index`, `.ckpt.meta`) and OpenVINO IR (`openvino_model.xml` + `openvino_model.bin`,
    // whose `.bin` is not a PyTorch file).
    const OTHER_WEIGHTS_INSIDE: &[&str] = &[".ckpt.", "openvino_model"];
    let lower = name.to_ascii_lowercase();
    if OTHER_WEIGHTS_INSIDE.iter().any(|part| lower.contains(part)) {
        return FileKind::NotCopied;
    }
    match Format::of_name(&lower) {
        Some(Format::PyTorch) if TRAINING_METADATA.contains(&lower.as_str()) => FileKind::Sidecar,
        Some(Format::PyTorch) if is_training_state(&lower) => FileKind::TrainingState,
        Some(format) => FileKind::Weights(format),
        None if OTHER_WEIGHTS.iter().any(|ext| lower.ends_with(ext)) => FileKind::NotCopied,
        None => FileKind::Sidecar,
    }
}

/// Whether a lower-case PyTorch file name is training state (see [`TRAINING_STATE_STEMS`]).
fn is_training_state(lower: &str) -> bool {
    let stem = lower.rsplit_once('.').map_or(lower, |(stem, _)| stem);
    stem.ends_with("optim_states")
        || TRAINING_STATE_STEMS.iter().any(|known| {
            stem.strip_prefix(known)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('_'))
        })
}

/// Whether a lower-case name is a Hugging Face PyTorch weight file: `pytorch_model.bin` or a
/// shard `pytorch_model-00001-of-00002.bin`.
fn is_hf_torch_weights(lower: &str) -> bool {
    lower == "pytorch_model.bin" || (lower.starts_with("pytorch_model-") && lower.ends_with(".bin"))
}

/// What one weight file holds.
struct FileContents {
    tensors: Vec<TensorEntry>,
    /// `__metadata__` (only safetensors has any).
    metadata: BTreeMap<String, String>,
    /// Entries that are not tensors, skipped (PyTorch pickles hold epochs, configs, ...).
    skipped: Vec<String>,
}

/// A safetensors header's tensors as entries with absolute offsets.
fn safetensors_entries(
    tensors: Vec<safetensors::HeaderTensor>,
    data_start: u64,
    file_index: usize,
) -> Vec<TensorEntry> {
    tensors
        .into_iter()
        .map(|t| TensorEntry {
            // Cannot overflow: parse_header checked data_start + end <= file length.
            offset: data_start + t.begin,
            nbytes: t.end - t.begin,
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            file: file_index,
            strides: None,
            pieces: None,
        })
        .collect()
}

/// Opens a checkpoint: a file (`.safetensors`, `.bin`/`.pt`/`.pth`, `.npy`/`.npz`; any other
/// name is read as safetensors) or a directory (see [`open_directory`]). Only headers are read.
pub fn open_checkpoint(path: &Path) -> Result<Checkpoint, FormatError> {
    open_checkpoint_as(path, None)
}

/// [`open_checkpoint`] of a file read as `format` when given, whatever its name says (a
/// directory is still recognised by its contents).
pub fn open_checkpoint_as(path: &Path, format: Option<Format>) -> Result<Checkpoint, FormatError> {
    let meta = std::fs::metadata(path).map_err(|e| FormatError::io(path, e))?;
    if meta.is_dir() {
        return open_directory(path);
    }
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    if name == dcp::METADATA_NAME || name.ends_with(dcp::DATA_EXTENSION) {
        return Err(dcp_part(path));
    }
    let format = format.or_else(|| Format::of_name(&name)).unwrap_or(Format::Safetensors);
    assemble(path, format, vec![SourceFile::open(path)?], None)
}

/// The error for a file of a DCP directory opened alone.
fn dcp_part(path: &Path) -> FormatError {
    FormatError::Dcp {
        path: path.to_path_buf(),
        reason: "this file is one part of a distributed checkpoint; open the directory holding it".to_owned(),
    }
}

/// Opens the DCP directory `path` whose non-hidden files are `names`.
fn open_dcp_directory(path: &Path, names: &[String]) -> Result<Checkpoint, FormatError> {
    let contents = dcp::read_directory(path)?;
    let mut notices = Vec::new();
    if !contents.skipped.is_empty() {
        let names: Vec<&String> = contents.skipped.iter().collect();
        notices.push(format!(
            "{}: {} skipped ({})",
            path.display(),
            if names.len() == 1 {
                "1 entry that is not a tensor".to_string()
            } else {
                format!("{} entries that are not tensors", names.len())
            },
            name_list(&names)
        ));
    }
    // Everything beside the data files is copied to a directory output, as for other formats.
    let sidecars = names
        .iter()
        .filter(|n| !n.ends_with(dcp::DATA_EXTENSION) && classify(n) == FileKind::Sidecar)
        .map(|n| path.join(n))
        .filter(|p| sidecar_link_allowed(path, p))
        .collect();
    Ok(Checkpoint {
        path: path.to_path_buf(),
        format: Format::Dcp,
        files: contents.files.into_iter().map(Arc::new).collect(),
        tensors: contents.tensors,
        metadata: BTreeMap::new(),
        sidecars,
        is_directory: true,
        notices,
    })
}

/// Names shown in a notice: all of them up to four, else the first three and a count.
fn name_list(names: &[&String]) -> String {
    match names {
        [] => String::new(),
        [a] => a.to_string(),
        _ if names.len() <= 4 => names.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", "),
        _ => format!(
            "{} and {} more",
            names.iter().take(3).map(|n| n.as_str()).collect::<Vec<_>>().join(", "),
            names.len() - 3
        ),
    }
}

/// Whether sidecar `file` of checkpoint folder `dir` may be copied: a regular file, or a link to
/// one inside the folder or in the Hugging Face cache's `blobs/` beside its `snapshots/` (where the
/// cache links every snapshot file). A link elsewhere could copy any readable file (contents and
/// mode) into an output that is then shared.
fn sidecar_link_allowed(dir: &Path, file: &Path) -> bool {
    if !std::fs::symlink_metadata(file).is_ok_and(|m| m.file_type().is_symlink()) {
        return true;
    }
    let Ok(target) = file.canonicalize() else {
        return false;
    };
    let inside = dir.canonicalize().is_ok_and(|d| target.starts_with(d));
    let blobs = dir.join("../../blobs").canonicalize();
    inside || blobs.is_ok_and(|b| target.parent() == Some(b.as_path()))
}

/// Opens a directory input. The files directly in it are classified by name ([`classify`]);
/// the weights read are, in order of preference: safetensors (`model.safetensors.index.json`'s
/// shards, else every `*.safetensors`), PyTorch (`pytorch_model.bin.index.json`'s shards, else
/// the Hugging Face `pytorch_model.bin` / `pytorch_model-*.bin`, else every other PyTorch
/// weight file), NumPy (every `*.npy` and `*.npz`). Weights of a format not chosen and
/// training state are left out with a notice; sidecars are listed for copying.
fn open_directory(path: &Path) -> Result<Checkpoint, FormatError> {
    // Regular files directly in the directory, following symlinks (the Hugging Face cache
    // links snapshot files to blobs). Hidden files are skipped: they include our own
    // temporaries left by a killed run.
    let mut names = Vec::new();
    let entries = std::fs::read_dir(path).map_err(|e| FormatError::io(path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| FormatError::io(path, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue; // non-UTF-8 names cannot be weights we know; not worth failing over
        };
        if name.starts_with('.') {
            continue;
        }
        let full = path.join(&name);
        if std::fs::metadata(&full).is_ok_and(|m| m.is_file()) {
            names.push(name);
        }
    }
    names.sort();
    if dcp::is_dcp_directory(path, &names) {
        return open_dcp_directory(path, &names);
    }
    let of_kind = |kind: FileKind| -> Vec<&String> { names.iter().filter(|n| classify(n) == kind).collect() };
    let (sidecars, outside): (Vec<PathBuf>, Vec<PathBuf>) = of_kind(FileKind::Sidecar)
        .into_iter()
        .map(|n| path.join(n))
        .partition(|p| sidecar_link_allowed(path, p));
    let has = |name: &str| names.iter().any(|n| n == name);

    const PREFERENCE: [Format; 3] = [Format::Safetensors, Format::PyTorch, Format::NumPy];
    let chosen = PREFERENCE
        .into_iter()
        .find(|&f| !of_kind(FileKind::Weights(f)).is_empty() || f.index_name().is_some_and(&has));
    let Some(format) = chosen else {
        return Err(FormatError::NoWeights {
            path: path.to_path_buf(),
        });
    };

    let mut notices = Vec::new();
    if !outside.is_empty() {
        notices.push(format!(
            "{}: not copying {} (symbolic links to files outside the checkpoint folder)",
            path.display(),
            outside
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for other in PREFERENCE.into_iter().filter(|&f| f != format) {
        let ignored = of_kind(FileKind::Weights(other));
        if !ignored.is_empty() {
            notices.push(format!(
                "directory {} has both {} and {} weights; loading the {} ({} not read)",
                path.display(),
                format.name(),
                other.name(),
                format.name(),
                name_list(&ignored)
            ));
        }
    }
    let (weights, index) = match format.index_name().filter(|index| has(index)) {
        Some(index_name) => {
            let index_path = path.join(index_name);
            let weight_map = read_index(&index_path)?;
            let mut shards: Vec<String> = weight_map.values().cloned().collect();
            shards.sort();
            shards.dedup();
            for shard in &shards {
                let shard_path = path.join(shard);
                if !std::fs::metadata(&shard_path).is_ok_and(|m| m.is_file()) {
                    return Err(FormatError::IndexFileMissing {
                        index: index_path,
                        file: shard_path,
                    });
                }
            }
            (shards, Some((index_path, weight_map)))
        }
        None => {
            let mut weights = of_kind(FileKind::Weights(format));
            if format == Format::PyTorch {
                // The Hugging Face names win over other PyTorch files (an adapter, an export).
                let (hf, others): (Vec<&String>, Vec<&String>) = weights
                    .into_iter()
                    .partition(|n| is_hf_torch_weights(&n.to_ascii_lowercase()));
                if !hf.is_empty() && !others.is_empty() {
                    notices.push(format!(
                        "directory {} has Hugging Face weights ({}) and other PyTorch files; loading the Hugging \
                         Face weights ({} not read)",
                        path.display(),
                        name_list(&hf),
                        name_list(&others)
                    ));
                }
                weights = if hf.is_empty() { others } else { hf };
            }
            (weights.into_iter().cloned().collect(), None)
        }
    };
    let training = of_kind(FileKind::TrainingState);
    if !training.is_empty() {
        notices.push(format!(
            "directory {}: {} left out (training state, neither loaded nor copied: it would be stale after \
             surgery)",
            path.display(),
            name_list(&training)
        ));
    }
    let files = weights
        .iter()
        .map(|n| SourceFile::open(&path.join(n)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut checkpoint = assemble(path, format, files, index)?;
    checkpoint.sidecars = sidecars;
    checkpoint.is_directory = true;
    notices.append(&mut checkpoint.notices);
    checkpoint.notices = notices;
    Ok(checkpoint)
}

/// Reads `weight_map` of a weight index. Shard names must be relative paths inside the
/// directory: an index is input, and `../` or absolute names would reach outside it.
fn read_index(index_path: &Path) -> Result<BTreeMap<String, String>, FormatError> {
    let bad = |reason: String| FormatError::BadIndex {
        path: index_path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index_path).map_err(|e| FormatError::io(index_path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON ({e})")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object".to_string()))?;
    if map.is_empty() {
        // Would silently load nothing while shards sit beside it.
        return Err(bad("empty \"weight_map\"".to_string()));
    }
    let mut weight_map = BTreeMap::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("shard of {name:?} is not a string")))?;
        let inside = !file.is_empty() && Path::new(file).components().all(|c| matches!(c, Component::Normal(_)));
        if !inside {
            return Err(bad(format!("shard name {file:?} is not a file in the directory")));
        }
        weight_map.insert(name.clone(), file.to_string());
    }
    Ok(weight_map)
}

/// Reads every file's tensors in `format` and builds the checkpoint (as a file input: the
/// caller fills in what a directory adds). A name in two files is an error whatever the
/// format; `index` is the index path and its weight map, checked against what the shards hold.
fn assemble(
    path: &Path,
    format: Format,
    files: Vec<SourceFile>,
    index: Option<(PathBuf, BTreeMap<String, String>)>,
) -> Result<Checkpoint, FormatError> {
    let mut tensors = Vec::new();
    let mut metadata = BTreeMap::new();
    let mut notices = Vec::new();
    // name -> file index, to report a tensor stored twice
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (file_index, file) in files.iter().enumerate() {
        let contents = format.read(file, file_index)?;
        if file_index == 0 {
            metadata = contents.metadata;
        }
        if !contents.skipped.is_empty() {
            let names: Vec<&String> = contents.skipped.iter().collect();
            notices.push(format!(
                "{}: {} skipped ({})",
                file.path.display(),
                if names.len() == 1 {
                    "1 entry that is not a tensor".to_string()
                } else {
                    format!("{} entries that are not tensors", names.len())
                },
                name_list(&names)
            ));
        }
        for t in contents.tensors {
            if let Some(&first) = seen.get(&t.name) {
                let first_path = files.get(first).map(|f| f.path.clone()).unwrap_or_default();
                return Err(FormatError::DuplicateTensor {
                    name: t.name,
                    first: first_path,
                    second: file.path.clone(),
                });
            }
            seen.insert(t.name.clone(), file_index);
            tensors.push(t);
        }
    }
    if let Some((index_path, weight_map)) = index {
        for (name, shard) in &weight_map {
            let shard_path = path.join(shard);
            let found = seen
                .get(name)
                .and_then(|&i| files.get(i))
                .is_some_and(|f| f.path == shard_path);
            if !found {
                return Err(FormatError::IndexTensorMissing {
                    index: index_path,
                    tensor: name.clone(),
                    file: shard_path,
                });
            }
        }
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        format,
        files: files.into_iter().map(Arc::new).collect(),
        tensors,
        metadata,
        sidecars: Vec::new(),
        is_directory: false,
        notices,
    })
}

/// Parses a size as transformers reads one (issue 14): decimal `KB`/`MB`/`GB`/`TB` (`"5GB"` =
/// 5·10⁹, the bare `K`/`M`/`G`/`T` alike), binary `KiB`/`MiB`/`GiB`/`TiB` (`"5GiB"` = 5·2³⁰),
/// plain bytes `"4096"` or `"4096B"`. Case-insensitive; spaces around and between are allowed.
pub fn parse_size(text: &str) -> Result<u64, FormatError> {
    let invalid = || FormatError::InvalidSize { text: text.to_string() };
    let trimmed = text.trim();
    let digits_end = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(invalid());
    }
    let number: u64 = digits.parse().map_err(|_| invalid())?;
    let scale: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => return Err(invalid()),
    };
    number.checked_mul(scale).ok_or_else(invalid)
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Builders shared by the tests of this layer.

    use std::collections::HashMap;
    use std::path::Path;

    use ::safetensors::tensor::TensorView;
    use ::safetensors::Dtype;

    /// An output tensor description.
    pub fn t(name: &str, dtype: crate::dtype::DType, shape: &[usize]) -> super::output::OutputTensor {
        super::output::OutputTensor::new(name, dtype, shape.to_vec()).unwrap()
    }

    /// A tensor for the official serializer: name, dtype, shape, bytes.
    pub type Spec = (&'static str, Dtype, Vec<usize>, Vec<u8>);

    /// Bytes 0, 1, 2, ... of length `n` offset by `seed`, so tensors are distinguishable.
    pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// Serializes with the official crate.
    pub fn official(specs: &[Spec], metadata: Option<HashMap<String, String>>) -> Vec<u8> {
        let views: Vec<(&str, TensorView<'_>)> = specs
            .iter()
            .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).expect("valid view")))
            .collect();
        ::safetensors::serialize(views, metadata).expect("serialize")
    }

    /// Writes an official file at `path`.
    pub fn write_official(path: &Path, specs: &[Spec], metadata: Option<HashMap<String, String>>) {
        std::fs::write(path, official(specs, metadata)).expect("write test file");
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use ::safetensors::Dtype;

    fn names(ck: &Checkpoint) -> Vec<&str> {
        ck.tensors.iter().map(|t| t.name.as_str()).collect()
    }

    fn sample_specs() -> Vec<Spec> {
        vec![
            ("w.bf16", Dtype::BF16, vec![3, 5], pattern(30, 1)),
            ("w.f8", Dtype::F8_E4M3, vec![7], pattern(7, 2)),
            ("mask", Dtype::BOOL, vec![2, 2], vec![1, 0, 0, 1]),
            ("ids", Dtype::I64, vec![3], pattern(24, 3)),
            ("empty", Dtype::F32, vec![0, 4], vec![]),
            ("f64", Dtype::F64, vec![], pattern(8, 4)),
            ("u16", Dtype::U16, vec![2, 1, 3], pattern(12, 5)),
        ]
    }

    #[test]
    fn reads_official_file_with_exact_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.safetensors");
        let specs = sample_specs();
        let meta: HashMap<String, String> = [
            ("format".to_string(), "pt".to_string()),
            ("a".to_string(), "b".to_string()),
        ]
        .into();
        write_official(&path, &specs, Some(meta));

        let ck = open_checkpoint(&path).unwrap();
        assert!(!ck.is_directory);
        assert!(ck.sidecars.is_empty());
        assert_eq!(ck.files.len(), 1);
        assert_eq!(ck.metadata.get("format").map(String::as_str), Some("pt"));
        assert_eq!(ck.metadata.get("a").map(String::as_str), Some("b"));
        assert_eq!(ck.tensors.len(), specs.len());
        let bytes = std::fs::read(&path).unwrap();
        for (name, dtype, shape, data) in &specs {
            let t = ck.tensors.iter().find(|t| t.name == *name).unwrap();
            assert_eq!(t.dtype.safetensors_name(), format!("{dtype:?}"));
            assert_eq!(&t.shape, shape);
            assert_eq!(t.nbytes as usize, data.len());
            let start = t.offset as usize;
            assert_eq!(&bytes[start..start + data.len()], &data[..], "{name}");
            let mut buf = vec![0u8; data.len()];
            ck.files[0].read_at(t.offset, &mut buf).unwrap();
            assert_eq!(&buf, data);
        }
        // Input order is by data offset.
        let offsets: Vec<u64> = ck.tensors.iter().map(|t| t.offset).collect();
        let mut sorted = offsets.clone();
        sorted.sort();
        assert_eq!(offsets, sorted);
        let map = ck.files[0].map().unwrap();
        assert_eq!(map.len() as u64, ck.files[0].len);
    }

    #[test]
    fn missing_path_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.safetensors");
        match open_checkpoint(&path) {
            Err(FormatError::Io { path: p, source }) => {
                assert_eq!(p, path);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_in_pytorch_and_numpy_files_is_a_format_error() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["pytorch_model.bin", "m.pt", "m.PTH"] {
            let path = dir.path().join(name);
            std::fs::write(&path, b"whatever").unwrap();
            match open_checkpoint(&path) {
                Err(FormatError::TorchArchive { path: p, source }) => {
                    assert_eq!(p, path);
                    assert!(matches!(source, zip::ZipError::NotZip), "{source}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        for name in ["w.npy", "w.npz"] {
            let path = dir.path().join(name);
            std::fs::write(&path, b"whatever").unwrap();
            match open_checkpoint(&path) {
                Err(FormatError::Numpy { path: p, .. }) => assert_eq!(p, path),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn header_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"abc").unwrap();
        match open_checkpoint(&path) {
            Err(FormatError::Header { path: p, source }) => {
                assert_eq!(p, path);
                assert!(matches!(source, HeaderError::TooShort { len: 3 }));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn directory_without_index_sorted_with_sidecars() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let m1: HashMap<String, String> = [("first".to_string(), "yes".to_string())].into();
        let m2: HashMap<String, String> = [("second".to_string(), "yes".to_string())].into();
        write_official(
            &d.join("b.safetensors"),
            &[("z", Dtype::F32, vec![2], pattern(8, 9))],
            Some(m2),
        );
        write_official(
            &d.join("a.safetensors"),
            &[
                ("y", Dtype::F16, vec![2], pattern(4, 1)),
                ("x", Dtype::F16, vec![1], pattern(2, 2)),
            ],
            Some(m1),
        );
        for side in ["config.json", "tokenizer.json", "generation_config.json", "README.md"] {
            std::fs::write(d.join(side), b"{}").unwrap();
        }
        for skip in [
            ".hidden",
            ".model.safetensors.tmp-1-2",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            "x.npz",
            "y.npy",
            "z.pt",
            "w.pth",
        ] {
            std::fs::write(d.join(skip), b"x").unwrap();
        }
        std::fs::create_dir(d.join("subdir")).unwrap();
        std::fs::write(d.join("subdir/inner.json"), b"{}").unwrap();

        let ck = open_checkpoint(d).unwrap();
        assert!(ck.is_directory);
        let files: Vec<_> = ck.files.iter().map(|f| f.path.clone()).collect();
        assert_eq!(files, vec![d.join("a.safetensors"), d.join("b.safetensors")]);
        // a.safetensors: x and y by offset (official writer sorts same-dtype by name).
        assert_eq!(names(&ck), vec!["x", "y", "z"]);
        assert_eq!(ck.tensors[2].file, 1);
        assert_eq!(ck.metadata.get("first").map(String::as_str), Some("yes"));
        assert!(!ck.metadata.contains_key("second"));
        let sidecars: Vec<_> = ck.sidecars.iter().map(|p| p.file_name().unwrap().to_owned()).collect();
        assert_eq!(
            sidecars,
            vec!["README.md", "config.json", "generation_config.json", "tokenizer.json"]
        );
    }

    #[test]
    fn sidecar_links_are_followed_only_inside_the_folder_or_into_the_hub_cache_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let snapshot = root.join("models--org--m/snapshots/abc");
        let blobs = root.join("models--org--m/blobs");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(&blobs).unwrap();
        write_official(
            &snapshot.join("model.safetensors"),
            &[("w", Dtype::F32, vec![1], pattern(4, 1))],
            None,
        );
        std::fs::write(blobs.join("0123"), b"{}").unwrap();
        std::os::unix::fs::symlink("../../blobs/0123", snapshot.join("config.json")).unwrap();
        std::fs::write(snapshot.join("real.txt"), b"x").unwrap();
        std::os::unix::fs::symlink("real.txt", snapshot.join("README.md")).unwrap();
        let secret = root.join("secret");
        std::fs::write(&secret, b"do not copy").unwrap();
        std::os::unix::fs::symlink(&secret, snapshot.join("tokenizer.json")).unwrap();
        let ck = open_checkpoint(&snapshot).unwrap();
        let names: Vec<_> = ck.sidecars.iter().map(|p| p.file_name().unwrap().to_owned()).collect();
        assert_eq!(names, ["README.md", "config.json", "real.txt"]);
        assert!(
            ck.notices.iter().any(|n| n.contains("not copying tokenizer.json")),
            "{:?}",
            ck.notices
        );
    }

    #[test]
    fn directory_with_index() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_official(
            &d.join("model-00002-of-00002.safetensors"),
            &[("b", Dtype::F32, vec![1], pattern(4, 1))],
            None,
        );
        write_official(
            &d.join("model-00001-of-00002.safetensors"),
            &[
                ("a", Dtype::F32, vec![1], pattern(4, 2)),
                ("extra", Dtype::U8, vec![1], vec![7]),
            ],
            Some([("k".to_string(), "v".to_string())].into()),
        );
        // A stale shard the index does not name is ignored.
        write_official(
            &d.join("model-00003-of-00003.safetensors"),
            &[("stale", Dtype::F32, vec![1], pattern(4, 3))],
            None,
        );
        std::fs::write(
            d.join(INDEX_NAME),
            r#"{"metadata": {"total_size": 9}, "weight_map": {
                "b": "model-00002-of-00002.safetensors",
                "a": "model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(d.join("config.json"), b"{}").unwrap();
        let ck = open_checkpoint(d).unwrap();
        // Union of the shard headers, including a tensor the index does not list.
        assert_eq!(names(&ck), vec!["a", "extra", "b"]);
        assert_eq!(ck.files.len(), 2);
        assert_eq!(ck.metadata.get("k").map(String::as_str), Some("v"));
        assert_eq!(ck.sidecars, vec![d.join("config.json")]);
    }

    #[test]
    fn index_naming_missing_tensor_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_official(
            &d.join("s1.safetensors"),
            &[("a", Dtype::F32, vec![1], pattern(4, 2))],
            None,
        );
        std::fs::write(
            d.join(INDEX_NAME),
            r#"{"weight_map": {"a": "s1.safetensors", "ghost": "s1.safetensors"}}"#,
        )
        .unwrap();
        match open_checkpoint(d) {
            Err(FormatError::IndexTensorMissing { index, tensor, file }) => {
                assert_eq!(index, d.join(INDEX_NAME));
                assert_eq!(tensor, "ghost");
                assert_eq!(file, d.join("s1.safetensors"));
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(
            d.join(INDEX_NAME),
            r#"{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#,
        )
        .unwrap();
        match open_checkpoint(d) {
            Err(FormatError::IndexFileMissing { index, file }) => {
                assert_eq!(index, d.join(INDEX_NAME));
                assert_eq!(file, d.join("s2.safetensors"));
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "not json",
            r#"{"metadata": {}}"#,
            r#"{"weight_map": {}}"#,
            r#"{"weight_map": {"a": 3}}"#,
            r#"{"weight_map": {"a": "../s1.safetensors"}}"#,
            r#"{"weight_map": {"a": "/etc/passwd"}}"#,
        ] {
            std::fs::write(d.join(INDEX_NAME), bad).unwrap();
            assert!(matches!(open_checkpoint(d), Err(FormatError::BadIndex { .. })), "{bad}");
        }
    }

    #[test]
    fn duplicate_name_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_official(
            &d.join("a.safetensors"),
            &[("w", Dtype::F32, vec![1], pattern(4, 1))],
            None,
        );
        write_official(
            &d.join("b.safetensors"),
            &[("w", Dtype::F32, vec![1], pattern(4, 2))],
            None,
        );
        match open_checkpoint(d) {
            Err(FormatError::DuplicateTensor { name, first, second }) => {
                assert_eq!(name, "w");
                assert_eq!(first, d.join("a.safetensors"));
                assert_eq!(second, d.join("b.safetensors"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn empty_directory_and_directory_of_training_state_have_no_weights() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        assert!(matches!(
            open_checkpoint(dir.path()),
            Err(FormatError::NoWeights { .. })
        ));
        for name in [
            "training_args.bin",
            "optimizer.pt",
            "rng_state_0.pth",
            "flax_model.msgpack",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        match open_checkpoint(dir.path()) {
            Err(e @ FormatError::NoWeights { .. }) => assert!(e.to_string().contains("*.bin"), "{e}"),
            other => panic!("{other:?}"),
        }
        // A PyTorch weight file is now read (and garbage in it is an error naming it).
        std::fs::write(dir.path().join("pytorch_model.bin"), b"x").unwrap();
        match open_checkpoint(dir.path()) {
            Err(FormatError::TorchArchive { path, .. }) => assert_eq!(path, dir.path().join("pytorch_model.bin")),
            other => panic!("{other:?}"),
        }
    }

    fn torch_fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/torch")
            .join(name)
    }

    /// Copies `plain.pt` (f32, f16, bf16, i64, flag, scalar) and `wrapped.pt` (encoder.w,
    /// head.b) into `dir` under the given names.
    fn torch_shards(dir: &Path, first: &str, second: &str) {
        std::fs::copy(torch_fixture("plain.pt"), dir.join(first)).unwrap();
        std::fs::copy(torch_fixture("wrapped.pt"), dir.join(second)).unwrap();
    }

    const PLAIN: [&str; 6] = ["f32", "f16", "bf16", "i64", "flag", "scalar"];

    fn sorted_names(ck: &Checkpoint) -> Vec<String> {
        let mut names: Vec<String> = ck.tensors.iter().map(|t| t.name.clone()).collect();
        names.sort();
        names
    }

    fn sorted(names: &[&str]) -> Vec<String> {
        let mut names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        names.sort();
        names
    }

    #[test]
    fn files_are_classified_by_name() {
        let cases = [
            ("model.safetensors", FileKind::Weights(Format::Safetensors)),
            ("pytorch_model.bin", FileKind::Weights(Format::PyTorch)),
            ("adapter_model.bin", FileKind::Weights(Format::PyTorch)),
            ("encoder.PT", FileKind::Weights(Format::PyTorch)),
            ("w.npy", FileKind::Weights(Format::NumPy)),
            ("w.npz", FileKind::Weights(Format::NumPy)),
            ("training_args.bin", FileKind::Sidecar),
            ("config.json", FileKind::Sidecar),
            ("trainer_state.json", FileKind::Sidecar),
            ("optimizer.pt", FileKind::TrainingState),
            ("optimizer.bin", FileKind::TrainingState),
            ("optimizer_1.bin", FileKind::TrainingState),
            ("scheduler.pt", FileKind::TrainingState),
            ("lr_scheduler.pt", FileKind::TrainingState),
            ("scaler.pt", FileKind::TrainingState),
            ("sampler.bin", FileKind::TrainingState),
            ("rng_state.pth", FileKind::TrainingState),
            ("rng_state_7.pth", FileKind::TrainingState),
            (
                "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                FileKind::TrainingState,
            ),
            ("optimizers.pt", FileKind::Weights(Format::PyTorch)),
            ("pytorch_model.bin.index.json", FileKind::NotCopied),
            ("tf_model.h5", FileKind::NotCopied),
            ("bert_model.ckpt.data-00000-of-00001", FileKind::NotCopied),
            ("bert_model.ckpt.index", FileKind::NotCopied),
            ("model.onnx.data", FileKind::NotCopied),
            ("checkpoint.pth.tar", FileKind::NotCopied),
            ("openvino_model.bin", FileKind::NotCopied),
            ("openvino_model.xml", FileKind::NotCopied),
        ];
        for (name, kind) in cases {
            assert_eq!(classify(name), kind, "{name}");
        }
    }

    #[test]
    fn safetensors_win_over_pytorch_and_numpy_with_a_notice() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_official(
            &d.join("model.safetensors"),
            &[("w", Dtype::F32, vec![1], pattern(4, 1))],
            None,
        );
        std::fs::copy(torch_fixture("plain.pt"), d.join("pytorch_model.bin")).unwrap();
        std::fs::write(d.join("x.npy"), b"never read").unwrap();
        let ck = open_checkpoint(d).unwrap();
        assert_eq!(ck.format, Format::Safetensors);
        assert_eq!(names(&ck), vec!["w"]);
        assert_eq!(ck.notices.len(), 2, "{:?}", ck.notices);
        assert!(
            ck.notices[0].contains("both safetensors and PyTorch weights; loading the safetensors")
                && ck.notices[0].contains("pytorch_model.bin"),
            "{:?}",
            ck.notices
        );
        assert!(ck.notices[1].contains("NumPy") && ck.notices[1].contains("x.npy"));
        assert!(ck.sidecars.is_empty());
    }

    #[test]
    fn pytorch_directory_skips_training_state_and_keeps_training_args_as_a_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::copy(torch_fixture("plain.pt"), d.join("pytorch_model.bin")).unwrap();
        // Never opened: garbage in them proves it.
        for name in ["training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"] {
            std::fs::write(d.join(name), b"not a checkpoint").unwrap();
        }
        std::fs::write(d.join("trainer_state.json"), b"{}").unwrap();
        let ck = open_checkpoint(d).unwrap();
        assert_eq!(ck.format, Format::PyTorch);
        assert!(ck.is_directory);
        assert_eq!(sorted_names(&ck), sorted(&PLAIN));
        assert_eq!(
            ck.sidecars,
            vec![d.join("trainer_state.json"), d.join("training_args.bin")]
        );
        assert_eq!(ck.notices.len(), 1, "{:?}", ck.notices);
        let notice = &ck.notices[0];
        assert!(notice.contains("optimizer.pt, rng_state.pth, scheduler.pt"), "{notice}");
        assert!(notice.contains("training state"), "{notice}");
    }

    #[test]
    fn hugging_face_pytorch_names_win_over_other_pytorch_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        torch_shards(
            d,
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
        );
        std::fs::write(d.join("adapter_model.bin"), b"never read").unwrap();
        let ck = open_checkpoint(d).unwrap();
        let mut want = PLAIN.to_vec();
        want.extend(["encoder.w", "head.b"]);
        assert_eq!(sorted_names(&ck), sorted(&want));
        assert_eq!(ck.files.len(), 2);
        assert!(ck.tensors.iter().all(|t| t.file == usize::from(t.name.contains('.'))));
        // The directory's notice, then the wrapped file's skipped entries.
        assert!(
            ck.notices.len() == 2
                && ck.notices[0].contains("adapter_model.bin")
                && ck.notices[1].ends_with("2 entries that are not tensors skipped (epoch, lr)"),
            "{:?}",
            ck.notices
        );
        // Without Hugging Face names every PyTorch weight file is read, sorted by name.
        let other = tempfile::tempdir().unwrap();
        torch_shards(other.path(), "b.pt", "a.pth");
        let ck = open_checkpoint(other.path()).unwrap();
        assert_eq!(ck.files[0].path, other.path().join("a.pth"));
        assert_eq!(ck.tensors[0].name, "encoder.w");
        assert_eq!(
            ck.notices.len(),
            1,
            "only the wrapped file's skipped entries: {:?}",
            ck.notices
        );
    }

    fn write_torch_index(d: &Path, weight_map: &[(&str, &str)]) {
        let map: serde_json::Map<String, serde_json::Value> = weight_map
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(d.join(TORCH_INDEX_NAME), index.to_string()).unwrap();
    }

    #[test]
    fn pytorch_index_is_honoured_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (s1, s2) = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin");
        torch_shards(d, s1, s2);
        // A stale shard the index does not name is not read.
        std::fs::write(d.join("pytorch_model-00003-of-00003.bin"), b"stale").unwrap();
        let mut map: Vec<(&str, &str)> = PLAIN.iter().map(|n| (*n, s1)).collect();
        map.extend([("encoder.w", s2), ("head.b", s2)]);
        write_torch_index(d, &map);
        let ck = open_checkpoint(d).unwrap();
        assert_eq!(ck.format, Format::PyTorch);
        assert_eq!(ck.files.len(), 2);
        assert_eq!(ck.tensors.len(), 8);
        assert!(
            ck.notices.len() == 1 && ck.notices[0].contains("not tensors skipped (epoch, lr)"),
            "{:?}",
            ck.notices
        );

        // A tensor placed in a shard that does not hold it.
        let mut wrong = map.clone();
        wrong.push(("ghost", s2));
        write_torch_index(d, &wrong);
        match open_checkpoint(d) {
            Err(FormatError::IndexTensorMissing { index, tensor, file }) => {
                assert_eq!(index, d.join(TORCH_INDEX_NAME));
                assert_eq!(tensor, "ghost");
                assert_eq!(file, d.join(s2));
            }
            other => panic!("{other:?}"),
        }
        // A tensor the index puts in the other shard.
        let mut moved = map.clone();
        moved[0] = ("f32", s2);
        write_torch_index(d, &moved);
        assert!(matches!(open_checkpoint(d), Err(FormatError::IndexTensorMissing { tensor, .. }) if tensor == "f32"));
        // A missing shard.
        let mut missing = map.clone();
        missing.push(("extra", "pytorch_model-00009-of-00009.bin"));
        write_torch_index(d, &missing);
        match open_checkpoint(d) {
            Err(FormatError::IndexFileMissing { file, .. }) => {
                assert_eq!(file, d.join("pytorch_model-00009-of-00009.bin"))
            }
            other => panic!("{other:?}"),
        }
        // Names outside the directory.
        write_torch_index(d, &[("f32", "../pytorch_model.bin")]);
        assert!(matches!(open_checkpoint(d), Err(FormatError::BadIndex { .. })));
        // The same tensor in two shards.
        std::fs::copy(torch_fixture("plain.pt"), d.join(s2)).unwrap();
        write_torch_index(d, &[("f32", s1), ("f16", s2)]);
        match open_checkpoint(d) {
            Err(FormatError::DuplicateTensor { name, first, second }) => {
                assert_eq!(name, "f32");
                assert_eq!((first, second), (d.join(s1), d.join(s2)));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A v1 `.npy` of float32 values.
    fn npy_f32(values: &[f32]) -> Vec<u8> {
        let mut h = format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
            values.len()
        );
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        out
    }

    #[test]
    fn numpy_directory_and_duplicates_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("b.npy"), npy_f32(&[1.0, 2.0])).unwrap();
        std::fs::write(d.join("a.npy"), npy_f32(&[3.0])).unwrap();
        std::fs::write(d.join("config.json"), b"{}").unwrap();
        let ck = open_checkpoint(d).unwrap();
        assert_eq!(ck.format, Format::NumPy);
        assert_eq!(names(&ck), vec!["a", "b"]);
        assert_eq!(ck.tensors[1].shape, vec![2]);
        assert_eq!(ck.sidecars, vec![d.join("config.json")]);
        // `a.npy` and `a.NPY` both hold a tensor named `a`.
        let dup = d.join("dup");
        std::fs::create_dir(&dup).unwrap();
        std::fs::write(dup.join("a.npy"), npy_f32(&[1.0])).unwrap();
        std::fs::write(dup.join("a.NPY"), npy_f32(&[2.0])).unwrap();
        match open_checkpoint(&dup) {
            Err(FormatError::DuplicateTensor { name, first, second }) => {
                assert_eq!(name, "a");
                assert_eq!((first, second), (dup.join("a.NPY"), dup.join("a.npy")));
            }
            other => panic!("{other:?}"),
        }
        // PyTorch is preferred over NumPy.
        std::fs::copy(torch_fixture("plain.pt"), d.join("model.pt")).unwrap();
        let ck = open_checkpoint(d).unwrap();
        assert_eq!(ck.format, Format::PyTorch);
        assert!(
            ck.notices[0].contains("both PyTorch and NumPy weights; loading the PyTorch"),
            "{:?}",
            ck.notices
        );
    }

    #[test]
    fn parse_size_cases() {
        let ok = [
            ("4096", 4096),
            ("0", 0),
            ("10B", 10),
            ("512KB", 512_000),
            ("512kib", 512 << 10),
            ("100MB", 100_000_000),
            ("100 MiB", 100 << 20),
            ("5GB", 5_000_000_000),
            ("5gb", 5_000_000_000),
            ("5GiB", 5 << 30),
            ("5G", 5_000_000_000),
            (" 1TB ", 1_000_000_000_000),
            ("2tib", 2 << 40),
        ];
        for (text, want) in ok {
            assert_eq!(parse_size(text).unwrap(), want, "{text}");
        }
        for bad in [
            "",
            "GB",
            "-1GB",
            "1.5GB",
            "5 GBs",
            "5PB",
            "1e9",
            "99999999999999999999",
            "20000000TB",
        ] {
            assert!(
                matches!(parse_size(bad), Err(FormatError::InvalidSize { ref text }) if text == bad),
                "{bad}"
            );
        }
    }
}

//! Checkpoint files on disk (SPEC §6): opening inputs read-only, listing their tensors with
//! absolute byte offsets, and the one error type of this layer. Header parsing lives in
//! [`safetensors`], the atomic writer in [`output`]. Reading tensor bytes, computing on them and
//! deciding what to write belong to the executor; this layer only says where bytes are and
//! where they go.

#![deny(missing_docs)]

pub mod npz;
pub mod numpy;
pub mod output;
pub mod pickle;
pub mod safetensors;
pub mod torch;
pub mod torch_output;
pub mod zip;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::dtype::DType;

use self::safetensors::HeaderError;

/// Name of the weight index of a sharded safetensors directory.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// Errors of the formats layer: reading checkpoints and writing outputs.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// An operating-system call on `path` failed (open, read, write, rename, ...).
    #[error("i/o error on {}", path.display())]
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
    #[error("cannot read NumPy file {}: {reason}", path.display())]
    Numpy {
        /// The input file.
        path: PathBuf,
        /// What is wrong, naming the tensor when there is one.
        reason: String,
    },
    /// A tensor's dtype has no NumPy equivalent, so it cannot be written to `.npz`.
    #[error("output tensor {name:?} of dtype {dtype} cannot be stored in .npz (NumPy has no such type); cast it first, e.g. to float32")]
    NpzDtype {
        /// The tensor name.
        name: String,
        /// Its dtype.
        dtype: DType,
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
    /// The input is in a format this build cannot read.
    #[error("cannot read {}: {format} reading is not available yet", path.display())]
    Unsupported {
        /// The input path.
        path: PathBuf,
        /// The format recognised from the name (`"PyTorch"`, `"NumPy"`).
        format: &'static str,
    },
    /// A directory input holds no weight files.
    #[error("no *.safetensors files in directory {}", path.display())]
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
    /// The weight index places a tensor in a shard whose header does not hold it.
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
    /// The output path cannot be used as asked.
    #[error("invalid output path {}: {reason}", path.display())]
    InvalidOutput {
        /// The output path.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
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
        })
    }

    /// Reads exactly `buf.len()` bytes at `offset` (pread, so threads can share the file).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), FormatError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| FormatError::io(&self.path, e))
    }

    /// Read-only memory map of the whole file.
    pub fn map(&self) -> Result<memmap2::Mmap, FormatError> {
        // SAFETY: the map is read-only and the file was opened read-only, so this process never
        // writes through it. Another process truncating or rewriting an input during a run would
        // be undefined behaviour; like every mmap-based loader (safetensors, numpy) we require
        // inputs to stay unchanged while they are being read, which the tool documents.
        unsafe { memmap2::Mmap::map(&self.file) }.map_err(|e| FormatError::io(&self.path, e))
    }

    /// The open file, for callers that issue their own reads (`copy_file_range`, `pread`).
    pub fn file(&self) -> &File {
        &self.file
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
    /// Absolute byte offset of the tensor's first byte in its file.
    pub offset: u64,
    /// Number of bytes the tensor takes.
    pub nbytes: u64,
}

/// An opened input checkpoint: its files, its tensors and the files beside them.
#[derive(Debug)]
pub struct Checkpoint {
    /// The path the user gave (file or directory).
    pub path: PathBuf,
    /// The weight files, sorted by file name.
    pub files: Vec<Arc<SourceFile>>,
    /// Every tensor, files in order, and within a file by data offset.
    pub tensors: Vec<TensorEntry>,
    /// `__metadata__` of the first file (empty when it has none).
    pub metadata: BTreeMap<String, String>,
    /// Non-weight regular files directly in a directory input (config, tokenizer, ...), sorted;
    /// empty for a file input.
    pub sidecars: Vec<PathBuf>,
    /// Whether the user gave a directory.
    pub is_directory: bool,
}

/// The non-safetensors weight format a file name indicates, if any.
fn foreign_format(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    if [".bin", ".pt", ".pth"].iter().any(|ext| lower.ends_with(ext)) {
        Some("PyTorch")
    } else if [".npy", ".npz"].iter().any(|ext| lower.ends_with(ext)) {
        Some("NumPy")
    } else {
        None
    }
}

/// Whether a file in a checkpoint directory holds weights or a weight index (and so is not a
/// sidecar to copy).
fn is_weight_name(name: &str) -> bool {
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
    ];
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".safetensors")
        || OTHER_WEIGHTS.iter().any(|ext| lower.ends_with(ext))
        || foreign_format(name).is_some()
}

/// Reads the tensor entries of one file of a non-safetensors format (file index for the entries).
type ReadTensors = fn(&SourceFile, usize) -> Result<Vec<TensorEntry>, FormatError>;

/// Opens a checkpoint: a safetensors file, a directory with `model.safetensors.index.json`, or
/// a directory of `*.safetensors` files. Only headers are read.
pub fn open_checkpoint(path: &Path) -> Result<Checkpoint, FormatError> {
    let meta = std::fs::metadata(path).map_err(|e| FormatError::io(path, e))?;
    if !meta.is_dir() {
        let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        let reader: Option<ReadTensors> = match foreign_format(&name) {
            Some("NumPy") => Some(numpy::read_tensors),
            Some("PyTorch") => Some(torch::read_tensors),
            _ => None,
        };
        if let Some(read_tensors) = reader {
            let file = SourceFile::open(path)?;
            let tensors = read_tensors(&file, 0)?;
            return Ok(Checkpoint {
                path: path.to_path_buf(),
                files: vec![Arc::new(file)],
                tensors,
                metadata: BTreeMap::new(),
                sidecars: Vec::new(),
                is_directory: false,
            });
        }
        if let Some(format) = foreign_format(&name) {
            return Err(FormatError::Unsupported {
                path: path.to_path_buf(),
                format,
            });
        }
        let file = SourceFile::open(path)?;
        return assemble(path, vec![file], None, Vec::new(), false);
    }

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
    let sidecars: Vec<PathBuf> = names
        .iter()
        .filter(|n| !is_weight_name(n))
        .map(|n| path.join(n))
        .collect();

    if names.iter().any(|n| n == INDEX_NAME) {
        let index_path = path.join(INDEX_NAME);
        let weight_map = read_index(&index_path)?;
        let mut shard_names: Vec<&String> = weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let mut files = Vec::with_capacity(shard_names.len());
        for shard in shard_names {
            let shard_path = path.join(shard);
            match std::fs::metadata(&shard_path) {
                Ok(m) if m.is_file() => {}
                _ => {
                    return Err(FormatError::IndexFileMissing {
                        index: index_path,
                        file: shard_path,
                    })
                }
            }
            files.push(SourceFile::open(&shard_path)?);
        }
        let index = (index_path, weight_map);
        return assemble(path, files, Some(index), sidecars, true);
    }

    let weights: Vec<&String> = names.iter().filter(|n| n.ends_with(".safetensors")).collect();
    if weights.is_empty() {
        if names.iter().any(|n| foreign_format(n).is_some()) {
            let format = names.iter().find_map(|n| foreign_format(n)).unwrap_or("PyTorch");
            return Err(FormatError::Unsupported {
                path: path.to_path_buf(),
                format,
            });
        }
        return Err(FormatError::NoWeights {
            path: path.to_path_buf(),
        });
    }
    let files = weights
        .into_iter()
        .map(|n| SourceFile::open(&path.join(n)))
        .collect::<Result<Vec<_>, _>>()?;
    assemble(path, files, None, sidecars, true)
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

/// Reads every file's header and builds the checkpoint; `index` is the index path and its
/// weight map, checked against the shard headers.
fn assemble(
    path: &Path,
    files: Vec<SourceFile>,
    index: Option<(PathBuf, BTreeMap<String, String>)>,
    sidecars: Vec<PathBuf>,
    is_directory: bool,
) -> Result<Checkpoint, FormatError> {
    let mut tensors = Vec::new();
    let mut metadata = BTreeMap::new();
    // name -> file index, to report a tensor stored twice
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (file_index, file) in files.iter().enumerate() {
        let header = safetensors::read_header(file)?;
        if file_index == 0 {
            metadata = header.metadata;
        }
        for t in header.tensors {
            if let Some(&first) = seen.get(&t.name) {
                let first_path = files.get(first).map(|f| f.path.clone()).unwrap_or_default();
                return Err(FormatError::DuplicateTensor {
                    name: t.name,
                    first: first_path,
                    second: file.path.clone(),
                });
            }
            seen.insert(t.name.clone(), file_index);
            // Cannot overflow: parse_header checked data_start + end <= file length.
            tensors.push(TensorEntry {
                offset: header.data_start + t.begin,
                nbytes: t.end - t.begin,
                name: t.name,
                dtype: t.dtype,
                shape: t.shape,
                file: file_index,
            });
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
        files: files.into_iter().map(Arc::new).collect(),
        tensors,
        metadata,
        sidecars,
        is_directory,
    })
}

/// Parses a size budget in binary units: `"5GB"` = 5·2^30, `"100MB"` = 100·2^20, `"512KB"`,
/// `"1TB"`, plain bytes `"4096"` or `"4096B"`. Case-insensitive; `KiB`/`MiB`/`GiB`/`TiB` and the
/// bare `K`/`M`/`G`/`T` mean the same; spaces around and between are allowed.
pub fn parse_size(text: &str) -> Result<u64, FormatError> {
    let invalid = || FormatError::InvalidSize { text: text.to_string() };
    let trimmed = text.trim();
    let digits_end = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(invalid());
    }
    let number: u64 = digits.parse().map_err(|_| invalid())?;
    let shift = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(invalid()),
    };
    number.checked_mul(1u64 << shift).ok_or_else(invalid)
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Builders shared by the tests of this layer.

    use std::collections::HashMap;
    use std::path::Path;

    use ::safetensors::tensor::TensorView;
    use ::safetensors::Dtype;

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
                Err(FormatError::Torch { path: p, reason }) => {
                    assert_eq!(p, path);
                    assert!(reason.contains("not a zip"), "{reason}");
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
    fn empty_directory_and_pytorch_only_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        assert!(matches!(
            open_checkpoint(dir.path()),
            Err(FormatError::NoWeights { .. })
        ));
        std::fs::write(dir.path().join("pytorch_model.bin"), b"x").unwrap();
        assert!(matches!(
            open_checkpoint(dir.path()),
            Err(FormatError::Unsupported { format: "PyTorch", .. })
        ));
    }

    #[test]
    fn parse_size_cases() {
        let ok = [
            ("4096", 4096),
            ("0", 0),
            ("10B", 10),
            ("512KB", 512 << 10),
            ("512kib", 512 << 10),
            ("100MB", 100 << 20),
            ("100 MiB", 100 << 20),
            ("5GB", 5 << 30),
            ("5gb", 5 << 30),
            ("5GiB", 5 << 30),
            ("5G", 5 << 30),
            (" 1TB ", 1 << 40),
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

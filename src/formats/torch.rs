//! PyTorch checkpoints. The zip format (`torch.save` since 1.6) is read here: a zip archive
//! holding `<prefix>/data.pkl` (the pickled state dict), `<prefix>/data/<key>` (one entry per
//! storage), `<prefix>/version` and `<prefix>/byteorder`. The zip directory is parsed here (it is
//! small), the pickle by the restricted [`super::pickle`] unpickler, and each tensor becomes a
//! [`TensorEntry`] pointing straight into its storage entry's bytes, which must be stored
//! uncompressed so they can be read in place. The legacy format (a stream of pickles followed
//! by raw storages) is recognised by its first byte and left to [`super::torch_legacy`]; both
//! share the flattening of wrappers and the checks of each tensor's extent in its storage.
//! Non-contiguous tensors keep their strides ([`TensorEntry::strides`]).

use std::collections::HashMap;
use std::path::Path;

use super::pickle::{self, Object, TensorRef};
use super::{zip, FormatError, SourceFile, TensorEntry};

/// Largest `data.pkl` we read into memory; a state dict's pickle is kilobytes to a few MB.
const MAX_PICKLE: u64 = 1 << 30;

/// Largest `data.pkl` of one chunk of a distributed checkpoint (one tensor's pickle).
const MAX_CHUNK_PICKLE: u64 = 1 << 20;
/// Deepest wrapper nesting flattened into dotted names.
const MAX_DEPTH: usize = 64;

pub(crate) fn bad(path: &Path, reason: impl Into<String>) -> FormatError {
    FormatError::Torch {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A zip error of the checkpoint at `path`.
fn bad_zip(path: &Path) -> impl Fn(zip::ZipError) -> FormatError + '_ {
    move |source| FormatError::TorchArchive {
        path: path.to_path_buf(),
        source,
    }
}

/// `(dotted name, tensor)` pairs in state-dict order.
type NamedTensors = Vec<(String, TensorRef)>;

/// Most bytes of dotted names built, as much as a safetensors header may hold: a name repeats
/// its prefix, so a pickle whose 1 MiB key prefixes 1,000 entries built 1 GB of names (issue 9).
const MAX_NAME_BYTES: usize = super::safetensors::MAX_HEADER_LEN as usize;

/// The tensors of an unpickled checkpoint, and the names of the entries skipped because they are
/// not tensors.
pub(crate) fn tensors_of(root: &Object, path: &Path) -> Result<(NamedTensors, Vec<String>), FormatError> {
    tensors_within(root, path, MAX_NAME_BYTES)
}

/// [`tensors_of`], with at most `max_name_bytes` of names.
fn tensors_within(
    root: &Object,
    path: &Path,
    max_name_bytes: usize,
) -> Result<(NamedTensors, Vec<String>), FormatError> {
    let mut flat = Flat {
        found: Vec::new(),
        skipped: Vec::new(),
        index: HashMap::new(),
        name_bytes: 0,
        max_name_bytes,
        path,
    };
    let (weights, wrapper) = state_dict(root);
    if let (Object::Dict(pairs), Some(wrapper)) = (root, wrapper) {
        // The siblings of the wrapper (`epoch`, `optimizer`, ...) are not read either.
        for (key, _) in pairs.iter() {
            if let Object::Str(s) = key {
                if &**s != wrapper {
                    let name = flat.name("", s)?;
                    flat.skipped.push(name);
                }
            }
        }
    }
    flat.flatten("", weights, 0)?;
    Ok((flat.found, flat.skipped))
}

/// What flattening has found so far.
struct Flat<'p> {
    found: NamedTensors,
    /// Values that are neither tensors nor dicts.
    skipped: Vec<String>,
    /// Position of each name in `found`.
    index: HashMap<String, usize>,
    /// Bytes of the names built, against `max_name_bytes`.
    name_bytes: usize,
    max_name_bytes: usize,
    path: &'p Path,
}

impl Flat<'_> {
    /// `prefix.key`, or `key` at the top, counted before it is built.
    fn name(&mut self, prefix: &str, key: &str) -> Result<String, FormatError> {
        let len = prefix.len() + usize::from(!prefix.is_empty()) + key.len();
        self.name_bytes = self.name_bytes.saturating_add(len);
        if self.name_bytes > self.max_name_bytes {
            return Err(bad(
                self.path,
                format!("the state dict's names take more than {} bytes", self.max_name_bytes),
            ));
        }
        Ok(if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        })
    }

    /// Flattens the unpickled value into `(dotted name, tensor)` pairs; later duplicates win.
    /// Values that are neither tensors nor dicts are named in `skipped`.
    fn flatten(&mut self, prefix: &str, value: &Object, depth: usize) -> Result<(), FormatError> {
        if depth > MAX_DEPTH {
            return Err(bad(self.path, "state dict is nested too deeply"));
        }
        let Object::Dict(pairs) = value else {
            return Ok(());
        };
        for (key, value) in pairs.iter() {
            let name = match key {
                Object::Str(s) => self.name(prefix, s)?,
                Object::Int(i) => self.name(prefix, &i.to_string())?,
                _ => continue, // not a name a tensor can have
            };
            match value {
                Object::Tensor(t) => {
                    if let Some(slot) = self.index.get(&name).and_then(|&i| self.found.get_mut(i)) {
                        slot.1 = TensorRef::clone(t);
                    } else {
                        self.index.insert(name.clone(), self.found.len());
                        self.found.push((name, TensorRef::clone(t)));
                    }
                }
                Object::Dict(_) => self.flatten(&name, value, depth + 1)?,
                _ => self.skipped.push(name), // epochs, optimizer scalars, configs: not weights
            }
        }
        Ok(())
    }
}

/// The state dict inside a checkpoint and the wrapper key it was under: a `{"state_dict": ...}`
/// or `{"model": ...}` wrapper is unwrapped, anything else is taken whole.
fn state_dict(root: &Object) -> (&Object, Option<&'static str>) {
    if let Object::Dict(pairs) = root {
        for wrapper in ["state_dict", "model"] {
            let inner = pairs
                .iter()
                .rev()
                .find(|(k, _)| matches!(k, Object::Str(s) if &**s == wrapper));
            if let Some((_, inner @ Object::Dict(_))) = inner {
                return (inner, Some(wrapper));
            }
        }
    }
    (root, None)
}

/// The entry of tensor `name` viewing a storage whose element 0 is at byte `base` of the file
/// and of which `available` elements are in the file. Contiguous tensors get row-major entries;
/// other strides are kept, after checking that every element lies inside the storage.
pub(crate) fn entry_for(
    name: String,
    t: TensorRef,
    mut base: u64,
    mut available: u64,
    file_index: usize,
    path: &Path,
) -> Result<TensorEntry, FormatError> {
    let dtype = t.storage.dtype;
    let item = dtype.size().unwrap_or(1) as u64;
    if let Some((view_offset, view_numel)) = t.storage.view {
        // A legacy storage view: elements [view_offset, view_offset + view_numel) of the storage.
        if view_offset.checked_add(view_numel).is_none_or(|end| end > available) {
            return Err(bad(
                path,
                format!("tensor {name:?} views a storage view that extends past its storage"),
            ));
        }
        base += view_offset * item; // cannot overflow: inside the storage's bytes in the file
        available = view_numel;
    }
    let numel = t
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| bad(path, format!("tensor {name:?} is too large")))?;
    let nbytes = numel
        .checked_mul(item)
        .ok_or_else(|| bad(path, format!("tensor {name:?} is too large")))?;
    if numel == 0 {
        // No element is read, so neither offset nor strides matter.
        return Ok(TensorEntry {
            name,
            dtype,
            shape: t.shape,
            file: file_index,
            offset: base,
            nbytes: 0,
            strides: None,
            pieces: None,
        });
    }
    // Index of the last element: offset + Σ (size - 1) · stride; it must lie inside the storage.
    let last = t.shape.iter().zip(&t.stride).try_fold(t.offset, |acc, (&d, &s)| {
        (d as u64 - 1).checked_mul(s as u64).and_then(|x| acc.checked_add(x))
    });
    if last.is_none_or(|last| last >= available) {
        return Err(bad(
            path,
            format!(
                "tensor {name:?} (offset {}, shape {:?}, strides {:?}) extends past the end of its storage \
                 of {available} elements",
                t.offset, t.shape, t.stride
            ),
        ));
    }
    // Row-major strides, ignoring dimensions of size 1 whose stride does not matter.
    let mut expected = 1usize;
    let contiguous = t.shape.iter().zip(&t.stride).rev().all(|(&d, &s)| {
        let ok = d == 1 || s == expected;
        expected = expected.saturating_mul(d);
        ok
    });
    let strides = (!contiguous).then(|| {
        let unit = t.shape.iter().zip(&t.stride);
        unit.map(|(&d, &s)| if d == 1 { 0 } else { s }).collect()
    });
    Ok(TensorEntry {
        name,
        dtype,
        shape: t.shape,
        file: file_index,
        offset: base + t.offset * item, // cannot overflow: the element is inside the storage
        nbytes,
        strides,
        pieces: None,
    })
}

/// Bytes the format is told apart by: zip's local header, a pickle's `PROTO`, tar's `ustar`.
const SNIFF: usize = 262;

/// Reads the tensors of a PyTorch checkpoint, zip format or legacy (a pickle stream);
/// `file_index` is the file's index in the checkpoint.
pub fn read_tensors(file: &SourceFile, file_index: usize) -> Result<Vec<TensorEntry>, FormatError> {
    read_file(file, file_index).map(|(tensors, _)| tensors)
}

/// [`read_tensors`], plus the dotted names of the entries skipped because they are not tensors
/// (an epoch counter, a config, the optimizer state beside a `state_dict` wrapper).
pub fn read_file(file: &SourceFile, file_index: usize) -> Result<(Vec<TensorEntry>, Vec<String>), FormatError> {
    let mut head = vec![0u8; SNIFF.min(usize::try_from(file.len).unwrap_or(SNIFF))];
    file.read_at(0, &mut head)?;
    if head.first() == Some(&0x80) {
        return super::torch_legacy::read_file(file, file_index);
    }
    if head.get(257..262) == Some(b"ustar") {
        return Err(bad(
            &file.path,
            "a tar archive, the format of torch before 0.1.10, which is not supported; load it with \
             torch and save it again",
        ));
    }
    read_zip_tensors(file, file_index)
}

/// Reads the tensors of a zip-format PyTorch checkpoint.
fn read_zip_tensors(file: &SourceFile, file_index: usize) -> Result<(Vec<TensorEntry>, Vec<String>), FormatError> {
    let archive = Archive::open(file, 0, file.len, MAX_PICKLE)?;
    let (found, skipped) = tensors_of(&archive.root, &file.path)?;
    let mut tensors = Vec::with_capacity(found.len());
    for (name, t) in found {
        tensors.push(archive.entry(file, name, t, file_index)?);
    }
    // State-dict order, as `torch.load` returns it (storage keys of legacy files are memory
    // addresses, so file order would be arbitrary).
    Ok((tensors, skipped))
}

/// The tensor `torch.save(tensor)` wrote as the zip archive in `len` bytes of `file` from `base`
/// (a chunk of a PyTorch Distributed Checkpoint's `.distcp` file), named `name`.
pub(crate) fn read_archived_tensor(
    file: &SourceFile,
    base: u64,
    len: u64,
    file_index: usize,
    name: &str,
) -> Result<TensorEntry, FormatError> {
    // A chunk's pickle describes one tensor (a few hundred bytes): a large one is refused before
    // it is read, so a crafted checkpoint cannot make each of its chunks cost a large parse.
    let archive = Archive::open(file, base, len, MAX_CHUNK_PICKLE)?;
    let Object::Tensor(t) = &archive.root else {
        return Err(bad(
            &file.path,
            format!(
                "the chunk of {name:?} at byte {base} holds a {}, not a tensor",
                match &archive.root {
                    Object::Dict(_) => "dict",
                    _ => "value",
                }
            ),
        ));
    };
    archive.entry(file, name.to_owned(), TensorRef::clone(t), file_index)
}

/// A zip-format archive opened: its entries, the prefix of its entries and its unpickled
/// `data.pkl`.
struct Archive {
    entries: HashMap<String, zip::Entry>,
    prefix: String,
    root: Object,
}

impl Archive {
    /// Opens the archive in `len` bytes of `file` from `base`.
    fn open(file: &SourceFile, base: u64, len: u64, max_pickle: u64) -> Result<Archive, FormatError> {
        let path = &file.path;
        let entries = zip::read_entries_in(file, base, len).map_err(bad_zip(path))?;
        let entries: HashMap<String, zip::Entry> = entries.into_iter().map(|e| (e.name.clone(), e)).collect();
        let pkl_name = entries
            .keys()
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .min()
            .ok_or_else(|| bad(path, "no <archive>/data.pkl entry (not a torch.save checkpoint)"))?
            .clone();
        let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
        let archive = Archive {
            entries,
            prefix,
            root: Object::None,
        };
        // Storages are in the saving machine's byte order (torch byteswaps them on load); files
        // without the entry predate it and are little-endian.
        if let Some(order) = archive.entries.get(&format!("{}byteorder", archive.prefix)) {
            order.require_stored("").map_err(bad_zip(path))?;
            let mut text = vec![0u8; order.size.min(16) as usize];
            file.read_at(order.data_offset, &mut text)?;
            let text = String::from_utf8_lossy(&text);
            if text.trim() != "little" {
                return Err(bad(
                    path,
                    format!(
                        "saved with byte order {:?}; only little-endian checkpoints are read (load and save it \
                         again with torch on a little-endian machine)",
                        text.trim()
                    ),
                ));
            }
        }
        let pkl = archive.stored(path, &pkl_name)?;
        if pkl.size > max_pickle {
            return Err(bad(path, "data.pkl is too large"));
        }
        let mut data = vec![0u8; pkl.size as usize];
        file.read_at(pkl.data_offset, &mut data)?;
        let root = pickle::unpickle(&data).map_err(|reason| FormatError::Pickle {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(Archive { root, ..archive })
    }

    /// The entry `name`, which must be stored uncompressed.
    fn stored(&self, path: &Path, name: &str) -> Result<&zip::Entry, FormatError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| bad(path, format!("zip entry {name:?} is missing")))?;
        entry.require_stored("").map_err(bad_zip(path))?;
        Ok(entry)
    }

    /// The entry of tensor `name`, `t`, over one of the archive's storages.
    fn entry(
        &self,
        file: &SourceFile,
        name: String,
        t: TensorRef,
        file_index: usize,
    ) -> Result<TensorEntry, FormatError> {
        let path = &file.path;
        let item = t.storage.dtype.size().unwrap_or(1) as u64;
        let entry = self.stored(path, &format!("{}data/{}", self.prefix, t.storage.key))?;
        if t.storage.numel.checked_mul(item).is_none_or(|b| b > entry.size) {
            return Err(bad(
                path,
                format!(
                    "storage {:?} of tensor {name:?} is smaller than its declared size",
                    t.storage.key
                ),
            ));
        }
        let numel = t.storage.numel;
        entry_for(name, t, entry.data_offset, numel, file_index, path)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/torch")
            .join(name)
    }

    fn read(path: &Path) -> Result<Vec<TensorEntry>, FormatError> {
        read_tensors(&SourceFile::open(path)?, 0)
    }

    #[test]
    fn reads_shared_storages_as_views() {
        let tensors = read(&fixture("shared.pt")).unwrap();
        let by = |n: &str| tensors.iter().find(|t| t.name == n).unwrap().clone();
        let (whole, tail, tied) = (by("whole"), by("tail"), by("tied"));
        assert_eq!(whole.offset, tied.offset);
        assert_eq!(tail.offset, whole.offset + 16);
        assert_eq!((whole.nbytes, tail.nbytes), (48, 32));
        assert_eq!(tail.shape, vec![8]);
    }

    #[test]
    fn wrappers_are_unwrapped_and_nesting_flattened() {
        let mut names: Vec<String> = read(&fixture("wrapped.pt"))
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        names.sort();
        assert_eq!(names, ["encoder.w", "head.b"]);
    }

    /// Every tensor of `<name>.pt`, read through the engine, equals the torch-computed values in
    /// `<name>.npz` (bf16 is stored there as its bits under `<name>::bf16`).
    pub(crate) fn assert_matches_expectations(name: &str) {
        use crate::value::{ReadContext, Tensor};
        let ck = crate::formats::open_checkpoint(&fixture(&format!("{name}.pt"))).unwrap();
        let want = crate::formats::open_checkpoint(&fixture(&format!("{name}.npz"))).unwrap();
        assert_eq!(ck.tensors.len(), want.tensors.len(), "{name}");
        let bytes = |t: &Tensor| {
            let mut out = vec![0u8; t.nbytes()];
            t.read(0, &mut out, &mut ReadContext::default()).unwrap();
            out
        };
        for entry in &ck.tensors {
            let expected = want
                .tensors
                .iter()
                .find(|e| e.name.trim_end_matches("::bf16") == entry.name)
                .unwrap_or_else(|| panic!("{name}: {} not expected", entry.name));
            let got = Tensor::from_entry(entry, &ck.files);
            let exp = Tensor::from_entry(expected, &want.files);
            assert_eq!(got.shape, exp.shape, "{name}: {}", entry.name);
            assert_eq!(bytes(&got), bytes(&exp), "{name}: {}", entry.name);
        }
    }

    #[test]
    fn non_contiguous_tensors_keep_their_strides() {
        let tensors = read(&fixture("strided.pt")).unwrap();
        let by = |n: &str| tensors.iter().find(|t| t.name == n).unwrap().clone();
        let t = by("transposed");
        assert_eq!((t.shape.clone(), t.strides.clone()), (vec![4, 3], Some(vec![1, 4])));
        assert_eq!((t.nbytes, t.extent()), (48, 48));
        let e = by("expanded_i8");
        assert_eq!(e.strides, Some(vec![1, 0]));
        assert_eq!((e.nbytes, e.extent()), (15, 5));
        let n = by("narrow_f16");
        assert_eq!((n.strides.clone(), n.nbytes, n.extent()), (Some(vec![4, 1]), 12, 20));
        assert_eq!(by("row_of_base").strides, None);
        for name in ["strided", "plain", "shared", "cuda", "parameter", "wrapped"] {
            assert_matches_expectations(name);
        }
    }

    fn tensor_ref(numel: u64, offset: u64, shape: &[usize], stride: &[usize]) -> TensorRef {
        TensorRef {
            storage: pickle::StorageRef {
                dtype: crate::dtype::DType::F32,
                key: "0".into(),
                location: "cpu".into(),
                numel,
                view: None,
            },
            offset,
            shape: shape.to_vec(),
            stride: stride.to_vec(),
        }
    }

    #[test]
    fn names_are_bounded() {
        // A long key prefixing many entries: each dotted name repeats it (issue 9: a 1 MB pickle
        // built 1 GB of names).
        let path = Path::new("m.pt");
        let key = |k: &str| Object::Str(k.into());
        let dict = |pairs: Vec<(Object, Object)>| Object::Dict(pairs.into());
        let inner = |n: i64| dict((0..n).map(|i| (Object::Int(i), Object::None)).collect());
        let long = "k".repeat(100);
        let root = |n| dict(vec![(key("epoch"), Object::Int(3)), (key(&long), inner(n))]);
        // "epoch", the long key and eight names of 102 bytes under it fit in 1000; a ninth does
        // not.
        let (_, skipped) = tensors_within(&root(8), path, 1000).unwrap();
        assert_eq!((skipped.len(), skipped[8].len()), (9, 102));
        match tensors_within(&root(9), path, 1000) {
            Err(FormatError::Torch { reason, .. }) => assert!(reason.contains("more than 1000 bytes"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // A wrapper's siblings count too.
        let wrapped = dict(vec![
            (key("state_dict"), dict(vec![])),
            (key(&"s".repeat(2000)), Object::None),
        ]);
        assert!(tensors_within(&wrapped, path, 1000).is_err());
    }

    #[test]
    fn strided_extent_past_the_storage_is_refused_by_name() {
        let path = Path::new("m.pt");
        // Last element: 2 + 1·1 + 2·4 = 11, inside 12 elements and outside 11.
        let t = tensor_ref(12, 2, &[2, 3], &[1, 4]);
        let entry = entry_for("w".into(), t.clone(), 100, 12, 0, path).unwrap();
        assert_eq!((entry.offset, entry.strides, entry.nbytes), (108, Some(vec![1, 4]), 24));
        match entry_for("w".into(), t, 100, 11, 0, path) {
            Err(FormatError::Torch { reason, .. }) => {
                assert!(reason.contains("\"w\"") && reason.contains("extends past"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // Strides that overflow, and an expanded dimension (stride 0) that fits.
        let huge = tensor_ref(12, 0, &[3, 2], &[usize::MAX, 1]);
        assert!(entry_for("w".into(), huge, 0, 12, 0, path).is_err());
        let expanded = tensor_ref(3, 0, &[1000, 3], &[0, 1]);
        let entry = entry_for("w".into(), expanded, 0, 3, 0, path).unwrap();
        assert_eq!((entry.strides.clone(), entry.extent()), (Some(vec![0, 1]), 12));
        // Empty tensors read nothing, wherever they claim to start.
        let empty = tensor_ref(1, 50, &[0, 4], &[4, 1]);
        assert_eq!(entry_for("w".into(), empty, 8, 1, 0, path).unwrap().nbytes, 0);
        // Size-1 dimensions do not make a tensor strided, whatever their stride.
        let column = tensor_ref(4, 0, &[4, 1], &[1, 99]);
        assert_eq!(entry_for("w".into(), column, 0, 4, 0, path).unwrap().strides, None);
    }

    #[test]
    fn tar_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.pt");
        let mut tar = vec![0u8; 1024];
        tar[..8].copy_from_slice(b"storages");
        tar[257..263].copy_from_slice(b"ustar\0");
        std::fs::write(&path, &tar).unwrap();
        match read(&path) {
            Err(FormatError::Torch { reason, .. }) => assert!(reason.contains("tar"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_not_a_zip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        std::fs::write(&path, b"PK").unwrap();
        assert!(matches!(read(&path), Err(FormatError::TorchArchive { .. })));
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(read(&path), Err(FormatError::TorchArchive { .. })));
    }

    #[test]
    fn every_truncation_and_bit_flip_is_handled_without_panicking() {
        let bytes = std::fs::read(fixture("plain.pt")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        for n in (0..bytes.len()).step_by(7) {
            std::fs::write(&path, &bytes[..n]).unwrap();
            assert!(read(&path).is_err(), "prefix {n} was accepted");
        }
        for i in (0..bytes.len()).step_by(3) {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0xa5;
            std::fs::write(&path, &flipped).unwrap();
            let _ = read(&path); // any outcome but a panic
        }
    }
}

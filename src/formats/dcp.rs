//! PyTorch Distributed Checkpoints (DCP), as `torch.distributed.checkpoint.save` writes them
//! with its file-system writer: a directory holding `.metadata` (a pickled `Metadata`) and
//! `*.distcp` files (`__<rank>_<n>.distcp`). `Metadata.state_dict_metadata` maps each name to a
//! `TensorStorageMetadata` (dtype, size, and the chunks the tensor was saved in, each an offset
//! and a size per dimension) or a `BytesStorageMetadata` (a pickled non-tensor value);
//! `Metadata.storage_data` maps each chunk (`MetadataIndex`: name and chunk offset) to the byte
//! range of a `.distcp` file holding it (`_StorageInfo`). Each chunk's bytes are a `torch.save`
//! archive of the chunk alone, read in place by [`super::torch`].
//!
//! `.metadata` is read by the restricted unpickler with the DCP dataclasses allowed and nothing
//! else ([`pickle::unpickle_dcp`]). A tensor saved in one chunk is an ordinary entry (zero copy);
//! one saved in several lists its chunks in [`TensorEntry::pieces`], checked to tile it exactly.
//! Non-tensor entries are skipped and named, as the PyTorch reader skips non-tensor values.
//!
//! Writing (`format: dcp`) is [`super::output::Writer`]'s: one `__0_<i>.distcp` per tensor, the
//! archive [`super::torch_output`] makes for it, and the `.metadata` pickle it emits.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path};

use super::pickle::{self, DcpClass, Global, Instance, Limits, Object};
use super::{FormatError, Piece, SourceFile, TensorEntry};

/// Name of the metadata file of a DCP directory.
pub const METADATA_NAME: &str = ".metadata";
/// Extension of its data files.
pub const DATA_EXTENSION: &str = ".distcp";
/// Largest `.metadata` read into memory.
const MAX_METADATA: u64 = 1 << 30;

/// Whether directory `dir` is a DCP checkpoint: `.metadata` beside at least one `.distcp` file
/// (`names` lists the directory's non-hidden files).
pub fn is_dcp_directory(dir: &Path, names: &[String]) -> bool {
    dir.join(METADATA_NAME).is_file() && names.iter().any(|n| n.ends_with(DATA_EXTENSION))
}

/// What a DCP directory holds.
#[derive(Debug)]
pub struct DcpContents {
    /// `.metadata` first, then the `.distcp` files `storage_data` names, sorted by name.
    pub files: Vec<SourceFile>,
    /// The tensors, in `state_dict_metadata` order.
    pub tensors: Vec<TensorEntry>,
    /// Names of the non-tensor entries (`BytesStorageMetadata`), skipped.
    pub skipped: Vec<String>,
}

fn bad(path: &Path, reason: impl Into<String>) -> FormatError {
    FormatError::Dcp {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Limits for `.metadata`: a few dozen objects per chunk, and a model saved by hundreds of ranks
/// has hundreds of thousands of chunks.
fn limits() -> Limits {
    Limits {
        memo: 1 << 25,
        objects: 1 << 27,
        bytes: 1 << 28,
        ..Limits::default()
    }
}

/// The field `name` of an instance whose state is a dict (the last one set wins).
fn field<'a>(instance: &'a Instance, name: &str) -> Option<&'a Object> {
    let Object::Dict(pairs) = &instance.state else {
        return None;
    };
    pairs
        .iter()
        .rev()
        .find(|(k, _)| matches!(k, Object::Str(s) if &**s == name))
        .map(|(_, v)| v)
}

/// `value` as an instance of `class`.
fn instance<'a>(value: &'a Object, class: DcpClass, path: &Path, what: &str) -> Result<&'a Instance, FormatError> {
    match value {
        Object::Instance(i) if i.class == class => Ok(i),
        _ => Err(bad(path, format!("{what} is not a {class:?}"))),
    }
}

/// A tuple of non-negative ints (a `torch.Size`).
fn dims(value: Option<&Object>, path: &Path, what: &str) -> Result<Vec<usize>, FormatError> {
    let Some(Object::Tuple(items)) = value else {
        return Err(bad(path, format!("{what} is not a tuple of sizes")));
    };
    items
        .iter()
        .map(|d| match d {
            Object::Int(i) => usize::try_from(*i).map_err(|_| bad(path, format!("{what} holds {i}"))),
            _ => Err(bad(path, format!("{what} holds a value that is not an int"))),
        })
        .collect()
}

/// A non-negative int.
fn int(value: Option<&Object>, path: &Path, what: &str) -> Result<u64, FormatError> {
    match value {
        Some(Object::Int(i)) if *i >= 0 => Ok(*i as u64),
        _ => Err(bad(path, format!("{what} is not a non-negative int"))),
    }
}

/// Where one chunk's archive is: a `.distcp` file (relative path), offset and length.
type Location = (String, u64, u64);

/// Reads the DCP checkpoint in directory `dir`: `.metadata`, then each chunk's archive header
/// (its central directory and pickle). Tensor bytes are not read.
pub fn read_directory(dir: &Path) -> Result<DcpContents, FormatError> {
    let md_path = dir.join(METADATA_NAME);
    let md_file = SourceFile::open(&md_path)?;
    if md_file.len > MAX_METADATA {
        return Err(bad(&md_path, "the metadata file is too large"));
    }
    let mut data = vec![0u8; md_file.len as usize];
    md_file.read_at(0, &mut data)?;
    md_file.record_header(&data);
    let root = pickle::unpickle_dcp(&data, limits()).map_err(|reason| FormatError::Pickle {
        path: md_path.clone(),
        reason,
    })?;
    drop(data);
    let path = md_path.as_path();
    let metadata = instance(&root, DcpClass::Metadata, path, "the pickled value")?;
    let Some(Object::Dict(entries)) = field(metadata, "state_dict_metadata") else {
        return Err(bad(path, "Metadata.state_dict_metadata is not a dict"));
    };
    let Some(Object::Dict(storage)) = field(metadata, "storage_data") else {
        return Err(bad(
            path,
            "Metadata.storage_data is not a dict (not written by the file-system writer?)",
        ));
    };

    // Chunk (name, offsets) -> where its bytes are.
    let mut locations: HashMap<(String, Vec<usize>), Location> = HashMap::new();
    for (key, info) in storage.iter() {
        let index = instance(key, DcpClass::MetadataIndex, path, "a key of storage_data")?;
        let Some(Object::Str(fqn)) = field(index, "fqn") else {
            return Err(bad(path, "a MetadataIndex has no fqn"));
        };
        let offsets = match field(index, "offset") {
            None | Some(Object::None) => Vec::new(),
            offset => dims(offset, path, &format!("the chunk offset of {fqn:?}"))?,
        };
        let info = instance(info, DcpClass::StorageInfo, path, &format!("the storage of {fqn:?}"))?;
        let Some(Object::Str(relative)) = field(info, "relative_path") else {
            return Err(bad(path, format!("the storage of {fqn:?} has no relative_path")));
        };
        let inside = !relative.is_empty()
            && Path::new(&**relative)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !inside {
            return Err(bad(
                path,
                format!("the storage of {fqn:?} names {relative:?}, which is not a file in the directory"),
            ));
        }
        match field(info, "transform_descriptors") {
            None | Some(Object::None) => {}
            Some(Object::List(l) | Object::Tuple(l)) if l.is_empty() => {}
            Some(_) => {
                return Err(bad(
                    path,
                    format!(
                        "the storage of {fqn:?} was written through extensions (compression or encryption), \
                         which are not supported; load it with torch and save it again without them"
                    ),
                ))
            }
        }
        let offset = int(field(info, "offset"), path, &format!("the storage offset of {fqn:?}"))?;
        let length = int(field(info, "length"), path, &format!("the storage length of {fqn:?}"))?;
        locations.insert((fqn.to_string(), offsets), (relative.to_string(), offset, length));
    }

    // The data files, sorted; file 0 is `.metadata`.
    let mut names: Vec<&String> = locations.values().map(|(rel, _, _)| rel).collect();
    names.sort();
    names.dedup();
    let mut files = vec![md_file];
    let mut file_index: BTreeMap<String, usize> = BTreeMap::new();
    for name in names {
        let data_path = dir.join(name);
        if !std::fs::metadata(&data_path).is_ok_and(|m| m.is_file()) {
            return Err(bad(path, format!("it names data file {name:?}, which is missing")));
        }
        file_index.insert(name.clone(), files.len());
        files.push(SourceFile::open(&data_path)?);
    }

    let mut tensors: Vec<TensorEntry> = Vec::new();
    let mut position: HashMap<String, usize> = HashMap::new();
    let mut skipped = Vec::new();
    for (key, value) in entries.iter() {
        let Object::Str(fqn) = key else {
            return Err(bad(path, "a state_dict_metadata key is not a str"));
        };
        let fqn: &str = fqn;
        let Object::Instance(md) = value else {
            return Err(bad(path, format!("the metadata of {fqn:?} is a {}", kind(value))));
        };
        match md.class {
            DcpClass::BytesStorageMetadata => {
                skipped.push(fqn.to_owned());
                continue;
            }
            DcpClass::TensorStorageMetadata => {}
            other => return Err(bad(path, format!("the metadata of {fqn:?} is a {other:?}"))),
        }
        let entry = tensor(fqn, md, &locations, &file_index, &files, path)?;
        if let Some(&at) = position.get(fqn) {
            tensors[at] = entry;
        } else {
            position.insert(fqn.to_owned(), tensors.len());
            tensors.push(entry);
        }
    }
    Ok(DcpContents {
        files,
        tensors,
        skipped,
    })
}

fn kind(value: &Object) -> &'static str {
    match value {
        Object::Dict(_) => "dict",
        Object::Tuple(_) => "tuple",
        Object::List(_) => "list",
        Object::Str(_) => "str",
        Object::None => "None",
        _ => "value of another kind",
    }
}

/// The entry of tensor `fqn` described by `md` (a `TensorStorageMetadata`).
fn tensor(
    fqn: &str,
    md: &Instance,
    locations: &HashMap<(String, Vec<usize>), Location>,
    file_index: &BTreeMap<String, usize>,
    files: &[SourceFile],
    path: &Path,
) -> Result<TensorEntry, FormatError> {
    let properties =
        field(md, "properties").ok_or_else(|| bad(path, format!("the metadata of {fqn:?} has no properties")))?;
    let properties = instance(
        properties,
        DcpClass::TensorProperties,
        path,
        &format!("the properties of {fqn:?}"),
    )?;
    let dtype = match &properties.state {
        Object::Tuple(items) => match items.first() {
            Some(Object::Global(Global::Dtype(d))) => *d,
            _ => return Err(bad(path, format!("the properties of {fqn:?} name no dtype torch has"))),
        },
        _ => return Err(bad(path, format!("the properties of {fqn:?} are not a tuple"))),
    };
    let shape = dims(field(md, "size"), path, &format!("the size of {fqn:?}"))?;
    let numel = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| bad(path, format!("tensor {fqn:?} is too large")))?;
    let item = dtype.size().unwrap_or(1) as u64;
    let nbytes = numel
        .checked_mul(item)
        .filter(|&b| b <= isize::MAX as u64)
        .ok_or_else(|| bad(path, format!("tensor {fqn:?} is too large")))?;
    let Some(Object::List(chunks)) = field(md, "chunks") else {
        return Err(bad(path, format!("the chunks of {fqn:?} are not a list")));
    };
    // The overlap check compares chunks sharing rows pairwise: bounded, so a crafted file with
    // a column split into millions of chunks cannot make opening it take hours.
    if chunks.len() > MAX_CHUNKS {
        return Err(bad(
            path,
            format!(
                "tensor {fqn:?} has {} chunks, more than the {MAX_CHUNKS} read",
                chunks.len()
            ),
        ));
    }
    let mut pieces = Vec::with_capacity(chunks.len());
    let mut volume = 0u64;
    let mut ranges = std::collections::HashSet::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let what = format!("chunk {i} of {fqn:?}");
        let chunk = instance(chunk, DcpClass::ChunkStorageMetadata, path, &what)?;
        let offsets = dims(field(chunk, "offsets"), path, &format!("the offsets of {what}"))?;
        let sizes = dims(field(chunk, "sizes"), path, &format!("the sizes of {what}"))?;
        let inside = offsets.len() == shape.len()
            && sizes.len() == shape.len()
            && (0..shape.len()).all(|d| offsets[d].checked_add(sizes[d]).is_some_and(|end| end <= shape[d]));
        if !inside {
            return Err(bad(
                path,
                format!("{what} (offsets {offsets:?}, sizes {sizes:?}) does not lie inside its shape {shape:?}"),
            ));
        }
        let chunk_numel = sizes.iter().map(|&d| d as u64).product::<u64>(); // ≤ numel: inside
        volume = volume.saturating_add(chunk_numel);
        let (relative, offset, length) = locations.get(&(fqn.to_owned(), offsets.clone())).ok_or_else(|| {
            bad(
                path,
                format!("storage_data has no entry for {what} (offsets {offsets:?})"),
            )
        })?;
        let index = file_index[relative];
        // torch stores each chunk once; chunks sharing bytes would only make each cost a parse.
        if !ranges.insert((index, *offset)) {
            return Err(bad(
                path,
                format!("{what} is stored at the same place in {relative:?} as another chunk"),
            ));
        }
        let file = &files[index];
        let entry = super::torch::read_archived_tensor(file, *offset, *length, index, fqn)?;
        if entry.dtype != dtype || entry.shape != sizes {
            return Err(bad(
                &file.path,
                format!(
                    "{what} at byte {offset} holds a {} tensor of shape {:?}; the metadata says {dtype} {sizes:?}",
                    entry.dtype, entry.shape
                ),
            ));
        }
        pieces.push(Piece { offsets, entry });
    }
    if volume != numel {
        return Err(bad(
            path,
            format!("the chunks of {fqn:?} hold {volume} elements, and its shape {shape:?} has {numel}"),
        ));
    }
    check_disjoint(fqn, &mut pieces, path)?;
    match (pieces.len(), numel) {
        // An empty tensor, saved with or without chunks: nothing to read, the metadata's shape.
        (0, _) | (_, 0) => Ok(TensorEntry {
            name: fqn.to_owned(),
            dtype,
            shape,
            file: 0,
            offset: 0,
            nbytes: 0,
            strides: None,
            pieces: None,
        }),
        (1, _) => {
            // One chunk holding the whole tensor (its volume is the tensor's): the tensor itself.
            let mut entry = pieces.remove(0).entry;
            entry.name = fqn.to_owned();
            Ok(entry)
        }
        _ => {
            let first = &pieces[0].entry;
            Ok(TensorEntry {
                name: fqn.to_owned(),
                dtype,
                shape,
                file: first.file,
                offset: first.offset,
                nbytes,
                strides: None,
                pieces: Some(pieces.into()),
            })
        }
    }
}

/// Most chunks one tensor may have (a tensor split over 16,384 ranks).
const MAX_CHUNKS: usize = 1 << 14;

/// Refuses chunks that overlap (with their volumes summing to the tensor's, disjoint chunks
/// tile it exactly); sorts them by offsets. A sweep along dimension 0 compares only chunks whose
/// rows overlap.
fn check_disjoint(fqn: &str, pieces: &mut [Piece], path: &Path) -> Result<(), FormatError> {
    pieces.sort_by(|a, b| a.offsets.cmp(&b.offsets));
    if pieces.first().is_none_or(|p| p.offsets.is_empty()) {
        return Ok(()); // scalars: one chunk at most (their volumes sum to 1)
    }
    let mut by_row: Vec<usize> = (0..pieces.len()).collect();
    by_row.sort_by_key(|&i| pieces[i].offsets[0]);
    let mut active: Vec<usize> = Vec::new();
    for &i in &by_row {
        let start = pieces[i].offsets[0];
        active.retain(|&j| pieces[j].offsets[0] + pieces[j].entry.shape[0] > start);
        for &j in &active {
            let (a, b) = (&pieces[i], &pieces[j]);
            let overlap = (0..a.offsets.len()).all(|d| {
                a.offsets[d] < b.offsets[d] + b.entry.shape[d] && b.offsets[d] < a.offsets[d] + a.entry.shape[d]
            });
            let empty = a.entry.nbytes == 0 || b.entry.nbytes == 0;
            if overlap && !empty {
                return Err(bad(
                    path,
                    format!(
                        "chunks of {fqn:?} at offsets {:?} and {:?} overlap",
                        pieces[j].offsets, pieces[i].offsets
                    ),
                ));
            }
        }
        active.push(i);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::{open_checkpoint, Format};
    use crate::value::{ReadContext, Tensor};

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/dcp")
            .join(name)
    }

    fn bytes(t: &Tensor) -> Vec<u8> {
        let mut out = vec![0u8; t.nbytes()];
        t.read(0, &mut out, &mut ReadContext::default()).unwrap();
        out
    }

    /// Every tensor of DCP directory `name`, read through the engine, equals the torch-computed
    /// values in `<name>.npz` (bf16 as its bits under `<name>::bf16`); returns the checkpoint.
    fn assert_matches(name: &str) -> crate::formats::Checkpoint {
        let ck = open_checkpoint(&fixture(name)).unwrap();
        assert_eq!(ck.format, Format::Dcp);
        let want = open_checkpoint(&fixture(&format!("{name}.npz"))).unwrap();
        assert_eq!(ck.tensors.len(), want.tensors.len(), "{name}");
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
            // Every start and length a writer's chunks could ask for.
            let all = bytes(&exp);
            let size = got.dtype.size().unwrap();
            for start in 0..got.numel() {
                for n in [1, 3, 5] {
                    let n = n.min(got.numel() - start);
                    let mut part = vec![0u8; n * size];
                    got.read(start, &mut part, &mut ReadContext::default()).unwrap();
                    assert_eq!(
                        part,
                        all[start * size..(start + n) * size],
                        "{}: {start}+{n}",
                        entry.name
                    );
                }
            }
        }
        ck
    }

    #[test]
    fn single_chunk_tensors_are_stored_values() {
        let ck = assert_matches("plain");
        let by = |n: &str| ck.tensors.iter().find(|t| t.name == n).unwrap().clone();
        for name in ["f32", "bf16", "i64", "f16", "scalar", "nested.w"] {
            let entry = by(name);
            assert!(entry.pieces.is_none() && entry.strides.is_none(), "{name}");
            assert!(Tensor::from_entry(&entry, &ck.files).as_stored().is_some(), "{name}");
        }
        // Saved as a transposed view: its strides are kept.
        assert_eq!(by("transposed").strides, Some(vec![1, 4]));
        // The non-tensor entry is named in a notice; file 0 is the metadata.
        assert!(ck.notices.iter().any(|n| n.contains("nested.step")), "{:?}", ck.notices);
        assert!(ck.files[0].path.ends_with(".metadata"));
        assert!(ck.files[0].header_sha256().is_some());
    }

    #[test]
    fn sharded_tensors_are_assembled_from_their_chunks() {
        let ck = assert_matches("sharded");
        let by = |n: &str| ck.tensors.iter().find(|t| t.name == n).unwrap().clone();
        let rows = by("rows");
        let pieces = rows.pieces.as_ref().unwrap();
        assert_eq!(
            pieces.iter().map(|p| p.offsets.clone()).collect::<Vec<_>>(),
            [vec![0, 0], vec![3, 0]]
        );
        assert_ne!(pieces[0].entry.file, pieces[1].entry.file);
        let cols = by("cols");
        assert_eq!(cols.dtype, crate::dtype::DType::BF16);
        assert_eq!(cols.pieces.as_ref().unwrap().len(), 2);
        assert!(by("bias").pieces.is_none());
    }

    /// A copy of fixture directory `name` in a temporary directory.
    fn copy(name: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(fixture(name)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        dir
    }

    #[test]
    fn hostile_metadata_is_refused_by_the_unpickler() {
        let dir = copy("plain");
        // `os.system("echo pwned")` by protocol 2 GLOBAL + REDUCE.
        let hostile = b"\x80\x02cos\nsystem\nX\n\x00\x00\x00echo pwned\x85R.";
        std::fs::write(dir.path().join(".metadata"), hostile).unwrap();
        match open_checkpoint(dir.path()) {
            Err(e @ FormatError::Pickle { .. }) => {
                let text = e.to_string();
                assert!(text.contains(".metadata"), "{text}");
                let FormatError::Pickle { reason, .. } = e else {
                    unreachable!()
                };
                assert!(
                    matches!(reason, pickle::PickleError::ForbiddenGlobal { .. }),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        // The DCP classes are not allowed in an ordinary torch pickle.
        let metadata = std::fs::read(fixture("plain/.metadata")).unwrap();
        assert!(matches!(
            pickle::unpickle(&metadata),
            Err(pickle::PickleError::ForbiddenGlobal { .. })
        ));
        // Garbage.
        std::fs::write(dir.path().join(".metadata"), b"not a pickle").unwrap();
        assert!(matches!(open_checkpoint(dir.path()), Err(FormatError::Pickle { .. })));
    }

    #[test]
    fn a_missing_or_truncated_data_file_is_named() {
        let dir = copy("sharded");
        std::fs::remove_file(dir.path().join("__1_0.distcp")).unwrap();
        match open_checkpoint(dir.path()) {
            Err(e @ FormatError::Dcp { .. }) => assert!(e.to_string().contains("__1_0.distcp"), "{e}"),
            other => panic!("{other:?}"),
        }
        let dir = copy("sharded");
        let path = dir.path().join("__1_0.distcp");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
        match open_checkpoint(dir.path()) {
            Err(e) => assert!(e.to_string().contains("__1_0.distcp"), "{e}"),
            Ok(_) => panic!("a truncated data file was accepted"),
        }
        // A part opened alone says what it is part of.
        match open_checkpoint(&fixture("sharded/__0_0.distcp")) {
            Err(e @ FormatError::Dcp { .. }) => assert!(e.to_string().contains("open the directory"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_truncation_and_bit_flip_is_handled_without_panicking() {
        for file in [".metadata", "__0_0.distcp"] {
            let dir = copy("sharded");
            let path = dir.path().join(file);
            let bytes = std::fs::read(&path).unwrap();
            for n in (0..bytes.len()).step_by(11) {
                std::fs::write(&path, &bytes[..n]).unwrap();
                assert!(open_checkpoint(dir.path()).is_err(), "{file}: prefix {n} was accepted");
            }
            for i in (0..bytes.len()).step_by(3) {
                let mut flipped = bytes.clone();
                flipped[i] ^= 0xa5;
                std::fs::write(&path, &flipped).unwrap();
                if let Ok(ck) = open_checkpoint(dir.path()) {
                    // Whatever was accepted reads without panicking.
                    for entry in &ck.tensors {
                        let t = Tensor::from_entry(entry, &ck.files);
                        let mut out = vec![0u8; t.nbytes().min(1 << 20)];
                        let _ = t.read(0, &mut out, &mut ReadContext::default());
                    }
                }
            }
        }
    }

    #[test]
    fn written_directories_read_back() {
        use crate::dtype::DType;
        use crate::formats::output::{OutputLayout, Writer};
        use crate::formats::test_util::{pattern, t};
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ckpt");
        let tensors = vec![
            t("layers.0.w", DType::BF16, &[3, 4]),
            t("b", DType::F32, &[5]),
            t("s", DType::I64, &[]),
            t("empty", DType::F16, &[0, 3]),
        ];
        let layout = OutputLayout::Directory {
            dir: out.clone(),
            shard_budget: None,
        };
        let w = Writer::create(Format::Dcp, layout, &tensors, &Default::default()).unwrap();
        let mut crcs = Vec::new();
        let mut written = Vec::new();
        for (i, tensor) in tensors.iter().enumerate() {
            let bytes = pattern(tensor.nbytes as usize, i as u8);
            let (file, offset) = w.placement(i);
            file.write_all_at(&bytes, offset).unwrap();
            crcs.push(crate::formats::zip::crc32(&bytes));
            written.push(bytes);
        }
        let paths = w.commit(&[], &crcs).unwrap();
        let mut names: Vec<String> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ".metadata",
                "__0_0.distcp",
                "__0_1.distcp",
                "__0_2.distcp",
                "__0_3.distcp"
            ]
        );
        let ck = open_checkpoint(&out).unwrap();
        assert_eq!(ck.format, Format::Dcp);
        assert_eq!(ck.tensors.len(), tensors.len());
        for ((entry, want), bytes) in ck.tensors.iter().zip(&tensors).zip(&written) {
            assert_eq!(
                (&entry.name, entry.dtype, &entry.shape),
                (&want.name, want.dtype, &want.shape)
            );
            assert!(entry.pieces.is_none());
            assert_eq!(
                &self::tests::bytes(&Tensor::from_entry(entry, &ck.files)),
                bytes,
                "{}",
                entry.name
            );
        }
        // Written again over itself: the earlier output is ours, replaced without a leftover.
        let fewer = &tensors[..1];
        let layout = OutputLayout::Directory {
            dir: out.clone(),
            shard_budget: None,
        };
        assert!(crate::formats::output::foreign_outputs(Format::Dcp, &out).is_empty());
        let w = Writer::create(Format::Dcp, layout, fewer, &Default::default()).unwrap();
        let (file, offset) = w.placement(0);
        file.write_all_at(&written[0], offset).unwrap();
        w.commit(&[], &[crate::formats::zip::crc32(&written[0])]).unwrap();
        assert_eq!(open_checkpoint(&out).unwrap().tensors.len(), 1);
        assert!(!out.join("__0_1.distcp").exists());
        // A file path is refused.
        let file_layout = OutputLayout::File(dir.path().join("x.distcp"));
        assert!(matches!(
            Writer::create(Format::Dcp, file_layout, fewer, &Default::default()),
            Err(FormatError::InvalidOutput { .. })
        ));
    }
}

//! The legacy PyTorch format (`torch.save(..., _use_new_zipfile_serialization=False)`, the
//! default before torch 1.6): five pickles back to back — the magic number, the protocol version
//! (1001), a `sys_info` dict, the object itself (storages appear as persistent ids
//! `('storage', type, key, location, numel, view)`), and the sorted list of storage keys — then,
//! for each key in that order, the storage as an 8-byte little-endian element count followed by
//! its elements (little-endian, as `storage._write_file` writes them). Every pickle goes through
//! the restricted [`super::pickle`] unpickler; tensors become [`TensorEntry`]s pointing into the
//! storages in place. Interpreting the state dict is shared with [`super::torch`].

use std::collections::HashMap;

use crate::dtype::DType;

use super::pickle::{self, Limits, Object, PickleError};
use super::torch::{bad, entry_for, tensors_of};
use super::{FormatError, SourceFile, TensorEntry};

/// `torch.serialization.MAGIC_NUMBER` (0x1950a86a20f9469cfc6c), little-endian as pickled.
const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// `torch.serialization.PROTOCOL_VERSION`.
const PROTOCOL_VERSION: i64 = 1001;
/// Largest pickle we interpret (the object pickle of a state dict is kilobytes to a few MB).
const MAX_PICKLE: usize = 1 << 30;

/// The next pickle of the stream at `*pos`, advancing `*pos` past it.
fn next_pickle(file: &SourceFile, data: &[u8], pos: &mut usize, what: &str) -> Result<Object, FormatError> {
    let rest = data.get(*pos..).unwrap_or_default();
    let window = &rest[..rest.len().min(MAX_PICKLE)];
    match pickle::unpickle_prefix(window, Limits::default()) {
        Ok((value, used)) => {
            *pos += used;
            Ok(value)
        }
        Err(PickleError::Truncated { .. }) if window.len() < rest.len() => {
            Err(bad(&file.path, format!("the {what} pickle is too large")))
        }
        Err(PickleError::Truncated { .. }) => Err(bad(&file.path, format!("file ends inside the {what} pickle"))),
        Err(reason) => Err(FormatError::Pickle {
            path: file.path.clone(),
            reason,
        }),
    }
}

/// Records the dtype and size of every storage referenced anywhere in `value`, in the order
/// met; the bytes of a storage can only be found knowing its element size.
fn collect_storages(
    value: &Object,
    out: &mut HashMap<String, (DType, u64)>,
    file: &SourceFile,
) -> Result<(), FormatError> {
    let storage = match value {
        Object::Storage(s) => s,
        Object::Tensor(t) => &t.storage,
        Object::Tuple(items) | Object::List(items) => {
            return items.iter().try_for_each(|v| collect_storages(v, out, file));
        }
        Object::Dict(pairs) => {
            return pairs.iter().try_for_each(|(k, v)| {
                collect_storages(k, out, file)?;
                collect_storages(v, out, file)
            });
        }
        _ => return Ok(()),
    };
    let seen = *out.entry(storage.key.clone()).or_insert((storage.dtype, storage.numel));
    if seen != (storage.dtype, storage.numel) {
        // torch.save refuses to write one storage under two types, so no real file does this.
        return Err(bad(
            &file.path,
            format!(
                "storage {:?} is declared with two different types or sizes",
                storage.key
            ),
        ));
    }
    Ok(())
}

/// Reads the tensors of a legacy-format PyTorch checkpoint, and the names of the non-tensor entries
/// skipped; `file_index` is the file's index in
/// the checkpoint.
pub fn read_file(file: &SourceFile, file_index: usize) -> Result<(Vec<TensorEntry>, Vec<String>), FormatError> {
    let path = &file.path;
    let map = file.map()?;
    let data: &[u8] = &map;
    let mut pos = 0;
    match next_pickle(file, data, &mut pos, "magic number")? {
        Object::LongInt(bytes) if *bytes == MAGIC => {}
        _ => return Err(bad(path, "wrong magic number: not a PyTorch checkpoint")),
    }
    match next_pickle(file, data, &mut pos, "protocol version")? {
        Object::Int(PROTOCOL_VERSION) => {}
        Object::Int(v) => return Err(bad(path, format!("unsupported legacy protocol version {v}"))),
        _ => return Err(bad(path, "the protocol version is not an int")),
    }
    let Object::Dict(sys_info) = next_pickle(file, data, &mut pos, "sys_info")? else {
        return Err(bad(path, "sys_info is not a dict"));
    };
    // Storage bytes are always little-endian, but very old versions wrote the element counts in
    // the machine's order.
    let big_endian = sys_info
        .iter()
        .any(|(k, v)| matches!((k, v), (Object::Str(k), Object::Bool(false)) if &**k == "little_endian"));
    if big_endian {
        return Err(bad(path, "saved on a big-endian machine, which is not supported"));
    }
    let root = next_pickle(file, data, &mut pos, "object")?;
    let Object::List(keys) = next_pickle(file, data, &mut pos, "storage key")? else {
        return Err(bad(path, "the storage key list is not a list"));
    };
    if let Some(header) = data.get(..pos) {
        file.record_header(header);
    }
    // What was parsed came from the file as it is, not zeros after a truncation.
    map.check()?;

    let mut declared = HashMap::new();
    collect_storages(&root, &mut declared, file)?;
    // Where each storage's elements start, and how many there are.
    let mut located: HashMap<String, (u64, u64)> = HashMap::with_capacity(keys.len());
    let mut at = pos as u64;
    for key in keys.iter() {
        let Object::Str(key) = key else {
            return Err(bad(path, "a storage key is not a string"));
        };
        let Some(&(dtype, numel)) = declared.get(&**key) else {
            return Err(bad(
                path,
                format!("storage {key:?} is stored but no object refers to it"),
            ));
        };
        let mut count = [0u8; 8];
        if at.checked_add(8).is_none_or(|end| end > file.len) {
            return Err(bad(path, format!("file ends before storage {key:?}")));
        }
        file.read_at(at, &mut count)?;
        let count = u64::from_le_bytes(count);
        if count != numel {
            return Err(bad(
                path,
                format!("storage {key:?} holds {count} elements but is declared with {numel}"),
            ));
        }
        let start = at + 8;
        let end = count
            .checked_mul(dtype.size().unwrap_or(1) as u64)
            .and_then(|n| start.checked_add(n))
            .filter(|&end| end <= file.len)
            .ok_or_else(|| bad(path, format!("file ends inside storage {key:?}")))?;
        if located.insert(key.to_string(), (start, count)).is_some() {
            return Err(bad(path, format!("storage {key:?} is stored twice")));
        }
        at = end;
    }

    let (found, skipped) = tensors_of(&root, path)?;
    let mut tensors = Vec::with_capacity(found.len());
    for (name, t) in found {
        let Some(&(start, count)) = located.get(&t.storage.key) else {
            return Err(bad(
                path,
                format!("storage {:?} of tensor {name:?} is not in the file", t.storage.key),
            ));
        };
        tensors.push(entry_for(name, t, start, count, file_index, path)?);
    }
    // State-dict order, as `torch.load` returns it (storage keys of legacy files are memory
    // addresses, so file order would be arbitrary).
    Ok((tensors, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/torch")
            .join(name)
    }

    fn read(path: &Path) -> Result<Vec<TensorEntry>, FormatError> {
        super::super::torch::read_tensors(&SourceFile::open(path)?, 0)
    }

    /// A pickled str (`BINUNICODE`).
    fn s(text: &str) -> Vec<u8> {
        let mut p = vec![b'X'];
        p.extend_from_slice(&(text.len() as u32).to_le_bytes());
        p.extend_from_slice(text.as_bytes());
        p
    }

    /// A pickled small int (`BININT2`).
    fn int(v: usize) -> Vec<u8> {
        let mut p = vec![b'M'];
        p.extend_from_slice(&(v as u16).to_le_bytes());
        p
    }

    /// A pickled tuple of small ints.
    fn ints(values: &[usize]) -> Vec<u8> {
        let mut p = vec![b'('];
        values.iter().for_each(|&v| p.extend(int(v)));
        p.push(b't');
        p
    }

    /// The header pickles (magic, protocol version, sys_info) as torch writes them.
    fn header(magic: &[u8]) -> Vec<u8> {
        let mut p = b"\x80\x02\x8a".to_vec();
        p.push(magic.len() as u8);
        p.extend_from_slice(magic);
        p.extend_from_slice(b".\x80\x02M\xe9\x03.\x80\x02}(");
        p.extend(s("little_endian"));
        p.extend_from_slice(b"\x88u.");
        p
    }

    /// A legacy file holding one f32 tensor `t` over storage "k" (declared with `numel`
    /// elements, `count` of them stored, values 0, 1, 2, ...), optionally a view.
    fn legacy(
        numel: u16,
        count: u64,
        offset: usize,
        shape: &[usize],
        stride: &[usize],
        view: Option<(usize, usize)>,
    ) -> Vec<u8> {
        let mut p = header(&MAGIC);
        p.extend_from_slice(b"\x80\x02}");
        p.extend(s("t"));
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        p.extend(s("storage"));
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        p.extend(s("k"));
        p.extend(s("cpu"));
        p.extend(int(numel.into()));
        match view {
            None => p.push(b'N'),
            Some((o, n)) => {
                p.push(b'(');
                p.extend(s("v"));
                p.extend(int(o));
                p.extend(int(n));
                p.push(b't');
            }
        }
        p.extend_from_slice(b"tQ");
        p.extend(int(offset));
        p.extend(ints(shape));
        p.extend(ints(stride));
        p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtRs.\x80\x02]");
        p.extend(s("k"));
        p.extend_from_slice(b"a.");
        p.extend_from_slice(&count.to_le_bytes());
        for i in 0..count {
            p.extend_from_slice(&(i as f32).to_le_bytes());
        }
        p
    }

    fn write(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    fn reason(result: Result<Vec<TensorEntry>, FormatError>) -> String {
        match result {
            Err(FormatError::Torch { reason, .. }) => reason,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn torch_written_files_read_like_their_expectations() {
        for name in [
            "legacy_plain",
            "legacy_shared",
            "legacy_cuda",
            "legacy_wrapped",
            "legacy_strided",
        ] {
            super::super::torch::tests::assert_matches_expectations(name);
        }
        let tensors = read(&fixture("legacy_shared.pt")).unwrap();
        let by = |n: &str| tensors.iter().find(|t| t.name == n).unwrap().clone();
        assert_eq!(by("tail").offset, by("whole").offset + 16);
        assert_eq!(by("tied").offset, by("whole").offset);
    }

    #[test]
    fn hand_built_file_locates_its_storage() {
        let bytes = legacy(12, 12, 2, &[2, 3], &[1, 4], None);
        let (_dir, path) = write(&bytes);
        let t = read(&path).unwrap().pop().unwrap();
        let data_start = bytes.len() as u64 - 48;
        assert_eq!(t.name, "t");
        assert_eq!((t.offset, t.strides, t.nbytes), (data_start + 8, Some(vec![1, 4]), 24));
    }

    #[test]
    fn storage_views_of_old_files_are_honoured() {
        // A tensor at offset 1 of a view starting at element 4: storage element 5.
        let (_dir, path) = write(&legacy(12, 12, 1, &[3], &[1], Some((4, 6))));
        let t = read(&path).unwrap().pop().unwrap();
        assert_eq!(t.offset, std::fs::metadata(&path).unwrap().len() - 48 + 5 * 4);
        // The tensor must fit in the view, and the view in the storage.
        let (_dir, path) = write(&legacy(12, 12, 4, &[3], &[1], Some((4, 6))));
        assert!(reason(read(&path)).contains("extends past"));
        let (_dir, path) = write(&legacy(12, 12, 0, &[3], &[1], Some((10, 6))));
        assert!(reason(read(&path)).contains("storage view"));
    }

    #[test]
    fn storage_smaller_than_the_strided_extent_is_refused() {
        // Last element 2 + 1 + 8 = 11 of a storage of 11.
        let (_dir, path) = write(&legacy(11, 11, 2, &[2, 3], &[1, 4], None));
        let reason = reason(read(&path));
        assert!(reason.contains("\"t\"") && reason.contains("extends past"), "{reason}");
    }

    #[test]
    fn stored_count_must_match_the_declaration() {
        let (_dir, path) = write(&legacy(12, 11, 0, &[3], &[1], None));
        assert!(reason(read(&path)).contains("holds 11 elements"));
    }

    #[test]
    fn wrong_magic_number_is_refused() {
        let mut bytes = legacy(12, 12, 0, &[3], &[1], None);
        bytes[5] ^= 1;
        let (_dir, path) = write(&bytes);
        assert!(reason(read(&path)).contains("wrong magic number"));
        // A plain pickle of something else entirely.
        let (_dir, path) = write(b"\x80\x02K\x07.");
        assert!(reason(read(&path)).contains("wrong magic number"));
        let (_dir, path) = write(b"\x80\x02ctorch\nsave\n.");
        match read(&path) {
            Err(FormatError::Pickle { reason, .. }) => assert!(reason.to_string().contains("torch.save")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_truncation_and_bit_flip_is_handled_without_panicking() {
        // Every prefix of the small file; the bigger one sampled (writing the files dominates).
        for (name, step) in [("legacy_plain.pt", 1), ("legacy_strided.pt", 5)] {
            let bytes = std::fs::read(fixture(name)).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.pt");
            for n in (0..bytes.len()).step_by(step) {
                std::fs::write(&path, &bytes[..n]).unwrap();
                assert!(read(&path).is_err(), "{name}: prefix {n} was accepted");
            }
            for i in (0..bytes.len()).step_by(step.max(3)) {
                let mut flipped = bytes.clone();
                flipped[i] ^= 0xa5;
                std::fs::write(&path, &flipped).unwrap();
                let _ = read(&path); // any outcome but a panic
            }
        }
    }
}

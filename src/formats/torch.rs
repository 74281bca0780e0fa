//! PyTorch zip-format checkpoints (`torch.save` since 1.6): a zip archive holding
//! `<prefix>/data.pkl` (the pickled state dict), `<prefix>/data/<key>` (one entry per storage),
//! `<prefix>/version` and `<prefix>/byteorder`. The zip directory is parsed here (it is small),
//! the pickle by the restricted [`super::pickle`] unpickler, and each tensor becomes a
//! [`TensorEntry`] pointing straight into its storage entry's bytes, which must be stored
//! uncompressed so they can be read in place.

use std::collections::HashMap;
use std::path::Path;

use super::pickle::{self, Object, TensorRef};
use super::{FormatError, SourceFile, TensorEntry};

/// Largest `data.pkl` we read into memory; a state dict's pickle is kilobytes to a few MB.
const MAX_PICKLE: u64 = 1 << 30;
/// Deepest wrapper nesting flattened into dotted names.
const MAX_DEPTH: usize = 64;

/// One zip entry: where its (stored) data starts and how long it is.
#[derive(Debug, Clone)]
struct ZipEntry {
    method: u16,
    data_offset: u64,
    size: u64,
}

fn bad(path: &Path, reason: impl Into<String>) -> FormatError {
    FormatError::Torch {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Reads the central directory: entry name → entry.
fn read_zip(file: &SourceFile) -> Result<HashMap<String, ZipEntry>, FormatError> {
    let path = &file.path;
    let truncated = || {
        bad(
            path,
            "not a zip archive or truncated (no end-of-central-directory record)",
        )
    };
    // The end record is 22 bytes plus a comment of up to 64 KiB, at the very end.
    let tail_len = file.len.min(22 + 65535);
    let mut tail = vec![0u8; tail_len as usize];
    file.read_at(file.len - tail_len, &mut tail)?;
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| le32(&tail, i) == Some(0x0605_4b50))
        .ok_or_else(truncated)?;
    let eocd_abs = file.len - tail_len + eocd as u64;
    let mut count = u64::from(le16(&tail, eocd + 10).ok_or_else(truncated)?);
    let mut cd_size = u64::from(le32(&tail, eocd + 12).ok_or_else(truncated)?);
    let mut cd_offset = u64::from(le32(&tail, eocd + 16).ok_or_else(truncated)?);
    if count == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff {
        // ZIP64: a locator 20 bytes before the end record points at the ZIP64 end record.
        let loc = eocd_abs.checked_sub(20).ok_or_else(truncated)?;
        let mut locator = [0u8; 20];
        file.read_at(loc, &mut locator)?;
        if le32(&locator, 0) != Some(0x0706_4b50) {
            return Err(truncated());
        }
        let rec_off = le64(&locator, 8).ok_or_else(truncated)?;
        let mut rec = [0u8; 56];
        if rec_off.checked_add(56).is_none_or(|e| e > file.len) {
            return Err(truncated());
        }
        file.read_at(rec_off, &mut rec)?;
        if le32(&rec, 0) != Some(0x0606_4b50) {
            return Err(truncated());
        }
        count = le64(&rec, 32).ok_or_else(truncated)?;
        cd_size = le64(&rec, 40).ok_or_else(truncated)?;
        cd_offset = le64(&rec, 48).ok_or_else(truncated)?;
    }
    if cd_offset.checked_add(cd_size).is_none_or(|e| e > file.len) || cd_size > MAX_PICKLE {
        return Err(bad(path, "zip central directory lies outside the file"));
    }
    let mut cd = vec![0u8; cd_size as usize];
    file.read_at(cd_offset, &mut cd)?;
    let short = || bad(path, "zip central directory is truncated");
    let mut entries = HashMap::new();
    let mut at = 0usize;
    for _ in 0..count {
        if le32(&cd, at) != Some(0x0201_4b50) {
            return Err(short());
        }
        let method = le16(&cd, at + 10).ok_or_else(short)?;
        let mut csize = u64::from(le32(&cd, at + 20).ok_or_else(short)?);
        let mut usize_ = u64::from(le32(&cd, at + 24).ok_or_else(short)?);
        let name_len = le16(&cd, at + 28).ok_or_else(short)? as usize;
        let extra_len = le16(&cd, at + 30).ok_or_else(short)? as usize;
        let comment_len = le16(&cd, at + 32).ok_or_else(short)? as usize;
        let mut local = u64::from(le32(&cd, at + 42).ok_or_else(short)?);
        let name = cd.get(at + 46..at + 46 + name_len).ok_or_else(short)?;
        let name = String::from_utf8_lossy(name).into_owned();
        let extra = cd
            .get(at + 46 + name_len..at + 46 + name_len + extra_len)
            .ok_or_else(short)?;
        // ZIP64 extended information: the 0xffffffff fields, in order, are 64-bit here.
        let mut e = 0usize;
        while let (Some(tag), Some(len)) = (le16(extra, e), le16(extra, e + 2)) {
            if tag == 1 {
                let mut f = e + 4;
                for field in [&mut usize_, &mut csize, &mut local] {
                    if *field == 0xffff_ffff {
                        *field = le64(extra, f).ok_or_else(short)?;
                        f += 8;
                    }
                }
            }
            e += 4 + len as usize;
        }
        at += 46 + name_len + extra_len + comment_len;
        let mut header = [0u8; 30];
        if local.checked_add(30).is_none_or(|end| end > file.len) {
            return Err(bad(path, format!("zip entry {name:?} lies outside the file")));
        }
        file.read_at(local, &mut header)?;
        if le32(&header, 0) != Some(0x0403_4b50) {
            return Err(bad(path, format!("zip entry {name:?} has no local header")));
        }
        let local_name = u64::from(le16(&header, 26).unwrap_or(0));
        let local_extra = u64::from(le16(&header, 28).unwrap_or(0));
        let data_offset = local + 30 + local_name + local_extra;
        if data_offset.checked_add(csize).is_none_or(|end| end > file.len) {
            return Err(bad(path, format!("zip entry {name:?} is truncated")));
        }
        entries.insert(
            name,
            ZipEntry {
                method,
                data_offset,
                size: csize,
            },
        );
    }
    Ok(entries)
}

/// Flattens the unpickled value into `(dotted name, tensor)` pairs; later duplicates win.
fn flatten(
    prefix: &str,
    value: &Object,
    depth: usize,
    out: &mut Vec<(String, TensorRef)>,
    index: &mut HashMap<String, usize>,
    path: &Path,
) -> Result<(), FormatError> {
    if depth > MAX_DEPTH {
        return Err(bad(path, "state dict is nested too deeply"));
    }
    let Object::Dict(pairs) = value else {
        return Ok(());
    };
    for (key, value) in pairs {
        let key = match key {
            Object::Str(s) => s.clone(),
            Object::Int(i) => i.to_string(),
            _ => continue, // not a name a tensor can have
        };
        let name = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            Object::Tensor(t) => {
                if let Some(slot) = index.get(&name).and_then(|&i| out.get_mut(i)) {
                    slot.1 = t.clone();
                } else {
                    index.insert(name.clone(), out.len());
                    out.push((name, t.clone()));
                }
            }
            Object::Dict(_) => flatten(&name, value, depth + 1, out, index, path)?,
            _ => {} // epochs, optimizer scalars, configs: not weights
        }
    }
    Ok(())
}

/// The state dict inside a checkpoint: a `{"state_dict": ...}` or `{"model": ...}` wrapper is
/// unwrapped, anything else is taken whole.
fn state_dict(root: &Object) -> &Object {
    if let Object::Dict(pairs) = root {
        for wrapper in ["state_dict", "model"] {
            let inner = pairs
                .iter()
                .rev()
                .find(|(k, _)| matches!(k, Object::Str(s) if s == wrapper));
            if let Some((_, inner @ Object::Dict(_))) = inner {
                return inner;
            }
        }
    }
    root
}

/// Reads the tensors of a zip-format PyTorch checkpoint; `file_index` is the file's index in
/// the checkpoint.
pub fn read_tensors(file: &SourceFile, file_index: usize) -> Result<Vec<TensorEntry>, FormatError> {
    let path = &file.path;
    let entries = read_zip(file)?;
    let pkl_name = entries
        .keys()
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .min()
        .ok_or_else(|| {
            bad(
                path,
                "no <archive>/data.pkl entry (legacy, non-zip checkpoints are not supported yet)",
            )
        })?
        .clone();
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let stored = |name: &str| -> Result<ZipEntry, FormatError> {
        let entry = entries
            .get(name)
            .ok_or_else(|| bad(path, format!("zip entry {name:?} is missing")))?;
        if entry.method != 0 {
            return Err(bad(
                path,
                format!(
                    "zip entry {name:?} is compressed (method {}); only stored entries can be read",
                    entry.method
                ),
            ));
        }
        Ok(entry.clone())
    };
    let pkl = stored(&pkl_name)?;
    if pkl.size > MAX_PICKLE {
        return Err(bad(path, "data.pkl is too large"));
    }
    let mut data = vec![0u8; pkl.size as usize];
    file.read_at(pkl.data_offset, &mut data)?;
    let root = pickle::unpickle(&data).map_err(|reason| FormatError::Pickle {
        path: path.to_path_buf(),
        reason,
    })?;
    let mut found = Vec::new();
    flatten("", state_dict(&root), 0, &mut found, &mut HashMap::new(), path)?;

    let mut tensors = Vec::with_capacity(found.len());
    for (name, t) in found {
        let dtype = t.storage.dtype;
        let item = dtype.size().unwrap_or(1) as u64;
        let entry = stored(&format!("{prefix}data/{}", t.storage.key))?;
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad(path, format!("tensor {name:?} is too large")))?;
        // Row-major strides, ignoring dimensions of size 1 whose stride does not matter.
        let mut expected = 1usize;
        let contiguous = numel == 0
            || t.shape.iter().zip(&t.stride).rev().all(|(&d, &s)| {
                let ok = d == 1 || s == expected;
                expected = expected.saturating_mul(d);
                ok
            });
        if !contiguous {
            return Err(bad(
                path,
                format!(
                    "tensor {name:?} has non-contiguous strides {:?}, which are not supported yet",
                    t.stride
                ),
            ));
        }
        let end = t.offset.checked_add(numel).filter(|&e| e <= t.storage.numel);
        let nbytes = numel.checked_mul(item);
        let (Some(_), Some(nbytes)) = (end, nbytes) else {
            return Err(bad(
                path,
                format!("tensor {name:?} extends past the end of its storage"),
            ));
        };
        let start = t.offset * item; // cannot overflow: offset + numel <= storage numel, checked below
        if t.storage.numel.checked_mul(item).is_none_or(|b| b > entry.size) {
            return Err(bad(
                path,
                format!(
                    "storage {:?} of tensor {name:?} is smaller than its declared size",
                    t.storage.key
                ),
            ));
        }
        tensors.push(TensorEntry {
            name,
            dtype,
            shape: t.shape,
            file: file_index,
            offset: entry.data_offset + start,
            nbytes,
        });
    }
    tensors.sort_by_key(|t| t.offset);
    Ok(tensors)
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn non_contiguous_tensor_is_named() {
        match read(&fixture("transposed.pt")) {
            Err(FormatError::Torch { reason, .. }) => {
                assert!(
                    reason.contains("\"t\"") && reason.contains("not supported yet"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_not_a_zip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        std::fs::write(&path, b"PK").unwrap();
        assert!(matches!(read(&path), Err(FormatError::Torch { .. })));
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(read(&path), Err(FormatError::Torch { .. })));
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

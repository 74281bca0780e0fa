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
use super::torch::{bad, entry_for, flatten, state_dict};
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
            format!("storage {:?} is declared with two different types or sizes", storage.key),
        ));
    }
    Ok(())
}

/// Reads the tensors of a legacy-format PyTorch checkpoint; `file_index` is the file's index in
/// the checkpoint.
pub fn read_tensors(file: &SourceFile, file_index: usize) -> Result<Vec<TensorEntry>, FormatError> {
    let path = &file.path;
    let map = file.map()?;
    let data: &[u8] = &map;
    let mut pos = 0;
    match next_pickle(file, data, &mut pos, "magic number")? {
        Object::LongInt(bytes) if bytes == MAGIC => {}
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
        .any(|(k, v)| matches!((k, v), (Object::Str(k), Object::Bool(false)) if k == "little_endian"));
    if big_endian {
        return Err(bad(path, "saved on a big-endian machine, which is not supported"));
    }
    let root = next_pickle(file, data, &mut pos, "object")?;
    let Object::List(keys) = next_pickle(file, data, &mut pos, "storage key")? else {
        return Err(bad(path, "the storage key list is not a list"));
    };

    let mut declared = HashMap::new();
    collect_storages(&root, &mut declared, file)?;
    // Where each storage's elements start, and how many there are.
    let mut located: HashMap<String, (u64, u64)> = HashMap::with_capacity(keys.len());
    let mut at = pos as u64;
    for key in keys {
        let Object::Str(key) = key else {
            return Err(bad(path, "a storage key is not a string"));
        };
        let Some(&(dtype, numel)) = declared.get(&key) else {
            return Err(bad(path, format!("storage {key:?} is stored but no object refers to it")));
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
        if located.insert(key.clone(), (start, count)).is_some() {
            return Err(bad(path, format!("storage {key:?} is stored twice")));
        }
        at = end;
    }

    let mut found = Vec::new();
    flatten("", state_dict(&root), 0, &mut found, &mut HashMap::new(), path)?;
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
    tensors.sort_by_key(|t| t.offset);
    Ok(tensors)
}

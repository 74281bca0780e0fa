//! Writing NumPy `.npz` output: a zip of STORED `NAME.npy` entries, laid out up front so the
//! executor can stream every tensor's bytes into place in parallel (the same `create /
//! placement / commit` shape as the safetensors writer). The CRC-32 every zip entry needs is
//! computed at commit by re-reading each entry in 1 MiB chunks; the central directory is then
//! appended and the temporary renamed over the target, so a failure leaves nothing behind.
//! Archives over 4 GiB would need ZIP64 and are refused for now.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::dtype::DType;

use super::output::{temp_path_for, OutputTensor};
use super::FormatError;

/// Largest archive written without ZIP64.
const ZIP32_LIMIT: u64 = 0xFFFF_FFFF;

/// The `.npy` descr of `dtype`, or `None` when NumPy has no standard type for it.
pub fn npy_descr(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F64 => "<f8",
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::I64 => "<i8",
        DType::I32 => "<i4",
        DType::I16 => "<i2",
        DType::I8 => "|i1",
        DType::U64 => "<u8",
        DType::U32 => "<u4",
        DType::U16 => "<u2",
        DType::U8 => "|u1",
        DType::Bool => "|b1",
        DType::C64 => "<c8",
        _ => return None,
    })
}

/// The `.npy` header (magic, version 1.0, padded dict) of a C-order array.
fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    // NumPy pads so the data starts on a 64-byte boundary of the .npy, ending with a newline.
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// CRC-32 (IEEE, as zip uses) table.
const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = crc_table();

/// Continues a CRC-32 (`crc` is the finalised value of the bytes so far; 0 to start).
fn crc32_update(crc: u32, bytes: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in bytes {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// One entry's layout: local header offset, entry name, size of header + data.
#[derive(Debug)]
struct Entry {
    local: u64,
    name: String,
    size: u64,
    data: u64,
}

/// Writes `.npz` output atomically: see the module docs.
#[derive(Debug)]
pub struct NpzWriter {
    target: PathBuf,
    temp: PathBuf,
    file: File,
    entries: Vec<Entry>,
    end: u64,
    committed: bool,
}

impl NpzWriter {
    /// Lays out `tensors` in order, creates the temporary beside `target` and writes every
    /// local header and `.npy` header; tensors whose dtype NumPy cannot hold are refused.
    pub fn create(target: PathBuf, tensors: &[OutputTensor]) -> Result<Self, FormatError> {
        let mut entries = Vec::with_capacity(tensors.len());
        let mut headers = Vec::with_capacity(tensors.len());
        let mut at = 0u64;
        let mut names = std::collections::HashSet::new();
        for t in tensors {
            if !names.insert(t.name.as_str()) {
                return Err(FormatError::DuplicateOutputTensor { name: t.name.clone() });
            }
            let descr = npy_descr(t.dtype).ok_or_else(|| FormatError::NpzDtype {
                name: t.name.clone(),
                dtype: t.dtype,
            })?;
            let nbytes = t
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .and_then(|n| t.dtype.nbytes(n))
                .ok_or_else(|| FormatError::InvalidTensorSize {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                })? as u64;
            let name = format!("{}.npy", t.name);
            let header = npy_header(descr, &t.shape);
            let size = header.len() as u64 + nbytes;
            let data = at + 30 + name.len() as u64 + header.len() as u64;
            entries.push(Entry {
                local: at,
                name,
                size,
                data,
            });
            at = data.saturating_add(nbytes);
            headers.push(header);
        }
        let central: u64 = entries.iter().map(|e| 46 + e.name.len() as u64).sum::<u64>() + 22;
        if at.saturating_add(central) > ZIP32_LIMIT || entries.len() > 0xFFFF {
            return Err(FormatError::InvalidOutput {
                path: target,
                reason: "npz output over 4 GiB or 65535 tensors needs ZIP64, which is not supported yet",
            });
        }
        if target.file_name().is_none() {
            return Err(FormatError::InvalidOutput {
                path: target,
                reason: "no file name",
            });
        }
        let temp = temp_path_for(&target);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| FormatError::io(&temp, e))?;
        let writer = NpzWriter {
            target,
            temp,
            file,
            entries,
            end: at,
            committed: false,
        };
        writer.file.set_len(at).map_err(|e| FormatError::io(&writer.temp, e))?;
        for (entry, header) in writer.entries.iter().zip(&headers) {
            // CRC is patched in at commit, once the data is there.
            let local = local_header(entry, 0);
            writer
                .file
                .write_all_at(&local, entry.local)
                .and_then(|()| writer.file.write_all_at(header, entry.data - header.len() as u64))
                .map_err(|e| FormatError::io(&writer.temp, e))?;
        }
        Ok(writer)
    }

    /// Where tensor `i` goes: the open temporary and the absolute offset of its data.
    ///
    /// # Panics
    /// If `i` is not an index of the slice given to `create`.
    pub fn placement(&self, i: usize) -> (&File, u64) {
        (&self.file, self.entries[i].data)
    }

    /// Computes every CRC, writes the central directory and renames the file into place.
    pub fn commit(mut self) -> Result<Vec<PathBuf>, FormatError> {
        let io = |e| FormatError::io(&self.temp, e);
        let mut central = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        for entry in &self.entries {
            let begin = entry.local + 30 + entry.name.len() as u64;
            let mut crc = 0u32;
            let mut pos = begin;
            let stop = begin + entry.size;
            while pos < stop {
                let n = (stop - pos).min(buf.len() as u64) as usize;
                let chunk = &mut buf[..n];
                self.file.read_exact_at(chunk, pos).map_err(io)?;
                crc = crc32_update(crc, chunk);
                pos += n as u64;
            }
            self.file
                .write_all_at(&local_header(entry, crc), entry.local)
                .map_err(io)?;
            central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            central.extend_from_slice(&[20, 3, 20, 0, 0, 0, 0, 0]);
            central.extend_from_slice(&[0, 0, 0x21, 0]); // time 00:00, date 1980-01-01
            central.extend_from_slice(&crc.to_le_bytes());
            central.extend_from_slice(&(entry.size as u32).to_le_bytes());
            central.extend_from_slice(&(entry.size as u32).to_le_bytes());
            central.extend_from_slice(&(entry.name.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 8]);
            central.extend_from_slice(&0o100644u32.wrapping_shl(16).to_le_bytes());
            central.extend_from_slice(&(entry.local as u32).to_le_bytes());
            central.extend_from_slice(entry.name.as_bytes());
        }
        let count = (self.entries.len() as u16).to_le_bytes();
        let mut eocd = 0x0605_4b50u32.to_le_bytes().to_vec();
        eocd.extend_from_slice(&[0; 4]);
        eocd.extend_from_slice(&count);
        eocd.extend_from_slice(&count);
        eocd.extend_from_slice(&(central.len() as u32).to_le_bytes());
        eocd.extend_from_slice(&(self.end as u32).to_le_bytes());
        eocd.extend_from_slice(&[0, 0]);
        central.extend_from_slice(&eocd);
        self.file.write_all_at(&central, self.end).map_err(io)?;
        std::fs::rename(&self.temp, &self.target).map_err(|e| FormatError::io(&self.target, e))?;
        self.committed = true;
        Ok(vec![self.target.clone()])
    }
}

/// The 30-byte local header of `entry` followed by its name.
fn local_header(entry: &Entry, crc: u32) -> Vec<u8> {
    let mut out = 0x0403_4b50u32.to_le_bytes().to_vec();
    out.extend_from_slice(&[20, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&[0, 0, 0x21, 0]);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&(entry.size as u32).to_le_bytes());
    out.extend_from_slice(&(entry.size as u32).to_le_bytes());
    out.extend_from_slice(&(entry.name.len() as u16).to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(entry.name.as_bytes());
    out
}

impl Drop for NpzWriter {
    /// Not committed: removes the temporary.
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32_update(0, b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32_update(crc32_update(0, b"1234"), b"56789"), 0xCBF4_3926);
    }

    #[test]
    fn round_trips_through_reader_and_refuses_bf16() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.npz");
        let specs = vec![
            OutputTensor {
                name: "a".into(),
                dtype: DType::F32,
                shape: vec![2],
            },
            OutputTensor {
                name: "b".into(),
                dtype: DType::U8,
                shape: vec![],
            },
        ];
        let w = NpzWriter::create(path.clone(), &specs).unwrap();
        let (f, off) = w.placement(0);
        f.write_all_at(&[1, 2, 3, 4, 5, 6, 7, 8], off).unwrap();
        let (f, off) = w.placement(1);
        f.write_all_at(&[9], off).unwrap();
        w.commit().unwrap();
        let src = super::super::SourceFile::open(&path).unwrap();
        let t = super::super::numpy::read_tensors(&src, 0).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].dtype, t[0].shape.clone(), t[0].nbytes), (DType::F32, vec![2], 8));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let bad = vec![OutputTensor {
            name: "w".into(),
            dtype: DType::BF16,
            shape: vec![1],
        }];
        let err = NpzWriter::create(dir.path().join("x.npz"), &bad).unwrap_err();
        assert!(
            err.to_string().contains("\"w\"") && err.to_string().contains("cast"),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

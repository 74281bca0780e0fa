//! Writing NumPy `.npz` output: a zip of stored `NAME.npy` entries, laid out up front so the
//! executor can stream every tensor's bytes into place in parallel (the same `create /
//! placement / commit` shape as the safetensors writer). Each entry's CRC-32 is the header's
//! combined with the data's, which the executor computes while streaming; the central directory
//! is then appended and the temporary renamed over the target, so a failure leaves nothing
//! behind. Archives over 4 GiB or 65535 tensors get ZIP64 records. A `.npy` output is the same
//! `.npy` of one tensor without the archive around it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::dtype::DType;

use super::output::{create_missing_dirs, temp_path_for, OutputTensor};
use super::zip::{self, Layout};
use super::FormatError;

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

/// Refuses a `.npy` output of other than one tensor.
pub fn check_npy_count(count: usize) -> Result<(), FormatError> {
    if count == 1 {
        Ok(())
    } else {
        Err(FormatError::NpyCount { count })
    }
}

/// Writes `.npz` output (or one tensor as a bare `.npy`) atomically: see the module docs.
#[derive(Debug)]
pub struct NpzWriter {
    target: PathBuf,
    temp: PathBuf,
    file: File,
    /// The zip layout; `None` for a bare `.npy`.
    layout: Option<Layout>,
    /// Per tensor: where its data starts, its byte size and the CRC-32 of its `.npy` header.
    tensors: Vec<(u64, u64, u32)>,
    /// Directories created for the target, outermost first (removed again on failure).
    created_dirs: Vec<PathBuf>,
    committed: bool,
}

impl NpzWriter {
    /// Lays out `tensors` in order, creates the temporary beside `target` and writes every
    /// local header and `.npy` header; tensors whose dtype NumPy cannot hold are refused.
    pub fn create(target: PathBuf, tensors: &[OutputTensor]) -> Result<Self, FormatError> {
        Self::create_as(target, tensors, true)
    }

    /// Writes the one tensor of `tensors` as a bare `.npy` file (header, then data).
    pub fn create_npy(target: PathBuf, tensors: &[OutputTensor]) -> Result<Self, FormatError> {
        check_npy_count(tensors.len())?;
        Self::create_as(target, tensors, false)
    }

    fn create_as(target: PathBuf, tensors: &[OutputTensor], zipped: bool) -> Result<Self, FormatError> {
        let mut layout = Layout::new();
        let mut placed = Vec::with_capacity(tensors.len());
        let mut headers = Vec::with_capacity(tensors.len());
        let mut names = std::collections::HashSet::new();
        for t in tensors {
            if !names.insert(t.name.as_str()) {
                return Err(FormatError::DuplicateOutputTensor { name: t.name.clone() });
            }
            let descr = npy_descr(t.dtype).ok_or_else(|| FormatError::NpzDtype {
                name: t.name.clone(),
                dtype: t.dtype,
            })?;
            let nbytes = t.nbytes()?;
            let header = npy_header(descr, &t.shape);
            // Entries start on 64 bytes and the .npy header is padded to 64, so data is aligned.
            let entry = if zipped {
                layout
                    .add(&format!("{}.npy", t.name), header.len() as u64 + nbytes, 64)
                    .map_err(|reason| FormatError::InvalidOutput {
                        path: target.clone(),
                        reason,
                    })?
            } else {
                0
            };
            placed.push((entry + header.len() as u64, nbytes, zip::crc32(&header)));
            headers.push((entry, header));
        }
        if target.file_name().is_none() || target.is_dir() {
            let reason = if target.is_dir() {
                "is a directory"
            } else {
                "no file name"
            };
            return Err(FormatError::InvalidOutput {
                path: target,
                reason: reason.to_string(),
            });
        }
        let mut created_dirs = Vec::new();
        if let Some(parent) = target.parent() {
            create_missing_dirs(parent, &mut created_dirs)?;
        }
        let temp = temp_path_for(&target);
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| FormatError::io(&temp, e));
        let file = match opened {
            Ok(file) => file,
            Err(e) => {
                remove_dirs(&created_dirs);
                return Err(e);
            }
        };
        let end = if zipped {
            layout.data_end()
        } else {
            placed.first().map_or(0, |&(data, nbytes, _)| data + nbytes)
        };
        let writer = NpzWriter {
            target,
            temp,
            file,
            layout: zipped.then_some(layout),
            tensors: placed,
            created_dirs,
            committed: false,
        };
        let io = |e| FormatError::io(&writer.temp, e);
        writer.file.set_len(end).map_err(io)?;
        if let Some(layout) = &writer.layout {
            layout.write_local_headers(&writer.file).map_err(io)?;
        }
        for (at, header) in &headers {
            writer.file.write_all_at(header, *at).map_err(io)?;
        }
        Ok(writer)
    }

    /// Where tensor `i` goes: the open temporary and the absolute offset of its data.
    ///
    /// # Panics
    /// If `i` is not an index of the slice given to `create`.
    pub fn placement(&self, i: usize) -> (&File, u64) {
        (&self.file, self.tensors[i].0)
    }

    /// Completes the archive with `data_crcs` (the CRC-32 of each tensor's bytes, in order) and
    /// renames it into place.
    pub fn commit(mut self, data_crcs: &[u32]) -> Result<Vec<PathBuf>, FormatError> {
        let crcs: Vec<u32> = self
            .tensors
            .iter()
            .zip(data_crcs)
            .map(|(&(_, nbytes, header_crc), &crc)| zip::crc32_combine(header_crc, crc, nbytes))
            .collect();
        if let Some(layout) = &self.layout {
            layout
                .finish(&self.file, &crcs)
                .map_err(|e| FormatError::io(&self.temp, e))?;
        }
        std::fs::rename(&self.temp, &self.target).map_err(|e| FormatError::io(&self.target, e))?;
        self.committed = true;
        Ok(vec![self.target.clone()])
    }
}

impl Drop for NpzWriter {
    /// Not committed: removes the temporary.
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
            remove_dirs(&self.created_dirs);
        }
    }
}

/// Removes the directories a failed writer created, innermost first (one someone else filled
/// meanwhile stays).
fn remove_dirs(created: &[PathBuf]) {
    for d in created.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        w.commit(&[zip::crc32(&[1, 2, 3, 4, 5, 6, 7, 8]), zip::crc32(&[9])])
            .unwrap();
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

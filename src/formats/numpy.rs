//! NumPy inputs (SPEC §6): `.npy` (one tensor, named by the file stem) and `.npz` (a zip of
//! `NAME.npy` entries). Only headers are read: the `.npy` header dict is parsed by a tiny strict
//! parser (never `eval`, never pickle), the zip central directory is walked by hand, and every
//! tensor becomes a [`TensorEntry`] pointing at its bytes inside the file, so reading is
//! zero-copy like safetensors. Compressed zip entries, object arrays, Fortran order and
//! big-endian data are refused with a message saying what to do instead.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::dtype::{checked_numel, DType};

use super::{zip, FormatError, SourceFile, TensorEntry};

/// Why a `.npy`/`.npz` input was refused. Wrapped with the file path in
/// [`FormatError::Numpy`].
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// Reading the file failed; the source keeps the I/O error kind. The file is named by the
    /// [`FormatError::Numpy`] wrapping this.
    #[error("read failed")]
    Io(#[source] io::Error),
    /// The `.npz` archive is malformed or has entries that cannot be read in place.
    #[error(transparent)]
    Zip(#[from] zip::ZipError),
    /// A `.npy` header is malformed or asks for what is refused (object arrays, big-endian,
    /// Fortran order, ...); the text says what, and what to do instead.
    #[error("{0}")]
    Invalid(String),
    /// An entry of an `.npz` is not a `.npy` array.
    #[error("entry {entry:?} is not a .npy array")]
    NotNpy {
        /// The entry name.
        entry: String,
    },
    /// Two `.npz` entries hold the same tensor name.
    #[error("tensor {name:?} is stored twice")]
    StoredTwice {
        /// The tensor name.
        name: String,
    },
    /// The error concerns tensor `name`.
    #[error("tensor {name:?}")]
    InTensor {
        /// The tensor name.
        name: String,
        /// What is wrong with it.
        #[source]
        source: Box<NpyError>,
    },
}

impl From<String> for NpyError {
    fn from(reason: String) -> Self {
        NpyError::Invalid(reason)
    }
}

impl From<&str> for NpyError {
    fn from(reason: &str) -> Self {
        NpyError::Invalid(reason.to_owned())
    }
}

impl NpyError {
    /// This error, said of tensor `name`.
    fn in_tensor(self, name: &str) -> Self {
        NpyError::InTensor {
            name: name.to_owned(),
            source: Box::new(self),
        }
    }

    /// This error, or `replacement` when it is not an I/O error (whose kind is kept).
    fn unless_io(self, replacement: &str) -> Self {
        match self {
            NpyError::Io(_) => self,
            _ => replacement.into(),
        }
    }
}

/// Upper bound on a `.npy` header; NumPy itself refuses headers over 10 000 bytes by default.
const MAX_HEADER: u64 = 1 << 20;

/// Reads the tensors of a `.npy` or `.npz` file; `file_index` is stored in every entry.
pub(crate) fn read_tensors(file: &SourceFile, file_index: usize) -> Result<Vec<TensorEntry>, FormatError> {
    let lower = file.path.to_string_lossy().to_ascii_lowercase();
    let bad = |source: NpyError| FormatError::Numpy {
        path: file.path.clone(),
        source,
    };
    if lower.ends_with(".npz") {
        let mut entries = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (name, start, end) in zip_entries(file).map_err(bad)? {
            let (dtype, shape, offset, nbytes) = parse_npy(file, start, end).map_err(|e| bad(e.in_tensor(&name)))?;
            if !names.insert(name.clone()) {
                return Err(bad(NpyError::StoredTwice { name }));
            }
            entries.push(TensorEntry {
                name,
                dtype,
                shape,
                file: file_index,
                offset,
                nbytes,
                strides: None,
                pieces: None,
            });
        }
        entries.sort_by_key(|e| e.offset);
        Ok(entries)
    } else {
        let name = Path::new(&file.path)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (dtype, shape, offset, nbytes) = parse_npy(file, 0, file.len).map_err(|e| bad(e.in_tensor(&name)))?;
        // The header is at most 12 bytes plus MAX_HEADER, checked by parse_npy.
        let mut header =
            vec![0u8; usize::try_from(offset).map_err(|_| bad(NpyError::Invalid("header is too large".into())))?];
        file.read_at(0, &mut header)?;
        file.record_header(&header);
        Ok(vec![TensorEntry {
            name,
            dtype,
            shape,
            file: file_index,
            offset,
            nbytes,
            strides: None,
            pieces: None,
        }])
    }
}

/// Reads `len` bytes at `offset`, refusing reads past `end`.
fn read(file: &SourceFile, offset: u64, len: u64, end: u64) -> Result<Vec<u8>, NpyError> {
    let stop = offset.checked_add(len).ok_or("offset overflows")?;
    if stop > end || stop > file.len {
        return Err("file is truncated".into());
    }
    let mut buf = vec![0u8; usize::try_from(len).map_err(|_| "length overflows")?];
    file.file().read_exact_at(&mut buf, offset).map_err(NpyError::Io)?;
    Ok(buf)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2).map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Parses the `.npy` stored in `[start, end)` of `file`: dtype, shape, absolute data offset
/// and byte size.
fn parse_npy(file: &SourceFile, start: u64, end: u64) -> Result<(DType, Vec<usize>, u64, u64), NpyError> {
    let pre = read(file, start, 10, end).map_err(|e| e.unless_io("file is too short for a .npy header"))?;
    if !pre.starts_with(b"\x93NUMPY") {
        return Err("not a .npy file (wrong magic)".into());
    }
    let major = pre[6];
    let (header_start, header_len) = match major {
        1 => (start + 10, u64::from(u16_at(&pre, 8))),
        2 | 3 => {
            let b = read(file, start, 12, end).map_err(|e| e.unless_io("truncated .npy header"))?;
            (start + 12, u64::from(u32_at(&b, 8)))
        }
        v => return Err(format!(".npy format version {v} is not supported").into()),
    };
    if header_len > MAX_HEADER {
        return Err(format!(".npy header of {header_len} bytes is too large").into());
    }
    let raw = read(file, header_start, header_len, end).map_err(|e| e.unless_io("truncated .npy header"))?;
    // Versions 1 and 2 are latin-1, 3 is UTF-8; every valid header is ASCII either way.
    let text = std::str::from_utf8(&raw).map_err(|_| "the .npy header is not text")?;
    let (descr, fortran, shape) = parse_header(text)?;
    let dtype = parse_descr(&descr)?;
    if fortran && shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err("fortran_order arrays are not supported yet; re-save with np.ascontiguousarray".into());
    }
    let numel = checked_numel(&shape).ok_or("shape overflows")?;
    let nbytes = dtype.nbytes(numel).ok_or("shape overflows")? as u64;
    let offset = header_start + header_len;
    if offset
        .checked_add(nbytes)
        .is_none_or(|stop| stop > end || stop > file.len)
    {
        return Err(format!("data is truncated: shape {shape:?} of {descr} needs {nbytes} bytes").into());
    }
    Ok((dtype, shape, offset, nbytes))
}

/// The dtype of a `descr` string such as `<f4`.
fn parse_descr(descr: &str) -> Result<DType, String> {
    let mut chars = descr.chars();
    let order = chars.next().ok_or("empty descr")?;
    let code = chars.as_str();
    let dtype = match DType::from_numpy_code(code) {
        Some(dtype) => dtype,
        None if code.starts_with('O') => {
            return Err("object arrays are refused (allow_pickle is never used)".to_string());
        }
        None if code.starts_with('V') => {
            return Err(format!(
                "dtype {descr:?} is raw bytes (ml_dtypes bfloat16/float8 are saved this way and cannot \
                 be told apart); save as safetensors or cast to float32 first"
            ));
        }
        None => return Err(format!("dtype {descr:?} is not supported")),
    };
    match order {
        '<' | '|' | '=' => Ok(dtype),
        '>' if dtype.bits() == 8 => Ok(dtype),
        '>' => Err(format!("dtype {descr:?}: big-endian not supported")),
        _ => Err(format!("dtype {descr:?} is not supported")),
    }
}

/// A value of the header dict.
#[derive(Debug)]
enum Item {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// Strict parser of the header dict `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
fn parse_header(text: &str) -> Result<(String, bool, Vec<usize>), String> {
    let bad = |what: &str| format!("malformed .npy header ({what}): {:?}", text.trim_end());
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    p.expect(b'{').map_err(|_| bad("no dict"))?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string().ok_or_else(|| bad("key"))?;
        p.ws();
        p.expect(b':').map_err(|_| bad("colon"))?;
        p.ws();
        let value = if p.peek() == Some(b'[') {
            return Err("structured dtypes are not supported".to_string());
        } else {
            p.item().ok_or_else(|| bad("value"))?
        };
        match (key.as_str(), value) {
            ("descr", Item::Str(s)) if descr.is_none() => descr = Some(s),
            ("fortran_order", Item::Bool(b)) if fortran.is_none() => fortran = Some(b),
            ("shape", Item::Tuple(t)) if shape.is_none() => shape = Some(t),
            _ => return Err(bad(&format!("key {key:?}"))),
        }
        p.ws();
        if !p.eat(b',') {
            p.ws();
            p.expect(b'}').map_err(|_| bad("separator"))?;
            break;
        }
    }
    p.ws();
    if p.i != p.s.len() {
        return Err(bad("trailing text"));
    }
    match (descr, fortran, shape) {
        (Some(d), Some(f), Some(s)) => Ok((d, f, s)),
        _ => Err(bad("missing key")),
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\t' | b'\r')) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> Result<(), ()> {
        self.ws();
        if self.eat(c) {
            Ok(())
        } else {
            Err(())
        }
    }
    fn string(&mut self) -> Option<String> {
        let quote = self.peek().filter(|&q| q == b'\'' || q == b'"')?;
        self.i += 1;
        let begin = self.i;
        while self.peek()? != quote {
            if self.peek()? == b'\\' {
                return None;
            }
            self.i += 1;
        }
        let s = std::str::from_utf8(self.s.get(begin..self.i)?).ok()?.to_string();
        self.i += 1;
        Some(s)
    }
    fn word(&mut self, w: &[u8]) -> bool {
        if self.s.get(self.i..self.i + w.len()) == Some(w) {
            self.i += w.len();
            true
        } else {
            false
        }
    }
    fn int(&mut self) -> Option<usize> {
        let begin = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        std::str::from_utf8(self.s.get(begin..self.i)?).ok()?.parse().ok()
    }
    fn item(&mut self) -> Option<Item> {
        match self.peek()? {
            b'\'' | b'"' => self.string().map(Item::Str),
            b'T' => self.word(b"True").then_some(Item::Bool(true)),
            b'F' => self.word(b"False").then_some(Item::Bool(false)),
            b'(' => {
                self.i += 1;
                let mut dims = Vec::new();
                loop {
                    self.ws();
                    if self.eat(b')') {
                        break;
                    }
                    dims.push(self.int()?);
                    // Python writes an optional `L` suffix in old headers.
                    self.eat(b'L');
                    self.ws();
                    if !self.eat(b',') {
                        self.ws();
                        if !self.eat(b')') {
                            return None;
                        }
                        break;
                    }
                }
                Some(Item::Tuple(dims))
            }
            _ => None,
        }
    }
}

/// The `.npy` entries of a zip: tensor name and the `[start, end)` of each entry's data.
fn zip_entries(file: &SourceFile) -> Result<Vec<(String, u64, u64)>, NpyError> {
    let mut out = Vec::new();
    for entry in zip::read_entries(file)? {
        entry.require_stored(" (np.savez_compressed wrote it); re-save it with np.savez")?;
        let Some(name) = entry.name.strip_suffix(".npy") else {
            return Err(NpyError::NotNpy { entry: entry.name });
        };
        out.push((name.to_string(), entry.data_offset, entry.data_offset + entry.size));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v1 `.npy` with `header` padded to 64 bytes and `data`.
    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut h = header.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out
    }

    /// A stored zip of `(name, bytes)` entries (CRC left zero: the reader does not check it).
    fn zip(entries: &[(&str, Vec<u8>)], method: u16) -> Vec<u8> {
        let mut out = Vec::new();
        let mut cd = Vec::new();
        for (name, data) in entries {
            let local = out.len() as u32;
            out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
            out.extend_from_slice(&[20, 0, 0, 0]);
            out.extend_from_slice(&method.to_le_bytes());
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);
            cd.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            cd.extend_from_slice(&[20, 0, 20, 0, 0, 0]);
            cd.extend_from_slice(&method.to_le_bytes());
            cd.extend_from_slice(&[0; 8]);
            cd.extend_from_slice(&(data.len() as u32).to_le_bytes());
            cd.extend_from_slice(&(data.len() as u32).to_le_bytes());
            cd.extend_from_slice(&(name.len() as u16).to_le_bytes());
            cd.extend_from_slice(&[0; 12]);
            cd.extend_from_slice(&local.to_le_bytes());
            cd.extend_from_slice(name.as_bytes());
        }
        let cd_offset = out.len() as u32;
        out.extend_from_slice(&cd);
        out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(cd.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out
    }

    const F32_23: &str = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";

    /// The message with its causes, as the CLI prints it.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            text = format!("{text}: {c}");
            cause = c.source();
        }
        text
    }

    fn open(name: &str, bytes: &[u8]) -> Result<Vec<TensorEntry>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let f = SourceFile::open(&path).unwrap();
        read_tensors(&f, 0).map_err(|e| match e {
            FormatError::Numpy { source, .. } => chain(&source),
            other => panic!("{other:?}"),
        })
    }

    #[test]
    fn a_failed_read_keeps_its_io_error_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.npy");
        std::fs::write(&path, npy(F32_23, &[7u8; 24])).unwrap();
        let file = SourceFile::open(&path).unwrap();
        std::fs::write(&path, b"").unwrap();
        let err = read_tensors(&file, 0).unwrap_err();
        // The wrapper names the file; the inner error does not repeat it.
        let text = chain(&err);
        assert_eq!(text.matches(&*path.to_string_lossy()).count(), 1, "{text}");
        match Err::<(), _>(err) {
            Err(FormatError::Numpy { source, .. }) => match source {
                NpyError::InTensor { source, .. } => match *source {
                    NpyError::Io(source) => assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof),
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        let npz = dir.path().join("w.npz");
        std::fs::write(&npz, vec![0u8; 100]).unwrap();
        let file = SourceFile::open(&npz).unwrap();
        match read_tensors(&file, 0) {
            Err(e @ FormatError::Numpy { .. }) => assert!(chain(&e).contains("not a zip archive"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_npy() {
        let bytes = npy(F32_23, &[7u8; 24]);
        let t = open("w.npy", &bytes).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].name, "w");
        assert_eq!(t[0].dtype, DType::F32);
        assert_eq!(t[0].shape, vec![2, 3]);
        assert_eq!(t[0].offset, 128);
        assert_eq!(t[0].nbytes, 24);
        let t = open(
            "s.npy",
            &npy("{'descr': '|b1', 'fortran_order': False, 'shape': ()}", &[1]),
        )
        .unwrap();
        assert_eq!((t[0].dtype, t[0].shape.clone()), (DType::Bool, vec![]));
    }

    #[test]
    fn reads_npz_at_absolute_offsets() {
        let a = npy(F32_23, &[1u8; 24]);
        let b = npy("{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }", &[2u8; 8]);
        let bytes = zip(&[("a.npy", a), ("b.npy", b)], 0);
        let t = open("m.npz", &bytes).unwrap();
        assert_eq!(t.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(&bytes[t[0].offset as usize..][..24], &[1u8; 24]);
        assert_eq!(&bytes[t[1].offset as usize..][..8], &[2u8; 8]);
        assert_eq!(t[1].dtype, DType::I64);
    }

    #[test]
    fn bad_magic_and_truncation() {
        let mut bytes = npy(F32_23, &[0u8; 24]);
        bytes[1] = b'X';
        assert!(open("w.npy", &bytes).unwrap_err().contains("wrong magic"));
        let bytes = npy(F32_23, &[0u8; 24]);
        assert!(open("w.npy", &bytes[..30])
            .unwrap_err()
            .contains("truncated .npy header"));
        assert!(open("w.npy", &bytes[..5]).unwrap_err().contains("too short"));
        assert!(open("w.npy", &bytes[..130]).unwrap_err().contains("data is truncated"));
    }

    #[test]
    fn bad_dicts() {
        for h in [
            "{'descr': '<f4', 'fortran_order': False}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}",
            "{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3)}",
            "__import__('os').system('x')",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)} x",
        ] {
            let err = open("w.npy", &npy(h, &[0u8; 24])).unwrap_err();
            assert!(err.contains("malformed .npy header"), "{h}: {err}");
        }
        let err = open(
            "w.npy",
            &npy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': ()}", &[]),
        );
        assert!(err.unwrap_err().contains("structured"));
    }

    #[test]
    fn refused_dtypes_and_order() {
        let h = |d: &str, f: &str| format!("{{'descr': '{d}', 'fortran_order': {f}, 'shape': (2, 3), }}");
        let cases = [
            (h("|O", "False"), "allow_pickle is never used"),
            (h(">f4", "False"), "big-endian not supported"),
            (h("|V2", "False"), "bfloat16"),
            (h("<U3", "False"), "not supported"),
            (h("<f4", "True"), "fortran_order"),
        ];
        for (header, want) in cases {
            let err = open("w.npy", &npy(&header, &[0u8; 200])).unwrap_err();
            assert!(err.contains(want) && err.contains("tensor \"w\""), "{header}: {err}");
        }
    }

    #[test]
    fn compressed_and_truncated_zip() {
        let a = npy(F32_23, &[1u8; 24]);
        let err = open("m.npz", &zip(&[("a.npy", a.clone())], 8)).unwrap_err();
        assert!(err.contains("np.savez_compressed"), "{err}");
        let bytes = zip(&[("a.npy", a.clone())], 0);
        let err = open("m.npz", &bytes[..bytes.len() - 30]).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        let err = open("m.npz", &bytes[..50]).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        let err = open("m.npz", &zip(&[("a.txt", a)], 0)).unwrap_err();
        assert!(err.contains("not a .npy"), "{err}");
    }
}

//! Fuzzes the `.npy` reader (`formats::open_checkpoint` on a `.npy`): the magic and version, the
//! header length, the strict parser of the header dict (`{'descr': '<f4', 'fortran_order': False,
//! 'shape': (2, 3), }`, never `eval`) and the size checks. The readers take a file, so each input
//! is written to one scratch file per process first.
//!
//! The input is read twice:
//!   A. as a whole `.npy` file;
//!   B. re-framed: the input is the header text, put behind a version 1.0 prefix (version 3.0
//!      when it is longer than a u16 allows) whose length field is right, followed by 64 zero
//!      bytes of data, so that mutations which grow or shrink the dict keep exercising the
//!      parser instead of the length check.
//!
//! Besides "no panic", every accepted file must hold exactly one tensor named after the file,
//! whose data starts after the header and spans dtype × shape bytes inside the file; the answer
//! must be the same on a second reading; and NumPy's own spelling of the accepted dtype and shape
//! (a canonical header written here) must read back as the same tensor.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use brainsurgery::dtype::DType;
use brainsurgery::formats::{open_checkpoint, TensorEntry};
use libfuzzer_sys::fuzz_target;

const MAGIC: &[u8] = b"\x93NUMPY";
/// Canonical files are only built for tensors up to this many bytes of data.
const CANONICAL_MAX_BYTES: u64 = 1 << 16;

fuzz_target!(|data: &[u8]| {
    if let Some(t) = check(data) {
        canonical_agrees(&t);
    }
    let reframed = if let Ok(len) = u16::try_from(data.len()) {
        [MAGIC, &[1, 0], &len.to_le_bytes(), data, &[0; 64]].concat()
    } else {
        [MAGIC, &[3, 0], &(data.len() as u32).to_le_bytes(), data, &[0; 64]].concat()
    };
    if let Some(t) = check(&reframed) {
        canonical_agrees(&t);
    }
});

/// This process's scratch file; the stem is the tensor's name.
fn scratch() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| std::env::temp_dir().join(format!("brainsurgery-fuzz-{}.npy", std::process::id())))
}

/// Reads `bytes` as a `.npy` file; checks the invariants; the tensor when accepted.
fn check(bytes: &[u8]) -> Option<TensorEntry> {
    let path = scratch();
    std::fs::write(path, bytes).expect("write the scratch file");
    let read = || open_checkpoint(path).map(|ck| ck.tensors).map_err(|e| e.to_string());
    let result = read();
    assert_eq!(result, read(), ".npy reading is not deterministic");
    let tensors = match result {
        Ok(tensors) => tensors,
        Err(message) => {
            assert!(!message.is_empty());
            return None;
        }
    };
    let [t] = <[TensorEntry; 1]>::try_from(tensors).expect("a .npy holds one tensor");
    let stem = path.file_stem().unwrap().to_string_lossy();
    assert_eq!(t.name, stem);
    assert!(t.strides.is_none(), "{t:?}");
    assert!(bytes.starts_with(MAGIC), "accepted without the magic");
    // The data starts after the prefix (10 bytes for version 1, 12 after) and the header.
    let prefix = if bytes[6] == 1 { 10 } else { 12 };
    assert!(t.offset >= prefix, "{t:?} starts inside the prefix");
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .expect("numel overflows");
    assert_eq!(t.dtype.nbytes(numel).map(|n| n as u64), Some(t.nbytes), "{t:?}");
    let end = t.offset.checked_add(t.nbytes).expect("tensor end overflows");
    assert!(
        end <= bytes.len() as u64,
        "{t:?} ends past the file ({} bytes)",
        bytes.len()
    );
    Some(t)
}

/// NumPy's header for the accepted dtype and shape (what `np.save` writes) reads back the same.
fn canonical_agrees(t: &TensorEntry) {
    if t.nbytes > CANONICAL_MAX_BYTES {
        return;
    }
    let descr = descr(t.dtype).unwrap_or_else(|| panic!("accepted a dtype NumPy cannot spell: {t:?}"));
    let dims = match t.shape.as_slice() {
        [d] => format!("({d},)"),
        shape => format!(
            "({})",
            shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let len = u16::try_from(dict.len()).expect("a short header");
    let file = [
        MAGIC,
        &[1, 0],
        &len.to_le_bytes(),
        dict.as_bytes(),
        &vec![0; t.nbytes as usize],
    ]
    .concat();
    let again = check(&file).unwrap_or_else(|| panic!("NumPy's header for {t:?} is refused: {dict:?}"));
    assert_eq!((again.dtype, &again.shape, again.nbytes), (t.dtype, &t.shape, t.nbytes));
    assert_eq!(again.offset, 10 + dict.len() as u64);
}

/// NumPy's little-endian spelling of a dtype (written here, not taken from the engine).
fn descr(dtype: DType) -> Option<&'static str> {
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

//! Fuzzes the zip reader (`formats::zip::read_entries`), which walks the central directory of
//! every `.npz` and PyTorch zip checkpoint, and the `.npz` reader on top of it
//! (`formats::open_checkpoint` on a `.npz`: the entries, then the `.npy` header of each). The
//! input is the archive itself.
//!
//! The readers take a file (they read with `pread`, never the whole archive), so each input is
//! written to one scratch file per process first.
//!
//! Besides "no panic", it checks:
//! - determinism: a second reading gives the same entries or the same error;
//! - every accepted entry's data lies inside the file, after at least a local header, no two
//!   entries' data overlap, and an entry that is neither compressed nor encrypted passes
//!   `require_stored`;
//! - an accepted `.npz` has unique names, tensors sorted by offset, `nbytes` = dtype × shape, and
//!   each tensor lies inside the zip entry `NAME.npy` that holds it;
//! - errors render and say something.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use brainsurgery::formats::zip::{read_entries, Entry};
use brainsurgery::formats::{open_checkpoint, Checkpoint, FormatError, SourceFile, TensorEntry};
use libfuzzer_sys::fuzz_target;

/// Bytes of a local file header before the name and extra field.
const LOCAL_HEADER: u64 = 30;

fuzz_target!(|data: &[u8]| {
    let path = scratch("npz");
    std::fs::write(path, data).expect("write the scratch file");
    let file = SourceFile::open(path).expect("open the scratch file");
    assert_eq!(file.len, data.len() as u64);

    let entries = read_entries(&file);
    assert_eq!(
        entries.as_ref().map_err(|e| e.to_string()),
        read_entries(&file).as_ref().map_err(|e| e.to_string()),
        "read_entries is not deterministic"
    );
    match &entries {
        Ok(entries) => {
            for e in entries {
                accepted_entry(e, file.len);
            }
            // No two entries share data bytes (a zip bomb's amplification).
            let mut spans: Vec<(u64, u64)> = entries
                .iter()
                .map(|e| (e.data_offset, e.data_offset + e.size))
                .collect();
            spans.sort_unstable();
            for pair in spans.windows(2) {
                assert!(pair[1].0 >= pair[0].1, "entries overlap: {pair:?}");
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }

    let npz = open_checkpoint(path);
    match (&npz, &entries) {
        (Ok(ck), Ok(entries)) => accepted_npz(ck, entries, file.len),
        (Ok(_), Err(e)) => panic!("the .npz was read although its zip is refused: {e}"),
        (Err(e), _) => assert!(!e.to_string().is_empty()),
    }
    assert_eq!(
        outcome(&npz),
        outcome(&open_checkpoint(path)),
        ".npz reading is not deterministic"
    );
});

/// This process's scratch file, named `*.{ext}` so `open_checkpoint` picks the format.
fn scratch(ext: &str) -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| std::env::temp_dir().join(format!("brainsurgery-fuzz-{}.{ext}", std::process::id())))
}

/// What a reading gave, without the open file handles.
fn outcome(r: &Result<Checkpoint, FormatError>) -> Result<Vec<TensorEntry>, String> {
    r.as_ref().map(|ck| ck.tensors.clone()).map_err(|e| e.to_string())
}

fn accepted_entry(e: &Entry, file_len: u64) {
    assert!(e.data_offset >= LOCAL_HEADER, "{e:?} starts inside the local header");
    let end = e.data_offset.checked_add(e.size).expect("entry end overflows");
    assert!(end <= file_len, "{e:?} ends past the file ({file_len} bytes)");
    let stored = e.require_stored("");
    if e.method == 0 && !e.encrypted {
        assert!(stored.is_ok(), "{e:?}: {stored:?}");
    } else {
        assert!(
            stored.is_err_and(|m| !m.to_string().is_empty()),
            "{e:?} accepted as stored"
        );
    }
}

fn accepted_npz(ck: &Checkpoint, entries: &[Entry], file_len: u64) {
    assert!(ck.metadata.is_empty() && ck.sidecars.is_empty() && !ck.is_directory);
    assert_eq!(ck.tensors.len(), entries.len(), "one tensor per entry");
    let mut names: Vec<&str> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), ck.tensors.len(), "duplicate tensor names accepted");
    for pair in ck.tensors.windows(2) {
        assert!(pair[0].offset <= pair[1].offset, "not sorted: {pair:?}");
    }
    for t in &ck.tensors {
        assert!(t.strides.is_none(), "{t:?}");
        let numel = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .expect("numel overflows");
        assert_eq!(t.dtype.nbytes(numel).map(|n| n as u64), Some(t.nbytes), "{t:?}");
        let end = t.offset.checked_add(t.nbytes).expect("tensor end overflows");
        assert!(end <= file_len, "{t:?} ends past the file");
        let holder = format!("{}.npy", t.name);
        let inside = entries
            .iter()
            .any(|e| e.name == holder && e.data_offset + 10 <= t.offset && end <= e.data_offset + e.size);
        assert!(
            inside,
            "{t:?} is not inside its entry {holder:?} (past a 10-byte .npy prefix)"
        );
    }
}

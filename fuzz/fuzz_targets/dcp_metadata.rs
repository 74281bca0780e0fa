//! Fuzzes the PyTorch Distributed Checkpoint reader (`formats::open_checkpoint` on a directory
//! holding `.metadata` and `*.distcp`): the restricted unpickler with the DCP metadata classes
//! allowed (`formats::pickle::unpickle_dcp`), the walk of `Metadata` (state dict metadata,
//! chunks, storage data) and the checks of each chunk against the `torch.save` archive it points
//! at. The input is the `.metadata` pickle; the data files beside it are the committed
//! `tests/fixtures/dcp/sharded` ones, copied once per process into a scratch directory.
//!
//! Besides "no panic", it checks: determinism (a second opening gives the same answer); that a
//! refused input says why in words; that every accepted tensor's chunks tile it exactly (their
//! volumes sum to its element count, each inside its shape); and that every accepted tensor reads
//! whole without error or panic.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use brainsurgery::formats::{open_checkpoint, pickle};
use brainsurgery::value::{ReadContext, Tensor};
use libfuzzer_sys::fuzz_target;

/// This process's scratch directory, holding the fixture's data files.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("brainsurgery-fuzz-dcp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dcp/sharded");
        for name in ["__0_0.distcp", "__1_0.distcp"] {
            std::fs::copy(fixtures.join(name), dir.join(name)).expect("copy a fixture data file");
        }
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = pickle::unpickle_dcp(data, pickle::Limits::default());
    let dir = scratch();
    std::fs::write(dir.join(".metadata"), data).expect("write the scratch metadata");
    let open = || open_checkpoint(dir).map_err(|e| e.to_string());
    let result = open();
    assert_eq!(
        result.as_ref().map(|ck| &ck.tensors),
        open().as_ref().map(|ck| &ck.tensors),
        "DCP reading is not deterministic"
    );
    let ck = match result {
        Ok(ck) => ck,
        Err(message) => {
            assert!(!message.is_empty());
            return;
        }
    };
    for entry in &ck.tensors {
        let numel: u64 = entry.shape.iter().map(|&d| d as u64).product();
        if let Some(pieces) = &entry.pieces {
            let volume: u64 = pieces.iter().map(|p| p.entry.shape.iter().map(|&d| d as u64).product::<u64>()).sum();
            assert_eq!(volume, numel, "{}: chunks do not tile the tensor", entry.name);
            for p in pieces.iter() {
                assert!(p.offsets.iter().zip(&p.entry.shape).zip(&entry.shape).all(|((&o, &s), &d)| o + s <= d));
            }
        }
        let tensor = Tensor::from_entry(entry, &ck.files);
        let mut out = vec![0u8; tensor.nbytes()];
        tensor
            .read(0, &mut out, &mut ReadContext::default())
            .unwrap_or_else(|e| panic!("{}: an accepted tensor does not read: {e}", entry.name));
    }
});

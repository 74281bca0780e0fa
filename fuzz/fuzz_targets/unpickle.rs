//! Fuzzes the restricted unpickler (`formats::pickle`), which reads `data.pkl` from untrusted
//! PyTorch checkpoints. The input is the pickle itself.
//!
//! Besides "no panic / no abort", it checks:
//! - determinism: a second run gives the same value or the same error;
//! - errors render with `Display`, and a refused global is named in the message;
//! - accepted values respect the default limits (nesting, object count, string length) and
//!   tensors have as many strides as dimensions;
//! - limits only ever stop a run early: a run under tiny `Limits` that ends without hitting a
//!   limit must give exactly what the default limits give.
#![no_main]

use brainsurgery::formats::pickle::{unpickle, unpickle_with, Limits, Object, PickleError};
use libfuzzer_sys::fuzz_target;

/// Much smaller than the defaults in every field, so inputs that hit them are cheap to find.
const SMALL: Limits = Limits {
    memo: 8,
    stack: 16,
    nesting: 8,
    string_len: 32,
    objects: 256,
    bytes: 256,
    copied: 256,
};

fuzz_target!(|data: &[u8]| {
    let result = unpickle(data);
    // Debug, not PartialEq: a NaN float is not equal to itself.
    let shown = format!("{result:?}");
    assert_eq!(shown, format!("{:?}", unpickle(data)), "unpickle is not deterministic");

    match &result {
        Ok(value) => accepted(value, &Limits::default()),
        Err(e) => rejected(e),
    }

    match unpickle_with(data, SMALL) {
        Ok(value) => {
            accepted(&value, &SMALL);
            assert_eq!(format!("{:?}", Ok::<_, PickleError>(value)), shown);
        }
        Err(PickleError::Limit { .. }) => {}
        Err(e) => {
            rejected(&e);
            assert_eq!(format!("{:?}", Err::<Object, _>(e)), shown);
        }
    }
});

fn rejected(e: &PickleError) {
    let text = e.to_string();
    assert!(!text.is_empty());
    if let PickleError::ForbiddenGlobal { module, name } = e {
        assert!(text.contains(&format!("{module}.{name}")), "{text}");
    }
}

/// Walks a value, returning (depth, objects, string bytes) and checking each tensor.
fn walk(value: &Object, limits: &Limits) -> (u32, usize, usize) {
    let children: Vec<&Object> = match value {
        Object::Tuple(v) | Object::List(v) => v.iter().collect(),
        Object::Dict(v) => v.iter().flat_map(|(k, x)| [k, x]).collect(),
        Object::Str(s) => {
            assert!(s.len() <= limits.string_len);
            return (0, 1, s.len());
        }
        Object::Bytes(b) => {
            assert!(b.len() <= limits.string_len);
            return (0, 1, b.len());
        }
        Object::Tensor(t) => {
            assert_eq!(t.shape.len(), t.stride.len(), "{t:?}");
            return (0, 1, 0);
        }
        _ => return (0, 1, 0),
    };
    let (mut depth, mut objects, mut bytes) = (0, 1, 0);
    for child in children {
        let (d, o, b) = walk(child, limits);
        depth = depth.max(d);
        objects += o;
        bytes += b;
    }
    (depth + 1, objects, bytes)
}

fn accepted(value: &Object, limits: &Limits) {
    let (depth, objects, bytes) = walk(value, limits);
    assert!(depth <= limits.nesting, "depth {depth} > {}", limits.nesting);
    assert!(objects <= limits.objects, "{objects} objects > {}", limits.objects);
    assert!(bytes <= limits.bytes, "{bytes} string bytes > {}", limits.bytes);
}

//! Fuzzes `formats::safetensors::parse_header`, the validator every safetensors input goes
//! through before a byte of tensor data is touched.
//!
//! Input layout: `[8 bytes: data-section length, u64 LE][file prefix: 8-byte header length, JSON]`.
//! The target parses the prefix twice:
//!   A. as given, with `file_len = prefix.len() + data-section length` — exactly what
//!      `read_header` passes for a real file (the length checks, truncation, framing);
//!   B. re-framed, the header length replaced by the length of everything after it, so that
//!      mutations which grow or shrink the JSON keep exercising the JSON validation.
//!
//! Besides "no panic", every accepted header must satisfy what readers rely on: offsets inside
//! the data section, sizes equal to dtype × shape, sorted, non-overlapping, unique names, and the
//! same answer from a second call, from a larger file, and from a plain `serde_json` reading.
#![no_main]

use brainsurgery::formats::safetensors::{parse_header, Header, HeaderError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((slack, prefix)) = data.split_first_chunk::<8>() else {
        return;
    };
    let data_len = u64::from_le_bytes(*slack);
    check(prefix, (prefix.len() as u64).saturating_add(data_len));

    if let Some(json) = prefix.get(8..) {
        let mut reframed = Vec::with_capacity(prefix.len());
        reframed.extend_from_slice(&(json.len() as u64).to_le_bytes());
        reframed.extend_from_slice(json);
        check(&reframed, (reframed.len() as u64).saturating_add(data_len));
    }
});

fn check(bytes: &[u8], file_len: u64) {
    let result = parse_header(bytes, file_len);
    // Deterministic: the same bytes give the same answer.
    let again = parse_header(bytes, file_len);
    match (&result, &again) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("parse_header is not deterministic: {result:?} vs {again:?}"),
    }
    match result {
        Ok(header) => accepted(bytes, file_len, &header),
        Err(e) => rejected(&e),
    }
}

/// Errors render (with their whole source chain) without panicking and say something.
fn rejected(e: &HeaderError) {
    let text = e.to_string();
    assert!(!text.is_empty());
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = s.to_string();
        source = s.source();
    }
}

fn accepted(bytes: &[u8], file_len: u64, h: &Header) {
    // Framing.
    let declared = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(h.header_len, declared);
    assert_eq!(h.data_start, 8 + declared);
    assert!(h.data_start <= file_len, "data section starts past the file");
    assert!(
        bytes.len() as u64 >= h.data_start,
        "accepted a prefix shorter than the header"
    );
    let data_len = file_len - h.data_start;

    // Every tensor lies in the data section and spans exactly dtype × shape bytes.
    for t in &h.tensors {
        assert_ne!(t.name, "__metadata__");
        assert!(t.begin <= t.end, "{t:?}");
        assert!(t.end <= data_len, "{t:?} ends past the data section ({data_len} bytes)");
        let numel = t
            .shape
            .iter()
            .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128))
            .expect("accepted a shape whose element count overflows u128");
        let bytes_needed = (numel * t.dtype.bits() as u128).div_ceil(8);
        assert_eq!(bytes_needed, (t.end - t.begin) as u128, "{t:?}");
        assert_eq!(t.dtype.nbytes(numel as usize).map(|n| n as u64), Some(t.end - t.begin));
    }

    // Sorted by (begin, end, name), names unique, non-empty tensors disjoint.
    for pair in h.tensors.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            (a.begin, a.end, &a.name) < (b.begin, b.end, &b.name),
            "not sorted: {a:?} {b:?}"
        );
    }
    let mut names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "duplicate tensor names accepted");
    let mut furthest = 0u64;
    for t in h.tensors.iter().filter(|t| t.begin < t.end) {
        assert!(
            t.begin >= furthest,
            "{t:?} overlaps an earlier tensor ending at {furthest}"
        );
        furthest = t.end;
    }

    // A plain JSON reading of the same text agrees, entry by entry. Fields the reader skips are
    // read in full, as the official loader does, so a number beyond f64 (`1E400`, JSON by the
    // grammar but not to `serde_json::Value`) or a lone surrogate is refused wherever it is.
    let json: serde_json::Value =
        serde_json::from_slice(&bytes[8..h.data_start as usize]).expect("accepted non-JSON");
    let object = json.as_object().expect("accepted a non-object header");
    let has_metadata = object.contains_key("__metadata__");
    assert_eq!(object.len(), h.tensors.len() + usize::from(has_metadata));
    if !has_metadata {
        assert!(h.metadata.is_empty());
    }
    for (k, v) in &h.metadata {
        assert_eq!(object["__metadata__"][k].as_str(), Some(v.as_str()));
    }
    for t in &h.tensors {
        let entry = &object[&t.name];
        // serde's derived struct reading also takes the fields as an array in declaration order,
        // as the official loader's does; harmless, so both spellings are checked.
        let field = |name: &str, index: usize| match entry {
            serde_json::Value::Array(items) => &items[index],
            _ => &entry[name],
        };
        assert_eq!(field("dtype", 0).as_str(), Some(t.dtype.safetensors_name()));
        let shape: Vec<u64> = field("shape", 1)
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(shape, t.shape.iter().map(|&d| d as u64).collect::<Vec<_>>());
        assert_eq!(field("data_offsets", 2)[0].as_u64(), Some(t.begin));
        assert_eq!(field("data_offsets", 2)[1].as_u64(), Some(t.end));
    }

    // A larger file (more data after the last tensor) and extra prefix bytes change nothing.
    assert_eq!(parse_header(bytes, u64::MAX).as_ref().ok(), Some(h));
    let mut longer = bytes.to_vec();
    longer.extend_from_slice(b"\xff{garbage");
    assert_eq!(parse_header(&longer, file_len.saturating_add(9)).as_ref().ok(), Some(h));
}

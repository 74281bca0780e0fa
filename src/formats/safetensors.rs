//! The safetensors header: an 8-byte little-endian length, then that many bytes of JSON
//! mapping tensor names to dtype, shape and data offsets, plus an optional `__metadata__` string
//! map. [`parse_header`] validates it as a pure function over the file prefix and never touches
//! tensor data; [`read_header`] fetches that prefix from an open file. Building whole
//! checkpoints from headers is left to the parent module, and writing to [`super::output`].

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{FormatError, SourceFile};
use crate::dtype::{checked_numel, DType};

/// Largest header accepted, as in the official implementation: bounds the allocation made
/// before anything is validated.
pub const MAX_HEADER_LEN: u64 = 100 << 20;

/// Bytes of the length prefix.
const LEN_PREFIX: u64 = 8;

/// Name of the free-form metadata entry.
const METADATA_KEY: &str = "__metadata__";

/// Why a safetensors header was rejected. Wrapped with the file path in
/// [`FormatError::Header`].
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The file is shorter than the 8-byte length prefix.
    #[error("file is {len} bytes, shorter than the 8-byte header length")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// The declared header length exceeds what follows the prefix.
    #[error("header length {header_len} exceeds the {available} bytes after the length prefix")]
    HeaderPastEnd {
        /// Declared header length.
        header_len: u64,
        /// File length minus 8.
        available: u64,
    },
    /// The declared header length exceeds [`MAX_HEADER_LEN`].
    #[error("header length {header_len} exceeds the limit of {limit} bytes")]
    HeaderTooLarge {
        /// Declared header length.
        header_len: u64,
        /// The limit.
        limit: u64,
    },
    /// The caller passed fewer prefix bytes than the header needs.
    #[error("header needs {needed} bytes but only {got} were read")]
    Truncated {
        /// 8 plus the header length.
        needed: u64,
        /// Bytes given.
        got: u64,
    },
    /// The header is not UTF-8.
    #[error("header is not UTF-8")]
    NotUtf8(#[source] std::str::Utf8Error),
    /// The header is not valid JSON.
    #[error("header is not valid JSON")]
    NotJson(#[source] serde_json::Error),
    /// The header is JSON but not an object.
    #[error("header is not a JSON object")]
    NotObject,
    /// A tensor entry has missing or mistyped fields (`dtype`, `shape`, `data_offsets`), or an
    /// extra field the official loader refuses (a number beyond f64 such as `1E400`, a lone
    /// UTF-16 surrogate).
    #[error("tensor {tensor:?} has an invalid entry")]
    InvalidEntry {
        /// Tensor name.
        tensor: String,
        /// What serde found wrong.
        #[source]
        source: serde_json::Error,
    },
    /// A tensor's dtype is not one this build knows.
    #[error("tensor {tensor:?} has unknown dtype {dtype:?}")]
    UnknownDtype {
        /// Tensor name.
        tensor: String,
        /// The dtype string found.
        dtype: String,
    },
    /// `__metadata__` is not an object of string values.
    #[error("__metadata__ is not a map of strings to strings")]
    InvalidMetadata(#[source] serde_json::Error),
    /// The same key appears twice in the header object (a JSON parser would silently keep one).
    #[error("tensor {tensor:?} appears twice in the header")]
    DuplicateName {
        /// The repeated key.
        tensor: String,
    },
    /// A tensor's begin offset is after its end offset.
    #[error("tensor {tensor:?} has begin offset {begin} after end offset {end}")]
    BeginAfterEnd {
        /// Tensor name.
        tensor: String,
        /// Begin offset (relative to the data section).
        begin: u64,
        /// End offset.
        end: u64,
    },
    /// A tensor ends past the end of the file's data section.
    #[error("tensor {tensor:?} ends at {end}, past the data length {data_len}")]
    PastEnd {
        /// Tensor name.
        tensor: String,
        /// End offset (relative to the data section).
        end: u64,
        /// Bytes in the data section.
        data_len: u64,
    },
    /// Two tensors share bytes.
    #[error("tensors {first:?} [{first_begin}, {first_end}) and {second:?} [{second_begin}, {second_end}) overlap")]
    Overlap {
        /// The tensor that starts first.
        first: String,
        /// Its begin offset.
        first_begin: u64,
        /// Its end offset.
        first_end: u64,
        /// The tensor that starts inside it.
        second: String,
        /// Its begin offset.
        second_begin: u64,
        /// Its end offset.
        second_end: u64,
    },
    /// A tensor's byte length disagrees with its dtype and shape.
    #[error("tensor {tensor:?} should take {expected} bytes but its offsets span {actual}")]
    SizeMismatch {
        /// Tensor name.
        tensor: String,
        /// Bytes implied by dtype × shape.
        expected: u64,
        /// `end - begin`.
        actual: u64,
    },
    /// A tensor's dtype × shape overflows.
    #[error("tensor {tensor:?} of shape {shape:?} has a size that overflows")]
    SizeOverflow {
        /// Tensor name.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
    },
}

/// One tensor as the header describes it; offsets are relative to [`Header::data_start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (may be empty, may contain 0).
    pub shape: Vec<usize>,
    /// First byte, relative to the data section.
    pub begin: u64,
    /// One past the last byte, relative to the data section.
    pub end: u64,
}

/// A validated safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Length of the JSON, as declared in the prefix.
    pub header_len: u64,
    /// Absolute offset of the data section (`8 + header_len`).
    pub data_start: u64,
    /// Every tensor, sorted by begin offset (ties by end, then name, for determinism).
    pub tensors: Vec<HeaderTensor>,
    /// The `__metadata__` map, empty when absent.
    pub metadata: BTreeMap<String, String>,
}

/// A tensor entry's fields; unknown extra fields are skipped, as the official loader does.
struct RawTensor<'a> {
    dtype: Cow<'a, str>,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// Reads a [`RawTensor`] as a derived `Deserialize` would (an object, or an array of the three
/// fields in order), except for unknown fields: the official loader reads the whole header into
/// serde's buffered form before picking fields, which parses every skipped value in full and
/// refuses numbers beyond f64 (`1E400`) and lone surrogates that `IgnoredAny` lets through. They
/// are read as [`Skipped`] instead, and `skipped_failed` records that one was refused.
struct TensorSeed<'f> {
    skipped_failed: &'f std::cell::Cell<bool>,
}

const TENSOR_FIELDS: &[&str] = &["dtype", "shape", "data_offsets"];

impl<'de> DeserializeSeed<'de> for TensorSeed<'_> {
    type Value = RawTensor<'de>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_struct("RawTensor", TENSOR_FIELDS, self)
    }
}

impl<'de> Visitor<'de> for TensorSeed<'_> {
    type Value = RawTensor<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("struct RawTensor")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let dtype: Dtype = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(0, &self))?;
        let shape = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(1, &self))?;
        let data_offsets = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(2, &self))?;
        Ok(RawTensor {
            dtype: dtype.0,
            shape,
            data_offsets,
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut dtype, mut shape, mut data_offsets) = (None::<Dtype>, None, None);
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Dtype if dtype.is_some() => return Err(de::Error::duplicate_field("dtype")),
                Field::Dtype => dtype = Some(map.next_value()?),
                Field::Shape if shape.is_some() => return Err(de::Error::duplicate_field("shape")),
                Field::Shape => shape = Some(map.next_value()?),
                Field::DataOffsets if data_offsets.is_some() => return Err(de::Error::duplicate_field("data_offsets")),
                Field::DataOffsets => data_offsets = Some(map.next_value()?),
                Field::Other => {
                    if let Err(e) = map.next_value::<Skipped>() {
                        self.skipped_failed.set(true);
                        return Err(e);
                    }
                }
            }
        }
        Ok(RawTensor {
            dtype: dtype.ok_or_else(|| de::Error::missing_field("dtype"))?.0,
            shape: shape.ok_or_else(|| de::Error::missing_field("shape"))?,
            data_offsets: data_offsets.ok_or_else(|| de::Error::missing_field("data_offsets"))?,
        })
    }
}

/// A tensor entry's key.
enum Field {
    Dtype,
    Shape,
    DataOffsets,
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl Visitor<'_> for FieldVisitor {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("field identifier")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Field, E> {
                Ok(match key {
                    "dtype" => Field::Dtype,
                    "shape" => Field::Shape,
                    "data_offsets" => Field::DataOffsets,
                    _ => Field::Other,
                })
            }
        }
        deserializer.deserialize_identifier(FieldVisitor)
    }
}

/// The dtype string, borrowed from the header unless it has escapes.
struct Dtype<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Dtype<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DtypeVisitor;
        impl<'de> Visitor<'de> for DtypeVisitor {
            type Value = Dtype<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Dtype(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Dtype(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(DtypeVisitor)
    }
}

/// A value read in full and dropped: what the official loader's buffering checks, nothing kept.
struct Skipped;

impl<'de> Deserialize<'de> for Skipped {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SkippedVisitor)
    }
}

struct SkippedVisitor;

impl<'de> Visitor<'de> for SkippedVisitor {
    type Value = Skipped;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Skipped, E> {
        Ok(Skipped)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Skipped, E> {
        Ok(Skipped)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Skipped, E> {
        Ok(Skipped)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Skipped, E> {
        Ok(Skipped)
    }
    fn visit_str<E>(self, _: &str) -> Result<Skipped, E> {
        Ok(Skipped)
    }
    fn visit_unit<E>(self) -> Result<Skipped, E> {
        Ok(Skipped)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skipped, A::Error> {
        while seq.next_element::<Skipped>()?.is_some() {}
        Ok(Skipped)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skipped, A::Error> {
        while map.next_entry::<Skipped, Skipped>()?.is_some() {}
        Ok(Skipped)
    }
}

/// One entry of the header object, typed as it is read. Entries used to be read as
/// `serde_json::Value` trees first: ~1.5 KB per tensor at once, 164 MB peak for a
/// 100,000-tensor header (issue 9).
enum Entry<'a> {
    Tensor(String, RawTensor<'a>),
    Metadata(BTreeMap<String, String>),
}

/// Which entry's value failed to deserialize, so the error can name it.
enum Failed {
    Tensor(String),
    /// In a field of the tensor that readers skip.
    Skipped(String),
    Metadata,
}

/// Reads the header object's entries in file order, duplicates kept so they can be reported;
/// records in `failed` the entry whose value was refused.
struct EntriesVisitor<'f> {
    failed: &'f std::cell::RefCell<Option<Failed>>,
}

impl<'de> Visitor<'de> for EntriesVisitor<'_> {
    type Value = Vec<Entry<'de>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(name) = map.next_key::<String>()? {
            if name == METADATA_KEY {
                // `null` is no metadata to the official loader (an `Option`).
                match map.next_value::<Option<BTreeMap<String, String>>>() {
                    Ok(metadata) => entries.push(Entry::Metadata(metadata.unwrap_or_default())),
                    Err(e) => {
                        *self.failed.borrow_mut() = Some(Failed::Metadata);
                        return Err(e);
                    }
                }
            } else {
                let skipped_failed = std::cell::Cell::new(false);
                match map.next_value_seed(TensorSeed {
                    skipped_failed: &skipped_failed,
                }) {
                    Ok(raw) => entries.push(Entry::Tensor(name, raw)),
                    Err(e) => {
                        *self.failed.borrow_mut() = Some(if skipped_failed.get() {
                            Failed::Skipped(name)
                        } else {
                            Failed::Tensor(name)
                        });
                        return Err(e);
                    }
                }
            }
        }
        Ok(entries)
    }
}

/// The header's entries, or the error naming the entry (or the syntax) that is wrong.
fn read_entries(text: &str) -> Result<Vec<Entry<'_>>, HeaderError> {
    let failed = std::cell::RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let entries = deserializer
        .deserialize_map(EntriesVisitor { failed: &failed })
        .and_then(|entries| deserializer.end().map(|()| entries));
    entries.map_err(|e| {
        use serde_json::error::Category;
        match (failed.into_inner(), e.classify()) {
            // What the official loader refuses in a skipped field is a syntax error to serde_json
            // (`number out of range`), but the field is ours to name.
            (Some(Failed::Skipped(tensor)), Category::Syntax | Category::Data) => {
                HeaderError::InvalidEntry { tensor, source: e }
            }
            // Only a refused value or a non-object top level are data errors; the rest is syntax.
            (_, Category::Io | Category::Syntax | Category::Eof) => HeaderError::NotJson(e),
            (Some(Failed::Tensor(tensor)), Category::Data) => HeaderError::InvalidEntry { tensor, source: e },
            (Some(Failed::Metadata), Category::Data) => HeaderError::InvalidMetadata(e),
            (None, Category::Data) => HeaderError::NotObject,
        }
    })
}

/// Checks the declared header length against the file length and the size limit.
fn check_header_len(header_len: u64, file_len: u64) -> Result<(), HeaderError> {
    let available = file_len
        .checked_sub(LEN_PREFIX)
        .ok_or(HeaderError::TooShort { len: file_len })?;
    if header_len > available {
        return Err(HeaderError::HeaderPastEnd { header_len, available });
    }
    if header_len > MAX_HEADER_LEN {
        return Err(HeaderError::HeaderTooLarge {
            header_len,
            limit: MAX_HEADER_LEN,
        });
    }
    Ok(())
}

/// Decodes the 8-byte little-endian length prefix.
fn decode_len(bytes: &[u8]) -> Result<u64, HeaderError> {
    let prefix: [u8; 8] = bytes
        .get(..8)
        .and_then(|p| p.try_into().ok())
        .ok_or(HeaderError::Truncated {
            needed: LEN_PREFIX,
            got: bytes.len() as u64,
        })?;
    Ok(u64::from_le_bytes(prefix))
}

/// Parses and validates a header from the file prefix `bytes` (at least `8 + header_len`
/// bytes; more is ignored) of a file of `file_len` bytes.
///
/// Holes between tensors and bytes after the last one are accepted: they cost nothing to skip
/// and some writers pad for alignment. Zero-size tensors are legal and overlap nothing.
pub fn parse_header(bytes: &[u8], file_len: u64) -> Result<Header, HeaderError> {
    if file_len < LEN_PREFIX {
        return Err(HeaderError::TooShort { len: file_len });
    }
    let header_len = decode_len(bytes)?;
    check_header_len(header_len, file_len)?;
    // Both fit: header_len <= file_len - 8.
    let data_start = LEN_PREFIX + header_len;
    let data_len = file_len - data_start;
    let json = usize::try_from(data_start)
        .ok()
        .and_then(|end| bytes.get(8..end))
        .ok_or(HeaderError::Truncated {
            needed: data_start,
            got: bytes.len() as u64,
        })?;
    let text = std::str::from_utf8(json).map_err(HeaderError::NotUtf8)?;
    let entries = read_entries(text)?;
    {
        let mut seen = HashSet::with_capacity(entries.len());
        for entry in &entries {
            let name = match entry {
                Entry::Tensor(name, _) => name.as_str(),
                Entry::Metadata(_) => METADATA_KEY,
            };
            if !seen.insert(name) {
                return Err(HeaderError::DuplicateName {
                    tensor: name.to_owned(),
                });
            }
        }
    }
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for entry in entries {
        let (name, raw) = match entry {
            Entry::Metadata(m) => {
                metadata = m;
                continue;
            }
            Entry::Tensor(name, raw) => (name, raw),
        };
        let Some(dtype) = DType::from_safetensors_name(&raw.dtype) else {
            return Err(HeaderError::UnknownDtype {
                tensor: name,
                dtype: raw.dtype.into_owned(),
            });
        };
        let (begin, end) = raw.data_offsets;
        if begin > end {
            return Err(HeaderError::BeginAfterEnd {
                tensor: name,
                begin,
                end,
            });
        }
        if end > data_len {
            return Err(HeaderError::PastEnd {
                tensor: name,
                end,
                data_len,
            });
        }
        let expected = checked_numel(&raw.shape)
            .and_then(|numel| dtype.nbytes(numel))
            .and_then(|n| u64::try_from(n).ok());
        let Some(expected) = expected else {
            return Err(HeaderError::SizeOverflow {
                tensor: name,
                shape: raw.shape,
            });
        };
        if expected != end - begin {
            return Err(HeaderError::SizeMismatch {
                tensor: name,
                expected,
                actual: end - begin,
            });
        }
        tensors.push(HeaderTensor {
            name,
            dtype,
            shape: raw.shape,
            begin,
            end,
        });
    }

    tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    // Sorted by begin, a non-empty tensor overlaps an earlier one exactly when it starts before
    // the furthest end seen so far; empty tensors hold no bytes and cannot overlap.
    let mut furthest: Option<&HeaderTensor> = None;
    for t in tensors.iter().filter(|t| t.begin < t.end) {
        if let Some(prev) = furthest {
            if t.begin < prev.end {
                return Err(HeaderError::Overlap {
                    first: prev.name.clone(),
                    first_begin: prev.begin,
                    first_end: prev.end,
                    second: t.name.clone(),
                    second_begin: t.begin,
                    second_end: t.end,
                });
            }
        }
        if furthest.is_none_or(|prev| t.end > prev.end) {
            furthest = Some(t);
        }
    }

    Ok(Header {
        header_len,
        data_start,
        tensors,
        metadata,
    })
}

/// Reads the prefix of `file` (8 bytes, then the declared header length, refused before
/// allocating when it exceeds the file or [`MAX_HEADER_LEN`]) and returns it whole.
pub fn read_prefix(file: &SourceFile) -> Result<Vec<u8>, FormatError> {
    let header_err = |source| FormatError::Header {
        path: file.path.clone(),
        source,
    };
    if file.len < LEN_PREFIX {
        return Err(header_err(HeaderError::TooShort { len: file.len }));
    }
    let mut len_bytes = [0u8; 8];
    file.read_at(0, &mut len_bytes)?;
    let header_len = u64::from_le_bytes(len_bytes);
    check_header_len(header_len, file.len).map_err(header_err)?;
    // header_len <= MAX_HEADER_LEN, so this fits in usize on every supported target.
    let total = usize::try_from(LEN_PREFIX + header_len).map_err(|_| {
        header_err(HeaderError::HeaderTooLarge {
            header_len,
            limit: MAX_HEADER_LEN,
        })
    })?;
    let mut prefix = vec![0u8; total];
    if let Some(rest) = prefix.get_mut(8..) {
        file.read_at(LEN_PREFIX, rest)?;
    }
    if let Some(head) = prefix.get_mut(..8) {
        head.copy_from_slice(&len_bytes);
    }
    file.record_header(&prefix);
    Ok(prefix)
}

/// Reads and validates the header of an open file; errors carry the file path.
pub fn read_header(file: &SourceFile) -> Result<Header, FormatError> {
    let prefix = read_prefix(file)?;
    parse_header(&prefix, file.len).map_err(|source| FormatError::Header {
        path: file.path.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::test_util::*;
    use ::safetensors::Dtype;

    /// A file image: length prefix, `json`, then `data_len` zero bytes.
    fn image(json: &str, data_len: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.resize(v.len() + data_len, 0);
        v
    }

    fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
        parse_header(bytes, bytes.len() as u64)
    }

    #[test]
    fn official_file_every_dtype() {
        let specs: Vec<Spec> = vec![
            ("bf16", Dtype::BF16, vec![2, 3], pattern(12, 1)),
            ("f8e4", Dtype::F8_E4M3, vec![5], pattern(5, 2)),
            ("f8e5", Dtype::F8_E5M2, vec![3], pattern(3, 3)),
            ("bool", Dtype::BOOL, vec![3], vec![1, 0, 1]),
            ("i64", Dtype::I64, vec![2], pattern(16, 4)),
            ("f32", Dtype::F32, vec![1, 2], pattern(8, 5)),
            ("zero", Dtype::F16, vec![4, 0], vec![]),
            ("zero2", Dtype::I8, vec![0], vec![]),
            ("scalar", Dtype::F64, vec![], pattern(8, 6)),
            ("u32", Dtype::U32, vec![3], pattern(12, 7)),
            ("i16", Dtype::I16, vec![1], pattern(2, 8)),
            ("f4", Dtype::F4, vec![4], pattern(2, 9)),
        ];
        let meta: std::collections::HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let bytes = official(&specs, Some(meta));
        let header = parse(&bytes).unwrap();
        assert_eq!(header.data_start, 8 + header.header_len);
        assert_eq!(header.metadata.get("format").map(String::as_str), Some("pt"));
        assert_eq!(header.tensors.len(), specs.len());
        for (name, dtype, shape, data) in &specs {
            let t = header.tensors.iter().find(|t| t.name == *name).unwrap();
            assert_eq!(t.dtype.safetensors_name(), format!("{dtype:?}"));
            assert_eq!(&t.shape, shape);
            let start = (header.data_start + t.begin) as usize;
            let end = (header.data_start + t.end) as usize;
            assert_eq!(&bytes[start..end], &data[..], "{name}");
        }
        assert!(header.tensors.windows(2).all(|w| w[0].begin <= w[1].begin));
        // Extra trailing bytes beyond the prefix are ignored.
        let prefix = &bytes[..header.data_start as usize];
        assert_eq!(parse_header(prefix, bytes.len() as u64).unwrap(), header);
    }

    #[test]
    fn empty_header_and_holes_and_trailing_bytes() {
        assert!(parse(&image("{}", 0)).unwrap().tensors.is_empty());
        let h = parse(&image(
            r#"{"b":{"dtype":"U8","shape":[2],"data_offsets":[10,12]},
                "a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},
                "z":{"dtype":"U8","shape":[0],"data_offsets":[1,1]},
                "e":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"extra":1}}"#,
            64,
        ))
        .unwrap();
        let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, vec!["e", "a", "z", "b"]);
    }

    #[test]
    fn too_short() {
        assert!(matches!(parse(&[1, 0, 0]), Err(HeaderError::TooShort { len: 3 })));
        assert!(matches!(parse(&[]), Err(HeaderError::TooShort { len: 0 })));
    }

    #[test]
    fn header_past_end() {
        let mut bytes = image("{}", 0);
        bytes[0] = 200;
        assert!(matches!(
            parse(&bytes),
            Err(HeaderError::HeaderPastEnd {
                header_len: 200,
                available: 2
            })
        ));
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(parse(&huge), Err(HeaderError::HeaderPastEnd { .. })));
    }

    #[test]
    fn header_too_large() {
        let n = MAX_HEADER_LEN + 1;
        let bytes = n.to_le_bytes();
        assert!(matches!(
            parse_header(&bytes, n + 8),
            Err(HeaderError::HeaderTooLarge { header_len, .. }) if header_len == n
        ));
    }

    #[test]
    fn truncated_prefix() {
        assert!(matches!(
            parse_header(&[1, 2], 100),
            Err(HeaderError::Truncated { needed: 8, got: 2 })
        ));
        let bytes = image(r#"{"__metadata__":{}}"#, 0);
        assert!(matches!(
            parse_header(&bytes[..12], 1000),
            Err(HeaderError::Truncated { needed: 27, got: 12 })
        ));
    }

    #[test]
    fn not_utf8() {
        let mut bytes = (4u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
        assert!(matches!(parse(&bytes), Err(HeaderError::NotUtf8(_))));
    }

    #[test]
    fn not_json() {
        assert!(matches!(parse(&image("{\"a\":", 0)), Err(HeaderError::NotJson(_))));
        assert!(matches!(parse(&image("{} x", 0)), Err(HeaderError::NotJson(_))));
    }

    #[test]
    fn not_object() {
        for json in ["[1,2]", "3", "\"s\"", "null"] {
            assert!(matches!(parse(&image(json, 0)), Err(HeaderError::NotObject)), "{json}");
        }
    }

    #[test]
    fn unknown_dtype() {
        let bytes = image(r#"{"w":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#, 16);
        assert!(matches!(
            parse(&bytes),
            Err(HeaderError::UnknownDtype { tensor, dtype }) if tensor == "w" && dtype == "F128"
        ));
    }

    #[test]
    fn invalid_entry_types() {
        for entry in [
            r#"{"dtype":"U8","shape":"2","data_offsets":[0,2]}"#,
            r#"{"dtype":"U8","shape":[-2],"data_offsets":[0,2]}"#,
            r#"{"dtype":"U8","shape":[2],"data_offsets":[0]}"#,
            r#"{"dtype":"U8","shape":[2],"data_offsets":["0","2"]}"#,
            r#"{"dtype":"U8","shape":[2]}"#,
            r#"{"dtype":8,"shape":[2],"data_offsets":[0,2]}"#,
            r#"[1,2]"#,
        ] {
            let bytes = image(&format!(r#"{{"w":{entry}}}"#), 2);
            assert!(
                matches!(parse(&bytes), Err(HeaderError::InvalidEntry { ref tensor, .. }) if tensor == "w"),
                "{entry}"
            );
        }
    }

    #[test]
    fn skipped_fields_are_read_as_strictly_as_the_official_loader() {
        // The official loader reads every skipped value in full: a number beyond f64 or a lone
        // surrogate in a field it ignores refuses the whole file (issue 9). The entry is named.
        let t = r#""dtype":"F32","shape":[1],"data_offsets":[0,4]"#;
        let big = format!("1{}", "0".repeat(400));
        let refused = [
            "1E400",
            "-1E400",
            "[1E400]",
            r#"{"y":1E400}"#,
            &big,
            r#""\ud800""#,
            r#""\udc00x""#,
        ];
        let accepted = [
            "1E300",
            "1.0e-400",
            "-0",
            r#""\ud83d\ude00""#,
            r#"{"y":[null,true,"s"]}"#,
        ];
        for (value, ok) in refused
            .iter()
            .map(|v| (v, false))
            .chain(accepted.iter().map(|v| (v, true)))
        {
            for json in [
                format!(r#"{{"t":{{{t},"x":{value}}}}}"#),
                format!(r#"{{"t":{{"x":{value},{t}}}}}"#),
            ] {
                let bytes = image(&json, 4);
                let official = ::safetensors::SafeTensors::read_metadata(&bytes);
                assert_eq!(official.is_ok(), ok, "{json}");
                match parse(&bytes) {
                    Ok(_) => assert!(ok, "{json}"),
                    Err(HeaderError::InvalidEntry { tensor, .. }) if !ok => assert_eq!(tensor, "t"),
                    Err(e) => panic!("{json}: {e:?}"),
                }
            }
        }
        let bytes = image(&format!(r#"{{"t":{{{t},"x":1E400}}}}"#), 4);
        let e = parse(&bytes).unwrap_err();
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert!(source.starts_with("number out of range"), "{source}");
        // A syntax error inside a skipped field names the entry too; the text ending there does not.
        let bytes = image(&format!(r#"{{"t":{{{t},"x":[1,]}}}}"#), 4);
        assert!(matches!(parse(&bytes), Err(HeaderError::InvalidEntry { .. })));
        let bytes = image(&format!(r#"{{"t":{{{t},"x":[1,"#), 4);
        assert!(matches!(parse(&bytes), Err(HeaderError::NotJson(_))));
        // `null` metadata is no metadata, to both.
        let bytes = image(&format!(r#"{{"__metadata__":null,"t":{{{t}}}}}"#), 4);
        assert!(::safetensors::SafeTensors::read_metadata(&bytes).is_ok());
        assert!(parse(&bytes).unwrap().metadata.is_empty());
        // The array spelling of an entry, which both read.
        let bytes = image(r#"{"t":["F32",[1],[0,4]]}"#, 4);
        assert!(::safetensors::SafeTensors::read_metadata(&bytes).is_ok());
        assert_eq!(parse(&bytes).unwrap().tensors[0].end, 4);
    }

    #[test]
    fn invalid_metadata() {
        for meta in [r#"{"a":1}"#, r#"[]"#, r#""x""#, r#"{"a":{"b":"c"}}"#] {
            let bytes = image(&format!(r#"{{"__metadata__":{meta}}}"#), 0);
            assert!(matches!(parse(&bytes), Err(HeaderError::InvalidMetadata(_))), "{meta}");
        }
    }

    #[test]
    fn past_end() {
        let bytes = image(r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#, 5);
        assert!(matches!(
            parse(&bytes),
            Err(HeaderError::PastEnd { tensor, end: 6, data_len: 5 }) if tensor == "w"
        ));
    }

    #[test]
    fn begin_after_end() {
        let bytes = image(r#"{"w":{"dtype":"U8","shape":[0],"data_offsets":[3,2]}}"#, 5);
        assert!(matches!(
            parse(&bytes),
            Err(HeaderError::BeginAfterEnd { tensor, begin: 3, end: 2 }) if tensor == "w"
        ));
    }

    #[test]
    fn overlap() {
        let bytes = image(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
                "z":{"dtype":"U8","shape":[0],"data_offsets":[2,2]},
                "b":{"dtype":"U8","shape":[1],"data_offsets":[5,6]},
                "c":{"dtype":"U8","shape":[3],"data_offsets":[3,6]}}"#,
            8,
        );
        assert!(matches!(
            parse(&bytes),
            Err(HeaderError::Overlap { first, second, first_begin: 0, first_end: 4, second_begin: 3, second_end: 6 })
                if first == "a" && second == "c"
        ));
        // A tensor contained in a long one that an intermediate shorter one follows.
        let bytes = image(
            r#"{"long":{"dtype":"U8","shape":[10],"data_offsets":[0,10]},
                "x":{"dtype":"U8","shape":[2],"data_offsets":[1,3]},
                "y":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#,
            10,
        );
        assert!(matches!(
            parse(&bytes),
            Err(HeaderError::Overlap { first, second, .. }) if first == "long" && second == "x"
        ));
    }

    #[test]
    fn size_mismatch() {
        let bytes = image(r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#, 16);
        assert!(matches!(
            parse(&bytes),
            Err(HeaderError::SizeMismatch { tensor, expected: 16, actual: 12 }) if tensor == "w"
        ));
    }

    #[test]
    fn size_overflow() {
        let max = usize::MAX;
        let bytes = image(
            &format!(r#"{{"w":{{"dtype":"F32","shape":[{max},{max}],"data_offsets":[0,4]}}}}"#),
            4,
        );
        assert!(matches!(
            parse(&bytes),
            Err(HeaderError::SizeOverflow { tensor, .. }) if tensor == "w"
        ));
        // numel fits but bytes do not.
        let bytes = image(
            &format!(r#"{{"w":{{"dtype":"F64","shape":[{max}],"data_offsets":[0,4]}}}}"#),
            4,
        );
        assert!(matches!(parse(&bytes), Err(HeaderError::SizeOverflow { .. })));
    }

    #[test]
    fn duplicate_name() {
        let bytes = image(
            r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},
                "w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
            2,
        );
        assert!(matches!(
            parse(&bytes),
            Err(HeaderError::DuplicateName { tensor }) if tensor == "w"
        ));
        let bytes = image(r#"{"__metadata__":{},"__metadata__":{}}"#, 0);
        assert!(matches!(parse(&bytes), Err(HeaderError::DuplicateName { .. })));
    }

    /// Poor man's fuzzing without extra dependencies: random byte flips, truncations and
    /// length rewrites of a valid file must give `Ok` or `Err`, never a panic.
    #[test]
    fn mutations_never_panic() {
        let specs: Vec<Spec> = vec![
            ("a", Dtype::F32, vec![2, 2], pattern(16, 1)),
            ("b", Dtype::BF16, vec![3], pattern(6, 2)),
            ("c", Dtype::U8, vec![0], vec![]),
        ];
        let meta: std::collections::HashMap<String, String> = [("k".to_string(), "v".to_string())].into();
        let base = official(&specs, Some(meta));
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5000 {
            let mut bytes = base.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % bytes.len();
                bytes[i] = next() as u8;
            }
            if next() % 4 == 0 {
                bytes.truncate((next() as usize) % bytes.len());
            }
            let file_len = if next() % 8 == 0 { next() } else { bytes.len() as u64 };
            let _ = parse_header(&bytes, file_len);
        }
    }

    #[test]
    fn read_prefix_refuses_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let mut bytes = (u64::MAX / 2).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&path, &bytes).unwrap();
        let file = SourceFile::open(&path).unwrap();
        assert!(matches!(
            read_prefix(&file),
            Err(FormatError::Header {
                source: HeaderError::HeaderPastEnd { .. },
                ..
            })
        ));
        std::fs::write(
            &path,
            image(r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, 1),
        )
        .unwrap();
        let file = SourceFile::open(&path).unwrap();
        let header = read_header(&file).unwrap();
        assert_eq!(header.tensors.len(), 1);
        assert_eq!(read_prefix(&file).unwrap().len() as u64, header.data_start);
    }
}

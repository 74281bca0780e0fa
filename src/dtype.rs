//! Element types of tensors: the safetensors dtype names, their sizes, and the user-facing
//! spellings a plan may use (SPEC §4). Conversions between them live in `kernels`.

use std::fmt;

/// Element type of a tensor, as stored in a checkpoint.
///
/// Every dtype of the safetensors format is carried through byte-exact; arithmetic is defined
/// for the floating types and casts for all but the sub-byte and exponent-only float formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// Boolean, one byte, 0 or 1.
    Bool,
    /// 4-bit float (e2m1), two per byte; carried through only.
    F4,
    /// 6-bit float e2m3; carried through only.
    F6E2M3,
    /// 6-bit float e3m2; carried through only.
    F6E3M2,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float, 5 exponent bits, 2 mantissa bits, with infinities.
    F8E5M2,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits, no infinities (`float8_e4m3fn`).
    F8E4M3,
    /// 8-bit exponent-only scale format; carried through only.
    F8E8M0,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
    /// Complex64 (two f32); carried through only.
    C64,
}

/// What kind of values a dtype holds, which decides what the engine may do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Floating point that arithmetic is defined on.
    Float,
    /// Integers and booleans: copied, cast and compared exactly.
    Integer,
    /// Carried through byte-exact only (sub-byte floats, exponent-only scales, complex).
    Opaque,
}

/// How PyTorch pickles tensors of one dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchStorage {
    /// `_rebuild_tensor_v2` over the legacy typed storage class `torch.<class>`.
    Typed(&'static str),
    /// `_rebuild_tensor_v3` over `torch.storage.UntypedStorage` and the dtype global
    /// `torch.<name>`: the dtypes torch added after typed storages were frozen.
    Untyped,
}

/// Every fact about one dtype, in one row of [`DType::TABLE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DTypeInfo {
    /// The dtype this row describes.
    pub dtype: DType,
    /// Canonical user-facing name, as NumPy/ml_dtypes and PyTorch spell it (`bfloat16`).
    pub name: &'static str,
    /// Name in safetensors headers (`BF16`).
    pub safetensors: &'static str,
    /// Other lower-case spellings a plan may use (SPEC §4: `bf16`, `half`, `long`, ...).
    pub aliases: &'static [&'static str],
    /// Size of one element in bits (4 and 6 for the sub-byte floats).
    pub bits: usize,
    /// What the engine may do with the values.
    pub kind: Kind,
    /// The `.npy` type code without its byte order (`f4`), when NumPy has a standard type.
    pub numpy: Option<&'static str>,
    /// Whether the Python view takes the type from `ml_dtypes` rather than NumPy.
    pub ml_dtypes: bool,
    /// How a PyTorch file stores it, when torch has the dtype (as `torch.<name>`).
    pub torch: Option<TorchStorage>,
}

impl DTypeInfo {
    /// The `.npy` descr (`<f4`, `|u1`), when NumPy has a standard type for the dtype.
    pub fn npy_descr(&self) -> Option<String> {
        let code = self.numpy?;
        Some(format!("{}{code}", if self.bits == 8 { '|' } else { '<' }))
    }
}

/// One row of [`DType::TABLE`], in the table's column order.
#[allow(clippy::too_many_arguments)]
const fn row(
    dtype: DType,
    name: &'static str,
    safetensors: &'static str,
    bits: usize,
    kind: Kind,
    numpy: Option<&'static str>,
    ml_dtypes: bool,
    torch: Option<TorchStorage>,
    aliases: &'static [&'static str],
) -> DTypeInfo {
    DTypeInfo {
        dtype,
        name,
        safetensors,
        aliases,
        bits,
        kind,
        numpy,
        ml_dtypes,
        torch,
    }
}

impl DType {
    /// Every fact about every dtype, one row each, in the order of [`DType::ALL`]. Every lookup
    /// below (names, sizes, NumPy and PyTorch spellings) reads this table, and Python builds its
    /// dtype map from it (`_core.dtypes()`).
    #[rustfmt::skip]
    pub const TABLE: [DTypeInfo; 20] = {
        use Kind::{Float, Integer as Int, Opaque};
        use TorchStorage::{Typed, Untyped};
        const ML: bool = true;
        const NP: bool = false;
        // torch packs float4 two per byte under another shape (`float4_e2m1fn_x2`) and has no
        // float6 at all.
        [
            // dtype          name              safetensors bits kind   numpy       python torch                                aliases
            row(DType::Bool,   "bool",           "BOOL",     8,  Int,    Some("b1"), NP, Some(Typed("BoolStorage")),         &["boolean"]),
            row(DType::F4,     "float4_e2m1fn",  "F4",       4,  Opaque, None,       NP, None,                                &[]),
            row(DType::F6E2M3, "float6_e2m3fn",  "F6_E2M3",  6,  Opaque, None,       NP, None,                                &[]),
            row(DType::F6E3M2, "float6_e3m2fn",  "F6_E3M2",  6,  Opaque, None,       NP, None,                                &[]),
            row(DType::U8,     "uint8",          "U8",       8,  Int,    Some("u1"), NP, Some(Typed("ByteStorage")),         &["u8", "byte"]),
            row(DType::I8,     "int8",           "I8",       8,  Int,    Some("i1"), NP, Some(Typed("CharStorage")),         &["i8", "char"]),
            row(DType::F8E5M2, "float8_e5m2",    "F8_E5M2",  8,  Float,  None,       ML, Some(Untyped),                       &["f8_e5m2", "fp8_e5m2"]),
            row(DType::F8E4M3, "float8_e4m3fn",  "F8_E4M3",  8,  Float,  None,       ML, Some(Untyped),                       &["float8_e4m3", "f8_e4m3", "fp8_e4m3"]),
            row(DType::F8E8M0, "float8_e8m0fnu", "F8_E8M0",  8,  Opaque, None,       ML, Some(Untyped),                       &[]),
            row(DType::I16,    "int16",          "I16",      16, Int,    Some("i2"), NP, Some(Typed("ShortStorage")),        &["i16", "short"]),
            row(DType::U16,    "uint16",         "U16",      16, Int,    Some("u2"), NP, Some(Untyped),                       &["u16"]),
            row(DType::F16,    "float16",        "F16",      16, Float,  Some("f2"), NP, Some(Typed("HalfStorage")),         &["half", "fp16", "f16"]),
            row(DType::BF16,   "bfloat16",       "BF16",     16, Float,  None,       ML, Some(Typed("BFloat16Storage")),     &["bf16"]),
            row(DType::I32,    "int32",          "I32",      32, Int,    Some("i4"), NP, Some(Typed("IntStorage")),          &["i32", "int"]),
            row(DType::U32,    "uint32",         "U32",      32, Int,    Some("u4"), NP, Some(Untyped),                       &["u32"]),
            row(DType::F32,    "float32",        "F32",      32, Float,  Some("f4"), NP, Some(Typed("FloatStorage")),        &["float", "fp32", "f32"]),
            row(DType::F64,    "float64",        "F64",      64, Float,  Some("f8"), NP, Some(Typed("DoubleStorage")),       &["double", "fp64", "f64"]),
            row(DType::I64,    "int64",          "I64",      64, Int,    Some("i8"), NP, Some(Typed("LongStorage")),         &["i64", "long"]),
            row(DType::U64,    "uint64",         "U64",      64, Int,    Some("u8"), NP, Some(Untyped),                       &["u64"]),
            row(DType::C64,    "complex64",      "C64",      64, Opaque, Some("c8"), NP, Some(Typed("ComplexFloatStorage")), &[]),
        ]
    };

    /// Every dtype, in a stable order.
    pub const ALL: [DType; 20] = {
        let mut all = [DType::Bool; 20];
        let mut i = 0;
        while i < 20 {
            all[i] = DType::TABLE[i].dtype;
            i += 1;
        }
        all
    };

    /// This dtype's row of [`DType::TABLE`].
    pub fn info(self) -> &'static DTypeInfo {
        // The table lists the variants in declaration order (checked by a test).
        &DType::TABLE[self as usize]
    }

    /// The first dtype whose row satisfies `pred`.
    pub fn find(pred: impl Fn(&DTypeInfo) -> bool) -> Option<DType> {
        DType::TABLE.iter().find(|info| pred(info)).map(|info| info.dtype)
    }

    /// The name used in safetensors headers (`"BF16"`, `"F8_E4M3"`, ...).
    pub fn safetensors_name(self) -> &'static str {
        self.info().safetensors
    }

    /// Parses a safetensors header dtype name (exact, upper case).
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        DType::find(|d| d.safetensors == name)
    }

    /// The canonical user-facing name (`bfloat16`, `float8_e4m3fn`, ...), as NumPy/ml_dtypes
    /// and PyTorch spell it.
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Parses a plan's dtype spelling, case-insensitively (SPEC §4: `float32`/`float`/`fp32`,
    /// `bf16`, `long`, ...): the canonical name or one of the aliases.
    pub fn parse(text: &str) -> Option<DType> {
        let lower = text.trim().to_ascii_lowercase();
        DType::find(|d| d.aliases.contains(&lower.as_str())).or_else(|| DType::find(|d| d.name == lower))
    }

    /// The dtype PyTorch calls `torch.<name>`, when torch has it.
    pub fn from_torch_name(name: &str) -> Option<DType> {
        DType::find(|d| d.torch.is_some() && d.name == name)
    }

    /// The dtype of a legacy typed storage class (`FloatStorage`).
    pub fn from_torch_storage(class: &str) -> Option<DType> {
        DType::find(|d| matches!(d.torch, Some(TorchStorage::Typed(c)) if c == class))
    }

    /// The dtype of a `.npy` type code without byte order (`f4`).
    pub fn from_numpy_code(code: &str) -> Option<DType> {
        DType::find(|d| d.numpy == Some(code))
    }

    /// Size of one element in bits (4 and 6 for the sub-byte floats).
    pub fn bits(self) -> usize {
        self.info().bits
    }

    /// Bytes per element, for the byte-addressable dtypes; `None` for sub-byte types, whose
    /// tensors are carried whole but cannot be sliced or computed on.
    pub fn size(self) -> Option<usize> {
        let bits = self.bits();
        bits.is_multiple_of(8).then_some(bits / 8)
    }

    /// Bytes taken by `numel` elements (rounded up for sub-byte types), or `None` on overflow.
    pub fn nbytes(self, numel: usize) -> Option<usize> {
        match self.size() {
            // Whole bytes: no bit count, which would overflow 8 times sooner.
            Some(size) => numel.checked_mul(size),
            // Sub-byte: whole groups of 8 elements take `bits` bytes each; the rest rounds up.
            None => (numel / 8)
                .checked_mul(self.bits())
                .and_then(|bytes| bytes.checked_add((numel % 8 * self.bits()).div_ceil(8))),
        }
    }

    /// Floating-point types that arithmetic is defined on.
    pub fn is_float(self) -> bool {
        self.info().kind == Kind::Float
    }

    /// Integer and boolean types.
    pub fn is_integer(self) -> bool {
        self.info().kind == Kind::Integer
    }

    /// Types whose values the engine can read and write (cast, compare, compute on).
    pub fn is_computable(self) -> bool {
        self.info().kind != Kind::Opaque
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Elements of `shape`, or `None` when they overflow (a shape with a 0 has none, whatever the
/// order of its dimensions).
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_overflow_only_when_the_bytes_do() {
        assert_eq!(DType::U8.nbytes(1 << 62), Some(1 << 62));
        assert_eq!(DType::F64.nbytes(1 << 60), Some(1 << 63));
        assert_eq!(DType::F64.nbytes(1 << 61), None);
        assert_eq!(DType::F4.nbytes(3), Some(2));
        assert_eq!(DType::F4.nbytes(17), Some(9));
        assert_eq!(DType::F4.nbytes(usize::MAX), Some(usize::MAX / 2 + 1));
        assert_eq!(DType::F6E2M3.nbytes(usize::MAX), Some(3 << 62));
    }

    #[test]
    fn table_rows_follow_declaration_order() {
        for (i, info) in DType::TABLE.iter().enumerate() {
            assert_eq!(info.dtype as usize, i, "{}", info.name);
            assert_eq!(info.dtype.info().name, info.name);
        }
        assert_eq!(DType::F32.info().npy_descr().as_deref(), Some("<f4"));
        assert_eq!(DType::Bool.info().npy_descr().as_deref(), Some("|b1"));
        assert_eq!(DType::from_torch_storage("HalfStorage"), Some(DType::F16));
        assert_eq!(DType::from_torch_name("float8_e8m0fnu"), Some(DType::F8E8M0));
        assert_eq!(DType::from_torch_name("float4_e2m1fn"), None);
    }

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
            assert_eq!(DType::parse(d.name()), Some(d));
        }
    }

    #[test]
    fn spec_spellings() {
        assert_eq!(DType::parse("BF16"), Some(DType::BF16));
        assert_eq!(DType::parse("Half"), Some(DType::F16));
        assert_eq!(DType::parse("long"), Some(DType::I64));
        assert_eq!(DType::parse("short"), Some(DType::I16));
        assert_eq!(DType::parse("int"), Some(DType::I32));
        assert_eq!(DType::parse("double"), Some(DType::F64));
        assert_eq!(DType::parse("float8_e4m3fn"), Some(DType::F8E4M3));
        assert_eq!(DType::parse("nonsense"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(DType::BF16.size(), Some(2));
        assert_eq!(DType::F4.size(), None);
        assert_eq!(DType::F4.nbytes(3), Some(2));
        assert_eq!(DType::F64.nbytes(usize::MAX), None);
    }
}

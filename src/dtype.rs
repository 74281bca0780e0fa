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

impl DType {
    /// Every dtype, in a stable order.
    pub const ALL: [DType; 20] = [
        DType::Bool,
        DType::F4,
        DType::F6E2M3,
        DType::F6E3M2,
        DType::U8,
        DType::I8,
        DType::F8E5M2,
        DType::F8E4M3,
        DType::F8E8M0,
        DType::I16,
        DType::U16,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U32,
        DType::F32,
        DType::F64,
        DType::I64,
        DType::U64,
        DType::C64,
    ];

    /// The name used in safetensors headers (`"BF16"`, `"F8_E4M3"`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::F4 => "F4",
            DType::F6E2M3 => "F6_E2M3",
            DType::F6E3M2 => "F6_E3M2",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E8M0 => "F8_E8M0",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::C64 => "C64",
        }
    }

    /// Parses a safetensors header dtype name (exact, upper case).
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.safetensors_name() == name)
    }

    /// The canonical user-facing name (`bfloat16`, `float8_e4m3fn`, ...), as NumPy/ml_dtypes
    /// and PyTorch spell it.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::F4 => "float4_e2m1fn",
            DType::F6E2M3 => "float6_e2m3fn",
            DType::F6E3M2 => "float6_e3m2fn",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::F8E5M2 => "float8_e5m2",
            DType::F8E4M3 => "float8_e4m3fn",
            DType::F8E8M0 => "float8_e8m0fnu",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::I64 => "int64",
            DType::U64 => "uint64",
            DType::C64 => "complex64",
        }
    }

    /// Parses a plan's dtype spelling, case-insensitively (SPEC §4: `float32`/`float`/`fp32`,
    /// `bf16`, `long`, the safetensors names, ...).
    pub fn parse(text: &str) -> Option<DType> {
        let lower = text.trim().to_ascii_lowercase();
        let dtype = match lower.as_str() {
            "float64" | "double" | "fp64" | "f64" => DType::F64,
            "float32" | "float" | "fp32" | "f32" => DType::F32,
            "float16" | "half" | "fp16" | "f16" => DType::F16,
            "bfloat16" | "bf16" => DType::BF16,
            "float8_e4m3fn" | "float8_e4m3" | "f8_e4m3" | "fp8_e4m3" => DType::F8E4M3,
            "float8_e5m2" | "f8_e5m2" | "fp8_e5m2" => DType::F8E5M2,
            "int8" | "i8" | "char" => DType::I8,
            "int16" | "i16" | "short" => DType::I16,
            "int32" | "i32" | "int" => DType::I32,
            "int64" | "i64" | "long" => DType::I64,
            "uint8" | "u8" | "byte" => DType::U8,
            "uint16" | "u16" => DType::U16,
            "uint32" | "u32" => DType::U32,
            "uint64" | "u64" => DType::U64,
            "bool" | "boolean" => DType::Bool,
            _ => return DType::ALL.into_iter().find(|d| d.name() == lower),
        };
        Some(dtype)
    }

    /// Size of one element in bits (4 and 6 for the sub-byte floats).
    pub fn bits(self) -> usize {
        match self {
            DType::F4 => 4,
            DType::F6E2M3 | DType::F6E3M2 => 6,
            DType::Bool | DType::U8 | DType::I8 | DType::F8E5M2 | DType::F8E4M3 | DType::F8E8M0 => 8,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 16,
            DType::I32 | DType::U32 | DType::F32 => 32,
            DType::F64 | DType::I64 | DType::U64 | DType::C64 => 64,
        }
    }

    /// Bytes per element, for the byte-addressable dtypes; `None` for sub-byte types, whose
    /// tensors are carried whole but cannot be sliced or computed on.
    pub fn size(self) -> Option<usize> {
        let bits = self.bits();
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// Bytes taken by `numel` elements (rounded up for sub-byte types), or `None` on overflow.
    pub fn nbytes(self, numel: usize) -> Option<usize> {
        numel.checked_mul(self.bits()).map(|bits| bits.div_ceil(8))
    }

    /// Floating-point types that arithmetic is defined on.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F64 | DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 | DType::F8E5M2
        )
    }

    /// Integer and boolean types.
    pub fn is_integer(self) -> bool {
        matches!(
            self,
            DType::Bool
                | DType::U8
                | DType::I8
                | DType::I16
                | DType::U16
                | DType::I32
                | DType::U32
                | DType::I64
                | DType::U64
        )
    }

    /// Types whose values the engine can read and write (cast, compare, compute on).
    pub fn is_computable(self) -> bool {
        self.is_float() || self.is_integer()
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

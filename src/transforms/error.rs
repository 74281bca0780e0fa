//! Errors of transforms applied to concrete tensors, and assertion failures.

use std::fmt;

use crate::dtype::DType;
use crate::references::ReferenceError;

/// A transform cannot apply to the tensors it selects. Maps to Python's `TransformError`,
/// exit status 1. The executor wraps it with the transform's index and name.
#[derive(Debug, thiserror::Error)]
pub enum TransformError {
    /// A reference cannot select the tensors it names (bad slice, zero matches).
    #[error(transparent)]
    Select(crate::state::SelectError),
    /// A value cannot be built or computed (a dtype without a byte size, a failed computation).
    #[error(transparent)]
    Value(crate::value::ValueError),
    /// A value of the named tensor cannot be built or computed.
    #[error("`{tensor}`")]
    ValueOf {
        /// The tensor, `alias::name`.
        tensor: String,
        /// Why.
        source: crate::value::ValueError,
    },
    /// Two sources rewrite to one destination.
    #[error("`{first}` and `{second}` both rewrite to `{destination}`")]
    Collision {
        /// The shared destination.
        destination: String,
        /// The first source.
        first: String,
        /// The second source.
        second: String,
    },
    /// A transform that creates tensors would overwrite one.
    #[error("destination `{destination}` already exists (from `{source_name}`); use assign to overwrite, or delete it first")]
    DestinationExists {
        /// The destination.
        destination: String,
        /// The source that rewrote to it.
        source_name: String,
    },
    /// A transform that writes into tensors found none at the destination.
    #[error("destination `{destination}` does not exist (from `{source_name}`)")]
    DestinationMissing {
        /// The destination.
        destination: String,
        /// The source that rewrote to it.
        source_name: String,
    },
    /// Shapes that must agree do not.
    #[error(
        "shape mismatch: `{source_name}` is {} but `{destination}` is {}",
        fmt_shape(source_shape),
        fmt_shape(destination_shape)
    )]
    ShapeMismatch {
        /// The source tensor (with its slice).
        source_name: String,
        /// Its shape.
        source_shape: Vec<usize>,
        /// The destination tensor (with its slice).
        destination: String,
        /// Its shape.
        destination_shape: Vec<usize>,
    },
    /// Dtypes that must agree do not (nothing is promoted silently).
    #[error(
        "dtype mismatch: `{source_name}` is {source_dtype} but `{destination}` is {destination_dtype}; cast first"
    )]
    DTypeMismatch {
        /// The source tensor.
        source_name: String,
        /// Its dtype.
        source_dtype: DType,
        /// The destination tensor.
        destination: String,
        /// Its dtype.
        destination_dtype: DType,
    },
    /// A floating-point operation selected a tensor that is not floating point.
    #[error("{op} is a floating-point operation but `{tensor}` is {dtype}; cast it first, or narrow the pattern")]
    NotFloat {
        /// The operation.
        op: &'static str,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: DType,
    },
    /// The tensor's dtype is carried through only (sub-byte floats, complex).
    #[error("{op} cannot compute on `{tensor}`: {dtype} tensors are carried through unchanged only")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: DType,
    },
    /// A slice does not fit the tensor it is applied to.
    #[error("slice on `{tensor}`")]
    Slice {
        /// The tensor.
        tensor: String,
        /// Why.
        source: ReferenceError,
    },
    /// A destination template cannot be expanded for a match.
    #[error("rewriting `{tensor}`")]
    Template {
        /// The matched tensor.
        tensor: String,
        /// Why.
        source: ReferenceError,
    },
    /// A slice was given where the transform cannot use one.
    #[error("`{reference}`: {transform} does not take a slice here")]
    SliceNotAllowed {
        /// The reference as written.
        reference: String,
        /// The transform.
        transform: &'static str,
    },
    // Issue 3, arithmetic / clamp / fill family.
    /// Arithmetic operands of different dtypes without a `dtype:` for the result.
    #[error("{op} needs operands of one dtype: `{a}` is {a_dtype} but `{b}` is {b_dtype}; give `dtype:` for the result, or cast first")]
    OperandDTypes {
        /// The operation.
        op: &'static str,
        /// The left operand (the destination for `add_`/`subtract_`).
        a: String,
        /// Its dtype.
        a_dtype: DType,
        /// The right operand.
        b: String,
        /// Its dtype.
        b_dtype: DType,
    },
    /// A rewritten operand (`from_b`) names no tensor.
    #[error("{op}: operand `{operand}` (rewritten from `{source_name}`) does not exist")]
    OperandMissing {
        /// The operation.
        op: &'static str,
        /// The missing operand.
        operand: String,
        /// The match it was rewritten from.
        source_name: String,
    },
    // Shape family (reshape, permute, split, concat, matmul).
    /// `reshape` to a shape with another element count.
    #[error(
        "cannot reshape `{tensor}` of shape {} ({} elements) to {requested}",
        fmt_shape(shape),
        shape.iter().product::<usize>()
    )]
    ElementCount {
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The requested shape as written, with its element count.
        requested: String,
    },
    /// `permute` with an order that is not a permutation of the tensor's dimensions.
    #[error(
        "order {order:?} is not a permutation of the {} dimensions of `{tensor}` {}",
        shape.len(),
        fmt_shape(shape)
    )]
    NotPermutation {
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The order as written.
        order: Vec<i64>,
    },
    /// `split` sizes that do not add up to the split dimension.
    #[error(
        "split sizes {sizes:?} add up to {} but dimension {dim} of `{tensor}` {} is {}",
        sizes.iter().sum::<usize>(),
        fmt_shape(shape),
        shape.get(*dim).copied().unwrap_or_default()
    )]
    SplitSizes {
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The split dimension (non-negative).
        dim: usize,
        /// The sizes.
        sizes: Vec<usize>,
    },
    /// A run (nested plans and a session's blocks included) executes more transforms than
    /// the engine can stack on one tensor.
    #[error("more than {limit} transforms in one run (nested plans and earlier session entries included): a tensor changed that many times could not be read back; split the work into runs that save in between")]
    TooManySteps {
        /// The limit.
        limit: usize,
    },
    /// A dimension index outside a tensor's dimensions.
    #[error("{op}: dimension {dim} is out of range for `{tensor}` {}", fmt_shape(shape))]
    DimOutOfRange {
        /// The operation.
        op: &'static str,
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The dimension as written.
        dim: i64,
    },
    /// `concat` parts whose shapes differ elsewhere than on the joined dimension.
    #[error(
        "concat along dimension {dim}: `{first}` is {} but `{other}` is {}; shapes must agree except on dimension {dim}",
        fmt_shape(first_shape),
        fmt_shape(other_shape)
    )]
    ConcatShapes {
        /// The joined dimension.
        dim: i64,
        /// The first part.
        first: String,
        /// Its shape.
        first_shape: Vec<usize>,
        /// The disagreeing part.
        other: String,
        /// Its shape.
        other_shape: Vec<usize>,
    },
    /// References that must pair up match different numbers of tensors.
    #[error(
        "{op}: `{first}` matches {} but `{other}` matches {}; matches pair up in order",
        super::count_noun(*first_count),
        super::count_noun(*other_count)
    )]
    MatchCounts {
        /// The operation.
        op: &'static str,
        /// The first reference.
        first: String,
        /// Its number of matches.
        first_count: usize,
        /// The disagreeing reference.
        other: String,
        /// Its number of matches.
        other_count: usize,
    },
    /// `matmul` operands whose shapes do not multiply.
    #[error(
        "matmul: `{a}` {} cannot multiply `{b}` {}: {reason}",
        fmt_shape(a_shape),
        fmt_shape(b_shape)
    )]
    MatmulShapes {
        /// The left operand.
        a: String,
        /// Its shape.
        a_shape: Vec<usize>,
        /// The right operand.
        b: String,
        /// Its shape.
        b_shape: Vec<usize>,
        /// What disagrees.
        reason: String,
    },
    /// A second operand rewritten from a match does not exist.
    #[error("`{operand}` (rewritten from `{source_name}`) does not exist")]
    MissingOperand {
        /// The operand's name.
        operand: String,
        /// The match it was rewritten from.
        source_name: String,
    },
    /// Fill values do not fit the tensor filled (not representable, or not broadcastable).
    #[error("cannot fill `{tensor}` ({dtype}): {reason}")]
    FillValue {
        /// The tensor filled.
        tensor: String,
        /// Its dtype.
        dtype: DType,
        /// Why.
        reason: String,
    },
    // load / save / execute (issue 3, planops).
    /// A step of a nested plan (`execute`) failed; the location names it in the including plan.
    #[error("at {location} ({name})")]
    Nested {
        /// Where the failing step is (`transforms[3].execute.transforms[1]`).
        location: crate::plan::Location,
        /// The failing step's transform name.
        name: String,
        /// What went wrong there.
        source: Box<TransformError>,
    },
    /// `load` of one tensor found a file with several tensors, none named like the destination.
    #[error(
        "`{}` holds {count} tensors and none is named `{name}`; name one of them in `to` ({}), or load the whole file with `alias`",
        path.display(),
        names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
    )]
    LoadWhichTensor {
        /// The file.
        path: std::path::PathBuf,
        /// The destination name looked for.
        name: String,
        /// How many tensors the file holds.
        count: usize,
        /// The closest names in the file.
        names: Vec<String>,
    },
    /// `save` of one tensor selected several.
    #[error(
        "`{reference}` matches {count} tensors ({}); save `target` must match exactly one, or save the whole alias with `alias`",
        names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
    )]
    SaveNotOne {
        /// The reference as written.
        reference: String,
        /// How many tensors it matched.
        count: usize,
        /// The first few of them.
        names: Vec<String>,
    },
    // Low-rank factorization (issue 10).
    /// A factorization selected a tensor that is not a matrix.
    #[error("{op} factors 2-D tensors but `{tensor}` is {}", fmt_shape(shape))]
    NotMatrix {
        /// The operation.
        op: &'static str,
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A rank outside 1..=min(m, n).
    #[error("{op}: rank {rank} does not fit `{tensor}` {}: it must be between 1 and {}", fmt_shape(shape), shape.iter().min().copied().unwrap_or(0))]
    RankOutOfRange {
        /// The operation.
        op: &'static str,
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The rank asked for.
        rank: usize,
    },
    /// The SVD of a tensor failed (non-finite values, no convergence, no memory).
    #[error("cannot factorize `{tensor}`")]
    Factorization {
        /// The tensor.
        tensor: String,
        /// Why.
        source: crate::linalg::LinalgError,
    },
    /// A LoRA adapter cannot be applied or written.
    #[error("{op}: {reason}")]
    Adapter {
        /// The operation (`merge_lora`, `extract_lora`).
        op: &'static str,
        /// What is wrong, naming the tensor or module.
        reason: String,
    },
}

/// Formats a shape as NumPy prints it: `(2, 3)`, `(4,)`, `()`.
pub fn fmt_shape(shape: &[usize]) -> String {
    match shape {
        [single] => format!("({single},)"),
        _ => format!(
            "({})",
            shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// A false assertion: which one, on which tensor, and what was measured.
#[derive(Debug, Clone, PartialEq)]
pub struct AssertionFailure {
    /// The assertion as written (`equal`, `count`, ...).
    pub assertion: String,
    /// The tensor it failed on, when one.
    pub tensor: Option<String>,
    /// What was measured against what was required.
    pub message: String,
}

impl fmt::Display for AssertionFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "assertion `{}` failed", self.assertion)?;
        if let Some(tensor) = &self.tensor {
            write!(f, " on `{tensor}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for AssertionFailure {}

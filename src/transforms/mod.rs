//! Transforms: one file per family, one registry. Each family declares its YAML name, its key
//! table (which validates payloads and feeds `help`) and a parser producing a [`Transform`]; the
//! single [`parse`] function dispatches on the name and rejects unknown ones.

pub mod assert;
pub mod assign;
pub mod cast;
pub mod control;
pub mod copy;
pub mod error;
pub mod scale;
// Issue 3: arithmetic, clamp and fill families.
pub mod arith;
pub mod clamp;
pub mod fill;
// Inspection: dump, diff, help (issue 3).
pub mod diff;
pub mod dump;
pub mod help;
// load / save, prefixes, execute (issue 3, planops).
pub mod execute;
pub mod load;
pub mod prefixes;
// Shape family (issue 3).
pub mod concat;
pub mod matmul;
pub mod permute;
pub mod reshape;
pub mod split;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use error::{fmt_shape, AssertionFailure, TransformError};

use crate::formats::FormatError;
use crate::plan::error::suggest;
use crate::plan::payload::Field;
use crate::plan::{Location, PlanError, RawTransform};
use crate::references::{ResolvedSlice, Target};
use crate::state::{Match, SelectError, State};
use crate::value::{ReadContext, Tensor, ValueError};

/// Whether execution goes on after a transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Run the next transform.
    Continue,
    /// Stop executing transforms (`exit`); the output is still written.
    Exit,
}

/// What a transform may use while it runs.
#[derive(Debug)]
pub struct Context {
    /// Whether value assertions read tensor data (a run) or are deferred (the header-only plan
    /// check of SPEC §8.1).
    pub evaluate: bool,
    /// Buffers for reading values, and the interruption flag reads check between chunks.
    pub reads: ReadContext,
    /// One line per transform describing what it did, for `check` and `--summarize`.
    pub notes: Vec<String>,
    /// Set by Ctrl-C; long evaluations stop at the next chunk.
    pub cancel: Arc<AtomicBool>,
    /// Text transforms print (`dump`, `diff`, `help`), in order; the command line prints it and
    /// Python returns it in the report.
    pub output: Vec<String>,
    /// Worker threads for writes transforms make (`save`); 0 means one per core.
    pub threads: usize,
    /// The plan's hash, recorded in files `save` writes, when the plan is known.
    pub plan_sha256: Option<String>,
    /// Files transforms wrote (`save`, nested plans' outputs), in order.
    pub written: Vec<PathBuf>,
    /// Notices about how inputs were read (a directory with weights of two formats, training
    /// state left out); the command line prints them on stderr, Python returns them in
    /// `report["notices"]`.
    pub notices: Vec<String>,
}

impl Context {
    /// A context for a run (`evaluate`) or a check.
    pub fn new(evaluate: bool, cancel: Arc<AtomicBool>) -> Self {
        Context {
            evaluate,
            reads: ReadContext::cancellable(cancel.clone()),
            notes: Vec::new(),
            cancel,
            output: Vec::new(),
            threads: 0,
            plan_sha256: None,
            written: Vec::new(),
            notices: Vec::new(),
        }
    }

    /// Records what a transform did.
    pub fn note(&mut self, line: String) {
        self.notes.push(line);
    }

    /// Records the notices of a checkpoint just opened.
    pub fn notices_of(&mut self, checkpoint: &crate::formats::Checkpoint) {
        self.notices.extend(checkpoint.notices.iter().cloned());
    }

    /// Prints text for the user (a `dump` table, a `diff` report).
    pub fn emit(&mut self, text: String) {
        self.output.push(text);
    }

    /// Whether the run was interrupted.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// Why one step of a plan failed; the executor adds the step's index and name.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The plan is invalid at this step (e.g. an unknown alias).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The transform cannot apply.
    #[error(transparent)]
    Transform(#[from] TransformError),
    /// An assertion is false.
    #[error(transparent)]
    Assertion(#[from] AssertionFailure),
    /// Reading tensor data failed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Interrupted.
    #[error("interrupted")]
    Cancelled,
}

impl From<crate::write::WriteError> for StepError {
    fn from(e: crate::write::WriteError) -> Self {
        match e {
            crate::write::WriteError::Plan(e) => StepError::Plan(e),
            crate::write::WriteError::Format(e) => StepError::Format(e),
            crate::write::WriteError::Cancelled => StepError::Cancelled,
            crate::write::WriteError::Value(e) => StepError::Transform(TransformError::Value(e)),
        }
    }
}

impl From<ValueError> for StepError {
    fn from(e: ValueError) -> Self {
        match e {
            ValueError::Read(e) => StepError::Format(e),
            ValueError::Cancelled => StepError::Cancelled,
            other => StepError::Transform(TransformError::Value(other)),
        }
    }
}

impl TransformError {
    /// The error for a value of `tensor` that cannot be built or computed; reading failures and
    /// interruptions keep their own kinds.
    pub fn value_of(tensor: &str, e: ValueError) -> StepError {
        match e {
            ValueError::NoByteSize { .. } | ValueError::Compute { .. } => {
                StepError::Transform(TransformError::ValueOf {
                    tensor: tensor.to_owned(),
                    source: e,
                })
            }
            other => other.into(),
        }
    }
}

impl From<crate::state::OpenError> for StepError {
    fn from(e: crate::state::OpenError) -> Self {
        match e {
            crate::state::OpenError::Plan(e) => StepError::Plan(e),
            crate::state::OpenError::Format(e) => StepError::Format(e),
        }
    }
}

impl From<SelectError> for StepError {
    fn from(e: SelectError) -> Self {
        match e {
            SelectError::Plan(e) => StepError::Plan(e),
            other => StepError::Transform(TransformError::Select(other)),
        }
    }
}

/// A view of `slice` of `tensor` (named `display` in messages), or the transform error for a
/// tensor that cannot be sliced.
pub(crate) fn view_of(tensor: &Tensor, slice: &ResolvedSlice, display: &str) -> Result<Tensor, TransformError> {
    tensor.view(slice).map_err(|e| match e {
        ValueError::NoByteSize { op, dtype } => TransformError::Unsupported {
            op,
            tensor: display.to_owned(),
            dtype,
        },
        source => TransformError::ValueOf {
            tensor: display.to_owned(),
            source,
        },
    })
}

/// One parsed step of a plan.
pub trait Transform: Send + Sync + std::fmt::Debug {
    /// Applies the step to the state. Every match is checked before any change is made.
    fn apply(&self, state: &mut State, ctx: &mut Context) -> Result<Flow, StepError>;
}

/// One parsed step of a plan: the transform and where it was written.
#[derive(Debug)]
pub struct Step {
    /// The transform's name (`scale_`).
    pub name: String,
    /// Where it is in the plan (`transforms[3]`, `transforms[2].execute.transforms[0]`).
    pub location: Location,
    /// What it does.
    pub transform: Box<dyn Transform>,
}

impl Step {
    /// Parses one raw transform into a step.
    pub fn parse(raw: &RawTransform) -> Result<Step, PlanError> {
        Ok(Step {
            name: raw.name.clone(),
            location: raw.location.clone(),
            transform: parse(raw)?,
        })
    }
}

/// The step of a [`run_steps`] call that failed: its position in the slice and why.
#[derive(Debug)]
pub struct StepFailure {
    /// Index of the failing step in the slice given to [`run_steps`].
    pub index: usize,
    /// Why it failed.
    pub error: StepError,
}

/// The one step loop, behind the plan run, the `-i` session and nested `execute`: applies
/// `steps` in order, stopping at the first failure or `exit`, and before each step when the run
/// was interrupted.
pub fn run_steps(steps: &[Step], state: &mut State, ctx: &mut Context) -> Result<Flow, StepFailure> {
    for (index, step) in steps.iter().enumerate() {
        let result = if ctx.cancelled() {
            Err(StepError::Cancelled)
        } else {
            step.transform.apply(state, ctx)
        };
        match result {
            Ok(Flow::Continue) => {}
            Ok(Flow::Exit) => return Ok(Flow::Exit),
            Err(error) => return Err(StepFailure { index, error }),
        }
    }
    Ok(Flow::Continue)
}

/// Builds a transform from its payload and location.
pub type ParseFn = fn(&serde_json::Value, &Location) -> Result<Box<dyn Transform>, PlanError>;

/// A transform family member: its name, help and key table, and its parser.
#[derive(Debug)]
pub struct TransformSpec {
    /// The YAML key (`scale_`).
    pub name: &'static str,
    /// One line of help.
    pub summary: &'static str,
    /// The keys it takes (empty for `exit`; `assert` takes an expression instead).
    pub fields: &'static [Field],
    /// Builds the transform from its payload.
    pub parse: ParseFn,
}

/// Every transform the engine knows.
pub const REGISTRY: &[&TransformSpec] = &[
    &copy::COPY,
    &copy::MOVE,
    &copy::DELETE,
    &assign::ASSIGN,
    &cast::CAST,
    &cast::CAST_,
    &scale::SCALE,
    &scale::SCALE_,
    &assert::ASSERT,
    &control::EXIT,
    // Issue 3: arithmetic, clamp and fill families.
    &clamp::CLAMP,
    &clamp::CLAMP_,
    &arith::ADD,
    &arith::SUBTRACT,
    &arith::MULTIPLY,
    &arith::ADD_,
    &arith::SUBTRACT_,
    &fill::FILL,
    &fill::FILL_,
    &fill::ZEROES,
    &fill::ONES,
    &fill::RAND,
    // Inspection: dump, diff, help (issue 3).
    &dump::DUMP,
    &diff::DIFF,
    &help::HELP,
    // load / save, prefixes, execute (issue 3, planops).
    &load::LOAD,
    &load::SAVE,
    &prefixes::PREFIXES,
    &execute::EXECUTE,
    // Shape family: reshape, permute, split, concat, matmul.
    &reshape::RESHAPE,
    &reshape::RESHAPE_,
    &permute::PERMUTE,
    &split::SPLIT,
    &concat::CONCAT,
    &matmul::MATMUL,
];

/// Looks a transform up by name.
pub fn spec(name: &str) -> Option<&'static TransformSpec> {
    REGISTRY.iter().copied().find(|s| s.name == name)
}

/// Parses one raw transform.
pub fn parse(raw: &RawTransform) -> Result<Box<dyn Transform>, PlanError> {
    let Some(spec) = spec(&raw.name) else {
        return Err(PlanError::UnknownTransform {
            location: raw.location.clone(),
            name: raw.name.clone(),
            suggestion: suggest(&raw.name, REGISTRY.iter().map(|s| s.name)),
        });
    };
    (spec.parse)(&raw.payload, &raw.location.key(&raw.name))
}

/// Where each match of a creating transform (`copy`, `cast`, `scale`) goes: the destination
/// alias and name, checked for collisions and for destinations that already exist.
pub(crate) fn new_destinations(
    state: &State,
    matches: &[Match],
    to: &Target,
    transform: &'static str,
    location: &Location,
) -> Result<Vec<(String, String)>, StepError> {
    if to.slice.is_some() {
        return Err(TransformError::SliceNotAllowed {
            reference: to.text.clone(),
            transform,
        }
        .into());
    }
    if let Some(alias) = &to.alias {
        // A new alias may be created by writing to it; only check the name is sensible.
        if alias.is_empty() {
            return Err(PlanError::invalid(location, "empty alias").into());
        }
    }
    let mut seen: std::collections::HashMap<(String, String), String> = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(matches.len());
    for m in matches {
        let name = to.expand(&m.captures).map_err(|source| TransformError::Template {
            tensor: m.display(),
            source,
        })?;
        let alias = to.alias.clone().unwrap_or_else(|| m.alias.clone());
        if let Some(first) = seen.insert((alias.clone(), name.clone()), m.display()) {
            return Err(TransformError::Collision {
                destination: format!("{alias}::{name}"),
                first,
                second: m.display(),
            }
            .into());
        }
        if state.get(&alias, &name).is_some() {
            return Err(TransformError::DestinationExists {
                destination: format!("{alias}::{name}"),
                source_name: m.display(),
            }
            .into());
        }
        out.push((alias, name));
    }
    Ok(out)
}

/// Refuses computing on carry-only dtypes and, for floating operations, on non-float tensors.
pub(crate) fn require_float(m: &Match, op: &'static str) -> Result<(), TransformError> {
    if !m.tensor.dtype.is_computable() {
        return Err(TransformError::Unsupported {
            op,
            tensor: m.display(),
            dtype: m.tensor.dtype,
        });
    }
    if !m.tensor.dtype.is_float() {
        return Err(TransformError::NotFloat {
            op,
            tensor: m.display(),
            dtype: m.tensor.dtype,
        });
    }
    Ok(())
}

/// "3 tensors" / "1 tensor".
pub(crate) fn count_noun(n: usize) -> String {
    if n == 1 {
        "1 tensor".to_owned()
    } else {
        format!("{n} tensors")
    }
}

/// Fixtures shared by the transform families' unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::dtype::DType;
    use crate::references::Reference;
    use crate::value::Tensor;

    /// A U16 tensor of `shape` holding `offset, offset + 1, ...` in row-major order.
    pub(crate) fn counting(shape: &[usize], offset: u16) -> Tensor {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n as u16).flat_map(|v| (v + offset).to_le_bytes()).collect();
        Tensor::in_memory(DType::U16, shape.to_vec(), Arc::new(bytes))
    }

    /// `t` matched as `m::name` without a slice.
    pub(crate) fn matched(name: &str, t: Tensor) -> Match {
        Match {
            alias: "m".into(),
            name: name.into(),
            tensor: t.clone(),
            base: t,
            slice: None,
            captures: Reference::parse_str(name).unwrap().selector.captures(name).unwrap(),
        }
    }
}

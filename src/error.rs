//! The engine's top-level error: one of the layer errors, with the transform it happened in.
//! The CLI picks the exit status from it and the bindings the Python exception class.

use crate::formats::FormatError;
use crate::plan::PlanError;
use crate::transforms::{AssertionFailure, TransformError};

/// Everything a plan run can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The plan document is invalid (exit status 2, `PlanError`).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// An input or output file is unreadable, malformed or unwritable (exit status 2,
    /// `FormatError`).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Reading tensor data failed while a transform evaluated values (exit status 2,
    /// `FormatError`).
    #[error("transforms[{index}] ({name})")]
    FormatAt {
        /// Index of the transform in the plan.
        index: usize,
        /// Its name.
        name: String,
        /// What went wrong.
        source: FormatError,
    },
    /// A transform cannot apply to the tensors it selects (exit status 1, `TransformError`).
    #[error("transforms[{index}] ({name})")]
    Transform {
        /// Index of the transform in the plan.
        index: usize,
        /// Its name.
        name: String,
        /// What went wrong.
        source: TransformError,
    },
    /// An assertion was false (exit status 1, `AssertionFailed`).
    #[error("transforms[{index}] (assert): {failure}")]
    Assertion {
        /// Index of the assertion in the plan.
        index: usize,
        /// What was false, with the measured value.
        failure: AssertionFailure,
    },
    /// A tensor's value could not be computed while the output was written (exit status 1,
    /// `TransformError`).
    #[error(transparent)]
    Value(crate::value::ValueError),
    /// The plan's work does not fit the memory budget, found by the check before any work
    /// (exit status 2, `PlanError`). An arena that cannot be made or filled during the run is a
    /// [`crate::value::ValueError`] of the tensor computed (exit status 1, `TransformError`).
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The run was interrupted (Ctrl-C); nothing was written.
    #[error("interrupted; nothing was written")]
    Cancelled,
}

impl From<crate::write::WriteError> for Error {
    fn from(e: crate::write::WriteError) -> Self {
        match e {
            crate::write::WriteError::Plan(e) => Error::Plan(e),
            crate::write::WriteError::Format(e) => Error::Format(e),
            crate::write::WriteError::Cancelled => Error::Cancelled,
            crate::write::WriteError::Value(e) => Error::Value(e),
        }
    }
}

impl From<crate::state::OpenError> for Error {
    fn from(e: crate::state::OpenError) -> Self {
        match e {
            crate::state::OpenError::Plan(e) => Error::Plan(e),
            crate::state::OpenError::Format(e) => Error::Format(e),
        }
    }
}

impl Error {
    /// The command-line exit status (SPEC §10): 2 for an invalid plan or input, 1 for a failed
    /// transform or assertion, 130 for an interruption.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Plan(_) | Error::Format(_) | Error::FormatAt { .. } | Error::Memory(_) => 2,
            Error::Transform { .. } | Error::Assertion { .. } | Error::Value(_) => 1,
            Error::Cancelled => 130,
        }
    }
}

/// Formats an error with its causes, one paragraph: each layer's message says only its own part
/// and names its cause through `source()`, so the parts join without repeats.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Why a thread the engine runs on gave no result: the OS would not start it (`EAGAIN` when the
/// process is out of threads), or the engine panicked, which is a bug and never the input's
/// fault. The bindings raise it as `BrainSurgeryError` rather than Python's `RuntimeError`.
#[derive(Debug)]
pub enum ThreadFailure {
    /// The thread could not be started.
    Start(std::io::Error),
    /// The thread panicked; the payload `panic!` left.
    Panic(Box<dyn std::any::Any + Send>),
}

impl std::fmt::Display for ThreadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ThreadFailure::Start(e) => write!(f, "the engine thread could not start: {e}"),
            ThreadFailure::Panic(payload) => {
                // `panic!("literal")` leaves a `&str`, `panic!("{x}")` a `String`.
                let message = payload
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("the engine panicked");
                write!(f, "internal error (a bug in brainsurgery, please report it): {message}")
            }
        }
    }
}

/// The parts of a failure a program can act on, taken from the error and its causes: Python
/// exceptions carry them as attributes (`transform_index`, `transform`, `reference`, `tensor`,
/// `path`, `location`). The outermost error that knows a part wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorContext {
    /// Index of the failing step in the plan's `transforms` list.
    pub transform_index: Option<usize>,
    /// The failing step's transform name.
    pub transform: Option<String>,
    /// The tensor reference as written, when the failure is about one.
    pub reference: Option<String>,
    /// The tensor (`alias::name`, or the name in a file) the failure is about.
    pub tensor: Option<String>,
    /// The file the failure is about.
    pub path: Option<std::path::PathBuf>,
    /// Where in the plan document (`transforms[3].scale_.by`).
    pub location: Option<String>,
}

impl ErrorContext {
    /// Collects the context of `error` and of every cause it chains.
    pub fn of(error: &Error) -> Self {
        let mut cx = ErrorContext::default();
        match error {
            Error::FormatAt { index, name, .. } | Error::Transform { index, name, .. } => {
                cx.step(*index, name);
            }
            Error::Assertion { index, failure } => {
                cx.step(*index, "assert");
                cx.visit(failure);
            }
            Error::Plan(e) => cx.visit(e),
            Error::Format(e) => cx.visit(e),
            Error::Value(e) => cx.visit(e),
            Error::Memory(crate::memory::MemoryError::OverBudget {
                tensor: Some(tensor), ..
            }) => cx.tensor(tensor),
            Error::Memory(_) | Error::Cancelled => {}
        }
        let mut cause = std::error::Error::source(error);
        while let Some(e) = cause {
            cx.visit(e);
            cause = e.source();
        }
        cx
    }

    fn step(&mut self, index: usize, name: &str) {
        self.transform_index.get_or_insert(index);
        self.transform.get_or_insert_with(|| name.to_owned());
    }

    fn tensor(&mut self, tensor: &str) {
        self.tensor.get_or_insert_with(|| tensor.to_owned());
    }

    fn reference(&mut self, reference: &str) {
        self.reference.get_or_insert_with(|| reference.to_owned());
    }

    fn path(&mut self, path: &std::path::Path) {
        self.path.get_or_insert_with(|| path.to_path_buf());
    }

    fn location(&mut self, location: &crate::plan::Location) {
        // A misspelled transform (`scael_:`) has an index but no known name.
        if let Some(index) = location.transform_index() {
            self.transform_index.get_or_insert(index);
        }
        if let Some(name) = location.transform_name() {
            self.transform.get_or_insert_with(|| name.to_owned());
        }
        self.location.get_or_insert_with(|| location.to_string());
    }

    /// Takes what one error of a known layer says about itself. Transparent variants forward
    /// `source()` past the inner error, so the inner one is visited here explicitly.
    fn visit(&mut self, error: &(dyn std::error::Error + 'static)) {
        use crate::state::SelectError;
        if let Some(e) = error.downcast_ref::<PlanError>() {
            match e {
                PlanError::Read { path, .. } | PlanError::NotAFile { path, .. } | PlanError::TooLarge { path, .. } => {
                    self.path(path)
                }
                PlanError::NoDefaultAlias {
                    location, reference, ..
                } => {
                    self.location(location);
                    self.reference(reference);
                }
                PlanError::UnknownKey { location, .. }
                | PlanError::UnknownTransform { location, .. }
                | PlanError::MissingKey { location, .. }
                | PlanError::Invalid { location, .. }
                | PlanError::Reference { location, .. }
                | PlanError::UnknownAlias { location, .. } => self.location(location),
                PlanError::Syntax { .. } | PlanError::NotAPlan { .. } => {}
            }
        } else if let Some(e) = error.downcast_ref::<FormatError>() {
            match e {
                FormatError::Io { path, .. }
                | FormatError::Header { path, .. }
                | FormatError::Numpy { path, .. }
                | FormatError::Pickle { path, .. }
                | FormatError::Torch { path, .. }
                | FormatError::TorchArchive { path, .. }
                | FormatError::Dcp { path, .. }
                | FormatError::Unsupported { path, .. }
                | FormatError::NoWeights { path }
                | FormatError::BadIndex { path, .. }
                | FormatError::InvalidOutput { path, .. }
                | FormatError::Adapter { path, .. }
                | FormatError::Sidecar { path, .. }
                | FormatError::NoSpace { path, .. } => self.path(path),
                FormatError::IndexFileMissing { index, .. } => self.path(index),
                FormatError::IndexTensorMissing { index, tensor, .. } => {
                    self.path(index);
                    self.tensor(tensor);
                }
                FormatError::DuplicateTensor { name, first, .. } => {
                    self.path(first);
                    self.tensor(name);
                }
                FormatError::NpzDtype { name, .. }
                | FormatError::TorchDtype { name, .. }
                | FormatError::DuplicateOutputTensor { name }
                | FormatError::ReservedTensorName { name }
                | FormatError::InvalidTensorSize { name, .. } => self.tensor(name),
                FormatError::NpyCount { .. } | FormatError::InvalidSize { .. } => {}
            }
        } else if let Some(e) = error.downcast_ref::<TransformError>() {
            self.visit_transform(e);
        } else if let Some(e) = error.downcast_ref::<SelectError>() {
            match e {
                SelectError::Plan(e) => self.visit(e),
                SelectError::Match(_) => {}
                SelectError::Slice { tensor, .. } | SelectError::View { tensor, .. } => self.tensor(tensor),
                SelectError::ZeroMatches { reference, .. } => self.reference(reference),
            }
        } else if let Some(e) = error.downcast_ref::<crate::value::ValueError>() {
            if let crate::value::ValueError::Read(e) = e {
                self.visit(e);
            }
        } else if let Some(failure) = error.downcast_ref::<AssertionFailure>() {
            if let Some(tensor) = &failure.tensor {
                self.tensor(tensor);
            }
        }
    }

    fn visit_transform(&mut self, error: &TransformError) {
        use TransformError as T;
        match error {
            T::TooManySteps { .. } => {}
            T::Select(e) => self.visit(e),
            T::Value(e) => self.visit(e),
            // The boxed source is not reached by downcasting the `source()` chain, so it is
            // visited here: a nested step's tensor or reference is as useful as a top-level one's.
            T::Nested { location, source, .. } => {
                self.location(location);
                self.visit_transform(source);
            }
            T::ValueOf { tensor, .. }
            | T::NotFloat { tensor, .. }
            | T::Unsupported { tensor, .. }
            | T::Slice { tensor, .. }
            | T::Template { tensor, .. }
            | T::FillValue { tensor, .. }
            | T::ElementCount { tensor, .. }
            | T::NotPermutation { tensor, .. }
            | T::SplitSizes { tensor, .. }
            | T::DimOutOfRange { tensor, .. }
            | T::NotMatrix { tensor, .. }
            | T::RankOutOfRange { tensor, .. }
            | T::Factorization { tensor, .. } => self.tensor(tensor),
            T::DestinationExists { destination, .. } | T::DestinationMissing { destination, .. } => {
                self.tensor(destination)
            }
            T::SliceNotAllowed { reference, .. } | T::SaveNotOne { reference, .. } => self.reference(reference),
            T::Collision { destination, .. }
            | T::ShapeMismatch { destination, .. }
            | T::DTypeMismatch { destination, .. } => self.tensor(destination),
            T::OperandMissing { source_name, .. } | T::MissingOperand { source_name, .. } => self.tensor(source_name),
            T::LoadWhichTensor { path, .. } => self.path(path),
            T::OperandDTypes { .. }
            | T::ConcatShapes { .. }
            | T::MatchCounts { .. }
            | T::MatmulShapes { .. }
            | T::Adapter { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::references::ReferenceError;

    fn slice_failure() -> Error {
        Error::Transform {
            index: 2,
            name: "scale_".into(),
            source: TransformError::Slice {
                tensor: "model::w".into(),
                source: ReferenceError::ZeroStep { dim: 1 },
            },
        }
    }

    #[test]
    fn the_chain_says_each_part_once() {
        assert_eq!(
            error_chain(&slice_failure()),
            "transforms[2] (scale_): slice on `model::w`: slice step is zero in dim 1"
        );
    }

    #[test]
    fn thread_failures_say_what_happened() {
        let start = ThreadFailure::Start(std::io::Error::from_raw_os_error(libc::EAGAIN));
        let text = start.to_string();
        assert!(text.starts_with("the engine thread could not start: "), "{text}");
        assert!(text.contains(&format!("os error {}", libc::EAGAIN)), "{text}");
        let bug = "internal error (a bug in brainsurgery, please report it): ";
        // The payloads of real panics, with and without formatting, and of `panic_any`.
        let payload = |f: fn()| std::thread::spawn(f).join().unwrap_err();
        let literal = ThreadFailure::Panic(payload(|| panic!("literal")));
        assert_eq!(literal.to_string(), format!("{bug}literal"));
        let formatted = ThreadFailure::Panic(payload(|| panic!("index {} out of range", 7)));
        assert_eq!(formatted.to_string(), format!("{bug}index 7 out of range"));
        let other = ThreadFailure::Panic(payload(|| std::panic::panic_any(42u8)));
        assert_eq!(other.to_string(), format!("{bug}the engine panicked"));
    }

    #[test]
    fn context_takes_the_step_and_the_tensor() {
        let cx = ErrorContext::of(&slice_failure());
        assert_eq!(cx.transform_index, Some(2));
        assert_eq!(cx.transform.as_deref(), Some("scale_"));
        assert_eq!(cx.tensor.as_deref(), Some("model::w"));
        assert_eq!((cx.reference, cx.path, cx.location), (None, None, None));
    }
}

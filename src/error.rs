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
    #[error("transforms[{index}] ({name}): {source}")]
    FormatAt {
        /// Index of the transform in the plan.
        index: usize,
        /// Its name.
        name: String,
        /// What went wrong.
        source: FormatError,
    },
    /// A transform cannot apply to the tensors it selects (exit status 1, `TransformError`).
    #[error("transforms[{index}] ({name}): {source}")]
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
            Error::Plan(_) | Error::Format(_) | Error::FormatAt { .. } => 2,
            Error::Transform { .. } | Error::Assertion { .. } | Error::Value(_) => 1,
            Error::Cancelled => 130,
        }
    }
}

/// Formats an error with its causes, one paragraph.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

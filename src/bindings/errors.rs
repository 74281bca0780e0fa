//! The Python exception hierarchy of SPEC §11, declared once, and the one conversion from engine
//! errors to Python exceptions.

use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyPermissionError};
use pyo3::prelude::*;

use crate::error::error_chain;
use crate::error::{Error, ErrorContext, ThreadFailure};
use crate::formats::FormatError;
use crate::plan::PlanError;

/// The Python classes, in their own module so their names can match the engine's error types.
mod classes {
    use pyo3::create_exception;
    use pyo3::exceptions::PyException;

    create_exception!(
        brainsurgery,
        BrainSurgeryError,
        PyException,
        "Base class of every brainsurgery error."
    );
    create_exception!(
        brainsurgery,
        PlanError,
        BrainSurgeryError,
        "The plan document is malformed or invalid."
    );
    create_exception!(
        brainsurgery,
        TransformError,
        BrainSurgeryError,
        "A transform cannot apply to the tensors it selects."
    );
    create_exception!(
        brainsurgery,
        AssertionFailed,
        BrainSurgeryError,
        "An assertion of the plan was false."
    );
    create_exception!(
        brainsurgery,
        FormatError,
        BrainSurgeryError,
        "A checkpoint is unreadable, malformed or unwritable."
    );
}

use classes::{
    AssertionFailed, BrainSurgeryError, FormatError as FormatError_, PlanError as PlanError_, TransformError,
};

/// Attaches the underlying I/O error as `__cause__`, typed by kind, so callers can inspect it.
fn with_io_cause(py: Python<'_>, err: PyErr, format: &FormatError) -> PyErr {
    // The first I/O error in the chain, with the path of the file it concerns: archive and
    // `.npy` readers leave the path to the format error wrapping theirs.
    let mut io = None;
    let mut path = None;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(format);
    while let Some(e) = cause {
        match e.downcast_ref::<FormatError>() {
            Some(FormatError::Io { source, path }) => {
                io = Some((source, path));
                break;
            }
            Some(FormatError::Numpy { path: p, .. } | FormatError::TorchArchive { path: p, .. }) => path = Some(p),
            _ => {}
        }
        if let (Some(source), Some(path)) = (e.downcast_ref::<std::io::Error>(), path) {
            io = Some((source, path));
            break;
        }
        cause = e.source();
    }
    if let Some((source, path)) = io {
        let cause = match source.kind() {
            std::io::ErrorKind::NotFound => Some(PyFileNotFoundError::new_err((
                2,
                source.to_string(),
                path.display().to_string(),
            ))),
            std::io::ErrorKind::PermissionDenied => Some(PyPermissionError::new_err((
                13,
                source.to_string(),
                path.display().to_string(),
            ))),
            _ => None,
        };
        if let Some(cause) = cause {
            err.set_cause(py, Some(cause));
        }
    }
    err
}

/// The structured attributes every brainsurgery exception has (None when unknown).
const ATTRIBUTES: [&str; 6] = [
    "transform_index",
    "transform",
    "reference",
    "tensor",
    "path",
    "location",
];

/// Sets the structured attributes on the raised exception, so callers need not parse messages.
fn with_context(py: Python<'_>, err: PyErr, cx: &ErrorContext) -> PyErr {
    let value = err.value(py);
    let path = cx.path.as_ref().map(|p| p.display().to_string());
    let set = || -> PyResult<()> {
        value.setattr("transform_index", cx.transform_index)?;
        value.setattr("transform", cx.transform.as_deref())?;
        value.setattr("reference", cx.reference.as_deref())?;
        value.setattr("tensor", cx.tensor.as_deref())?;
        value.setattr("path", path.as_deref())?;
        value.setattr("location", cx.location.as_deref())?;
        Ok(())
    };
    // Setting attributes on a fresh exception instance cannot fail short of memory exhaustion;
    // the exception is still raised, with the class defaults, if it does.
    let _ = set();
    err
}

/// Converts an engine error to the matching Python exception.
pub fn to_py(py: Python<'_>, error: Error) -> PyErr {
    let context = ErrorContext::of(&error);
    with_context(py, to_py_class(py, &error), &context)
}

fn to_py_class(py: Python<'_>, error: &Error) -> PyErr {
    let message = error_chain(error);
    match error {
        Error::Plan(_) | Error::Memory(_) => PlanError_::new_err(message),
        Error::Format(format) | Error::FormatAt { source: format, .. } => {
            with_io_cause(py, FormatError_::new_err(message), format)
        }
        Error::Transform { .. } | Error::Value(_) => TransformError::new_err(message),
        Error::Assertion { .. } => AssertionFailed::new_err(message),
        Error::Cancelled => PyKeyboardInterrupt::new_err(message),
    }
}

/// The engine thread did not start or panicked: the base `BrainSurgeryError`, since it is
/// neither the plan's nor an input's fault (SPEC §11: every error is a `BrainSurgeryError`).
pub fn thread_failure(failure: ThreadFailure) -> PyErr {
    BrainSurgeryError::new_err(failure.to_string())
}

/// The base `BrainSurgeryError` for misuse of an object that is neither the plan's nor an
/// input's fault (a closed session, one session used by two threads at once).
pub fn base_error(message: &str) -> PyErr {
    BrainSurgeryError::new_err(message.to_owned())
}

/// A plan error raised before the engine runs (a bad argument type).
pub fn plan_error(error: PlanError) -> PyErr {
    Python::attach(|py| to_py(py, Error::Plan(error)))
}

/// A `FormatError` about one tensor of an opened checkpoint: no buffer or view of it can be made.
pub fn tensor_error(py: Python<'_>, message: String, path: &std::path::Path, tensor: &str) -> PyErr {
    let cx = ErrorContext {
        path: Some(path.to_owned()),
        tensor: Some(tensor.to_owned()),
        ..ErrorContext::default()
    };
    with_context(py, FormatError_::new_err(message), &cx)
}

/// Registers the exception classes on the module under their public names.
pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    module.add("BrainSurgeryError", py.get_type::<BrainSurgeryError>())?;
    module.add("PlanError", py.get_type::<PlanError_>())?;
    module.add("TransformError", py.get_type::<TransformError>())?;
    module.add("AssertionFailed", py.get_type::<AssertionFailed>())?;
    module.add("FormatError", py.get_type::<FormatError_>())?;
    // Class-level defaults, so an exception raised without context still has every attribute.
    let base = py.get_type::<BrainSurgeryError>();
    for name in ATTRIBUTES {
        base.setattr(name, py.None())?;
    }
    Ok(())
}

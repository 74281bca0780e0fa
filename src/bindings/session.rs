//! Sessions and lazy results for Python: a live engine session (`Session`, SPEC §11) and the
//! tensors a plan without an output leaves (`Tensors`, what `run` returns for in-pipeline use).
//! Both hand tensors out the same way: a view of the mapped file for a tensor still as it was
//! read, its bytes computed once into an owned buffer otherwise.

use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use serde_json::Value;

use super::{
    detached, detached_on, errors, factorizations_to_list, prepare, to_sources, to_value, utf8, MaxMemory,
    PyTensorBuffer, Threads,
};
use crate::error::Error;
use crate::executor::session::{Applied, Session};
use crate::formats::SourceFile;
use crate::memory::{Memory, Scratch};
use crate::plan::{oneline, Location, PlanError};
use crate::state::State;
use crate::value::{Bytes, ReadContext, Tensor, Value as TensorValue};

/// The bytes of one tensor held in memory (computed, or an array handed in), exported read-only
/// through the buffer protocol (a NumPy array made over it keeps it alive).
#[pyclass(name = "ComputedBuffer", module = "brainsurgery._core", frozen)]
pub(super) struct PyComputedBuffer {
    bytes: Arc<dyn Bytes>,
}

#[pymethods]
impl PyComputedBuffer {
    /// # Safety
    /// Called by CPython with a valid `view`. The bytes are exported read-only and live as long
    /// as `self`, which the view holds a reference to; nothing mutates them after creation.
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut pyo3::ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if flags & pyo3::ffi::PyBUF_WRITABLE != 0 {
            return Err(pyo3::exceptions::PyBufferError::new_err(
                "computed tensors are read-only (copy the array to change it)",
            ));
        }
        let bytes = slf.get().bytes.bytes();
        let ptr = bytes.as_ptr() as *mut std::ffi::c_void;
        // SAFETY: `view` comes from CPython; the pointer and length describe `bytes`, kept alive
        // by the reference to `slf` the view holds, and the buffer is marked read-only.
        let status = unsafe { pyo3::ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr, bytes.len() as isize, 1, flags) };
        if status == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.bytes.bytes().len()
    }
}

/// An input file and its mapping for views.
type Mapped = (Arc<SourceFile>, Arc<memmap2::MmapRaw>);

/// Mappings of the input files views were made of, one per file, shared by every view of it.
#[derive(Default)]
struct Maps(Mutex<HashMap<usize, Mapped>>);

impl Maps {
    fn of(&self, py: Python<'_>, file: &Arc<SourceFile>) -> PyResult<Arc<memmap2::MmapRaw>> {
        // Keyed by the file's address; the entry holds the `Arc`, so the address stays its own.
        let key = Arc::as_ptr(file) as usize;
        let mut maps = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, map)) = maps.get(&key) {
            return Ok(map.clone());
        }
        let map = Arc::new(file.map_for_views().map_err(|e| errors::to_py(py, Error::Format(e)))?);
        maps.insert(key, (file.clone(), map.clone()));
        Ok(map)
    }
}

/// What Python makes an array of: the buffer, the dtype name, the shape and byte strides (`None`
/// when row-major contiguous).
type ArrayParts = (Py<PyAny>, String, Vec<usize>, Option<Vec<usize>>);

/// One tensor as [`ArrayParts`]: a view of the mapped input file when its value is still the
/// stored bytes, else computed (with the GIL released, Ctrl-C stopping it) into an owned buffer.
fn array_parts(py: Python<'_>, tensor: &Tensor, maps: &Maps, memory: Arc<Memory>) -> PyResult<ArrayParts> {
    let dtype = tensor.dtype.name().to_owned();
    let shape = tensor.shape.clone();
    if let TensorValue::Stored { file, offset } = &*tensor.value {
        let map = maps.of(py, file)?;
        let len = tensor.nbytes();
        let offset = usize::try_from(*offset)
            .ok()
            .filter(|o| o.checked_add(len).is_some_and(|end| end <= map.len()));
        if let Some(offset) = offset {
            let buffer = PyTensorBuffer { map, offset, len };
            return Ok((Py::new(py, buffer)?.into_any(), dtype, shape, None));
        }
        // The file shrank since it was opened: computing reads it and says so.
    }
    if let TensorValue::Memory(bytes) = &*tensor.value {
        // An array handed in: its own memory is handed back. The engine's own bytes (a computed
        // product) are copied below, so nothing outside can change the session's state.
        if bytes.lent_by_host() && bytes.bytes().len() == tensor.nbytes() {
            let buffer = PyComputedBuffer { bytes: bytes.clone() };
            return Ok((Py::new(py, buffer)?.into_any(), dtype, shape, None));
        }
    }
    let tensor = tensor.clone();
    // A fresh flag per read: a Ctrl-C stops this read only, not later ones.
    let bytes = detached(py, move |cancel| -> Result<Scratch, Error> {
        let len = tensor.nbytes();
        // A copy within the run's or session's budget, else in its arena (the array is then a
        // view of the arena's mapping): what Python holds counts against the budget while it
        // lives. A copy, not the kept result itself: consumers that ignore read-only flags
        // (torch through DLPack) could otherwise change what later steps read.
        let mut bytes = memory
            .alloc("reading a tensor into Python", len)
            .map_err(|e| Error::Value(e.into()))?;
        // Within the run's or session's budget: a product computed on this read is kept there.
        let mut cx = ReadContext::for_run(cancel, memory);
        let mut chunk = Vec::new();
        // In chunks, so Ctrl-C stops a large read within one chunk.
        for (start, n) in crate::value::chunks(len) {
            cx.check().map_err(Error::Value)?;
            chunk.resize(n, 0);
            tensor.read_bytes(start, &mut chunk, &mut cx).map_err(Error::Value)?;
            bytes.write_at(start, &chunk).map_err(|e| {
                Error::Value(crate::value::ValueError::Compute {
                    op: "reading a tensor into Python",
                    reason: format!("the scratch arena could not be written: {e}"),
                })
            })?;
        }
        bytes.settle();
        Ok(bytes)
    })?
    .map_err(|e| errors::to_py(py, e))?;
    let bytes: Arc<dyn Bytes> = Arc::new(bytes);
    Ok((Py::new(py, PyComputedBuffer { bytes })?.into_any(), dtype, shape, None))
}

/// The bytes of a tensor an opened checkpoint stores in chunks (a distributed checkpoint's),
/// assembled into a buffer of the default memory budget (or its arena): no single range of a
/// file holds them, so no view can be made.
pub(super) fn assembled_buffer(py: Python<'_>, tensor: &Tensor) -> PyResult<Py<PyAny>> {
    let maps = Maps(Mutex::new(HashMap::new()));
    let (buffer, ..) = array_parts(py, tensor, &maps, Arc::new(Memory::default()))?;
    Ok(buffer)
}

/// `alias::name` split; a bare name is in `default`.
fn split_key(key: &str, default: Option<&str>) -> Option<(String, String)> {
    match key.split_once("::") {
        Some((alias, name)) => Some((alias.to_owned(), name.to_owned())),
        None => default.map(|alias| (alias.to_owned(), key.to_owned())),
    }
}

/// `alias::name` of every tensor of a state, aliases in order, tensors in their order.
fn qualified_names(state: &State) -> impl Iterator<Item = String> + '_ {
    state
        .alias_names()
        .into_iter()
        .filter_map(move |a| state.alias(&a).map(|t| (a, t)))
        .flat_map(|(a, t)| t.iter().map(move |(n, _)| format!("{a}::{n}")))
}

/// The `KeyError` for a key the state lacks: with the closest keys there are.
fn missing(state: &State, key: &str) -> PyErr {
    // Edit distances cost O(names × length²): past 20,000 names only the first are compared.
    let keys: Vec<String> = qualified_names(state).take(20_000).collect();
    let close = crate::references::closest_names(key, keys.iter().map(String::as_str), 3);
    if close.is_empty() {
        return PyKeyError::new_err(key.to_owned());
    }
    let list = close.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
    PyKeyError::new_err(format!("{key:?}: no such tensor; closest: {list}"))
}

/// The tensor a key names in a state.
fn lookup<'s>(state: &'s State, key: &str) -> PyResult<&'s Tensor> {
    split_key(key, state.default_alias.as_deref())
        .and_then(|(alias, name)| state.get(&alias, &name))
        .ok_or_else(|| missing(state, key))
}

fn applied_to_dict<'py>(py: Python<'py>, applied: &Applied) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("output", &applied.output)?;
    dict.set_item("notes", &applied.notes)?;
    dict.set_item("notices", &applied.notices)?;
    let written: Vec<String> = applied.written.iter().map(|p| p.display().to_string()).collect();
    dict.set_item("written", written)?;
    dict.set_item("exit", applied.exit)?;
    dict.set_item("bytes_read", applied.bytes_read)?;
    dict.set_item("factorizations", factorizations_to_list(py, &applied.factorizations)?)?;
    Ok(dict)
}

/// A transform given as Python text: a YAML block when it spans lines, else the one-line form
/// (`scale_: target: x by: 2`, `delete: target: m::lm_head.weight`).
fn block_of_text(text: &str) -> Result<Value, PlanError> {
    const ORIGIN: &str = "<apply>";
    if text.trim_end().contains('\n') {
        return match crate::plan::document::parse_yaml(text, ORIGIN)? {
            Value::Null => Err(PlanError::Syntax {
                origin: ORIGIN.to_owned(),
                message: "no transform given".to_owned(),
            }),
            value => Ok(value),
        };
    }
    oneline::parse_transform(text.trim(), ORIGIN)
}

/// A live session: the state after the transforms applied so far.
#[pyclass(name = "Session", module = "brainsurgery._core", frozen)]
pub(super) struct PySession {
    /// `None` once closed. A `Mutex` so two threads using one session get an error, never a
    /// race: a call holds it for its whole run (the GIL is released meanwhile).
    session: Mutex<Option<Session>>,
    cancel: Arc<AtomicBool>,
    maps: Maps,
}

impl PySession {
    fn lock(&self) -> PyResult<MutexGuard<'_, Option<Session>>> {
        let guard = match self.session.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err(errors::base_error(
                    "the session is in use by another thread; use one session per thread",
                ))
            }
        };
        match &*guard {
            Some(_) => Ok(guard),
            None => Err(errors::base_error("the session is closed")),
        }
    }
}

/// Runs `work` on the open session.
fn with_session<T>(guard: &mut MutexGuard<'_, Option<Session>>, work: impl FnOnce(&mut Session) -> T) -> T {
    work(guard.as_mut().expect("lock() checked the session is open"))
}

#[pymethods]
impl PySession {
    /// Starts a session from a plan (its transforms are applied; its output is not written).
    #[new]
    #[pyo3(signature = (plan, *, overrides = None, threads = Threads(0), max_memory = MaxMemory(None), scratch_dir = None), text_signature = "(plan, *, overrides=None, threads=0, max_memory=None, scratch_dir=None)")]
    fn new(
        py: Python<'_>,
        plan: &Bound<'_, PyAny>,
        overrides: Option<&Bound<'_, PyAny>>,
        threads: Threads,
        max_memory: MaxMemory,
        scratch_dir: Option<std::path::PathBuf>,
    ) -> PyResult<Self> {
        let Threads(threads) = threads;
        let memory = super::memory_options(max_memory, scratch_dir);
        let sources = to_sources(plan)?;
        let overrides = super::overrides_of(overrides)?;
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = cancel.clone();
        let started = detached_on(py, cancel.clone(), move |_| {
            let prepared = prepare(sources, overrides, threads)?;
            Session::start(prepared, flag, &memory)
        })?;
        let (session, _) = started.map_err(|e| errors::to_py(py, e))?;
        Ok(PySession {
            session: Mutex::new(Some(session)),
            cancel,
            maps: Maps::default(),
        })
    }

    /// Applies a transform (a dict, YAML text or the one-line form) or a list of them; on any
    /// error the session is left as it was. Returns what it printed and did.
    fn apply<'py>(&self, py: Python<'py>, block: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
        let value = match block.cast::<PyString>() {
            Ok(text) => {
                let text = utf8(text).map_err(|m| {
                    errors::plan_error(PlanError::Syntax {
                        origin: "<apply>".to_owned(),
                        message: m,
                    })
                })?;
                block_of_text(&text).map_err(errors::plan_error)?
            }
            Err(_) => to_value(block, &Location::root().key("transforms"))?,
        };
        let mut guard = self.lock()?;
        let session = guard.as_mut().expect("lock() checked the session is open");
        let applied = detached_on(py, self.cancel.clone(), move |_| session.apply(&value));
        // A Ctrl-C that came after the block's last check leaves the flag set: cleared, so it
        // does not cancel the next call. (The block then is applied and KeyboardInterrupt is
        // raised all the same.)
        self.cancel.store(false, std::sync::atomic::Ordering::Relaxed);
        drop(guard);
        let applied = applied?;
        let applied = applied.map_err(|e| errors::to_py(py, e))?;
        applied_to_dict(py, &applied)
    }

    /// `(buffer, dtype, shape, strides)` of the tensor `key` names (`alias::name`, or a name in
    /// the default alias).
    fn get(&self, py: Python<'_>, key: &str) -> PyResult<ArrayParts> {
        let mut guard = self.lock()?;
        let (tensor, memory) = with_session(&mut guard, |s| {
            PyResult::Ok((lookup(s.state(), key)?.clone(), s.memory().clone()))
        })?;
        drop(guard);
        array_parts(py, &tensor, &self.maps, memory)
    }

    /// `(dtype, shape)` of a tensor, without reading it.
    fn info(&self, key: &str) -> PyResult<(String, Vec<usize>)> {
        let mut guard = self.lock()?;
        with_session(&mut guard, |s| {
            lookup(s.state(), key).map(|t| (t.dtype.name().to_owned(), t.shape.clone()))
        })
    }

    /// Puts an array handed in from Python (borrowed, not copied) under `key`.
    fn set(&self, key: &str, array: &Bound<'_, PyAny>) -> PyResult<()> {
        let tensor = super::arrays::keep_array(array)?;
        let mut guard = self.lock()?;
        with_session(&mut guard, |s| {
            let (alias, name) = split_key(key, s.state().default_alias.as_deref()).ok_or_else(|| {
                errors::plan_error(PlanError::Syntax {
                    origin: "session".to_owned(),
                    message: format!(
                        "`{key}` names no alias and the session has several (or none); write `alias::{key}`"
                    ),
                })
            })?;
            if name.is_empty() || !crate::plan::valid_alias(&alias) {
                return Err(errors::plan_error(PlanError::Syntax {
                    origin: "session".to_owned(),
                    message: format!(
                        "`{key}` is not `alias::name` with a valid alias (a letter or `_`, then letters, digits, `_`, `-` or `.`, as in a plan)"
                    ),
                }));
            }
            s.set(&alias, &name, tensor);
            Ok(())
        })
    }

    /// `alias::name` of every tensor, aliases in order, tensors in their order.
    fn keys(&self) -> PyResult<Vec<String>> {
        let mut guard = self.lock()?;
        Ok(with_session(&mut guard, |s| qualified_names(s.state()).collect()))
    }

    fn __len__(&self) -> PyResult<usize> {
        let mut guard = self.lock()?;
        Ok(with_session(&mut guard, |s| {
            let state = s.state();
            state
                .alias_names()
                .iter()
                .filter_map(|a| state.alias(a))
                .map(|t| t.len())
                .sum()
        }))
    }

    fn __contains__(&self, key: &str) -> PyResult<bool> {
        let mut guard = self.lock()?;
        Ok(with_session(&mut guard, |s| lookup(s.state(), key).is_ok()))
    }

    /// The aliases, in order.
    fn aliases(&self) -> PyResult<Vec<String>> {
        let mut guard = self.lock()?;
        Ok(with_session(&mut guard, |s| s.state().alias_names()))
    }

    /// The alias references without one use, if any.
    #[getter]
    fn default_alias(&self) -> PyResult<Option<String>> {
        let mut guard = self.lock()?;
        Ok(with_session(&mut guard, |s| s.state().default_alias.clone()))
    }

    /// The check's report for an alias (default: the default alias): tensors, bytes, the memory
    /// a write would take. Reads no tensor data.
    #[pyo3(signature = (alias = None))]
    fn check<'py>(&self, py: Python<'py>, alias: Option<String>) -> PyResult<Bound<'py, PyDict>> {
        let mut guard = self.lock()?;
        let report = with_session(&mut guard, |s| {
            let alias = alias.or_else(|| s.state().default_alias.clone()).ok_or_else(|| {
                Error::Plan(PlanError::Syntax {
                    origin: "session".to_owned(),
                    message: format!(
                        "the session has several aliases ({}); say which to check",
                        s.state().alias_names().join(", ")
                    ),
                })
            })?;
            if s.state().alias(&alias).is_none() {
                return Err(Error::Plan(PlanError::UnknownAlias {
                    location: Location::root(),
                    alias,
                    known: s.state().alias_names(),
                }));
            }
            s.report_for(&alias)
        });
        drop(guard);
        super::report_to_dict(py, &report.map_err(|e| errors::to_py(py, e))?)
    }

    /// The plan of everything applied so far, as a dict.
    fn plan<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let mut guard = self.lock()?;
        let document = with_session(&mut guard, |s| s.document().cloned());
        drop(guard);
        super::from_value(py, &document.map_err(|e| errors::to_py(py, e))?)
    }

    /// Ends the session: its state and the mappings it holds are released (arrays already handed
    /// out stay valid). Later calls raise `BrainSurgeryError`.
    fn close(&self) -> PyResult<()> {
        let mut guard = match self.session.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Err(errors::base_error("the session is in use by another thread")),
        };
        *guard = None;
        self.maps.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(())
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.session.try_lock().map(|s| s.is_none()).unwrap_or(false)
    }
}

/// The tensors a plan without an output leaves: read lazily, each on access.
#[pyclass(name = "Tensors", module = "brainsurgery._core", frozen)]
pub(super) struct PyTensors {
    state: State,
    alias: String,
    maps: Maps,
    /// The run's memory budget and arena, which values computed on access use.
    memory: Arc<Memory>,
}

impl PyTensors {
    pub(super) fn new(state: State, alias: String, memory: Arc<Memory>) -> PyTensors {
        PyTensors {
            state,
            alias,
            maps: Maps::default(),
            memory,
        }
    }

    fn tensor(&self, name: &str) -> PyResult<&Tensor> {
        self.state.get(&self.alias, name).ok_or_else(|| {
            let names = self
                .state
                .alias(&self.alias)
                .into_iter()
                .flat_map(|t| t.iter().map(|(n, _)| n));
            let close = crate::references::closest_names(name, names, 3);
            match close.as_slice() {
                [] => PyKeyError::new_err(name.to_owned()),
                close => {
                    let list = close.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
                    PyKeyError::new_err(format!("{name:?}: no such tensor; closest: {list}"))
                }
            }
        })
    }
}

#[pymethods]
impl PyTensors {
    /// The alias the tensors are of.
    #[getter]
    fn alias(&self) -> &str {
        &self.alias
    }

    /// Tensor names, in order.
    fn keys(&self) -> Vec<String> {
        self.state
            .alias(&self.alias)
            .map(|t| t.iter().map(|(n, _)| n.to_owned()).collect())
            .unwrap_or_default()
    }

    fn __len__(&self) -> usize {
        self.state.alias(&self.alias).map_or(0, |t| t.len())
    }

    fn __contains__(&self, name: &Bound<'_, PyString>) -> bool {
        name.to_str().is_ok_and(|n| self.state.get(&self.alias, n).is_some())
    }

    /// `(dtype, shape)` of a tensor, without computing it.
    fn info(&self, name: &str) -> PyResult<(String, Vec<usize>)> {
        let t = self.tensor(name)?;
        Ok((t.dtype.name().to_owned(), t.shape.clone()))
    }

    /// `(buffer, dtype, shape, strides)` of a tensor: a view when it is an input's bytes
    /// unchanged, computed now otherwise.
    fn get(&self, py: Python<'_>, name: &str) -> PyResult<ArrayParts> {
        let tensor = self.tensor(name)?.clone();
        array_parts(py, &tensor, &self.maps, self.memory.clone())
    }
}

//! Python bindings (the only module that uses PyO3): `run`, `check`, `open`, the command line,
//! and the exceptions. Every long call goes through [`detached`], which releases the GIL, turns
//! Ctrl-C into a cancellation of the engine and then `KeyboardInterrupt`, and converts errors.

mod arrays;
mod errors;
mod session;

use std::collections::BTreeMap;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyKeyError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyMapping, PyString, PyTuple};
use serde_json::Value;

use crate::error::{Error, ThreadFailure};
use crate::executor::{Prepared, Report, RunOptions};
use crate::formats::{open_checkpoint, Checkpoint as EngineCheckpoint, SourceFile};
use crate::plan::host::{self, BuildError, HostNode, HostValue, Refusal};
use crate::plan::{Location, Plan, PlanError, PlanSource};

/// Runs `work` on another thread with the GIL released, polling for Ctrl-C meanwhile. On an
/// interrupt the engine's cancel flag is set and the work stops at its next chunk. Returns the
/// work's result and the first signal's exception, if one arrived; `BrainSurgeryError` if the
/// thread cannot start or panics.
fn detached_with_signal<T: Send>(
    py: Python<'_>,
    work: impl FnOnce(Arc<AtomicBool>) -> T + Send,
) -> PyResult<(T, Option<PyErr>)> {
    detached_with_flag(py, Arc::new(AtomicBool::new(false)), work)
}

/// [`detached_with_signal`] with a given cancel flag (a session's, which its engine side checks).
fn detached_with_flag<T: Send>(
    py: Python<'_>,
    cancel: Arc<AtomicBool>,
    work: impl FnOnce(Arc<AtomicBool>) -> T + Send,
) -> PyResult<(T, Option<PyErr>)> {
    let mut signal: Option<PyErr> = None;
    let result = py.detach(|| {
        std::thread::scope(|scope| {
            let flag = cancel.clone();
            // The worker says when it is done, so a short call returns at once rather than at
            // the next poll (a 20 ms sleep made every `open` take 20 ms); the sender is dropped
            // when the work ends, normally or by a panic.
            let (done, finished) = std::sync::mpsc::channel::<()>();
            let handle = std::thread::Builder::new()
                .stack_size(crate::value::ENGINE_STACK_BYTES)
                .spawn_scoped(scope, move || {
                    let _done = done;
                    work(flag)
                })
                .map_err(ThreadFailure::Start)?;
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(Duration::from_millis(20))
            {
                // Every Ctrl-C cancels, not only the first: an `-i` session clears the flag after
                // a cancelled entry and goes on, and the next Ctrl-C must stop the next entry.
                if let Err(e) = Python::attach(|py| py.check_signals()) {
                    cancel.store(true, Ordering::Relaxed);
                    signal.get_or_insert(e);
                }
            }
            handle.join().map_err(ThreadFailure::Panic)
        })
    });
    let result = result.map_err(errors::thread_failure)?;
    Ok((result, signal))
}

/// [`detached_with_signal`], raising the signal's exception (normally `KeyboardInterrupt`).
fn detached<T: Send>(py: Python<'_>, work: impl FnOnce(Arc<AtomicBool>) -> T + Send) -> PyResult<T> {
    match detached_with_signal(py, work)? {
        (_, Some(signal)) => Err(signal),
        (result, None) => Ok(result),
    }
}

/// [`detached`] with a given cancel flag. A session clears its flag after a cancelled entry.
fn detached_on<T: Send>(
    py: Python<'_>,
    cancel: Arc<AtomicBool>,
    work: impl FnOnce(Arc<AtomicBool>) -> T + Send,
) -> PyResult<T> {
    match detached_with_flag(py, cancel, work)? {
        (_, Some(signal)) => Err(signal),
        (result, None) => Ok(result),
    }
}

/// A Python value on its way into a plan document: the walk, its limits (depth, size, cycles)
/// and the locations are the plan layer's ([`host::to_document`]); this says what each Python
/// value is. No Python code runs while a container is read (entries are copied out first), and a
/// number-like object's `__index__` / `__float__` is called once and must give a real int / float.
struct PyNode<'py>(Bound<'py, PyAny>);

impl<'py> HostNode for PyNode<'py> {
    type Error = PyErr;

    fn identity(&self) -> usize {
        self.0.as_ptr() as usize
    }

    fn classify(&self) -> Result<HostValue<Self>, Refusal<PyErr>> {
        classify(&self.0)
    }
}

/// The type name of a Python value, for messages (`Decimal`, `numpy.float32`).
fn type_name(obj: &Bound<'_, PyAny>) -> String {
    let ty = obj.get_type();
    let name = ty
        .qualname()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".to_owned());
    match ty.module().map(|m| m.to_string()) {
        Ok(module) if module != "builtins" => format!("{module}.{name}"),
        _ => name,
    }
}

/// A Python string as UTF-8, refused when it holds a lone surrogate (which UTF-8 cannot hold).
fn utf8(s: &Bound<'_, PyString>) -> Result<String, String> {
    s.to_str().map(str::to_owned).map_err(|_| {
        let shown = s.repr().map(|r| r.to_string()).unwrap_or_default();
        format!("the string {shown} holds a lone surrogate, which is not Unicode text")
    })
}

fn int_value(i: &Bound<'_, PyInt>) -> Result<Value, String> {
    if let Ok(i) = i.extract::<i64>() {
        return Ok(Value::from(i));
    }
    i.extract::<u64>()
        .map(Value::from)
        .map_err(|_| format!("{i} is out of range (a plan integer fits in 64 bits)"))
}

fn float_value(f: f64) -> Result<Value, String> {
    serde_json::Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| format!("{f} is not a finite number"))
}

/// Calls the special method `name` of `obj` if its type has one. A Python exception raised by it
/// refuses the value (with the exception's text); an interrupt passes through.
fn call_hook<'py>(obj: &Bound<'py, PyAny>, name: &str) -> Result<Option<Bound<'py, PyAny>>, Refusal<PyErr>> {
    match obj.get_type().hasattr(name) {
        Ok(true) => {}
        Ok(false) | Err(_) => return Ok(None),
    }
    match obj.call_method0(name) {
        Ok(result) => Ok(Some(result)),
        // The exception prints as `ValueError: boom`.
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyException>(obj.py()) => {
            Err(Refusal::Invalid(format!("{}.{name}() raised {e}", type_name(obj))))
        }
        Err(e) => Err(Refusal::Host(e)),
    }
}

fn classify<'py>(obj: &Bound<'py, PyAny>) -> Result<HostValue<PyNode<'py>>, Refusal<PyErr>> {
    let scalar = |v: Result<Value, String>| v.map(HostValue::Scalar).map_err(Refusal::Invalid);
    if obj.is_none() {
        return Ok(HostValue::Scalar(Value::Null));
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(HostValue::Scalar(Value::Bool(b.is_true())));
    }
    if let Ok(i) = obj.cast::<PyInt>() {
        return scalar(int_value(i));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return scalar(float_value(f.value()));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return scalar(utf8(s).map(Value::String));
    }
    // Containers are copied out before anything is converted: converting may run Python code
    // (`__index__`), which could change a container while it is read.
    if let Ok(list) = obj.cast::<PyList>() {
        return Ok(HostValue::List(list.iter().map(PyNode).collect()));
    }
    if let Ok(tuple) = obj.cast::<PyTuple>() {
        return Ok(HostValue::List(tuple.iter().map(PyNode).collect()));
    }
    let entries = if let Ok(dict) = obj.cast::<PyDict>() {
        Some(dict.items())
    } else if let Ok(mapping) = obj.cast::<PyMapping>() {
        Some(mapping.items().map_err(|e| hook_failed(obj, "items", e))?)
    } else {
        None
    };
    if let Some(entries) = entries {
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries.iter() {
            let (key, value): (Bound<'py, PyAny>, Bound<'py, PyAny>) =
                entry.extract().map_err(|e| hook_failed(obj, "items", e))?;
            let Ok(key) = key.cast::<PyString>() else {
                return Err(Refusal::Invalid(format!(
                    "mapping keys must be strings, got {} {}",
                    type_name(&key),
                    key.repr().map(|r| r.to_string()).unwrap_or_default()
                )));
            };
            out.push((utf8(key).map_err(Refusal::Invalid)?, PyNode(value)));
        }
        return Ok(HostValue::Map(out));
    }
    // os.PathLike: the path as a string.
    if let Some(path) = call_hook(obj, "__fspath__")? {
        return match path.cast::<PyString>() {
            Ok(path) => scalar(utf8(path).map(Value::String)),
            Err(_) => Err(Refusal::Invalid(format!(
                "{}.__fspath__() gave a {}; a path in a plan is a str",
                type_name(obj),
                type_name(&path)
            ))),
        };
    }
    // NumPy and other numeric scalars: integers through __index__, reals through __float__,
    // followed once: the result must be an int (a float), not another number-like object.
    if let Some(index) = call_hook(obj, "__index__")? {
        return match index.cast::<PyInt>() {
            Ok(i) if !index.is_instance_of::<PyBool>() => scalar(int_value(i)),
            _ => Err(Refusal::Invalid(format!(
                "{}.__index__() gave a {}, not an int",
                type_name(obj),
                type_name(&index)
            ))),
        };
    }
    if let Some(real) = call_hook(obj, "__float__")? {
        return match real.cast::<PyFloat>() {
            Ok(f) => scalar(float_value(f.value())),
            Err(_) => Err(Refusal::Invalid(format!(
                "{}.__float__() gave a {}, not a float",
                type_name(obj),
                type_name(&real)
            ))),
        };
    }
    Err(Refusal::Invalid(format!("cannot use a {} in a plan", type_name(obj))))
}

/// A failure of a mapping's own `items()`: the value is refused, an interrupt passes through.
fn hook_failed(obj: &Bound<'_, PyAny>, name: &str, e: PyErr) -> Refusal<PyErr> {
    if e.is_instance_of::<pyo3::exceptions::PyException>(obj.py()) {
        Refusal::Invalid(format!("{}.{name}() failed: {e}", type_name(obj)))
    } else {
        Refusal::Host(e)
    }
}

/// Converts a Python plan value (a mapping, list, str, number, bool or None; paths as strings)
/// at `base` to a document, under the limits of a YAML plan; `PlanError` naming the place
/// otherwise.
fn to_value(obj: &Bound<'_, PyAny>, base: &Location) -> PyResult<Value> {
    host::to_document(&PyNode(obj.clone()), base).map_err(|e| match e {
        BuildError::Plan(e) => errors::plan_error(e),
        BuildError::Host(e) => e,
    })
}

/// A plan given as text that is not Unicode (a lone surrogate).
fn text_error(origin: &str, message: String) -> PyErr {
    errors::plan_error(PlanError::Syntax {
        origin: origin.to_owned(),
        message,
    })
}

/// The items of a list or tuple argument, copied out (no Python code runs while reading).
fn sequence_items<'py>(obj: &Bound<'py, PyAny>) -> Option<Vec<Bound<'py, PyAny>>> {
    if let Ok(list) = obj.cast::<PyList>() {
        Some(list.iter().collect())
    } else if let Ok(tuple) = obj.cast::<PyTuple>() {
        Some(tuple.iter().collect())
    } else {
        None
    }
}

/// One plan argument: a mapping, YAML/JSON text, or a path to a plan file.
fn to_source(obj: &Bound<'_, PyAny>) -> PyResult<PlanSource> {
    if obj.is_instance_of::<PyDict>() || obj.is_instance_of::<PyMapping>() {
        return Ok(PlanSource::Value(to_value(obj, &Location::root())?));
    }
    if let Ok(text) = obj.cast::<PyString>() {
        let text = utf8(text).map_err(|m| text_error("<string>", m))?;
        let looks_like_document = text.contains('\n') || text.contains(": ") || text.trim_start().starts_with('{');
        if !looks_like_document {
            return Ok(PlanSource::File(text.into()));
        }
        return Ok(PlanSource::Text(text));
    }
    if let Ok(fspath) = obj.call_method0("__fspath__") {
        if let Ok(path) = fspath.cast::<PyString>() {
            let path = utf8(path).map_err(|m| text_error("<path>", m))?;
            return Ok(PlanSource::File(path.into()));
        }
    }
    Err(PyTypeError::new_err(format!(
        "a plan is a mapping, YAML text or a str path, not {}",
        type_name(obj)
    )))
}

fn to_sources(plan: &Bound<'_, PyAny>) -> PyResult<Vec<PlanSource>> {
    match sequence_items(plan) {
        Some(items) => items.iter().map(to_source).collect(),
        None => Ok(vec![to_source(plan)?]),
    }
}

/// `overrides=`: a mapping from key paths to values (each converted like a plan value, at its
/// key path), or a list of `key.path=value` strings.
fn overrides_of(overrides: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    let Some(o) = overrides else {
        return Ok(Vec::new());
    };
    let origin = "overrides";
    if o.is_instance_of::<PyDict>() || o.is_instance_of::<PyMapping>() {
        let mut out = Vec::new();
        let map = to_value_map(o)?;
        for (key, value) in map {
            let key = key.cast::<PyString>().map_err(|_| {
                text_error(
                    origin,
                    format!("override keys are key paths (str), got {}", type_name(&key)),
                )
            })?;
            let key = utf8(key).map_err(|m| text_error(origin, m))?;
            if key.contains('=') {
                return Err(text_error(
                    origin,
                    format!("override key `{key}` holds `=`; keys are key paths such as `transforms[0].scale_.by`"),
                ));
            }
            let value = to_value(&value, &Location::root().key(&key))?;
            out.push(format!("{key}={value}"));
        }
        return Ok(out);
    }
    let Some(items) = sequence_items(o) else {
        return Err(PyTypeError::new_err(format!(
            "overrides is a mapping or a list of `key.path=value` strings, not {}",
            type_name(o)
        )));
    };
    items
        .iter()
        .map(|item| match item.cast::<PyString>() {
            Ok(s) => utf8(s).map_err(|m| text_error(origin, m)),
            Err(_) => Err(PyTypeError::new_err(format!(
                "overrides is a list of `key.path=value` strings, not of {}",
                type_name(item)
            ))),
        })
        .collect()
}

/// The entries of a mapping argument, copied out.
fn to_value_map<'py>(o: &Bound<'py, PyAny>) -> PyResult<Vec<(Bound<'py, PyAny>, Bound<'py, PyAny>)>> {
    let items = match o.cast::<PyDict>() {
        Ok(dict) => dict.items(),
        Err(_) => o
            .cast::<PyMapping>()?
            .items()
            .map_err(|e| match hook_failed(o, "items", e) {
                Refusal::Invalid(message) => text_error("overrides", message),
                Refusal::Host(e) => e,
            })?,
    };
    // A mapping's `items()` may give anything: what is not a pair refuses the overrides.
    items
        .iter()
        .map(|entry| {
            entry.extract().map_err(|e| match hook_failed(o, "items", e) {
                Refusal::Invalid(message) => text_error("overrides", message),
                Refusal::Host(e) => e,
            })
        })
        .collect()
}

/// A JSON value as the Python value a YAML plan would give (dict, list, str, int, float, bool,
/// None).
fn from_value<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => pyo3::types::PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_pyobject(py)?.into_any(),
            (None, Some(u)) => u.into_pyobject(py)?.into_any(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(from_value(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, v) in map {
                dict.set_item(k, from_value(py, v)?)?;
            }
            dict.into_any()
        }
    })
}

/// Every transform as data, from the key tables that validate plans and print help: a list of
/// dicts with `name`, `doc`, `form` (`plain`, `new` or `in_place`), `in_place`, `twin` (the other
/// form's name, or None), `keys` (each with `name`, `type`, `required`, `default`, `doc`) and,
/// for `assert`, `operators` (each with `name`, `doc`, `keys`).
#[pyfunction]
fn transform_specs(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    from_value(py, &crate::transforms::help::specs_data())
}

/// A Python plan value (what `run` accepts as a mapping: dicts, lists, str, numbers, bool, None,
/// paths) as YAML text, written by the serializer of the engine's YAML library. Strings that a
/// YAML 1.1 or 1.2 reader would take for another type (`y`, `no`, `1e3`, `0x10`, `null`, ``)
/// are quoted, so the engine and PyYAML read back the same value. `PlanError` for a value a
/// plan cannot hold.
#[pyfunction]
fn to_yaml(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    let value = to_value(obj, &Location::root())?;
    serde_saphyr::to_string(&value).map_err(|e| text_error("to_yaml", e.to_string()))
}

/// The plan document `run` and `check` would see for `plan` (a mapping, YAML/JSON text, a path,
/// or a list of them merged in order) and `overrides`, before any transform is parsed: a dict.
#[pyfunction]
#[pyo3(signature = (plan, *, overrides = None))]
fn plan_document<'py>(
    py: Python<'py>,
    plan: &Bound<'py, PyAny>,
    overrides: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let sources = to_sources(plan)?;
    let overrides = overrides_of(overrides)?;
    // Files are read with the GIL released, as `run` reads them. A plan file's paths are rebased
    // on its folder; made absolute, the document runs the same from data (`Plan.from_yaml(path)`)
    // from any folder.
    let from_file = sources.iter().any(|s| matches!(s, PlanSource::File(_)));
    let mut doc = detached(py, move |_| crate::plan::assemble(&sources, &overrides))?.map_err(errors::plan_error)?;
    if from_file {
        crate::plan::paths::rebase_document(&mut doc, crate::plan::paths::working_directory().as_deref());
    }
    from_value(py, &doc)
}

/// The plan equivalent to a MergeKit config (docs/mergekit.md): `config` is a dict, YAML text or
/// a path to a `mergekit-yaml` config (or a `mergekit-moe` one, with `experts`). The plan reads
/// the models as inputs, merges them into alias `merged` (`upcycle_moe` of the base for MoE
/// configs) and, with `output`, writes it there. `PlanError` naming the key for what cannot be
/// translated.
#[pyfunction]
#[pyo3(signature = (config, *, output = None))]
fn from_mergekit<'py>(
    py: Python<'py>,
    config: &Bound<'py, PyAny>,
    output: Option<std::path::PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    let source = to_source(config)?;
    let output = output.map(|p| p.display().to_string());
    let plan = detached(py, move |_| {
        crate::plan::mergekit::translate_source(&source, output.as_deref())
    })?
    .map_err(errors::plan_error)?;
    from_value(py, &plan)
}

fn report_to_dict<'py>(py: Python<'py>, report: &Report) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("alias", report.alias.clone())?;
    let tensors = PyList::empty(py);
    for t in &report.tensors {
        let entry = PyDict::new(py);
        entry.set_item("name", &t.name)?;
        entry.set_item("dtype", &t.dtype)?;
        entry.set_item("shape", PyTuple::new(py, &t.shape)?)?;
        entry.set_item("nbytes", t.nbytes)?;
        tensors.append(entry)?;
    }
    dict.set_item("tensors", tensors)?;
    dict.set_item("total_bytes", report.total_bytes)?;
    dict.set_item(
        "written",
        report
            .written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>(),
    )?;
    dict.set_item("notes", &report.notes)?;
    dict.set_item("output", &report.output)?;
    dict.set_item("notices", &report.notices)?;
    dict.set_item("added", report.added)?;
    dict.set_item("removed", report.removed)?;
    dict.set_item("peak_memory_estimate", report.peak_memory_estimate)?;
    dict.set_item("materialized_bytes", report.materialized_bytes)?;
    dict.set_item("memory_budget", report.memory_budget)?;
    dict.set_item("arena_bytes", report.arena_bytes)?;
    let factorizations = factorizations_to_list(py, &report.factorizations)?;
    let timings = PyList::empty(py);
    for t in &report.timings {
        let entry = PyDict::new(py);
        entry.set_item("index", t.index)?;
        entry.set_item("transform", &t.name)?;
        entry.set_item("seconds", t.seconds)?;
        timings.append(entry)?;
    }
    dict.set_item("timings", timings)?;
    dict.set_item("write_seconds", report.write_seconds)?;
    dict.set_item("bytes_read", report.bytes_read)?;
    dict.set_item("bytes_to_read", report.bytes_to_read)?;
    dict.set_item("bytes_to_write", report.bytes_to_write)?;
    let files = PyList::empty(py);
    for (path, len) in &report.output_files {
        files.append((path.display().to_string(), *len))?;
    }
    dict.set_item("output_files", files)?;
    let filesystems = PyList::empty(py);
    for fs in &report.filesystems {
        let entry = PyDict::new(py);
        entry.set_item("roles", &fs.roles)?;
        entry.set_item("path", fs.path.display().to_string())?;
        entry.set_item("needed", fs.needed)?;
        entry.set_item("available", fs.available)?;
        entry.set_item("enough", !fs.is_short())?;
        filesystems.append(entry)?;
    }
    dict.set_item("filesystems", filesystems)?;
    dict.set_item("factorizations", factorizations)?;
    Ok(dict)
}

/// Factorizations (`phlora`, `extract_lora`) as a list of dicts: `op`, `tensor`, `shape`,
/// `method`, `rank`, `energy`, `relative_error`.
fn factorizations_to_list<'py>(
    py: Python<'py>,
    factorizations: &[crate::transforms::lowrank::Factorization],
) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for f in factorizations {
        let entry = PyDict::new(py);
        entry.set_item("op", f.op)?;
        entry.set_item("tensor", &f.tensor)?;
        entry.set_item("shape", PyTuple::new(py, [f.shape.0, f.shape.1])?)?;
        entry.set_item("method", f.method)?;
        entry.set_item("rank", f.quality.rank)?;
        entry.set_item("energy", f.quality.energy)?;
        entry.set_item("relative_error", f.quality.relative_error)?;
        list.append(entry)?;
    }
    Ok(list)
}

/// `threads=`: an int (else `TypeError`), 0 for one per core or a positive count (else
/// `PlanError`, as `--threads` is refused on the command line).
struct Threads(usize);

impl<'a, 'py> FromPyObject<'a, 'py> for Threads {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let Ok(int) = obj.cast::<PyInt>() else {
            return Err(PyTypeError::new_err(format!(
                "threads must be an int, not {}",
                type_name(&obj)
            )));
        };
        int.extract::<usize>().map(Threads).map_err(|_| {
            text_error(
                "threads",
                format!(
                    "{} is not a thread count (0 for one per core, or a positive number)",
                    &*int
                ),
            )
        })
    }
}

/// `max_memory=`: bytes as an int or a size string (`"8GB"`), or None for the default share
/// of physical memory (else `TypeError`, or `PlanError` for a bad size, as `--max-memory`).
struct MaxMemory(Option<u64>);

impl<'a, 'py> FromPyObject<'a, 'py> for MaxMemory {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if obj.is_none() {
            return Ok(MaxMemory(None));
        }
        if let Ok(int) = obj.cast::<PyInt>() {
            return int
                .extract::<u64>()
                .map(|n| MaxMemory(Some(n)))
                .map_err(|_| text_error("max_memory", format!("{} is not a number of bytes", &*int)));
        }
        if let Ok(text) = obj.cast::<PyString>() {
            let text = utf8(&text).map_err(PyValueError::new_err)?;
            return crate::formats::parse_size(&text)
                .map(|n| MaxMemory(Some(n)))
                .map_err(|e| text_error("max_memory", e.to_string()));
        }
        Err(PyTypeError::new_err(format!(
            "max_memory must be an int or a size such as \"8GB\", not {}",
            type_name(&obj)
        )))
    }
}

/// The memory options of `max_memory=` and `scratch_dir=`.
fn memory_options(max_memory: MaxMemory, scratch_dir: Option<std::path::PathBuf>) -> crate::memory::MemoryOptions {
    crate::memory::MemoryOptions {
        max_memory: max_memory.0,
        scratch_dir,
    }
}

fn prepare(sources: Vec<PlanSource>, overrides: Vec<String>, threads: usize) -> Result<Prepared, Error> {
    let plan = Plan::load(&sources, &overrides)?;
    Prepared::new(plan, threads)
}

/// Runs a plan (a dict, YAML text, a path, or a list of them merged in order) and writes its
/// output. Returns a report: the alias written, its tensors, the files written, one note per
/// transform.
#[pyfunction]
#[pyo3(signature = (plan, *, overrides = None, threads = Threads(0), progress = None, space_check = true, max_memory = MaxMemory(None), scratch_dir = None), text_signature = "(plan, *, overrides=None, threads=0, progress=None, space_check=True, max_memory=None, scratch_dir=None)")]
#[allow(clippy::too_many_arguments)]
fn run<'py>(
    py: Python<'py>,
    plan: &Bound<'py, PyAny>,
    overrides: Option<&Bound<'py, PyAny>>,
    threads: Threads,
    progress: Option<Py<PyAny>>,
    space_check: bool,
    max_memory: MaxMemory,
    scratch_dir: Option<std::path::PathBuf>,
) -> PyResult<(Bound<'py, PyDict>, Option<Py<session::PyTensors>>)> {
    let Threads(threads) = threads;
    let memory = memory_options(max_memory, scratch_dir);
    let sources = to_sources(plan)?;
    let overrides = overrides_of(overrides)?;
    let progress = progress.map(progress_callback);
    let result = detached(py, move |cancel| {
        let prepared = prepare(sources, overrides, threads)?;
        let (report, state, memory) = prepared.run_keeping_state(&RunOptions {
            threads,
            cancel,
            progress,
            memory,
            skip_space_check: !space_check,
        })?;
        // Without an output the result is the tensors themselves, read lazily from Python.
        let result = match prepared.plan().output {
            Some(_) => None,
            None => prepared.result_alias(&state).map(|alias| (state, alias, memory)),
        };
        Ok::<_, Error>((report, result))
    })?;
    let (report, result) = result.map_err(|e| errors::to_py(py, e))?;
    let tensors = match result {
        Some((state, alias, memory)) => Some(Py::new(py, session::PyTensors::new(state, alias, memory))?),
        None => None,
    };
    Ok((report_to_dict(py, &report)?, tensors))
}

/// The engine's progress function calling a Python `callback(done_bytes, total_bytes)` from the
/// writing threads, at most every 50 ms and once at the end. An exception in the callback is
/// reported as unraisable (a progress display must not fail a run).
fn progress_callback(callback: Py<PyAny>) -> Arc<crate::executor::ProgressFn> {
    let last = std::sync::Mutex::new(None::<std::time::Instant>);
    Arc::new(move |done: u64, total: u64| {
        {
            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            let due = last.is_none_or(|t| now.duration_since(t) >= Duration::from_millis(50));
            if !due && done < total {
                return;
            }
            *last = Some(now);
        }
        Python::attach(|py| {
            if let Err(e) = callback.call1(py, (done, total)) {
                e.write_unraisable(py, Some(callback.bind(py)));
            }
        });
    })
}

/// Checks a plan against the checkpoint headers without reading tensor data (SPEC §8.1) and
/// returns the report of what a run would write.
#[pyfunction]
#[pyo3(signature = (plan, *, overrides = None, threads = Threads(0), max_memory = MaxMemory(None), scratch_dir = None), text_signature = "(plan, *, overrides=None, threads=0, max_memory=None, scratch_dir=None)")]
fn check<'py>(
    py: Python<'py>,
    plan: &Bound<'py, PyAny>,
    overrides: Option<&Bound<'py, PyAny>>,
    threads: Threads,
    max_memory: MaxMemory,
    scratch_dir: Option<std::path::PathBuf>,
) -> PyResult<Bound<'py, PyDict>> {
    // The thread count a run would use: the check judges the writing buffers against the budget.
    let Threads(threads) = threads;
    let sources = to_sources(plan)?;
    let overrides = overrides_of(overrides)?;
    let memory = memory_options(max_memory, scratch_dir);
    let result = detached(py, move |_| prepare(sources, overrides, threads)?.check_within(&memory))?;
    let report = result.map_err(|e| errors::to_py(py, e))?;
    report_to_dict(py, &report)
}

/// The command line: parses `args` (without the program name), runs, returns the exit status.
#[pyfunction]
fn cli_main(py: Python<'_>, args: Vec<Bound<'_, PyString>>) -> PyResult<i32> {
    // `sys.argv` keeps bytes that are not UTF-8 as lone surrogates; the command line takes text.
    let args = match args.iter().map(utf8).collect::<Result<Vec<String>, String>>() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("error: command line: {message} (an argument that is not UTF-8)");
            return Ok(2);
        }
    };
    // The command line reports an interruption itself (one message, exit status 130).
    let (status, _signal) = detached_with_signal(py, move |cancel| crate::cli::main(args, cancel))?;
    Ok(status)
}

/// Read-only bytes of one tensor in a memory-mapped file, exposed through the buffer protocol
/// so NumPy views them without a copy. Holds the mapping alive.
/// A row of `Checkpoint.table`: name, dtype name, shape, bytes, file.
type TableRow = (String, String, Vec<usize>, u64, String);

#[pyclass(name = "TensorBuffer", module = "brainsurgery._core", frozen)]
struct PyTensorBuffer {
    map: Arc<memmap2::MmapRaw>,
    offset: usize,
    len: usize,
}

#[pymethods]
impl PyTensorBuffer {
    /// # Safety
    /// Called by CPython with a valid `view`. The buffer is exported read-only and its memory lives
    /// as long as `self` (the view holds a reference to `self`, and `self` holds the mapping).
    /// Consumers that ignore the flag (torch through DLPack) write into the private copy-on-write
    /// pages of the mapping (`SourceFile::map_for_views`), which Rust never reads.
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut pyo3::ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if flags & pyo3::ffi::PyBUF_WRITABLE != 0 {
            return Err(pyo3::exceptions::PyBufferError::new_err(
                "checkpoint tensors are read-only",
            ));
        }
        let this = slf.get();
        // A raw pointer, never a Rust reference: torch may write through it (into private pages).
        if this.offset.checked_add(this.len).is_none_or(|end| end > this.map.len()) {
            return Err(pyo3::exceptions::PyBufferError::new_err(
                "tensor bytes lie outside the mapping",
            ));
        }
        // SAFETY: `offset + len` lies within the mapping (checked above).
        let ptr = unsafe { this.map.as_mut_ptr().add(this.offset) } as *mut std::ffi::c_void;
        // SAFETY: `view` comes from CPython; the pointer and length describe memory owned by the
        // mapping that `slf` keeps alive for as long as the view holds its reference.
        let status = unsafe { pyo3::ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr, this.len as isize, 1, flags) };
        if status == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.len
    }
}

/// A checkpoint opened lazily: headers are read, tensor bytes are mapped, nothing is copied.
#[pyclass(name = "Checkpoint", module = "brainsurgery._core", frozen)]
struct PyCheckpoint {
    checkpoint: EngineCheckpoint,
    maps: Vec<std::sync::OnceLock<Arc<memmap2::MmapRaw>>>,
    index: BTreeMap<String, usize>,
}

impl PyCheckpoint {
    /// The tensor `name` names; `KeyError` for any other name, also one that is not Unicode text
    /// (a lone surrogate), which no tensor can have.
    fn entry(&self, name: &Bound<'_, PyString>) -> PyResult<&crate::formats::TensorEntry> {
        name.to_str()
            .ok()
            .and_then(|n| self.index.get(n))
            .map(|&i| &self.checkpoint.tensors[i])
            .ok_or_else(|| self.missing(name))
    }

    /// The `KeyError` for a name no tensor has: the name, and the closest names there are (issue
    /// 11), by the distance the engine's own suggestions use.
    fn missing(&self, name: &Bound<'_, PyString>) -> PyErr {
        let Ok(text) = name.to_str() else {
            return PyKeyError::new_err(name.clone().unbind());
        };
        // Edit distances to every name cost O(names × length²) with the GIL held: past these
        // sizes (a 100,000-tensor checkpoint took 0.4 s per miss) the error is the bare key.
        const MOST_NAMES: usize = 20_000;
        const LONGEST_KEY: usize = 1_000;
        if self.checkpoint.tensors.len() > MOST_NAMES || text.len() > LONGEST_KEY {
            return PyKeyError::new_err(name.clone().unbind());
        }
        let names = self.checkpoint.tensors.iter().map(|t| t.name.as_str());
        let close = crate::references::closest_names(text, names, 3);
        if close.is_empty() {
            return PyKeyError::new_err(name.clone().unbind());
        }
        let list = close.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
        PyKeyError::new_err(format!("{text:?}: no such tensor; closest: {list}"))
    }

    fn map_of(&self, py: Python<'_>, file: usize) -> PyResult<Arc<memmap2::MmapRaw>> {
        if let Some(map) = self.maps[file].get() {
            return Ok(map.clone());
        }
        let source: &SourceFile = &self.checkpoint.files[file];
        let map = source
            .map_for_views()
            .map_err(|e| errors::to_py(py, Error::Format(e)))?;
        Ok(self.maps[file].get_or_init(|| Arc::new(map)).clone())
    }
}

#[pymethods]
impl PyCheckpoint {
    /// Tensor names in file order.
    fn keys(&self) -> Vec<String> {
        self.checkpoint.tensors.iter().map(|t| t.name.clone()).collect()
    }

    fn __len__(&self) -> usize {
        self.checkpoint.tensors.len()
    }

    fn __contains__(&self, name: &Bound<'_, PyString>) -> bool {
        name.to_str().is_ok_and(|n| self.index.contains_key(n))
    }

    /// `(name, dtype name, shape, bytes, file)` of every tensor, in file order; with `pattern`
    /// (a regex string or a structured pattern's token list, as `brainsurgery inspect` takes),
    /// only the tensors it matches.
    #[pyo3(signature = (pattern=None))]
    fn table(&self, pattern: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<TableRow>> {
        let selector = match pattern {
            None => None,
            Some(p) => {
                let value = if let Ok(text) = p.extract::<String>() {
                    serde_json::Value::String(text)
                } else if let Ok(tokens) = p.extract::<Vec<String>>() {
                    serde_json::Value::from(tokens)
                } else {
                    return Err(errors::plan_error(PlanError::Syntax {
                        origin: "pattern".into(),
                        message: "expected a regex string or a structured pattern (a list of strings)".into(),
                    }));
                };
                Some(crate::cli::name_selector(&value, "pattern").map_err(errors::plan_error)?)
            }
        };
        Ok(self
            .checkpoint
            .tensors
            .iter()
            .filter(|t| selector.as_ref().is_none_or(|s| s.is_match(&t.name)))
            .map(|t| {
                let file = &self.checkpoint.files[t.file].path;
                (
                    t.name.clone(),
                    t.dtype.name().to_owned(),
                    t.shape.clone(),
                    t.nbytes,
                    file.display().to_string(),
                )
            })
            .collect())
    }

    /// `(dtype name, shape)` of a tensor, from the header.
    fn info(&self, name: &Bound<'_, PyString>) -> PyResult<(String, Vec<usize>)> {
        let t = self.entry(name)?;
        Ok((t.dtype.name().to_owned(), t.shape.clone()))
    }

    /// The tensor's bytes as a read-only buffer over the mapped file: from its first element to
    /// the end of its last one (with gaps and repeats when it is strided, see `strides`).
    fn buffer(&self, py: Python<'_>, name: &Bound<'_, PyString>) -> PyResult<Py<PyAny>> {
        let t = self.entry(name)?;
        if t.pieces.is_some() {
            let tensor = crate::value::Tensor::from_entry(t, &self.checkpoint.files);
            return session::assembled_buffer(py, &tensor);
        }
        let map = self.map_of(py, t.file)?;
        let path = &self.checkpoint.files[t.file].path;
        let error = |message: String| errors::tensor_error(py, message, path, &t.name);
        let (offset, extent) = (t.offset, t.extent());
        let (Ok(offset), Ok(len)) = (usize::try_from(offset), usize::try_from(extent)) else {
            return Err(error(format!(
                "tensor at byte {offset} spanning {extent} bytes lies beyond what this machine can map"
            )));
        };
        // The reader checked this when the file was opened; the file may have shrunk since.
        if offset.checked_add(len).is_none_or(|end| end > map.len()) {
            return Err(error(format!(
                "tensor bytes {offset}..{} lie outside the file ({} bytes now)",
                offset.saturating_add(len),
                map.len()
            )));
        }
        Ok(Py::new(py, PyTensorBuffer { map, offset, len })?.into_any())
    }

    /// Byte strides of a non-contiguous tensor (a strided PyTorch view), `None` when its bytes
    /// are row-major contiguous. `FormatError` when a stride in bytes exceeds what an array
    /// can address (`isize::MAX`, which only an empty tensor's unchecked strides can).
    fn strides(&self, py: Python<'_>, name: &Bound<'_, PyString>) -> PyResult<Option<Vec<usize>>> {
        let t = self.entry(name)?;
        let Some(strides) = &t.strides else {
            return Ok(None);
        };
        let item = t.dtype.size().unwrap_or(1);
        let bytes: Option<Vec<usize>> = strides
            .iter()
            .map(|&x| x.checked_mul(item).filter(|&b| isize::try_from(b).is_ok()))
            .collect();
        bytes.map(Some).ok_or_else(|| {
            let path = &self.checkpoint.files[t.file].path;
            let message = format!(
                "strides {strides:?} of {item}-byte elements exceed what an array can address, so no view can be made"
            );
            errors::tensor_error(py, message, path, &t.name)
        })
    }

    /// `__metadata__` of the (first) file.
    #[getter]
    fn metadata(&self) -> BTreeMap<String, String> {
        self.checkpoint.metadata.clone()
    }

    /// The path opened.
    #[getter]
    fn path(&self) -> String {
        self.checkpoint.path.display().to_string()
    }

    /// The format of the weight files read: `safetensors`, `PyTorch`, `NumPy` or `DCP`.
    #[getter]
    fn format(&self) -> &'static str {
        self.checkpoint.format.name()
    }

    /// Notices about how a directory was read (files of another format or training state
    /// left out).
    #[getter]
    fn notices(&self) -> Vec<String> {
        self.checkpoint.notices.clone()
    }
}

/// Opens a checkpoint lazily (headers only).
#[pyfunction]
fn open(py: Python<'_>, path: &Bound<'_, PyString>) -> PyResult<PyCheckpoint> {
    let path: std::path::PathBuf = match path.extract() {
        Ok(path) => path,
        // A lone surrogate that the file system encoding cannot carry: no file has this name.
        Err(_) => {
            let source = std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the name holds a lone surrogate, which no file name can",
            );
            let path = path.to_string_lossy().into_owned().into();
            return Err(errors::to_py(
                py,
                Error::Format(crate::formats::FormatError::Io { path, source }),
            ));
        }
    };
    let checkpoint = detached(py, move |_| open_checkpoint(&path))?.map_err(|e| errors::to_py(py, Error::Format(e)))?;
    let index = checkpoint
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let maps = checkpoint.files.iter().map(|_| std::sync::OnceLock::new()).collect();
    Ok(PyCheckpoint {
        checkpoint,
        maps,
        index,
    })
}

/// A DLPack capsule over a NumPy array's memory, for every engine dtype (bfloat16 and float8
/// included), holding the array until the consumer's deleter runs: what `brainsurgery.Array`'s
/// `__dlpack__` returns. Arguments as the array API's `__dlpack__`.
#[pyfunction]
#[pyo3(signature = (array, *, stream = None, max_version = None, dl_device = None, copy = None))]
fn dlpack<'py>(
    array: &Bound<'py, PyAny>,
    stream: Option<&Bound<'py, PyAny>>,
    max_version: Option<(u32, u32)>,
    dl_device: Option<(u32, i32)>,
    copy: Option<bool>,
) -> PyResult<Bound<'py, PyAny>> {
    arrays::dlpack(array, stream, max_version, dl_device, copy)
}

/// How the engine takes an array in (what `save` and sessions do with it): a dict with
/// ``dtype``, ``shape``, ``address`` (of the first byte the engine reads), ``nbytes``, ``copied``
/// (True for non-contiguous or big-endian input) and ``via`` (``numpy``, ``dlpack`` or
/// ``buffer``).
#[pyfunction]
fn borrow<'py>(py: Python<'py>, array: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    let (tensor, info) = arrays::borrow_array_info(array)?;
    let d = PyDict::new(py);
    d.set_item("dtype", tensor.dtype.name())?;
    d.set_item("shape", PyTuple::new(py, &tensor.shape)?)?;
    d.set_item("address", info.address)?;
    d.set_item("nbytes", tensor.nbytes())?;
    d.set_item("copied", info.copied)?;
    d.set_item("via", info.via)?;
    Ok(d)
}

/// The `(name, array)` pairs of a mapping (in its order) or of a list of pairs.
fn named_arrays<'py>(tensors: &Bound<'py, PyAny>) -> PyResult<Vec<(Bound<'py, PyAny>, Bound<'py, PyAny>)>> {
    let items = if let Ok(dict) = tensors.cast::<PyDict>() {
        dict.items().iter().collect::<Vec<_>>()
    } else if let Ok(mapping) = tensors.cast::<PyMapping>() {
        mapping.items()?.iter().collect()
    } else if let Some(items) = sequence_items(tensors) {
        items
    } else {
        return Err(PyTypeError::new_err(format!(
            "tensors are a mapping of names to arrays or a list of (name, array) pairs, not {}",
            type_name(tensors)
        )));
    };
    items
        .iter()
        .map(|item| {
            item.extract::<(Bound<'py, PyAny>, Bound<'py, PyAny>)>()
                .map_err(|_| PyTypeError::new_err(format!("tensors are (name, array) pairs, not {}", type_name(item))))
        })
        .collect()
}

/// Writes arrays (a mapping of names to arrays, or a list of pairs) as the output `output`
/// describes — a plan's `output:` value, parsed exactly as one — streamed and atomic, with the
/// GIL released; returns the report. Arrays are borrowed without a copy (see `borrow`) and kept
/// alive until the write ends. `metadata` is added to the file's `__metadata__`.
#[pyfunction]
#[pyo3(signature = (tensors, output, *, metadata = None, threads = Threads(0)), text_signature = "(tensors, output, *, metadata=None, threads=0)")]
fn save<'py>(
    py: Python<'py>,
    tensors: &Bound<'py, PyAny>,
    output: &Bound<'py, PyAny>,
    metadata: Option<BTreeMap<String, String>>,
    threads: Threads,
) -> PyResult<Bound<'py, PyDict>> {
    let Threads(threads) = threads;
    let output = to_value(output, &Location::root().key("output"))?;
    let mut state = crate::state::State::default();
    let alias = crate::plan::DEFAULT_ALIAS;
    state.ensure_alias(alias);
    for (name, array) in named_arrays(tensors)? {
        let Ok(name_str) = name.cast::<PyString>() else {
            return Err(PyTypeError::new_err(format!(
                "tensor names are str, not {}",
                type_name(&name)
            )));
        };
        let name = utf8(name_str).map_err(PyValueError::new_err)?;
        if state.get(alias, &name).is_some() {
            return Err(PyValueError::new_err(format!("tensor `{name}` is given twice")));
        }
        let tensor = arrays::borrow_array(&array).map_err(|e| {
            let message = format!("tensor `{name}`: {}", e.value(py));
            if e.is_instance_of::<PyTypeError>(py) {
                PyTypeError::new_err(message)
            } else if e.is_instance_of::<PyValueError>(py) {
                PyValueError::new_err(message)
            } else {
                e
            }
        })?;
        state.insert(alias, &name, tensor);
    }
    let metadata = metadata.unwrap_or_default();
    // The state (and the borrowed arrays it holds) stays on this thread: the engine thread only
    // reads it, and it is dropped here, attached to the interpreter, after the write.
    let state_ref = &state;
    let result = detached(py, move |cancel| {
        let options = RunOptions {
            threads,
            cancel,
            progress: None,
            ..RunOptions::default()
        };
        crate::executor::save(&output, state_ref, alias, &metadata, None, &options)
    })?;
    let report = result.map_err(|e| errors::to_py(py, e))?;
    drop(state);
    report_to_dict(py, &report)
}

/// The `brainsurgery._core` extension module.
/// Every dtype the engine knows, one dict each, from the engine's one dtype table: ``name``,
/// ``safetensors``, ``aliases``, ``bits``, ``size`` (``None`` below one byte), ``kind``
/// (``float``, ``integer`` or ``opaque``), ``numpy`` (the ``.npy`` descr, or ``None``),
/// ``ml_dtypes`` (the NumPy type comes from ml_dtypes), ``torch`` (``torch.<name>``, or ``None``)
/// and ``torch_storage`` (the legacy typed storage class, or ``None``).
#[pyfunction]
fn dtypes(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    use crate::dtype::{DType, Kind, TorchStorage};
    let out = PyList::empty(py);
    for info in &DType::TABLE {
        let d = PyDict::new(py);
        d.set_item("name", info.name)?;
        d.set_item("safetensors", info.safetensors)?;
        d.set_item("aliases", info.aliases.to_vec())?;
        d.set_item("bits", info.bits)?;
        d.set_item("size", info.dtype.size())?;
        let kind = match info.kind {
            Kind::Float => "float",
            Kind::Integer => "integer",
            Kind::Opaque => "opaque",
        };
        d.set_item("kind", kind)?;
        d.set_item("numpy", info.npy_descr())?;
        d.set_item("ml_dtypes", info.ml_dtypes)?;
        d.set_item("torch", info.torch.map(|_| info.name))?;
        let storage = match info.torch {
            Some(TorchStorage::Typed(class)) => Some(class),
            _ => None,
        };
        d.set_item("torch_storage", storage)?;
        out.append(d)?;
    }
    Ok(out)
}

/// Every checkpoint format, one dict each, from the engine's one format table: ``name``,
/// ``keys`` (the ``format:`` spellings), ``extensions``, ``index_name`` and ``single_name``
/// (the weight index and the unsharded file of a directory output, or ``None``).
#[pyfunction]
fn formats(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let out = PyList::empty(py);
    for info in &crate::formats::Format::TABLE {
        let d = PyDict::new(py);
        d.set_item("name", info.name)?;
        d.set_item("keys", info.keys.to_vec())?;
        d.set_item("extensions", info.extensions.to_vec())?;
        d.set_item("index_name", info.index_name)?;
        d.set_item("single_name", info.single_name)?;
        out.append(d)?;
    }
    Ok(out)
}

#[pymodule]
fn _core(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
    module.add_function(wrap_pyfunction!(run, module)?)?;
    module.add_function(wrap_pyfunction!(check, module)?)?;
    module.add_function(wrap_pyfunction!(open, module)?)?;
    module.add_function(wrap_pyfunction!(cli_main, module)?)?;
    module.add_function(wrap_pyfunction!(dtypes, module)?)?;
    module.add_function(wrap_pyfunction!(formats, module)?)?;
    module.add_function(wrap_pyfunction!(transform_specs, module)?)?;
    module.add_function(wrap_pyfunction!(dlpack, module)?)?;
    module.add_function(wrap_pyfunction!(borrow, module)?)?;
    module.add_function(wrap_pyfunction!(save, module)?)?;
    module.add_function(wrap_pyfunction!(to_yaml, module)?)?;
    module.add_function(wrap_pyfunction!(plan_document, module)?)?;
    module.add_function(wrap_pyfunction!(from_mergekit, module)?)?;
    module.add_class::<PyCheckpoint>()?;
    module.add_class::<PyTensorBuffer>()?;
    module.add_class::<session::PyComputedBuffer>()?;
    module.add_class::<session::PySession>()?;
    module.add_class::<session::PyTensors>()?;
    errors::register(module)?;
    crate::formats::hub::set_fetcher(Box::new(hub_download));
    Ok(())
}

/// The engine's fetcher for `hf://` models not in the cache: `brainsurgery._hub.download`
/// (`huggingface_hub.snapshot_download` of the weight and config files when it is installed).
fn hub_download(repo: &str, revision: &str) -> Result<Option<std::path::PathBuf>, String> {
    Python::attach(|py| -> PyResult<Option<std::path::PathBuf>> {
        let patterns = crate::formats::hub::DOWNLOAD_PATTERNS.to_vec();
        let folder = py
            .import("brainsurgery._hub")?
            .call_method1("download", (repo, revision, patterns))?;
        if folder.is_none() {
            return Ok(None);
        }
        Ok(Some(std::path::PathBuf::from(folder.extract::<String>()?)))
    })
    .map_err(|e| e.to_string())
}

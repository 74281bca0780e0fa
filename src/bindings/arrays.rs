//! Arrays across the boundary without copying, both ways.
//!
//! In: [`borrow_array`] turns a NumPy array (read through rust-numpy's `PyUntypedArray`), anything
//! exporting DLPack (a torch or JAX CPU tensor, through dlpark), or anything with the array
//! interface or the buffer protocol (made a NumPy array first, which views it) into an engine
//! [`Tensor`] whose bytes are the caller's memory, kept alive by the tensor. Copies are made only
//! where the engine cannot read the memory as it is: non-contiguous arrays and big-endian ones
//! (documented in docs/python.md); everything else is refused with a `TypeError` or
//! `ValueError` that says why.
//!
//! Out: [`dlpack`] builds a DLPack capsule (legacy or versioned, as the consumer asks) over a
//! NumPy array's memory for every dtype the engine knows — bfloat16 and float8 included, which
//! NumPy's own `__dlpack__` refuses — holding a reference to the array until the consumer's
//! deleter runs. `brainsurgery.Array.__dlpack__` calls it, so `torch.from_dlpack(ck[name])` views
//! the mapped file.

use std::ffi::c_void;
use std::sync::Arc;

use dlpark::ffi::{DLDataType, DLDataTypeCode, DLDevice, DLDeviceType, DLManagedTensor, DLManagedTensorVersioned};
use dlpark::metadata::Dynamic;
use dlpark::python::ImportRequest;
use dlpark::{AllocationDeleter, DlpackFlags, Managed};
use numpy::{PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::IntoPyDict;

use crate::dtype::DType;
use crate::value::{Bytes, Tensor};

use super::type_name;

/// The NumPy dtype of every engine dtype NumPy (or ml_dtypes) can hold, from the engine's one
/// dtype table (as `brainsurgery._checkpoint.numpy_dtype` builds them), made once per process.
static NUMPY_DTYPES: PyOnceLock<Vec<(Py<PyArrayDescr>, DType)>> = PyOnceLock::new();

fn numpy_dtypes(py: Python<'_>) -> PyResult<&Vec<(Py<PyArrayDescr>, DType)>> {
    NUMPY_DTYPES.get_or_try_init(py, || {
        let mut out = Vec::new();
        let ml_dtypes = py.import("ml_dtypes").ok();
        for info in &DType::TABLE {
            // Packed sub-byte formats have no NumPy layout (ml_dtypes stores one per byte).
            if info.dtype.size().is_none() {
                continue;
            }
            let descr = if info.ml_dtypes {
                // An older ml_dtypes may lack a type: that dtype then has no NumPy form here.
                match ml_dtypes.as_ref().and_then(|m| m.getattr(info.name).ok()) {
                    Some(scalar) => PyArrayDescr::new(py, &scalar)?,
                    None => continue,
                }
            } else {
                match info.npy_descr() {
                    Some(descr) => PyArrayDescr::new(py, descr.as_str())?,
                    None => continue,
                }
            };
            out.push((descr.unbind(), info.dtype));
        }
        Ok(out)
    })
}

/// The engine dtype of a NumPy dtype in native (little-endian) byte order.
fn dtype_of_descr(descr: &Bound<'_, PyArrayDescr>) -> PyResult<Option<DType>> {
    let py = descr.py();
    Ok(numpy_dtypes(py)?
        .iter()
        .find(|(candidate, _)| descr.is_equiv_to(candidate.bind(py)))
        .map(|&(_, dtype)| dtype))
}

fn unknown_dtype(shown: &str) -> PyErr {
    let known: Vec<&str> = DType::TABLE
        .iter()
        .filter(|d| d.dtype.size().is_some())
        .map(|d| d.name)
        .collect();
    PyTypeError::new_err(format!(
        "arrays of dtype {shown} cannot be tensors; brainsurgery tensors are {}",
        known.join(", ")
    ))
}

/// The DLPack type of an engine dtype (DLPack 1.x codes for bfloat16 and the float8 formats);
/// `None` for the packed sub-byte formats, which have no NumPy form to export from.
pub(crate) fn dl_dtype(dtype: DType) -> Option<DLDataType> {
    use DLDataTypeCode as C;
    let (code, bits) = match dtype {
        DType::Bool => (C::BOOL, 8),
        DType::U8 => (C::UINT, 8),
        DType::U16 => (C::UINT, 16),
        DType::U32 => (C::UINT, 32),
        DType::U64 => (C::UINT, 64),
        DType::I8 => (C::INT, 8),
        DType::I16 => (C::INT, 16),
        DType::I32 => (C::INT, 32),
        DType::I64 => (C::INT, 64),
        DType::F16 => (C::FLOAT, 16),
        DType::F32 => (C::FLOAT, 32),
        DType::F64 => (C::FLOAT, 64),
        DType::BF16 => (C::BFLOAT, 16),
        DType::C64 => (C::COMPLEX, 64),
        DType::F8E5M2 => (C::FLOAT8_E5M2, 8),
        DType::F8E4M3 => (C::FLOAT8_E4M3FN, 8),
        DType::F8E8M0 => (C::FLOAT8_E8M0FNU, 8),
        DType::F4 | DType::F6E2M3 | DType::F6E3M2 => return None,
    };
    Some(DLDataType::scalar(code, bits))
}

/// The engine dtype of a DLPack type (one lane, whole bytes).
fn dtype_of_dl(dl: DLDataType) -> Option<DType> {
    if dl.lanes != 1 {
        return None;
    }
    DType::ALL
        .into_iter()
        .find(|&d| dl_dtype(d).is_some_and(|known| known.matches(dl)))
}

/// What keeps borrowed memory alive.
enum Owner {
    /// A NumPy array (or the object it views): a strong reference.
    Python(Py<PyAny>),
    /// An imported DLPack tensor: its producer's deleter runs when this is dropped.
    Dlpack(AllocationDeleter),
}

/// Bytes of memory that Python owns, borrowed without a copy for as long as the tensor lives.
struct Borrowed {
    ptr: *const u8,
    len: usize,
    /// Whether the memory is the caller's own array (not a copy the engine made of it): only
    /// then may a view of it be handed back.
    lent: bool,
    /// `Some` until dropped.
    owner: Option<Owner>,
}

// SAFETY: the pointer is only read, through `bytes()`, while `owner` keeps the memory alive; the
// owner is a Python reference (which PyO3 lets any thread hold and drop: a drop on a thread not
// attached to the interpreter is deferred to PyO3's reference pool and applied at the next
// attach) or a DLPack deleter (callable once from any thread by the DLPack contract; `Drop`
// below calls it attached to the interpreter all the same, see there).
unsafe impl Send for Borrowed {}
// SAFETY: shared access only reads the bytes; nothing is mutated through `&self`.
unsafe impl Sync for Borrowed {}

impl std::fmt::Debug for Borrowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.owner {
            Some(Owner::Python(_)) => "array",
            Some(Owner::Dlpack(_)) => "DLPack tensor",
            None => "released",
        };
        write!(f, "Borrowed({kind}, {} bytes at {:p})", self.len, self.ptr)
    }
}

impl Bytes for Borrowed {
    fn lent_by_host(&self) -> bool {
        self.lent
    }

    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            // An empty array's data pointer may be null or dangling.
            return &[];
        }
        // SAFETY: `ptr..ptr + len` is the contiguous memory of the array or DLPack tensor that
        // `owner` keeps alive until `self` is dropped (NumPy's data pointer and byte size, or the
        // DLPack descriptor's, validated by dlpark). The engine only copies these bytes out. If
        // Python code writes into the array while the engine reads it (another thread, with the
        // GIL released during a save), the bytes read are whatever was there: the documented rule
        // is not to modify an array while it is being written.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        match self.owner.take() {
            // PyO3: a decref now when attached, else deferred to its pool (never blocks).
            Some(Owner::Python(obj)) => drop(obj),
            // A producer's deleter may touch Python objects (NumPy's takes the GIL itself; a less
            // careful one might not), so it runs attached. During interpreter shutdown nothing
            // can attach and the tensor is leaked, as NumPy's own deleter does then.
            Some(Owner::Dlpack(deleter)) => {
                let mut slot = Some(deleter);
                let _ = Python::try_attach(|_| drop(slot.take()));
                if let Some(deleter) = slot {
                    std::mem::forget(deleter);
                }
            }
            None => {}
        }
    }
}

/// How an array was taken in: for tests and reports (`_core.borrow`).
#[derive(Debug, Clone)]
pub(crate) struct BorrowInfo {
    /// Address of the first byte the engine reads.
    pub address: usize,
    /// Whether the engine reads a copy (non-contiguous or big-endian input).
    pub copied: bool,
    /// Which protocol the array came through: `numpy`, `dlpack`, `buffer`.
    pub via: &'static str,
}

/// Takes an array-like object in without copying it: a NumPy array of any engine dtype (bfloat16
/// and float8 from ml_dtypes included), anything exporting `__dlpack__` (torch, JAX; CPU only), or
/// anything exporting the array interface or the buffer protocol. Returns an engine tensor whose
/// bytes borrow the object's memory and keep it alive. Non-contiguous and big-endian arrays are
/// copied (the engine reads row-major little-endian bytes). `TypeError` for anything else, a
/// dtype the engine lacks or an object array; `ValueError` for a tensor on another device.
pub(crate) fn borrow_array(obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    borrow_array_info(obj).map(|(tensor, _)| tensor)
}

/// [`borrow_array`], also saying how the array was taken in.
pub(crate) fn borrow_array_info(obj: &Bound<'_, PyAny>) -> PyResult<(Tensor, BorrowInfo)> {
    let py = obj.py();
    // The cast imports NumPy's C API on first use (not at `import brainsurgery`).
    if let Ok(array) = obj.cast::<PyUntypedArray>() {
        return borrow_numpy(array, false, "numpy");
    }
    if obj.hasattr("__dlpack__")? {
        return borrow_dlpack(obj);
    }
    // SAFETY: `obj` is a valid object; the check only looks at its type's buffer slot.
    let buffer = unsafe { pyo3::ffi::PyObject_CheckBuffer(obj.as_ptr()) } == 1;
    if buffer || obj.hasattr("__array_interface__")? || obj.hasattr("__array_struct__")? {
        // NumPy views these without a copy; the view holds the object.
        let array = py.import("numpy")?.call_method1("asarray", (obj,))?;
        let array = array.cast::<PyUntypedArray>()?;
        return borrow_numpy(array, false, "buffer");
    }
    Err(PyTypeError::new_err(format!(
        "a {} is not an array: give a NumPy array, or a tensor exporting __dlpack__ (torch, JAX) or the array interface",
        type_name(obj)
    )))
}

fn borrow_numpy(array: &Bound<'_, PyUntypedArray>, copied: bool, via: &'static str) -> PyResult<(Tensor, BorrowInfo)> {
    let descr = array.dtype();
    if descr.has_object() {
        return Err(PyTypeError::new_err(
            "arrays of Python objects (dtype object) cannot be tensors: convert to a numeric dtype first",
        ));
    }
    let dtype = match dtype_of_descr(&descr)? {
        Some(dtype) => dtype,
        None => {
            // Big-endian (or byte-swapped) arrays of a known dtype: a little-endian copy.
            if descr.is_native_byteorder() == Some(false) {
                let little = descr.call_method1("newbyteorder", ("<",))?;
                let copy = array.call_method1("astype", (little,))?;
                return borrow_numpy(copy.cast::<PyUntypedArray>()?, true, via);
            }
            return Err(unknown_dtype(&descr.str()?.to_string()));
        }
    };
    if !array.is_c_contiguous() {
        let copy = array.call_method("copy", (), Some(&[("order", "C")].into_py_dict(array.py())?))?;
        return borrow_numpy(copy.cast::<PyUntypedArray>()?, true, via);
    }
    let shape = array.shape().to_vec();
    let len = dtype
        .nbytes(crate::dtype::checked_numel(&shape).unwrap_or(usize::MAX))
        .ok_or_else(|| PyValueError::new_err(format!("an array of shape {shape:?} is too large to address")))?;
    // SAFETY: `array` is a live NumPy array (checked by the cast); its fields are read while the
    // GIL is held.
    let data = unsafe { (*numpy::npyffi::_PyArray_GET_ITEM_DATA(array.as_array_ptr())).data } as *const u8;
    let bytes = Borrowed {
        ptr: data,
        len,
        lent: !copied,
        owner: Some(Owner::Python(array.clone().into_any().unbind())),
    };
    let info = BorrowInfo {
        address: data as usize,
        copied,
        via,
    };
    Ok((Tensor::in_memory(dtype, shape, Arc::new(bytes)), info))
}

/// The DLPack device of an object, refused unless it is the CPU.
fn check_cpu(request: &ImportRequest<'_>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
    // Producers without `__dlpack_device__` (bare capsules, legacy ones) are checked after import.
    let Ok(device) = request.device() else {
        return Ok(());
    };
    cpu_only(device, obj)
}

fn cpu_only(device: DLDevice, obj: &Bound<'_, PyAny>) -> PyResult<()> {
    if device.device_type == DLDeviceType::CPU {
        return Ok(());
    }
    let name = match device.device_type {
        DLDeviceType::CUDA => "CUDA",
        DLDeviceType::CUDAHOST => "CUDA host",
        DLDeviceType::ROCM => "ROCm",
        DLDeviceType::METAL => "Metal",
        DLDeviceType::CUDAMANAGED => "CUDA managed",
        _ => "a device",
    };
    Err(PyValueError::new_err(format!(
        "the {} is on {name} (DLPack device type {}, id {}); brainsurgery reads tensors in CPU memory: move it to the CPU first with .cpu()",
        type_name(obj),
        device.device_type.0,
        device.device_id
    )))
}

fn borrow_dlpack(obj: &Bound<'_, PyAny>) -> PyResult<(Tensor, BorrowInfo)> {
    // torch exports the memory of a tensor with a lazy conjugate or negative bit as it is stored,
    // without the bit (`z.conj()` would be saved unconjugated): resolved first, a copy.
    // Only callable `is_conj`/`is_neg` count (torch's methods); resolved once, then imported
    // without looking again (an object whose resolution keeps the bit cannot loop).
    let lazy_bit = |name: &str| -> PyResult<bool> {
        match obj.getattr(name) {
            Ok(method) if method.is_callable() => method.call0()?.is_truthy(),
            _ => Ok(false),
        }
    };
    if lazy_bit("is_conj")? || lazy_bit("is_neg")? {
        let resolved = obj.call_method0("resolve_conj")?.call_method0("resolve_neg")?;
        return import_dlpack(obj, &resolved, true);
    }
    import_dlpack(obj, obj, false)
}

/// Imports `source` (`obj` itself, or its resolved copy when `resolved`: memory the engine then
/// owns, never handed back as the caller's) through DLPack; `obj` names the object in messages.
fn import_dlpack(obj: &Bound<'_, PyAny>, source: &Bound<'_, PyAny>, resolved: bool) -> PyResult<(Tensor, BorrowInfo)> {
    let request = ImportRequest::new(source.as_borrowed())?;
    check_cpu(&request, obj)?;
    let imported = request.import(None, None)?;
    let invalid = |e: dlpark::tensor::Error| {
        PyBufferError::new_err(format!("{} gave an invalid DLPack tensor: {e}", type_name(obj)))
    };
    let (dtype, shape, compact, address, strides) = {
        let view = imported.validate().map_err(invalid)?;
        cpu_only(view.device(), obj)?;
        let dl = view.dtype();
        let dtype = dtype_of_dl(dl).ok_or_else(|| {
            unknown_dtype(&format!(
                "DLPack code {} with {} bits and {} lanes",
                dl.code.0, dl.bits, dl.lanes
            ))
        })?;
        let shape: Vec<usize> = view
            .shape()
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<_, _>>()
            .map_err(|_| PyBufferError::new_err("a DLPack tensor has a negative dimension"))?;
        let compact = view.is_compact().map_err(invalid)?;
        let strides = view.strides_or_compact().map_err(invalid)?.into_owned();
        // SAFETY: only the address is computed (data + byte_offset); nothing is read here.
        let address = unsafe { view.offset_bytes_ptr() }.map_err(invalid)? as usize;
        (dtype, shape, compact, address, strides)
    };
    let size = dtype.size().expect("DLPack dtypes are whole bytes");
    let numel = crate::dtype::checked_numel(&shape)
        .ok_or_else(|| PyValueError::new_err(format!("a tensor of shape {shape:?} is too large to address")))?;
    let len = numel
        .checked_mul(size)
        .ok_or_else(|| PyValueError::new_err(format!("a tensor of shape {shape:?} is too large to address")))?;
    if compact || numel == 0 {
        let bytes = Borrowed {
            ptr: address as *const u8,
            len,
            lent: !resolved,
            owner: Some(Owner::Dlpack(imported.into_deleter())),
        };
        let info = BorrowInfo {
            address,
            copied: resolved,
            via: "dlpack",
        };
        return Ok((Tensor::in_memory(dtype, shape, Arc::new(bytes)), info));
    }
    // Non-contiguous (a transposed torch tensor): gathered into row-major order, an owned copy.
    let mut out = crate::value::try_filled("borrowing a non-contiguous tensor", len, 0u8)
        .map_err(|e| pyo3::exceptions::PyMemoryError::new_err(e.to_string()))?;
    let mut index = vec![0usize; shape.len()];
    for element in 0..numel {
        let mut offset: isize = 0;
        for (i, &s) in index.iter().zip(&strides) {
            offset = offset.wrapping_add((*i as isize).wrapping_mul(s as isize).wrapping_mul(size as isize));
        }
        // SAFETY: the producer's descriptor says element `index` starts at `address + offset`
        // (its strides, in elements); `imported` keeps that memory alive until after the copy.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (address as *const u8).wrapping_offset(offset),
                out.as_mut_ptr().add(element * size),
                size,
            );
        }
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    drop(imported);
    let info = BorrowInfo {
        address: out.as_ptr() as usize,
        copied: true,
        via: "dlpack",
    };
    Ok((Tensor::in_memory(dtype, shape, Arc::new(out)), info))
}

/// Keeps the exported NumPy array alive until the DLPack consumer's deleter runs. The deleter may
/// run on any thread (torch frees tensors wherever their last reference goes); dropping a `Py`
/// off the interpreter is deferred by PyO3 to the next attach, so it never blocks or crashes.
struct ExportOwner(#[allow(dead_code)] Py<PyAny>);

/// A DLPack capsule over `array`'s memory (see the module docs). Arguments as the array API's
/// `__dlpack__`: `max_version` (a tuple; a major version ≥ 1 gets the versioned ABI, with the
/// `READ_ONLY` flag when the array is not writeable), `dl_device` (only the CPU, `(1, 0)`),
/// `copy` (`True` exports a fresh copy flagged `IS_COPIED`; `False` or `None`: no copy) and
/// `stream` (must be `None` or `-1` on the CPU).
pub(crate) fn dlpack<'py>(
    array: &Bound<'py, PyAny>,
    stream: Option<&Bound<'py, PyAny>>,
    max_version: Option<(u32, u32)>,
    dl_device: Option<(u32, i32)>,
    copy: Option<bool>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = array.py();
    let Ok(untyped) = array.cast::<PyUntypedArray>() else {
        return Err(PyTypeError::new_err(format!(
            "DLPack export takes a NumPy array, not a {}",
            type_name(array)
        )));
    };
    if let Some(stream) = stream {
        if !stream.is_none() && stream.extract::<i64>().ok() != Some(-1) {
            return Err(PyValueError::new_err("stream must be None (or -1) for CPU arrays"));
        }
    }
    if let Some((device_type, device_id)) = dl_device {
        if device_type != DLDeviceType::CPU.0 || device_id != 0 {
            return Err(PyBufferError::new_err(format!(
                "the array is in CPU memory (1, 0) and cannot be exported to device ({device_type}, {device_id})"
            )));
        }
    }
    let copied = copy == Some(true);
    let source = if copied {
        untyped.call_method0("copy")?.cast_into::<PyUntypedArray>()?
    } else {
        untyped.clone()
    };
    let descr = source.dtype();
    let dtype = dtype_of_descr(&descr)?
        .ok_or_else(|| unknown_dtype(&descr.str().map(|s| s.to_string()).unwrap_or_default()))?;
    let dl = dl_dtype(dtype).expect("NumPy dtypes are whole bytes");
    let size = dtype.size().expect("NumPy dtypes are whole bytes") as isize;
    let shape: Vec<i64> = source.shape().iter().map(|&d| d as i64).collect();
    let strides: Vec<i64> = source
        .strides()
        .iter()
        .map(|&s| if s % size == 0 && s >= 0 { Ok((s / size) as i64) } else { Err(()) })
        .collect::<Result<_, _>>()
        .map_err(|()| {
            // Negative strides (`a[::-1]`) are refused too: torch computes a storage size from
            // them and fails ("Storage size calculation overflowed"), as NumPy's own export does.
            PyBufferError::new_err(
                "DLPack export needs non-negative strides that are whole elements; copy the array with numpy.ascontiguousarray first",
            )
        })?;
    // SAFETY: `source` is a live NumPy array; its fields are read with the GIL held.
    let fields = unsafe { &*numpy::npyffi::_PyArray_GET_ITEM_DATA(source.as_array_ptr()) };
    let data = fields.data as *mut c_void;
    let writeable = fields.flags & numpy::npyffi::NPY_ARRAY_WRITEABLE != 0;
    let versioned = max_version.is_some_and(|(major, _)| major >= 1);
    let owner = Box::new(ExportOwner(source.into_any().unbind()));
    let metadata = Dynamic::new(shape, strides);
    let error = |e: &dyn std::fmt::Display| PyBufferError::new_err(format!("cannot export the array: {e}"));
    if versioned {
        let mut init = metadata
            .prepare_as::<DLManagedTensorVersioned>()
            .map_err(|e| error(&e))?
            .initialize(owner);
        init.set_data(data).set_device(DLDevice::CPU).set_dtype(dl);
        // Declare the version the consumer asked for when it is older than ours (same major).
        if let Some((major, minor)) = max_version {
            let current = init.version();
            if major == current.major && minor < current.minor {
                init.set_version(dlpark::ffi::DLPackVersion { major, minor })
                    .map_err(|e| error(&e))?;
            }
        }
        let mut flags = DlpackFlags::empty();
        if !writeable && !copied {
            flags |= DlpackFlags::READ_ONLY;
        }
        if copied {
            flags |= DlpackFlags::IS_COPIED;
        }
        // SAFETY: READ_ONLY only restricts consumers; IS_COPIED is set only for the fresh copy
        // made above, which nothing but this capsule references.
        unsafe { init.set_flags_unchecked(flags) };
        // SAFETY: data, shape and strides describe `source`'s memory, which the owner in the
        // managed tensor's context keeps alive until the consumer calls the deleter.
        let managed: Managed<DLManagedTensorVersioned> = unsafe { init.finish() };
        Ok(managed.into_pyobject(py)?)
    } else {
        let mut init = metadata
            .prepare_as::<DLManagedTensor>()
            .map_err(|e| error(&e))?
            .initialize(owner);
        init.set_data(data).set_device(DLDevice::CPU).set_dtype(dl);
        // SAFETY: as above; the legacy ABI has no flags.
        let managed: Managed<DLManagedTensor> = unsafe { init.finish() };
        Ok(managed.into_pyobject(py)?)
    }
}

/// [`borrow_array_info`] for a tensor kept past the call (a session): DLPack imports are copied.
/// torch can free the memory of a tensor it exported while the export lives (`resize_`, FSDP
/// freeing a parameter's storage), which NumPy's reference checks prevent for its arrays; a
/// session may read the tensor at any later time, so it keeps its own copy. `bs.save` reads them
/// in place during the call.
pub(crate) fn keep_array(obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    let (tensor, info) = borrow_array_info(obj)?;
    if info.via != "dlpack" || info.copied {
        return Ok(tensor);
    }
    let crate::value::Value::Memory(bytes) = &*tensor.value else {
        return Ok(tensor);
    };
    let mut owned = Vec::new();
    owned
        .try_reserve_exact(bytes.bytes().len())
        .map_err(|_| pyo3::exceptions::PyMemoryError::new_err("no memory to copy the tensor handed in"))?;
    owned.extend_from_slice(bytes.bytes());
    Ok(Tensor::in_memory(tensor.dtype, tensor.shape.clone(), Arc::new(owned)))
}

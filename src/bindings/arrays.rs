//! Arrays handed in from Python, borrowed as engine tensors without a copy.

use std::sync::Arc;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use crate::dtype::DType;
use crate::value::{Bytes, Tensor};

/// A C-contiguous Python buffer, held (so its memory stays put and alive) while the engine reads
/// it.
struct Borrowed(PyBuffer<u8>);

impl std::fmt::Debug for Borrowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Borrowed({} bytes)", self.0.len_bytes())
    }
}

impl Bytes for Borrowed {
    fn bytes(&self) -> &[u8] {
        // SAFETY: the buffer export keeps the memory valid and unmoved until it is released on
        // drop; it was checked C-contiguous, so its `len_bytes` bytes are one run.
        unsafe { std::slice::from_raw_parts(self.0.buf_ptr() as *const u8, self.0.len_bytes()) }
    }
}

/// Borrows a NumPy array (C-contiguous, a dtype the engine knows) as a tensor.
pub(crate) fn borrow_array(obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    let py = obj.py();
    let np = py.import("numpy")?;
    if !obj.is_instance(&np.getattr("ndarray")?)? {
        return Err(PyTypeError::new_err(format!(
            "expected a NumPy array, not {}",
            obj.get_type().name()?
        )));
    }
    let name: String = obj.getattr("dtype")?.getattr("name")?.extract()?;
    let dtype =
        DType::parse(&name).ok_or_else(|| PyTypeError::new_err(format!("arrays of dtype {name} cannot be tensors")))?;
    let shape: Vec<usize> = obj.getattr("shape")?.extract()?;
    let contiguous = np.call_method1("ascontiguousarray", (obj,))?;
    let flat = contiguous
        .call_method1("view", ("uint8",))?
        .call_method1("reshape", (-1,))?;
    let buffer = PyBuffer::<u8>::get(&flat)?;
    Ok(Tensor::in_memory(dtype, shape, Arc::new(Borrowed(buffer))))
}

//! Python wrappers over `crate::io`: memory-mapped checkpoints whose tensors reach torch without
//! a copy, and atomic safetensors writing from any buffer-protocol object.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyMemoryView;

use super::errors::run_detached;
use super::tensor::{NativeTensor, Storage};
use crate::io::{safetensors::write_safetensors, Checkpoint, Dtype, TensorSpec};

/// A Hugging Face checkpoint (one safetensors file, a folder, or a sharded index), memory-mapped.
#[pyclass(module = "ferrotune._native", name = "Checkpoint", frozen)]
pub struct PyCheckpoint {
    inner: Arc<Checkpoint>,
}

#[pymethods]
impl PyCheckpoint {
    /// Opens and validates every header; no tensor bytes are read.
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = run_detached(py, move || Checkpoint::open(&path))?;
        Ok(PyCheckpoint {
            inner: Arc::new(inner),
        })
    }

    /// Tensor names, by shard then position in the file.
    fn keys(&self) -> Vec<String> {
        self.inner.names().to_vec()
    }

    fn __len__(&self) -> usize {
        self.inner.names().len()
    }

    fn __contains__(&self, name: &str) -> bool {
        self.inner.get(name).is_some()
    }

    /// `(dtype, shape)` of a tensor.
    fn info(&self, name: &str) -> PyResult<(&'static str, Vec<usize>)> {
        let (_, t) = self
            .inner
            .get(name)
            .ok_or_else(|| PyKeyError::new_err(name.to_string()))?;
        Ok((t.dtype.as_str(), t.shape.clone()))
    }

    /// The tensor's bytes as a `NativeTensor` over the memory map (zero-copy).
    fn get(&self, name: &str) -> PyResult<NativeTensor> {
        let (file, t) = self
            .inner
            .get(name)
            .ok_or_else(|| PyKeyError::new_err(name.to_string()))?;
        let storage: Arc<dyn Storage> = file.mmap().clone();
        Ok(NativeTensor::view(
            storage,
            file.data_start() + t.begin,
            t.end - t.begin,
            t.dtype,
            t.shape.clone(),
        ))
    }

    /// The `__metadata__` of the first file.
    fn metadata(&self) -> BTreeMap<String, String> {
        self.inner
            .files()
            .first()
            .map(|f| f.metadata().clone())
            .unwrap_or_default()
    }

    /// The safetensors files behind this checkpoint.
    fn files(&self) -> Vec<PathBuf> {
        self.inner
            .files()
            .iter()
            .map(|f| f.path().to_path_buf())
            .collect()
    }
}

/// A borrowed buffer, readable while the GIL is released (its owner is kept alive by `PyBuffer`).
struct RawBytes(*const u8, usize);
// SAFETY: the pointee is only read, and the PyBuffer that pins it outlives every use.
unsafe impl Send for RawBytes {}

/// Writes tensors to `path` atomically: `tensors` is a list of `(name, dtype, shape, buffer)`
/// where `buffer` is any C-contiguous buffer-protocol object holding exactly the tensor's bytes.
#[pyfunction]
#[pyo3(signature = (path, tensors, metadata=None))]
fn save_safetensors(
    py: Python<'_>,
    path: PathBuf,
    tensors: Vec<(String, String, Vec<usize>, Bound<'_, PyAny>)>,
    metadata: Option<BTreeMap<String, String>>,
) -> PyResult<()> {
    let mut buffers = Vec::with_capacity(tensors.len());
    let mut items = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, obj) in tensors {
        let dtype: Dtype = dtype
            .parse()
            .map_err(|e: String| PyValueError::new_err(format!("tensor {name:?}: {e}")))?;
        // Any C-contiguous buffer, viewed as bytes whatever its element format.
        let bytes_view = PyMemoryView::from(&obj)?
            .call_method1("cast", ("B",))
            .map_err(|e| {
                PyValueError::new_err(format!(
                    "tensor {name:?}: needs a C-contiguous buffer ({e})"
                ))
            })?;
        let buffer = PyBuffer::<u8>::get(&bytes_view)?;
        let spec = TensorSpec::new(name, dtype, shape);
        if spec.nbytes() != buffer.len_bytes() {
            return Err(PyValueError::new_err(format!(
                "tensor {:?}: {} {:?} needs {} bytes, buffer holds {}",
                spec.name,
                dtype,
                spec.shape,
                spec.nbytes(),
                buffer.len_bytes()
            )));
        }
        items.push((
            spec,
            RawBytes(buffer.buf_ptr() as *const u8, buffer.len_bytes()),
        ));
        buffers.push(buffer);
    }
    let metadata = metadata.unwrap_or_default();
    run_detached(py, move || {
        let items = items;
        let slices: Vec<(TensorSpec, &[u8])> = items
            .iter()
            .map(|(spec, raw)| {
                // SAFETY: `buffers` pins each buffer until this call returns.
                (
                    spec.clone(),
                    if raw.1 == 0 {
                        &[][..]
                    } else {
                        unsafe { std::slice::from_raw_parts(raw.0, raw.1) }
                    },
                )
            })
            .collect();
        write_safetensors(&path, &slices, &metadata)
    })?;
    drop(buffers);
    Ok(())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCheckpoint>()?;
    m.add_function(wrap_pyfunction!(save_safetensors, m)?)?;
    Ok(())
}

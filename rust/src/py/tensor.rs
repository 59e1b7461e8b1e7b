//! `NativeTensor`: Rust-owned bytes (a `Vec`, or a slice of a memory-mapped file) that Python
//! consumers wrap without a copy through DLPack (`torch.from_dlpack`, `numpy.from_dlpack`).

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::io::Dtype;

/// Memory that keeps a tensor's bytes alive for as long as any view of them exists.
pub(crate) trait Storage: Send + Sync {
    fn bytes(&self) -> &[u8];
}

impl<T: bytemuck_lite::Pod> Storage for Vec<T> {
    fn bytes(&self) -> &[u8] {
        bytemuck_lite::as_bytes(self)
    }
}

impl Storage for memmap2::MmapMut {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// Plain-old-data element types whose `Vec` can be viewed as bytes.
mod bytemuck_lite {
    /// # Safety
    /// Implementors have no padding and no invalid bit patterns.
    pub unsafe trait Pod: Copy + Send + Sync + 'static {}
    unsafe impl Pod for u8 {}
    unsafe impl Pod for i8 {}
    unsafe impl Pod for u16 {}
    unsafe impl Pod for i16 {}
    unsafe impl Pod for u32 {}
    unsafe impl Pod for i32 {}
    unsafe impl Pod for u64 {}
    unsafe impl Pod for i64 {}
    unsafe impl Pod for f32 {}
    unsafe impl Pod for f64 {}
    unsafe impl Pod for half::f16 {}
    unsafe impl Pod for half::bf16 {}

    pub fn as_bytes<T: Pod>(v: &[T]) -> &[u8] {
        // SAFETY: T is Pod, so every byte of the slice is initialised and readable.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
    }
}

pub(crate) use bytemuck_lite::Pod;

/// A tensor whose bytes Rust owns. Consumed with `torch.from_dlpack(t)`: no copy is made, and
/// the memory lives until the last view of it is gone.
#[pyclass(module = "ferrotune._native", frozen)]
pub struct NativeTensor {
    storage: Arc<dyn Storage>,
    offset: usize,
    nbytes: usize,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl NativeTensor {
    /// Wraps a whole typed vector, e.g. `Vec<i32>` with dtype `I32`.
    #[allow(dead_code)] // the data and quant bindings hand their outputs over with it
    pub(crate) fn from_vec<T: Pod>(data: Vec<T>, dtype: Dtype, shape: Vec<usize>) -> Self {
        let nbytes = std::mem::size_of_val(data.as_slice());
        debug_assert_eq!(nbytes, shape.iter().product::<usize>() * dtype.size());
        NativeTensor {
            storage: Arc::new(data),
            offset: 0,
            nbytes,
            dtype,
            shape,
        }
    }

    /// A view of `nbytes` bytes at `offset` in shared storage (e.g. a memory-mapped file).
    pub(crate) fn view(
        storage: Arc<dyn Storage>,
        offset: usize,
        nbytes: usize,
        dtype: Dtype,
        shape: Vec<usize>,
    ) -> Self {
        assert!(
            offset + nbytes <= storage.bytes().len(),
            "view past the end of its storage"
        );
        NativeTensor {
            storage,
            offset,
            nbytes,
            dtype,
            shape,
        }
    }

    fn base_ptr(&self) -> *const u8 {
        // `wrapping_add` keeps an empty view at the end of its storage well defined.
        self.storage.bytes().as_ptr().wrapping_add(self.offset)
    }
}

// --- DLPack (v0.8 ABI: the unversioned `dltensor` capsule every consumer accepts) ---

#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// The managed tensor plus what it points into; `managed` is first so the two share an address.
#[repr(C)]
struct Managed {
    managed: DLManagedTensor,
    shape: Vec<i64>,
    _storage: Arc<dyn Storage>,
}

const DL_CPU: i32 = 1;
const CAPSULE_NAME: &CStr = c"dltensor";

fn dl_dtype(dtype: Dtype) -> Option<DLDataType> {
    let (code, bits) = match dtype {
        Dtype::Bool => (6, 8),
        Dtype::U8 => (1, 8),
        Dtype::I8 => (0, 8),
        Dtype::I16 => (0, 16),
        Dtype::U16 => (1, 16),
        Dtype::F16 => (2, 16),
        Dtype::BF16 => (4, 16),
        Dtype::I32 => (0, 32),
        Dtype::U32 => (1, 32),
        Dtype::F32 => (2, 32),
        Dtype::F64 => (2, 64),
        Dtype::I64 => (0, 64),
        Dtype::U64 => (1, 64),
        Dtype::F8E4M3 | Dtype::F8E5M2 => return None,
    };
    Some(DLDataType {
        code,
        bits,
        lanes: 1,
    })
}

unsafe extern "C" fn delete_managed(tensor: *mut DLManagedTensor) {
    // SAFETY: `tensor` came from `Box::into_raw(Box<Managed>)` in `__dlpack__`, and DLPack calls
    // the deleter exactly once.
    unsafe { drop(Box::from_raw(tensor.cast::<Managed>())) }
}

unsafe extern "C" fn capsule_destructor(capsule: *mut pyo3::ffi::PyObject) {
    // A consumer renames the capsule to "used_dltensor" and takes over the deleter; only a
    // capsule nobody consumed still owns its tensor.
    unsafe {
        if pyo3::ffi::PyCapsule_IsValid(capsule, CAPSULE_NAME.as_ptr()) == 1 {
            let tensor = pyo3::ffi::PyCapsule_GetPointer(capsule, CAPSULE_NAME.as_ptr())
                .cast::<DLManagedTensor>();
            if let Some(deleter) = tensor.as_ref().and_then(|t| t.deleter) {
                deleter(tensor);
            }
        } else {
            pyo3::ffi::PyErr_Clear();
        }
    }
}

#[pymethods]
impl NativeTensor {
    /// The DLPack capsule of this tensor (CPU, contiguous). `stream` and the other keywords of the
    /// protocol are accepted; a copy is never made.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<Bound<'py, PyAny>>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = (stream, max_version);
        if dl_device.is_some_and(|d| d.0 != DL_CPU) {
            return Err(PyBufferError::new_err("NativeTensor lives on the CPU"));
        }
        if copy == Some(true) {
            return Err(PyBufferError::new_err(
                "NativeTensor is shared, never copied; copy the consumer's tensor instead",
            ));
        }
        let dtype = dl_dtype(self.dtype).ok_or_else(|| {
            PyValueError::new_err(format!("{} has no DLPack type; read it as U8", self.dtype))
        })?;
        let mut boxed = Box::new(Managed {
            managed: DLManagedTensor {
                dl_tensor: DLTensor {
                    data: self.base_ptr() as *mut c_void,
                    device: DLDevice {
                        device_type: DL_CPU,
                        device_id: 0,
                    },
                    ndim: self.shape.len() as i32,
                    dtype,
                    shape: std::ptr::null_mut(),
                    strides: std::ptr::null_mut(),
                    byte_offset: 0,
                },
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(delete_managed),
            },
            shape: self.shape.iter().map(|&d| d as i64).collect(),
            _storage: Arc::clone(&self.storage),
        });
        boxed.managed.dl_tensor.shape = boxed.shape.as_mut_ptr();
        let raw = Box::into_raw(boxed);
        // SAFETY: `raw` is a valid Managed; the capsule owns it until a consumer renames it.
        unsafe {
            (*raw).managed.manager_ctx = raw.cast();
            let capsule = pyo3::ffi::PyCapsule_New(
                raw.cast(),
                CAPSULE_NAME.as_ptr(),
                Some(capsule_destructor),
            );
            if capsule.is_null() {
                drop(Box::from_raw(raw));
                return Err(PyErr::fetch(py));
            }
            Ok(Bound::from_owned_ptr(py, capsule))
        }
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        (DL_CPU, 0)
    }

    /// The safetensors name of the element type (`"F32"`, `"BF16"`, ...).
    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.as_str()
    }

    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.shape)
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }

    /// Address of the first byte, to check that consumers share this memory.
    #[getter]
    fn data_ptr(&self) -> usize {
        self.base_ptr() as usize
    }

    fn __repr__(&self) -> String {
        format!("NativeTensor(dtype={}, shape={:?})", self.dtype, self.shape)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeTensor>()
}

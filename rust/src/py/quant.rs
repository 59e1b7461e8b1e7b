//! Python wrappers over `crate::quant`: blockwise 4-bit quantization and double quantization.
//! Inputs are any C-contiguous buffer (a torch tensor viewed as uint8 and `.numpy()`, a numpy
//! array); outputs are `NativeTensor`s that `torch.from_dlpack` wraps without a copy.

use std::path::PathBuf;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyMemoryView;

use super::errors::run_detached;
use super::tensor::NativeTensor;
use crate::io::Dtype;
use crate::quant::checkpoint::{quantize_checkpoint, QuantizeOptions};
use crate::quant::nf4::{self, Element, OutElement, QuantType};

/// A borrowed buffer, readable while the GIL is released (the `PyBuffer` pins it).
struct RawBytes(*const u8, usize);
// SAFETY: the pointee is only read, and the PyBuffer that pins it outlives every use.
unsafe impl Send for RawBytes {}
unsafe impl Sync for RawBytes {}

impl RawBytes {
    fn bytes(&self) -> &[u8] {
        if self.1 == 0 {
            &[]
        } else {
            // SAFETY: the buffer is pinned and `len` bytes long (see `pin`).
            unsafe { std::slice::from_raw_parts(self.0, self.1) }
        }
    }
}

/// Pins `obj` (any C-contiguous buffer) and returns its bytes.
fn pin(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<(PyBuffer<u8>, RawBytes)> {
    let view = PyMemoryView::from(obj)?
        .call_method1("cast", ("B",))
        .map_err(|e| PyValueError::new_err(format!("{what}: needs a C-contiguous buffer ({e})")))?;
    let buffer = PyBuffer::<u8>::get(&view)?;
    let raw = RawBytes(buffer.buf_ptr() as *const u8, buffer.len_bytes());
    Ok((buffer, raw))
}

/// Plain-old-data values read from bytes: borrowed when aligned, copied otherwise.
fn typed<T: Copy + Default>(bytes: &[u8]) -> std::borrow::Cow<'_, [T]> {
    let size = std::mem::size_of::<T>();
    let n = bytes.len() / size;
    if (bytes.as_ptr() as usize) % std::mem::align_of::<T>() == 0 {
        // SAFETY: aligned, in bounds, and T is a plain number type with no invalid bit patterns.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), n)
        })
    } else {
        let mut v = vec![T::default(); n];
        // SAFETY: `v` holds exactly `n * size` writable bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr().cast::<u8>(), n * size)
        };
        std::borrow::Cow::Owned(v)
    }
}

fn parse_dtype(dtype: &str) -> PyResult<Dtype> {
    dtype
        .parse()
        .map_err(|e: String| PyValueError::new_err(format!("dtype: {e}")))
}

fn quantize_typed<T: Element + Default>(
    bytes: &[u8],
    blocksize: usize,
    quant_type: QuantType,
) -> crate::Result<nf4::Quantized4bit> {
    nf4::quantize_4bit(&typed::<T>(bytes), blocksize, quant_type)
}

/// Quantizes a float buffer (`dtype` "F32", "BF16" or "F16") blockwise to 4 bits, as
/// bitsandbytes' CUDA `quantize_4bit`. Returns `(packed uint8 (ceil(n/2),), absmax fp32 (blocks,))`.
#[pyfunction]
#[pyo3(signature = (data, dtype, blocksize=64, quant_type="nf4"))]
fn quantize_4bit(
    py: Python<'_>,
    data: Bound<'_, PyAny>,
    dtype: &str,
    blocksize: usize,
    quant_type: &str,
) -> PyResult<(NativeTensor, NativeTensor)> {
    let dtype = parse_dtype(dtype)?;
    let quant_type = QuantType::parse(quant_type).map_err(super::errors::to_pyerr)?;
    let (buffer, raw) = pin(&data, "data")?;
    if raw.1 % dtype.size() != 0 {
        return Err(PyValueError::new_err(format!(
            "data: {} bytes is not a whole number of {dtype} elements",
            raw.1
        )));
    }
    let q = run_detached(py, move || {
        let bytes = raw.bytes();
        match dtype {
            Dtype::F32 => quantize_typed::<f32>(bytes, blocksize, quant_type),
            Dtype::BF16 => quantize_typed::<half::bf16>(bytes, blocksize, quant_type),
            Dtype::F16 => quantize_typed::<half::f16>(bytes, blocksize, quant_type),
            other => Err(crate::Error::InvalidArgument(format!(
                "quantize_4bit takes F32, BF16 or F16 data, got {other}"
            ))),
        }
    })?;
    drop(buffer);
    let (np, nb) = (q.packed.len(), q.absmax.len());
    Ok((
        NativeTensor::from_vec(q.packed, Dtype::U8, vec![np]),
        NativeTensor::from_vec(q.absmax, Dtype::F32, vec![nb]),
    ))
}

fn dequantize_typed<O: OutElement + super::tensor::Pod>(
    packed: &[u8],
    absmax: &[f32],
    n: usize,
    blocksize: usize,
    quant_type: QuantType,
    dtype: Dtype,
) -> crate::Result<NativeTensor> {
    let out: Vec<O> = nf4::dequantize_4bit(packed, absmax, n, blocksize, quant_type)?;
    Ok(NativeTensor::from_vec(out, dtype, vec![n]))
}

/// Dequantizes `n` elements from packed 4-bit codes and fp32 per-block `absmax` into `dtype`
/// ("F32", "BF16" or "F16"), rounding once to nearest even. Returns a flat `NativeTensor`.
#[pyfunction]
#[pyo3(signature = (packed, absmax, n, blocksize=64, quant_type="nf4", dtype="BF16"))]
fn dequantize_4bit(
    py: Python<'_>,
    packed: Bound<'_, PyAny>,
    absmax: Bound<'_, PyAny>,
    n: usize,
    blocksize: usize,
    quant_type: &str,
    dtype: &str,
) -> PyResult<NativeTensor> {
    let dtype = parse_dtype(dtype)?;
    let quant_type = QuantType::parse(quant_type).map_err(super::errors::to_pyerr)?;
    let (b1, packed) = pin(&packed, "packed")?;
    let (b2, absmax) = pin(&absmax, "absmax")?;
    let out = run_detached(py, move || {
        let absmax = typed::<f32>(absmax.bytes());
        let packed = packed.bytes();
        match dtype {
            Dtype::F32 => dequantize_typed::<f32>(packed, &absmax, n, blocksize, quant_type, dtype),
            Dtype::BF16 => {
                dequantize_typed::<half::bf16>(packed, &absmax, n, blocksize, quant_type, dtype)
            }
            Dtype::F16 => {
                dequantize_typed::<half::f16>(packed, &absmax, n, blocksize, quant_type, dtype)
            }
            other => Err(crate::Error::InvalidArgument(format!(
                "dequantize_4bit writes F32, BF16 or F16, got {other}"
            ))),
        }
    })?;
    drop((b1, b2));
    Ok(out)
}

/// Double quantization of fp32 `absmax`: returns `(codes uint8, nested_absmax fp32, offset)`,
/// with `offset` the mean of `absmax` unless given.
#[pyfunction]
#[pyo3(signature = (absmax, offset=None))]
fn quantize_nested(
    py: Python<'_>,
    absmax: Bound<'_, PyAny>,
    offset: Option<f32>,
) -> PyResult<(NativeTensor, NativeTensor, f32)> {
    let (buffer, raw) = pin(&absmax, "absmax")?;
    let nested = run_detached(py, move || {
        Ok(nf4::quantize_nested(&typed::<f32>(raw.bytes()), offset))
    })?;
    drop(buffer);
    let (nc, na) = (nested.codes.len(), nested.absmax.len());
    Ok((
        NativeTensor::from_vec(nested.codes, Dtype::U8, vec![nc]),
        NativeTensor::from_vec(nested.absmax, Dtype::F32, vec![na]),
        nested.offset,
    ))
}

/// The fp32 absmax back from double quantization: `CODE8[codes] * nested_absmax + offset`.
#[pyfunction]
fn dequantize_nested(
    py: Python<'_>,
    codes: Bound<'_, PyAny>,
    nested_absmax: Bound<'_, PyAny>,
    offset: f32,
) -> PyResult<NativeTensor> {
    let (b1, codes) = pin(&codes, "codes")?;
    let (b2, nested) = pin(&nested_absmax, "nested_absmax")?;
    let out = run_detached(py, move || {
        let codes = codes.bytes();
        let v = nf4::dequantize_nested(
            codes,
            &typed::<f32>(nested.bytes()),
            &nf4::dynamic_map_signed(),
            offset,
        )?;
        let n = v.len();
        Ok(NativeTensor::from_vec(v, Dtype::F32, vec![n]))
    })?;
    drop((b1, b2));
    Ok(out)
}

/// bitsandbytes' signed 8-bit dynamic map (256 fp32 values, sorted).
#[pyfunction]
fn dynamic_map_signed() -> NativeTensor {
    NativeTensor::from_vec(nf4::dynamic_map_signed().to_vec(), Dtype::F32, vec![256])
}

/// The 16 values of a 4-bit type's codes (bitsandbytes' `quant_map`).
#[pyfunction]
fn quant_map(quant_type: &str) -> PyResult<NativeTensor> {
    let qt = QuantType::parse(quant_type).map_err(super::errors::to_pyerr)?;
    Ok(NativeTensor::from_vec(
        qt.code().to_vec(),
        Dtype::F32,
        vec![16],
    ))
}

/// Streams the HF checkpoint folder `input` into a bitsandbytes 4-bit checkpoint in `output`
/// (see `crate::quant::checkpoint`). Returns the run's summary as JSON text.
#[pyfunction]
#[pyo3(signature = (input, output, blocksize=64, quant_type="nf4", double_quant=true, skip=None, progress=true))]
#[allow(clippy::too_many_arguments)]
fn quantize_checkpoint_dir(
    py: Python<'_>,
    input: PathBuf,
    output: PathBuf,
    blocksize: usize,
    quant_type: &str,
    double_quant: bool,
    skip: Option<Vec<String>>,
    progress: bool,
) -> PyResult<String> {
    let quant_type = QuantType::parse(quant_type).map_err(super::errors::to_pyerr)?;
    let options = QuantizeOptions {
        blocksize,
        quant_type,
        double_quant,
        skip: skip.unwrap_or_else(|| vec!["lm_head".to_string()]),
        progress,
    };
    run_detached(py, move || {
        let summary = quantize_checkpoint(&input, &output, &options)?;
        Ok(serde_json::to_string(&summary).expect("summary serializes"))
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_nested, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_nested, m)?)?;
    m.add_function(wrap_pyfunction!(dynamic_map_signed, m)?)?;
    m.add_function(wrap_pyfunction!(quant_map, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_checkpoint_dir, m)?)?;
    Ok(())
}

//! ferrotune's native core: the byte work of fine-tuning (data preparation, 4-bit quantization,
//! adapter merging and export). Torch never enters here; tensors cross as safetensors files and
//! zero-copy buffers. The pyo3 bindings live in `py` only, behind the `python` feature.

pub mod data;
pub mod error;
pub mod io;
pub mod merge;
pub mod quant;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};

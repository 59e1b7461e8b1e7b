//! The only pyo3 code: the `ferrotune._native` module, error mapping, and thin wrappers that
//! release the GIL around the real work (which lives in the plain-Rust modules).

mod bpe;
mod data;
mod errors;
mod io;
mod merge;
mod quant;
mod tensor;

use pyo3::prelude::*;

use errors::run_detached;

/// Panics on purpose, inside a detached native call, so tests can prove that a Rust panic
/// reaches Python as `ferrotune.errors.NativePanic`, never as an abort.
#[pyfunction]
fn _panic_for_test(py: Python<'_>, message: String) -> PyResult<()> {
    run_detached(py, move || -> crate::Result<()> { panic!("{message}") })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(_panic_for_test, m)?)?;
    tensor::register(m)?;
    io::register(m)?;
    bpe::register(m)?;
    quant::register(m)?;
    merge::register(m)?;
    data::register(m)?;
    Ok(())
}

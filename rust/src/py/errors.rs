//! `crate::Error` to Python exceptions (defined in Python, in `ferrotune.errors`), and the one
//! way native work runs: with the GIL released and panics caught.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;

pyo3::import_exception!(ferrotune.errors, FormatError);
pyo3::import_exception!(ferrotune.errors, NativePanic);
pyo3::import_exception!(ferrotune.errors, Cancelled);

/// The Python exception for `err`.
pub(crate) fn to_pyerr(err: Error) -> PyErr {
    let message = err.to_string();
    match err {
        Error::Format {
            path,
            place,
            message: detail,
        } => FormatError::new_err((message, path.to_string_lossy().into_owned(), place, detail)),
        Error::Io { source, .. } => {
            PyOSError::new_err((source.raw_os_error().unwrap_or(0), message))
        }
        Error::InvalidArgument(_) => PyValueError::new_err(message),
        Error::Cancelled => Cancelled::new_err(message),
    }
}

/// Runs `work` without the GIL. An error becomes its Python exception; a panic anywhere inside
/// (rayon workers included: rayon re-raises them on the calling thread) becomes `NativePanic`.
pub(crate) fn run_detached<T, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> crate::Result<T> + Send,
{
    match py.detach(|| catch_unwind(AssertUnwindSafe(work))) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(to_pyerr(err)),
        Err(payload) => {
            let text = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(NativePanic::new_err(format!(
                "native code panicked: {text}"
            )))
        }
    }
}

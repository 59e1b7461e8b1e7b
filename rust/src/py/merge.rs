//! Python wrappers over `crate::merge`: adapter merging, combination, extraction and GGUF export.
//! Each releases the GIL for the whole job and returns a summary dict.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::run_detached;
use crate::merge::{merge_adapter as merge_adapter_native, MergeOptions};

/// Merges the PEFT LoRA adapter folder `adapter` into the Hugging Face model `base` (folder,
/// index or file), writing a complete model folder `out`. Returns a summary dict.
#[pyfunction]
#[pyo3(signature = (base, adapter, out, *, overwrite=false, progress=false))]
fn merge_adapter<'py>(
    py: Python<'py>,
    base: PathBuf,
    adapter: PathBuf,
    out: PathBuf,
    overwrite: bool,
    progress: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let options = MergeOptions {
        overwrite,
        progress,
    };
    let s = run_detached(py, move || {
        merge_adapter_native(&base, &adapter, &out, &options)
    })?;
    let d = PyDict::new(py);
    d.set_item("modules_merged", s.modules_merged)?;
    d.set_item("dora_modules", s.dora_modules)?;
    d.set_item("tensors_replaced", s.tensors_replaced)?;
    d.set_item("tensors_rewritten", s.stream.tensors_rewritten)?;
    d.set_item("tensors_copied", s.stream.tensors_copied)?;
    d.set_item("bytes_written", s.stream.bytes_written)?;
    d.set_item("shards", s.stream.shards)?;
    d.set_item("seconds", s.stream.seconds)?;
    d.set_item("side_files", s.side_files)?;
    d.set_item("warnings", s.warnings)?;
    Ok(d)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(merge_adapter, m)?)?;
    Ok(())
}

//! Python wrappers over `crate::merge`: adapter merging, combination, extraction and GGUF export.
//! Each releases the GIL for the whole job and returns a summary dict.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::run_detached;
use crate::merge::adapter::{Adapter, Layout};
use crate::merge::{merge_adapter as merge_adapter_native, MergeOptions};

/// Reads a PEFT LoRA adapter folder the way the merge does: a dict with `modules` (a list of
/// dicts: `module`, `a`, `b`, `magnitude`, `bias` (adapter keys or None), `layout` ("linear" or
/// "transposed"), `rank`, `alpha`, `scale`), `replacements` (base tensor -> adapter key) and
/// `warnings`.
#[pyfunction]
fn read_adapter<'py>(py: Python<'py>, adapter: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let a = run_detached(py, move || Adapter::open(&adapter))?;
    let modules = pyo3::types::PyList::empty(py);
    for m in a.modules.values() {
        let d = PyDict::new(py);
        d.set_item("module", &m.module)?;
        d.set_item("a", &m.a)?;
        d.set_item("b", &m.b)?;
        d.set_item("magnitude", &m.magnitude)?;
        d.set_item("bias", &m.bias)?;
        d.set_item(
            "layout",
            match m.layout {
                Layout::Linear => "linear",
                Layout::Transposed => "transposed",
            },
        )?;
        d.set_item("rank", m.rank)?;
        d.set_item("alpha", m.alpha)?;
        d.set_item("scale", m.scale)?;
        modules.append(d)?;
    }
    let d = PyDict::new(py);
    d.set_item("modules", modules)?;
    d.set_item("replacements", a.replacements.clone())?;
    d.set_item("warnings", a.warnings.clone())?;
    Ok(d)
}

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
    m.add_function(wrap_pyfunction!(read_adapter, m)?)?;
    Ok(())
}

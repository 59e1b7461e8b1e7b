//! Python wrappers over `crate::merge`: adapter merging, combination, extraction and GGUF export.
//! Each releases the GIL for the whole job and returns a summary dict.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::run_detached;
use super::tensor::{NativeTensor, Storage};
use crate::io::Checkpoint;
use crate::merge::adapter::{Adapter, Layout};
use crate::merge::combine::{combine_adapters as combine_native, CombineOptions, MajoritySign};
use crate::merge::extract::{extract_adapter as extract_native, ExtractOptions};
use crate::merge::forward::Supported;
use crate::merge::gguf::{export_gguf as export_gguf_native, GgufType};
use crate::merge::probe::{
    model_logits, probe_ids, probe_merge as probe_merge_native, ProbeOptions, ProbeReport,
};
use crate::merge::quantized::{dequantize_weight, is_aux, quant_state};
use crate::merge::{
    merge_adapter as merge_adapter_native, MergeOptions, MergeSummary, TargetModules,
};

fn merge_summary<'py>(py: Python<'py>, s: &MergeSummary) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("modules_merged", s.modules_merged)?;
    d.set_item("dora_modules", s.dora_modules)?;
    d.set_item("tensors_replaced", s.tensors_replaced)?;
    d.set_item("tensors_rewritten", s.stream.tensors_rewritten)?;
    d.set_item("tensors_copied", s.stream.tensors_copied)?;
    d.set_item("bytes_written", s.stream.bytes_written)?;
    d.set_item("shards", s.stream.shards)?;
    d.set_item("seconds", s.stream.seconds)?;
    d.set_item("side_files", s.side_files.clone())?;
    d.set_item("warnings", s.warnings.clone())?;
    Ok(d)
}

/// Combines PEFT LoRA adapters (`method`: PEFT's `add_weighted_adapter` combination names) into
/// a new adapter folder `out`.
#[pyfunction]
#[pyo3(signature = (adapters, weights, out, *, method="linear", density=None, majority_sign="total",
                    svd_rank=None, seed=0, overwrite=false))]
#[allow(clippy::too_many_arguments)]
fn combine_adapters<'py>(
    py: Python<'py>,
    adapters: Vec<PathBuf>,
    weights: Vec<f64>,
    out: PathBuf,
    method: &str,
    density: Option<f64>,
    majority_sign: &str,
    svd_rank: Option<usize>,
    seed: u64,
    overwrite: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let method = method.parse().map_err(super::errors::to_pyerr)?;
    let majority_sign = match majority_sign {
        "total" => MajoritySign::Total,
        "frequency" => MajoritySign::Frequency,
        other => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "majority_sign {other:?}: total or frequency"
            )))
        }
    };
    let options = CombineOptions {
        method,
        weights,
        density,
        majority_sign,
        svd_rank,
        seed,
        overwrite,
    };
    let combined = run_detached(py, move || {
        let dirs: Vec<&std::path::Path> = adapters.iter().map(|p| p.as_path()).collect();
        combine_native(&dirs, &out, &options)
    })?;
    let d = PyDict::new(py);
    d.set_item("modules", combined.modules)?;
    d.set_item("rank", combined.rank)?;
    d.set_item("tensors_replaced", combined.tensors_replaced)?;
    Ok(d)
}

/// Extracts a rank-`rank` LoRA of `tuned - base` (truncated SVD) as a PEFT adapter folder `out`.
/// `targets`: a list of module names or one regular expression (PEFT's target_modules); default
/// every `*_proj` of the decoder layers.
#[pyfunction]
#[pyo3(signature = (base, tuned, out, *, rank, targets=None, seed=0, overwrite=false, progress=false))]
#[allow(clippy::too_many_arguments)]
fn extract_adapter<'py>(
    py: Python<'py>,
    base: PathBuf,
    tuned: PathBuf,
    out: PathBuf,
    rank: usize,
    targets: Option<Bound<'py, PyAny>>,
    seed: u64,
    overwrite: bool,
    progress: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let targets = match targets {
        None => None,
        Some(t) => {
            if let Ok(pattern) = t.extract::<String>() {
                Some(TargetModules::regex(&pattern).map_err(|e| {
                    pyo3::exceptions::PyValueError::new_err(format!(
                        "targets: bad regular expression: {e}"
                    ))
                })?)
            } else {
                Some(TargetModules::Names(t.extract::<Vec<String>>()?))
            }
        }
    };
    let options = ExtractOptions {
        rank,
        targets,
        seed,
        overwrite,
        progress,
    };
    let s = run_detached(py, move || extract_native(&base, &tuned, &out, &options))?;
    let d = PyDict::new(py);
    d.set_item("modules", s.modules)?;
    d.set_item("min_energy", s.min_energy)?;
    d.set_item("mean_energy", s.mean_energy)?;
    d.set_item("warnings", s.warnings)?;
    Ok(d)
}

/// Writes the Llama-architecture model folder `model` as the GGUF v3 file `out` with 2-D tensors
/// in `dtype` ("f16", "bf16" or "q8_0"), tokenizer and chat-template metadata included.
#[pyfunction]
#[pyo3(signature = (model, out, *, dtype="f16", progress=false))]
fn export_gguf<'py>(
    py: Python<'py>,
    model: PathBuf,
    out: PathBuf,
    dtype: &str,
    progress: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let kind: GgufType = dtype.parse().map_err(super::errors::to_pyerr)?;
    let s = run_detached(py, move || export_gguf_native(&model, &out, kind, progress))?;
    let d = PyDict::new(py);
    d.set_item("tensors", s.tensors)?;
    d.set_item("bytes", s.bytes)?;
    d.set_item("seconds", s.seconds)?;
    Ok(d)
}

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
#[pyo3(signature = (base, adapter, out, *, overwrite=false, progress=false, requantize=false))]
fn merge_adapter<'py>(
    py: Python<'py>,
    base: PathBuf,
    adapter: PathBuf,
    out: PathBuf,
    overwrite: bool,
    progress: bool,
    requantize: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let options = MergeOptions {
        overwrite,
        progress,
        requantize,
    };
    let s = run_detached(py, move || {
        merge_adapter_native(&base, &adapter, &out, &options)
    })?;
    merge_summary(py, &s)
}

/// The merge probe, natively: base, unmerged (base + adapter beside it) and merged logits on
/// `inputs` x `tokens` probe ids (seeded), in f32, streamed from the mapped checkpoints. Returns
/// a dict: `supported` (False when the native forward pass does not cover the model or adapter;
/// `reason` says why), `divergence`, `adapter_effect`, `max_logit`, `inputs`, `tokens`, `seconds`.
#[pyfunction]
#[pyo3(signature = (base, adapter, merged, *, inputs=2, tokens=8, seed=0, progress=false))]
#[allow(clippy::too_many_arguments)]
fn probe_merge<'py>(
    py: Python<'py>,
    base: PathBuf,
    adapter: PathBuf,
    merged: PathBuf,
    inputs: usize,
    tokens: usize,
    seed: u64,
    progress: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let options = ProbeOptions {
        inputs,
        tokens,
        seed,
        progress,
    };
    let outcome = run_detached(py, move || {
        probe_merge_native(&base, &adapter, &merged, &options)
    })?;
    probe_dict(py, outcome, inputs, tokens)
}

fn probe_dict<'py>(
    py: Python<'py>,
    outcome: Supported<ProbeReport>,
    inputs: usize,
    tokens: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("inputs", inputs)?;
    d.set_item("tokens", tokens)?;
    match outcome {
        Ok(report) => {
            d.set_item("supported", true)?;
            d.set_item("reason", py.None())?;
            d.set_item("divergence", report.divergence)?;
            d.set_item("adapter_effect", report.adapter_effect)?;
            d.set_item("max_logit", report.max_logit)?;
            d.set_item("seconds", report.seconds)?;
        }
        Err(reason) => {
            d.set_item("supported", false)?;
            d.set_item("reason", reason)?;
        }
    }
    Ok(d)
}

/// The probe's token ids: `inputs` lists of `tokens` ids uniform below `vocab`, fixed by `seed`.
#[pyfunction]
#[pyo3(signature = (vocab, inputs, tokens, seed=0))]
fn probe_inputs(vocab: usize, inputs: usize, tokens: usize, seed: u64) -> Vec<Vec<u32>> {
    probe_ids(vocab, inputs, tokens, seed)
        .chunks(tokens.max(1))
        .map(<[u32]>::to_vec)
        .collect()
}

/// The native f32 forward pass of the model folder `model` (with the PEFT adapter folder
/// `adapter` applied beside its weights, unmerged, when given) on `ids` (equal-length lists):
/// logits (len(ids), tokens, vocab) f32. ValueError when the forward pass does not cover the
/// model or adapter.
#[pyfunction]
#[pyo3(signature = (model, ids, *, adapter=None))]
fn probe_logits(
    py: Python<'_>,
    model: PathBuf,
    ids: Vec<Vec<u32>>,
    adapter: Option<PathBuf>,
) -> PyResult<NativeTensor> {
    let (sequences, tokens) = (ids.len(), ids.first().map_or(0, Vec::len));
    if ids.iter().any(|row| row.len() != tokens) {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "ids: every sequence must have the same length",
        ));
    }
    let flat: Vec<u32> = ids.into_iter().flatten().collect();
    let outcome = run_detached(py, move || {
        model_logits(&model, adapter.as_deref(), &flat, sequences, tokens)
    })?;
    let logits = outcome.map_err(|why| {
        pyo3::exceptions::PyValueError::new_err(format!(
            "the native forward pass does not cover this: {why}"
        ))
    })?;
    let vocab = logits.len() / (sequences * tokens).max(1);
    Ok(NativeTensor::from_vec(
        logits,
        crate::io::Dtype::F32,
        vec![sequences, tokens, vocab],
    ))
}

/// The tensors of the checkpoint at `path` whose names start with `prefix`, 4-bit weights
/// dequantized to their 16-bit dtype (their statistics left out), the others as zero-copy views.
#[pyfunction]
fn read_dequantized(
    py: Python<'_>,
    path: PathBuf,
    prefix: String,
) -> PyResult<Vec<(String, NativeTensor)>> {
    let checkpoint = run_detached(py, move || Checkpoint::open(&path))?;
    let checkpoint = std::sync::Arc::new(checkpoint);
    let names: Vec<String> = checkpoint
        .names()
        .iter()
        .filter(|n| n.starts_with(&prefix) && !is_aux(n))
        .cloned()
        .collect();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let ck = checkpoint.clone();
        let key = name.clone();
        let dequantized = run_detached(py, move || match quant_state(&ck, &key)? {
            Some(state) => Ok(Some((dequantize_weight(&ck, &key, &state)?, state))),
            None => Ok(None),
        })?;
        let tensor = match dequantized {
            Some((bytes, state)) => NativeTensor::from_vec(bytes, state.dtype, state.shape),
            None => {
                let (file, t) = checkpoint.get(&name).expect("listed");
                let storage: std::sync::Arc<dyn Storage> = file.mmap().clone();
                NativeTensor::view(
                    storage,
                    file.data_start() + t.begin,
                    t.end - t.begin,
                    t.dtype,
                    t.shape.clone(),
                )
            }
        };
        out.push((name, tensor));
    }
    Ok(out)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(merge_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(read_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(combine_adapters, m)?)?;
    m.add_function(wrap_pyfunction!(extract_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(export_gguf, m)?)?;
    m.add_function(wrap_pyfunction!(read_dequantized, m)?)?;
    m.add_function(wrap_pyfunction!(probe_merge, m)?)?;
    m.add_function(wrap_pyfunction!(probe_inputs, m)?)?;
    m.add_function(wrap_pyfunction!(probe_logits, m)?)?;
    Ok(())
}

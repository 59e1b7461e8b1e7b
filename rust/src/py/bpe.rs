//! Python wrapper over `crate::data::bpe::FastBpe`, for tests and benchmarks (the pipeline
//! itself uses the encoder from Rust).

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;

use super::errors::run_detached;
use super::tensor::NativeTensor;
use crate::data::bpe::{FastBpe, SplitRegex};
use crate::io::Dtype;

/// The fast byte-level BPE encoder (identical ids to HF `tokenizers` on what it accepts).
#[pyclass(module = "ferrotune._native", name = "FastBpe", frozen)]
pub struct PyFastBpe {
    inner: Arc<FastBpe>,
}

#[pymethods]
impl PyFastBpe {
    /// The encoder for a tokenizer.json file, or `None` when the tokenizer uses something the
    /// fast encoder does not reproduce exactly.
    #[staticmethod]
    fn from_file(py: Python<'_>, path: PathBuf) -> PyResult<Option<Self>> {
        let built = run_detached(py, move || {
            let json = std::fs::read_to_string(&path).map_err(|e| crate::Error::io(&path, e))?;
            FastBpe::from_tokenizer_json(&json).map_err(|e| match e {
                crate::Error::Format { place, message, .. } => {
                    crate::Error::format(&path, place, message)
                }
                other => other,
            })
        })?;
        Ok(built.map(|b| PyFastBpe { inner: Arc::new(b) }))
    }

    /// The encoder for a tokenizer.json document given as a string, or `None` (as `from_file`).
    #[staticmethod]
    fn from_str(py: Python<'_>, json: String) -> PyResult<Option<Self>> {
        let built = run_detached(py, move || FastBpe::from_tokenizer_json(&json))?;
        Ok(built.map(|b| PyFastBpe { inner: Arc::new(b) }))
    }

    /// The ids of `text` (no BOS/EOS).
    fn encode(&self, py: Python<'_>, text: String) -> PyResult<Vec<u32>> {
        let inner = self.inner.clone();
        run_detached(py, move || Ok(inner.encode(&text)))
    }

    /// The ids of each text, encoded in parallel.
    fn encode_batch(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        let inner = self.inner.clone();
        run_detached(py, move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            Ok(inner.encode_batch(&refs))
        })
    }

    /// The ids of each text, encoded in parallel, as two flat tensors: `ids` (U32, all documents
    /// back to back) and `offsets` (I64, `len(texts) + 1` entries; document i is
    /// `ids[offsets[i]:offsets[i + 1]]`).
    fn encode_batch_flat(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
    ) -> PyResult<(NativeTensor, NativeTensor)> {
        let inner = self.inner.clone();
        let (ids, offsets) = run_detached(py, move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let docs = inner.encode_batch(&refs);
            let mut offsets = Vec::with_capacity(docs.len() + 1);
            offsets.push(0i64);
            let total: usize = docs.iter().map(Vec::len).sum();
            let mut ids = Vec::with_capacity(total);
            for d in &docs {
                ids.extend_from_slice(d);
                offsets.push(ids.len() as i64);
            }
            Ok((ids, offsets))
        })?;
        let n_ids = ids.len();
        let n_offsets = offsets.len();
        Ok((
            NativeTensor::from_vec(ids, Dtype::U32, vec![n_ids]),
            NativeTensor::from_vec(offsets, Dtype::I64, vec![n_offsets]),
        ))
    }
}

/// The pieces of `text` under the hand-written scanner for the split regex `pattern` (one of the
/// GPT-2, Llama 3 and Qwen2 patterns), or `None` for any other pattern. For tests against the
/// real regex.
#[pyfunction]
fn bpe_split_pieces(pattern: &str, text: &str) -> Option<Vec<String>> {
    let scanner = SplitRegex::from_pattern(pattern)?;
    let mut pieces = Vec::new();
    scanner.split(text, |p| pieces.push(p.to_string()));
    Some(pieces)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyFastBpe>()?;
    m.add_function(wrap_pyfunction!(bpe_split_pieces, m)?)?;
    Ok(())
}

//! Python wrappers over `crate::data`: the `prepare` job (run in a thread by the CLI, which polls
//! its progress and can cancel it) and a tokenizer + chat template handle for checks and tools.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::run_detached;
use crate::data::jsonl::{parse_record, FieldNames, InputFormat};
use crate::data::mask::{write_labels, Encoder, LossMode};
use crate::data::template::ChatTemplate;
use crate::data::{prepare, PrepareConfig, Progress, Tokenizer};

/// One `prepare` run: `run()` blocks (GIL released); `progress()` and `cancel()` work from any
/// other thread meanwhile.
#[pyclass(module = "ferrotune._native", name = "PrepareJob", frozen)]
pub struct PyPrepareJob {
    config: PrepareConfig,
    progress: Arc<Progress>,
}

#[pymethods]
impl PyPrepareJob {
    /// `config_json`: the fields of `PrepareConfig` as a JSON object (unknown keys are refused).
    #[new]
    fn new(config_json: &str) -> PyResult<Self> {
        let config: PrepareConfig = serde_json::from_str(config_json)
            .map_err(|e| PyValueError::new_err(format!("prepare config: {e}")))?;
        Ok(PyPrepareJob {
            config,
            progress: Arc::new(Progress::default()),
        })
    }

    /// Runs the pipeline; returns the summary as JSON.
    fn run(&self, py: Python<'_>) -> PyResult<String> {
        let config = self.config.clone();
        let progress = self.progress.clone();
        let summary = run_detached(py, move || prepare(&config, &progress))?;
        Ok(serde_json::to_string(&summary).expect("summary serializes"))
    }

    /// Live counters: bytes_read, total_bytes, lines, documents, tokens, rows, bad_lines.
    fn progress<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let p = &self.progress;
        let d = PyDict::new(py);
        d.set_item("bytes_read", p.bytes_read.load(Ordering::Relaxed))?;
        d.set_item("total_bytes", p.total_bytes.load(Ordering::Relaxed))?;
        d.set_item("lines", p.lines.load(Ordering::Relaxed))?;
        d.set_item("documents", p.documents.load(Ordering::Relaxed))?;
        d.set_item("tokens", p.tokens.load(Ordering::Relaxed))?;
        d.set_item("rows", p.rows.load(Ordering::Relaxed))?;
        d.set_item("bad_lines", p.bad_lines.load(Ordering::Relaxed))?;
        Ok(d)
    }

    /// Asks the run to stop; it then raises `Cancelled` and leaves no output behind.
    fn cancel(&self) {
        self.progress.cancel.store(true, Ordering::Relaxed);
    }
}

/// A tokenizer folder (or `tokenizer.json`) with its chat template, as `prepare` uses them.
#[pyclass(module = "ferrotune._native", name = "DataTokenizer", frozen)]
pub struct PyDataTokenizer {
    tokenizer: Arc<Tokenizer>,
    template: Option<Arc<ChatTemplate>>,
}

#[pymethods]
impl PyDataTokenizer {
    #[new]
    #[pyo3(signature = (path, chat_template=None))]
    fn new(
        py: Python<'_>,
        path: std::path::PathBuf,
        chat_template: Option<String>,
    ) -> PyResult<Self> {
        let (tokenizer, template) = run_detached(py, move || {
            let tokenizer = Tokenizer::from_file(&path)?;
            let sp = tokenizer.special_tokens();
            let names: Vec<(String, String)> = [
                ("bos_token", &sp.bos),
                ("eos_token", &sp.eos),
                ("pad_token", &sp.pad),
                ("unk_token", &sp.unk),
            ]
            .into_iter()
            .filter_map(|(n, t)| t.as_ref().map(|(text, _)| (n.to_string(), text.clone())))
            .collect();
            let template = match chat_template {
                Some(source) => Some(ChatTemplate::new(&source, names)?),
                None => {
                    let dir = tokenizer
                        .path()
                        .parent()
                        .unwrap_or(std::path::Path::new("."));
                    ChatTemplate::from_tokenizer_dir(dir, tokenizer.config(), names)?
                }
            };
            Ok((tokenizer, template))
        })?;
        Ok(PyDataTokenizer {
            tokenizer: Arc::new(tokenizer),
            template: template.map(Arc::new),
        })
    }

    /// Token ids of `text` (`add_special`: the post-processor's tokens, e.g. BOS).
    #[pyo3(signature = (text, add_special=false))]
    fn encode(&self, py: Python<'_>, text: String, add_special: bool) -> PyResult<Vec<u32>> {
        let tok = self.tokenizer.clone();
        run_detached(py, move || tok.encode(&text, add_special))
    }

    /// `encode` of many texts on every core.
    #[pyo3(signature = (texts, add_special=false))]
    fn encode_batch(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        add_special: bool,
    ) -> PyResult<Vec<Vec<u32>>> {
        let tok = self.tokenizer.clone();
        run_detached(py, move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            tok.encode_batch(&refs, add_special)
        })
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// `{"bos": (text, id) | None, "eos": ..., "pad": ..., "unk": ...}`.
    fn special_tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let sp = self.tokenizer.special_tokens();
        let d = PyDict::new(py);
        d.set_item("bos", sp.bos.clone())?;
        d.set_item("eos", sp.eos.clone())?;
        d.set_item("pad", sp.pad.clone())?;
        d.set_item("unk", sp.unk.clone())?;
        Ok(d)
    }

    /// Whether a chat template was found.
    #[getter]
    fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders a conversation (`messages_json`: a JSON list of messages) with the chat template.
    #[pyo3(signature = (messages_json, add_generation_prompt=false))]
    fn render_chat(
        &self,
        py: Python<'_>,
        messages_json: String,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        let template = self
            .template
            .clone()
            .ok_or_else(|| PyValueError::new_err("this tokenizer has no chat template"))?;
        run_detached(py, move || {
            let messages: Vec<serde_json::Value> = serde_json::from_str(&messages_json)
                .map_err(|e| crate::Error::InvalidArgument(format!("messages: {e}")))?;
            template.render(&messages, add_generation_prompt)
        })
    }

    /// One JSONL line as `prepare` encodes it: a list (one entry, or chosen + rejected) of
    /// `(input_ids, labels)` with pre-shifted labels (-100 where no loss is taken).
    #[pyo3(signature = (line, format="auto", loss="auto"))]
    fn encode_line(
        &self,
        py: Python<'_>,
        line: String,
        format: &str,
        loss: &str,
    ) -> PyResult<Vec<(Vec<u32>, Vec<i32>)>> {
        let format: InputFormat = format.parse().map_err(super::errors::to_pyerr)?;
        let loss: LossMode = loss.parse().map_err(super::errors::to_pyerr)?;
        let tok = self.tokenizer.clone();
        let template = self.template.clone();
        run_detached(py, move || {
            let encoder = Encoder {
                tokenizer: &tok,
                template: template.as_deref(),
                loss,
            };
            let record = parse_record(&line, format, &FieldNames::default()).map_err(|b| {
                crate::Error::format("<line>", format!("field {}", b.field), b.message)
            })?;
            let docs = encoder.encode(&record).map_err(|b| {
                crate::Error::format("<line>", format!("field {}", b.field), b.message)
            })?;
            Ok(docs
                .into_iter()
                .map(|d| {
                    let mut labels = vec![0; d.len()];
                    write_labels(&d, &mut labels);
                    (d.ids, labels)
                })
                .collect())
        })
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPrepareJob>()?;
    m.add_class::<PyDataTokenizer>()?;
    Ok(())
}

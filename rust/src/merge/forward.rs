//! A streaming f32 forward pass of the Llama-family decoder (Llama 2 / 3.x, Mistral, Qwen2,
//! Qwen3: the math of `python/ferrotune/models/llama.py`), run by the merge probe (`probe.rs`) on
//! a few short token sequences straight from memory-mapped checkpoints:
//!
//!   x = embed(ids)                                                    (rows, hidden)
//!   per layer:  n = rmsnorm(x);  q, k, v = n Wqᵀ (+ b), n Wkᵀ (+ b), n Wvᵀ (+ b)
//!               q, k = rope(rmsnorm_per_head(q, k))    (the per-head norm: Qwen3 only)
//!               h = x + attention(q, k, v) Woᵀ         (causal, grouped-query, Mistral window)
//!               x = h + (act(m Wgᵀ) ⊙ m Wuᵀ) Wdᵀ,      m = rmsnorm(h)
//!   logits = rmsnorm(x) W_headᵀ                       (W_head = the embedding when tied)
//!
//! Several *variants* of the model run side by side over the same ids: each one a checkpoint,
//! optionally with a PEFT LoRA adapter applied beside its weights, never folded into them:
//!
//!   y = x Wᵀ + s · (x Aᵀ) Bᵀ                                   LoRA / rsLoRA (+ s · lora_B.bias)
//!   y = m / ‖W + s · B A‖ ⊙ (x Wᵀ + s · (x Aᵀ) Bᵀ)              DoRA, norm of each output row
//!   embed(id) += s · B A[:, id]                                embedding LoRA
//!
//! with the adapter's `modules_to_save` tensors in place of the checkpoint's. Variants reading the
//! same stored tensor share one pass over it. A weight is read in slabs of rows in its stored dtype
//! (4-bit ones dequantized first, as `merge` does), converted to f32 a few rows at a time in cache,
//! and its pages are dropped from the resident set once used: the memory is the activations plus
//! one slab (one dequantized tensor for 4-bit weights), whatever the model size.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Map, Value};

use super::adapter::{Adapter, Layout, LoraModule};
use super::convert::{is_mergeable, tensor_to_f32, to_f32};
use super::dense::{
    attention, matmul_f32, matmul_transposed, rms_norm, rope, rope_tables, transpose, Activation,
    AttentionShape,
};
use super::lora::{add_combination, LowRank};
use super::quantized::{dequantize_weight, quant_state, QuantState};
use crate::error::{Error, Result};
use crate::io::{Checkpoint, Dtype, SafeTensors, TensorInfo};

/// Weight bytes read (populated, used, released) per step of a streamed matmul.
const SLAB_BYTES: usize = 8 << 20;

/// The model types this forward pass implements (those of `ferrotune.models.llama`).
pub const SUPPORTED_MODEL_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

/// A value the native forward pass handles, or why it cannot (the caller then falls back to the
/// torch reference).
pub type Supported<T> = std::result::Result<T, String>;

/// RoPE frequency rescaling (`rope_scaling`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.x: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The fields of an HF `config.json` that shape the decoder.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub activation: Activation,
    /// Mistral's sliding attention window.
    pub window: Option<usize>,
    pub tie_word_embeddings: bool,
}

impl DecoderConfig {
    /// Reads the `config.json` of a model folder (or of the folder holding a checkpoint file).
    pub fn read(model: &Path) -> Result<Supported<Self>> {
        let dir = if model.is_dir() {
            model
        } else {
            model.parent().unwrap_or(Path::new("."))
        };
        let path = dir.join("config.json");
        if !path.exists() {
            return Ok(Err(format!("no config.json in {}", dir.display())));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let raw: Map<String, Value> = serde_json::from_str(&text).map_err(|e| {
            Error::format(
                &path,
                format!("line {}", e.line()),
                format!("invalid JSON: {e}"),
            )
        })?;
        Self::parse(&raw, &path)
    }

    /// From the parsed config (`path` only names it in errors).
    pub fn parse(raw: &Map<String, Value>, path: &Path) -> Result<Supported<Self>> {
        let bad = |field: &str, message: &str| Error::format(path, field, message.to_string());
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("llama")
            .to_string();
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            return Ok(Err(format!(
                "model_type {model_type:?} (the native forward pass covers {})",
                SUPPORTED_MODEL_TYPES.join(", ")
            )));
        }
        let optional = |field: &str| -> Result<Option<usize>> {
            match raw.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|&x| x > 0)
                    .map(|x| Some(x as usize))
                    .ok_or_else(|| bad(field, "must be a positive integer")),
            }
        };
        let required = |field: &str| -> Result<usize> {
            optional(field)?.ok_or_else(|| bad(field, "missing from the model config"))
        };
        let number = |field: &str, default: f64| -> Result<f64> {
            match raw.get(field) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v.as_f64().ok_or_else(|| bad(field, "must be a number")),
            }
        };
        let hidden_size = required("hidden_size")?;
        let heads = required("num_attention_heads")?;
        let kv_heads = optional("num_key_value_heads")?.unwrap_or(heads);
        if heads % kv_heads != 0 {
            return Err(bad(
                "num_key_value_heads",
                &format!("{kv_heads} does not divide num_attention_heads {heads}"),
            ));
        }
        let head_dim = optional("head_dim")?.unwrap_or(hidden_size / heads);
        if head_dim % 2 != 0 {
            return Err(bad("head_dim", "must be even (rotary halves)"));
        }
        // transformers 5 keeps rope_theta and the scaling in `rope_parameters`.
        let rope_parameters = raw.get("rope_parameters").and_then(Value::as_object);
        let rope_theta = match rope_parameters.and_then(|p| p.get("rope_theta")) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad("rope_parameters.rope_theta", "must be a number"))?,
            None => number("rope_theta", 10000.0)?,
        };
        let scaling = match (raw.get("rope_scaling"), rope_parameters) {
            (Some(Value::Object(s)), _) => Some(s),
            (_, Some(p)) => Some(p),
            _ => None,
        };
        let rope_scaling = match parse_rope_scaling(scaling, path)? {
            Ok(s) => s,
            Err(why) => return Ok(Err(why)),
        };
        let act = raw
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        let Some(activation) = Activation::parse(act) else {
            return Ok(Err(format!("hidden_act {act:?}")));
        };
        let window = if model_type == "mistral" {
            optional("sliding_window")?
        } else {
            if raw.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
                return Ok(Err("per-layer sliding windows (use_sliding_window)".into()));
            }
            None
        };
        Ok(Ok(DecoderConfig {
            model_type,
            vocab_size: required("vocab_size")?,
            hidden_size,
            intermediate_size: required("intermediate_size")?,
            layers: required("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            rms_norm_eps: number("rms_norm_eps", 1e-6)? as f32,
            rope_theta,
            rope_scaling,
            activation,
            window,
            tie_word_embeddings: raw.get("tie_word_embeddings").and_then(Value::as_bool)
                == Some(true),
        }))
    }

    /// RoPE `inv_freq` (head_dim / 2,): theta^(-2i/d), rescaled as `rope_scaling` says (the
    /// formulas of `ferrotune.models.llama.rope_inverse_frequencies`).
    pub fn inverse_frequencies(&self) -> Vec<f32> {
        let d = self.head_dim;
        let theta = self.rope_theta as f32;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / theta.powf((2 * i) as f32 / d as f32);
                match self.rope_scaling {
                    RopeScaling::None => f,
                    RopeScaling::Linear { factor } => f / factor as f32,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor: low,
                        high_freq_factor: high,
                        original_max_position_embeddings: original,
                    } => {
                        let (f, factor) = (f as f64, factor);
                        let wavelength = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelength > original / low {
                            f / factor
                        } else {
                            f
                        };
                        let medium = wavelength >= original / high && wavelength <= original / low;
                        if medium {
                            let smooth = (original / wavelength - low) / (high - low);
                            ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                        } else {
                            scaled as f32
                        }
                    }
                }
            })
            .collect()
    }
}

fn parse_rope_scaling(
    scaling: Option<&Map<String, Value>>,
    path: &Path,
) -> Result<Supported<RopeScaling>> {
    let Some(s) = scaling else {
        return Ok(Ok(RopeScaling::None));
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let field = |name: &str| -> Result<f64> {
        s.get(name).and_then(Value::as_f64).ok_or_else(|| {
            Error::format(
                path,
                format!("rope_scaling.{name}"),
                "missing or not a number",
            )
        })
    };
    Ok(Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: field("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: field("factor")?,
            low_freq_factor: field("low_freq_factor")?,
            high_freq_factor: field("high_freq_factor")?,
            original_max_position_embeddings: field("original_max_position_embeddings")?,
        },
        other => return Ok(Err(format!("rope_scaling type {other:?}"))),
    }))
}

/// One model the forward pass runs: a checkpoint, and optionally a LoRA adapter applied beside
/// its weights.
#[derive(Clone, Copy)]
pub struct Variant<'a> {
    pub weights: &'a Checkpoint,
    pub adapter: Option<&'a Adapter>,
}

/// The linear modules of one decoder layer, in the order the forward pass runs them.
const LAYER_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];
const EMBED: &str = "model.embed_tokens";

/// Checks that the forward pass applies every part of `adapter` (else the unmerged model would
/// silently miss it): LoRA on the decoder's linear layers, the output head or the embedding;
/// replaced tensors among those the forward pass reads.
pub fn adapter_support(config: &DecoderConfig, adapter: &Adapter) -> Supported<()> {
    let mut linears = vec!["lm_head".to_string()];
    let mut tensors = vec![
        format!("{EMBED}.weight"),
        "lm_head.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    for i in 0..config.layers {
        for name in LAYER_LINEARS {
            let module = format!("model.layers.{i}.{name}");
            tensors.push(format!("{module}.weight"));
            tensors.push(format!("{module}.bias"));
            linears.push(module);
        }
        for norm in [
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_norm",
            "self_attn.k_norm",
        ] {
            tensors.push(format!("model.layers.{i}.{norm}.weight"));
        }
    }
    for (name, module) in &adapter.modules {
        let is_embedding = name == EMBED;
        if !is_embedding && !linears.contains(name) {
            return Err(format!(
                "adapter module {name} is not a layer of the Llama-family decoder"
            ));
        }
        if !is_embedding && module.layout != Layout::Linear {
            return Err(format!("adapter module {name}: fan_in_fan_out layout"));
        }
        if is_embedding && module.magnitude.is_some() {
            return Err(format!("adapter module {name}: DoRA on an embedding"));
        }
    }
    for name in adapter.replacements.keys() {
        if !tensors.contains(name) {
            return Err(format!(
                "adapter replaces {name}, which the decoder's forward pass does not read"
            ));
        }
    }
    Ok(())
}

/// One stored tensor as a variant sees it (from its checkpoint, or replaced by its adapter).
struct Stored<'a> {
    name: String,
    checkpoint: &'a Checkpoint,
    file: &'a SafeTensors,
    info: &'a TensorInfo,
    /// For a packed 4-bit weight: what it stands for.
    quant: Option<QuantState>,
}

impl Stored<'_> {
    fn same_as(&self, other: &Stored) -> bool {
        std::ptr::eq(self.file, other.file) && self.info.begin == other.info.begin
    }

    fn dtype(&self) -> Dtype {
        self.quant.as_ref().map_or(self.info.dtype, |q| q.dtype)
    }

    fn shape(&self) -> &[usize] {
        self.quant.as_ref().map_or(&self.info.shape, |q| &q.shape)
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::format(self.file.path(), format!("tensor {:?}", self.name), message)
    }

    /// Checks the (logical) shape and dtype.
    fn expect(&self, shape: &[usize]) -> Result<()> {
        if self.shape() != shape {
            return Err(self.error(format!(
                "shape {:?}, the config says {shape:?}",
                self.shape()
            )));
        }
        if !is_mergeable(self.dtype()) {
            return Err(self.error(format!("dtype {} is not a float type", self.dtype())));
        }
        Ok(())
    }

    /// The whole tensor in f32 (vectors and adapter-sized tensors).
    fn to_f32(&self) -> Result<Vec<f32>> {
        let values = match &self.quant {
            Some(state) => tensor_to_f32(
                &dequantize_weight(self.checkpoint, &self.name, state)?,
                state.dtype,
            ),
            None => tensor_to_f32(self.file.slice(self.info), self.info.dtype),
        };
        release(self.file, self.info.begin, self.info.end);
        Ok(values)
    }

    /// Calls `each(bytes, first_row)` on consecutive slabs of rows (of `row_len` elements) of
    /// the stored dtype; mapped pages are populated before each slab and released after it (the
    /// next slab's populated and the previous one's released while this one is used).
    fn for_each_slab(&self, row_len: usize, mut each: impl FnMut(&[u8], usize)) -> Result<()> {
        let row_bytes = row_len * self.dtype().size();
        let rows = self.shape().iter().product::<usize>() / row_len.max(1);
        let per_slab = (SLAB_BYTES / row_bytes.max(1)).max(1);
        if let Some(state) = &self.quant {
            let bytes = dequantize_weight(self.checkpoint, &self.name, state)?;
            release(self.file, self.info.begin, self.info.end);
            for first in (0..rows).step_by(per_slab) {
                let end = (first + per_slab).min(rows);
                each(&bytes[first * row_bytes..end * row_bytes], first);
            }
            return Ok(());
        }
        let data = self.file.slice(self.info);
        let slabs: Vec<(usize, usize)> = (0..rows)
            .step_by(per_slab)
            .map(|first| (first, (first + per_slab).min(rows)))
            .collect();
        let bytes_of = |(first, end): (usize, usize)| {
            (
                self.info.begin + first * row_bytes,
                self.info.begin + end * row_bytes,
            )
        };
        let file = self.file;
        // The first slab is faulted in by the threads computing it (populating it here would
        // leave them idle meanwhile).
        // While a slab is computed (on every core), a helper thread releases the previous one's
        // pages and maps the next one's, so neither waits on the other.
        std::thread::scope(|scope| {
            let mut used: Option<(usize, usize)> = None;
            for (k, &(first, end)) in slabs.iter().enumerate() {
                let next = slabs.get(k + 1).map(|&next| bytes_of(next));
                let previous = used.take();
                let helper = scope.spawn(move || {
                    if let Some((begin, stop)) = previous {
                        release(file, begin, stop);
                    }
                    if let Some((begin, stop)) = next {
                        populate(file, begin, stop);
                    }
                });
                each(&data[first * row_bytes..end * row_bytes], first);
                used = Some(bytes_of((first, end)));
                helper.join().expect("populate and release do not panic");
            }
            if let Some((begin, stop)) = used {
                release(file, begin, stop);
            }
        });
        Ok(())
    }
}

/// Maps the pages of data bytes `begin..end` of `file` in one call.
fn populate(file: &SafeTensors, begin: usize, end: usize) {
    if end > begin {
        let _ = file.mmap().advise_range(
            memmap2::Advice::PopulateRead,
            file.data_start() + begin,
            end - begin,
        );
    }
}

/// Drops the mapped pages of data bytes `begin..end` of `file` from this process (they stay in
/// the page cache), so read weights do not pile up in the resident set.
fn release(file: &SafeTensors, begin: usize, end: usize) {
    if end > begin {
        // SAFETY: the map is private and read-only here; dropping its pages only makes a later
        // read fault them in again from the file. No view of these bytes outlives this call's
        // callers (the values were converted to f32 already).
        let _ = unsafe {
            file.mmap().unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                file.data_start() + begin,
                end - begin,
            )
        };
    }
}

/// The forward pass of several variants over the same `sequences` x `tokens` ids.
pub struct Forward<'a> {
    config: &'a DecoderConfig,
    variants: &'a [Variant<'a>],
    ids: &'a [u32],
    sequences: usize,
    tokens: usize,
    progress: bool,
}

impl<'a> Forward<'a> {
    /// `ids` (sequences, tokens) row-major, each below the vocabulary size.
    pub fn new(
        config: &'a DecoderConfig,
        variants: &'a [Variant<'a>],
        ids: &'a [u32],
        sequences: usize,
        tokens: usize,
    ) -> Result<Self> {
        if ids.len() != sequences * tokens || ids.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} probe ids for {sequences} x {tokens}",
                ids.len()
            )));
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= config.vocab_size) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary ({})",
                config.vocab_size
            )));
        }
        Ok(Forward {
            config,
            variants,
            ids,
            sequences,
            tokens,
            progress: false,
        })
    }

    /// A progress line per second on stderr.
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    /// Rows of activations per variant.
    fn n(&self) -> usize {
        self.sequences * self.tokens
    }

    /// The logits of every variant, each (sequences · tokens, vocab) row-major.
    pub fn logits(&self) -> Result<Vec<Vec<f32>>> {
        let c = self.config;
        let (hidden, d) = (c.hidden_size, c.head_dim);
        let (cos, sin) = rope_tables(&c.inverse_frequencies(), self.tokens);
        let shape = AttentionShape {
            sequences: self.variants.len() * self.sequences,
            tokens: self.tokens,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: d,
            window: c.window,
        };
        let start = Instant::now();
        let mut last_report = start;
        let mut x = self.embed()?; // (rows, hidden)
        for i in 0..c.layers {
            let p = |name: &str| format!("model.layers.{i}.{name}");
            let mut normed = x.clone();
            self.norm(&mut normed, hidden, &p("input_layernorm.weight"))?;
            let mut q = self.linear(&normed, hidden, &p("self_attn.q_proj"), c.heads * d)?;
            let mut k = self.linear(&normed, hidden, &p("self_attn.k_proj"), c.kv_heads * d)?;
            let v = self.linear(&normed, hidden, &p("self_attn.v_proj"), c.kv_heads * d)?;
            if self.find(0, &p("self_attn.q_norm.weight"))?.is_some() {
                self.norm(&mut q, d, &p("self_attn.q_norm.weight"))?;
                self.norm(&mut k, d, &p("self_attn.k_norm.weight"))?;
            }
            rope(&mut q, c.heads * d, d, self.tokens, &cos, &sin);
            rope(&mut k, c.kv_heads * d, d, self.tokens, &cos, &sin);
            let attended = attention(&q, &k, &v, shape);
            let out = self.linear(&attended, c.heads * d, &p("self_attn.o_proj"), hidden)?;
            x.iter_mut().zip(&out).for_each(|(x, o)| *x += o);

            let mut normed = x.clone();
            self.norm(&mut normed, hidden, &p("post_attention_layernorm.weight"))?;
            let inter = c.intermediate_size;
            let mut gate = self.linear(&normed, hidden, &p("mlp.gate_proj"), inter)?;
            let up = self.linear(&normed, hidden, &p("mlp.up_proj"), inter)?;
            gate.iter_mut()
                .zip(&up)
                .for_each(|(g, u)| *g = c.activation.apply(*g) * u);
            let down = self.linear(&gate, inter, &p("mlp.down_proj"), hidden)?;
            x.iter_mut().zip(&down).for_each(|(x, o)| *x += o);
            if self.progress && last_report.elapsed().as_secs_f64() >= 1.0 {
                last_report = Instant::now();
                let secs = start.elapsed().as_secs_f64();
                let eta = secs / (i + 1) as f64 * (c.layers - i - 1) as f64;
                eprintln!("  probe: layer {} / {}, ETA {eta:.1} s", i + 1, c.layers);
            }
        }
        self.norm(&mut x, hidden, "model.norm.weight")?;
        let logits = self.linear(&x, hidden, "lm_head", c.vocab_size)?;
        let per_variant = self.n() * c.vocab_size;
        Ok(logits.chunks(per_variant).map(<[f32]>::to_vec).collect())
    }

    /// Tensor `name` as variant `v` sees it, if present.
    fn find(&self, v: usize, name: &str) -> Result<Option<Stored<'a>>> {
        let variant = self.variants[v];
        if let Some(adapter) = variant.adapter {
            if let Some(key) = adapter.replacements.get(name) {
                let (file, info) = adapter.weights.get(key).expect("listed adapter key");
                return Ok(Some(Stored {
                    name: key.clone(),
                    checkpoint: &adapter.weights,
                    file,
                    info,
                    quant: None,
                }));
            }
        }
        let Some((file, info)) = variant.weights.get(name) else {
            return Ok(None);
        };
        Ok(Some(Stored {
            name: name.to_string(),
            checkpoint: variant.weights,
            file,
            info,
            quant: quant_state(variant.weights, name)?,
        }))
    }

    /// Like [`Self::find`], failing with the checkpoint's name when the tensor is missing.
    fn require(&self, v: usize, name: &str) -> Result<Stored<'a>> {
        self.find(v, name)?.ok_or_else(|| {
            let path = self.variants[v]
                .weights
                .files()
                .first()
                .map_or_else(PathBuf::new, |f| f.path().to_path_buf());
            Error::format(
                path,
                format!("tensor {name:?}"),
                "missing from the checkpoint",
            )
        })
    }

    /// The output head's weight as variant `v` sees it: `lm_head.weight`, or the embedding when
    /// tied (or when the checkpoint has no head of its own).
    fn head_name(&self, v: usize) -> Result<String> {
        let embedding = format!("{EMBED}.weight");
        if self.config.tie_word_embeddings || self.find(v, "lm_head.weight")?.is_none() {
            return Ok(embedding);
        }
        Ok("lm_head.weight".to_string())
    }

    /// x (rows, hidden): each variant's embedding rows of the ids, plus its embedding LoRA.
    fn embed(&self) -> Result<Vec<f32>> {
        let (hidden, n) = (self.config.hidden_size, self.n());
        let mut x = vec![0f32; self.variants.len() * n * hidden];
        for (v, variant) in self.variants.iter().enumerate() {
            let stored = self.require(v, &format!("{EMBED}.weight"))?;
            stored.expect(&[self.config.vocab_size, hidden])?;
            let rows = &mut x[v * n * hidden..(v + 1) * n * hidden];
            let dtype = stored.dtype();
            let row_bytes = hidden * dtype.size();
            if stored.quant.is_some() {
                let all = stored.to_f32()?;
                for (row, &id) in rows.chunks_exact_mut(hidden).zip(self.ids) {
                    row.copy_from_slice(&all[id as usize * hidden..][..hidden]);
                }
            } else {
                let data = stored.file.slice(stored.info);
                for (row, &id) in rows.chunks_exact_mut(hidden).zip(self.ids) {
                    to_f32(&data[id as usize * row_bytes..][..row_bytes], dtype, row);
                }
                release(stored.file, stored.info.begin, stored.info.end);
            }
            let lora = variant
                .adapter
                .and_then(|a| Some((a, a.modules.get(EMBED)?)));
            if let Some((adapter, module)) = lora {
                // A (r, vocab), B (hidden, r): row += s · B A[:, id]
                let (a, b) = (adapter.tensor_f32(&module.a), adapter.tensor_f32(&module.b));
                let (r, vocab) = (module.rank, self.config.vocab_size);
                for (row, &id) in rows.chunks_exact_mut(hidden).zip(self.ids) {
                    let column: Vec<f32> = (0..r).map(|k| a[k * vocab + id as usize]).collect();
                    for (dim, value) in row.iter_mut().enumerate() {
                        let delta: f32 = (0..r).map(|k| b[dim * r + k] * column[k]).sum();
                        *value += module.scale as f32 * delta;
                    }
                }
            }
        }
        Ok(x)
    }

    /// RMSNorm of each row of `x` (rows, ·) over `dim` with each variant's `name` weight.
    fn norm(&self, x: &mut [f32], dim: usize, name: &str) -> Result<()> {
        let per_variant = x.len() / self.variants.len();
        for (v, block) in x.chunks_mut(per_variant).enumerate() {
            let stored = self.require(v, name)?;
            stored.expect(&[dim])?;
            rms_norm(block, dim, &stored.to_f32()?, self.config.rms_norm_eps);
        }
        Ok(())
    }

    /// y (rows, out_dim) = x (rows, in_dim) · Wᵀ (+ bias) of `module` for every variant, with
    /// each variant's LoRA beside the weight; variants reading the same weight share its pass.
    fn linear(&self, x: &[f32], in_dim: usize, module: &str, out_dim: usize) -> Result<Vec<f32>> {
        let n = self.n();
        let mut y = vec![0f32; x.len() / in_dim * out_dim];
        // Variants grouped by the stored weight they read.
        let mut groups: Vec<(Stored, Vec<usize>)> = Vec::new();
        for v in 0..self.variants.len() {
            let weight_name = if module == "lm_head" {
                self.head_name(v)?
            } else {
                format!("{module}.weight")
            };
            let stored = self.require(v, &weight_name)?;
            match groups.iter_mut().find(|(s, _)| s.same_as(&stored)) {
                Some((_, members)) => members.push(v),
                None => groups.push((stored, vec![v])),
            }
        }
        for (stored, members) in &groups {
            stored.expect(&[out_dim, in_dim])?;
            let inputs: Vec<f32> = members
                .iter()
                .flat_map(|&v| &x[v * n * in_dim..(v + 1) * n * in_dim])
                .copied()
                .collect();
            let width = members.len() * n;
            let mut y_t = vec![0f32; out_dim * width]; // (out, width)
            let dtype = stored.dtype();
            stored.for_each_slab(in_dim, |bytes, first| {
                let rows = bytes.len() / (in_dim * dtype.size());
                let out = &mut y_t[first * width..(first + rows) * width];
                matmul_transposed(bytes, dtype, in_dim, &inputs, width, out);
            })?;
            for (j, &v) in members.iter().enumerate() {
                let rows = &mut y[v * n * out_dim..(v + 1) * n * out_dim];
                for (t, row) in rows.chunks_exact_mut(out_dim).enumerate() {
                    for (o, value) in row.iter_mut().enumerate() {
                        *value = y_t[o * width + j * n + t];
                    }
                }
                let lora = self.variants[v]
                    .adapter
                    .and_then(|a| Some((a, a.modules.get(module)?)));
                if let Some((adapter, lora)) = lora {
                    let x_v = &x[v * n * in_dim..(v + 1) * n * in_dim];
                    apply_lora(adapter, lora, stored, x_v, in_dim, rows, out_dim)?;
                }
            }
        }
        for (v, rows) in y.chunks_exact_mut(n * out_dim).enumerate() {
            if let Some(bias) = self.find(v, &format!("{module}.bias"))? {
                bias.expect(&[out_dim])?;
                let bias = bias.to_f32()?;
                for row in rows.chunks_exact_mut(out_dim) {
                    row.iter_mut().zip(&bias).for_each(|(y, b)| *y += b);
                }
            }
        }
        Ok(y)
    }
}

/// Adds `module`'s LoRA to `y` (n, out) = x (n, in) · Wᵀ of one variant, in place:
/// y += s · (x Aᵀ) Bᵀ (+ s · lora_B.bias); with DoRA, y = m / ‖W + s B A‖ ⊙ (y + s · (x Aᵀ) Bᵀ)
/// (the bias is added after, unscaled, by the caller).
fn apply_lora(
    adapter: &Adapter,
    module: &LoraModule,
    weight: &Stored,
    x: &[f32],
    in_dim: usize,
    y: &mut [f32],
    out_dim: usize,
) -> Result<()> {
    let n = x.len() / in_dim;
    let r = module.rank;
    let scale = module.scale as f32;
    let (a, b) = (adapter.tensor_f32(&module.a), adapter.tensor_f32(&module.b));
    let down = transpose(&matmul_f32(&a, in_dim, x, n), r, n); // (n, r)
    let up_t = matmul_f32(&b, r, &down, n); // (out, n)
    let lora_bias = module.bias.as_ref().map(|k| adapter.tensor_f32(k));
    let factor = match &module.magnitude {
        None => None,
        Some(key) => {
            let magnitude = adapter.tensor_f32(key);
            let norms = dora_row_norms(weight, &LowRank::linear(&a, &b, r, scale), in_dim)?;
            Some(
                magnitude
                    .iter()
                    .zip(&norms)
                    .map(|(m, norm)| (*m as f64 / norm) as f32)
                    .collect::<Vec<f32>>(),
            )
        }
    };
    for (t, row) in y.chunks_exact_mut(out_dim).enumerate() {
        for (o, value) in row.iter_mut().enumerate() {
            let mut lora = scale * up_t[o * n + t];
            if let Some(bias) = &lora_bias {
                lora += scale * bias[o];
            }
            *value = match &factor {
                Some(f) => f[o] * (*value + lora),
                None => *value + lora,
            };
        }
    }
    Ok(())
}

/// ‖W_o + (s B A)_o‖ for every output row o of the stored weight (DoRA's weight norm).
fn dora_row_norms(weight: &Stored, delta: &LowRank, in_dim: usize) -> Result<Vec<f64>> {
    let dtype = weight.dtype();
    let mut norms = vec![0f64; delta.rows];
    let mut row = vec![0f32; in_dim];
    weight.for_each_slab(in_dim, |bytes, first| {
        for (i, stored_row) in bytes.chunks_exact(in_dim * dtype.size()).enumerate() {
            let o = first + i;
            to_f32(stored_row, dtype, &mut row);
            add_combination(
                &mut row,
                &delta.coeff[o * delta.rank..][..delta.rank],
                &delta.basis,
            );
            norms[o] = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        }
    })?;
    Ok(norms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> Result<Supported<DecoderConfig>> {
        DecoderConfig::parse(json.as_object().unwrap(), Path::new("config.json"))
    }

    fn tiny(extra: serde_json::Value) -> serde_json::Value {
        let mut base = serde_json::json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 1, "num_attention_heads": 2
        });
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base
    }

    #[test]
    fn configs_are_read_as_transformers_4_and_5_write_them() {
        let c = parse(tiny(serde_json::json!({}))).unwrap().unwrap();
        assert_eq!((c.kv_heads, c.head_dim, c.window), (2, 4, None));
        assert_eq!(c.inverse_frequencies(), vec![1.0, 0.01]);
        let v5 = serde_json::json!({"rope_parameters": {"rope_theta": 100.0, "rope_type": "linear", "factor": 2.0}});
        let c = parse(tiny(v5)).unwrap().unwrap();
        assert_eq!(c.inverse_frequencies(), vec![0.5, 0.05]);
        let mistral = serde_json::json!({"model_type": "mistral", "sliding_window": 3});
        assert_eq!(parse(tiny(mistral)).unwrap().unwrap().window, Some(3));
    }

    #[test]
    fn llama3_rope_keeps_short_and_divides_long_wavelengths() {
        let scaling = serde_json::json!({"head_dim": 64, "rope_theta": 500000.0, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}});
        let scaled = parse(tiny(scaling)).unwrap().unwrap().inverse_frequencies();
        let plain = parse(tiny(
            serde_json::json!({"head_dim": 64, "rope_theta": 500000.0}),
        ))
        .unwrap()
        .unwrap()
        .inverse_frequencies();
        assert_eq!(scaled[0], plain[0]); // wavelength 2π: kept
        assert!((scaled[31] - plain[31] / 8.0).abs() <= 1e-6 * plain[31]); // longest: divided
    }

    #[test]
    fn unsupported_models_say_why_and_bad_fields_are_named() {
        let gpt2 = parse(serde_json::json!({"model_type": "gpt2", "n_embd": 8})).unwrap();
        assert!(gpt2.unwrap_err().contains("gpt2"));
        let yarn = serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}});
        assert!(parse(tiny(yarn)).unwrap().unwrap_err().contains("yarn"));
        let act = parse(tiny(serde_json::json!({"hidden_act": "relu"}))).unwrap();
        assert!(act.unwrap_err().contains("relu"));
        for (bad, field) in [
            (
                serde_json::json!({"num_key_value_heads": 3}),
                "num_key_value_heads",
            ),
            (serde_json::json!({"vocab_size": "many"}), "vocab_size"),
            (
                serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
                "rope_scaling.low_freq_factor",
            ),
        ] {
            let err = parse(tiny(bad)).unwrap_err().to_string();
            assert!(err.contains(field), "{field} not in {err}");
        }
    }
}

//! `ferrotune export --format gguf`: a Hugging Face Llama, Mistral, Qwen2 or Qwen3 model as a GGUF
//! v3 file (the llama.cpp format, architecture `llama`, `qwen2` or `qwen3`) in F16, BF16 or Q8_0,
//! with the tokenizer and chat template.
//!
//! Layout (little-endian): `"GGUF"`, version u32 = 3, tensor count u64, metadata count u64; the
//! metadata as (key string, value type u32, value); the tensor infos as (name string, n_dims u32,
//! dims u64 × n_dims with the fastest-varying first, ggml type u32, data offset u64); zero padding
//! to `general.alignment` (32); the tensor data, each tensor starting on a 32-byte boundary.
//! Strings are a u64 length then UTF-8 bytes.
//!
//! Tensors take llama.cpp's names (`token_embd`, `blk.N.attn_q`, `blk.N.ffn_down`, `output_norm`,
//! `output`, ...; Qwen2's q/k/v biases, Qwen3's `attn_q_norm` / `attn_k_norm`). llama.cpp's `llama`
//! architecture applies rotary embeddings to interleaved pairs where HF rotates halves, so for it
//! the rows of q_proj and k_proj are permuted within each head (`qwen2` and `qwen3` rotate halves
//! as HF does and keep them as they are): HF row (h, j, i) of a
//! head laid out as (2, D/2) becomes row (h, i, j). One-dimensional tensors (norms) stay F32.
//! Q8_0 stores blocks of 32 values as an f16 scale d = max|x| / 127 and 32 int8 round(x / d)
//! (rounding half away from zero, as ggml's reference quantizer).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use half::f16;
use rayon::prelude::*;
use serde_json::Value;

use super::convert::{check_mergeable, to_f32};
use crate::error::{Error, Result};
use crate::io::{AtomicFile, Checkpoint, Dtype, TensorInfo};

const ALIGNMENT: usize = 32;
const Q8_BLOCK: usize = 32;

/// The element type of the exported 2-D tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F16,
    BF16,
    Q8_0,
}

impl std::str::FromStr for GgufType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(GgufType::F16),
            "bf16" => Ok(GgufType::BF16),
            "q8_0" => Ok(GgufType::Q8_0),
            other => Err(Error::InvalidArgument(format!(
                "GGUF type {other:?}: one of f16, bf16, q8_0"
            ))),
        }
    }
}

impl GgufType {
    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
            GgufType::BF16 => 32,
        }
    }
}

/// ggml tensor types used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
    BF16 = 30,
}

impl GgmlType {
    /// Bytes for `n` elements (n a multiple of 32 for Q8_0).
    fn nbytes(self, n: usize) -> usize {
        match self {
            GgmlType::F32 => 4 * n,
            GgmlType::F16 | GgmlType::BF16 => 2 * n,
            GgmlType::Q8_0 => n / Q8_BLOCK * (2 + Q8_BLOCK),
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone)]
enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Meta {
    fn encode(&self, out: &mut Vec<u8>) {
        const U32: u32 = 4;
        const I32: u32 = 5;
        const F32: u32 = 6;
        const BOOL: u32 = 7;
        const STRING: u32 = 8;
        const ARRAY: u32 = 9;
        let array_head = |out: &mut Vec<u8>, kind: u32, n: usize| {
            out.extend_from_slice(&ARRAY.to_le_bytes());
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&(n as u64).to_le_bytes());
        };
        match self {
            Meta::U32(v) => {
                out.extend_from_slice(&U32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            Meta::F32(v) => {
                out.extend_from_slice(&F32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            Meta::Bool(v) => {
                out.extend_from_slice(&BOOL.to_le_bytes());
                out.push(*v as u8);
            }
            Meta::Str(s) => {
                out.extend_from_slice(&STRING.to_le_bytes());
                put_str(out, s);
            }
            Meta::Strs(items) => {
                array_head(out, STRING, items.len());
                items.iter().for_each(|s| put_str(out, s));
            }
            Meta::I32s(items) => {
                array_head(out, I32, items.len());
                items
                    .iter()
                    .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
            Meta::F32s(items) => {
                array_head(out, F32, items.len());
                items
                    .iter()
                    .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
        }
    }
}

/// The hyperparameters of config.json that GGUF records.
struct ModelConfig {
    /// llama.cpp's architecture: "llama" (HF llama, mistral), "qwen2" or "qwen3".
    arch: &'static str,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    vocab: usize,
    context: usize,
    rms_eps: f64,
    rope_theta: f64,
    rope_scaling: Option<serde_json::Map<String, Value>>,
    tied: bool,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    name: String,
}

fn read_json(path: &Path) -> Result<serde_json::Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::format(
            path,
            format!("line {}", e.line()),
            format!("invalid JSON: {e}"),
        )
    })
}

fn first_id(v: Option<&Value>) -> Option<u32> {
    match v? {
        Value::Array(items) => items.first().and_then(Value::as_u64).map(|x| x as u32),
        other => other.as_u64().map(|x| x as u32),
    }
}

impl ModelConfig {
    fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let raw = read_json(&path)?;
        let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
        let arch = match model_type {
            "llama" | "mistral" => "llama",
            "qwen2" => "qwen2",
            "qwen3" => "qwen3",
            _ => {
                return Err(Error::format(
                    &path,
                    "model_type",
                    format!("{model_type:?}: GGUF export covers llama, mistral, qwen2 and qwen3"),
                ))
            }
        };
        let int = |field: &str| -> Result<usize> {
            raw.get(field)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| Error::format(&path, field, "missing or not an integer"))
        };
        let hidden = int("hidden_size")?;
        let heads = int("num_attention_heads")?;
        let kv_heads = raw
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map_or(heads, |v| v as usize);
        let head_dim = raw
            .get("head_dim")
            .and_then(Value::as_u64)
            .map_or(hidden / heads.max(1), |v| v as usize);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || head_dim % 2 != 0 {
            return Err(Error::format(
                &path,
                "num_key_value_heads",
                "inconsistent head counts",
            ));
        }
        // RoPE: `rope_theta` / `rope_scaling` (transformers 4), or one `rope_parameters` object
        // holding both (transformers 5).
        let rope_parameters = raw.get("rope_parameters").and_then(Value::as_object);
        let rope_theta = raw
            .get("rope_theta")
            .or_else(|| rope_parameters.and_then(|p| p.get("rope_theta")))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let rope_scaling = raw
            .get("rope_scaling")
            .and_then(Value::as_object)
            .or(rope_parameters)
            .cloned();
        let name = raw
            .get("_name_or_path")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into());
        Ok(ModelConfig {
            arch,
            hidden,
            layers: int("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            intermediate: int("intermediate_size")?,
            vocab: int("vocab_size")?,
            context: raw
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(2048) as usize,
            rms_eps: raw
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tied: raw
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos: first_id(raw.get("bos_token_id")),
            eos: first_id(raw.get("eos_token_id")),
            pad: first_id(raw.get("pad_token_id")),
            name,
        })
    }
}

// llama.cpp's token types (the SentencePiece numbering).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The tokenizer metadata: a byte-level BPE `tokenizer.json` as llama.cpp's "gpt2" model, or, where
/// the folder has no such file but a SentencePiece `tokenizer.model` (Llama 2, Mistral v0.1), that
/// model as llama.cpp's "llama" one. Then the special tokens, the add-BOS/EOS flags and the chat
/// template.
fn tokenizer_metadata(
    dir: &Path,
    config: &ModelConfig,
    meta: &mut Vec<(String, Meta)>,
) -> Result<()> {
    let json_path = dir.join("tokenizer.json");
    let json = if json_path.exists() {
        Some(read_json(&json_path)?)
    } else {
        None
    };
    let spm_path = dir.join("tokenizer.model");
    let byte_level_bpe = json.as_ref().is_some_and(|raw| {
        raw.get("model")
            .and_then(|m| m.get("type"))
            .and_then(Value::as_str)
            == Some("BPE")
            && (mentions_byte_level(raw.get("pre_tokenizer"))
                || mentions_byte_level(raw.get("decoder")))
    });
    let (tokens, special_ids) = match json {
        Some(raw) if byte_level_bpe || !spm_path.exists() => {
            bpe_vocabulary(&json_path, &raw, config, meta)?
        }
        raw if spm_path.exists() => {
            sentencepiece_vocabulary(dir, &spm_path, raw.as_ref(), config, meta)?
        }
        _ => {
            return Err(Error::format(
                dir,
                "folder",
                "no tokenizer.json or tokenizer.model to export",
            ))
        }
    };
    special_token_metadata(dir, config, &tokens, &special_ids, meta)
}

/// Whether a tokenizer.json component (pre-tokenizer, decoder) is or contains `ByteLevel`.
fn mentions_byte_level(component: Option<&Value>) -> bool {
    serde_json::to_string(&component).is_ok_and(|s| s.contains("\"ByteLevel\""))
}

/// The ids of a tokenizer.json's `added_tokens`, by content.
fn added_token_ids(
    raw: &serde_json::Map<String, Value>,
    path: &Path,
) -> Result<Vec<(u32, String, bool)>> {
    let mut out = Vec::new();
    for (i, added) in raw
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let place = format!("added_tokens[{i}]");
        let id = added
            .get("id")
            .and_then(Value::as_u64)
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| Error::format(path, &place, "needs an integer id"))?;
        let content = added
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::format(path, &place, "needs a content string"))?;
        let special = added
            .get("special")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        out.push((id, content.to_string(), special));
    }
    Ok(out)
}

/// A SentencePiece `tokenizer.model` as llama.cpp's "llama" vocabulary, as its converters write it:
/// every piece with its score and type (user-defined pieces count as normal), then the tokens of
/// `added_tokens.json` past the model's own (user-defined, score -1000, ids in sequence), then
/// `[PADn]` entries (unused, score -10000) up to the model's vocabulary size. Returns the tokens
/// and the special-token ids by content.
fn sentencepiece_vocabulary(
    dir: &Path,
    spm_path: &Path,
    json: Option<&serde_json::Map<String, Value>>,
    config: &ModelConfig,
    meta: &mut Vec<(String, Meta)>,
) -> Result<(Vec<String>, BTreeMap<String, u32>)> {
    let pieces = super::spm::read_pieces(spm_path)?;
    let mut tokens = Vec::with_capacity(config.vocab.max(pieces.len()));
    let mut scores = Vec::with_capacity(tokens.capacity());
    let mut types = Vec::with_capacity(tokens.capacity());
    for piece in pieces {
        tokens.push(piece.text);
        scores.push(piece.score);
        types.push(if piece.kind == USER_DEFINED {
            NORMAL
        } else {
            piece.kind
        });
    }
    let added_path = dir.join("added_tokens.json");
    if added_path.exists() {
        let added = read_json(&added_path)?;
        let mut extra: Vec<(usize, &str)> = Vec::new();
        for (content, id) in &added {
            let id = id
                .as_u64()
                .ok_or_else(|| Error::format(&added_path, content, "id must be an integer"))?
                as usize;
            if id >= tokens.len() {
                extra.push((id, content));
            }
        }
        extra.sort_unstable();
        for (id, content) in extra {
            if id != tokens.len() {
                return Err(Error::format(
                    &added_path,
                    content,
                    format!("id {id}: added tokens must follow the model's own in sequence (next is {})", tokens.len()),
                ));
            }
            tokens.push(content.to_string());
            scores.push(-1000.0);
            types.push(USER_DEFINED);
        }
    }
    for i in tokens.len()..config.vocab {
        tokens.push(format!("[PAD{i}]"));
        scores.push(-10000.0);
        types.push(UNUSED);
    }
    let mut special_ids: BTreeMap<String, u32> = BTreeMap::new();
    if let Some(raw) = json {
        for (id, content, _) in added_token_ids(raw, &dir.join("tokenizer.json"))? {
            special_ids.insert(content, id);
        }
    }
    meta.push(("tokenizer.ggml.model".into(), Meta::Str("llama".into())));
    meta.push(("tokenizer.ggml.pre".into(), Meta::Str("default".into())));
    meta.push(("tokenizer.ggml.tokens".into(), Meta::Strs(tokens.clone())));
    meta.push(("tokenizer.ggml.scores".into(), Meta::F32s(scores)));
    meta.push(("tokenizer.ggml.token_type".into(), Meta::I32s(types)));
    Ok((tokens, special_ids))
}

/// A byte-level BPE `tokenizer.json` as llama.cpp's "gpt2" vocabulary (tokens, types, merges).
/// Returns the tokens and the special-token ids by content.
fn bpe_vocabulary(
    path: &Path,
    raw: &serde_json::Map<String, Value>,
    config: &ModelConfig,
    meta: &mut Vec<(String, Meta)>,
) -> Result<(Vec<String>, BTreeMap<String, u32>)> {
    let path = path.to_path_buf();
    let model = raw
        .get("model")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::format(&path, "model", "missing"))?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return Err(Error::format(
            &path,
            "model.type",
            "only BPE tokenizers (or a SentencePiece tokenizer.model) are exported",
        ));
    }
    if !mentions_byte_level(raw.get("pre_tokenizer")) && !mentions_byte_level(raw.get("decoder")) {
        return Err(Error::format(
            &path,
            "pre_tokenizer",
            "not byte-level BPE, and no tokenizer.model beside it: only byte-level (GPT-2 style) \
             tokenizer.json files and SentencePiece models are exported",
        ));
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::format(&path, "model.vocab", "missing or not an object"))?;
    let mut by_id: BTreeMap<usize, (String, i32)> = BTreeMap::new();
    for (token, id) in vocab {
        let id = id.as_u64().ok_or_else(|| {
            Error::format(
                &path,
                format!("model.vocab.{token}"),
                "id must be an integer",
            )
        })?;
        by_id.insert(id as usize, (token.clone(), NORMAL));
    }
    let mut special_ids: BTreeMap<String, u32> = BTreeMap::new();
    for (id, content, special) in added_token_ids(raw, &path)? {
        by_id.insert(
            id as usize,
            (
                content.clone(),
                if special { CONTROL } else { USER_DEFINED },
            ),
        );
        special_ids.insert(content, id);
    }
    let size = config
        .vocab
        .max(by_id.keys().next_back().map_or(0, |k| k + 1));
    let mut tokens = Vec::with_capacity(size);
    let mut types = Vec::with_capacity(size);
    for i in 0..size {
        match by_id.remove(&i) {
            Some((token, kind)) => {
                tokens.push(token);
                types.push(kind);
            }
            None => {
                tokens.push(format!("[PAD{i}]"));
                types.push(UNUSED);
            }
        }
    }
    let merges: Vec<String> = match model.get("merges").and_then(Value::as_array) {
        None => Vec::new(),
        Some(items) => items
            .iter()
            .enumerate()
            .map(|(i, m)| match m {
                Value::String(s) => Ok(s.clone()),
                Value::Array(pair) if pair.len() == 2 => match (pair[0].as_str(), pair[1].as_str())
                {
                    (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                    _ => Err(Error::format(
                        &path,
                        format!("model.merges[{i}]"),
                        "must be two strings",
                    )),
                },
                _ => Err(Error::format(
                    &path,
                    format!("model.merges[{i}]"),
                    "must be a string or a pair",
                )),
            })
            .collect::<Result<_>>()?,
    };
    let pre = pre_tokenizer_name(raw.get("pre_tokenizer"));
    meta.push(("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())));
    meta.push(("tokenizer.ggml.pre".into(), Meta::Str(pre.into())));
    meta.push(("tokenizer.ggml.tokens".into(), Meta::Strs(tokens.clone())));
    meta.push(("tokenizer.ggml.token_type".into(), Meta::I32s(types)));
    meta.push(("tokenizer.ggml.merges".into(), Meta::Strs(merges)));
    Ok((tokens, special_ids))
}

/// The special-token ids (tokenizer_config.json names them, config.json gives ids as a fallback),
/// the add-BOS/EOS flags and the chat template.
fn special_token_metadata(
    dir: &Path,
    config: &ModelConfig,
    tokens: &[String],
    special_ids: &BTreeMap<String, u32>,
    meta: &mut Vec<(String, Meta)>,
) -> Result<()> {
    let token_config_path = dir.join("tokenizer_config.json");
    let token_config = if token_config_path.exists() {
        read_json(&token_config_path)?
    } else {
        serde_json::Map::new()
    };
    let lookup = |field: &str| -> Option<u32> {
        let content = match token_config.get(field)? {
            Value::String(s) => s.clone(),
            Value::Object(o) => o.get("content")?.as_str()?.to_string(),
            _ => return None,
        };
        special_ids
            .get(&content)
            .copied()
            .or_else(|| tokens.iter().position(|t| *t == content).map(|i| i as u32))
    };
    for (field, key, fallback) in [
        ("bos_token", "tokenizer.ggml.bos_token_id", config.bos),
        ("eos_token", "tokenizer.ggml.eos_token_id", config.eos),
        ("pad_token", "tokenizer.ggml.padding_token_id", config.pad),
        ("unk_token", "tokenizer.ggml.unknown_token_id", None),
    ] {
        if let Some(id) = lookup(field).or(fallback) {
            meta.push((key.into(), Meta::U32(id)));
        }
    }
    for (field, key) in [
        ("add_bos_token", "tokenizer.ggml.add_bos_token"),
        ("add_eos_token", "tokenizer.ggml.add_eos_token"),
    ] {
        if let Some(flag) = token_config.get(field).and_then(Value::as_bool) {
            meta.push((key.into(), Meta::Bool(flag)));
        }
    }
    let template = match token_config.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| named.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    };
    let template = match template {
        Some(t) => Some(t),
        None => {
            let file = dir.join("chat_template.jinja");
            if file.exists() {
                Some(std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?)
            } else {
                None
            }
        }
    };
    if let Some(t) = template {
        meta.push(("tokenizer.chat_template".into(), Meta::Str(t)));
    }
    Ok(())
}

/// llama.cpp's name for the pre-tokenizer regex, recognised from the tokenizer.json text.
fn pre_tokenizer_name(pre: Option<&Value>) -> &'static str {
    let text = serde_json::to_string(&pre).unwrap_or_default();
    if text.contains(r"\\p{N}{1,3}") && text.contains(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)") {
        "llama-bpe"
    } else if text.contains(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)") {
        "qwen2"
    } else if text.contains("\"ByteLevel\"") && !text.contains("\"Split\"") {
        "gpt-2"
    } else {
        "default"
    }
}

/// One tensor of the GGUF file.
struct Entry<'a> {
    name: String,
    /// Source tensor (None for computed ones such as `rope_freqs`).
    source: Option<&'a TensorInfo>,
    /// Computed f32 data for tensors without a source.
    values: Vec<f32>,
    /// HF shape (rows first).
    shape: Vec<usize>,
    ggml: GgmlType,
    /// q/k row permutation: heads for which rows are re-interleaved.
    permute_heads: Option<usize>,
}

/// llama.cpp's name for an HF Llama tensor, and the q/k permutation it needs (head count).
fn gguf_name(hf: &str, config: &ModelConfig) -> Option<(String, Option<usize>)> {
    let simple = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = simple {
        return Some((name.to_string(), None));
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (block, tail) = rest.split_once('.')?;
    let block: usize = block.parse().ok()?;
    // llama.cpp's llama architecture rotates interleaved pairs (q/k rows permuted, see the module
    // docs); its qwen2 and qwen3 architectures rotate halves, as HF does.
    let rotary_heads = |heads: usize| (config.arch == "llama").then_some(heads);
    let (name, permute) = match tail {
        "input_layernorm.weight" => ("attn_norm.weight", None),
        "self_attn.q_norm.weight" => ("attn_q_norm.weight", None),
        "self_attn.k_norm.weight" => ("attn_k_norm.weight", None),
        "post_attention_layernorm.weight" => ("ffn_norm.weight", None),
        "self_attn.q_proj.weight" => ("attn_q.weight", rotary_heads(config.heads)),
        "self_attn.q_proj.bias" => ("attn_q.bias", rotary_heads(config.heads)),
        "self_attn.k_proj.weight" => ("attn_k.weight", rotary_heads(config.kv_heads)),
        "self_attn.k_proj.bias" => ("attn_k.bias", rotary_heads(config.kv_heads)),
        "self_attn.v_proj.weight" => ("attn_v.weight", None),
        "self_attn.v_proj.bias" => ("attn_v.bias", None),
        "self_attn.o_proj.weight" => ("attn_output.weight", None),
        "mlp.gate_proj.weight" => ("ffn_gate.weight", None),
        "mlp.up_proj.weight" => ("ffn_up.weight", None),
        "mlp.down_proj.weight" => ("ffn_down.weight", None),
        _ => return None,
    };
    Some((format!("blk.{block}.{name}"), permute))
}

/// llama.cpp's `rope_freqs` factors for `rope_scaling.rope_type = "llama3"`.
fn llama3_rope_factors(config: &ModelConfig, scaling: &serde_json::Map<String, Value>) -> Vec<f32> {
    let get = |k: &str, d: f64| scaling.get(k).and_then(Value::as_f64).unwrap_or(d);
    let (factor, low, high) = (
        get("factor", 8.0),
        get("low_freq_factor", 1.0),
        get("high_freq_factor", 4.0),
    );
    let original = get("original_max_position_embeddings", 8192.0);
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    (0..config.head_dim / 2)
        .map(|i| {
            let freq = 1.0
                / config
                    .rope_theta
                    .powf((2 * i) as f64 / config.head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor as f32
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

/// What an export wrote.
#[derive(Debug, Clone, Default)]
pub struct ExportSummary {
    pub tensors: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// Writes the model in `model_dir` as the GGUF file `out`.
pub fn export_gguf(
    model_dir: &Path,
    out: &Path,
    kind: GgufType,
    progress: bool,
) -> Result<ExportSummary> {
    let start = std::time::Instant::now();
    let config = ModelConfig::read(model_dir)?;
    let checkpoint = Checkpoint::open(model_dir)?;
    let arch = config.arch;
    let mut meta: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), Meta::Str(arch.into())),
        ("general.name".into(), Meta::Str(config.name.clone())),
        ("general.file_type".into(), Meta::U32(kind.file_type())),
        ("general.quantization_version".into(), Meta::U32(2)),
        ("general.alignment".into(), Meta::U32(ALIGNMENT as u32)),
        (
            format!("{arch}.context_length"),
            Meta::U32(config.context as u32),
        ),
        (
            format!("{arch}.embedding_length"),
            Meta::U32(config.hidden as u32),
        ),
        (
            format!("{arch}.block_count"),
            Meta::U32(config.layers as u32),
        ),
        (
            format!("{arch}.feed_forward_length"),
            Meta::U32(config.intermediate as u32),
        ),
        (
            format!("{arch}.rope.dimension_count"),
            Meta::U32(config.head_dim as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            Meta::U32(config.heads as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Meta::U32(config.kv_heads as u32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Meta::F32(config.rms_eps as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Meta::F32(config.rope_theta as f32),
        ),
        (format!("{arch}.vocab_size"), Meta::U32(config.vocab as u32)),
    ];
    if config.head_dim * config.heads != config.hidden {
        meta.push((
            format!("{arch}.attention.key_length"),
            Meta::U32(config.head_dim as u32),
        ));
        meta.push((
            format!("{arch}.attention.value_length"),
            Meta::U32(config.head_dim as u32),
        ));
    }
    let mut extra: Vec<Entry> = Vec::new();
    if let Some(scaling) = &config.rope_scaling {
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        match kind {
            "default" => {}
            "linear" => {
                let factor = scaling.get("factor").and_then(Value::as_f64).unwrap_or(1.0);
                meta.push((
                    format!("{arch}.rope.scaling.type"),
                    Meta::Str("linear".into()),
                ));
                meta.push((
                    format!("{arch}.rope.scaling.factor"),
                    Meta::F32(factor as f32),
                ));
            }
            "llama3" => {
                let factors = llama3_rope_factors(&config, scaling);
                extra.push(Entry {
                    name: "rope_freqs.weight".into(),
                    source: None,
                    shape: vec![factors.len()],
                    values: factors,
                    ggml: GgmlType::F32,
                    permute_heads: None,
                });
            }
            other => {
                return Err(Error::format(
                    model_dir.join("config.json"),
                    "rope_scaling.rope_type",
                    format!("{other:?} has no GGUF export here (default, linear, llama3)"),
                ))
            }
        }
    }
    tokenizer_metadata(model_dir, &config, &mut meta)?;
    let _ = Meta::F32s(Vec::new()); // (array of floats: reserved for scores of SentencePiece vocabularies)

    // The tensors, in checkpoint order.
    let mut entries: Vec<Entry> = Vec::new();
    for name in checkpoint.names() {
        let (_, info) = checkpoint.get(name).expect("listed");
        if name.ends_with("rotary_emb.inv_freq") || (config.tied && name == "lm_head.weight") {
            continue;
        }
        let (gguf, permute) = gguf_name(name, &config).ok_or_else(|| {
            Error::format(
                checkpoint.get(name).expect("listed").0.path(),
                format!("tensor {name:?}"),
                "has no llama.cpp name (not a tensor of a Llama, Qwen2 or Qwen3 model)",
            )
        })?;
        check_mergeable(info.dtype, name)?;
        let ggml = if info.shape.len() <= 1 || gguf.ends_with("_norm.weight") {
            GgmlType::F32
        } else {
            match kind {
                GgufType::F16 => GgmlType::F16,
                GgufType::BF16 => GgmlType::BF16,
                GgufType::Q8_0 if info.shape[info.shape.len() - 1] % Q8_BLOCK == 0 => {
                    GgmlType::Q8_0
                }
                GgufType::Q8_0 => GgmlType::F16,
            }
        };
        if let Some(heads) = permute {
            if info.shape[0] % (2 * heads) != 0 {
                return Err(Error::InvalidArgument(format!(
                    "{name}: {} rows do not split into {heads} heads",
                    info.shape[0]
                )));
            }
        }
        entries.push(Entry {
            name: gguf,
            source: Some(info),
            values: Vec::new(),
            shape: info.shape.clone(),
            ggml,
            permute_heads: permute,
        });
    }
    entries.extend(extra);

    // Header, metadata, tensor infos.
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    header.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (key, value) in &meta {
        put_str(&mut header, key);
        value.encode(&mut header);
    }
    let mut offset = 0usize;
    let mut offsets = Vec::with_capacity(entries.len());
    for e in &entries {
        put_str(&mut header, &e.name);
        header.extend_from_slice(&(e.shape.len() as u32).to_le_bytes());
        for d in e.shape.iter().rev() {
            header.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        header.extend_from_slice(&(e.ggml as u32).to_le_bytes());
        header.extend_from_slice(&(offset as u64).to_le_bytes());
        offsets.push(offset);
        offset += e.ggml.nbytes(e.shape.iter().product());
        offset = offset.div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    header.resize(header.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);

    let mut file = AtomicFile::create(out)?;
    let io_err = |e| Error::io(out, e);
    file.write_all(&header).map_err(io_err)?;
    let mut written = 0usize;
    for (i, e) in entries.iter().enumerate() {
        let data = match e.source {
            Some(info) => {
                let (st, _) = checkpoint.get(&info.name).expect("listed");
                encode_tensor(st.slice(info), info.dtype, e)
            }
            None => e.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        debug_assert_eq!(written, offsets[i]);
        file.write_all(&data).map_err(io_err)?;
        written += data.len();
        let padded = written.div_ceil(ALIGNMENT) * ALIGNMENT;
        file.write_all(&vec![0u8; padded - written])
            .map_err(io_err)?;
        written = padded;
        if progress && (i + 1) % 50 == 0 {
            eprintln!(
                "  {} / {} tensors, {:.2} GB",
                i + 1,
                entries.len(),
                written as f64 / 1e9
            );
        }
    }
    file.commit()?;
    Ok(ExportSummary {
        tensors: entries.len(),
        bytes: (header.len() + written) as u64,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The GGUF bytes of one tensor: rows permuted for q/k, converted to the entry's type.
fn encode_tensor(bytes: &[u8], dtype: Dtype, entry: &Entry) -> Vec<u8> {
    let rows = if entry.shape.len() >= 2 {
        entry.shape[0]
    } else {
        1
    };
    let cols: usize = entry.shape.iter().product::<usize>() / rows.max(1);
    let row_bytes = cols * dtype.size();
    // Output row r comes from source row `source_row(r)`.
    let source_row = |r: usize| -> usize {
        match entry.permute_heads {
            None => r,
            Some(heads) => {
                let per_head = rows / heads; // = 2 * half
                let half = per_head / 2;
                let (h, within) = (r / per_head, r % per_head);
                let (i, j) = (within / 2, within % 2); // GGUF row (h, i, j) <- HF row (h, j, i)
                h * per_head + j * half + i
            }
        }
    };
    let out_row_bytes = entry.ggml.nbytes(cols);
    let mut out = vec![0u8; rows * out_row_bytes];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(out_row_bytes)
        .enumerate()
        .for_each(|(r, dst)| {
            let s = source_row(r);
            let src = &bytes[s * row_bytes..(s + 1) * row_bytes];
            if entry.ggml == GgmlType::BF16 && dtype == Dtype::BF16 {
                dst.copy_from_slice(src);
                return;
            }
            let mut values = vec![0f32; cols];
            to_f32(src, dtype, &mut values);
            match entry.ggml {
                GgmlType::F32 => super::convert::from_f32(&values, Dtype::F32, dst),
                GgmlType::F16 => super::convert::from_f32(&values, Dtype::F16, dst),
                GgmlType::BF16 => super::convert::from_f32(&values, Dtype::BF16, dst),
                GgmlType::Q8_0 => quantize_q8_0(&values, dst),
            }
        });
    out
}

/// Q8_0 blocks of `values` (a multiple of 32) into `out`: per block an f16 scale then 32 int8.
pub fn quantize_q8_0(values: &[f32], out: &mut [u8]) {
    for (block, dst) in values
        .chunks_exact(Q8_BLOCK)
        .zip(out.chunks_exact_mut(2 + Q8_BLOCK))
    {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let inverse = if d == 0.0 { 0.0 } else { 1.0 / d };
        dst[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for (q, x) in dst[2..].iter_mut().zip(block) {
            *q = ((x * inverse).round() as i8) as u8; // round half away from zero, as ggml's roundf
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trips_within_half_a_step() {
        let values: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 31.5) * 0.013)
            .collect();
        let mut out = vec![0u8; 2 * 34];
        quantize_q8_0(&values, &mut out);
        for (b, block) in values.chunks(32).enumerate() {
            let d = f16::from_bits(u16::from_le_bytes([out[b * 34], out[b * 34 + 1]])).to_f32();
            let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!((d - amax / 127.0).abs() <= amax / 127.0 * 1e-3);
            for (k, x) in block.iter().enumerate() {
                let q = out[b * 34 + 2 + k] as i8 as f32;
                // half a step, plus the f16 rounding of d carried by |q| <= 127
                assert!(
                    (q * d - x).abs() <= d * (0.5 + 127.0 / 2048.0),
                    "{x} vs {}",
                    q * d
                );
            }
        }
        let mut zeros = vec![0u8; 34];
        quantize_q8_0(&[0.0; 32], &mut zeros);
        assert!(zeros.iter().all(|&b| b == 0));
    }

    #[test]
    fn qk_permutation_interleaves_the_halves_of_each_head() {
        // 2 heads of 4 rows (half = 2): HF rows h0:[a0 a1 b0 b1] -> GGUF [a0 b0 a1 b1]
        let rows: Vec<f32> = (0..8).map(|r| r as f32).collect();
        let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
        let entry = Entry {
            name: "blk.0.attn_q.weight".into(),
            source: None,
            values: Vec::new(),
            shape: vec![8, 1],
            ggml: GgmlType::F32,
            permute_heads: Some(2),
        };
        let out = encode_tensor(&bytes, Dtype::F32, &entry);
        let got: Vec<f32> = out
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    }
}

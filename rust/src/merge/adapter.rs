//! PEFT LoRA adapters on disk: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Key names (PEFT strips the adapter name when saving), for a module path `M` of the base model:
//! `base_model.model.M.lora_A.weight` (r, in), `base_model.model.M.lora_B.weight` (out, r),
//! `base_model.model.M.lora_magnitude_vector` (out,) for DoRA, `base_model.model.M.lora_B.bias`
//! (out,) with `lora_bias`, `base_model.model.M.lora_embedding_A` (r, vocab) and
//! `...lora_embedding_B` (dim, r) for embeddings. Any other key `base_model.model.T` is a whole
//! tensor `T` of the base model replaced by the adapter (`modules_to_save`, `bias="all"`;
//! `M.base_layer.weight`, saved for targeted embeddings, replaces `M.weight`).
//!
//! Scaling: `alpha / r`, or `alpha / sqrt(r)` with `use_rslora`; `rank_pattern` / `alpha_pattern`
//! override r and alpha for modules whose path matches `^(.*\.)?(PATTERN)$` (first match, in the
//! file's key order, as PEFT's `get_pattern_key`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::{Checkpoint, Dtype, TensorInfo};

/// Prefix PEFT puts before every base-model path in adapter files.
pub const KEY_PREFIX: &str = "base_model.model.";
/// adapter_config.json larger than this is refused.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// `target_modules`: a list of names (a module matches one exactly or ends with `.name`), or one
/// regular expression the whole module path must match.
#[derive(Debug, Clone)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String, Regex),
}

impl TargetModules {
    /// From a list of names, or a string read as a full-match regular expression.
    pub fn parse(value: &Value, path: &Path) -> Result<Option<Self>> {
        match value {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(Self::regex(s).map_err(|e| {
                Error::format(
                    path,
                    "target_modules",
                    format!("bad regular expression: {e}"),
                )
            })?)),
            Value::Array(items) => {
                let names = items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        Error::format(path, "target_modules", "list entries must be strings")
                    })?;
                Ok(Some(TargetModules::Names(names)))
            }
            _ => Err(Error::format(
                path,
                "target_modules",
                "must be a list of names or a regular expression",
            )),
        }
    }

    /// A full-match regular expression (as PEFT's `re.fullmatch`).
    pub fn regex(pattern: &str) -> std::result::Result<Self, regex::Error> {
        Ok(TargetModules::Regex(
            pattern.to_string(),
            Regex::new(&format!("^(?:{pattern})$"))?,
        ))
    }

    /// Whether module path `module` (e.g. `model.layers.0.self_attn.q_proj`) is targeted.
    pub fn matches(&self, module: &str) -> bool {
        match self {
            TargetModules::Names(names) => names.iter().any(|n| {
                module == n
                    || (module.len() > n.len()
                        && module.ends_with(n.as_str())
                        && module.as_bytes()[module.len() - n.len() - 1] == b'.')
            }),
            TargetModules::Regex(_, re) => re.is_match(module),
        }
    }

    /// As written in adapter_config.json.
    pub fn to_json(&self) -> Value {
        match self {
            TargetModules::Names(names) => Value::from(names.clone()),
            TargetModules::Regex(pattern, _) => Value::from(pattern.clone()),
        }
    }
}

/// A JSON object read with its key order kept (PEFT's pattern lookup takes the first match).
#[derive(Debug, Clone, Default)]
struct OrderedMap(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct OrderedVisitor;
        impl<'de> Visitor<'de> for OrderedVisitor {
            type Value = OrderedMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_unit<E>(self) -> std::result::Result<OrderedMap, E> {
                Ok(OrderedMap::default())
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<OrderedMap, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    entries.push((k, v));
                }
                Ok(OrderedMap(entries))
            }
        }
        deserializer.deserialize_any(OrderedVisitor)
    }
}

#[derive(Deserialize)]
struct RawPatterns {
    #[serde(default)]
    rank_pattern: Option<OrderedMap>,
    #[serde(default)]
    alpha_pattern: Option<OrderedMap>,
}

/// A per-module override: module paths matching `^(.*\.)?(pattern)$` take `value`.
#[derive(Debug, Clone)]
pub struct Pattern<T> {
    pub key: String,
    regex: Regex,
    pub value: T,
}

impl<T: Copy> Pattern<T> {
    pub fn new(key: &str, value: T) -> std::result::Result<Self, regex::Error> {
        Ok(Pattern {
            key: key.to_string(),
            regex: Regex::new(&format!("^(?:.*\\.)?(?:{key})$"))?,
            value,
        })
    }

    /// The value of the first pattern matching `module`.
    pub fn lookup(patterns: &[Pattern<T>], module: &str) -> Option<T> {
        patterns
            .iter()
            .find(|p| p.regex.is_match(module))
            .map(|p| p.value)
    }
}

/// The fields of a PEFT `LoraConfig` a merge depends on; `raw` keeps the whole file so combined
/// adapters can be written back with every other field unchanged.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub fan_in_fan_out: bool,
    pub rank_pattern: Vec<Pattern<usize>>,
    pub alpha_pattern: Vec<Pattern<f64>>,
    pub target_modules: Option<TargetModules>,
    pub modules_to_save: Vec<String>,
    pub raw: serde_json::Map<String, Value>,
}

impl LoraConfig {
    /// Reads and checks `adapter_config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let size = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        if size > MAX_CONFIG_BYTES {
            return Err(Error::format(
                path,
                "file",
                format!("{size} bytes is too large"),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses the text of an adapter config; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let raw: serde_json::Map<String, Value> = serde_json::from_str(text).map_err(|e| {
            Error::format(
                path,
                format!("line {}", e.line()),
                format!("invalid JSON: {e}"),
            )
        })?;
        let bad = |field: &str, message: &str| Error::format(path, field, message.to_string());
        let peft_type = raw
            .get("peft_type")
            .and_then(Value::as_str)
            .unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(bad(
                "peft_type",
                &format!("{peft_type:?} adapters cannot be merged here (LORA only)"),
            ));
        }
        let r = raw
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("r", "missing or not a positive integer"))? as usize;
        let alpha = match raw.get("lora_alpha") {
            None | Some(Value::Null) => 8.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad("lora_alpha", "must be a number"))?,
        };
        let flag = |field: &str| -> Result<bool> {
            match raw.get(field) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(bad(field, "must be true or false")),
            }
        };
        let patterns: RawPatterns = serde_json::from_str(text)
            .map_err(|e| bad("rank_pattern", &format!("must be objects: {e}")))?;
        let mut rank_pattern = Vec::new();
        for (key, v) in patterns.rank_pattern.unwrap_or_default().0 {
            let field = format!("rank_pattern.{key}");
            let rank = v
                .as_u64()
                .filter(|&r| r > 0)
                .ok_or_else(|| bad(&field, "must be a positive integer"))?;
            rank_pattern
                .push(Pattern::new(&key, rank as usize).map_err(|e| bad(&field, &e.to_string()))?);
        }
        let mut alpha_pattern = Vec::new();
        for (key, v) in patterns.alpha_pattern.unwrap_or_default().0 {
            let field = format!("alpha_pattern.{key}");
            let a = v.as_f64().ok_or_else(|| bad(&field, "must be a number"))?;
            alpha_pattern.push(Pattern::new(&key, a).map_err(|e| bad(&field, &e.to_string()))?);
        }
        let target_modules =
            TargetModules::parse(raw.get("target_modules").unwrap_or(&Value::Null), path)?;
        let modules_to_save = match raw.get("modules_to_save") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("modules_to_save", "entries must be strings"))?,
            Some(_) => return Err(bad("modules_to_save", "must be a list of names")),
        };
        Ok(LoraConfig {
            r,
            alpha,
            use_rslora: flag("use_rslora")?,
            use_dora: flag("use_dora")?,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            rank_pattern,
            alpha_pattern,
            target_modules,
            modules_to_save,
            raw,
        })
    }

    /// The rank PEFT gives `module`.
    pub fn rank_of(&self, module: &str) -> usize {
        Pattern::lookup(&self.rank_pattern, module).unwrap_or(self.r)
    }

    /// The alpha PEFT gives `module`.
    pub fn alpha_of(&self, module: &str) -> f64 {
        Pattern::lookup(&self.alpha_pattern, module).unwrap_or(self.alpha)
    }

    /// The factor on `B @ A` for a module of rank `rank` and scale `alpha`.
    pub fn scaling(&self, alpha: f64, rank: usize) -> f64 {
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }
}

/// How a module's low-rank factors lie relative to its stored weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `nn.Linear`: weight (out, in) += s * B (out, r) @ A (r, in).
    Linear,
    /// `Conv1D` with `fan_in_fan_out` (weight (in, out)) or `nn.Embedding` (weight (vocab, dim),
    /// A (r, vocab), B (dim, r)): weight += s * (B @ A)^T.
    Transposed,
}

/// The LoRA of one base module, as adapter-file keys.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// The module's path in the base model (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    pub a: String,
    pub b: String,
    pub magnitude: Option<String>,
    pub bias: Option<String>,
    pub layout: Layout,
    pub rank: usize,
    pub alpha: f64,
    pub scale: f64,
}

impl LoraModule {
    /// The base tensor the factors merge into.
    pub fn weight_name(&self) -> String {
        format!("{}.weight", self.module)
    }
}

/// An opened adapter: its config, its memory-mapped weights and what they mean.
pub struct Adapter {
    pub dir: PathBuf,
    pub config: LoraConfig,
    pub weights: Checkpoint,
    /// LoRA modules by base module path.
    pub modules: BTreeMap<String, LoraModule>,
    /// Whole base tensors the adapter replaces: base tensor name -> adapter key.
    pub replacements: BTreeMap<String, String>,
    /// Notes for the user (modules outside target_modules, ...).
    pub warnings: Vec<String>,
}

/// Records one adapter key in a module's parts.
type SetPart = fn(&mut Parts, String);

#[derive(Default)]
struct Parts {
    a: Option<String>,
    b: Option<String>,
    magnitude: Option<String>,
    bias: Option<String>,
    embedding: bool,
}

impl Adapter {
    /// Opens a PEFT adapter folder.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("adapter_config.json");
        if !config_path.exists() {
            return Err(Error::format(
                &dir,
                "folder",
                "no adapter_config.json: not a PEFT adapter folder",
            ));
        }
        let config = LoraConfig::read(&config_path)?;
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.exists() {
            let pickled = dir.join("adapter_model.bin");
            let why = if pickled.exists() {
                "only adapter_model.bin (a pickle, never loaded here): convert it to safetensors"
            } else {
                "no adapter_model.safetensors"
            };
            return Err(Error::format(&dir, "folder", why));
        }
        let weights = Checkpoint::open(&weights_path)?;
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        let mut replacements = BTreeMap::new();
        for key in weights.names() {
            let rest = key.strip_prefix(KEY_PREFIX).ok_or_else(|| {
                Error::format(
                    &weights_path,
                    format!("tensor {key:?}"),
                    format!("PEFT keys start with {KEY_PREFIX:?}"),
                )
            })?;
            let suffixes: [(&str, SetPart); 8] = [
                (".lora_A.weight", |p, k| p.a = Some(k)),
                (".lora_B.weight", |p, k| p.b = Some(k)),
                (".lora_B.bias", |p, k| p.bias = Some(k)),
                (".lora_magnitude_vector", |p, k| p.magnitude = Some(k)),
                (".lora_magnitude_vector.weight", |p, k| {
                    p.magnitude = Some(k)
                }),
                (".lora_embedding_A", |p, k| {
                    p.a = Some(k);
                    p.embedding = true
                }),
                (".lora_embedding_B", |p, k| {
                    p.b = Some(k);
                    p.embedding = true
                }),
                (".lora_A.bias", |_, _| {}),
            ];
            match suffixes.iter().find(|(s, _)| rest.ends_with(s)) {
                Some((".lora_A.bias", _)) => {
                    return Err(Error::format(
                        &weights_path,
                        format!("tensor {key:?}"),
                        "lora_A has no bias in PEFT",
                    ))
                }
                Some((suffix, set)) => {
                    let module = &rest[..rest.len() - suffix.len()];
                    set(parts.entry(module.to_string()).or_default(), key.clone());
                }
                None => {
                    // PEFT saves a targeted embedding's own weight (save_embedding_layers) as
                    // `M.base_layer.weight`: it replaces `M.weight`.
                    let target = match rest.rsplit_once(".base_layer.") {
                        Some((module, leaf)) if !leaf.contains('.') => format!("{module}.{leaf}"),
                        _ => rest.to_string(),
                    };
                    replacements.insert(target, key.clone());
                }
            }
        }
        let mut modules = BTreeMap::new();
        let mut warnings = Vec::new();
        for (module, p) in parts {
            let place = |what: &str| format!("module {module:?}: {what}");
            let (Some(a), Some(b)) = (p.a, p.b) else {
                return Err(Error::format(
                    &weights_path,
                    place("factors"),
                    "needs both lora_A and lora_B",
                ));
            };
            let (ai, bi) = (info(&weights, &a), info(&weights, &b));
            if ai.shape.len() != 2 || bi.shape.len() != 2 || ai.shape[0] != bi.shape[1] {
                return Err(Error::format(
                    &weights_path,
                    place("shapes"),
                    format!(
                        "lora_A {:?} and lora_B {:?} are not (r, in) and (out, r)",
                        ai.shape, bi.shape
                    ),
                ));
            }
            let rank = ai.shape[0];
            let expected = config.rank_of(&module);
            if rank != expected {
                return Err(Error::format(
                    &weights_path,
                    place("rank"),
                    format!(
                        "lora_A has rank {rank} but the config (r / rank_pattern) says {expected}"
                    ),
                ));
            }
            for key in [&a, &b]
                .into_iter()
                .chain(p.magnitude.as_ref())
                .chain(p.bias.as_ref())
            {
                let dtype = info(&weights, key).dtype;
                super::convert::check_mergeable(dtype, key)?;
            }
            if let Some(m) = &p.magnitude {
                if info(&weights, m).numel() != bi.shape[0] {
                    return Err(Error::format(
                        &weights_path,
                        place("lora_magnitude_vector"),
                        format!(
                            "has {} entries for {} outputs",
                            info(&weights, m).numel(),
                            bi.shape[0]
                        ),
                    ));
                }
            }
            if let Some(targets) = &config.target_modules {
                if !targets.matches(&module) {
                    warnings.push(format!(
                        "module {module} has LoRA weights but is not in target_modules"
                    ));
                }
            }
            let alpha = config.alpha_of(&module);
            let layout = if p.embedding || config.fan_in_fan_out {
                Layout::Transposed
            } else {
                Layout::Linear
            };
            modules.insert(
                module.clone(),
                LoraModule {
                    module: module.clone(),
                    a,
                    b,
                    magnitude: p.magnitude,
                    bias: p.bias,
                    layout,
                    rank,
                    alpha,
                    scale: config.scaling(alpha, rank),
                },
            );
        }
        Ok(Adapter {
            dir,
            config,
            weights,
            modules,
            replacements,
            warnings,
        })
    }

    /// The entry of adapter tensor `key` (present by construction).
    pub fn info(&self, key: &str) -> &TensorInfo {
        info(&self.weights, key)
    }

    /// Adapter tensor `key` decoded to f32.
    pub fn tensor_f32(&self, key: &str) -> Vec<f32> {
        let (file, t) = self.weights.get(key).expect("adapter key exists");
        super::convert::tensor_to_f32(file.slice(t), t.dtype)
    }

    /// The dtype the factors are stored in (that of the first lora_A).
    pub fn factor_dtype(&self) -> Dtype {
        self.modules
            .values()
            .next()
            .map(|m| self.info(&m.a).dtype)
            .unwrap_or(Dtype::F32)
    }
}

fn info<'a>(weights: &'a Checkpoint, key: &str) -> &'a TensorInfo {
    weights.get(key).expect("key listed by the checkpoint").1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_modules_follow_peft_matching() {
        let names = TargetModules::parse(
            &serde_json::json!(["q_proj", "mlp.up_proj"]),
            Path::new("c"),
        )
        .unwrap()
        .unwrap();
        assert!(names.matches("model.layers.0.self_attn.q_proj"));
        assert!(names.matches("q_proj"));
        assert!(names.matches("model.layers.3.mlp.up_proj"));
        assert!(!names.matches("model.layers.0.self_attn.xq_proj"));
        let re = TargetModules::parse(&serde_json::json!(r".*\.(q|v)_proj"), Path::new("c"))
            .unwrap()
            .unwrap();
        assert!(re.matches("model.layers.0.self_attn.v_proj"));
        assert!(!re.matches("model.layers.0.self_attn.v_proj.x"));
        assert!(!re.matches("model.layers.0.self_attn.k_proj"));
    }

    #[test]
    fn patterns_take_the_first_match_in_file_order() {
        let text = r#"{"r": 8, "lora_alpha": 16, "use_rslora": true,
            "rank_pattern": {"layers.1.self_attn.q_proj": 2, "q_proj": 4},
            "alpha_pattern": {"v_proj": 3}}"#;
        let c = LoraConfig::parse(text, Path::new("adapter_config.json")).unwrap();
        assert_eq!(c.rank_of("model.layers.1.self_attn.q_proj"), 2);
        assert_eq!(c.rank_of("model.layers.11.self_attn.q_proj"), 4);
        assert_eq!(c.rank_of("model.layers.1.self_attn.k_proj"), 8);
        assert_eq!(c.alpha_of("model.layers.0.self_attn.v_proj"), 3.0);
        assert_eq!(c.alpha_of("model.layers.0.self_attn.q_proj"), 16.0);
        assert!((c.scaling(16.0, 4) - 8.0).abs() < 1e-12);
    }

    #[test]
    fn bad_configs_name_the_field() {
        for (text, field) in [
            (r#"{"r": 0}"#, "r"),
            (r#"{"r": 4, "peft_type": "IA3"}"#, "peft_type"),
            (r#"{"r": 4, "rank_pattern": {"q": -1}}"#, "rank_pattern.q"),
            (r#"{"r": 4, "target_modules": 3}"#, "target_modules"),
            (r#"{"r": 4, "use_dora": "yes"}"#, "use_dora"),
            ("{\"r\": 4,\n oops}", "line 2"),
        ] {
            let err = LoraConfig::parse(text, Path::new("adapter_config.json"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{field} not in {err}");
        }
    }
}

//! `ferrotune merge BASE ADAPTER OUT`: a PEFT LoRA adapter merged into a Hugging Face checkpoint,
//! streamed tensor by tensor (see `stream.rs`), each tensor kept in its own dtype and computed in
//! f32 (see `lora.rs` for the math).

use std::path::Path;

use super::adapter::{Adapter, Layout, LoraModule};
use super::convert::{check_mergeable, tensor_from_f32, tensor_to_f32};
use super::lora::{merge_weight_into, merge_weight_to, LowRank};
use super::quantized::{dequantize_weight, is_aux, quant_state, QuantState};
use super::stream::{
    copy_computed, copy_side_files, prepare_out_dir, rewrite_checkpoint, Plan, StreamSummary,
    TensorOutput, TensorRewrite,
};
use crate::error::{Error, Result};
use crate::io::{Checkpoint, TensorInfo, TensorSpec};
use crate::quant::checkpoint::{quantize_checkpoint, QuantizeOptions};

/// Options of [`merge_adapter`].
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// Replace the files of a non-empty output folder.
    pub overwrite: bool,
    /// Progress lines on stderr.
    pub progress: bool,
    /// Quantize the merged model back to 4 bits (bitsandbytes layout; the base's settings when
    /// it was 4-bit, else NF4 / blocksize 64 / double quantization).
    pub requantize: bool,
}

/// What a merge did.
#[derive(Debug, Clone, Default)]
pub struct MergeSummary {
    pub stream: StreamSummary,
    pub modules_merged: usize,
    pub dora_modules: usize,
    pub tensors_replaced: usize,
    pub side_files: Vec<String>,
    pub warnings: Vec<String>,
}

/// What happens to one base tensor.
enum Action<'a> {
    /// `W += s·BA` (and DoRA); W the adapter's own copy when it saved one (PEFT does for
    /// targeted embeddings: `M.base_layer.weight`).
    Lora(&'a LoraModule, Option<&'a str>),
    /// `bias += s·lora_B.bias`.
    LoraBias(&'a LoraModule),
    /// Replaced by the adapter's tensor (modules_to_save), cast to the base dtype.
    Replace(&'a str),
}

struct LoraRewrite<'a> {
    adapter: &'a Adapter,
    actions: std::collections::HashMap<String, Action<'a>>,
    /// Packed 4-bit weights of the base (empty for a 16-bit base): dequantized, then merged.
    quantized: std::collections::HashMap<String, QuantState>,
}

/// The packed 4-bit weights of `base` by name.
fn quantized_weights(base: &Checkpoint) -> Result<std::collections::HashMap<String, QuantState>> {
    let mut found = std::collections::HashMap::new();
    for name in base.names() {
        if name.ends_with(".weight") {
            if let Some(state) = quant_state(base, name)? {
                found.insert(name.clone(), state);
            }
        }
    }
    Ok(found)
}

impl<'a> LoraRewrite<'a> {
    /// Matches every adapter entry to a base tensor, checking shapes and dtypes.
    fn new(adapter: &'a Adapter, base: &Checkpoint, base_dir: &Path) -> Result<Self> {
        let weights_path = adapter.dir.join("adapter_model.safetensors");
        let missing = |what: &str, name: &str| {
            Error::format(
                &weights_path,
                what.to_string(),
                format!(
                    "the base model {} has no tensor {name:?}",
                    base_dir.display()
                ),
            )
        };
        let quantized = quantized_weights(base)?;
        let mut actions = std::collections::HashMap::new();
        for module in adapter.modules.values() {
            let weight_name = module.weight_name();
            let (_, stored) = base
                .get(&weight_name)
                .ok_or_else(|| missing(&format!("module {:?}", module.module), &weight_name))?;
            // A packed 4-bit weight stands for the 16-bit weight its quant state describes.
            let mut w = stored.clone();
            if let Some(state) = quantized.get(&weight_name) {
                w.dtype = state.dtype;
                w.shape = state.shape.clone();
            }
            check_mergeable(w.dtype, &weight_name)?;
            let (a, b) = (adapter.info(&module.a), adapter.info(&module.b));
            let expected = match module.layout {
                Layout::Linear => vec![b.shape[0], a.shape[1]],
                Layout::Transposed => vec![a.shape[1], b.shape[0]],
            };
            if w.shape != expected {
                return Err(Error::format(
                    &weights_path,
                    format!("module {:?}", module.module),
                    format!(
                        "lora_A {:?} and lora_B {:?} give an update of shape {expected:?}, but {weight_name} is {:?}",
                        a.shape, b.shape, w.shape
                    ),
                ));
            }
            if module.magnitude.is_some() && module.layout == Layout::Transposed {
                return Err(Error::InvalidArgument(format!(
                    "module {}: DoRA with fan_in_fan_out or on embeddings is not supported",
                    module.module
                )));
            }
            actions.insert(weight_name, Action::Lora(module, None));
            if let Some(bias_key) = &module.bias {
                let bias_name = format!("{}.bias", module.module);
                let (_, bias) = base
                    .get(&bias_name)
                    .ok_or_else(|| missing(bias_key, &bias_name))?;
                check_mergeable(bias.dtype, &bias_name)?;
                if bias.numel() != adapter.info(bias_key).numel() {
                    return Err(Error::format(
                        &weights_path,
                        bias_key.clone(),
                        "size differs from the base bias",
                    ));
                }
                actions.insert(bias_name, Action::LoraBias(module));
            }
        }
        for (name, key) in &adapter.replacements {
            let (_, t) = base.get(name).ok_or_else(|| missing(key, name))?;
            let replacement = adapter.info(key);
            if replacement.shape != t.shape {
                return Err(Error::format(
                    &weights_path,
                    key.clone(),
                    format!(
                        "shape {:?} differs from the base tensor's {:?}",
                        replacement.shape, t.shape
                    ),
                ));
            }
            check_mergeable(t.dtype, name)?;
            check_mergeable(replacement.dtype, key)?;
            match actions.get_mut(name) {
                None => {
                    actions.insert(name.clone(), Action::Replace(key));
                }
                Some(Action::Lora(_, replaced @ None)) if self_copy(key) => *replaced = Some(key),
                Some(_) => {
                    return Err(Error::format(
                        &weights_path,
                        key.clone(),
                        "both replaced and LoRA-adapted",
                    ))
                }
            }
        }
        Ok(LoraRewrite {
            adapter,
            actions,
            quantized,
        })
    }
}

/// Whether adapter key `key` is a module's own weight saved beside its LoRA (`M.base_layer.weight`).
fn self_copy(key: &str) -> bool {
    key.ends_with(".base_layer.weight")
}

impl LoraRewrite<'_> {
    /// The adapter's tensor `key` as bytes of `dtype`.
    fn replacement_bytes(&self, key: &str, dtype: crate::io::Dtype) -> Vec<u8> {
        if self.adapter.info(key).dtype == dtype {
            self.adapter
                .weights
                .bytes(key)
                .expect("adapter key")
                .to_vec()
        } else {
            tensor_from_f32(&self.adapter.tensor_f32(key), dtype)
        }
    }
}

impl TensorRewrite for LoraRewrite<'_> {
    fn plan(&self, info: &TensorInfo) -> Result<Plan> {
        if !self.quantized.is_empty() && is_aux(&info.name) {
            return Ok(Plan::Drop);
        }
        if let Some(state) = self.quantized.get(&info.name) {
            let spec = TensorSpec::new(&info.name, state.dtype, state.shape.clone());
            return Ok(Plan::Rewrite(vec![spec]));
        }
        Ok(match self.actions.get(&info.name) {
            None => Plan::Copy,
            Some(_) => Plan::Rewrite(vec![TensorSpec::new(
                &info.name,
                info.dtype,
                info.shape.clone(),
            )]),
        })
    }

    fn compute(&self, source: &Checkpoint, info: &TensorInfo) -> Result<Vec<Vec<u8>>> {
        let dequantized;
        let (base, info) = match self.quantized.get(&info.name) {
            Some(state) => {
                dequantized = dequantize_weight(source, &info.name, state)?;
                let mut logical = info.clone();
                logical.dtype = state.dtype;
                logical.shape = state.shape.clone();
                (&dequantized[..], std::borrow::Cow::Owned(logical))
            }
            None => (
                source.bytes(&info.name).expect("planned tensors exist"),
                std::borrow::Cow::Borrowed(info),
            ),
        };
        let Some(action) = self.actions.get(&info.name) else {
            return Ok(vec![base.to_vec()]); // a 4-bit weight without LoRA: dequantized only
        };
        let merged = match action {
            Action::Lora(module, replaced) => {
                let mut merged = vec![0u8; base.len()];
                let out = MergeOutput::Whole(&mut merged);
                self.merge_lora(base, info.dtype, module, *replaced, out)?;
                merged
            }
            Action::LoraBias(module) => {
                let lora_bias = self
                    .adapter
                    .tensor_f32(module.bias.as_ref().expect("planned"));
                let mut bias = tensor_to_f32(base, info.dtype);
                for (x, d) in bias.iter_mut().zip(&lora_bias) {
                    *x += module.scale as f32 * d;
                }
                tensor_from_f32(&bias, info.dtype)
            }
            Action::Replace(key) => self.replacement_bytes(key, info.dtype),
        };
        Ok(vec![merged])
    }

    /// LoRA weights of a 16-bit base are written a few rows at a time as they are merged;
    /// everything else is computed, then written whole.
    fn compute_into(
        &self,
        source: &Checkpoint,
        info: &TensorInfo,
        outs: &[&dyn TensorOutput],
    ) -> Result<()> {
        match (self.actions.get(&info.name), outs) {
            (Some(Action::Lora(module, replaced)), [out])
                if !self.quantized.contains_key(&info.name) =>
            {
                let base = source.bytes(&info.name).expect("planned tensors exist");
                let emit = |at: usize, bytes: &[u8]| out.write_at(at, bytes);
                self.merge_lora(
                    base,
                    info.dtype,
                    module,
                    *replaced,
                    MergeOutput::Pieces(&emit),
                )
            }
            _ => copy_computed(&self.compute(source, info)?, outs),
        }
    }
}

/// Where [`LoraRewrite::merge_lora`] puts the merged weight.
enum MergeOutput<'a> {
    Whole(&'a mut [u8]),
    Pieces(&'a (dyn Fn(usize, &[u8]) -> Result<()> + Sync)),
}

impl LoraRewrite<'_> {
    /// `out = W + s·BA` (and DoRA) for the weight `base` of `dtype`, W the adapter's own copy
    /// of it when `replaced` names one.
    fn merge_lora(
        &self,
        base: &[u8],
        dtype: crate::io::Dtype,
        module: &LoraModule,
        replaced: Option<&str>,
        out: MergeOutput,
    ) -> Result<()> {
        let own_copy = replaced.map(|key| self.replacement_bytes(key, dtype));
        let base = own_copy.as_deref().unwrap_or(base);
        let a = self.adapter.tensor_f32(&module.a);
        let b = self.adapter.tensor_f32(&module.b);
        let scale = module.scale as f32;
        let delta = match module.layout {
            Layout::Linear => LowRank::linear(&a, &b, module.rank, scale),
            Layout::Transposed => LowRank::transposed(&a, &b, module.rank, scale),
        };
        let magnitude = module
            .magnitude
            .as_ref()
            .map(|k| self.adapter.tensor_f32(k));
        match out {
            MergeOutput::Whole(out) => {
                merge_weight_into(base, dtype, &delta, magnitude.as_deref(), out);
                Ok(())
            }
            MergeOutput::Pieces(emit) => {
                merge_weight_to(base, dtype, &delta, magnitude.as_deref(), emit)
            }
        }
    }
}

/// Merges the PEFT adapter in `adapter_dir` into the model in `base_dir`, writing a complete
/// model folder to `out_dir` (shards as the base's, config and tokenizer files copied).
pub fn merge_adapter(
    base_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    options: &MergeOptions,
) -> Result<MergeSummary> {
    let adapter = Adapter::open(adapter_dir)?;
    let base = Checkpoint::open(base_dir)?;
    let rewrite = LoraRewrite::new(&adapter, &base, base_dir)?;
    prepare_out_dir(out_dir, &[base_dir, adapter_dir], options.overwrite)?;
    // With requantize, the 16-bit merge goes to a temporary folder beside the output first.
    let sixteen_bit_dir = if options.requantize {
        let name = out_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = out_dir.with_file_name(format!(".{name}.merged-16bit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&temp);
        std::fs::create_dir_all(&temp).map_err(|e| Error::io(&temp, e))?;
        temp
    } else {
        out_dir.to_path_buf()
    };
    let result = (|| {
        let stream = rewrite_checkpoint(
            &base,
            base_dir,
            &sixteen_bit_dir,
            &rewrite,
            options.progress,
        )?;
        let side_files = if base_dir.is_dir() {
            copy_side_files(base_dir, Some(adapter_dir), &sixteen_bit_dir)?
        } else {
            Vec::new()
        };
        if !rewrite.quantized.is_empty() {
            drop_quantization_config(&sixteen_bit_dir)?;
        }
        if options.requantize {
            let settings = rewrite.quantized.values().next();
            let quantize = QuantizeOptions {
                blocksize: settings.map_or(64, |s| s.blocksize),
                quant_type: settings.map_or(crate::quant::nf4::QuantType::Nf4, |s| s.quant_type),
                double_quant: settings.is_none_or(|s| s.nested_offset.is_some()),
                progress: options.progress,
                ..QuantizeOptions::default()
            };
            quantize_checkpoint(&sixteen_bit_dir, out_dir, &quantize)?;
        }
        Ok((stream, side_files))
    })();
    if options.requantize {
        let _ = std::fs::remove_dir_all(&sixteen_bit_dir);
    }
    let (stream, side_files) = result?;
    Ok(MergeSummary {
        stream,
        modules_merged: adapter.modules.len(),
        dora_modules: adapter
            .modules
            .values()
            .filter(|m| m.magnitude.is_some())
            .count(),
        tensors_replaced: adapter.replacements.len(),
        side_files,
        warnings: adapter.warnings.clone(),
    })
}

/// Rewrites `dir/config.json` without `quantization_config` (the merged model is 16-bit).
fn drop_quantization_config(dir: &Path) -> Result<()> {
    let path = dir.join("config.json");
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
        .map_err(|e| {
            Error::format(
                &path,
                format!("line {}", e.line()),
                format!("invalid JSON: {e}"),
            )
        })?;
    if config.remove("quantization_config").is_some() {
        let text = serde_json::to_string_pretty(&config).expect("config serializes");
        crate::io::atomic::write_atomic(&path, text.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::safetensors::write_safetensors;
    use crate::io::Dtype;
    use crate::merge::convert::tensor_from_f32;
    use crate::merge::stream::tests::{assert_same_files, write_sharded};
    use crate::merge::stream::{rewrite_checkpoint_with, WritePath};
    use crate::merge::test_data::random;

    fn tensor(name: &str, dtype: Dtype, shape: Vec<usize>, seed: u64) -> (TensorSpec, Vec<u8>) {
        let values = random(shape.iter().product(), seed);
        (
            TensorSpec::new(name, dtype, shape),
            tensor_from_f32(&values, dtype),
        )
    }

    /// A LoRA (bf16 weight) and a DoRA (f16 weight) module over a two-shard base: both write paths
    /// give the same files, the merged weights differ from the base's, the rest is copied.
    #[test]
    fn lora_and_dora_merge_the_same_through_both_write_paths() {
        let dir = tempfile::tempdir().unwrap();
        let (base_dir, adapter_dir) = (dir.path().join("base"), dir.path().join("adapter"));
        std::fs::create_dir(&base_dir).unwrap();
        std::fs::create_dir(&adapter_dir).unwrap();
        let q = "model.layers.0.self_attn.q_proj";
        let o = "model.layers.0.self_attn.o_proj";
        write_sharded(
            &base_dir,
            &[
                (
                    "model-00001-of-00002.safetensors",
                    vec![
                        tensor("model.embed_tokens.weight", Dtype::BF16, vec![50, 24], 1),
                        tensor(&format!("{q}.weight"), Dtype::BF16, vec![40, 24], 2),
                    ],
                ),
                (
                    "model-00002-of-00002.safetensors",
                    vec![
                        tensor(&format!("{o}.weight"), Dtype::F16, vec![24, 40], 3),
                        tensor("model.norm.weight", Dtype::F32, vec![24], 4),
                    ],
                ),
            ],
        );
        std::fs::write(
            adapter_dir.join("adapter_config.json"),
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj"], "use_dora": true}"#,
        )
        .unwrap();
        let lora = |module: &str, out: usize, inp: usize, seed: u64| {
            vec![
                tensor(
                    &format!("base_model.model.{module}.lora_A.weight"),
                    Dtype::F32,
                    vec![4, inp],
                    seed,
                ),
                tensor(
                    &format!("base_model.model.{module}.lora_B.weight"),
                    Dtype::F32,
                    vec![out, 4],
                    seed + 1,
                ),
            ]
        };
        let mut adapter_tensors = lora(q, 40, 24, 10);
        adapter_tensors.extend(lora(o, 24, 40, 20));
        let magnitude: Vec<f32> = random(24, 30).iter().map(|x| x + 1.0).collect();
        adapter_tensors.push((
            TensorSpec::new(
                format!("base_model.model.{o}.lora_magnitude_vector"),
                Dtype::F32,
                vec![24],
            ),
            tensor_from_f32(&magnitude, Dtype::F32),
        ));
        let borrowed: Vec<(TensorSpec, &[u8])> = adapter_tensors
            .iter()
            .map(|(s, b)| (s.clone(), &b[..]))
            .collect();
        write_safetensors(
            adapter_dir.join("adapter_model.safetensors"),
            &borrowed,
            &Default::default(),
        )
        .unwrap();

        let adapter = Adapter::open(&adapter_dir).unwrap();
        let base = Checkpoint::open(&base_dir).unwrap();
        let rewrite = LoraRewrite::new(&adapter, &base, &base_dir).unwrap();
        for (name, path) in [
            ("reserved", WritePath::Reserved),
            ("buffered", WritePath::Buffered),
        ] {
            let out = dir.path().join(name);
            std::fs::create_dir(&out).unwrap();
            let summary =
                rewrite_checkpoint_with(&base, &base_dir, &out, &rewrite, false, path).unwrap();
            assert_eq!((summary.tensors_rewritten, summary.tensors_copied), (2, 2));
        }
        assert_same_files(&dir.path().join("reserved"), &dir.path().join("buffered"));
        let merged = Checkpoint::open(dir.path().join("reserved")).unwrap();
        for name in ["model.embed_tokens.weight", "model.norm.weight"] {
            assert_eq!(merged.bytes(name), base.bytes(name), "{name} copied");
        }
        for module in [q, o] {
            let name = format!("{module}.weight");
            assert_ne!(merged.bytes(&name), base.bytes(&name), "{name} merged");
        }
    }
}

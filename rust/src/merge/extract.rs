//! Extracting a LoRA from a fine-tuned model: for each targeted weight, Δ = W_tuned − W_base
//! (f64) and its best rank-r approximation by truncated SVD (`svd.rs`; randomized for large
//! weights), split evenly: B = U·diag(√S) (out, r), A = diag(√S)·Vᵀ (r, in), so that
//! B A ≈ Δ with lora_alpha = r (scaling 1). Written as a PEFT adapter (F32 factors).
//!
//! The summary reports how much of each update the rank keeps (ΣS_k² / ‖Δ‖²_F), and warns about
//! other tensors that changed but cannot be expressed as a LoRA (norms, embeddings).

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use serde_json::json;

use super::adapter::{TargetModules, KEY_PREFIX};
use super::convert::{check_mergeable, tensor_from_f32, tensor_to_f32};
use super::svd::truncated_svd;
use crate::error::{Error, Result};
use crate::io::{atomic::write_atomic, Checkpoint, Dtype, SafetensorsWriter, TensorSpec};

/// Options of [`extract_adapter`].
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    pub rank: usize,
    /// Modules to extract; default: every 2-D `*_proj.weight` of the decoder layers.
    pub targets: Option<TargetModules>,
    pub seed: u64,
    pub overwrite: bool,
    pub progress: bool,
}

/// What an extraction wrote.
#[derive(Debug, Clone, Default)]
pub struct ExtractSummary {
    pub modules: usize,
    /// Smallest and mean fraction of ‖Δ‖²_F kept by the rank.
    pub min_energy: f64,
    pub mean_energy: f64,
    pub warnings: Vec<String>,
}

fn default_target(module: &str) -> bool {
    module.starts_with("model.layers.") && module.ends_with("_proj")
}

/// Writes the rank-`options.rank` LoRA of `tuned_dir − base_dir` as a PEFT adapter in `out_dir`.
pub fn extract_adapter(
    base_dir: &Path,
    tuned_dir: &Path,
    out_dir: &Path,
    options: &ExtractOptions,
) -> Result<ExtractSummary> {
    if options.rank == 0 {
        return Err(Error::InvalidArgument("rank must be at least 1".into()));
    }
    let base = Checkpoint::open(base_dir)?;
    let tuned = Checkpoint::open(tuned_dir)?;
    let mut modules: Vec<(String, usize, usize)> = Vec::new(); // (module, out, in)
    let mut warnings = Vec::new();
    for name in tuned.names() {
        let (file, t) = tuned.get(name).expect("listed");
        let (_, b) = base.get(name).ok_or_else(|| {
            Error::format(
                file.path(),
                format!("tensor {name:?}"),
                format!("not in the base model {}", base_dir.display()),
            )
        })?;
        if b.shape != t.shape {
            return Err(Error::format(
                file.path(),
                format!("tensor {name:?}"),
                format!("shape {:?} differs from the base's {:?}", t.shape, b.shape),
            ));
        }
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let targeted = name.ends_with(".weight")
            && t.shape.len() == 2
            && match &options.targets {
                Some(targets) => targets.matches(module),
                None => default_target(module),
            };
        if targeted {
            check_mergeable(t.dtype, name)?;
            check_mergeable(b.dtype, name)?;
            modules.push((module.to_string(), t.shape[0], t.shape[1]));
        } else if tuned.bytes(name) != base.bytes(name) || t.dtype != b.dtype {
            warnings.push(format!(
                "{name} differs between the models but is not a LoRA target; it is left out"
            ));
        }
    }
    if modules.is_empty() {
        return Err(Error::InvalidArgument(
            "no tensor matches the target modules".into(),
        ));
    }
    super::stream::prepare_out_dir(out_dir, &[base_dir, tuned_dir], options.overwrite)?;
    let mut specs = Vec::new();
    for (module, out, inp) in &modules {
        let r = options.rank;
        specs.push(TensorSpec::new(
            format!("{KEY_PREFIX}{module}.lora_A.weight"),
            Dtype::F32,
            vec![r, *inp],
        ));
        specs.push(TensorSpec::new(
            format!("{KEY_PREFIX}{module}.lora_B.weight"),
            Dtype::F32,
            vec![*out, r],
        ));
    }
    let mut writer = SafetensorsWriter::create(
        out_dir.join("adapter_model.safetensors"),
        specs,
        &BTreeMap::from([("format".to_string(), "pt".to_string())]),
    )?;
    let threads = rayon::current_num_threads().max(1);
    let mut energies = Vec::new();
    let started = std::time::Instant::now();
    for (done, chunk) in modules.chunks(threads).enumerate() {
        let results: Vec<(Vec<f32>, Vec<f32>, f64)> = chunk
            .par_iter()
            .map(|(module, out, inp)| {
                let name = format!("{module}.weight");
                let (tf, ti) = tuned.get(&name).expect("listed");
                let (bf, bi) = base.get(&name).expect("checked");
                let wt = tensor_to_f32(tf.slice(ti), ti.dtype);
                let wb = tensor_to_f32(bf.slice(bi), bi.dtype);
                let delta = nalgebra::DMatrix::from_fn(*out, *inp, |i, j| {
                    wt[i * inp + j] as f64 - wb[i * inp + j] as f64
                });
                let total = delta.norm_squared();
                let seed = options.seed
                    ^ module
                        .bytes()
                        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
                let t = truncated_svd(&delta, options.rank, seed);
                let kept: f64 = t.s.iter().map(|s| s * s).sum();
                let energy = if total > 0.0 {
                    (kept / total).min(1.0)
                } else {
                    1.0
                };
                let (b_small, a_small) = t.split_balanced();
                let k = t.s.len();
                let r = options.rank;
                let mut a = vec![0f32; r * inp];
                a[..k * inp].copy_from_slice(&a_small);
                let mut b = vec![0f32; out * r];
                for o in 0..*out {
                    b[o * r..o * r + k].copy_from_slice(&b_small[o * k..(o + 1) * k]);
                }
                (a, b, energy)
            })
            .collect();
        for ((module, _, _), (a, b, energy)) in chunk.iter().zip(results) {
            writer.write(
                &format!("{KEY_PREFIX}{module}.lora_A.weight"),
                &tensor_from_f32(&a, Dtype::F32),
            )?;
            writer.write(
                &format!("{KEY_PREFIX}{module}.lora_B.weight"),
                &tensor_from_f32(&b, Dtype::F32),
            )?;
            energies.push(energy);
        }
        if options.progress {
            let finished = ((done + 1) * threads).min(modules.len());
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "  {finished} / {} modules, {secs:.1} s, ETA {:.1} s",
                modules.len(),
                secs / finished as f64 * (modules.len() - finished) as f64
            );
        }
    }
    writer.finish()?;

    // target_modules: leaf names when every module with that leaf was extracted, else full paths.
    let mut leaves: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for name in tuned.names() {
        if let Some(module) = name.strip_suffix(".weight") {
            let leaf = module.rsplit('.').next().unwrap_or(module).to_string();
            leaves.entry(leaf).or_default().1 += 1;
        }
    }
    for (module, _, _) in &modules {
        let leaf = module.rsplit('.').next().unwrap_or(module).to_string();
        leaves.entry(leaf).or_default().0 += 1;
    }
    let mut targets: Vec<String> = Vec::new();
    for (module, _, _) in &modules {
        let leaf = module.rsplit('.').next().unwrap_or(module).to_string();
        let (extracted, present) = leaves[&leaf];
        targets.push(if extracted == present {
            leaf
        } else {
            module.clone()
        });
    }
    targets.sort();
    targets.dedup();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_dir.to_string_lossy(),
        "r": options.rank,
        "lora_alpha": options.rank,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": null,
        "init_lora_weights": true,
        "inference_mode": true,
        "layers_to_transform": null,
        "layers_pattern": null,
    });
    write_atomic(
        out_dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)
            .expect("serializes")
            .as_bytes(),
    )?;
    Ok(ExtractSummary {
        modules: modules.len(),
        min_energy: energies.iter().copied().fold(1.0, f64::min),
        mean_energy: energies.iter().sum::<f64>() / energies.len() as f64,
        warnings,
    })
}

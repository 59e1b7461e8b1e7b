//! The check that ends every merge: merged versus unmerged logits on a few probe inputs, computed
//! natively (`forward.rs`) in f32 from the memory-mapped checkpoints, after the merge (run beside
//! it, on a 2-core machine, the passes only slowed the merge by as much as they took).
//!
//! Three variants of the model run over the same probe ids (uniform over the vocabulary, fixed by
//! a seed):
//!
//!   base       the base checkpoint alone (4-bit weights dequantized, as the adapter saw them)
//!   unmerged   the base with the adapter applied beside its weights, as during training
//!   merged     the merged checkpoint alone
//!
//! `divergence = max |merged − unmerged|` is what the merge lost (rounding to the storage dtype, a
//! different target for 4-bit bases, or a bug); `adapter_effect = max |unmerged − base|` is how
//! much the adapter changes the logits. The caller (`ferrotune.probe`) flags the merge when the
//! divergence exceeds a fraction of the adapter's effect.

use std::path::Path;
use std::time::Instant;

use super::adapter::Adapter;
use super::forward::{adapter_support, DecoderConfig, Forward, Supported, Variant};
use crate::error::Result;
use crate::io::Checkpoint;

/// Probe inputs and reporting.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Sequences of probe tokens.
    pub inputs: usize,
    /// Tokens per sequence.
    pub tokens: usize,
    pub seed: u64,
    pub progress: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            inputs: 2,
            tokens: 8,
            seed: 0,
            progress: false,
        }
    }
}

/// What the probe measured.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// max |merged − unmerged| logit (NaN when either is not finite).
    pub divergence: f64,
    /// max |unmerged − base| logit.
    pub adapter_effect: f64,
    /// max |unmerged| logit.
    pub max_logit: f64,
    pub inputs: usize,
    pub tokens: usize,
    pub seconds: f64,
}

/// Probe token ids (inputs · tokens,), uniform over `0..vocab`, fixed by `seed` (SplitMix64).
pub fn probe_ids(vocab: usize, inputs: usize, tokens: usize, seed: u64) -> Vec<u32> {
    let mut state = seed;
    (0..inputs * tokens)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // the high 64 bits of z · vocab: uniform without a modulo bias worth naming
            ((z as u128 * vocab as u128) >> 64) as u32
        })
        .collect()
}

/// max |a − b| over matching elements; NaN if any difference is NaN.
fn max_abs_difference(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).fold(0f64, |m, (x, y)| {
        let d = (*x as f64 - *y as f64).abs();
        if d.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(d)
        }
    })
}

/// The half of the probe that needs only the base and the adapter: the base and unmerged logits.
struct ProbeStart {
    config: DecoderConfig,
    ids: Vec<u32>,
    base: Vec<f32>,
    unmerged: Vec<f32>,
    options: ProbeOptions,
    seconds: f64,
}

/// Runs the base and unmerged variants on the probe ids, or says why the native forward pass
/// cannot (an architecture or adapter part it does not implement).
fn probe_start(
    base_dir: &Path,
    adapter_dir: &Path,
    options: &ProbeOptions,
) -> Result<Supported<ProbeStart>> {
    let start = Instant::now();
    let config = match DecoderConfig::read(base_dir)? {
        Ok(config) => config,
        Err(why) => return Ok(Err(why)),
    };
    let adapter = Adapter::open(adapter_dir)?;
    if let Err(why) = adapter_support(&config, &adapter) {
        return Ok(Err(why));
    }
    let base = Checkpoint::open(base_dir)?;
    let variants = [
        Variant {
            weights: &base,
            adapter: None,
        },
        Variant {
            weights: &base,
            adapter: Some(&adapter),
        },
    ];
    let ids = probe_ids(
        config.vocab_size,
        options.inputs,
        options.tokens,
        options.seed,
    );
    let mut logits = Forward::new(&config, &variants, &ids, options.inputs, options.tokens)?
        .with_progress(options.progress)
        .logits()?;
    let unmerged = logits.pop().expect("two variants");
    let base_logits = logits.pop().expect("two variants");
    Ok(Ok(ProbeStart {
        config,
        ids,
        base: base_logits,
        unmerged,
        options: options.clone(),
        seconds: start.elapsed().as_secs_f64(),
    }))
}

/// Runs the merged checkpoint on the same ids and compares (see the module docs).
fn probe_finish(start: ProbeStart, merged_dir: &Path) -> Result<ProbeReport> {
    let begin = Instant::now();
    let merged = Checkpoint::open(merged_dir)?;
    let variants = [Variant {
        weights: &merged,
        adapter: None,
    }];
    let options = &start.options;
    let merged_logits = Forward::new(
        &start.config,
        &variants,
        &start.ids,
        options.inputs,
        options.tokens,
    )?
    .with_progress(options.progress)
    .logits()?
    .remove(0);
    let unmerged = &start.unmerged;
    Ok(ProbeReport {
        divergence: max_abs_difference(&merged_logits, unmerged),
        adapter_effect: max_abs_difference(unmerged, &start.base),
        max_logit: max_abs_difference(unmerged, &vec![0.0; unmerged.len()]),
        inputs: options.inputs,
        tokens: options.tokens,
        seconds: start.seconds + begin.elapsed().as_secs_f64(),
    })
}

/// Runs the base, unmerged and merged models on the probe inputs (see the module docs), or says
/// why the native forward pass cannot (an architecture or adapter part it does not implement).
pub fn probe_merge(
    base_dir: &Path,
    adapter_dir: &Path,
    merged_dir: &Path,
    options: &ProbeOptions,
) -> Result<Supported<ProbeReport>> {
    match probe_start(base_dir, adapter_dir, options)? {
        Ok(start) => Ok(Ok(probe_finish(start, merged_dir)?)),
        Err(why) => Ok(Err(why)),
    }
}

/// The logits (sequences · tokens, vocab) of the model in `model_dir`, with the adapter in
/// `adapter_dir` applied beside its weights when given, on `ids` (sequences, tokens).
pub fn model_logits(
    model_dir: &Path,
    adapter_dir: Option<&Path>,
    ids: &[u32],
    sequences: usize,
    tokens: usize,
) -> Result<Supported<Vec<f32>>> {
    let config = match DecoderConfig::read(model_dir)? {
        Ok(config) => config,
        Err(why) => return Ok(Err(why)),
    };
    let adapter = adapter_dir.map(Adapter::open).transpose()?;
    if let Some(adapter) = &adapter {
        if let Err(why) = adapter_support(&config, adapter) {
            return Ok(Err(why));
        }
    }
    let weights = Checkpoint::open(model_dir)?;
    let variants = [Variant {
        weights: &weights,
        adapter: adapter.as_ref(),
    }];
    let mut logits = Forward::new(&config, &variants, ids, sequences, tokens)?.logits()?;
    Ok(Ok(logits.remove(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_ids_are_fixed_by_the_seed_and_cover_the_vocabulary() {
        let a = probe_ids(1000, 4, 16, 0);
        assert_eq!(a, probe_ids(1000, 4, 16, 0));
        assert_ne!(a, probe_ids(1000, 4, 16, 1));
        assert!(a.iter().all(|&id| id < 1000));
        let many = probe_ids(10, 1, 10_000, 3);
        for id in 0..10 {
            let count = many.iter().filter(|&&x| x == id).count();
            assert!((800..1200).contains(&count), "id {id}: {count}");
        }
    }

    #[test]
    fn divergence_is_nan_when_logits_are_not_finite() {
        assert_eq!(max_abs_difference(&[1.0, -2.0], &[0.5, 1.0]), 3.0);
        assert!(max_abs_difference(&[f32::NAN, 0.0], &[0.0, 0.0]).is_nan());
        assert!(max_abs_difference(&[0.0, f32::NAN], &[0.0, 0.0]).is_nan());
    }
}

//! Weighted dataset mixtures: several sources (tasks), each one or more JSONL files with its own
//! format and loss options, sampled into one prepared folder with a fixed number of examples from
//! each, so that every packed token still knows its task (`task_ids` in the shards).
//!
//! The mixing rule gives each source i a target share p_i of the examples. With n_i the usable
//! examples of source i and e_i its `epochs` (default 1), its size is s_i = e_i * n_i and
//!
//! ```text
//! weights       p_i = w_i / sum_j w_j
//! temperature   p_i = s_i^(1/T) / sum_j s_j^(1/T)      (T = 1: proportional; T -> inf: uniform)
//! proportional  p_i = min(s_i, cap) / sum_j min(s_j, cap)   (T5's examples-proportional mixing)
//! ```
//!
//! The total N is `mix_total` when given, else sum_j min(s_j, cap) for proportional mixing (so
//! without a cap every source is taken exactly e_i times: 2.5 = twice, plus a random half) and
//! sum_j s_j for the other two rules; `mix_stop` sets it to min_i s_i / p_i (first_exhausted: no
//! source drawn beyond its size) or max_i s_i / p_i (all_exhausted). `mix_unit = "tokens"` applies
//! all of this to token counts and converts the token targets into example counts ([`targets`]).
//! The example counts c_i are p_i * N rounded by largest
//! remainder (they sum to N exactly, each within 1 of its target). Source i then contributes
//! floor(c_i / n_i) full passes over its examples plus a seeded random subset (without
//! replacement) of c_i mod n_i of them, and all N draws are interleaved by one seeded shuffle.
//! Realised example shares are therefore exact up to rounding; token shares deviate from
//! p_i * mean_len_i / sum_j p_j * mean_len_j only by the random choice of the partial pass.
//!
//! Sampling needs every source's size before the first example is drawn, so `prepare` encodes
//! all sources once into a [`Spill`] (token ids and loss masks on disk, in the temporary output
//! folder) and then replays the schedule from its memory map into the packer: memory stays
//! bounded by the schedule (8 bytes per drawn example) and the index (9 bytes per sequence).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use std::sync::atomic::Ordering;

use super::mask::Doc;
use super::pack::{fit_overlong, Overlong, OverlongCounts, Packing, Rng, Unit};
use super::prepare::{PrepareConfig, Progress, SourceStats};
use crate::error::{Error, Result};

/// The `mixture` section of the prepare config (JSON from the Python side).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MixConfig {
    pub sources: Vec<MixSource>,
    /// weights | temperature | proportional.
    pub mixing: String,
    /// Temperature T of `temperature` mixing (> 0).
    pub temperature: f64,
    /// Cap on a source's size for `proportional` mixing (0: none).
    pub mix_cap: u64,
    /// Examples to draw in all (0: the default of the rule, see the module docs).
    pub mix_total: u64,
    /// Examples of each source kept out of the sampling for evaluation: a fraction (< 1) or a
    /// count per source (>= 1); the same seed holds out the same examples.
    pub holdout: f64,
    /// train: the sampled mixture of the examples not held out; eval: the held-out examples of
    /// every source, each once (the mixing rule does not apply).
    pub split: String,
    /// examples | tokens: what sizes, shares and `mix_total` count.
    pub mix_unit: String,
    /// Instead of `mix_total`: first_exhausted (the largest total at which no source is drawn
    /// beyond its size: no repeats, HF's first_exhausted) or all_exhausted (the smallest at which
    /// every source is drawn at least its size: oversampling); empty for the default.
    pub mix_stop: String,
}

impl Default for MixConfig {
    fn default() -> Self {
        MixConfig {
            sources: Vec::new(),
            mixing: "weights".into(),
            temperature: 1.0,
            mix_cap: 0,
            mix_total: 0,
            holdout: 0.0,
            split: "train".into(),
            mix_unit: "examples".into(),
            mix_stop: String::new(),
        }
    }
}

/// One source (task) of a mixture. Options left out fall back to the run's own.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MixSource {
    /// The task's name (unique); task index = position in `sources`.
    pub name: String,
    /// JSONL files or globs.
    pub inputs: Vec<String>,
    /// Relative weight for `weights` mixing (> 0).
    pub weight: f64,
    /// Passes over the source (> 0; 2.5 = twice plus a random half): scales its size.
    pub epochs: f64,
    pub format: Option<String>,
    pub loss: Option<String>,
    pub text_field: Option<String>,
    pub messages_field: Option<String>,
    pub prompt_field: Option<String>,
    pub completion_field: Option<String>,
    pub chosen_field: Option<String>,
    pub rejected_field: Option<String>,
    pub role_field: Option<String>,
    pub content_field: Option<String>,
}

impl Default for MixSource {
    fn default() -> Self {
        MixSource {
            name: String::new(),
            inputs: Vec::new(),
            weight: 1.0,
            epochs: 1.0,
            format: None,
            loss: None,
            text_field: None,
            messages_field: None,
            prompt_field: None,
            completion_field: None,
            chosen_field: None,
            rejected_field: None,
            role_field: None,
            content_field: None,
        }
    }
}

/// How many examples (or tokens) a mixture draws in all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// The rule's default (see the module docs).
    Default,
    Total(u64),
    /// min_i s_i / p_i: the first source is used up exactly, none repeats.
    FirstExhausted,
    /// max_i s_i / p_i: the last source is used up exactly, the others repeat.
    AllExhausted,
}

impl MixConfig {
    /// The budget the options ask for (after [`MixConfig::validate`]).
    pub fn budget(&self) -> Budget {
        match (self.mix_stop.as_str(), self.mix_total) {
            ("first_exhausted", _) => Budget::FirstExhausted,
            ("all_exhausted", _) => Budget::AllExhausted,
            (_, 0) => Budget::Default,
            (_, n) => Budget::Total(n),
        }
    }
}

/// The mixing rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mixing {
    Weights,
    Temperature(f64),
    /// Examples-proportional with an optional cap per source.
    Proportional(Option<u64>),
}

impl MixConfig {
    /// Checks the options; errors name the source and field.
    pub fn validate(&self) -> Result<Mixing> {
        let bad = |field: String, message: String| {
            Err(Error::InvalidArgument(format!(
                "mixture: {field}: {message}"
            )))
        };
        if self.sources.is_empty() {
            return bad("sources".into(), "no sources".into());
        }
        for (i, s) in self.sources.iter().enumerate() {
            let at = |f: &str| format!("sources[{i}] ({:?}).{f}", s.name);
            if s.name.is_empty() {
                return bad(format!("sources[{i}].name"), "required".into());
            }
            if self.sources[..i].iter().any(|o| o.name == s.name) {
                return bad(at("name"), "appears twice".into());
            }
            if s.inputs.is_empty() {
                return bad(at("inputs"), "no input files".into());
            }
            if !(s.weight.is_finite() && s.weight > 0.0) {
                return bad(at("weight"), format!("must be > 0, got {}", s.weight));
            }
            if !(s.epochs.is_finite() && s.epochs > 0.0) {
                return bad(at("epochs"), format!("must be > 0, got {}", s.epochs));
            }
        }
        if !(self.holdout.is_finite() && self.holdout >= 0.0) {
            return bad(
                "holdout".into(),
                format!("must be >= 0, got {}", self.holdout),
            );
        }
        match self.split.as_str() {
            "train" => {}
            "eval" if self.holdout > 0.0 => {}
            "eval" => return bad("split".into(), "eval needs holdout > 0".into()),
            other => {
                return bad(
                    "split".into(),
                    format!("{other:?} is not one of train, eval"),
                )
            }
        }
        match self.mix_stop.as_str() {
            "" => {}
            "first_exhausted" | "all_exhausted" if self.mix_total == 0 => {}
            "first_exhausted" | "all_exhausted" => {
                return bad(
                    "mix_stop".into(),
                    "give mix_stop or mix_total, not both".into(),
                )
            }
            other => {
                return bad(
                    "mix_stop".into(),
                    format!("{other:?} is not one of first_exhausted, all_exhausted"),
                )
            }
        }
        if !matches!(self.mix_unit.as_str(), "examples" | "tokens") {
            return bad(
                "mix_unit".into(),
                format!("{:?} is not one of examples, tokens", self.mix_unit),
            );
        }
        match self.mixing.as_str() {
            "weights" => Ok(Mixing::Weights),
            "temperature" => {
                let t = self.temperature;
                if !(t.is_finite() && t > 0.0) {
                    return bad("temperature".into(), format!("must be > 0, got {t}"));
                }
                Ok(Mixing::Temperature(t))
            }
            "proportional" => Ok(Mixing::Proportional(
                (self.mix_cap > 0).then_some(self.mix_cap),
            )),
            other => bad(
                "mixing".into(),
                format!("{other:?} is not one of weights, temperature, proportional"),
            ),
        }
    }
}

/// Target example shares p_i (summing to 1) for sizes s_i = epochs_i * n_i.
pub fn target_shares(rule: Mixing, sizes: &[f64], weights: &[f64]) -> Vec<f64> {
    let raw: Vec<f64> = match rule {
        Mixing::Weights => weights.to_vec(),
        // s^(1/T) computed as exp(ln(s) / T - max) so a large T or huge sizes cannot overflow.
        Mixing::Temperature(t) => {
            let logs: Vec<f64> = sizes.iter().map(|s| s.ln() / t).collect();
            let top = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            logs.iter().map(|l| (l - top).exp()).collect()
        }
        Mixing::Proportional(cap) => sizes
            .iter()
            .map(|&s| cap.map_or(s, |c| s.min(c as f64)))
            .collect(),
    };
    let sum: f64 = raw.iter().sum();
    raw.iter().map(|r| r / sum).collect()
}

/// The default number of examples of a mixture (see the module docs).
pub fn default_total(rule: Mixing, sizes: &[f64]) -> u64 {
    let total: f64 = match rule {
        Mixing::Proportional(Some(cap)) => sizes.iter().map(|&s| s.min(cap as f64)).sum(),
        _ => sizes.iter().sum(),
    };
    total.round() as u64
}

/// Integer counts summing to `total`, each floor(p_i * total) or one more: the units left after
/// flooring go to the largest fractional parts (ties: lower index).
pub fn largest_remainder(shares: &[f64], total: u64) -> Vec<u64> {
    let exact: Vec<f64> = shares.iter().map(|p| p * total as f64).collect();
    apportion(&exact, total)
}

/// Integer counts summing to `total`, each floor(exact_i) or one more, for quotas whose sum is
/// within one unit per quota of `total` (as `largest_remainder`'s p_i * total are, and the rounded
/// sum of any quotas is): the units left after flooring go to the largest fractional parts
/// (ties: lower index).
pub fn apportion(exact: &[f64], total: u64) -> Vec<u64> {
    let mut counts: Vec<u64> = exact.iter().map(|e| e.floor() as u64).collect();
    let assigned: u64 = counts.iter().sum();
    let mut order: Vec<usize> = (0..exact.len()).collect();
    order.sort_by(|&a, &b| {
        let (fa, fb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    // Floating-point error can leave the floors a little over or under; correct both ways.
    let mut left = total as i64 - assigned as i64;
    let mut k = 0;
    while left > 0 {
        counts[order[k % order.len()]] += 1;
        left -= 1;
        k += 1;
    }
    let mut k = order.len();
    while left < 0 {
        k = if k == 0 { order.len() - 1 } else { k - 1 };
        if counts[order[k]] > 0 {
            counts[order[k]] -= 1;
            left += 1;
        }
    }
    counts
}

/// What a mixture draws: per source the share of the examples and of the tokens it targets, and
/// the example counts (summing to the number drawn).
#[derive(Debug, Clone, PartialEq)]
pub struct Targets {
    pub example_shares: Vec<f64>,
    pub token_shares: Vec<f64>,
    pub counts: Vec<u64>,
    /// The budget in the unit: examples, or tokens.
    pub total: u64,
}

/// The targets of a mixture over sources with `examples` usable examples of `tokens` tokens.
///
/// `by_tokens == false`: sizes s_i = epochs_i * examples_i, example shares p_i from the rule, N =
/// `budget` or the rule's default, c_i = largest remainder of p_i * N; the token shares follow as
/// p_i * L_i / sum_j p_j * L_j with L_i the mean length. `by_tokens == true`: the same rule over
/// token sizes epochs_i * tokens_i gives token shares q_i and a token budget N_tok; source i then
/// needs x_i = q_i * N_tok / L_i examples, so p_i = x_i / sum_j x_j and N = round(sum_j x_j).
pub fn targets(
    rule: Mixing,
    by_tokens: bool,
    examples: &[u64],
    tokens: &[u64],
    epochs: &[f64],
    weights: &[f64],
    budget: Budget,
) -> Targets {
    let mean: Vec<f64> = tokens
        .iter()
        .zip(examples)
        .map(|(&t, &n)| t as f64 / n.max(1) as f64)
        .collect();
    let measure = if by_tokens { tokens } else { examples };
    let sizes: Vec<f64> = measure
        .iter()
        .zip(epochs)
        .map(|(&m, e)| m as f64 * e)
        .collect();
    let shares = target_shares(rule, &sizes, weights);
    // s_i / p_i: the total at which source i is drawn exactly its size (sources with p_i = 0 never are)
    let reach = sizes
        .iter()
        .zip(&shares)
        .filter(|(_, &p)| p > 0.0)
        .map(|(s, p)| s / p);
    let total = match budget {
        Budget::Default => default_total(rule, &sizes),
        Budget::Total(n) => n,
        Budget::FirstExhausted => (reach.fold(f64::INFINITY, f64::min) + 1e-9).floor() as u64,
        Budget::AllExhausted => (reach.fold(0.0, f64::max) - 1e-9).ceil() as u64,
    };
    let normalise = |v: Vec<f64>| {
        let sum: f64 = v.iter().sum();
        v.iter().map(|x| x / sum).collect::<Vec<f64>>()
    };
    if by_tokens {
        let needed: Vec<f64> = shares
            .iter()
            .zip(&mean)
            .map(|(q, l)| q * total as f64 / l)
            .collect();
        // Apportioned from the quotas themselves, so each count is within one example of its
        // quota (rescaling the quotas to the rounded total first could move one by half more).
        let drawn = needed.iter().sum::<f64>().round() as u64;
        let counts = apportion(&needed, drawn);
        let example_shares = normalise(needed);
        Targets {
            example_shares,
            token_shares: shares,
            counts,
            total,
        }
    } else {
        let counts = largest_remainder(&shares, total);
        let token_shares = normalise(shares.iter().zip(&mean).map(|(p, l)| p * l).collect());
        Targets {
            example_shares: shares,
            token_shares,
            counts,
            total,
        }
    }
}

/// Examples of a source of `n` held out for evaluation: round(holdout * n) for a fraction (at
/// least 1), else the count `holdout`; always at most n - 1, so one is left to train on.
pub fn holdout_count(holdout: f64, n: u64) -> u64 {
    if holdout <= 0.0 || n == 0 {
        return 0;
    }
    let wanted = if holdout < 1.0 {
        ((holdout * n as f64).round() as u64).max(1)
    } else {
        holdout as u64
    };
    wanted.min(n - 1)
}

/// The positions (0..n) of one source kept for training and those held out (`held` of them, a
/// seeded uniform subset), each list ascending.
pub fn split_positions(n: u32, held: u32, seed: u64, task: usize) -> (Vec<u32>, Vec<u32>) {
    let mut rng = Rng::new(seed ^ 0x5851_F42D_4C95_7F2D_u64.wrapping_mul(task as u64 + 1));
    let mut out = vec![false; n as usize];
    for i in draw_indices(n, held as u64, &mut rng) {
        out[i as usize] = true;
    }
    (0..n).partition(|&i| !out[i as usize])
}

/// Indices (into 0..available) of `count` draws from one source: every index count / available
/// times, plus a random subset of count % available distinct indices (partial Fisher-Yates).
pub fn draw_indices(available: u32, count: u64, rng: &mut Rng) -> Vec<u32> {
    assert!(available > 0 || count == 0, "draws from an empty source");
    if count == 0 {
        return Vec::new();
    }
    let n = available as u64;
    let (passes, rest) = (count / n, (count % n) as usize);
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..passes {
        out.extend(0..available);
    }
    if rest > 0 {
        let mut pool: Vec<u32> = (0..available).collect();
        for i in 0..rest {
            let j = i + (rng.next_u64() % (n - i as u64)) as usize;
            pool.swap(i, j);
        }
        out.extend_from_slice(&pool[..rest]);
    }
    out
}

/// The whole sampling plan: (task, example index) for every draw, interleaved by a seeded shuffle.
/// Source i uses its own random stream, so its subset does not depend on the other sources.
pub fn schedule(counts: &[u64], available: &[u32], seed: u64) -> Vec<(u32, u32)> {
    let mut plan = Vec::with_capacity(counts.iter().sum::<u64>() as usize);
    for (task, (&count, &n)) in counts.iter().zip(available).enumerate() {
        let mut rng = Rng::new(seed ^ (0xA076_1D64_78BD_642F_u64.wrapping_mul(task as u64 + 1)));
        plan.extend(
            draw_indices(n, count, &mut rng)
                .into_iter()
                .map(|i| (task as u32, i)),
        );
    }
    Rng::new(seed ^ 0xE703_7ED1_A0B4_28DB).shuffle(&mut plan);
    plan
}

/// Per-task figures of a prepared mixture (in the manifest and the summary).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TaskStats {
    pub name: String,
    pub files: Vec<String>,
    pub weight: f64,
    pub epochs: f64,
    /// p_i of the mixing rule.
    pub target_share: f64,
    /// The token share p_i implies: p_i * mean_len_i / sum_j p_j * mean_len_j.
    pub target_token_share: f64,
    /// Usable examples of the source (parsed, not empty, with trained tokens) that this split
    /// draws from: those not held out (train), or the held-out ones (eval).
    pub examples_available: u64,
    /// Examples kept out of training for evaluation (`holdout`).
    pub examples_held_out: u64,
    pub tokens_available: u64,
    pub trained_tokens_available: u64,
    /// Draws c_i (an example drawn twice counts twice).
    pub examples_taken: u64,
    /// Distinct examples among the draws.
    pub examples_distinct: u64,
    /// Draws beyond the first of an example: examples_taken - examples_distinct.
    pub examples_repeated: u64,
    /// Draws that reached the shards (over-long examples may be dropped).
    pub examples_packed: u64,
    /// Over-long draws split into fragments, truncated, or dropped (`overlong`).
    pub split: u64,
    pub truncated: u64,
    pub dropped: u64,
    /// Tokens of this task in the shards, all lanes, and those that take loss.
    pub tokens: u64,
    pub trained_tokens: u64,
    /// Realised shares: examples_packed, tokens and trained_tokens over all tasks.
    pub example_share: f64,
    pub token_share: f64,
    pub trained_token_share: f64,
}

/// The mixture section of the manifest.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MixReport {
    /// The mixture as configured (sources and options), to tell whether a folder is current.
    pub config: MixConfig,
    /// train, or eval (the held-out examples).
    pub split: String,
    pub mixing: String,
    pub temperature: Option<f64>,
    pub mix_cap: Option<u64>,
    /// The `holdout` option (0: none).
    pub holdout: f64,
    /// examples | tokens.
    pub unit: String,
    /// The budget in `unit` (examples drawn, or tokens aimed at).
    pub total: u64,
    pub tasks: Vec<TaskStats>,
}

/// Encoded units on disk: token ids (u32 LE) and loss flags (one byte per token), with an index in
/// memory. Units are appended in reading order and read back by number from a memory map.
pub struct Spill {
    ids_path: PathBuf,
    mask_path: PathBuf,
    ids: Option<BufWriter<File>>,
    mask: Option<BufWriter<File>>,
    /// Token offset of every sequence (lanes per unit consecutive), plus the end.
    offsets: Vec<u64>,
    /// Whether sequence k carries a loss mask (`Doc::trained` is Some).
    masked: Vec<bool>,
    lanes: usize,
    maps: Option<(memmap2::Mmap, memmap2::Mmap)>,
}

impl Spill {
    /// A new, empty spill in `dir` (created).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let ids_path = dir.join("ids.bin");
        let mask_path = dir.join("mask.bin");
        let open = |p: &Path| -> Result<BufWriter<File>> {
            Ok(BufWriter::with_capacity(
                1 << 20,
                File::create(p).map_err(|e| Error::io(p, e))?,
            ))
        };
        Ok(Spill {
            ids: Some(open(&ids_path)?),
            mask: Some(open(&mask_path)?),
            ids_path,
            mask_path,
            offsets: vec![0],
            masked: Vec::new(),
            lanes: 0,
            maps: None,
        })
    }

    /// Units written so far.
    pub fn len(&self) -> usize {
        self.masked.len().checked_div(self.lanes).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a unit (every unit must have the same number of lanes).
    pub fn push(&mut self, unit: &Unit) -> Result<()> {
        if self.lanes == 0 {
            self.lanes = unit.lanes.len();
        }
        assert_eq!(
            unit.lanes.len(),
            self.lanes,
            "units of one spill share lanes"
        );
        let (ids, mask) = (
            self.ids.as_mut().expect("spill is open"),
            self.mask.as_mut().expect("spill is open"),
        );
        for doc in &unit.lanes {
            let bytes: Vec<u8> = doc.ids.iter().flat_map(|t| t.to_le_bytes()).collect();
            ids.write_all(&bytes)
                .map_err(|e| Error::io(&self.ids_path, e))?;
            let flags: Vec<u8> = match &doc.trained {
                Some(t) => t.iter().map(|&b| u8::from(b)).collect(),
                None => vec![1; doc.len()],
            };
            mask.write_all(&flags)
                .map_err(|e| Error::io(&self.mask_path, e))?;
            self.offsets
                .push(self.offsets.last().unwrap() + doc.len() as u64);
            self.masked.push(doc.trained.is_some());
        }
        Ok(())
    }

    /// Ends writing and maps the files for reading.
    pub fn finish(&mut self) -> Result<()> {
        for (w, p) in [
            (&mut self.ids, &self.ids_path),
            (&mut self.mask, &self.mask_path),
        ] {
            if let Some(mut w) = w.take() {
                w.flush().map_err(|e| Error::io(p, e))?;
            }
        }
        let map = |p: &Path| -> Result<memmap2::Mmap> {
            let f = File::open(p).map_err(|e| Error::io(p, e))?;
            // SAFETY: the files are private to this run (inside its temporary folder) and no longer written.
            unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(p, e))
        };
        self.maps = Some((map(&self.ids_path)?, map(&self.mask_path)?));
        Ok(())
    }

    /// (tokens, trained targets) of unit `k`, all lanes, as [`Doc::len`] and
    /// [`Doc::trained_targets`] count them, read without decoding the unit.
    pub fn counts(&self, k: usize) -> (u64, u64) {
        let (_, mask) = self.maps.as_ref().expect("spill finished");
        let mut counts = (0, 0);
        for seq in k * self.lanes..(k + 1) * self.lanes {
            let (a, b) = (self.offsets[seq] as usize, self.offsets[seq + 1] as usize);
            counts.0 += (b - a) as u64;
            // every target but the first token's; all of them when the sequence has no mask
            let flags = &mask[(a + 1).min(b)..b];
            counts.1 += flags.iter().filter(|&&f| f != 0).count() as u64;
        }
        counts
    }

    /// Unit number `k` (after [`Spill::finish`]), tagged with `source`.
    pub fn unit(&self, k: usize, source: u32) -> Unit {
        let (ids, mask) = self.maps.as_ref().expect("spill finished");
        let lanes = (0..self.lanes)
            .map(|lane| {
                let seq = k * self.lanes + lane;
                let (a, b) = (self.offsets[seq] as usize, self.offsets[seq + 1] as usize);
                Doc {
                    ids: ids[4 * a..4 * b]
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                    trained: self.masked[seq].then(|| mask[a..b].iter().map(|&f| f != 0).collect()),
                }
            })
            .collect();
        Unit { lanes, source }
    }
}

/// Draws the mixture's schedule from the spilled units and streams the draws, in order, to the
/// packer (over-long units fitted here). Returns the per-task report and the over-long counts.
#[allow(clippy::too_many_arguments)]
pub(crate) fn replay(
    mix: &MixConfig,
    mixing: Mixing,
    spill: &Spill,
    stats: &[SourceStats],
    file_task: &[usize],
    cfg: &PrepareConfig,
    packing: Packing,
    policy: Overlong,
    units: std::sync::mpsc::SyncSender<Vec<Unit>>,
    progress: &Progress,
) -> Result<(MixReport, OverlongCounts)> {
    let n_tasks = mix.sources.len();
    let mut tasks: Vec<TaskStats> = mix
        .sources
        .iter()
        .map(|s| TaskStats {
            name: s.name.clone(),
            weight: s.weight,
            epochs: s.epochs,
            ..Default::default()
        })
        .collect();
    let mut usable = vec![0u64; n_tasks];
    for (s, &t) in stats.iter().zip(file_task) {
        tasks[t].files.push(s.path.clone());
        usable[t] += s.documents;
    }
    let mut first = vec![0usize; n_tasks]; // each task's first unit in the spill
    for t in 1..n_tasks {
        first[t] = first[t - 1] + usable[t - 1] as usize;
    }
    debug_assert_eq!(
        first[n_tasks - 1] + usable[n_tasks - 1] as usize,
        spill.len()
    );
    let eval = mix.split == "eval";
    // Per task: the spill positions (relative to `first`) this split draws from.
    let mut pools: Vec<Vec<u32>> = Vec::with_capacity(n_tasks);
    for (t, task) in tasks.iter_mut().enumerate() {
        if usable[t] == 0 {
            return Err(Error::InvalidArgument(format!(
                "mixture source {:?} ({}): no usable examples",
                task.name,
                mix.sources[t].inputs.join(", ")
            )));
        }
        if usable[t] > u32::MAX as u64 {
            return Err(Error::InvalidArgument(format!(
                "mixture source {:?}: more than 2^32 examples",
                task.name
            )));
        }
        let held = holdout_count(mix.holdout, usable[t]);
        let (kept, held_out) = split_positions(usable[t] as u32, held as u32, cfg.seed, t);
        let pool = if eval { held_out } else { kept };
        task.examples_held_out = held;
        task.examples_available = pool.len() as u64;
        for &i in &pool {
            let (tokens, trained) = spill.counts(first[t] + i as usize);
            task.tokens_available += tokens;
            task.trained_tokens_available += trained;
        }
        pools.push(pool);
    }
    let available: Vec<u32> = pools.iter().map(|p| p.len() as u32).collect();
    // The eval split takes every held-out example once: proportional, no cap, no budget.
    let rule = if eval {
        Mixing::Proportional(None)
    } else {
        mixing
    };
    let by_tokens = mix.mix_unit == "tokens" && !eval;
    let column = |f: fn(&TaskStats) -> u64| tasks.iter().map(f).collect::<Vec<u64>>();
    let epochs: Vec<f64> = tasks
        .iter()
        .map(|t| if eval { 1.0 } else { t.epochs })
        .collect();
    let weights: Vec<f64> = tasks.iter().map(|t| t.weight).collect();
    let goal = targets(
        rule,
        by_tokens,
        &column(|t| t.examples_available),
        &column(|t| t.tokens_available),
        &epochs,
        &weights,
        if eval { Budget::Default } else { mix.budget() },
    );
    let counts = goal.counts;
    for (t, task) in tasks.iter_mut().enumerate() {
        task.target_share = goal.example_shares[t];
        task.target_token_share = goal.token_shares[t];
        task.examples_taken = counts[t];
        task.examples_distinct = counts[t].min(task.examples_available);
        task.examples_repeated = counts[t] - task.examples_distinct;
    }

    let plan = schedule(&counts, &available, cfg.seed);
    let mut overlong = OverlongCounts::default();
    for chunk in plan.chunks(1024) {
        if progress.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let mut batch = Vec::with_capacity(chunk.len());
        for &(t, i) in chunk {
            let unit = spill.unit(
                first[t as usize] + pools[t as usize][i as usize] as usize,
                t,
            );
            let before = overlong;
            let fitted = if packing == Packing::Greedy {
                vec![unit]
            } else {
                fit_overlong(unit, cfg.seq_len, policy, &mut overlong)
            };
            let task = &mut tasks[t as usize];
            task.examples_packed += u64::from(!fitted.is_empty());
            task.split += overlong.split - before.split;
            task.truncated += overlong.truncated - before.truncated;
            task.dropped += overlong.dropped - before.dropped;
            for u in &fitted {
                task.tokens += u.lanes.iter().map(|d| d.len() as u64).sum::<u64>();
                task.trained_tokens += u
                    .lanes
                    .iter()
                    .map(|d| d.trained_targets() as u64)
                    .sum::<u64>();
            }
            batch.extend(fitted);
        }
        if units.send(batch).is_err() {
            break; // the packer failed; its error is reported by the caller
        }
    }
    drop(units);
    let share = |part: u64, all: u64| {
        if all > 0 {
            part as f64 / all as f64
        } else {
            0.0
        }
    };
    let (packed, tokens, trained) = tasks.iter().fold((0, 0, 0), |(a, b, c), t| {
        (a + t.examples_packed, b + t.tokens, c + t.trained_tokens)
    });
    for task in &mut tasks {
        task.example_share = share(task.examples_packed, packed);
        task.token_share = share(task.tokens, tokens);
        task.trained_token_share = share(task.trained_tokens, trained);
    }
    let report = MixReport {
        config: mix.clone(),
        split: mix.split.clone(),
        mixing: if eval {
            "holdout".into()
        } else {
            mix.mixing.clone()
        },
        temperature: matches!(rule, Mixing::Temperature(_)).then_some(mix.temperature),
        mix_cap: match rule {
            Mixing::Proportional(cap) => cap,
            _ => None,
        },
        holdout: mix.holdout,
        unit: if by_tokens { "tokens" } else { "examples" }.into(),
        total: goal.total,
        tasks,
    };
    Ok((report, overlong))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::pack::Rng;
    use proptest::prelude::*;

    #[test]
    fn shares_follow_each_rule() {
        let sizes = [5000.0, 1000.0, 200.0];
        let w = target_shares(Mixing::Weights, &sizes, &[2.0, 1.0, 1.0]);
        assert_eq!(w, vec![0.5, 0.25, 0.25]);
        let t1 = target_shares(Mixing::Temperature(1.0), &sizes, &[1.0; 3]);
        assert!((t1[0] - 5000.0 / 6200.0).abs() < 1e-12);
        let t2 = target_shares(Mixing::Temperature(2.0), &sizes, &[1.0; 3]);
        let roots: f64 = sizes.iter().map(|s| s.sqrt()).sum();
        assert!((t2[2] - 200f64.sqrt() / roots).abs() < 1e-12);
        let big = target_shares(Mixing::Temperature(1e9), &sizes, &[1.0; 3]);
        assert!(big.iter().all(|p| (p - 1.0 / 3.0).abs() < 1e-6));
        let capped = target_shares(Mixing::Proportional(Some(1000)), &sizes, &[1.0; 3]);
        assert_eq!(
            capped,
            vec![1000.0 / 2200.0, 1000.0 / 2200.0, 200.0 / 2200.0]
        );
        assert_eq!(
            default_total(Mixing::Proportional(Some(1000)), &sizes),
            2200
        );
        assert_eq!(default_total(Mixing::Weights, &sizes), 6200);
    }

    #[test]
    fn epochs_repeat_whole_passes_then_a_distinct_subset() {
        let mut rng = Rng::new(1);
        let d = draw_indices(4, 10, &mut rng); // 2.5 epochs of 4
        let mut seen = [0u32; 4];
        for i in &d {
            seen[*i as usize] += 1;
        }
        assert_eq!(d.len(), 10);
        assert_eq!(seen.iter().filter(|&&c| c == 3).count(), 2);
        assert_eq!(seen.iter().filter(|&&c| c == 2).count(), 2);
    }

    #[test]
    fn validation_names_the_source_and_field() {
        let src = |name: &str, weight: f64| MixSource {
            name: name.into(),
            inputs: vec!["a.jsonl".into()],
            weight,
            ..Default::default()
        };
        let mut cfg = MixConfig {
            sources: vec![src("a", 1.0), src("b", 0.0)],
            ..Default::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("sources[1] (\"b\").weight: must be > 0"),
            "{err}"
        );
        cfg.sources[1].weight = 1.0;
        cfg.sources[1].name = "a".into();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("appears twice"));
        cfg.sources[1].name = "b".into();
        cfg.mixing = "softmax".into();
        assert!(cfg.validate().unwrap_err().to_string().contains("mixing"));
        let unknown = serde_json::from_str::<MixSource>(r#"{"name": "a", "wieght": 2}"#)
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("wieght"), "{unknown}");
    }

    #[test]
    fn spill_round_trips_units() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::create(&dir.path().join("spill")).unwrap();
        let units = [
            Unit {
                lanes: vec![Doc {
                    ids: vec![1, 2, 70000],
                    trained: None,
                }],
                source: 0,
            },
            Unit {
                lanes: vec![Doc {
                    ids: vec![4, 5],
                    trained: Some(vec![false, true]),
                }],
                source: 0,
            },
        ];
        for u in &units {
            spill.push(u).unwrap();
        }
        spill.finish().unwrap();
        assert_eq!(spill.len(), 2);
        assert_eq!(spill.unit(1, 0), units[1]);
        for (k, u) in units.iter().enumerate() {
            let doc = &u.lanes[0];
            assert_eq!(
                spill.counts(k),
                (doc.len() as u64, doc.trained_targets() as u64)
            );
        }
        assert_eq!(spill.unit(0, 7).lanes, units[0].lanes);
        assert_eq!(spill.unit(0, 7).source, 7);
    }

    #[test]
    fn first_and_all_exhausted_budgets() {
        let n = [5000, 1000, 200];
        let tokens = [50_000, 10_000, 2000];
        let w = [0.5, 0.3, 0.2];
        let at = |budget| targets(Mixing::Weights, false, &n, &tokens, &[1.0; 3], &w, budget);
        // charlie (200 at 20%) runs out first at 1000; alpha (5000 at 50%) last at 10000
        let first = at(Budget::FirstExhausted);
        assert_eq!(
            (first.total, first.counts.clone()),
            (1000, vec![500, 300, 200])
        );
        let all = at(Budget::AllExhausted);
        assert_eq!(
            (all.total, all.counts.clone()),
            (10_000, vec![5000, 3000, 2000])
        );
        assert_eq!(at(Budget::Total(10)).counts, vec![5, 3, 2]);
        let cfg = MixConfig {
            mix_stop: "first_exhausted".into(),
            mix_total: 5,
            sources: vec![MixSource {
                name: "a".into(),
                inputs: vec!["a".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(cfg.validate().unwrap_err().to_string().contains("not both"));
    }

    #[test]
    fn holdout_is_a_seeded_subset_that_leaves_one_to_train() {
        assert_eq!(holdout_count(0.1, 1000), 100);
        assert_eq!(holdout_count(0.001, 10), 1);
        assert_eq!(holdout_count(50.0, 1000), 50);
        assert_eq!(holdout_count(50.0, 20), 19);
        assert_eq!(holdout_count(0.0, 20), 0);
        let (kept, held) = split_positions(100, 10, 3, 0);
        assert_eq!((kept.len(), held.len()), (90, 10));
        assert!(held.iter().all(|h| !kept.contains(h)));
        assert_eq!(split_positions(100, 10, 3, 0), (kept, held.clone()));
        assert_ne!(split_positions(100, 10, 3, 1).1, held);
    }

    #[test]
    fn token_budget_counts_stay_within_one_example_of_their_quota() {
        // proptest's case: the quotas sum to 22,405.46 and round to 22,405; rescaling them to that
        // total before apportioning moved source 1's count by more than one example.
        let examples = [3002u64, 4727, 4125];
        let lens = [171u64, 36, 6];
        let tokens: Vec<u64> = examples.iter().zip(&lens).map(|(n, l)| n * l).collect();
        let weights = [5.378247530434944, 3.4185373073671816, 5.375366566361599];
        let t = targets(
            Mixing::Weights,
            true,
            &examples,
            &tokens,
            &[1.0; 3],
            &weights,
            Budget::Default,
        );
        let quotas: Vec<f64> = (0..3)
            .map(|i| t.token_shares[i] * t.total as f64 / lens[i] as f64)
            .collect();
        assert_eq!(
            t.counts.iter().sum::<u64>(),
            quotas.iter().sum::<f64>().round() as u64
        );
        for (count, quota) in t.counts.iter().zip(&quotas) {
            assert!(
                (*count as f64 - quota).abs() < 1.0,
                "{count} against {quota}"
            );
        }
    }

    proptest! {
        #[test]
        fn counts_are_exact_and_close(
            weights in prop::collection::vec(0.01f64..100.0, 1..8),
            total in 0u64..100_000,
        ) {
            let shares = target_shares(Mixing::Weights, &[1.0; 8][..weights.len()], &weights);
            let counts = largest_remainder(&shares, total);
            prop_assert_eq!(counts.iter().sum::<u64>(), total);
            for (c, p) in counts.iter().zip(&shares) {
                prop_assert!((*c as f64 - p * total as f64).abs() < 1.0 + 1e-6);
            }
        }

        #[test]
        fn token_targets_turn_into_example_counts(
            examples in prop::collection::vec(1u64..5000, 1..5),
            lens in prop::collection::vec(1u64..200, 5),
            weights in prop::collection::vec(0.1f64..10.0, 5),
        ) {
            let k = examples.len();
            let tokens: Vec<u64> = examples.iter().zip(&lens).map(|(n, l)| n * l).collect();
            let t = targets(Mixing::Weights, true, &examples, &tokens, &[1.0; 5][..k], &weights[..k], Budget::Default);
            // the token shares are the weights' shares, and the example counts realise them
            let w: f64 = weights[..k].iter().sum();
            let drawn: Vec<f64> = t.counts.iter().zip(&lens).map(|(&c, &l)| (c * l) as f64).collect();
            let all: f64 = drawn.iter().sum();
            prop_assert_eq!(t.total, tokens.iter().sum::<u64>());
            for i in 0..k {
                prop_assert!((t.token_shares[i] - weights[i] / w).abs() < 1e-9);
                // each count is within one example of its target
                let exact = t.token_shares[i] * t.total as f64 / lens[i] as f64;
                prop_assert!((t.counts[i] as f64 - exact).abs() <= 1.0 + 1e-6);
                prop_assert!((drawn[i] / all - t.token_shares[i]).abs() * all <= 2.0 * 200.0 + 1e-6);
            }
        }

        #[test]
        fn schedule_is_deterministic_and_draws_what_was_asked(
            available in prop::collection::vec(1u32..300, 1..5),
            factors in prop::collection::vec(0.0f64..3.5, 5),
            seed in any::<u64>(),
        ) {
            let counts: Vec<u64> = available
                .iter()
                .zip(&factors)
                .map(|(&n, f)| (n as f64 * f) as u64)
                .collect();
            let a = schedule(&counts, &available, seed);
            prop_assert_eq!(&a, &schedule(&counts, &available, seed));
            prop_assert_eq!(a.len() as u64, counts.iter().sum::<u64>());
            for (task, (&c, &n)) in counts.iter().zip(&available).enumerate() {
                let mut per = vec![0u64; n as usize];
                for &(t, i) in &a {
                    if t as usize == task {
                        per[i as usize] += 1;
                    }
                }
                prop_assert_eq!(per.iter().sum::<u64>(), c);
                // every example drawn floor(c/n) or ceil(c/n) times: whole passes, then distinct
                let lo = c / n as u64;
                prop_assert!(per.iter().all(|&k| k == lo || k == lo + 1));
            }
        }
    }
}

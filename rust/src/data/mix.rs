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
//! sum_j s_j for the other two rules. The example counts c_i are p_i * N rounded by largest
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

use super::mask::Doc;
use super::pack::{Rng, Unit};
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
}

impl Default for MixConfig {
    fn default() -> Self {
        MixConfig {
            sources: Vec::new(),
            mixing: "weights".into(),
            temperature: 1.0,
            mix_cap: 0,
            mix_total: 0,
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
    let mut counts: Vec<u64> = exact.iter().map(|e| e.floor() as u64).collect();
    let assigned: u64 = counts.iter().sum();
    let mut order: Vec<usize> = (0..shares.len()).collect();
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
    /// Usable examples of the source (parsed, not empty, with trained tokens).
    pub examples_available: u64,
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
    pub mixing: String,
    pub temperature: Option<f64>,
    pub mix_cap: Option<u64>,
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
        assert_eq!(spill.unit(0, 7).lanes, units[0].lanes);
        assert_eq!(spill.unit(0, 7).source, 7);
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

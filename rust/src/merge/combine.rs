//! Combining LoRA adapters into one, with PEFT's `add_weighted_adapter` semantics.
//!
//! For adapters i with weights wᵢ and scalings sᵢ (alpha/r), per module:
//!
//! - `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` combine the factors
//!   themselves: A' = comb({Aᵢ}, {sign(wᵢsᵢ)·√|wᵢsᵢ|}), B' = comb({Bᵢ}, {√|wᵢsᵢ|}) (equal ranks);
//! - `cat` stacks them: A' = [wᵢsᵢAᵢ] (rows), B' = [Bᵢ] (columns), rank Σrᵢ, exact;
//! - `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd` combine the
//!   full updates Δᵢ = sᵢBᵢAᵢ with weights wᵢ and re-factor the result at a chosen rank k:
//!   B' = U_k·diag(S_k), A' = V_kᵀ (`svd.rs`; plain `svd` never forms Δ: it factors the stacked
//!   factors exactly).
//!
//! comb is one of (all elementwise over the stacked task tensors Tᵢ):
//!   sum:      Σ wᵢTᵢ
//!   magnitude pruning: keep the ⌊density·n⌋ largest |Tᵢ| of each tensor, then sum
//!   TIES:     magnitude pruning, the majority sign per element (sign of ΣTᵢ, or of Σsign(Tᵢ) with
//!             `frequency`), then the mean of the weighted entries that agree with it
//!   DARE:     keep each entry with probability density and divide by density (seeded per module,
//!             adapter and factor, so results are reproducible), then sum (`dare_linear`) or TIES
//!
//! The combined adapter has lora_alpha = r (scaling 1, rsLoRA off), rank_pattern / alpha_pattern
//! entries for modules whose rank differs, and the union of target_modules.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use rayon::prelude::*;
use serde_json::Value;

use super::adapter::{Adapter, LoraModule, TargetModules};
use super::convert::tensor_from_f32;
use super::svd::{from_row_major, truncated_svd, truncated_svd_of_product};
use crate::error::{Error, Result};
use crate::io::{atomic::write_atomic, SafetensorsWriter, TensorSpec};

/// A combination method, named as PEFT names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Linear,
    Cat,
    Svd,
    Ties,
    TiesSvd,
    DareLinear,
    DareTies,
    DareLinearSvd,
    DareTiesSvd,
    MagnitudePrune,
    MagnitudePruneSvd,
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "linear" => Method::Linear,
            "cat" => Method::Cat,
            "svd" => Method::Svd,
            "ties" => Method::Ties,
            "ties_svd" => Method::TiesSvd,
            "dare_linear" => Method::DareLinear,
            "dare_ties" => Method::DareTies,
            "dare_linear_svd" => Method::DareLinearSvd,
            "dare_ties_svd" => Method::DareTiesSvd,
            "magnitude_prune" => Method::MagnitudePrune,
            "magnitude_prune_svd" => Method::MagnitudePruneSvd,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "combination {other:?}: one of linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, \
                     dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd"
                )))
            }
        })
    }
}

/// How task tensors are combined elementwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Sum,
    MagnitudePrune,
    Ties,
    DareLinear,
    DareTies,
}

impl Method {
    fn rule(self) -> Rule {
        match self {
            Method::Linear | Method::Svd | Method::Cat => Rule::Sum,
            Method::Ties | Method::TiesSvd => Rule::Ties,
            Method::DareLinear | Method::DareLinearSvd => Rule::DareLinear,
            Method::DareTies | Method::DareTiesSvd => Rule::DareTies,
            Method::MagnitudePrune | Method::MagnitudePruneSvd => Rule::MagnitudePrune,
        }
    }

    fn is_svd(self) -> bool {
        matches!(
            self,
            Method::Svd
                | Method::TiesSvd
                | Method::DareLinearSvd
                | Method::DareTiesSvd
                | Method::MagnitudePruneSvd
        )
    }
}

/// TIES' majority sign: of the summed values (`total`) or of the summed signs (`frequency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MajoritySign {
    Total,
    Frequency,
}

/// Options of [`combine_adapters`].
#[derive(Debug, Clone)]
pub struct CombineOptions {
    pub method: Method,
    /// One per adapter.
    pub weights: Vec<f64>,
    /// Fraction kept by TIES / DARE / magnitude pruning, in [0, 1].
    pub density: Option<f64>,
    pub majority_sign: MajoritySign,
    /// Rank of the svd methods (default: the largest input rank).
    pub svd_rank: Option<usize>,
    /// Seed of DARE's random pruning and of the randomized SVD.
    pub seed: u64,
    pub overwrite: bool,
}

/// What a combination wrote.
#[derive(Debug, Clone, Default)]
pub struct CombineSummary {
    pub modules: usize,
    pub rank: usize,
    pub tensors_replaced: usize,
}

/// A reproducible stream of uniform numbers in [0, 1) (splitmix64).
struct Uniform(u64);

impl Uniform {
    fn new(seed: u64, module: &str, adapter: usize, part: u64) -> Self {
        let mut h = 0xcbf2_9ce4_8422_2325u64; // FNV-1a of the module path
        for b in module.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Uniform(
            h ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ ((adapter as u64) << 40) ^ (part << 56),
        )
    }

    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Keeps the ⌊density·n⌋ entries of largest magnitude (PEFT `magnitude_based_pruning`).
fn magnitude_prune(t: &mut [f32], density: f64) {
    if density >= 1.0 {
        return;
    }
    let keep = (density * t.len() as f64) as usize;
    if keep == 0 {
        t.iter_mut().for_each(|x| *x = 0.0);
        return;
    }
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.select_nth_unstable_by(keep - 1, |&a, &b| t[b].abs().total_cmp(&t[a].abs()));
    let mut kept = vec![false; t.len()];
    order[..keep].iter().for_each(|&i| kept[i] = true);
    t.iter_mut().zip(&kept).for_each(|(x, k)| {
        if !k {
            *x = 0.0
        }
    });
}

/// Keeps each entry with probability `density`, rescaled by 1/density (PEFT `random_pruning`).
fn random_prune(t: &mut [f32], density: f64, mut rng: Uniform) {
    if density >= 1.0 {
        return;
    }
    for x in t.iter_mut() {
        *x = if rng.next() < density {
            *x / density as f32
        } else {
            0.0
        };
    }
}

/// Combines task tensors (all the same length) with `weights` under `rule`.
fn combine(
    mut tensors: Vec<Vec<f32>>,
    weights: &[f32],
    rule: Rule,
    density: f64,
    sign: MajoritySign,
    rng: impl Fn(usize) -> Uniform,
) -> Vec<f32> {
    let n = tensors[0].len();
    for (i, t) in tensors.iter_mut().enumerate() {
        match rule {
            Rule::Sum => {}
            Rule::MagnitudePrune | Rule::Ties => magnitude_prune(t, density),
            Rule::DareLinear | Rule::DareTies => random_prune(t, density, rng(i)),
        }
    }
    let mut out = vec![0f32; n];
    match rule {
        Rule::Sum | Rule::MagnitudePrune | Rule::DareLinear => {
            for (t, w) in tensors.iter().zip(weights) {
                out.iter_mut().zip(t).for_each(|(o, x)| *o += x * w);
            }
        }
        Rule::Ties | Rule::DareTies => {
            for (j, o) in out.iter_mut().enumerate() {
                let magnitude: f32 = match sign {
                    MajoritySign::Total => tensors.iter().map(|t| t[j]).sum(),
                    MajoritySign::Frequency => tensors.iter().map(|t| sign_of(t[j])).sum(),
                };
                let majority = if magnitude >= 0.0 { 1.0 } else { -1.0 };
                let (mut sum, mut count) = (0f32, 0f32);
                for (t, w) in tensors.iter().zip(weights) {
                    if sign_of(t[j]) == majority {
                        sum += t[j] * w;
                        count += 1.0;
                    }
                }
                *o = sum / count.max(1.0);
            }
        }
    }
    out
}

fn sign_of(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// One module's LoRA in each adapter that has it.
struct ModuleGroup<'a> {
    module: String,
    members: Vec<(usize, &'a LoraModule)>,
}

/// The config-level rank PEFT gives an adapter (`max(r, rank_pattern values)`).
fn config_rank(adapter: &Adapter) -> usize {
    adapter
        .config
        .rank_pattern
        .iter()
        .map(|p| p.value)
        .fold(adapter.config.r, usize::max)
}

/// Combines `adapters` into a new PEFT adapter folder `out_dir`.
pub fn combine_adapters(
    adapter_dirs: &[&Path],
    out_dir: &Path,
    options: &CombineOptions,
) -> Result<CombineSummary> {
    if adapter_dirs.is_empty() {
        return Err(Error::InvalidArgument("no adapters to combine".into()));
    }
    if options.weights.len() != adapter_dirs.len() {
        return Err(Error::InvalidArgument(format!(
            "{} weights for {} adapters",
            options.weights.len(),
            adapter_dirs.len()
        )));
    }
    let method = if adapter_dirs.len() == 1 {
        Method::Linear
    } else {
        options.method
    };
    let rule = method.rule();
    let density = match (rule, options.density) {
        (Rule::Sum, _) => 1.0,
        (_, Some(d)) if (0.0..=1.0).contains(&d) => d,
        (_, Some(d)) => {
            return Err(Error::InvalidArgument(format!(
                "density {d} is not in [0, 1]"
            )))
        }
        (_, None) => {
            return Err(Error::InvalidArgument(format!(
                "{method:?} needs a density"
            )))
        }
    };
    let adapters = adapter_dirs
        .iter()
        .map(Adapter::open)
        .collect::<Result<Vec<_>>>()?;
    for a in &adapters {
        if let Some(m) = a
            .modules
            .values()
            .find(|m| m.magnitude.is_some() || m.bias.is_some())
        {
            return Err(Error::InvalidArgument(format!(
                "{}: module {} uses DoRA or lora_bias, which adapters cannot be combined with \
                 (merge them into the model one after another instead)",
                a.dir.display(),
                m.module
            )));
        }
    }
    let ranks: Vec<usize> = adapters.iter().map(config_rank).collect();
    let new_rank = match method {
        Method::Cat => ranks.iter().sum(),
        m if m.is_svd() => options
            .svd_rank
            .unwrap_or(*ranks.iter().max().expect("adapters")),
        _ => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                return Err(Error::InvalidArgument(format!(
                    "{method:?} needs adapters of one rank (got {ranks:?}): use cat or an svd method"
                )));
            }
            ranks[0]
        }
    };

    // Modules: the union over adapters, each with its members.
    let mut groups: BTreeMap<String, ModuleGroup> = BTreeMap::new();
    for (i, a) in adapters.iter().enumerate() {
        for (name, m) in &a.modules {
            groups
                .entry(name.clone())
                .or_insert_with(|| ModuleGroup {
                    module: name.clone(),
                    members: Vec::new(),
                })
                .members
                .push((i, m));
        }
    }
    let groups: Vec<ModuleGroup> = groups.into_values().collect();
    let dtype = adapters[0].factor_dtype();
    let mut specs = Vec::new();
    let mut module_ranks: Vec<usize> = Vec::new();
    for g in &groups {
        let (first_adapter, first) = g.members[0];
        let (a, b) = (
            adapters[first_adapter].info(&first.a),
            adapters[first_adapter].info(&first.b),
        );
        for (i, m) in &g.members {
            let (ai, bi) = (adapters[*i].info(&m.a), adapters[*i].info(&m.b));
            if ai.shape[1] != a.shape[1] || bi.shape[0] != b.shape[0] || m.layout != first.layout {
                return Err(Error::InvalidArgument(format!(
                    "module {}: adapters disagree on its shape or layout",
                    g.module
                )));
            }
        }
        let rank = match method {
            Method::Cat => new_rank,
            m if m.is_svd() => new_rank,
            _ => {
                let r = first.rank;
                if g.members.iter().any(|(_, m)| m.rank != r) {
                    return Err(Error::InvalidArgument(format!(
                        "module {}: ranks differ between adapters: use cat or an svd method",
                        g.module
                    )));
                }
                r
            }
        };
        module_ranks.push(rank);
        specs.push(TensorSpec::new(
            first.a.clone(),
            dtype,
            vec![rank, a.shape[1]],
        ));
        specs.push(TensorSpec::new(
            first.b.clone(),
            dtype,
            vec![b.shape[0], rank],
        ));
    }
    // Whole-tensor replacements (modules_to_save): each from the one adapter that has it.
    let mut replacements: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (i, a) in adapters.iter().enumerate() {
        for (name, key) in &a.replacements {
            if replacements
                .insert(name.clone(), (i, key.clone()))
                .is_some()
            {
                return Err(Error::InvalidArgument(format!(
                    "{name} is replaced (modules_to_save) by more than one adapter"
                )));
            }
        }
    }
    for (i, key) in replacements.values() {
        let info = adapters[*i].info(key);
        specs.push(TensorSpec::new(key.clone(), info.dtype, info.shape.clone()));
    }

    super::stream::prepare_out_dir(out_dir, adapter_dirs, options.overwrite)?;
    let mut writer = SafetensorsWriter::create(
        out_dir.join("adapter_model.safetensors"),
        specs,
        &BTreeMap::from([("format".to_string(), "pt".to_string())]),
    )?;
    let threads = rayon::current_num_threads().max(1);
    for (chunk, ranks) in groups
        .chunks(threads * 2)
        .zip(module_ranks.chunks(threads * 2))
    {
        let results: Vec<(Vec<f32>, Vec<f32>)> = chunk
            .par_iter()
            .zip(ranks)
            .map(|(g, &rank)| combine_module(&adapters, g, method, rule, density, rank, options))
            .collect();
        for (g, (a, b)) in chunk.iter().zip(results) {
            let first = g.members[0].1;
            writer.write(&first.a, &tensor_from_f32(&a, dtype))?;
            writer.write(&first.b, &tensor_from_f32(&b, dtype))?;
        }
    }
    for (i, key) in replacements.values() {
        writer.write(key, adapters[*i].weights.bytes(key).expect("adapter key"))?;
    }
    writer.finish()?;

    let config = combined_config(&adapters, &groups, &module_ranks, new_rank)?;
    write_atomic(
        out_dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)
            .expect("config serializes")
            .as_bytes(),
    )?;
    Ok(CombineSummary {
        modules: groups.len(),
        rank: new_rank,
        tensors_replaced: replacements.len(),
    })
}

/// The combined A (rank, in) and B (out, rank) of one module, row-major f32.
fn combine_module(
    adapters: &[Adapter],
    g: &ModuleGroup,
    method: Method,
    rule: Rule,
    density: f64,
    rank: usize,
    options: &CombineOptions,
) -> (Vec<f32>, Vec<f32>) {
    let load = |i: usize, key: &str| adapters[i].tensor_f32(key);
    let (first_adapter, first) = g.members[0];
    let in_dim = adapters[first_adapter].info(&first.a).shape[1];
    let out_dim = adapters[first_adapter].info(&first.b).shape[0];
    let seed = options.seed;
    match method {
        Method::Cat => {
            // A' rows and B' columns in adapter order; absent adapters leave zeros at the end.
            let mut a = vec![0f32; rank * in_dim];
            let mut b = vec![0f32; out_dim * rank];
            let mut row = 0;
            for (i, m) in &g.members {
                let factor = (options.weights[*i] * m.scale) as f32;
                let (ai, bi) = (load(*i, &m.a), load(*i, &m.b));
                for k in 0..m.rank {
                    for j in 0..in_dim {
                        a[(row + k) * in_dim + j] = ai[k * in_dim + j] * factor;
                    }
                    for o in 0..out_dim {
                        b[o * rank + row + k] = bi[o * m.rank + k];
                    }
                }
                row += m.rank;
            }
            (a, b)
        }
        m if !m.is_svd() => {
            let mut weights_a = Vec::new();
            let mut weights_b = Vec::new();
            let (mut as_, mut bs) = (Vec::new(), Vec::new());
            for (i, m) in &g.members {
                let ws = options.weights[*i] * m.scale;
                weights_a.push((ws.abs().sqrt() * ws.signum()) as f32);
                weights_b.push(ws.abs().sqrt() as f32);
                as_.push(load(*i, &m.a));
                bs.push(load(*i, &m.b));
            }
            let members: Vec<usize> = g.members.iter().map(|(i, _)| *i).collect();
            let a = combine(as_, &weights_a, rule, density, options.majority_sign, |k| {
                Uniform::new(seed, &g.module, members[k], 0)
            });
            let b = combine(bs, &weights_b, rule, density, options.majority_sign, |k| {
                Uniform::new(seed, &g.module, members[k], 1)
            });
            (a, b)
        }
        _ => {
            let t = if rule == Rule::Sum {
                // Σ wᵢsᵢBᵢAᵢ = [w₁s₁B₁ | w₂s₂B₂ | ...] [A₁; A₂; ...]: factor the product exactly.
                let total: usize = g.members.iter().map(|(_, m)| m.rank).sum();
                let mut bcat = nalgebra::DMatrix::<f64>::zeros(out_dim, total);
                let mut acat = nalgebra::DMatrix::<f64>::zeros(total, in_dim);
                let mut col = 0;
                for (i, m) in &g.members {
                    let factor = options.weights[*i] * m.scale;
                    let (ai, bi) = (load(*i, &m.a), load(*i, &m.b));
                    for k in 0..m.rank {
                        for o in 0..out_dim {
                            bcat[(o, col + k)] = bi[o * m.rank + k] as f64 * factor;
                        }
                        for j in 0..in_dim {
                            acat[(col + k, j)] = ai[k * in_dim + j] as f64;
                        }
                    }
                    col += m.rank;
                }
                truncated_svd_of_product(&bcat, &acat, rank)
            } else {
                let mut deltas = Vec::new();
                let mut weights = Vec::new();
                for (i, m) in &g.members {
                    let (ai, bi) = (load(*i, &m.a), load(*i, &m.b));
                    deltas.push(low_rank_product(
                        &bi,
                        &ai,
                        out_dim,
                        m.rank,
                        in_dim,
                        m.scale as f32,
                    ));
                    weights.push(options.weights[*i] as f32);
                }
                let members: Vec<usize> = g.members.iter().map(|(i, _)| *i).collect();
                let delta = combine(
                    deltas,
                    &weights,
                    rule,
                    density,
                    options.majority_sign,
                    |k| Uniform::new(seed, &g.module, members[k], 2),
                );
                truncated_svd(&from_row_major(&delta, out_dim, in_dim), rank, seed)
            };
            let (b_small, a_small) = t.split_us_vt();
            let k = t.s.len();
            // pad to the declared rank when the matrix has fewer singular values
            let mut a = vec![0f32; rank * in_dim];
            a[..k * in_dim].copy_from_slice(&a_small);
            let mut b = vec![0f32; out_dim * rank];
            for o in 0..out_dim {
                b[o * rank..o * rank + k].copy_from_slice(&b_small[o * k..(o + 1) * k]);
            }
            (a, b)
        }
    }
}

/// `scale · B A` as a row-major (out, in) f32 matrix (PEFT's `get_delta_weight` in B·A layout).
fn low_rank_product(
    b: &[f32],
    a: &[f32],
    out_dim: usize,
    rank: usize,
    in_dim: usize,
    scale: f32,
) -> Vec<f32> {
    let mut delta = vec![0f32; out_dim * in_dim];
    delta
        .par_chunks_mut(in_dim.max(1))
        .enumerate()
        .for_each(|(o, row)| {
            for k in 0..rank {
                let c = b[o * rank + k];
                for (x, p) in row.iter_mut().zip(&a[k * in_dim..(k + 1) * in_dim]) {
                    *x += c * p;
                }
            }
            row.iter_mut().for_each(|x| *x *= scale);
        });
    delta
}

/// The first adapter's config with the combined rank, alpha = rank, patterns for modules of
/// another rank, the union of target modules.
fn combined_config(
    adapters: &[Adapter],
    groups: &[ModuleGroup],
    module_ranks: &[usize],
    new_rank: usize,
) -> Result<Value> {
    let mut raw = adapters[0].config.raw.clone();
    raw.insert("r".into(), Value::from(new_rank));
    raw.insert("lora_alpha".into(), Value::from(new_rank));
    raw.insert("use_rslora".into(), Value::Bool(false));
    raw.insert("use_dora".into(), Value::Bool(false));
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    for (g, &rank) in groups.iter().zip(module_ranks) {
        if rank != new_rank {
            let key = regex::escape(&g.module);
            rank_pattern.insert(key.clone(), Value::from(rank));
            alpha_pattern.insert(key, Value::from(rank));
        }
    }
    raw.insert("rank_pattern".into(), Value::Object(rank_pattern));
    raw.insert("alpha_pattern".into(), Value::Object(alpha_pattern));
    let targets: Vec<&Option<TargetModules>> =
        adapters.iter().map(|a| &a.config.target_modules).collect();
    let target_modules = if targets
        .iter()
        .all(|t| matches!(t, Some(TargetModules::Regex(..))))
    {
        let parts: Vec<String> = targets
            .iter()
            .filter_map(|t| match t {
                Some(TargetModules::Regex(p, _)) => Some(format!("({p})")),
                _ => None,
            })
            .collect();
        Value::from(parts.join("|"))
    } else {
        let mut names: Vec<String> = Vec::new();
        for t in &targets {
            match t {
                Some(TargetModules::Names(n)) => names.extend(n.iter().cloned()),
                _ => names.extend(groups.iter().map(|g| g.module.clone())),
            }
        }
        names.sort();
        names.dedup();
        Value::from(names)
    };
    raw.insert("target_modules".into(), target_modules);
    let mut to_save: Vec<String> = adapters
        .iter()
        .flat_map(|a| a.config.modules_to_save.clone())
        .collect();
    to_save.sort();
    to_save.dedup();
    if !to_save.is_empty() {
        raw.insert("modules_to_save".into(), Value::from(to_save));
    }
    Ok(Value::Object(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_follows_the_majority_sign_and_averages_agreeing_entries() {
        let t = vec![vec![1.0, -2.0, 0.5, 0.0], vec![3.0, 1.0, -4.0, 0.0]];
        let out = combine(t, &[1.0, 0.5], Rule::Ties, 1.0, MajoritySign::Total, |_| {
            Uniform(0)
        });
        // element 0: both positive: (1 + 1.5) / 2; element 1: total -1 -> only -2 counts;
        // element 2: total -3.5 -> only -4*0.5; element 3: nothing agrees -> 0
        assert_eq!(out, vec![1.25, -2.0, -2.0, 0.0]);
    }

    #[test]
    fn pruning_keeps_the_requested_fraction() {
        let mut t: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) / 7.0).collect();
        magnitude_prune(&mut t, 0.3);
        assert_eq!(t.iter().filter(|x| **x != 0.0).count(), 30);
        assert!(t.iter().all(|x| *x == 0.0 || x.abs() >= 35.0 / 7.0 - 1e-6));
        let mut d = vec![1.0f32; 10_000];
        random_prune(&mut d, 0.25, Uniform::new(3, "m", 0, 0));
        let kept = d.iter().filter(|x| **x != 0.0).count();
        assert!((2300..2700).contains(&kept), "{kept}");
        assert!(d.iter().all(|x| *x == 0.0 || *x == 4.0));
    }
}

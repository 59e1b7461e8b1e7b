//! The `prepare` pipeline: JSONL files to a folder of packed shards plus `manifest.json`.
//!
//! Three stages run at once, joined by bounded channels so memory never grows with the corpus:
//! a reader thread hands out batches of lines (about `batch_bytes` each); the calling thread
//! parses, templates, tokenizes and masks each batch on every core (rayon, order kept); a packer
//! thread packs units into rows and writes a shard every `rows_per_shard` rows. Peak memory is
//! roughly `4 * batch_bytes` of text + the packing window (`window_tokens` * ~6 bytes, plus up to
//! half a window of units returned from rows left not full) + one shard buffer (`rows_per_shard * seq_len * 16` bytes per lane).
//!
//! A mixture (`mixture` set) reads every source's files through the same stages, but spills the
//! encoded units to disk, draws the mixture's schedule (`mix.rs`) and then replays it into the
//! packer; the shards then carry `task_ids`.
//!
//! Everything is written into a temporary sibling folder that is renamed onto the output only
//! when complete; on an error or cancellation (Ctrl-C) it is removed, so no half-written output
//! is ever left. The result is deterministic for a given input, configuration and seed, whatever
//! the number of threads.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::jsonl::{expand_inputs, parse_record, BadLine, FieldNames, InputFormat, LineBatches};
use super::mask::{Doc, Encoder, LossMode};
use super::mix::{MixConfig, MixReport, Mixing, Spill};
use super::pack::{
    fit_overlong, BfdPacker, GreedyPacker, Overlong, OverlongCounts, Packing, Row, Unit,
};
use super::shard::{lane_prefixes, ShardInfo, ShardWriter, FORMAT_NAME, FORMAT_VERSION};
use super::template::ChatTemplate;
use super::tokenize::Tokenizer;
use crate::error::{Error, Result};

/// Everything `prepare` needs; deserialised from the JSON the Python CLI sends.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrepareConfig {
    /// JSONL files or globs (`.jsonl.gz` decompressed).
    pub inputs: Vec<String>,
    /// Output folder (created; must not exist unless `overwrite`).
    pub output: PathBuf,
    /// Tokenizer folder or `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// auto | text | chat | prompt_completion | preference.
    pub format: String,
    pub text_field: String,
    pub messages_field: String,
    pub prompt_field: String,
    pub completion_field: String,
    pub chosen_field: String,
    pub rejected_field: String,
    pub role_field: String,
    pub content_field: String,
    /// auto | all | assistant | completion.
    pub loss: String,
    pub seq_len: usize,
    /// bfd | greedy | none.
    pub packing: String,
    /// split | truncate | drop.
    pub overlong: String,
    pub seed: u64,
    /// 0: chosen so a shard holds about 64 MB.
    pub rows_per_shard: usize,
    pub window_tokens: usize,
    pub max_carried_rows: usize,
    pub batch_bytes: usize,
    pub skip_bad: bool,
    pub overwrite: bool,
    pub eos_token: Option<String>,
    /// A Jinja file replacing the tokenizer's own chat template.
    pub chat_template: Option<PathBuf>,
    /// Worker threads (0: every core).
    pub threads: usize,
    /// Several sources sampled into one folder (see `mix.rs`); `inputs` must then be empty and
    /// the options above are the defaults of every source.
    pub mixture: Option<MixConfig>,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        let f = FieldNames::default();
        PrepareConfig {
            inputs: Vec::new(),
            output: PathBuf::new(),
            tokenizer: PathBuf::new(),
            format: "auto".into(),
            text_field: f.text,
            messages_field: f.messages,
            prompt_field: f.prompt,
            completion_field: f.completion,
            chosen_field: f.chosen,
            rejected_field: f.rejected,
            role_field: f.role,
            content_field: f.content,
            loss: "auto".into(),
            seq_len: 2048,
            packing: "bfd".into(),
            overlong: "split".into(),
            seed: 0,
            rows_per_shard: 0,
            window_tokens: 4 << 20,
            max_carried_rows: 512,
            batch_bytes: 4 << 20,
            skip_bad: false,
            overwrite: false,
            eos_token: None,
            chat_template: None,
            threads: 0,
            mixture: None,
        }
    }
}

impl PrepareConfig {
    fn fields(&self) -> FieldNames {
        FieldNames {
            text: self.text_field.clone(),
            messages: self.messages_field.clone(),
            prompt: self.prompt_field.clone(),
            completion: self.completion_field.clone(),
            chosen: self.chosen_field.clone(),
            rejected: self.rejected_field.clone(),
            role: self.role_field.clone(),
            content: self.content_field.clone(),
        }
    }
}

/// Live counters, read by the CLI for its progress line while `prepare` runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_read: Arc<AtomicU64>,
    pub total_bytes: AtomicU64,
    pub lines: AtomicU64,
    pub documents: AtomicU64,
    pub tokens: AtomicU64,
    pub rows: AtomicU64,
    pub bad_lines: AtomicU64,
    /// Set to stop: `prepare` returns `Error::Cancelled` and leaves nothing behind.
    pub cancel: AtomicBool,
}

/// Per-input-file statistics.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SourceStats {
    pub path: String,
    pub lines: u64,
    pub documents: u64,
    pub tokens: u64,
    pub trained_tokens: u64,
    pub bad_lines: u64,
    pub empty: u64,
    pub no_trained_tokens: u64,
    pub split: u64,
    pub truncated: u64,
    pub dropped: u64,
}

/// `manifest.json`: what the folder holds and how it was made. The [`Summary`] adds timings.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub format: &'static str,
    pub format_version: u32,
    pub kind: &'static str,
    pub lanes: Vec<&'static str>,
    pub seq_len: usize,
    pub packing: String,
    pub overlong: String,
    pub loss: String,
    pub seed: u64,
    pub pad_id: u32,
    pub tokenizer: TokenizerInfo,
    pub chat_template_sha256: Option<String>,
    pub rows: u64,
    pub documents: u64,
    pub tokens: u64,
    pub trained_tokens: u64,
    pub padding_tokens: u64,
    /// Real tokens / (rows * seq_len * lanes).
    pub packing_efficiency: f64,
    /// ceil(tokens / (seq_len * lanes)): no packing can use fewer rows.
    pub rows_lower_bound: u64,
    pub bad_lines: u64,
    pub empty: u64,
    pub no_trained_tokens: u64,
    pub split: u64,
    pub truncated: u64,
    pub dropped: u64,
    pub tokens_lost: u64,
    /// A mixture's task names, by task index (the values of `task_ids`); absent otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub task_names: Vec<String>,
    /// A mixture's rule and per-task figures; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mixture: Option<MixReport>,
    pub sources: Vec<SourceStats>,
    pub shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenizerInfo {
    pub sha256: String,
    pub vocab_size: usize,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
}

/// The manifest plus how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub manifest: Manifest,
    pub output: PathBuf,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub input_bytes: u64,
    pub fast_encoder: bool,
    pub bad_lines_report: Option<PathBuf>,
}

/// Runs the pipeline (see the module docs).
pub fn prepare(cfg: &PrepareConfig, progress: &Progress) -> Result<Summary> {
    if cfg.threads > 0 {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .build()
            .map_err(|e| Error::InvalidArgument(format!("thread pool: {e}")))?;
        pool.install(|| run(cfg, progress))
    } else {
        run(cfg, progress)
    }
}

/// How the lines of one task (the whole run, or one source of a mixture) are read and encoded.
struct TaskPlan {
    format: InputFormat,
    loss: LossMode,
    fields: FieldNames,
}

/// Parsed options.
struct Plan {
    packing: Packing,
    overlong: Overlong,
    tasks: Vec<TaskPlan>,
    /// The mixing rule, for a mixture.
    mixing: Option<Mixing>,
}

fn plan(cfg: &PrepareConfig) -> Result<Plan> {
    if cfg.seq_len < 2 {
        return Err(Error::InvalidArgument("seq_len must be at least 2".into()));
    }
    let packing: Packing = cfg.packing.parse()?;
    let task = |format: &str, loss: &str, fields: FieldNames| -> Result<TaskPlan> {
        let format: InputFormat = format.parse()?;
        if packing == Packing::Greedy && format == InputFormat::Preference {
            return Err(Error::InvalidArgument(
                "greedy packing would split preference pairs; use bfd or none".into(),
            ));
        }
        Ok(TaskPlan {
            format,
            loss: loss.parse()?,
            fields,
        })
    };
    let (tasks, mixing) = match &cfg.mixture {
        None => {
            if cfg.inputs.is_empty() {
                return Err(Error::InvalidArgument("no input files".into()));
            }
            (vec![task(&cfg.format, &cfg.loss, cfg.fields())?], None)
        }
        Some(mix) => {
            if !cfg.inputs.is_empty() {
                return Err(Error::InvalidArgument(
                    "inputs: give the files in the mixture's sources, not both".into(),
                ));
            }
            let mixing = mix.validate()?;
            let tasks = mix
                .sources
                .iter()
                .map(|s| {
                    let pick =
                        |own: &Option<String>, run: &String| own.clone().unwrap_or(run.clone());
                    let fields = FieldNames {
                        text: pick(&s.text_field, &cfg.text_field),
                        messages: pick(&s.messages_field, &cfg.messages_field),
                        prompt: pick(&s.prompt_field, &cfg.prompt_field),
                        completion: pick(&s.completion_field, &cfg.completion_field),
                        chosen: pick(&s.chosen_field, &cfg.chosen_field),
                        rejected: pick(&s.rejected_field, &cfg.rejected_field),
                        role: pick(&s.role_field, &cfg.role_field),
                        content: pick(&s.content_field, &cfg.content_field),
                    };
                    let format = pick(&s.format, &cfg.format);
                    let loss = pick(&s.loss, &cfg.loss);
                    task(&format, &loss, fields).map_err(|e| match e {
                        Error::InvalidArgument(m) => {
                            Error::InvalidArgument(format!("mixture source {:?}: {m}", s.name))
                        }
                        other => other,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (tasks, Some(mixing))
        }
    };
    Ok(Plan {
        packing,
        overlong: cfg.overlong.parse()?,
        tasks,
        mixing,
    })
}

/// The input files in reading order, with the task each belongs to (a mixture's files are
/// grouped by source, so each task's examples are one contiguous run of the stream).
fn input_files(cfg: &PrepareConfig) -> Result<(Vec<PathBuf>, Vec<usize>)> {
    let Some(mix) = &cfg.mixture else {
        let files = expand_inputs(&cfg.inputs)?;
        let tasks = vec![0; files.len()];
        return Ok((files, tasks));
    };
    let (mut files, mut tasks) = (Vec::new(), Vec::new());
    for (t, source) in mix.sources.iter().enumerate() {
        let found = expand_inputs(&source.inputs).map_err(|e| match e {
            Error::InvalidArgument(m) => {
                Error::InvalidArgument(format!("mixture source {:?}: {m}", source.name))
            }
            other => other,
        })?;
        tasks.extend(std::iter::repeat_n(t, found.len()));
        files.extend(found);
    }
    Ok((files, tasks))
}

/// Removes the temporary output folder unless it was renamed into place.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

/// Where encoded units go: to the packer (fitted to `seq_len`, tagged with their file), or (a
/// mixture) to the spill writer for sampling (as read, tagged with their task).
enum Sink {
    Pack(std::sync::mpsc::SyncSender<Vec<Unit>>),
    Spill(std::sync::mpsc::SyncSender<Vec<Unit>>),
}

/// What the reading stage found.
struct Encoded {
    stats: Vec<SourceStats>,
    lanes: Option<usize>,
    overlong: OverlongCounts,
}

/// Everything the reading stage needs besides the sink.
struct Reader<'a> {
    cfg: &'a PrepareConfig,
    plan: &'a Plan,
    files: &'a [PathBuf],
    file_task: &'a [usize],
    encoders: &'a [Encoder<'a>],
    temp: &'a Path,
    progress: &'a Progress,
}

impl Reader<'_> {
    /// Reads every file (reader thread), encodes each batch on every core (order kept), and hands
    /// the units of the accepted records to `sink`.
    fn run(&self, sink: Sink) -> Result<Encoded> {
        let (cfg, plan, files, progress) = (self.cfg, self.plan, self.files, self.progress);
        let mut stats: Vec<SourceStats> = files
            .iter()
            .map(|p| SourceStats {
                path: p.display().to_string(),
                ..Default::default()
            })
            .collect();
        let report_path = self.temp.join("bad_lines.jsonl");
        let mut report = if cfg.skip_bad {
            Some(std::io::BufWriter::new(
                fs::File::create(&report_path).map_err(|e| Error::io(&report_path, e))?,
            ))
        } else {
            None
        };
        let mut lanes: Option<usize> = None;
        let mut overlong = OverlongCounts::default();
        let (line_tx, line_rx) = sync_channel::<Result<Vec<super::jsonl::Line>>>(2);
        std::thread::scope(|scope| -> Result<()> {
            let files_for_reader = files.to_vec();
            let bytes_read = progress.bytes_read.clone();
            let batch_bytes = cfg.batch_bytes.max(1);
            scope.spawn(move || {
                let mut reader = LineBatches::new(files_for_reader, batch_bytes, bytes_read);
                loop {
                    let next = reader.next_batch().transpose();
                    let Some(batch) = next else { break };
                    let failed = batch.is_err();
                    if line_tx.send(batch).is_err() || failed {
                        break;
                    }
                }
            });
            let outcome = (|| -> Result<()> {
                for batch in line_rx.iter() {
                    if progress.cancel.load(Ordering::Relaxed) {
                        return Err(Error::Cancelled);
                    }
                    let batch = batch?;
                    let encoded: Vec<std::result::Result<Vec<Doc>, BadLine>> = batch
                        .par_iter()
                        .map(|line| {
                            let task = self.file_task[line.source];
                            let tp = &plan.tasks[task];
                            let text = line.text.as_ref().map_err(Clone::clone)?;
                            let record = parse_record(text, tp.format, &tp.fields)?;
                            self.encoders[task].encode(&record)
                        })
                        .collect();
                    let mut units = Vec::with_capacity(batch.len());
                    for (line, result) in batch.iter().zip(encoded) {
                        let src = &mut stats[line.source];
                        src.lines += 1;
                        progress.lines.fetch_add(1, Ordering::Relaxed);
                        let docs = match result.and_then(|docs| check_lanes(docs, &mut lanes)) {
                            Ok(docs) => docs,
                            Err(bad) => {
                                let path = &files[line.source];
                                let Some(report) = report.as_mut() else {
                                    return Err(Error::format(
                                        path,
                                        format!("line {}, field {}", line.number, bad.field),
                                        bad.message,
                                    ));
                                };
                                src.bad_lines += 1;
                                progress.bad_lines.fetch_add(1, Ordering::Relaxed);
                                let entry = serde_json::json!({"file": path.display().to_string(),
                                    "line": line.number, "field": bad.field, "error": bad.message});
                                writeln!(report, "{entry}")
                                    .map_err(|e| Error::io(&report_path, e))?;
                                continue;
                            }
                        };
                        if docs.iter().any(|d| d.len() < 2) {
                            src.empty += 1;
                            continue;
                        }
                        let trained: u64 = docs.iter().map(|d| d.trained_targets() as u64).sum();
                        if trained == 0 {
                            src.no_trained_tokens += 1;
                            continue;
                        }
                        let tokens: u64 = docs.iter().map(|d| d.len() as u64).sum();
                        src.documents += 1;
                        src.tokens += tokens;
                        src.trained_tokens += trained;
                        progress.documents.fetch_add(1, Ordering::Relaxed);
                        progress.tokens.fetch_add(tokens, Ordering::Relaxed);
                        match &sink {
                            Sink::Spill(_) => units.push(Unit {
                                lanes: docs,
                                source: self.file_task[line.source] as u32,
                            }),
                            Sink::Pack(_) => {
                                let unit = Unit {
                                    lanes: docs,
                                    source: line.source as u32,
                                };
                                if plan.packing == Packing::Greedy {
                                    units.push(unit);
                                } else {
                                    let before = overlong;
                                    units.extend(fit_overlong(
                                        unit,
                                        cfg.seq_len,
                                        plan.overlong,
                                        &mut overlong,
                                    ));
                                    src.split += overlong.split - before.split;
                                    src.truncated += overlong.truncated - before.truncated;
                                    src.dropped += overlong.dropped - before.dropped;
                                }
                            }
                        }
                    }
                    let (Sink::Pack(tx) | Sink::Spill(tx)) = &sink;
                    if tx.send(units).is_err() {
                        break; // the packer or spill writer failed; the caller reports its error
                    }
                }
                Ok(())
            })();
            drop(line_rx);
            outcome
        })?;
        if let Some(mut r) = report.take() {
            r.flush().map_err(|e| Error::io(&report_path, e))?;
        }
        Ok(Encoded {
            stats,
            lanes,
            overlong,
        })
    }
}

fn run(cfg: &PrepareConfig, progress: &Progress) -> Result<Summary> {
    let started = Instant::now();
    let plan = plan(cfg)?;
    let (files, file_task) = input_files(cfg)?;
    let mut total_bytes = 0;
    for f in &files {
        total_bytes += fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
    }
    progress.total_bytes.store(total_bytes, Ordering::Relaxed);

    let mut tokenizer = Tokenizer::from_file(&cfg.tokenizer)?;
    if let Some(eos) = &cfg.eos_token {
        tokenizer.set_eos(eos)?;
    }
    let template = load_template(cfg, &tokenizer)?;
    let special = tokenizer.special_tokens().clone();
    let pad_id = special
        .pad
        .as_ref()
        .or(special.eos.as_ref())
        .map_or(0, |p| p.1);

    let output = cfg.output.clone();
    if output.exists() && !cfg.overwrite {
        return Err(Error::InvalidArgument(format!(
            "{} exists (pass overwrite to replace it)",
            output.display()
        )));
    }
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = output
        .file_name()
        .ok_or_else(|| {
            Error::InvalidArgument(format!("{} is not a folder name", output.display()))
        })?
        .to_string_lossy()
        .into_owned();
    let temp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&temp);
    fs::create_dir(&temp).map_err(|e| Error::io(&temp, e))?;
    let mut guard = TempDir(Some(temp.clone()));

    let encoders: Vec<Encoder> = plan
        .tasks
        .iter()
        .map(|t| Encoder {
            tokenizer: &tokenizer,
            template: template.as_ref(),
            loss: t.loss,
        })
        .collect();
    let reader = Reader {
        cfg,
        plan: &plan,
        files: &files,
        file_task: &file_task,
        encoders: &encoders,
        temp: &temp,
        progress,
    };
    let rows_per_shard = if cfg.rows_per_shard > 0 {
        cfg.rows_per_shard
    } else {
        ((64usize << 20) / (cfg.seq_len * 16)).max(1)
    };
    let mixture = cfg.mixture.as_ref().zip(plan.mixing);
    let pack = |units: std::sync::mpsc::Receiver<Vec<Unit>>| {
        pack_and_write(
            units,
            &temp,
            cfg,
            plan.packing,
            pad_id,
            rows_per_shard,
            mixture.is_some(),
            progress,
        )
    };

    let (encoded, shards, overlong, mix_report) = match mixture {
        None => {
            let (unit_tx, unit_rx) = sync_channel::<Vec<Unit>>(2);
            std::thread::scope(|scope| -> Result<_> {
                let packer = scope.spawn(move || pack(unit_rx));
                let encoded = reader.run(Sink::Pack(unit_tx));
                let shards = packer.join().expect("packer thread panicked")?;
                let encoded = encoded?;
                let overlong = encoded.overlong;
                Ok((encoded, shards, overlong, None))
            })?
        }
        Some((mix, mixing)) => {
            let mut spill = Spill::create(&temp.join("spill"))?;
            let (unit_tx, unit_rx) = sync_channel::<Vec<Unit>>(2);
            let encoded = std::thread::scope(|scope| -> Result<_> {
                let spill = &mut spill;
                let writer = scope.spawn(move || -> Result<()> {
                    for unit in unit_rx.iter().flatten() {
                        spill.push(&unit)?;
                    }
                    Ok(())
                });
                let encoded = reader.run(Sink::Spill(unit_tx));
                writer.join().expect("spill writer panicked")?;
                encoded
            })?;
            spill.finish()?;
            let (unit_tx, unit_rx) = sync_channel::<Vec<Unit>>(2);
            std::thread::scope(|scope| -> Result<_> {
                let packer = scope.spawn(move || pack(unit_rx));
                let replayed = super::mix::replay(
                    mix,
                    mixing,
                    &spill,
                    &encoded.stats,
                    &file_task,
                    cfg,
                    plan.packing,
                    plan.overlong,
                    unit_tx,
                    progress,
                );
                let shards = packer.join().expect("packer thread panicked")?;
                let (report, overlong) = replayed?;
                Ok((encoded, shards, overlong, Some(report)))
            })?
        }
    };
    let _ = fs::remove_dir_all(temp.join("spill"));

    if progress.cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    let stats = encoded.stats;
    let lanes = encoded.lanes.unwrap_or(1);
    let rows: u64 = shards.iter().map(|s| s.rows).sum();
    let tokens: u64 = shards.iter().map(|s| s.tokens).sum();
    let slots = rows * (cfg.seq_len * lanes) as u64;
    let sum = |f: fn(&SourceStats) -> u64| stats.iter().map(f).sum::<u64>();
    let manifest = Manifest {
        format: FORMAT_NAME,
        format_version: FORMAT_VERSION,
        kind: if lanes == 2 { "preference" } else { "sft" },
        lanes: lane_prefixes(lanes).to_vec(),
        seq_len: cfg.seq_len,
        packing: cfg.packing.clone(),
        overlong: cfg.overlong.clone(),
        loss: cfg.loss.clone(),
        seed: cfg.seed,
        pad_id,
        tokenizer: TokenizerInfo {
            sha256: tokenizer.sha256().to_string(),
            vocab_size: tokenizer.vocab_size(),
            bos_id: special.bos.as_ref().map(|t| t.1),
            eos_id: special.eos.as_ref().map(|t| t.1),
            pad_id: special.pad.as_ref().map(|t| t.1),
        },
        chat_template_sha256: template
            .as_ref()
            .map(|t| super::sha256_hex(t.source().as_bytes())),
        rows,
        documents: shards.iter().map(|s| s.documents).sum(),
        tokens,
        trained_tokens: shards.iter().map(|s| s.trained_tokens).sum(),
        padding_tokens: slots - tokens,
        packing_efficiency: if slots > 0 {
            tokens as f64 / slots as f64
        } else {
            0.0
        },
        rows_lower_bound: tokens.div_ceil((cfg.seq_len * lanes) as u64),
        bad_lines: sum(|s| s.bad_lines),
        empty: sum(|s| s.empty),
        no_trained_tokens: sum(|s| s.no_trained_tokens),
        split: overlong.split,
        truncated: overlong.truncated,
        dropped: overlong.dropped,
        tokens_lost: overlong.tokens_lost,
        task_names: mix_report
            .as_ref()
            .map(|r: &MixReport| r.tasks.iter().map(|t| t.name.clone()).collect())
            .unwrap_or_default(),
        mixture: mix_report,
        sources: stats,
        shards,
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    crate::io::atomic::write_atomic(temp.join("manifest.json"), &json)?;

    // Swap the finished folder into place.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let replaced = output.exists();
    if replaced {
        fs::rename(&output, &old).map_err(|e| Error::io(&output, e))?;
    }
    fs::rename(&temp, &output).map_err(|e| Error::io(&output, e))?;
    guard.0 = None;
    if replaced {
        let _ = fs::remove_dir_all(&old);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Summary {
        output: output.clone(),
        seconds,
        tokens_per_second: manifest.tokens as f64 / seconds.max(1e-9),
        input_bytes: total_bytes,
        fast_encoder: tokenizer.uses_fast_encoder(),
        bad_lines_report: cfg.skip_bad.then(|| output.join("bad_lines.jsonl")),
        manifest,
    })
}

/// Every record of a run has the same number of sequences (1, or 2 for preference pairs).
fn check_lanes(
    docs: Vec<Doc>,
    lanes: &mut Option<usize>,
) -> std::result::Result<Vec<Doc>, BadLine> {
    match *lanes {
        None => {
            *lanes = Some(docs.len());
            Ok(docs)
        }
        Some(n) if n == docs.len() => Ok(docs),
        Some(_) => Err(BadLine::new(
            "(line)",
            "mixes preference pairs with single sequences in one dataset",
        )),
    }
}

/// The packer thread: units in, shards out (`task_ids`: write each unit's source as its task).
#[allow(clippy::too_many_arguments)]
fn pack_and_write(
    units: std::sync::mpsc::Receiver<Vec<Unit>>,
    dir: &Path,
    cfg: &PrepareConfig,
    packing: Packing,
    pad_id: u32,
    rows_per_shard: usize,
    task_ids: bool,
    progress: &Progress,
) -> Result<Vec<ShardInfo>> {
    let mut bfd = BfdPacker::new(
        cfg.seq_len,
        cfg.window_tokens,
        cfg.max_carried_rows,
        cfg.seed,
    );
    let mut greedy = GreedyPacker::new(cfg.seq_len);
    let mut writer: Option<ShardWriter> = None;
    let write = |rows: Vec<Row>, writer: &mut Option<ShardWriter>| -> Result<()> {
        for row in rows {
            let w = writer.get_or_insert_with(|| {
                let lanes = row.units[0].lanes.len();
                let w = ShardWriter::new(dir, cfg.seq_len, lanes, pad_id, rows_per_shard);
                if task_ids {
                    w.with_task_ids()
                } else {
                    w
                }
            });
            w.push(&row)?;
            progress.rows.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    };
    for batch in units.iter() {
        for unit in batch {
            let rows = match packing {
                Packing::Bfd => bfd.push(unit),
                Packing::Greedy => greedy.push(unit),
                Packing::None => vec![Row { units: vec![unit] }],
            };
            write(rows, &mut writer)?;
        }
        if progress.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
    }
    let rows = match packing {
        Packing::Bfd => bfd.finish(),
        Packing::Greedy => greedy.finish(),
        Packing::None => Vec::new(),
    };
    write(rows, &mut writer)?;
    Ok(match writer {
        Some(mut w) => {
            w.flush()?;
            w.shards
        }
        None => Vec::new(),
    })
}

fn load_template(cfg: &PrepareConfig, tokenizer: &Tokenizer) -> Result<Option<ChatTemplate>> {
    let special = tokenizer.special_tokens();
    let mut names = Vec::new();
    for (name, token) in [
        ("bos_token", &special.bos),
        ("eos_token", &special.eos),
        ("pad_token", &special.pad),
        ("unk_token", &special.unk),
    ] {
        if let Some((text, _)) = token {
            names.push((name.to_string(), text.clone()));
        }
    }
    if let Some(path) = &cfg.chat_template {
        let source = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        return ChatTemplate::new(&source, names)
            .map(Some)
            .map_err(|e| match e {
                Error::Format { place, message, .. } => Error::format(path, place, message),
                other => other,
            });
    }
    let dir = tokenizer.path().parent().unwrap_or(Path::new("."));
    ChatTemplate::from_tokenizer_dir(dir, tokenizer.config(), names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenize::tests::tiny_tokenizer_dir;
    use crate::io::SafeTensors;

    fn config(dir: &Path, tok: &Path, lines: &str) -> PrepareConfig {
        let input = dir.join("in.jsonl");
        fs::write(&input, lines).unwrap();
        PrepareConfig {
            inputs: vec![input.display().to_string()],
            output: dir.join("out"),
            tokenizer: tok.to_path_buf(),
            seq_len: 16,
            rows_per_shard: 2,
            ..Default::default()
        }
    }

    #[test]
    fn raw_text_end_to_end_is_deterministic() {
        let tok = tiny_tokenizer_dir();
        let dir = tempfile::tempdir().unwrap();
        let lines: String = (0..20)
            .map(|i| format!("{{\"text\": \"{}\"}}\n", "the cat in ".repeat(i % 7 + 1)))
            .collect();
        let cfg = config(dir.path(), tok.path(), &lines);
        let a = prepare(&cfg, &Progress::default()).unwrap();
        // split keeps every token: the rows hold exactly what the sources produced
        assert_eq!(a.manifest.tokens, a.manifest.sources[0].tokens);
        assert!(a.manifest.split > 0 && a.manifest.documents > 20);
        let first: Vec<Vec<u8>> = a
            .manifest
            .shards
            .iter()
            .map(|s| fs::read(cfg.output.join(&s.file)).unwrap())
            .collect();
        let cfg2 = PrepareConfig {
            overwrite: true,
            threads: 1,
            ..cfg.clone()
        };
        let b = prepare(&cfg2, &Progress::default()).unwrap();
        let second: Vec<Vec<u8>> = b
            .manifest
            .shards
            .iter()
            .map(|s| fs::read(cfg.output.join(&s.file)).unwrap())
            .collect();
        assert_eq!(first, second);
        let st = SafeTensors::open(cfg.output.join("shard-00000.safetensors")).unwrap();
        assert_eq!(st.info("input_ids").unwrap().shape, vec![2, 16]);
        // nothing but the output folder is left behind
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn bad_lines_name_file_line_field_and_leave_nothing() {
        let tok = tiny_tokenizer_dir();
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            tok.path(),
            "{\"text\": \"the\"}\n{\"text\": 5}\n",
        );
        let err = prepare(&cfg, &Progress::default()).unwrap_err().to_string();
        assert!(
            err.contains("in.jsonl: line 2, field text: must be a string"),
            "{err}"
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let skip = PrepareConfig {
            skip_bad: true,
            ..cfg
        };
        let s = prepare(&skip, &Progress::default()).unwrap();
        assert_eq!(s.manifest.bad_lines, 1);
        let report = fs::read_to_string(skip.output.join("bad_lines.jsonl")).unwrap();
        assert!(report.contains("\"line\":2"), "{report}");
    }

    #[test]
    fn cancellation_leaves_nothing() {
        let tok = tiny_tokenizer_dir();
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), tok.path(), "{\"text\": \"the\"}\n");
        let progress = Progress::default();
        progress.cancel.store(true, Ordering::Relaxed);
        assert!(matches!(prepare(&cfg, &progress), Err(Error::Cancelled)));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn mixture_tags_every_token_with_its_source_and_is_deterministic() {
        use crate::data::mix::{MixConfig, MixSource};
        let tok = tiny_tokenizer_dir();
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, word: &str, n: usize| {
            let path = dir.path().join(name);
            let lines: String = (0..n)
                .map(|i| format!("{{\"text\": \"{}\"}}\n", vec![word; i % 5 + 1].join(" ")))
                .collect();
            fs::write(&path, lines).unwrap();
            path.display().to_string()
        };
        let source = |name: &str, file: String, epochs: f64| MixSource {
            name: name.into(),
            inputs: vec![file],
            epochs,
            ..Default::default()
        };
        let cfg = PrepareConfig {
            output: dir.path().join("out"),
            tokenizer: tok.path().to_path_buf(),
            seq_len: 16,
            rows_per_shard: 8,
            mixture: Some(MixConfig {
                sources: vec![
                    source("the", write("a.jsonl", "the", 40), 0.5),
                    source("dog", write("b.jsonl", "dog", 10), 2.5),
                ],
                mixing: "proportional".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let a = prepare(&cfg, &Progress::default()).unwrap();
        let mix = a.manifest.mixture.as_ref().unwrap();
        assert_eq!(a.manifest.task_names, ["the", "dog"]);
        let taken: Vec<u64> = mix.tasks.iter().map(|t| t.examples_taken).collect();
        assert_eq!(taken, [20, 25]); // epochs: half of 40, 2.5 x 10
        assert_eq!(mix.tasks[1].examples_repeated, 15);
        let t = Tokenizer::from_file(tok.path()).unwrap();
        // the two sources share no token but the specials (ids 0..5)
        let the = t.encode("the the", false).unwrap();
        let dog = t.encode("dog dog", false).unwrap();
        assert!(the.iter().all(|id| !dog.contains(id)));
        let mut seen = [0u64; 2];
        for shard in &a.manifest.shards {
            let st = SafeTensors::open(cfg.output.join(&shard.file)).unwrap();
            let read = |name: &str| -> Vec<i32> {
                st.bytes(name)
                    .unwrap()
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            };
            let (ids, docs, tasks) = (read("input_ids"), read("document_ids"), read("task_ids"));
            for ((&id, &doc), &task) in ids.iter().zip(&docs).zip(&tasks) {
                assert_eq!(doc < 0, task < 0, "padding and only padding has task -1");
                if task >= 0 && id >= 5 {
                    let (own, other) = if task == 0 {
                        (&the, &dog)
                    } else {
                        (&dog, &the)
                    };
                    assert!(!other.contains(&(id as u32)), "token {id} of task {task}");
                    seen[task as usize] += u64::from(own.contains(&(id as u32)));
                }
            }
        }
        assert!(seen[0] > 0 && seen[1] > 0);
        assert_eq!(
            mix.tasks.iter().map(|t| t.tokens).sum::<u64>(),
            a.manifest.tokens
        );
        assert_eq!(
            mix.tasks.iter().map(|t| t.split).sum::<u64>(),
            a.manifest.split
        );
        // same bytes with one thread; the spill is gone
        let again = PrepareConfig {
            overwrite: true,
            threads: 1,
            ..cfg.clone()
        };
        let b = prepare(&again, &Progress::default()).unwrap();
        assert_eq!(a.manifest.shards, b.manifest.shards);
        assert!(!cfg.output.join("spill").exists());
        // an empty source is named
        fs::write(dir.path().join("b.jsonl"), "").unwrap();
        let err = prepare(&again, &Progress::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("mixture source \"dog\""), "{err}");
    }
}

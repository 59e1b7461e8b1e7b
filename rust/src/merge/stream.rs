//! Streams a checkpoint into a new Hugging Face model folder tensor by tensor, so the peak memory
//! is a few tensors whatever the model size:
//!
//! - every input tensor is planned first (copied, dropped, or rewritten into new tensors), so bad
//!   input fails before a byte is written;
//! - the output is sharded like the input (same shard files, same tensor order, same index);
//! - a producer computes rewritten tensors (rayon inside) while a writer thread appends them to
//!   the shard, so compute and I/O overlap; at most `QUEUE` computed tensors wait in between;
//! - input pages are released (`MADV_DONTNEED`) once a tensor is done, so the mapped model does
//!   not accumulate in the resident set;
//! - every file appears atomically (`SafetensorsWriter`, `AtomicFile`); side files (config,
//!   tokenizer, chat template) are copied beside the shards.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::io::{AtomicFile, Checkpoint, SafeTensors, SafetensorsWriter, TensorInfo, TensorSpec};

/// Computed tensors allowed to wait for the writer.
const QUEUE: usize = 2;
/// Writeback of the output is started every this many bytes, overlapping disk and compute.
const WRITEBACK_EVERY: u64 = 64 << 20;

/// What becomes of one input tensor.
pub enum Plan {
    /// Written unchanged.
    Copy,
    /// Left out of the output.
    Drop,
    /// Replaced by these tensors (often one of the same name, dtype and shape).
    Rewrite(Vec<TensorSpec>),
}

/// A per-tensor transformation of a checkpoint.
pub trait TensorRewrite: Sync {
    /// Decides the fate of `info` (called for every tensor before anything is written).
    fn plan(&self, info: &TensorInfo) -> Result<Plan>;
    /// The bytes of the tensors planned for `info`, in plan order. `source` is the input
    /// checkpoint (for tensors computed from several inputs).
    fn compute(&self, source: &Checkpoint, info: &TensorInfo) -> Result<Vec<Vec<u8>>>;
}

/// Totals of one streamed checkpoint.
#[derive(Debug, Clone, Default)]
pub struct StreamSummary {
    pub tensors_rewritten: usize,
    pub tensors_copied: usize,
    pub tensors_dropped: usize,
    pub bytes_written: u64,
    pub shards: usize,
    pub seconds: f64,
}

enum Item<'a> {
    Computed(Vec<Vec<u8>>, Vec<String>),
    Copied(&'a SafeTensors, &'a TensorInfo),
}

/// Streams `source` (opened from `source_dir`) into `out_dir` through `rewrite`: shards named as
/// the input's, an index when the input had one (or had several files). With `progress`, a line
/// per second on stderr.
pub fn rewrite_checkpoint(
    source: &Checkpoint,
    source_dir: &Path,
    out_dir: &Path,
    rewrite: &dyn TensorRewrite,
    progress: bool,
) -> Result<StreamSummary> {
    let start = Instant::now();
    // Plan everything first.
    let mut plans: Vec<Vec<(&TensorInfo, Plan)>> = Vec::new();
    for file in source.files() {
        let mut file_plans = Vec::new();
        for info in file.tensors() {
            file_plans.push((info, rewrite.plan(info)?));
        }
        plans.push(file_plans);
    }
    let total_bytes: u64 = plans
        .iter()
        .flatten()
        .map(|(info, plan)| match plan {
            Plan::Copy => (info.end - info.begin) as u64,
            Plan::Drop => 0,
            Plan::Rewrite(specs) => specs.iter().map(|s| s.nbytes() as u64).sum(),
        })
        .sum();
    let mut summary = StreamSummary::default();
    let mut weight_map: BTreeMap<String, String> = BTreeMap::new();
    let mut reporter = Progress::new(progress, total_bytes);
    for (file, file_plans) in source.files().iter().zip(&plans) {
        let shard_name = file
            .path()
            .file_name()
            .expect("a safetensors file has a name")
            .to_string_lossy()
            .into_owned();
        let mut specs = Vec::new();
        for (info, plan) in file_plans {
            match plan {
                Plan::Copy => {
                    specs.push(TensorSpec::new(&info.name, info.dtype, info.shape.clone()))
                }
                Plan::Drop => {}
                Plan::Rewrite(new) => specs.extend(new.iter().cloned()),
            }
        }
        for spec in &specs {
            weight_map.insert(spec.name.clone(), shard_name.clone());
        }
        let mut writer =
            SafetensorsWriter::create(out_dir.join(&shard_name), specs, file.metadata())?;
        std::thread::scope(|scope| -> Result<()> {
            let (send, receive) = sync_channel::<Item>(QUEUE);
            let writer_thread = scope.spawn(move || -> Result<(u64, SafetensorsWriter)> {
                let mut written = 0u64;
                let mut since_writeback = 0u64;
                for item in receive {
                    let before = written;
                    match item {
                        Item::Computed(tensors, names) => {
                            for (name, bytes) in names.iter().zip(&tensors) {
                                writer.write(name, bytes)?;
                                written += bytes.len() as u64;
                            }
                        }
                        Item::Copied(file, info) => {
                            populate(file, info);
                            writer.write(&info.name, file.slice(info))?;
                            written += (info.end - info.begin) as u64;
                            release(file, info);
                        }
                    }
                    since_writeback += written - before;
                    if since_writeback >= WRITEBACK_EVERY {
                        writer.start_writeback()?;
                        since_writeback = 0;
                    }
                }
                Ok((written, writer))
            });
            let mut producer_result = Ok(());
            for (info, plan) in file_plans {
                let item = match plan {
                    Plan::Drop => {
                        summary.tensors_dropped += 1;
                        continue;
                    }
                    Plan::Copy => {
                        summary.tensors_copied += 1;
                        reporter.advance((info.end - info.begin) as u64);
                        Item::Copied(file, info)
                    }
                    Plan::Rewrite(new) => {
                        populate(file, info);
                        let tensors = match rewrite.compute(source, info) {
                            Ok(t) => t,
                            Err(e) => {
                                producer_result = Err(e);
                                break;
                            }
                        };
                        release(file, info);
                        if let Some((spec, bytes)) = new
                            .iter()
                            .zip(&tensors)
                            .find(|(s, b)| s.nbytes() != b.len())
                        {
                            producer_result = Err(Error::InvalidArgument(format!(
                                "tensor {:?}: computed {} bytes, planned {}",
                                spec.name,
                                bytes.len(),
                                spec.nbytes()
                            )));
                            break;
                        }
                        summary.tensors_rewritten += 1;
                        reporter.advance(tensors.iter().map(|t| t.len() as u64).sum());
                        let names = new.iter().map(|s| s.name.clone()).collect();
                        Item::Computed(tensors, names)
                    }
                };
                if send.send(item).is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            drop(send);
            let (written, writer) = writer_thread.join().expect("writer thread panicked")?;
            producer_result?;
            summary.bytes_written += written;
            writer.finish()
        })?;
        summary.shards += 1;
    }
    let had_index = source_dir.join("model.safetensors.index.json").exists();
    if had_index || source.files().len() > 1 {
        write_index(out_dir, &weight_map, total_bytes)?;
    }
    summary.seconds = start.elapsed().as_secs_f64();
    reporter.finish(&summary);
    Ok(summary)
}

/// Maps the pages of `info` in one call (instead of one fault per page as they are read).
fn populate(file: &SafeTensors, info: &TensorInfo) {
    let len = info.end - info.begin;
    if len > 0 {
        let _ = file.mmap().advise_range(
            memmap2::Advice::PopulateRead,
            file.data_start() + info.begin,
            len,
        );
    }
}

/// Drops the mapped pages of `info` from this process (they stay in the page cache).
fn release(file: &SafeTensors, info: &TensorInfo) {
    let len = info.end - info.begin;
    if len == 0 {
        return;
    }
    // SAFETY: the map is private and read-only for this process; dropping its pages only makes
    // a later read fault them in again from the file. Nothing here holds a view of them after
    // this point (the tensor was written or computed already).
    let _ = unsafe {
        file.mmap().unchecked_advise_range(
            memmap2::UncheckedAdvice::DontNeed,
            file.data_start() + info.begin,
            len,
        )
    };
}

/// Writes `model.safetensors.index.json` (`metadata.total_size`, sorted `weight_map`).
pub fn write_index(
    out_dir: &Path,
    weight_map: &BTreeMap<String, String>,
    total_size: u64,
) -> Result<()> {
    let index = serde_json::json!({
        "metadata": {"total_size": total_size},
        "weight_map": weight_map,
    });
    let text = serde_json::to_string_pretty(&index).expect("index serializes");
    crate::io::atomic::write_atomic(
        out_dir.join("model.safetensors.index.json"),
        text.as_bytes(),
    )
}

/// Weight files never copied beside a rewritten model: ours are written fresh, pickled or other
/// frameworks' weights would be stale.
fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".safetensors.index.json")
        || [
            ".bin",
            ".pt",
            ".pth",
            ".ckpt",
            ".h5",
            ".msgpack",
            ".gguf",
            ".bin.index.json",
        ]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Copies the model folder's other files (config.json, generation_config.json, tokenizer files,
/// chat template, ...) into `out_dir`, atomically each. Files in `override_dir` (an adapter folder
/// that saved its own tokenizer) replace the base's, adapter-only files excepted. Returns the
/// names copied.
pub fn copy_side_files(
    source_dir: &Path,
    override_dir: Option<&Path>,
    out_dir: &Path,
) -> Result<Vec<String>> {
    let mut chosen: BTreeMap<String, PathBuf> = BTreeMap::new();
    let list = |dir: &Path| -> Result<Vec<(String, PathBuf)>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let kind = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
            if kind.is_file() && !name.starts_with('.') && !is_weight_file(&name) {
                found.push((name, entry.path()));
            }
        }
        Ok(found)
    };
    for (name, path) in list(source_dir)? {
        chosen.insert(name, path);
    }
    if let Some(dir) = override_dir {
        for (name, path) in list(dir)? {
            let tokenizer_file = name.starts_with("tokenizer")
                || name.starts_with("special_tokens_map")
                || name.starts_with("added_tokens")
                || name.starts_with("chat_template")
                || name == "vocab.json"
                || name == "merges.txt";
            if tokenizer_file {
                chosen.insert(name, path);
            }
        }
    }
    for (name, path) in &chosen {
        let mut input = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut output = AtomicFile::create(out_dir.join(name))?;
        std::io::copy(&mut input, &mut output).map_err(|e| Error::io(path, e))?;
        output
            .flush()
            .map_err(|e| Error::io(out_dir.join(name), e))?;
        output.commit()?;
    }
    Ok(chosen.into_keys().collect())
}

/// Prepares an output folder: created if missing; an existing one must be empty unless
/// `overwrite`. Refuses to write into the input folder.
pub fn prepare_out_dir(out_dir: &Path, inputs: &[&Path], overwrite: bool) -> Result<()> {
    if out_dir.exists() {
        let canonical = out_dir.canonicalize().map_err(|e| Error::io(out_dir, e))?;
        for input in inputs {
            let input_dir = if input.is_dir() {
                *input
            } else {
                input.parent().unwrap_or(input)
            };
            if input_dir.canonicalize().ok().as_deref() == Some(&canonical) {
                return Err(Error::InvalidArgument(format!(
                    "output folder {} is an input folder",
                    out_dir.display()
                )));
            }
        }
        let not_empty = std::fs::read_dir(out_dir)
            .map_err(|e| Error::io(out_dir, e))?
            .next()
            .is_some();
        if not_empty && !overwrite {
            return Err(Error::InvalidArgument(format!(
                "output folder {} exists and is not empty (pass overwrite to replace its files)",
                out_dir.display()
            )));
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))
}

/// Progress lines on stderr, at most one a second: bytes done, rate, ETA.
struct Progress {
    enabled: bool,
    total: u64,
    done: u64,
    start: Instant,
    last: Instant,
}

impl Progress {
    fn new(enabled: bool, total: u64) -> Self {
        let now = Instant::now();
        Progress {
            enabled,
            total,
            done: 0,
            start: now,
            last: now,
        }
    }

    fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if self.enabled && self.last.elapsed().as_secs_f64() >= 1.0 {
            self.last = Instant::now();
            let secs = self.start.elapsed().as_secs_f64();
            let rate = self.done as f64 / secs.max(1e-9);
            let eta = (self.total - self.done.min(self.total)) as f64 / rate.max(1.0);
            eprintln!(
                "  {:.2} / {:.2} GB  {:.2} GB/s  ETA {:.1} s",
                self.done as f64 / 1e9,
                self.total as f64 / 1e9,
                rate / 1e9,
                eta
            );
        }
    }

    fn finish(&self, summary: &StreamSummary) {
        if self.enabled {
            eprintln!(
                "  wrote {:.2} GB in {} shard(s) in {:.2} s: {} tensors recomputed, {} copied, {} dropped",
                summary.bytes_written as f64 / 1e9,
                summary.shards,
                summary.seconds,
                summary.tensors_rewritten,
                summary.tensors_copied,
                summary.tensors_dropped
            );
        }
    }
}

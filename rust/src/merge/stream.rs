//! Streams a checkpoint into a new Hugging Face model folder tensor by tensor, so the peak memory
//! is a few tensors whatever the model size:
//!
//! - every input tensor is planned first (copied, dropped, or rewritten into new tensors), so bad
//!   input fails before a byte is written;
//! - the output is sharded like the input (same shard files, same tensor order, same index);
//! - by default each shard's file is reserved whole up front (`ReservedSafetensorsWriter`) and
//!   its tensors are written by position, in parallel (rayon): a rewritten tensor a few rows at a
//!   time as they are computed ([`TensorRewrite::compute_into`]), a copied one in chunks straight
//!   from the input map; each tensor's writeback starts once it is done;
//! - where the file system cannot reserve (or with `FERROTUNE_STREAM_WRITE=buffered`), the buffered
//!   path writes the same bytes: a producer computes rewritten tensors (rayon inside) while a
//!   writer thread appends them to the shard, at most `QUEUE` computed tensors in between;
//! - input pages are released (`MADV_DONTNEED`) once a tensor is done, so the mapped model does
//!   not accumulate in the resident set;
//! - every file appears atomically (fsync, then rename); side files (config, tokenizer, chat
//!   template) are copied beside the shards.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::sync::Mutex;
use std::time::Instant;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::io::{
    AtomicFile, Checkpoint, ReservedSafetensorsWriter, ReservedTensor, SafeTensors,
    SafetensorsWriter, TensorInfo, TensorSpec,
};

/// Computed tensors allowed to wait for the writer (buffered path).
const QUEUE: usize = 2;
/// Writeback of the output is started every this many bytes (buffered path; the reserved path
/// starts it per tensor).
const WRITEBACK_EVERY: u64 = 64 << 20;
/// Copied tensors move in pieces of this size (reserved path), so a large embedding is neither
/// resident at once nor copied by one thread.
const COPY_CHUNK: usize = 4 << 20;
/// The environment variable that picks the write path: `buffered` forces `write()`.
pub const WRITE_PATH_VAR: &str = "FERROTUNE_STREAM_WRITE";

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
    /// The same bytes written into `outs` (one per planned tensor, in plan order), in pieces
    /// and from any threads as they are computed, so no output tensor need be held whole. By
    /// default [`TensorRewrite::compute`], each tensor written whole.
    fn compute_into(
        &self,
        source: &Checkpoint,
        info: &TensorInfo,
        outs: &[&dyn TensorOutput],
    ) -> Result<()> {
        copy_computed(&self.compute(source, info)?, outs)
    }
}

/// One planned output tensor, written by position: any piece, from any thread.
pub trait TensorOutput: Sync {
    /// Its size in bytes.
    fn len(&self) -> usize;
    /// Writes `bytes` at `offset` within the tensor.
    fn write_at(&self, offset: usize, bytes: &[u8]) -> Result<()>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl TensorOutput for ReservedTensor<'_> {
    fn len(&self) -> usize {
        ReservedTensor::len(self)
    }

    fn write_at(&self, offset: usize, bytes: &[u8]) -> Result<()> {
        ReservedTensor::write_at(self, offset, bytes)
    }
}

/// Writes computed tensors whole into their outputs, checking each one's size.
pub fn copy_computed(tensors: &[Vec<u8>], outs: &[&dyn TensorOutput]) -> Result<()> {
    if tensors.len() != outs.len() {
        return Err(Error::InvalidArgument(format!(
            "computed {} tensors, planned {}",
            tensors.len(),
            outs.len()
        )));
    }
    for (index, (bytes, out)) in tensors.iter().zip(outs).enumerate() {
        if bytes.len() != out.len() {
            return Err(Error::InvalidArgument(format!(
                "tensor {index} of the rewrite: computed {} bytes, planned {}",
                bytes.len(),
                out.len()
            )));
        }
        out.write_at(0, bytes)?;
    }
    Ok(())
}

/// How shards are written (both give the same bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePath {
    /// Written by position into a file reserved up front, tensors in parallel; falls back to
    /// `Buffered` where the file system cannot reserve.
    Reserved,
    /// Appended with `write()` by a writer thread.
    Buffered,
}

impl WritePath {
    /// `Buffered` when [`WRITE_PATH_VAR`] says `buffered`, else `Reserved`.
    pub fn from_env() -> Self {
        match std::env::var(WRITE_PATH_VAR) {
            Ok(v) if v.eq_ignore_ascii_case("buffered") => WritePath::Buffered,
            _ => WritePath::Reserved,
        }
    }
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

/// The plans of one input file, in its tensor order.
type FilePlans<'a> = [(&'a TensorInfo, Plan)];

/// Streams `source` (opened from `source_dir`) into `out_dir` through `rewrite`: shards named as
/// the input's, an index when the input had one (or had several files). With `progress`, a line
/// per second on stderr. The write path is [`WritePath::from_env`].
pub fn rewrite_checkpoint(
    source: &Checkpoint,
    source_dir: &Path,
    out_dir: &Path,
    rewrite: &dyn TensorRewrite,
    progress: bool,
) -> Result<StreamSummary> {
    rewrite_checkpoint_with(
        source,
        source_dir,
        out_dir,
        rewrite,
        progress,
        WritePath::from_env(),
    )
}

/// [`rewrite_checkpoint`] through the chosen write path.
pub fn rewrite_checkpoint_with(
    source: &Checkpoint,
    source_dir: &Path,
    out_dir: &Path,
    rewrite: &dyn TensorRewrite,
    progress: bool,
    path: WritePath,
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
        .map(|(info, plan)| output_bytes(info, plan))
        .sum();
    let mut summary = StreamSummary::default();
    let mut weight_map: BTreeMap<String, String> = BTreeMap::new();
    let reporter = Mutex::new(Progress::new(progress, total_bytes));
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
                    summary.tensors_copied += 1;
                    specs.push(TensorSpec::new(&info.name, info.dtype, info.shape.clone()))
                }
                Plan::Drop => summary.tensors_dropped += 1,
                Plan::Rewrite(new) => {
                    summary.tensors_rewritten += 1;
                    specs.extend(new.iter().cloned())
                }
            }
        }
        for spec in &specs {
            weight_map.insert(spec.name.clone(), shard_name.clone());
        }
        let shard_path = out_dir.join(&shard_name);
        let reserved = match path {
            WritePath::Reserved => {
                ReservedSafetensorsWriter::create(&shard_path, specs.clone(), file.metadata())?
            }
            WritePath::Buffered => None,
        };
        summary.bytes_written += match reserved {
            Some(writer) => {
                write_shard_reserved(source, file, file_plans, writer, rewrite, &reporter)?
            }
            None => {
                let writer = SafetensorsWriter::create(&shard_path, specs, file.metadata())?;
                write_shard_buffered(source, file, file_plans, writer, rewrite, &reporter)?
            }
        };
        summary.shards += 1;
    }
    let had_index = source_dir.join("model.safetensors.index.json").exists();
    if had_index || source.files().len() > 1 {
        write_index(out_dir, &weight_map, total_bytes)?;
    }
    summary.seconds = start.elapsed().as_secs_f64();
    reporter
        .into_inner()
        .expect("progress lock")
        .finish(&summary);
    Ok(summary)
}

/// Bytes `plan` writes for `info`.
fn output_bytes(info: &TensorInfo, plan: &Plan) -> u64 {
    match plan {
        Plan::Copy => (info.end - info.begin) as u64,
        Plan::Drop => 0,
        Plan::Rewrite(specs) => specs.iter().map(|s| s.nbytes() as u64).sum(),
    }
}

/// Writes one shard into its reserved file: every kept tensor a task (taken in file order by the
/// rayon threads as they free up), rewritten ones written in pieces as computed, copied ones in
/// chunks. Returns the bytes written.
fn write_shard_reserved(
    source: &Checkpoint,
    file: &SafeTensors,
    file_plans: &FilePlans,
    writer: ReservedSafetensorsWriter,
    rewrite: &dyn TensorRewrite,
    reporter: &Mutex<Progress>,
) -> Result<u64> {
    let written: u64 = file_plans
        .iter()
        .map(|(info, plan)| output_bytes(info, plan))
        .sum();
    let mut outputs = writer.tensors().into_iter();
    let mut jobs = Vec::new();
    for (info, plan) in file_plans {
        let count = match plan {
            Plan::Drop => continue,
            Plan::Copy => 1,
            Plan::Rewrite(new) => new.len(),
        };
        jobs.push((
            *info,
            plan,
            outputs.by_ref().take(count).collect::<Vec<_>>(),
        ));
    }
    jobs.into_iter()
        .par_bridge()
        .try_for_each(|(info, plan, outs)| -> Result<()> {
            match plan {
                Plan::Copy => copy_reserved(file, info, &outs[0])?,
                _ => {
                    populate(file, info);
                    let targets: Vec<&dyn TensorOutput> =
                        outs.iter().map(|o| o as &dyn TensorOutput).collect();
                    rewrite.compute_into(source, info, &targets)?;
                    release(file, info);
                }
            }
            outs.iter().for_each(ReservedTensor::start_writeback);
            let done = outs.iter().map(|o| o.len() as u64).sum();
            reporter.lock().expect("progress lock").advance(done);
            Ok(())
        })?;
    writer.finish()?;
    Ok(written)
}

/// Copies a tensor of `file` into `out` in parallel chunks, each input chunk's pages released
/// once copied, so the input does not accumulate in the resident set.
fn copy_reserved(file: &SafeTensors, info: &TensorInfo, out: &ReservedTensor) -> Result<()> {
    file.slice(info)
        .par_chunks(COPY_CHUNK)
        .enumerate()
        .try_for_each(|(index, bytes)| {
            let begin = info.begin + index * COPY_CHUNK;
            populate_range(file, begin, bytes.len());
            out.write_at(index * COPY_CHUNK, bytes)?;
            release_range(file, begin, bytes.len());
            Ok(())
        })
}

/// Writes one shard with `write()`: this thread computes rewritten tensors (rayon inside) while
/// a writer thread appends them. Returns the bytes written.
fn write_shard_buffered(
    source: &Checkpoint,
    file: &SafeTensors,
    file_plans: &FilePlans,
    mut writer: SafetensorsWriter,
    rewrite: &dyn TensorRewrite,
    reporter: &Mutex<Progress>,
) -> Result<u64> {
    std::thread::scope(|scope| -> Result<u64> {
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
                Plan::Drop => continue,
                Plan::Copy => {
                    let bytes = (info.end - info.begin) as u64;
                    reporter.lock().expect("progress lock").advance(bytes);
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
                    let bytes = tensors.iter().map(|t| t.len() as u64).sum();
                    reporter.lock().expect("progress lock").advance(bytes);
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
        writer.finish()?;
        Ok(written)
    })
}

/// Maps the pages of `info` in one call (instead of one fault per page as they are read).
fn populate(file: &SafeTensors, info: &TensorInfo) {
    populate_range(file, info.begin, info.end - info.begin);
}

/// [`populate`] for `len` bytes from `begin` of the data buffer.
fn populate_range(file: &SafeTensors, begin: usize, len: usize) {
    if len > 0 {
        let _ = file.mmap().advise_range(
            memmap2::Advice::PopulateRead,
            file.data_start() + begin,
            len,
        );
    }
}

/// Drops the mapped pages of `info` from this process (they stay in the page cache).
fn release(file: &SafeTensors, info: &TensorInfo) {
    release_range(file, info.begin, info.end - info.begin);
}

/// [`release`] for `len` bytes from `begin` of the data buffer.
fn release_range(file: &SafeTensors, begin: usize, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: the map is private and read-only for this process; dropping its pages only makes
    // a later read fault them in again from the file. Nothing here holds a view of them after
    // this point (the tensor was written or computed already).
    let _ = unsafe {
        file.mmap().unchecked_advise_range(
            memmap2::UncheckedAdvice::DontNeed,
            file.data_start() + begin,
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::io::safetensors::write_safetensors;
    use crate::io::Dtype;

    /// A tensor to write: its spec and bytes.
    pub(crate) type Tensor = (TensorSpec, Vec<u8>);

    /// Writes `shards` (file name, tensors) into `dir` with an index naming each tensor's shard.
    pub(crate) fn write_sharded(dir: &Path, shards: &[(&str, Vec<Tensor>)]) {
        let mut weight_map = BTreeMap::new();
        let mut total = 0;
        for (name, tensors) in shards {
            let borrowed: Vec<(TensorSpec, &[u8])> =
                tensors.iter().map(|(s, b)| (s.clone(), &b[..])).collect();
            let mut meta = BTreeMap::new();
            meta.insert("format".to_string(), "pt".to_string());
            write_safetensors(dir.join(name), &borrowed, &meta).unwrap();
            for (spec, bytes) in tensors {
                weight_map.insert(spec.name.clone(), name.to_string());
                total += bytes.len() as u64;
            }
        }
        write_index(dir, &weight_map, total).unwrap();
    }

    /// Every file of `a` and `b` (two output folders), byte for byte.
    pub(crate) fn assert_same_files(a: &Path, b: &Path) {
        let names = |dir: &Path| {
            let mut names: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(a), names(b));
        for name in names(a) {
            let (x, y) = (
                std::fs::read(a.join(&name)).unwrap(),
                std::fs::read(b.join(&name)).unwrap(),
            );
            assert!(x == y, "{name:?} differs between {a:?} and {b:?}");
        }
    }

    /// Drops `gone`, splits `pair` (U8) into its two halves `pair.0`, `pair.1`, negates the
    /// bytes of `negate` (written in pieces, through `compute_into`), copies the rest.
    struct TestRewrite;

    impl TensorRewrite for TestRewrite {
        fn plan(&self, info: &TensorInfo) -> Result<Plan> {
            let half = |i| TensorSpec::new(format!("pair.{i}"), Dtype::U8, vec![info.numel() / 2]);
            Ok(match info.name.as_str() {
                "gone" => Plan::Drop,
                "pair" => Plan::Rewrite(vec![half(0), half(1)]),
                "negate" => Plan::Rewrite(vec![TensorSpec::new(
                    "negate",
                    info.dtype,
                    info.shape.clone(),
                )]),
                _ => Plan::Copy,
            })
        }

        fn compute(&self, source: &Checkpoint, info: &TensorInfo) -> Result<Vec<Vec<u8>>> {
            let bytes = source.bytes(&info.name).unwrap();
            Ok(match info.name.as_str() {
                "pair" => bytes.chunks(bytes.len() / 2).map(<[u8]>::to_vec).collect(),
                _ => vec![bytes.iter().map(|b| b.wrapping_neg()).collect()],
            })
        }

        fn compute_into(
            &self,
            source: &Checkpoint,
            info: &TensorInfo,
            outs: &[&dyn TensorOutput],
        ) -> Result<()> {
            if info.name != "negate" {
                return copy_computed(&self.compute(source, info)?, outs);
            }
            // in pieces of 1000 bytes, last first
            let bytes = source.bytes(&info.name).unwrap();
            for (i, piece) in bytes.chunks(1000).enumerate().rev() {
                let negated: Vec<u8> = piece.iter().map(|b| b.wrapping_neg()).collect();
                outs[0].write_at(i * 1000, &negated)?;
            }
            Ok(())
        }
    }

    fn pattern(n: usize, seed: usize) -> Vec<u8> {
        (0..n).map(|i| ((i * 31 + seed * 7) % 253) as u8).collect()
    }

    #[test]
    fn reserved_and_buffered_paths_write_the_same_files() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        std::fs::create_dir(&base).unwrap();
        let big = COPY_CHUNK * 2 + 4099; // copied in three chunks, the last one partial
        write_sharded(
            &base,
            &[
                (
                    "model-00001-of-00002.safetensors",
                    vec![
                        (
                            TensorSpec::new("big", Dtype::U8, vec![big]),
                            pattern(big, 1),
                        ),
                        (TensorSpec::new("gone", Dtype::F32, vec![3]), pattern(12, 2)),
                        (TensorSpec::new("pair", Dtype::U8, vec![10]), pattern(10, 3)),
                    ],
                ),
                (
                    "model-00002-of-00002.safetensors",
                    vec![
                        (
                            TensorSpec::new("negate", Dtype::BF16, vec![7, 300]),
                            pattern(4200, 4),
                        ),
                        (TensorSpec::new("empty", Dtype::F16, vec![0, 4]), vec![]),
                        (TensorSpec::new("small", Dtype::F32, vec![1]), pattern(4, 5)),
                    ],
                ),
            ],
        );
        let source = Checkpoint::open(&base).unwrap();
        let mut summaries = Vec::new();
        for (name, path) in [
            ("reserved", WritePath::Reserved),
            ("buffered", WritePath::Buffered),
        ] {
            let out = dir.path().join(name);
            std::fs::create_dir(&out).unwrap();
            summaries.push(
                rewrite_checkpoint_with(&source, &base, &out, &TestRewrite, false, path).unwrap(),
            );
        }
        assert_same_files(&dir.path().join("reserved"), &dir.path().join("buffered"));
        for s in &summaries {
            assert_eq!(
                (
                    s.tensors_copied,
                    s.tensors_dropped,
                    s.tensors_rewritten,
                    s.shards
                ),
                (3, 1, 2, 2)
            );
            assert_eq!(s.bytes_written, (big + 10 + 4200 + 4) as u64);
        }
        let out = Checkpoint::open(dir.path().join("reserved")).unwrap();
        assert_eq!(out.bytes("big").unwrap(), &pattern(big, 1)[..]);
        assert_eq!(out.bytes("pair.1").unwrap(), &pattern(10, 3)[5..]);
        let negated: Vec<u8> = pattern(4200, 4).iter().map(|b| b.wrapping_neg()).collect();
        assert_eq!(out.bytes("negate").unwrap(), &negated[..]);
        assert!(out.bytes("gone").is_none());
        // no temporary file is left behind
        assert_eq!(
            std::fs::read_dir(dir.path().join("reserved"))
                .unwrap()
                .count(),
            3
        );
    }

    #[test]
    fn a_failed_rewrite_leaves_no_shard_behind() {
        struct Failing;
        impl TensorRewrite for Failing {
            fn plan(&self, _: &TensorInfo) -> Result<Plan> {
                Ok(Plan::Rewrite(vec![TensorSpec::new(
                    "x",
                    Dtype::U8,
                    vec![4],
                )]))
            }
            fn compute(&self, _: &Checkpoint, _: &TensorInfo) -> Result<Vec<Vec<u8>>> {
                Ok(vec![vec![0; 3]]) // one byte short of the plan
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        std::fs::create_dir(&base).unwrap();
        write_sharded(
            &base,
            &[(
                "model.safetensors",
                vec![(TensorSpec::new("x", Dtype::U8, vec![4]), vec![1; 4])],
            )],
        );
        let source = Checkpoint::open(&base).unwrap();
        for path in [WritePath::Reserved, WritePath::Buffered] {
            let out = dir.path().join(format!("{path:?}"));
            std::fs::create_dir(&out).unwrap();
            let err = rewrite_checkpoint_with(&source, &base, &out, &Failing, false, path)
                .unwrap_err()
                .to_string();
            assert!(err.contains("computed 3 bytes, planned 4"), "{err}");
            assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "{path:?}");
        }
    }
}

//! Packed rows to safetensors shards.
//!
//! Each shard `shard-NNNNN.safetensors` holds R rows of T = seq_len tokens as four `I32 (R, T)`
//! tensors per lane; the lane prefix is empty for SFT/pretraining data and `chosen_` /
//! `rejected_` for preference pairs (document k of a chosen row and of its rejected row are the
//! two answers of the same pair):
//!
//! | tensor           | content                                                           | padding |
//! |------------------|-------------------------------------------------------------------|---------|
//! | `input_ids`      | token ids                                                         | pad id  |
//! | `labels`         | pre-shifted targets: next token of the same document, or -100     | -100    |
//! | `position_ids`   | 0, 1, 2, ... restarting at each document                          | 0       |
//! | `document_ids`   | index of the document within the row (0, 1, ...)                  | -1      |
//!
//! A mixture (see `mix.rs`) adds a fifth tensor per lane, `task_ids` `I32 (R, T)`: the task
//! (source) index of each token's document, -1 on padding; the manifest's `task_names` name them.
//!
//! `__metadata__` carries `format = "ferrotune.packed"` and `format_version`. The folder's
//! `manifest.json` (see `prepare.rs`) lists the shards with their row and token counts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::mask::{write_labels, IGNORE};
use super::pack::Row;
use crate::error::Result;
use crate::io::safetensors::write_safetensors;
use crate::io::{Dtype, TensorSpec};

/// Version of the shard layout and manifest, bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
pub const FORMAT_NAME: &str = "ferrotune.packed";

/// Tensor-name prefixes of the lanes of a row.
pub fn lane_prefixes(lanes: usize) -> &'static [&'static str] {
    if lanes == 2 {
        &["chosen_", "rejected_"]
    } else {
        &[""]
    }
}

/// One written shard, as listed in the manifest.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ShardInfo {
    pub file: String,
    pub rows: u64,
    /// Real (non-padding) tokens, all lanes.
    pub tokens: u64,
    /// Positions whose label is not -100, all lanes.
    pub trained_tokens: u64,
    pub documents: u64,
}

/// Accumulates rows and writes a shard every `rows_per_shard` rows.
pub struct ShardWriter {
    dir: PathBuf,
    seq_len: usize,
    lanes: usize,
    pad_id: i32,
    rows_per_shard: usize,
    /// Per lane: ids, labels, positions, document ids, each rows * seq_len long.
    buffers: Vec<[Vec<i32>; 4]>,
    /// Per lane: the task of each token (mixtures only: `Unit::source` is then the task index).
    task_buffers: Option<Vec<Vec<i32>>>,
    rows: usize,
    tokens: u64,
    trained: u64,
    documents: u64,
    pub shards: Vec<ShardInfo>,
}

impl ShardWriter {
    pub fn new(
        dir: &Path,
        seq_len: usize,
        lanes: usize,
        pad_id: u32,
        rows_per_shard: usize,
    ) -> Self {
        ShardWriter {
            dir: dir.to_path_buf(),
            seq_len,
            lanes,
            pad_id: pad_id as i32,
            rows_per_shard: rows_per_shard.max(1),
            buffers: (0..lanes).map(|_| Default::default()).collect(),
            task_buffers: None,
            rows: 0,
            tokens: 0,
            trained: 0,
            documents: 0,
            shards: Vec::new(),
        }
    }

    /// Also writes `task_ids`, taking each unit's `source` as its task index.
    pub fn with_task_ids(mut self) -> Self {
        self.task_buffers = Some(vec![Vec::new(); self.lanes]);
        self
    }

    /// Appends one row (its units must have `lanes` lanes and fit `seq_len`).
    pub fn push(&mut self, row: &Row) -> Result<()> {
        let t = self.seq_len;
        for lane in 0..self.lanes {
            let [ids, labels, pos, docs] = &mut self.buffers[lane];
            let base = ids.len();
            ids.resize(base + t, self.pad_id);
            labels.resize(base + t, IGNORE);
            pos.resize(base + t, 0);
            docs.resize(base + t, -1);
            if let Some(tasks) = self.task_buffers.as_mut() {
                tasks[lane].resize(base + t, -1);
            }
            let mut at = base;
            for (k, unit) in row.units.iter().enumerate() {
                let doc = &unit.lanes[lane];
                let n = doc.len();
                assert!(at + n <= base + t, "row longer than seq_len");
                for (dst, &id) in ids[at..at + n].iter_mut().zip(&doc.ids) {
                    *dst = id as i32;
                }
                write_labels(doc, &mut labels[at..at + n]);
                for (i, p) in pos[at..at + n].iter_mut().enumerate() {
                    *p = i as i32;
                }
                docs[at..at + n].fill(k as i32);
                if let Some(tasks) = self.task_buffers.as_mut() {
                    tasks[lane][at..at + n].fill(unit.source as i32);
                }
                self.tokens += n as u64;
                self.trained += doc.trained_targets() as u64;
                at += n;
            }
        }
        self.documents += row.units.len() as u64;
        self.rows += 1;
        if self.rows == self.rows_per_shard {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the rows held so far as a shard (nothing if none).
    pub fn flush(&mut self) -> Result<()> {
        if self.rows == 0 {
            return Ok(());
        }
        let file = format!("shard-{:05}.safetensors", self.shards.len());
        let shape = vec![self.rows, self.seq_len];
        let names = ["input_ids", "labels", "position_ids", "document_ids"];
        let mut tensors: Vec<(TensorSpec, &[u8])> = Vec::new();
        for (lane, prefix) in lane_prefixes(self.lanes).iter().enumerate() {
            for (name, buf) in names.iter().zip(&self.buffers[lane]) {
                tensors.push((
                    TensorSpec::new(format!("{prefix}{name}"), Dtype::I32, shape.clone()),
                    i32_bytes(buf),
                ));
            }
            if let Some(tasks) = &self.task_buffers {
                tensors.push((
                    TensorSpec::new(format!("{prefix}task_ids"), Dtype::I32, shape.clone()),
                    i32_bytes(&tasks[lane]),
                ));
            }
        }
        let mut metadata = BTreeMap::new();
        metadata.insert("format".to_string(), FORMAT_NAME.to_string());
        metadata.insert("format_version".to_string(), FORMAT_VERSION.to_string());
        write_safetensors(self.dir.join(&file), &tensors, &metadata)?;
        self.shards.push(ShardInfo {
            file,
            rows: self.rows as u64,
            tokens: self.tokens,
            trained_tokens: self.trained,
            documents: self.documents,
        });
        for lane in &mut self.buffers {
            for b in lane.iter_mut() {
                b.clear();
            }
        }
        for b in self.task_buffers.iter_mut().flatten() {
            b.clear();
        }
        self.rows = 0;
        self.tokens = 0;
        self.trained = 0;
        self.documents = 0;
        Ok(())
    }
}

fn i32_bytes(v: &[i32]) -> &[u8] {
    // SAFETY: i32 has no padding and every byte pattern of it is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mask::Doc;
    use crate::data::pack::Unit;
    use crate::io::SafeTensors;

    fn read_i32(st: &SafeTensors, name: &str) -> Vec<i32> {
        st.bytes(name)
            .unwrap()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn rows_become_the_four_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(dir.path(), 6, 1, 99, 2);
        let doc = |ids: Vec<u32>, trained: Option<Vec<bool>>| Unit {
            lanes: vec![Doc { ids, trained }],
            source: 0,
        };
        w.push(&Row {
            units: vec![
                doc(vec![1, 2, 3], None),
                doc(vec![4, 5], Some(vec![false, true])),
            ],
        })
        .unwrap();
        w.push(&Row {
            units: vec![doc(vec![7], None)],
        })
        .unwrap();
        assert_eq!(w.shards.len(), 1);
        let st = SafeTensors::open(dir.path().join("shard-00000.safetensors")).unwrap();
        assert_eq!(st.metadata()["format"], FORMAT_NAME);
        assert_eq!(
            read_i32(&st, "input_ids"),
            [1, 2, 3, 4, 5, 99, 7, 99, 99, 99, 99, 99]
        );
        assert_eq!(
            read_i32(&st, "labels"),
            [2, 3, -100, 5, -100, -100, -100, -100, -100, -100, -100, -100]
        );
        assert_eq!(
            read_i32(&st, "position_ids"),
            [0, 1, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            read_i32(&st, "document_ids"),
            [0, 0, 0, 1, 1, -1, 0, -1, -1, -1, -1, -1]
        );
        assert_eq!(
            w.shards[0],
            ShardInfo {
                file: "shard-00000.safetensors".into(),
                rows: 2,
                tokens: 6,
                trained_tokens: 3,
                documents: 3
            }
        );
    }
}

//! Hugging Face checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json` (`{"metadata": {...}, "weight_map": {tensor: shard file}}`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::safetensors::{SafeTensors, TensorInfo};
use crate::error::{Error, Result};

/// Index files larger than this are refused (real ones are a few hundred KiB).
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// A checkpoint of one or more memory-mapped safetensors files.
pub struct Checkpoint {
    files: Vec<SafeTensors>,
    /// Tensor name -> index into `files`.
    location: HashMap<String, usize>,
    /// Tensor names in a stable order: by file, then by position in the file.
    names: Vec<String>,
}

impl Checkpoint {
    /// Opens a folder (sharded index, or `model.safetensors`, or the only `*.safetensors` in it),
    /// an index file, or a single safetensors file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            for index_name in [
                "model.safetensors.index.json",
                "adapter_model.safetensors.index.json",
            ] {
                let index = path.join(index_name);
                if index.exists() {
                    return Self::open_index(&index);
                }
            }
            for single in ["model.safetensors", "adapter_model.safetensors"] {
                if path.join(single).exists() {
                    return Self::from_files(vec![path.join(single)]);
                }
            }
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| Error::io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(Error::format(
                    path,
                    "folder",
                    "no *.safetensors file or index in it",
                ));
            }
            return Self::from_files(found);
        }
        if path.to_string_lossy().ends_with(".index.json") {
            return Self::open_index(path);
        }
        Self::from_files(vec![path.to_path_buf()])
    }

    fn open_index(index: &Path) -> Result<Self> {
        let size = std::fs::metadata(index)
            .map_err(|e| Error::io(index, e))?
            .len();
        if size > MAX_INDEX_BYTES {
            return Err(Error::format(
                index,
                "file",
                format!("{size} bytes is too large for an index"),
            ));
        }
        let text = std::fs::read(index).map_err(|e| Error::io(index, e))?;
        let json: Value = serde_json::from_slice(&text)
            .map_err(|e| Error::format(index, "json", format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::format(index, "weight_map", "missing or not an object"))?;
        let folder = index.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<String> = Vec::new();
        let mut expected: BTreeMap<String, String> = BTreeMap::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::format(index, format!("weight_map.{tensor}"), "must be a file name")
            })?;
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(Error::format(
                    index,
                    format!("weight_map.{tensor}"),
                    "shard must be a plain file name",
                ));
            }
            if !shard_names.iter().any(|s| s == file) {
                shard_names.push(file.to_string());
            }
            expected.insert(tensor.clone(), file.to_string());
        }
        shard_names.sort();
        let checkpoint = Self::from_files(shard_names.iter().map(|s| folder.join(s)).collect())?;
        for (tensor, file) in &expected {
            match checkpoint.location.get(tensor) {
                Some(&i)
                    if checkpoint.files[i]
                        .path()
                        .file_name()
                        .is_some_and(|n| n == file.as_str()) => {}
                _ => {
                    return Err(Error::format(
                        index,
                        format!("weight_map.{tensor}"),
                        format!("tensor is not in shard {file}"),
                    ));
                }
            }
        }
        Ok(checkpoint)
    }

    fn from_files(paths: Vec<PathBuf>) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut location = HashMap::new();
        let mut names = Vec::new();
        for path in paths {
            let st = SafeTensors::open(&path)?;
            for t in st.tensors() {
                if location.insert(t.name.clone(), files.len()).is_some() {
                    return Err(Error::format(
                        &path,
                        format!("tensor {:?}", t.name),
                        "appears in two shards",
                    ));
                }
                names.push(t.name.clone());
            }
            files.push(st);
        }
        Ok(Checkpoint {
            files,
            location,
            names,
        })
    }

    /// Every tensor name, by file then position.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn files(&self) -> &[SafeTensors] {
        &self.files
    }

    /// The file holding `name` and its entry.
    pub fn get(&self, name: &str) -> Option<(&SafeTensors, &TensorInfo)> {
        let file = &self.files[*self.location.get(name)?];
        Some((file, file.info(name)?))
    }

    /// The bytes of `name`, borrowed from its file's map.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        let (file, info) = self.get(name)?;
        Some(file.slice(info))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::safetensors::{write_safetensors, TensorSpec};
    use crate::io::Dtype;

    #[test]
    fn opens_sharded_checkpoints_through_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let meta = BTreeMap::new();
        let one = [1u8; 4];
        let two = [2u8; 8];
        write_safetensors(
            dir.path().join("model-00001-of-00002.safetensors"),
            &[(TensorSpec::new("a", Dtype::F32, vec![1]), &one[..])],
            &meta,
        )
        .unwrap();
        write_safetensors(
            dir.path().join("model-00002-of-00002.safetensors"),
            &[(TensorSpec::new("b", Dtype::F32, vec![2]), &two[..])],
            &meta,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"metadata": {"total_size": 12}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ck.names(), &["a".to_string(), "b".to_string()]);
        assert_eq!(ck.bytes("b").unwrap(), &two);

        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "../etc/passwd"}}"#,
        )
        .unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("weight_map.a"), "{err}");
    }
}

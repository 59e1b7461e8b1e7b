//! The safetensors format: `u64` little-endian header length N, N bytes of JSON header
//! (`{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}`,
//! space-padded), then the data buffer. Offsets are relative to the buffer's start.
//!
//! The header comes from untrusted files, so [`parse_header`] validates everything before any
//! byte is touched: the length against the file and a hard cap, UTF-8 and JSON, each dtype and
//! shape (with overflow checks), and that the tensors tile the buffer exactly, in order, with no
//! gaps or overlaps (as the reference implementation requires).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};
use serde_json::{Map, Value};

use super::atomic::AtomicFile;
use super::dtype::Dtype;
use crate::error::{Error, Result};

/// Headers larger than this are refused before they are read (the reference limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor's entry in a header. `begin..end` is relative to the data buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub begin: usize,
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed and validated header.
#[derive(Debug, Clone, Default)]
pub struct Header {
    /// Tensors in data-buffer order.
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    /// Bytes before the data buffer: 8 + header length.
    pub data_start: usize,
}

/// Parses and validates the header of a safetensors file held in `bytes` (the whole file).
/// `path` only names the file in errors.
pub fn parse_header(bytes: &[u8], path: &Path) -> Result<Header> {
    let bad = |place: &str, message: String| Error::format(path, place, message);
    if bytes.len() < 8 {
        return Err(bad(
            "byte 0",
            format!(
                "file is {} bytes, too short for a safetensors header",
                bytes.len()
            ),
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return Err(bad(
            "header length",
            format!("{n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit"),
        ));
    }
    let available = (bytes.len() - 8) as u64;
    if n > available {
        return Err(bad(
            "header length",
            format!("{n} bytes but only {available} follow the length field"),
        ));
    }
    let n = n as usize;
    let text = std::str::from_utf8(&bytes[8..8 + n]).map_err(|e| {
        bad(
            "header",
            format!("not UTF-8 at byte {}", 8 + e.valid_up_to()),
        )
    })?;
    if !text.starts_with('{') {
        return Err(bad("header", "does not start with '{'".into()));
    }
    let json: Map<String, Value> = serde_json::from_str(text.trim_end())
        .map_err(|e| bad("header", format!("invalid JSON: {e}")))?;
    let data_len = bytes.len() - 8 - n;

    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(json.len());
    for (name, entry) in &json {
        if name == "__metadata__" {
            let map = entry
                .as_object()
                .ok_or_else(|| bad("__metadata__", "must be an object".into()))?;
            for (k, v) in map {
                let v = v
                    .as_str()
                    .ok_or_else(|| bad(&format!("__metadata__.{k}"), "must be a string".into()))?;
                metadata.insert(k.clone(), v.to_string());
            }
            continue;
        }
        tensors.push(parse_entry(name, entry, path)?);
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut expected = 0usize;
    for t in &tensors {
        if t.begin != expected {
            let what = if t.begin < expected {
                "overlaps the previous tensor"
            } else {
                "leaves a gap before it"
            };
            return Err(bad(
                &format!("tensor {:?}.data_offsets", t.name),
                format!("begin {} {what}", t.begin),
            ));
        }
        expected = t.end;
    }
    if expected != data_len {
        return Err(bad(
            "data",
            format!("tensors cover {expected} bytes but the data buffer holds {data_len}"),
        ));
    }
    Ok(Header {
        tensors,
        metadata,
        data_start: 8 + n,
    })
}

fn parse_entry(name: &str, entry: &Value, path: &Path) -> Result<TensorInfo> {
    let place = |field: &str| format!("tensor {name:?}.{field}");
    let bad = |field: &str, message: &str| Error::format(path, place(field), message.to_string());
    let obj = entry
        .as_object()
        .ok_or_else(|| Error::format(path, format!("tensor {name:?}"), "must be an object"))?;
    let dtype: Dtype = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("dtype", "missing or not a string"))?
        .parse()
        .map_err(|e: String| bad("dtype", &e))?;
    let shape_json = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("shape", "missing or not a list"))?;
    let mut shape = Vec::with_capacity(shape_json.len());
    let mut nbytes = dtype.size();
    for d in shape_json {
        let d = d
            .as_u64()
            .ok_or_else(|| bad("shape", "dimensions must be non-negative integers"))?;
        let d = usize::try_from(d).map_err(|_| bad("shape", "dimension too large"))?;
        nbytes = nbytes
            .checked_mul(d)
            .ok_or_else(|| bad("shape", "size overflows"))?;
        shape.push(d);
    }
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .ok_or_else(|| bad("data_offsets", "must be a list of two integers"))?;
    let offset = |v: &Value| v.as_u64().and_then(|x| usize::try_from(x).ok());
    let (begin, end) = match (offset(&offsets[0]), offset(&offsets[1])) {
        (Some(b), Some(e)) if b <= e => (b, e),
        _ => {
            return Err(bad(
                "data_offsets",
                "must be two non-negative integers, begin <= end",
            ))
        }
    };
    if end - begin != nbytes {
        return Err(bad(
            "data_offsets",
            &format!(
                "span {} bytes but {dtype} {shape:?} needs {nbytes}",
                end - begin
            ),
        ));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        begin,
        end,
    })
}

/// A memory-mapped, validated safetensors file. Tensor bytes are borrowed from the map.
pub struct SafeTensors {
    path: PathBuf,
    mmap: Arc<MmapMut>,
    header: Header,
    by_name: HashMap<String, usize>,
}

impl SafeTensors {
    /// Maps and validates `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // A private (copy-on-write) map: consumers such as torch may write to the tensors they
        // were handed, which changes their own pages, never the file.
        // SAFETY: a file truncated by another process while mapped is outside what any reader
        // of mapped files can defend against.
        let mmap =
            unsafe { MmapOptions::new().map_copy(&file) }.map_err(|e| Error::io(&path, e))?;
        let header = parse_header(&mmap, &path)?;
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(SafeTensors {
            path,
            mmap: Arc::new(mmap),
            header,
            by_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.header.metadata
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The bytes of `name`, borrowed from the map.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.info(name).map(|t| self.slice(t))
    }

    /// The bytes of a tensor of this file.
    pub fn slice(&self, info: &TensorInfo) -> &[u8] {
        let start = self.header.data_start;
        &self.mmap[start + info.begin..start + info.end]
    }

    /// The shared map, for handing tensor bytes to Python without a copy.
    pub fn mmap(&self) -> &Arc<MmapMut> {
        &self.mmap
    }

    /// Byte offset of the data buffer in the map.
    pub fn data_start(&self) -> usize {
        self.header.data_start
    }
}

/// A tensor to be written: name, dtype and shape (the bytes come separately).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape,
        }
    }

    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Writes a safetensors file tensor by tensor, so a whole model never sits in memory: the header
/// is fixed by the specs up front, then each tensor's bytes are streamed in spec order. The file
/// appears at its path only on [`SafetensorsWriter::finish`].
pub struct SafetensorsWriter {
    file: AtomicFile,
    specs: Vec<TensorSpec>,
    next: usize,
}

impl SafetensorsWriter {
    pub fn create(
        path: impl AsRef<Path>,
        specs: Vec<TensorSpec>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let path = path.as_ref();
        let header = encode_header(&specs, metadata)?;
        let mut file = AtomicFile::create(path)?;
        file.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(|e| Error::io(path, e))?;
        file.write_all(&header).map_err(|e| Error::io(path, e))?;
        Ok(SafetensorsWriter {
            file,
            specs,
            next: 0,
        })
    }

    /// The spec of the tensor expected next, if any.
    pub fn next_spec(&self) -> Option<&TensorSpec> {
        self.specs.get(self.next)
    }

    /// Appends the bytes of the next tensor, which must be `name`.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let spec = self.specs.get(self.next).ok_or_else(|| {
            Error::InvalidArgument(format!("tensor {name:?} written past the last spec"))
        })?;
        if spec.name != name || spec.nbytes() != bytes.len() {
            return Err(Error::InvalidArgument(format!(
                "expected tensor {:?} of {} bytes next, got {name:?} of {} bytes",
                spec.name,
                spec.nbytes(),
                bytes.len()
            )));
        }
        let target = self.file.target().to_path_buf();
        self.file
            .write_all(bytes)
            .map_err(|e| Error::io(target, e))?;
        self.next += 1;
        Ok(())
    }

    /// Starts writing the bytes so far back to disk without waiting (see
    /// [`AtomicFile::start_writeback`]).
    pub fn start_writeback(&mut self) -> Result<()> {
        self.file.start_writeback()
    }

    /// Checks every tensor was written, then renames the file into place.
    pub fn finish(self) -> Result<()> {
        if self.next != self.specs.len() {
            return Err(Error::InvalidArgument(format!(
                "{}: only {} of {} tensors written",
                self.file.target().display(),
                self.next,
                self.specs.len()
            )));
        }
        self.file.commit()
    }
}

/// The JSON header for `specs` in order, space-padded to a multiple of 8 bytes.
pub(crate) fn encode_header(
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut map = Map::new();
    if !metadata.is_empty() {
        map.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("string map"),
        );
    }
    let mut offset = 0usize;
    for spec in specs {
        if spec.name == "__metadata__" || map.contains_key(&spec.name) {
            return Err(Error::InvalidArgument(format!(
                "duplicate or reserved tensor name {:?}",
                spec.name
            )));
        }
        let end = offset + spec.nbytes();
        map.insert(
            spec.name.clone(),
            serde_json::json!({"dtype": spec.dtype.as_str(), "shape": spec.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&map).expect("header serializes");
    let padding = (8 - bytes.len() % 8) % 8;
    bytes.extend(std::iter::repeat_n(b' ', padding));
    Ok(bytes)
}

/// Writes whole tensors (`(spec, bytes)` in order) to `path` atomically.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(TensorSpec, &[u8])],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let specs = tensors.iter().map(|(s, _)| s.clone()).collect();
    let mut writer = SafetensorsWriter::create(path, specs, metadata)?;
    for (spec, bytes) in tensors {
        writer.write(&spec.name, bytes)?;
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_header(header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    fn parse(bytes: &[u8]) -> Result<Header> {
        parse_header(bytes, Path::new("x.safetensors"))
    }

    #[test]
    fn roundtrip_through_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a: Vec<u8> = (0..24).collect();
        let b = vec![7u8; 2];
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        write_safetensors(
            &path,
            &[
                (TensorSpec::new("a", Dtype::F32, vec![2, 3]), &a),
                (TensorSpec::new("b", Dtype::BF16, vec![1]), &b),
            ],
            &meta,
        )
        .unwrap();
        let st = SafeTensors::open(&path).unwrap();
        assert_eq!(st.bytes("a").unwrap(), &a[..]);
        assert_eq!(st.bytes("b").unwrap(), &b[..]);
        assert_eq!(st.info("a").unwrap().shape, vec![2, 3]);
        assert_eq!(st.metadata()["format"], "pt");
        assert_eq!((st.data_start() - 8) % 8, 0);
    }

    #[test]
    fn rejects_hostile_headers() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 2, 3], "too short"),
            (u64::MAX.to_le_bytes().to_vec(), "limit"),
            (1000u64.to_le_bytes().to_vec(), "only 0 follow"),
            (file_with_header("{not json", b""), "invalid JSON"),
            (
                file_with_header(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                    &[0; 4],
                ),
                "needs 8",
            ),
            (
                file_with_header(
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                    &[0; 8],
                ),
                "cover 4 bytes",
            ),
            (
                file_with_header(
                    r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                    &[0; 6],
                ),
                "overlaps",
            ),
            (
                file_with_header(
                    r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#,
                    &[0; 8],
                ),
                "gap",
            ),
            (
                file_with_header(
                    r#"{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}"#,
                    &[0],
                ),
                "unsupported dtype",
            ),
            (
                file_with_header(
                    r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#,
                    &[0; 8],
                ),
                "overflows",
            ),
            (
                file_with_header(
                    r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551615]}}"#,
                    &[0],
                ),
                "needs 1",
            ),
        ];
        for (bytes, expected) in cases {
            let err = parse(&bytes).unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
            assert!(err.starts_with("x.safetensors:"), "{err}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Any bytes at all: the parser returns, never panics, and what it accepts is consistent.
        #[test]
        fn parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            if let Ok(h) = parse(&bytes) {
                for t in &h.tensors {
                    proptest::prop_assert!(h.data_start + t.end <= bytes.len());
                }
            }
        }

        /// Headers that are valid JSON with random entries: never a panic, accepted only if consistent.
        #[test]
        fn parser_never_panics_on_random_entries(
            entries in proptest::collection::vec(
                ("[a-c]{1,2}", proptest::sample::select(vec!["U8", "F16", "F32", "BF16", "X"]),
                 proptest::collection::vec(0u64..5, 0..3), 0u64..40, 0u64..40),
                0..4),
            data_len in 0usize..64,
        ) {
            let mut map = Map::new();
            for (name, dtype, shape, b, e) in &entries {
                map.insert(name.clone(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [b, e]}));
            }
            let bytes = file_with_header(&serde_json::to_string(&map).unwrap(), &vec![0u8; data_len]);
            if let Ok(h) = parse(&bytes) {
                let total: usize = h.tensors.iter().map(|t| t.end - t.begin).sum();
                proptest::prop_assert_eq!(total, data_len);
            }
        }
    }
}

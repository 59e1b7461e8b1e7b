//! JSONL input: files named by globs (`.jsonl` or gzip-compressed `.jsonl.gz`), read line by line
//! in batches on a reader thread, and each line turned into a [`Record`] of one of the shapes users
//! have. Field names are configurable; every error names the file, the line and the field.
//!
//! | shape            | fields (defaults)                                                          |
//! |------------------|----------------------------------------------------------------------------|
//! | raw text         | `text`                                                                     |
//! | chat             | `messages`: list of `{role, content}`                                      |
//! | prompt/completion| `prompt`, `completion` (strings, or `prompt` a message list: chat)          |
//! | preference pair  | `prompt` (string or messages) or `messages`, then `chosen`, `rejected`      |

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::Value;

use crate::error::{Error, Result};

/// Which shape the lines have. `Auto` decides per line from the fields present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    Auto,
    Text,
    Chat,
    PromptCompletion,
    Preference,
}

impl std::str::FromStr for InputFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => InputFormat::Auto,
            "text" => InputFormat::Text,
            "chat" | "messages" => InputFormat::Chat,
            "prompt_completion" | "completion" => InputFormat::PromptCompletion,
            "preference" | "dpo" => InputFormat::Preference,
            other => {
                return Err(Error::InvalidArgument(format!(
                "unknown input format {other:?} (auto, text, chat, prompt_completion, preference)"
            )))
            }
        })
    }
}

/// The JSON field names of each shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldNames {
    pub text: String,
    pub messages: String,
    pub prompt: String,
    pub completion: String,
    pub chosen: String,
    pub rejected: String,
    /// Keys inside one message.
    pub role: String,
    pub content: String,
}

impl Default for FieldNames {
    fn default() -> Self {
        FieldNames {
            text: "text".into(),
            messages: "messages".into(),
            prompt: "prompt".into(),
            completion: "completion".into(),
            chosen: "chosen".into(),
            rejected: "rejected".into(),
            role: "role".into(),
            content: "content".into(),
        }
    }
}

/// A string, or a conversation (messages normalised to `{"role", "content", ...}`).
#[derive(Debug, Clone, PartialEq)]
pub enum Turns {
    Text(String),
    Messages(Vec<Value>),
}

/// One training example as read from a line.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Text(String),
    Chat(Vec<Value>),
    PromptCompletion {
        prompt: Turns,
        completion: Turns,
    },
    Preference {
        prompt: Turns,
        chosen: Turns,
        rejected: Turns,
    },
}

/// A malformed line: where, which field, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    pub field: String,
    pub message: String,
}

impl BadLine {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        BadLine {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Parses one JSONL line into a record.
pub fn parse_record(
    line: &str,
    format: InputFormat,
    fields: &FieldNames,
) -> std::result::Result<Record, BadLine> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| BadLine::new("(line)", format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(BadLine::new("(line)", "expected a JSON object"));
    };
    let has = |k: &str| obj.get(k).is_some_and(|v| !v.is_null());
    let format = match format {
        InputFormat::Auto if has(&fields.chosen) || has(&fields.rejected) => {
            InputFormat::Preference
        }
        InputFormat::Auto if has(&fields.completion) => InputFormat::PromptCompletion,
        InputFormat::Auto if has(&fields.messages) => InputFormat::Chat,
        InputFormat::Auto if has(&fields.text) => InputFormat::Text,
        InputFormat::Auto => {
            return Err(BadLine::new(
                "(line)",
                format!(
                    "none of the fields {:?}, {:?}, {:?}, {:?}/{:?} is present",
                    fields.text, fields.messages, fields.completion, fields.chosen, fields.rejected
                ),
            ))
        }
        f => f,
    };
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    match format {
        InputFormat::Text => match get(&fields.text) {
            Some(Value::String(s)) => Ok(Record::Text(s.clone())),
            Some(_) => Err(BadLine::new(&fields.text, "must be a string")),
            None => Err(BadLine::new(&fields.text, "missing")),
        },
        InputFormat::Chat => {
            let v =
                get(&fields.messages).ok_or_else(|| BadLine::new(&fields.messages, "missing"))?;
            Ok(Record::Chat(messages(v, &fields.messages, fields)?))
        }
        InputFormat::PromptCompletion => {
            let prompt = turns(get(&fields.prompt), &fields.prompt, fields)?;
            let completion = turns(get(&fields.completion), &fields.completion, fields)?;
            Ok(Record::PromptCompletion { prompt, completion })
        }
        InputFormat::Preference => {
            let prompt = if get(&fields.prompt).is_some() {
                turns(get(&fields.prompt), &fields.prompt, fields)?
            } else if let Some(m) = get(&fields.messages) {
                Turns::Messages(messages(m, &fields.messages, fields)?)
            } else {
                return Err(BadLine::new(
                    &fields.prompt,
                    format!("missing (nor is {:?} present)", fields.messages),
                ));
            };
            let chosen = turns(get(&fields.chosen), &fields.chosen, fields)?;
            let rejected = turns(get(&fields.rejected), &fields.rejected, fields)?;
            Ok(Record::Preference {
                prompt,
                chosen,
                rejected,
            })
        }
        InputFormat::Auto => unreachable!("resolved above"),
    }
}

fn turns(
    v: Option<&Value>,
    name: &str,
    fields: &FieldNames,
) -> std::result::Result<Turns, BadLine> {
    match v {
        Some(Value::String(s)) => Ok(Turns::Text(s.clone())),
        Some(v @ Value::Array(_)) => Ok(Turns::Messages(messages(v, name, fields)?)),
        Some(_) => Err(BadLine::new(name, "must be a string or a list of messages")),
        None => Err(BadLine::new(name, "missing")),
    }
}

/// Validates a message list and renames custom role/content keys to `role`/`content`.
fn messages(
    v: &Value,
    name: &str,
    fields: &FieldNames,
) -> std::result::Result<Vec<Value>, BadLine> {
    let list = v
        .as_array()
        .ok_or_else(|| BadLine::new(name, "must be a list of messages"))?;
    if list.is_empty() {
        return Err(BadLine::new(name, "is empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let mut obj = m
                .as_object()
                .cloned()
                .ok_or_else(|| BadLine::new(format!("{name}[{i}]"), "must be an object"))?;
            let role = obj
                .remove(&fields.role)
                .ok_or_else(|| BadLine::new(format!("{name}[{i}].{}", fields.role), "missing"))?;
            if !role.is_string() {
                return Err(BadLine::new(
                    format!("{name}[{i}].{}", fields.role),
                    "must be a string",
                ));
            }
            let content = obj.remove(&fields.content).unwrap_or(Value::Null);
            if !(content.is_string() || content.is_array() || content.is_null()) {
                return Err(BadLine::new(
                    format!("{name}[{i}].{}", fields.content),
                    "must be a string or a list of parts",
                ));
            }
            obj.insert("role".into(), role);
            obj.insert("content".into(), content);
            Ok(Value::Object(obj))
        })
        .collect()
}

/// One line of input with where it came from.
#[derive(Debug, Clone)]
pub struct Line {
    pub source: usize,
    /// 1-based line number.
    pub number: u64,
    pub text: std::result::Result<String, BadLine>,
}

/// Expands globs (and plain paths) to files, each pattern's matches sorted, duplicates dropped.
pub fn expand_inputs(patterns: &[String]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for pattern in patterns {
        let is_glob = pattern.contains(['*', '?', '[']);
        if !is_glob {
            let p = PathBuf::from(pattern);
            if !p.is_file() {
                return Err(Error::io(
                    &p,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                ));
            }
            files.push(p);
            continue;
        }
        let mut matched: Vec<PathBuf> = glob::glob(pattern)
            .map_err(|e| Error::InvalidArgument(format!("bad glob {pattern:?}: {e}")))?
            .filter_map(|r| r.ok())
            .filter(|p| p.is_file())
            .collect();
        if matched.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "glob {pattern:?} matches no file"
            )));
        }
        matched.sort();
        files.extend(matched);
    }
    let mut seen = std::collections::HashSet::new();
    files.retain(|p| seen.insert(p.clone()));
    Ok(files)
}

/// Counts bytes read from the underlying (possibly compressed) file, for progress.
struct CountingReader<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Opens a file as a line reader, decompressing `.gz`.
fn open_lines(path: &Path, counter: Arc<AtomicU64>) -> Result<Box<dyn BufRead + Send>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let counted = CountingReader {
        inner: file,
        counter,
    };
    let gz = path.extension().is_some_and(|e| e == "gz");
    Ok(if gz {
        Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::read::MultiGzDecoder::new(BufReader::new(counted)),
        ))
    } else {
        Box::new(BufReader::with_capacity(1 << 20, counted))
    })
}

/// Reads every file in order and hands out lines in batches of about `batch_bytes`; blank lines
/// are skipped. `bytes_read` counts (compressed) file bytes consumed.
pub struct LineBatches {
    files: Vec<PathBuf>,
    current: Option<(usize, Box<dyn BufRead + Send>, u64)>,
    next_file: usize,
    batch_bytes: usize,
    bytes_read: Arc<AtomicU64>,
}

impl LineBatches {
    pub fn new(files: Vec<PathBuf>, batch_bytes: usize, bytes_read: Arc<AtomicU64>) -> Self {
        LineBatches {
            files,
            current: None,
            next_file: 0,
            batch_bytes,
            bytes_read,
        }
    }

    /// The next batch, or `None` at the end of the last file.
    pub fn next_batch(&mut self) -> Result<Option<Vec<Line>>> {
        let mut batch = Vec::new();
        let mut size = 0usize;
        let mut buf = Vec::new();
        while size < self.batch_bytes {
            if self.current.is_none() {
                if self.next_file == self.files.len() {
                    break;
                }
                let reader = open_lines(&self.files[self.next_file], self.bytes_read.clone())?;
                self.current = Some((self.next_file, reader, 0));
                self.next_file += 1;
            }
            let (source, reader, number) = self.current.as_mut().expect("opened above");
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| Error::io(&self.files[*source], e))?;
            if n == 0 {
                self.current = None;
                continue;
            }
            *number += 1;
            while buf.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
                buf.pop();
            }
            if buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            size += buf.len();
            let text = match std::str::from_utf8(&buf) {
                Ok(s) => Ok(s.to_string()),
                Err(e) => Err(BadLine::new(
                    "(line)",
                    format!("not UTF-8 at byte {}", e.valid_up_to()),
                )),
            };
            batch.push(Line {
                source: *source,
                number: *number,
                text,
            });
        }
        Ok(if batch.is_empty() { None } else { Some(batch) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn auto_detects_each_shape() {
        let f = FieldNames::default();
        let p = |s: &str| parse_record(s, InputFormat::Auto, &f).unwrap();
        assert_eq!(p(r#"{"text": "a"}"#), Record::Text("a".into()));
        assert!(
            matches!(p(r#"{"messages": [{"role": "user", "content": "x"}]}"#), Record::Chat(m) if m.len() == 1)
        );
        assert!(matches!(
            p(r#"{"prompt": "a", "completion": "b"}"#),
            Record::PromptCompletion { .. }
        ));
        assert!(matches!(
            p(r#"{"prompt": "a", "chosen": "b", "rejected": "c"}"#),
            Record::Preference { .. }
        ));
    }

    #[test]
    fn errors_name_the_field() {
        let f = FieldNames::default();
        let e = |s: &str| parse_record(s, InputFormat::Auto, &f).unwrap_err();
        assert_eq!(e(r#"{"text": 3}"#).field, "text");
        assert_eq!(
            e(r#"{"messages": [{"content": "x"}]}"#).field,
            "messages[0].role"
        );
        assert_eq!(e(r#"{"prompt": "a", "chosen": "b"}"#).field, "rejected");
        assert!(e("{oops").message.contains("invalid JSON"));
        assert!(e(r#"{"other": 1}"#).message.contains("none of the fields"));
    }

    #[test]
    fn custom_field_names() {
        let f = FieldNames {
            messages: "conversations".into(),
            role: "from".into(),
            content: "value".into(),
            ..FieldNames::default()
        };
        let r = parse_record(
            r#"{"conversations": [{"from": "user", "value": "hi"}]}"#,
            InputFormat::Chat,
            &f,
        )
        .unwrap();
        assert_eq!(
            r,
            Record::Chat(vec![serde_json::json!({"role": "user", "content": "hi"})])
        );
    }

    #[test]
    fn reads_plain_and_gzip_files_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("a.jsonl");
        std::fs::write(&plain, "{\"text\": \"1\"}\n\n{\"text\": \"2\"}\r\n").unwrap();
        let gz = dir.path().join("b.jsonl.gz");
        let mut enc =
            flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        enc.write_all(b"{\"text\": \"3\"}\n{\"text\": \"4\"}")
            .unwrap();
        enc.finish().unwrap();
        let files = expand_inputs(&[format!("{}/*.jsonl*", dir.path().display())]).unwrap();
        assert_eq!(files, vec![plain, gz]);
        let counter = Arc::new(AtomicU64::new(0));
        let mut batches = LineBatches::new(files, 1, counter.clone());
        let mut got = Vec::new();
        while let Some(b) = batches.next_batch().unwrap() {
            got.extend(b.into_iter().map(|l| (l.source, l.number, l.text.unwrap())));
        }
        let want = vec![
            (0, 1, "{\"text\": \"1\"}".to_string()),
            (0, 3, "{\"text\": \"2\"}".to_string()),
            (1, 1, "{\"text\": \"3\"}".to_string()),
            (1, 2, "{\"text\": \"4\"}".to_string()),
        ];
        assert_eq!(got, want);
        assert!(counter.load(Ordering::Relaxed) > 0);
    }
}

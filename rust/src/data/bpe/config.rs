//! Reading a tokenizer.json into the parts the fast encoder reproduces, or deciding that it uses
//! something we do not reproduce exactly (then the caller falls back to the `tokenizers` crate).

use std::collections::HashMap;

use serde_json::Value;

use super::added::AddedFlags;
use super::pretokenize::SplitRegex;
use crate::{Error, Result};

/// The tokenizer.json settings that decide the ids, once validated.
#[derive(Debug)]
pub struct Spec {
    /// Model vocabulary: token string (byte-level alphabet) -> id.
    pub vocab: HashMap<String, u32>,
    /// Merges in rank order, as `(left, right)` token strings.
    pub merges: Vec<(String, String)>,
    pub ignore_merges: bool,
    /// Normalizer: NFC or nothing.
    pub nfc: bool,
    /// `Split` stages before the `ByteLevel` pre-tokenizer, in order.
    pub splits: Vec<SplitRegex>,
    pub add_prefix_space: bool,
    /// Whether `ByteLevel` itself splits with the GPT-2 regex.
    pub byte_level_regex: bool,
    /// Added tokens in file order: content, flags, whether matched on normalized text.
    pub added: Vec<AddedSpec>,
}

/// One entry of `added_tokens`.
#[derive(Debug, Clone)]
pub struct AddedSpec {
    pub content: String,
    pub flags: AddedFlags,
    pub normalized: bool,
}

fn format_error(place: &str, message: impl Into<String>) -> Error {
    Error::format("tokenizer.json", place, message)
}

fn flag(v: &Value, key: &str, default: bool) -> Option<bool> {
    match v.get(key) {
        None | Some(Value::Null) => Some(default),
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => None,
    }
}

fn is_null_or_empty_string(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    }
}

/// Parses and validates `json`. `Ok(None)`: a valid tokenizer we do not reproduce exactly.
pub fn parse(json: &str) -> Result<Option<Spec>> {
    let root: Value = serde_json::from_str(json)
        .map_err(|e| format_error(&format!("line {}", e.line()), e.to_string()))?;
    let Some(root) = root.as_object() else {
        return Err(format_error("top level", "expected a JSON object"));
    };
    // Truncation and padding change the ids; we only encode plain text.
    for key in ["truncation", "padding"] {
        if !matches!(root.get(key), None | Some(Value::Null)) {
            return Ok(None);
        }
    }
    let Some(nfc) = parse_normalizer(root.get("normalizer").unwrap_or(&Value::Null)) else {
        return Ok(None);
    };
    let Some((splits, add_prefix_space, byte_level_regex)) =
        parse_pre_tokenizer(root.get("pre_tokenizer").unwrap_or(&Value::Null))
    else {
        return Ok(None);
    };
    let model = root
        .get("model")
        .ok_or_else(|| format_error("model", "missing"))?;
    let Some((vocab, merges, ignore_merges)) = parse_model(model)? else {
        return Ok(None);
    };
    let Some(added) = parse_added(root.get("added_tokens").unwrap_or(&Value::Null))? else {
        return Ok(None);
    };
    Ok(Some(Spec {
        vocab,
        merges,
        ignore_merges,
        nfc,
        splits,
        add_prefix_space,
        byte_level_regex,
        added,
    }))
}

/// `Some(true)` for NFC, `Some(false)` for none, `None` for anything else.
fn parse_normalizer(v: &Value) -> Option<bool> {
    match v {
        Value::Null => Some(false),
        _ => match v.get("type")?.as_str()? {
            "NFC" => Some(true),
            "Sequence" => {
                let items = v.get("normalizers")?.as_array()?;
                match items.as_slice() {
                    [] => Some(false),
                    [one] => parse_normalizer(one),
                    _ => None,
                }
            }
            _ => None,
        },
    }
}

/// `(splits, add_prefix_space, byte_level_regex)` for `ByteLevel` or
/// `Sequence[Split.., ByteLevel]`; `None` for anything else.
fn parse_pre_tokenizer(v: &Value) -> Option<(Vec<SplitRegex>, bool, bool)> {
    let stages: Vec<&Value> = match v.get("type")?.as_str()? {
        "ByteLevel" => vec![v],
        "Sequence" => v.get("pretokenizers")?.as_array()?.iter().collect(),
        _ => return None,
    };
    let (byte_level, splits) = stages.split_last()?;
    if byte_level.get("type")?.as_str()? != "ByteLevel" {
        return None;
    }
    let splits = splits
        .iter()
        .map(|s| {
            let is_split = s.get("type")?.as_str()? == "Split"
                && s.get("behavior")?.as_str()? == "Isolated"
                && !flag(s, "invert", false)?;
            if !is_split {
                return None;
            }
            SplitRegex::from_pattern(s.get("pattern")?.get("Regex")?.as_str()?)
        })
        .collect::<Option<Vec<_>>>()?;
    let add_prefix_space = flag(byte_level, "add_prefix_space", true)?;
    let use_regex = flag(byte_level, "use_regex", true)?;
    flag(byte_level, "trim_offsets", true)?; // offsets only; ids do not depend on it
    Some((splits, add_prefix_space, use_regex))
}

type Model = (HashMap<String, u32>, Vec<(String, String)>, bool);

fn parse_model(v: &Value) -> Result<Option<Model>> {
    if let Some(kind) = v.get("type") {
        if kind.as_str() != Some("BPE") {
            return Ok(None);
        }
    }
    let dropout_off = match v.get("dropout") {
        None | Some(Value::Null) => true,
        Some(d) => d.as_f64() == Some(0.0),
    };
    if !dropout_off
        || !is_null_or_empty_string(v.get("continuing_subword_prefix"))
        || !is_null_or_empty_string(v.get("end_of_word_suffix"))
    {
        return Ok(None);
    }
    let Some(ignore_merges) = flag(v, "ignore_merges", false) else {
        return Ok(None);
    };
    let vocab: HashMap<String, u32> = serde_json::from_value(
        v.get("vocab")
            .cloned()
            .ok_or_else(|| format_error("model.vocab", "missing"))?,
    )
    .map_err(|e| format_error("model.vocab", e.to_string()))?;
    let raw_merges = v
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| format_error("model.merges", "missing or not a list"))?;
    let mut merges = Vec::with_capacity(raw_merges.len());
    for (i, m) in raw_merges.iter().enumerate() {
        let pair = match m {
            Value::String(s) => {
                let parts: Vec<&str> = s.split(' ').collect();
                match parts.as_slice() {
                    [a, b] => Some((a.to_string(), b.to_string())),
                    _ => None,
                }
            }
            Value::Array(a) => match a.as_slice() {
                [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                _ => None,
            },
            _ => None,
        };
        let pair = pair.ok_or_else(|| {
            format_error(
                &format!("model.merges[{i}]"),
                "expected \"left right\" or [left, right]",
            )
        })?;
        merges.push(pair);
    }
    Ok(Some((vocab, merges, ignore_merges)))
}

fn parse_added(v: &Value) -> Result<Option<Vec<AddedSpec>>> {
    let items = match v {
        Value::Null => return Ok(Some(Vec::new())),
        Value::Array(items) => items,
        _ => return Err(format_error("added_tokens", "expected a list")),
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let place = format!("added_tokens[{i}]");
        let content = item
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| format_error(&place, "missing \"content\""))?;
        let read = |key: &str, default: bool| {
            flag(item, key, default)
                .ok_or_else(|| format_error(&format!("{place}.{key}"), "expected a boolean"))
        };
        out.push(AddedSpec {
            content: content.to_string(),
            flags: AddedFlags {
                single_word: read("single_word", false)?,
                lstrip: read("lstrip", false)?,
                rstrip: read("rstrip", false)?,
            },
            normalized: read("normalized", true)?,
        });
    }
    Ok(Some(out))
}

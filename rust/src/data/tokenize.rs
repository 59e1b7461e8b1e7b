//! The tokenizer facade: a Hugging Face `tokenizer.json` read by the `tokenizers` crate, plus the
//! special tokens (BOS, EOS, PAD) named by `tokenizer_config.json` / `special_tokens_map.json`.
//!
//! Encoding goes through one place, [`Tokenizer::encode`]: a fast encoder is tried first when one
//! was built for this tokenizer (see [`build_fast_encoder`]), the `tokenizers` crate otherwise.
//! Both give the same ids; the crate stays the reference and the fallback for every model type.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::error::{Error, Result};

/// An encoder that reproduces `tokenizers`' `encode(text, add_special_tokens=false)` token for
/// token (normalizer, pre-tokenizer, model, added and special tokens; no post-processor).
pub trait FastEncoder: Send + Sync {
    fn encode(&self, text: &str) -> Vec<u32>;
}

impl FastEncoder for super::bpe::FastBpe {
    fn encode(&self, text: &str) -> Vec<u32> {
        super::bpe::FastBpe::encode(self, text)
    }
}

/// The one place a faster encoder is plugged in: given the text of `tokenizer.json`, an encoder
/// identical to the `tokenizers` crate ([`super::bpe::FastBpe`] for the byte-level BPE models),
/// or `None` when this tokenizer type is not supported exactly (the crate then does everything).
/// `FERROTUNE_REFERENCE_TOKENIZER=1` forces the crate, to compare the two.
fn build_fast_encoder(tokenizer_json: &str) -> Option<Arc<dyn FastEncoder>> {
    if std::env::var_os("FERROTUNE_REFERENCE_TOKENIZER").is_some_and(|v| v != "0") {
        return None;
    }
    match super::bpe::FastBpe::from_tokenizer_json(tokenizer_json) {
        Ok(Some(fast)) => Some(Arc::new(fast)),
        _ => None,
    }
}

/// Token ids and, for each, its byte span `(start, end)` in the text.
pub type IdsWithOffsets = (Vec<u32>, Vec<(usize, usize)>);

/// Special-token ids the pipeline needs. Any may be absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<(String, u32)>,
    pub eos: Option<(String, u32)>,
    pub pad: Option<(String, u32)>,
    pub unk: Option<(String, u32)>,
}

/// A tokenizer loaded from a folder (or a `tokenizer.json` path) with its configuration.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    fast: Option<Arc<dyn FastEncoder>>,
    /// Ids the post-processor puts around a single sequence (e.g. `[BOS]` for Llama).
    special_prefix: Vec<u32>,
    special_suffix: Vec<u32>,
    special: SpecialTokens,
    /// `tokenizer_config.json`, when present.
    config: Option<Value>,
    /// sha256 of `tokenizer.json`, recorded in manifests.
    sha256: String,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `path`: a folder holding `tokenizer.json` (and optionally `tokenizer_config.json`,
    /// `special_tokens_map.json`, `chat_template.jinja`), or a `tokenizer.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (dir, json_path) = if path.is_dir() {
            (path.to_path_buf(), path.join("tokenizer.json"))
        } else {
            (
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                path.to_path_buf(),
            )
        };
        let text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
        let mut inner: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e| Error::format(&json_path, "tokenizer", format!("{e}")))?;
        inner
            .with_truncation(None)
            .map_err(|e| Error::format(&json_path, "truncation", format!("{e}")))?;
        inner.with_padding(None);
        let config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let special_map = read_json_if_exists(&dir.join("special_tokens_map.json"))?;
        let fast = build_fast_encoder(&text);
        let sha256 = crate::data::sha256_hex(text.as_bytes());
        let mut tok = Tokenizer {
            inner,
            fast,
            special_prefix: Vec::new(),
            special_suffix: Vec::new(),
            special: SpecialTokens::default(),
            config,
            sha256,
            path: json_path,
        };
        tok.special = tok.detect_special_tokens(special_map.as_ref());
        let (prefix, suffix) = tok.post_processor_affixes()?;
        tok.special_prefix = prefix;
        tok.special_suffix = suffix;
        Ok(tok)
    }

    /// Token ids of `text`. With `add_special`, the post-processor's tokens (e.g. BOS) are added
    /// as `transformers` does for `tokenizer(text)`.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let core = match &self.fast {
            Some(fast) => fast.encode(text),
            None => self.crate_encode(text)?,
        };
        if !add_special || (self.special_prefix.is_empty() && self.special_suffix.is_empty()) {
            return Ok(core);
        }
        let mut ids =
            Vec::with_capacity(self.special_prefix.len() + core.len() + self.special_suffix.len());
        ids.extend_from_slice(&self.special_prefix);
        ids.extend_from_slice(&core);
        ids.extend_from_slice(&self.special_suffix);
        Ok(ids)
    }

    /// `encode` of many texts on every core, in order.
    pub fn encode_batch(&self, texts: &[&str], add_special: bool) -> Result<Vec<Vec<u32>>> {
        use rayon::prelude::*;
        texts
            .par_iter()
            .map(|t| self.encode(t, add_special))
            .collect()
    }

    /// Ids and the byte span in `text` of each token (no post-processor tokens), always from the
    /// `tokenizers` crate. Loss masks of chat turns are computed from these spans.
    pub fn encode_with_offsets(&self, text: &str) -> Result<IdsWithOffsets> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::InvalidArgument(format!("tokenizer failed: {e}")))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// The `tokenizers` crate alone, without special tokens (the reference the fast path matches).
    pub fn crate_encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::InvalidArgument(format!("tokenizer failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids the post-processor puts before one sequence (e.g. `[BOS]`).
    pub fn special_prefix(&self) -> &[u32] {
        &self.special_prefix
    }

    /// Ids the post-processor puts after one sequence.
    pub fn special_suffix(&self) -> &[u32] {
        &self.special_suffix
    }

    /// Whether a fast encoder is in use for this tokenizer.
    pub fn uses_fast_encoder(&self) -> bool {
        self.fast.is_some()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Overrides the EOS token by its text (e.g. `--eos-token`).
    pub fn set_eos(&mut self, token: &str) -> Result<()> {
        let id = self.token_to_id(token).ok_or_else(|| {
            Error::InvalidArgument(format!("EOS token {token:?} is not in the vocabulary"))
        })?;
        self.special.eos = Some((token.to_string(), id));
        Ok(())
    }

    /// `tokenizer_config.json`, if the folder has one.
    pub fn config(&self) -> Option<&Value> {
        self.config.as_ref()
    }

    /// sha256 of `tokenizer.json`.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ids the post-processor adds before and after one sequence, found by encoding a probe with
    /// and without special tokens.
    fn post_processor_affixes(&self) -> Result<(Vec<u32>, Vec<u32>)> {
        let probe = "a";
        let bare = self.crate_encode(probe)?;
        let with = self
            .inner
            .encode_fast(probe, true)
            .map_err(|e| Error::InvalidArgument(format!("tokenizer failed: {e}")))?;
        let with = with.get_ids();
        match find_subslice(with, &bare) {
            Some(at) if !bare.is_empty() => {
                Ok((with[..at].to_vec(), with[at + bare.len()..].to_vec()))
            }
            _ => Err(Error::format(
                &self.path,
                "post_processor",
                "adds tokens in a way ferrotune cannot reproduce (the bare encoding is not a slice of the full one)",
            )),
        }
    }

    /// BOS/EOS/PAD/UNK from `tokenizer_config.json`, then `special_tokens_map.json`, then common
    /// names in the vocabulary (EOS and PAD only).
    fn detect_special_tokens(&self, special_map: Option<&Value>) -> SpecialTokens {
        let lookup = |key: &str| -> Option<(String, u32)> {
            [self.config.as_ref(), special_map]
                .into_iter()
                .flatten()
                .find_map(|cfg| token_text(cfg.get(key)?))
                .and_then(|text| self.token_to_id(&text).map(|id| (text, id)))
        };
        let guess = |names: &[&str]| -> Option<(String, u32)> {
            names
                .iter()
                .find_map(|n| self.token_to_id(n).map(|id| (n.to_string(), id)))
        };
        let eos = lookup("eos_token").or_else(|| {
            guess(&[
                "<|endoftext|>",
                "<|end_of_text|>",
                "</s>",
                "<eos>",
                "<|im_end|>",
            ])
        });
        let pad = lookup("pad_token").or_else(|| guess(&["<|pad|>", "<pad>", "[PAD]"]));
        SpecialTokens {
            bos: lookup("bos_token"),
            eos,
            pad,
            unk: lookup("unk_token"),
        }
    }
}

/// A special token as written in a config: a string or `{"content": ...}` (an `AddedToken`).
pub fn token_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_json_if_exists(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::format(path, format!("line {}", e.line()), format!("{e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn find_subslice(haystack: &[u32], needle: &[u32]) -> Option<usize> {
    if needle.len() > haystack.len() {
        return None;
    }
    (0..=haystack.len() - needle.len()).find(|&i| &haystack[i..i + needle.len()] == needle)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny byte-level BPE tokenizer.json written by hand: bytes plus a few merges and
    /// special tokens, enough to exercise every path of the pipeline without downloads.
    pub(crate) fn tiny_tokenizer_json() -> String {
        // The byte-level alphabet: printable bytes map to themselves, others to U+0100.. .
        let mut chars = Vec::new();
        let mut n = 0u32;
        for b in 0u32..256 {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
            let c = if printable {
                char::from_u32(b).unwrap()
            } else {
                let c = char::from_u32(256 + n).unwrap();
                n += 1;
                c
            };
            chars.push(c);
        }
        let specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"];
        let mut vocab = serde_json::Map::new();
        for (i, s) in specials.iter().enumerate() {
            vocab.insert(s.to_string(), (i as u32).into());
        }
        for (i, c) in chars.iter().enumerate() {
            vocab.insert(c.to_string(), (specials.len() + i).into());
        }
        let merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"];
        for (next, m) in (vocab.len() as u32..).zip(merges) {
            vocab.insert(m.replace(' ', ""), next.into());
        }
        let added: Vec<Value> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges}
        })
        .to_string()
    }

    pub(crate) fn tiny_tokenizer_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<s>", "eos_token": {"content": "</s>", "__type": "AddedToken"}, "pad_token": "<pad>"}"#,
        )
        .unwrap();
        dir
    }

    #[test]
    fn specials_come_from_the_config_and_the_post_processor() {
        let dir = tiny_tokenizer_dir();
        let tok = Tokenizer::from_file(dir.path()).unwrap();
        let sp = tok.special_tokens();
        assert_eq!(sp.bos, Some(("<s>".into(), 0)));
        assert_eq!(sp.eos, Some(("</s>".into(), 1)));
        assert_eq!(sp.pad, Some(("<pad>".into(), 2)));
        let bare = tok.encode("the cat", false).unwrap();
        let full = tok.encode("the cat", true).unwrap();
        assert_eq!(full[0], 0);
        assert_eq!(&full[1..], &bare[..]);
        // special tokens in the text are matched whole
        let ids = tok.encode("<|im_start|>the", false).unwrap();
        assert_eq!(ids[0], 3);
    }

    #[test]
    fn offsets_cover_the_text() {
        let dir = tiny_tokenizer_dir();
        let tok = Tokenizer::from_file(dir.path()).unwrap();
        let text = "in the héllo <|im_end|>";
        let (ids, offsets) = tok.encode_with_offsets(text).unwrap();
        assert_eq!(ids, tok.encode(text, false).unwrap());
        assert_eq!(offsets.first().unwrap().0, 0);
        assert_eq!(offsets.last().unwrap().1, text.len());
    }
}

//! A fast byte-level BPE encoder, token for token identical to HF `tokenizers` on the tokenizers
//! it accepts (GPT-2 style, Llama 3, Qwen2/2.5 and their kin); everything else is refused with
//! `Ok(None)` so the caller falls back to the `tokenizers` crate.
//!
//! The pipeline per text, as HF runs it:
//! 1. added tokens with `normalized: false` are cut out of the raw text (`added.rs`);
//! 2. each remaining piece is normalized (NFC or nothing), then added tokens with
//!    `normalized: true` are cut out of it;
//! 3. each remaining piece is pre-tokenized: the `Split` stages (`pretokenize.rs`), then
//!    `ByteLevel` (optional leading space, optional GPT-2 split);
//! 4. each pre-token's bytes are merged to ids (`merge.rs`), through a per-thread cache of
//!    pre-token -> ids, since natural text repeats its words.
//!
//! Byte-level BPE maps each byte to a printable character before the model sees it; that map is
//! a bijection, so we run the model directly on bytes with the vocabulary mapped back once.
//! No post-processor template is applied: the caller adds BOS/EOS.

mod added;
mod config;
mod merge;
mod pretokenize;
mod short_table;
mod unicode_classes;

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use rayon::prelude::*;
use rustc_hash::FxHashMap;
use thread_local::ThreadLocal;
use unicode_normalization_alignments::UnicodeNormalization;

use crate::Result;
use added::{AddedFlags, AddedTokens, Piece};
pub use merge::{merge_reference, Merges};
pub use pretokenize::SplitRegex;
use short_table::{pack_short, ShortTable};

/// Pre-tokens of this many bytes or more are not cached (as in HF).
const CACHE_MAX_WORD: usize = 256;
/// A thread's cache is cleared when it holds this many words (bounds memory on odd inputs).
const CACHE_MAX_ENTRIES: usize = 1 << 19;

/// A byte-level BPE tokenizer's encoder. Cheap to share between threads (`&self` everywhere).
pub struct FastBpe {
    /// Token id of each single byte.
    byte_ids: [u32; 256],
    merges: Merges,
    /// With `ignore_merges`: whole pre-tokens found in the vocabulary (byte strings) -> id.
    whole_words: Option<FxHashMap<Box<[u8]>, u32>>,
    /// Added tokens matched on the raw text, and on the normalized text.
    raw_added: Option<AddedTokens>,
    normalized_added: Option<AddedTokens>,
    nfc: bool,
    splits: Vec<SplitRegex>,
    add_prefix_space: bool,
    byte_level_regex: bool,
    caches: ThreadLocal<RefCell<WordCache>>,
}

/// Marks a cache value holding one token id inline.
const SINGLE: u32 = u32::MAX;

/// One thread's memory of pre-token -> ids, plus scratch space for the merge loop.
#[derive(Default)]
struct WordCache {
    /// Words of up to 15 bytes, packed with their length into 16 bytes (`short_table.rs`):
    /// hashing and comparing them costs a few instructions, not a `memcmp`. Values as in `words`.
    short_words: ShortTable,
    /// Longer words -> `(start, len)` in `ids`, or `(id, SINGLE)` for a one-token word.
    words: FxHashMap<Box<[u8]>, (u32, u32)>,
    ids: Vec<u32>,
    scratch: Vec<u32>,
    prefixed: String,
}

/// NFC exactly as HF computes it: same crate, same (Unicode 9) tables. Newer Unicode versions
/// compose and reorder some recently assigned characters differently.
fn nfc(text: &str) -> String {
    text.nfc().map(|(c, _)| c).collect()
}

/// GPT-2's byte -> character map: printable Latin-1 bytes map to themselves, the other 68 bytes
/// to U+0100.. in byte order.
fn byte_to_char() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut out = ['\0'; 256];
    let mut shifted = 0;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).unwrap_or('\0')
        } else {
            shifted += 1;
            char::from_u32(0x100 + shifted - 1).unwrap_or('\0')
        };
    }
    out
}

/// The bytes a byte-level token string stands for, or `None` if it has a character outside the
/// 256-character alphabet (such a token cannot come out of byte-level text).
fn token_bytes(token: &str, char_to_byte: &HashMap<char, u8>) -> Option<Vec<u8>> {
    token
        .chars()
        .map(|c| char_to_byte.get(&c).copied())
        .collect()
}

impl FastBpe {
    /// Builds the encoder from a tokenizer.json document. `Ok(None)` when the tokenizer uses
    /// anything not reproduced exactly (another model or pre-tokenizer, an unknown split regex,
    /// another normalizer, dropout, subword affixes, truncation/padding, a vocabulary missing
    /// some byte); errors name the malformed field.
    pub fn from_tokenizer_json(json: &str) -> Result<Option<FastBpe>> {
        let Some(spec) = config::parse(json)? else {
            return Ok(None);
        };
        let chars = byte_to_char();
        let char_to_byte: HashMap<char, u8> = (0..=255u8).map(|b| (chars[b as usize], b)).collect();

        let mut byte_ids = [0u32; 256];
        for b in 0..256 {
            match spec.vocab.get(chars[b].encode_utf8(&mut [0; 4]) as &str) {
                Some(&id) => byte_ids[b] = id,
                None => return Ok(None), // HF would need unk/byte fallback here
            }
        }

        let mut merges = Merges::default();
        for (rank, (left, right)) in spec.merges.iter().enumerate() {
            let id = |t: &str| {
                spec.vocab.get(t).copied().ok_or_else(|| {
                    crate::Error::format(
                        "tokenizer.json",
                        format!("model.merges[{rank}]"),
                        format!("token {t:?} is not in the vocabulary"),
                    )
                })
            };
            let merged = id(&format!("{left}{right}"))?;
            merges.insert(id(left)?, id(right)?, rank as u32, merged);
        }

        let whole_words = spec.ignore_merges.then(|| {
            spec.vocab
                .iter()
                .filter_map(|(t, &id)| Some((token_bytes(t, &char_to_byte)?.into(), id)))
                .collect()
        });

        // Ids of added tokens, assigned as HF's `AddedVocabulary::add_tokens` does.
        let mut added_ids: HashMap<&str, u32> = HashMap::new();
        let mut by_id: BTreeMap<u32, &config::AddedSpec> = BTreeMap::new();
        let mut next_id = spec.vocab.len() as u32;
        for token in spec.added.iter().filter(|t| !t.content.is_empty()) {
            let id = match added_ids
                .get(token.content.as_str())
                .or_else(|| spec.vocab.get(&token.content))
            {
                Some(&id) => id,
                None => {
                    next_id += 1;
                    next_id - 1
                }
            };
            added_ids.insert(&token.content, id);
            by_id.insert(id, token);
        }
        let mut raw = Vec::new();
        let mut normalized = Vec::new();
        for (&id, token) in &by_id {
            if token.normalized {
                let pattern = if spec.nfc {
                    nfc(&token.content)
                } else {
                    token.content.clone()
                };
                normalized.push((pattern, id, token.flags));
            } else {
                raw.push((token.content.clone(), id, token.flags));
            }
        }
        let build = |patterns: Vec<(String, u32, AddedFlags)>| -> Option<Option<AddedTokens>> {
            if patterns.is_empty() {
                Some(None)
            } else {
                AddedTokens::new(patterns).map(Some)
            }
        };
        let (Some(raw_added), Some(normalized_added)) = (build(raw), build(normalized)) else {
            return Ok(None);
        };

        Ok(Some(FastBpe {
            byte_ids,
            merges,
            whole_words,
            raw_added,
            normalized_added,
            nfc: spec.nfc,
            splits: spec.splits,
            add_prefix_space: spec.add_prefix_space,
            byte_level_regex: spec.byte_level_regex,
            caches: ThreadLocal::new(),
        }))
    }

    /// The ids of `text` (no BOS/EOS or other template).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 4 + 4);
        self.encode_into(text, &mut out);
        out
    }

    /// Appends the ids of `text` to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        let cell = self.caches.get_or_default();
        let mut cache = cell.borrow_mut();
        if cache.words.len() + cache.short_words.len() > CACHE_MAX_ENTRIES {
            cache.short_words.clear();
            cache.words.clear();
            cache.ids.clear();
        }
        match &self.raw_added {
            None => self.encode_raw_piece(text, &mut cache, out),
            Some(added) => added.split(text, |piece| match piece {
                Piece::Token(id) => out.push(id),
                Piece::Text(t) => self.encode_raw_piece(t, &mut cache, out),
            }),
        }
    }

    /// The ids of each text, encoded in parallel on the rayon pool.
    pub fn encode_batch(&self, texts: &[&str]) -> Vec<Vec<u32>> {
        texts.par_iter().map(|t| self.encode(t)).collect()
    }

    /// Normalizes a piece of raw text, cuts out normalized added tokens, pre-tokenizes the rest.
    fn encode_raw_piece(&self, piece: &str, cache: &mut WordCache, out: &mut Vec<u32>) {
        let normalized = self.normalize(piece);
        match &self.normalized_added {
            None => self.pre_tokenize(&normalized, 0, cache, out),
            Some(added) => added.split(&normalized, |p| match p {
                Piece::Token(id) => out.push(id),
                Piece::Text(t) => self.pre_tokenize(t, 0, cache, out),
            }),
        }
    }

    fn normalize<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if !self.nfc || text.is_ascii() {
            Cow::Borrowed(text)
        } else {
            Cow::Owned(nfc(text))
        }
    }

    /// Runs the pre-tokenizer stages from `stage` on, then the model on each pre-token.
    fn pre_tokenize(&self, text: &str, stage: usize, cache: &mut WordCache, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        if let Some(&split) = self.splits.get(stage) {
            if stage + 1 == self.splits.len() && !self.byte_level_regex && !self.add_prefix_space {
                // ByteLevel changes nothing more: these pieces are the words (Llama 3, Qwen2).
                self.encode_words(text, split, cache, out);
            } else {
                split.split(text, |p| self.pre_tokenize(p, stage + 1, cache, out));
            }
            return;
        }
        // ByteLevel: an optional leading space, then the optional GPT-2 split.
        let mut prefixed = std::mem::take(&mut cache.prefixed);
        let text = if self.add_prefix_space && !text.starts_with(' ') {
            prefixed.clear();
            prefixed.push(' ');
            prefixed.push_str(text);
            prefixed.as_str()
        } else {
            text
        };
        if self.byte_level_regex {
            self.encode_words(text, SplitRegex::Gpt2, cache, out);
        } else {
            self.encode_word(text.as_bytes(), cache, out);
        }
        cache.prefixed = prefixed;
    }

    /// Splits `text` into words and encodes each, a few words behind the scanner: each word's
    /// cache slot is prefetched when it is found and looked up `LAG` words later, so the memory
    /// latency of cold words overlaps with the work on the words in between.
    fn encode_words(
        &self,
        text: &str,
        split: SplitRegex,
        cache: &mut WordCache,
        out: &mut Vec<u32>,
    ) {
        const LAG: usize = 8;
        let mut pending: [&[u8]; LAG] = [&[]; LAG];
        let mut found = 0usize;
        split.split(text, |word| {
            let word = word.as_bytes();
            if let Some(key) = pack_short(word) {
                cache.short_words.prefetch(&key);
            }
            if found >= LAG {
                self.encode_word(pending[found % LAG], cache, out);
            }
            pending[found % LAG] = word;
            found += 1;
        });
        for i in found.saturating_sub(LAG)..found {
            self.encode_word(pending[i % LAG], cache, out);
        }
    }

    /// The model on one pre-token, through the cache.
    #[inline]
    fn encode_word(&self, word: &[u8], cache: &mut WordCache, out: &mut Vec<u32>) {
        let short = pack_short(word);
        let hit = match short {
            Some(key) => cache.short_words.get(&key),
            None => cache.words.get(word).copied(),
        };
        if let Some((start, len)) = hit {
            if len == SINGLE {
                out.push(start); // one token, stored inline: no second memory access
            } else {
                out.extend_from_slice(&cache.ids[start as usize..(start + len) as usize]);
            }
            return;
        }
        let mut ids = std::mem::take(&mut cache.scratch);
        ids.clear();
        match self.whole_words.as_ref().and_then(|w| w.get(word)) {
            Some(&id) => ids.push(id),
            None => {
                ids.extend(word.iter().map(|&b| self.byte_ids[b as usize]));
                merge::merge(&mut ids, &self.merges);
            }
        }
        out.extend_from_slice(&ids);
        if word.len() < CACHE_MAX_WORD {
            let value = if let [id] = ids[..] {
                (id, SINGLE)
            } else {
                let start = cache.ids.len() as u32;
                cache.ids.extend_from_slice(&ids);
                (start, ids.len() as u32)
            };
            match short {
                Some(key) => cache.short_words.insert(key, value),
                None => {
                    cache.words.insert(word.into(), value);
                }
            }
        }
        cache.scratch = ids;
    }
}

#[cfg(test)]
mod tests;

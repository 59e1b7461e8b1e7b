//! Records to token ids plus a loss mask, and the pre-shifted labels the training loop consumes.
//!
//! A [`Doc`] holds the ids of one sequence and which of its tokens are *trained*: token i is
//! trained when the model is taught to produce it, so the label of position i-1 is `ids[i]`.
//! [`labels`] turns that into the contract's pre-shifted labels:
//!
//! ```text
//! labels[t] = ids[t+1] if trained[t+1] else -100      (t < n-1)
//! labels[n-1] = -100                                   (never predict across a document boundary)
//! ```
//!
//! Loss modes: `all` trains every token; `assistant` (chat default) trains every assistant turn
//! with its end-of-turn token; `completion` trains only the final completion (the last assistant
//! turn of a chat, or the `completion` / `chosen` / `rejected` part). Raw text always trains all.

use std::ops::Range;

use serde_json::Value;

use super::jsonl::{BadLine, Record, Turns};
use super::template::ChatTemplate;
use super::tokenize::Tokenizer;

/// Label value of positions that take no loss.
pub const IGNORE: i32 = -100;

/// Which tokens take loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossMode {
    /// `all` for raw text, `assistant` for chat, `completion` for prompt/completion and pairs.
    Auto,
    All,
    Assistant,
    Completion,
}

impl std::str::FromStr for LossMode {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Ok(match s {
            "auto" => LossMode::Auto,
            "all" => LossMode::All,
            "assistant" | "assistant_only" => LossMode::Assistant,
            "completion" | "completion_only" => LossMode::Completion,
            other => {
                return Err(crate::Error::InvalidArgument(format!(
                    "unknown loss mode {other:?} (auto, all, assistant, completion)"
                )))
            }
        })
    }
}

/// One tokenized sequence. `trained == None` means every token is trained.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Doc {
    pub ids: Vec<u32>,
    pub trained: Option<Vec<bool>>,
}

impl Doc {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Positions whose label is not `IGNORE`.
    pub fn trained_targets(&self) -> usize {
        match &self.trained {
            None => self.ids.len().saturating_sub(1),
            Some(t) => t.iter().skip(1).filter(|&&b| b).count(),
        }
    }

    /// Tokens `range` as a document of their own (a fragment of a split document).
    pub fn slice(&self, range: Range<usize>) -> Doc {
        Doc {
            ids: self.ids[range.clone()].to_vec(),
            trained: self.trained.as_ref().map(|t| t[range].to_vec()),
        }
    }

    pub fn truncate(&mut self, len: usize) {
        self.ids.truncate(len);
        if let Some(t) = &mut self.trained {
            t.truncate(len);
        }
    }
}

/// Pre-shifted labels of a document (see the module docs), written into `out` (len == doc len).
pub fn write_labels(doc: &Doc, out: &mut [i32]) {
    let n = doc.ids.len();
    debug_assert_eq!(out.len(), n);
    if n == 0 {
        return;
    }
    for t in 0..n - 1 {
        let trained = doc.trained.as_ref().is_none_or(|m| m[t + 1]);
        out[t] = if trained {
            doc.ids[t + 1] as i32
        } else {
            IGNORE
        };
    }
    out[n - 1] = IGNORE;
}

/// Trained flags from token byte offsets: a token is trained when it overlaps a span (an empty
/// offset, e.g. trimmed whitespace, counts when it sits inside a span).
pub fn mask_from_spans(offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<bool> {
    offsets
        .iter()
        .map(|&(s, e)| {
            spans.iter().any(|sp| {
                if s == e {
                    sp.start <= s && s < sp.end
                } else {
                    s < sp.end && e > sp.start
                }
            })
        })
        .collect()
}

/// Turns records into documents: tokenizer, optional chat template, loss mode.
pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: Option<&'a ChatTemplate>,
    pub loss: LossMode,
}

impl Encoder<'_> {
    /// The sequences of a record: one, or two (chosen, rejected) for a preference pair.
    pub fn encode(&self, record: &Record) -> Result<Vec<Doc>, BadLine> {
        match record {
            Record::Text(text) => Ok(vec![self.text_doc(text)?]),
            Record::Chat(messages) => {
                let only_last = self.loss == LossMode::Completion;
                Ok(vec![self.chat_doc(messages, None, only_last, "messages")?])
            }
            Record::PromptCompletion { prompt, completion } => {
                Ok(vec![self.pair_part(prompt, completion, "completion")?])
            }
            Record::Preference {
                prompt,
                chosen,
                rejected,
            } => Ok(vec![
                self.pair_part(prompt, chosen, "chosen")?,
                self.pair_part(prompt, rejected, "rejected")?,
            ]),
        }
    }

    /// Raw text: the tokenizer's own special tokens (e.g. BOS), the text, then EOS once.
    fn text_doc(&self, text: &str) -> Result<Doc, BadLine> {
        let mut ids = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| BadLine::new("text", e.to_string()))?;
        if let Some((_, eos)) = &self.tokenizer.special_tokens().eos {
            if ids.last() != Some(eos) {
                ids.push(*eos);
            }
        }
        Ok(Doc { ids, trained: None })
    }

    /// A prompt and its completion. Plain strings are concatenated (BOS from the tokenizer, EOS
    /// appended and trained); a message-list prompt goes through the chat template with the
    /// completion as the assistant reply.
    fn pair_part(&self, prompt: &Turns, completion: &Turns, field: &str) -> Result<Doc, BadLine> {
        match (prompt, completion) {
            (Turns::Text(p), Turns::Text(c)) => self.plain_completion(p, c, field),
            _ => {
                let mut messages = as_messages(prompt, "user");
                let reply = as_messages(completion, "assistant");
                let replies = reply
                    .iter()
                    .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
                    .count();
                messages.extend(reply);
                let keep_last = match self.loss {
                    LossMode::Assistant => None,
                    _ => Some(replies),
                };
                self.chat_doc(&messages, keep_last, false, field)
            }
        }
    }

    fn plain_completion(
        &self,
        prompt: &str,
        completion: &str,
        field: &str,
    ) -> Result<Doc, BadLine> {
        let text = format!("{prompt}{completion}");
        let (core, offsets) = self
            .tokenizer
            .encode_with_offsets(&text)
            .map_err(|e| BadLine::new(field, e.to_string()))?;
        let completion_span = prompt.len()..text.len();
        let mut trained = mask_from_spans(&offsets, std::slice::from_ref(&completion_span));
        let prefix = self.tokenizer.special_prefix();
        let mut ids = Vec::with_capacity(prefix.len() + core.len() + 1);
        ids.extend_from_slice(prefix);
        ids.extend_from_slice(&core);
        trained.splice(0..0, std::iter::repeat_n(false, prefix.len()));
        if let Some((_, eos)) = &self.tokenizer.special_tokens().eos {
            if ids.last() != Some(eos) {
                ids.push(*eos);
                trained.push(true);
            }
        }
        Ok(self.finish(ids, trained))
    }

    /// A conversation through the template. `keep_last = Some(k)` trains only the last k
    /// assistant turns; `only_last` is `keep_last = Some(1)`.
    fn chat_doc(
        &self,
        messages: &[Value],
        keep_last: Option<usize>,
        only_last: bool,
        field: &str,
    ) -> Result<Doc, BadLine> {
        let template = self.template.ok_or_else(|| {
            BadLine::new(
                field,
                "conversations need a chat template, and the tokenizer has none (pass --chat-template)",
            )
        })?;
        let (text, mut spans) = template
            .render_with_spans(messages, false)
            .map_err(|e| BadLine::new(field, e.to_string()))?;
        let keep = if only_last { Some(1) } else { keep_last };
        if let Some(k) = keep {
            let drop = spans.len().saturating_sub(k);
            spans.drain(..drop);
        }
        if self.loss == LossMode::All {
            let ids = self
                .tokenizer
                .encode(&text, false)
                .map_err(|e| BadLine::new(field, e.to_string()))?;
            return Ok(Doc { ids, trained: None });
        }
        let (ids, offsets) = self
            .tokenizer
            .encode_with_offsets(&text)
            .map_err(|e| BadLine::new(field, e.to_string()))?;
        let trained = mask_from_spans(&offsets, &spans);
        Ok(self.finish(ids, trained))
    }

    fn finish(&self, ids: Vec<u32>, trained: Vec<bool>) -> Doc {
        if self.loss == LossMode::All {
            Doc { ids, trained: None }
        } else {
            Doc {
                ids,
                trained: Some(trained),
            }
        }
    }
}

/// A string as one message of `role`, or the message list as is.
fn as_messages(turns: &Turns, role: &str) -> Vec<Value> {
    match turns {
        Turns::Text(s) => vec![serde_json::json!({"role": role, "content": s})],
        Turns::Messages(m) => m.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenize::tests::tiny_tokenizer_dir;

    #[test]
    fn labels_are_shifted_and_end_with_ignore() {
        let doc = Doc {
            ids: vec![10, 11, 12, 13],
            trained: Some(vec![false, false, true, true]),
        };
        let mut out = vec![0; 4];
        write_labels(&doc, &mut out);
        assert_eq!(out, vec![IGNORE, 12, 13, IGNORE]);
        assert_eq!(doc.trained_targets(), 2);
        let all = Doc {
            ids: vec![1, 2, 3],
            trained: None,
        };
        let mut out = vec![0; 3];
        write_labels(&all, &mut out);
        assert_eq!(out, vec![2, 3, IGNORE]);
    }

    #[test]
    fn spans_select_overlapping_tokens() {
        let offsets = [(0, 2), (2, 5), (5, 5), (5, 9), (9, 9)];
        assert_eq!(
            mask_from_spans(&offsets, std::slice::from_ref(&(3..9))),
            vec![false, true, true, true, false]
        );
    }

    #[test]
    fn chat_masks_train_replies_and_end_of_turn() {
        let dir = tiny_tokenizer_dir();
        let tok = Tokenizer::from_file(dir.path()).unwrap();
        let template = ChatTemplate::new(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            vec![],
        )
        .unwrap();
        let enc = Encoder {
            tokenizer: &tok,
            template: Some(&template),
            loss: LossMode::Assistant,
        };
        let record = Record::Chat(
            serde_json::json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the"}])
                .as_array()
                .unwrap()
                .clone(),
        );
        let doc = enc.encode(&record).unwrap().remove(0);
        let trained: Vec<String> = doc
            .ids
            .iter()
            .zip(doc.trained.as_ref().unwrap())
            .filter(|(_, &t)| t)
            .map(|(&id, _)| tok.id_to_token(id).unwrap())
            .collect();
        assert_eq!(trained, vec!["t", "he", "<|im_end|>"]);
    }
}

//! Added tokens (special or not), found in the text before pre-tokenization, exactly as HF
//! `tokenizers`' `AddedVocabulary` finds them: leftmost-longest matching, then per match the
//! `single_word` check (no word character, regex `\w`, touching either side), `lstrip` (absorb
//! the whitespace run before it, but not text an earlier match took) and `rstrip` (absorb the
//! whitespace run after it). The pieces between matches go on to the model.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

/// How an added token is matched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddedFlags {
    pub single_word: bool,
    pub lstrip: bool,
    pub rstrip: bool,
}

/// One matching set: the tokens matched on raw text, or those matched on normalized text.
#[derive(Debug)]
pub struct AddedTokens {
    automaton: AhoCorasick,
    /// Per pattern: the token id and its flags.
    tokens: Vec<(u32, AddedFlags)>,
}

/// A piece of the text: an added token's id, or text for the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    Token(u32),
    Text(&'a str),
}

impl AddedTokens {
    /// A matching set over `(pattern, id, flags)`; `None` when a pattern repeats (HF cannot
    /// build that set either) or the automaton cannot be built.
    pub fn new(patterns: Vec<(String, u32, AddedFlags)>) -> Option<Self> {
        let mut seen = std::collections::HashSet::new();
        if !patterns.iter().all(|(p, _, _)| seen.insert(p.as_str())) {
            return None;
        }
        let automaton = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(patterns.iter().map(|(p, _, _)| p.as_str()))
            .ok()?;
        let tokens = patterns.into_iter().map(|(_, id, f)| (id, f)).collect();
        Some(AddedTokens { automaton, tokens })
    }

    /// Calls `emit` with the pieces of `text` in order (HF's `find_matches`, line for line,
    /// including its quirks when an `rstrip` run overlaps the next match).
    pub fn split<'a>(&self, text: &'a str, mut emit: impl FnMut(Piece<'a>)) {
        let mut start_offset = 0;
        for m in self.automaton.find_iter(text) {
            let (id, flags) = self.tokens[m.pattern().as_usize()];
            let mut start = m.start();
            let mut stop = m.end();
            if flags.single_word {
                let start_space = start == 0 || !ends_with_word(&text[..start]);
                let stop_space = stop == text.len() || !starts_with_word(&text[stop..]);
                if !start_space || !stop_space {
                    continue;
                }
            }
            if flags.lstrip {
                start = leading_edge_of_trailing_space(&text[..start]).max(start_offset);
            }
            if flags.rstrip {
                stop += leading_space_len(&text[stop..]);
            }
            if start_offset < start {
                emit(Piece::Text(&text[start_offset..start]));
            }
            emit(Piece::Token(id));
            start_offset = stop;
        }
        if start_offset != text.len() {
            emit(Piece::Text(&text[start_offset..]));
        }
    }
}

/// Regex `\w$` (the `regex` crate's Unicode word characters).
fn ends_with_word(s: &str) -> bool {
    s.chars()
        .next_back()
        .is_some_and(regex_syntax::is_word_character)
}

/// Regex `^\w`.
fn starts_with_word(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(regex_syntax::is_word_character)
}

/// Start of `\s*$` in `s` (White_Space, as the `regex` crate's `\s`).
fn leading_edge_of_trailing_space(s: &str) -> usize {
    s.len()
        - s.chars()
            .rev()
            .take_while(|c| c.is_whitespace())
            .map(char::len_utf8)
            .sum::<usize>()
}

/// Length of `^\s*` in `s`.
fn leading_space_len(s: &str) -> usize {
    s.chars()
        .take_while(|c| c.is_whitespace())
        .map(char::len_utf8)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces<'a>(set: &AddedTokens, text: &'a str) -> Vec<Piece<'a>> {
        let mut out = Vec::new();
        set.split(text, |p| out.push(p));
        out
    }

    fn flags(single_word: bool, lstrip: bool, rstrip: bool) -> AddedFlags {
        AddedFlags {
            single_word,
            lstrip,
            rstrip,
        }
    }

    #[test]
    fn longest_match_and_strip_flags() {
        let set = AddedTokens::new(vec![
            ("<s>".into(), 1, flags(false, false, false)),
            ("<s>x".into(), 2, flags(false, false, false)),
            ("[M]".into(), 3, flags(false, true, true)),
            ("cat".into(), 4, flags(true, false, false)),
        ])
        .unwrap();
        use Piece::{Text, Token};
        assert_eq!(
            pieces(&set, "a<s>xb<s>"),
            vec![Text("a"), Token(2), Text("b"), Token(1)]
        );
        assert_eq!(
            pieces(&set, "a  [M]  b"),
            vec![Text("a"), Token(3), Text("b")]
        );
        assert_eq!(
            pieces(&set, "cat concat cat."),
            vec![Token(4), Text(" concat "), Token(4), Text(".")]
        );
        assert_eq!(pieces(&set, ""), vec![]);
    }
}

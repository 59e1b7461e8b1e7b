//! Hand-written scanners equivalent to the split regexes of the common byte-level BPE tokenizers,
//! as HF `tokenizers` runs them (Oniguruma, Perl-style ordered alternation, `Isolated` splits).
//!
//! Each of these regexes matches a non-empty prefix at every position, so the pieces tile the
//! text and a scanner is one function: "the match starting at `i` ends where?". The regexes:
//!
//! - GPT-2 (`ByteLevel { use_regex: true }`):
//!   `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//! - Llama 3 (`Split`), and Qwen2 which only replaces `\p{N}{1,3}` by `\p{N}`:
//!   `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
//!
//! Backtracking worked out once: `\s+(?!\S)` on a whitespace run followed by a non-space takes the
//! run minus its last character (and fails on a one-character run); `\s*[\r\n]+` takes the run up
//! to and including its last `\r`/`\n`. The character classes are Oniguruma's own tables
//! (`unicode_classes.rs`), and `(?i:s)` also matches U+017F (long s), as Oniguruma folds case.

use std::sync::OnceLock;

use super::unicode_classes::{LETTER, NUMBER, SPACE};

/// The split regexes we reproduce exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitRegex {
    /// The GPT-2 regex built into `ByteLevel`.
    Gpt2,
    /// Llama 3 (tiktoken cl100k style, digits in groups of up to three).
    Llama3,
    /// Qwen2 / Qwen2.5 (as Llama 3, but every digit alone).
    Qwen2,
}

/// The exact pattern strings, as they appear in tokenizer.json files.
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl SplitRegex {
    /// The scanner for a tokenizer.json `Split` pattern, if it is one we reproduce.
    pub fn from_pattern(pattern: &str) -> Option<Self> {
        match pattern {
            GPT2_PATTERN => Some(SplitRegex::Gpt2),
            LLAMA3_PATTERN => Some(SplitRegex::Llama3),
            QWEN2_PATTERN => Some(SplitRegex::Qwen2),
            _ => None,
        }
    }

    /// The regex source this scanner reproduces.
    pub fn pattern(self) -> &'static str {
        match self {
            SplitRegex::Gpt2 => GPT2_PATTERN,
            SplitRegex::Llama3 => LLAMA3_PATTERN,
            SplitRegex::Qwen2 => QWEN2_PATTERN,
        }
    }

    /// Calls `emit` with each piece of `text`, in order; the pieces concatenate to `text`.
    #[inline]
    pub fn split<'a>(self, text: &'a str, mut emit: impl FnMut(&'a str)) {
        let bytes = text.as_bytes();
        let mut start = 0;
        while start < bytes.len() {
            let end = match self {
                SplitRegex::Gpt2 => gpt2_match_end(bytes, start),
                SplitRegex::Llama3 => llama_match_end(bytes, start, 3),
                SplitRegex::Qwen2 => llama_match_end(bytes, start, 1),
            };
            debug_assert!(end > start && text.is_char_boundary(end));
            emit(&text[start..end]);
            start = end;
        }
    }
}

/// The character classes the regexes distinguish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Class {
    Letter = 0,
    Number = 1,
    Space = 2,
    Other = 3,
}

const fn ascii_class(b: u8) -> Class {
    match b {
        b'a'..=b'z' | b'A'..=b'Z' => Class::Letter,
        b'0'..=b'9' => Class::Number,
        b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ' => Class::Space,
        _ => Class::Other,
    }
}

static ASCII_CLASS: [Class; 128] = {
    let mut t = [Class::Other; 128];
    let mut b = 0;
    while b < 128 {
        t[b] = ascii_class(b as u8);
        b += 1;
    }
    t
};

fn in_ranges(ranges: &[(u32, u32)], c: u32) -> bool {
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// The class of any code point, from the range tables (the plain reference for `class_of`).
pub fn class_from_tables(c: u32) -> Class {
    if in_ranges(LETTER, c) {
        Class::Letter
    } else if in_ranges(NUMBER, c) {
        Class::Number
    } else if in_ranges(SPACE, c) {
        Class::Space
    } else {
        Class::Other
    }
}

/// The Basic Multilingual Plane classified once (64 KiB), so CJK and other scripts cost one load.
fn bmp_table() -> &'static [Class] {
    static TABLE: OnceLock<Box<[Class]>> = OnceLock::new();
    TABLE.get_or_init(|| (0..0x10000u32).map(class_from_tables).collect())
}

/// The class of code point `c`.
#[inline]
pub fn class_of(c: u32) -> Class {
    if c < 128 {
        ASCII_CLASS[c as usize]
    } else if c < 0x10000 {
        bmp_table()[c as usize]
    } else {
        class_from_tables(c)
    }
}

/// Decodes the UTF-8 character at `i` (the input is valid UTF-8): `(code point, byte length)`.
#[inline(always)]
fn decode(bytes: &[u8], i: usize) -> (u32, usize) {
    let b0 = bytes[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (bytes[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (
            ((b0 & 0x0F) << 12)
                | ((bytes[i + 1] as u32 & 0x3F) << 6)
                | (bytes[i + 2] as u32 & 0x3F),
            3,
        )
    } else {
        (
            ((b0 & 0x07) << 18)
                | ((bytes[i + 1] as u32 & 0x3F) << 12)
                | ((bytes[i + 2] as u32 & 0x3F) << 6)
                | (bytes[i + 3] as u32 & 0x3F),
            4,
        )
    }
}

/// Class and byte length of the character at `i`.
#[inline(always)]
fn class_at(bytes: &[u8], i: usize) -> (Class, usize) {
    let b = bytes[i];
    if b < 0x80 {
        (ASCII_CLASS[b as usize], 1)
    } else {
        let (c, n) = decode(bytes, i);
        (class_of(c), n)
    }
}

/// End of the maximal run of `class` characters starting at `i`.
#[inline(always)]
fn run_end(bytes: &[u8], mut i: usize, class: Class) -> usize {
    while i < bytes.len() {
        let (c, n) = class_at(bytes, i);
        if c != class {
            break;
        }
        i += n;
    }
    i
}

/// `(end, start of the last character)` of the whitespace run starting at `i`, plus the end of its
/// last `\r` or `\n` (0 when it has none).
#[inline(always)]
fn space_run(bytes: &[u8], mut i: usize) -> (usize, usize, usize) {
    let mut last = i;
    let mut after_newline = 0;
    while i < bytes.len() {
        let (c, n) = class_at(bytes, i);
        if c != Class::Space {
            break;
        }
        if bytes[i] == b'\r' || bytes[i] == b'\n' {
            after_newline = i + 1;
        }
        last = i;
        i += n;
    }
    (i, last, after_newline)
}

/// `\s+(?!\S)|\s+` at a whitespace character `i`: the run, minus its last character when a
/// non-space follows and that leaves at least one.
#[inline(always)]
fn trailing_space_rule(bytes: &[u8], i: usize, end: usize, last: usize) -> usize {
    if end == bytes.len() || last == i {
        end
    } else {
        last
    }
}

/// Length of the contraction suffix (`s t re ve m ll d`, after the apostrophe) at `i`.
/// With `fold`, ASCII case is ignored and U+017F (long s, bytes C5 BF) matches `s`.
#[inline(always)]
fn contraction_len(bytes: &[u8], i: usize, fold: bool) -> Option<usize> {
    let at = |k: usize| -> u8 {
        let b = bytes.get(i + k).copied().unwrap_or(0);
        if fold {
            b.to_ascii_lowercase()
        } else {
            b
        }
    };
    match at(0) {
        b's' | b't' | b'm' | b'd' => Some(1),
        b'r' | b'v' if at(1) == b'e' => Some(2),
        b'l' if at(1) == b'l' => Some(2),
        0xC5 if fold && at(1) == 0xBF => Some(2),
        _ => None,
    }
}

/// End of the GPT-2 regex match starting at `i`.
fn gpt2_match_end(bytes: &[u8], i: usize) -> usize {
    if bytes[i] == b'\'' {
        if let Some(n) = contraction_len(bytes, i + 1, false) {
            return i + 1 + n;
        }
    }
    let (class, n) = class_at(bytes, i);
    match class {
        Class::Space => {
            // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+` with the optional space.
            if bytes[i] == b' ' && i + 1 < bytes.len() {
                let (next, _) = class_at(bytes, i + 1);
                if next != Class::Space {
                    return run_end(bytes, i + 1, next);
                }
            }
            let (end, last, _) = space_run(bytes, i);
            trailing_space_rule(bytes, i, end, last)
        }
        _ => run_end(bytes, i + n, class),
    }
}

/// End of the Llama 3 / Qwen2 regex match starting at `i`; `max_digits` is 3 or 1.
fn llama_match_end(bytes: &[u8], i: usize, max_digits: usize) -> usize {
    let b = bytes[i];
    if b == b'\'' {
        if let Some(n) = contraction_len(bytes, i + 1, true) {
            return i + 1 + n;
        }
    }
    let (class, n) = class_at(bytes, i);
    match class {
        Class::Letter => return run_end(bytes, i + n, Class::Letter),
        Class::Number => {
            let mut end = i + n;
            for _ in 1..max_digits {
                if end >= bytes.len() {
                    break;
                }
                let (c, m) = class_at(bytes, end);
                if c != Class::Number {
                    break;
                }
                end += m;
            }
            return end;
        }
        _ => {}
    }
    // `[^\r\n\p{L}\p{N}]?\p{L}+`: any space (but CR/LF) or other character before letters.
    let next = if i + n < bytes.len() {
        Some(class_at(bytes, i + n).0)
    } else {
        None
    };
    if b != b'\r' && b != b'\n' && next == Some(Class::Letter) {
        return run_end(bytes, i + n, Class::Letter);
    }
    // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
    let others_from = if class == Class::Other {
        Some(i)
    } else if b == b' ' && next == Some(Class::Other) {
        Some(i + 1)
    } else {
        None
    };
    if let Some(from) = others_from {
        let mut end = run_end(bytes, from, Class::Other);
        while end < bytes.len() && (bytes[end] == b'\r' || bytes[end] == b'\n') {
            end += 1;
        }
        return end;
    }
    // A whitespace run: `\s*[\r\n]+`, then `\s+(?!\S)`, then `\s+`.
    let (end, last, after_newline) = space_run(bytes, i);
    if after_newline > 0 {
        return after_newline;
    }
    trailing_space_rule(bytes, i, end, last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The pieces of `text` under the real regex (fancy-regex backtracks like Oniguruma).
    fn regex_pieces(kind: SplitRegex, text: &str) -> Vec<String> {
        static COMPILED: OnceLock<Vec<fancy_regex::Regex>> = OnceLock::new();
        let all = COMPILED.get_or_init(|| {
            KINDS
                .iter()
                .map(|k| fancy_regex::Regex::new(k.pattern()).unwrap())
                .collect()
        });
        let re = &all[KINDS.iter().position(|k| *k == kind).unwrap()];
        let mut out = Vec::new();
        let mut last = 0;
        for m in re.find_iter(text) {
            let m = m.unwrap();
            if m.start() > last {
                out.push(text[last..m.start()].to_string());
            }
            out.push(m.as_str().to_string());
            last = m.end();
        }
        if last < text.len() {
            out.push(text[last..].to_string());
        }
        out
    }

    fn scanner_pieces(kind: SplitRegex, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        kind.split(text, |p| out.push(p.to_string()));
        out
    }

    const KINDS: [SplitRegex; 3] = [SplitRegex::Gpt2, SplitRegex::Llama3, SplitRegex::Qwen2];

    /// Characters whose classes every Unicode version agrees on, plus the tricky ASCII ones.
    const ALPHABET: &[char] = &[
        'a', 'b', 's', 'S', 't', 'T', 'r', 'R', 'e', 'E', 'v', 'V', 'm', 'M', 'l', 'L', 'd', 'D',
        'ſ', 'é', 'ß', 'Ж', '中', '文', 'ア', 'ع', 'א', '0', '1', '9', '٣', '²', 'Ⅻ', '½', ' ',
        ' ', ' ', '\t', '\n', '\r', '\u{0B}', '\u{0C}', '\u{85}', '\u{3000}', '\u{2028}', '\'',
        '"', '.', ',', '!', '?', '-', '_', '(', '<', '|', '>', '😀', '\u{301}', '\u{200D}', '🇫',
        '€',
    ];

    fn alphabet_string() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(ALPHABET), 0..40)
            .prop_map(|cs| cs.into_iter().collect())
    }

    #[test]
    fn hand_picked_strings_match_the_regexes() {
        let cases = [
            "",
            "Hello world",
            "  leading and trailing  ",
            "a   b\t\tc\n\n\nd \n e",
            "I'm he's they'll we'VE 'S 'ſ 'x '",
            "12345 6789012 ٣٤٥",
            "!!! ???\n\n\r\nend",
            "中文字符 and emoji 😀😀 here",
            "tabs\t\t\tand\u{3000}ideographic",
            "x \r\n\r\n  \t y",
            "   ",
            "\n",
            " !",
            "e\u{301}tude",
        ];
        for kind in KINDS {
            for text in cases {
                assert_eq!(
                    scanner_pieces(kind, text),
                    regex_pieces(kind, text),
                    "{kind:?} on {text:?}"
                );
            }
        }
    }

    #[test]
    fn classes_agree_with_the_tables_everywhere() {
        for c in (0..0x11_0000u32).filter(|c| *c < 0x3000 || c % 7 == 0) {
            assert_eq!(class_of(c), class_from_tables(c), "U+{c:04X}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        #[test]
        fn scanners_match_the_regexes(text in alphabet_string()) {
            for kind in KINDS {
                prop_assert_eq!(scanner_pieces(kind, &text), regex_pieces(kind, &text));
            }
        }
    }
}

//! Chat templates: the model's own Jinja `chat_template` (from `tokenizer_config.json` or
//! `chat_template.jinja`) rendered with minijinja the way `transformers.apply_chat_template` renders
//! it with jinja2: `trim_blocks` and `lstrip_blocks` on, loop controls, the globals
//! `raise_exception` and `strftime_now`, a `tojson` that writes like Python's `json.dumps`, and
//! Python string/dict methods (`.strip()`, `.title()`, `.items()`, ...) through minijinja-contrib.
//!
//! Loss masks need to know which characters belong to assistant turns. Templates rarely mark them
//! (`{% generation %}` is optional and stripped here), so [`ChatTemplate::render_with_spans`]
//! finds them by rendering prefixes: for assistant message i, the text added between
//! `render(messages[..i], add_generation_prompt=true)` and `render(messages[..=i])` is the reply
//! plus its end-of-turn token, which is exactly what the model must learn to produce.

use std::ops::Range;
use std::path::Path;

use minijinja::value::{Kwargs, Value as JinjaValue};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::Value;

use crate::error::{Error, Result};

/// Template evaluation budget (minijinja fuel) per render: a hostile template cannot spin forever.
const FUEL_PER_RENDER: u64 = 50_000_000;

/// A compiled chat template plus the special-token strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// `bos_token`, `eos_token`, `unk_token`, `pad_token` as the template sees them.
    special_tokens: Vec<(String, String)>,
}

impl ChatTemplate {
    /// Compiles `source`. `special_tokens` are `(name, text)` pairs such as `("bos_token", "<s>")`.
    pub fn new(source: &str, special_tokens: Vec<(String, String)>) -> Result<Self> {
        let source = strip_generation_tags(source);
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters"),
        );
        env.set_fuel(Some(FUEL_PER_RENDER));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.clone())
            .map_err(|e| template_error("chat_template", &e))?;
        Ok(ChatTemplate {
            env,
            source,
            special_tokens,
        })
    }

    /// The template of a tokenizer folder: `chat_template.jinja`, else `chat_template` of
    /// `tokenizer_config.json` (a string, or a list of named templates of which "default" is used).
    pub fn from_tokenizer_dir(
        dir: &Path,
        config: Option<&Value>,
        special_tokens: Vec<(String, String)>,
    ) -> Result<Option<Self>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            return Self::new(&source, special_tokens).map(Some);
        }
        let Some(entry) = config.and_then(|c| c.get("chat_template")) else {
            return Ok(None);
        };
        let config_path = dir.join("tokenizer_config.json");
        let source = match entry {
            Value::String(s) => s.clone(),
            Value::Array(list) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template")?.as_str())
                .ok_or_else(|| {
                    Error::format(
                        &config_path,
                        "chat_template",
                        "a list without a usable template",
                    )
                })?
                .to_string(),
            Value::Null => return Ok(None),
            _ => {
                return Err(Error::format(
                    &config_path,
                    "chat_template",
                    "must be a string or a list of {name, template}",
                ))
            }
        };
        Self::new(&source, special_tokens)
            .map(Some)
            .map_err(|e| match e {
                Error::Format { message, .. } => {
                    Error::format(config_path, "chat_template", message)
                }
                other => other,
            })
    }

    /// The template text (after `{% generation %}` markers were removed).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (a JSON list of `{role, content, ...}`) as `apply_chat_template(...,
    /// tokenize=False)` would.
    pub fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").expect("added in new");
        let mut ctx: Vec<(String, JinjaValue)> = vec![
            (
                "messages".into(),
                JinjaValue::from(minijinja::value::Serde(messages)),
            ),
            (
                "add_generation_prompt".into(),
                JinjaValue::from(add_generation_prompt),
            ),
            ("tools".into(), JinjaValue::from(())),
            ("documents".into(), JinjaValue::from(())),
        ];
        for (name, text) in &self.special_tokens {
            ctx.push((name.clone(), JinjaValue::from(text.as_str())));
        }
        let ctx = JinjaValue::from(
            ctx.into_iter()
                .collect::<std::collections::BTreeMap<_, _>>(),
        );
        template
            .render(ctx)
            .map_err(|e| Error::InvalidArgument(describe(&e)))
    }

    /// The whole conversation rendered, and the byte ranges of each assistant turn in it (reply
    /// plus end-of-turn marker; trailing whitespace after the marker is left out).
    /// `only_last` keeps the last assistant turn alone (completion-only loss).
    pub fn render_with_spans(
        &self,
        messages: &[Value],
        only_last: bool,
    ) -> Result<(String, Vec<Range<usize>>)> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        let mut search_from = 0;
        for (i, message) in messages.iter().enumerate() {
            if message.get("role").and_then(Value::as_str) != Some("assistant") {
                continue;
            }
            let prefix = self.render(&messages[..i], true)?;
            let upto = self.render(&messages[..=i], false)?;
            let span = if upto.starts_with(&prefix) && full.starts_with(&prefix) {
                prefix.len()..turn_end(&full, &upto, prefix.len())
            } else {
                // The template rewrites earlier turns (e.g. drops reasoning): locate the reply
                // text itself after the previous turn.
                let content = message.get("content").and_then(Value::as_str).unwrap_or("");
                let content = content.trim();
                match full[search_from..].find(content) {
                    Some(at) if !content.is_empty() => {
                        search_from + at..search_from + at + content.len()
                    }
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "cannot locate assistant message {i} in the rendered conversation"
                        )))
                    }
                }
            };
            let trimmed_end = span.start + full[span.clone()].trim_end().len();
            search_from = span.end;
            if trimmed_end > span.start {
                spans.push(span.start..trimmed_end);
            }
        }
        if only_last && spans.len() > 1 {
            spans.drain(..spans.len() - 1);
        }
        Ok((full, spans))
    }
}

/// Where the turn rendered as `upto` ends inside `full` (both start with the same `start` bytes).
/// Usually `upto` is a prefix of `full`; templates that close a conversation differently than a
/// turn (e.g. Phi-3 appends EOS only at the very end) diverge, and the turn then ends at the
/// last line break or tag end (`>`, `]`) before the divergence.
fn turn_end(full: &str, upto: &str, start: usize) -> usize {
    let common = full
        .bytes()
        .zip(upto.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    if common == upto.len() {
        return common;
    }
    let mut end = common;
    while !full.is_char_boundary(end) {
        end -= 1;
    }
    match full[start..end].rfind(['\n', '>', ']']) {
        Some(at) => start + at + 1,
        None => end,
    }
}

/// Removes `{% generation %}` / `{% endgeneration %}` (any whitespace control), which mark
/// assistant text for transformers' own mask; minijinja does not know the tag and the spans are
/// found by prefix rendering anyway.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start + 2..start + len];
        let word = tag.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if word != "generation" && word != "endgeneration" {
            out.push_str(&rest[start..start + len + 2]);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

fn raise_exception(message: String) -> std::result::Result<JinjaValue, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC date/time formatted like Python's `strftime`
/// (the directives chat templates use: %d %m %Y %y %b %B %a %A %H %M %S %j %e %%).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(secs, &format)
}

/// Formats the UTC time `unix_secs` with a subset of `strftime` directives.
pub fn strftime(unix_secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{:02}", secs_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs_of_day % 60)),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: JinjaValue, kwargs: Kwargs) -> std::result::Result<JinjaValue, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_python_json(&value, indent, sort_keys.unwrap_or(false), 0, &mut out)?;
    Ok(JinjaValue::from_safe_string(out))
}

/// Python `json.dumps` layout: `", "`/`": "` without indent, newline + indent with it; map keys
/// in insertion order unless `sort_keys`.
fn write_python_json(
    value: &JinjaValue,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), JinjaError> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                let f = f64::try_from(value.clone())?;
                out.push_str(&format!("{f:?}"));
            }
        }
        ValueKind::String => write_json_string(value.as_str().unwrap_or_default(), out),
        ValueKind::Map => {
            let mut keys: Vec<JinjaValue> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json_string(&key.to_string(), out);
                out.push_str(": ");
                write_python_json(&value.get_item(key)?, indent, sort_keys, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => {
            let items: Vec<JinjaValue> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, sort_keys, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
    }
    Ok(())
}

fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn template_error(place: &str, e: &JinjaError) -> Error {
    Error::format("chat_template", place, describe(e))
}

/// A template error with its cause chain (minijinja nests the message of `raise_exception`).
fn describe(e: &JinjaError) -> String {
    let mut text = match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.to_string(),
    };
    if let Some(line) = e.line() {
        text.push_str(&format!(" (template line {line})"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msgs(v: Value) -> Vec<Value> {
        v.as_array().unwrap().clone()
    }

    #[test]
    fn assistant_spans_include_the_end_of_turn_marker() {
        let t = ChatTemplate::new(CHATML, vec![]).unwrap();
        let m = msgs(serde_json::json!([
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "sure"}]));
        let (text, spans) = t.render_with_spans(&m, false).unwrap();
        let parts: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(parts, ["hello<|im_end|>", "sure<|im_end|>"]);
        let (_, last) = t.render_with_spans(&m, true).unwrap();
        assert_eq!(&text[last[0].clone()], "sure<|im_end|>");
    }

    #[test]
    fn raise_exception_and_pycompat_methods() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{% for m in messages %}{{ m['content'].strip().title() }}{% endfor %}",
            vec![],
        )
        .unwrap();
        let ok = t
            .render(
                &msgs(serde_json::json!([{"role": "user", "content": "  hello world "}])),
                false,
            )
            .unwrap();
        assert_eq!(ok, "Hello World");
        let err = t
            .render(
                &msgs(serde_json::json!([{"role": "system", "content": "x"}])),
                false,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("no system role"), "{err}");
    }

    #[test]
    fn generation_tags_are_removed() {
        let s =
            strip_generation_tags("a{% generation %}b{%- endgeneration -%}c{% if x %}d{% endif %}");
        assert_eq!(s, "abc{% if x %}d{% endif %}");
    }

    #[test]
    fn strftime_matches_known_dates() {
        // 2024-07-26 12:34:56 UTC was a Friday, day 208 of a leap year.
        let t = 1_721_997_296;
        assert_eq!(
            strftime(t, "%d %b %Y|%B %A %a|%H:%M:%S|%j|%m/%y|%%"),
            "26 Jul 2024|July Friday Fri|12:34:56|208|07/24|%"
        );
        assert_eq!(strftime(0, "%Y-%m-%d %A"), "1970-01-01 Thursday");
    }

    #[test]
    fn tojson_writes_like_python() {
        let t = ChatTemplate::new(
            "{% set v = {'b': [1, 2.5, 'é\\n', none, true], 'a': {}} %}{{ v | tojson }}|{{ v | tojson(indent=2, sort_keys=true) }}",
            vec![],
        )
        .unwrap();
        let out = t.render(&[], false).unwrap();
        assert_eq!(
            out,
            "{\"b\": [1, 2.5, \"é\\n\", null, true], \"a\": {}}|{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.5,\n    \"é\\n\",\n    null,\n    true\n  ]\n}"
        );
    }
}

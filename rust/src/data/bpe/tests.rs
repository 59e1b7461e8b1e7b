//! `FastBpe` against HF tokenizers' own ids, recorded in tests/fixtures/bpe by
//! `make_fixtures.py` (GPT-2, GPT-2 with a prefix space, Llama 3, Qwen2, and added-token flags).

use super::*;

const KINDS: [&str; 5] = ["gpt2", "gpt2_prefix", "llama3", "qwen2", "flags"];

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/../tests/fixtures/bpe/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn load(kind: &str) -> FastBpe {
    FastBpe::from_tokenizer_json(&fixture(&format!("{kind}.tokenizer.json")))
        .unwrap()
        .unwrap_or_else(|| panic!("{kind} should be supported"))
}

#[derive(serde::Deserialize)]
struct Expected {
    texts: Vec<String>,
    ids: Vec<Vec<u32>>,
}

#[test]
fn ids_equal_hf_tokenizers_on_every_fixture() {
    for kind in KINDS {
        let bpe = load(kind);
        let expected: Expected =
            serde_json::from_str(&fixture(&format!("{kind}.expected.json"))).unwrap();
        for (text, ids) in expected.texts.iter().zip(&expected.ids) {
            assert_eq!(&bpe.encode(text), ids, "{kind}: {text:?}");
        }
        let refs: Vec<&str> = expected.texts.iter().map(String::as_str).collect();
        assert_eq!(bpe.encode_batch(&refs), expected.ids, "{kind}: batch");
        // A second pass runs entirely from the per-thread cache.
        assert_eq!(
            bpe.encode_batch(&refs),
            expected.ids,
            "{kind}: cached batch"
        );
    }
}

fn edited(kind: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&fixture(&format!("{kind}.tokenizer.json"))).unwrap();
    edit(&mut v);
    v.to_string()
}

#[test]
fn unsupported_settings_fall_back() {
    let cases: Vec<(&str, String)> = vec![
        (
            "dropout",
            edited("gpt2", |v| v["model"]["dropout"] = 0.1.into()),
        ),
        (
            "wordpiece",
            edited("gpt2", |v| v["model"]["type"] = "WordPiece".into()),
        ),
        (
            "NFKC",
            edited("qwen2", |v| {
                v["normalizer"] = serde_json::json!({"type": "NFKC"})
            }),
        ),
        (
            "other regex",
            edited("llama3", |v| {
                v["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\s+".into()
            }),
        ),
        (
            "inverted split",
            edited("llama3", |v| {
                v["pre_tokenizer"]["pretokenizers"][0]["invert"] = true.into()
            }),
        ),
        (
            "metaspace",
            edited("gpt2", |v| {
                v["pre_tokenizer"] = serde_json::json!({"type": "Metaspace", "replacement": "▁"})
            }),
        ),
        (
            "suffix",
            edited("gpt2", |v| v["model"]["end_of_word_suffix"] = "</w>".into()),
        ),
        (
            "truncation",
            edited(
                "gpt2",
                |v| {
                    v["truncation"] =
                        serde_json::json!({"max_length": 8, "strategy": "LongestFirst"})
                },
            ),
        ),
        (
            "missing byte",
            edited("gpt2", |v| {
                v["model"]["vocab"].as_object_mut().unwrap().remove("Ā");
                v["model"]["merges"] = serde_json::json!([]);
            }),
        ),
    ];
    for (name, json) in cases {
        assert!(
            FastBpe::from_tokenizer_json(&json).unwrap().is_none(),
            "{name}"
        );
    }
}

#[test]
fn malformed_files_name_the_field() {
    let err = FastBpe::from_tokenizer_json(&edited("gpt2", |v| {
        v["model"]["merges"] = serde_json::json!(["Ġ t", "no-space-here"]);
    }))
    .err()
    .unwrap();
    assert!(err.to_string().contains("model.merges[1]"), "{err}");
    let err = FastBpe::from_tokenizer_json("{\"model\": ").err().unwrap();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn byte_map_matches_gpt2() {
    let chars = byte_to_char();
    assert_eq!(chars[b' ' as usize], 'Ġ');
    assert_eq!(chars[b'\n' as usize], 'Ċ');
    assert_eq!(chars[b'a' as usize], 'a');
    assert_eq!(chars[0xAD], 'Ń'); // U+0100 + 67: the soft hyphen is not printable
    let distinct: std::collections::HashSet<char> = chars.iter().copied().collect();
    assert_eq!(distinct.len(), 256);
}

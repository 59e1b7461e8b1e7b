"""`_native.FastBpe` must give exactly HF `tokenizers`' ids, for tokenizers built here in the
configurations of GPT-2, Llama 3 and Qwen2 (see bpe_builders.py), on hard strings, generated
multilingual documents and hypothesis-generated text; and refuse what it does not reproduce."""

from __future__ import annotations

import json

import bpe_builders
import pytest
from ferrotune._native import FastBpe, bpe_split_pieces
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, pre_tokenizers

KINDS = list(bpe_builders.BUILDERS)


@pytest.fixture(scope="module", params=KINDS)
def pair(request) -> tuple[Tokenizer, FastBpe]:
    hf = bpe_builders.BUILDERS[request.param](vocab_size=1500)
    fast = FastBpe.from_str(hf.to_str())
    assert fast is not None, f"{request.param} should be supported"
    return hf, fast


def hf_ids(hf: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


def test_hard_strings(pair):
    hf, fast = pair
    texts = bpe_builders.HARD_STRINGS
    expected = hf_ids(hf, texts)
    for text, ids in zip(texts, expected, strict=True):
        assert fast.encode(text) == ids, repr(text)
    assert fast.encode_batch(texts) == expected


def test_generated_documents_batch_and_flat(pair):
    hf, fast = pair
    texts = bpe_builders.corpus(seed=7, n_docs=300, tokens_per_doc=200)
    expected = hf_ids(hf, texts)
    assert fast.encode_batch(texts) == expected
    ids, offsets = fast.encode_batch_flat(texts)
    import torch

    ids_t, off_t = torch.from_dlpack(ids), torch.from_dlpack(offsets)
    assert off_t.tolist()[-1] == sum(map(len, expected))
    flat = [t for x in expected for t in x]
    assert ids_t.to(torch.int64).tolist() == flat


# Text drawn from characters that stress the split rules: every Unicode category, plus
# over-weighted apostrophes, contraction letters, digits, spaces and special-token fragments.
TRICKY = st.sampled_from(
    [
        *"'sStTrReEvVmMlLdDſ0123456789٣²½ \t\n\r\u3000\u00a0\u0085\u2028.!?<|>",
        "<|endoftext|>",
        "<|im_end|>",
        "[MASK]",
        "<mask>",
        "wordy",
        "café",
        "cafe\u0301",
        "hello",
        "e\u0301",
    ]
)
TEXT = st.lists(st.one_of(TRICKY, st.characters(exclude_categories=["Cs"])), max_size=60).map("".join)


@settings(max_examples=150, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=8))
def test_hypothesis_text(pair, texts):
    hf, fast = pair
    assert fast.encode_batch(texts) == hf_ids(hf, texts)


PATTERNS = [bpe_builders.GPT2_PATTERN, bpe_builders.LLAMA3_PATTERN, bpe_builders.QWEN2_PATTERN]


def oniguruma_pieces(pattern: str, text: str) -> list[str]:
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return [piece for piece, _ in split.pre_tokenize_str(text)]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_scanner_pieces_on_hard_strings(pattern):
    texts = [*bpe_builders.HARD_STRINGS, *bpe_builders.corpus(seed=11, n_docs=200)]
    for text in texts:
        assert bpe_split_pieces(pattern, text) == oniguruma_pieces(pattern, text), repr(text)


@settings(max_examples=400, deadline=None)
@given(text=TEXT)
def test_scanner_pieces_match_the_oniguruma_regex(text):
    for pattern in PATTERNS:
        assert bpe_split_pieces(pattern, text) == oniguruma_pieces(pattern, text)


def test_scanner_refuses_other_patterns():
    assert bpe_split_pieces(r"\s+|\S+", "a b") is None


def unsupported(edit) -> str:
    data = json.loads(bpe_builders.gpt2(vocab_size=300).to_str())
    edit(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    "name,edit",
    [
        ("dropout", lambda d: d["model"].update(dropout=0.1)),
        ("unigram", lambda d: d["model"].update(type="Unigram")),
        ("NFKC", lambda d: d.update(normalizer={"type": "NFKC"})),
        ("lowercase", lambda d: d.update(normalizer={"type": "Lowercase"})),
        ("whitespace split", lambda d: d.update(pre_tokenizer={"type": "Whitespace"})),
        ("subword prefix", lambda d: d["model"].update(continuing_subword_prefix="##")),
        ("padding", lambda d: d.update(padding={"strategy": "BatchLongest", "pad_id": 0})),
    ],
)
def test_unsupported_configurations_return_none(name, edit):
    assert FastBpe.from_str(unsupported(edit)) is None, name


def test_malformed_file_names_file_and_field(tmp_path):
    from ferrotune.errors import FormatError

    path = tmp_path / "tokenizer.json"
    path.write_text(unsupported(lambda d: d["model"].update(merges=["a b c"])))
    with pytest.raises(FormatError, match=r"tokenizer\.json.*model\.merges\[0\]"):
        FastBpe.from_file(path)


def test_nfc_matches_on_every_bmp_and_smp_code_point():
    """NFC must compose and reorder exactly as HF's (old-Unicode) tables do, newly assigned
    characters included: each code point next to itself, its successor and a combining mark."""
    hf = bpe_builders.qwen2(vocab_size=400)
    fast = FastBpe.from_str(hf.to_str())
    assert fast is not None
    points = [c for c in range(0x20000) if not 0xD800 <= c <= 0xDFFF]
    chars = [chr(c) for c in points]
    texts = [
        " ".join(
            f"a{chars[j]}{chars[j]}{chars[(j + 1) % len(chars)]}\u0334{chars[j]}\u0301"
            for j in range(i, min(i + 4096, len(chars)))
        )
        for i in range(0, len(chars), 4096)
    ]
    assert fast.encode_batch(texts) == hf_ids(hf, texts)

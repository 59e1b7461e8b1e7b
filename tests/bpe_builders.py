"""Small byte-level BPE tokenizers built with HF `tokenizers`, in the configurations of real models.

Each builder trains a BPE on generated multilingual text and returns the `tokenizers.Tokenizer`
(the oracle) configured like the named model family:

- ``gpt2``: ``ByteLevel(use_regex=True)`` pre-tokenizer (optionally ``add_prefix_space``);
- ``llama3``: ``Split`` with Llama 3's regex + ``ByteLevel(use_regex=False)``, ``ignore_merges``,
  whole-word vocabulary entries that the merges alone would not produce, 256-style special tokens;
- ``qwen2``: NFC normalizer, ``Split`` with Qwen2's regex (single digits) + ``ByteLevel``, ChatML
  special tokens;
- ``flags``: GPT-2 style plus added tokens exercising ``lstrip``/``rstrip``/``single_word``/
  ``normalized`` (with an NFC normalizer, so a normalized token's decomposed spelling matches).

Used by tests/test_bpe.py and by tests/fixtures/bpe/make_fixtures.py (Rust test fixtures).
"""

from __future__ import annotations

import json
import random

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

WORDS = (  # noqa: SIM905 (word lists read best as text)
    "the of and to in is that it was for on are as with his they at be this from have or by one had not "
    "but what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make than "
    "Hello World Python Rust tokenizer encoder merges vocabulary hello world"
).split()
FOREIGN = (  # noqa: SIM905
    "naïve café résumé Zürich straße Ελληνικά русский язык український 中文字符 日本語のテキスト "
    "한국어 문장 العربية עברית हिन्दी ไทย Tiếng Việt emoji 😀 👍🏽 👨‍👩‍👧 🇫🇷 e\u0301 a\u0308 "
    "ﬁ ſ K Å ½ ² ٣٤٥ ⅻ"
).split()
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "'ſ", "'x", "''"]
PUNCT = [*".,;:!?-_()[]{}<>/\\|@#$%^&*+=~`\"'", "...", "--", "!!!", "?!", "://", "<|", "|>"]
SPACES = [
    " ",
    " ",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    " \n ",
    "\t\t",
    "\u3000",
    "\u00a0",
    "\u2028",
]

# Strings every tokenizer must get exactly right.
HARD_STRINGS = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\r\n",
    "\t",
    "Hello world",
    " Hello world",
    "Hello  world   again    and\tagain\t\tand\nagain\n\n",
    "  leading spaces",
    "trailing spaces   ",
    "I'm he's they'll we've you'd it'S THEY'LL She'Re don't '' ' 's",
    "'ſ 'ß 'K",
    "1 12 123 1234 12345 123456789 3.14159 1,000,000 ٣٤٥ ²³ ½",
    "!!! ??? ... --- *** (()) [[ ]] {{ }}",
    "!!!\n\n\r\n?",
    "x \r\n\r\n  \t y\r\r\n",
    "中文字符和日本語のテキスト、한국어 문장。",
    "العربية עברית mixed RTL text",
    "e\u0301tude cafe\u0301 n\u0303 a\u0308 \u0301\u0301 combining",
    "emoji 😀😀 👍🏽 👨‍👩‍👧 🇫🇷🇩🇪 end",
    "ﬁne ſtraße Kelvin Ångström",
    "\u3000ideographic\u3000space\u00a0nbsp\u2028line\u2029para\u0085nel",
    "\x00\x01\x7f control \x0b\x0c chars",
    "<|endoftext|>",
    "text<|endoftext|>more<|im_start|>user\nhi<|im_end|>\n",
    "<|im_start|><|im_end|><|endoftext|>",
    "  <|endoftext|>  spaced  <|im_end|>",
    "<|begin_of_text|>Hi<|eot_id|><|start_header_id|>x<|end_header_id|>\n\n",
    "a [MASK] b  [MASK]  c[MASK]d",
    "<mask> hello <mask>hello",
    "wordy wordyness word wordy.",
    "Cafe\u0301 café CAFÉ",
    "https://example.com/path?q=1&r=2#frag",
    "def f(x):\n    return x**2  # comment\n\n\tpass",
    "a" * 300,
    "1" * 300,
    " " * 300 + "x",
    "!" * 200,
    "😀" * 100,
]


def _text(rng: random.Random, n_tokens: int) -> str:
    parts = []
    for _ in range(n_tokens):
        r = rng.random()
        if r < 0.55:
            w = rng.choice(WORDS)
            parts.append(w.capitalize() if rng.random() < 0.1 else w)
        elif r < 0.7:
            parts.append(rng.choice(FOREIGN))
        elif r < 0.78:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
        elif r < 0.84:
            parts[-1:] = [(parts[-1] if parts else "x") + rng.choice(CONTRACTIONS)]
        elif r < 0.92:
            parts.append(rng.choice(PUNCT))
        else:
            parts.append(rng.choice(SPACES))
        parts.append(" " if rng.random() < 0.85 else rng.choice(SPACES))
    return "".join(parts)


def corpus(seed: int, n_docs: int, tokens_per_doc: int = 60) -> list[str]:
    """Deterministic multilingual documents with contractions, numbers, punctuation, odd spaces."""
    rng = random.Random(seed)
    return [_text(rng, rng.randint(1, tokens_per_doc)) for _ in range(n_docs)]


def _train(tok: Tokenizer, vocab_size: int, special: list[str], seed: int) -> None:
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed, 600), trainer=trainer)


def _edit(tok: Tokenizer, edit) -> Tokenizer:
    """Round-trips through tokenizer.json with `edit(dict)` applied (for settings trainers drop)."""
    data = json.loads(tok.to_str())
    edit(data)
    return Tokenizer.from_str(json.dumps(data))


def gpt2(vocab_size: int = 1000, add_prefix_space: bool = False, seed: int = 1) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    _train(tok, vocab_size, ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"], seed)
    return tok


def llama3(vocab_size: int = 1000, seed: int = 2) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    _train(tok, vocab_size, [], seed)

    def edit(data: dict) -> None:
        model = data["model"]
        model["ignore_merges"] = True
        vocab = model["vocab"]
        # Whole words the merges would not build, so ignore_merges changes the ids.
        for word in ["Ġwordyness", "Ġtokenizer", "Hello", "ĠCafÃ©", "ĠĠĠĠ", "123", "Ġ!!!"]:
            vocab.setdefault(word, len(vocab))
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
        names += ["<|eot_id|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
        data["added_tokens"] = [
            {
                "id": len(vocab) + i,
                "content": name,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, name in enumerate(names)
        ]

    return _edit(tok, edit)


def qwen2(vocab_size: int = 1000, seed: int = 3) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    _train(tok, vocab_size, [], seed)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return tok


def flags(vocab_size: int = 800, seed: int = 4) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    _train(tok, vocab_size, ["<|endoftext|>"], seed)
    tok.add_special_tokens([AddedToken("[MASK]", lstrip=True, rstrip=True, normalized=False)])
    tok.add_tokens(
        [
            AddedToken("<mask>", lstrip=True, normalized=False),
            AddedToken("wordy", single_word=True, normalized=True),
            AddedToken("café", normalized=True),
            AddedToken("hello", rstrip=True, normalized=True),
        ]
    )
    return tok


BUILDERS = {
    "gpt2": gpt2,
    "gpt2_prefix": lambda **kw: gpt2(add_prefix_space=True, **kw),
    "llama3": llama3,
    "qwen2": qwen2,
    "flags": flags,
}

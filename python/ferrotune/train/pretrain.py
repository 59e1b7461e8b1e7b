"""Domain-adaptive (continued) pretraining: raw text, packed into rows, every token trained.

    L = -(1/N) * sum_t log p(x_{t+1} | x_{<=t})   over all tokens of all documents (no loss across
    document boundaries: each document ends with an end-of-text token and attention stays inside it)

The data is `data.train`: a folder from `ferrotune prepare`, a JSONL file with `text` records
(prepared on the fly by the same pipeline), or a `.txt` file (documents separated by blank lines).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ferrotune.config import Config
from ferrotune.errors import ConfigError
from ferrotune.train.run import training_rows
from ferrotune.train.text_data import read_texts, text_rows


def special_id(tokenizer: Any, *names: str) -> int:
    for name in names:
        token = tokenizer.token_to_id(name)
        if token is not None:
            return int(token)
    raise ConfigError(f"model.tokenizer: none of the tokens {', '.join(names)} is in the vocabulary")


def build_rows(config: Config, tokenizer: Any, tokenizer_dir: Path) -> tuple[Sequence, Sequence]:
    """Prepared shards or JSONL (through `ferrotune prepare`, loss on all tokens), or `.txt`
    documents tokenised and packed in memory."""
    eos = special_id(tokenizer, "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|end|>")
    pad = tokenizer.token_to_id("<|pad|>") or eos

    def in_memory(path: str) -> list:
        return text_rows(read_texts(path), tokenizer, config.data.seq_len, eos, pad)

    return training_rows(config, tokenizer, tokenizer_dir, in_memory)

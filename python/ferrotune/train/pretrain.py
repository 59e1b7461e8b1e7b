"""Domain-adaptive (continued) pretraining: raw text, packed into rows, every token trained.

    L = -(1/N) * sum_t log p(x_{t+1} | x_{<=t})   over all tokens of all documents (no loss across
    document boundaries: each document ends with an end-of-text token and attention stays inside it)

The data is `data.train`: a `.txt` file (documents separated by blank lines) or JSONL with `text`.
"""

from __future__ import annotations

from typing import Any

from ferrotune.config import Config
from ferrotune.errors import ConfigError
from ferrotune.train.run import split_eval
from ferrotune.train.text_data import read_texts, text_rows


def special_id(tokenizer: Any, *names: str) -> int:
    for name in names:
        token = tokenizer.token_to_id(name)
        if token is not None:
            return int(token)
    raise ConfigError(f"model.tokenizer: none of the tokens {', '.join(names)} is in the vocabulary")


def build_rows(config: Config, tokenizer: Any) -> tuple[list, list]:
    if not config.data.train:
        raise ConfigError("data.train: required (a .txt or .jsonl file)")
    eos = special_id(tokenizer, "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
    pad = tokenizer.token_to_id("<|pad|>") or eos
    rows = text_rows(read_texts(config.data.train), tokenizer, config.data.seq_len, eos, pad)
    if config.data.eval:
        return rows, text_rows(read_texts(config.data.eval), tokenizer, config.data.seq_len, eos, pad)
    return split_eval(rows, config.data.eval_fraction, config.seed)

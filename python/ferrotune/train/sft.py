"""Supervised fine-tuning on conversations: the loss covers the assistant's replies only.

    L = -(1/N) * sum_{t in assistant tokens} log p(x_{t+1} | x_{<=t})

N counts assistant tokens only, so long prompts do not dilute the signal. The data is `data.train`:
JSONL with `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "response"}` records,
rendered with the plain template of `ferrotune.train.text_data` and packed into rows.
"""

from __future__ import annotations

from typing import Any

from ferrotune.config import Config
from ferrotune.errors import ConfigError
from ferrotune.train.pretrain import special_id
from ferrotune.train.run import split_eval
from ferrotune.train.text_data import chat_rows, read_conversations


def build_rows(config: Config, tokenizer: Any) -> tuple[list, list]:
    if not config.data.train:
        raise ConfigError("data.train: required (a .jsonl file of conversations)")
    pad = tokenizer.token_to_id("<|pad|>")
    if pad is None:
        pad = special_id(tokenizer, "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
    rows = chat_rows(read_conversations(config.data.train), tokenizer, config.data.seq_len, pad)
    if config.data.eval:
        return rows, chat_rows(read_conversations(config.data.eval), tokenizer, config.data.seq_len, pad)
    return split_eval(rows, config.data.eval_fraction, config.seed)

"""Supervised fine-tuning on conversations: the loss covers the assistant's replies only.

    L = -(1/N) * sum_{t in assistant tokens} log p(x_{t+1} | x_{<=t})

N counts assistant tokens only, so long prompts do not dilute the signal. The data is `data.train`:
a folder from `ferrotune prepare`, or JSONL with `{"messages": [{"role", "content"}, ...]}` records
prepared on the fly with the tokenizer's chat template. With `data.pipeline = "memory"` JSONL
(`messages` or `prompt`/`response`) is rendered with the plain template of
`ferrotune.train.text_data` and packed in memory instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ferrotune.config import Config
from ferrotune.train.pretrain import special_id
from ferrotune.train.run import training_rows
from ferrotune.train.text_data import chat_rows, read_conversations


def build_rows(config: Config, tokenizer: Any, tokenizer_dir: Path) -> tuple[Sequence, Sequence]:
    """Prepared shards or JSONL through `ferrotune prepare` (the tokenizer's chat template,
    assistant-only loss); `data.pipeline = "memory"` uses the plain template in memory instead."""
    pad = tokenizer.token_to_id("<|pad|>")
    if pad is None:
        pad = special_id(tokenizer, "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|end|>")

    def in_memory(path: str) -> list:
        return chat_rows(read_conversations(path), tokenizer, config.data.seq_len, pad)

    return training_rows(config, tokenizer, tokenizer_dir, in_memory)

"""Models: the Llama family (`llama.py`), HF checkpoint loading and saving (`load.py`), and
KV-cache generation (`generate.py`)."""

from __future__ import annotations

from ferrotune.models.llama import CausalLM, KVCache, LlamaConfig, LlamaForCausalLM, LlamaModel
from ferrotune.models.load import load_model, read_config, save_model

__all__ = [
    "CausalLM",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "load_model",
    "read_config",
    "save_model",
]

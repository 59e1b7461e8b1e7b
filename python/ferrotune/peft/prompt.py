"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): P learned input embeddings
(virtual tokens) placed before the text.

    prompt tuning:  E (P, hidden) is learned directly
    P-tuning:       E = encoder(E0), encoder an MLP (Linear-ReLU-Linear-ReLU-Linear) or a
                    bidirectional 2-layer LSTM followed by Linear-ReLU-Linear (PEFT's shapes)

Initialisation of E (or E0): "random" (N(0, 1)), "vocab" (embeddings of P token ids sampled
uniformly from the vocabulary), or "text" (the embeddings of a text's token ids, repeated or cut
to P tokens, as PEFT does).

How the prompt enters the model. PEFT concatenates E before the input embeddings, so the text
sits at positions P, P+1, ... and the prompt positions attend only to themselves. The prompt's
keys and values at every layer therefore do not depend on the text: we compute them once by
running the model on E alone (`inputs_embeds`, positions 0..P-1, into a fresh KV cache) and hand
them to the text as `prefix_kv`, with the text's positions shifted by P. This gives PEFT's logits
for the text tokens exactly, and unlike concatenation it also works for packed rows (every
document sees the prompt, as if trained alone), costs the prompt once per batch instead of once
per row, and reuses the prefix path of KV-cache generation and gradient checkpointing.
The saved file holds E as `prompt_embeddings` (P, hidden); a P-tuning encoder is evaluated first,
as PEFT saves it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ferrotune.errors import ConfigError
from ferrotune.peft.prefix import PrefixKV, PrefixModel, prefix_model

PROMPT_INITS = ("random", "vocab", "text")
ENCODERS = ("none", "mlp", "lstm")


@dataclass
class PromptConfig:
    """`encoder = "none"` is prompt tuning; "mlp" / "lstm" is P-tuning. For `init = "text"` give
    `init_text` (tokenized with the tokenizer passed to `apply_peft`) or `init_token_ids`."""

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    init_token_ids: list[int] = field(default_factory=list)
    encoder: str = "none"
    encoder_hidden_size: int = 128
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise ConfigError(f"prompt.num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.init not in PROMPT_INITS:
            raise ConfigError(f"prompt.init must be one of {PROMPT_INITS}, got {self.init!r}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"prompt.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.init == "text" and not (self.init_text or self.init_token_ids):
            raise ConfigError("prompt.init = 'text' needs prompt.init_text or prompt.init_token_ids")


def text_init_ids(token_ids: Sequence[int], num_virtual_tokens: int) -> list[int]:
    """Repeats or cuts the text's token ids to exactly P ids (PEFT's rule)."""
    if not token_ids:
        raise ConfigError("prompt.init_text tokenizes to no tokens")
    ids = list(token_ids)
    ids = ids * math.ceil(num_virtual_tokens / len(ids))
    return ids[:num_virtual_tokens]


class PromptEncoder(nn.Module):
    """E, or E0 with the P-tuning reparameterisation."""

    def __init__(self, config: PromptConfig, hidden_size: int, init_embeddings: torch.Tensor | None):
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.embedding = nn.Embedding(config.num_virtual_tokens, hidden_size)
        if init_embeddings is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init_embeddings)
        h = config.encoder_hidden_size
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if config.encoder == "mlp":
            self.mlp_head = nn.Sequential(
                nn.Linear(hidden_size, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, hidden_size)
            )
        elif config.encoder == "lstm":
            self.lstm_head = nn.LSTM(
                hidden_size,
                h,
                num_layers=2,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, hidden_size))

    def prompt_embeddings(self, model: nn.Module | None = None) -> torch.Tensor:  # (P, hidden)
        e = self.embedding.weight
        if self.lstm_head is not None:
            e = self.lstm_head(e[None])[0][0]  # (P, 2h)
        if self.mlp_head is not None:
            e = self.mlp_head(e)
        return e

    def prefix_kv(self, model: nn.Module, batch_size: int) -> PrefixKV:
        """Runs the LM on E alone and returns every layer's keys and values (B, KV, P, D)."""
        return prompt_prefix_kv(model, self.prompt_embeddings(), batch_size)

    def load_prompt_embeddings(self, value: torch.Tensor) -> None:
        if tuple(value.shape) != tuple(self.embedding.weight.shape):
            raise ValueError(
                f"prompt_embeddings: shape {tuple(value.shape)}, expected {tuple(self.embedding.weight.shape)}"
            )
        self.lstm_head, self.mlp_head = None, None  # a saved prompt is the encoder's output
        with torch.no_grad():
            self.embedding.weight.copy_(value)


def prompt_prefix_kv(model: nn.Module, embeddings: torch.Tensor, batch_size: int) -> PrefixKV:
    """Keys/values of every layer for the virtual tokens `embeddings` (P, hidden) at positions
    0..P-1, through the model's own KV cache (gradients flow into the cache's slices)."""
    p = embeddings.shape[0]
    cache = model.make_kv_cache(1, p)
    dtype = cache.keys[0].dtype
    hidden = model.hidden_states(inputs_embeds=embeddings.to(dtype)[None], kv_cache=cache)  # (1, P, hidden)
    keys = [k[:, :, :p] for k in cache.keys]  # (1, KV, P, D) each
    if _has_fsdp_blocks(model):
        # FSDP2 gathers a block's weights for backward when the gradient reaches the block's
        # output; this pass's keys and values leave the blocks through the cache instead, so its
        # outputs join the graph with a weight of zero: their gradient (zeros) arrives first and
        # each block is gathered before the gradient of its keys and values comes in.
        keys[0] = keys[0] + 0.0 * hidden.sum().to(keys[0].dtype)
    return [
        (k.expand(batch_size, -1, -1, -1), v[:, :, :p].expand(batch_size, -1, -1, -1))
        for k, v in zip(keys, cache.values, strict=True)
    ]


def _has_fsdp_blocks(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _initial_embeddings(
    model: nn.Module,
    config: PromptConfig,
    tokenize: Callable[[str], Sequence[int]] | None,
    generator: torch.Generator | None,
) -> torch.Tensor | None:
    embed = model.get_submodule("model.embed_tokens")
    assert isinstance(embed, nn.Embedding)
    if config.init == "random":
        return None
    if config.init == "vocab":
        ids = torch.randint(0, embed.num_embeddings, (config.num_virtual_tokens,), generator=generator)
    else:
        token_ids = config.init_token_ids
        if not token_ids:
            if tokenize is None:
                raise ConfigError(
                    "prompt.init = 'text' with init_text needs a tokenizer (apply_peft(..., tokenizer=))"
                )
            assert config.init_text is not None
            token_ids = list(tokenize(config.init_text))
        ids = torch.tensor(text_init_ids(token_ids, config.num_virtual_tokens))
    return embed.weight.detach()[ids.to(embed.weight.device)].float().cpu()


def apply_prompt(
    model: nn.Module,
    config: PromptConfig,
    name: str = "default",
    *,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
) -> PrefixModel:
    """Adds a prompt (or P-tuning) encoder named `name`; returns the wrapper."""
    wrapper = prefix_model(model)
    ref = next(wrapper.base_model.parameters())
    init = _initial_embeddings(wrapper.base_model, config, _tokenize_fn(tokenizer), generator)
    encoder = PromptEncoder(config, wrapper.config.hidden_size, init).to(ref.device)
    wrapper.add_encoder(name, encoder)
    return wrapper


def _tokenize_fn(tokenizer: Any) -> Callable[[str], Sequence[int]] | None:
    """Accepts a `tokenizers.Tokenizer`, a transformers tokenizer, or a callable text -> ids."""
    if tokenizer is None:
        return None

    def tokenize(text: str) -> Sequence[int]:
        # special tokens included, as PEFT tokenizes the init text
        out = tokenizer.encode(text) if hasattr(tokenizer, "encode") else tokenizer(text)
        return list(getattr(out, "ids", out))

    return tokenize

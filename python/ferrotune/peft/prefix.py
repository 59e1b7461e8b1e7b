"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022), through the model's
`prefix_kv` argument; and `PrefixModel`, the wrapper every virtual-token method runs through.

Each decoder layer l gets P learned key/value vectors per KV head that every query attends to
besides its own causal, same-document context:

    attn_l(q) = softmax(q [K_l^prefix; K_l]ᵀ / √d) [V_l^prefix; V_l]
    K_l^prefix, V_l^prefix: (n_kv_heads, P, head_dim)

Storage, as PEFT's: one matrix E (P, L · 2 · n_kv_heads · head_dim) whose row p holds, for each
layer l, K_l[p] at block 2l and V_l[p] at block 2l + 1. With the MLP reparameterisation
(`prefix_projection = True`, Li & Liang §4.3) E = MLP(E'), E' (P, n_kv_heads · head_dim),
MLP = Linear(token_dim, encoder_hidden_size) → tanh → Linear(encoder_hidden_size, L · 2 · token_dim);
the saved file holds the computed E, so it loads without the MLP (as PEFT saves it).
P-tuning v2 is this method without the reparameterisation: deep prompts at every layer.

Prefix keys carry no rotary position. Real tokens are placed after the prefix: their positions are
shifted by P (PEFT does the same), so an adapter trained here and in PEFT computes the same thing.
Packed rows work unchanged (every document sees the prefix, then restarts at position P), and so
do KV-cache generation (the prefix is passed on every step, never stored in the cache) and
gradient checkpointing (the prefix tensors are ordinary inputs of each checkpointed layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ferrotune.errors import ConfigError
from ferrotune.peft.common import WrappedLM, check_adapter_name

PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (B, n_kv_heads, P, head_dim) twice


@dataclass
class PrefixConfig:
    """Prefix tuning; `prefix_projection = False` is P-tuning v2 (method name "p_tuning_v2")."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int = 256
    init: str = "random"  # "random" (N(0, 1), PEFT's nn.Embedding default) or "zero"

    def __post_init__(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise ConfigError(f"prefix.num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.init not in ("random", "zero"):
            raise ConfigError(f"prefix.init must be 'random' or 'zero', got {self.init!r}")


@dataclass(frozen=True)
class KVShape:
    """The attention geometry a prefix is built for."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def of(cls, config: Any) -> KVShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, kv, head_dim)


class VirtualTokens(Protocol):
    """What `PrefixModel` needs of a prefix or prompt encoder."""

    num_virtual_tokens: int

    def prefix_kv(self, model: nn.Module, batch_size: int) -> PrefixKV: ...

    def prompt_embeddings(self, model: nn.Module) -> torch.Tensor:
        """The tensor PEFT saves as `prompt_embeddings`."""


def split_prefix(embeddings: torch.Tensor, shape: KVShape, batch_size: int) -> PrefixKV:
    """E (P, L·2·KV·D) -> per layer (K, V), each (B, KV, P, D), in PEFT's layout."""
    p = embeddings.shape[0]
    blocks = embeddings.view(p, 2 * shape.num_layers, shape.num_kv_heads, shape.head_dim)
    blocks = blocks.permute(1, 2, 0, 3)  # (2L, KV, P, D)
    blocks = blocks.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # (2L, B, KV, P, D)
    return [(blocks[2 * i], blocks[2 * i + 1]) for i in range(shape.num_layers)]


class PrefixEncoder(nn.Module):
    """Holds E directly, or E' plus the reparameterisation MLP."""

    def __init__(self, config: PrefixConfig, shape: KVShape, *, device=None, dtype=None):  # type: ignore[no-untyped-def]
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.shape = shape
        width = shape.num_layers * 2 * shape.token_dim
        factory = {"device": device, "dtype": dtype}
        self.transform: nn.Sequential | None = None
        if config.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, shape.token_dim, **factory)
            self.transform = nn.Sequential(
                nn.Linear(shape.token_dim, config.encoder_hidden_size, **factory),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width, **factory),
            )
            if config.init == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width, **factory)
            if config.init == "zero":
                nn.init.zeros_(self.embedding.weight)

    def prompt_embeddings(self, model: nn.Module | None = None) -> torch.Tensor:  # (P, L·2·KV·D)
        e = self.embedding.weight
        return self.transform(e) if self.transform is not None else e

    def prefix_kv(self, model: nn.Module, batch_size: int) -> PrefixKV:
        return split_prefix(self.prompt_embeddings(), self.shape, batch_size)

    def load_prompt_embeddings(self, value: torch.Tensor) -> None:
        """Loads a saved E; a reparameterised encoder becomes a plain one (PEFT's inference mode)."""
        width = self.shape.num_layers * 2 * self.shape.token_dim
        if tuple(value.shape) != (self.num_virtual_tokens, width):
            raise ValueError(
                f"prompt_embeddings: shape {tuple(value.shape)}, expected {(self.num_virtual_tokens, width)}"
            )
        ref = self.embedding.weight
        self.transform = None
        self.embedding = nn.Embedding(self.num_virtual_tokens, width, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            self.embedding.weight.copy_(value)


class PrefixModel(WrappedLM):
    """A causal LM run with virtual tokens (prefix tuning, P-tuning v2, prompt tuning, P-tuning).

    It has the LM's call signature; `base_model` is the LM itself (its parameter names move under
    `base_model.`, as in PEFT). Named encoders live in `prompt_encoders`; one is active at a time
    (virtual tokens are switched, not blended). Real positions are shifted by P (see above)."""

    def __init__(self, base_model: nn.Module):
        super().__init__()
        self.base_model = base_model
        self.prompt_encoders = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.disabled = False
        self._inference_cache: dict[tuple[Any, ...], PrefixKV] = {}

    # -- adapters
    def add_encoder(self, name: str, encoder: nn.Module) -> None:
        self.prompt_encoders[check_adapter_name(name)] = encoder
        self._inference_cache.clear()

    def adapter_names(self) -> list[str]:
        return list(self.prompt_encoders.keys())

    def remove_adapter(self, name: str) -> None:
        del self.prompt_encoders[name]
        self.active.pop(name, None)
        self._inference_cache.clear()

    @property
    def merged(self) -> bool:
        return False

    def merge(self) -> None:
        pass  # virtual tokens cannot fold into weights

    def unmerge(self) -> None:
        pass

    def active_encoder(self) -> tuple[str, VirtualTokens] | None:
        names = [n for n in self.active if n in self.prompt_encoders]
        if self.disabled or not names:
            return None
        if len(names) > 1 or self.active[names[0]] != 1.0:
            raise ConfigError(f"virtual-token adapters are switched, not combined: active = {self.active}")
        return names[0], self.prompt_encoders[names[0]]  # type: ignore[return-value]

    def train(self, mode: bool = True) -> PrefixModel:
        self._inference_cache.clear()
        return super().train(mode)

    def _prefix(self, name: str, encoder: VirtualTokens, batch_size: int) -> PrefixKV:
        if torch.is_grad_enabled() or self.training:
            return encoder.prefix_kv(self.base_model, batch_size)
        # decoding calls this every step: compute the prefix once per adapter routing (a prompt's
        # keys and values also depend on the weight adapters active in the model)
        key = (name, batch_size, self._routing())
        if key not in self._inference_cache:
            if len(self._inference_cache) >= 16:
                self._inference_cache.clear()
            self._inference_cache[key] = encoder.prefix_kv(self.base_model, batch_size)
        return self._inference_cache[key]

    def _routing(self) -> tuple[Any, ...]:
        return tuple(
            (id(m), tuple(sorted(m.active.items())), m.disabled, m.merged)
            for m in self.base_model.modules()
            if m is not self and isinstance(getattr(m, "active", None), dict) and hasattr(m, "disabled")
        )

    def _inputs(
        self, kwargs: dict[str, Any], batch: int, length: int, device: torch.device
    ) -> dict[str, Any]:
        chosen = self.active_encoder()
        if chosen is None:
            return kwargs
        if kwargs.get("prefix_kv") is not None:
            raise ValueError("prefix_kv is given twice: by the caller and by the active prefix adapter")
        name, encoder = chosen
        p = encoder.num_virtual_tokens
        positions = kwargs.get("position_ids")
        if positions is None:
            cache = kwargs.get("kv_cache")
            offset = cache.length if cache is not None else 0
            positions = torch.arange(offset, offset + length, device=device).expand(batch, length)
        return {**kwargs, "position_ids": positions + p, "prefix_kv": self._prefix(name, encoder, batch)}

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        batch, length, device = _batch_geometry(input_ids, kwargs.get("inputs_embeds"))
        return self.base_model(input_ids, **self._inputs(kwargs, batch, length, device))

    def hidden_states(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        batch, length, device = _batch_geometry(input_ids, kwargs.get("inputs_embeds"))
        return self.base_model.hidden_states(input_ids, **self._inputs(kwargs, batch, length, device))

    # -- PEFT state
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        encoder = self.prompt_encoders[name]
        return {"prompt_embeddings": encoder.prompt_embeddings(self.base_model).detach()}

    def load_adapter_state(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        self.prompt_encoders[name].load_prompt_embeddings(state["prompt_embeddings"])
        self._inference_cache.clear()


def _batch_geometry(
    input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
) -> tuple[int, int, torch.device]:
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref is None:
        raise ValueError("pass input_ids or inputs_embeds")
    return ref.shape[0], ref.shape[1], ref.device


def prefix_model(model: nn.Module) -> PrefixModel:
    """`model` itself if it is already a `PrefixModel`, else a new wrapper around it."""
    return model if isinstance(model, PrefixModel) else PrefixModel(model)


def apply_prefix(model: nn.Module, config: PrefixConfig, name: str = "default") -> PrefixModel:
    """Adds a prefix encoder named `name`; returns the (possibly new) wrapper."""
    wrapper = prefix_model(model)
    ref = next(wrapper.base_model.parameters())
    shape = KVShape.of(wrapper.config)
    wrapper.add_encoder(name, PrefixEncoder(config, shape, device=ref.device, dtype=torch.float32))
    return wrapper

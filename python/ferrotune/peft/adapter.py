"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020).

A small residual MLP is inserted on a sublayer's output h (B, T, d), before the decoder layer's
residual add:

    adapter(h) = h + W_up f(W_down h + b_down) + b_up       W_down: (m, d), W_up: (d, m), m << d

W_up and b_up start at zero, so the model starts unchanged. Placement:
- "houlsby": after attention and after the MLP (the decoder layer's `attn_adapter` and
  `mlp_adapter` slots);
- "pfeiffer": after the MLP only.

The model applies the slots itself (`layer.attn_adapter(attn_out)`), so nothing is patched.
Bottleneck adapters have no PEFT type; `ferrotune.peft.formats` saves them in the same two files
with `peft_type = "BOTTLENECK"` (see docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ferrotune.errors import ConfigError
from ferrotune.peft.common import check_adapter_name

PLACEMENTS = {"houlsby": ("attn_adapter", "mlp_adapter"), "pfeiffer": ("mlp_adapter",)}
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


@dataclass
class BottleneckConfig:
    """`bottleneck_size` m, the nonlinearity f and the placement ("houlsby" / "pfeiffer")."""

    bottleneck_size: int = 16
    activation: str = "relu"
    placement: str = "houlsby"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(
                f"adapter.placement must be one of {sorted(PLACEMENTS)}, got {self.placement!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"adapter.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.bottleneck_size <= 0:
            raise ConfigError(f"adapter.bottleneck_size must be positive, got {self.bottleneck_size}")


class Bottleneck(nn.Module):
    """One adapter's down / up projections: x -> W_up f(W_down x)."""

    def __init__(self, hidden_size: int, config: BottleneckConfig, *, device=None, dtype=None):  # type: ignore[no-untyped-def]
        super().__init__()
        self.activation = config.activation
        self.down = nn.Linear(hidden_size, config.bottleneck_size, device=device, dtype=dtype)
        self.up = nn.Linear(config.bottleneck_size, hidden_size, device=device, dtype=dtype)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        return self.up(self.dropout(ACTIVATIONS[self.activation](self.down(h))))


class BottleneckAdapter(nn.Module):
    """The module placed in a decoder layer's adapter slot: h + Σ_i w_i bottleneck_i(h) over the
    active adapters (the identity when disabled)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.disabled = False

    def add_adapter(self, name: str, config: BottleneckConfig, *, device=None, dtype=None) -> None:  # type: ignore[no-untyped-def]
        self.adapters[check_adapter_name(name)] = Bottleneck(
            self.hidden_size, config, device=device, dtype=dtype
        )

    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    def remove_adapter(self, name: str) -> None:
        del self.adapters[name]
        self.active.pop(name, None)

    @property
    def merged(self) -> bool:
        return False

    def merge(self) -> None:
        pass  # a nonlinear adapter cannot fold into a weight; it keeps running beside it

    def unmerge(self) -> None:
        pass

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        if self.disabled:
            return h
        out = h
        for name, w in self.active.items():
            if name in self.adapters:
                delta = self.adapters[name](h.to(self.adapters[name].down.weight.dtype))
                out = out + (delta if w == 1.0 else w * delta).to(h.dtype)
        return out

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.adapters[name].state_dict().items()}

    def load_adapter_state(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        self.adapters[name].load_state_dict(dict(state), strict=True)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a ferrotune causal LM: the modules that own adapter slots."""
    layers = [m for m in model.modules() if hasattr(m, "attn_adapter") and hasattr(m, "mlp_adapter")]
    if not layers:
        raise ConfigError("bottleneck adapters need decoder layers with attn_adapter / mlp_adapter slots")
    return layers


def apply_bottleneck(model: nn.Module, config: BottleneckConfig, name: str = "default") -> list[str]:
    """Fills the adapter slots of every decoder layer per `config.placement`. Returns the slot
    names filled."""
    filled = []
    slot_owner = {id(m): n for n, m in model.named_modules()}
    for layer in decoder_layers(model):
        ref = next(layer.parameters())
        hidden = _hidden_size(layer)
        for slot in PLACEMENTS[config.placement]:
            module = getattr(layer, slot)
            if module is None:
                module = BottleneckAdapter(hidden)
                setattr(layer, slot, module)
            if not isinstance(module, BottleneckAdapter):
                raise ConfigError(f"{slot_owner[id(layer)]}.{slot} holds a {type(module).__name__}")
            module.add_adapter(name, config, device=ref.device, dtype=ref.dtype)
            filled.append(f"{slot_owner[id(layer)]}.{slot}")
    return filled


def _hidden_size(layer: nn.Module) -> int:
    for attr in ("hidden_size",):
        if isinstance(getattr(layer, attr, None), int):
            return int(getattr(layer, attr))
    norm = getattr(layer, "input_layernorm", None)
    if norm is not None and hasattr(norm, "weight"):
        return int(norm.weight.shape[0])
    raise ConfigError("cannot tell the decoder layer's hidden size")

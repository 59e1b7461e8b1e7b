"""IA3 (Liu et al. 2022, "Few-shot parameter-efficient fine-tuning is better and cheaper than
in-context learning"): learned vectors rescale activations, as PEFT defines it.

On an attention projection (PEFT's default for Llama: `k_proj`, `v_proj`) the output is scaled,
    y = (W x + b) ⊙ l              l: (out,), stored as `ia3_l` (out, 1);
on a feed-forward module (`feedforward_modules`, default `down_proj`) the input is scaled,
    y = W (x ⊙ l) + b              l: (in,),  stored as `ia3_l` (1, in).
Vectors start at 1, so the model starts unchanged. Merging scales W's rows (or columns) by l,
and the bias too for the output case.

Several active adapters combine as l = Π_i (1 + w_i (l_i - 1)); with every w_i = 1 this is PEFT's
product of the active vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ferrotune.errors import ConfigError
from ferrotune.peft.common import (
    _matches,
    check_adapter_name,
    find_targets,
    replace_module,
    require_mergeable_base,
    wrap_modules_to_save,
)


@dataclass
class IA3Config:
    """Target modules and which of them are feed-forward (input-scaled); PEFT's Llama defaults."""

    target_modules: str | list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: str | list[str] = field(default_factory=lambda: ["down_proj"])
    exclude_modules: str | list[str] | None = None
    modules_to_save: list[str] = field(default_factory=list)
    init_ia3_weights: bool = True


class IA3Linear(nn.Module):
    """A frozen `nn.Linear` (`base_layer`) rescaled by named IA3 vectors (`ia3_l.<name>`)."""

    def __init__(self, base_layer: nn.Linear, is_feedforward: bool):
        super().__init__()
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()
        self.active: dict[str, float] = {}
        self.disabled = False
        self._merged_scale: torch.Tensor | None = None
        base_layer.requires_grad_(False)

    def add_adapter(self, name: str, init_ones: bool = True) -> None:
        check_adapter_name(name)
        if self.merged:
            raise RuntimeError("unmerge the layer before adding an adapter")
        weight = self.base_layer.weight
        shape = (1, weight.shape[1]) if self.is_feedforward else (weight.shape[0], 1)
        value = torch.ones(shape) if init_ones else torch.randn(shape)
        self.ia3_l[name] = nn.Parameter(value.to(device=weight.device, dtype=weight.dtype))

    def adapter_names(self) -> list[str]:
        return list(self.ia3_l.keys())

    def remove_adapter(self, name: str) -> None:
        if self.merged:
            raise RuntimeError("unmerge the layer before removing an adapter")
        del self.ia3_l[name]
        self.active.pop(name, None)

    def scale(self) -> torch.Tensor | None:
        """The combined vector (in,) or (out,) of the active adapters, or None."""
        scale = None
        for name, w in self.active.items():
            if name not in self.ia3_l:
                continue
            vec = self.ia3_l[name].flatten()
            term = vec if w == 1.0 else 1 + w * (vec - 1)
            scale = term if scale is None else scale * term
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        scale = None if self.disabled or self.merged else self.scale()
        if scale is None:
            return self.base_layer(x)
        if self.is_feedforward:
            return self.base_layer((x * scale.to(x.dtype)).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale.to(result.dtype)).to(result.dtype)

    @property
    def merged(self) -> bool:
        return self._merged_scale is not None

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W ⊙ l (columns for feed-forward, rows and bias otherwise)."""
        scale = None if self.merged else self.scale()
        if scale is None:
            return
        require_mergeable_base(self.base_layer, "IA3")
        base = self.base_layer
        scale = scale.float()
        if self.is_feedforward:
            base.weight.copy_((base.weight.float() * scale[None, :]).to(base.weight.dtype))
        else:
            base.weight.copy_((base.weight.float() * scale[:, None]).to(base.weight.dtype))
            if base.bias is not None:
                base.bias.copy_((base.bias.float() * scale).to(base.bias.dtype))
        self._merged_scale = scale

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W / l (exact unless some l_i is 0)."""
        scale = self._merged_scale
        if scale is None:
            return
        base = self.base_layer
        if self.is_feedforward:
            base.weight.copy_((base.weight.float() / scale[None, :]).to(base.weight.dtype))
        else:
            base.weight.copy_((base.weight.float() / scale[:, None]).to(base.weight.dtype))
            if base.bias is not None:
                base.bias.copy_((base.bias.float() / scale).to(base.bias.dtype))
        self._merged_scale = None

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[name].detach()}

    def load_adapter_state(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        value = state["ia3_l"]
        if tuple(value.shape) != tuple(self.ia3_l[name].shape):
            raise ValueError(f"ia3_l: shape {tuple(value.shape)}, expected {tuple(self.ia3_l[name].shape)}")
        with torch.no_grad():
            self.ia3_l[name].copy_(value)


def apply_ia3(model: nn.Module, config: IA3Config, name: str = "default") -> list[str]:
    """Wraps each targeted `nn.Linear` in an `IA3Linear` (feed-forward ones scale their input)."""
    targets = find_targets(model, config.target_modules, config.exclude_modules, config.modules_to_save)
    for key in targets:
        module = model.get_submodule(key)
        if not isinstance(module, IA3Linear):
            if not isinstance(module, nn.Linear):
                raise ConfigError(f"ia3: {key} is a {type(module).__name__}, not nn.Linear")
            module = IA3Linear(module, _matches(config.feedforward_modules, key))
            replace_module(model, key, module)
        module.add_adapter(name, config.init_ia3_weights)
    wrap_modules_to_save(model, config.modules_to_save, name)
    return targets

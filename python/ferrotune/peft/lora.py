"""LoRA, rsLoRA and DoRA on `nn.Linear`.

LoRA (Hu et al. 2021) freezes W (out, in) and learns a low-rank update:

    y = W x + b + s · B A dropout(x)          A: (r, in), B: (out, r)
    s = alpha / r            (LoRA)
    s = alpha / sqrt(r)      (rsLoRA, Kalajdzievski 2023: keeps the update's scale stable as r grows)

DoRA (Liu et al. 2024) splits the adapted weight into a learned magnitude m (out,) and a direction:

    W' = m ⊙ (W + s B A) / ||W + s B A||_row        (row-wise L2 norm, one per output feature)

computed as PEFT does: the norm is detached from the graph (DoRA §4.3), and
    y = W x + b + (m/n - 1) ⊙ W x + (m/n) ⊙ s B A x,    n = ||W + s B A||_row
so the base matmul is shared with the frozen path. m starts at n, so W' = W at initialisation.

Initialisation (`init`):
- "default": A ~ kaiming-uniform(a=√5) (the nn.Linear default), B = 0, so the update starts at 0;
- "gaussian": A ~ N(0, 1/r²), B = 0;
- "pissa" (Meng et al. 2024): W = U S Vᵀ; A = √S_r V_rᵀ / √s, B = U_r √S_r / √s over the r
  largest singular values and the base keeps the residual W - s B A. The adapter then trains the
  principal directions. Saving converts it to a plain rank-2r LoRA over the original W
  (`pissa_as_lora`), as PEFT's `path_initial_model_for_weight_conversion` does.

Several named adapters live in one layer; `active` weights combine them:
    y = W x + b + Σ_i w_i · delta_i(x).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ferrotune.errors import ConfigError
from ferrotune.kernels import lora_linear
from ferrotune.kernels.lora import fused_lora_runs_on
from ferrotune.peft.common import (
    check_adapter_name,
    find_targets,
    pattern_value,
    replace_module,
    require_mergeable_base,
    wrap_modules_to_save,
)
from ferrotune.quant.nf4 import NF4Linear

LORA_INITS = ("default", "gaussian", "pissa")


@dataclass
class LoraConfig:
    """LoRA / rsLoRA / DoRA settings. `rank_pattern` / `alpha_pattern` map a module-name pattern
    (PEFT's rule: `re.match(rf"(.*\\.)?({pattern})$", name)`) to its own rank / alpha."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude_modules: str | list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.r <= 0 or any(r <= 0 for r in self.rank_pattern.values()):
            raise ConfigError(f"lora.r must be positive, got {self.r} / {self.rank_pattern}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.init not in LORA_INITS:
            raise ConfigError(f"lora.init must be one of {LORA_INITS}, got {self.init!r}")
        if self.init == "pissa" and self.use_dora:
            raise ConfigError("lora.init = 'pissa' cannot be combined with use_dora")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        r = int(pattern_value(self.rank_pattern, module_name, self.r))
        return r, float(pattern_value(self.alpha_pattern, module_name, self.alpha))


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def dora_row_norms(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + ΔW|| of each output row (rows,), in float32, detached: DoRA's magnitude at
    initialisation. W and ΔW (rows, in) may be any matching block of rows of the layer."""
    with torch.no_grad():
        return torch.linalg.norm(weight.float() + delta.float(), dim=1)


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` (`base_layer`) with named LoRA / DoRA adapters beside it.
    Parameter names match PEFT's (`lora_A.<name>.weight`, `lora_magnitude_vector.<name>`)."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.rank: dict[str, int] = {}
        self.pissa_initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.active: dict[str, float] = {}
        self.disabled = False
        # while merged: the per-row factor c the base weight was scaled by (see `merge`)
        self._merge_row_factor: torch.Tensor | None = None
        self._merged: tuple[dict[str, float], dict[str, torch.Tensor]] = ({}, {})
        base_layer.requires_grad_(False)

    # ------------------------------------------------------------------ adapters

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "default",
    ) -> None:
        """Adds adapter `name` (trainable) and initialises it; see the module docstring."""
        check_adapter_name(name)
        if self.merged:
            raise RuntimeError("unmerge the layer before adding an adapter")
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = lora_scaling(r, alpha, use_rslora)
        self.rank[name] = r
        self._init_adapter(name, init)
        if use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self._weight_norm(name).to(weight.dtype))

    def _init_adapter(self, name: str, init: str) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if init == "default":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
            elif init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.rank[name])
                nn.init.zeros_(b)
            elif init == "pissa":
                self._pissa_init(name)
            else:
                raise ConfigError(f"lora.init must be one of {LORA_INITS}, got {init!r}")

    def _pissa_init(self, name: str) -> None:
        weight = self.base_layer.weight
        r, s = self.rank[name], self.scaling[name]
        # W (out, in) = U diag(S) Vh
        u, sing, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        root = torch.sqrt(sing[:r] / s)  # (r,)
        a = root[:, None] * vh[:r]  # (r, in)
        b = u[:, :r] * root[None, :]  # (out, r)
        self.lora_A[name].weight.copy_(a)
        self.lora_B[name].weight.copy_(b)
        weight.copy_((weight.float() - s * (b @ a)).to(weight.dtype))
        self.pissa_initial[name] = (a.to(weight.dtype).clone(), b.to(weight.dtype).clone())

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    def remove_adapter(self, name: str) -> None:
        if self.merged:
            raise RuntimeError("unmerge the layer before removing an adapter")
        for store in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in store:
                del store[name]
        for d in (self.scaling, self.rank, self.pissa_initial, self.active):
            d.pop(name, None)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ math

    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B A, shaped like the base weight (out, in)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return self.scaling[name] * (b @ a)

    def _weight_norm(self, name: str) -> torch.Tensor:
        """n = ||W + s B A||_row (out,), detached, computed in float32."""
        with torch.no_grad():
            return dora_row_norms(self.base_layer.weight, self.delta_weight(name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        if (fused := self._fused_forward(x)) is not None:
            return fused
        base_result = result = self.base_layer(x)
        if self.disabled or self.merged or not self.active:
            return result
        out_dtype = result.dtype
        for name, weight in self.active.items():
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            dropout = self.lora_dropout[name]
            scaling = self.scaling[name]
            xa = x.to(lora_a.weight.dtype)
            if name not in self.lora_magnitude_vector:
                delta = lora_b(lora_a(dropout(xa))) * scaling
            else:
                delta = self._dora_delta(name, xa, base_result, dropout, scaling)
            result = result + weight * delta.to(out_dtype)
        return result

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """One autograd node (`ferrotune.kernels.lora_linear`: fewer saved tensors and launches)
        where the fast paths serve x (CUDA, kernels enabled; see `kernels.lora.set_fused_lora`)
        and the layer is one active plain LoRA adapter over an `nn.Linear` or `NF4Linear` base;
        None means: take the plain path.
        DoRA, several active adapters and other bases always take the plain path."""
        if self.disabled or self.merged or len(self.active) != 1 or not fused_lora_runs_on(x):
            return None
        ((name, adapter_weight),) = self.active.items()
        if name not in self.lora_A or name in self.lora_magnitude_vector:
            return None
        base, dropout = self.base_layer, self.lora_dropout[name]
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        autocast = torch.is_autocast_enabled(x.device.type)
        if isinstance(base, NF4Linear):
            weight: object = base.dequantize
            same_dtype = x.dtype == a.dtype == b.dtype  # dequantized to x's dtype, as NF4Linear does
        elif type(base) is nn.Linear:
            weight = base.weight
            same_dtype = x.dtype == a.dtype == b.dtype == base.weight.dtype
        else:
            return None
        if not (autocast or same_dtype) or not isinstance(dropout, (nn.Dropout, nn.Identity)):
            return None
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        scaling = adapter_weight * self.scaling[name]
        return lora_linear(x, weight, base.bias, a, b, scaling, p)  # type: ignore[arg-type]

    def _dora_delta(
        self,
        name: str,
        x: torch.Tensor,
        base_result: torch.Tensor,
        dropout: nn.Module,
        scaling: float,
    ) -> torch.Tensor:
        """(m/n - 1) ⊙ W x + (m/n) ⊙ s B A x, with n detached (PEFT's DoRA forward)."""
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        base = self.base_layer
        magnitude = self.lora_magnitude_vector[name]  # (out,)
        weight = base.weight.to(x.dtype)
        lora_weight = (lora_b.weight @ lora_a.weight).detach()  # (out, in)
        norm = torch.linalg.norm(weight + scaling * lora_weight, dim=1).to(weight.dtype).detach()
        mag_norm_scale = (magnitude / norm).view(1, -1)  # (1, out)
        if isinstance(dropout, nn.Identity) or not self.training:
            wx = base_result.to(x.dtype)
            if base.bias is not None:
                wx = wx - base.bias.to(x.dtype)
        else:
            x = dropout(x)
            wx = F.linear(x, weight)
        lora_result = lora_b(lora_a(x))
        return (mag_norm_scale - 1) * wx + mag_norm_scale * lora_result * scaling

    # ------------------------------------------------------------------ merge / unmerge

    @property
    def merged(self) -> bool:
        return self._merge_row_factor is not None

    def _row_factors(self, weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """f_i = m_i / n_i (out,) for each DoRA adapter, n_i from the current (unmerged) W."""
        weight = self.base_layer.weight.detach().float()
        return {
            name: self.lora_magnitude_vector[name].detach().float()
            / torch.linalg.norm(weight + self.delta_weight(name).detach().float(), dim=1)
            for name in weights
            if name in self.lora_magnitude_vector
        }

    def _merge_terms(
        self, weights: Mapping[str, float], factors: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged weight is c ⊙_row W + D with, over the active adapters i,
        c = 1 + Σ_dora w_i (f_i - 1)  (out,)   and   D = Σ w_i f_i s_i B_i A_i  (out, in),
        f_i = m_i/n_i for DoRA, 1 for LoRA: exactly what `forward` adds, folded into W."""
        weight = self.base_layer.weight
        row = torch.ones(self.out_features, device=weight.device, dtype=torch.float32)
        add = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        for name, w in weights.items():
            delta = self.delta_weight(name).detach().float()
            if name in factors:
                row = row + w * (factors[name] - 1)
                add = add + w * factors[name][:, None] * delta
            else:
                add = add + w * delta
        return row, add

    @torch.no_grad()
    def merge(self) -> None:
        """W <- c ⊙_row W + D (see `_merge_terms`); the DoRA factors are kept for `unmerge`."""
        if self.merged:
            return
        require_mergeable_base(self.base_layer, "LoRA")
        weights = {n: w for n, w in self.active.items() if n in self.lora_A}
        factors = self._row_factors(weights)
        row, add = self._merge_terms(weights, factors)
        weight = self.base_layer.weight
        weight.copy_((row[:, None] * weight.float() + add).to(weight.dtype))
        self._merge_row_factor = row
        self._merged = (weights, factors)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- (W_merged - D) / c."""
        if self._merge_row_factor is None:
            return
        weights, factors = self._merged
        row, add = self._merge_terms(weights, factors)
        weight = self.base_layer.weight
        weight.copy_(((weight.float() - add) / row[:, None]).to(weight.dtype))
        self._merge_row_factor = None
        self._merged = ({}, {})

    # ------------------------------------------------------------------ PEFT state

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        state = {
            "lora_A.weight": self.lora_A[name].weight.detach(),
            "lora_B.weight": self.lora_B[name].weight.detach(),
        }
        if name in self.lora_magnitude_vector:
            state["lora_magnitude_vector"] = self.lora_magnitude_vector[name].detach()
        return state

    def pissa_as_lora(self, name: str) -> dict[str, torch.Tensor]:
        """The PiSSA adapter as a rank-2r LoRA over the *original* weight (same scaling s):
        W_res + s B A = W + s [B, -B0] [A; A0]."""
        a0, b0 = self.pissa_initial[name]
        a, b = self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach()
        return {
            "lora_A.weight": torch.cat([a, a0.to(a.dtype)], dim=0),  # (2r, in)
            "lora_B.weight": torch.cat([b, -b0.to(b.dtype)], dim=1),  # (out, 2r)
        }

    def load_adapter_state(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, param in self.adapter_state(name).items():
                if key not in state:
                    raise KeyError(key)
                if tuple(state[key].shape) != tuple(param.shape):
                    raise ValueError(f"{key}: shape {tuple(state[key].shape)}, expected {tuple(param.shape)}")
                param.copy_(state[key])  # type: ignore[union-attr]


def apply_lora(model: nn.Module, config: LoraConfig, name: str = "default") -> list[str]:
    """Wraps every `nn.Linear` of `model` that `config` targets in a `LoraLinear` (or adds
    adapter `name` to an existing one) and freezes everything else. Returns the adapted names."""
    targets = find_targets(model, config.target_modules, config.exclude_modules, config.modules_to_save)
    for key in targets:
        module = model.get_submodule(key)
        if not isinstance(module, LoraLinear):
            if not isinstance(module, nn.Linear):
                raise ConfigError(f"lora: {key} is a {type(module).__name__}, not nn.Linear")
            module = LoraLinear(module)
            replace_module(model, key, module)
        r, alpha = config.rank_and_alpha(key)
        module.add_adapter(
            name,
            r,
            alpha,
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            init=config.init,
        )
    wrap_modules_to_save(model, config.modules_to_save, name)
    return targets


def lora_targets_summary(targets: Sequence[str]) -> str:
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    return f"{len(targets)} modules ({', '.join(leaves)})"

"""What every PEFT method shares: the adapter-layer protocol, target matching, module swapping
and `modules_to_save`.

An *adapter layer* is an `nn.Module` that holds one or more named adapters beside a frozen base
and follows the small protocol below. The free functions in `ferrotune.peft` (merge, disable,
set_active, save/load) walk a model's modules and call this protocol; nothing is patched. Whether a
module is an adapter layer is decided once per class (`is_adapter_layer`: the class defines the
protocol's methods), so walking a model costs one dictionary lookup per module.

Target matching follows PEFT's rules exactly, so a PEFT `adapter_config.json` selects the same
modules here:
- a string is a regular expression that must match the whole module name (`re.fullmatch`);
- a list matches a module whose name equals an entry or ends with `.entry`;
- `"all-linear"` selects every `nn.Linear` of the base model except the output layer (`lm_head`);
- `exclude_modules` uses the same two rules and wins over `target_modules`.
Only the base model's modules are candidates, never an adapter's own (a LoRA layer's `lora_A`,
a bottleneck's projections, a prompt encoder, a `modules_to_save` copy): a second adapter on a
model that already has one lands beside the first, in the same adapter layers.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeGuard

import torch
from torch import nn

from ferrotune.errors import ConfigError

ALL_LINEAR = "all-linear"
OUTPUT_LAYER_NAMES = ("lm_head",)
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


class AdapterLayer(Protocol):
    """A module with named adapters beside a frozen base.

    `active` maps adapter name -> combination weight (1.0 = the adapter as trained); an empty map
    or `disabled = True` makes the module compute its frozen base alone."""

    active: dict[str, float]
    disabled: bool

    def adapter_names(self) -> list[str]: ...

    def merge(self) -> None:
        """Folds the active adapters into the base weight in place (inference only)."""

    def unmerge(self) -> None:
        """Undoes `merge`, restoring the base weight (up to rounding)."""

    @property
    def merged(self) -> bool: ...

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's per-module key suffixes (`lora_A.weight`, ...)."""

    def load_adapter_state(self, name: str, state: Mapping[str, torch.Tensor]) -> None: ...

    def remove_adapter(self, name: str) -> None: ...


def check_adapter_name(name: str) -> str:
    """Adapter names become `nn.ModuleDict` keys: letters, digits, `_` and `-` only."""
    if not _ADAPTER_NAME.fullmatch(name):
        raise ConfigError(f"adapter name {name!r}: use letters, digits, '_' or '-' only")
    return name


# the protocol's methods and properties, looked up on the class
_ADAPTER_LAYER_MEMBERS = (
    "adapter_names",
    "merge",
    "unmerge",
    "merged",
    "adapter_state",
    "load_adapter_state",
    "remove_adapter",
)
_is_adapter_class: dict[type, bool] = {}


def is_adapter_layer(module: object) -> TypeGuard[AdapterLayer]:
    """Whether `module`'s class implements `AdapterLayer` (decided once per class: an
    `isinstance` against a runtime Protocol would probe every member of every module)."""
    kind = type(module)
    known = _is_adapter_class.get(kind)
    if known is None:
        known = _is_adapter_class[kind] = all(hasattr(kind, m) for m in _ADAPTER_LAYER_MEMBERS)
    return known


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every adapter layer of `model` with its module name."""
    for name, module in model.named_modules():
        if is_adapter_layer(module):
            yield name, module


def base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """`model.named_modules()` without adapter internals: an adapter layer is yielded but not
    entered, except for the model a virtual-token wrapper holds as `base_model`."""
    yield prefix, model
    children = list(model.named_children())
    if is_adapter_layer(model):
        children = [(name, child) for name, child in children if name == "base_model"]
    for child_name, child in children:
        yield from base_modules(child, f"{prefix}.{child_name}" if prefix else child_name)


# ----------------------------------------------------------------------------- target matching


def _matches(names: str | Sequence[str], key: str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == n or key.endswith(f".{n}") for n in names)


def is_target(
    key: str,
    module: nn.Module,
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] = (),
) -> bool:
    """Whether module `key` is adapted, by PEFT's matching rules (see the module docstring)."""
    if exclude_modules and _matches(exclude_modules, key):
        return False
    if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in modules_to_save):
        return False
    if target_modules == ALL_LINEAR:
        leaf = key.rsplit(".", 1)[-1]
        linear = module if isinstance(module, nn.Linear) else getattr(module, "base_layer", None)
        return isinstance(linear, nn.Linear) and leaf not in OUTPUT_LAYER_NAMES
    return _matches(target_modules, key)


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] = (),
    kinds: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> list[str]:
    """Names of the modules of `model` that a config selects; an error if it selects none or
    selects a module of an unsupported kind."""
    found = []
    for key, module in base_modules(model):
        if not key or isinstance(module, ModulesToSave):
            continue
        if not is_target(key, module, target_modules, exclude_modules, modules_to_save):
            continue
        if not isinstance(module, kinds) and not is_adapter_layer(module):
            if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
                continue  # a regex may also match containers; PEFT skips those too
            raise ConfigError(
                f"target_modules: {key} is a {type(module).__name__}; "
                f"supported: {', '.join(k.__name__ for k in kinds)}"
            )
        found.append(key)
    if not found:
        raise ConfigError(f"target_modules {target_modules!r} matches no module of the model")
    return found


def pattern_value(patterns: Mapping[str, float], key: str, default: float) -> float:
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the first pattern `p` with
    `re.match(rf"(.*\\.)?({p})$", key)` gives the value."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def replace_module(model: nn.Module, key: str, new: nn.Module) -> None:
    """Puts `new` where submodule `key` was (an attribute assignment on its parent)."""
    parent_name, _, child = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ----------------------------------------------------------------------------- modules_to_save


class ModulesToSave(nn.Module):
    """A module trained in full beside its frozen original (PEFT's `modules_to_save`), e.g. a
    classification head or `lm_head`. Each named adapter owns a trainable copy; when adapters are
    disabled the original serves. Several active copies combine as
    `y = Σ w_i copy_i(x) + (1 - Σ w_i) original(x)`."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.disabled = False

    def add(self, name: str) -> None:
        trained = copy.deepcopy(self.original_module)
        for p in trained.parameters():
            p.requires_grad_(True)
        self.modules_to_save[check_adapter_name(name)] = trained
        for p in self.original_module.parameters():
            p.requires_grad_(False)

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    @property
    def merged(self) -> bool:
        return False

    def merge(self) -> None:
        pass  # a full copy is used as is; there is nothing to fold

    def unmerge(self) -> None:
        pass

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        active = {n: w for n, w in self.active.items() if n in self.modules_to_save}
        if self.disabled or not active:
            return self.original_module(*args, **kwargs)
        if len(active) == 1 and next(iter(active.values())) == 1.0:
            return self.modules_to_save[next(iter(active))](*args, **kwargs)
        rest = 1.0 - sum(active.values())
        out = self.original_module(*args, **kwargs) * rest if rest else 0.0
        for name, weight in active.items():
            out = out + weight * self.modules_to_save[name](*args, **kwargs)
        assert isinstance(out, torch.Tensor)
        return out

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.modules_to_save[name].state_dict().items()}

    def load_adapter_state(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        if name not in self.modules_to_save:
            self.add(name)
        self.modules_to_save[name].load_state_dict(dict(state), strict=True)

    def remove_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active.pop(name, None)


def wrap_modules_to_save(model: nn.Module, names: Sequence[str], adapter: str) -> list[str]:
    """Gives each module of `model` named (or ending with) an entry of `names` a trainable copy
    for `adapter`. Returns the wrapped module names."""
    if not names:
        return []
    wrapped = []
    for key, module in list(base_modules(model)):
        if isinstance(module, ModulesToSave):
            if _matches(names, key):
                module.add(adapter)
                wrapped.append(key)
            continue
        if key and _matches(names, key):
            wrapper = ModulesToSave(module)
            wrapper.add(adapter)
            replace_module(model, key, wrapper)
            wrapped.append(key)
    missing = [n for n in names if not any(k == n or k.endswith(f".{n}") for k in wrapped)]
    if missing:
        raise ConfigError(f"modules_to_save: no module named {missing}")
    return wrapped


def require_mergeable_base(layer: nn.Module, method: str) -> None:
    """Merging writes into the base weight, so it must be a stored parameter. A quantized base
    (NF4Linear, GPTQLinear) only computes its weight on the fly: refuse instead of silently doing
    nothing, and point at the streaming merge that handles 4-bit bases."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise ConfigError(
            f"cannot merge {method} into a {type(layer).__name__} in memory (its weight is quantized); "
            "use `ferrotune merge BASE ADAPTER OUT`, which merges into the dequantized or original weights"
        )


class WrappedLM(nn.Module):
    """The causal LM's surface for a wrapper that holds the LM as `base_model` (virtual tokens,
    task routing): config, decoder stack, checkpointing switch and KV cache come from the LM."""

    base_model: nn.Module

    @property
    def config(self) -> Any:
        return self.base_model.config

    @property
    def model(self) -> nn.Module:
        """The LM's decoder stack (`CausalLM.model`)."""
        return self.base_model.model  # type: ignore[return-value]

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(getattr(self.base_model, "gradient_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.base_model.gradient_checkpointing = enabled

    def make_kv_cache(self, batch_size: int, max_length: int) -> Any:
        return self.base_model.make_kv_cache(batch_size, max_length)  # type: ignore[operator]

"""Parameter-efficient fine-tuning: one file per method, free functions here.

    model = apply_peft(model, LoraConfig(r=16, target_modules="all-linear"))
    print(trainable_parameters(model))           # trainable params: ... || trainable%: 0.52
    ... train ...
    save_adapter(model, "out/adapter")           # adapter_config.json + adapter_model.safetensors
    with disable_adapter(model):                 # the frozen base, e.g. the DPO reference
        ref_logits = model(input_ids)
    merge(model)                                 # fold LoRA / DoRA / IA3 into the weights

Methods (config class -> file): LoraConfig (LoRA, rsLoRA, DoRA, PiSSA init) lora.py;
IA3Config ia3.py; BottleneckConfig (Houlsby, Pfeiffer) adapter.py; PrefixConfig (prefix tuning,
P-tuning v2) prefix.py; PromptConfig (prompt tuning, P-tuning) prompt.py; files: formats.py.

LoRA, DoRA, IA3 and bottleneck adapters change the model in place (modules are swapped by name,
the base frozen). Virtual-token methods return a `PrefixModel` wrapping the model with the same
call signature; always use the returned model. Several named adapters can live in one model:
`set_active(model, "a")` switches, `set_active(model, {"a": 0.7, "b": 0.3})` combines them for
inference (weights scale each adapter's contribution; virtual tokens switch only).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ferrotune.errors import ConfigError, FormatError
from ferrotune.peft import formats
from ferrotune.peft.adapter import BottleneckConfig, apply_bottleneck
from ferrotune.peft.common import AdapterLayer, ModulesToSave, adapter_layers, replace_module
from ferrotune.peft.formats import MethodConfig
from ferrotune.peft.ia3 import IA3Config, IA3Linear, apply_ia3
from ferrotune.peft.lora import LoraConfig, LoraLinear, apply_lora
from ferrotune.peft.prefix import PrefixConfig, PrefixModel, apply_prefix
from ferrotune.peft.prompt import PromptConfig, apply_prompt

__all__ = [
    "BottleneckConfig",
    "IA3Config",
    "LoraConfig",
    "PrefixConfig",
    "PrefixModel",
    "PromptConfig",
    "TrainableParameters",
    "active_adapters",
    "adapter_names",
    "adapter_state_dict",
    "apply_peft",
    "apply_peft_section",
    "config_from_dict",
    "disable_adapter",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "save_adapter",
    "set_active",
    "trainable_parameters",
    "unmerge",
]

# method name in a `[peft]` config -> (config class, options fixed by the name)
METHODS: dict[str, tuple[type, dict[str, Any]]] = {
    "lora": (LoraConfig, {}),
    "rslora": (LoraConfig, {"use_rslora": True}),
    "dora": (LoraConfig, {"use_dora": True}),
    "pissa": (LoraConfig, {"init": "pissa"}),
    "ia3": (IA3Config, {}),
    "adapter": (BottleneckConfig, {}),
    "houlsby": (BottleneckConfig, {"placement": "houlsby"}),
    "pfeiffer": (BottleneckConfig, {"placement": "pfeiffer"}),
    "prefix": (PrefixConfig, {}),
    "p_tuning_v2": (PrefixConfig, {"prefix_projection": False}),
    "prompt": (PromptConfig, {}),
    "p_tuning": (PromptConfig, {"encoder": "mlp"}),
}


def config_from_dict(
    method: str, options: Mapping[str, Any] | None = None, *, where: str = "peft.options"
) -> MethodConfig:
    """A method config from a name and options (the `[peft]` section); an unknown method or
    option raises `ConfigError` naming the key (`where` is the options' dotted path)."""
    if method not in METHODS:
        raise ConfigError(f"peft.method: {method!r} is not one of {sorted(METHODS)}")
    cls, fixed = METHODS[method]
    options = dict(options or {})
    known = {f.name for f in fields(cls)}
    for key in options:
        if key not in known:
            raise ConfigError(f"{where}.{key}: not an option of {method!r} (options: {sorted(known)})")
    for key, value in fixed.items():
        if key in options and options[key] != value:
            raise ConfigError(f"{where}.{key}: method {method!r} fixes it to {value!r}")
    try:
        config: MethodConfig = cls(**{**options, **fixed})
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None
    return config


def apply_peft_section(
    model: nn.Module, section: Any, *, tokenizer: Any = None, quiet: bool = False
) -> nn.Module:
    """Applies a run config's `[peft]` section (`ferrotune.config.PeftSection`): the model
    unchanged when `section.method` is empty, else the adapted model, with the trainable-parameter
    report printed (to stderr, like the training progress)."""
    if not section.method:
        return model
    model = apply_peft(model, config_from_dict(section.method, section.options), tokenizer=tokenizer)
    if not quiet:
        print(f"peft {section.method}: {trainable_parameters(model)}", file=sys.stderr, flush=True)
    return model


# ----------------------------------------------------------------------------- applying


def apply_peft(
    model: nn.Module,
    config: MethodConfig,
    name: str = "default",
    *,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Adds adapter `name` to `model` and makes it the one active, trainable adapter: every
    other parameter is frozen. Returns the model to use (a `PrefixModel` for virtual tokens)."""
    if name in adapter_names(model):
        raise ConfigError(f"the model already has an adapter named {name!r}")
    if not adapter_names(model):
        model.requires_grad_(False)
    if isinstance(config, LoraConfig):
        apply_lora(model, config, name)
    elif isinstance(config, IA3Config):
        apply_ia3(model, config, name)
    elif isinstance(config, BottleneckConfig):
        apply_bottleneck(model, config, name)
    elif isinstance(config, PrefixConfig):
        model = apply_prefix(model, config, name)
    elif isinstance(config, PromptConfig):
        model = apply_prompt(model, config, name, tokenizer=tokenizer, generator=generator)
    else:
        raise TypeError(f"not a PEFT method config: {type(config).__name__}")
    _configs(model)[name] = config
    set_active(model, name)
    set_trainable(model, name)
    return model


def _configs(model: nn.Module) -> dict[str, MethodConfig]:
    """The method config of each named adapter, kept on the outermost model."""
    store: dict[str, MethodConfig] | None = model.__dict__.get("peft_config")
    if store is None:
        store = {}
        inner = model.base_model if isinstance(model, PrefixModel) else None
        if inner is not None:
            store.update(inner.__dict__.get("peft_config", {}))
        model.__dict__["peft_config"] = store
    return store


def peft_config(model: nn.Module, name: str = "default") -> MethodConfig:
    try:
        return _configs(model)[name]
    except KeyError:
        raise KeyError(f"the model has no adapter named {name!r}") from None


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, layer in adapter_layers(model):
        names += [n for n in layer.adapter_names() if n not in names]
    return names


def _adapter_params(layer: AdapterLayer, name: str) -> Iterator[torch.nn.Parameter]:
    """The parameters of adapter `name` in one layer: those under a `.<name>.` container key."""
    assert isinstance(layer, nn.Module)
    for pname, param in layer.named_parameters():
        if pname.startswith(("base_layer.", "original_module.", "base_model.")):
            continue
        if name in pname.split("."):
            yield param


def set_trainable(model: nn.Module, names: str | Sequence[str]) -> None:
    """Makes the named adapters' parameters trainable and every other adapter's frozen."""
    wanted = {names} if isinstance(names, str) else set(names)
    for _, layer in adapter_layers(model):
        for adapter in layer.adapter_names():
            for param in _adapter_params(layer, adapter):
                param.requires_grad_(adapter in wanted)


def set_active(model: nn.Module, adapters: str | Sequence[str] | Mapping[str, float]) -> None:
    """Routes the forward pass through the given adapters: one name, several (weight 1 each) or
    `{name: weight}` for a weighted combination. Merged layers are unmerged first."""
    if isinstance(adapters, str):
        weights = {adapters: 1.0}
    elif isinstance(adapters, Mapping):
        weights = {str(k): float(v) for k, v in adapters.items()}
    else:
        weights = dict.fromkeys(adapters, 1.0)
    known = adapter_names(model)
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise ConfigError(f"no adapter named {unknown} (the model has {known})")
    for _, layer in adapter_layers(model):
        if layer.merged:
            layer.unmerge()
        layer.active = {n: w for n, w in weights.items() if n in layer.adapter_names()}


def active_adapters(model: nn.Module) -> dict[str, float]:
    active: dict[str, float] = {}
    for _, layer in adapter_layers(model):
        active.update(layer.active)
    return active


# ----------------------------------------------------------------------------- reporting


@dataclass(frozen=True)
class TrainableParameters:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.percent:.4f}"
        )


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Counts (tied parameters once). `print(trainable_parameters(model))` gives the report."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return TrainableParameters(trainable, total)


# ----------------------------------------------------------------------------- merging


def merge(model: nn.Module) -> None:
    """Folds the active LoRA / DoRA / IA3 adapters into the base weights in place. Bottleneck and
    virtual-token adapters cannot fold and keep running beside the merged weights."""
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges the active adapters and puts plain modules back (LoRA/IA3 layers become their
    `nn.Linear`, `modules_to_save` the active copy). Refuses adapters that cannot fold."""
    for path, layer in list(adapter_layers(model)):
        if isinstance(layer, (LoraLinear, IA3Linear)):
            layer.merge()
            replace_module(model, path, layer.base_layer)
        elif isinstance(layer, ModulesToSave):
            names = [n for n in layer.active if n in layer.modules_to_save]
            if len(names) > 1:
                raise ConfigError(f"{path}: cannot unload a combination of modules_to_save copies")
            replace_module(model, path, layer.modules_to_save[names[0]] if names else layer.original_module)
        else:
            raise ConfigError(f"{path}: a {type(layer).__name__} cannot be merged into the weights")
    model.__dict__.pop("peft_config", None)
    return model


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes its frozen base (merged layers are unmerged for it
    and merged again after): the DPO / PPO reference model without a second copy."""
    layers = [layer for _, layer in adapter_layers(model)]
    state = [(layer.disabled, layer.merged) for layer in layers]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, (disabled, merged) in zip(layers, state, strict=True):
            layer.disabled = disabled
            if merged:
                layer.merge()


# ----------------------------------------------------------------------------- files


def adapter_state_dict(
    model: nn.Module, name: str = "default", *, pissa_as_lora: bool = True
) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's key names."""
    return formats.adapter_tensors(model, name, pissa_as_lora=pissa_as_lora)


def save_adapter(
    model: nn.Module,
    directory: str,
    name: str = "default",
    *,
    pissa_as_lora: bool = True,
    base_model_name_or_path: str | None = None,
) -> None:
    """Writes `adapter_config.json` + `adapter_model.safetensors` in PEFT's format. A PiSSA
    adapter is saved as the equivalent rank-2r LoRA over the original weights unless
    `pissa_as_lora=False`."""
    config = peft_config(model, name)
    model_config = getattr(model, "config", None)
    config_json = formats.to_peft_config(
        config, model_config, pissa_as_lora=pissa_as_lora, base_model_name_or_path=base_model_name_or_path
    )
    formats.write_adapter(
        directory, config_json, adapter_state_dict(model, name, pissa_as_lora=pissa_as_lora)
    )


def load_adapter(
    model: nn.Module, directory: str, name: str = "default", *, activate: bool = True
) -> nn.Module:
    """Adds the adapter saved in `directory` (by ferrotune or by PEFT) as `name`. Returns the
    model to use (a `PrefixModel` for virtual tokens). The adapter is frozen (inference); call
    `set_trainable(model, name)` to train it further."""
    raw, tensors, config_path = formats.read_adapter(directory)
    config = formats.from_peft_config(raw, config_path, getattr(model, "config", None))
    before = active_adapters(model)
    model = apply_peft(model, config, name)
    try:
        formats.load_tensors(model, name, tensors, str(directory))
    except FormatError:
        _remove(model, name)
        raise
    set_trainable(model, [])
    set_active(model, name if activate or not before else before)
    return model


def _remove(model: nn.Module, name: str) -> None:
    for _, layer in adapter_layers(model):
        if name in layer.adapter_names():
            layer.remove_adapter(name)
    _configs(model).pop(name, None)

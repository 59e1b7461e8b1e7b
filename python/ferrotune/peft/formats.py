"""PEFT's adapter files, read and written both ways.

A saved adapter is a folder with two files:
- `adapter_config.json`: the method's settings under PEFT's field names (`peft_type`, `r`,
  `lora_alpha`, `target_modules`, ...), so `peft.PeftModel.from_pretrained` rebuilds the same
  adapter over the transformers model;
- `adapter_model.safetensors`: the adapter's tensors under PEFT's key names, the adapter's own
  name removed:

      LoRA   base_model.model.<module>.lora_A.weight (r, in), .lora_B.weight (out, r)
      DoRA   ... plus base_model.model.<module>.lora_magnitude_vector (out,)
      IA3    base_model.model.<module>.ia3_l  (out, 1), or (1, in) on feed-forward modules
      modules_to_save   base_model.model.<module>.<param>   (e.g. base_model.model.lm_head.weight)
      prefix / prompt / P-tuning   prompt_embeddings   (P, L·2·kv_dim) or (P, hidden)

Bottleneck adapters have no PEFT type. We write them in the same two files with
`"peft_type": "BOTTLENECK"` and keys `base_model.model.<layer>.{attn,mlp}_adapter.{down,up}.{weight,bias}`
(see docs/methods.md); PEFT cannot load them.

Reading validates everything against the model before any tensor is copied: an unknown method or
option PEFT's file sets that we do not implement, a key that matches no adapter tensor, a missing
key or a shape mismatch is a `FormatError` naming the file and the key or field.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ferrotune.errors import FormatError
from ferrotune.io import load_checkpoint, save_safetensors
from ferrotune.peft.adapter import BottleneckConfig
from ferrotune.peft.common import adapter_layers
from ferrotune.peft.ia3 import IA3Config
from ferrotune.peft.lora import LoraConfig, LoraLinear
from ferrotune.peft.prefix import KVShape, PrefixConfig, PrefixModel
from ferrotune.peft.prompt import PromptConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MethodConfig = LoraConfig | IA3Config | BottleneckConfig | PrefixConfig | PromptConfig

# ----------------------------------------------------------------------------- tensors


def _language_model(model: nn.Module) -> nn.Module:
    return model.base_model if isinstance(model, PrefixModel) else model


def adapter_tensors(model: nn.Module, name: str, *, pissa_as_lora: bool = True) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's keys (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    lm = _language_model(model)
    if isinstance(model, PrefixModel) and name in model.prompt_encoders:
        out.update(model.adapter_state(name))
    for path, layer in adapter_layers(lm):
        if name not in layer.adapter_names():
            continue
        if pissa_as_lora and isinstance(layer, LoraLinear) and name in layer.pissa_initial:
            state = layer.pissa_as_lora(name)
        else:
            state = layer.adapter_state(name)
        for suffix, tensor in state.items():
            out[f"base_model.model.{path}.{suffix}"] = tensor.detach().contiguous()
    if not out:
        raise KeyError(f"the model has no adapter named {name!r}")
    return out


def load_tensors(model: nn.Module, name: str, tensors: Mapping[str, torch.Tensor], path: str) -> None:
    """Copies PEFT-keyed `tensors` into adapter `name` (already created by `apply_peft`)."""
    lm = _language_model(model)
    plan: list[tuple[Any, dict[str, torch.Tensor]]] = []
    used: set[str] = set()
    if isinstance(model, PrefixModel) and name in model.prompt_encoders:
        if "prompt_embeddings" not in tensors:
            raise FormatError(
                f"{path}: missing key 'prompt_embeddings'", path, "prompt_embeddings", "missing"
            )
        plan.append((model, {"prompt_embeddings": tensors["prompt_embeddings"]}))
        used.add("prompt_embeddings")
    for layer_path, layer in adapter_layers(lm):
        if name not in layer.adapter_names():
            continue
        prefix = f"base_model.model.{layer_path}."
        expected = layer.adapter_state(name)
        state = {}
        for suffix, current in expected.items():
            key = prefix + suffix
            if key not in tensors:
                raise FormatError(f"{path}: missing key {key!r}", path, key, "missing")
            value = tensors[key]
            if tuple(value.shape) != tuple(current.shape):
                raise FormatError(
                    f"{path}: {key} has shape {tuple(value.shape)}, the model needs {tuple(current.shape)}",
                    path,
                    key,
                    "shape",
                )
            state[suffix] = value
            used.add(key)
        plan.append((layer, state))
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise FormatError(
            f"{path}: key {unexpected[0]!r} matches no adapter tensor of the model"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""),
            path,
            unexpected[0],
            "unexpected",
        )
    for layer, state in plan:
        layer.load_adapter_state(name, {k: v.to(_param_device(layer)) for k, v in state.items()})


def _param_device(layer: nn.Module) -> torch.device:
    for p in layer.parameters():
        return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- configs


def _maybe_list(value: Any) -> Any:
    return sorted(value) if isinstance(value, (list, tuple, set)) else value


def to_peft_config(
    config: MethodConfig,
    model_config: Any,
    *,
    pissa_as_lora: bool = True,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """The `adapter_config.json` PEFT writes for the same adapter (fields PEFT reads)."""
    common: dict[str, Any] = {
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "task_type": "CAUSAL_LM" if model_config is not None else None,  # None: a bare module
        "revision": None,
    }
    if isinstance(config, LoraConfig):
        r, alpha = config.r, config.alpha
        rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
        init: Any = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}[config.init]
        if config.init == "pissa" and pissa_as_lora:
            # rank 2r with the same scaling s: alpha doubles (sqrt(2) x for rsLoRA)
            grow = 2**0.5 if config.use_rslora else 2.0
            r, alpha, init = 2 * r, alpha * grow, True
            alpha_pattern = {k: v * grow for k, v in alpha_pattern.items()}
            rank_pattern = {k: 2 * v for k, v in rank_pattern.items()}
        return {
            **common,
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": config.dropout,
            "target_modules": _maybe_list(config.target_modules),
            "exclude_modules": _maybe_list(config.exclude_modules),
            "use_rslora": config.use_rslora,
            "use_dora": config.use_dora,
            "init_lora_weights": init,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "modules_to_save": list(config.modules_to_save) or None,
            "bias": "none",
            "fan_in_fan_out": False,
            "layers_to_transform": None,
            "layers_pattern": None,
        }
    if isinstance(config, IA3Config):
        return {
            **common,
            "peft_type": "IA3",
            "target_modules": _maybe_list(config.target_modules),
            "feedforward_modules": _maybe_list(config.feedforward_modules),
            "exclude_modules": _maybe_list(config.exclude_modules),
            "modules_to_save": list(config.modules_to_save) or None,
            "init_ia3_weights": config.init_ia3_weights,
            "fan_in_fan_out": False,
        }
    shape = KVShape.of(model_config)
    if isinstance(config, PrefixConfig):
        return {
            **common,
            "peft_type": "PREFIX_TUNING",
            "num_virtual_tokens": config.num_virtual_tokens,
            "num_layers": shape.num_layers,
            "num_attention_heads": shape.num_kv_heads,
            "token_dim": shape.token_dim,
            "num_transformer_submodules": 1,
            "prefix_projection": config.prefix_projection,
            "encoder_hidden_size": config.encoder_hidden_size,
        }
    if isinstance(config, PromptConfig):
        prompt_fields = {
            "num_virtual_tokens": config.num_virtual_tokens,
            "num_layers": shape.num_layers,
            "num_attention_heads": model_config.num_attention_heads,
            "token_dim": model_config.hidden_size,
            "num_transformer_submodules": 1,
        }
        if config.encoder == "none":
            # the init is spent once trained; "RANDOM" needs no tokenizer to load
            return {**common, **prompt_fields, "peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM"}
        return {
            **common,
            **prompt_fields,
            "peft_type": "P_TUNING",
            "encoder_reparameterization_type": config.encoder.upper(),
            "encoder_hidden_size": config.encoder_hidden_size,
            "encoder_num_layers": 2,
            "encoder_dropout": config.encoder_dropout,
        }
    if isinstance(config, BottleneckConfig):
        return {
            **common,
            "peft_type": "BOTTLENECK",
            "bottleneck_size": config.bottleneck_size,
            "activation": config.activation,
            "placement": config.placement,
            "dropout": config.dropout,
            "num_layers": shape.num_layers,
            "hidden_size": model_config.hidden_size,
        }
    raise TypeError(f"not a PEFT method config: {type(config).__name__}")


def _field(raw: Mapping[str, Any], key: str, kinds: tuple[type, ...], path: str, default: Any = ...) -> Any:
    if key not in raw or raw[key] is None:
        if default is ...:
            raise FormatError(f"{path}: field {key!r} is missing", path, key, "missing")
        return default
    value = raw[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise FormatError(f"{path}: field {key!r} must be {names}, got {value!r}", path, key, "type")
    return value


def _unsupported(raw: Mapping[str, Any], path: str, checks: Mapping[str, Any]) -> None:
    """Fields whose non-default values we do not implement: refuse rather than misread."""
    for key, allowed in checks.items():
        value = raw.get(key)
        if value not in allowed:
            raise FormatError(
                f"{path}: field {key!r} = {value!r} is not supported by ferrotune", path, key, "unsupported"
            )


def from_peft_config(raw: Mapping[str, Any], path: str, model_config: Any) -> MethodConfig:
    """Our method config from a PEFT `adapter_config.json` (already parsed)."""
    kind = _field(raw, "peft_type", (str,), path)
    if kind == "LORA":
        _unsupported(
            raw,
            path,
            {
                "bias": ("none", None),
                "lora_bias": (False, None),
                "fan_in_fan_out": (False, None),
                "layers_to_transform": (None, []),
                "use_qalora": (False, None),
                "layer_replication": (None,),
                "trainable_token_indices": (None,),
                "target_parameters": (None, []),
            },
        )
        init = raw.get("init_lora_weights", True)
        if init in (True, False):
            ours = "default"
        elif isinstance(init, str) and (init == "gaussian" or init.startswith("pissa")):
            ours = "gaussian" if init == "gaussian" else "pissa"
        else:
            raise FormatError(
                f"{path}: init_lora_weights = {init!r} is not supported",
                path,
                "init_lora_weights",
                "unsupported",
            )
        return LoraConfig(
            r=_field(raw, "r", (int,), path),
            alpha=float(_field(raw, "lora_alpha", (int, float), path)),
            dropout=float(_field(raw, "lora_dropout", (int, float), path, 0.0)),
            target_modules=_field(raw, "target_modules", (str, list), path),
            exclude_modules=_field(raw, "exclude_modules", (str, list), path, None),
            use_rslora=_field(raw, "use_rslora", (bool,), path, False),
            use_dora=_field(raw, "use_dora", (bool,), path, False),
            init=ours,
            rank_pattern=dict(_field(raw, "rank_pattern", (dict,), path, {})),
            alpha_pattern=dict(_field(raw, "alpha_pattern", (dict,), path, {})),
            modules_to_save=list(_field(raw, "modules_to_save", (list,), path, [])),
        )
    if kind == "IA3":
        _unsupported(raw, path, {"fan_in_fan_out": (False, None)})
        return IA3Config(
            target_modules=_field(raw, "target_modules", (str, list), path),
            feedforward_modules=_field(raw, "feedforward_modules", (str, list), path, []),
            exclude_modules=_field(raw, "exclude_modules", (str, list), path, None),
            modules_to_save=list(_field(raw, "modules_to_save", (list,), path, [])),
        )
    if kind in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):
        if model_config is None:
            raise FormatError(
                f"{path}: {kind} needs a causal LM with a config", path, "peft_type", "no model config"
            )
        shape = KVShape.of(model_config)
        _unsupported(raw, path, {"num_transformer_submodules": (1, None)})
        layers = _field(raw, "num_layers", (int,), path, shape.num_layers)
        if layers != shape.num_layers:
            raise FormatError(
                f"{path}: num_layers = {layers}, the model has {shape.num_layers}",
                path,
                "num_layers",
                "mismatch",
            )
        want = shape.token_dim if kind == "PREFIX_TUNING" else model_config.hidden_size
        token_dim = _field(raw, "token_dim", (int,), path, want)
        if token_dim != want:
            raise FormatError(
                f"{path}: token_dim = {token_dim}, the model needs {want}", path, "token_dim", "mismatch"
            )
        tokens = _field(raw, "num_virtual_tokens", (int,), path)
        if kind == "PREFIX_TUNING":
            # the file holds the projected prefix; the MLP is a training-time device only
            return PrefixConfig(num_virtual_tokens=tokens)
        return PromptConfig(num_virtual_tokens=tokens)
    if kind == "BOTTLENECK":
        return BottleneckConfig(
            bottleneck_size=_field(raw, "bottleneck_size", (int,), path),
            activation=_field(raw, "activation", (str,), path, "relu"),
            placement=_field(raw, "placement", (str,), path, "houlsby"),
            dropout=float(_field(raw, "dropout", (int, float), path, 0.0)),
        )
    raise FormatError(
        f"{path}: peft_type {kind!r} is not supported by ferrotune", path, "peft_type", "unsupported"
    )


# ----------------------------------------------------------------------------- files


def write_adapter(
    directory: str | os.PathLike[str], config_json: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> None:
    """Writes both files atomically (each appears complete or not at all)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, folder / WEIGHTS_NAME)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".adapter_config.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dict(config_json), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, folder / CONFIG_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_adapter(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(config dict, tensors, config path). Tensors are copied out of the memory-mapped file."""
    folder = Path(directory)
    config_path = folder / CONFIG_NAME
    weights_path = folder / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FormatError(f"{p}: not found", str(p), None, "missing file")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FormatError(
            f"{config_path}:{e.lineno}: {e.msg}", str(config_path), f"line {e.lineno}", e.msg
        ) from None
    if not isinstance(raw, dict):
        raise FormatError(
            f"{config_path}: expected a JSON object", str(config_path), "line 1", "not an object"
        )
    checkpoint = load_checkpoint(weights_path)
    tensors = {key: checkpoint[key].clone() for key in checkpoint}
    return raw, tensors, str(config_path)

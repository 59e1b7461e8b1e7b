"""Task-routed adapters: one adapter per task, trained jointly with a shared one, each token of a
batch routed to its own task's adapter inside the same forward pass.

Routed LoRA. A target `nn.Linear` W (possibly already carrying the shared LoRA) gains n task
adapters stacked in two tensors, A (n, r, in) and B (n, out, r). With g(t) in {0..n-1} the task
of token t (-1: none, e.g. padding) and onehot_k(t) = [g(t) = k]:

    y_t = base(x_t) + s · B_{g(t)} A_{g(t)} x_t
        = base(x_t) + s · B_cat ( (onehot(t) ⊗ 1_r) ⊙ (A_cat x_t) )

    A_cat = A.reshape(n·r, in),  B_cat = B.permute(1, 0, 2).reshape(out, n·r)

so the whole batch takes two matmuls, whatever mix of tasks it holds (packed rows may hold
documents of several tasks: routing is per token). With one task per row (`task_ids` (B,), as in
generation) each row gathers its own factors instead and two batched matmuls cost one LoRA. The masked middle zeroes every task block but
the token's own, so gradients reach only the adapter of the token's task. The cost is that of one
LoRA of rank n·r, which is right for a handful of tasks; `routed_lora_reference` is the plain
per-task loop it must equal.

Routed prompt tuning. Each task k owns P virtual tokens E_k (P, hidden). As in prompt.py the
prompt's keys and values do not depend on the text, so all n prompts run through the model once,
as a batch of n rows (each row routed to its own task, so a routed LoRA also adapts its own
prompt), and each row of the real batch gathers the keys/values of its task: per layer
(n, KV, P, D) -> (B, KV, P, D). Positions of real tokens shift by P, as PEFT's prompt tuning.
A prompt belongs to a whole row, so every row must hold one task.

Routing context. `RoutedModel` (the model to use after `apply_routed`) takes `task_ids` as a
forward keyword, (B,) per row or (B, T) per token, and hands it to its routed layers before the
forward; the ids stay set until the next call (`route`), so gradient checkpointing's recompute
in backward and step-by-step decoding see the same routing. Nothing is patched.

Files: `save_routed(model, out)` writes `out/shared/` (the shared adapter) and `out/tasks/<name>/`
(one per task), each a PEFT adapter folder, plus `out/routing.json` (task names in index order).
Task k's LoRA keys are the module paths of the plain model, so PEFT loads shared and task k over
transformers and, with both active, computes the routed model's output for task k.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ferrotune.errors import ConfigError, FormatError
from ferrotune.peft import formats
from ferrotune.peft.common import (
    WrappedLM,
    adapter_layers,
    check_adapter_name,
    is_adapter_layer,
    is_target,
    replace_module,
)
from ferrotune.peft.lora import LoraConfig, LoraLinear, lora_scaling
from ferrotune.peft.prefix import PrefixKV
from ferrotune.peft.prompt import PromptConfig

ROUTING_FILE = "routing.json"
ROUTING_FORMAT = "ferrotune.routed"
SHARED_NAME = "shared"
RoutedMethod = LoraConfig | PromptConfig


def token_task_ids(task_ids: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Routing ids as (B, T) int64 for activations of leading shape (B, T): per-row ids (B,)
    are broadcast over T; per-token ids must match (B, T) (during KV-cache decoding the per-row
    ids are used, since only the new tokens are in the batch)."""
    batch, length = shape[0], shape[1]
    if task_ids.dim() == 1:
        return task_ids.to(torch.long)[:, None].expand(batch, length)
    if tuple(task_ids.shape) == (batch, length):
        return task_ids.to(torch.long)
    raise ValueError(f"task_ids of shape {tuple(task_ids.shape)} do not route activations {tuple(shape)}")


def row_task_ids(task_ids: torch.Tensor) -> torch.Tensor:
    """One task per row (B,) from (B,) or (B, T) ids (-1 ignored); a row holding two tasks is an
    error, since a prompt belongs to the whole row. A row with no task gets -1."""
    if task_ids.dim() == 1:
        return task_ids.to(torch.long)
    ids = task_ids.to(torch.long)
    high = ids.max(dim=1).values  # (B,)
    low = torch.where(ids >= 0, ids, high[:, None]).min(dim=1).values
    if bool((low != high).any()):
        row = int((low != high).nonzero()[0, 0])
        raise ValueError(
            f"row {row} holds tokens of several tasks: routed prompt tuning needs one task per row "
            "(prepare the mixture without packing tasks together, or route LoRA, which is per token)"
        )
    return high


# ----------------------------------------------------------------------------- routed LoRA


class RoutedLoraLinear(nn.Module):
    """`base_layer` (an `nn.Linear`, or a `LoraLinear` holding the shared adapter) plus one LoRA
    per task, stacked: `lora_A` (n, r, in), `lora_B` (n, out, r). Follows the adapter-layer
    protocol: adapter names are the task names, `active` weights scale each task's update."""

    def __init__(
        self,
        base_layer: nn.Module,
        tasks: Sequence[str],
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ):
        super().__init__()
        linear = base_layer.base_layer if isinstance(base_layer, LoraLinear) else base_layer
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"routed LoRA wraps nn.Linear or LoraLinear, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.tasks = [check_adapter_name(t) for t in tasks]
        n = len(self.tasks)
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(n, r, self.in_features, **factory))  # (n, r, in)
        self.lora_B = nn.Parameter(torch.zeros(n, self.out_features, r, **factory))  # (n, out, r)
        with torch.no_grad():
            for k in range(n):  # each task as nn.Linear(in, r) would start: kaiming-uniform(a=√5)
                nn.init.kaiming_uniform_(self.lora_A[k], a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank = r
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.active: dict[str, float] = dict.fromkeys(self.tasks, 1.0)
        self.disabled = False
        self.task_ids: torch.Tensor | None = None  # set by RoutedModel before each forward

    def adapter_names(self) -> list[str]:
        return list(self.tasks)

    def task_gate(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(B, T, n): the active weight of each token's own task, zero for every other task."""
        assert self.task_ids is not None
        ids = token_task_ids(self.task_ids.to(device), shape)  # (B, T)
        weights = torch.tensor([self.active.get(t, 0.0) for t in self.tasks], device=device, dtype=dtype)
        gate = F.one_hot(ids.clamp(min=0), len(self.tasks)).to(dtype) * weights  # (B, T, n)
        return gate * (ids >= 0)[..., None].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, in) -> (B, T, out)
        result = self.base_layer(x)
        if self.disabled or self.task_ids is None or not any(self.active.values()):
            return result
        xa = self.dropout(x.to(self.lora_A.dtype))
        if self.task_ids.dim() == 1 and x.dim() == 3:
            return result + self._per_row_delta(xa).to(result.dtype)
        n, r = len(self.tasks), self.rank
        hidden = xa @ self.lora_A.reshape(n * r, self.in_features).t()  # (B, T, n·r)
        gate = self.task_gate(x.shape[:-1], x.device, hidden.dtype)  # (B, T, n)
        hidden = (hidden.unflatten(-1, (n, r)) * gate[..., None]).flatten(-2)  # (B, T, n·r)
        b_cat = self.lora_B.permute(1, 0, 2).reshape(self.out_features, n * r)  # (out, n·r)
        return result + (self.scaling * (hidden @ b_cat.t())).to(result.dtype)

    def _per_row_delta(self, xa: torch.Tensor) -> torch.Tensor:
        """One task per row: gather each row's factors and use batched matmuls, whatever n.
        s · w_g · (x A_gᵀ) B_gᵀ for row task g (rows of task -1 get zero)."""
        assert self.task_ids is not None
        ids = self.task_ids.to(device=xa.device, dtype=torch.long)  # (B,)
        safe = ids.clamp(min=0)
        weights = torch.tensor(
            [self.active.get(t, 0.0) for t in self.tasks], device=xa.device, dtype=xa.dtype
        )
        row_scale = self.scaling * weights[safe] * (ids >= 0).to(xa.dtype)  # (B,)
        hidden = torch.bmm(xa, self.lora_A[safe].transpose(1, 2))  # (B, T, r)
        delta = torch.bmm(hidden, self.lora_B[safe].transpose(1, 2))  # (B, T, out)
        return delta * row_scale[:, None, None]

    # -- protocol
    @property
    def merged(self) -> bool:
        return False

    def merge(self) -> None:
        raise ConfigError(
            "routed adapters cannot be merged into one weight (each applies to its task's tokens only); "
            "merge the shared adapter and one task's adapter from their saved folders instead"
        )

    def unmerge(self) -> None:
        pass

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        k = self.tasks.index(name)
        return {"lora_A.weight": self.lora_A[k].detach(), "lora_B.weight": self.lora_B[k].detach()}

    def load_adapter_state(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        k = self.tasks.index(name)
        with torch.no_grad():
            for key, param in (("lora_A.weight", self.lora_A[k]), ("lora_B.weight", self.lora_B[k])):
                if tuple(state[key].shape) != tuple(param.shape):
                    raise ValueError(f"{key}: shape {tuple(state[key].shape)}, expected {tuple(param.shape)}")
                param.copy_(state[key])

    def remove_adapter(self, name: str) -> None:
        raise ConfigError("a task cannot be removed from routed adapters; build a new routed model")


def routed_lora_reference(layer: RoutedLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The plain per-task loop `RoutedLoraLinear.forward` must equal (tests)."""
    result = layer.base_layer(x)
    assert layer.task_ids is not None
    ids = token_task_ids(layer.task_ids, x.shape[:-1])
    for k, task in enumerate(layer.tasks):
        delta = layer.scaling * (x @ layer.lora_A[k].t() @ layer.lora_B[k].t())  # (B, T, out)
        result = result + layer.active.get(task, 0.0) * delta * (ids == k)[..., None]
    return result


def _routed_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Module names to route: `nn.Linear`s and shared `LoraLinear`s the config targets (PEFT's
    rules), never the internals of an adapter layer."""
    inside: list[str] = []
    found: list[str] = []
    for key, module in model.named_modules():
        if not key or any(key.startswith(p + ".") for p in inside):
            continue
        if is_adapter_layer(module):
            inside.append(key)
        if isinstance(module, (nn.Linear, LoraLinear)) and is_target(key, module, target_modules):
            found.append(key)
    if not found:
        raise ConfigError(f"multitask: target_modules {target_modules!r} matches no linear module")
    return found


# ----------------------------------------------------------------------------- routed prompts


class RoutedPrompts(nn.Module):
    """Per-task virtual tokens: `embeddings` (n, P, hidden)."""

    def __init__(self, tasks: Sequence[str], num_virtual_tokens: int, hidden_size: int, *, device=None):  # type: ignore[no-untyped-def]
        super().__init__()
        self.tasks = list(tasks)
        self.num_virtual_tokens = num_virtual_tokens
        # N(0, 1), PEFT's nn.Embedding default (prompt.py's "random" init)
        self.embeddings = nn.Parameter(
            torch.randn(len(tasks), num_virtual_tokens, hidden_size, device=device)
        )

    def task_kv(self, model: nn.Module) -> PrefixKV:
        """Every layer's keys/values of every task's prompt: (n, KV, P, D) twice per layer. All n
        prompts go through `model` as one batch of n rows, each routed to its own task."""
        n, p = self.embeddings.shape[:2]
        cache = model.make_kv_cache(n, p)
        dtype = cache.keys[0].dtype
        _route(model, torch.arange(n, device=self.embeddings.device))
        model.hidden_states(inputs_embeds=self.embeddings.to(dtype), kv_cache=cache)
        return [(k[:, :, :p], v[:, :, :p]) for k, v in zip(cache.keys, cache.values, strict=True)]


# ----------------------------------------------------------------------------- the model


def _route(model: nn.Module, task_ids: torch.Tensor | None) -> None:
    for module in model.modules():
        if isinstance(module, RoutedLoraLinear):
            module.task_ids = task_ids


class RoutedModel(WrappedLM):
    """A causal LM whose forward routes each row (or token) to its task's adapters. Same call
    signature as the LM plus `task_ids`; `base_model` is the LM (with the shared adapter)."""

    routes_tasks = True

    def __init__(self, base_model: nn.Module, tasks: Sequence[str], config: RoutedMethod):
        super().__init__()
        self.base_model = base_model
        self.tasks = list(tasks)
        self.task_config = config
        self.prompts: RoutedPrompts | None = None
        self.task_ids: torch.Tensor | None = None
        self._prompt_kv: PrefixKV | None = None  # inference only: decoding reuses the prompts' KV

    def train(self, mode: bool = True) -> RoutedModel:
        self._prompt_kv = None
        return super().train(mode)

    def _task_prompt_kv(self) -> PrefixKV:
        assert self.prompts is not None
        if torch.is_grad_enabled() or self.training:
            return self.prompts.task_kv(self.base_model)
        if self._prompt_kv is None:
            self._prompt_kv = self.prompts.task_kv(self.base_model)
        return self._prompt_kv

    def route(self, task_ids: torch.Tensor | Sequence[int] | None) -> None:
        """Sets the routing for the following forwards: (B,) per row or (B, T) per token."""
        if task_ids is not None and not isinstance(task_ids, torch.Tensor):
            task_ids = torch.tensor(list(task_ids), dtype=torch.long)
        if task_ids is not None and not task_ids.is_cuda and int(task_ids.max()) >= len(self.tasks):
            raise ValueError(f"task id {int(task_ids.max())} is out of range for {len(self.tasks)} tasks")
        self.task_ids = task_ids

    def _inputs(self, input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        task_ids = kwargs.pop("task_ids", None)
        if task_ids is not None:
            self.route(task_ids)
        if self.task_ids is None:
            raise ValueError("a routed model needs task_ids (a forward keyword, or route(ids) before)")
        ref = input_ids if input_ids is not None else kwargs["inputs_embeds"]
        device = ref.device
        self.task_ids = self.task_ids.to(device)
        if self.prompts is not None:
            if kwargs.get("prefix_kv") is not None:
                raise ValueError("prefix_kv is given twice: by the caller and by the routed prompts")
            batch, length = ref.shape[:2]
            p = self.prompts.num_virtual_tokens
            positions = kwargs.get("position_ids")
            if positions is None:
                cache = kwargs.get("kv_cache")
                offset = cache.length if cache is not None else 0
                positions = torch.arange(offset, offset + length, device=device).expand(batch, length)
            rows = row_task_ids(self.task_ids)
            kwargs = {**kwargs, "position_ids": positions + p}
            pick = rows.clamp(min=0)  # (B,): each row gathers its task's prompt
            kwargs["prefix_kv"] = [(k[pick], v[pick]) for k, v in self._task_prompt_kv()]
        _route(self.base_model, self.task_ids)
        return kwargs

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return self.base_model(input_ids, **self._inputs(input_ids, kwargs))

    def hidden_states(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return self.base_model.hidden_states(input_ids, **self._inputs(input_ids, kwargs))


def apply_routed(model: nn.Module, tasks: Sequence[str], config: RoutedMethod) -> RoutedModel:
    """Adds one adapter per task (LoRA: `config` a LoraConfig; prompt tuning: a PromptConfig
    with encoder "none") beside whatever `model` already has (the shared adapter, applied first
    with `ferrotune.peft.apply_peft(model, cfg, "shared")`). The new parameters are trainable,
    the base stays frozen. Returns the model to train and call."""
    if len(set(tasks)) != len(tasks) or not tasks:
        raise ConfigError(f"multitask: task names must be distinct and non-empty, got {list(tasks)}")
    if not any(True for _ in adapter_layers(model)):
        model.requires_grad_(False)  # no shared adapter: only the task adapters train
    routed = RoutedModel(model, tasks, config)
    if isinstance(config, LoraConfig):
        if config.use_dora or config.init != "default" or config.rank_pattern or config.alpha_pattern:
            raise ConfigError("multitask routed LoRA: plain LoRA / rsLoRA only (no DoRA, PiSSA or patterns)")
        for key in _routed_targets(model, config.target_modules):
            base = model.get_submodule(key)
            replace_module(
                model,
                key,
                RoutedLoraLinear(
                    base, tasks, config.r, config.alpha, dropout=config.dropout, use_rslora=config.use_rslora
                ),
            )
    elif isinstance(config, PromptConfig):
        if config.encoder != "none":
            raise ConfigError("multitask routed prompts: prompt tuning only (encoder = 'none')")
        ref = next(model.parameters())
        routed.prompts = RoutedPrompts(
            tasks, config.num_virtual_tokens, model.config.hidden_size, device=ref.device
        )
    else:
        raise ConfigError(
            f"multitask: routed adapters are LoRA or prompt tuning, not {type(config).__name__}"
        )
    return routed


def routed_layers(model: nn.Module) -> list[tuple[str, RoutedLoraLinear]]:
    return [(k, m) for k, m in model.named_modules() if isinstance(m, RoutedLoraLinear)]


# ----------------------------------------------------------------------------- files


def shared_adapter_tensors(routed: RoutedModel) -> dict[str, torch.Tensor]:
    """The shared adapter under PEFT's keys of the plain model: a shared LoRA inside a routed
    layer sits at `<path>.base_layer` here but at `<path>` in the plain model."""
    tensors = formats.adapter_tensors(routed.base_model, SHARED_NAME)
    paths = [path for path, _ in routed_layers(routed.base_model)]
    out = {}
    for key, value in tensors.items():
        for path in paths:
            key = key.replace(f"base_model.model.{path}.base_layer.", f"base_model.model.{path}.")
        out[key] = value
    return out


def task_adapter_tensors(routed: RoutedModel, task: str) -> dict[str, torch.Tensor]:
    if routed.prompts is not None:
        k = routed.tasks.index(task)
        return {"prompt_embeddings": routed.prompts.embeddings[k].detach().contiguous()}
    return {
        f"base_model.model.{path}.{suffix}": tensor.contiguous()
        for path, layer in routed_layers(routed.base_model)
        for suffix, tensor in layer.adapter_state(task).items()
    }


def save_routed(
    routed: RoutedModel,
    directory: str | os.PathLike[str],
    shared_config: Any = None,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Writes `shared/` (when `shared_config`, the shared adapter's method config, is given),
    `tasks/<name>/` for every task and `routing.json` under `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model_config = routed.config
    if shared_config is not None:
        formats.write_adapter(
            str(out / SHARED_NAME),
            formats.to_peft_config(
                shared_config, model_config, base_model_name_or_path=base_model_name_or_path
            ),
            shared_adapter_tensors(routed),
        )
    task_json = formats.to_peft_config(
        routed.task_config, model_config, base_model_name_or_path=base_model_name_or_path
    )
    for task in routed.tasks:
        formats.write_adapter(str(out / "tasks" / task), task_json, task_adapter_tensors(routed, task))
    manifest = {
        "format": ROUTING_FORMAT,
        "version": 1,
        "tasks": routed.tasks,
        "method": "lora" if isinstance(routed.task_config, LoraConfig) else "prompt",
        "shared": shared_config is not None,
    }
    tmp = out / f".{ROUTING_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / ROUTING_FILE)
    return out


def load_routed(model: nn.Module, directory: str | os.PathLike[str]) -> RoutedModel:
    """Rebuilds a routed model from `save_routed`'s folder over the plain base `model`: the
    shared adapter (if saved) is loaded first, then every task's adapter. All frozen."""
    from ferrotune.peft import load_adapter  # the package imports this module

    folder = Path(directory)
    manifest_path = folder / ROUTING_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FormatError(
            f"{manifest_path}: cannot read routing manifest: {err}", str(manifest_path)
        ) from None
    if manifest.get("format") != ROUTING_FORMAT:
        raise FormatError(f"{manifest_path}: format is not {ROUTING_FORMAT!r}", str(manifest_path), "format")
    tasks = manifest.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise FormatError(f"{manifest_path}: 'tasks' must be a list of names", str(manifest_path), "tasks")
    if manifest.get("shared"):
        model = load_adapter(model, str(folder / SHARED_NAME), SHARED_NAME)
    raw, _, config_path = formats.read_adapter(str(folder / "tasks" / tasks[0]))
    config = formats.from_peft_config(raw, config_path, getattr(model, "config", None))
    if not isinstance(config, (LoraConfig, PromptConfig)):
        raise FormatError(
            f"{config_path}: task adapters must be LoRA or prompt tuning", config_path, "peft_type"
        )
    routed = apply_routed(model, tasks, config)
    for task in tasks:
        _, tensors, path = formats.read_adapter(str(folder / "tasks" / task))
        expected = task_adapter_tensors(routed, task)
        if set(tensors) != set(expected):
            extra = sorted(set(tensors) ^ set(expected))[0]
            raise FormatError(f"{path}: key {extra!r} does not match the routed adapter", path, extra)
        if routed.prompts is not None:
            with torch.no_grad():
                routed.prompts.embeddings[tasks.index(task)].copy_(tensors["prompt_embeddings"])
        else:
            for layer_path, layer in routed_layers(routed.base_model):
                prefix = f"base_model.model.{layer_path}."
                state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                layer.load_adapter_state(task, state)
    routed.requires_grad_(False)
    return routed

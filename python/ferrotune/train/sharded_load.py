"""A pretrained model loaded straight into FSDP2 shards (`train.strategy = "fsdp"`), so that no
rank ever holds the whole model: a model that only fits sharded trains, and each rank's host and
device memory carry 1/W of the weights instead of all of them.

    CausalLM on the meta device            shapes and names, no storage
    -> [peft] LoRA, DoRA or IA3            adapters real (small, whole), drawn from the RNG as usual
    -> fully_shard (dist.wrap_model)       every parameter becomes a DTensor sharded on dim 0
    -> to_empty(device)                    each rank allocates its local shards only
    -> copy_rows                           each rank copies its rows of every tensor from the
                                           memory-mapped safetensors file, converting the dtype
    -> dora_magnitudes_from_shards         DoRA: each rank's rows of m from its rows of W

The adapters are the values the whole-model path gives: while LoRA is applied, every `nn.Linear`
weight of the meta model is stood in for by a zero-stride tensor on the training device (one
element of storage), so `LoraLinear.add_adapter` (and IA3's, for its vectors of ones) builds and
initialises A and B on that device
from the same random stream, in the same order, as over a loaded model. They are kept whole, then
sharded like every other parameter.

Runs that keep the whole-model load (`sharded_load_blocker` says why): training from scratch
(`init_weights` draws the whole model from one generator), PiSSA (its SVD reads whole base
weights), the other PEFT methods and multi-task adapters, and
`modules_to_save` (a trained copy of a base module). A 4-bit (NF4, QLoRA) base is quantized from
whole weights and FSDP2 restricts uint8 shards (`dist.holds_quantized_storage`); `ferrotune train`
does not build one, and the Python API's QLoRA under FSDP keeps the whole-model load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ferrotune.config import Config
from ferrotune.models.llama import CausalLM
from ferrotune.train import dist

BASE_LAYER = ".base_layer."  # LoraLinear keeps the frozen linear as `base_layer`


def sharded_load_blocker(config: Config) -> str | None:
    """None when `config` loads its model shard by shard; else why it loads the whole model on
    every rank first (then shards it)."""
    if config.train.strategy != "fsdp":
        return f"train.strategy = {config.train.strategy!r}"
    if not config.model.path:
        return "training from scratch draws the whole model from one seeded generator"
    from ferrotune.train.multitask import multitask_enabled

    if multitask_enabled(config):
        return "multi-task adapters"
    if config.peft.method:
        from ferrotune.peft import IA3Config, LoraConfig, config_from_dict

        method = config_from_dict(config.peft.method, config.peft.options)
        if not isinstance(method, (LoraConfig, IA3Config)):
            return f"peft.method = {config.peft.method!r}"
        if isinstance(method, LoraConfig) and method.init not in ("default", "gaussian"):
            return "the adapter's initialisation reads the base weights (PiSSA)"
        if method.modules_to_save:
            return "modules_to_save copies base modules"
    return None


def checkpoint_name(parameter: str) -> str:
    """The checkpoint's name for a base parameter of the adapted model."""
    return parameter.replace(BASE_LAYER, ".")


@contextlib.contextmanager
def real_linear_weights(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Within the block, each meta `nn.Linear` weight of `model` is a zero-stride tensor on
    `device` of its shape and dtype (one element of storage), so that modules built from it (LoRA's
    A and B) are real and initialised on `device`; afterwards the meta weights are back, with
    the `requires_grad` set meanwhile (apply_peft freezes the base)."""
    swapped: list[tuple[nn.Module, nn.Parameter, nn.Parameter]] = []
    try:
        for module in model.modules():
            weight = module._parameters.get("weight") if isinstance(module, nn.Linear) else None
            if weight is None or not weight.is_meta:
                continue
            zero = torch.zeros((), device=device, dtype=weight.dtype).expand(weight.shape)
            stand_in = nn.Parameter(zero, requires_grad=weight.requires_grad)
            module._parameters["weight"] = stand_in
            swapped.append((module, weight, stand_in))
        yield
    finally:
        for module, weight, stand_in in reversed(swapped):
            weight.requires_grad_(stand_in.requires_grad)
            module._parameters["weight"] = weight


def copy_rows(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Fills every parameter of a sharded, `to_empty` model from the full tensors in `tensors`
    (under the model's own names): each rank copies only the rows of its local shard, so a
    full tensor is never copied whole (from a memory-mapped file only those rows are read)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied weight once, under its first name
            full = tensors[name]
            if not isinstance(param, DTensor):
                param.copy_(full)
                continue
            local = param.to_local()
            shape, offset = compute_local_shape_and_global_offset(
                param.shape, param.device_mesh, param.placements
            )
            rows = tuple(slice(start, start + size) for start, size in zip(offset, shape, strict=True))
            local.copy_(full[rows])  # (local rows, ...) from the file, converted to the shard's dtype


def load_sharded_model(
    config: Config,
    env: dist.DistEnv,
    dtype: torch.dtype,
    *,
    tokenizer: Any = None,
    quiet: bool = False,
) -> nn.Module:
    """`model.path` built on the meta device, `[peft]` applied, sharded with FSDP2 as
    `dist.wrap_for_training` does, then filled shard by shard (see the module docstring). The
    run's model settings (checkpointing, attention, compiled blocks) are applied before
    sharding, as on a whole model. Returns the sharded model."""
    from ferrotune.models.load import check_checkpoint, open_checkpoint
    from ferrotune.train.run import configure_model

    model_config, weights_file, checkpoint = open_checkpoint(config.model.path)
    with torch.device("meta"):
        model: nn.Module = CausalLM(model_config)
    model.to(dtype=dtype)
    configure_model(model, config)  # type: ignore[arg-type]
    if config.peft.method:
        from ferrotune.peft import apply_peft_section

        with real_linear_weights(model, env.device):
            model = apply_peft_section(model, config.peft, tokenizer=tokenizer, quiet=quiet)
    # whole adapter tensors, as made above; everything else comes from the checkpoint
    tensors: dict[str, torch.Tensor] = {
        name: param.detach().clone() for name, param in model.named_parameters() if not param.is_meta
    }
    base = {name: tuple(param.shape) for name, param in model.named_parameters() if name not in tensors}
    check_checkpoint(checkpoint, weights_file, {checkpoint_name(n): s for n, s in base.items()}, model_config)
    tensors.update({name: checkpoint[checkpoint_name(name)] for name in base})

    model.to(device="meta")  # the adapters too: every parameter is allocated by to_empty below
    dist.wrap_for_training(model, env, config.train, _precision(config, env))
    # shards live on the CPU under fsdp_cpu_offload, else on this rank's device
    model.to_empty(device="cpu" if config.train.fsdp_cpu_offload else env.device)
    copy_rows(model, tensors)
    dora_magnitudes_from_shards(model, tensors)
    return model


def dora_magnitudes_from_shards(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """DoRA's magnitude m = ||W + s B A||_row (out,) of every DoRA layer, computed from this
    rank's rows of W: made while the weights were stand-ins, it was zero. The magnitude, W and B
    are all sharded on dim 0 (the output rows), so each rank's rows of m come from its rows of W
    and B, with the whole A from `tensors` (the adapters as made before sharding), by the
    function `LoraLinear` uses on a whole model (`dora_row_norms`, then W's dtype)."""
    from torch.distributed.tensor import DTensor

    from ferrotune.peft.lora import LoraLinear, dora_row_norms

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    with torch.no_grad():
        for prefix, layer in model.named_modules():
            if not isinstance(layer, LoraLinear):
                continue
            for name, magnitude in layer.lora_magnitude_vector.items():
                w = local(layer.base_layer.weight)  # (local rows, in)
                b = local(layer.lora_B[name].weight)  # (local rows, r)
                a = tensors[f"{prefix}.lora_A.{name}.weight"].to(w.device)  # (r, in)
                norm = dora_row_norms(w, layer.scaling[name] * (b @ a))  # (local rows,)
                local(magnitude).copy_(norm.to(w.dtype))


def _precision(config: Config, env: dist.DistEnv) -> str:
    from ferrotune.train.loop import resolve_precision

    return resolve_precision(config.train.precision, env.device)

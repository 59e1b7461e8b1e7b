"""A pretrained model loaded straight into FSDP2 shards (`train.strategy = "fsdp"`), so that no
rank ever holds the whole model: a model that only fits sharded trains, and each rank's host and
device memory carry 1/W of the weights instead of all of them.

    CausalLM on the meta device            shapes and names, no storage
    -> [peft] (see below)                  adapters real (small, whole), drawn from the RNG as usual
    -> fully_shard (dist.wrap_model)       every parameter becomes a DTensor sharded on dim 0
    -> to_empty(device)                    each rank allocates its local shards only
    -> copy_rows                           each rank copies its rows of every tensor from the
                                           memory-mapped safetensors file, converting the dtype
    -> dora_magnitudes_from_shards         DoRA: each rank's rows of m from its rows of W

The adapters are the values the whole-model path gives: while `[peft]` is applied, every base
parameter of the meta model is stood in for by a zero-stride tensor on the training device (one
element of storage; tied weights share one), so the adapters a method builds "beside" a base
weight land on that device and are initialised from the same random stream, in the same order,
as over a loaded model: LoRA's A and B, IA3's vectors of ones, the bottleneck adapters'
projections (Houlsby, Pfeiffer: modules in the decoder blocks' adapter slots), the prefix encoder
of prefix tuning and P-tuning v2 and the prompt encoder of prompt tuning and P-tuning with random
init (both at the model level, under a `PrefixModel` wrapper: the root `fully_shard` shards them).
They are kept whole, then sharded like every other parameter. A `modules_to_save` copy of a base
module stays meta (`StandIn.__deepcopy__`) and is filled from the checkpoint like its original
(`base_sources`: the copy of a tied `lm_head` reads the embedding's rows).

Runs that keep the whole-model load (`sharded_load_blocker` says why): training from scratch
(`init_weights` draws the whole model from one generator), PiSSA (its SVD reads whole base
weights), prompt tuning / P-tuning initialised from the vocabulary's embeddings (`init = "vocab"`
or `"text"` reads rows of the embedding), and multi-task adapters. A 4-bit (NF4, QLoRA) base is
quantized from whole weights and FSDP2 restricts uint8 shards (`dist.holds_quantized_storage`);
`ferrotune train` does not build one, and the Python API's QLoRA under FSDP keeps the whole-model
load.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ferrotune.config import Config
from ferrotune.models.llama import CausalLM
from ferrotune.train import dist

# a `modules_to_save` copy, `<module>.modules_to_save.<adapter>.<param>`, mirrors its original,
# `<module>.original_module.<param>`
SAVED_COPY = re.compile(r"\.modules_to_save\.[^.]+\.")


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
        from ferrotune.peft import LoraConfig, PromptConfig, config_from_dict

        method = config_from_dict(config.peft.method, config.peft.options)
        if isinstance(method, LoraConfig) and method.init not in ("default", "gaussian"):
            return "the adapter's initialisation reads the base weights (PiSSA)"
        if isinstance(method, PromptConfig) and method.init != "random":
            return f"the prompt's initialisation (init = {method.init!r}) reads rows of the embedding"
    return None


def base_sources(model: nn.Module, checkpoint_names: Mapping[int, str]) -> dict[str, str]:
    """{parameter of the adapted `model`: its tensor in the checkpoint} for every parameter filled
    from the checkpoint: the base parameters (found by identity in `checkpoint_names`, id -> name,
    taken from the bare model before `[peft]`, so wrappers' renames such as LoRA's `base_layer`
    or a `PrefixModel`'s `base_model.` do not matter) and `modules_to_save` copies (their
    original's tensor). The other parameters are the adapter's own."""
    sources: dict[str, str] = {}
    for name, param in model.named_parameters():  # a tied weight once, under its first name
        original = param
        if SAVED_COPY.search(name):
            original = model.get_parameter(SAVED_COPY.sub(".original_module.", name))
        if id(original) in checkpoint_names:
            sources[name] = checkpoint_names[id(original)]
    return sources


class StandIn(nn.Parameter):
    """A base parameter's stand-in while `[peft]` is applied: zero-stride zeros on the training
    device. Its deep copy (a `modules_to_save` copy of a base module) is a meta parameter again,
    filled from the checkpoint like its original: copying the stand-in would allocate the whole
    tensor."""

    def __deepcopy__(self, memo: dict[int, Any]) -> nn.Parameter:
        copy = nn.Parameter(torch.empty(self.shape, dtype=self.dtype, device="meta"), self.requires_grad)
        memo[id(self)] = copy
        return copy


@contextlib.contextmanager
def real_base_weights(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Within the block, each meta parameter of `model` is a zero-stride tensor on `device` of its
    shape and dtype (one element of storage; tied parameters share one), so that modules built
    beside it (LoRA's A and B, a bottleneck adapter, a prefix encoder) are real and initialised on
    `device`; afterwards the meta parameters are back, with the `requires_grad` set meanwhile
    (apply_peft freezes the base)."""
    stand_ins: dict[int, nn.Parameter] = {}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            for pname, param in list(module._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                if id(param) not in stand_ins:
                    zero = torch.zeros((), device=device, dtype=param.dtype).expand(param.shape)
                    stand_ins[id(param)] = StandIn(zero, requires_grad=param.requires_grad)
                module._parameters[pname] = stand_ins[id(param)]
                swapped.append((module, pname, param))
        yield
    finally:
        for module, pname, param in reversed(swapped):
            param.requires_grad_(stand_ins[id(param)].requires_grad)
            module._parameters[pname] = param


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
    checkpoint_names = {id(param): name for name, param in model.named_parameters()}
    if config.peft.method:
        from ferrotune.peft import apply_peft_section

        with real_base_weights(model, env.device):
            model = apply_peft_section(model, config.peft, tokenizer=tokenizer, quiet=quiet)
    sources = base_sources(model, checkpoint_names)
    # whole adapter tensors, as made above; everything else comes from the checkpoint
    tensors: dict[str, torch.Tensor] = {
        name: param.detach().clone() for name, param in model.named_parameters() if name not in sources
    }
    shapes = {source: tuple(model.get_parameter(name).shape) for name, source in sources.items()}
    check_checkpoint(checkpoint, weights_file, shapes, model_config)
    tensors.update({name: checkpoint[source] for name, source in sources.items()})
    left = [name for name, tensor in tensors.items() if tensor.is_meta]
    if left:  # a method built a parameter from nothing real: it would be loaded as garbage
        raise RuntimeError(f"peft.method = {config.peft.method!r} left {left[:3]} on the meta device")

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

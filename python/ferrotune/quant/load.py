"""Loading a model with a 4-bit base:

- a bitsandbytes 4-bit checkpoint (written by `ferrotune quantize`, by transformers'
  `save_pretrained`, or as published on the Hub: the same keys), each linear layer becoming an
  `NF4Linear` over the file's own tensors (memory-mapped, no copy on the CPU);
- a 16-bit checkpoint quantized while loading, one layer at a time: each weight is read from the
  memory-mapped file, quantized on the CPU (Rust) and only its 4-bit form is moved to `device`.

The network is built on the meta device, so no 16-bit copy of the model is ever allocated; only
the layers that stay 16-bit (embeddings, norms, `lm_head`) are materialised on `device`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ferrotune.errors import FormatError
from ferrotune.io import load_checkpoint
from ferrotune.models.llama import CausalLM
from ferrotune.models.load import read_config
from ferrotune.quant import blockwise
from ferrotune.quant.nf4 import NF4Linear

_QUANT_STATE = ".quant_state.bitsandbytes__"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _weights_path(folder: Path) -> Path:
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if (folder / name).exists():
            return folder / name
    raise FormatError(f"{folder}: no model.safetensors or model.safetensors.index.json", path=str(folder))


def is_bnb_4bit(names: Sequence[str] | Mapping[str, object]) -> bool:
    """Whether a checkpoint's tensor names are bitsandbytes 4-bit ones."""
    return any(_QUANT_STATE in n for n in names)


def nf4_from_bnb_tensors(
    tensors: Mapping[str, torch.Tensor],
    weight_name: str,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    where: str = "checkpoint",
) -> NF4Linear:
    """An NF4Linear over bitsandbytes' tensors for `weight_name` (`...q_proj.weight`)."""
    keys = [k for k in tensors if k.startswith(weight_name + _QUANT_STATE)]
    if len(keys) != 1:
        raise FormatError(
            f"{where}: {weight_name}: expected one quant_state entry, found {keys}", place=weight_name
        )
    try:
        info = json.loads(bytes(tensors[keys[0]].tolist()).decode())
        shape = torch.Size(info["shape"])
        state = blockwise.QuantState(
            absmax=tensors[f"{weight_name}.absmax"],
            shape=shape,
            dtype=_DTYPES[info["dtype"]],
            blocksize=int(info["blocksize"]),
            quant_type=info["quant_type"],
        )
        if "nested_absmax" in info or f"{weight_name}.nested_absmax" in tensors:
            state.nested_absmax = tensors[f"{weight_name}.nested_absmax"]
            state.offset = float(info["nested_offset"])
            if int(info.get("nested_blocksize", 256)) != 256:
                raise ValueError("nested_blocksize must be 256")
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{where}: {keys[0]}: bad quant state ({e!r})", place=keys[0]) from None
    if state.quant_type not in ("nf4", "fp4") or state.blocksize not in blockwise.BLOCKSIZES:
        raise FormatError(f"{where}: {keys[0]}: unsupported {state.quant_type} blocksize {state.blocksize}")
    packed = tensors[weight_name].contiguous().view(torch.uint8).reshape(-1)  # any quant_storage dtype
    if packed.numel() < (shape.numel() + 1) // 2:
        raise FormatError(
            f"{where}: {weight_name}: {packed.numel()} bytes for shape {list(shape)}", place=weight_name
        )
    return NF4Linear(packed[: (shape.numel() + 1) // 2], state, bias, compute_dtype or state.dtype)


def _set_tensor(
    model: nn.Module, name: str, value: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, leaf)
    tensor = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(old, nn.Parameter):
        setattr(parent, leaf, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        setattr(parent, leaf, tensor)


def load_nf4_model(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    *,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    skip: Sequence[str] = ("lm_head",),
) -> CausalLM:
    """A `CausalLM` whose linear layers are `NF4Linear`s, from a 4-bit or a 16-bit checkpoint
    folder (the quantization options apply to the latter). `compute_dtype` defaults to the
    checkpoint's 16-bit dtype."""
    folder = Path(path)
    config = read_config(folder)
    weights_file = _weights_path(folder)
    checkpoint = load_checkpoint(weights_file)
    names = list(checkpoint)
    prequantized = is_bnb_4bit(names)
    device = torch.device(device)
    if compute_dtype is None:
        floats = [checkpoint.info(n)[0] for n in names if "norm" in n]
        compute_dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(
            floats[0] if floats else "", torch.float32
        )

    with torch.device("meta"):
        model = CausalLM(config)
    where = str(weights_file)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        w = f"{name}.weight"
        bias = checkpoint.get(f"{name}.bias")
        if prequantized and any(k.startswith(w + _QUANT_STATE) for k in names):
            layer = nf4_from_bnb_tensors(_Lazy(checkpoint, w), w, bias, compute_dtype, where)
        elif not prequantized and name not in skip and name.rsplit(".", 1)[-1] not in skip:
            if w not in checkpoint:
                raise FormatError(f"{where}: tensor {w!r} is missing", path=where, place=w)
            layer = NF4Linear.from_weight(
                checkpoint[w],
                bias,
                blocksize=blocksize,
                quant_type=quant_type,
                double_quant=double_quant,
                compute_dtype=compute_dtype,
                device="cpu",
            )
        else:
            continue  # stays 16-bit (lm_head), filled below
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.to(device))

    tied = config.tie_word_embeddings
    for name, param in list(model.named_parameters()):
        if not param.is_meta:
            continue
        if name not in checkpoint:
            if tied and name == "lm_head.weight":
                continue
            raise FormatError(f"{where}: tensor {name!r} is missing", path=where, place=name)
        source = checkpoint[name]
        if tuple(source.shape) != tuple(param.shape):
            raise FormatError(
                f"{where}: tensor {name!r} has shape {list(source.shape)}, expected {list(param.shape)}",
                path=where,
                place=name,
            )
        _set_tensor(model, name, source, device, compute_dtype)
    if tied:
        model.tie_weights()
    return model


class _Lazy(Mapping[str, torch.Tensor]):
    """The tensors of one weight, read from the checkpoint on access."""

    def __init__(self, checkpoint: Mapping[str, torch.Tensor], prefix: str):
        self._checkpoint = checkpoint
        self._keys = [k for k in checkpoint if k == prefix or k.startswith(prefix + ".")]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._checkpoint[key]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

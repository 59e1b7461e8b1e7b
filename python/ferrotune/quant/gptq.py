"""GPTQ int4 bases: `GPTQLinear` holds a layer as GPTQ checkpoints store it and dequantizes on the
fly (frozen; the input gets the gradient, as in `NF4Linear`), so LoRA trains on top.

The format (AutoGPTQ / GPTQModel `checkpoint_format = "gptq"`, 4 bits, group size g):

    qweight (in/8, out) int32   q[i, j] = (qweight[i // 8, j] >> 4 (i % 8)) & 15
    qzeros  (G, out/8)  int32   z[k, j] = ((qzeros[k, j // 8] >> 4 (j % 8)) & 15) + 1
    scales  (G, out)    fp16    (the +1: v1 checkpoints store zero - 1; "gptq_v2" stores zero)
    g_idx   (in,)       int32   the group of input channel i: i // g, or with act-order
                                (`desc_act`) the group of its position in the quantization order
    W[j, i] = scales[g_idx[i], j] * (q[i, j] - z[g_idx[i], j])    (out, in), computed in fp32,
                                                                   rounded once to the compute dtype
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ferrotune.errors import FormatError
from ferrotune.io import load_checkpoint
from ferrotune.models.llama import CausalLM
from ferrotune.models.load import read_config

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # (8,) nibble offsets within an int32


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """(R, C) int32 -> (8R, C) codes: row 8r + k is nibble k (from the least significant) of row r."""
    nibbles = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device)[None, :, None]) & 15  # (R, 8, C)
    return nibbles.reshape(-1, packed.shape[1])


def unpack_int4_cols(packed: torch.Tensor) -> torch.Tensor:
    """(R, C) int32 -> (R, 8C) codes: column 8c + k is nibble k of column c."""
    nibbles = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 15  # (R, C, 8)
    return nibbles.reshape(packed.shape[0], -1)


class GPTQLinear(nn.Linear):
    """A frozen GPTQ 4-bit linear layer (see the module docstring); `weight` is the dequantized
    (out, in) matrix in the compute dtype."""

    def __init__(
        self,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor | None,
        bias: torch.Tensor | None = None,
        *,
        group_size: int = 128,
        checkpoint_format: str = "gptq",
        compute_dtype: torch.dtype = torch.float16,
        where: str = "GPTQ layer",
    ):
        nn.Module.__init__(self)
        in_features, out_features = qweight.shape[0] * 8, qweight.shape[1]
        groups = scales.shape[0]
        if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
            raise FormatError(
                f"{where}: qweight and qzeros must be int32, got {qweight.dtype}, {qzeros.dtype}"
            )
        if tuple(scales.shape) != (groups, out_features) or tuple(qzeros.shape) != (
            groups,
            out_features // 8,
        ):
            raise FormatError(
                f"{where}: shapes qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, "
                f"scales {list(scales.shape)} do not fit together"
            )
        if g_idx is None:
            g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
        if g_idx.shape != (in_features,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise FormatError(f"{where}: g_idx must give each of {in_features} inputs a group below {groups}")
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise FormatError(f"{where}: checkpoint_format {checkpoint_format!r} is not gptq or gptq_v2")
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        self.compute_dtype = compute_dtype
        self.zero_offset = 1 if checkpoint_format == "gptq" else 0
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.register_buffer("g_idx", g_idx.to(torch.int32))
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (out, in) in `dtype` (default: the compute dtype)."""
        q = unpack_int4_rows(self.qweight)  # (in, out)
        z = unpack_int4_cols(self.qzeros) + self.zero_offset  # (G, out)
        g = self.g_idx.long()
        w = self.scales.float()[g] * (q - z[g]).float()  # (in, out)
        return w.t().to(dtype or self.compute_dtype).contiguous()

    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:
        """The dequantized weight (read-only: writing to it changes nothing)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        return _DequantMatMul.apply(x, self)

    def extra_repr(self) -> str:
        act_order = bool(
            (
                self.g_idx.long()
                != torch.arange(self.in_features, device=self.g_idx.device) // self.group_size
            ).any()
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int4, group_size={self.group_size}{', act_order' if act_order else ''}"
        )


class _DequantMatMul(torch.autograd.Function):
    """y = x W^T + b; W dequantized in forward and again in backward; only x gets a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: GPTQLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        w = layer.dequantize(x.dtype)
        return F.linear(x, w, None if layer.bias is None else layer.bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.layer.dequantize(grad_out.dtype), None


def gptq_settings(config_json: Mapping[str, object], where: str) -> dict[str, object]:
    """The quantization_config of a GPTQ checkpoint, checked: 4 bits, known format."""
    qc = config_json.get("quantization_config")
    if not isinstance(qc, Mapping) or qc.get("quant_method") != "gptq":
        raise FormatError(
            f"{where}: quantization_config.quant_method is not 'gptq'", place="quantization_config"
        )
    if int(qc.get("bits", 4)) != 4:  # type: ignore[call-overload]
        raise FormatError(f"{where}: only 4-bit GPTQ is supported, got bits={qc.get('bits')}", place="bits")
    return {
        "group_size": int(qc.get("group_size", 128)),  # type: ignore[call-overload]
        "desc_act": bool(qc.get("desc_act", False)),
        "checkpoint_format": str(qc.get("checkpoint_format", "gptq")),
    }


def load_gptq_model(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    *,
    compute_dtype: torch.dtype = torch.float16,
    skip: Sequence[str] = ("lm_head",),
) -> CausalLM:
    """A `CausalLM` whose linear layers are `GPTQLinear`s from a GPTQ checkpoint folder."""
    folder = Path(path)
    config_path = folder / "config.json"
    settings = gptq_settings(json.loads(config_path.read_text()), str(config_path))
    config = read_config(folder)
    weights = folder / "model.safetensors.index.json"
    checkpoint = load_checkpoint(weights if weights.exists() else folder / "model.safetensors")
    where = str(checkpoint.path)
    device = torch.device(device)
    with torch.device("meta"):
        model = CausalLM(config)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name in skip or name.rsplit(".", 1)[-1] in skip:
            continue
        keys = {k: f"{name}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx", "bias")}
        missing = [v for k, v in keys.items() if k not in ("g_idx", "bias") and v not in checkpoint]
        if missing:
            raise FormatError(f"{where}: tensor {missing[0]!r} is missing", path=where, place=missing[0])
        layer = GPTQLinear(
            checkpoint[keys["qweight"]],
            checkpoint[keys["qzeros"]],
            checkpoint[keys["scales"]],
            checkpoint.get(keys["g_idx"]),
            checkpoint.get(keys["bias"]),
            group_size=settings["group_size"],  # type: ignore[arg-type]
            checkpoint_format=settings["checkpoint_format"],  # type: ignore[arg-type]
            compute_dtype=compute_dtype,
            where=f"{where}: {name}",
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.to(device))
    for name, param in list(model.named_parameters()):
        if not param.is_meta:
            continue
        if name not in checkpoint:
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue
            raise FormatError(f"{where}: tensor {name!r} is missing", path=where, place=name)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, nn.Parameter(checkpoint[name].to(device=device, dtype=compute_dtype)))
    if config.tie_word_embeddings:
        model.tie_weights()
    return model

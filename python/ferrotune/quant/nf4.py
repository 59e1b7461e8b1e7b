"""`NF4Linear`: a frozen linear layer whose weight is stored in 4 bits (NF4 or FP4, bitsandbytes'
format) and dequantized on the fly:

    y = x @ dequant(W)^T + b          dequant: ferrotune.kernels.nf4_dequant (Triton on CUDA,
                                       the PyTorch formula elsewhere; they agree bit for bit)
    dL/dx = dL/dy @ dequant(W)         the weight is dequantized again in backward instead of
                                       being kept; the base (weight and bias) gets no gradient

It subclasses `nn.Linear` only so that code selecting linear layers (LoRA's `all-linear`,
`apply_lora`) treats it as one; its `weight` is a read-only property giving the dequantized
matrix (out, in) in the compute dtype. The fp32 statistics are kept as raw bytes (`uint8`
buffers) so that `model.to(torch.bfloat16)` cannot round them.

`quantize_linears(model)` swaps every `nn.Linear` (but `lm_head`) for an `NF4Linear`, one layer at
a time, quantizing on the CPU with the Rust fast path and moving only the 4-bit result to `device`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ferrotune import _native
from ferrotune.kernels import nf4_dequant
from ferrotune.quant import blockwise


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(-1)


class NF4Linear(nn.Linear):
    """A frozen 4-bit linear layer. Buffers (bitsandbytes' names in brackets):
    `qweight` (ceil(n/2), 1) uint8 [weight], `absmax_raw` fp32 bytes or uint8 codes [absmax],
    `nested_absmax_raw` fp32 bytes [nested_absmax], `table_raw` (16,) fp32 bytes [quant_map]."""

    def __init__(
        self,
        packed: torch.Tensor,
        state: blockwise.QuantState,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ):
        nn.Module.__init__(self)
        out_features, in_features = state.shape
        self.in_features, self.out_features = in_features, out_features
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.original_dtype = state.dtype
        self.compute_dtype = compute_dtype or state.dtype
        self.offset = float(state.offset) if state.nested else 0.0
        device = packed.device
        self.register_buffer("qweight", packed.reshape(-1, 1))
        if state.nested:
            self.register_buffer("absmax_raw", state.absmax.to(torch.uint8).reshape(-1))
            assert state.nested_absmax is not None
            self.register_buffer("nested_absmax_raw", _as_bytes(state.nested_absmax.float()))
            code8 = torch.from_dlpack(_native.dynamic_map_signed())
            self.register_buffer("code8_raw", _as_bytes(code8).to(device), persistent=False)
        else:
            self.register_buffer("absmax_raw", _as_bytes(state.absmax.float()))
            self.register_buffer("nested_absmax_raw", None)
            self.register_buffer("code8_raw", None, persistent=False)
        table = torch.from_dlpack(_native.quant_map(state.quant_type))
        if state.quant_type == "fp4":  # the kernel's own LUT, with -0 for code 8
            from ferrotune.quant import reference

            table = reference.dequant_table("fp4")
        self.register_buffer("table_raw", _as_bytes(table).to(device), persistent=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(self.compute_dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        blocksize: int = 64,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> NF4Linear:
        """Quantizes a (out, in) weight on the CPU (Rust; the result wraps Rust memory without a
        copy) and places the 4-bit layer on `device` (default: the weight's device)."""
        target = torch.device(device) if device is not None else weight.device
        packed, state = blockwise.quantize_4bit(
            weight.detach().to("cpu"), blocksize, quant_type, double_quant
        )
        layer = cls(packed, state, bias, compute_dtype or weight.dtype)
        return layer.to(target)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: object) -> NF4Linear:
        return cls.from_weight(linear.weight, linear.bias, **kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ views

    @property
    def absmax(self) -> torch.Tensor:
        """(blocks,) fp32 absmax, or uint8 codes when double-quantized."""
        return self.absmax_raw if self.nested_absmax_raw is not None else self.absmax_raw.view(torch.float32)

    @property
    def quant_state(self) -> blockwise.QuantState:
        nested = self.nested_absmax_raw
        return blockwise.QuantState(
            absmax=self.absmax,
            shape=torch.Size([self.out_features, self.in_features]),
            dtype=self.original_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            nested_absmax=None if nested is None else nested.view(torch.float32),
            offset=self.offset if nested is not None else None,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) in `dtype` (default: the compute dtype)."""
        nested = self.nested_absmax_raw
        code8 = self.code8_raw
        return nf4_dequant.dequantize_4bit(
            self.qweight,
            self.absmax,
            self.table_raw.view(torch.float32),
            (self.out_features, self.in_features),
            self.blocksize,
            dtype or self.compute_dtype,
            None if nested is None else nested.view(torch.float32),
            None if code8 is None else code8.view(torch.float32),
            self.offset,
        )

    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:
        """The dequantized weight (read-only: writing to it changes nothing)."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        return _NF4MatMul.apply(x, self)

    def extra_repr(self) -> str:
        nested = ", double_quant" if self.nested_absmax_raw is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, blocksize={self.blocksize}{nested}"
        )

    def bnb_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """This layer's tensors under bitsandbytes' names (`{prefix}weight`, `{prefix}weight.absmax`, ...)."""
        import json

        state = self.quant_state
        w = f"{prefix}weight"
        out = {w: self.qweight.cpu(), f"{w}.absmax": state.absmax.cpu()}
        out[f"{w}.quant_map"] = torch.from_dlpack(_native.quant_map(self.quant_type)).clone()
        info: dict[str, object] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.original_dtype).removeprefix("torch."),
            "shape": [self.out_features, self.in_features],
        }
        if state.nested_absmax is not None:
            out[f"{w}.nested_absmax"] = state.nested_absmax.cpu()
            out[f"{w}.nested_quant_map"] = torch.from_dlpack(_native.dynamic_map_signed()).clone()
            info.update({"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": self.offset})
        out[f"{w}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(
            list(json.dumps(info).encode()), dtype=torch.uint8
        )
        if self.bias is not None:
            out[f"{prefix}bias"] = self.bias.detach().cpu()
        return out


class _NF4MatMul(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward (never stored)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        w = layer.dequantize(x.dtype if x.is_floating_point() else None)  # (out, in)
        return F.linear(x, w, None if layer.bias is None else layer.bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.layer.dequantize(grad_out.dtype)  # (out, in)
        return grad_out @ w, None


def quantize_linears(
    model: nn.Module,
    skip: Sequence[str] = ("lm_head",),
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> list[str]:
    """Replaces every `nn.Linear` of `model` (not one named in `skip`, matched on the last name
    component or the full name) with an `NF4Linear`, layer by layer: each 16-bit weight is
    quantized on the CPU and only the 4-bit layer goes to `device`, so the 16-bit model never sits
    whole there. Returns the replaced names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if name in skip or name.rsplit(".", 1)[-1] in skip:
            continue
        layer = NF4Linear.from_linear(
            module,
            blocksize=blocksize,
            quant_type=quant_type,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            device=device if device is not None else module.weight.device,
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        replaced.append(name)
    return replaced


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the 4-bit layers' buffers."""
    return sum(
        b.numel() * b.element_size()
        for m in model.modules()
        if isinstance(m, NF4Linear)
        for b in m.buffers(recurse=False)
    )


def dequantized_numel(layer: NF4Linear) -> int:
    return math.prod((layer.out_features, layer.in_features))

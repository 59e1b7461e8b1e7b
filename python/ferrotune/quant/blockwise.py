"""Torch-facing blockwise 4-bit quantization on the native (Rust) fast path.

`quantize_4bit(w)` returns bitsandbytes' layout: packed codes (ceil(n/2), 1) uint8 with the first
element in the high nibble, and a `QuantState` holding absmax (or its double quantization:
8-bit codes, nested absmax, offset). The tensors wrap Rust memory without a copy (DLPack).
`ferrotune.quant.reference` is the pure-torch oracle of the same arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ferrotune import _native
from ferrotune.io import safetensors_dtype, to_torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


@dataclass
class QuantState:
    """What dequantizing a 4-bit tensor needs (bitsandbytes' QuantState, flattened).

    absmax: (blocks,) fp32, or (blocks,) uint8 codes when `nested_absmax` is set;
    nested_absmax: (ceil(blocks/256),) fp32; offset: the subtracted mean; shape/dtype: the original.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    nested_absmax: torch.Tensor | None = None
    offset: float | None = None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def float_absmax(self) -> torch.Tensor:
        """(blocks,) fp32 absmax, double-dequantized if nested."""
        if self.nested_absmax is None:
            return self.absmax
        assert self.offset is not None
        return dequantize_nested(self.absmax, self.nested_absmax, self.offset)

    def to(self, device: torch.device | str) -> QuantState:
        return QuantState(
            self.absmax.to(device),
            self.shape,
            self.dtype,
            self.blocksize,
            self.quant_type,
            None if self.nested_absmax is None else self.nested_absmax.to(device),
            self.offset,
        )


def _raw(t: torch.Tensor) -> object:
    """A CPU tensor's bytes as a buffer the native module reads (no copy when contiguous)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


def quantize_4bit(
    weight: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit quantization, byte for byte bitsandbytes' CUDA `quantize_4bit`
    (`compress_statistics=double_quant`). Returns (packed (ceil(n/2), 1) uint8, QuantState)."""
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize_4bit takes fp32, bf16 or fp16 weights, got {weight.dtype}")
    packed, absmax = _native.quantize_4bit(
        _raw(weight), safetensors_dtype(weight.dtype), blocksize, quant_type
    )
    packed_t = to_torch(packed).view(-1, 1)
    absmax_t = to_torch(absmax)
    state = QuantState(absmax_t, weight.shape, weight.dtype, blocksize, quant_type)
    if double_quant:
        state.absmax, state.nested_absmax, state.offset = quantize_nested(absmax_t)
    return packed_t, state


def quantize_nested(
    absmax: torch.Tensor, offset: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Double quantization of fp32 absmax -> (uint8 codes, nested fp32 absmax, offset)."""
    codes, nested, off = _native.quantize_nested(_raw(absmax.float()), offset)
    return to_torch(codes), to_torch(nested), off


def dequantize_nested(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: float) -> torch.Tensor:
    """fp32 absmax back from double quantization."""
    return to_torch(_native.dequantize_nested(_raw(codes), _raw(nested_absmax.float()), offset))


def dequantize_4bit(
    packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The dequantized weight, shaped and typed as it was quantized (or as `dtype`), on the CPU."""
    dtype = dtype or state.dtype
    n = math.prod(state.shape)
    out = _native.dequantize_4bit(
        _raw(packed),
        _raw(state.float_absmax().float()),
        n,
        state.blocksize,
        state.quant_type,
        safetensors_dtype(dtype),
    )
    return to_torch(out).view(state.shape)

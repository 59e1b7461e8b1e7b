"""4-bit (NF4/FP4) dequantization, bitsandbytes' layout:

    w[2k]   = table[byte[k] >> 4] * absmax[2k // blocksize]
    w[2k+1] = table[byte[k] & 15] * absmax[2k // blocksize]

rounded once from fp32 to the output dtype. With double quantization the fp32 absmax is first
rebuilt as `code8[q] * nested_absmax[block // 256] + offset` (two separate roundings, as
bitsandbytes does it in two kernels); the Triton kernel fuses that step in, with the product
rounded on its own (`mul_rn`) so no fused multiply-add changes the result.

`dequantize_4bit_reference` is the plain PyTorch formula (any device); `dequantize_4bit` takes the
Triton kernel where it runs and the reference elsewhere. They agree bit for bit.
"""

from __future__ import annotations

import torch

from ferrotune.kernels._dispatch import HAVE_TRITON, triton_runs_on

if HAVE_TRITON:
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice

        _mul_rn = libdevice.mul_rn
    except (ImportError, AttributeError):  # pragma: no cover - older Triton
        _mul_rn = None

    @triton.jit
    def _product(a, b):
        return a * b

    @triton.jit
    def _nf4_dequant_kernel(
        PACKED,  # (n_bytes,) uint8
        ABSMAX,  # (blocks,) fp32, or (blocks,) uint8 codes when NESTED
        NESTED_ABSMAX,  # (ceil(blocks/256),) fp32 (NESTED only)
        CODE8,  # (256,) fp32 (NESTED only)
        TABLE,  # (16,) fp32
        OUT,  # (n,) output dtype
        offset,
        n,
        BLOCKSIZE: tl.constexpr,
        NESTED: tl.constexpr,
        EXACT_MUL: tl.constexpr,
        BYTES: tl.constexpr,
    ):
        byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)  # (BYTES,)
        n_bytes = (n + 1) // 2
        live = byte < n_bytes
        packed = tl.load(PACKED + byte, mask=live, other=0).to(tl.int32)
        block = byte // (BLOCKSIZE // 2)
        if NESTED:
            q = tl.load(ABSMAX + block, mask=live, other=0).to(tl.int32)
            code = tl.load(CODE8 + q, mask=live, other=0.0)
            scale = tl.load(NESTED_ABSMAX + block // 256, mask=live, other=0.0)
            if EXACT_MUL:  # noqa: SIM108 (a compile-time branch of the kernel)
                absmax = libdevice.mul_rn(code, scale) + offset
            else:
                absmax = _product(code, scale) + offset
        else:
            absmax = tl.load(ABSMAX + block, mask=live, other=0.0)
        high = tl.load(TABLE + (packed >> 4)) * absmax
        low = tl.load(TABLE + (packed & 15)) * absmax
        values = tl.interleave(high, low)  # (2 * BYTES,): element 2k from the high nibble
        index = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(OUT + index, values.to(OUT.dtype.element_ty, fp_downcast_rounding="rtne"), mask=index < n)


def _absmax_fp32(
    absmax: torch.Tensor, nested_absmax: torch.Tensor | None, code8: torch.Tensor | None, offset: float
) -> torch.Tensor:
    """(blocks,) fp32 absmax, rebuilt from its double quantization when nested."""
    if nested_absmax is None:
        return absmax
    assert code8 is not None
    block = torch.arange(absmax.numel(), device=absmax.device) // 256
    return code8[absmax.long()] * nested_absmax[block] + torch.tensor(offset, dtype=torch.float32)


def dequantize_4bit_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    table: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    blocksize: int,
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    code8: torch.Tensor | None = None,
    offset: float = 0.0,
) -> torch.Tensor:
    """Plain PyTorch: packed (ceil(n/2),) uint8 -> `dtype` tensor of `shape`."""
    n = 1
    for d in shape:
        n *= d
    flat = packed.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 15), dim=-1).reshape(-1)[:n].long()  # (n,)
    values = table[codes]  # (n,) fp32
    scale = _absmax_fp32(absmax, nested_absmax, code8, offset)
    if n % blocksize == 0:
        values = (values.view(-1, blocksize) * scale[:, None]).view(-1)
    else:
        values = values * scale.repeat_interleave(blocksize)[:n]
    return values.to(dtype).view(shape)


_BYTES = 1024


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    table: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    blocksize: int,
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    code8: torch.Tensor | None = None,
    offset: float = 0.0,
) -> torch.Tensor:
    """The dequantized weight: Triton where it runs, else the reference."""
    if not triton_runs_on(packed):
        return dequantize_4bit_reference(
            packed, absmax, table, shape, blocksize, dtype, nested_absmax, code8, offset
        )
    n = 1
    for d in shape:
        n *= d
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    nested = nested_absmax is not None
    dummy = absmax  # unused pointer arguments when not nested
    grid = (triton.cdiv((n + 1) // 2, _BYTES),)
    _nf4_dequant_kernel[grid](
        packed.reshape(-1),
        absmax,
        nested_absmax if nested else dummy,
        code8 if nested else dummy,
        table,
        out,
        float(offset),
        n,
        BLOCKSIZE=blocksize,
        NESTED=nested,
        EXACT_MUL=_mul_rn is not None and packed.is_cuda,
        BYTES=_BYTES,
    )
    return out

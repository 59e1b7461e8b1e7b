"""Pure-torch reference of bitsandbytes' CUDA 4-bit quantization (the oracle the Rust fast path
in `rust/src/quant/nf4.rs` must match byte for byte). Slow and plain on purpose.

Blockwise 4-bit, per block of `blocksize` consecutive elements of the flattened tensor:

    absmax = max |x|                       (fmaxf: NaN skipped; from -FLT_MAX; a partial last
                                            block also sees the zero padding of its load)
    p      = ftz(ftz(x) * ftz(1 / absmax)) (the kernel is built with --use_fast_math: denormals
                                            flush to zero, so an all-zero block gives 0 * inf = NaN)
    NF4    code = #{t in thresholds : p > t}     (the comparison tree; NaN -> 0; ties -> lower)
    FP4    code = rank(|p|) -> FP4 bits, plus 8 if p < 0
    byte   = code[2k] << 4 | code[2k + 1]        (an odd count pads one 0.0 element)

Dequantize: `ftz(table[code] * absmax)` rounded to the output dtype.
Double quantization: `offset = mean(absmax)`, then `absmax - offset` in blocks of 256 through the
8-bit dynamic map with the kernel's binary search (`quantize_dynamic_8bit`).
"""

from __future__ import annotations

import functools
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

FLT_MIN = torch.finfo(torch.float32).tiny
FLT_MAX = torch.finfo(torch.float32).max

# The NF4 values (bitsandbytes' quant_map for "nf4").
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)


def _f32_literal(text: str) -> float:
    """A C `float` literal: the decimal rounded once, directly, to the nearest fp32 (ties to even).
    (Going through a Python float would round twice, which differs for four of the thresholds.)"""
    exact = Fraction(text)
    guess = torch.tensor(float(text), dtype=torch.float32)
    candidates = [
        guess,
        torch.nextafter(guess, torch.tensor(-1e9)),
        torch.nextafter(guess, torch.tensor(1e9)),
    ]

    def key(c: torch.Tensor) -> tuple[Fraction, int]:
        return abs(Fraction(c.item()) - exact), int(c.view(torch.int32).item()) & 1

    return min(candidates, key=key).item()


# The comparison tree's thresholds as the kernel spells them, ascending.
NF4_THRESHOLD_LITERALS = [
    "-0.8480964004993439",
    "-0.6106329262256622",
    "-0.4599952697753906",
    "-0.33967943489551544",
    "-0.23460740596055984",
    "-0.13791173323988914",
    "-0.045525018125772476",
    "0.03979014977812767",
    "0.1202552504837513",
    "0.2035212516784668",
    "0.2920137718319893",
    "0.3893125355243683",
    "0.5016634166240692",
    "0.6427869200706482",
    "0.8614784181118011",
]
NF4_THRESHOLDS = torch.tensor([_f32_literal(t) for t in NF4_THRESHOLD_LITERALS], dtype=torch.float32)
FP4_THRESHOLDS = torch.tensor(
    [
        _f32_literal(t)
        for t in ["0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333"]
    ],
    dtype=torch.float32,
)
# FP4 bits (without sign) of the k-th magnitude interval.
FP4_BY_RANK = torch.tensor([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], dtype=torch.uint8)
# The kernel's FP4 dequantization magnitudes by the low three bits.
FP4_MAGNITUDE = torch.tensor(
    [
        _f32_literal(t)
        for t in ["0.0", "0.005208333333", "0.66666667", "1.0", "0.33333333", "0.5", "0.16666667", "0.25"]
    ],
    dtype=torch.float32,
)

NESTED_BLOCKSIZE = 256


def quant_map(quant_type: str) -> torch.Tensor:
    """bitsandbytes' `quant_map`: the 16 code values (FP4: [0, .0625, 8, 12, 4, 6, 2, 3, 0, -.0625, ...] / 12)."""
    if quant_type == "nf4":
        return NF4_CODE.clone()
    if quant_type == "fp4":
        raw = torch.tensor([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=torch.float32)
        return torch.cat([raw, -raw + 0.0]) / 12.0  # code 8 is +0.0, as bitsandbytes has it
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def dequant_table(quant_type: str) -> torch.Tensor:
    """The kernel's code -> value table (FP4 uses its own LUT literals times the sign)."""
    if quant_type == "nf4":
        return NF4_CODE.clone()
    sign = torch.tensor([1.0] * 8 + [-1.0] * 8)
    return FP4_MAGNITUDE.repeat(2) * sign


def ftz(x: torch.Tensor) -> torch.Tensor:
    """Flush denormals to a zero of the same sign."""
    return torch.where(x.abs() < FLT_MIN, torch.copysign(torch.zeros_like(x), x), x)


def block_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(n,) fp32 -> (blocks,) absmax as the kernel reduces it. Pads the last block with zeros."""
    n = x.numel()
    blocks = -(-n // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32)
    padded[:n] = x
    a = ftz(padded.abs())
    a = torch.where(torch.isnan(a), torch.full_like(a, -FLT_MAX), a)
    return a.view(blocks, blocksize).amax(dim=1)


def reciprocal(a: torch.Tensor) -> torch.Tensor:
    """ftz(1 / ftz(a)); 1/0 = inf."""
    return ftz(1.0 / ftz(a))


_RCP_DELTA_FILE = Path(__file__).with_name("rcp_approx_delta.bin")


@functools.cache
def _rcp_approx_delta() -> torch.Tensor:
    """(2^23,) int32: the GPU's approximate reciprocal minus the correctly rounded one, in ulps,
    per fp32 mantissa (dumped from an H200 by bench/rcp_table_dump.py; 2 bits each on disk)."""
    packed = torch.from_numpy(np.fromfile(_RCP_DELTA_FILE, dtype=np.uint8)).to(torch.int32)
    codes = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1).reshape(-1)
    return torch.where(codes == 1, 1, torch.where(codes == 2, -1, 0)).to(torch.int32)


def reciprocal_approx(a: torch.Tensor) -> torch.Tensor:
    """`rcp.approx.ftz.f32(a)` as the 4-bit quantize kernel computes 1/absmax under fast math:
    the correctly rounded reciprocal moved by the measured ulp difference of a's mantissa."""
    exact = reciprocal(a)
    normal = torch.isfinite(exact) & (exact.abs() >= FLT_MIN)
    mantissa = (ftz(a).view(torch.int32) & 0x007FFFFF).long()
    moved = (exact.view(torch.int32) + _rcp_approx_delta()[mantissa]).view(torch.float32)
    return torch.where(normal, ftz(moved), exact)


def codes_4bit(p: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Scaled values -> 4-bit codes (uint8)."""
    if quant_type == "nf4":
        code = (p.unsqueeze(-1) > NF4_THRESHOLDS).sum(-1)
        return code.to(torch.uint8)
    rank = (p.abs().unsqueeze(-1) > FP4_THRESHOLDS).sum(-1)
    return FP4_BY_RANK[rank] | ((p < 0).to(torch.uint8) << 3)


def quantize_4bit(
    a: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Any-shape float tensor -> (packed uint8 (ceil(n/2),), absmax fp32 (blocks,))."""
    x = a.detach().reshape(-1).to(torch.float32)
    n = x.numel()
    absmax = block_absmax(x, blocksize)  # (blocks,)
    inv = reciprocal_approx(absmax)
    padded = torch.zeros(absmax.numel() * blocksize, dtype=torch.float32)
    padded[:n] = x
    p = ftz(ftz(padded).view(-1, blocksize) * inv[:, None]).reshape(-1)  # (blocks * blocksize,)
    pairs = -(-n // 2)
    codes = codes_4bit(p[: 2 * pairs], quant_type)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    n: int,
    blocksize: int = 64,
    quant_type: str = "nf4",
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """(ceil(n/2),) uint8 codes + (blocks,) fp32 absmax -> (n,) `dtype`."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].long()
    block = torch.arange(n) // blocksize
    values = ftz(dequant_table(quant_type)[codes] * absmax.reshape(-1)[block])
    return to_dtype(values, dtype)


def to_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> `dtype`, nearest even; NaN becomes the GPU's canonical 0x7FFF in 16 bits."""
    out = values.to(dtype)
    if dtype in (torch.bfloat16, torch.float16):
        nan = torch.tensor(0x7FFF, dtype=torch.int16).view(dtype)
        out = torch.where(torch.isnan(values), nan, out)
    return out


def dynamic_map_signed() -> torch.Tensor:
    """The signed 8-bit dynamic map: for e in 0..6, 2**e means of `linspace(0.1, 1, 2**e + 1)`
    scaled by 10**(e - 6), and their negatives; plus 0 and 1; sorted (256 fp32 values)."""
    values: list[torch.Tensor] = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (e - 6)
        values += [scale * means, -scale * means]
    values.append(torch.tensor([0.0, 1.0]))
    return torch.sort(torch.cat(values).to(torch.float32)).values


def quantize_dynamic_8bit(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The kernel's 8-bit code of each scaled value: 7 halving steps of a binary search from
    pivot 127, then the nearer of the pivot and its last neighbour by midpoint."""
    pivot = torch.full_like(x, 127, dtype=torch.long)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        right = x > val
        lower_pivot = torch.where(right, pivot, lower_pivot)
        lower = torch.where(right, val, lower)
        upper_pivot = torch.where(right, upper_pivot, pivot)
        upper = torch.where(right, upper, val)
        pivot = torch.where(right, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    right = x > val
    up_mid = (upper + val) * 0.5
    low_mid = (lower + val) * 0.5
    q = torch.where(
        right,
        torch.where(x > up_mid, upper_pivot, pivot),
        torch.where(x < low_mid, lower_pivot, pivot),
    )
    return q.to(torch.uint8)


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (n,) -> (codes uint8 (n,), absmax fp32 (blocks,))."""
    x = x.reshape(-1).to(torch.float32)
    absmax = block_absmax(x, blocksize)
    inv = reciprocal(absmax)
    block = torch.arange(x.numel()) // blocksize
    p = ftz(ftz(x) * inv[block])
    return quantize_dynamic_8bit(code, p), absmax


def absmax_mean(absmax: torch.Tensor) -> torch.Tensor:
    """mean as torch's CUDA reduction forms it, `sum * (1.0f / n)`, with the sum rounded once."""
    total = absmax.double().sum().float()
    return total * torch.tensor(1.0 / absmax.numel(), dtype=torch.float32)


def quantize_nested(
    absmax: torch.Tensor, offset: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Double quantization -> (codes uint8, nested_absmax fp32, offset)."""
    off = absmax_mean(absmax) if offset is None else torch.tensor(offset, dtype=torch.float32)
    codes, nested = quantize_blockwise_8bit(absmax - off, dynamic_map_signed(), NESTED_BLOCKSIZE)
    return codes, nested, float(off)


def dequantize_nested(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: float) -> torch.Tensor:
    """`ftz(CODE8[codes] * nested_absmax[block]) + offset` (fp32)."""
    block = torch.arange(codes.numel()) // NESTED_BLOCKSIZE
    scaled = ftz(dynamic_map_signed()[codes.long()] * nested_absmax[block])
    return scaled + torch.tensor(offset, dtype=torch.float32)

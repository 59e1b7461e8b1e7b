#!/usr/bin/env python3
"""On a CUDA machine: dump the GPU's approximate reciprocal (`rcp.approx.ftz.f32`, what
bitsandbytes' quantize kernel computes for 1/absmax under fast math) for every fp32 mantissa, as
the difference from the correctly rounded reciprocal, so the CPU quantizer can reproduce it exactly.

Output `$OUT/rcp_approx_delta.bin`: 2^23 entries, 2 bits each (4 per byte, entry i in bits
2*(i%4)..2*(i%4)+1 of byte i//4), for x = 1 + i * 2^-23 in [1, 2):
    0 -> rcp.approx(x) == 1/x (correctly rounded),  1 -> one ulp above,  2 -> one ulp below.
It also checks, on a sample of exponents, that the delta does not depend on the exponent (while
the result is a normal number), and prints one JSON line with counts.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nf4_gpu_check import rcp_approx


def deltas(exponent: int) -> np.ndarray:
    """rcp.approx(x) - 1/x in ulps (as int32 bit differences) for x = (1 + i 2^-23) 2^exponent."""
    mantissa = torch.arange(1 << 23, dtype=torch.int32, device="cuda")
    bits = mantissa | ((127 + exponent) << 23)
    x = bits.view(torch.float32)
    approx = rcp_approx(x).view(torch.int32)
    exact = (1.0 / x).view(torch.int32)  # IEEE division, correctly rounded (no fast math in torch)
    return (approx - exact).cpu().numpy()


def main() -> None:
    base = deltas(0)
    assert set(np.unique(base).tolist()) <= {-1, 0, 1}, np.unique(base)
    codes = np.where(base == 1, 1, np.where(base == -1, 2, 0)).astype(np.uint8)
    packed = (codes[0::4] | (codes[1::4] << 2) | (codes[2::4] << 4) | (codes[3::4] << 6)).astype(np.uint8)
    out = os.environ.get("OUT", "/tmp")
    packed.tofile(os.path.join(out, "rcp_approx_delta.bin"))
    exponent_mismatch = {e: int((deltas(e) != base).sum()) for e in (-100, -20, -1, 1, 7, 30, 100)}
    print(json.dumps({"entries": int(base.size), "above": int((base == 1).sum()), "below": int((base == -1).sum()),
                      "exponent_mismatches": exponent_mismatch}))  # fmt: skip


if __name__ == "__main__":
    main()

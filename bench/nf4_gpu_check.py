#!/usr/bin/env python3
"""On a CUDA machine: is ferrotune's NF4/FP4 byte for byte bitsandbytes' CUDA `quantize_4bit`?
And how fast is our Triton dequantization beside bitsandbytes' `dequantize_4bit`?

Prints ONE JSON object:
  quantize   per (shape, dtype, blocksize, quant_type): bytes and absmax mismatches of our Rust
             quantizer (CPU) against bitsandbytes' CUDA kernel, plus the same count for three
             variants of the arithmetic computed on the GPU (reciprocal: IEEE `1/x` or the GPU's
             `rcp.approx.ftz.f32`; thresholds: C literals rounded once or through a double), so any
             mismatch says which variant the kernel really uses;
  nested     double quantization: offset (ours vs torch's CUDA mean), 8-bit codes and nested absmax
             given the same offset;
  dequantize our Triton kernel and our Rust dequantization against bitsandbytes' CUDA dequantize
             (bf16 / fp16 / fp32, plain and double-quantized), bit for bit;
  bandwidth  Triton vs bitsandbytes dequantize of 14336x4096 (median of 100, CUDA events), GB/s
             counted as bytes read + written;
  rcp        how often `rcp.approx.ftz.f32` differs from the correctly rounded reciprocal over all
             2^23 mantissas, and every differing bf16 / fp16 mantissa (the absmax of 16-bit
             weights has one of those).

Run (the lead): carry the ferrotune wheel and the bitsandbytes 0.50.2 wheel in .device/, then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/*.whl && \
  PYTHONPATH=/tmp/site:$PWD/python python3 bench/nf4_gpu_check.py > $OUT/nf4_gpu_check.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import bitsandbytes.functional as bnb
import torch
import triton
import triton.language as tl
from ferrotune import _native
from ferrotune.kernels import nf4_dequant
from ferrotune.quant import blockwise as B
from ferrotune.quant import reference as R

DEV = torch.device("cuda")
TINY = torch.finfo(torch.float32).tiny


@triton.jit
def _rcp_approx_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    bits = tl.load(X + offs, mask=mask, other=0x3F800000)
    out = tl.inline_asm_elementwise(
        "{ .reg .f32 a, b; mov.b32 a, $1; rcp.approx.ftz.f32 b, a; mov.b32 $0, b; }",
        "=r,r",
        [bits],
        dtype=tl.int32,
        is_pure=True,
        pack=1,
    )
    tl.store(Y + offs, out, mask=mask)


def rcp_approx(x: torch.Tensor) -> torch.Tensor:
    """The GPU's approximate reciprocal of fp32 `x` (on CUDA)."""
    bits = x.float().contiguous().view(torch.int32)
    out = torch.empty_like(bits)
    _rcp_approx_kernel[(triton.cdiv(bits.numel(), 1024),)](bits, out, bits.numel(), BLOCK=1024)
    return out.view(torch.float32)


def ftz(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < TINY, torch.copysign(torch.zeros_like(x), x), x)


def thresholds(kind: str, double: bool) -> torch.Tensor:
    literals = R.NF4_THRESHOLD_LITERALS if kind == "nf4" else ["0.00260417", "0.0859375", "0.20833333",
                                                                 "0.29166667", "0.4166667", "0.583333", "0.8333333"]  # fmt: skip
    if double:
        return torch.tensor([float(t) for t in literals], dtype=torch.float32, device=DEV)
    return torch.tensor([R._f32_literal(t) for t in literals], dtype=torch.float32, device=DEV)


def quantize_variant(
    x: torch.Tensor, blocksize: int, kind: str, approx_rcp: bool, double: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA-kernel semantics in torch on the GPU, with a choice of reciprocal and thresholds."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.zeros(blocks * blocksize, device=DEV)
    padded[:n] = flat
    a = ftz(padded.abs())
    a = torch.where(torch.isnan(a), torch.full_like(a, -torch.finfo(torch.float32).max), a)
    absmax = a.view(blocks, blocksize).amax(1)
    inv = ftz(rcp_approx(ftz(absmax)) if approx_rcp else 1.0 / ftz(absmax))
    p = ftz(ftz(padded).view(blocks, blocksize) * inv[:, None]).view(-1)[: 2 * ((n + 1) // 2)]
    t = thresholds(kind, double)
    if kind == "nf4":
        codes = torch.bucketize(p, t, right=False)
        codes = torch.where(torch.isnan(p), torch.zeros_like(codes), codes).to(torch.uint8)
    else:
        rank = torch.bucketize(p.abs(), t, right=False)
        rank = torch.where(torch.isnan(p), torch.zeros_like(rank), rank)
        codes = R.FP4_BY_RANK.to(DEV)[rank] | ((p < 0).to(torch.uint8) << 3)
    return (codes[0::2] << 4) | codes[1::2], absmax


def adversarial(dtype: torch.dtype) -> torch.Tensor:
    blocks = [torch.zeros(64), torch.full((64,), -0.0), torch.full((64,), TINY / 4)]
    mixed = torch.zeros(64)
    mixed[0], mixed[1] = TINY, TINY / 2
    blocks.append(mixed)
    for double in (False, True):
        for t in (
            thresholds("nf4", double).cpu(),
            thresholds("fp4", double).cpu(),
            -thresholds("fp4", double).cpu(),
        ):
            b = torch.zeros(64)
            b[0] = 1.0
            vals = torch.cat(
                [t, torch.nextafter(t, torch.tensor(2.0)), torch.nextafter(t, torch.tensor(-2.0))]
            )[:63]
            b[1 : 1 + vals.numel()] = vals
            blocks.append(b)
    nan = torch.randn(64)
    nan[3], nan[10] = float("nan"), float("inf")
    blocks += [nan, torch.full((64,), float("nan")), -torch.rand(64) - 0.5, torch.randn(33)]
    return torch.cat(blocks).to(dtype)


def our_quantize(x: torch.Tensor, blocksize: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    packed, state = B.quantize_4bit(x.cpu(), blocksize, kind, double_quant=False)
    return packed.view(-1), state.absmax


def first_mismatches(
    ours: torch.Tensor, theirs: torch.Tensor, x: torch.Tensor, absmax: torch.Tensor, blocksize: int
) -> list[dict]:
    idx = (ours != theirs).nonzero().view(-1)[:5].tolist()
    flat = x.reshape(-1).float().cpu()
    out = []
    for i in idx:
        block = (2 * i) // blocksize
        out.append({"byte": i, "ours": int(ours[i]), "bnb": int(theirs[i]), "x": flat[2 * i : 2 * i + 2].tolist(),
                    "absmax": float(absmax[block]), "absmax_hex": hex(absmax[block : block + 1].view(torch.int32).item())})  # fmt: skip
    return out


def check_quantize(results: dict, reps_shapes: list[tuple[int, ...]]) -> None:
    g = torch.Generator().manual_seed(0)
    cases = []
    for shape in reps_shapes:
        w = torch.randn(shape, generator=g) * 0.02
        w.view(-1)[::997] *= 30
        cases.append((f"randn{list(shape)}", w))
    for name, x in [*cases, ("adversarial", None)]:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            data = adversarial(dtype) if x is None else x.to(dtype)
            for kind in ("nf4", "fp4"):
                for bs in B.BLOCKSIZES:
                    if x is not None and data.numel() > 2**22 and bs not in (64, 128):
                        continue
                    theirs, st = bnb.quantize_4bit(data.to(DEV), blocksize=bs, quant_type=kind)
                    theirs = theirs.view(-1).cpu()
                    ours, our_absmax = our_quantize(data, bs, kind)
                    row = {"case": name, "dtype": str(dtype)[6:], "quant_type": kind, "blocksize": bs,
                           "bytes": theirs.numel(), "rust_byte_mismatches": int((ours != theirs).sum()),
                           "rust_absmax_mismatches": int((our_absmax.view(torch.int32) != st.absmax.cpu().view(torch.int32)).sum())}  # fmt: skip
                    variants = {}
                    for approx in (False, True):
                        for double in (False, True):
                            vp, _ = quantize_variant(data.to(DEV), bs, kind, approx, double)
                            key = f"{'rcp_approx' if approx else 'rcp_ieee'}+{'double_rounded' if double else 'direct'}_thresholds"
                            variants[key] = int((vp.cpu() != theirs).sum())
                    row["variant_byte_mismatches"] = variants
                    if row["rust_byte_mismatches"]:
                        row["first"] = first_mismatches(ours, theirs, data, our_absmax, bs)
                    results["quantize"].append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)


def check_nested(results: dict) -> None:
    g = torch.Generator().manual_seed(1)
    for shape in [(4096, 4096), (14336, 4096), (1000, 77)]:
        w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        _, st = bnb.quantize_4bit(w.to(DEV), blocksize=64, quant_type="nf4", compress_statistics=True)
        _, plain = bnb.quantize_4bit(w.to(DEV), blocksize=64, quant_type="nf4")
        absmax = plain.absmax.cpu()
        our_offset = float(_native.quantize_nested(absmax.numpy().view("uint8"), None)[2])
        codes, nested, _ = B.quantize_nested(absmax, float(st.offset))
        row = {"shape": list(shape), "bnb_offset": float(st.offset), "our_offset": our_offset,
               "offset_equal": our_offset == float(st.offset),
               "code_mismatches_given_bnb_offset": int((codes != st.absmax.cpu()).sum()),
               "nested_absmax_mismatches": int((nested.view(torch.int32) != st.state2.absmax.cpu().view(torch.int32)).sum()),
               "blocks": absmax.numel()}  # fmt: skip
        results["nested"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)


def check_dequantize(results: dict) -> None:
    g = torch.Generator().manual_seed(2)
    for shape in [(4096, 4096), (37, 96), (1, 33)]:
        w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        for nested in (False, True):
            packed, st = bnb.quantize_4bit(
                w.to(DEV), blocksize=64, quant_type="nf4", compress_statistics=nested
            )
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                st.dtype = dtype
                ref = bnb.dequantize_4bit(packed, st).cpu()
                table = torch.from_dlpack(_native.quant_map("nf4")).to(DEV)
                code8 = torch.from_dlpack(_native.dynamic_map_signed()).to(DEV) if nested else None
                tri = nf4_dequant.dequantize_4bit(packed.view(-1), st.absmax, table, shape, 64, dtype,
                                                  st.state2.absmax if nested else None, code8,
                                                  float(st.offset) if nested else 0.0).cpu()  # fmt: skip
                torch_path = nf4_dequant.dequantize_4bit_reference(packed.view(-1), st.absmax, table, shape, 64, dtype,
                                                                   st.state2.absmax if nested else None, code8,
                                                                   float(st.offset) if nested else 0.0).cpu()  # fmt: skip
                state = B.QuantState(st.absmax.cpu(), torch.Size(shape), dtype, 64, "nf4",
                                     st.state2.absmax.cpu() if nested else None, float(st.offset) if nested else None)  # fmt: skip
                rust = B.dequantize_4bit(packed.cpu(), state, dtype)
                bits = torch.int32 if dtype == torch.float32 else torch.int16
                row = {"shape": list(shape), "nested": nested, "dtype": str(dtype)[6:],
                       "triton_vs_bnb_mismatches": int((tri.view(bits) != ref.view(bits)).sum()),
                       "torch_path_vs_bnb_mismatches": int((torch_path.view(bits) != ref.view(bits)).sum()),
                       "rust_vs_bnb_mismatches": int((rust.view(bits) != ref.view(bits)).sum())}  # fmt: skip
                results["dequantize"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)


def timed(fn, reps: int = 100) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def check_bandwidth(results: dict) -> None:
    shape = (14336, 4096)
    w = (torch.randn(shape, device=DEV) * 0.02).to(torch.bfloat16)
    n = w.numel()
    table = torch.from_dlpack(_native.quant_map("nf4")).to(DEV)
    code8 = torch.from_dlpack(_native.dynamic_map_signed()).to(DEV)
    for nested in (False, True):
        packed, st = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
        args = (packed.view(-1), st.absmax, table, shape, 64, torch.bfloat16,
                st.state2.absmax if nested else None, code8 if nested else None, float(st.offset) if nested else 0.0)  # fmt: skip
        t_ours = timed(lambda args=args: nf4_dequant.dequantize_4bit(*args))
        t_bnb = timed(lambda packed=packed, st=st: bnb.dequantize_4bit(packed, st))
        moved = n // 2 + st.absmax.numel() * st.absmax.element_size() + 2 * n
        row = {"shape": list(shape), "nested": nested, "triton_ms": t_ours * 1e3, "bnb_ms": t_bnb * 1e3,
               "triton_GBps": moved / t_ours / 1e9, "bnb_GBps": moved / t_bnb / 1e9, "speedup": t_bnb / t_ours}  # fmt: skip
        results["bandwidth"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)


def check_rcp(results: dict) -> None:
    """rcp.approx.ftz.f32 against the correctly rounded reciprocal over [1, 2) (the mantissa
    decides; the exponent only shifts, away from the denormal range)."""
    bits = torch.arange(0x3F800000, 0x40000000, dtype=torch.int64, device=DEV).to(torch.int32)
    x = bits.view(torch.float32)
    approx = rcp_approx(x)
    exact = 1.0 / x.double()
    ieee = exact.float()
    differ = approx != ieee
    err = ((approx.double() - exact) / exact).abs()
    bf16_mask = (bits & 0xFFFF) == 0
    fp16_mask = (bits & 0x1FFF) == 0
    results["rcp"] = {
        "mantissas": int(bits.numel()),
        "approx_differs_from_ieee": int(differ.sum()),
        "max_rel_error": float(err.max()),
        "bf16_mantissas_differing": [hex(int(b)) for b in bits[differ & bf16_mask].tolist()],
        "bf16_differing_approx_bits": [
            hex(int(b)) for b in approx[differ & bf16_mask].view(torch.int32).tolist()
        ],
        "fp16_mantissas_differing": len(bits[differ & fp16_mask]),
        "fp16_differing": {
            hex(int(b)): hex(int(a))
            for b, a in zip(
                bits[differ & fp16_mask].tolist(),
                approx[differ & fp16_mask].view(torch.int32).tolist(),
                strict=True,
            )
        },
    }


def main() -> None:
    t0 = time.time()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                     "bitsandbytes": __import__("bitsandbytes").__version__, "ferrotune": _native.__version__,
                     "quantize": [], "nested": [], "dequantize": [], "bandwidth": []}  # fmt: skip
    check_rcp(results)
    print(json.dumps(results["rcp"])[:2000], file=sys.stderr, flush=True)
    check_quantize(results, [(4096, 4096), (1000, 77), (1, 1), (3, 5), (7, 100), (129, 4097)])
    check_nested(results)
    check_dequantize(results)
    check_bandwidth(results)
    q = results["quantize"]
    results["summary"] = {
        "quantize_cases": len(q),
        "quantize_cases_byte_exact": sum(
            r["rust_byte_mismatches"] == 0 and r["rust_absmax_mismatches"] == 0 for r in q
        ),
        "variant_totals": {
            k: sum(r["variant_byte_mismatches"][k] for r in q) for k in q[0]["variant_byte_mismatches"]
        },
        "dequantize_all_exact": all(
            r["triton_vs_bnb_mismatches"] == 0 and r["rust_vs_bnb_mismatches"] == 0
            for r in results["dequantize"]
        ),
        "wall_s": round(time.time() - t0, 1),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    main()

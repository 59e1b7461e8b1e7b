#!/usr/bin/env python3
"""NF4 quantize / dequantize throughput on the CPU: ferrotune (Rust, all cores) beside
bitsandbytes' CPU path (the peer of ../shared/bench/nf4_peer.py: `quantize_4bit` /
`dequantize_4bit`, blocksize 64), in the same process and run, alternating ours and theirs.

Prints ONE JSON line: per (shape, input dtype, double quant): quantize M elements/s and dequantize
GB/s of output for both, wall-clock medians over --reps timed calls after a warm-up, the ratios,
and the same figures per CPU-second (process time), which are steadier on a shared machine.
Also checks, before timing, that both produce the same bytes on these (regular) inputs.

    PYTHONPATH=python python bench/nf4_bench.py --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import bitsandbytes.functional as bnb
import torch
from ferrotune.quant import blockwise as B


def timeit(fn, reps: int) -> tuple[list[float], list[float]]:
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        r = fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        del r
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    results = []
    for shape in [(4096, 4096), (4096, 14336)]:
        w32 = torch.randn(shape, generator=g) * 0.02
        for dtype in (torch.bfloat16, torch.float32):
            w = w32.to(dtype)
            n = w.numel()
            for cs in (False, True):
                ours_packed, ours_state = B.quantize_4bit(w, 64, "nf4", double_quant=cs)
                their_packed, their_state = bnb.quantize_4bit(
                    w, blocksize=64, quant_type="nf4", compress_statistics=cs
                )
                same_codes = torch.equal(ours_packed, their_packed)
                qo = timeit(lambda w=w, cs=cs: B.quantize_4bit(w, 64, "nf4", double_quant=cs), args.reps)
                qt = timeit(
                    lambda w=w, cs=cs: bnb.quantize_4bit(
                        w, blocksize=64, quant_type="nf4", compress_statistics=cs
                    ),
                    args.reps,
                )
                do = timeit(lambda p=ours_packed, s=ours_state: B.dequantize_4bit(p, s), args.reps)
                dt = timeit(lambda p=their_packed, s=their_state: bnb.dequantize_4bit(p, s), args.reps)
                out_bytes = n * w.element_size()
                row = {
                    "shape": list(shape),
                    "dtype": str(dtype).removeprefix("torch."),
                    "double_quant": cs,
                    "same_codes_as_bnb": same_codes,
                    "quantize_Melem_s": {
                        "ours": n / statistics.median(qo[0]) / 1e6,
                        "bnb": n / statistics.median(qt[0]) / 1e6,
                    },
                    "quantize_Melem_per_cpu_s": {
                        "ours": n / statistics.median(qo[1]) / 1e6,
                        "bnb": n / statistics.median(qt[1]) / 1e6,
                    },
                    "dequantize_out_GBps": {
                        "ours": out_bytes / statistics.median(do[0]) / 1e9,
                        "bnb": out_bytes / statistics.median(dt[0]) / 1e9,
                    },
                    "dequantize_out_GB_per_cpu_s": {
                        "ours": out_bytes / statistics.median(do[1]) / 1e9,
                        "bnb": out_bytes / statistics.median(dt[1]) / 1e9,
                    },
                }
                for key in list(row):
                    if isinstance(row[key], dict) and "ours" in row[key]:
                        row[key]["ratio"] = row[key]["ours"] / row[key]["bnb"]
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(
        json.dumps(
            {
                "bench": "nf4_cpu",
                "reps": args.reps,
                "nproc": os.cpu_count(),
                "loadavg": load,
                "torch_threads": torch.get_num_threads(),
                "bitsandbytes": __import__("bitsandbytes").__version__,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()

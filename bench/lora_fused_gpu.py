"""The fused LoRA node (`ferrotune.kernels.lora_linear`) against the plain composition on one GPU,
layer by layer, on the Llama-3.1-8B projection shapes (4 x 2048 tokens, r = 16, bf16):
forward + backward time (median of synchronized wall-clock timings), bytes kept for backward, peak memory above
the inputs, and the largest difference of the output and of each gradient against the reference.

    python bench/lora_fused_gpu.py          # one JSON line per case (OUT=dir: also lora_fused.jsonl)
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F
from ferrotune.kernels import lora_linear

DEVICE = os.environ.get("DEVICE", "cuda")  # DEVICE=cpu TOKENS=64: a smoke run without a GPU
TOKENS, RANK, SCALING = int(os.environ.get("TOKENS", 4 * 2048)), 16, 2.0
SHAPES = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 1024),
    "gate_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}


def saved_bytes(fn, weights: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps, weights excluded (activations only)."""
    weight_ptrs = {t.untyped_storage().data_ptr() for t in weights}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weight_ptrs:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def plain(x, base, a, b, scaling, dropout):
    """LoraLinear's plain path: the base module, then B(A(dropout(x))) * s added on."""
    xa = F.dropout(x, dropout) if dropout > 0 else x
    return base(x) + F.linear(F.linear(xa, a), b) * scaling


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def case(name: str, fan_in: int, fan_out: int, dropout: float, nf4: bool) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(TOKENS, fan_in, device=DEVICE, dtype=torch.bfloat16, generator=g).requires_grad_(True)
    w = torch.randn(fan_out, fan_in, device=DEVICE, dtype=torch.bfloat16, generator=g) / fan_in**0.5
    a = (torch.randn(RANK, fan_in, device=DEVICE, generator=g) / fan_in**0.5).bfloat16().requires_grad_(True)
    b = (torch.randn(fan_out, RANK, device=DEVICE, generator=g) / RANK**0.5).bfloat16().requires_grad_(True)
    weight: object = w
    base = lambda t: F.linear(t, w)  # noqa: E731
    if nf4:
        from ferrotune.quant.nf4 import NF4Linear

        base = NF4Linear.from_weight(w, device=DEVICE)
        weight = base.dequantize
    dy = torch.randn(TOKENS, fan_out, device=DEVICE, dtype=torch.bfloat16, generator=g)
    out: dict = {"case": name, "in": fan_in, "out": fan_out, "tokens": TOKENS, "dropout": dropout, "nf4": nf4}
    results = {}
    fused = lambda: lora_linear(x, weight, None, a, b, SCALING, dropout)  # noqa: E731
    reference = lambda: plain(x, base, a, b, SCALING, dropout)  # noqa: E731
    for impl, fn in (("fused", fused), ("plain", reference)):

        def step(fn=fn):
            y = fn()
            y.backward(dy)
            return y

        for t in (x, a, b):
            t.grad = None
        torch.manual_seed(1)
        y = step()
        results[impl] = [y.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone()]
        out[f"{impl}_saved_mib"] = round(saved_bytes(fn, [w, a, b]) / 2**20, 1)
        times, floor = [], 0
        for i in range(12):
            for t in (x, a, b):
                t.grad = None
            sync()
            if i == 2 and DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
                floor = torch.cuda.memory_allocated()
            start = time.perf_counter()
            step()
            sync()
            if i >= 2:
                times.append((time.perf_counter() - start) * 1000)
        times.sort()
        out[f"{impl}_ms"] = round(times[len(times) // 2], 3)
        if DEVICE == "cuda":
            out[f"{impl}_peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - floor) / 2**20, 1)
    for label, f, p in zip(("y", "dx", "dA", "dB"), results["fused"], results["plain"], strict=True):
        out[f"max_rel_diff_{label}"] = float((f.float() - p.float()).abs().max() / p.float().abs().max())
    out["speedup"] = round(out["plain_ms"] / out["fused_ms"], 3)
    return out


if __name__ == "__main__":
    for name, (fan_in, fan_out) in SHAPES.items():
        for dropout in (0.0, 0.05):
            for nf4 in (False, True):
                record = case(name, fan_in, fan_out, dropout, nf4)
                line = json.dumps(record)
                print(line, flush=True)
                if os.environ.get("OUT"):
                    with open(os.path.join(os.environ["OUT"], "lora_fused.jsonl"), "a") as f:
                        f.write(line + "\n")

"""Where a training step's GPU time goes: one `bench/train_gpu.py` case (or the HF + Liger peer's
`full1b`) under torch.profiler, kernels grouped into families (GEMM, attention, norm, RoPE, SwiGLU,
cross-entropy, optimizer, copies, other), plus the forward / backward / optimizer split timed with
CUDA events. Prints one JSON line per profiled case and the top kernels as a table.

    python bench/profile_gpu.py full1b                # ferrotune
    python bench/profile_gpu.py full1b --peer-liger   # HF transformers + Liger, same shape
    python bench/profile_gpu.py full1b --who Memcpy   # also: which CPU ops launched those kernels
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_gpu  # (same shapes and model builder as the throughput benchmark)

FAMILIES = [  # first match wins
    ("attention", r"flash|fmha|attention|sdpa|flex"),
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul|splitk|_mm_"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("cross_entropy", r"logsumexp|cross_entropy|log_softmax|softmax|nll"),
    ("rmsnorm", r"rms|norm"),
    ("rope", r"rope|rotary"),
    ("swiglu", r"swiglu|silu|glu"),
    ("embedding", r"embedding|index_put|index_add|scatter|gather|indexing"),
    ("copy_cast", r"copy|cast|convert|to_copy|fill|zero"),
    ("elementwise", r"elementwise|vectorized|reduce|unrolled"),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, pattern in FAMILIES:
        if re.search(pattern, low):
            return fam
    return "other"


def ferrotune_step(case: str):
    shapes = {"full1b": (train_gpu.L1B, "full", 8, 2048, False, None),
              "lora8b_sel22": (train_gpu.L8B, "lora", 4, 2048, True, 22)}  # fmt: skip
    shape, mode, bsz, seq, gc_on, checkpointed = shapes[case]
    model = train_gpu.build(shape, mode)
    inner = model.model if hasattr(model, "model") and isinstance(model.model, train_gpu.CausalLM) else model
    inner.gradient_checkpointing = gc_on
    inner.model.checkpointed_layers = checkpointed
    params = [p for p in model.parameters() if p.requires_grad]
    opt = train_gpu.AdamW(params, lr=1e-5)
    g = torch.Generator(device="cuda").manual_seed(1)
    vocab = shape["vocab_size"]

    def step(events):
        ids = torch.randint(0, vocab, (bsz, seq), device="cuda", generator=g)
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = -100
        events[0].record()
        hidden = inner.hidden_states(ids)
        loss = train_gpu.linear_cross_entropy(hidden, inner.lm_head.weight, labels)
        events[1].record()
        loss.backward()
        events[2].record()
        opt.step()
        opt.zero_grad(set_to_none=True)
        events[3].record()

    return step, bsz * seq


def peer_step(case: str):
    shape, bsz, seq = train_gpu.L1B, 8, 2048
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers import LlamaConfig, LlamaForCausalLM

    apply_liger_kernel_to_llama()
    cfg = LlamaConfig(**{**shape, "max_position_embeddings": 8192})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1)

    def step(events):
        ids = torch.randint(0, shape["vocab_size"], (bsz, seq), device="cuda", generator=g)
        events[0].record()
        out = model(input_ids=ids, labels=ids)
        events[1].record()
        out.loss.backward()
        events[2].record()
        opt.step()
        opt.zero_grad(set_to_none=True)
        events[3].record()

    return step, bsz * seq


def print_launchers(events, pattern: str) -> None:
    """The CPU op chains (innermost first) that launched kernels whose name matches `pattern`,
    with how many kernels each launched and their GPU time."""
    chains: dict[str, list[float]] = {}
    for evt in events:
        if evt.device_type != torch.autograd.DeviceType.CPU:
            continue
        for kernel in evt.kernels:
            if re.search(pattern, kernel.name):
                chain, parent = [evt.name], evt.cpu_parent
                while parent is not None and len(chain) < 6:
                    chain.append(parent.name)
                    parent = parent.cpu_parent
                chains.setdefault(" < ".join(chain), []).append(kernel.duration / 1e3)
    print(f"--- launchers of kernels matching {pattern!r} (ms, kernels, CPU op chain)")
    for chain, times in sorted(chains.items(), key=lambda kv: -sum(kv[1])):
        print(f"{sum(times):9.3f} {len(times):5d}  {chain[:200]}")


def profile(case: str, peer: bool, steps: int, who: str | None = None) -> None:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step, tokens = (peer_step if peer else ferrotune_step)(case)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    for _ in range(3):
        step(events)
    torch.cuda.synchronize()
    split = {"forward": [], "backward": [], "optimizer": [], "total": []}
    for _ in range(steps):
        step(events)
        torch.cuda.synchronize()
        split["forward"].append(events[0].elapsed_time(events[1]))
        split["backward"].append(events[1].elapsed_time(events[2]))
        split["optimizer"].append(events[2].elapsed_time(events[3]))
        split["total"].append(events[0].elapsed_time(events[3]))
    median = {k: round(sorted(v)[len(v) // 2], 2) for k, v in split.items()}
    activities = [torch.profiler.ProfilerActivity.CUDA]
    if who:
        activities.append(torch.profiler.ProfilerActivity.CPU)
    with torch.profiler.profile(activities=activities) as prof:
        step(events)
        torch.cuda.synchronize()
    if who:
        print_launchers(prof.events(), who)
    kernels: dict[str, list[float]] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(evt.name, []).append(evt.device_time_total / 1e3)
    by_family: dict[str, float] = {}
    for name, times in kernels.items():
        by_family[family(name)] = by_family.get(family(name), 0.0) + sum(times)
    top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:30]
    impl = "hf_liger" if peer else "ferrotune"
    print(f"--- {impl} {case}: top kernels (ms in one step, calls)")
    for name, times in top:
        print(f"{sum(times):9.2f} {len(times):5d}  {family(name):13s} {name[:110]}")
    record = dict(case=case, impl=impl, step_ms=median, tokens_per_s=round(tokens / median["total"] * 1e3),
                  kernel_ms_by_family={k: round(v, 2) for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])},
                  kernel_ms_total=round(sum(by_family.values()), 2),
                  peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))  # fmt: skip
    print(json.dumps(record), flush=True)
    with open(os.path.join(train_gpu.OUT, "profile.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", default="full1b")
    parser.add_argument("--peer-liger", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--who", help="regex: print the CPU ops that launched the matching kernels")
    args = parser.parse_args()
    for case in args.cases.split(","):
        start = time.time()
        profile(case, args.peer_liger, args.steps, args.who)
        print(f"({case}: {time.time() - start:.0f} s)", flush=True)

"""Where the GPU waits during `full1b` training steps: two steps under torch.profiler, each after a
sync as `bench/train_gpu.py` times them; the time from each step's start to its first kernel (and
the CPU ops in it), the gaps between consecutive kernels, and the CPU op running in each gap.

    python bench/gaps_gpu.py            # prints the start latency, total idle and the 25 longest gaps
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_gpu  # (same shapes, model builder and optimizer as the throughput benchmark)


def main() -> None:
    model = train_gpu.build(train_gpu.L1B, "full")
    opt = train_gpu.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator(device="cuda").manual_seed(1)

    def step() -> None:
        ids = torch.randint(0, train_gpu.L1B["vocab_size"], (8, 2048), device="cuda", generator=g)
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = -100
        hidden = model.hidden_states(ids)
        train_gpu.linear_cross_entropy(hidden, model.lm_head.weight, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):  # as bench/train_gpu.py times them: a sync before each step
            torch.cuda.synchronize()
            with torch.profiler.record_function("bench_step"):
                step()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    cpu_ops = [
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CPU
    ]
    first = kernels[0][0]
    gaps = []  # (gap us, gap start, next kernel)
    end = kernels[0][1]
    for start, stop, name in kernels[1:]:
        if start - end > 5:
            gaps.append((start - end, end, name))
        end = max(end, stop)
    busy = sum(stop - start for start, stop, _ in kernels)
    idle = sum(gap for gap, _, _ in gaps)
    print(f"two steps: {(end - first) / 1e3:.2f} ms from first kernel to last (a sync between them), kernels {busy / 1e3:.2f} ms, "
          f"idle {idle / 1e3:.2f} ms in {len(gaps)} gaps over 5 us")  # fmt: skip

    # From each step's start on the CPU to its first kernel on the GPU: the GPU waits for launches.
    for mark in sorted(e.time_range.start for e in events if e.name == "bench_step"):
        first_kernel = min(start for start, _, _ in kernels if start >= mark)
        window = sorted(
            (c for c in cpu_ops if mark <= c[0] < first_kernel and c[1] - c[0] > 20), key=lambda c: c[0]
        )
        print(f"step start -> first kernel: {(first_kernel - mark) / 1e3:.3f} ms; CPU ops over 20 us in it:")
        for start, stop, name in window[:30]:
            print(f"    {(start - mark) / 1e3:7.3f} ms  {(stop - start):8.1f} us  {name[:60]}")

    def cpu_during(t: float) -> str:
        covering = sorted((c for c in cpu_ops if c[0] <= t <= c[1]), key=lambda c: c[1] - c[0])
        return " < ".join(c[2][:40] for c in covering[:4])

    for gap, start, name in sorted(gaps, reverse=True)[:25]:
        print(
            f"{gap:8.1f} us at {(start - first) / 1e3:8.2f} ms  next={name[:50]:50s} cpu: {cpu_during(start + gap / 2)}"
        )


if __name__ == "__main__":
    main()

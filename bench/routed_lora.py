"""Task-routed LoRA: the cost of routing every row of a batch to its task's adapter inside one
forward pass, against the alternative of one forward per task. Prints one JSON object per variant.

Variants (a shared LoRA r=16 on all linear layers everywhere, n task adapters of rank r):
  shared_only       the shared LoRA alone (the floor)
  routed_tokens     routed LoRA, per-token task ids (rows mixing tasks: masked stacked matmuls)
  routed_rows       routed LoRA, one task per row (gathered factors, batched matmuls)
  per_task_loop     n named LoRA adapters, one forward/backward per task on that task's rows

Each: median time of a training step (forward, backward, AdamW) over the last steps, tokens/s,
trainable parameters and peak memory (CUDA). The layers' exactness is tested in
tests/test_multitask.py; this script measures cost only.

    python bench/routed_lora.py --device cuda                 # 8-layer 34M model, 8 x 1024 tokens
    python bench/routed_lora.py --device cpu --small          # a quick check on CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "python")]


def build(args: argparse.Namespace, variant: str):  # type: ignore[no-untyped-def]
    import ferrotune.peft as fp
    import torch
    from ferrotune.models.llama import CausalLM, LlamaConfig
    from ferrotune.peft.routed import apply_routed

    small = args.small
    config = LlamaConfig(
        vocab_size=1000 if small else 8000,
        hidden_size=128 if small else 512,
        intermediate_size=256 if small else 1408,
        num_hidden_layers=2 if small else 8,
        num_attention_heads=4 if small else 8,
        num_key_value_heads=2 if small else 4,
        max_position_embeddings=args.seq_len,
    )
    torch.manual_seed(0)
    model = CausalLM(config)
    model.init_weights()
    model.to(args.device)
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    shared = fp.LoraConfig(r=16, alpha=32, target_modules=linear)
    task = fp.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=linear)
    model = fp.apply_peft(model, shared, "shared")
    tasks = [f"t{k}" for k in range(args.tasks)]
    if variant in ("routed_tokens", "routed_rows"):
        return apply_routed(model, tasks, task), tasks
    if variant == "per_task_loop":
        for name in tasks:
            fp.apply_peft(model, task, name)
        fp.set_trainable(model, ["shared", *tasks])
    return model, tasks


def step_times(args: argparse.Namespace, variant: str) -> dict:
    import ferrotune.peft as fp
    import torch
    import torch.nn.functional as F

    model, tasks = build(args, variant)
    device = torch.device(args.device)
    n, b, t = len(tasks), args.batch, args.seq_len
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (b, t + 1), generator=g).to(device)
    row_tasks = (torch.arange(b) % n).to(device)  # (B,)
    token_tasks = row_tasks[:, None].expand(b, t).contiguous()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def loss_of() -> torch.Tensor:
        inputs, labels = ids[:, :-1], ids[:, 1:]
        if variant == "per_task_loop":
            total = torch.zeros((), device=device)
            for k, name in enumerate(tasks):
                rows = row_tasks == k
                fp.set_active(model, ["shared", name])
                with autocast:
                    logits = model(inputs[rows])
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels[rows].flatten(), reduction="sum")
                (loss / labels.numel()).backward()
                total += loss.detach()
            return total / labels.numel()
        routing = token_tasks if variant == "routed_tokens" else row_tasks
        kwargs = {"task_ids": routing} if variant != "shared_only" else {}
        with autocast:
            logits = model(inputs, **kwargs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        return loss.detach()

    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_of()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times[2:] if len(times) > 3 else times)
    out = {
        "variant": variant,
        "tasks": n,
        "task_rank": args.rank,
        "device": args.device,
        "step_ms": round(1000 * median, 2),
        "tokens_per_s": round(b * t / median),
        "trainable": fp.trainable_parameters(model).trainable,
        "last_loss": round(float(loss), 4),
    }
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        torch.cuda.reset_peak_memory_stats()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--small", action="store_true", help="a 2-layer model (CPU check)")
    args = parser.parse_args()
    if args.batch % args.tasks:
        parser.error("--batch must be a multiple of --tasks (rows are dealt to tasks in turn)")
    for variant in ("shared_only", "routed_tokens", "routed_rows", "per_task_loop"):
        print(json.dumps(step_times(args, variant)), flush=True)


if __name__ == "__main__":
    main()

"""Full fine-tuning and every PEFT method on one task: parameters updated (%), peak memory, step
time and held-out accuracy. Prints one JSON object per method, then a markdown table.

The task, base model and recipes (learning rate, step budget) are those of
tests/test_peft_learning.py: a tiny Llama trained in full on an instruction mixture, then each
method fine-tuned to make word-list reversal its default behaviour, exact match on 100 held-out
prompts (greedy, KV cache). Each method runs in its own process, so peak memory is its own:
on CPU the growth of peak RSS over the RSS right after loading the base (activations, gradients,
optimizer state, adapter); on CUDA `torch.cuda.max_memory_allocated()`.

    python bench/peft_methods.py                  # CPU, one thread
    python bench/peft_methods.py --device cuda    # GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "tests")]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(name: str, base_dir: str, device: str) -> dict[str, object]:
    import copy

    import ferrotune.peft as fp
    import test_peft_learning as task_module
    import torch
    from ferrotune.models import load_model
    from ferrotune.train.loop import RowBatches, train_loop

    data = torch.load(Path(base_dir) / "task.pt", weights_only=False)
    recipe = task_module.RECIPES[name]
    model = load_model(base_dir, device=device, dtype=torch.float32)
    if recipe.config is not None:
        model = fp.apply_peft(model, copy.deepcopy(recipe.config))
    report = fp.trainable_parameters(model)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_mib()
    stamps: list[float] = []

    def on_step(step: int, loss: float) -> None:
        stamps.append(time.perf_counter())

    torch.manual_seed(1)
    with tempfile.TemporaryDirectory() as out:
        config = task_module.run_config(out, recipe.steps, recipe.lr)
        config.run.log_every = 1  # a timestamp per step
        train_loop(model, config, RowBatches(data["rows"], 16, seed=1), quiet=True, on_step=on_step)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    step_ms = 1000 * statistics.median(b - a for a, b in itertools.pairwise(stamps[5:]))  # warm-up skipped
    accuracy = task_module.exact_match(model, data["held_out"])
    return {
        "method": name,
        "trainable_params": report.trainable,
        "trainable_percent": round(report.percent, 3),
        "peak_memory_mib": round(peak, 1),
        "step_ms": round(step_ms, 1),
        "steps": recipe.steps,
        "accuracy": accuracy,
        "bar": recipe.bar,
        "device": device,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default="", help="comma-separated subset of the recipes")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--base", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_one(args.child, args.base, args.device)), flush=True)
        return 0

    import test_peft_learning as task_module
    from ferrotune.models import save_model

    names = [n for n in args.methods.split(",") if n] or list(task_module.RECIPES)
    with tempfile.TemporaryDirectory() as base_dir:
        print("training the base model ...", file=sys.stderr, flush=True)
        data = task_module.make_task(str(Path(base_dir) / "run"))
        save_model(data.pop("base"), base_dir)
        torch.save(data, Path(base_dir) / "task.pt")
        rows = []
        for i, name in enumerate(names):
            print(f"[{i + 1}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--child", name, "--base", base_dir, "--device", args.device]
            command += ["--threads", str(args.threads)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    unit = "peak MiB (CUDA allocated)" if args.device == "cuda" else "peak RSS growth MiB"
    print(f"\n| method | params updated | {unit} | step ms | steps | exact match |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['trainable_params']:,} ({r['trainable_percent']:.2f}%) | "
            f"{r['peak_memory_mib']:.1f} | {r['step_ms']:.1f} | {r['steps']} | {r['accuracy']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

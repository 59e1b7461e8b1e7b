"""Full fine-tuning and every PEFT method on one task: parameters updated (%), peak memory, step
time and held-out accuracy. Prints one JSON object per method, then a markdown table.

The task, base model and recipes (learning rate, step budget) are those of
tests/test_peft_learning.py: a tiny Llama trained in full on an instruction mixture, then each
method fine-tuned to make word-list reversal its default behaviour, exact match on 100 held-out
prompts (greedy, KV cache). Each method runs in its own process. Peak memory is the peak of live
tensor bytes during training steps (weights, adapter, gradients, optimizer state, activations):
on CUDA `torch.cuda.max_memory_allocated()` over the whole run; on CPU, where the allocator keeps
no such count, `LiveTensorBytes` counts every tensor storage over 3 extra training steps on a
copy of the trained model (process RSS is useless at this size: the runtime's own growth,
tens of MiB, swamps a 77k-parameter model).

`--size medium` measures cost instead of learning: a random 34M-parameter Llama (hidden 512,
8 layers, vocab 8000), rows of 256 random tokens, batch 2, 6 steps per method (median of the last 4),
no accuracy: at this size memory and time differences between methods show.

    python bench/peft_methods.py                          # the task: accuracy, CPU, one thread
    python bench/peft_methods.py --size medium            # cost on a bigger model, CPU
    python bench/peft_methods.py --size medium --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "tests")]


def live_tensor_bytes_mode(existing):  # type: ignore[no-untyped-def]
    """A `TorchDispatchMode` that counts the bytes of live CPU tensor storages: those of
    `existing` (the model's weights) plus every storage an op creates (activations, gradients,
    optimizer state), each until it is freed; `.peak` is the high-water mark."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveTensorBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, tuple[int, weakref.ref]] = {}
            self.current = self.peak = 0
            for tensor in existing:
                self.track(tensor)

        def track(self, tensor: torch.Tensor) -> None:
            storage = tensor.untyped_storage()  # one Python object per storage while it lives
            key = id(storage)
            if key in self.live:
                return
            size = storage.nbytes()
            self.live[key] = (size, weakref.ref(storage, lambda _, key=key: self.free(key)))
            self.current += size
            self.peak = max(self.peak, self.current)

        def free(self, key: int) -> None:
            self.current -= self.live.pop(key)[0]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu":
                    self.track(leaf)
            return out

    return LiveTensorBytes()


def medium_model(device: str):  # type: ignore[no-untyped-def]
    import torch
    from ferrotune.models.llama import CausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = CausalLM(config)
    model.init_weights()
    return model.to(device)


def medium_rows() -> dict[str, object]:
    import torch

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(16):
        ids = torch.randint(0, 8000, (256,), generator=g)
        rows.append(
            {
                "input_ids": ids,
                "labels": torch.cat([ids[1:], torch.tensor([-100])]),
                "position_ids": torch.arange(256),
                "document_ids": torch.zeros(256, dtype=torch.int32),
            }
        )
    return {"rows": rows}


def run_one(name: str, base_dir: str, device: str, size: str) -> dict[str, object]:
    import copy

    import ferrotune.peft as fp
    import test_peft_learning as task_module
    import torch
    from ferrotune.models import load_model
    from ferrotune.train.loop import RowBatches, train_loop

    recipe = task_module.RECIPES[name]
    steps = recipe.steps
    if size == "medium":
        model, data, steps = medium_model(device), medium_rows(), 6
    else:
        data = torch.load(Path(base_dir) / "task.pt", weights_only=False)
        model = load_model(base_dir, device=device, dtype=torch.float32)
    torch.manual_seed(1)  # as tests/test_peft_learning.py::finetune
    if recipe.config is not None:
        model = fp.apply_peft(model, copy.deepcopy(recipe.config))
    report = fp.trainable_parameters(model)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stamps: list[float] = []

    def on_step(step: int, loss: float) -> None:
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = task_module.run_config(out, steps, recipe.lr)
        config.run.log_every = 1  # a timestamp per step
        rows_per_batch = 2 if size == "medium" else 16
        train_loop(
            model, config, RowBatches(data["rows"], rows_per_batch, seed=1), quiet=True, on_step=on_step
        )
    skip = 1 if size == "medium" else 5  # warm-up steps left out of the median
    step_ms = 1000 * statistics.median(b - a for a, b in itertools.pairwise(stamps[skip:]))
    accuracy = None if size == "medium" else task_module.exact_match(model, data["held_out"])
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # 3 more steps on a copy (step 2 on holds the optimizer state), every tensor counted
        copied = copy.deepcopy(model)
        counter = live_tensor_bytes_mode([*copied.parameters(), *copied.buffers()])
        with counter, tempfile.TemporaryDirectory() as out:
            config = task_module.run_config(out, 3, recipe.lr)
            train_loop(copied, config, RowBatches(data["rows"], rows_per_batch, seed=1), quiet=True)
        peak = counter.peak / 2**20
    return {
        "method": name,
        "trainable_params": report.trainable,
        "trainable_percent": round(report.percent, 3),
        "peak_memory_mib": round(peak, 1),
        "step_ms": round(step_ms, 1),
        "steps": steps,
        "accuracy": accuracy,
        "bar": task_module.BAR,
        "device": device,
        "size": size,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", choices=("task", "medium"), default="task")
    parser.add_argument("--methods", default="", help="comma-separated subset of the recipes")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--base", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_one(args.child, args.base, args.device, args.size)), flush=True)
        return 0

    import test_peft_learning as task_module
    from ferrotune.models import save_model

    names = [n for n in args.methods.split(",") if n] or list(task_module.RECIPES)
    with tempfile.TemporaryDirectory() as base_dir:
        if args.size == "task":
            print("training the base model ...", file=sys.stderr, flush=True)
            data = task_module.make_task(str(Path(base_dir) / "run"))
            save_model(data.pop("base"), base_dir)
            torch.save(data, Path(base_dir) / "task.pt")
        rows = []
        for i, name in enumerate(names):
            print(f"[{i + 1}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--child", name, "--base", base_dir, "--device", args.device]
            command += ["--threads", str(args.threads), "--size", args.size]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    unit = "peak MiB (CUDA allocated)" if args.device == "cuda" else "peak MiB (live tensors)"
    print(f"\n| method | params updated | {unit} | step ms | steps | exact match |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        accuracy = "-" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        print(
            f"| {r['method']} | {r['trainable_params']:,} ({r['trainable_percent']:.2f}%) | "
            f"{r['peak_memory_mib']:.1f} | {r['step_ms']:.1f} | {r['steps']} | {accuracy} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

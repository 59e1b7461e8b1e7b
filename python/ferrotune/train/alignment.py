"""What the alignment loops (`reward.py`, `dpo.py`, `ppo.py`, `grpo.py`) share: log-probabilities
of packed preference rows, the reference model (the adapter-disabled base, or a frozen copy for
full fine-tuning), the optimizer and learning-rate schedule, and a metrics log with progress.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ferrotune.train.preference_losses import document_logps, token_logps


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA, nothing (fp32) on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------------------------
# Log-probabilities of packed rows


def side_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], side: str, num_documents: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs `model` on the `side` rows of a packed preference batch (`chosen`, `rejected`, `kl`).
    Returns (log-prob sums (B, D), completion token counts (B, D), logits (B, T, V))."""
    labels = batch[f"{side}_labels"]
    documents = batch[f"{side}_document_ids"]
    logits = model(
        batch[f"{side}_input_ids"], position_ids=batch[f"{side}_position_ids"], document_ids=documents
    )
    sums, counts = document_logps(token_logps(logits, labels), labels, documents, num_documents)
    return sums, counts, logits


@contextmanager
def reference_model(policy: nn.Module, frozen_copy: nn.Module | None = None) -> Iterator[nn.Module]:
    """The reference policy π_ref under no_grad: `frozen_copy` when given (full fine-tuning), else
    the policy itself with its adapters disabled (PEFT: the same weights, no second copy)."""
    with torch.no_grad():
        if frozen_copy is not None:
            yield frozen_copy
            return
        from ferrotune.peft import disable_adapter

        with disable_adapter(policy) as base:
            yield base


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached, frozen, eval-mode copy (the full fine-tuning reference)."""
    import copy

    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    return clone.eval()


def has_adapters(model: nn.Module) -> bool:
    try:
        from ferrotune.peft import adapter_names
    except ImportError:
        return False
    return bool(adapter_names(model))


# ----------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.Optimizer:
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: every parameter is frozen")
    fused = all(p.is_cuda for p in trainable)
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused or None)


def learning_rate(step: int, total: int, peak: float, warmup: int = 0, min_ratio: float = 0.1) -> float:
    """Linear warmup to `peak`, then cosine decay to `peak * min_ratio` at `total` steps."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], lr: float, max_grad_norm: float
) -> float:
    """Sets the learning rate, clips gradients (when max_grad_norm > 0), steps and zeroes them.
    Returns the gradient norm before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


# ----------------------------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """Appends one JSON object per logged step to `<run>/metrics.jsonl` and prints a progress
    line (step, metrics, steps/s, ETA). `summary()` gives the last and best values."""

    def __init__(self, run_dir: str | Path | None, total_steps: int, name: str, quiet: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        self.total, self.name, self.quiet = total_steps, name, quiet
        self.start = time.perf_counter()
        self.history: list[dict[str, float]] = []

    def log(self, step: int, **metrics: float) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if not self.quiet:
            elapsed = time.perf_counter() - self.start
            rate = step / elapsed if elapsed > 0 else 0.0
            eta = (self.total - step) / rate if rate > 0 else 0.0
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(
                f"[{self.name}] step {step}/{self.total} {shown} | {rate:.2f} steps/s ETA {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def summary(self) -> str:
        if not self.history:
            return f"[{self.name}] no steps logged"
        last = self.history[-1]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step")
        elapsed = time.perf_counter() - self.start
        where = f"; metrics in {self.path}" if self.path else ""
        return f"[{self.name}] {int(last['step'])} steps in {elapsed:.1f}s; final: {shown}{where}"

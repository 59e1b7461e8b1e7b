"""What the alignment loops (`reward.py`, `dpo.py`, `ppo.py`, `grpo.py`) share: log-probabilities
of packed preference rows, the reference model (the adapter-disabled base, or a frozen copy for
full fine-tuning), the optimizer and learning-rate schedule, and a metrics log with progress.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ferrotune.config import TrainConfig
from ferrotune.train.loop import autocast_context, build_optimizer, learning_rate, resolve_precision
from ferrotune.train.preference_losses import entropy_from_logits, token_logps


def autocast(device: torch.device, precision: str = "auto") -> Any:
    """bf16 autocast on CUDA (precision "auto" or "bf16-mixed"), nothing (fp32) on CPU."""
    return autocast_context(device, resolve_precision(precision, device))


# ----------------------------------------------------------------------------------------------
# Log-probabilities of packed rows


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


def make_optimizer(trained: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of `trained` (the loop's own `build_optimizer`)."""
    return build_optimizer(trained, train)


def lr_at(step: int, train: TrainConfig) -> float:
    """The `[train]` schedule: warmup, then cosine / linear / constant over `train.steps`."""
    return learning_rate(step, train)


def cycle(epoch_batches: Callable[[int], Iterator[Any]], steps: int) -> Iterator[Any]:
    """`steps` items from epoch 0, 1, 2, ... of a data source (each epoch reshuffled by its number)."""
    done, epoch = 0, 0
    while done < steps:
        empty = True
        for item in epoch_batches(epoch):
            empty = False
            yield item
            done += 1
            if done == steps:
                return
        if empty:
            raise ValueError("the training data gives no batch")
        epoch += 1


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


# ----------------------------------------------------------------------------------------------
# Rollouts (PPO, GRPO): prompts + sampled responses as right-padded rows
#
# Per-token quantities live in RESPONSE coordinates (B, R): column k is the k-th response token,
# its log-prob read at row position prompt_len - 1 + k (labels are pre-shifted), with `mask` 1 on
# real response tokens. Everything is left-aligned, as GAE expects.

RewardFn = Callable[[list[list[int]], list[list[int]]], list[float]]


@dataclass
class Rollout:
    prompts: list[list[int]]
    responses: list[list[int]]  # sampled tokens, the stop token included when one was emitted
    input_ids: torch.Tensor  # (B, T) prompt + response, right-padded
    labels: torch.Tensor  # (B, T) response tokens, pre-shifted; -100 elsewhere
    position_ids: torch.Tensor  # (B, T)
    document_ids: torch.Tensor  # (B, T) 0 on tokens, -1 on padding
    gather_index: torch.Tensor  # (B, R) row position scoring response token k
    mask: torch.Tensor  # (B, R) float, 1 on response tokens

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout restricted to some rows (a minibatch)."""
        picked = rows.tolist()
        return Rollout(
            [self.prompts[i] for i in picked],
            [self.responses[i] for i in picked],
            self.input_ids[rows],
            self.labels[rows],
            self.position_ids[rows],
            self.document_ids[rows],
            self.gather_index[rows],
            self.mask[rows],
        )


def build_rollout(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> Rollout:
    batch = len(prompts)
    length = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    width = max(max(len(r) for r in responses), 1)
    ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    positions = torch.zeros((batch, length), dtype=torch.long)
    documents = torch.full((batch, length), -1, dtype=torch.int32)
    gather = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros((batch, width))
    for b, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        tokens = list(prompt) + list(response)
        n, p = len(tokens), len(prompt)
        ids[b, :n] = torch.tensor(tokens)
        positions[b, :n] = torch.arange(n)
        documents[b, :n] = 0
        if response:
            labels[b, p - 1 : n - 1] = torch.tensor(list(response))
            gather[b, : len(response)] = torch.arange(p - 1, n - 1)
            mask[b, : len(response)] = 1.0
    return Rollout(
        [list(p) for p in prompts],
        [list(r) for r in responses],
        ids.to(device),
        labels.to(device),
        positions.to(device),
        documents.to(device),
        gather.to(device),
        mask.to(device),
    )


def rollout_forward(
    model: nn.Module, rollout: Rollout, *, with_hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log-probs (B, R), entropies (B, R), hidden states (B, T, H) or None) of the responses."""
    kwargs = dict(position_ids=rollout.position_ids, document_ids=rollout.document_ids)
    hidden = None
    if with_hidden:
        hidden = model.hidden_states(rollout.input_ids, **kwargs)
        logits = model.lm_head(hidden)
    else:
        logits = model(rollout.input_ids, **kwargs)  # (B, T, V)
    per_token = token_logps(logits, rollout.labels).gather(1, rollout.gather_index)
    with torch.no_grad():
        picked = logits.gather(1, rollout.gather_index[..., None].expand(-1, -1, logits.shape[-1]))
        entropy = entropy_from_logits(picked)
    return per_token * rollout.mask, entropy * rollout.mask, hidden


def sample_responses(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    stop_tokens: Sequence[int],
    pad_id: int,
    seed: int,
) -> list[list[int]]:
    """Samples one response per prompt with the KV-cache generator; unlike `generate`'s output
    the stop token is kept, so the policy is also trained on when to stop."""
    from ferrotune.models.generate import Sampling, generate

    steps: list[torch.Tensor] = []
    generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=Sampling(temperature, top_k, top_p),
        stop_tokens=stop_tokens,
        pad_id=pad_id,
        seed=seed,
        on_step=lambda token: steps.append(token.detach().cpu()),
    )
    stops = set(stop_tokens)
    out = []
    for row in torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]:
        kept: list[int] = []
        for token in row:
            kept.append(token)
            if token in stops:
                break
        out.append(kept)
    return out


def reward_from_function(fn: Callable[[list[int], list[int]], float]) -> RewardFn:
    """A batch reward from a per-sample Python function fn(prompt_ids, response_ids) -> float."""
    return lambda prompts, responses: [float(fn(p, r)) for p, r in zip(prompts, responses, strict=True)]


def reward_from_model(
    reward_model: nn.Module, pad_id: int, *, adapter: str | None = None, restore: str | None = None
) -> RewardFn:
    """A batch reward from a `RewardModel` scoring prompt + response at its last token. With
    `adapter`, the reward model shares its decoder with the policy and that LoRA adapter is made
    active while scoring (then `restore` is made active again)."""

    @torch.no_grad()
    def score(prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        device = next(reward_model.parameters()).device
        rollout = build_rollout(prompts, responses, pad_id, device)
        if adapter is not None:
            from ferrotune.peft import set_active

            set_active(reward_model, adapter)
        try:
            with autocast(device):
                scores = reward_model(
                    rollout.input_ids,
                    position_ids=rollout.position_ids,
                    document_ids=rollout.document_ids,
                    num_documents=1,
                )
        finally:
            if adapter is not None and restore is not None:
                from ferrotune.peft import set_active

                set_active(reward_model, restore)
        return scores[:, 0].float().tolist()

    return score

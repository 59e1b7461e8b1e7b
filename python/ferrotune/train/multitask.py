"""Multi-task training over a mixture: per-task loss weights, per-task evaluation, and the set-up
of task-routed adapters (`ferrotune.peft.routed`) from a run config's `[multitask]` section.

Batches carry `task_ids` int64, (B, T) per token (-1 on padding) or (B,) per row, indexing the
task names in order (the prepared mixture's metadata, or `multitask.tasks`).

Loss. With λ_k the weight of task k (`multitask.loss_weights`, default 1), g(t) the task of
token t and the sums over the trained tokens of all micro-batches of the step:

    w_t = λ_{g(t)}                  (1 for a trained token without a task id)
    L   = Σ_t w_t · CE_t / Σ_t w_t

a weighted mean over loss tokens: with every λ_k = 1 it is the plain token mean, and scaling all
λ by a constant changes nothing. A task with λ = 2 counts each of its tokens twice.

Evaluation, per task k over the eval rows (tokens of task k only):

    eval/<k>/loss       Σ_{g(t)=k} CE_t / N_k                      (unweighted)
    eval/<k>/accuracy   share of task-k tokens whose argmax logit is the label
    eval/<k>/exact_match  share of the task's prompt/completion pairs whose greedy continuation
                        (KV cache, routed to task k) equals the completion (`multitask.exact_match`)

logged to metrics.jsonl and TensorBoard under those names, and printed with the run's summary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ferrotune.errors import ConfigError, FormatError
from ferrotune.train.losses import IGNORE_INDEX, token_cross_entropy_per_token

Batch = dict[str, torch.Tensor]
Example = tuple[list[int], list[int]]  # (prompt ids, completion ids without the stop token)


# ----------------------------------------------------------------------------------------------
# Routing and loss weights
# ----------------------------------------------------------------------------------------------


def is_routed(model: nn.Module) -> bool:
    """Whether `model` (or the module DDP wraps) routes by `task_ids`."""
    return bool(getattr(getattr(model, "module", model), "routes_tasks", False))


def routing_inputs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward keywords that route `batch`: `task_ids` for a routed model, else none."""
    if not is_routed(model):
        return {}
    if "task_ids" not in batch:
        raise ValueError("a routed model trains on batches with task_ids (a prepared mixture's rows)")
    return {"task_ids": batch["task_ids"]}


def task_weight_vector(tasks: Sequence[str], loss_weights: Mapping[str, float]) -> torch.Tensor:
    """λ (n_tasks,) in task order; a name that is not a task, or a negative weight, is an error."""
    unknown = sorted(set(loss_weights) - set(tasks))
    if unknown:
        raise ConfigError(f"multitask.loss_weights: {unknown} are not tasks (tasks: {list(tasks)})")
    bad = {k: v for k, v in loss_weights.items() if not (v >= 0 and math.isfinite(v))}
    if bad:
        raise ConfigError(f"multitask.loss_weights: weights must be finite and >= 0, got {bad}")
    return torch.tensor([float(loss_weights.get(t, 1.0)) for t in tasks], dtype=torch.float32)


def batch_task_ids(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) int64 task id per token (-1: none)."""
    labels = batch["labels"]
    if "task_ids" not in batch:
        raise ValueError("per-task loss weights and evaluation need batches with task_ids")
    ids = batch["task_ids"].to(torch.long)
    return ids[:, None].expand_as(labels) if ids.dim() == 1 else ids


def token_weights(batch: Mapping[str, torch.Tensor], task_weights: torch.Tensor) -> torch.Tensor:
    """w (B, T) float32: λ of each trained token's task, 1 for a trained token without a task,
    0 where labels are -100."""
    ids = batch_task_ids(batch).to(task_weights.device)
    trained = batch["labels"].to(task_weights.device) != IGNORE_INDEX
    weights = torch.where(ids >= 0, task_weights[ids.clamp(min=0)], torch.ones((), device=ids.device))
    return weights * trained


# ----------------------------------------------------------------------------------------------
# Evaluation per task
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_tasks(
    model: nn.Module,
    batches: Iterable[Batch],
    tasks: Sequence[str],
    device: torch.device,
    precision: str = "fp32",
    limit: int = 0,
    env: Any = None,
) -> dict[str, float]:
    """Per-task eval loss, token accuracy and token count (see the module docstring)."""
    from ferrotune.train import dist
    from ferrotune.train.loop import autocast_context

    n = len(tasks)
    loss_sum = torch.zeros(n, dtype=torch.float64, device=device)
    correct = torch.zeros(n, dtype=torch.float64, device=device)
    count = torch.zeros(n, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for k, batch in enumerate(batches):
        if limit and k >= limit:
            break
        on_device = {key: v.to(device) for key, v in batch.items()}
        with autocast_context(device, precision):
            logits = model(
                on_device["input_ids"],
                position_ids=on_device.get("position_ids"),
                document_ids=on_device.get("document_ids"),
                **routing_inputs(model, on_device),
            )  # (B, T, V)
        labels = on_device["labels"]
        ids = batch_task_ids(on_device)
        keep = (labels != IGNORE_INDEX) & (ids >= 0)  # (B, T)
        losses = token_cross_entropy_per_token(logits, labels).double()
        hits = (logits.argmax(-1) == labels).double()
        index = ids[keep]
        loss_sum.index_add_(0, index, losses[keep])
        correct.index_add_(0, index, hits[keep])
        count.index_add_(0, index, torch.ones_like(losses[keep]))
    model.train(was_training)
    if env is not None and env.distributed:
        loss_sum, correct, count = (dist.global_sum(t, env) for t in (loss_sum, correct, count))
    out: dict[str, float] = {}
    for k, task in enumerate(tasks):
        tokens = float(count[k])
        if tokens == 0:
            continue
        out[f"eval/{task}/loss"] = float(loss_sum[k]) / tokens
        out[f"eval/{task}/accuracy"] = float(correct[k]) / tokens
        out[f"eval/{task}/tokens"] = int(tokens)
    return out


@torch.no_grad()
def exact_match_by_task(
    model: nn.Module,
    sets: Mapping[str, Sequence[Example]],
    tasks: Sequence[str],
    *,
    stop_tokens: Sequence[int],
    pad_id: int,
    max_new_tokens: int,
    batch_size: int = 64,
    equal: Callable[[list[int], list[int]], bool] | None = None,
) -> dict[str, float]:
    """eval/<task>/exact_match: greedy continuation (KV cache) equals the completion, each
    prompt routed to its task when the model is routed."""
    from ferrotune.models.generate import generate

    equal = equal or (lambda out, want: out == want)
    out: dict[str, float] = {}
    routed = getattr(model, "module", model)
    for task, examples in sets.items():
        if task not in tasks:
            raise ConfigError(f"multitask.exact_match: {task!r} is not a task (tasks: {list(tasks)})")
        if not examples:
            continue
        hits = 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            if is_routed(model):
                routed.route(torch.full((len(chunk),), tasks.index(task), dtype=torch.long))
            outputs = generate(
                routed,
                [p for p, _ in chunk],
                max_new_tokens=max_new_tokens,
                stop_tokens=stop_tokens,
                pad_id=pad_id,
            )
            hits += sum(equal(o, want) for o, (_, want) in zip(outputs, chunk, strict=True))
        out[f"eval/{task}/exact_match"] = hits / len(examples)
    return out


def format_task_metrics(metrics: Mapping[str, Any]) -> list[str]:
    """One line per task: `task <name> | loss 0.1234 | accuracy 0.987 | exact_match 0.95`."""
    by_task: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval":
            by_task.setdefault(parts[1], {})[parts[2]] = value
    lines = []
    for task, values in by_task.items():
        shown = [
            f"{name} {values[name]:.4f}" if name == "loss" else f"{name} {values[name]:.3f}"
            for name in ("loss", "accuracy", "exact_match")
            if name in values
        ]
        lines.append(f"task {task} | " + " | ".join(shown))
    return lines


class TaskEvaluator:
    """The loop's `evaluator`: per-task metrics on the eval rows and exact match on the
    prompt/completion sets."""

    def __init__(
        self,
        tasks: Sequence[str],
        eval_batches: Any = None,  # a loop.RowBatches over the eval rows, or None
        exact_match_sets: Mapping[str, Sequence[Example]] | None = None,
        *,
        device: torch.device,
        precision: str = "fp32",
        limit: int = 0,
        env: Any = None,
        stop_tokens: Sequence[int] = (),
        pad_id: int = 0,
        max_new_tokens: int = 32,
        equal: Callable[[list[int], list[int]], bool] | None = None,
    ):
        self.tasks, self.eval_batches, self.sets = list(tasks), eval_batches, dict(exact_match_sets or {})
        self.device, self.precision, self.limit, self.env = device, precision, limit, env
        self.stop_tokens, self.pad_id, self.max_new_tokens, self.equal = (
            stop_tokens,
            pad_id,
            max_new_tokens,
            equal,
        )

    def __call__(self, model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.eval_batches is not None:
            out.update(
                evaluate_tasks(
                    model,
                    self.eval_batches.epoch(0),
                    self.tasks,
                    self.device,
                    self.precision,
                    self.limit,
                    self.env,
                )
            )
        if self.sets:  # every rank decodes (a sharded model needs all of them); the results agree
            out.update(
                exact_match_by_task(
                    model,
                    self.sets,
                    self.tasks,
                    stop_tokens=self.stop_tokens,
                    pad_id=self.pad_id,
                    max_new_tokens=self.max_new_tokens,
                    equal=self.equal,
                )
            )
        return out


# ----------------------------------------------------------------------------------------------
# From a run config
# ----------------------------------------------------------------------------------------------


def read_exact_match_set(path: str | Path, tokenizer: Any, limit: int = 0) -> list[Example]:
    """A prompt/completion JSONL: `{"prompt": str, "completion": str}` (encoded as is, without
    added special tokens: render any chat template into the prompt) or `{"prompt_ids": [...],
    "completion_ids": [...]}`."""
    examples: list[Example] = []
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ConfigError(f"multitask.exact_match: cannot read {file}: {err}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise FormatError(f"{where}: invalid JSON: {err}", str(file), f"line {number}") from None
        if "prompt_ids" in record:
            prompt, completion = record["prompt_ids"], record.get("completion_ids")
            if not (isinstance(prompt, list) and isinstance(completion, list)):
                raise FormatError(
                    f"{where}: prompt_ids and completion_ids must be lists", str(file), "completion_ids"
                )
            examples.append(([int(t) for t in prompt], [int(t) for t in completion]))
        elif isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
            encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
            examples.append((encode(record["prompt"]), encode(record["completion"])))
        else:
            raise FormatError(f"{where}: expected 'prompt' and 'completion' strings", str(file), "prompt")
        if limit and len(examples) >= limit:
            break
    return examples


def task_names_from_rows(rows: Any) -> list[str]:
    """Task names in index order from a prepared mixture (`PackedDataset.task_names`, from its
    manifest; also through a `Subset`), or [] when the data names none."""
    dataset = getattr(rows, "dataset", rows)
    names = getattr(dataset, "task_names", None)
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    manifest = getattr(dataset, "manifest", None)
    if isinstance(manifest, dict) and isinstance(manifest.get("task_names"), list):
        return [str(n) for n in manifest["task_names"]]
    return []


def multitask_enabled(config: Any) -> bool:
    """Whether the run config asks for anything of this module."""
    section = config.multitask
    return bool(section.routed or section.loss_weights or section.tasks or section.exact_match)


def resolve_tasks(config: Any, rows: Any) -> list[str]:
    """`multitask.tasks`, else the prepared data's task names; the two must agree when both exist."""
    found = task_names_from_rows(rows)
    named = list(config.multitask.tasks)
    if named and found and named != found:
        raise ConfigError(f"multitask.tasks {named} differ from the prepared data's tasks {found}")
    tasks = named or found
    if not tasks:
        raise ConfigError("multitask: no task names (set multitask.tasks, or train on a prepared mixture)")
    return tasks


def routed_task_config(config: Any) -> Any:
    """The per-task adapters' method config: `task_options` over the [peft] options for LoRA."""
    from ferrotune.peft import LoraConfig, PromptConfig, config_from_dict

    section = config.multitask
    if section.task_method == "lora":
        base = dict(config.peft.options) if config.peft.method in ("lora", "rslora") else {}
        options = {**base, **section.task_options}
        cfg = config_from_dict("lora", options, where="multitask.task_options")
        assert isinstance(cfg, LoraConfig)
        return cfg
    cfg = config_from_dict(
        "prompt", {"init": "random", **section.task_options}, where="multitask.task_options"
    )
    assert isinstance(cfg, PromptConfig)
    return cfg


def apply_multitask_peft(
    model: nn.Module, config: Any, tasks: Sequence[str], *, quiet: bool = False
) -> nn.Module:
    """`[peft]` as the shared adapter (named "shared") and, with `multitask.routed`, one adapter
    per task; returns the model to train."""
    import sys

    from ferrotune.peft import apply_peft, config_from_dict, trainable_parameters
    from ferrotune.peft.routed import SHARED_NAME, apply_routed

    if config.peft.method:
        if config.multitask.routed and config.peft.method not in ("lora", "rslora"):
            raise ConfigError(
                f"peft.method: the shared adapter of a routed run is LoRA, not {config.peft.method!r}"
            )
        model = apply_peft(model, config_from_dict(config.peft.method, config.peft.options), SHARED_NAME)
    if config.multitask.routed:
        model = apply_routed(model, tasks, routed_task_config(config))
    if not quiet and (config.peft.method or config.multitask.routed):
        kind = (
            f"routed {config.multitask.task_method} x {len(tasks)} tasks" if config.multitask.routed else ""
        )
        shared = f"shared {config.peft.method}" if config.peft.method else ""
        print(
            f"peft {' + '.join(p for p in (shared, kind) if p)}: {trainable_parameters(model)}",
            file=sys.stderr,
        )
    return model


def build_evaluator(
    config: Any,
    tasks: Sequence[str],
    eval_batches: Any,
    tokenizer: Any,
    stop_tokens: Sequence[int],
    pad_id: int,
    device: torch.device,
    precision: str,
    env: Any = None,
) -> TaskEvaluator:
    """The run's per-task evaluator: eval rows by task, and exact match on `multitask.exact_match`
    sets (text completions compared after decoding, surrounding whitespace ignored)."""
    section = config.multitask
    sets = {
        task: read_exact_match_set(path, tokenizer, section.exact_match_limit)
        for task, path in section.exact_match.items()
    }

    def same_text(out: list[int], want: list[int]) -> bool:
        return bool(tokenizer.decode(out).strip() == tokenizer.decode(want).strip())

    return TaskEvaluator(
        tasks,
        eval_batches,
        sets,
        device=device,
        precision=precision,
        limit=config.run.eval_batches,
        env=env,
        stop_tokens=stop_tokens,
        pad_id=pad_id,
        max_new_tokens=section.max_new_tokens,
        equal=same_text,
    )

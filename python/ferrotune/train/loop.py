"""The training loop shared by full fine-tuning, continued pretraining and SFT.

One optimizer step:
    N = trained tokens over all `grad_accum` micro-batches of the step
    for each micro-batch m:  backward( sum_t CE(m, t) / N )     -> gradients of the mean over N
    clip the global gradient norm to `max_grad_norm`; set lr(step); AdamW step

so a step with accumulation computes the same loss and gradients as one batch holding all of its
rows. Learning rate: linear warmup from 0 over `warmup_steps`, then cosine or linear decay to
`lr * min_lr_ratio` at the last step.

Checkpoints (every `save_every` steps) are folders `checkpoints/step-NNNNNN/` holding trainable
parameters, AdamW moments, RNG states and the data position, written under a temporary name and
renamed when complete. Resuming restores all of it, so the rest of the loss curve is the one the
uninterrupted run would have drawn. Nothing is pickled: tensors go to safetensors, the rest to JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ferrotune.config import Config, TrainConfig, to_dict
from ferrotune.errors import FormatError
from ferrotune.io import load_checkpoint, save_safetensors
from ferrotune.kernels._dispatch import triton_runs_on
from ferrotune.kernels.adamw import AdamW, local_shard
from ferrotune.train import dist
from ferrotune.train.losses import trained_tokens
from ferrotune.train.multitask import format_task_metrics, routing_inputs, token_weights

Batch = dict[str, torch.Tensor]
MODEL_INPUTS = ("input_ids", "position_ids", "document_ids")


# ----------------------------------------------------------------------------------------------
# Data: rows -> micro-batches, in a deterministic, resumable order
# ----------------------------------------------------------------------------------------------


def collate(rows: Sequence[Batch]) -> Batch:
    """Stacks per-row tensors (T,) into a batch (B, T): document ids int32, the rest int64."""
    return {
        key: torch.stack([row[key] for row in rows]).to(
            torch.int32 if key.endswith("document_ids") else torch.int64
        )
        for key in rows[0]
    }


class RowBatches:
    """Micro-batches over a sequence of packed rows (anything with len() and [i] giving a dict of
    (T,) tensors). Epoch e visits the rows in a permutation drawn from seed + e, so micro-batch
    number k is the same in every run, and `from_position(k)` resumes exactly there.

    Across `world_size` processes, the global micro-batch holds `batch_size * world_size` rows
    and rank r collates only its rows r, r+W, ... of it (`dist.rank_rows`): no row is read twice
    or skipped, and the ranks' micro-batches together are what one process would read."""

    def __init__(
        self,
        rows: Sequence[Batch],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.global_batch = batch_size * world_size
        if len(rows) < self.global_batch:
            raise ValueError(f"{len(rows)} rows cannot fill one micro-batch of {self.global_batch}")
        self.rows, self.batch_size, self.shuffle, self.seed = rows, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.local_rows = list(dist.rank_rows(self.global_batch, rank, world_size))

    def __len__(self) -> int:
        """Micro-batches per epoch (the incomplete last one is dropped)."""
        return len(self.rows) // self.global_batch

    def epoch(self, index: int) -> Iterator[Batch]:
        order = (
            torch.randperm(
                len(self.rows), generator=torch.Generator().manual_seed(self.seed + index)
            ).tolist()
            if self.shuffle
            else list(range(len(self.rows)))
        )
        for k in range(len(self)):
            batch = order[k * self.global_batch : (k + 1) * self.global_batch]
            yield collate([self.rows[batch[j]] for j in self.local_rows])

    def from_position(self, position: int) -> Iterator[Batch]:
        """Endless micro-batches, starting with number `position` (counted from the first epoch)."""
        epoch, skip = divmod(position, len(self))
        while True:
            for k, batch in enumerate(self.epoch(epoch)):
                if k >= skip:
                    yield batch
            epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """lr for optimizer step `step` (0-based): warmup then cosine / linear / constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - floor) * progress
    return cfg.lr


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; matrices decay, vectors (norms, biases) do not. On CUDA
    the step is `kernels.adamw.AdamW` (torch's state layout, one Triton pass over each group);
    `train.optimizer = "adamw8bit"` keeps both moments in 8 bits."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.optimizer == "adamw8bit":
        from ferrotune.train.optim8bit import AdamW8bit

        return AdamW8bit(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    if all(triton_runs_on(local_shard(p)) for _, p in named):  # CUDA: one Triton pass per group
        return AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_loss_sum(model: nn.Module, batch: Batch, task_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed token cross-entropy of one micro-batch already on the model's device (the model
    computes it from its hidden states: no (B, T, V) logits tensor). With `task_weights`
    (n_tasks,) each token's loss is weighted by its task's (ferrotune.train.multitask)."""
    extra = routing_inputs(model, batch)
    if task_weights is not None:
        extra["token_weights"] = token_weights(batch, task_weights)  # (B, T)
    return model(
        batch["input_ids"],
        position_ids=batch.get("position_ids"),
        document_ids=batch.get("document_ids"),
        labels=batch["labels"],
        **extra,
    )


def real_tokens(batch: Batch) -> int:
    """Tokens that are not padding (document id >= 0)."""
    if "document_ids" in batch:
        return int((batch["document_ids"] >= 0).sum())
    return batch["input_ids"].numel()


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Sequence[Batch],
    device: torch.device,
    precision: str = "fp32",
    env: dist.DistEnv | None = None,
    task_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Backward over all micro-batches, each loss divided by the step's total trained tokens
    (with `task_weights`: by the step's total token weight, so the loss is the weighted mean).
    Returns (mean loss over those tokens, detached; trained-token count).

    Across processes (`env`), the tokens and the loss are counted over all ranks, and each rank's
    loss is scaled by `dist.loss_scale` to undo DDP / FSDP gradient averaging."""
    total_tokens = int(sum(int(trained_tokens(mb["labels"])) for mb in micro_batches))
    scale = 1
    if env is not None and env.distributed:
        total_tokens, scale = int(dist.global_sum(total_tokens, env)), dist.loss_scale(env)
    normalizer: float = max(total_tokens, 1)
    if task_weights is not None:
        weight = float(sum(float(token_weights(mb, task_weights.cpu()).sum()) for mb in micro_batches))
        if env is not None and env.distributed:
            weight = float(dist.global_sum(torch.tensor(weight, dtype=torch.float64), env))
        normalizer, task_weights = max(weight, 1e-12), task_weights.to(device)
    loss_sum = torch.zeros((), device=device)
    for index, mb in enumerate(micro_batches):
        on_device = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
        with dist.gradient_sync(model, index == len(micro_batches) - 1):
            with autocast_context(device, precision):
                micro_loss = batch_loss_sum(model, on_device, task_weights)
            (micro_loss * scale / normalizer).backward()
        loss_sum += micro_loss.detach()
    if env is not None and env.distributed:
        loss_sum = dist.global_sum(loss_sum, env).float()
    return loss_sum / normalizer, total_tokens


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterator[Batch],
    device: torch.device,
    precision: str,
    limit: int = 0,
    env: dist.DistEnv | None = None,
) -> dict[str, float]:
    """Token-mean cross-entropy over the eval batches and its perplexity exp(loss) (over all
    ranks' rows with `env`)."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = torch.zeros((), device=device, dtype=torch.float64), 0
    for k, batch in enumerate(batches):
        if limit and k >= limit:
            break
        on_device = {key: v.to(device) for key, v in batch.items()}
        with autocast_context(device, precision):
            loss_sum += batch_loss_sum(model, on_device).double()
        tokens += int(trained_tokens(batch["labels"]))
    model.train(was_training)
    if env is not None and env.distributed:
        loss_sum, tokens = dist.global_sum(loss_sum, env), int(dist.global_sum(tokens, env))
    loss = float(loss_sum) / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": tokens}


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_training_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, Any]
) -> Path:
    """Writes `folder` atomically: everything goes to a temporary sibling first, then one rename."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(trainable_state(model), tmp / "trainable.safetensors")

    names = {id(p): n for n, p in model.named_parameters()}
    state = optimizer.state_dict()
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        name = names[id(ordered[index])]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    save_safetensors(tensors, tmp / "optimizer.safetensors")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_safetensors(rng, tmp / "rng.safetensors")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    meta = {
        **progress,
        "param_groups": groups,
        "param_names": [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups],
        "optimizer_scalars": scalars,
    }
    (tmp / "progress.json").write_text(json.dumps(meta, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run (temporary folders are ignored)."""
    found = sorted((run_dir / "checkpoints").glob("step-*"))
    complete = [p for p in found if (p / "progress.json").exists()]
    return complete[-1] if complete else None


def load_training_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restores parameters, optimizer moments and RNG; returns the saved progress dict."""
    progress = json.loads((folder / "progress.json").read_text())
    params = dict(model.named_parameters())
    trainable = load_checkpoint(folder / "trainable.safetensors")
    with torch.no_grad():
        for name in trainable:
            if name not in params:
                raise FormatError(
                    f"{folder}: parameter {name!r} is not in the model", path=str(folder), place=name
                )
            params[name].copy_(trainable[name])
    saved = load_checkpoint(folder / "optimizer.safetensors")
    names = {id(p): n for n, p in params.items()}
    current = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if current != progress["param_names"]:
        raise FormatError(
            f"{folder}: optimizer parameters differ from the model's trainable ones", path=str(folder)
        )
    state: dict[int, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    index = 0
    for group_names, hyper in zip(current, progress["param_groups"], strict=True):
        groups.append(dict(hyper, params=list(range(index, index + len(group_names)))))
        for name in group_names:
            entry: dict[str, Any] = {
                k.split("/", 1)[1]: saved[k].clone() for k in saved if k.split("/", 1)[0] == name
            }
            entry.update(progress["optimizer_scalars"].get(name, {}))
            if entry:
                state[index] = entry
            index += 1
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    rng = load_checkpoint(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch"].clone())
    if torch.cuda.is_available():
        cuda_states = [rng[k].clone() for k in sorted(k for k in rng if k.startswith("cuda"))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    return progress


# ----------------------------------------------------------------------------------------------
# Logs
# ----------------------------------------------------------------------------------------------


def memory_in_use(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB rss"


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class RunLog:
    """metrics.jsonl (one line per step and per evaluation), TensorBoard when installed, and a
    loss-curve PNG at the end when matplotlib is installed."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        kept: list[str] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                    kept.append(line)
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)  # a resumed run forgets the steps after its checkpoint
        self.file = self.path.open("a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()

    def plot(self, png: Path) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)
        return png


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # per step, this run's steps only
    eval: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    run_dir: Path | None = None
    resumed_from: int = 0
    model: nn.Module | None = None  # as trained: DDP-wrapped or FSDP-sharded under torchrun


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return precision


def train_loop(
    model: nn.Module,
    config: Config,
    train_batches: RowBatches,
    eval_batches: RowBatches | None = None,
    *,
    device: torch.device | None = None,
    on_step: Callable[[int, float], None] | None = None,
    quiet: bool = False,
    env: dist.DistEnv | None = None,
    task_weights: torch.Tensor | None = None,
    evaluator: Callable[[nn.Module], dict[str, float]] | None = None,
) -> TrainResult:
    """Trains `model` (already on `device`) for `config.train.steps` optimizer steps.
    Writes metrics, checkpoints and the curve under `config.run.output_dir`; resumes from its
    latest checkpoint when `config.run.resume`. `on_step(step, loss)` runs after each step.

    Under torchrun (`env` from `dist.init_distributed`, `config.train.strategy` "ddp" or "fsdp")
    the model is wrapped here, each rank reads its rows (`train_batches` built with the rank and
    world size), checkpoints are sharded (`dist.save_sharded`) and only rank 0 logs.

    Multi-task (ferrotune.train.multitask): `task_weights` (n_tasks,) weighs each token's loss by
    its task; `evaluator(model)` adds metrics (per-task loss, accuracy, exact match) to each
    evaluation, logged as `eval/<task>/<metric>`."""
    cfg, run = config.train, config.run
    env = env if env is not None else dist.DistEnv()
    device = device or next(model.parameters()).device
    precision = resolve_precision(cfg.precision, device)
    if train_batches.world_size != env.world_size:
        raise ValueError(
            f"train_batches split over {train_batches.world_size} ranks, the run has {env.world_size}"
        )
    model = dist.wrap_for_training(model, env, cfg, precision)
    quiet = quiet or not env.is_main
    run_dir = Path(run.output_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
    dist.barrier(env)
    torch.manual_seed(config.seed)

    optimizer = build_optimizer(model, cfg)
    start_step, position, tokens_seen = 0, 0, 0
    if run.resume and (found := latest_checkpoint(run_dir)) is not None:
        if dist.is_sharded_checkpoint(found):
            progress = dist.load_sharded(found, model, env, optimizer)
        else:
            progress = load_training_checkpoint(found, dist.unwrap_for_plain_checkpoint(model), optimizer)
        start_step, position, tokens_seen = progress["step"], progress["data_position"], progress["tokens"]
        if not quiet:
            print(f"resumed from {found} (step {start_step})", file=sys.stderr)
    log = RunLog(run_dir, start_step, run.tensorboard) if env.is_main else None
    model.train()
    stream = train_batches.from_position(position)

    def say(text: str) -> None:
        if not quiet:
            print(text, file=sys.stderr, flush=True)

    losses: list[float] = []
    pending: list[tuple[int, torch.Tensor, float, int, torch.Tensor]] = []  # read back at log steps

    def flush(rate: float | None) -> None:
        """Moves the pending per-step values to the host (one sync per log interval) and logs them."""
        for s, loss_t, lr_s, tok, gn in pending:
            value = float(loss_t)
            losses.append(value)
            record = {"step": s, "loss": value, "lr": lr_s, "tokens": tok, "grad_norm": float(gn)}
            if log is not None:
                log.write(record if rate is None else {**record, "tokens_per_s": rate})
            if on_step is not None:
                on_step(s, value)
        pending.clear()

    started = time.perf_counter()
    window_start, window_tokens = started, 0
    eval_result: dict[str, float] = {}
    for step in range(start_step, cfg.steps):
        micro = [next(stream) for _ in range(cfg.grad_accum)]
        position += cfg.grad_accum
        step_tokens = sum(real_tokens(mb) for mb in micro)
        loss, _ = accumulate_gradients(model, micro, device, precision, env, task_weights)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if cfg.max_grad_norm > 0:
            grad_norm = dist.clip_grad_norm(params, cfg.max_grad_norm)
        else:
            grad_norm = torch.zeros(())
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_tokens = int(dist.global_sum(step_tokens, env)) if env.distributed else step_tokens
        tokens_seen += step_tokens
        window_tokens += step_tokens
        pending.append((step + 1, loss, lr, step_tokens, grad_norm))
        done = step + 1

        last = done == cfg.steps
        if done % max(run.log_every, 1) == 0 or last:
            now = time.perf_counter()
            rate = window_tokens / max(now - window_start, 1e-9)
            flush(rate)
            per_step = (now - started) / (done - start_step)
            say(
                f"step {done}/{cfg.steps} | loss {losses[-1]:.4f} | lr {lr:.2e} | {rate / 1000:.1f}k tok/s"
                f" | ETA {format_seconds(per_step * (cfg.steps - done))} | mem {memory_in_use(device)}"
            )
            window_start, window_tokens = now, 0
        has_eval = eval_batches is not None or evaluator is not None
        if has_eval and ((run.eval_every and done % run.eval_every == 0) or last):
            eval_result = {}
            if eval_batches is not None:
                eval_result = evaluate(model, eval_batches.epoch(0), device, precision, run.eval_batches, env)
            if evaluator is not None:
                eval_result.update(evaluator(model))
            if log is not None:
                log.write({"step": done, **eval_result})
            if "eval_loss" in eval_result:
                say(
                    f"eval at step {done} | loss {eval_result['eval_loss']:.4f} | ppl {eval_result['eval_ppl']:.2f}"
                )
            for line in format_task_metrics(eval_result):
                say(f"eval at step {done} | {line}")
        if run.save_every and done % run.save_every == 0 and not last:
            flush(None)  # the log is complete up to the checkpoint
            if log is not None:
                log.file.flush()
            folder = run_dir / "checkpoints" / f"step-{done:06d}"
            progress = {"step": done, "data_position": position, "tokens": tokens_seen}
            if env.distributed:
                dist.save_sharded(folder, model, env, optimizer, progress)
            else:
                save_training_checkpoint(folder, model, optimizer, progress)
            if env.is_main:
                for old in sorted((run_dir / "checkpoints").glob("step-*"))[: -max(run.keep_checkpoints, 1)]:
                    shutil.rmtree(old, ignore_errors=True)
    if log is not None:
        log.close()
        if run.plot:
            log.plot(run_dir / "loss.png")
    return TrainResult(
        steps=cfg.steps,
        losses=losses,
        eval=eval_result,
        tokens=tokens_seen,
        seconds=time.perf_counter() - started,
        run_dir=run_dir,
        resumed_from=start_step,
        model=model,
    )

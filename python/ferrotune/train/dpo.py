"""Direct preference optimisation and its family, one loop selected by `loss_type`:

    dpo    -log σ(β[(log π_θ(y_w) - log π_ref(y_w)) - (log π_θ(y_l) - log π_ref(y_l))])
           with label_smoothing ε > 0: conservative DPO, -(1-ε) log σ(h) - ε log σ(-h)
    ipo    ((Δ_w - Δ_l) - 1/(2β))² on length-averaged log-ratios Δ
    simpo  -log σ(β/|y_w| log π_θ(y_w) - β/|y_l| log π_θ(y_l) - γ)            (no reference)
    orpo   NLL(y_w) - λ log σ(log odds(y_w) - log odds(y_l))                   (no reference)
    kto    λ_D(1 - σ(β(r - z₀))) for chosen, λ_U(1 - σ(β(z₀ - r))) for rejected, z₀ from
           mismatched prompt/completion documents

The formulas live in `preference_losses.py`; this file feeds them. Chosen and rejected rows of a
packed batch (several pairs per row, pairs side by side) run in one forward pass; per-pair sums
of log-probabilities follow `document_ids`.

The reference π_ref is the model with its adapters disabled (PEFT: no second copy), or for full
fine-tuning a frozen copy taken before training. With `reference_cache` set, the reference
log-probabilities of every pair are computed once, before training, and stored in a safetensors
file (reused on the next run when it matches the data); training then needs no reference model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ferrotune.config import DPOConfig, TrainConfig
from ferrotune.errors import ConfigError, FormatError
from ferrotune.io import load_checkpoint, save_safetensors
from ferrotune.train import preference_losses as losses
from ferrotune.train.alignment import (
    MetricsLog,
    autocast,
    cycle,
    frozen_copy,
    has_adapters,
    lr_at,
    make_optimizer,
    optimizer_step,
    reference_model,
)
from ferrotune.train.preference_data import (
    PreferenceData,
    PreparedPreferences,
    source_batches,
)
from ferrotune.train.preference_losses import document_logps, token_logps

LOSS_TYPES: tuple[str, ...] = ("dpo", "ipo", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")


def check_config(method: DPOConfig) -> None:
    """Range checks that the type system cannot express; errors name the key."""
    if method.loss_type not in LOSS_TYPES:
        raise ConfigError(f"method.dpo.loss_type: {method.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if method.beta <= 0:
        raise ConfigError(f"method.dpo.beta: must be > 0, got {method.beta}")
    if not 0.0 <= method.label_smoothing < 0.5:
        raise ConfigError(f"method.dpo.label_smoothing: must be in [0, 0.5), got {method.label_smoothing}")


def needs_reference(method: DPOConfig) -> bool:
    return method.loss_type not in REFERENCE_FREE


# ----------------------------------------------------------------------------------------------
# Log-probabilities of a packed preference batch


def batch_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], sides: Sequence[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-document (log-prob sum, token count) of the given sides, each (B_side, D_side), from ONE
    forward pass over the sides' rows stacked along the batch (all rows have the same length)."""
    stacked = {
        name: torch.cat([batch[f"{side}_{name}"] for side in sides])
        for name in ("input_ids", "labels", "position_ids", "document_ids")
    }
    logits = model(
        stacked["input_ids"], position_ids=stacked["position_ids"], document_ids=stacked["document_ids"]
    )
    width = max(_pair_index(batch, side).shape[1] for side in sides)
    sums, counts = document_logps(
        token_logps(logits, stacked["labels"]), stacked["labels"], stacked["document_ids"], width
    )
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    start = 0
    for side in sides:
        rows = batch[f"{side}_input_ids"].shape[0]
        d = _pair_index(batch, side).shape[1]
        out[side] = (sums[start : start + rows, :d], counts[start : start + rows, :d])
        start += rows
    return out


def _pair_index(batch: dict[str, torch.Tensor], side: str) -> torch.Tensor:
    """(B, D): the pair each document of the side's rows belongs to, -1 for none."""
    return batch["kl_pair_index" if side == "kl" else "pair_index"]


def flatten_pairs(batch: dict[str, torch.Tensor], side: str, values: torch.Tensor) -> torch.Tensor:
    """(B, D) per-document values -> (N,) for the documents present, in row-major order."""
    index = _pair_index(batch, side)
    return values[:, : index.shape[1]][index >= 0]


def pair_ids(batch: dict[str, torch.Tensor], side: str) -> torch.Tensor:
    """(N,) dataset indices of the documents present, in the order of `flatten_pairs`."""
    index = _pair_index(batch, side)
    return index[index >= 0]


# ----------------------------------------------------------------------------------------------
# The reference log-probability cache


def pairs_fingerprint(pairs: PreferenceData) -> str:
    """A hash of the token ids of every pair (of a prepared folder: of its manifest), stored with
    the cache to detect stale files."""
    digest = hashlib.sha256()
    if isinstance(pairs, PreparedPreferences):
        digest.update(pairs.fingerprint().encode())
        return digest.hexdigest()
    for p in pairs:
        for part in (p.prompt, p.chosen, p.rejected):
            digest.update(len(part).to_bytes(4, "little"))
            digest.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in part))
    return digest.hexdigest()


@torch.no_grad()
def compute_reference_logps(
    reference: nn.Module,
    pairs: PreferenceData,
    *,
    batch_size: int,
    seq_len: int,
    pad_id: int,
    with_mismatched: bool = False,
) -> dict[str, torch.Tensor]:
    """Reference log-prob sums of every pair's chosen and rejected completion (and of its
    mismatched document for KTO), indexed by pair: {"chosen": (N,), "rejected": (N,), "kl"?: (N,)}."""
    device = next(reference.parameters()).device
    sides = ("chosen", "rejected", "kl") if with_mismatched else ("chosen", "rejected")
    out = {side: torch.zeros(len(pairs), dtype=torch.float32) for side in sides}
    seen = torch.zeros(len(pairs), dtype=torch.bool)
    for batch in source_batches(
        pairs,
        batch_size=batch_size,
        seq_len=seq_len,
        pad_id=pad_id,
        shuffle=False,
        with_mismatched=with_mismatched,
    ):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device):
            logps = batch_logps(reference, batch, sides)
        for side in sides:
            ids = pair_ids(batch, side).cpu()
            out[side][ids] = flatten_pairs(batch, side, logps[side][0]).float().cpu()
            if side == "chosen":
                seen[ids] = True
    if not bool(seen.all()):
        raise RuntimeError("reference pass missed some pairs")  # a packing bug, never user input
    return out


def load_or_compute_reference(
    path: str | os.PathLike[str],
    reference: nn.Module,
    pairs: PreferenceData,
    *,
    batch_size: int,
    seq_len: int,
    pad_id: int,
    with_mismatched: bool,
) -> dict[str, torch.Tensor]:
    """Reads the cache at `path` when it was made from these pairs; otherwise computes the
    reference log-probs once and writes them there (atomically)."""
    path = Path(path)
    fingerprint = pairs_fingerprint(pairs)
    wanted = {"chosen", "rejected"} | ({"kl"} if with_mismatched else set())
    if path.exists():
        cached = load_checkpoint(path)
        if cached.metadata().get("pairs_sha256") == fingerprint and wanted <= set(cached):
            return {k: cached[k].clone() for k in wanted}
        if cached.metadata().get("pairs_sha256") not in (None, fingerprint):
            raise FormatError(
                f"{path}: reference cache was computed from different preference data; delete it to recompute",
                path=str(path),
                place="metadata.pairs_sha256",
            )
    values = compute_reference_logps(
        reference,
        pairs,
        batch_size=batch_size,
        seq_len=seq_len,
        pad_id=pad_id,
        with_mismatched=with_mismatched,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(values, path, {"format": "pt", "pairs_sha256": fingerprint, "pairs": str(len(pairs))})
    return values


# ----------------------------------------------------------------------------------------------
# One loss over a batch


def preference_loss(
    method: DPOConfig,
    policy: dict[str, tuple[torch.Tensor, torch.Tensor]],
    reference: dict[str, torch.Tensor] | None,
    batch: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured loss per pair (N,) and its metrics (means over the pairs). `policy[side]` = (sums, counts) per
    document (B, D); `reference[side]` = the reference sums flattened to (N,)."""
    pc = flatten_pairs(batch, "chosen", policy["chosen"][0])
    pr = flatten_pairs(batch, "rejected", policy["rejected"][0])
    nc = flatten_pairs(batch, "chosen", policy["chosen"][1]).clamp(min=1)
    nr = flatten_pairs(batch, "rejected", policy["rejected"][1]).clamp(min=1)
    kind = method.loss_type
    if kind == "dpo":
        assert reference is not None
        per_pair, r_w, r_l = losses.dpo_loss(
            pc, pr, reference["chosen"], reference["rejected"], method.beta, method.label_smoothing
        )
    elif kind == "ipo":
        assert reference is not None
        per_pair, r_w, r_l = losses.ipo_loss(
            pc / nc, pr / nr, reference["chosen"] / nc, reference["rejected"] / nr, method.beta
        )
    elif kind == "simpo":
        per_pair, r_w, r_l = losses.simpo_loss(
            pc / nc, pr / nr, method.beta, method.simpo_gamma, method.label_smoothing
        )
    elif kind == "orpo":
        per_pair, r_w, r_l = losses.orpo_loss(pc / nc, pr / nr, -pc / nc, method.orpo_lambda)
    else:  # kto: chosen completions are desirable, rejected ones undesirable
        assert reference is not None
        kl_policy = flatten_pairs(batch, "kl", policy["kl"][0])
        z0 = losses.kto_kl_estimate(kl_policy, reference["kl"])
        policy_all = torch.cat([pc, pr])
        reference_all = torch.cat([reference["chosen"], reference["rejected"]])
        desirable = torch.cat([torch.ones_like(pc, dtype=torch.bool), torch.zeros_like(pr, dtype=torch.bool)])
        per_doc, rewards = losses.kto_loss(
            policy_all,
            reference_all,
            desirable,
            z0,
            method.beta,
            method.kto_desirable_weight,
            method.kto_undesirable_weight,
        )
        per_pair = per_doc.view(2, -1).sum(0)
        r_w, r_l = rewards.view(2, -1)
    metrics = {
        "reward_chosen": float(r_w.mean()),
        "reward_rejected": float(r_l.mean()),
        "reward_margin": float((r_w - r_l).mean()),
        "reward_accuracy": float((r_w > r_l).float().mean()),
        "logp_margin": float((pc - pr).detach().mean()),
    }
    if kind == "kto":
        metrics["kl"] = float(z0)
    return per_pair, metrics


# ----------------------------------------------------------------------------------------------
# The loop


def train_preference(
    model: nn.Module,
    pairs: PreferenceData,
    method: DPOConfig,
    train: TrainConfig,
    *,
    seq_len: int,
    pad_id: int,
    reference: nn.Module | None = None,
    run_dir: str | Path | None = None,
    log_every: int = 10,
    seed: int = 0,
    quiet: bool = False,
) -> list[dict[str, float]]:
    """Trains the trainable parameters of `model` (a causal LM, with or without adapters) on the
    pairs with `method.loss_type`, for `train.steps` optimizer steps of `train.grad_accum`
    micro-batches of `train.batch_size` packed rows; the loss is the mean over the step's pairs.
    The reference is `reference` if given, else the model with its adapters disabled, else (full
    fine-tuning) a frozen copy, unless cached log-probs make it unnecessary. Returns the metrics."""
    check_config(method)
    device = next(model.parameters()).device
    kto = method.loss_type == "kto"
    sides = ("chosen", "rejected", "kl") if kto else ("chosen", "rejected")
    with_reference = needs_reference(method)

    cached: dict[str, torch.Tensor] | None = None
    if with_reference and reference is None and not has_adapters(model) and not method.reference_cache:
        reference = frozen_copy(model)
    if with_reference and method.reference_cache:
        # Before the first step a fully fine-tuned model IS its reference: no copy is needed.
        initial = reference if reference is not None or has_adapters(model) else model
        with reference_model(model, initial) as ref:
            was_training = ref.training
            ref.eval()
            cached = load_or_compute_reference(
                method.reference_cache,
                ref,
                pairs,
                batch_size=train.batch_size,
                seq_len=seq_len,
                pad_id=pad_id,
                with_mismatched=kto,
            )
            ref.train(was_training)
        cached = {k: v.to(device) for k, v in cached.items()}

    optimizer = make_optimizer(model, train)
    params = [p for p in model.parameters() if p.requires_grad]
    log = MetricsLog(run_dir, train.steps, method.loss_type, quiet)
    micro_batches = cycle(
        lambda epoch: source_batches(
            pairs,
            batch_size=train.batch_size,
            seq_len=seq_len,
            pad_id=pad_id,
            seed=seed,
            epoch=epoch,
            with_mismatched=kto,
        ),
        train.steps * train.grad_accum,
    )
    model.train()
    for step in range(train.steps):
        group = [{k: v.to(device) for k, v in next(micro_batches).items()} for _ in range(train.grad_accum)]
        total_pairs = sum(int((b["pair_index"] >= 0).sum()) for b in group)
        loss_sum, sums = 0.0, {}
        for batch in group:
            ref_values = None
            if with_reference:
                if cached is not None:
                    ref_values = {side: cached[side][pair_ids(batch, side)] for side in sides}
                else:
                    with reference_model(model, reference) as ref, autocast(device, train.precision):
                        ref_logps = batch_logps(ref, batch, sides)
                    ref_values = {
                        side: flatten_pairs(batch, side, ref_logps[side][0]).float() for side in sides
                    }
            with autocast(device, train.precision):
                policy = batch_logps(model, batch, sides)
            per_pair, metrics = preference_loss(method, policy, ref_values, batch)
            (per_pair.sum() / total_pairs).backward()
            pairs_here = per_pair.shape[0]
            loss_sum += float(per_pair.detach().sum())
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value * pairs_here
        lr = lr_at(step, train)
        grad_norm = optimizer_step(optimizer, params, lr, train.max_grad_norm)
        if (step + 1) % log_every == 0 or step + 1 == train.steps:
            averaged = {k: v / total_pairs for k, v in sums.items()}
            log.log(step + 1, loss=loss_sum / total_pairs, lr=lr, grad_norm=grad_norm, **averaged)
    if not quiet:
        print(log.summary())
    return log.history


@torch.no_grad()
def logp_margin(
    model: nn.Module, pairs: PreferenceData, *, batch_size: int, seq_len: int, pad_id: int
) -> float:
    """Mean over pairs of log π(y_w|x) - log π(y_l|x): what every member of the family pushes up."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gaps = []
    for batch in source_batches(pairs, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        logps = batch_logps(model, batch, ("chosen", "rejected"))
        gaps.append(
            flatten_pairs(batch, "chosen", logps["chosen"][0])
            - flatten_pairs(batch, "rejected", logps["rejected"][0])
        )
    model.train(was_training)
    return float(torch.cat(gaps).mean())

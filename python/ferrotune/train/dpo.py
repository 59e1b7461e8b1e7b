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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ferrotune.errors import ConfigError, FormatError
from ferrotune.io import load_checkpoint, save_safetensors
from ferrotune.train import preference_losses as losses
from ferrotune.train.alignment import (
    MetricsLog,
    autocast,
    frozen_copy,
    has_adapters,
    learning_rate,
    make_optimizer,
    optimizer_step,
    reference_model,
)
from ferrotune.train.preference_data import (
    PreferencePair,
    pack_pairs,
    preference_batches,
)
from ferrotune.train.preference_losses import document_logps, token_logps

LossType = Literal["dpo", "ipo", "simpo", "orpo", "kto"]
LOSS_TYPES: tuple[str, ...] = ("dpo", "ipo", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class DPOConfig:
    """The `[dpo]` section. `beta` is DPO's β, IPO's τ, SimPO's β and KTO's β; ORPO uses `orpo_lambda`."""

    loss_type: LossType = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO (and SimPO) when > 0
    simpo_gamma: float = 0.5  # SimPO's target reward margin γ
    orpo_lambda: float = 0.1  # ORPO's weight λ of the odds-ratio term
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    reference_cache: str = ""  # safetensors file of reference log-probs; "" = compute every step
    epochs: int = 1
    batch_size: int = 8  # packed rows per side per step
    seq_len: int = 512
    lr: float = 5e-7
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"dpo.loss_type: {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE


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


def pairs_fingerprint(pairs: Sequence[PreferencePair]) -> str:
    """A hash of the token ids of every pair, stored with the cache to detect stale files."""
    digest = hashlib.sha256()
    for p in pairs:
        for part in (p.prompt, p.chosen, p.rejected):
            digest.update(len(part).to_bytes(4, "little"))
            digest.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in part))
    return digest.hexdigest()


@torch.no_grad()
def compute_reference_logps(
    reference: nn.Module,
    pairs: Sequence[PreferencePair],
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
    for batch in preference_batches(
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
    pairs: Sequence[PreferencePair],
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
    config: DPOConfig,
    policy: dict[str, tuple[torch.Tensor, torch.Tensor]],
    reference: dict[str, torch.Tensor] | None,
    batch: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured loss (mean over pairs) and its metrics. `policy[side]` = (sums, counts) per
    document (B, D); `reference[side]` = the reference sums flattened to (N,)."""
    pc = flatten_pairs(batch, "chosen", policy["chosen"][0])
    pr = flatten_pairs(batch, "rejected", policy["rejected"][0])
    nc = flatten_pairs(batch, "chosen", policy["chosen"][1]).clamp(min=1)
    nr = flatten_pairs(batch, "rejected", policy["rejected"][1]).clamp(min=1)
    kind = config.loss_type
    if kind == "dpo":
        assert reference is not None
        per_pair, r_w, r_l = losses.dpo_loss(
            pc, pr, reference["chosen"], reference["rejected"], config.beta, config.label_smoothing
        )
    elif kind == "ipo":
        assert reference is not None
        per_pair, r_w, r_l = losses.ipo_loss(
            pc / nc, pr / nr, reference["chosen"] / nc, reference["rejected"] / nr, config.beta
        )
    elif kind == "simpo":
        per_pair, r_w, r_l = losses.simpo_loss(
            pc / nc, pr / nr, config.beta, config.simpo_gamma, config.label_smoothing
        )
    elif kind == "orpo":
        per_pair, r_w, r_l = losses.orpo_loss(pc / nc, pr / nr, -pc / nc, config.orpo_lambda)
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
            config.beta,
            config.kto_desirable_weight,
            config.kto_undesirable_weight,
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
    return per_pair.mean(), metrics


# ----------------------------------------------------------------------------------------------
# The loop


def train_preference(
    model: nn.Module,
    pairs: list[PreferencePair],
    config: DPOConfig,
    *,
    pad_id: int,
    reference: nn.Module | None = None,
    run_dir: str | Path | None = None,
    quiet: bool = False,
) -> list[dict[str, float]]:
    """Trains the trainable parameters of `model` (a causal LM, with or without adapters) on the
    pairs with the configured loss. The reference is `reference` if given, else the model with its
    adapters disabled, else (full fine-tuning) a frozen copy, unless cached log-probs make it
    unnecessary. Returns the logged metrics."""
    device = next(model.parameters()).device
    kto = config.loss_type == "kto"
    sides = ("chosen", "rejected", "kl") if kto else ("chosen", "rejected")

    cached: dict[str, torch.Tensor] | None = None
    if (
        config.needs_reference
        and reference is None
        and not has_adapters(model)
        and not config.reference_cache
    ):
        reference = frozen_copy(model)
    if config.needs_reference and config.reference_cache:
        # Before the first step a fully fine-tuned model IS its reference: no copy is needed.
        initial = reference if reference is not None or has_adapters(model) else model
        with reference_model(model, initial) as ref:
            was_training = ref.training
            ref.eval()
            cached = load_or_compute_reference(
                config.reference_cache,
                ref,
                pairs,
                batch_size=config.batch_size,
                seq_len=config.seq_len,
                pad_id=pad_id,
                with_mismatched=kto,
            )
            ref.train(was_training)
        cached = {k: v.to(device) for k, v in cached.items()}

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config.lr, config.weight_decay)
    total = -(-len(pack_pairs(pairs, config.seq_len)) // config.batch_size) * config.epochs
    log = MetricsLog(run_dir, total, config.loss_type, quiet)
    model.train()
    step = 0
    for epoch in range(config.epochs):
        for batch in preference_batches(
            pairs,
            batch_size=config.batch_size,
            seq_len=config.seq_len,
            pad_id=pad_id,
            seed=config.seed,
            epoch=epoch,
            with_mismatched=kto,
        ):
            batch = {k: v.to(device) for k, v in batch.items()}
            ref_values = None
            if config.needs_reference:
                if cached is not None:
                    ref_values = {side: cached[side][pair_ids(batch, side)] for side in sides}
                else:
                    with reference_model(model, reference) as ref, autocast(device):
                        ref_logps = batch_logps(ref, batch, sides)
                    ref_values = {
                        side: flatten_pairs(batch, side, ref_logps[side][0]).float() for side in sides
                    }
            with autocast(device):
                policy = batch_logps(model, batch, sides)
            loss, metrics = preference_loss(config, policy, ref_values, batch)
            loss.backward()
            lr = learning_rate(step, total, config.lr, config.warmup_steps)
            grad_norm = optimizer_step(optimizer, params, lr, config.max_grad_norm)
            step += 1
            if step % config.log_every == 0 or step == total:
                log.log(step, loss=float(loss.detach()), lr=lr, grad_norm=grad_norm, **metrics)
    if not quiet:
        print(log.summary())
    return log.history


@torch.no_grad()
def logp_margin(
    model: nn.Module, pairs: list[PreferencePair], *, batch_size: int, seq_len: int, pad_id: int
) -> float:
    """Mean over pairs of log π(y_w|x) - log π(y_l|x): what every member of the family pushes up."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gaps = []
    for batch in preference_batches(
        pairs, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id, shuffle=False
    ):
        batch = {k: v.to(device) for k, v in batch.items()}
        logps = batch_logps(model, batch, ("chosen", "rejected"))
        gaps.append(
            flatten_pairs(batch, "chosen", logps["chosen"][0])
            - flatten_pairs(batch, "rejected", logps["rejected"][0])
        )
    model.train(was_training)
    return float(torch.cat(gaps).mean())

"""GRPO (Shao et al. 2024, DeepSeekMath): PPO without a value network. Each prompt is answered
`group_size` times; a completion's advantage is its reward relative to its group:

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)
    L   = mean_i (1/|y_i|) Σ_t [ -min(ρ_t A_i, clip(ρ_t, 1 ± ε) A_i) + β k3_t ]
    k3  = exp(log π_ref - log π_θ) - (log π_ref - log π_θ) - 1        (KL to the reference)

Rewards are Python functions of (prompt ids, completion ids), summed with weights (for example
an arithmetic verifier plus a format check). The reference is the policy with adapters disabled
(LoRA) or a frozen copy (full fine-tuning); with `beta = 0` it is never computed. Each iteration
samples, then runs `grpo_epochs` passes of minibatch updates against the sampling policy's
log-probs (the clipped ratio; with one epoch and one minibatch ρ = 1 and this is the plain policy
gradient with group baselines).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ferrotune.errors import ConfigError
from ferrotune.train import preference_losses as losses
from ferrotune.train.alignment import (
    MetricsLog,
    autocast,
    build_rollout,
    frozen_copy,
    has_adapters,
    make_optimizer,
    optimizer_step,
    reference_model,
    rollout_forward,
    sample_responses,
)

SampleReward = Callable[[list[int], list[int]], float]


@dataclass
class GRPOConfig:
    """The `[grpo]` section."""

    iterations: int = 100
    prompts_per_iteration: int = 16
    group_size: int = 8  # completions per prompt
    minibatch: int = 64  # completions per optimizer step
    grpo_epochs: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    lr: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    clip_range: float = 0.2
    beta: float = 0.04  # weight of the k3 KL to the reference; 0 = no reference
    scale_rewards: bool = True  # divide by the group's std (False: Dr. GRPO)
    token_level_loss: bool = False  # average over all tokens (DAPO) instead of per sequence
    log_every: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ConfigError("grpo.group_size: needs at least 2 completions per prompt")
        if (self.prompts_per_iteration * self.group_size) % self.minibatch:
            raise ConfigError(
                f"grpo.minibatch: {self.minibatch} must divide prompts_per_iteration * group_size "
                f"= {self.prompts_per_iteration * self.group_size}"
            )


def combine_rewards(
    functions: Sequence[SampleReward], weights: Sequence[float] | None = None
) -> SampleReward:
    """r(x, y) = Σ_k w_k f_k(x, y)."""
    weights = list(weights) if weights is not None else [1.0] * len(functions)
    if len(weights) != len(functions):
        raise ConfigError(f"grpo: {len(weights)} reward weights for {len(functions)} reward functions")
    return lambda prompt, completion: sum(
        w * f(prompt, completion) for f, w in zip(functions, weights, strict=True)
    )


def train_grpo(
    policy: nn.Module,
    prompts: Sequence[Sequence[int]],
    reward: SampleReward,
    config: GRPOConfig,
    *,
    stop_tokens: Sequence[int],
    pad_id: int,
    reference: nn.Module | None = None,
    run_dir: str | Path | None = None,
    quiet: bool = False,
) -> list[dict[str, float]]:
    """Runs GRPO on the trainable parameters of `policy`; returns the logged metrics per iteration."""
    device = policy.model.embed_tokens.weight.device
    if config.beta and reference is None and not has_adapters(policy):
        reference = frozen_copy(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config.lr, config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    log = MetricsLog(run_dir, config.iterations, "grpo", quiet)
    total = config.prompts_per_iteration * config.group_size

    for iteration in range(config.iterations):
        picks = torch.randint(len(prompts), (config.prompts_per_iteration,), generator=generator).tolist()
        batch_prompts = [
            list(prompts[i]) for i in picks for _ in range(config.group_size)
        ]  # groups consecutive
        responses = sample_responses(
            policy,
            batch_prompts,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            stop_tokens=stop_tokens,
            pad_id=pad_id,
            seed=config.seed * 100_003 + iteration,
        )
        rewards = torch.tensor([reward(p, r) for p, r in zip(batch_prompts, responses, strict=True)])
        advantages = losses.group_advantages(rewards, config.group_size, config.scale_rewards).to(device)
        rollout = build_rollout(batch_prompts, responses, pad_id, device)
        with torch.no_grad(), autocast(device):
            old_logps = rollout_forward(policy, rollout)[0].float()
            ref_logps = None
            if config.beta:
                with reference_model(policy, reference) as ref:
                    ref_logps = rollout_forward(ref, rollout)[0].float()

        stats: dict[str, list[float]] = {"loss": [], "kl": [], "clip_fraction": [], "entropy": []}
        for _ in range(config.grpo_epochs):
            order = torch.randperm(total, generator=generator).to(device)
            for start in range(0, total, config.minibatch):
                rows = order[start : start + config.minibatch]
                part = rollout.select(rows)
                with autocast(device):
                    logps, entropy, _ = rollout_forward(policy, part)
                loss, kl, clip_fraction = losses.grpo_loss(
                    logps.float(),
                    old_logps[rows],
                    ref_logps[rows] if ref_logps is not None else None,
                    advantages[rows],
                    part.mask,
                    config.clip_range,
                    config.beta,
                    config.token_level_loss,
                )
                loss.backward()
                optimizer_step(optimizer, params, config.lr, config.max_grad_norm)
                stats["loss"].append(float(loss.detach()))
                stats["kl"].append(float(kl))
                stats["clip_fraction"].append(float(clip_fraction))
                stats["entropy"].append(float(losses.masked_mean(entropy.float(), part.mask)))
        if (iteration + 1) % config.log_every == 0 or iteration + 1 == config.iterations:
            solved = (rewards.view(-1, config.group_size).std(-1) == 0).float().mean()
            log.log(
                iteration + 1,
                reward=float(rewards.mean()),
                reward_std=float(rewards.std()),
                zero_std_groups=float(solved),
                completion_length=float(rollout.mask.sum(-1).mean()),
                **{k: sum(v) / len(v) for k, v in stats.items()},
            )
    if not quiet:
        print(log.summary())
    return log.history

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
from pathlib import Path

import torch
from torch import nn

from ferrotune.config import GRPOConfig, TrainConfig
from ferrotune.errors import ConfigError
from ferrotune.train import preference_losses as losses
from ferrotune.train.alignment import (
    MetricsLog,
    autocast,
    build_rollout,
    frozen_copy,
    has_adapters,
    lr_at,
    make_optimizer,
    optimizer_step,
    reference_model,
    rollout_forward,
    sample_responses,
)

SampleReward = Callable[[list[int], list[int]], float]


def check_config(method: GRPOConfig, train: TrainConfig) -> None:
    if method.group_size < 2:
        raise ConfigError("method.grpo.group_size: needs at least 2 completions per prompt")
    per_step = method.prompts_per_iteration * method.group_size
    if per_step % method.minibatch:
        raise ConfigError(
            f"method.grpo.minibatch: {method.minibatch} must divide prompts_per_iteration * group_size = {per_step}"
        )
    if train.grad_accum != 1:
        raise ConfigError("train.grad_accum: GRPO updates by method.grpo.minibatch; leave grad_accum at 1")


def combine_rewards(
    functions: Sequence[SampleReward], weights: Sequence[float] | None = None
) -> SampleReward:
    """r(x, y) = Σ_k w_k f_k(x, y)."""
    weights = list(weights) if weights is not None else [1.0] * len(functions)
    if len(weights) != len(functions):
        raise ConfigError(
            f"method.grpo.reward_weights: {len(weights)} weights for {len(functions)} reward functions"
        )
    return lambda prompt, completion: sum(
        w * f(prompt, completion) for f, w in zip(functions, weights, strict=True)
    )


def train_grpo(
    policy: nn.Module,
    prompts: Sequence[Sequence[int]],
    reward: SampleReward,
    method: GRPOConfig,
    train: TrainConfig,
    *,
    stop_tokens: Sequence[int],
    pad_id: int,
    reference: nn.Module | None = None,
    run_dir: str | Path | None = None,
    log_every: int = 1,
    seed: int = 0,
    quiet: bool = False,
) -> list[dict[str, float]]:
    """Runs `train.steps` GRPO iterations on the trainable parameters of `policy`; returns the
    logged metrics per iteration."""
    check_config(method, train)
    device = policy.model.embed_tokens.weight.device
    if method.beta and reference is None and not has_adapters(policy):
        reference = frozen_copy(policy)
    optimizer = make_optimizer(policy, train)
    params = [p for p in policy.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    log = MetricsLog(run_dir, train.steps, "grpo", quiet)
    total = method.prompts_per_iteration * method.group_size

    for iteration in range(train.steps):
        lr = lr_at(iteration, train)
        picks = torch.randint(len(prompts), (method.prompts_per_iteration,), generator=generator).tolist()
        batch_prompts = [
            list(prompts[i]) for i in picks for _ in range(method.group_size)
        ]  # groups consecutive
        responses = sample_responses(
            policy,
            batch_prompts,
            max_new_tokens=method.max_new_tokens,
            temperature=method.temperature,
            top_k=method.top_k,
            top_p=method.top_p,
            stop_tokens=stop_tokens,
            pad_id=pad_id,
            seed=seed * 100_003 + iteration,
        )
        rewards = torch.tensor([reward(p, r) for p, r in zip(batch_prompts, responses, strict=True)])
        advantages = losses.group_advantages(rewards, method.group_size, method.scale_rewards).to(device)
        rollout = build_rollout(batch_prompts, responses, pad_id, device)
        with torch.no_grad(), autocast(device, train.precision):
            old_logps = rollout_forward(policy, rollout)[0].float()
            ref_logps = None
            if method.beta:
                with reference_model(policy, reference) as ref:
                    ref_logps = rollout_forward(ref, rollout)[0].float()

        stats: dict[str, list[float]] = {"loss": [], "kl": [], "clip_fraction": [], "entropy": []}
        for _ in range(method.grpo_epochs):
            order = torch.randperm(total, generator=generator).to(device)
            for start in range(0, total, method.minibatch):
                rows = order[start : start + method.minibatch]
                part = rollout.select(rows)
                with autocast(device, train.precision):
                    logps, entropy, _ = rollout_forward(policy, part)
                loss, kl, clip_fraction = losses.grpo_loss(
                    logps.float(),
                    old_logps[rows],
                    ref_logps[rows] if ref_logps is not None else None,
                    advantages[rows],
                    part.mask,
                    method.clip_range,
                    method.beta,
                    method.token_level_loss,
                )
                loss.backward()
                optimizer_step(optimizer, params, lr, train.max_grad_norm)
                stats["loss"].append(float(loss.detach()))
                stats["kl"].append(float(kl))
                stats["clip_fraction"].append(float(clip_fraction))
                stats["entropy"].append(float(losses.masked_mean(entropy.float(), part.mask)))
        if (iteration + 1) % log_every == 0 or iteration + 1 == train.steps:
            solved = (rewards.view(-1, method.group_size).std(-1) == 0).float().mean()
            log.log(
                iteration + 1,
                reward=float(rewards.mean()),
                lr=lr,
                reward_std=float(rewards.std()),
                zero_std_groups=float(solved),
                completion_length=float(rollout.mask.sum(-1).mean()),
                **{k: sum(v) / len(v) for k, v in stats.items()},
            )
    if not quiet:
        print(log.summary())
    return log.history

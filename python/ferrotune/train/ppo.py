"""PPO for language models (RLHF: Ziegler et al. 2019, Ouyang et al. 2022).

Each iteration:
    1. rollout: sample a response to each of `rollout_batch` prompts with the KV-cache generator;
    2. score it: reward model or Python function, at the last token;
    3. per-token rewards r_t = -β_KL (log π_θ - log π_ref)_t + [t = last] score;
    4. values V_t from the value head; GAE gives advantages A_t and returns R_t; A is whitened;
    5. `ppo_epochs` passes over shuffled minibatches of the rollout, each minimising
           L = L_clip(π_θ; A) + c_V · L_V,clip(V; R)
    6. adaptive β_KL: e = clip(KL/KL_target - 1, ±0.2), β ← β(1 + e·n/horizon).
The formulas are in `preference_losses.py`.

Models (no class hierarchy, one `ActorCritic` record of modules):
- With LoRA (`policy` holds adapters), ONE base serves everything: the policy is adapter
  `policy_adapter`, the value network adapter `value_adapter` plus a value head, the reference the
  base with adapters disabled, and a reward model may be a further adapter with its score head
  (`reward_from_model(..., adapter=...)`). Set `value_adapter = None` to read values from the
  policy's own hidden states instead.
- Full fine-tuning: the value head reads the policy's hidden states (shared trunk) and the
  reference is a frozen copy made at the start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ferrotune.config import PPOConfig, TrainConfig
from ferrotune.errors import ConfigError
from ferrotune.train import preference_losses as losses
from ferrotune.train.alignment import (
    MetricsLog,
    RewardFn,
    Rollout,
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


def check_config(method: PPOConfig, train: TrainConfig) -> None:
    if method.rollout_batch % method.minibatch:
        raise ConfigError(
            f"method.ppo.minibatch: {method.minibatch} must divide method.ppo.rollout_batch {method.rollout_batch}"
        )
    if method.max_new_tokens < 1:
        raise ConfigError("method.ppo.max_new_tokens: must be at least 1")
    if train.grad_accum != 1:
        raise ConfigError("train.grad_accum: PPO updates by method.ppo.minibatch; leave grad_accum at 1")


@dataclass
class ActorCritic:
    """The modules PPO trains and consults."""

    policy: nn.Module  # CausalLM, possibly carrying LoRA adapters
    value_head: nn.Linear  # hidden -> 1
    reference: nn.Module | None  # frozen copy (full fine-tuning) or None (adapters disabled)
    policy_adapter: str | None
    value_adapter: str | None
    adapter_layers: list[Any] = field(default_factory=list)  # found once; switching walks no modules


def make_actor_critic(policy: nn.Module, method: PPOConfig) -> ActorCritic:
    """Adds the value head (zero-initialised: V = 0 at the start) and picks the reference and
    adapter roles from whether `policy` carries adapters."""
    embed = policy.model.embed_tokens.weight
    head = nn.Linear(policy.config.hidden_size, 1, bias=True).to(device=embed.device, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    if not has_adapters(policy):
        return ActorCritic(policy, head, frozen_copy(policy), None, None)
    from ferrotune.peft import adapter_names, set_trainable
    from ferrotune.peft.common import adapter_layers

    names = adapter_names(policy)
    policy_adapter = method.policy_adapter
    if policy_adapter not in names and len(names) == 1:
        policy_adapter = names[0]  # one adapter, as `ferrotune train` builds it: that is the policy
    if policy_adapter not in names:
        raise ConfigError(
            f"method.ppo.policy_adapter: the model has no adapter {policy_adapter!r} (it has {names})"
        )
    value_adapter = method.value_adapter or None  # "" in TOML: values from the policy's states
    if value_adapter is not None and value_adapter not in names:
        add_adapter_like(policy, policy_adapter, value_adapter)
    set_trainable(policy, [n for n in (policy_adapter, value_adapter) if n is not None])
    layers = [layer for _, layer in adapter_layers(policy)]
    return ActorCritic(policy, head, None, policy_adapter, value_adapter, layers)


def add_adapter_like(model: nn.Module, existing: str, name: str) -> None:
    """Adds adapter `name` with the settings of adapter `existing`: the same targets select the
    same modules (never the first adapter's own layers), and a LoRA starts from zero."""
    from ferrotune.peft import LoraConfig, apply_peft, peft_config

    config = peft_config(model, existing)
    if isinstance(config, LoraConfig):
        config = replace(config, init="default")
    apply_peft(model, config, name)


def use_adapter(ac: ActorCritic, name: str | None) -> None:
    """Routes the forward pass through adapter `name` (no-op without adapters), as
    `ferrotune.peft.set_active` does, over the adapter layers found once. Every caller sets the
    adapter it needs before a forward pass, so nothing has to be restored afterwards."""
    if name is None:
        return
    for layer in ac.adapter_layers:
        if layer.merged:
            layer.unmerge()
        layer.active = {name: 1.0} if name in layer.adapter_names() else {}


def policy_and_values(ac: ActorCritic, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs, entropies, values), each (B, R) in response coordinates."""
    shared = ac.value_adapter is None
    use_adapter(ac, ac.policy_adapter)
    logps, entropy, hidden = rollout_forward(ac.policy, rollout, with_hidden=shared)
    if not shared:
        use_adapter(ac, ac.value_adapter)
        hidden = ac.policy.hidden_states(
            rollout.input_ids, position_ids=rollout.position_ids, document_ids=rollout.document_ids
        )
    assert hidden is not None
    states = hidden.gather(1, rollout.gather_index[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, R, H)
    values = ac.value_head(states.float()).squeeze(-1) * rollout.mask
    return logps, entropy, values


@torch.no_grad()
def reference_logps(ac: ActorCritic, rollout: Rollout) -> torch.Tensor:
    with reference_model(ac.policy, ac.reference) as ref:
        logps, _, _ = rollout_forward(ref, rollout)
    return logps


def train_ppo(
    policy: nn.Module,
    prompts: Sequence[Sequence[int]],
    reward: RewardFn,
    method: PPOConfig,
    train: TrainConfig,
    *,
    stop_tokens: Sequence[int],
    pad_id: int,
    run_dir: str | Path | None = None,
    log_every: int = 1,
    seed: int = 0,
    quiet: bool = False,
    actor_critic: ActorCritic | None = None,
) -> list[dict[str, float]]:
    """Runs `train.steps` PPO iterations; returns the logged metrics (reward = mean rollout score)."""
    check_config(method, train)
    ac = actor_critic or make_actor_critic(policy, method)
    device = ac.policy.model.embed_tokens.weight.device
    trained = nn.ModuleDict({"policy": ac.policy, "value_head": ac.value_head})
    optimizer = make_optimizer(trained, train)
    params = [p for p in trained.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    log = MetricsLog(run_dir, train.steps, "ppo", quiet)
    kl_coef = method.kl_coef

    for iteration in range(train.steps):
        lr = lr_at(iteration, train)
        # 1-4: rollout, scores, KL-penalised rewards, GAE
        picks = torch.randint(len(prompts), (method.rollout_batch,), generator=generator).tolist()
        batch_prompts = [list(prompts[i]) for i in picks]
        use_adapter(ac, ac.policy_adapter)
        responses = sample_responses(
            ac.policy,
            batch_prompts,
            max_new_tokens=method.max_new_tokens,
            temperature=method.temperature,
            top_k=method.top_k,
            top_p=method.top_p,
            stop_tokens=stop_tokens,
            pad_id=pad_id,
            seed=seed * 100_003 + iteration,
        )
        rollout = build_rollout(batch_prompts, responses, pad_id, device)
        scores = torch.tensor(reward(batch_prompts, responses), dtype=torch.float32, device=device)
        with torch.no_grad(), autocast(device, train.precision):
            old_logps, _, old_values = policy_and_values(ac, rollout)
            ref_logps = reference_logps(ac, rollout)
        old_logps, old_values, ref_logps = old_logps.float(), old_values.float(), ref_logps.float()
        mask = rollout.mask
        rewards, kl = losses.kl_penalised_rewards(old_logps, ref_logps, scores, mask, kl_coef)
        advantages, returns = losses.generalized_advantages(
            rewards, old_values, mask, method.gamma, method.lam
        )
        if method.whiten_advantages:
            advantages = losses.masked_whiten(advantages, mask) * mask

        # 5: several epochs of minibatches
        stats: dict[str, list[float]] = {
            "policy_loss": [],
            "value_loss": [],
            "clip_fraction": [],
            "entropy": [],
            "approx_kl": [],
            "value_clip_fraction": [],
        }
        for _ in range(method.ppo_epochs):
            order = torch.randperm(method.rollout_batch, generator=generator).to(device)
            for start in range(0, method.rollout_batch, method.minibatch):
                rows = order[start : start + method.minibatch]
                part = rollout.select(rows)
                with autocast(device, train.precision):
                    logps, entropy, values = policy_and_values(ac, part)
                part_mask = mask[rows]
                policy_loss, clip_fraction, approx_kl = losses.ppo_policy_loss(
                    logps.float(), old_logps[rows], advantages[rows], part_mask, method.clip_range
                )
                value_loss, value_clip = losses.ppo_value_loss(
                    values.float(), old_values[rows], returns[rows], part_mask, method.value_clip_range
                )
                (policy_loss + method.value_coef * value_loss).backward()
                optimizer_step(optimizer, params, lr, train.max_grad_norm)
                stats["policy_loss"].append(float(policy_loss.detach()))
                stats["value_loss"].append(float(value_loss.detach()))
                stats["clip_fraction"].append(float(clip_fraction))
                stats["value_clip_fraction"].append(float(value_clip))
                stats["approx_kl"].append(float(approx_kl))
                stats["entropy"].append(float(losses.masked_mean(entropy.float(), part_mask)))

        # 6: the KL coefficient for the next rollout
        sequence_kl = float(kl.sum(-1).mean())
        if method.adaptive_kl:
            kl_coef = losses.adaptive_kl_coef(
                kl_coef, sequence_kl, method.kl_target, method.kl_horizon, method.rollout_batch
            )
        if (iteration + 1) % log_every == 0 or iteration + 1 == train.steps:
            log.log(
                iteration + 1,
                reward=float(scores.mean()),
                kl=sequence_kl,
                kl_coef=kl_coef,
                lr=lr,
                response_length=float(mask.sum(-1).mean()),
                **{k: sum(v) / len(v) for k, v in stats.items()},
            )
    use_adapter(ac, ac.policy_adapter)
    if not quiet:
        print(log.summary())
    return log.history

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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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
    make_optimizer,
    optimizer_step,
    reference_model,
    rollout_forward,
    sample_responses,
)


@dataclass
class PPOConfig:
    """The `[ppo]` section."""

    iterations: int = 100  # rollout + update rounds
    rollout_batch: int = 64  # prompts per rollout
    minibatch: int = 16
    ppo_epochs: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    value_coef: float = 0.1
    kl_coef: float = 0.05  # initial β_KL
    adaptive_kl: bool = False
    kl_target: float = 6.0  # target sequence KL (nats) of the adaptive controller
    kl_horizon: int = 10000
    whiten_advantages: bool = True
    policy_adapter: str = "policy"
    value_adapter: str | None = "value"  # None: value head on the policy's hidden states
    log_every: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rollout_batch % self.minibatch:
            raise ConfigError(
                f"ppo.minibatch: {self.minibatch} must divide ppo.rollout_batch {self.rollout_batch}"
            )
        if self.max_new_tokens < 1:
            raise ConfigError("ppo.max_new_tokens: must be at least 1")


@dataclass
class ActorCritic:
    """The modules PPO trains and consults."""

    policy: nn.Module  # CausalLM, possibly carrying LoRA adapters
    value_head: nn.Linear  # hidden -> 1
    reference: nn.Module | None  # frozen copy (full fine-tuning) or None (adapters disabled)
    policy_adapter: str | None
    value_adapter: str | None


def make_actor_critic(policy: nn.Module, config: PPOConfig) -> ActorCritic:
    """Adds the value head (zero-initialised: V = 0 at the start) and picks the reference and
    adapter roles from whether `policy` carries adapters."""
    embed = policy.model.embed_tokens.weight
    head = nn.Linear(policy.config.hidden_size, 1, bias=True).to(device=embed.device, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    if not has_adapters(policy):
        return ActorCritic(policy, head, frozen_copy(policy), None, None)
    from ferrotune.peft import adapter_names, set_trainable

    names = adapter_names(policy)
    value_adapter = config.value_adapter
    for role, name in (("policy_adapter", config.policy_adapter), ("value_adapter", value_adapter)):
        if name is not None and name not in names:
            raise ConfigError(f"ppo.{role}: the model has no adapter {name!r} (it has {names})")
    set_trainable(policy, [n for n in (config.policy_adapter, value_adapter) if n is not None])
    return ActorCritic(policy, head, None, config.policy_adapter, value_adapter)


def use_adapter(model: nn.Module, name: str | None) -> None:
    """Routes the forward pass through adapter `name` (no-op without adapters). Every caller sets
    the adapter it needs before a forward pass, so nothing has to be restored afterwards."""
    if name is not None:
        from ferrotune.peft import set_active

        set_active(model, name)


def policy_and_values(ac: ActorCritic, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs, entropies, values), each (B, R) in response coordinates."""
    shared = ac.value_adapter is None
    use_adapter(ac.policy, ac.policy_adapter)
    logps, entropy, hidden = rollout_forward(ac.policy, rollout, with_hidden=shared)
    if not shared:
        use_adapter(ac.policy, ac.value_adapter)
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
    config: PPOConfig,
    *,
    stop_tokens: Sequence[int],
    pad_id: int,
    run_dir: str | Path | None = None,
    quiet: bool = False,
    actor_critic: ActorCritic | None = None,
) -> list[dict[str, float]]:
    """Runs PPO; returns the logged metrics of every iteration (reward = mean score of the rollout)."""
    ac = actor_critic or make_actor_critic(policy, config)
    device = ac.policy.model.embed_tokens.weight.device
    params = [p for p in ac.policy.parameters() if p.requires_grad] + list(ac.value_head.parameters())
    optimizer = make_optimizer(params, config.lr, config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    log = MetricsLog(run_dir, config.iterations, "ppo", quiet)
    kl_coef = config.kl_coef

    for iteration in range(config.iterations):
        # 1-4: rollout, scores, KL-penalised rewards, GAE
        picks = torch.randint(len(prompts), (config.rollout_batch,), generator=generator).tolist()
        batch_prompts = [list(prompts[i]) for i in picks]
        use_adapter(ac.policy, ac.policy_adapter)
        responses = sample_responses(
            ac.policy,
            batch_prompts,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            stop_tokens=stop_tokens,
            pad_id=pad_id,
            seed=config.seed * 100_003 + iteration,
        )
        rollout = build_rollout(batch_prompts, responses, pad_id, device)
        scores = torch.tensor(reward(batch_prompts, responses), dtype=torch.float32, device=device)
        with torch.no_grad(), autocast(device):
            old_logps, _, old_values = policy_and_values(ac, rollout)
            ref_logps = reference_logps(ac, rollout)
        old_logps, old_values, ref_logps = old_logps.float(), old_values.float(), ref_logps.float()
        mask = rollout.mask
        rewards, kl = losses.kl_penalised_rewards(old_logps, ref_logps, scores, mask, kl_coef)
        advantages, returns = losses.generalized_advantages(
            rewards, old_values, mask, config.gamma, config.lam
        )
        if config.whiten_advantages:
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
        for _ in range(config.ppo_epochs):
            order = torch.randperm(config.rollout_batch, generator=generator).to(device)
            for start in range(0, config.rollout_batch, config.minibatch):
                rows = order[start : start + config.minibatch]
                part = rollout.select(rows)
                with autocast(device):
                    logps, entropy, values = policy_and_values(ac, part)
                part_mask = mask[rows]
                policy_loss, clip_fraction, approx_kl = losses.ppo_policy_loss(
                    logps.float(), old_logps[rows], advantages[rows], part_mask, config.clip_range
                )
                value_loss, value_clip = losses.ppo_value_loss(
                    values.float(), old_values[rows], returns[rows], part_mask, config.value_clip_range
                )
                (policy_loss + config.value_coef * value_loss).backward()
                optimizer_step(optimizer, params, config.lr, config.max_grad_norm)
                stats["policy_loss"].append(float(policy_loss.detach()))
                stats["value_loss"].append(float(value_loss.detach()))
                stats["clip_fraction"].append(float(clip_fraction))
                stats["value_clip_fraction"].append(float(value_clip))
                stats["approx_kl"].append(float(approx_kl))
                stats["entropy"].append(float(losses.masked_mean(entropy.float(), part_mask)))

        # 6: the KL coefficient for the next rollout
        sequence_kl = float(kl.sum(-1).mean())
        if config.adaptive_kl:
            kl_coef = losses.adaptive_kl_coef(
                kl_coef, sequence_kl, config.kl_target, config.kl_horizon, config.rollout_batch
            )
        if (iteration + 1) % config.log_every == 0 or iteration + 1 == config.iterations:
            log.log(
                iteration + 1,
                reward=float(scores.mean()),
                kl=sequence_kl,
                kl_coef=kl_coef,
                response_length=float(mask.sum(-1).mean()),
                **{k: sum(v) / len(v) for k, v in stats.items()},
            )
    use_adapter(ac.policy, ac.policy_adapter)
    if not quiet:
        print(log.summary())
    return log.history

"""Pure loss functions of alignment: reward models, the DPO family, PPO and GRPO.

Every function here maps tensors of log-probabilities, rewards or values to tensors; none holds
state, touches a model or an optimizer. The loops (`reward.py`, `dpo.py`, `ppo.py`, `grpo.py`)
compute the inputs and call these. Notation used in the docstrings:

    π_θ(y|x)       the policy being trained;  π_ref(y|x) the frozen reference
    log π(y|x)     the SUM of token log-probabilities of completion y given prompt x
    |y|            the number of completion tokens; ȳ-averages are log π(y|x) / |y|
    y_w, y_l       the chosen (winning) and rejected (losing) completion of a preference pair
    σ              the logistic sigmoid;  log σ(z) = -softplus(-z)

Shapes: per-sequence quantities are 1-D, (N,) for N pairs or sequences; per-token quantities are
(B, T) with a float `mask` of the same shape (1 on completion tokens, 0 elsewhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision and integer inputs become float32; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ----------------------------------------------------------------------------------------------
# Log-probabilities of sequences


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(labels[b, t] | context) for every position, 0 where `labels == -100`.

    `labels` are pre-shifted (the batch contract): position t's logits score labels[b, t].
    logits (B, T, V), labels (B, T) -> (B, T), at least float32.
    """
    flat = -F.cross_entropy(
        _at_least_fp32(logits.reshape(-1, logits.shape[-1])),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return flat.view(labels.shape)


def document_logps(
    per_token: torch.Tensor,
    labels: torch.Tensor,
    document_ids: torch.Tensor | None = None,
    num_documents: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of token log-probabilities per document of each packed row.

        S[b, d] = Σ_{t : doc[b,t] = d, labels[b,t] ≠ -100} per_token[b, t],   n[b, d] = that count

    per_token, labels (B, T); document_ids (B, T) int with -1 on padding, or None for one document
    per row. Returns (S, n), each (B, D) with D = `num_documents` or 1 + the largest id; documents
    absent from a row have S = n = 0.
    """
    trained = labels != IGNORE_INDEX  # (B, T)
    if document_ids is None:
        sums = (per_token * trained).sum(-1, keepdim=True)
        return sums, trained.sum(-1, keepdim=True).to(per_token.dtype)
    doc = document_ids.long()
    if num_documents is None:
        num_documents = int(doc.max().item()) + 1 if doc.numel() else 1
    num_documents = max(num_documents, 1)
    keep = trained & (doc >= 0)
    index = torch.where(keep, doc, 0)  # (B, T) pad and untrained tokens add 0 to document 0
    sums = per_token.new_zeros(per_token.shape[0], num_documents)
    counts = per_token.new_zeros(per_token.shape[0], num_documents)
    sums.scatter_add_(1, index, per_token * keep)
    counts.scatter_add_(1, index, keep.to(per_token.dtype))
    return sums, counts


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: H = logsumexp(z) - Σ softmax(z)·z.
    (..., V) -> (...)."""
    z = _at_least_fp32(logits)
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ values·mask / Σ mask (over `dim`, or everything); 0 where the mask is empty."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) with mean and (unbiased) variance over the masked entries;
    with `shift_mean=False` the mean is added back (scale only)."""
    mean = masked_mean(values, mask)
    centred = values - mean
    count = mask.sum()
    var = (centred.pow(2) * mask).sum() / (count - 1).clamp(min=1)
    whitened = centred * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


# ----------------------------------------------------------------------------------------------
# Reward models


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood of the preference, per pair (Ouyang et al. 2022;
    the margin term of Llama 2, Touvron et al. 2023):

        L = -log σ(r(x, y_w) - r(x, y_l) - m)

    (N,), (N,), margin scalar or (N,) -> (N,).
    """
    diff = _at_least_fp32(chosen_rewards) - _at_least_fp32(rejected_rewards)
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


# ----------------------------------------------------------------------------------------------
# The DPO family. Rewards returned alongside losses are the implicit ones used for logging.


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023) and conservative DPO (label smoothing ε, Mitchell 2023):

        h = β [(log π_θ(y_w|x) - log π_ref(y_w|x)) - (log π_θ(y_l|x) - log π_ref(y_l|x))]
        L = -(1 - ε) log σ(h) - ε log σ(-h)

    Inputs are per-pair log-probability sums (N,). Returns (L, r_w, r_l) with the implicit rewards
    r = β (log π_θ - log π_ref), detached.
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = beta * (chosen_ratio - rejected_ratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al. 2023), the squared loss that regresses the log-ratio gap to 1/(2β)
    (here β is the paper's τ):

        h = (log π_θ(y_w|x) - log π_ref(y_w|x)) - (log π_θ(y_l|x) - log π_ref(y_l|x))
        L = (h - 1/(2β))²

    The loop feeds length-averaged log-probabilities, as the authors recommend for IPO.
    Returns (L, r_w, r_l) with r = β (log π_θ - log π_ref), detached.
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)).pow(2)
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def simpo_loss(
    policy_chosen_mean: torch.Tensor,
    policy_rejected_mean: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024): reference-free, the reward is the length-normalised log-probability
    and a target margin γ separates the pair:

        r(x, y) = (β / |y|) log π_θ(y|x)
        L = -(1 - ε) log σ(r_w - r_l - γ) - ε log σ(-(r_w - r_l - γ))

    Inputs are per-token MEANS log π_θ(y|x) / |y| (N,). Returns (L, r_w, r_l), rewards detached.
    """
    chosen_reward = beta * policy_chosen_mean
    rejected_reward = beta * policy_rejected_mean
    h = chosen_reward - rejected_reward - gamma
    losses = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, chosen_reward.detach(), rejected_reward.detach()


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log odds(y|x) = log P - log(1 - P) with P = exp(mean token log-probability) (ORPO's odds).
    Computed as ℓ - log(-expm1(ℓ)) so that ℓ near 0 stays finite."""
    ell = mean_logps.clamp(max=-1e-6)
    return ell - torch.log(-torch.expm1(ell))


def orpo_loss(
    chosen_mean: torch.Tensor,
    rejected_mean: torch.Tensor,
    chosen_nll: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024): supervised loss on the chosen answer plus an odds-ratio penalty,
    no reference model:

        odds(y|x) = P(y|x) / (1 - P(y|x)),  P(y|x) = exp(log π_θ(y|x) / |y|)
        L_OR = -log σ(log odds(y_w|x) - log odds(y_l|x))
        L    = L_SFT(y_w) + λ L_OR

    chosen_mean, rejected_mean: per-token mean log-probabilities (N,); chosen_nll: the chosen
    answer's mean token NLL (N,). Returns (L, r_w, r_l) with r = λ · mean log-prob, detached.
    """
    ratio = log_odds(chosen_mean) - log_odds(rejected_mean)
    losses = chosen_nll - lam * F.logsigmoid(ratio)
    return losses, (lam * chosen_mean).detach(), (lam * rejected_mean).detach()


def kto_kl_estimate(policy_mismatched: torch.Tensor, reference_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z₀ = max(0, mean(log π_θ(y'|x) - log π_ref(y'|x))) over completions y'
    paired with the wrong prompts x (an estimate of KL(π_θ ‖ π_ref)); detached, no gradient."""
    return (policy_mismatched - reference_mismatched).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024), prospect-theoretic and unpaired:

        r(x, y) = log π_θ(y|x) - log π_ref(y|x),   z₀ = the KL reference point
        L = λ_D (1 - σ(β (r - z₀)))   if y is desirable
        L = λ_U (1 - σ(β (z₀ - r)))   if y is undesirable

    policy_logps, reference_logps (N,); desirable (N,) bool. Returns (L, β r detached).
    """
    reward = policy_logps - reference_logps
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (reward - kl)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - reward)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, (beta * reward).detach()


# ----------------------------------------------------------------------------------------------
# PPO (Schulman et al. 2017) for language models (Ziegler et al. 2019; Ouyang et al. 2022)


def kl_penalised_rewards(
    logps: torch.Tensor,
    reference_logps: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of RLHF: a KL penalty at every completion token and the sequence's score
    at its last token.

        kl_t = log π_θ(y_t | x, y_<t) - log π_ref(y_t | x, y_<t)
        r_t  = -β_KL · kl_t + [t = last] · score

    logps, reference_logps, mask (B, T) with the completion left-aligned; scores (B,).
    Returns (r (B, T), kl (B, T)), both zero outside the mask.
    """
    kl = (logps - reference_logps) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,) index of each completion's last token
    has_tokens = (mask.sum(-1) > 0).to(rewards.dtype)
    rewards = rewards.scatter_add(1, last[:, None], (scores.to(rewards.dtype) * has_tokens)[:, None])
    return rewards, kl


def generalized_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) along each completion:

        δ_t = r_t + γ V_{t+1} - V_t          (V_{T} = 0 after the last token)
        A_t = δ_t + γ λ A_{t+1}
        R_t = A_t + V_t                       (the value targets)

    rewards, values, mask (B, T), completion tokens left-aligned in the mask. Returns (A, R),
    zero outside the mask, detached.
    """
    rewards, values, mask = rewards.detach(), values.detach() * mask, mask.to(rewards.dtype)
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(steps)):
        next_mask = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_mask if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * next_mask * running) * mask[:, t]
        advantages[:, t] = running
    returns = (advantages + values) * mask
    return advantages, returns


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate objective, averaged over completion tokens:

        ρ_t = exp(log π_θ(y_t) - log π_old(y_t))
        L   = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1 - ε, 1 + ε))

    (B, T) each. Returns (L, clip fraction, approximate KL(π_old ‖ π_θ) = mean ½ (log ρ)²).
    """
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask).detach()
    approx_kl = masked_mean(0.5 * log_ratio.pow(2), mask).detach()
    return loss, clip_fraction, approx_kl


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss:

        V_clip = V_old + clip(V - V_old, -ε_V, ε_V)
        L_V    = ½ mean_t max((V_t - R_t)², (V_clip,t - R_t)²)

    (B, T) each. Returns (L_V, fraction of tokens where the clipped term was larger).
    """
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_error = (values - returns).pow(2)
    clipped_error = (clipped_values - returns).pow(2)
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask).detach()
    return loss, clip_fraction


def adaptive_kl_coef(coef: float, observed_kl: float, target: float, horizon: int, steps: int) -> float:
    """The adaptive KL controller of Ziegler et al. (2019):

    e = clip(KL / KL_target - 1, -0.2, 0.2),   β ← β (1 + e · n_steps / horizon)
    """
    error = min(max(observed_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * steps / horizon)


# ----------------------------------------------------------------------------------------------
# GRPO (Shao et al. 2024, DeepSeekMath)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Group-relative advantages: G completions of the same prompt are consecutive in `rewards`
    (N = P·G,) and each is compared with its group:

        A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)       (std unbiased; no division if not scale)
    """
    groups = _at_least_fp32(rewards).view(-1, group_size)  # (P, G)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        std = groups.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        centred = centred / (std + 1e-4)
    return centred.reshape(-1)


def k3_kl(logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's unbiased, non-negative per-token estimator of KL(π_θ ‖ π_ref) on samples of π_θ:

    k3 = exp(log π_ref - log π_θ) - (log π_ref - log π_θ) - 1
    """
    delta = reference_logps - logps
    return torch.exp(delta) - delta - 1.0


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    reference_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    beta: float,
    token_level: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GRPO objective, negated:

        ρ_t = exp(log π_θ(y_t) - log π_old(y_t))
        ℓ_t = -min(ρ_t A, clip(ρ_t, 1 - ε, 1 + ε) A) + β k3_t
        L   = mean_i (1/|y_i|) Σ_t ℓ_{i,t}          (the paper: per-sequence means, then mean)
        L   = Σ_{i,t} ℓ_{i,t} / Σ_i |y_i|           (token_level=True, as DAPO)

    logps, old_logps, reference_logps, mask (B, T); advantages (B,), one per completion.
    Returns (L, mean k3 over tokens, clip fraction).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None].to(ratio.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = k3_kl(logps, reference_logps) if reference_logps is not None else torch.zeros_like(logps)
    if beta:
        per_token = per_token + beta * kl
    loss = masked_mean(per_token, mask) if token_level else masked_mean(per_token, mask, dim=-1).mean()
    clip_fraction = masked_mean((clipped < unclipped).float(), mask).detach()
    return loss, masked_mean(kl, mask).detach(), clip_fraction

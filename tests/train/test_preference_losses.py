"""The alignment losses against their published formulas, recomputed here independently in
plain Python floats (math module, explicit loops), never with the code under test."""

from __future__ import annotations

import math
import random

import pytest
import torch
from ferrotune.train import preference_losses as L


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def log_sigmoid(z: float) -> float:
    return math.log(sigmoid(z))


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected, tol: float = 1e-9) -> None:
    got = actual.detach().double().flatten().tolist()
    want = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want, strict=True):
        assert math.isclose(g, w, rel_tol=tol, abs_tol=tol), (got, want)


PC, PR, RC, RR = [-3.2, -10.0, -4.0], [-7.5, -9.0, -1.5], [-3.9, -9.5, -4.1], [-7.0, -9.2, -2.0]


def test_token_and_document_logps_follow_labels_and_documents():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, 4, 0, -100], [3, -100, -100, -100, -100, -100]])
    docs = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, -1, -1, -1, -1]], dtype=torch.int32)
    per_token = L.token_logps(logits, labels)
    sums, counts = L.document_logps(per_token, labels, docs)
    expected_sums, expected_counts = [[0.0, 0.0], [0.0, 0.0]], [[0, 0], [0, 0]]
    for b in range(2):
        for pos in range(6):
            if labels[b, pos] == -100 or docs[b, pos] < 0:
                continue
            row = logits[b, pos].tolist()
            log_z = math.log(sum(math.exp(v) for v in row))
            expected_sums[b][docs[b, pos]] += row[labels[b, pos]] - log_z
            expected_counts[b][docs[b, pos]] += 1
    close(sums, [v for row in expected_sums for v in row])
    close(counts, [v for row in expected_counts for v in row])
    whole, n = L.document_logps(per_token, labels, None)
    close(whole, [sum(r) for r in expected_sums])
    close(n, [sum(r) for r in expected_counts])


def test_bradley_terry_with_and_without_margin():
    chosen, rejected, margin = [1.5, -0.3, 2.0], [0.5, 0.7, 2.0], [0.0, 1.0, 0.5]
    close(
        L.bradley_terry_loss(t(chosen), t(rejected)),
        [-log_sigmoid(c - r) for c, r in zip(chosen, rejected, strict=True)],
    )
    close(
        L.bradley_terry_loss(t(chosen), t(rejected), t(margin)),
        [-log_sigmoid(c - r - m) for c, r, m in zip(chosen, rejected, margin, strict=True)],
    )


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_and_conservative_dpo(eps):
    beta = 0.1
    losses, r_w, r_l = L.dpo_loss(t(PC), t(PR), t(RC), t(RR), beta, label_smoothing=eps)
    expected = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True):
        h = beta * ((pc - rc) - (pr - rr))
        expected.append(-(1 - eps) * math.log(sigmoid(h)) - eps * math.log(sigmoid(-h)))
    close(losses, expected)
    close(r_w, [beta * (pc - rc) for pc, rc in zip(PC, RC, strict=True)])
    close(r_l, [beta * (pr - rr) for pr, rr in zip(PR, RR, strict=True)])


def test_ipo():
    tau = 0.5
    losses, _, _ = L.ipo_loss(t(PC), t(PR), t(RC), t(RR), tau)
    close(
        losses,
        [
            (((pc - rc) - (pr - rr)) - 1 / (2 * tau)) ** 2
            for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True)
        ],
    )


def test_simpo():
    beta, gamma, eps = 2.0, 0.5, 0.1
    lengths_w, lengths_l = [4, 10, 3], [5, 9, 2]
    mean_w = [s / n for s, n in zip(PC, lengths_w, strict=True)]
    mean_l = [s / n for s, n in zip(PR, lengths_l, strict=True)]
    losses, r_w, _ = L.simpo_loss(t(mean_w), t(mean_l), beta, gamma, label_smoothing=eps)
    expected = []
    for sw, nw, sl, nl in zip(PC, lengths_w, PR, lengths_l, strict=True):
        h = beta / nw * sw - beta / nl * sl - gamma
        expected.append(-(1 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h))
    close(losses, expected)
    close(r_w, [beta * s / n for s, n in zip(PC, lengths_w, strict=True)])


def test_orpo():
    lam = 0.25
    mean_w, mean_l, nll = [-0.4, -1.2, -0.05], [-0.9, -0.3, -2.5], [0.4, 1.2, 0.05]
    losses, _, _ = L.orpo_loss(t(mean_w), t(mean_l), t(nll), lam)
    expected = []
    for w, lo, n in zip(mean_w, mean_l, nll, strict=True):
        p_w, p_l = math.exp(w), math.exp(lo)
        odds_ratio = (p_w / (1 - p_w)) / (p_l / (1 - p_l))
        expected.append(n - lam * math.log(sigmoid(math.log(odds_ratio))))
    close(losses, expected, tol=1e-7)


def test_kto_and_its_reference_point():
    beta, lam_d, lam_u = 0.3, 1.0, 1.5
    policy, ref = [-3.0, -5.0, -2.0, -8.0], [-3.5, -4.0, -2.5, -7.0]
    desirable = [True, False, True, False]
    mismatched_policy, mismatched_ref = [-9.0, -10.0, -8.0], [-9.4, -10.1, -8.2]
    z0 = L.kto_kl_estimate(t(mismatched_policy), t(mismatched_ref))
    expected_z0 = max(0.0, sum(p - r for p, r in zip(mismatched_policy, mismatched_ref, strict=True)) / 3)
    close(z0, expected_z0)
    # the reference point never goes negative
    close(L.kto_kl_estimate(t([-2.0]), t([-1.0])), 0.0)
    losses, _ = L.kto_loss(t(policy), t(ref), torch.tensor(desirable), z0, beta, lam_d, lam_u)
    expected = []
    for p, r, good in zip(policy, ref, desirable, strict=True):
        reward = p - r
        if good:
            expected.append(lam_d * (1 - sigmoid(beta * (reward - expected_z0))))
        else:
            expected.append(lam_u * (1 - sigmoid(beta * (expected_z0 - reward))))
    close(losses, expected)


def test_kl_penalised_rewards_put_the_score_on_the_last_token():
    logps = [[-1.0, -2.0, -0.5, 0.0], [-0.1, -0.2, 0.0, 0.0]]
    ref = [[-1.5, -1.0, -0.7, -3.0], [-0.3, -0.1, -9.0, -9.0]]
    mask = [[1, 1, 1, 0], [1, 1, 0, 0]]
    scores, coef = [2.0, -1.0], 0.05
    rewards, kl = L.kl_penalised_rewards(t(logps), t(ref), t(scores), t(mask), coef)
    expected_r, expected_kl = [], []
    for b in range(2):
        last = sum(mask[b]) - 1
        for pos in range(4):
            k = (logps[b][pos] - ref[b][pos]) if mask[b][pos] else 0.0
            expected_kl.append(k)
            expected_r.append(-coef * k + (scores[b] if pos == last else 0.0))
    close(rewards, expected_r)
    close(kl, expected_kl)


def test_generalized_advantages_match_the_recursion():
    rng = random.Random(1)
    gamma, lam = 0.97, 0.9
    lengths, steps = [5, 3, 1], 5
    rewards = [[rng.uniform(-1, 1) if i < n else 0.0 for i in range(steps)] for n in lengths]
    values = [[rng.uniform(-1, 1) for _ in range(steps)] for _ in lengths]  # junk past the end
    mask = [[1.0 if i < n else 0.0 for i in range(steps)] for n in lengths]
    advantages, returns = L.generalized_advantages(t(rewards), t(values), t(mask), gamma, lam)
    expected_a, expected_r = [], []
    for b, n in enumerate(lengths):
        row_a = [0.0] * steps
        following = 0.0
        for i in reversed(range(n)):
            next_value = values[b][i + 1] if i + 1 < n else 0.0
            delta = rewards[b][i] + gamma * next_value - values[b][i]
            following = delta + gamma * lam * following
            row_a[i] = following
        expected_a += row_a
        expected_r += [row_a[i] + values[b][i] if i < n else 0.0 for i in range(steps)]
    close(advantages, expected_a)
    close(returns, expected_r)


def test_ppo_policy_and_value_losses():
    eps, eps_v = 0.2, 0.3
    logp = [[-1.0, -0.5, -2.0], [-0.1, -3.0, 0.0]]
    old = [[-1.3, -0.4, -1.0], [-0.2, -2.0, 0.0]]
    adv = [[1.0, -2.0, 0.5], [-1.0, 3.0, 0.0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    loss, clip_frac, approx_kl = L.ppo_policy_loss(t(logp), t(old), t(adv), t(mask), eps)
    terms, clipped_count, kls, n = 0.0, 0, 0.0, 0
    for b in range(2):
        for i in range(3):
            if not mask[b][i]:
                continue
            ratio = math.exp(logp[b][i] - old[b][i])
            a = adv[b][i]
            plain, clipped = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            terms += max(plain, clipped)
            clipped_count += clipped > plain
            kls += 0.5 * (logp[b][i] - old[b][i]) ** 2
            n += 1
    close(loss, terms / n)
    close(clip_frac, clipped_count / n)
    close(approx_kl, kls / n)

    values = [[0.5, 1.0, -0.2], [0.0, 2.0, 9.0]]
    old_values = [[0.1, 1.1, 0.5], [0.0, 1.0, 0.0]]
    returns = [[0.7, 0.0, 0.3], [1.0, 0.5, 0.0]]
    vloss, _ = L.ppo_value_loss(t(values), t(old_values), t(returns), t(mask), eps_v)
    total = 0.0
    for b in range(2):
        for i in range(3):
            if mask[b][i]:
                v, vo, r = values[b][i], old_values[b][i], returns[b][i]
                v_clip = vo + min(max(v - vo, -eps_v), eps_v)
                total += max((v - r) ** 2, (v_clip - r) ** 2)
    close(vloss, 0.5 * total / n)


def test_masked_whiten_and_adaptive_kl():
    x, mask = [1.0, 2.0, 4.0, 100.0], [1.0, 1.0, 1.0, 0.0]
    mean = 7 / 3
    var = sum((v - mean) ** 2 for v in x[:3]) / 2
    close(L.masked_whiten(t(x), t(mask))[:3], [(v - mean) / math.sqrt(var + 1e-8) for v in x[:3]])
    # KL above target raises the coefficient, capped at +20 % of n_steps / horizon
    assert math.isclose(L.adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 256), 0.1 * (1 + 0.2 * 256 / 10000))
    assert math.isclose(L.adaptive_kl_coef(0.1, 5.4, 6.0, 10000, 256), 0.1 * (1 - 0.1 * 256 / 10000))


def test_group_advantages_and_grpo_loss():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # two prompts, groups of three
    adv = L.group_advantages(t(rewards), 3)
    expected = []
    for g in range(2):
        grp = rewards[3 * g : 3 * g + 3]
        mean = sum(grp) / 3
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / 2)
        expected += [(r - mean) / (std + 1e-4) for r in grp]
    close(adv, expected)

    eps, beta = 0.2, 0.04
    logp = [[-1.0, -0.5], [-0.2, -4.0]]
    old = [[-1.1, -0.9], [-0.2, -1.0]]
    ref = [[-1.2, -0.4], [-0.3, -3.0]]
    mask = [[1.0, 1.0], [1.0, 0.0]]
    a = [0.7, -1.3]
    per_seq, per_token, n_tokens = [], 0.0, 0
    for b in range(2):
        s, n = 0.0, 0
        for i in range(2):
            if not mask[b][i]:
                continue
            ratio = math.exp(logp[b][i] - old[b][i])
            surrogate = min(ratio * a[b], min(max(ratio, 1 - eps), 1 + eps) * a[b])
            k3 = math.exp(ref[b][i] - logp[b][i]) - (ref[b][i] - logp[b][i]) - 1
            term = -surrogate + beta * k3
            s, n = s + term, n + 1
            per_token += term
            n_tokens += 1
        per_seq.append(s / n)
    loss, _, _ = L.grpo_loss(t(logp), t(old), t(ref), t(a), t(mask), eps, beta)
    close(loss, sum(per_seq) / 2)
    loss_tok, _, _ = L.grpo_loss(t(logp), t(old), t(ref), t(a), t(mask), eps, beta, token_level=True)
    close(loss_tok, per_token / n_tokens)


def test_entropy_from_logits():
    z = [0.3, -1.0, 2.0]
    probs = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    close(L.entropy_from_logits(t([z])), -sum(p * math.log(p) for p in probs))


def test_losses_are_differentiable_in_the_policy():
    policy = t(PC).requires_grad_()
    losses, _, _ = L.dpo_loss(policy, t(PR), t(RC), t(RR), 0.1)
    losses.sum().backward()
    # d/dpc of -log σ(β(pc - ...)) = -β (1 - σ(h))
    for g, pc, pr, rc, rr in zip(policy.grad.tolist(), PC, PR, RC, RR, strict=True):
        h = 0.1 * ((pc - rc) - (pr - rr))
        assert math.isclose(g, -0.1 * (1 - sigmoid(h)), rel_tol=1e-9)

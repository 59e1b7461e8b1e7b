"""PPO and GRPO on a verifiable arithmetic task small enough to move in seconds: the prompt is
`a + b =` over digit tokens and the reward is 1 when the first generated token is (a + b) mod 10.
A random-init policy scores about 1/14 (uniform over the vocabulary); both methods must lift the
mean reward well above it. Also: rollouts keep the stop token and score the right positions, and
with LoRA one base serves policy, value, reference and reward adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from ferrotune.config import GRPOConfig, PPOConfig, TrainConfig
from ferrotune.models.llama import CausalLM, LlamaConfig
from ferrotune.peft import LoraConfig, active_adapters, adapter_names, apply_peft, merge, set_active
from ferrotune.train.alignment import (
    build_rollout,
    reward_from_function,
    reward_from_model,
    rollout_forward,
    sample_responses,
)
from ferrotune.train.grpo import train_grpo
from ferrotune.train.ppo import train_ppo
from ferrotune.train.reward import RewardModel, init_score_head

PLUS, EQUALS, EOS, PAD = 10, 11, 12, 13
PROMPTS = [[a, PLUS, b, EQUALS] for a in range(3) for b in range(3)]
# Explicit projections: a second adapter with "all-linear" would also match the first adapter's
# own lora_A / lora_B layers in this PEFT version.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lm(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=14,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
    )
    model = CausalLM(config)
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(seed))
    return model


def verify(prompt: list[int], response: list[int]) -> float:
    return 1.0 if response and response[0] == (prompt[0] + prompt[2]) % 10 else 0.0


def greedy_accuracy(model: CausalLM) -> float:
    responses = sample_responses(
        model,
        PROMPTS,
        max_new_tokens=1,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        stop_tokens=[EOS],
        pad_id=PAD,
        seed=0,
    )
    return sum(verify(p, r) for p, r in zip(PROMPTS, responses, strict=True)) / len(PROMPTS)


def test_rollouts_keep_the_stop_token_and_score_response_positions():
    model = tiny_lm().eval()
    prompts = [[1, PLUS, 2, EQUALS], [3, PLUS, 3, EQUALS, 7]]
    responses = sample_responses(
        model,
        prompts,
        max_new_tokens=6,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        stop_tokens=[EOS],
        pad_id=PAD,
        seed=3,
    )
    for r in responses:
        assert EOS not in r[:-1] and 1 <= len(r) <= 6
    responses = [[4, EOS], [5, 6, 7]]  # fixed, to check the scoring positions
    rollout = build_rollout(prompts, responses, PAD, torch.device("cpu"))
    with torch.no_grad():
        logps, _, _ = rollout_forward(model, rollout)
    assert rollout.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    for b, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        with torch.no_grad():
            alone = model(torch.tensor([prompt + response]))[0].log_softmax(-1)
        for k, token in enumerate(response):
            assert abs(float(logps[b, k]) - float(alone[len(prompt) - 1 + k, token])) < 1e-5
        assert float(logps[b, len(response) :].abs().sum()) == 0.0


def mean_reward(history: list[dict[str, float]], first: int | None = None, last: int | None = None) -> float:
    part = history[:first] if first is not None else history[-(last or 1) :]
    return sum(h["reward"] for h in part) / len(part)


def test_grpo_raises_the_arithmetic_reward():
    model = tiny_lm(seed=1)
    start = greedy_accuracy(model)
    method = GRPOConfig(
        prompts_per_iteration=8, group_size=8, minibatch=32, grpo_epochs=2, max_new_tokens=2, beta=0.04
    )
    steps = TrainConfig(steps=60, lr=5e-3, schedule="constant")
    history = train_grpo(model, PROMPTS, verify, method, steps, stop_tokens=[EOS], pad_id=PAD, quiet=True)
    before, after = mean_reward(history, first=3), mean_reward(history, last=5)
    assert before < 0.25 and after > 0.6, (before, after)
    assert greedy_accuracy(model) >= start + 0.4
    assert all(h["kl"] >= 0 for h in history) and history[-1]["kl"] > 0


def test_ppo_full_finetuning_raises_the_arithmetic_reward():
    """Full fine-tuning: value head on the policy's hidden states, reference a frozen copy."""
    model = tiny_lm(seed=3)
    method = PPOConfig(
        rollout_batch=64,
        minibatch=32,
        ppo_epochs=4,
        max_new_tokens=2,
        kl_coef=0.01,
        value_coef=0.5,
        value_adapter=None,
    )
    steps = TrainConfig(steps=36, lr=5e-3, schedule="constant")
    history = train_ppo(
        model, PROMPTS, reward_from_function(verify), method, steps, stop_tokens=[EOS], pad_id=PAD, quiet=True
    )
    before, after = mean_reward(history, first=3), mean_reward(history, last=5)
    assert before < 0.25 and after > 0.5, (before, after)
    assert history[-1]["kl"] > 0  # the policy moved away from the frozen copy
    for key in ("kl", "entropy", "clip_fraction", "value_loss", "policy_loss", "kl_coef"):
        assert key in history[-1]


def test_ppo_with_lora_adapters_on_one_base():
    """One base: LoRA adapters `policy` and `value` (+ value head); the reference is the base with
    adapters disabled; the adaptive KL controller adjusts β."""
    model = tiny_lm(seed=0)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoraConfig(r=8, alpha=16, target_modules=LORA_TARGETS)
    apply_peft(model, lora, "policy")
    apply_peft(model, lora, "value")
    method = PPOConfig(
        rollout_batch=64,
        minibatch=32,
        ppo_epochs=4,
        max_new_tokens=2,
        kl_coef=0.01,
        adaptive_kl=True,
        kl_target=0.5,
        kl_horizon=1000,
        value_coef=0.5,
    )
    steps = TrainConfig(steps=32, lr=3e-3, schedule="constant")
    history = train_ppo(
        model, PROMPTS, reward_from_function(verify), method, steps, stop_tokens=[EOS], pad_id=PAD, quiet=True
    )
    before, after = mean_reward(history, first=3), mean_reward(history, last=5)
    assert before < 0.25 and after > 0.35 and after > 3 * before, (before, after)
    assert history[-1]["kl_coef"] > method.kl_coef  # KL above target: the controller raised β
    # the base weights, which are the reference, never changed
    after_state = model.state_dict()
    for name, value in base_before.items():
        lora_name = name.replace(".weight", ".base_layer.weight")
        current = after_state[lora_name] if lora_name in after_state else after_state[name]
        torch.testing.assert_close(current, value, rtol=0, atol=0)


def test_reward_adapter_on_the_shared_base_scores_like_a_merged_reward_model():
    model = tiny_lm(seed=4)
    apply_peft(model, LoraConfig(r=4, alpha=8, target_modules=LORA_TARGETS, init="gaussian"), "reward")
    apply_peft(model, LoraConfig(r=4, alpha=8, target_modules=LORA_TARGETS), "policy")
    assert adapter_names(model) == ["reward", "policy"]
    reward_model = RewardModel(model.config, backbone=model.model)  # shares the decoder
    init_score_head(reward_model, torch.Generator().manual_seed(0))
    score = reward_from_model(reward_model, PAD, adapter="reward", restore="policy")
    prompts, responses = [[1, PLUS, 2, EQUALS], [3, PLUS, 0, EQUALS]], [[3, EOS], [9]]
    ours = score(prompts, responses)

    merged = copy.deepcopy(reward_model)
    set_active(merged, "reward")
    merge(merged)
    with torch.no_grad():
        for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            expected = float(merged(torch.tensor([p + r]))[0, 0])
            assert abs(ours[b] - expected) < 1e-5
    set_active(model, "policy")
    assert score(prompts, responses) == ours  # scoring switches to `reward` and back


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_ppo_on_one_base_with_policy_value_and_reward_adapters(base):
    """Four roles, one set of base weights (16-bit, or 4-bit NF4 with double quantization as in
    QLoRA): PPO trains `policy` and `value`; the `reward` adapter (with its score head) scores
    rollouts and stays frozen; the reference is the bare base, whose weights (or packed 4-bit codes
    and statistics) never change."""
    model = tiny_lm(seed=5)
    if base == "nf4":
        from ferrotune.quant.nf4 import NF4Linear, quantize_linears

        replaced = quantize_linears(model, skip=("lm_head",))
        assert len(replaced) == 2 * 7 and all(isinstance(model.get_submodule(n), NF4Linear) for n in replaced)
    for name, init in (("reward", "gaussian"), ("policy", "default"), ("value", "default")):
        apply_peft(model, LoraConfig(r=4, alpha=8, target_modules=LORA_TARGETS, init=init), name)
    reward_model = RewardModel(model.config, backbone=model.model)
    init_score_head(reward_model, torch.Generator().manual_seed(1))
    reward_model.score.requires_grad_(False)
    base_state = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}
    reward_before = {n: p.clone() for n, p in model.named_parameters() if ".reward" in n}
    policy_before = {n: p.clone() for n, p in model.named_parameters() if ".policy" in n}
    reward = reward_from_model(reward_model, PAD, adapter="reward", restore="policy")
    method = PPOConfig(rollout_batch=8, minibatch=4, ppo_epochs=2, max_new_tokens=3, kl_coef=0.05)
    history = train_ppo(
        model,
        PROMPTS,
        reward,
        method,
        TrainConfig(steps=2, lr=1e-2),
        stop_tokens=[EOS],
        pad_id=PAD,
        quiet=True,
    )
    assert len(history) == 2 and all(h["kl"] >= -1e-6 for h in history)
    state = model.state_dict()
    for name, value in base_state.items():
        assert torch.equal(state[name], value), name
    params = dict(model.named_parameters())
    for name, value in reward_before.items():
        assert torch.equal(params[name], value), name
    assert any(not torch.equal(params[n], v) for n, v in policy_before.items())
    assert set(active_adapters(model)) == {"policy"}


def test_ppo_adds_a_value_adapter_beside_a_single_policy_adapter():
    """`ferrotune train` builds one adapter ("default", all-linear): PPO takes it as the policy and
    adds a value adapter of the same kind on the same modules."""
    model = tiny_lm(seed=6)
    apply_peft(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    method = PPOConfig(rollout_batch=8, minibatch=4, ppo_epochs=1, max_new_tokens=2)
    history = train_ppo(
        model,
        PROMPTS,
        reward_from_function(lambda prompt, response: float(response[0] % 2 == 0)),  # dense signal
        method,
        TrainConfig(steps=2, lr=1e-2),
        stop_tokens=[EOS],
        pad_id=PAD,
        quiet=True,
    )
    assert adapter_names(model) == ["default", "value"]
    assert len(history) == 2
    value_b = [p for n, p in model.named_parameters() if "lora_B.value" in n]
    assert value_b and any(float(p.detach().abs().sum()) > 0 for p in value_b)  # trained from zero init
    assert all("lora_A.default.lora" not in n for n, _ in model.named_parameters())  # no nesting

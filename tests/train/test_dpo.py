"""The DPO family on a tiny model: packed pairs give the same log-probs as each pair alone, every
loss type raises the chosen-minus-rejected margin on held-out pairs, and the on-disk reference
cache reproduces the on-the-fly reference exactly."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from ferrotune.config import DPOConfig, TrainConfig
from ferrotune.errors import FormatError
from ferrotune.models.llama import CausalLM, LlamaConfig
from ferrotune.train.dpo import (
    batch_logps,
    flatten_pairs,
    load_or_compute_reference,
    logp_margin,
    pair_ids,
    train_preference,
)
from ferrotune.train.preference_data import PreferencePair, preference_batches

PAD = 0


def tiny_lm(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=24,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
    )
    model = CausalLM(config)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed))
    return model


def preference_pairs(count: int, seed: int) -> list[PreferencePair]:
    """Chosen completions count up from the prompt's last token; rejected ones repeat it."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        prompt = [rng.randrange(4, 24) for _ in range(rng.randrange(2, 5))]
        n = rng.randrange(2, 5)
        chosen = [4 + (prompt[-1] - 4 + k + 1) % 20 for k in range(n)]
        rejected = [prompt[-1]] * rng.randrange(2, 5)
        pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs


def test_packed_pair_logps_equal_each_pair_alone():
    model = tiny_lm().eval()
    pairs = preference_pairs(7, seed=2)
    batch = next(preference_batches(pairs, batch_size=8, seq_len=40, pad_id=PAD, with_mismatched=True))
    assert batch["pair_index"].shape[1] > 1
    with torch.no_grad():
        logps = batch_logps(model, batch, ("chosen", "rejected", "kl"))
    for side in ("chosen", "rejected", "kl"):
        sums = flatten_pairs(batch, side, logps[side][0])
        for value, i in zip(sums.tolist(), pair_ids(batch, side).tolist(), strict=True):
            pair = pairs[i]
            completion = {
                "chosen": pair.chosen,
                "rejected": pair.rejected,
                "kl": pairs[(i + 1) % len(pairs)].chosen,
            }[side]
            ids = torch.tensor([pair.prompt + completion])
            with torch.no_grad():
                logits = model(ids)[0].log_softmax(-1)
            expected = sum(float(logits[len(pair.prompt) - 1 + k, tok]) for k, tok in enumerate(completion))
            assert abs(value - expected) < 1e-4, (side, i, value, expected)


CASES = {
    "dpo": dict(loss_type="dpo", beta=0.5),
    "conservative_dpo": dict(loss_type="dpo", beta=0.5, label_smoothing=0.1),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5),
    "orpo": dict(loss_type="orpo", orpo_lambda=1.0),
    "kto": dict(loss_type="kto", beta=0.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_loss_type_raises_the_margin(case):
    model = tiny_lm(seed=1)
    train, held_out = preference_pairs(96, seed=0), preference_pairs(48, seed=1)
    before = logp_margin(model, held_out, batch_size=16, seq_len=32, pad_id=PAD)
    method = DPOConfig(**CASES[case])
    steps = TrainConfig(steps=6, batch_size=8, lr=3e-3, schedule="constant")
    history = train_preference(model, train, method, steps, seq_len=32, pad_id=PAD, log_every=1, quiet=True)
    after = logp_margin(model, held_out, batch_size=16, seq_len=32, pad_id=PAD)
    assert after > before + 2.0, (case, before, after)
    first, last = history[0], history[-1]
    assert last["logp_margin"] > first["logp_margin"]
    if method.loss_type != "orpo":  # ORPO's total includes the (falling, then flat) NLL term
        assert last["loss"] < first["loss"]


def test_reference_cache_matches_the_live_reference(tmp_path):
    pairs = preference_pairs(40, seed=3)
    cache = tmp_path / "reference.safetensors"
    live = train_preference(
        tiny_lm(seed=4),
        pairs,
        DPOConfig(beta=0.3),
        TrainConfig(steps=3, batch_size=4, lr=1e-3),
        seq_len=32,
        pad_id=PAD,
        log_every=1,
        quiet=True,
    )
    cached_run = train_preference(
        tiny_lm(seed=4),
        pairs,
        DPOConfig(beta=0.3, reference_cache=str(cache)),
        TrainConfig(steps=3, batch_size=4, lr=1e-3),
        seq_len=32,
        pad_id=PAD,
        log_every=1,
        quiet=True,
    )
    assert cache.exists()
    assert len(live) == len(cached_run) > 1
    for a, b in zip(live, cached_run, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert abs(a["reward_margin"] - b["reward_margin"]) < 1e-5

    # the file is reused, whatever model is passed, as long as the data is the same
    reused = load_or_compute_reference(
        cache, tiny_lm(seed=99), pairs, batch_size=4, seq_len=32, pad_id=PAD, with_mismatched=False
    )
    fresh = load_or_compute_reference(
        tmp_path / "other.safetensors",
        tiny_lm(seed=4),
        pairs,
        batch_size=4,
        seq_len=32,
        pad_id=PAD,
        with_mismatched=False,
    )
    torch.testing.assert_close(reused["chosen"], fresh["chosen"])
    torch.testing.assert_close(reused["rejected"], fresh["rejected"])
    with pytest.raises(FormatError, match="different preference data"):
        load_or_compute_reference(
            cache, tiny_lm(), pairs[:-1], batch_size=4, seq_len=32, pad_id=PAD, with_mismatched=False
        )


def test_dpo_with_lora_uses_the_adapter_disabled_base_as_reference():
    """No second copy: the reference is the same model with its LoRA adapter switched off. At the
    first step policy = reference (LoRA B starts at zero), so the loss is exactly log 2."""
    import math

    from ferrotune.peft import LoraConfig, apply_peft, disable_adapter

    model = tiny_lm(seed=6)
    base = copy.deepcopy(model).eval()
    apply_peft(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    train, held_out = preference_pairs(64, seed=5), preference_pairs(32, seed=7)
    before = logp_margin(model, held_out, batch_size=16, seq_len=32, pad_id=PAD)
    history = train_preference(
        model,
        train,
        DPOConfig(beta=0.5),
        TrainConfig(steps=6, batch_size=8, lr=1e-2, schedule="constant"),
        seq_len=32,
        pad_id=PAD,
        log_every=1,
        quiet=True,
    )
    assert math.isclose(history[0]["loss"], math.log(2), rel_tol=1e-6)
    assert logp_margin(model, held_out, batch_size=16, seq_len=32, pad_id=PAD) > before + 1.0
    with disable_adapter(model):  # the reference is still the untouched base
        assert logp_margin(model, held_out, batch_size=16, seq_len=32, pad_id=PAD) == pytest.approx(
            logp_margin(base, held_out, batch_size=16, seq_len=32, pad_id=PAD), abs=1e-4
        )

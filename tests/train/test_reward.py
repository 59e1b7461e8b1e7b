"""Reward models: the head scores each document's last token, training separates a preference
task, and the saved folder loads in transformers as LlamaForSequenceClassification with the same
scores (transformers as a test-only reference)."""

from __future__ import annotations

import random

import pytest
import torch
from ferrotune.config import RewardConfig, TrainConfig
from ferrotune.models.llama import LlamaConfig
from ferrotune.train.preference_data import PreferencePair, preference_batches
from ferrotune.train.reward import (
    RewardModel,
    evaluate_reward_model,
    init_score_head,
    load_reward_model,
    save_reward_model,
    train_reward_model,
)

PAD = 0


def tiny_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=24,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
        max_position_embeddings=64,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_reward_model(seed: int = 0, **overrides) -> RewardModel:
    torch.manual_seed(seed)
    model = RewardModel(tiny_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    init_score_head(model)
    return model


def separable_pairs(count: int, seed: int) -> list[PreferencePair]:
    """Chosen completions use tokens 4-13, rejected ones tokens 14-23; prompts mix both."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        prompt = [rng.randrange(4, 24) for _ in range(rng.randrange(2, 5))]
        chosen = [rng.randrange(4, 14) for _ in range(rng.randrange(2, 5))]
        rejected = [rng.randrange(14, 24) for _ in range(rng.randrange(2, 5))]
        pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs


def test_packed_scores_equal_each_document_alone():
    model = tiny_reward_model().eval()
    pairs = separable_pairs(6, seed=3)
    batch = next(preference_batches(pairs, batch_size=8, seq_len=40, pad_id=PAD, shuffle=False))
    width = batch["pair_index"].shape[1]
    packed = model(
        batch["chosen_input_ids"],
        position_ids=batch["chosen_position_ids"],
        document_ids=batch["chosen_document_ids"],
        num_documents=width,
    )
    assert width > 1  # several pairs share a row
    for b, row in enumerate(batch["pair_index"].tolist()):
        for d, i in enumerate(row):
            if i < 0:
                assert packed[b, d] == 0
                continue
            alone = model(torch.tensor([pairs[i].prompt + pairs[i].chosen]))
            torch.testing.assert_close(packed[b, d], alone[0, 0], atol=1e-5, rtol=1e-5)


def test_training_separates_a_preference_task():
    model = tiny_reward_model(seed=1)
    train, held_out = separable_pairs(240, seed=0), separable_pairs(100, seed=1)
    before = evaluate_reward_model(model, held_out, batch_size=16, seq_len=48, pad_id=PAD)
    train_config = TrainConfig(steps=18, batch_size=8, lr=3e-3, schedule="constant")
    after = train_reward_model(
        model, train, RewardConfig(), train_config, seq_len=48, pad_id=PAD, eval_pairs=held_out, quiet=True
    )
    assert before["accuracy"] < 0.75
    assert after["accuracy"] > 0.9, (before, after)
    assert after["loss"] < before["loss"]


def test_margin_enters_the_loss(tmp_path):
    import json
    import math

    model = tiny_reward_model(seed=2)
    pairs = [PreferencePair(p.prompt, p.chosen, p.rejected, margin=3.0) for p in separable_pairs(12, seed=4)]
    batch = next(preference_batches(pairs, batch_size=8, seq_len=48, pad_id=PAD))
    assert batch["chosen_input_ids"].shape[0] < 8  # one step covers every pair
    with torch.no_grad():
        gaps = [
            float(model(torch.tensor([p.prompt + p.chosen])) - model(torch.tensor([p.prompt + p.rejected])))
            for p in pairs
        ]
    for use_margin, m in ((False, 0.0), (True, 3.0)):
        train_reward_model(
            model,
            pairs,
            RewardConfig(use_margin=use_margin),
            TrainConfig(steps=1, batch_size=8, lr=0.0),
            seq_len=48,
            pad_id=PAD,
            run_dir=tmp_path / str(m),
            log_every=1,
            quiet=True,
        )
        logged = json.loads((tmp_path / str(m) / "metrics.jsonl").read_text().splitlines()[0])["loss"]
        expected = sum(-math.log(1 / (1 + math.exp(-(g - m)))) for g in gaps) / len(gaps)
        assert math.isclose(logged, expected, rel_tol=1e-4), (use_margin, logged, expected)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_saved_reward_model_scores_the_same_in_transformers(tmp_path, model_type):
    transformers = pytest.importorskip("transformers")
    model = tiny_reward_model(seed=5, model_type=model_type).eval()
    save_reward_model(model, tmp_path / "rm")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(theirs).__name__.endswith("ForSequenceClassification")
    assert theirs.config.num_labels == 1

    rows = [[5, 9, 11, 4, 7], [6, 13, 8], [20, 21, 22, 23]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    attention = (ids != PAD).long()
    with torch.no_grad():
        reference = theirs(input_ids=ids, attention_mask=attention).logits[:, 0]
        ours = model(ids)[:, 0]
        reloaded = load_reward_model(tmp_path / "rm")(ids)[:, 0]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reloaded, ours, atol=0, rtol=0)

"""QLoRA reaches 16-bit LoRA's accuracy: a tiny model pretrained (full fine-tuning) to copy word
lists is adapted with LoRA (r=16, all linear layers) to reverse them, once over its 16-bit
weights and once over their NF4 quantization (double-quantized). Held-out exact match of the
4-bit run must be within 2 points of the 16-bit run, on the real training loop."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from ferrotune.config import Config, RunConfig, TrainConfig
from ferrotune.models.llama import CausalLM, LlamaConfig
from ferrotune.peft.lora import LoraConfig, apply_lora
from ferrotune.quant.nf4 import NF4Linear, quantize_linears
from ferrotune.train.loop import RowBatches, train_loop
from test_train_learning import EOS, ROW, SEP, WORDS, exact_match, pack_examples


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def word_lists(rng: random.Random, reverse: bool) -> tuple[list[int], list[int]]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
    return [*words, SEP], [*(reversed(words) if reverse else words), EOS]


def config(steps: int, lr: float, out: str) -> Config:
    return Config(
        task="sft",
        seed=0,
        train=TrainConfig(
            steps=steps, batch_size=16, lr=lr, warmup_steps=20, schedule="cosine", weight_decay=0.0
        ),
        run=RunConfig(output_dir=out, log_every=1000, tensorboard=False, plot=False),
    )


def test_qlora_matches_16bit_lora_within_two_points(tmp_path) -> None:
    rng = random.Random(0)
    held_out = [word_lists(rng, reverse=True) for _ in range(200)]
    seen = {tuple(p) for p, _ in held_out}
    copying = [word_lists(rng, reverse=False) for _ in range(4000)]
    reversing = [e for e in (word_lists(rng, reverse=True) for _ in range(6000)) if tuple(e[0]) not in seen]

    torch.manual_seed(0)
    base = CausalLM(
        LlamaConfig(
            vocab_size=19,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=ROW,
        )
    )
    base.init_weights()
    train_loop(
        base,
        config(150, 3e-3, str(tmp_path / "base")),
        RowBatches(pack_examples(copying), 16, seed=0),
        quiet=True,
    )
    assert exact_match(base, held_out) <= 0.05  # it copies; it does not reverse

    accuracy = {}
    for quantized in (False, True):
        model = copy.deepcopy(base)
        if quantized:
            assert len(quantize_linears(model)) == 14
        apply_lora(model, LoraConfig(r=16, alpha=32, target_modules="all-linear"))
        out = str(tmp_path / ("qlora" if quantized else "lora"))
        train_loop(
            model, config(250, 2e-2, out), RowBatches(pack_examples(reversing), 16, seed=0), quiet=True
        )
        assert quantized == any(isinstance(m, NF4Linear) for m in model.modules())
        accuracy[quantized] = exact_match(model, held_out)
    print(f"held-out exact match: 16-bit LoRA {accuracy[False]:.3f}, QLoRA (NF4) {accuracy[True]:.3f}")
    assert accuracy[False] >= 0.6
    assert accuracy[True] >= accuracy[False] - 0.02

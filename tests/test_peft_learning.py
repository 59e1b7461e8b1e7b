"""Every PEFT method learns, with the real training loop (`ferrotune.train.loop.train_loop`) and
the model issue's synthetic task (reversing a list of words; its packing and exact-match helpers).

A tiny base model is first trained in full on an instruction mixture: `COPY w1 w2 w3 SEP` ->
`w1 w2 w3`, `REV w1 w2 w3 SEP` -> `w3 w2 w1`, and plain `w1 w2 w3 SEP` -> copy. The base
therefore knows how to reverse (instructed exact match >= 90%) but by default copies (plain
reversal near 0%). Each method then fine-tunes a copy of the base on plain prompts with reversed
answers, and must raise held-out plain-reversal exact match (greedy, KV cache) to the model issue's
bar, 80% (`BAR`, as in test_train_learning.py), within its step budget (`RECIPES`;
docs/methods.md reports the same runs). Plain prompts sit one position earlier than instructed
ones, so a method must also move the base's reversal to new positions, not only flip a switch.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

import ferrotune.peft as fp
import pytest
import torch
from ferrotune.config import Config, RunConfig, TrainConfig
from ferrotune.models.llama import CausalLM, LlamaConfig
from ferrotune.train.loop import RowBatches, train_loop
from test_train_learning import EOS, ROW, SEP, WORDS, exact_match, pack_examples

COPY, REV = 19, 20
VOCAB = 21
BAR = 0.8  # held-out plain-reversal exact match every method must reach (the model issue's bar)
Example = tuple[list[int], list[int]]


def instruction_example(rng: random.Random, reverse: bool, instruction: int | None) -> Example:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
    head = [] if instruction is None else [instruction]
    return [*head, *words, SEP], [*(reversed(words) if reverse else words), EOS]


def base_mixture(rng: random.Random, n: int) -> list[Example]:
    out = []
    for _ in range(n):
        kind = rng.randrange(3)  # 0: instructed reversal, 1: instructed copy, 2: plain copy
        instruction = (REV, COPY, None)[kind]
        out.append(instruction_example(rng, kind == 0, instruction))
    return out


@dataclass
class Recipe:
    config: Any  # a ferrotune.peft method config, or None for full fine-tuning
    lr: float
    steps: int


RECIPES: dict[str, Recipe] = {
    "full": Recipe(None, 1e-3, 120),
    "lora": Recipe(fp.LoraConfig(r=8, alpha=16, target_modules="all-linear"), 1e-2, 80),
    "dora": Recipe(fp.LoraConfig(r=8, alpha=16, target_modules="all-linear", use_dora=True), 1e-2, 120),
    # every linear scaled (down_proj's input, the others' output): PEFT's default targets (k_proj,
    # v_proj, down_proj) only reach ~0.6-0.7 here, see docs/methods.md "Why these recipes"
    "ia3": Recipe(fp.IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"]), 1e-1, 200),
    "houlsby": Recipe(fp.BottleneckConfig(bottleneck_size=32), 3e-2, 160),
    "pfeiffer": Recipe(fp.BottleneckConfig(bottleneck_size=64, placement="pfeiffer"), 3e-2, 240),
    "prefix": Recipe(
        fp.PrefixConfig(num_virtual_tokens=8, prefix_projection=True, encoder_hidden_size=64), 1e-2, 80
    ),
    "p_tuning_v2": Recipe(fp.PrefixConfig(num_virtual_tokens=4), 3e-2, 120),
    # N(0, 1) init: starting from this model's tiny token embeddings (std 0.02) does not learn here
    "prompt": Recipe(fp.PromptConfig(num_virtual_tokens=4, init="random"), 3e-2, 120),
    "p_tuning": Recipe(
        fp.PromptConfig(num_virtual_tokens=4, encoder="mlp", encoder_hidden_size=64), 3e-3, 100
    ),
}


def run_config(out: str, steps: int, lr: float, weight_decay: float = 0.0) -> Config:
    return Config(
        task="sft",
        seed=0,
        train=TrainConfig(
            steps=steps, batch_size=16, lr=lr, warmup_steps=10, schedule="cosine", weight_decay=weight_decay
        ),
        run=RunConfig(output_dir=out, log_every=1000, tensorboard=False, plot=False),
    )


@pytest.fixture(scope="module")
def one_thread():
    """Two cores shared by many jobs: one intra-op thread is several times faster here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_task(out_dir: str) -> dict[str, Any]:
    """Held-out sets, the fine-tuning rows, and the base trained in full on the mixture."""
    torch.manual_seed(0)
    rng = random.Random(0)
    held_out = [instruction_example(rng, True, None) for _ in range(100)]
    held_instructed = [instruction_example(rng, True, REV) for _ in range(100)]
    seen = {tuple(p) for p, _ in held_out}
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=ROW,
    )
    base = CausalLM(config)
    base.init_weights()
    mixture = [e for e in base_mixture(rng, 6000) if tuple(e[0]) not in seen]
    train_loop(
        base, run_config(out_dir, 300, 3e-3, 0.01), RowBatches(pack_examples(mixture), 16, seed=0), quiet=True
    )
    plain = [instruction_example(rng, True, None) for _ in range(6000)]
    return {
        "base": base,
        "held_out": held_out,
        "instructed": held_instructed,
        "rows": pack_examples([e for e in plain if tuple(e[0]) not in seen]),
    }


@pytest.fixture(scope="module")
def task(one_thread, tmp_path_factory) -> dict[str, Any]:
    return make_task(str(tmp_path_factory.mktemp("base")))


def finetune(task: dict[str, Any], name: str, out: str) -> tuple[float, fp.TrainableParameters]:
    recipe = RECIPES[name]
    model = copy.deepcopy(task["base"])
    torch.manual_seed(1)  # the adapter's initialisation and the run's randomness
    if recipe.config is not None:
        model = fp.apply_peft(model, copy.deepcopy(recipe.config))
    train_loop(
        model, run_config(out, recipe.steps, recipe.lr), RowBatches(task["rows"], 16, seed=1), quiet=True
    )
    return exact_match(model, task["held_out"]), fp.trainable_parameters(model)


def test_base_knows_reversal_but_copies_by_default(task) -> None:
    assert exact_match(task["base"], task["instructed"]) >= 0.9
    assert exact_match(task["base"], task["held_out"]) <= 0.05


def test_every_method_reaches_the_bar(task, tmp_path) -> None:
    results = {}
    for name, recipe in RECIPES.items():
        accuracy, report = finetune(task, name, str(tmp_path / name))
        results[name] = (accuracy, report.percent)
        print(f"{name:12s} exact match {accuracy:.2f} (bar {BAR}) after {recipe.steps} steps, {report}")
    missed = {n: r for n, r in results.items() if r[0] < BAR}
    assert not missed, f"below the bar {BAR} (accuracy, trainable %): {missed}"

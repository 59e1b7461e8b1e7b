"""`ferrotune train` runs every alignment task from its example TOML (a tiny model and a
character-level tokenizer made here, a few steps each), and bad data names file and line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from ferrotune.cli import main
from ferrotune.errors import FormatError
from ferrotune.models.llama import CausalLM, LlamaConfig
from ferrotune.models.load import save_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CHARACTERS = list("0123456789+= abcdefghijklmnopqrstuvwxyz")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    root = tmp_path_factory.mktemp("align_cli")
    vocab = {c: i for i, c in enumerate(["<|endoftext|>", "<|pad|>", *CHARACTERS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    model_dir = root / "model"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=0,
        pad_token_id=1,
    )
    model = CausalLM(config)
    model.init_weights()
    save_model(model, model_dir)
    tokenizer.save(str(model_dir / "tokenizer.json"))

    rng = random.Random(0)
    with open(root / "prefs.jsonl", "w") as f:
        for _ in range(24):
            a, b = rng.randrange(5), rng.randrange(5)
            record = {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1), "margin": 1.0}
            f.write(json.dumps(record) + "\n")
    with open(root / "prompts.jsonl", "w") as f:
        for a in range(3):
            for b in range(3):
                f.write(json.dumps({"prompt": f"{a}+{b}="}) + "\n")
    return root


@pytest.mark.parametrize("task", ["reward", "dpo", "ipo", "simpo", "orpo", "kto", "ppo", "grpo"])
def test_every_alignment_example_trains_from_the_command_line(workspace, task, capsys):
    out = workspace / "runs" / task
    data = workspace / ("prompts.jsonl" if task in ("ppo", "grpo") else "prefs.jsonl")
    overrides = [
        f"model.path={workspace / 'model'}",
        f"data.train={data}",
        "data.seq_len=32",
        "data.eval_fraction=0.25" if task not in ("ppo", "grpo") else "data.eval_fraction=0.0",
        "train.steps=2",
        "train.batch_size=2",
        "train.device=cpu",
        f"run.output_dir={out}",
        "run.log_every=1",
    ]
    if task in ("dpo", "ipo"):
        overrides.append(f"method.dpo.reference_cache={out / 'reference.safetensors'}")
    if task == "ppo":
        overrides += [
            "method.ppo.rollout_batch=4",
            "method.ppo.minibatch=2",
            "method.ppo.max_new_tokens=3",
            'method.ppo.reward_functions=["arithmetic"]',
            'method.ppo.reward_model=""',
        ]
    if task == "grpo":
        overrides += [
            "method.grpo.prompts_per_iteration=2",
            "method.grpo.group_size=4",
            "method.grpo.minibatch=4",
            "method.grpo.max_new_tokens=3",
        ]
    assert main(["train", str(EXAMPLES / f"{task}.toml"), *overrides]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == task
    assert (out / "final" / "config.json").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 2
    if task == "reward":
        saved = json.loads((out / "final" / "config.json").read_text())
        assert saved["architectures"] == ["LlamaForSequenceClassification"] and saved["num_labels"] == 1
        assert 0.0 <= summary["eval_accuracy"] <= 1.0
    if task in ("dpo", "ipo"):
        assert (out / "reference.safetensors").exists()
    if task in ("ppo", "grpo"):
        assert "final_reward" in summary


def test_bad_preference_line_names_file_line_and_field(workspace):
    from ferrotune.train.preference_data import read_preference_jsonl
    from tokenizers import Tokenizer

    bad = workspace / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "1+2=", "chosen": 3}\n')
    tokenizer = Tokenizer.from_file(str(workspace / "model" / "tokenizer.json"))
    with pytest.raises(FormatError, match=r"bad.jsonl: line 2: field 'chosen'"):
        read_preference_jsonl(bad, tokenizer)


def test_dpo_and_reward_train_from_a_prepared_preference_folder(workspace):
    """`ferrotune prepare --format preference` packs pairs in Rust (chosen/rejected documents side
    by side); DPO and the reward model read the folder memory-mapped."""
    from ferrotune.train.preference_data import PreparedPreferences
    from safetensors.torch import load_file

    prepared = workspace / "prepared"
    args = ["prepare", str(workspace / "prefs.jsonl"), "--tokenizer", str(workspace / "model")]
    assert (
        main([*args, "--out", str(prepared), "--seq-len", "32", "--format", "preference", "--overwrite"]) == 0
    )
    source = PreparedPreferences(prepared)
    assert len(source) == 24
    batch = next(source.batches(batch_size=4, shuffle=False))
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert sorted(batch["pair_index"][batch["pair_index"] >= 0].tolist()) == list(
        range(int((batch["pair_index"] >= 0).sum()))
    )
    for task in ("dpo", "reward"):
        out = workspace / "runs" / f"prepared_{task}"
        overrides = [
            f"model.path={workspace / 'model'}",
            f"data.train={prepared}",
            "train.steps=2",
            "train.batch_size=2",
            "train.device=cpu",
            f"run.output_dir={out}",
            f"method.dpo.reference_cache={out / 'reference.safetensors'}",
        ]
        assert main(["train", str(EXAMPLES / f"{task}.toml"), *overrides]) == 0
        assert (out / "final" / "config.json").exists()
    cache = load_file(workspace / "runs" / "prepared_dpo" / "reference.safetensors")
    assert cache["chosen"].shape == (24,) and bool((cache["chosen"] < 0).all())


@pytest.mark.parametrize("task", ["reward", "dpo", "ppo", "grpo"])
def test_alignment_with_a_lora_section(workspace, task):
    """`[peft] method = "lora"`: DPO's reference is the adapter-disabled base, PPO adds its value
    adapter beside the policy adapter, the policy is saved as a PEFT adapter and the reward model
    as one merged HF checkpoint."""
    from ferrotune.train.reward import load_reward_model

    out = workspace / "runs" / f"lora_{task}"
    data = workspace / ("prompts.jsonl" if task in ("ppo", "grpo") else "prefs.jsonl")
    overrides = [
        f"model.path={workspace / 'model'}",
        f"data.train={data}",
        "data.seq_len=32",
        "data.eval_fraction=0.0",
        "train.steps=2",
        "train.batch_size=2",
        "train.device=cpu",
        f"run.output_dir={out}",
        "method.dpo.reference_cache=",
        "peft.method=lora",
        'peft.options={ r = 4, alpha = 8, target_modules = "all-linear" }',
        "method.ppo.rollout_batch=4",
        "method.ppo.minibatch=2",
        "method.ppo.max_new_tokens=3",
        'method.ppo.reward_functions=["arithmetic"]',
        'method.ppo.reward_model=""',
        "method.grpo.prompts_per_iteration=2",
        "method.grpo.group_size=4",
        "method.grpo.minibatch=4",
        "method.grpo.max_new_tokens=3",
    ]
    assert main(["train", str(EXAMPLES / f"{task}.toml"), *overrides]) == 0
    final = out / "final"
    if task == "reward":
        assert not (final / "adapter_config.json").exists()
        assert load_reward_model(final).score.weight.shape == (1, 32)
    else:
        config = json.loads((final / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and (final / "adapter_model.safetensors").exists()

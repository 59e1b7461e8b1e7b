"""Run configs: TOML into typed dataclasses, `a.b=c` overrides, and errors that name the key."""

from __future__ import annotations

import pytest
from ferrotune.config import Config, load_config, parse_override, to_dict
from ferrotune.errors import ConfigError

EXAMPLE = """
task = "pretrain"
seed = 7
[model]
path = "models/tiny"
gradient_checkpointing = true
[data]
train = "corpus.txt"
seq_len = 256
[train]
steps = 50
lr = 1e-4
betas = [0.9, 0.99]
warmup_steps = 5
"""


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_toml_loads_into_typed_sections(tmp_path):
    config = load_config(write(tmp_path, EXAMPLE))
    assert isinstance(config, Config)
    assert config.task == "pretrain" and config.seed == 7
    assert config.model.gradient_checkpointing is True
    assert config.data.seq_len == 256
    assert config.train.lr == 1e-4 and config.train.betas == [0.9, 0.99]
    assert config.train.batch_size == 8  # default kept
    assert to_dict(config)["train"]["steps"] == 50


def test_overrides_are_typed_toml_values(tmp_path):
    config = load_config(
        write(tmp_path, EXAMPLE),
        [
            "train.lr=3e-4",
            "train.steps=9",
            "model.gradient_checkpointing=false",
            "run.output_dir=runs/x",
            "task=sft",
        ],
    )
    assert config.train.lr == 3e-4 and config.train.steps == 9
    assert config.model.gradient_checkpointing is False
    assert config.run.output_dir == "runs/x"  # a bare word is a string
    assert config.task == "sft"
    assert parse_override("train.betas=[0.8, 0.9]") == (["train", "betas"], [0.8, 0.9])
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0  # an integer where a float is due


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1e-4"], r"unknown key train\.lrr \(did you mean train\.lr\?\)"),
        (["trian.lr=1e-4"], r"unknown key trian"),
        (["train.steps=1.5"], r"train\.steps: expected an integer"),
        (["train.steps=true"], r"train\.steps: expected an integer"),
        (["train.lr=fast"], r"train\.lr: expected a number"),
        (["model.gradient_checkpointing=1"], r"model\.gradient_checkpointing: expected true or false"),
        (["task=rlhf"], r"task: 'rlhf' is not one of 'pretrain' \| 'sft' \| 'reward'"),
        (["train.schedule=step"], r"train\.schedule"),
        (['train.betas=[0.9, "x"]'], r"train\.betas\[1\]: expected a number"),
        (["train=3"], r"train: expected a table"),
        (["train.lr"], r"expected key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, EXAMPLE), overrides)


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key data\.sequence_length"):
        load_config(write(tmp_path, "[data]\nsequence_length = 3\n"))
    with pytest.raises(ConfigError, match=r"run\.toml"):
        load_config(write(tmp_path, "task = \n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")


def test_example_configs_are_valid():
    from pathlib import Path

    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.toml"))
    assert examples
    for path in examples:
        load_config(path)

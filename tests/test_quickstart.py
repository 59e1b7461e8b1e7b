"""`ferrotune quickstart` end to end with few steps (the full run is `make demo`): every stage runs,
the files it announces exist, and the fine-tuned checkpoint loads in transformers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from ferrotune.cli import main


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quickstart_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--pretrain-steps", "4", "--sft-steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert "ferrotune quickstart finished" in printed and "Generated answers" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrain_eval_ppl_after"] < summary["pretrain_eval_ppl_before"]
    for path in (
        "tokenizer/tokenizer.json",
        "pretrain.toml",
        "sft.toml",
        "pretrain/final/model.safetensors",
        "sft/final/config.json",
        "sft/final/tokenizer.json",
        "sft/metrics.jsonl",
        "sft/prepared/train/manifest.json",
    ):
        assert (out / path).exists(), path
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "sft" / "final")
    assert model.config.tie_word_embeddings

"""ferrotune.train.sharded_load on one process: which runs load shard by shard, LoRA over a meta
model draws the adapters a loaded model gets, and a bad checkpoint is named before any sharding.
(The 2-rank `ferrotune train` runs are in test_dist.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from ferrotune.config import Config, ModelConfig, PeftSection, TrainConfig
from ferrotune.errors import FormatError
from ferrotune.models import CausalLM, LlamaConfig, load_model, save_model
from ferrotune.peft import LoraConfig, apply_peft
from ferrotune.train import dist
from ferrotune.train.sharded_load import (
    checkpoint_name,
    load_sharded_model,
    real_linear_weights,
    sharded_load_blocker,
)

SHAPE = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


def run_config(path: str = "base", method: str = "", strategy: str = "fsdp", **options) -> Config:
    return Config(
        model=ModelConfig(path=path),
        train=TrainConfig(strategy=strategy),
        peft=PeftSection(method, options),
    )


def test_which_runs_load_shard_by_shard():
    assert sharded_load_blocker(run_config()) is None
    assert sharded_load_blocker(run_config(method="lora", r=4, target_modules="all-linear")) is None
    assert sharded_load_blocker(run_config(method="rslora", init="gaussian")) is None
    assert "ddp" in sharded_load_blocker(run_config(strategy="ddp"))
    assert "scratch" in sharded_load_blocker(run_config(path=""))
    assert sharded_load_blocker(run_config(method="dora")) is None  # m from each rank's rows of W
    assert "PiSSA" in sharded_load_blocker(run_config(method="pissa"))
    assert sharded_load_blocker(run_config(method="ia3")) is None  # vectors of ones: no base read
    assert "houlsby" in sharded_load_blocker(run_config(method="houlsby"))
    assert "modules_to_save" in sharded_load_blocker(run_config(method="lora", modules_to_save=["lm_head"]))


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_lora_over_a_meta_model_draws_the_adapters_of_a_loaded_model(tmp_path, init):
    model = CausalLM(SHAPE)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_model(model, tmp_path)
    lora = LoraConfig(r=4, alpha=8, target_modules="all-linear", init=init)

    torch.manual_seed(5)
    loaded = apply_peft(load_model(tmp_path), lora)
    want = {n: p.detach() for n, p in loaded.named_parameters() if p.requires_grad}
    after_loaded = torch.rand(3)  # the random stream continues at the same place

    with torch.device("meta"):
        meta = CausalLM(SHAPE)
    torch.manual_seed(5)
    with real_linear_weights(meta, torch.device("cpu")):
        meta = apply_peft(meta, lora)
    got = {n: p.detach() for n, p in meta.named_parameters() if p.requires_grad}
    assert torch.equal(torch.rand(3), after_loaded)

    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2
    for name, value in want.items():
        assert not got[name].is_meta and torch.equal(got[name], value), name
    # the base is meta again, frozen, tied, under PEFT's names that map back to the checkpoint's
    frozen = {n: p for n, p in meta.named_parameters() if not p.requires_grad}
    assert all(p.is_meta for p in frozen.values())
    assert meta.lm_head.weight is meta.model.embed_tokens.weight
    names = {checkpoint_name(n) for n in frozen}
    assert names == {n for n, p in model.named_parameters()}


def test_a_bad_checkpoint_is_named_before_sharding(tmp_path):
    model = CausalLM(SHAPE)
    save_model(model, tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config_json, "intermediate_size": 64}))
    config = run_config(str(tmp_path), method="lora", target_modules="all-linear")
    with pytest.raises(
        FormatError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight'"
    ):
        load_sharded_model(config, dist.DistEnv(), torch.float32)

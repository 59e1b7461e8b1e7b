"""ferrotune.train.sharded_load on one process: which runs load shard by shard, each PEFT method
over a meta model draws the adapters a loaded model gets, and a bad checkpoint is named before any
sharding.
(The 2-rank `ferrotune train` runs are in test_dist.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from ferrotune.config import Config, ModelConfig, PeftSection, TrainConfig
from ferrotune.errors import FormatError
from ferrotune.models import CausalLM, LlamaConfig, load_model, save_model
from ferrotune.peft import apply_peft, config_from_dict
from ferrotune.train import dist
from ferrotune.train.sharded_load import (
    base_sources,
    load_sharded_model,
    real_base_weights,
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
    # modules built beside the base, from the random stream alone
    for method in ("adapter", "houlsby", "pfeiffer", "prefix", "p_tuning_v2", "prompt", "p_tuning"):
        assert sharded_load_blocker(run_config(method=method)) is None, method
    assert sharded_load_blocker(run_config(method="prefix", prefix_projection=True, init="zero")) is None
    assert sharded_load_blocker(run_config(method="prompt", encoder="lstm")) is None
    # a prompt taken from the vocabulary's embeddings reads the base
    for init in ("vocab", "text"):
        reason = sharded_load_blocker(run_config(method="prompt", init=init, init_token_ids=[1, 2]))
        assert "reads rows of the embedding" in reason and init in reason
    assert "embedding" in sharded_load_blocker(run_config(method="p_tuning", init="vocab"))
    # a trained copy of a base module is filled from the checkpoint like its original
    assert sharded_load_blocker(run_config(method="lora", modules_to_save=["lm_head"])) is None
    assert sharded_load_blocker(run_config(method="ia3", modules_to_save=["lm_head"])) is None
    assert "PiSSA" in sharded_load_blocker(run_config(method="pissa", modules_to_save=["lm_head"]))


METHODS = {  # [peft] method and options, as a run config gives them
    "lora-default": ("lora", {"r": 4, "alpha": 8, "target_modules": "all-linear"}),
    "lora-gaussian": ("lora", {"r": 4, "alpha": 8, "target_modules": "all-linear", "init": "gaussian"}),
    "lora-lm_head-copy": ("lora", {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    "ia3-random": ("ia3", {"init_ia3_weights": False, "modules_to_save": ["embed_tokens"]}),
    "houlsby": ("houlsby", {"bottleneck_size": 8}),
    "pfeiffer": ("pfeiffer", {"bottleneck_size": 8, "activation": "gelu"}),
    "prefix": ("prefix", {"num_virtual_tokens": 3, "prefix_projection": True, "encoder_hidden_size": 8}),
    "p_tuning_v2": ("p_tuning_v2", {"num_virtual_tokens": 3}),
    "prompt": ("prompt", {"num_virtual_tokens": 3}),
    "p_tuning-mlp": ("p_tuning", {"num_virtual_tokens": 3, "encoder_hidden_size": 8}),
    "p_tuning-lstm": ("prompt", {"num_virtual_tokens": 3, "encoder": "lstm", "encoder_hidden_size": 8}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_peft_over_a_meta_model_draws_the_adapters_of_a_loaded_model(tmp_path, method):
    name, options = METHODS[method]
    model = CausalLM(SHAPE)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_model(model, tmp_path)
    config = config_from_dict(name, options)

    torch.manual_seed(5)
    loaded = apply_peft(load_model(tmp_path), config)
    want = {n: p.detach() for n, p in loaded.named_parameters() if p.requires_grad}
    after_loaded = torch.rand(3)  # the random stream continues at the same place

    with torch.device("meta"):
        meta = CausalLM(SHAPE)
    checkpoint_names = {id(p): n for n, p in meta.named_parameters()}
    torch.manual_seed(5)
    with real_base_weights(meta, torch.device("cpu")):
        meta = apply_peft(meta, config)
    assert torch.equal(torch.rand(3), after_loaded)

    # every parameter either has a tensor in the checkpoint or is the adapter's own, made real
    sources = base_sources(meta, checkpoint_names)
    params = dict(meta.named_parameters())
    assert params.keys() == dict(loaded.named_parameters()).keys()
    checkpoint = model.state_dict()
    for pname, source in sources.items():
        assert checkpoint[source].shape == params[pname].shape, pname
        assert torch.equal(checkpoint[source], loaded.get_parameter(pname).detach()), pname
    # a modules_to_save copy is meta like its original (copying a stand-in would allocate it whole)
    assert all(params[n].is_meta for n in sources if ".modules_to_save." in n)
    own = {n: p.detach() for n, p in params.items() if n not in sources}
    assert own and all(params[n].requires_grad for n in own)
    assert set(own) == set(want) - set(sources)
    for pname, value in own.items():
        assert not value.is_meta and torch.equal(value, want[pname]), pname
    # the base is meta again, frozen, tied, and every checkpoint tensor has a place
    base = meta.base_model if hasattr(meta, "base_model") else meta
    frozen = [p for n, p in meta.named_parameters() if n in sources and not p.requires_grad]
    assert frozen and all(p.is_meta for p in frozen)
    embed, lm_head = (getattr(m, "original_module", m) for m in (base.model.embed_tokens, base.lm_head))
    assert embed.weight.is_meta and lm_head.weight is embed.weight
    assert set(sources.values()) == set(checkpoint) - {"lm_head.weight"}


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

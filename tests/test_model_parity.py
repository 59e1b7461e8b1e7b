"""Our Llama-family model against transformers (test-only oracle): random-init tiny checkpoints of
every family, saved by transformers, loaded by us; fp32 logits within 1e-4 relative. Also: our
checkpoints load back in transformers, sharded saves, and loader errors that name the tensor."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from ferrotune.errors import ConfigError, FormatError
from ferrotune.models import load_model, read_config, save_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

FAMILIES = {
    "llama3": (
        transformers.LlamaConfig,
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "llama2_tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "mistral_window": (transformers.MistralConfig, dict(sliding_window=7, head_dim=16)),
    "qwen2": (transformers.Qwen2Config, dict(rope_theta=1000000.0)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=True)),
}


def make_hf_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random transformers model whose every parameter (biases, norms included) is non-trivial."""
    config_cls, overrides = FAMILIES[family]
    config = config_cls(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model.eval()


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_checkpoint(request, tmp_path_factory):
    family = request.param
    hf = make_hf_model(family)
    folder = tmp_path_factory.mktemp(family)
    hf.save_pretrained(folder, safe_serialization=True)
    return family, hf, folder


def test_logits_match_transformers(family_checkpoint):
    family, hf, folder = family_checkpoint
    ours = load_model(folder, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=g)  # 40 > llama3 original ctx, > window
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    assert relative_error(got, ref) < 1e-4, family
    # The tied head really is the embedding matrix.
    if hf.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_family_switches_are_read_from_config(family_checkpoint):
    family, _, folder = family_checkpoint
    ours = load_model(folder)
    attn = ours.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (family == "qwen2")
    assert (attn.o_proj.bias is not None) is False
    assert (attn.q_norm is not None) == (family == "qwen3")
    assert ours.config.attention_window == (7 if family == "mistral_window" else None)


def test_saved_checkpoint_loads_in_transformers(family_checkpoint, tmp_path):
    family, hf, folder = family_checkpoint
    ours = load_model(folder)
    save_model(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids = torch.randint(0, TINY["vocab_size"], (1, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative_error(back(input_ids=ids).logits, hf(input_ids=ids).logits) < 1e-5, family


def test_sharded_save_round_trips(tmp_path):
    hf = make_hf_model("qwen2")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    files = save_model(ours, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert len(shard_names) > 2 and all((tmp_path / "sharded" / n).exists() for n in shard_names)
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    assert len(files) == len(shard_names) + 2
    ids = torch.randint(0, TINY["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(3))
    ours_back = load_model(tmp_path / "sharded")
    hf_back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    with torch.no_grad():
        torch.testing.assert_close(ours_back(ids), ours(ids), rtol=0, atol=0)
        assert relative_error(hf_back(input_ids=ids).logits, ours(ids)) < 1e-4


def test_load_to_bfloat16(tmp_path):
    hf = make_hf_model("llama3")
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert not any(p.is_meta for p in ours.parameters())
    ref = dict(hf.named_parameters())["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(ours.model.layers[1].mlp.down_proj.weight, ref.detach().to(torch.bfloat16))


def test_missing_tensor_is_named(tmp_path):
    hf = make_hf_model("qwen3")
    state = {k: v for k, v in hf.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    hf.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(FormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    hf = make_hf_model("llama2_tied")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=r"gate_proj\.weight.*shape"):
        load_model(tmp_path)


def test_bad_config_names_the_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **TINY}))
    with pytest.raises(ConfigError, match="model_type"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="vocab_size"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n "hidden_size": }')
    with pytest.raises(FormatError, match="line 2"):
        read_config(tmp_path)

"""Merging into 4-bit (bitsandbytes NF4) bases: the dequantized target (default), the original
16-bit target, and re-quantization. The dequantization reference is the pure-torch oracle
`ferrotune.quant.reference`, fed with the stored codes and statistics."""

from __future__ import annotations

import json

import pytest
import torch
from ferrotune import _native
from ferrotune.io import load_checkpoint
from ferrotune.merge import merge_adapter
from ferrotune.quant import reference

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    tie_word_embeddings=False,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("nf4")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    _native.quantize_checkpoint_dir(
        str(root / "base"),
        str(root / "nf4"),
        blocksize=64,
        quant_type="nf4",
        double_quant=True,
        skip=None,
        progress=False,
    )
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.2).to(p.dtype))
    pm.save_pretrained(root / "adapter")
    return root


def dequantized_reference(nf4, name):
    """The bf16 weight bitsandbytes' forward pass would see, from the stored codes."""
    state = json.loads(bytes(nf4[f"{name}.quant_state.bitsandbytes__nf4"].tolist()).decode())
    absmax = reference.dequantize_nested(
        nf4[f"{name}.absmax"], nf4[f"{name}.nested_absmax"], float(state["nested_offset"])
    )
    n = state["shape"][0] * state["shape"][1]
    return reference.dequantize_4bit(nf4[name], absmax, n, state["blocksize"], "nf4").reshape(state["shape"])


def test_merge_targets_the_dequantized_weights(models, tmp_path):
    summary = merge_adapter(models / "nf4", models / "adapter", tmp_path / "out")
    out = load_checkpoint(tmp_path / "out")
    nf4, adapter = load_checkpoint(models / "nf4"), load_checkpoint(models / "adapter")
    assert not any(".absmax" in k or "quant_state" in k for k in out)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    mismatched = total = 0
    for key in adapter:
        if not key.endswith("lora_A.weight"):
            continue
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        a, b = adapter[key].double(), adapter[key.replace("lora_A", "lora_B")].double()
        expected = (dequantized_reference(nf4, name).double() + 2.0 * b @ a).to(torch.bfloat16)
        assert out[name].dtype == torch.bfloat16 and out[name].shape == expected.shape
        mismatched += int((out[name] != expected).sum())
        total += expected.numel()
    assert total > 0 and mismatched <= total * 1e-3
    # lm_head stayed 16-bit in the 4-bit base and is copied through
    assert torch.equal(out["lm_head.weight"], load_checkpoint(models / "base")["lm_head.weight"])
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # loads as a plain model
    report = summary["probe"]
    assert report.ok and report.relative_divergence < 0.2


def test_original_target_and_requantize_are_probed(models, tmp_path):
    dequantized = merge_adapter(models / "nf4", models / "adapter", tmp_path / "deq")["probe"]
    original = merge_adapter(models / "nf4", models / "adapter", tmp_path / "orig", original=models / "base")
    # the original weights are not what the adapter was trained against: the probe shows it
    assert original["probe"].divergence > 2 * dequantized.divergence
    base16 = load_checkpoint(models / "base")
    adapter = load_checkpoint(models / "adapter")
    q = "model.layers.0.self_attn.q_proj.weight"
    a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].double()
    b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].double()
    expected = (base16[q].double() + 2.0 * b @ a).to(torch.bfloat16)
    assert (load_checkpoint(tmp_path / "orig")[q] != expected).float().mean() < 1e-3

    requantized = merge_adapter(models / "nf4", models / "adapter", tmp_path / "re", requantize=True)
    out = load_checkpoint(tmp_path / "re")
    assert out[q].dtype == torch.uint8 and f"{q}.quant_state.bitsandbytes__nf4" in out
    config = json.loads((tmp_path / "re" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    # re-quantizing adds fresh 4-bit rounding: the probe measures it against the 4-bit training setup
    assert requantized["probe"].divergence > dequantized.divergence
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())

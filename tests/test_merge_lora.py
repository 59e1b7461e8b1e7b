"""`ferrotune merge` against PEFT's `merge_and_unload` (test-only reference): tiny random Llama
models made here with transformers, random PEFT adapters (LoRA with rank/alpha patterns and
modules_to_save, rsLoRA, DoRA), merged by us, loaded back by transformers, logits compared."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from ferrotune import _native
from ferrotune.errors import FormatError
from ferrotune.io import load_checkpoint
from ferrotune.merge import merge_adapter
from ferrotune.probe import probe_merge

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_base(folder, dtype=torch.float32, max_shard_size=None, seed=0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    # a tokenizer file and a chat template, to check they travel with the merged model
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    return folder


def make_adapter(base_folder, folder, dtype=torch.float32, seed=1, **lora_kwargs):
    """A PEFT adapter with every factor random (PEFT starts B at zero) and DoRA magnitudes moved."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=dtype)
    config = peft.LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                noise = torch.randn(param.shape, generator=generator) * 0.1
                param.copy_((param.float() + noise).to(param.dtype))
    peft_model.save_pretrained(folder, safe_serialization=True)
    return peft_model


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))

CASES = {
    "lora_patterns": dict(
        r=8,
        lora_alpha=16,
        target_modules=TARGETS,
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 4},
        alpha_pattern={"v_proj": 5},
        modules_to_save=["lm_head"],
    ),
    "rslora_regex": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=r".*\.(q_proj|v_proj|up_proj)"),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_matches_peft_merge_and_unload(tmp_path, case):
    base = make_base(tmp_path / "base")
    peft_model = make_adapter(base, tmp_path / "adapter", **CASES[case])
    unmerged = logits_of(peft_model, IDS)
    lora_modules = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
    reference = peft_model.merge_and_unload()
    expected = logits_of(reference, IDS)

    summary = merge_adapter(base, tmp_path / "adapter", tmp_path / "out")
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    got = logits_of(ours, IDS)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    # the merged weights themselves, tensor by tensor
    reference_state = reference.state_dict()
    merged = load_checkpoint(tmp_path / "out")
    assert sorted(merged) == sorted(reference_state)
    for name in merged:
        torch.testing.assert_close(merged[name], reference_state[name], atol=2e-6, rtol=1e-5, msg=name)
    # a complete model folder
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        os.listdir(tmp_path / "out")
    )
    assert summary["modules_merged"] == lora_modules
    assert summary["dora_modules"] == (summary["modules_merged"] if case == "dora" else 0)
    assert summary["tensors_replaced"] == (1 if case == "lora_patterns" else 0)
    # the probe: merged vs unmerged logits (here in f32: only summation order differs)
    report = summary["probe"]
    assert report.ok and report.divergence < 1e-4
    assert report.adapter_effect > 100 * report.divergence
    assert float((got - unmerged).abs().max()) < 1e-4


def test_bf16_sharded_merge_keeps_dtype_shards_and_rounds_once(tmp_path):
    base = make_base(tmp_path / "base", dtype=torch.bfloat16, max_shard_size="60KB")
    shards = sorted(p.name for p in base.iterdir() if p.suffix == ".safetensors")
    assert len(shards) > 1
    peft_model = make_adapter(
        base, tmp_path / "adapter", dtype=torch.bfloat16, r=8, lora_alpha=16, target_modules=TARGETS
    )
    expected = logits_of(peft_model.merge_and_unload(), IDS)

    summary = merge_adapter(base, tmp_path / "adapter", tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert summary["shards"] == len(shards)

    # every merged weight is bf16(W + s·B@A computed in f64) up to rare ties of the f32 sum
    base_ck, adapter_ck, merged_ck = (
        load_checkpoint(base),
        load_checkpoint(tmp_path / "adapter"),
        load_checkpoint(out),
    )
    mismatched = total = 0
    for name in base_ck:
        assert merged_ck[name].dtype == torch.bfloat16
        key = f"base_model.model.{name[: -len('.weight')]}.lora_A.weight"
        if key not in adapter_ck:
            assert torch.equal(merged_ck[name], base_ck[name]), name
            continue
        a, b = adapter_ck[key].double(), adapter_ck[key.replace("lora_A", "lora_B")].double()
        reference = (base_ck[name].double() + b @ a * 2.0).to(torch.bfloat16)
        mismatched += int((reference != merged_ck[name]).sum())
        total += reference.numel()
    assert mismatched <= total * 1e-3
    got = logits_of(transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16), IDS)
    # PEFT rounds B@A to bf16 before adding; we round once: logits agree to bf16 precision
    assert float((got - expected).abs().max()) <= 0.05 * float(expected.abs().max())
    assert summary["probe"].ok


def test_probe_flags_a_model_that_does_not_match_the_adapter(tmp_path):
    base = make_base(tmp_path / "base")
    make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=TARGETS)
    make_adapter(base, tmp_path / "other", seed=9, r=4, lora_alpha=8, target_modules=TARGETS)
    merge_adapter(base, tmp_path / "other", tmp_path / "out", probe=False)
    report = probe_merge(base, tmp_path / "adapter", tmp_path / "out")
    assert not report.ok
    assert "WARNING" in report.summary()


def test_bad_inputs_are_named(tmp_path):
    base = make_base(tmp_path / "base")
    make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "r": "eight"}))
    with pytest.raises(FormatError, match=r"adapter_config.json: r:"):
        _native.merge_adapter(str(base), str(tmp_path / "adapter"), str(tmp_path / "o1"))
    config_path.write_text(json.dumps({**config, "r": 2}))
    with pytest.raises(FormatError, match="rank 4 but the config"):
        _native.merge_adapter(str(base), str(tmp_path / "adapter"), str(tmp_path / "o2"))
    config_path.write_text(json.dumps(config))
    # an adapter for another model: a module the base does not have
    other = tmp_path / "other_base"
    torch.manual_seed(0)
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "num_hidden_layers": 1}))
    small.save_pretrained(other, safe_serialization=True)
    with pytest.raises(FormatError, match=r'has no tensor "model\.layers\.1\.self_attn\.q_proj\.weight"'):
        _native.merge_adapter(str(other), str(tmp_path / "adapter"), str(tmp_path / "o3"))
    # nothing is left behind by the failures, and a non-empty output needs --overwrite
    assert not (tmp_path / "o3").exists()
    merge_adapter(base, tmp_path / "adapter", tmp_path / "out", probe=False)
    with pytest.raises(ValueError, match="not empty"):
        merge_adapter(base, tmp_path / "adapter", tmp_path / "out", probe=False)
    merge_adapter(base, tmp_path / "adapter", tmp_path / "out", probe=False, overwrite=True)


def test_cli_merge(tmp_path):
    base = make_base(tmp_path / "base")
    make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=TARGETS)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ferrotune",
            "merge",
            str(base),
            str(tmp_path / "adapter"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "merged 14 LoRA modules" in out.stdout
    assert "probe (2 inputs x 8 tokens)" in out.stdout and ": ok" in out.stdout

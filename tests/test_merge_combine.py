"""Combining adapters against PEFT's `add_weighted_adapter` (test-only reference), and extracting a
LoRA from a fine-tuned model that PEFT then loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from ferrotune.combine import combine_adapters
from ferrotune.extract import extract_adapter
from ferrotune.io import load_checkpoint, save_safetensors
from ferrotune.merge import merge_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    tie_word_embeddings=False,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, TINY["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(5))


def make_adapter(base, folder, seed, **lora):
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(root / "base")
    make_adapter(root / "base", root / "a", 1, r=4, lora_alpha=8, target_modules=TARGETS)
    make_adapter(
        root / "base", root / "b", 2, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    make_adapter(root / "base", root / "c", 3, r=2, lora_alpha=2, use_rslora=True, target_modules=TARGETS)
    return root


def peft_combination(root, names, weights, out, **kwargs):
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(model, root / names[0], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(root / n, adapter_name=n)
    pm.add_weighted_adapter(names, weights, "combined", **kwargs)
    pm.set_adapter("combined")
    pm.save_pretrained(out, selected_adapters=["combined"])
    with torch.no_grad():
        logits = pm(input_ids=IDS).logits
    return load_checkpoint(out / "combined"), logits


def products(ck):
    """module -> B @ A (the combined update before scaling)."""
    return {
        k.removesuffix(".lora_A.weight"): ck[k.replace("lora_A", "lora_B")] @ ck[k]
        for k in ck
        if k.endswith("lora_A.weight")
    }


@pytest.mark.parametrize(
    ("method", "kwargs", "exact"),
    [
        ("linear", {}, True),
        ("cat", {}, True),
        ("ties", {"density": 0.5}, True),
        ("magnitude_prune", {"density": 0.4}, True),
        ("svd", {"svd_rank": 3}, False),
        ("ties_svd", {"density": 0.6, "svd_rank": 4}, False),
    ],
)
def test_combination_matches_peft(setup, tmp_path, method, kwargs, exact):
    names, weights = (
        (["a", "b", "c"], [0.7, -0.4, 1.3])
        if method in ("cat", "svd", "ties_svd")
        else (["a", "b"], [0.7, 1.2])
    )
    reference, _ = peft_combination(
        setup, names, weights, tmp_path / "peft", combination_type=method, **kwargs
    )
    summary = combine_adapters(
        [setup / n for n in names],
        weights,
        tmp_path / "ours",
        method=method,
        density=kwargs.get("density"),
        svd_rank=kwargs.get("svd_rank"),
    )
    ours = load_checkpoint(tmp_path / "ours")
    assert sorted(ours) == sorted(reference)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "combined" / "adapter_config.json").read_text())
    assert config["r"] == peft_config["r"] == summary["rank"]
    assert sorted(config["target_modules"]) == sorted(peft_config["target_modules"])
    if exact:
        for key in ours:
            torch.testing.assert_close(ours[key], reference[key], atol=1e-6, rtol=1e-5, msg=key)
    else:
        got, want = products(ours), products(reference)
        for module in want:
            torch.testing.assert_close(got[module], want[module], atol=2e-5, rtol=1e-4, msg=module)
    # PEFT loads ours and computes what its own combination computes
    model = transformers.AutoModelForCausalLM.from_pretrained(setup / "base", dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(model, tmp_path / "ours")
    with torch.no_grad():
        mine = loaded(input_ids=IDS).logits
    model = transformers.AutoModelForCausalLM.from_pretrained(setup / "base", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(model, tmp_path / "peft" / "combined")
    with torch.no_grad():
        torch.testing.assert_close(mine, theirs(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)


def test_dare_is_seeded_and_keeps_the_density(setup, tmp_path):
    adapters = [setup / "a", setup / "b"]
    # at density 1 DARE keeps everything: dare_ties == PEFT's ties, dare_linear == linear
    reference, _ = peft_combination(
        setup, ["a", "b"], [0.5, 0.8], tmp_path / "peft", combination_type="ties", density=1.0
    )
    combine_adapters(adapters, [0.5, 0.8], tmp_path / "full", method="dare_ties", density=1.0)
    full = load_checkpoint(tmp_path / "full")
    for key in reference:
        torch.testing.assert_close(full[key], reference[key], atol=1e-6, rtol=1e-5)

    for name, seed in (("s1", 1), ("s1_again", 1), ("s2", 2)):
        combine_adapters(adapters, [1.0, 1.0], tmp_path / name, method="dare_linear", density=0.3, seed=seed)
    s1, again, s2 = (load_checkpoint(tmp_path / n) for n in ("s1", "s1_again", "s2"))
    key = "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"  # only adapter a has it
    assert all(torch.equal(s1[k], again[k]) for k in s1)
    assert not torch.equal(s1[key], s2[key])
    a = load_checkpoint(setup / "a")[key]
    kept = s1[key] != 0
    assert 0.2 < kept.float().mean() < 0.4
    # kept entries are rescaled by 1/density (and by sqrt(weight * scaling) = sqrt(2) on A)
    torch.testing.assert_close(s1[key][kept], a[kept] * 2**0.5 / 0.3, rtol=1e-5, atol=1e-6)


def test_combined_into_a_model_matches_peft(setup, tmp_path):
    _, expected = peft_combination(
        setup, ["a", "b"], [0.6, 0.9], tmp_path / "peft", combination_type="linear"
    )
    summary = combine_adapters(
        [setup / "a", setup / "b"], [0.6, 0.9], tmp_path / "model", method="linear", base=setup / "base"
    )
    assert summary["merge"]["probe"].ok
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, atol=1e-4, rtol=1e-4)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_extracted_lora_reproduces_the_fine_tune(setup, tmp_path):
    # a "fine-tune" whose change is exactly rank 4 on every projection, plus a changed norm
    merge_adapter(setup / "base", setup / "a", tmp_path / "tuned", probe=False)
    tuned = dict(load_checkpoint(tmp_path / "tuned"))
    tuned["model.norm.weight"] = tuned["model.norm.weight"] * 1.01
    save_safetensors({k: v.clone() for k, v in tuned.items()}, tmp_path / "tuned" / "model.safetensors")

    summary = extract_adapter(setup / "base", tmp_path / "tuned", tmp_path / "extracted", rank=4)
    assert summary["modules"] == 14 and summary["min_energy"] > 0.999999
    assert any("model.norm.weight" in w for w in summary["warnings"])
    base_ck, ext = load_checkpoint(setup / "base"), load_checkpoint(tmp_path / "extracted")
    for key in ext:
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            delta = tuned[f"{module}.weight"] - base_ck[f"{module}.weight"]
            torch.testing.assert_close(
                ext[key.replace("lora_A", "lora_B")] @ ext[key], delta, atol=2e-6, rtol=1e-4
            )
    model = transformers.AutoModelForCausalLM.from_pretrained(setup / "base", dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(model, tmp_path / "extracted")
    reference = transformers.AutoModelForCausalLM.from_pretrained(setup / "base", dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(reference, setup / "a")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=IDS).logits, reference(input_ids=IDS).logits, atol=1e-4, rtol=1e-4
        )

    # a lower rank keeps less, and the CLI says how much
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ferrotune",
            "extract",
            str(setup / "base"),
            str(tmp_path / "tuned"),
            str(tmp_path / "rank1"),
            "--rank",
            "1",
            "--targets",
            r".*\.q_proj",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "extracted 2 modules at rank 1" in out.stdout
    config = json.loads((tmp_path / "rank1" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj"] and config["r"] == 1

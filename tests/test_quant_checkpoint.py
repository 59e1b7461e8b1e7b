"""`ferrotune quantize`: the output has transformers + bitsandbytes' own 4-bit layout (compared
with what transformers itself saves for the same model), transformers loads it with bitsandbytes,
and bitsandbytes' dequantize of its bytes equals ours. Streaming keeps memory near one tensor."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import numpy as np
import pytest
import torch
from ferrotune import FormatError
from ferrotune.cli import main
from ferrotune.quant import blockwise as B
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM


def _tiny_llama(path: Path, shard: str | None = None) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=192,  # bitsandbytes CPU matmul needs rows of whole blocks
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    if shard:
        model.save_pretrained(path, max_shard_size=shard)
    else:
        model.save_pretrained(path)
    return model


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                out[k] = f.get_tensor(k)
    return out


def _quant_state(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.tolist()).decode())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    _tiny_llama(root / "bf16", shard="60KB")
    assert len(list((root / "bf16").glob("*.safetensors"))) > 1  # sharded input
    assert main(["quantize", str(root / "bf16"), str(root / "ours"), "--quiet"]) == 0
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    theirs = AutoModelForCausalLM.from_pretrained(
        root / "bf16", quantization_config=bnb_config, device_map="cpu", dtype=torch.bfloat16
    )
    theirs.save_pretrained(root / "transformers")
    return {"bf16": root / "bf16", "ours": root / "ours", "transformers": root / "transformers"}


def test_layout_matches_what_transformers_saves(checkpoints: dict[str, Path]) -> None:
    ours, theirs = _tensors(checkpoints["ours"]), _tensors(checkpoints["transformers"])
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        o = ours[name]
        assert o.dtype == t.dtype, name
        if name.endswith("quant_state.bitsandbytes__nf4"):  # JSON: its length varies with the offset
            mine, bnb = _quant_state(o), _quant_state(t)
            # the offset is a mean: its last bits depend on the order of summation
            assert mine.pop("nested_offset") == pytest.approx(bnb.pop("nested_offset"), rel=1e-6)
            assert mine == bnb
            assert list(mine) == list(bnb)  # same key order, as json.dumps wrote it
        elif name.endswith(".absmax") or name.endswith(".nested_absmax"):
            assert o.shape == t.shape  # values depend on the offset: compared by dequantizing below
        else:
            assert torch.equal(o, t), name  # codes, quant maps, 16-bit tensors
    config = json.loads((checkpoints["ours"] / "config.json").read_text())
    their_config = json.loads((checkpoints["transformers"] / "config.json").read_text())
    assert config["quantization_config"] == their_config["quantization_config"]
    index = json.loads((checkpoints["ours"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours)


def test_quant_state_json_is_byte_exact(checkpoints: dict[str, Path]) -> None:
    """With our offset put into bitsandbytes' own QuantState, as_dict(packed=True) gives our bytes."""
    ours = _tensors(checkpoints["ours"])
    name = "model.layers.1.mlp.down_proj.weight"
    qs = bnb_functional.QuantState.from_dict(
        {k[len(name) + 1 :]: v for k, v in ours.items() if k.startswith(name + ".")},
        device=torch.device("cpu"),
    )
    packed = qs.as_dict(packed=True)
    for key, value in packed.items():
        assert torch.equal(value, ours[f"{name}.{key}"]), key


def _bnb_dequantize(packed: torch.Tensor, state: bnb_functional.QuantState) -> torch.Tensor:
    """bitsandbytes' dequantize, through a flat shape: its native CPU kernel (AVX-512) indexes
    absmax per row, which is wrong when a row is not a whole number of blocks (e.g. 64 x 160)."""
    shape = state.shape
    state = copy.copy(state)
    state.shape = torch.Size([shape.numel()])
    return bnb_functional.dequantize_4bit(packed, state).view(shape)


def test_transformers_loads_ours_and_dequantizes_to_our_values(checkpoints: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoints["ours"], device_map="cpu", dtype=torch.bfloat16)
    ours = _tensors(checkpoints["ours"])
    reference = LlamaForCausalLM.from_pretrained(checkpoints["bf16"], dtype=torch.bfloat16)
    checked = 0
    for name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        w = f"{name}.weight"
        bnb_deq = _bnb_dequantize(module.weight.data, module.weight.quant_state)
        state = B.QuantState(
            absmax=ours[f"{w}.absmax"],
            shape=torch.Size(_quant_state(ours[f"{w}.quant_state.bitsandbytes__nf4"])["shape"]),
            dtype=torch.bfloat16,
            nested_absmax=ours[f"{w}.nested_absmax"],
            offset=_quant_state(ours[f"{w}.quant_state.bitsandbytes__nf4"])["nested_offset"],
        )
        our_deq = B.dequantize_4bit(ours[w], state)
        assert torch.equal(bnb_deq, our_deq), name
        original = reference.get_submodule(name).weight
        assert (our_deq.float() - original.float()).abs().max() <= 0.2 * original.float().abs().max()
        checked += 1
    assert checked == 2 * 7
    assert "lm_head" not in {n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits.float()
        ref = reference(ids).logits.float()
    assert torch.nn.functional.cosine_similarity(logits.flatten(), ref.flatten(), dim=0) > 0.95


def test_fp4_and_no_double_quant(tmp_path: Path) -> None:
    _tiny_llama(tmp_path / "bf16")
    assert main(["quantize", str(tmp_path / "bf16"), str(tmp_path / "fp4"), "--quant-type", "fp4",
                 "--no-double-quant", "--blocksize", "128", "--quiet"]) == 0  # fmt: skip
    out = _tensors(tmp_path / "fp4")
    name = "model.layers.0.self_attn.o_proj.weight"
    assert out[f"{name}.absmax"].dtype == torch.float32
    assert f"{name}.nested_absmax" not in out
    state = _quant_state(out[f"{name}.quant_state.bitsandbytes__fp4"])
    assert state == {"quant_type": "fp4", "blocksize": 128, "dtype": "bfloat16", "shape": [64, 64]}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp4", device_map="cpu", dtype=torch.bfloat16)
    module = model.get_submodule(name[: -len(".weight")])
    ours = B.dequantize_4bit(
        out[name], B.QuantState(out[f"{name}.absmax"], torch.Size([64, 64]), torch.bfloat16, 128, "fp4")
    )
    assert torch.equal(_bnb_dequantize(module.weight.data, module.weight.quant_state), ours)


def test_refuses_bad_input(tmp_path: Path) -> None:
    _tiny_llama(tmp_path / "bf16")
    assert main(["quantize", str(tmp_path / "bf16"), str(tmp_path / "q"), "--quiet"]) == 0
    with pytest.raises(FormatError, match="already quantized"):
        main(["quantize", str(tmp_path / "q"), str(tmp_path / "qq"), "--quiet"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"config\.json"):
        main(["quantize", str(tmp_path / "bad"), str(tmp_path / "qq"), "--quiet"])


def test_memory_stays_near_one_tensor(tmp_path: Path) -> None:
    """Six 16 MB tensors: the command's peak RSS grows by about one tensor, not the model."""
    src = tmp_path / "big"
    src.mkdir()
    rng = np.random.default_rng(0)
    tensors = {
        f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((2048, 2048), dtype=np.float32) * 0.02
        for i in range(6)
    }
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    del tensors
    script = (
        "import resource, sys; from ferrotune.cli import main; "
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "main(['quantize', sys.argv[1], sys.argv[2], '--quiet']); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)"
    )
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "q")],
                         capture_output=True, text=True, check=True, env=env)  # fmt: skip
    grown_mb = int(out.stdout.strip().splitlines()[-1]) / 1024
    assert grown_mb < 2.5 * 16, f"peak RSS grew by {grown_mb:.0f} MB for a 96 MB model of 16 MB tensors"

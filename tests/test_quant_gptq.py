"""GPTQ int4 bases built here from known weights with the standard packing (with and without
act-order, group size 128): GPTQLinear dequantizes exactly to the known weights, a GPTQ
checkpoint loads into our model and matches the same model with those weights in 16 bits, and
LoRA trains on top while the base stays frozen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ferrotune.io import save_safetensors
from ferrotune.models.llama import CausalLM, LlamaConfig
from ferrotune.peft.lora import LoraConfig, apply_lora
from ferrotune.quant.gptq import GPTQLinear, load_gptq_model
from torch import nn

GROUP = 128


def pack_gptq(q: np.ndarray, zeros: np.ndarray, v1: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The standard packing, one nibble at a time. q: (in, out) codes, zeros: (G, out)."""
    n_in, n_out = q.shape
    qweight = np.zeros((n_in // 8, n_out), dtype=np.uint32)
    for i in range(n_in):
        qweight[i // 8] |= q[i].astype(np.uint32) << np.uint32(4 * (i % 8))
    stored = (zeros - 1) if v1 else zeros  # v1 stores zero - 1 (zeros are 1..15 here)
    qzeros = np.zeros((zeros.shape[0], n_out // 8), dtype=np.uint32)
    for j in range(n_out):
        qzeros[:, j // 8] |= stored[:, j].astype(np.uint32) << np.uint32(4 * (j % 8))
    return qweight.view(np.int32), qzeros.view(np.int32)


def known_layer(n_in: int, n_out: int, act_order: bool, seed: int) -> dict[str, torch.Tensor]:
    """Codes, zeros, scales and g_idx, and the weight (out, in) they stand for (fp32)."""
    rng = np.random.default_rng(seed)
    groups = n_in // GROUP
    q = rng.integers(0, 16, size=(n_in, n_out))
    zeros = rng.integers(1, 16, size=(groups, n_out))
    scales = (rng.random((groups, n_out)) * 0.01 + 0.001).astype(np.float16)
    if act_order:
        perm = rng.permutation(n_in)  # quantization order: channel perm[j] is j-th
        g_idx = np.empty(n_in, dtype=np.int32)
        g_idx[perm] = np.arange(n_in) // GROUP
    else:
        g_idx = (np.arange(n_in) // GROUP).astype(np.int32)
    weight = scales.astype(np.float32)[g_idx] * (q - zeros[g_idx]).astype(np.float32)  # (in, out)
    qweight, qzeros = pack_gptq(q, zeros)
    return {
        "qweight": torch.from_numpy(qweight),
        "qzeros": torch.from_numpy(qzeros),
        "scales": torch.from_numpy(scales),
        "g_idx": torch.from_numpy(g_idx),
        "weight": torch.from_numpy(weight.T.copy()),
    }


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantizes_to_the_known_weights(act_order: bool) -> None:
    t = known_layer(256, 64, act_order, seed=1)
    layer = GPTQLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], group_size=GROUP)
    assert torch.equal(layer.dequantize(torch.float32), t["weight"])
    assert torch.equal(layer.weight, t["weight"].half())
    if not act_order:  # g_idx may be left out when it is the plain i // group_size
        plain = GPTQLinear(t["qweight"], t["qzeros"], t["scales"], None, group_size=GROUP)
        assert torch.equal(plain.dequantize(torch.float32), t["weight"])
    else:
        assert "act_order" in repr(layer)


def test_v2_format_and_bad_shapes() -> None:
    rng = np.random.default_rng(3)
    q = rng.integers(0, 16, size=(128, 16))
    zeros = rng.integers(0, 16, size=(1, 16))
    qweight, qzeros = pack_gptq(q, zeros, v1=False)
    scales = torch.full((1, 16), 0.5, dtype=torch.float16)
    layer = GPTQLinear(
        torch.from_numpy(qweight), torch.from_numpy(qzeros), scales, None, checkpoint_format="gptq_v2"
    )
    expected = torch.from_numpy(((q - zeros) * 0.5).T.astype(np.float32))
    assert torch.equal(layer.dequantize(torch.float32), expected)
    from ferrotune.errors import FormatError

    with pytest.raises(FormatError, match="do not fit"):
        GPTQLinear(
            torch.from_numpy(qweight), torch.from_numpy(qzeros), torch.ones(2, 16, dtype=torch.float16), None
        )


def test_input_gets_the_gradient_and_the_base_none() -> None:
    t = known_layer(256, 32, True, seed=2)
    layer = GPTQLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], torch.randn(32))
    x = torch.randn(3, 256, dtype=torch.float16, requires_grad=True)
    y = layer(x)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, t["weight"].half(), layer.bias)
    assert torch.equal(y, y2)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)  # same product; fp16 matmul kernels may differ in order
    assert all(not p.requires_grad for p in layer.parameters())


@pytest.fixture(scope="module")
def gptq_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CausalLM]:
    """A tiny Llama whose linear layers are GPTQ (alternating act-order), and the same model with
    the known weights in fp16."""
    folder = tmp_path_factory.mktemp("gptq")
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    reference = CausalLM(config)
    reference.init_weights(std=0.02)
    reference = reference.half()
    tensors: dict[str, torch.Tensor] = {}
    for i, (name, module) in enumerate(reference.named_modules()):
        if type(module) is not nn.Linear or name == "lm_head":
            continue
        t = known_layer(module.in_features, module.out_features, act_order=i % 2 == 0, seed=i)
        with torch.no_grad():
            module.weight.copy_(t["weight"].half())
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            tensors[f"{name}.{key}"] = t[key]
    for name, param in reference.named_parameters():
        if not any(
            name.startswith(k.rsplit(".", 1)[0] + ".weight") for k in tensors if k.endswith("qweight")
        ):
            tensors.setdefault(name, param.detach())
    save_safetensors(tensors, folder / "model.safetensors")
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 96,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "quantization_config": {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": GROUP,
            "desc_act": True,
            "sym": False,
        },
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, reference


def test_gptq_checkpoint_loads_and_matches_the_dequantized_model(
    gptq_checkpoint: tuple[Path, CausalLM],
) -> None:
    folder, reference = gptq_checkpoint
    model = load_gptq_model(folder)
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    assert len(layers) == 14 and type(model.lm_head) is nn.Linear
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


def test_lora_trains_on_a_gptq_base(gptq_checkpoint: tuple[Path, CausalLM]) -> None:
    folder, _ = gptq_checkpoint
    model = load_gptq_model(folder, compute_dtype=torch.float32)
    ids = torch.randint(0, 96, (4, 10))
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        assert torch.equal(model(ids), base)  # B = 0 at the start
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=5e-3)
    losses = []
    for _ in range(4):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 96), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers())

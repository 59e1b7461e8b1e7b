"""NF4Linear: dequantization (torch path, Triton kernel, Rust, reference agree), autograd (input
gradient only), quantize_linears on our model, loading 4-bit checkpoints (ours and transformers'
own) and 16-bit ones quantized while loading, and LoRA on top."""

from __future__ import annotations

import copy
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from ferrotune.cli import main
from ferrotune.kernels._dispatch import cpu_interpreter
from ferrotune.models.llama import CausalLM
from ferrotune.models.llama import LlamaConfig as OurConfig
from ferrotune.models.load import load_model
from ferrotune.peft.lora import LoraConfig, apply_lora
from ferrotune.quant import blockwise as B
from ferrotune.quant import reference as R
from ferrotune.quant.load import load_nf4_model
from ferrotune.quant.nf4 import NF4Linear, quantize_linears
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM


def _linear(out_f: int = 40, in_f: int = 96, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f, bias=bias).to(torch.bfloat16)


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True)])
def test_dequantize_agrees_with_rust_and_reference(quant_type: str, double_quant: bool) -> None:
    lin = _linear(37, 96)  # 3552 elements: a partial last block
    layer = NF4Linear.from_linear(lin, quant_type=quant_type, double_quant=double_quant)
    rust = B.dequantize_4bit(layer.qweight, layer.quant_state, torch.bfloat16)
    absmax = layer.quant_state.float_absmax()
    ref = R.dequantize_4bit(layer.qweight, absmax, 37 * 96, 64, quant_type, torch.bfloat16).view(37, 96)
    assert torch.equal(layer.dequantize().view(torch.int16), rust.view(torch.int16))
    assert torch.equal(rust.view(torch.int16), ref.view(torch.int16))
    assert (layer.weight.float() - lin.weight.float()).abs().max() <= 0.2 * lin.weight.abs().max().float()


@pytest.mark.parametrize("double_quant", [True, False])
def test_triton_kernel_matches_the_torch_path(double_quant: bool) -> None:
    """The Triton kernel against the PyTorch path: on a GPU bit for bit in every dtype; without one
    under Triton's CPU interpreter, bit for bit in fp32 and fp16 (the interpreter narrows to bf16 by
    truncation, not the GPU's round-to-nearest-even, so bf16 is checked to one ulp there)."""
    layer = NF4Linear.from_linear(_linear(33, 128), double_quant=double_quant)
    on_gpu = torch.cuda.is_available()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        torch_path = layer.dequantize(dtype)  # CPU tensors: the PyTorch path
        if on_gpu:
            triton_path = copy.deepcopy(layer).cuda().dequantize(dtype).cpu()
        else:
            with cpu_interpreter():
                triton_path = layer.dequantize(dtype)
        if dtype == torch.bfloat16 and not on_gpu:
            ulp = (torch_path.view(torch.int16).int() - triton_path.view(torch.int16).int()).abs()
            assert ulp.max() <= 1
        else:
            assert torch.equal(torch_path, triton_path), dtype


def test_forward_and_backward_give_gradient_to_the_input_only() -> None:
    layer = NF4Linear.from_linear(_linear())
    x = torch.randn(2, 3, 96, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    w = layer.dequantize()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, w, layer.bias)
    assert torch.equal(y, y2)
    grad = torch.randn_like(y)
    y.backward(grad)
    y2.backward(grad)
    assert torch.equal(x.grad, x2.grad)
    assert all(not p.requires_grad for p in layer.parameters())
    assert layer.bias is not None and layer.bias.grad is None


def _our_model() -> CausalLM:
    config = OurConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = CausalLM(config)
    model.init_weights(std=0.05)
    return model.to(torch.bfloat16)


def test_quantize_linears_keeps_lm_head_and_survives_dtype_casts() -> None:
    model = _our_model()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        before = model(ids).float()
    replaced = quantize_linears(model)
    assert len(replaced) == 14 and "lm_head" not in replaced
    assert type(model.lm_head) is nn.Linear
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, NF4Linear)
    absmax = layer.quant_state.float_absmax().clone()
    model.to(torch.float32).to(torch.bfloat16)  # float casts must not touch the 4-bit statistics
    assert torch.equal(layer.quant_state.float_absmax(), absmax)
    with torch.no_grad():
        after = model(ids).float()
    assert torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0) > 0.97


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nf4")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "bf16")
    assert main(["quantize", str(root / "bf16"), str(root / "ours"), "--quiet"]) == 0
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    theirs = AutoModelForCausalLM.from_pretrained(root / "bf16", quantization_config=bnb, device_map="cpu")
    theirs.save_pretrained(root / "hub")  # what a published bitsandbytes checkpoint holds
    return {"bf16": root / "bf16", "ours": root / "ours", "hub": root / "hub"}


def _bnb_weights(folder: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.bfloat16)
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit":
            state = copy.copy(module.weight.quant_state)
            shape, state.shape = state.shape, torch.Size([state.shape.numel()])
            out[name] = bnb_functional.dequantize_4bit(module.weight.data, state).view(shape)
    return out


@pytest.mark.parametrize("which", ["ours", "hub"])
def test_loads_bitsandbytes_checkpoints(checkpoints: dict[str, Path], which: str) -> None:
    model = load_nf4_model(checkpoints[which])
    expected = _bnb_weights(checkpoints[which])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert sorted(layers) == sorted(expected)
    for name, layer in layers.items():
        assert torch.equal(layer.dequantize(), expected[name]), name
    reference = load_model(checkpoints["bf16"])
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        a, b = model(ids).float(), reference(ids).float()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.97


def test_quantizes_16bit_checkpoints_while_loading(checkpoints: dict[str, Path]) -> None:
    loaded = load_nf4_model(checkpoints["bf16"])
    reference = load_model(checkpoints["bf16"])
    quantize_linears(reference)
    for (name, a), (_, b) in zip(loaded.named_modules(), reference.named_modules(), strict=True):
        if isinstance(a, NF4Linear):
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.absmax_raw, b.absmax_raw), name
    assert not any(p.is_meta for p in loaded.parameters())
    # the checkpoint from `ferrotune quantize` holds the same bytes
    ours = load_nf4_model(checkpoints["ours"])
    for (name, a), (_, b) in zip(loaded.named_modules(), ours.named_modules(), strict=True):
        if isinstance(a, NF4Linear):
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.absmax_raw, b.absmax_raw), name


def test_lora_trains_on_a_4bit_base(checkpoints: dict[str, Path]) -> None:
    model = load_nf4_model(checkpoints["ours"])
    targets = apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    assert len(targets) == 14
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 128, (4, 12))
    losses = []
    for _ in range(4):
        logits = model(ids[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, b in model.named_buffers():
        assert torch.equal(b, frozen[n]), n


def test_bnb_state_dict_round_trips_the_checkpoint_bytes(checkpoints: dict[str, Path]) -> None:
    """A layer loaded from `ferrotune quantize` output gives back bitsandbytes' tensors, byte for byte."""
    from safetensors import safe_open

    model = load_nf4_model(checkpoints["ours"])
    stored = {}
    for file in checkpoints["ours"].glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            stored.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (not a Mapping)
    prefix = "model.layers.1.mlp.down_proj."
    ours = model.get_submodule(prefix[:-1]).bnb_state_dict(prefix)
    assert sorted(ours) == sorted(k for k in stored if k.startswith(prefix))
    for key, value in ours.items():
        assert torch.equal(value, stored[key]), key


def test_merging_lora_into_an_nf4_base_is_refused_not_silently_skipped() -> None:
    from ferrotune.errors import ConfigError
    from ferrotune.peft import LoraConfig, apply_peft, merge

    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    quantize_linears(model, skip=())
    apply_peft(model, LoraConfig(r=4, target_modules=["0"]))
    with pytest.raises(ConfigError, match="ferrotune merge"):
        merge(model)

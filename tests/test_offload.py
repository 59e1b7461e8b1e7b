"""Activation offload (`train.activation_offload`, ferrotune.train.offload) and selective
checkpointing (`model.checkpoint_layers`): training with them gives the same loss and gradients
as without, and the config keys reach the model. On the CPU the offload copies host to host, so
the offload path itself runs here; the GPU figure comes from bench/train_gpu.py."""

from __future__ import annotations

import pytest
import torch
from ferrotune.config import load_config
from ferrotune.errors import ConfigError
from ferrotune.kernels.lora import set_fused_lora
from ferrotune.models.llama import CausalLM, LlamaConfig
from ferrotune.peft import LoraConfig, apply_peft

LAYERS, HIDDEN, VOCAB = 3, 32, 97


def tiny_model(method: str = "full", dropout: float = 0.0, device: str = "cpu") -> torch.nn.Module:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = CausalLM(config)
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    model.model.attention_backend = "sdpa"
    model.to(device)
    if method == "lora":
        model = apply_peft(model, LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))
        for name, p in model.named_parameters():  # non-zero B, so every LoRA gradient is non-zero
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return model.train()


def inner(model: torch.nn.Module) -> CausalLM:
    found = [m for m in model.modules() if isinstance(m, CausalLM)]
    return found[0]


def loss_and_grads(model, *, checkpoint: bool, offload: bool, layers=None, autocast=False):
    lm = inner(model)
    lm.gradient_checkpointing = checkpoint
    lm.model.checkpointed_layers = layers
    lm.model.activation_offload = offload
    device = lm.lm_head.weight.device
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g).to(device)
    document_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12], dtype=torch.int32, device=device)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12).contiguous()
    position_ids[1] = torch.arange(12)
    position_ids = position_ids.to(device)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # dropout masks (CPU and CUDA generators)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids, position_ids=position_ids, document_ids=document_ids)
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, VOCAB), ids.roll(-1, 1).view(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def assert_same(a, b, tol=0.0):
    torch.testing.assert_close(a[0], b[0], atol=tol, rtol=tol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=tol, rtol=tol, msg=name)


CASES = [("full", 0.0, "auto", "cpu"), ("lora", 0.0, "never", "cpu"), ("lora", 0.2, "never", "cpu"),
         ("lora", 0.2, "always", "cpu")]  # fmt: skip
if torch.cuda.is_available():  # pinned host memory, the side stream and the prefetch, for real
    CASES += [("full", 0.0, "auto", "cuda"), ("lora", 0.2, "auto", "cuda")]


@pytest.mark.parametrize(("method", "dropout", "fused_lora", "device"), CASES)
def test_offloaded_checkpointing_gives_the_same_loss_and_grads(method, dropout, fused_lora, device):
    set_fused_lora(fused_lora)  # "always": the fused LoRA node inside the offloaded blocks
    try:
        run_offload_case(method, dropout, device)
    finally:
        set_fused_lora("auto")


def run_offload_case(method: str, dropout: float, device: str = "cpu") -> None:
    model = tiny_model(method, dropout, device)
    plain = loss_and_grads(model, checkpoint=False, offload=False)
    checkpointed = loss_and_grads(model, checkpoint=True, offload=False)
    offloaded = loss_and_grads(model, checkpoint=True, offload=True)
    tol = 1e-6 if device == "cpu" else 2e-5  # CUDA backward kernels may sum in another order
    assert_same(checkpointed, plain, tol=tol)
    assert_same(offloaded, checkpointed, tol=tol)  # dropout replays the forward's masks
    stats = inner(model).model._offloader.stats
    block_input = 2 * 12 * HIDDEN * 4  # (B, T, hidden) fp32
    assert stats.blocks == LAYERS and stats.passes == 1
    assert stats.to_host_bytes == stats.to_device_bytes == LAYERS * block_input


def test_offload_under_autocast_replays_the_autocast_state():
    model = tiny_model("lora")
    checkpointed = loss_and_grads(model, checkpoint=True, offload=False, autocast=True)
    offloaded = loss_and_grads(model, checkpoint=True, offload=True, autocast=True)
    assert_same(offloaded, checkpointed, tol=1e-6)


def test_selective_checkpointing_offloads_only_the_checkpointed_blocks():
    model = tiny_model("full")
    plain = loss_and_grads(model, checkpoint=False, offload=False)
    offloaded = loss_and_grads(model, checkpoint=True, offload=True, layers=2)
    assert_same(offloaded, plain, tol=1e-6)
    assert inner(model).model._offloader.stats.blocks == 2


def test_no_offload_without_a_graph():
    model = tiny_model("full")
    inner(model).gradient_checkpointing = True
    inner(model).model.activation_offload = True
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert inner(model).model._offloader is None


# ---------------------------------------------------------------- config keys


@pytest.mark.parametrize(("value", "expected"), [('"all"', None), ("0", None), ("2", 2)])
def test_checkpoint_layers_maps_to_checkpointed_layers(value, expected):
    from ferrotune.train.run import build_model

    init = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 48, "num_hidden_layers": LAYERS,
            "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    config = load_config(None, [f"model.checkpoint_layers={value}", "model.gradient_checkpointing=true",
                                "train.activation_offload=true", "train.precision=fp32"])  # fmt: skip
    config.model.init = init
    model = build_model(config, torch.device("cpu"))
    assert model.model.checkpointed_layers == expected
    assert model.gradient_checkpointing and model.model.activation_offload


@pytest.mark.parametrize("value", ["-1", '"some"', "true", "1.5"])
def test_bad_checkpoint_layers_names_the_key(value):
    with pytest.raises(ConfigError, match=r"model\.checkpoint_layers"):
        load_config(None, [f"model.checkpoint_layers={value}"])


def test_activation_offload_needs_checkpointing():
    from ferrotune.train.run import build_model

    config = load_config(None, ["train.activation_offload=true"])
    config.model.init = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 48,
                         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    with pytest.raises(ConfigError, match=r"train\.activation_offload"):
        build_model(config, torch.device("cpu"))

"""AdamW8bit: its maps are bitsandbytes' own, and over a few steps it follows fp32 AdamW."""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import torch
from ferrotune.train.optim8bit import AdamW8bit, BlockwiseQuantizer, dynamic_map
from torch import nn


def test_maps_are_bitsandbytes_dynamic_maps() -> None:
    for signed in (True, False):
        theirs = bnb_functional.create_dynamic_map(signed=signed)
        assert torch.equal(dynamic_map(signed).view(torch.int32), theirs.view(torch.int32)), signed


def test_blockwise_roundtrip_is_nearest_code() -> None:
    q = BlockwiseQuantizer(signed=True, blocksize=256, device=torch.device("cpu"))
    x = torch.randn(1000) * 1e-3
    codes, absmax = q.quantize(x)
    back = q.dequantize(codes, absmax)
    scaled = x.view(-1)[:768].view(3, 256) / absmax[:3, None]
    nearest = (scaled[..., None] - q.code).abs().argmin(-1)
    assert torch.equal(codes[:768].view(3, 256).long(), nearest)
    assert ((back - x).abs() <= absmax.repeat_interleave(256)[:1000] * 0.02).all()


def _train(
    optimizer_cls: type, steps: int = 15, **kwargs: float
) -> tuple[list[float], nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 8))
    data = torch.randn(256, 64)
    target = torch.randn(256, 8)
    opt = optimizer_cls(model.parameters(), lr=3e-3, weight_decay=0.01, **kwargs)
    losses = []
    for step in range(steps):
        batch = slice(32 * (step % 8), 32 * (step % 8 + 1))
        loss = nn.functional.mse_loss(model(data[batch]), target[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model, opt


def test_follows_fp32_adamw_within_tolerance() -> None:
    ref_losses, ref, _ = _train(torch.optim.AdamW)
    losses, model, opt = _train(AdamW8bit)
    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 8))
    for (name, p), q, p0 in zip(model.named_parameters(), ref.parameters(), start.parameters(), strict=True):
        moved = (q - p0).abs().max()
        assert (p - q).abs().max() <= 0.05 * moved, name  # within 5% of how far AdamW moved it
    for a, b in zip(losses, ref_losses, strict=True):
        assert abs(a - b) <= 0.005 * b
    # the 64x128 matrix (8192 elements) has 8-bit moments; the others (< 4096) fp32 ones
    states = list(opt.state.values())
    assert states[0]["exp_avg_q"].dtype == torch.uint8 and "exp_avg" in states[1]
    eight_bit = states[0]
    assert sum(t.numel() * t.element_size() for k, t in eight_bit.items() if k != "step") < 2.1 * 8192


def test_small_parameters_match_fp32_adamw_exactly_enough() -> None:
    _, ref, _ = _train(torch.optim.AdamW, steps=5)
    _, model, _ = _train(AdamW8bit, steps=5, min_8bit_size=10**9)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_training_config_selects_adamw8bit_and_it_trains() -> None:
    from ferrotune.config import TrainConfig
    from ferrotune.train.loop import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 1))
    opt = build_optimizer(model, TrainConfig(optimizer="adamw8bit", lr=1e-2, weight_decay=0.1))
    assert isinstance(opt, AdamW8bit)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # matrices decay, vectors not
    x = torch.randn(256, 64)
    y = x[:, :1] * 2 - x[:, 1:2]
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]

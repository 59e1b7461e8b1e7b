"""AdamW with 8-bit moments (blockwise dynamic quantization, as bitsandbytes' `AdamW8bit`).

Each step, per parameter p with gradient g (all arithmetic in fp32):

    m, v  = dequant(m_q), dequant(v_q)                  x = code[q] * absmax[block]
    m     = b1 m + (1 - b1) g
    v     = b2 v + (1 - b2) g^2
    p     = p (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    m_q   = quant(m, signed dynamic map), v_q = quant(v, unsigned dynamic map)

`quant` is blockwise (blocks of `blocksize` consecutive elements): absmax = max |x| of the block,
then each x / absmax rounds to the nearest of the map's 256 values. The dynamic maps give
fine steps near zero (down to 1e-7 of the absmax), which is what the moments need. State takes
2 bytes per parameter plus 8 bytes per block, against 8 bytes for fp32 AdamW. Parameters with
fewer than `min_8bit_size` elements keep fp32 moments (as bitsandbytes does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def dynamic_map(signed: bool) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (`create_dynamic_map(signed)`): 7 exponent levels e, each
    with the means of `linspace(0.1, 1, k + 1)` scaled by 10**(e - 6) (k = 2**e, or 2**(e+1) for
    the unsigned map), negated copies when signed, plus 0 and 1; 256 sorted fp32 values."""
    values = []
    for e in range(7):
        k = 2**e if signed else 2 ** (e + 1)
        bounds = torch.linspace(0.1, 1, k + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values.append(10 ** (e - 6) * means)
        if signed:
            values.append(-(10 ** (e - 6)) * means)
    values.append(torch.tensor([0.0, 1.0]))
    data = torch.cat(values)
    data = torch.cat([data, torch.zeros(256 - data.numel())])
    return torch.sort(data.float()).values


class BlockwiseQuantizer:
    """8-bit blockwise quantization with one dynamic map (nearest value, ties to the lower)."""

    def __init__(self, signed: bool, blocksize: int, device: torch.device):
        self.code = dynamic_map(signed).to(device)  # (256,)
        self.midpoints = (self.code[:-1] + self.code[1:]) / 2  # (255,)
        self.blocksize = blocksize

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) fp32 -> (codes uint8 (n,), absmax fp32 (blocks,))."""
        n = x.numel()
        blocks = -(-n // self.blocksize)
        padded = torch.nn.functional.pad(x.reshape(-1), (0, blocks * self.blocksize - n))
        view = padded.view(blocks, self.blocksize)
        absmax = view.abs().amax(dim=1)  # (blocks,)
        scaled = view / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        codes = torch.bucketize(scaled.clamp(-1, 1), self.midpoints)  # nearest map value
        return codes.view(-1)[:n].to(torch.uint8), absmax

    def dequantize(self, codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        n = codes.numel()
        values = self.code[codes.long()]
        blocks = absmax.numel()
        padded = torch.nn.functional.pad(values, (0, blocks * self.blocksize - n))
        return (padded.view(blocks, self.blocksize) * absmax[:, None]).view(-1)[:n]


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are stored in 8 bits (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        blocksize: int = 256,
        min_8bit_size: int = 4096,
    ):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW8bit settings lr={lr} betas={betas} eps={eps}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.blocksize = blocksize
        self.min_8bit_size = min_8bit_size
        self._quantizers: dict[tuple[bool, torch.device], BlockwiseQuantizer] = {}

    def _quantizer(self, signed: bool, device: torch.device) -> BlockwiseQuantizer:
        key = (signed, device)
        if key not in self._quantizers:
            self._quantizers[key] = BlockwiseQuantizer(signed, self.blocksize, device)
        return self._quantizers[key]

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state tensors."""
        return sum(
            t.numel() * t.element_size()
            for s in self.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float().reshape(-1)
                state = self.state[p]
                eight_bit = p.numel() >= self.min_8bit_size
                if not state:
                    state["step"] = 0
                    if eight_bit:
                        blocks = -(-p.numel() // self.blocksize)
                        state["exp_avg_q"] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
                        state["exp_avg_absmax"] = torch.zeros(blocks, device=p.device)
                        state["exp_avg_sq_q"] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
                        state["exp_avg_sq_absmax"] = torch.zeros(blocks, device=p.device)
                    else:
                        state["exp_avg"] = torch.zeros(p.numel(), device=p.device)
                        state["exp_avg_sq"] = torch.zeros(p.numel(), device=p.device)
                state["step"] += 1
                t = state["step"]
                signed, unsigned = self._quantizer(True, p.device), self._quantizer(False, p.device)
                if eight_bit:
                    m = signed.dequantize(state["exp_avg_q"], state["exp_avg_absmax"])
                    v = unsigned.dequantize(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"])
                else:
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                step_size = lr / (1 - b1**t)
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                update = p.detach().float().reshape(-1)
                if wd:
                    update.mul_(1 - lr * wd)
                update.addcdiv_(m, denom, value=-step_size)
                p.copy_(update.view_as(p).to(p.dtype))
                if eight_bit:
                    state["exp_avg_q"], state["exp_avg_absmax"] = signed.quantize(m)
                    state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = unsigned.quantize(v)
        return loss

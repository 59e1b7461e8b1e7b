"""A LoRA linear layer as one autograd node:

    y = x Wᵀ + b + s · (D(x) Aᵀ) Bᵀ          W (out, in) frozen, A (r, in), B (out, r)
                                            D: dropout (keep-mask M, scale 1/(1-p)); s: scaling

Backward, with g = dy (N, out) and u = s · g B (N, r):

    dB = s · gᵀ (D(x) Aᵀ)        (out, r)   from the saved (N, r) product xa = D(x) Aᵀ
    dA = uᵀ D(x)                 (r, in)    D(x) rebuilt from x and the bit-packed mask
    dx = g W + (u A) ⊙ D(1)      (N, in)    the LoRA term added into g W in place when p = 0
    db = Σ_rows g                           only when the bias trains

What this saves against the plain module composition (`lora_linear_reference`: base linear,
dropout, A linear, B linear, scale, add):
- saved for backward: x (in the compute dtype) and xa (N, r) only. The plain path keeps
  dropout(x) (a full (N, in) copy) and its mask (a byte per element) when p > 0, where this
  node keeps x and the mask as bits (in / 8 bytes a row); under autocast the plain path also
  keeps the bf16 casts of A and B, and of W when W is wider (this node casts W again in
  backward). With p = 0 and no autocast both keep x and xa.
- the LoRA up-projection is the epilogue of one GEMM (`addmm_` into the base output with
  alpha = s), so the (N, out) intermediates delta, s·delta and y + delta are never made; in
  backward dx takes the LoRA term in place (`addmm_`) instead of adding two (N, in) tensors.
- W is never saved: a 16-bit W is a parameter (kept anyway); an NF4 base passes a dequantizer
  (`weight` callable) that runs again in backward, as `NF4Linear` does.
- no dW (frozen base) unless W itself requires grad.

The dropout mask is drawn exactly as the plain path draws it (`F.dropout` on ones of the same
shape and dtype consumes the global RNG identically), so with a fixed seed both paths see the
same mask. Under autocast, the node computes in the autocast dtype (as the plain linears would)
and hands gradients back in each input's own dtype. DoRA is not fused (its row norm needs the
full W + sBA, so `LoraLinear` keeps the plain path for it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ferrotune.kernels import _dispatch

WeightSource = torch.Tensor | Callable[[torch.dtype], torch.Tensor]

_fused_mode = "auto"


def set_fused_lora(mode: str) -> None:
    """Where `LoraLinear` takes the fused node: "auto" (where the fast paths run: CUDA, or the
    CPU inside `cpu_interpreter()`), "always" (any device: the node is plain PyTorch) or "never"
    (the plain composition: the reference for benchmarks). `set_enabled(False)` overrides all."""
    global _fused_mode
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"fused LoRA mode must be auto, always or never, got {mode!r}")
    _fused_mode = mode


def fused_lora_runs_on(x: torch.Tensor) -> bool:
    if _fused_mode == "never" or not _dispatch._enabled:
        return False
    return _fused_mode == "always" or _dispatch.triton_runs_on(x)


_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    if device not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[device] = (2 ** torch.arange(8, device=device)).to(torch.uint8)  # (8,)
    return _BIT_WEIGHTS[device]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool (any shape, n elements) -> uint8 (ceil(n/8),), element i at bit i % 8 of byte i // 8."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    return (flat.view(-1, 8).to(torch.uint8) * _bit_weights(flat.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of `pack_bits`: bool tensor of `shape`."""
    n = shape.numel()
    bits = (packed[:, None] & _bit_weights(packed.device)) != 0  # (bytes, 8)
    return bits.reshape(-1)[:n].view(shape)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else x's dtype."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _weight(source: WeightSource, dtype: torch.dtype) -> torch.Tensor:
    return source(dtype) if callable(source) else source.to(dtype)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,  # (..., in)
        weight: torch.Tensor | None,  # (out, in), or None when `dequantize` gives it
        bias: torch.Tensor | None,  # (out,)
        lora_a: torch.Tensor,  # (r, in)
        lora_b: torch.Tensor,  # (out, r)
        scaling: float,
        dropout: float,
        dequantize: Callable[[torch.dtype], torch.Tensor] | None,
    ) -> torch.Tensor:
        dtype = _compute_dtype(x)
        device_type = x.device.type
        with torch.autocast(device_type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
            w = _weight(dequantize if dequantize is not None else weight, dtype)  # type: ignore[arg-type]
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            mask_bits = None
            if dropout > 0:
                # The plain path's mask: same RNG draw as F.dropout on an input of this shape/dtype.
                noise = F.dropout(torch.ones(x2.shape, dtype=lora_a.dtype, device=x.device), dropout)
                mask_bits = pack_bits(noise != 0)
                xa = (x2 * noise.to(dtype)) @ a.t()  # (N, r)
            else:
                xa = x2 @ a.t()  # (N, r)
            y = F.linear(x2, w, None if bias is None else bias.to(dtype))  # (N, out)
            y.addmm_(xa, b.t(), alpha=scaling)  # the LoRA up-projection as the GEMM's epilogue
        saved_weight = weight if dequantize is None else None
        # x itself when it is already in the compute dtype (shared with the layer's other
        # consumers, e.g. q/k/v), else its cast (as the plain autocast linear would keep it)
        saved_x = x if x.dtype == dtype else x2
        ctx.save_for_backward(saved_x, saved_weight, lora_a, lora_b, xa, mask_bits)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.dequantize = dequantize
        ctx.scaling, ctx.dropout, ctx.dtype, ctx.has_bias = scaling, dropout, dtype, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x, weight, lora_a, lora_b, xa, mask_bits = ctx.saved_tensors
        dtype, s = ctx.dtype, ctx.scaling
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        with torch.autocast(dy.device.type, enabled=False):
            g = dy.reshape(-1, dy.shape[-1]).to(dtype)  # (N, out)
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            u = (g @ b).mul_(s)  # (N, r)
            noise = None
            if mask_bits is not None:
                keep = unpack_bits(mask_bits, x2.shape)
                # the forward's noise: 0 or 1/(1-p) rounded as F.dropout rounds it
                noise = keep.to(lora_a.dtype).div_(1 - ctx.dropout).to(dtype)  # (N, in)
            dx = dw = dbias = da = db = None
            if need_x:
                w = _weight(ctx.dequantize if ctx.dequantize is not None else weight, dtype)
                # (N, in): g W + u A, the LoRA term added in place when there is no mask
                dx = (g @ w).addmm_(u, a) if noise is None else torch.addcmul(g @ w, u @ a, noise)
                dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
            if need_w and weight is not None:
                dw = (g.t() @ x2).to(weight.dtype)  # (out, in)
            if need_bias and ctx.has_bias:
                dbias = g.sum(0).to(ctx.bias_dtype)
            if need_a:
                xd = x2 if noise is None else x2 * noise  # (N, in)
                da = (u.t() @ xd).to(lora_a.dtype)  # (r, in)
            if need_b:
                db = (g.t() @ xa).mul_(s).to(lora_b.dtype)  # (out, r)
        return dx, dw, dbias, da, db, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: WeightSource,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ as one autograd node (see the module docstring).
    `weight` is the (out, in) tensor, or a callable dtype -> (out, in) tensor (an NF4 base's
    dequantizer, called again in backward instead of keeping the matrix). `dropout` is the
    probability in use (0 in eval mode)."""
    if callable(weight) and not isinstance(weight, torch.Tensor):
        return _LoraLinear.apply(x, None, bias, lora_a, lora_b, scaling, dropout, weight)
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, scaling, dropout, None)


def lora_linear_reference(
    x: torch.Tensor,
    weight: WeightSource,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The plain composition `LoraLinear` runs without the fused path: base linear, then
    B(A(dropout(x))) · s added on."""
    w = weight(x.dtype) if callable(weight) and not isinstance(weight, torch.Tensor) else weight
    base = F.linear(x, w, bias)
    xa = x.to(lora_a.dtype)
    delta = F.linear(F.linear(F.dropout(xa, dropout) if dropout > 0 else xa, lora_a), lora_b) * scaling
    return base + delta.to(base.dtype)

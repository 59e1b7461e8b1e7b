"""Rotary position embeddings in Hugging Face's layout (the two halves of each head rotate
together; no interleaving), so weights need no permutation:

    x = [x1, x2] (halves of head_dim), cos/sin of shape (B, T, head_dim) with equal halves
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin

Backward is the same rotation by -angle: dx1 = dy1 * cos + dy2 * sin, dx2 = dy2 * cos - dy1 * sin.
The Triton kernel runs one program per (batch, position) and rotates every head there.
"""

from __future__ import annotations

import torch

from ferrotune.kernels._dispatch import HAVE_TRITON, triton_runs_on

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_kernel(
        X, COS, SIN, Y, T, n_heads, half,
        sx_b, sx_t, sx_h, sc_b, sc_t, sy_b, sy_t, sy_h,
        BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b = pid // T
        t = pid % T
        d = tl.arange(0, BLOCK_D)
        h = tl.arange(0, BLOCK_H)
        dmask = d < half
        cos = tl.load(COS + b * sc_b + t * sc_t + d, mask=dmask, other=0.0).to(tl.float32)
        sin = tl.load(SIN + b * sc_b + t * sc_t + d, mask=dmask, other=0.0).to(tl.float32)
        if BACKWARD:
            sin = -sin
        mask = (h[:, None] < n_heads) & dmask[None, :]
        x_base = X + b * sx_b + t * sx_t + h[:, None] * sx_h + d[None, :]
        x1 = tl.load(x_base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + half, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * cos[None, :] - x2 * sin[None, :]
        y2 = x2 * cos[None, :] + x1 * sin[None, :]
        y_base = Y + b * sy_b + t * sy_t + h[:, None] * sy_h + d[None, :]
        tl.store(y_base, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(y_base + half, y2.to(Y.dtype.element_ty), mask=mask)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos, sin: (B, T, D). Plain PyTorch, as transformers computes it."""
    cos = cos.unsqueeze(2)  # (B, T, 1, D)
    sin = sin.unsqueeze(2)
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    bsz, seq, n_heads, dim = x.shape
    cos = cos.expand(bsz, seq, dim)
    sin = sin.expand(bsz, seq, dim)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(bsz, seq, n_heads, dim, dtype=x.dtype, device=x.device)
    half = dim // 2
    _rope_kernel[(bsz * seq,)](
        x, cos, sin, y, seq, n_heads, half,
        x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1), y.stride(0), y.stride(1), y.stride(2),
        BACKWARD=backward, BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_D=triton.next_power_of_2(half),
    )  # fmt: skip
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, backward=True), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x: (B, T, H, D) (any strides with a contiguous last dim) by cos/sin: (B or 1, T, D)
    or (T, D).
    Gradients flow to x only (cos and sin are position tables)."""
    if triton_runs_on(x) and x.shape[-1] % 2 == 0:
        return _Rope.apply(x, cos, sin)
    full = (x.shape[0], x.shape[1], x.shape[-1])
    return apply_rope_reference(x, cos.expand(full), sin.expand(full))

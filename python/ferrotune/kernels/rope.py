"""Rotary position embeddings in Hugging Face's layout (the two halves of each head rotate
together; no interleaving), so weights need no permutation:

    x = [x1, x2] (halves of head_dim), cos/sin of shape (B, T, head_dim) with equal halves
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin

Backward is the same rotation by -angle: dx1 = dy1 * cos + dy2 * sin, dx2 = dy2 * cos - dy1 * sin.
The Triton kernel runs one program per (batch, position) and rotates every head there; attention
rotates its queries and keys in one launch (`apply_rope_pair`), reading the position's cos/sin once.
"""

from __future__ import annotations

import torch

from ferrotune.kernels._dispatch import HAVE_TRITON, triton_runs_on

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(
        X, Y, b, t, n_heads, half, sx_b, sx_t, sx_h, sy_b, sy_t, sy_h, cos, sin, d, dmask,
        BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        """Rotates the n_heads heads of x[b, t] by (cos, sin) (BLOCK_D,) fp32 into y[b, t]."""
        h = tl.arange(0, BLOCK_H)
        mask = (h[:, None] < n_heads) & dmask[None, :]
        x_base = X + b * sx_b + t * sx_t + h[:, None] * sx_h + d[None, :]
        x1 = tl.load(x_base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + half, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * cos[None, :] - x2 * sin[None, :]
        y2 = x2 * cos[None, :] + x1 * sin[None, :]
        y_base = Y + b * sy_b + t * sy_t + h[:, None] * sy_h + d[None, :]
        tl.store(y_base, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(y_base + half, y2.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        X, Z, COS, SIN, Y, W, T, n_x, n_z, half,
        sx_b, sx_t, sx_h, sz_b, sz_t, sz_h, sc_b, sc_t, sy_b, sy_t, sy_h, sw_b, sw_t, sw_h,
        BACKWARD: tl.constexpr, PAIR: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Z: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """y = rope(x) and, with PAIR, w = rope(z) at the same position (queries and keys)."""
        pid = tl.program_id(0)
        b = pid // T
        t = pid % T
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        cos = tl.load(COS + b * sc_b + t * sc_t + d, mask=dmask, other=0.0).to(tl.float32)
        sin = tl.load(SIN + b * sc_b + t * sc_t + d, mask=dmask, other=0.0).to(tl.float32)
        if BACKWARD:
            sin = -sin
        _rotate_heads(X, Y, b, t, n_x, half, sx_b, sx_t, sx_h, sy_b, sy_t, sy_h, cos, sin, d, dmask, BLOCK_X)
        if PAIR:
            _rotate_heads(
                Z, W, b, t, n_z, half, sz_b, sz_t, sz_h, sw_b, sw_t, sw_h, cos, sin, d, dmask, BLOCK_Z
            )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos, sin: (B, T, D). Plain PyTorch, as transformers computes it."""
    cos = cos.unsqueeze(2)  # (B, T, 1, D)
    sin = sin.unsqueeze(2)
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


def _token_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(
    x: torch.Tensor,  # (B, T, H, D)
    z: torch.Tensor | None,  # (B, T, H', D) rotated at the same positions, or None
    cos: torch.Tensor,  # (B or 1, T, D) or (T, D)
    sin: torch.Tensor,
    backward: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    bsz, seq, n_x, dim = x.shape
    cos = cos.expand(bsz, seq, dim)
    sin = sin.expand(bsz, seq, dim)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    x = _token_major(x)
    y = torch.empty(bsz, seq, n_x, dim, dtype=x.dtype, device=x.device)
    pair = z is not None
    z = _token_major(z) if z is not None else x
    w = torch.empty(bsz, seq, z.shape[2], dim, dtype=z.dtype, device=z.device) if pair else y
    half = dim // 2
    _rope_kernel[(bsz * seq,)](
        x, z, cos, sin, y, w, seq, n_x, z.shape[2], half,
        x.stride(0), x.stride(1), x.stride(2), z.stride(0), z.stride(1), z.stride(2),
        cos.stride(0), cos.stride(1), y.stride(0), y.stride(1), y.stride(2), w.stride(0), w.stride(1), w.stride(2),
        BACKWARD=backward, PAIR=pair, BLOCK_X=triton.next_power_of_2(n_x),
        BLOCK_Z=triton.next_power_of_2(z.shape[2]), BLOCK_D=triton.next_power_of_2(half),
    )  # fmt: skip
    return y, (w if pair else None)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _launch(x, None, cos, sin, backward=False)[0]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _launch(dy, None, cos, sin, backward=True)[0], None, None


class _RopePair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        ctx.set_materialize_grads(False)  # an output outside the loss gives its input no gradient
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor | None, dk: torch.Tensor | None):
        cos, sin = ctx.saved_tensors
        if dq is None or dk is None:  # one of them took no part in the loss
            dq_in = _launch(dq, None, cos, sin, backward=True)[0] if dq is not None else None
            dk_in = _launch(dk, None, cos, sin, backward=True)[0] if dk is not None else None
            return dq_in, dk_in, None, None
        dq_in, dk_in = _launch(dq, dk, cos, sin, backward=True)
        return dq_in, dk_in, None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x: (B, T, H, D) (any strides with a contiguous last dim) by cos/sin: (B or 1, T, D)
    or (T, D).
    Gradients flow to x only (cos and sin are position tables)."""
    if triton_runs_on(x) and x.shape[-1] % 2 == 0:
        return _Rope.apply(x, cos, sin)
    full = (x.shape[0], x.shape[1], x.shape[-1])
    return apply_rope_reference(x, cos.expand(full), sin.expand(full))


def apply_rope_pair(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(apply_rope(q, cos, sin), apply_rope(k, cos, sin)) for queries (B, T, H, D) and keys
    (B, T, KV, D) at the same positions: one kernel launch each way on the Triton path."""
    if (
        triton_runs_on(q)
        and q.shape[-1] % 2 == 0
        and k.shape[:2] == q.shape[:2]
        and k.shape[-1] == q.shape[-1]
    ):
        return _RopePair.apply(q, k, cos, sin)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

"""Attention's inputs from a block's normed input: the q, k and v projections as one GEMM each way,
with RoPE applied to q and k.

    [q | k | v] = x [W_q | W_k | W_v]ᵀ + [b_q | b_k | b_v]          x: (N, in), q: (N, H*D), k, v: (N, KV*D)
    q_rot, k_rot = rope(q), rope(k)

Backward gathers the three output gradients into one G = [dq | dk | dv] (N, (H + 2 KV) D): the RoPE
backward kernel writes dq and dk straight into their columns and dv is copied into its own; then

    dx = G W,   dW = Gᵀ x,   db = Σ_rows G

one GEMM each instead of three. On Llama-3.2-1B the key and value projections are 512 columns
against the queries' 2,048, and their own GEMMs run well below the device's rate. The reference
is the three projections and two RoPE calls (`qkv_rope_reference`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ferrotune.kernels.linear import shared_input_linears_reference
from ferrotune.kernels.rope import _launch as _rope_launch
from ferrotune.kernels.rope import apply_rope_reference


class _QKVRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wq, wk, wv, bq, bk, bv, cos, sin, heads: int, kv_heads: int):
        batch, length = x.shape[:2]
        n_q, n_kv = wq.shape[0], wk.shape[0]
        dim = n_q // heads
        weight = torch.cat((wq, wk, wv))  # (n_q + 2 n_kv, in)
        bias = torch.cat((bq, bk, bv)) if bq is not None else None
        y = F.linear(x, weight, bias)  # (B, T, n_q + 2 n_kv)
        q = y[..., :n_q].view(batch, length, heads, dim)  # views into y's columns
        k = y[..., n_q : n_q + n_kv].view(batch, length, kv_heads, dim)
        q_rot, k_rot = _rope_launch(q, k, cos, sin, backward=False)  # (B, T, H, D), (B, T, KV, D)
        # v gets its own storage, so y (five times wider) is not kept alive by attention
        v = y[..., n_q + n_kv :].reshape(batch, length, kv_heads, dim).contiguous()
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.sizes = (n_q, n_kv, heads, kv_heads, dim, bias is not None)
        ctx.set_materialize_grads(False)
        assert k_rot is not None
        return q_rot, k_rot, v

    @staticmethod
    def backward(ctx, dq_rot, dk_rot, dv):
        x, weight, cos, sin = ctx.saved_tensors
        n_q, n_kv, heads, kv_heads, dim, has_bias = ctx.sizes
        batch, length = x.shape[:2]
        grads = torch.empty(batch, length, n_q + 2 * n_kv, dtype=weight.dtype, device=x.device)  # G
        dq = grads[..., :n_q].view(batch, length, heads, dim)
        dk = grads[..., n_q : n_q + n_kv].view(batch, length, kv_heads, dim)
        if dq_rot is not None and dk_rot is not None:
            _rope_launch(dq_rot, dk_rot, cos, sin, backward=True, y=dq, w=dk)
        else:  # an output outside the loss: its columns are zero
            for d_rot, into in ((dq_rot, dq), (dk_rot, dk)):
                if d_rot is None:
                    into.zero_()
                else:
                    _rope_launch(d_rot, None, cos, sin, backward=True, y=into)
        dv_cols = grads[..., n_q + n_kv :]
        if dv is None:
            dv_cols.zero_()
        else:
            dv_cols.view(batch, length, kv_heads, dim).copy_(dv)  # one strided copy, whatever dv's layout
        g2 = grads.view(-1, grads.shape[-1])  # (N, n_q + 2 n_kv)
        needs = ctx.needs_input_grad
        dx = (g2 @ weight).view(x.shape) if needs[0] else None  # (B, T, in)
        # A projection whose output took no part in the loss gets no gradient (not zeros), as alone.
        reached = [g is not None for g in (dq_rot, dk_rot, dv)]
        dws: list[torch.Tensor | None] = [None] * 3
        dbs: list[torch.Tensor | None] = [None] * 3
        if any(needs[1:4]):
            dw = g2.t() @ x.reshape(
                -1, x.shape[-1]
            )  # (n_q + 2 n_kv, in): the weights' gradients as row blocks
            dws = [dw[:n_q], dw[n_q : n_q + n_kv], dw[n_q + n_kv :]]
        if has_bias and any(needs[4:7]):
            db = g2.sum(0)
            dbs = [db[:n_q], db[n_q : n_q + n_kv], db[n_q + n_kv :]]
        dws = [d if r and need else None for d, r, need in zip(dws, reached, needs[1:4], strict=True)]
        dbs = [d if r and need else None for d, r, need in zip(dbs, reached, needs[4:7], strict=True)]
        return dx, *dws, *dbs, None, None, None, None


def qkv_rope(
    x: torch.Tensor,  # (B, T, in)
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # W_q (H*D, in), W_k, W_v (KV*D, in)
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],  # all or none
    cos: torch.Tensor,  # (B or 1, T, D)
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rope(x W_qᵀ + b_q), rope(x W_kᵀ + b_k), x W_vᵀ + b_v) as (B, T, H, D), (B, T, KV, D),
    (B, T, KV, D): one GEMM each way for the three projections (see the module docstring). The
    caller keeps this to the Triton path, with x, the weights and the biases in one dtype."""
    return _QKVRope.apply(x, *weights, *biases, cos, sin, heads, kv_heads)


def qkv_rope_reference(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, length = x.shape[:2]
    q, k, v = shared_input_linears_reference(x, list(weights), list(biases))
    dim = q.shape[-1] // heads
    full = (batch, length, dim)
    q = apply_rope_reference(q.view(batch, length, heads, dim), cos.expand(full), sin.expand(full))
    k = apply_rope_reference(k.view(batch, length, kv_heads, dim), cos.expand(full), sin.expand(full))
    return q, k, v.view(batch, length, kv_heads, dim)

"""SwiGLU, the gated activation of Llama's MLP:

    h = silu(g) * u,  silu(g) = g * sigmoid(g)

Backward, with s = sigmoid(g):  dg = dh * u * s * (1 + g * (1 - s)),  du = dh * silu(g).
The Triton kernel fuses the elementwise work of both passes (one read of g and u, no silu(g)
intermediate kept for backward: it is recomputed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ferrotune.kernels._dispatch import HAVE_TRITON, triton_runs_on

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_forward(G, U, H, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0)
        silu = (g * tl.sigmoid(g)).to(u.dtype)
        tl.store(H + offs, silu * u, mask=mask)

    @triton.jit
    def _swiglu_backward(DH, G, U, DG, DU, H, n, BLOCK: tl.constexpr, WRITE_H: tl.constexpr):
        """dg, du from dh, g, u; with WRITE_H also the forward's h = silu(g) * u, rounded as the
        forward kernel rounds it (for the down projection's weight gradient)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u_stored = tl.load(U + offs, mask=mask, other=0.0)
        u = u_stored.to(tl.float32)
        s = tl.sigmoid(g)
        silu = g * s
        tl.store(DU + offs, (dh * silu).to(DU.dtype.element_ty), mask=mask)
        tl.store(DG + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
        if WRITE_H:
            tl.store(H + offs, silu.to(u_stored.dtype) * u_stored, mask=mask)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        h = torch.empty_like(up)
        n = h.numel()
        _swiglu_forward[(triton.cdiv(n, _BLOCK),)](gate, up, h, n, BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = dh.numel()
        _swiglu_backward[(triton.cdiv(n, _BLOCK),)](dh, gate, up, dg, du, dg, n, BLOCK=_BLOCK, WRITE_H=False)
        return dg, du


class _SwiGLULinear(torch.autograd.Function):
    """y = r + linear(silu(g) * u, W, b) keeping only g and u for backward: h = silu(g) * u, the
    widest activation of the MLP, is recomputed (elementwise, cheap) instead of stored. The
    residual r (optional) is added by the GEMM itself (its C operand) where dtypes allow, not by a
    separate pass. Under autocast, backward runs in the forward's autocast state, so bf16
    activations meet fp32 weights cast as in forward, and dW comes back in W's dtype."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, gate, up, weight, bias, residual):
        gate, up = gate.contiguous(), up.contiguous()
        h = swiglu(gate, up)  # (..., I)
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        if residual is None:
            return F.linear(h, weight, bias)
        gemm_adds = (
            bias is None
            and not torch.is_autocast_enabled(h.device.type)
            and residual.dtype == h.dtype == weight.dtype
            and residual.shape == (*h.shape[:-1], weight.shape[0])
        )
        if not gemm_adds:
            return residual + F.linear(h, weight, bias)
        h2 = h.reshape(-1, h.shape[-1])  # (N, I)
        return torch.addmm(residual.reshape(-1, weight.shape[0]), h2, weight.t()).view(residual.shape)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        gate, up, weight = ctx.saved_tensors
        with torch.no_grad():
            dy2 = dy.reshape(-1, dy.shape[-1])  # (N, O)
            dh = dy @ weight  # (..., I)
            need_weight = ctx.needs_input_grad[2]
            if triton_runs_on(gate):
                # one pass over g, u and dh gives dg, du and the recomputed product h
                dgate, dup = torch.empty_like(gate), torch.empty_like(up)
                h = torch.empty_like(up) if need_weight else dgate  # (..., I); unused when no dW
                dh = dh.to(gate.dtype).contiguous()
                n = dh.numel()
                _swiglu_backward[(triton.cdiv(n, _BLOCK),)](
                    dh, gate, up, dgate, dup, h, n, BLOCK=_BLOCK, WRITE_H=need_weight
                )
            else:
                h = swiglu(gate, up)  # recomputed: (..., I)
                g32, u32, dh32 = gate.float(), up.float(), dh.float()  # (..., I)
                sig = torch.sigmoid(g32)
                dup = (dh32 * g32 * sig).to(up.dtype)
                dgate = (dh32 * u32 * sig * (1 + g32 * (1 - sig))).to(gate.dtype)
            h2 = h.reshape(-1, h.shape[-1])  # (N, I)
            dweight = (dy2.t() @ h2).to(weight.dtype) if need_weight else None
            dbias = dy2.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        dresidual = dy if ctx.needs_input_grad[4] else None
        return dgate, dup, dweight, dbias, dresidual


def swiglu_linear_reference(
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    out = F.linear(swiglu_reference(gate, up), weight, bias)
    return out if residual is None else residual + out


def swiglu_linear(
    gate: torch.Tensor,
    up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """[residual +] down_proj(silu(gate) * up) for a plain linear down projection, without storing
    the (..., intermediate) product for backward (it is recomputed there). Same values and
    gradients as `swiglu_linear_reference` (the residual sum rounded once, inside the GEMM)."""
    return _SwiGLULinear.apply(gate, up, weight, bias, residual)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the fused kernel where it runs, else the reference."""
    if triton_runs_on(gate) and gate.shape == up.shape and gate.dtype == up.dtype:
        return _SwiGLU.apply(gate, up)
    return swiglu_reference(gate, up)

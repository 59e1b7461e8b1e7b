"""Several linear projections of one input as one autograd node (q, k, v of attention; gate and up
of the MLP):

    y_i = x W_iᵀ + b_i                         x: (N, in), W_i: (out_i, in)

Backward:

    dx   = Σ_i g_i W_i                         one (N, in) buffer, each term added by the GEMM itself
    dW_i = g_iᵀ x,   db_i = Σ_rows g_i

Autograd, running the projections as separate `nn.Linear`s, computes each g_i W_i into its own
(N, in) tensor and adds them with elementwise kernels (two extra reads and a write of the input's
size per extra projection); here the GEMMs accumulate in place (`addmm_`): the same sum, one
rounding fewer per term. Under autocast the weights meet the activations in the autocast dtype, as
`F.linear` would cast them, and their gradients come back in the weights' own dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SharedInputLinears(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, count: int, *weights_and_biases: torch.Tensor | None):
        weights, biases = weights_and_biases[:count], weights_and_biases[count:]
        outputs = tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))  # (..., out_i)
        ctx.save_for_backward(x, *weights)
        ctx.count = count
        ctx.has_bias = [b is not None for b in biases]
        ctx.bias_dtypes = [None if b is None else b.dtype for b in biases]
        return outputs

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *grads: torch.Tensor | None):
        x, *weights = ctx.saved_tensors
        count = ctx.count
        needs = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        dx = None
        dweights: list[torch.Tensor | None] = [None] * count
        dbiases: list[torch.Tensor | None] = [None] * count
        with torch.no_grad():
            for i, (g, w) in enumerate(zip(grads, weights, strict=True)):
                if g is None:  # this output took no part in the loss
                    continue
                g2 = g.reshape(-1, g.shape[-1])  # (N, out_i)
                if needs[0]:
                    if dx is None:
                        dx = g2 @ w  # (N, in), in the autocast dtype under autocast
                    else:
                        dx.addmm_(g2, w.to(dx.dtype))
                if needs[2 + i]:
                    dweights[i] = (g2.t() @ x2).to(w.dtype)  # (out_i, in)
                if ctx.has_bias[i] and needs[2 + count + i]:
                    dbiases[i] = g2.sum(0).to(ctx.bias_dtypes[i])
        if dx is not None:
            dx = dx.view(x.shape).to(x.dtype)
        return dx, None, *dweights, *dbiases


def shared_input_linears(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> tuple[torch.Tensor, ...]:
    """`F.linear(x, W_i, b_i)` for every projection, as one node whose backward accumulates dx in
    place (see the module docstring). Same values and gradients as
    `shared_input_linears_reference`."""
    return _SharedInputLinears.apply(x, len(weights), *weights, *biases)


def shared_input_linears_reference(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> tuple[torch.Tensor, ...]:
    return tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))

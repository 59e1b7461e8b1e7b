"""Linear + cross-entropy without the full logits: the LM head and the loss fused chunk by chunk,
so a (tokens x vocab) fp32 logits tensor never exists (with a 128k vocabulary and 8k tokens
that tensor alone is 4 GiB, and its gradient another 4).

For N tokens with hidden states h (N, H), head weight W (V, H), targets y and a normaliser Z
(the count of trained tokens, possibly over several micro-batches):

    loss = sum_{i: y_i != ignore} (logsumexp(h_i W^T) - (h_i W^T)[y_i]) / Z
    dL/dlogits_i = (softmax(h_i W^T) - onehot(y_i)) / Z     (zero for ignored tokens)
    dL/dh = dL/dlogits @ W,   dL/dW = dL/dlogits^T @ h

With per-token weights w (multi-task loss weights; w = 1 gives the plain loss above):

    loss = sum_{i: y_i != ignore} w_i (logsumexp(h_i W^T) - (h_i W^T)[y_i]) / Z,   Z = sum_i w_i by default
    dL/dlogits_i = w_i (softmax(h_i W^T) - onehot(y_i)) / Z

The forward pass walks the tokens in chunks, computing each chunk's logits, its loss and both
gradients at once; backward only scales the stored gradients by the incoming gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
_CHUNK_BYTES = 1 << 30  # fp32 logits per chunk


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    normalizer: float | torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """hidden (N, H), weight (V, H), labels (N,), token_weights (N,) or None: summed (weighted)
    token loss / normalizer (default: the trained tokens' total weight), from the full fp32 logits."""
    logits = (hidden @ weight.t()).float()  # (N, V)
    losses = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")  # (N,)
    if token_weights is not None:
        losses = losses * token_weights.float()
    return losses.sum() / _normalizer(labels, normalizer, token_weights)


def _normalizer(
    labels: torch.Tensor, normalizer: float | torch.Tensor | None, token_weights: torch.Tensor | None = None
) -> torch.Tensor:
    if normalizer is None:
        valid = (labels != IGNORE_INDEX).float()
        if token_weights is not None:
            valid = valid * token_weights.float()
        return valid.sum().clamp(min=1e-12) if token_weights is not None else valid.sum().clamp(min=1)
    return torch.as_tensor(normalizer, dtype=torch.float32, device=labels.device)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, normalizer, chunk_size, token_weights=None):
        n_tokens = hidden.shape[0]
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_dh else None
        # dW accumulates across chunks in W's dtype through addmm (fp32 accumulation inside each
        # GEMM, one rounding per chunk), as a bf16 weight's own gradient would be anyway.
        grad_weight = torch.zeros_like(weight) if want_dw else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n_tokens, chunk_size):
            h = hidden[start : start + chunk_size]  # (C, H)
            y = labels[start : start + chunk_size]  # (C,)
            logits = (h @ weight.t()).float()  # (C, V)
            lse = torch.logsumexp(logits, dim=-1)  # (C,)
            valid = (y != IGNORE_INDEX).float()
            if token_weights is not None:
                valid = valid * token_weights[start : start + chunk_size].float()  # w_i, 0 if ignored
            safe_y = y.clamp(min=0)
            target = logits.gather(1, safe_y[:, None]).squeeze(1)
            total += ((lse - target) * valid).sum()
            if not (want_dh or want_dw):
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place over the logits: (C, V)
            grad[torch.arange(len(y), device=y.device), safe_y] -= 1.0
            grad *= (valid / normalizer)[:, None]
            grad = grad.to(h.dtype)
            if want_dh:
                grad_hidden[start : start + chunk_size] = grad @ weight
            if want_dw:
                grad_weight.addmm_(grad.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = grad_hidden * grad_out if grad_hidden is not None else None
        dw = grad_weight * grad_out if grad_weight is not None else None
        return dh, dw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused, chunked LM-head loss. hidden (..., H), labels (...) and token_weights (...)
    are flattened; labels are pre-shifted targets with -100 where no loss is taken. Equals
    `linear_cross_entropy_reference` up to floating-point order."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if token_weights is not None:
        token_weights = token_weights.reshape(-1).detach()
    if chunk_size is None:
        chunk_size = max(256, _CHUNK_BYTES // (4 * weight.shape[0]))
    z = _normalizer(labels, normalizer, token_weights)
    return _LinearCrossEntropy.apply(hidden, weight, labels, z, chunk_size, token_weights)

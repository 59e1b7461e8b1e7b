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
gradients at once; backward only scales the stored gradients by the incoming gradient g, in fp32
(`_rescale`: dW = round(float32(dW) * g)) and in place unless the graph is kept for another
backward, doing nothing when g == 1: a loss that already carries its normaliser (`normalizer=N`,
then `loss.backward()`) costs no pass over dW in backward.

Per chunk, the step logits -> (row losses, dL/dlogits) is one Triton kernel on the GPU: each
program streams its row twice in the logits' own dtype (an online max / sum-exp pass for
logsumexp, then a pass that overwrites the logits with their gradient), so no fp32 copy of the
chunk and no chain of elementwise launches exists. `_rows_loss_and_grad_reference` is the same
step in plain PyTorch (fp32), used on the CPU and checked against the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ferrotune.kernels._dispatch import HAVE_TRITON, sm_count, triton_runs_on

IGNORE_INDEX = -100
_CHUNK_BYTES = 1 << 30  # logits per chunk

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rows_loss_and_grad(
        LOGITS,
        LABELS,
        ROW_SCALE,
        LOSS,
        stride,
        n_cols,
        ignore_index,
        WRITE_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One program per row: loss = lse - x[y]; with WRITE_GRAD the row becomes
        (softmax(x) - onehot(y)) * row_scale, in place (zeros for an ignored row)."""
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride
        label = tl.load(LABELS + row)
        cols = tl.arange(0, BLOCK)
        running_max = tl.full((BLOCK,), float("-inf"), tl.float32)
        running_sum = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n_cols, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, x)
            # Lanes that have seen only -inf keep a zero sum (avoid inf - inf).
            rescale = tl.where(new_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
            shifted = tl.where(new_max == float("-inf"), 0.0, tl.exp(x - new_max))
            running_sum = running_sum * rescale + shifted
            running_max = new_max
        row_max = tl.max(running_max, axis=0)
        lane_sum = tl.where(running_max == float("-inf"), 0.0, running_sum * tl.exp(running_max - row_max))
        lse = row_max + tl.log(tl.sum(lane_sum, axis=0))
        ignored = label == ignore_index
        safe_label = tl.where(ignored, 0, label)
        target = tl.load(base + safe_label).to(tl.float32)
        tl.store(LOSS + row, tl.where(ignored, 0.0, lse - target))
        if WRITE_GRAD:
            scale = tl.where(ignored, 0.0, tl.load(ROW_SCALE + row))
            for start in range(0, n_cols, BLOCK):
                offsets = start + cols
                in_row = offsets < n_cols
                x = tl.load(base + offsets, mask=in_row, other=0.0).to(tl.float32)
                grad = (tl.exp(x - lse) - tl.where(offsets == safe_label, 1.0, 0.0)) * scale
                tl.store(base + offsets, grad.to(LOGITS.dtype.element_ty), mask=in_row)

    @triton.jit
    def _scale_blocks(T, OUT, s, n, n_blocks, BLOCK: tl.constexpr):
        """out = round(float32(t) * s) over the blocks this program strides over."""
        for b in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            offsets = tl.cast(b, tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: n may pass 2^31
            in_t = offsets < n
            x = tl.load(T + offsets, mask=in_t)
            tl.store(OUT + offsets, (x.to(tl.float32) * s).to(OUT.dtype.element_ty), mask=in_t)

    @triton.jit
    def _rescale_kernel(T, OUT, S, n, n_blocks, IN_PLACE: tl.constexpr, BLOCK: tl.constexpr):
        """out = round(float32(t) * s) for the flat (n,) tensor t, s read from the device; in
        place (OUT is T) with s == 1 the program returns at once, reading and writing nothing."""
        s = tl.load(S)
        if IN_PLACE:
            if s != 1.0:
                _scale_blocks(T, T, s, n, n_blocks, BLOCK)
        else:
            _scale_blocks(T, OUT, s, n, n_blocks, BLOCK)


def _rows_loss_and_grad_reference(
    logits: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (C, V), labels (C,), row_scale (C,) fp32 -> per-row loss (C,) fp32 (0 where ignored)
    and, when wanted, dL/dlogits (C, V) in the logits' dtype: (softmax - onehot) * row_scale.
    fp32 logits are overwritten (the gradient is computed in their storage)."""
    full = logits.float()
    lse = torch.logsumexp(full, dim=-1)  # (C,)
    valid = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    loss = (lse - full.gather(1, safe[:, None]).squeeze(1)) * valid
    if not want_grad:
        return loss, None
    grad = full.sub_(lse[:, None]).exp_()  # softmax, in place over the fp32 copy
    grad[torch.arange(len(labels), device=labels.device), safe] -= 1.0
    grad *= (row_scale * valid)[:, None]
    return loss, grad.to(logits.dtype)


def _rows_loss_and_grad_fast(
    logits: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton kernel: same contract, but the gradient overwrites `logits`."""
    rows, cols = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        # 2,048 columns a pass with 8 warps streamed a 4k x 128k bf16 chunk fastest on the H200
        # (3.86 TB/s, against 3.62 for 8,192 with 16 warps).
        block = min(2048, triton.next_power_of_2(cols))
        _rows_loss_and_grad[(rows,)](
            logits, labels, row_scale, loss, logits.stride(0), cols, IGNORE_INDEX,
            WRITE_GRAD=want_grad, BLOCK=block, num_warps=8 if block >= 2048 else 4,
        )  # fmt: skip
    return loss, (logits if want_grad else None)


# `_rescale` launch: BLOCK elements a step, `warps` warps, at most `programs_per_sm` programs per SM
# (each striding over the blocks), so that a skipped rescale (s == 1) is one short wave. On the H200
# (`python bench/parts_gpu.py ce_scale`, a 128256 x 2048 bf16 head gradient) this shape scaled in
# 0.262 ms (4.0 TB/s; 0.272 for 8192 / 8 warps / 4 per SM) and skipped in 0.021 ms.
RESCALE_LAUNCH = dict(block=4096, warps=16, programs_per_sm=32)
_RESCALE_REFERENCE_CHUNK = 1 << 24  # elements per fp32 temporary in the reference (64 MiB)


def _rescale(t: torch.Tensor, s: torch.Tensor, in_place: bool) -> torch.Tensor:
    """round(float32(t) * s) (fp64 tensors: in fp64), into t itself or a new tensor; s is a device
    fp32 scalar, never read by the host. In place, the Triton kernel does nothing when s == 1."""
    out = t if in_place else torch.empty_like(t)
    fast = t.dtype in (torch.bfloat16, torch.float16, torch.float32) and t.is_contiguous()
    if fast and out.is_contiguous() and triton_runs_on(t):
        n = t.numel()
        if n:
            block = RESCALE_LAUNCH["block"]
            n_blocks = triton.cdiv(n, block)
            programs = min(n_blocks, RESCALE_LAUNCH["programs_per_sm"] * sm_count(t.device))
            _rescale_kernel[(programs,)](
                t, out, s, n, n_blocks, IN_PLACE=in_place, BLOCK=block, num_warps=RESCALE_LAUNCH["warps"]
            )
    else:
        _rescale_reference(t, s, out)
    return out


def _rescale_reference(t: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> None:
    """Plain PyTorch: out = round(float32(t) * s) (out may be t), in slices of flat views to
    bound the fp32 temporary."""
    if t.dtype == torch.float64:
        torch.mul(t, s.double(), out=out)
        return
    if not (t.is_contiguous() and out.is_contiguous()):
        out.copy_(t.float() * s)
        return
    flat_t, flat_out = t.view(-1), out.view(-1)
    for start in range(0, flat_t.numel(), _RESCALE_REFERENCE_CHUNK):
        end = start + _RESCALE_REFERENCE_CHUNK
        flat_out[start:end].copy_(flat_t[start:end].float() * s)


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
    if normalizer is not None:
        return torch.as_tensor(normalizer, dtype=torch.float32, device=labels.device)
    if token_weights is None:
        return (labels != IGNORE_INDEX).sum().clamp(min=1).float()
    return (token_weights.float() * (labels != IGNORE_INDEX)).sum().clamp(min=1e-12)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, normalizer, chunk_size, grad_enabled, token_weights=None):
        n_tokens = hidden.shape[0]
        # Gradients are computed here, in forward; not at all under no_grad (evaluation).
        want_dh = ctx.needs_input_grad[0] and grad_enabled
        want_dw = ctx.needs_input_grad[1] and grad_enabled
        grad_hidden = torch.empty_like(hidden) if want_dh else None
        # dW accumulates across chunks in W's dtype through addmm (fp32 accumulation inside each
        # GEMM, one rounding per chunk), as a bf16 weight's own gradient would be anyway; the first
        # chunk's GEMM creates it (no zero fill, no read of zeros).
        grad_weight = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        want_grad = want_dh or want_dw
        # (N,) fp32 w_i / Z: each row's share of the loss, and the scale of its gradient row
        scale = (
            (1.0 / normalizer).expand(n_tokens)
            if token_weights is None
            else token_weights.float() / normalizer
        )
        for start in range(0, n_tokens, chunk_size):
            h = hidden[start : start + chunk_size]  # (C, H)
            y = labels[start : start + chunk_size]  # (C,)
            logits = h @ weight.t()  # (C, V), hidden's dtype
            row_scale = scale[start : start + chunk_size].contiguous()  # (C,)
            fast = triton_runs_on(logits) and logits.is_contiguous()
            step = _rows_loss_and_grad_fast if fast else _rows_loss_and_grad_reference
            row_loss, grad = step(logits, y.contiguous(), row_scale, want_grad)
            total += (row_loss * row_scale).sum()
            if grad is None:
                continue
            grad = grad.to(h.dtype)  # no-op unless autocast made the logits bf16 for fp32 hidden states
            if want_dh:
                rows = grad_hidden[start : start + chunk_size]  # (C, H)
                if grad.dtype == weight.dtype == rows.dtype:
                    torch.mm(grad, weight, out=rows)  # written in place, no copy
                else:  # autocast: bf16 logits against an fp32 head
                    rows.copy_(grad @ weight)
            if want_dw:
                if grad_weight is None:
                    grad_weight = (grad.t() @ h).to(weight.dtype)  # (V, H)
                else:
                    grad_weight.addmm_(grad.t(), h)
        if want_dw and grad_weight is None:  # no rows at all
            grad_weight = torch.zeros_like(weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        # The gradients were computed in forward for an upstream gradient of 1; they are scaled
        # here by the one that came, in fp32, read on the device: asking the host whether it is
        # 1 would stall it until the forward finished, leaving the GPU idle while backward is
        # launched. Used once (the graph is freed after this backward, the usual case), the
        # stored gradients are scaled in place and returned, and the kernel skips the pass when
        # the upstream gradient is 1 (`loss.backward()`); a graph kept for another backward
        # (`retain_graph`, `create_graph`) keeps them unscaled, and new tensors are returned.
        scale = grad_out.reshape(()).float()
        in_place = not _graph_is_kept()
        grad_hidden = _rescale(grad_hidden, scale, in_place) if grad_hidden is not None else None
        grad_weight = _rescale(grad_weight, scale, in_place) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (saved tensors) for another backward; True
    outside a backward and where torch cannot tell (as torch's own AOTAutograd asks before it
    reuses saved tensors' memory)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else keep_graph()


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
        logit_bytes = hidden.element_size() if triton_runs_on(hidden) else 4  # the reference is fp32
        chunk_size = max(256, _CHUNK_BYTES // (logit_bytes * weight.shape[0]))
    z = _normalizer(labels, normalizer, token_weights)
    return _LinearCrossEntropy.apply(
        hidden, weight, labels, z, chunk_size, torch.is_grad_enabled(), token_weights
    )

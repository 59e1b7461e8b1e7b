"""RMSNorm, as Llama defines it:

    y = w * cast(x / sqrt(mean(x^2) + eps))        (statistics in fp32, cast back to x's dtype)

Backward, with x_hat = x * r, r = 1 / sqrt(mean(x^2) + eps), g = dy * w (fp32):

    dx = r * (g - x_hat * mean(g * x_hat))
    dw = sum_rows(dy * cast(x_hat))

The Triton forward kernel runs one program per row (the whole hidden size in one block) and keeps
r for the backward pass; the backward kernel runs a few programs per SM, each walking a share of
the rows a (ROWS, hidden) tile at a time and summing its share of dw. The reference is the plain
PyTorch expression above.
"""

from __future__ import annotations

import torch

from ferrotune.kernels._dispatch import HAVE_TRITON, sm_count, triton_runs_on

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_forward(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(W + cols, mask=mask, other=0.0)
        x_hat = (x * rstd).to(w.dtype)
        tl.store(Y + row * stride_y + cols, (w * x_hat).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _add_rms_forward(
        X, R, H, W, Y, RSTD, stride_x, stride_r, stride_h, stride_y, n_cols, eps, BLOCK: tl.constexpr
    ):
        """h = x + r (rounded to h's dtype, as torch's add rounds it), y = RMSNorm(h)."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=mask)
        h = h.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        w = tl.load(W + cols, mask=mask, other=0.0)
        h_hat = (h * rstd).to(w.dtype)
        tl.store(Y + row * stride_y + cols, (w * h_hat).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_backward(
        DY,
        X,
        W,
        RSTD,
        DX,
        DRES,
        DW_PARTIAL,
        stride_dy,
        stride_x,
        stride_dx,
        n_rows,
        n_cols,
        rows_per_program,
        BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
        HAS_RES: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        """Program p takes rows [p * rows_per_program, (p + 1) * rows_per_program), ROWS rows a
        step as one (ROWS, BLOCK) tile, writes their dx and its (n_cols,) fp32 share of dw. With
        STAGES > 1 Triton may load the next steps' rows while this one is computed."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)  # (BLOCK,)
        col_in = cols < n_cols
        w = tl.load(W + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]  # (1, BLOCK)
        dw = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        start = pid * rows_per_program
        end = tl.minimum(start + rows_per_program, n_rows)
        for first in tl.range(start, end, ROWS, num_stages=STAGES):
            rows = first + tl.arange(0, ROWS)  # (ROWS,)
            row_in = rows < end
            mask = row_in[:, None] & col_in[None, :]  # (ROWS, BLOCK)
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_in, other=0.0)[:, None]  # (ROWS, 1)
            x_hat = x * rstd
            g = dy * w
            dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=1) / n_cols)[:, None])
            dx_offsets = rows[:, None] * stride_dx + cols[None, :]
            if HAS_RES:  # the gradient reaching x by its other path (x also feeds a residual add)
                dx += tl.load(DRES + dx_offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + dx_offsets, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * x_hat.to(W.dtype.element_ty).to(tl.float32)  # masked lanes add 0 * 0
        tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_in)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm in plain PyTorch."""
    x32 = x.float()
    x_hat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x_hat.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # (N, H)
        n_rows, n_cols = x2.shape
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty(n_rows, n_cols, dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n_cols)
        _rms_forward[(n_rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps, BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(*shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_backward(x2, weight, rstd, dy, None)
        return dx.view(ctx.shape), dw, None


class _RMSNormBesideResidual(torch.autograd.Function):
    """(x, RMSNorm(x)) for an x that also runs on in the residual stream: backward adds that
    path's gradient into the norm's input gradient in the norm's own kernel, instead of autograd
    summing the two (N, H) gradients in a separate pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        y = _RMSNorm.forward(ctx, x, weight, eps)
        return x.view_as(x), y

    @staticmethod
    def backward(ctx, dres: torch.Tensor | None, dy: torch.Tensor | None):
        x2, weight, rstd = ctx.saved_tensors
        if dy is None:  # the normalised output took no part in the loss
            return dres, None, None
        dx, dw = _rms_norm_backward(x2, weight, rstd, dy, dres)
        return dx.view(ctx.shape), dw, None


# How `_rms_backward` is launched: `programs_per_sm` programs per SM (at most one per `rows` rows),
# each walking its share of the rows `rows` at a time with `warps` warps (4 below a 2,048-wide
# block), its loop software-pipelined over `stages` steps. `python bench/parts_gpu.py rms` times the
# alternatives on the GPU: at (16384, 2048) bf16 with the residual's gradient added (32 of a Llama
# block stack's 33 norm backwards), 1 row, 8 warps and 8 programs per SM took 0.086 ms pipelined
# over 2 stages, 0.089 over 3 and 0.095 unpipelined (H200, one run); 2- and 4-row tiles were no faster.
RMS_BACKWARD_LAUNCH = dict(rows=1, warps=8, programs_per_sm=8, stages=2)


def _rms_norm_backward(
    x2: torch.Tensor,  # (N, H), the normalised input
    weight: torch.Tensor,  # (H,)
    rstd: torch.Tensor,  # (N,) fp32
    dy: torch.Tensor,  # (..., H)
    dres: torch.Tensor | None,  # (..., H): x's gradient by its other path, added into dx
    launch: dict[str, int] | None = None,  # RMS_BACKWARD_LAUNCH when None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (N, H), dw (H,)): the kernel's per-program dw shares summed here."""
    launch = RMS_BACKWARD_LAUNCH if launch is None else launch
    rows = launch["rows"]
    n_rows, n_cols = x2.shape
    dy2 = dy.reshape(-1, n_cols).contiguous()
    dx = torch.empty_like(x2)
    dres2 = dres.reshape(-1, n_cols).to(x2.dtype).contiguous() if dres is not None else dx
    programs = min(triton.cdiv(n_rows, rows), launch["programs_per_sm"] * sm_count(x2.device)) or 1
    # a whole number of `rows`-row steps per program, so only the last program has a ragged step
    rows_per_program = max(rows, triton.cdiv(triton.cdiv(n_rows, programs), rows) * rows)
    programs = triton.cdiv(n_rows, rows_per_program) or 1
    dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x2.device)
    block = triton.next_power_of_2(n_cols)
    _rms_backward[(programs,)](
        dy2, x2, weight, rstd, dx, dres2, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0),
        n_rows, n_cols, rows_per_program, BLOCK=block, ROWS=rows, HAS_RES=dres is not None,
        STAGES=launch.get("stages", 1), num_warps=launch["warps"] if block >= 2048 else 4,
    )  # fmt: skip
    return dx, dw_partial.sum(0).to(weight.dtype)


class _AddRMSNorm(torch.autograd.Function):
    """(h, y) = (x + r, RMSNorm(x + r)) in one pass; backward adds h's own gradient (from its
    other use, the residual stream) into the norm's input gradient in the same kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # (N, H)
        r2 = r.reshape(-1, shape[-1]).contiguous()  # (N, H)
        n_rows, n_cols = x2.shape
        h_dtype = torch.promote_types(x.dtype, r.dtype)
        h = torch.empty(n_rows, n_cols, dtype=h_dtype, device=x.device)
        y = torch.empty(n_rows, n_cols, dtype=torch.promote_types(weight.dtype, h_dtype), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n_cols)
        _add_rms_forward[(n_rows,)](
            x2, r2, h, weight, y, rstd, x2.stride(0), r2.stride(0), h.stride(0), y.stride(0), n_cols, eps,
            BLOCK=block,
        )  # fmt: skip
        ctx.save_for_backward(h, weight, rstd)
        ctx.shape, ctx.x_dtype, ctx.r_dtype = shape, x.dtype, r.dtype
        return h.view(shape), y.view(shape)

    @staticmethod
    def backward(ctx, dh: torch.Tensor | None, dy: torch.Tensor | None):
        h, weight, rstd = ctx.saved_tensors
        if dy is None:  # the normalised output took no part in the loss
            dsum, dw = dh, None
        else:
            dsum, dw = _rms_norm_backward(h, weight, rstd, dy, dh)
        if dsum is None:
            return None, None, dw, None
        dsum = dsum.view(ctx.shape)
        return dsum.to(ctx.x_dtype), dsum.to(ctx.r_dtype), dw, None


def add_rms_norm_reference(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add then Llama's RMSNorm, as two plain steps."""
    h = x + r
    return h, rms_norm_reference(h, weight, eps)


def add_rms_norm(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + r and RMSNorm(h) over the last dimension: one Triton kernel each way where it runs
    (h is written once and never re-read in forward; its gradient is summed in the norm's
    backward kernel), else the reference."""
    if triton_runs_on(x) and x.shape == r.shape:
        return _AddRMSNorm.apply(x, r, weight, eps)
    return add_rms_norm_reference(x, r, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: the Triton kernel where it runs, else the reference."""
    if triton_runs_on(x):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_beside_residual(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, RMSNorm(x)) where x also feeds the residual stream (a pre-norm block's input): use the
    first output as the residual. The values are x and `rms_norm(x)`; on the Triton path the
    residual's gradient is summed inside the norm's backward kernel."""
    if triton_runs_on(x):
        return _RMSNormBesideResidual.apply(x, weight, eps)
    return x, rms_norm_reference(x, weight, eps)

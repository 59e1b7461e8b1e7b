"""AdamW's update (decoupled weight decay, Loshchilov & Hutter) in one pass over each parameter,
the same arithmetic as `torch.optim.AdamW`. At step t, with learning rate lr and decay wd:

    p <- p - lr * wd * p
    m <- b1 * m + (1 - b1) * g
    v <- b2 * v + (1 - b2) * g^2
    p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

in fp32, whatever the stored dtype of p, g, m and v (each is read once and p, m, v written once:
14 bytes a bf16 parameter). PyTorch's fused AdamW spends about 6.7 ms a step on a 1.2B-parameter
bf16 model where that traffic takes about 4 ms; the Triton kernel streams each tensor in large
blocks instead of the multi-tensor chunks.

`AdamW` is `torch.optim.AdamW` with the step routed through the kernel when every parameter is a
dense CUDA tensor (plain or an FSDP2 shard) and no option outside the formula above is set; it keeps
torch's state layout (`step`, `exp_avg`, `exp_avg_sq`), so its checkpoints load into either.
`adamw_update_reference` is the formula in plain PyTorch, which the kernel is tested against.
"""

from __future__ import annotations

from typing import Any

import torch

from ferrotune.kernels._dispatch import HAVE_TRITON, triton_runs_on

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, lr_wd, beta1, beta2, step_size, bias2_sqrt, eps,
                     MASKED: tl.constexpr):  # fmt: skip
        """The update of the elements at `offs`; MASKED for a tensor's last, partial block (the
        mask costs the vector accesses, so whole blocks go without it)."""
        mask = offs < n if MASKED else None
        other = 0.0 if MASKED else None
        p = tl.load(p_ptr + offs, mask=mask, other=other).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=other).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=other).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=other).to(tl.float32)
        p = p - lr_wd * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        denom = tl.sqrt(v) / bias2_sqrt + eps
        p = p - step_size * m / denom
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _adamw_update(
        TABLE, BLOCK_TENSOR, P_REF, G_REF, M_REF, V_REF,
        lr_wd, beta1, beta2, step_size, bias2_sqrt, eps, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One program per BLOCK elements of one tensor of a list. BLOCK_TENSOR (blocks,) int32 names
        the tensor of each program; TABLE (tensors, 6) int64 holds, per tensor, the addresses of p,
        g, m and v, its element count and its first block. The *_REF arguments carry the dtypes."""
        pid = tl.program_id(0)
        t = tl.load(BLOCK_TENSOR + pid).to(tl.int64)
        row = TABLE + t * 6
        # Addresses are 16-byte aligned (the caller checks); saying so lets the loads and stores
        # be 16-byte vectors, where an address read from memory would otherwise give 2-byte ones.
        p_ptr = tl.multiple_of(tl.load(row).to(tl.pointer_type(P_REF.dtype.element_ty)), 16)
        g_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(G_REF.dtype.element_ty)), 16)
        m_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(M_REF.dtype.element_ty)), 16)
        v_ptr = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(V_REF.dtype.element_ty)), 16)
        n = tl.load(row + 4)
        start = (pid - tl.load(row + 5)) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, lr_wd, beta1, beta2, step_size, bias2_sqrt, eps,
                         MASKED=False)  # fmt: skip
        else:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, lr_wd, beta1, beta2, step_size, bias2_sqrt, eps,
                         MASKED=True)  # fmt: skip


_BLOCK = 2048  # elements a program (4 warps): the fastest of 1k-8k on the H200


def adamw_update_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step of `param` in place (fp32 arithmetic, results rounded to each dtype)."""
    p, g = param.float(), grad.float()
    m, v = exp_avg.float(), exp_avg_sq.float()
    p = p - lr * weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = v.sqrt() / (1 - beta2**step) ** 0.5 + eps
    p = p - (lr / (1 - beta1**step)) * m / denom
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


class _BlockMaps:
    """Per list of tensor sizes, the (blocks,) int32 map from program to tensor and each
    tensor's first block, built once on the device (the sizes of a model's parameters do not
    change from step to step; their gradients' addresses do, so the table of addresses is not
    cached)."""

    def __init__(self) -> None:
        self._maps: dict[tuple[torch.device, tuple[int, ...]], tuple[torch.Tensor, list[int]]] = {}

    def get(self, device: torch.device, sizes: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
        key = (device, sizes)
        if key not in self._maps:
            blocks = [triton.cdiv(n, _BLOCK) for n in sizes]
            firsts = [0]
            for b in blocks[:-1]:
                firsts.append(firsts[-1] + b)
            counts = torch.tensor(blocks, device=device)
            block_tensor = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)
            self._maps[key] = (block_tensor.to(torch.int32), firsts)
        return self._maps[key]


_block_maps = _BlockMaps()


def adamw_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """`adamw_update_reference` on each parameter of the lists, in one Triton launch where the
    kernel runs: contiguous tensors on one device, each list of one dtype, each parameter's
    gradient and moments of its shape. Otherwise each takes the reference."""
    tensors = (params, grads, exp_avgs, exp_avg_sqs)
    if not params:
        return
    kernel_serves = (
        triton_runs_on(params[0])
        and all(len({t.dtype for t in ts}) == 1 and all(t.is_contiguous() for t in ts) for ts in tensors)
        and all(p.device == params[0].device for p in params)
        and all(p.shape == g.shape == m.shape == v.shape for p, g, m, v in zip(*tensors, strict=True))
        and all(t.data_ptr() % 16 == 0 for ts in tensors for t in ts)  # the kernel's vector accesses
    )
    if not kernel_serves:
        for p, g, m, v in zip(*tensors, strict=True):
            adamw_update_reference(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay)
        return
    live = [i for i, p in enumerate(params) if p.numel()]
    if not live:
        return
    device = params[0].device
    block_tensor, firsts = _block_maps.get(device, tuple(params[i].numel() for i in live))
    rows = [
        [*(t[i].data_ptr() for t in tensors), params[i].numel(), first]
        for i, first in zip(live, firsts, strict=True)
    ]  # (tensors, 6): addresses of p, g, m, v; element count; first block
    table = torch.tensor(rows, dtype=torch.int64, pin_memory=device.type == "cuda").to(
        device, non_blocking=True
    )  # (tensors, 6)
    _adamw_update[(block_tensor.numel(),)](
        table, block_tensor, params[0], grads[0], exp_avgs[0], exp_avg_sqs[0],
        lr * weight_decay, beta1, beta2, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5, eps,
        BLOCK=_BLOCK, num_warps=4,
    )  # fmt: skip


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2 parameter's (or its state's) local shard; a plain tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class AdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` whose step runs `adamw_update` over each parameter group (see the
    module docstring). Any other case (CPU or sparse tensors, amsgrad, maximize, capturable or
    differentiable steps, a grad scaler) takes torch's own step."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Also a checkpoint of torch's fused AdamW: its flag is dropped and its step counts come to
        the host, where this step keeps them."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["fused"] = None
        for state in self.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to("cpu", torch.float32)

    def _kernel_serves(self) -> bool:
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]:
                return False
            for p in group["params"]:
                if p.grad is None:
                    continue
                local, grad = local_shard(p), local_shard(p.grad)
                if not triton_runs_on(local) or grad.is_sparse or not local.is_contiguous():
                    return False
                if local.data_ptr() % 16 or grad.data_ptr() % 16:  # views at odd offsets
                    return False
        return True

    @torch.no_grad()
    def step(self, closure: Any = None, **kwargs: Any) -> Any:
        if kwargs or not self._kernel_serves():  # grad_scale / found_inf, or a case above
            return super().step(closure, **kwargs)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # One launch per (step count, dtypes): normally one per group.
            lists: dict[tuple[Any, ...], tuple[list[torch.Tensor], ...]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    # torch's layout for a non-capturable step: the count on the host
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                members = [local_shard(t) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                key = (int(state["step"].item()), *(t.dtype for t in members))
                for bucket, tensor in zip(lists.setdefault(key, ([], [], [], [])), members, strict=True):
                    bucket.append(tensor)
            beta1, beta2 = group["betas"]
            for (step, *_), (ps, gs, ms, vs) in lists.items():
                adamw_update(
                    ps,
                    gs,
                    ms,
                    vs,
                    step,
                    float(group["lr"]),
                    beta1,
                    beta2,
                    group["eps"],
                    group["weight_decay"],
                )
        return loss

"""Microbenchmarks of the parts of a `full1b` step (Llama-3.2-1B shape, 8 x 2048 tokens, bf16), to
see which part has room left:

    python bench/parts_gpu.py gemm    # each layer GEMM (forward, dX, dX accumulated, dW) in TFLOP/s,
                                      # through cuBLAS and cuBLASLt, and the head's chunk GEMMs
    python bench/parts_gpu.py ce      # the loss kernel's launch shapes on a 4k x 128k bf16 chunk
    python bench/parts_gpu.py attn    # causal GQA attention forward+backward per SDPA backend, FlexAttention
    python bench/parts_gpu.py adamw   # torch's fused AdamW against kernels.adamw.AdamW on the 1B model
    python bench/parts_gpu.py rms     # the RMSNorm backward kernel's launch shapes on (16384, 2048) bf16
    python bench/parts_gpu.py ce_scale  # the LM head's gradient scaled by the upstream gradient in
                                        # backward: out of place in bf16 (old) against in place in fp32
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import L1B

TOKENS, HIDDEN, INTER, KV, VOCAB, CHUNK = 16384, 2048, 8192, 512, 128256, 4096


def cuda_ms(fn, iters: int = 20, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / iters


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def layer_rates(w: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> dict[str, int]:
    """TFLOP/s of y = x Wᵀ, dX = dY W (fresh and accumulated in place) and dW = dYᵀ x."""
    tflop = 2 * x.shape[0] * w.shape[0] * w.shape[1] / 1e9  # per ms
    times = {"fwd": cuda_ms(lambda: x @ w.t()), "dx": cuda_ms(lambda: dy @ w),
             "dx_add": cuda_ms(lambda: dx.addmm_(dy, w)), "dw": cuda_ms(lambda: dy.t() @ x)}  # fmt: skip
    return {k: round(tflop / t) for k, t in times.items()}


def gemm() -> None:
    mats = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
            "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER),
            "head chunk": (VOCAB, HIDDEN)}  # fmt: skip
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        for name, (out, inp) in mats.items():
            rows = CHUNK if name == "head chunk" else TOKENS
            rates = layer_rates(randn(out, inp), randn(rows, inp), randn(rows, out), randn(rows, inp))
            print(json.dumps({"lib": lib, "mat": name, **rates}), flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")


def ce() -> None:
    from ferrotune.kernels import cross_entropy

    base = randn(CHUNK, VOCAB) * 3
    labels = torch.randint(0, VOCAB, (CHUNK,), device="cuda")
    scale = torch.full((CHUNK,), 1.0 / TOKENS, device="cuda")
    loss = torch.empty(CHUNK, device="cuda")
    work = base.clone()
    copy_ms = cuda_ms(lambda: work.copy_(base))
    for block, warps in [(8192, 16), (4096, 8), (2048, 4), (2048, 8), (16384, 32)]:

        def run(block=block, warps=warps) -> None:
            work.copy_(base)
            cross_entropy._rows_loss_and_grad[(CHUNK,)](
                work, labels, scale, loss, work.stride(0), VOCAB, -100,
                WRITE_GRAD=True, BLOCK=block, num_warps=warps,
            )  # fmt: skip

        ms = cuda_ms(run) - copy_ms
        print(
            json.dumps(
                {
                    "block": block,
                    "warps": warps,
                    "ms": round(ms, 3),
                    "TB/s": round(3 * base.numel() * 2 / ms / 1e9, 2),
                }
            )
        )


def attn() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q = randn(8, 32, 2048, 64).requires_grad_()
    k, v = randn(8, 8, 2048, 64).requires_grad_(), randn(8, 8, 2048, 64).requires_grad_()
    do = randn(8, 32, 2048, 64)
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}

    def sdpa_step() -> None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.autograd.grad(out, (q, k, v), do)

    for name, backend in backends.items():
        with sdpa_kernel(backend):
            ms = cuda_ms(sdpa_step, iters=10)
        print(json.dumps({"attention": name, "fwd_bwd_ms": round(ms, 3)}))

    # The model's layout: token-major (B, T, heads, D) storage seen as (B, heads, T, D), as q and k
    # leave the RoPE kernel, v the projection and dO the output projection's backward.
    def token_major(*shape: int) -> torch.Tensor:
        b, h, t, d = shape
        return randn(b, t, h, d).transpose(1, 2)

    tq = token_major(8, 32, 2048, 64).requires_grad_()
    tk, tv = token_major(8, 8, 2048, 64).requires_grad_(), token_major(8, 8, 2048, 64).requires_grad_()
    tdo = token_major(8, 32, 2048, 64)

    def token_major_step() -> None:
        out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
        torch.autograd.grad(out, (tq, tk, tv), tdo)

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        for _ in range(2):  # the two layouts in turn, so clock changes show as noise, not as a gap
            for name, fn in (("cudnn token-major", token_major_step), ("cudnn head-major", sdpa_step)):
                print(json.dumps({"attention": name, "fwd_bwd_ms": round(cuda_ms(fn, iters=10), 3)}))
    flex = torch.compile(flex_attention)
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 2048, 2048)
    ms = cuda_ms(
        lambda: torch.autograd.grad(flex(q, k, v, block_mask=mask, enable_gqa=True), (q, k, v), do), iters=10
    )
    print(json.dumps({"attention": "flex", "fwd_bwd_ms": round(ms, 3)}))


def adamw() -> None:
    from ferrotune.kernels.adamw import AdamW
    from ferrotune.models.llama import CausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CausalLM(LlamaConfig(**L1B)).to(torch.bfloat16)
    ours = list(model.parameters())
    theirs = [p.detach().clone() for p in ours]
    for p, q in zip(ours, theirs, strict=True):
        p.grad = torch.randn_like(p) * 1e-3
        q.grad = p.grad.clone()

    def groups(params):
        return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip

    fused, triton_adamw = torch.optim.AdamW(groups(theirs), lr=1e-4, fused=True), AdamW(groups(ours), lr=1e-4)
    for _ in range(3):
        fused.step()
        triton_adamw.step()
    differing = sum(int((p != q).sum()) for p, q in zip(ours, theirs, strict=True))
    print(json.dumps({"torch_fused_ms": round(cuda_ms(fused.step, iters=10), 3),
                      "triton_ms": round(cuda_ms(triton_adamw.step, iters=10), 3),
                      "differing_after_3_steps": differing, "elements": sum(p.numel() for p in ours)}))  # fmt: skip


def rms() -> None:
    """Each launch shape of the norm's backward (with and without the residual gradient added in),
    checked against the reference, then timed; the fastest shape per case last."""
    from ferrotune.kernels import rmsnorm

    torch.manual_seed(0)
    x, dy, dres = randn(TOKENS, HIDDEN), randn(TOKENS, HIDDEN), randn(TOKENS, HIDDEN)
    w = (1 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(torch.bfloat16)
    eps = 1e-5
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + eps)  # (N,) fp32, as the forward kernel keeps it
    # the reference's weight in fp32, so that dw is summed in fp32 as the kernel sums it
    leaves = [x.clone().requires_grad_(True), w.float().requires_grad_(True)]
    (rmsnorm.rms_norm_reference(*leaves, eps) * dy.float()).sum().backward()
    ref_dx, ref_dw = leaves[0].grad.float(), leaves[1].grad
    launches = [dict(rows=rows, warps=warps, programs_per_sm=pps, stages=1)
                for rows in (1, 2, 4) for warps in (4, 8, 16) for pps in (1, 2, 4, 8)]  # fmt: skip
    # the loop software-pipelined (the next rows loaded while this one is computed)
    launches += [dict(rows=rows, warps=8, programs_per_sm=pps, stages=stages)
                 for rows in (1, 2) for pps in (2, 4, 8) for stages in (2, 3)]  # fmt: skip
    for res in (False, True):
        results = []
        for launch in launches:
            shape = {"res": res, **launch}

            def run(launch=launch, res=res):
                return rmsnorm._rms_norm_backward(x, w, rstd, dy, dres if res else None, launch)

            dx, dw = run()
            want_dx = ref_dx + dres.float() if res else ref_dx
            try:
                torch.testing.assert_close(dx.float(), want_dx, atol=2e-2, rtol=2e-2)
                torch.testing.assert_close(dw.float(), ref_dw, atol=1e-2, rtol=1e-2)
            except AssertionError as error:
                print(json.dumps({**shape, "error": str(error).splitlines()[0]}), flush=True)
                continue
            ms = cuda_ms(run)
            moved = (4 if res else 3) * x.numel() * x.element_size()  # dy, x, (dres,) dx
            results.append({**shape, "ms": round(ms, 4), "GB/s": round(moved / ms / 1e6)})
            print(json.dumps(results[-1]), flush=True)
        if results:
            print(json.dumps({"best": min(results, key=lambda r: r["ms"])}), flush=True)


def ce_scale() -> None:
    """The head gradient (128256 x 2048 bf16) times the upstream gradient s, as the fused loss's
    backward does it: the old out-of-place bf16 product against `_rescale` in place (s == 1: no
    pass at all) and out of place (a kept graph), with extra memory and bandwidth."""
    from ferrotune.kernels import cross_entropy

    torch.manual_seed(0)
    base = randn(VOCAB, HIDDEN) * 1e-3
    work = base.clone()
    moved = 2 * base.numel() * base.element_size()  # one read, one write

    def report(name: str, fn, **extra) -> dict:
        work.copy_(base)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        extra_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
        ms = cuda_ms(fn)
        result = {"case": name, **extra, "ms": round(ms, 4), "GB/s": round(moved / ms / 1e6),
                  "extra_MiB": round(extra_mb)}  # fmt: skip
        print(json.dumps(result), flush=True)
        return result

    for s in (1.0, 1 / 3):
        scale = torch.full((), s, device="cuda")
        want = (base.float() * s).to(base.dtype)
        checks = {
            "in_place_equals_fp32_product": torch.equal(
                cross_entropy._rescale(base.clone(), scale, True), want
            ),
            "out_of_place_equals_fp32_product": torch.equal(cross_entropy._rescale(base, scale, False), want),
            "old_equals_fp32_product": torch.equal(base * scale.to(base.dtype), want),
        }
        print(json.dumps({"s": s, **checks}), flush=True)

        def old(scale=scale):
            return work * scale.to(work.dtype)

        def out_of_place(scale=scale):
            return cross_entropy._rescale(work, scale, in_place=False)

        report("old: t * s.to(bf16)", old, s=s)
        report("kept graph: _rescale out of place", out_of_place, s=s)
    saved = dict(cross_entropy.RESCALE_LAUNCH)
    best = {}
    try:
        for block in (2048, 4096, 8192, 16384):
            for warps in (4, 8, 16):
                for programs_per_sm in (4, 8, 16, 32):
                    launch = dict(block=block, warps=warps, programs_per_sm=programs_per_sm)
                    cross_entropy.RESCALE_LAUNCH.update(launch)
                    # s != 1 rescales the same tensor every call: 0.9999 keeps it finite
                    for s in (1.0, 0.9999):
                        scale = torch.full((), s, device="cuda")

                        def in_place(scale=scale):
                            return cross_entropy._rescale(work, scale, in_place=True)

                        result = report("new: _rescale in place", in_place, s=s, **launch)
                        if s not in best or result["ms"] < best[s]["ms"]:
                            best[s] = result
    finally:
        cross_entropy.RESCALE_LAUNCH.update(saved)
    for result in best.values():
        print(json.dumps({"best": result}), flush=True)


if __name__ == "__main__":
    commands = {"gemm": gemm, "ce": ce, "attn": attn, "adamw": adamw, "rms": rms, "ce_scale": ce_scale}
    commands[sys.argv[1] if len(sys.argv) > 1 else "gemm"]()

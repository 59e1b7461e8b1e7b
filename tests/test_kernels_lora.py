"""The fused LoRA node (`ferrotune.kernels.lora_linear`) against the plain module composition:
same forward, same gradients (x, A, B, bias), with and without dropout, fp32 and bf16, 16-bit and
NF4 bases; and it keeps fewer bytes for backward and dispatches fewer ops."""

from __future__ import annotations

import contextlib

import pytest
import torch
from ferrotune import kernels
from ferrotune.kernels import lora_linear, lora_linear_reference
from ferrotune.kernels._dispatch import triton_runs_on
from ferrotune.kernels.lora import fused_lora_runs_on, pack_bits, set_fused_lora, unpack_bits
from ferrotune.peft.lora import LoraLinear
from ferrotune.quant.nf4 import NF4Linear
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

IN, OUT, R = 96, 80, 8
# The node's parity tests run where the GPU is when there is one (CUDA's dropout kernel included).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(dtype, bias, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, IN, generator=g).to(device, dtype)
    w = (torch.randn(OUT, IN, generator=g) / IN**0.5).to(device, dtype)
    b = torch.randn(OUT, generator=g).to(device, dtype) if bias else None
    a = (torch.randn(R, IN, generator=g) / IN**0.5).to(device, dtype)
    bb = (torch.randn(OUT, R, generator=g) / R**0.5).to(device, dtype)
    return x, w, b, a, bb


def run(fn, x, w, b, a, bb, scaling, dropout, seed=5):
    """Output and gradients (x, bias, A, B) under a fixed upstream gradient and dropout seed."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, b, a, bb)]
    lx, lb, la, lbb = leaves
    torch.manual_seed(seed)
    y = fn(lx, w, lb, la, lbb, scaling, dropout)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.device, y.dtype)
    (y.float() * up.float()).sum().backward()
    return y.detach(), [t.grad for t in leaves if t is not None]


def exact(x, w, b, a, bb, scaling, dropout, seed=5):
    """The node's math in float64 with the mask both paths draw (`F.dropout` on x in the adapter's
    dtype under `seed`): output and gradients (x, bias, A, B) under `run`'s upstream gradient."""
    torch.manual_seed(seed)
    keep = (
        (torch.nn.functional.dropout(x.to(a.dtype), dropout) != 0)
        if dropout > 0
        else torch.ones_like(x, dtype=torch.bool)
    )
    noise = keep.double() / (1 - dropout)

    def math(x, w, b, a, bb, scaling, dropout):
        y = x @ w.double().t() + ((x * noise) @ a.t()) @ bb.t() * scaling
        return y + b if b is not None else y

    return run(math, *(t.double() if t is not None else None for t in (x, w, b, a, bb)), scaling, dropout)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lora_matches_the_plain_composition(bias, dropout, dtype):
    """fp32: the node and the plain composition agree to 1e-5. bf16: each is compared with the
    exact (float64) result on the same mask, and the node's error stays within the plain path's
    own bf16 error (x 1.5, + one bf16 ulp of the largest value) on the output and every gradient."""
    inputs = make_inputs(dtype, bias, device=DEVICE)
    fused = run(lora_linear, *inputs, scaling=2.0, dropout=dropout)
    plain = run(lora_linear_reference, *inputs, scaling=2.0, dropout=dropout)
    assert len(fused[1]) == len(plain[1]) == (4 if bias else 3)
    pairs = [(fused[0], plain[0]), *zip(fused[1], plain[1], strict=True)]
    if dtype == torch.float32:
        for got, want in pairs:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return
    truth = exact(*inputs, scaling=2.0, dropout=dropout)
    for (got, want), true in zip(pairs, [truth[0], *truth[1]], strict=True):
        assert got.dtype == want.dtype == dtype
        err_fused = (got.double() - true).abs().max().item()
        err_plain = (want.double() - true).abs().max().item()
        ulp = true.abs().max().item() * 2.0**-8
        assert err_fused <= 1.5 * err_plain + ulp, (err_fused, err_plain, ulp)


def test_dropout_really_drops_and_the_seed_decides_the_mask():
    inputs = make_inputs(torch.float32, False)
    with_drop = run(lora_linear, *inputs, scaling=2.0, dropout=0.5, seed=1)
    no_drop = run(lora_linear, *inputs, scaling=2.0, dropout=0.0)
    other_seed = run(lora_linear, *inputs, scaling=2.0, dropout=0.5, seed=2)
    assert not torch.allclose(with_drop[0], no_drop[0], atol=1e-3)
    assert not torch.allclose(with_drop[1][1], other_seed[1][1], atol=1e-3)  # dA follows the mask


def test_bits_round_trip():
    mask = torch.rand(5, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (65 + 7) // 8
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_nf4_base_matches_the_plain_nf4_module():
    x, w, _, a, bb = make_inputs(torch.float32, False)
    base = NF4Linear.from_weight(w, blocksize=64)
    fused = run(lambda x, _w, b, a, bb, s, p: lora_linear(x, base.dequantize, b, a, bb, s, p), x, None, None, a, bb, 2.0, 0.2)  # fmt: skip
    plain = run(lambda x, _w, b, a, bb, s, p: base(x) + lora_linear_reference(x, torch.zeros_like(w), b, a, bb, s, p), x, None, None, a, bb, 2.0, 0.2)  # fmt: skip
    torch.testing.assert_close(fused[0], plain[0], atol=1e-5, rtol=1e-5)
    for got, want in zip(fused[1], plain[1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_autocast_fp32_adapters_on_bf16_compute():
    """bf16-mixed training: fp32 weights and adapters, autocast to bf16; gradients come back in
    fp32 and sit as close to the fp32 truth as the plain path's (bf16 rounds both differently)."""
    inputs = make_inputs(torch.float32, True)
    truth = run(lora_linear_reference, *inputs, scaling=2.0, dropout=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = run(lora_linear, *inputs, scaling=2.0, dropout=0.1)
        plain = run(lora_linear_reference, *inputs, scaling=2.0, dropout=0.1)
    assert fused[0].dtype == plain[0].dtype == torch.bfloat16
    for got, want, exact in zip(
        [fused[0], *fused[1]], [plain[0], *plain[1]], [truth[0], *truth[1]], strict=True
    ):
        assert got.dtype == want.dtype
        assert relative_error(got, exact) < max(2 * relative_error(want, exact), 4e-3)


# ---------------------------------------------------------------- wired into LoraLinear


def lora_layer(base: nn.Module, dropout: float, dora: bool = False) -> LoraLinear:
    layer = LoraLinear(base)
    layer.add_adapter("default", R, 16.0, dropout=dropout, use_dora=dora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(3))
    layer.active = {"default": 1.0}
    return layer


@contextlib.contextmanager
def fast_paths(on: bool):
    """The fused node on any device (it is plain PyTorch), or every reference."""
    kernels.set_enabled(on)
    set_fused_lora("always")
    try:
        yield
    finally:
        kernels.set_enabled(True)
        set_fused_lora("auto")


def test_dispatch_rule():
    x = torch.zeros(2, IN)
    assert fused_lora_runs_on(x) == triton_runs_on(x)  # "auto": where the fast paths run
    with fast_paths(True):
        assert fused_lora_runs_on(x)
    with fast_paths(False):
        assert not fused_lora_runs_on(x)  # set_enabled(False) wins
    set_fused_lora("never")
    try:
        assert not fused_lora_runs_on(x)
    finally:
        set_fused_lora("auto")
    with pytest.raises(ValueError, match="auto, always or never"):
        set_fused_lora("sometimes")


def layer_run(layer: LoraLinear, x: torch.Tensor, fast: bool):
    """(output, grad_fn name, dx, dA, dB) with the fast paths on or off."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with fast_paths(fast):
        torch.manual_seed(11)
        y = layer(x)
    y.pow(2).sum().backward()
    name = type(y.grad_fn).__name__
    return y.detach(), name, x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_linear_takes_the_fused_path_and_agrees(quantized, dropout):
    torch.manual_seed(0)
    base: nn.Module = nn.Linear(IN, OUT, bias=True)
    if quantized:
        base = NF4Linear.from_linear(base, blocksize=64)
    layer = lora_layer(base, dropout).train()
    x = torch.randn(2, 5, IN)
    fast, plain = layer_run(layer, x, True), layer_run(layer, x, False)
    assert fast[1] == "_LoraLinearBackward" and plain[1] != fast[1]
    for got, want in zip(fast[:1] + fast[2:], plain[:1] + plain[2:], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dora_and_several_adapters_keep_the_plain_path():
    torch.manual_seed(0)
    dora = lora_layer(nn.Linear(IN, OUT), 0.0, dora=True)
    assert layer_run(dora, torch.randn(4, IN), True)[1] != "_LoraLinearBackward"
    two = lora_layer(nn.Linear(IN, OUT), 0.0)
    two.add_adapter("other", 4, 8.0)
    two.active = {"default": 1.0, "other": 0.5}
    assert layer_run(two, torch.randn(4, IN), True)[1] != "_LoraLinearBackward"


# ---------------------------------------------------------------- memory and launches


def saved_bytes(fn, params: list[torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize(
    ("dropout", "adapter_dtype", "plain_extra"),
    [
        (0.0, torch.bfloat16, lambda n: 0),  # both keep x and x A^T
        # dropout(x) for x, and the mask as bytes (CUDA; the CPU keeps it in x's dtype) vs bits
        (0.1, torch.bfloat16, lambda n: n - n // 8),
        (0.0, torch.float32, lambda n: (R * IN + OUT * R) * 2),  # autocast: bf16 casts of A and B
        # autocast over an fp32 base too: the plain path also keeps the bf16 cast of W
        (0.0, "all-fp32", lambda n: (R * IN + OUT * R + OUT * IN) * 2),
    ],
)
def test_fused_node_keeps_fewer_bytes_for_backward(dropout, adapter_dtype, plain_extra):
    """bf16 activations. The plain composition keeps at least `plain_extra` more bytes."""
    x, w, b, a, bb = make_inputs(torch.bfloat16, True)
    if adapter_dtype == "all-fp32":
        adapter_dtype, w, b = torch.float32, w.float(), b.float()
    x.requires_grad_(True)
    a, bb = a.to(adapter_dtype).requires_grad_(True), bb.to(adapter_dtype).requires_grad_(True)
    params = [w, b, a, bb]

    def plain():
        base = torch.nn.functional.linear(x, w, b)
        xa = x.to(a.dtype)
        return base + (torch.nn.functional.linear(torch.nn.functional.linear(torch.nn.functional.dropout(xa, dropout), a), bb) * 2.0).to(base.dtype)  # fmt: skip

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=adapter_dtype == torch.float32):
        fused_bytes = saved_bytes(lambda: lora_linear(x, w, b, a, bb, 2.0, dropout), params)
        plain_bytes = saved_bytes(plain, params)
    n = x.numel()
    mask_bits = n // 8 if dropout else 0
    assert fused_bytes == n * 2 + (n // IN) * R * 2 + mask_bits  # x, x A^T (N, r), the mask bits
    assert plain_bytes - fused_bytes >= plain_extra(n), (plain_bytes, fused_bytes)


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in (torch.ops.aten.detach.default, torch.ops.aten.view.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_fused_node_dispatches_fewer_ops():
    torch.manual_seed(0)
    layer = lora_layer(nn.Linear(IN, OUT), 0.0)
    x = torch.randn(4, 6, IN, requires_grad=True)
    counts = []
    for fast in (True, False):
        with fast_paths(fast), CountOps() as ops:
            layer(x).sum().backward()
        counts.append(ops.count)
    assert counts[0] < counts[1], counts


# ---------------------------------------------------------------- the parity benchmark


def test_parity_benchmark_runs_tiny_on_the_cpu():
    """bench/parity_gpu.py --tiny: fast paths (fused LoRA on) and references train the same curve
    in fp32 on the CPU, and the script's JSON holds what the GPU run reports."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "parity_gpu.py"
    spec = importlib.util.spec_from_file_location("parity_gpu", path)
    assert spec is not None and spec.loader is not None
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    result = parity.main(["--tiny", "--steps", "10"])
    for method in ("full", "lora"):
        run = result[method]
        assert len(run["fast"]["curve"]) == len(run["reference"]["curve"]) == 1
        assert run["max_smoothed_gap_fast_vs_reference"] <= 1e-4
        assert run["bf16_noise_estimate"] > 0  # another data order moves the curve
        assert run["within_noise"]

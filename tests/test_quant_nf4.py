"""Rust NF4/FP4 (ferrotune.quant.blockwise) against the pure-torch CUDA-semantics reference
(ferrotune.quant.reference), and both against bitsandbytes' CPU path where it agrees with CUDA."""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from ferrotune.quant import blockwise as B
from ferrotune.quant import reference as R

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QTYPES = ("nf4", "fp4")


def _check_quantize(x: torch.Tensor, blocksize: int, quant_type: str) -> None:
    packed, state = B.quantize_4bit(x, blocksize, quant_type, double_quant=False)
    ref_packed, ref_absmax = R.quantize_4bit(x, blocksize, quant_type)
    assert packed.shape == ((x.numel() + 1) // 2, 1)
    mismatch = (packed.view(-1) != ref_packed).nonzero()
    assert mismatch.numel() == 0, (
        f"{quant_type} bs={blocksize}: bytes differ at {mismatch[:8].view(-1).tolist()}"
    )
    assert torch.equal(state.absmax.view(torch.int32), ref_absmax.view(torch.int32))
    for out_dtype in DTYPES:
        ours = B.dequantize_4bit(packed, state, out_dtype).reshape(-1)
        ref = R.dequantize_4bit(ref_packed, ref_absmax, x.numel(), blocksize, quant_type, out_dtype)
        bits = torch.int32 if out_dtype == torch.float32 else torch.int16
        assert torch.equal(ours.view(bits), ref.view(bits)), f"dequantize to {out_dtype}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QTYPES)
def test_rust_matches_reference_on_random_weights(dtype: torch.dtype, quant_type: str) -> None:
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(61, 133, generator=g) * 0.02).to(dtype)  # 8113 elements: odd, partial last block
    x.view(-1)[::97] *= 40  # outliers
    for blocksize in B.BLOCKSIZES:
        _check_quantize(x, blocksize, quant_type)


def _adversarial(dtype: torch.dtype) -> torch.Tensor:
    """Blocks of 64 that exercise every special case of the kernel."""
    tiny = torch.finfo(torch.float32).tiny
    blocks = []
    blocks.append(torch.zeros(64))  # all zero: absmax 0, codes 0
    blocks.append(torch.full((64,), -0.0))
    denormals = torch.full((64,), tiny / 4)  # fp32 denormals: flushed, so an "all-zero" block
    denormals[1::2] = -tiny / 8
    blocks.append(denormals)
    mixed = torch.zeros(64)
    mixed[0] = tiny  # smallest normal as absmax: huge reciprocal
    mixed[1] = tiny / 2
    blocks.append(mixed)
    for thresholds in (R.NF4_THRESHOLDS, R.FP4_THRESHOLDS, -R.FP4_THRESHOLDS):
        exact = torch.zeros(64)
        exact[0] = 1.0
        up = torch.nextafter(thresholds, torch.tensor(2.0))
        down = torch.nextafter(thresholds, torch.tensor(-2.0))
        vals = torch.cat([thresholds, up, down])[:63]
        exact[1 : 1 + vals.numel()] = vals
        blocks.append(exact)
    nan = torch.randn(64)
    nan[3] = float("nan")
    nan[10] = float("inf")
    blocks.append(nan)
    only_nan = torch.full((64,), float("nan"))
    blocks.append(only_nan)
    neg = -torch.rand(64) - 0.5
    blocks.append(neg)
    big = torch.full((64,), torch.finfo(torch.float16).max)
    big[5] = -big[5]
    blocks.append(big)
    tail = torch.randn(33)  # partial last block, odd element count
    x = torch.cat([*blocks, tail])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QTYPES)
def test_rust_matches_reference_on_adversarial_blocks(dtype: torch.dtype, quant_type: str) -> None:
    x = _adversarial(dtype)
    for blocksize in (32, 64, 128):
        _check_quantize(x, blocksize, quant_type)
    for n in (1, 2, 3, 31, 63, 65):
        _check_quantize(x[:n], 64, quant_type)


def test_edge_semantics_are_the_cuda_kernels() -> None:
    """All-zero blocks quantize to code 0 (NaN from 0 * inf), ties go to the lower code."""
    x = torch.zeros(128)
    x[64] = 1.0
    x[65] = float(R.NF4_THRESHOLDS[14])
    x[66] = float(torch.nextafter(R.NF4_THRESHOLDS[14], torch.tensor(2.0)))
    packed, state = B.quantize_4bit(x, 64, "nf4", double_quant=False)
    flat = packed.view(-1)
    assert torch.equal(flat[:32], torch.zeros(32, dtype=torch.uint8))
    assert state.absmax.tolist() == [0.0, 1.0]
    assert flat[32].item() == 0xFE  # 1.0 -> 15, threshold itself -> 14
    assert flat[33].item() >> 4 == 15  # one ulp above -> 15
    deq = B.dequantize_4bit(packed, state, torch.float32)
    assert torch.all(deq[:64] == 0) and torch.all(torch.signbit(deq[:64]))


def test_tables_match_bitsandbytes() -> None:
    for qt in QTYPES:
        ours = torch.from_dlpack(B._native.quant_map(qt))
        theirs = bnb_functional.get_4bit_type(qt, device="cpu")
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), qt
        assert torch.equal(R.quant_map(qt).view(torch.int32), theirs.view(torch.int32)), qt
    ours = torch.from_dlpack(B._native.dynamic_map_signed())
    theirs = bnb_functional.create_dynamic_map(signed=True)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    assert torch.equal(R.dynamic_map_signed().view(torch.int32), theirs.view(torch.int32))


def test_nested_quantization_matches_reference() -> None:
    g = torch.Generator().manual_seed(3)
    absmax = torch.rand(1000, generator=g) * 0.1 + 0.01
    absmax[256:512] = absmax[300]  # a block that centres to (almost) zero
    for offset in (None, 0.05):
        codes, nested, off = B.quantize_nested(absmax, offset)
        rc, rn, roff = R.quantize_nested(absmax, offset)
        assert off == roff
        assert torch.equal(codes, rc)
        assert torch.equal(nested.view(torch.int32), rn.view(torch.int32))
        back = B.dequantize_nested(codes, nested, off)
        assert torch.equal(back.view(torch.int32), R.dequantize_nested(rc, rn, roff).view(torch.int32))
        assert (back - absmax).abs().max() < 1e-3
    # values exactly on the 8-bit map's midpoints and codes
    code = R.dynamic_map_signed()
    mids = (code[:-1] + code[1:]) * 0.5
    probe = torch.cat(
        [code, mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))]
    )
    probe[0] = 1.0  # absmax 1 so the scaled values are the probes themselves
    codes, nested, off = B.quantize_nested(probe, 0.0)
    rc, _, _ = R.quantize_nested(probe, 0.0)
    assert torch.equal(codes, rc)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_nf4_agrees_with_bitsandbytes_cpu_on_regular_blocks(dtype: torch.dtype) -> None:
    """Full blocks with no zero block: bitsandbytes' CPU quantizer and the CUDA kernel agree
    (its bucketize midpoints equal the tree thresholds except for four single fp32 values that
    random data does not hit), and its native dequantize equals ours."""
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(128, 256, generator=g) * 0.02).to(dtype)
    packed, state = B.quantize_4bit(w, 64, "nf4", double_quant=False)
    theirs, their_state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, theirs)
    assert torch.equal(state.absmax, their_state.absmax)
    ours = B.dequantize_4bit(packed, state)
    assert torch.equal(ours, bnb_functional.dequantize_4bit(theirs, their_state))


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)


def test_fp4_differs_from_bitsandbytes_cpu_only_on_zero_sign_and_thresholds() -> None:
    """FP4: the CUDA tree gives small negative values the code of -0 (8) and compares with its own
    literals; the CPU path picks the nearest code value. Nothing else differs."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(128, 256, generator=g) * 0.02
    packed, state = B.quantize_4bit(w, 64, "fp4", double_quant=False)
    theirs, their_state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="fp4")
    assert torch.equal(state.absmax, their_state.absmax)
    ours, cpu = _nibbles(packed), _nibbles(theirs)
    differ = (ours != cpu).nonzero().view(-1)
    assert differ.numel() > 0
    p = (w.reshape(-1) / state.absmax.repeat_interleave(64))[differ]
    both_zero = (ours[differ] & 7 == 0) & (cpu[differ] & 7 == 0)
    near_threshold = ((p.abs()[:, None] - R.FP4_THRESHOLDS).abs() < 1e-6).any(1)
    assert torch.all(both_zero | near_threshold)


def test_nf4_differs_from_bitsandbytes_cpu_where_cuda_does() -> None:
    """The CPU fallback gives code 7 (0.0) to an all-zero block and divides in a partial last
    block; the CUDA kernel (and we) give code 0 and multiply by the reciprocal."""
    x = torch.zeros(2, 64)
    x[1] = torch.randn(64)
    packed, _ = B.quantize_4bit(x, 64, "nf4", double_quant=False)
    theirs, _ = bnb_functional.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert torch.all(theirs.view(-1)[:32] == 0x77)
    assert torch.all(packed.view(-1)[:32] == 0x00)
    assert torch.equal(packed.view(-1)[32:], theirs.view(-1)[32:])

    # A partial block where x / a and x * (1 / a) fall on opposite sides of a threshold that the
    # CPU's fp32 midpoints share with the kernel.
    mids = (R.NF4_CODE[:-1] + R.NF4_CODE[1:]) / 2
    i = int((mids == R.NF4_THRESHOLDS).nonzero()[-1])
    t = R.NF4_THRESHOLDS[i]
    a = torch.linspace(0.5, 1.0, 200_001)
    x = (t * a).float()
    near = torch.stack([torch.nextafter(x, x + 1), x, torch.nextafter(x, x - 1)])
    div = (near / a) > t
    mul = (near * (1.0 / a)) > t
    col = (div != mul).any(0).nonzero()[0, 0]
    row = (div[:, col] != mul[:, col]).nonzero()[0, 0]
    block = torch.tensor([float(a[col]), float(near[row, col])])  # a partial block of 2
    packed, _ = B.quantize_4bit(block, 64, "nf4", double_quant=False)
    theirs, _ = bnb_functional.quantize_4bit(block, blocksize=64, quant_type="nf4")
    cuda_code = i + 1 if bool(mul[row, col]) else i
    cpu_code = i + 1 if bool(div[row, col]) else i
    assert packed.view(-1)[0].item() & 15 == cuda_code
    assert theirs.view(-1)[0].item() & 15 == cpu_code != cuda_code


def test_double_quant_vs_bitsandbytes_cpu() -> None:
    """bitsandbytes' CPU 8-bit quantizer rounds through a 65536-entry table, the CUDA kernel (and
    we) by exact midpoints: given the same offset the codes agree except, rarely, by one step
    near a midpoint, the nested absmax agree exactly, and so does dequantizing the same codes."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(512, 1024, generator=g) * 0.02
    packed, state = B.quantize_4bit(w, 64, "nf4", double_quant=True)
    theirs, their_state = bnb_functional.quantize_4bit(
        w, blocksize=64, quant_type="nf4", compress_statistics=True
    )
    assert torch.equal(packed, theirs)
    assert state.offset == pytest.approx(their_state.offset.item(), rel=1e-6)  # summation order
    absmax = B.quantize_4bit(w, 64, "nf4", double_quant=False)[1].absmax
    offset = their_state.offset.item()
    codes, nested, _ = B.quantize_nested(absmax, offset)
    diff = (codes.int() - their_state.absmax.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    assert torch.equal(nested, their_state.state2.absmax)
    ours = B.dequantize_nested(their_state.absmax, their_state.state2.absmax, offset)
    cpu = bnb_functional.dequantize_blockwise(their_state.absmax, their_state.state2) + their_state.offset
    assert torch.equal(ours, cpu)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="blocksize"):
        B.quantize_4bit(torch.zeros(64), 48)
    with pytest.raises(ValueError, match="quant_type"):
        B.quantize_4bit(torch.zeros(64), 64, "int4")
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        B.quantize_4bit(torch.zeros(64, dtype=torch.int32))


def test_quantized_tensors_reach_torch_without_a_copy() -> None:
    from ferrotune import _native

    w = torch.randn(64, 64, dtype=torch.bfloat16)
    packed, absmax = _native.quantize_4bit(w.view(-1).view(torch.uint8).numpy(), "BF16", 64, "nf4")
    assert torch.from_dlpack(packed).data_ptr() == packed.data_ptr
    assert torch.from_dlpack(absmax).data_ptr() == absmax.data_ptr

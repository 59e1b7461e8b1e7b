"""The Triton AdamW (ferrotune.kernels.adamw) against torch.optim.AdamW's fused step, which
computes the same formula in fp32. Without a GPU the kernel runs under Triton's CPU
interpreter (tests/conftest.py turns it on)."""

from __future__ import annotations

import pytest
import torch
from ferrotune.kernels.adamw import AdamW, adamw_update, adamw_update_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter has no bfloat16 (see tests/test_kernels.py): bf16 is checked on the GPU only.
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
# Kernels take the Triton path even on the CPU here (under the interpreter).
pytestmark = pytest.mark.usefixtures("triton_kernels_on_cpu_too")


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(96, 40), (40,), (3, 700), (1,), (2500,)]  # several blocks, partial blocks, one element
    return [torch.randn(s, generator=g).to(DEVICE, dtype) for s in shapes]


def groups_of(params):
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def run(optimizer, params, steps, seed=1, skip=None):
    """`steps` steps with seeded gradients; param index `skip` gets no gradient on step 2."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g).to(DEVICE, p.dtype)
            p.grad = None if (i == skip and step == 1) else grad
        optimizer.step()


def assert_same_update(ours, theirs, dtype):
    for a, b in zip(ours, theirs, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        else:
            # fp32 results a hair either side of a bf16 rounding boundary differ by one ulp, and
            # that difference feeds the next steps: a few ulps, in a few elements
            torch.testing.assert_close(a, b, atol=1e-6, rtol=2**-5)
            assert (a != b).float().mean() < 0.02


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_step_matches_torch_fused_adamw(dtype):
    ours, theirs = make_params(dtype), make_params(dtype)
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6)
    run(AdamW(groups_of(ours), **kw), ours, steps=6)
    run(torch.optim.AdamW(groups_of(theirs), fused=True, **kw), theirs, steps=6)
    assert_same_update(ours, theirs, dtype)
    assert not torch.equal(ours[0], make_params(dtype)[0])  # the step moved the parameters


def test_a_parameter_that_missed_a_step_keeps_its_own_bias_correction():
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    optimizer = AdamW(groups_of(ours), lr=3e-2)
    run(optimizer, ours, steps=4, skip=0)
    run(torch.optim.AdamW(groups_of(theirs), lr=3e-2, fused=True), theirs, steps=4, skip=0)
    assert_same_update(ours, theirs, torch.float32)
    steps = [optimizer.state[p]["step"].item() for p in ours]
    assert steps == [3.0, 4.0, 4.0, 4.0, 4.0]


def test_state_dict_moves_between_ours_and_torchs():
    """A checkpoint of either optimizer resumes in the other: the same state layout."""
    straight = make_params(torch.float32)
    run(AdamW(groups_of(straight), lr=1e-2), straight, steps=5)

    resumed = make_params(torch.float32)
    first = AdamW(groups_of(resumed), lr=1e-2)
    run(first, resumed, steps=3)
    second = torch.optim.AdamW(groups_of(resumed), lr=1e-2, fused=True)
    second.load_state_dict(first.state_dict())
    g = torch.Generator().manual_seed(1)  # the gradients `run` drew, then those of steps 4 and 5
    for i in range(3 * len(resumed)):
        torch.randn(resumed[i % len(resumed)].shape, generator=g)

    def gradients():
        for p in resumed:
            p.grad = torch.randn(p.shape, generator=g).to(DEVICE, p.dtype)

    gradients()
    second.step()
    third = AdamW(groups_of(resumed), lr=1e-2)
    third.load_state_dict(second.state_dict())
    assert all(s["step"].device.type == "cpu" for s in third.state.values())
    gradients()
    third.step()
    assert_same_update(resumed, straight, torch.float32)


def test_cases_outside_the_kernel_take_torchs_step():
    """amsgrad is not in the kernel's formula: the step is torch's own, exactly."""
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    optimizer = AdamW(groups_of(ours), lr=1e-2)
    for group in optimizer.param_groups:
        group["amsgrad"] = True
    run(optimizer, ours, steps=3)
    run(torch.optim.AdamW(groups_of(theirs), lr=1e-2, amsgrad=True), theirs, steps=3)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert "max_exp_avg_sq" in optimizer.state[ours[0]]


def test_one_launch_updates_tensors_of_mixed_sizes_as_the_reference_does():
    g = torch.Generator().manual_seed(3)
    sizes = [5000, 1, 2048, 2049, 0, 77]
    made = [[torch.randn(n, generator=g).to(DEVICE) for n in sizes] for _ in range(4)]
    copies = [[t.clone() for t in ts] for ts in made]
    made[3] = [v.abs() for v in made[3]]  # exp_avg_sq >= 0
    copies[3] = [v.abs() for v in copies[3]]
    adamw_update(*made, step=7, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05)
    for p, grad, m, v in zip(*copies, strict=True):
        adamw_update_reference(p, grad, m, v, 7, 1e-2, 0.9, 0.99, 1e-8, 0.05)
    for ours, ref in zip(made, copies, strict=True):
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_parameter_at_an_unaligned_offset_takes_torchs_step():
    """The kernel's vector accesses need 16-byte aligned tensors; a view at an odd offset sends the
    step to torch's own, exactly."""
    made = [torch.randn(1001, generator=torch.Generator().manual_seed(4)).to(DEVICE) for _ in range(2)]
    ours, theirs = [made[0][1:].detach().requires_grad_()], [made[1][1:].detach().requires_grad_()]
    assert ours[0].data_ptr() % 16
    run(AdamW(ours, lr=1e-2), ours, steps=3)
    run(torch.optim.AdamW(theirs, lr=1e-2), theirs, steps=3)
    assert torch.equal(ours[0], theirs[0])


def test_fsdp2_shards_step_through_the_kernel_as_torch_steps_them(tmp_path):
    """FSDP2 parameters (DTensors; one gloo rank here) are stepped on their local shards by the
    kernel, and end where torch's AdamW takes the same model."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    backend = "nccl" if DEVICE == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:

        def sharded_model():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8)).to(DEVICE)
            for layer in model:
                fully_shard(layer)
            return fully_shard(model)

        ours, theirs = sharded_model(), sharded_model()
        assert type(next(ours.parameters())).__name__ == "DTensor"
        ours_opt, theirs_opt = (
            AdamW(ours.parameters(), lr=1e-2),
            torch.optim.AdamW(theirs.parameters(), lr=1e-2),
        )
        x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        for _ in range(3):
            for model, opt in ((ours, ours_opt), (theirs, theirs_opt)):
                opt.zero_grad()
                model(x).square().sum().backward()
            assert ours_opt._kernel_serves()
            ours_opt.step()
            theirs_opt.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a.full_tensor(), b.full_tensor(), atol=1e-6, rtol=1e-5)
    finally:
        dist.destroy_process_group()

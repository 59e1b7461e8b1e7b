"""Every kernel against its plain-PyTorch reference, forward and backward. Without a GPU the
Triton kernels run under Triton's CPU interpreter (tests/conftest.py turns it on)."""

from __future__ import annotations

import pytest
import torch
from ferrotune.kernels import (
    add_rms_norm,
    add_rms_norm_reference,
    apply_rope,
    apply_rope_pair,
    apply_rope_reference,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    rms_norm,
    rms_norm_beside_residual,
    rms_norm_reference,
    shared_input_linears,
    shared_input_linears_reference,
    swiglu,
    swiglu_linear,
    swiglu_linear_reference,
    swiglu_reference,
)
from ferrotune.kernels._dispatch import triton_runs_on

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's CPU interpreter computes bfloat16 through numpy, which has no bfloat16 and returns
# garbage, so bf16 is checked on the GPU and half precision stands in for it on the CPU.
LOW = torch.bfloat16 if DEVICE == "cuda" else torch.float16
# Kernels take the Triton path even on the CPU here (under the interpreter).
pytestmark = pytest.mark.usefixtures("triton_kernels_on_cpu_too")


def grads_of(fn, *inputs, seed=0):
    """Output and input gradients of fn under a fixed random upstream gradient."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*leaves)
    g = torch.Generator(device="cpu").manual_seed(seed)
    upstream = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    (out * upstream).sum().backward()
    return out.detach(), [x.grad for x in leaves if x.requires_grad]


def assert_close_all(a, b, atol, rtol):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=rtol)
    for ga, gb in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(ga, gb, atol=atol, rtol=rtol)


def test_the_triton_path_is_exercised():
    assert triton_runs_on(torch.zeros(1, device=DEVICE))


def test_cpu_tensors_take_the_reference_outside_the_interpreter_block():
    import ferrotune.kernels._dispatch as dispatch

    saved, dispatch._cpu_interpreter = dispatch._cpu_interpreter, False
    try:
        assert not triton_runs_on(torch.zeros(1))
    finally:
        dispatch._cpu_interpreter = saved


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (LOW, 2e-2)])
@pytest.mark.parametrize("hidden", [64, 96])
def test_rms_norm_matches_reference(dtype, tol, hidden):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, hidden, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)
    fast = grads_of(lambda x, w: rms_norm(x, w, 1e-5), x, w)
    ref = grads_of(lambda x, w: rms_norm_reference(x, w, 1e-5), x, w)
    assert_close_all(fast, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (LOW, 1e-2)])
def test_rope_matches_reference_on_strided_heads(dtype, tol):
    g = torch.Generator().manual_seed(2)
    bsz, seq, heads, dim = 2, 7, 3, 16
    # (B, H, T, D) storage seen as (B, T, H, D), as attention code holds it after a transpose.
    x = torch.randn(bsz, heads, seq, dim, generator=g).to(DEVICE, dtype).transpose(1, 2)
    angles = torch.randn(bsz, seq, dim // 2, generator=g).repeat(1, 1, 2)
    cos, sin = angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)
    fast = grads_of(lambda x: apply_rope(x, cos, sin), x)
    ref = grads_of(lambda x: apply_rope_reference(x, cos, sin), x)
    assert_close_all(fast, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (LOW, 1e-2)])
@pytest.mark.parametrize("keys_used", [True, False])
def test_rope_pair_rotates_queries_and_keys_as_two_calls_would(dtype, tol, keys_used):
    g = torch.Generator().manual_seed(12)
    bsz, seq, heads, kv_heads, dim = 2, 5, 6, 2, 16
    q = torch.randn(bsz, heads, seq, dim, generator=g).to(DEVICE, dtype).transpose(1, 2)  # strided
    k = torch.randn(bsz, seq, kv_heads, dim, generator=g).to(DEVICE, dtype)
    angles = torch.randn(1, seq, dim // 2, generator=g).repeat(1, 1, 2)  # one table for every row
    cos, sin = angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)
    weight = 1.0 if keys_used else 0.0

    def pair(q, k):
        q_rot, k_rot = apply_rope_pair(q, k, cos, sin)
        return torch.cat((q_rot.flatten(), weight * k_rot.flatten()))

    def two_calls(q, k):
        full = (bsz, seq, dim)
        q_rot = apply_rope_reference(q, cos.expand(full), sin.expand(full))
        return torch.cat(
            (q_rot.flatten(), weight * apply_rope_reference(k, cos.expand(full), sin.expand(full)).flatten())
        )

    assert_close_all(grads_of(pair, q, k), grads_of(two_calls, q, k), atol=tol, rtol=tol)


def test_rope_pair_backward_with_only_the_queries_in_the_loss():
    g = torch.Generator().manual_seed(13)
    q = torch.randn(1, 4, 2, 8, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(1, 4, 1, 8, generator=g).to(DEVICE).requires_grad_()
    cos, sin = torch.ones(4, 8, device=DEVICE), torch.zeros(4, 8, device=DEVICE)  # angle 0: identity
    q_rot, _ = apply_rope_pair(q, k, cos, sin)
    q_rot.sum().backward()
    torch.testing.assert_close(q.grad, torch.ones_like(q))
    assert k.grad is None


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (LOW, 2e-2)])
def test_swiglu_matches_reference(dtype, tol):
    g = torch.Generator().manual_seed(3)
    gate = (3 * torch.randn(4, 1500, generator=g)).to(DEVICE, dtype)
    up = torch.randn(4, 1500, generator=g).to(DEVICE, dtype)
    assert_close_all(grads_of(swiglu, gate, up), grads_of(swiglu_reference, gate, up), atol=tol, rtol=tol)


@pytest.mark.parametrize("chunk", [5, 64])
@pytest.mark.parametrize("normalizer", [None, 37.0])
def test_linear_cross_entropy_matches_full_logits(chunk, normalizer):
    g = torch.Generator().manual_seed(4)
    n, hidden, vocab = 23, 16, 50
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64).to(DEVICE)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64).to(DEVICE)
    y = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    y[::4] = -100
    fast = grads_of(lambda h, w: linear_cross_entropy(h, w, y, normalizer, chunk_size=chunk), h, w)
    ref = grads_of(lambda h, w: linear_cross_entropy_reference(h, w, y, normalizer), h, w)
    assert_close_all(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (LOW, 1e-2)])
@pytest.mark.parametrize("vocab", [50, 9000])  # one block, and several blocks with a ragged tail
def test_row_loss_and_grad_kernel_matches_reference(dtype, tol, vocab):
    from ferrotune.kernels.cross_entropy import _rows_loss_and_grad_fast, _rows_loss_and_grad_reference

    g = torch.Generator().manual_seed(5)
    rows = 6
    logits = (8 * torch.randn(rows, vocab, generator=g)).to(DEVICE, dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(DEVICE)
    labels[2] = -100
    labels[4] = vocab - 1  # the last column, in the tail block
    scale = torch.rand(rows, generator=g).to(DEVICE)
    ref_loss, ref_grad = _rows_loss_and_grad_reference(logits.clone(), labels, scale, want_grad=True)
    fast_loss, fast_grad = _rows_loss_and_grad_fast(logits.clone(), labels, scale, want_grad=True)
    torch.testing.assert_close(fast_loss, ref_loss, atol=tol, rtol=tol)
    torch.testing.assert_close(fast_grad.float(), ref_grad.float(), atol=tol, rtol=tol)
    assert fast_loss[2] == 0 and not fast_grad[2].any()  # an ignored row: no loss, zero gradient
    untouched = logits.clone()
    loss_only, none = _rows_loss_and_grad_fast(untouched, labels, scale, want_grad=False)
    torch.testing.assert_close(loss_only, ref_loss, atol=tol, rtol=tol)
    assert none is None and torch.equal(untouched, logits)


def test_linear_cross_entropy_frozen_head_gives_no_weight_grad():
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(11, 8)
    y = torch.tensor([1, 2, -100, 3, 4, 5])
    linear_cross_entropy(h, w, y, chunk_size=4).backward()
    ref_h = h.detach().clone().requires_grad_()
    linear_cross_entropy_reference(ref_h, w, y).backward()
    torch.testing.assert_close(h.grad, ref_h.grad)
    assert w.grad is None


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (LOW, 3e-2)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_swiglu_linear_recomputes_the_product_and_matches_reference(dtype, tol, bias, with_residual):
    g = torch.Generator().manual_seed(5)
    gate = torch.randn(2, 3, 96, generator=g).to(DEVICE, dtype)
    up = torch.randn(2, 3, 96, generator=g).to(DEVICE, dtype)
    w = (0.1 * torch.randn(40, 96, generator=g)).to(DEVICE, dtype)
    b = torch.randn(40, generator=g).to(DEVICE, dtype) if bias else None
    residual = torch.randn(2, 3, 40, generator=g).to(DEVICE, dtype)  # added inside the GEMM when given
    inputs = (gate, up, w, *([b] if bias else []), *([residual] if with_residual else []))

    def taking(fn):  # (gate, up, w[, b][, residual]) -> fn(gate, up, w, b or None, residual or None)
        def run(gate, up, w, *rest):
            bias_in = rest[0] if bias else None
            residual_in = rest[-1] if with_residual else None
            return fn(gate, up, w, bias_in, residual_in)

        return run

    fast_fn, ref_fn = taking(swiglu_linear), taking(swiglu_linear_reference)
    fast, ref = grads_of(fast_fn, *inputs), grads_of(ref_fn, *inputs)
    assert_close_all(fast, ref, atol=tol, rtol=tol)
    if with_residual:  # the residual's gradient is the output's, whole
        upstream = torch.randn(fast[0].shape, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
        torch.testing.assert_close(fast[1][-1], upstream)


@pytest.mark.skipif(DEVICE != "cuda", reason="autocast to bf16 is a CUDA feature")
def test_swiglu_linear_under_autocast_matches_reference():
    g = torch.Generator().manual_seed(6)
    gate = torch.randn(4, 64, generator=g).to(DEVICE)
    up = torch.randn(4, 64, generator=g).to(DEVICE)
    w = (0.1 * torch.randn(32, 64, generator=g)).to(DEVICE)  # fp32 weights, bf16 compute
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = grads_of(swiglu_linear, gate.bfloat16(), up.bfloat16(), w)
        ref = grads_of(swiglu_linear_reference, gate.bfloat16(), up.bfloat16(), w)
    assert fast[1][2].dtype == torch.float32
    assert_close_all(fast, ref, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(DEVICE != "cuda", reason="autocast to bf16 is a CUDA feature")
def test_linear_cross_entropy_under_autocast_keeps_fp32_gradients():
    g = torch.Generator().manual_seed(9)
    h = torch.randn(37, 64, generator=g).to(DEVICE)  # fp32 hidden states and head, bf16 compute
    w = (0.1 * torch.randn(300, 64, generator=g)).to(DEVICE)
    y = torch.randint(0, 300, (37,), generator=g).to(DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = grads_of(lambda h, w: linear_cross_entropy(h, w, y, chunk_size=16), h, w)
        ref = grads_of(lambda h, w: linear_cross_entropy_reference(h, w, y), h, w)
    assert fast[1][0].dtype == fast[1][1].dtype == torch.float32
    assert_close_all(fast, ref, atol=3e-2, rtol=3e-2)


def test_model_fast_paths_match_the_reference_model():
    """A whole decoder (RMSNorm, RoPE, SwiGLU and the row-wise cross-entropy kernels) against the
    same weights with every kernel off."""
    from ferrotune.kernels import set_enabled
    from ferrotune.models.llama import CausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=61, attention_bias=True)  # fmt: skip
    torch.manual_seed(0)
    model = CausalLM(config).to(DEVICE)
    model.init_weights()
    ids = torch.randint(0, 61, (2, 9), device=DEVICE)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100

    def loss_and_grads():
        model.zero_grad()
        loss = linear_cross_entropy(model.hidden_states(ids), model.lm_head.weight, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fast_loss, fast_grads = loss_and_grads()
    set_enabled(False)
    try:
        ref_loss, ref_grads = loss_and_grads()
    finally:
        set_enabled(True)
    torch.testing.assert_close(fast_loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def shared_linears_case(dtype, bias, device=DEVICE):
    """x (2, 5, 24), three projections of widths 16, 8, 8 (q, k, v-like), upstream gradients."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 24, generator=g).to(device, dtype)
    weights = [(0.2 * torch.randn(n, 24, generator=g)).to(device, dtype) for n in (16, 8, 8)]
    biases = [torch.randn(n, generator=g).to(device, dtype) if bias else None for n in (16, 8, 8)]
    ups = [torch.randn(2, 5, n, generator=g).to(device) for n in (16, 8, 8)]
    return x, weights, biases, ups


def shared_linears_grads(fn, x, weights, biases, ups, used=(True, True, True)):
    """Outputs and gradients (x, each W, each b) when the outputs marked `used` enter the loss."""
    leaves = [
        t.detach().clone().requires_grad_(True) for t in (x, *weights, *[b for b in biases if b is not None])
    ]
    lx, lw = leaves[0], leaves[1:4]
    lb = leaves[4:] if len(leaves) > 4 else [None, None, None]
    outs = fn(lx, lw, lb)
    sum((o.float() * u).sum() for o, u, keep in zip(outs, ups, used, strict=True) if keep).backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (LOW, 3e-2)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("used", [(True, True, True), (True, False, True)])
def test_shared_input_linears_match_separate_linears(dtype, tol, bias, used):
    """q/k/v (or gate/up) as one node: the same outputs and gradients (x, every W and b) as the
    separate linears autograd would run, also when one output takes no part in the loss."""
    case = shared_linears_case(dtype, bias)
    fast = shared_linears_grads(shared_input_linears, *case, used=used)
    ref = shared_linears_grads(shared_input_linears_reference, *case, used=used)
    assert_close_all(fast, ref, atol=tol, rtol=tol)


@pytest.mark.skipif(DEVICE != "cuda", reason="autocast to bf16 is a CUDA feature")
def test_shared_input_linears_under_autocast_keep_fp32_weight_gradients():
    x, weights, biases, ups = shared_linears_case(torch.float32, True)  # fp32 weights, bf16 compute
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = shared_linears_grads(shared_input_linears, x.bfloat16(), weights, biases, ups)
        ref = shared_linears_grads(shared_input_linears_reference, x.bfloat16(), weights, biases, ups)
    assert all(gw.dtype == torch.float32 for gw in fast[1][1:])
    assert fast[1][0].dtype == torch.bfloat16
    assert_close_all(fast, ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (LOW, 3e-2)])
@pytest.mark.parametrize("use_sum", [True, False])
def test_add_rms_norm_matches_the_add_then_the_norm(dtype, tol, use_sum):
    """(x + r, RMSNorm(x + r)) fused: the same sum, normalised output and gradients (x, r, w) as
    the two plain steps, whether or not the sum itself also feeds the loss (the residual stream)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 5, 96, generator=g).to(DEVICE, dtype)
    r = torch.randn(3, 5, 96, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(DEVICE, dtype)
    up_h, up_y = (torch.randn(3, 5, 96, generator=g).to(DEVICE) for _ in range(2))

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, r, w)]
        h, y = fn(*leaves, 1e-6)
        loss = (y.float() * up_y).sum() + ((h.float() * up_h).sum() if use_sum else 0)
        loss.backward()
        return [h.detach(), y.detach()], [t.grad for t in leaves]

    fast, ref = grads(add_rms_norm), grads(add_rms_norm_reference)
    assert fast[0][0].dtype == ref[0][0].dtype and fast[0][1].dtype == ref[0][1].dtype
    assert torch.equal(fast[0][0], ref[0][0])  # the sum rounds exactly as torch's add
    assert_close_all(fast, ref, atol=tol, rtol=tol)


def test_add_rms_norm_with_an_fp32_residual_stream_and_a_low_precision_branch():
    """Under autocast the residual stream is fp32 (fp32 embeddings) while the attention output is
    bf16: the sum and the norm are fp32, and each input gets its gradient in its own dtype."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 64, generator=g).to(DEVICE)
    r = torch.randn(4, 64, generator=g).to(DEVICE, LOW)
    w = (1 + 0.1 * torch.randn(64, generator=g)).to(DEVICE)
    up_h, up_y = (torch.randn(4, 64, generator=g).to(DEVICE) for _ in range(2))

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, r, w)]
        h, y = fn(*leaves, 1e-6)
        ((h * up_h).sum() + (y * up_y).sum()).backward()
        return [h.detach(), y.detach()], [t.grad for t in leaves]

    fast, ref = grads(add_rms_norm), grads(add_rms_norm_reference)
    assert fast[0][0].dtype == fast[0][1].dtype == torch.float32
    assert [t.dtype for t in fast[1]] == [torch.float32, LOW, torch.float32]
    assert torch.equal(fast[0][0], ref[0][0])
    assert_close_all(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (LOW, 2e-2)])
def test_rms_norm_beside_residual_sums_both_gradients_of_its_input(dtype, tol):
    """x feeds the norm and the residual stream: the node's input gradient is the sum of both
    paths, as autograd would form it for x used twice."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 7, 96, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(DEVICE, dtype)
    branch = torch.randn(4, 7, 96, generator=g).to(DEVICE, dtype)

    def block(norm_fn):
        def fn(x, w):
            residual, normed = norm_fn(x, w)
            return residual * branch + normed  # both outputs reach the loss

        return fn

    fast = grads_of(block(lambda x, w: rms_norm_beside_residual(x, w, 1e-5)), x, w)
    ref = grads_of(block(lambda x, w: (x, rms_norm_reference(x, w, 1e-5))), x, w)
    assert_close_all(fast, ref, atol=tol, rtol=tol)
    # only the residual used: the gradient passes straight through
    (only,) = grads_of(lambda x: rms_norm_beside_residual(x, w, 1e-5)[0] * 3.0, x)[1]
    torch.testing.assert_close(only, torch.full_like(x, 3.0) * grads_of(lambda x: x, x)[1][0])


@pytest.mark.parametrize(
    ("head_in_loss", "ids_dtype"), [(True, torch.int64), (False, torch.int64), (True, torch.int32)]
)
def test_tied_embedding_gradient_equals_the_plain_lookup(head_in_loss, ids_dtype):
    """A tied model's table gradient on the fast path (the lookup's rows added sparsely into the
    head's gradient) equals the plain path's, with or without the head in the loss, and summed
    over two backward passes; `.grad` is dense and no dense lookup gradient is built."""
    from ferrotune import kernels
    from ferrotune.models.llama import CausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = CausalLM(config).to(DEVICE)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 40, (2, 48), generator=g).to(DEVICE, ids_dtype) for _ in range(2)]  # repeats

    def table_grad(fast: bool):
        model.zero_grad(set_to_none=True)
        kernels.set_enabled(fast)
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for ids in batches:
                    hidden = model.hidden_states(ids)
                    labels = torch.roll(ids, -1, 1).long()
                    loss = (
                        linear_cross_entropy(hidden, model.lm_head.weight, labels)
                        if head_in_loss
                        else hidden.float().square().mean()
                    )
                    loss.backward()
        finally:
            kernels.set_enabled(True)
        ops = {e.key for e in prof.key_averages()}
        return model.model.embed_tokens.weight.grad.clone(), ops

    fast, fast_ops = table_grad(True)
    plain, plain_ops = table_grad(False)
    assert fast.layout == torch.strided
    assert "aten::embedding_dense_backward" in plain_ops
    assert "aten::embedding_dense_backward" not in fast_ops
    torch.testing.assert_close(fast, plain, atol=1e-6, rtol=1e-4)


def test_linear_cross_entropy_backward_twice_over_a_kept_graph():
    """The stored gradients are scaled out of place: a second backward over a kept graph adds
    the same gradients again (scale 0.5 each time), as autograd would for the reference."""
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(12, 16, generator=g).to(DEVICE).requires_grad_(True)
    weight = torch.randn(40, 16, generator=g).to(DEVICE).requires_grad_(True)
    labels = torch.randint(0, 40, (12,), generator=g).to(DEVICE)
    loss = linear_cross_entropy(hidden, weight, labels) * 0.5
    loss.backward(retain_graph=True)
    loss.backward()
    ref_h, ref_w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    linear_cross_entropy_reference(ref_h, ref_w, labels).backward()
    torch.testing.assert_close(hidden.grad, ref_h.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad, ref_w.grad, atol=1e-5, rtol=1e-4)


class LaunchSpy:
    """Stands in for a Triton kernel: records each launch's grid and keywords, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def rms_block_cases(path, x, w, branch):
    """(fast, reference) functions of the leaves for one use of the norm: alone, beside the
    residual stream (x also reaches the loss directly) or after the residual add."""
    eps = 1e-5
    if path == "plain":
        return (lambda x, w: rms_norm(x, w, eps)), (lambda x, w: rms_norm_reference(x, w, eps))
    if path == "beside_residual":

        def beside(norm_fn):
            def fn(x, w):
                residual, normed = norm_fn(x, w)
                return residual * branch + normed

            return fn

        return beside(lambda x, w: rms_norm_beside_residual(x, w, eps)), beside(
            lambda x, w: (x, rms_norm_reference(x, w, eps))
        )

    def after_add(add_norm_fn):
        def fn(x, r, w):
            h, y = add_norm_fn(x, r, w, eps)
            return h * branch + y

        return fn

    return after_add(add_rms_norm), after_add(add_rms_norm_reference)


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize(("n_rows", "hidden"), [(7, 48), (33, 48), (33, 2048), (1, 48)])
@pytest.mark.parametrize("programs_per_sm", [1, 4])
@pytest.mark.parametrize("path", ["plain", "beside_residual", "add"])
def test_rms_norm_backward_in_row_tiles_matches_reference(
    monkeypatch, rows, n_rows, hidden, programs_per_sm, path
):
    """The backward kernel walking ROWS rows a step (row counts that leave ragged last steps and
    programs with fewer rows than others) gives the reference's dx and dw, also with the
    residual gradient added in the kernel; the launch setting reaches the kernel."""
    from ferrotune.kernels import rmsnorm

    launch = dict(rows=rows, warps=8, programs_per_sm=programs_per_sm)
    monkeypatch.setattr(rmsnorm, "RMS_BACKWARD_LAUNCH", launch)
    spy = LaunchSpy(rmsnorm._rms_backward)
    monkeypatch.setattr(rmsnorm, "_rms_backward", spy)
    g = torch.Generator().manual_seed(21)
    x, r, branch = (torch.randn(n_rows, hidden, generator=g).to(DEVICE) for _ in range(3))
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE)
    fast_fn, ref_fn = rms_block_cases(path, x, w, branch)
    inputs = (x, r, w) if path == "add" else (x, w)
    assert_close_all(grads_of(fast_fn, *inputs), grads_of(ref_fn, *inputs), atol=1e-5, rtol=1e-5)
    ((grid, kwargs),) = spy.launches
    assert kwargs["ROWS"] == rows and kwargs["HAS_RES"] == (path != "plain")
    assert grid[0] <= programs_per_sm * rmsnorm.sm_count(x.device)


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("path", ["plain", "add"])
def test_rms_norm_backward_in_row_tiles_in_low_precision(monkeypatch, rows, path):
    from ferrotune.kernels import rmsnorm

    monkeypatch.setattr(rmsnorm, "RMS_BACKWARD_LAUNCH", dict(rows=rows, warps=8, programs_per_sm=1))
    g = torch.Generator().manual_seed(22)
    x, r, branch = (torch.randn(3, 11, 96, generator=g).to(DEVICE, LOW) for _ in range(3))
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(DEVICE, LOW)
    fast_fn, ref_fn = rms_block_cases(path, x, w, branch)
    inputs = (x, r, w) if path == "add" else (x, w)
    assert_close_all(grads_of(fast_fn, *inputs), grads_of(ref_fn, *inputs), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(("rows_per_program", "rows"), [(3, 2), (5, 4), (2, 4)])
def test_rms_backward_kernel_keeps_to_its_programs_rows(rows_per_program, rows):
    """Launched directly with a share of rows that is no whole number of ROWS steps, each program
    stops at the end of its share: no row's dx is written twice, no row counted twice in dw."""
    from ferrotune.kernels import rmsnorm

    g = torch.Generator().manual_seed(23)
    n_rows, hidden = 7, 48
    x, dy = (torch.randn(n_rows, hidden, generator=g).to(DEVICE) for _ in range(2))
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-5)
    dx = torch.full_like(x, float("nan"))
    programs = -(-n_rows // rows_per_program)
    dw_partial = torch.empty(programs, hidden, device=DEVICE)
    rmsnorm._rms_backward[(programs,)](
        dy, x, w, rstd, dx, dx, dw_partial, dy.stride(0), x.stride(0), dx.stride(0), n_rows, hidden,
        rows_per_program, BLOCK=64, ROWS=rows, HAS_RES=False, STAGES=2,
    )  # fmt: skip
    leaves = [t.clone().requires_grad_(True) for t in (x, w)]
    (rms_norm_reference(*leaves, 1e-5) * dy).sum().backward()
    torch.testing.assert_close(dx, leaves[0].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw_partial.sum(0), leaves[1].grad, atol=1e-5, rtol=1e-5)


AWKWARD_SCALES = [1.0, 0.5, 1 / 3, 1 / 12345]  # 1/3 and 1/12345 are not exact in bf16 or fp16


def fp32_product(t: torch.Tensor, s: float) -> torch.Tensor:
    """round(float32(t) * float32(s)) in t's dtype."""
    return (t.float() * torch.tensor(s, dtype=torch.float32)).to(t.dtype)


@pytest.mark.parametrize("s", AWKWARD_SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, LOW])
@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_rescale_is_the_fp32_product(monkeypatch, s, dtype, in_place, path):
    """`_rescale` (the kernel, striding over more blocks than it has programs, and the reference)
    gives round(float32(t) * s) exactly, in place or into a new tensor; the old product with the
    scale rounded to t's dtype first does not, for scales that dtype cannot hold."""
    from ferrotune.kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "RESCALE_LAUNCH", dict(block=64, warps=1, programs_per_sm=1))
    monkeypatch.setattr(cross_entropy, "_RESCALE_REFERENCE_CHUNK", 500)
    if path == "reference":
        monkeypatch.setattr(cross_entropy, "triton_runs_on", lambda t: False)
    g = torch.Generator().manual_seed(31)
    t = torch.randn(37, 45, generator=g).to(DEVICE, dtype)  # 1,665 elements: 27 blocks, ragged tail
    want = fp32_product(t, s)
    scale = torch.tensor(s, dtype=torch.float32, device=DEVICE)
    work = t.clone()
    out = cross_entropy._rescale(work, scale, in_place)
    assert torch.equal(out, want)
    assert (out.data_ptr() == work.data_ptr()) == in_place
    if not in_place:
        assert torch.equal(work, t)
    # and within a unit in the last place (or the subnormal spacing) of the exact fp64 product
    info = torch.finfo(dtype)
    torch.testing.assert_close(
        out.double(), t.double() * s, rtol=info.eps, atol=info.smallest_normal * info.eps
    )
    old = t * scale.to(dtype)
    assert torch.equal(old, want) == (dtype == torch.float32 or s in (1.0, 0.5))


@pytest.mark.parametrize("s", AWKWARD_SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, LOW])
def test_linear_cross_entropy_backward_scales_in_fp32(s, dtype):
    """Under an upstream gradient s the head's and the hidden states' gradients are those of
    upstream 1 times s in fp32, rounded once; the result stays within the fp64 reference's
    tolerance."""
    g = torch.Generator().manual_seed(32)
    n, hidden, vocab = 19, 16, 70
    h = torch.randn(n, hidden, generator=g).to(DEVICE, dtype)
    w = (0.5 * torch.randn(vocab, hidden, generator=g)).to(DEVICE, dtype)
    y = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    y[::5] = -100

    def grads(upstream):
        leaves = [t.clone().requires_grad_(True) for t in (h, w)]
        (linear_cross_entropy(*leaves, y, chunk_size=8) * upstream).backward()
        return [t.grad for t in leaves]

    unit, scaled = grads(1.0), grads(s)
    for one, got in zip(unit, scaled, strict=True):
        assert torch.equal(got, fp32_product(one, s))
    # the old backward (the scale rounded to the gradients' dtype first) differs for awkward scales
    old = [one * torch.tensor(s).to(DEVICE, dtype) for one in unit]
    old_agrees = all(torch.equal(a, b) for a, b in zip(old, scaled, strict=True))
    assert old_agrees == (dtype == torch.float32 or s in (1.0, 0.5))
    ref = [t.double().requires_grad_(True) for t in (h, w)]
    (linear_cross_entropy_reference(*ref, y) * s).backward()
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16 logits on the GPU
    for got, want in zip(scaled, ref, strict=True):
        torch.testing.assert_close(got.double(), want.grad, atol=tol * s, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, LOW])
def test_linear_cross_entropy_kept_graph_backward_with_two_scales_equals_two_graphs(dtype):
    """Two backwards over one kept graph with upstream 1/3 then 0.7 accumulate what two separate
    graphs give (the kept graph's gradients are scaled into new tensors, its own stay unscaled);
    `autograd.grad` twice over a kept graph returns two distinct, each correctly scaled, tensors."""
    g = torch.Generator().manual_seed(33)
    h = torch.randn(14, 16, generator=g).to(DEVICE, dtype)
    w = (0.5 * torch.randn(50, 16, generator=g)).to(DEVICE, dtype)
    y = torch.randint(0, 50, (14,), generator=g).to(DEVICE)
    s1, s2 = 1 / 3, 0.7

    kept = [t.clone().requires_grad_(True) for t in (h, w)]
    loss = linear_cross_entropy(*kept, y, chunk_size=8)
    (loss * s1).backward(retain_graph=True)
    (loss * s2).backward()
    separate = [t.clone().requires_grad_(True) for t in (h, w)]
    for s in (s1, s2):
        (linear_cross_entropy(*separate, y, chunk_size=8) * s).backward()
    for a, b in zip(kept, separate, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)

    leaves = [t.clone().requires_grad_(True) for t in (h, w)]
    loss = linear_cross_entropy(*leaves, y, chunk_size=8)
    first = torch.autograd.grad(loss * s1, leaves, retain_graph=True)
    second = torch.autograd.grad(loss * s2, leaves, retain_graph=True)
    unit = torch.autograd.grad(loss, leaves)
    for a, b, one in zip(first, second, unit, strict=True):
        assert torch.equal(a, fp32_product(one, s1)) and torch.equal(b, fp32_product(one, s2))


def test_linear_cross_entropy_token_weights_under_an_awkward_upstream_gradient():
    g = torch.Generator().manual_seed(34)
    h = torch.randn(21, 16, generator=g).to(DEVICE)
    w = (0.5 * torch.randn(60, 16, generator=g)).to(DEVICE)
    y = torch.randint(0, 60, (21,), generator=g).to(DEVICE)
    y[3] = -100
    tw = torch.rand(21, generator=g).to(DEVICE)

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (h, w)]
        (fn(*leaves) / 12345).backward()
        return [t.grad for t in leaves]

    fast = grads(lambda h, w: linear_cross_entropy(h, w, y, chunk_size=8, token_weights=tw))
    ref = grads(lambda h, w: linear_cross_entropy_reference(h, w, y, token_weights=tw))
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-4)


def test_accumulate_grad_takes_the_returned_gradient_without_a_copy():
    """A leaf's `.grad` after one backward over a freed graph is the very tensor the loss's
    backward scaled in place (AccumulateGrad steals it: nothing else holds it once the graph
    frees its saved tensors), for a bare weight and for a model's LM head; over a kept graph
    the returned gradient is a new tensor and the stored one stays put."""
    from ferrotune.models.llama import CausalLM, LlamaConfig

    g = torch.Generator().manual_seed(35)
    h = torch.randn(10, 16, generator=g).to(DEVICE).requires_grad_(True)
    w = torch.randn(30, 16, generator=g).to(DEVICE).requires_grad_(True)
    y = torch.randint(0, 30, (10,), generator=g).to(DEVICE)
    for retain in (False, True):
        h.grad = w.grad = None
        loss = linear_cross_entropy(h, w, y)
        stored = [t.data_ptr() for t in loss.grad_fn.saved_tensors]  # (dL/dh, dL/dW) for upstream 1
        (loss / 3).backward(retain_graph=retain)
        assert (
            [h.grad.data_ptr(), w.grad.data_ptr()] != stored
            if retain
            else [h.grad.data_ptr(), w.grad.data_ptr()] == stored
        )

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=61)  # fmt: skip
    torch.manual_seed(0)
    model = CausalLM(config).to(DEVICE)
    ids = torch.randint(0, 61, (2, 9), device=DEVICE)
    loss = model(ids, labels=torch.roll(ids, -1, 1))
    stored_head_grad = loss.grad_fn.saved_tensors[1].data_ptr()
    (loss / 18).backward()
    assert model.lm_head.weight.grad.data_ptr() == stored_head_grad

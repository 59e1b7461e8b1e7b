"""The token-embedding lookup of a model whose output head is the same matrix (tied embeddings).

The head's gradient dL/dW (V, H) is dense. A plain lookup's gradient is dense too: autograd
builds a zeroed (V, H) tensor, scatters the N token rows into it and then adds the whole of it
into the head's gradient (for a 128k x 2048 bf16 table, about 1 ms of memory traffic a step on an
H200). Here the lookup's gradient reaches autograd as a sparse tensor of N rows, which autograd
adds in place into the head's dense gradient, touching those rows only.

Each distinct token's row is the fp32 sum of its occurrences, rounded once, as the dense scatter
rounds it. On the GPU the sum avoids `coalesce()` (which waits for the device to learn how many
distinct tokens there are): the ids are sorted, the first position of each run of equal ids
carries the run's sum and the others carry zero rows for the same id, so the in-place add puts
exactly one non-zero row into each touched row of the table (adding zero changes nothing), with
no host sync. On the CPU the reference coalesces.

If nothing else gives the weight a dense gradient (the head took no part in the loss), the sparse
one would become `weight.grad`; a hook turns it dense there, so `.grad` is always what the plain
lookup gives. `F.embedding` is the reference.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F

from ferrotune.kernels._dispatch import HAVE_TRITON, triton_runs_on

# The rows are built valid (ids within the table); torch warns once per process that it does not
# re-check them, which says nothing to a user of this module.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _sum_runs(SORTED_IDS, ORDER, VALUES, OUT, n, width, BLOCK: tl.constexpr):
        """Program i: if sorted position i starts a run of equal ids, OUT[i] = the fp32 sum of
        the run's rows of VALUES (taken through ORDER), else zeros."""
        i = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        token = tl.load(SORTED_IDS + i)
        starts = i == 0
        if i > 0:
            starts = tl.load(SORTED_IDS + i - 1) != token
        acc = tl.zeros((BLOCK,), tl.float32)
        if starts:
            j = i
            while tl.load(SORTED_IDS + j, mask=j < n, other=-1) == token:  # ids are >= 0
                row = tl.load(ORDER + j)
                acc += tl.load(VALUES + row * width + cols, mask=mask, other=0.0).to(tl.float32)
                j += 1
        tl.store(OUT + i * width + cols, acc.to(OUT.dtype.element_ty), mask=mask)


def _row_sums(ids: torch.Tensor, values: torch.Tensor, rows: int) -> torch.Tensor:
    """ids (N,), values (N, H) -> a sparse (rows, H) tensor whose dense form is the scatter-sum
    of the value rows at their ids (see the module docstring)."""
    n, width = values.shape
    if triton_runs_on(values) and n:
        sorted_ids, order = torch.sort(ids)
        sums = torch.empty_like(values)  # (N, H): run sums at run starts, zeros elsewhere
        _sum_runs[(n,)](sorted_ids, order, values.contiguous(), sums, n, width,
                        BLOCK=triton.next_power_of_2(width))  # fmt: skip
        return torch.sparse_coo_tensor(sorted_ids[None], sums, (rows, width), check_invariants=False)
    return torch.sparse_coo_tensor(ids[None], values, (rows, width), check_invariants=False).coalesce()


class _SparseGradEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.table_shape = weight.shape
        return F.embedding(ids, weight)  # (..., H)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        (ids,) = ctx.saved_tensors
        rows, width = ctx.table_shape
        return None, _row_sums(ids.reshape(-1).long(), dout.reshape(-1, width), rows)  # int64 indices


_hooked: dict[int, weakref.ref[torch.Tensor]] = {}  # id -> the weight whose hook is registered


def _densify(weight: torch.Tensor) -> None:
    if weight.grad is not None and weight.grad.is_sparse:
        weight.grad = weight.grad.to_dense()


def tied_embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.embedding(ids, weight)` (ids (...), weight (V, H) -> (..., H)) whose weight gradient
    reaches autograd sparse (see the module docstring); `weight.grad` ends up dense as always."""
    key = id(weight)
    known = _hooked.get(key)
    if known is None or known() is not weight:
        weight.register_post_accumulate_grad_hook(_densify)
        _hooked[key] = weakref.ref(weight, lambda _: _hooked.pop(key, None))
    return _SparseGradEmbedding.apply(ids, weight)

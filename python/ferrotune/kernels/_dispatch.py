"""When a Triton kernel can run: on CUDA tensors, or anywhere under Triton's CPU interpreter
(`TRITON_INTERPRET=1`, how the tests exercise the kernels without a GPU)."""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - torch wheels ship triton on Linux
    HAVE_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_runs_on(tensor: torch.Tensor) -> bool:
    """Whether the Triton path serves `tensor`."""
    return HAVE_TRITON and (tensor.is_cuda or (interpreting() and tensor.device.type == "cpu"))

"""When a Triton kernel serves a tensor: on CUDA, always; on the CPU only inside
`cpu_interpreter()`, which the kernel tests use to run the kernels under Triton's interpreter
(that also needs `TRITON_INTERPRET=1` in the environment before the kernels are defined; the test
suite's conftest sets it). Everywhere else CPU tensors take the PyTorch reference."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - torch wheels ship triton on Linux
    HAVE_TRITON = False

_cpu_interpreter = False
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn the Triton kernels off (every call takes the PyTorch reference) or back on. Off is
    what `torch.compile` wants: Inductor fuses the plain formulas itself, while opaque kernel
    launches would break its graphs."""
    global _enabled
    _enabled = enabled


@contextlib.contextmanager
def cpu_interpreter() -> Iterator[None]:
    """Route CPU tensors through the Triton kernels (under Triton's interpreter) in this block."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("set TRITON_INTERPRET=1 before ferrotune.kernels is imported")
    global _cpu_interpreter
    previous, _cpu_interpreter = _cpu_interpreter, True
    try:
        yield
    finally:
        _cpu_interpreter = previous


def triton_runs_on(tensor: torch.Tensor) -> bool:
    """Whether the Triton path serves `tensor`."""
    return _enabled and HAVE_TRITON and (tensor.is_cuda or (_cpu_interpreter and tensor.device.type == "cpu"))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, for sizing persistent grids (4 elsewhere: the
    interpreter runs programs one by one anyway)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4

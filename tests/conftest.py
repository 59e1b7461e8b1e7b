"""Shared fixtures. Every test makes its own tiny data; nothing is downloaded."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Without a GPU, Triton kernels run under Triton's CPU interpreter. It is read when kernels are
# defined, so it is set here, before any test imports them.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_kernels_on_cpu_too():
    """The Triton kernels serve CPU tensors too in a test that asks for this (under Triton's
    interpreter); on a GPU machine the kernels serve CUDA tensors anyway."""
    import torch
    from ferrotune.kernels._dispatch import cpu_interpreter

    if torch.cuda.is_available():
        yield
    else:
        with cpu_interpreter():
            yield

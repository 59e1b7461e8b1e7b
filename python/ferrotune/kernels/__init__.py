"""Fast paths for the GPU. Each kernel sits beside a plain PyTorch reference that it must match
(tests/test_kernels.py checks them against each other: on the GPU for real, on the CPU through
Triton's interpreter). Every public function dispatches: Triton where it can run, the reference
elsewhere, so the same model code trains on CPU and CUDA."""

from __future__ import annotations

from ferrotune.kernels._dispatch import set_enabled
from ferrotune.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from ferrotune.kernels.embedding import tied_embedding
from ferrotune.kernels.linear import shared_input_linears, shared_input_linears_reference
from ferrotune.kernels.lora import lora_linear, lora_linear_reference
from ferrotune.kernels.rmsnorm import (
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_beside_residual,
    rms_norm_reference,
)
from ferrotune.kernels.rope import apply_rope, apply_rope_pair, apply_rope_reference
from ferrotune.kernels.swiglu import swiglu, swiglu_linear, swiglu_linear_reference, swiglu_reference

__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "apply_rope",
    "apply_rope_pair",
    "apply_rope_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "lora_linear",
    "lora_linear_reference",
    "rms_norm",
    "rms_norm_beside_residual",
    "rms_norm_reference",
    "set_enabled",
    "shared_input_linears",
    "shared_input_linears_reference",
    "swiglu",
    "swiglu_linear",
    "swiglu_linear_reference",
    "swiglu_reference",
    "tied_embedding",
]

"""ferrotune: fine-tune large language models. Every method in one place; a Rust core for the
byte work (data preparation, 4-bit quantization, adapter merging and export), PyTorch for the rest."""

from __future__ import annotations

from ferrotune._native import __version__
from ferrotune.errors import Cancelled, ConfigError, FerrotuneError, FormatError, NativePanic

__all__ = [
    "Cancelled",
    "ConfigError",
    "FerrotuneError",
    "FormatError",
    "NativePanic",
    "__version__",
]

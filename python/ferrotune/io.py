"""safetensors between torch and the native core: zero-copy reads from memory-mapped files and
atomic writes (temporary name, then rename).

`load_checkpoint(path)` opens a single file, a folder, or a sharded `model.safetensors.index.json`
and yields torch tensors that view the mapped file without copying it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import torch

from ferrotune import _native

_TORCH_DTYPE = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_SAFETENSORS_DTYPE = {v: k for k, v in _TORCH_DTYPE.items()}


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (`torch.bfloat16` -> `"BF16"`)."""
    try:
        return _SAFETENSORS_DTYPE[dtype]
    except KeyError:
        raise ValueError(f"{dtype} cannot be stored in safetensors") from None


def to_torch(native: _native.NativeTensor) -> torch.Tensor:
    """Wraps a native tensor without a copy. Float8 types travel as bytes and are viewed back."""
    dtype = _TORCH_DTYPE[native.dtype]
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError("float8 tensors are read through Checkpoint.get_bytes")
    return torch.from_dlpack(native)


class Checkpoint(Mapping[str, torch.Tensor]):
    """A memory-mapped Hugging Face checkpoint. `ckpt[name]` is a CPU tensor sharing the file's
    pages (copy-on-access by the OS, never a copy in Python); `.to(device, dtype)` it to use it."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._native = _native.Checkpoint(self.path)

    def __getitem__(self, name: str) -> torch.Tensor:
        return to_torch(self._native.get(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._native.keys())

    def __len__(self) -> int:
        return len(self._native)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._native

    def info(self, name: str) -> tuple[str, list[int]]:
        """`(dtype, shape)` without touching the bytes."""
        return self._native.info(name)

    def metadata(self) -> dict[str, str]:
        return self._native.metadata()


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Opens a checkpoint file, folder or sharded index (headers validated, no bytes read)."""
    return Checkpoint(path)


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes `tensors` to `path` atomically; the file appears only once it is complete.
    `metadata` defaults to `{"format": "pt"}` as transformers expects."""
    items = []
    for name, tensor in tensors.items():
        cpu = tensor.detach().to("cpu").contiguous()
        raw = cpu.reshape(-1).view(torch.uint8) if cpu.numel() else torch.empty(0, dtype=torch.uint8)
        items.append((name, safetensors_dtype(cpu.dtype), list(cpu.shape), raw.numpy()))
    _native.save_safetensors(
        os.fspath(path), items, dict(metadata) if metadata is not None else {"format": "pt"}
    )

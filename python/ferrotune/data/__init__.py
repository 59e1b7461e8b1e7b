"""Prepared training data: `PackedDataset` over the shards `ferrotune prepare` writes, `collate`
to the batch contract, `batches` to iterate. The shard format is described in docs/data.md.

torch is imported only when one of these is first used, so `ferrotune prepare` (which needs only
the native core) starts fast and small."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ferrotune.data.dataset import PackedDataset, batches, collate, load_manifest

__all__ = ["PackedDataset", "batches", "collate", "load_manifest"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ferrotune.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'ferrotune.data' has no attribute {name!r}")

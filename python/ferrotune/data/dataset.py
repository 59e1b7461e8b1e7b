"""`PackedDataset`: the rows of a folder written by `ferrotune prepare`, memory-mapped.

Every shard is opened once with the native memory map; a row is a set of `(T,)` views into the
mapped file (no copy, no read until touched). The dataset is what one rank sees of one epoch:

    order   = randperm(total_rows, seed + epoch)            (or 0..total_rows without shuffle)
    mine    = order[rank::world_size]                       (no overlap, no row left out)
              + one padding row on the ranks short of ceil(total_rows / world_size)
    rows    = mine[start_step * batch_size :]                (resume where a run stopped)

The padding row (input ids 0, labels -100, document ids -1) trains no token, so every rank takes
the same number of steps and the loss, normalised by the trained tokens of all ranks, is unchanged.

`collate(rows)` stacks rows into the training batch of the data contract: `input_ids`, `labels`,
`position_ids` as int64 and `document_ids` as int32, each `(B, T)` (preference data carries the
same four with `chosen_` / `rejected_` prefixes). A folder prepared from a mixture adds
`task_ids` `(T,)` per row (int64 `(B, T)` in the batch): the task index of each token's document,
-1 on padding; `dataset.task_names[i]` names task i.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterator, Mapping, Sequence

import torch

from ferrotune.errors import FormatError
from ferrotune.io import Checkpoint

FORMAT_NAME = "ferrotune.packed"
FORMAT_VERSION = 1
_FIELDS = ("input_ids", "labels", "position_ids", "document_ids")


def load_manifest(path: str | os.PathLike[str]) -> dict:
    """The `manifest.json` of a prepared folder, checked for format and version."""
    manifest_path = os.path.join(os.fspath(path), "manifest.json")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise FormatError(f"{manifest_path}: invalid JSON: {e}", manifest_path, f"line {e.lineno}") from e
    if manifest.get("format") != FORMAT_NAME:
        raise FormatError(
            f"{manifest_path}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}",
            manifest_path,
            "format",
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{manifest_path}: format_version {manifest.get('format_version')} is not supported "
            f"(this ferrotune reads {FORMAT_VERSION})",
            manifest_path,
            "format_version",
        )
    return manifest


class PackedDataset(torch.utils.data.Dataset):
    """The packed rows of one rank for one epoch; each item is a dict of `(T,)` int32 views (and,
    for a mixture, `task_ids` `(T,)` int64)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        batch_size: int = 1,
        epoch: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if start_step < 0 or batch_size < 1:
            raise ValueError("start_step must be >= 0 and batch_size >= 1")
        self.path = os.fspath(path)
        self.manifest = load_manifest(self.path)
        self.seq_len: int = self.manifest["seq_len"]
        # A mixture's folder lists its tasks and stores each token's task (older folders: none).
        self.task_names: list[str] = list(self.manifest.get("task_names", []))
        fields = (*_FIELDS, "task_ids") if self.task_names else _FIELDS
        self.names = [p + f for p in self.manifest["lanes"] for f in fields]
        self._task_names_of_lanes = [n for n in self.names if n.endswith("task_ids")]
        self._shards: list[dict[str, torch.Tensor]] | None = None
        self._open_shards()
        starts = [0]
        for info in self.manifest["shards"]:
            starts.append(starts[-1] + info["rows"])
        self._starts = starts
        self.total_rows = starts[-1]
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.batch_size = batch_size
        self._order = self._rank_order(epoch)
        self._skip = min(start_step * batch_size, len(self._order))

    def _open_shards(self) -> list[dict[str, torch.Tensor]]:
        """Maps every shard (once per process: DataLoader workers reopen after unpickling)."""
        if self._shards is None:
            shards = []
            for info in self.manifest["shards"]:
                ckpt = Checkpoint(os.path.join(self.path, info["file"]))
                tensors = {name: ckpt[name] for name in self.names}  # (R, T) int32 views of the map
                rows = info["rows"]
                if any(t.shape != (rows, self.seq_len) for t in tensors.values()):
                    raise FormatError(
                        f"{ckpt.path}: tensors do not match the manifest ({rows} x {self.seq_len})",
                        ckpt.path,
                        "shape",
                    )
                shards.append(tensors)
            self._shards = shards
        return self._shards

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_shards"] = None  # memory maps do not pickle; workers map the files themselves
        return state

    def _rank_order(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.total_rows, generator=generator)
        else:
            order = torch.arange(self.total_rows)
        per_rank = -(-self.total_rows // self.world_size)
        mine = order[self.rank :: self.world_size]
        return torch.cat([mine, torch.full((per_rank - len(mine),), -1, dtype=mine.dtype)])

    def set_epoch(self, epoch: int) -> None:
        """Reshuffles for `epoch` (same seed, new order) and starts it from its first row."""
        self._order = self._rank_order(epoch)
        self._skip = 0

    def global_index(self, i: int) -> int:
        """The row of the whole folder that item `i` of this view is (-1: the padding row)."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        return int(self._order[self._skip + i])

    def __len__(self) -> int:
        return len(self._order) - self._skip

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.global_index(i)
        if row < 0:
            return self._padding_row()
        shard = bisect.bisect_right(self._starts, row) - 1
        local = row - self._starts[shard]
        item = {name: t[local] for name, t in self._open_shards()[shard].items()}
        for name in self._task_names_of_lanes:
            item[name] = item[name].to(torch.int64)  # (T,): a small copy, the contract's dtype
        return item

    def _padding_row(self) -> dict[str, torch.Tensor]:
        """A row that trains nothing: ids and positions 0, labels -100, document and task ids -1."""
        fill = {"labels": -100, "document_ids": -1, "task_ids": -1}
        return {
            name: torch.full(
                (self.seq_len,),
                next((v for f, v in fill.items() if name.endswith(f)), 0),
                dtype=torch.int64 if name.endswith("task_ids") else torch.int32,
            )
            for name in self.names
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(len(self)):
            yield self[i]


def collate(rows: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks rows into a batch: ids, labels, positions (and task ids) as int64 `(B, T)`,
    document ids int32."""
    if not rows:
        raise ValueError("collate needs at least one row")
    batch = {}
    for name in rows[0]:
        stacked = torch.stack([r[name] for r in rows])
        batch[name] = stacked.to(torch.int32 if name.endswith("document_ids") else torch.int64)
    return batch


def batches(
    dataset: PackedDataset, batch_size: int, *, drop_last: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of `batch_size` rows in the dataset's order."""
    buffer: list[dict[str, torch.Tensor]] = []
    for row in dataset:
        buffer.append(row)
        if len(buffer) == batch_size:
            yield collate(buffer)
            buffer = []
    if buffer and not drop_last:
        yield collate(buffer)

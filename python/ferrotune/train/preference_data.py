"""Preference pairs as packed training batches (the `chosen_*` / `rejected_*` batch contract).

A pair is a prompt and two completions, all token ids. Pairs are packed several to a row: the
k-th document of a chosen row and the k-th document of the rejected row at the same batch index
are the two sides of one pair, so a pair never straddles batches and per-document log-prob sums
(`preference_losses.document_logps`) line up side by side. Each document is `prompt + completion`;
its labels are pre-shifted and cover the completion only:

    tokens   p0 p1 p2 c0 c1 c2            labels  -100 -100 c0 c1 c2 -100

Batches also carry `pair_index` (B, D): the dataset index of each document's pair (-1 where a row
has fewer documents), which keys the on-disk cache of reference log-probabilities.

Prepared shards from `ferrotune prepare` already follow this layout; this module builds it in
memory from token lists or a small JSONL file (`{"prompt", "chosen", "rejected"}` text fields).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ferrotune.errors import FormatError

IGNORE_INDEX = -100
SIDES = ("chosen", "rejected")
FIELDS = ("input_ids", "labels", "position_ids", "document_ids")


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0  # how strongly chosen beats rejected (reward-model margin), 0 if unknown

    def length(self, side: str) -> int:
        return len(self.prompt) + len(getattr(self, side))


def document_tensors(prompt: Sequence[int], completion: Sequence[int]) -> tuple[list[int], list[int]]:
    """(tokens, pre-shifted labels) of one document: labels[t] = tokens[t+1] where that token is
    part of the completion, else -100."""
    tokens = list(prompt) + list(completion)
    labels = [IGNORE_INDEX] * len(tokens)
    for t in range(max(len(prompt) - 1, 0), len(tokens) - 1):
        labels[t] = tokens[t + 1]
    return tokens, labels


def pack_pairs(pairs: Sequence[PreferencePair], seq_len: int) -> list[list[int]]:
    """Groups pair indices into rows: first-fit decreasing on the longer side, so both the chosen
    and the rejected documents of a row fit in `seq_len`. Over-long pairs raise FormatError."""
    order = sorted(range(len(pairs)), key=lambda i: -max(pairs[i].length(s) for s in SIDES))
    rows: list[list[int]] = []
    used: list[tuple[int, int]] = []  # (chosen tokens, rejected tokens) per row
    for i in order:
        need_c, need_r = pairs[i].length("chosen"), pairs[i].length("rejected")
        if max(need_c, need_r) > seq_len:
            raise FormatError(f"preference pair {i}: {max(need_c, need_r)} tokens exceed seq_len {seq_len}")
        for r, (c, rj) in enumerate(used):
            if c + need_c <= seq_len and rj + need_r <= seq_len:
                rows[r].append(i)
                used[r] = (c + need_c, rj + need_r)
                break
        else:
            rows.append([i])
            used.append((need_c, need_r))
    return rows


def collate_rows(
    pairs: Sequence[PreferencePair], rows: Sequence[Sequence[int]], seq_len: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Tensors (B, seq_len) for each side and field, plus `pair_index` and `margin` (B, D)."""
    batch = len(rows)
    out: dict[str, torch.Tensor] = {}
    for side in SIDES:
        ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
        labels = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((batch, seq_len), dtype=torch.long)
        documents = torch.full((batch, seq_len), -1, dtype=torch.int32)
        for b, row in enumerate(rows):
            start = 0
            for d, i in enumerate(row):
                tokens, doc_labels = document_tensors(pairs[i].prompt, getattr(pairs[i], side))
                end = start + len(tokens)
                ids[b, start:end] = torch.tensor(tokens)
                labels[b, start:end] = torch.tensor(doc_labels)
                positions[b, start:end] = torch.arange(len(tokens))
                documents[b, start:end] = d
                start = end
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, labels
        out[f"{side}_position_ids"], out[f"{side}_document_ids"] = positions, documents
    width = max(len(r) for r in rows)
    index = torch.full((batch, width), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        index[b, : len(row)] = torch.tensor(row)
    out["pair_index"] = index
    out["margin"] = torch.tensor(
        [[pairs[i].margin if i >= 0 else 0.0 for i in row] for row in index.tolist()], dtype=torch.float32
    )
    return out


def mismatched_pair(pairs: Sequence[PreferencePair], i: int, seq_len: int) -> PreferencePair:
    """KTO's mismatched document for pair i: its prompt with the chosen completion of pair i + 1
    (cyclically, in dataset order, so the choice is fixed and its reference log-prob cacheable),
    cut to fit `seq_len`."""
    prompt = pairs[i].prompt
    other = pairs[(i + 1) % len(pairs)].chosen[: max(seq_len - len(prompt), 0)]
    return PreferencePair(prompt, other, other)


def mismatched_batch(
    pairs: Sequence[PreferencePair], pair_index: torch.Tensor, seq_len: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """The mismatched documents of one batch's pairs, packed into their own rows: the four `kl_*`
    tensors and `kl_pair_index` (whose pair each document stands for)."""
    members = [int(i) for i in pair_index.flatten().tolist() if i >= 0]
    shifted = [mismatched_pair(pairs, i, seq_len) for i in members]
    rows = pack_pairs(shifted, seq_len)
    side = collate_rows(shifted, rows, seq_len, pad_id)
    out = {f"kl_{name}": side[f"chosen_{name}"] for name in FIELDS}
    local = side["pair_index"]
    out["kl_pair_index"] = torch.where(local >= 0, torch.tensor(members)[local.clamp(min=0)], -1)
    return out


def preference_batches(
    pairs: Sequence[PreferencePair],
    *,
    batch_size: int,
    seq_len: int,
    pad_id: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    with_mismatched: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over the pairs: packed rows, `batch_size` rows per batch, shuffled by (seed, epoch)."""
    rows = pack_pairs(pairs, seq_len)
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(rows)
    for start in range(0, len(rows), batch_size):
        batch = collate_rows(pairs, rows[start : start + batch_size], seq_len, pad_id)
        if with_mismatched:
            batch.update(mismatched_batch(pairs, batch["pair_index"], seq_len, pad_id))
        yield batch


def read_preference_jsonl(
    path: str | Path, tokenizer: Any, add_eos: int | None = None
) -> list[PreferencePair]:
    """Reads `{"prompt", "chosen", "rejected", "margin"?}` lines and tokenizes them with a `tokenizers`
    Tokenizer; `add_eos` appends that id to each completion. Errors name the file, line and field."""
    path = Path(path)
    pairs: list[PreferencePair] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise FormatError(
                    f"{path}: line {number}: invalid JSON ({err.msg})", path=str(path), place=f"line {number}"
                ) from None
            texts = {}
            for field in ("prompt", "chosen", "rejected"):
                value = record.get(field) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    raise FormatError(
                        f"{path}: line {number}: field {field!r} must be a string",
                        path=str(path),
                        place=f"line {number}",
                        detail=field,
                    )
                texts[field] = value
            margin = record.get("margin", 0.0)
            if isinstance(margin, bool) or not isinstance(margin, (int, float)):
                raise FormatError(
                    f"{path}: line {number}: field 'margin' must be a number",
                    path=str(path),
                    place=f"line {number}",
                    detail="margin",
                )
            eos = [add_eos] if add_eos is not None else []
            pairs.append(
                PreferencePair(
                    tokenizer.encode(texts["prompt"]).ids,
                    tokenizer.encode(texts["chosen"], add_special_tokens=False).ids + eos,
                    tokenizer.encode(texts["rejected"], add_special_tokens=False).ids + eos,
                    float(margin),
                )
            )
    if not pairs:
        raise FormatError(f"{path}: no preference pairs", path=str(path))
    return pairs


# ----------------------------------------------------------------------------------------------
# Prepared folders (`ferrotune prepare --format preference`)


class PreparedPreferences:
    """The preference rows of a folder written by `ferrotune prepare` (manifest kind
    "preference"), memory-mapped. Document k of a chosen row and of its rejected row are one pair;
    pairs are numbered in folder order (row by row, document by document), which keys the
    reference cache. Margins are 0; KTO's mismatched documents need the JSONL form."""

    def __init__(self, path: str | Path):
        from ferrotune.data.dataset import PackedDataset

        self.path = str(path)
        self.rows = PackedDataset(self.path, shuffle=False)
        kind = self.rows.manifest.get("kind")
        if kind != "preference":
            raise FormatError(
                f"{self.path}/manifest.json: kind is {kind!r}; preference training needs a folder "
                "prepared from preference pairs",
                path=f"{self.path}/manifest.json",
                place="kind",
            )
        self.seq_len = int(self.rows.seq_len)
        # pairs per row = documents in the chosen row; first pair number of each row
        counts = torch.tensor(
            [int(self.rows[i]["chosen_document_ids"].max()) + 1 for i in range(len(self.rows))]
        )
        self.row_pairs = counts.clamp(min=0)
        self.first_pair = torch.cumsum(self.row_pairs, 0) - self.row_pairs

    def __len__(self) -> int:
        return int(self.row_pairs.sum())

    def fingerprint(self) -> str:
        """The manifest's identity (its own content hash when it has one) and the pair count."""
        manifest = self.rows.manifest
        return json.dumps({k: manifest.get(k) for k in sorted(manifest) if k != "created"}, sort_keys=True)

    def batches(
        self, *, batch_size: int, shuffle: bool = True, seed: int = 0, epoch: int = 0
    ) -> Iterator[dict[str, torch.Tensor]]:
        from ferrotune.data.dataset import collate

        order = list(range(len(self.rows)))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            picked = order[start : start + batch_size]
            batch = collate([self.rows[i] for i in picked])
            width = max(int(self.row_pairs[i]) for i in picked)
            index = torch.full((len(picked), width), -1, dtype=torch.long)
            for b, i in enumerate(picked):
                n = int(self.row_pairs[i])
                index[b, :n] = int(self.first_pair[i]) + torch.arange(n)
            batch["pair_index"] = index
            batch["margin"] = torch.zeros(index.shape, dtype=torch.float32)
            yield batch


PreferenceData = Sequence[PreferencePair] | PreparedPreferences


def source_batches(
    data: PreferenceData,
    *,
    batch_size: int,
    seq_len: int,
    pad_id: int,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    with_mismatched: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of in-memory pairs (packed here) or of a prepared folder (packed already)."""
    if isinstance(data, PreparedPreferences):
        if with_mismatched:
            raise FormatError(
                f"{data.path}: KTO's mismatched documents need the preference pairs as JSONL, not a prepared folder",
                path=data.path,
            )
        return data.batches(batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch)
    return preference_batches(
        data,
        batch_size=batch_size,
        seq_len=seq_len,
        pad_id=pad_id,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        with_mismatched=with_mismatched,
    )

"""safetensors read and written by Rust agree with the Python `safetensors` package both ways;
sharded checkpoints open through their index; hostile files give FormatError."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from ferrotune.errors import FormatError
from ferrotune.io import load_checkpoint, save_safetensors
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.int8,
    torch.bool,
]


def random_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(DTYPES):
        shape = tuple(int(x) for x in torch.randint(1, 5, (i % 3 + 1,), generator=g))
        if dtype.is_floating_point:
            out[f"layer.{i}.weight"] = torch.randn(shape, generator=g).to(dtype)
        elif dtype == torch.bool:
            out[f"layer.{i}.mask"] = torch.randint(0, 2, shape, generator=g).bool()
        else:
            out[f"layer.{i}.ids"] = torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=g).to(
                dtype
            )
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 3)
    return out


def assert_same(a: dict[str, torch.Tensor], b) -> None:
    assert sorted(a) == sorted(b.keys())
    for name, tensor in a.items():
        other = b[name]
        assert other.dtype == tensor.dtype and other.shape == tensor.shape, name
        assert torch.equal(other, tensor), name


def test_rust_written_files_read_in_python_and_back(tmp_path):
    tensors = random_tensors(0)
    ours = tmp_path / "ours.safetensors"
    save_safetensors(tensors, ours, metadata={"format": "pt", "note": "x"})
    assert_same(tensors, load_file(ours))
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, theirs, metadata={"format": "pt"})
    ckpt = load_checkpoint(theirs)
    assert_same(tensors, ckpt)
    assert ckpt.metadata() == {"format": "pt"}


def test_sharded_checkpoint_through_index(tmp_path):
    tensors = random_tensors(1)
    names = sorted(tensors)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, tmp_path / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in members})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    assert_same(tensors, load_checkpoint(tmp_path))
    assert_same(tensors, load_checkpoint(tmp_path / "model.safetensors.index.json"))


def test_write_is_atomic_on_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    save_safetensors({"a": torch.ones(2)}, target)
    with pytest.raises(ValueError):
        save_safetensors({"a": torch.ones(2), "b": torch.ones(2, dtype=torch.complex64)}, target)
    assert_same({"a": torch.ones(2)}, load_file(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def header_file(tmp_path, header: bytes, data: bytes = b"", length: int | None = None):
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "length", "place"),
    [
        (b"{}", b"", 2**63, "header length"),
        (b"{}", b"", 10**7, "header length"),
        (b"{oops", b"", None, "header"),
        (
            b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}',
            b"\0" * 8,
            None,
            'tensor "a".data_offsets',
        ),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 4, None, "data"),
        (
            b'{"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},'
            b' "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}',
            b"\0" * 6,
            None,
            'tensor "b".data_offsets',
        ),
        (
            b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}',
            b"\0" * 4,
            None,
            'tensor "a".shape',
        ),
        (
            b'{"a": {"dtype": "U8", "shape": [99999999999, 99999999999, 9999999], "data_offsets": [0, 1]}}',
            b"\0",
            None,
            'tensor "a".shape',
        ),
    ],
)
def test_hostile_headers_raise_format_error(tmp_path, header, data, length, place):
    path = header_file(tmp_path, header, data, length)
    with pytest.raises(FormatError) as err:
        load_checkpoint(path)
    assert err.value.place == place, str(err.value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(blob)
    try:
        ckpt = load_checkpoint(path)
    except FormatError:
        return
    for name in ckpt:
        ckpt[name]  # accepted files must be readable

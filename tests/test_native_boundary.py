"""The native boundary: errors map to ferrotune.errors, panics never abort, buffers are shared
without a copy, and native work releases the GIL."""

from __future__ import annotations

import threading
import time

import ferrotune
import numpy as np
import pytest
import torch
from ferrotune import _native
from ferrotune.errors import FormatError, NativePanic
from ferrotune.io import load_checkpoint, save_safetensors


def test_a_rust_panic_becomes_a_python_exception():
    with pytest.raises(NativePanic, match="boom at the boundary"):
        _native._panic_for_test("boom at the boundary")
    # The interpreter is intact and native calls keep working afterwards.
    assert isinstance(ferrotune.__version__, str)
    with pytest.raises(NativePanic):
        _native._panic_for_test("again")


def test_mmap_tensor_reaches_torch_and_numpy_without_a_copy(tmp_path):
    path = tmp_path / "t.safetensors"
    save_safetensors({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, path)
    ckpt = _native.Checkpoint(str(path))
    native = ckpt.get("w")
    as_torch = torch.from_dlpack(native)
    as_numpy = np.from_dlpack(native)
    assert as_torch.data_ptr() == native.data_ptr == as_numpy.ctypes.data
    assert as_torch.shape == (3, 4) and native.shape == (3, 4) and native.dtype == "F32"
    # Two views of one Rust buffer: a write through one is seen by the other.
    as_torch[1, 2] = -5.0
    assert as_numpy[1, 2] == -5.0
    # The views keep the Rust memory alive after every Python handle to the owner is gone.
    del ckpt, native, as_numpy
    assert as_torch.sum().item() == sum(range(12)) - 6 - 5


def test_native_work_releases_the_gil(tmp_path):
    big = torch.zeros(64 * 1024 * 1024 // 4)  # 64 MiB: long enough to observe another thread
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        item = ("x", "F32", [big.numel()], big.numpy())
        start = time.perf_counter()
        for i in range(3):
            _native.save_safetensors(str(tmp_path / f"big{i}.safetensors"), [item], {})
        end = time.perf_counter()
    finally:
        stop.set()
        thread.join()
    during = [t for t in ticks if start < t < end]
    # With the GIL held through the writes the ticker could not run at all meanwhile.
    assert len(during) >= 3, (len(during), end - start)


def test_errors_name_the_file_and_place(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(FormatError) as err:
        load_checkpoint(path)
    assert err.value.path == str(path)
    assert err.value.place == "header length"
    assert "bad.safetensors" in str(err.value)
    with pytest.raises(OSError):
        load_checkpoint(tmp_path / "missing.safetensors")

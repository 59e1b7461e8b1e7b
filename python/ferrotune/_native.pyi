"""Hand-written stub of the native module (checked against the built module by mypy.stubtest)."""

import os
from collections.abc import Sequence
from typing import Any, final

from typing_extensions import Buffer

__version__: str

def _panic_for_test(message: str) -> None: ...

@final
class NativeTensor:
    """Rust-owned bytes; `torch.from_dlpack(t)` wraps them without a copy."""

    def __dlpack__(
        self,
        *,
        stream: Any | None = None,
        max_version: Any | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def data_ptr(self) -> int: ...

@final
class Checkpoint:
    """A memory-mapped safetensors file, folder or sharded index."""

    def __new__(cls, path: str | os.PathLike[str]) -> Checkpoint: ...
    def keys(self) -> list[str]: ...
    def __len__(self) -> int: ...
    def __contains__(self, name: str, /) -> bool: ...
    def info(self, name: str) -> tuple[str, list[int]]: ...
    def get(self, name: str) -> NativeTensor: ...
    def metadata(self) -> dict[str, str]: ...
    def files(self) -> list[str]: ...

def save_safetensors(
    path: str | os.PathLike[str],
    tensors: Sequence[tuple[str, str, Sequence[int], Buffer]],
    metadata: dict[str, str] | None = None,
) -> None: ...

# --- data (rust/src/py/data.rs) ---

@final
class PrepareJob:
    """One `ferrotune prepare` run; `run()` blocks, `progress()`/`cancel()` work meanwhile.

    `config_json`: the fields of the native `PrepareConfig`; its optional `mixture` (sources with
    name, inputs, weight, epochs and per-source format/loss/field options; `mixing`, `temperature`,
    `mix_cap`, `mix_total`, `holdout`, `split`) samples several sources into one folder whose
    shards carry `task_ids` (see `ferrotune.data.mix`). `run()` returns the summary JSON."""

    def __new__(cls, config_json: str) -> PrepareJob: ...
    def run(self) -> str: ...
    def progress(self) -> dict[str, int]: ...
    def cancel(self) -> None: ...

@final
class DataTokenizer:
    """A tokenizer folder with its chat template, as `prepare` uses them."""

    def __new__(cls, path: str | os.PathLike[str], chat_template: str | None = None) -> DataTokenizer: ...
    def encode(self, text: str, add_special: bool = False) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str], add_special: bool = False) -> list[list[int]]: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, id: int) -> str | None: ...
    def special_tokens(self) -> dict[str, tuple[str, int] | None]: ...
    @property
    def has_chat_template(self) -> bool: ...
    def render_chat(self, messages_json: str, add_generation_prompt: bool = False) -> str: ...
    def encode_line(
        self, line: str, format: str = "auto", loss: str = "auto"
    ) -> list[tuple[list[int], list[int]]]: ...

# --- data/bpe: the fast byte-level BPE encoder -------------------------------------------------

@final
class FastBpe:
    """Byte-level BPE encoder whose ids equal HF `tokenizers`' (no BOS/EOS template)."""

    @staticmethod
    def from_file(path: str | os.PathLike[str]) -> FastBpe | None: ...
    @staticmethod
    def from_str(json: str) -> FastBpe | None: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def encode_batch_flat(self, texts: Sequence[str]) -> tuple[NativeTensor, NativeTensor]: ...

def bpe_split_pieces(pattern: str, text: str) -> list[str] | None: ...

# --- quantization (ferrotune.quant) ---

def quantize_4bit(
    data: Buffer, dtype: str, blocksize: int = 64, quant_type: str = "nf4"
) -> tuple[NativeTensor, NativeTensor]: ...
def dequantize_4bit(
    packed: Buffer, absmax: Buffer, n: int, blocksize: int = 64, quant_type: str = "nf4", dtype: str = "BF16"
) -> NativeTensor: ...
def quantize_nested(
    absmax: Buffer, offset: float | None = None
) -> tuple[NativeTensor, NativeTensor, float]: ...
def dequantize_nested(codes: Buffer, nested_absmax: Buffer, offset: float) -> NativeTensor: ...
def dynamic_map_signed() -> NativeTensor: ...
def quant_map(quant_type: str) -> NativeTensor: ...
def quantize_checkpoint_dir(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    skip: list[str] | None = None,
    progress: bool = True,
) -> str: ...

# --- merge: adapter merging, combination, extraction, export (rust/src/py/merge.rs) ---

def merge_adapter(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = False,
    requantize: bool = False,
) -> dict[str, Any]: ...
def read_adapter(adapter: str | os.PathLike[str]) -> dict[str, Any]: ...
def combine_adapters(
    adapters: Sequence[str | os.PathLike[str]],
    weights: Sequence[float],
    out: str | os.PathLike[str],
    *,
    method: str = "linear",
    density: float | None = None,
    majority_sign: str = "total",
    svd_rank: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]: ...
def extract_adapter(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int,
    targets: str | Sequence[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]: ...
def export_gguf(
    model: str | os.PathLike[str], out: str | os.PathLike[str], *, dtype: str = "f16", progress: bool = False
) -> dict[str, Any]: ...
def read_dequantized(path: str | os.PathLike[str], prefix: str) -> list[tuple[str, NativeTensor]]: ...
def probe_merge(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    merged: str | os.PathLike[str],
    *,
    inputs: int = 2,
    tokens: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]: ...
def probe_inputs(vocab: int, inputs: int, tokens: int, seed: int = 0) -> list[list[int]]: ...
def probe_logits(
    model: str | os.PathLike[str],
    ids: Sequence[Sequence[int]],
    *,
    adapter: str | os.PathLike[str] | None = None,
) -> NativeTensor: ...

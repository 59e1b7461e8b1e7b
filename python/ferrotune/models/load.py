"""Hugging Face checkpoints in and out.

`load_model(path, device, dtype)` builds the network on the meta device (no memory), allocates
each parameter once on the target device in the target dtype, and fills it straight from the
memory-mapped safetensors file (`ferrotune.io.load_checkpoint`), so a model never exists twice in
memory: the only full copy is the one on the target device.

`save_model(model, path)` writes `config.json` and `model.safetensors` (or shards
`model-00001-of-0000N.safetensors` plus `model.safetensors.index.json` above `max_shard_bytes`), each
file written atomically, in the layout transformers' `from_pretrained` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ferrotune.errors import ConfigError, FormatError
from ferrotune.io import Checkpoint, load_checkpoint, save_safetensors
from ferrotune.models.llama import CausalLM, LlamaConfig

# Buffers some old checkpoints carry; recomputed here, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(path: str | os.PathLike[str]) -> LlamaConfig:
    """Reads `config.json` from a checkpoint folder (or the file itself)."""
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise FormatError(f"{file}: no config.json", path=str(file)) from None
    except json.JSONDecodeError as err:
        raise FormatError(
            f"{file}: line {err.lineno}: invalid JSON ({err.msg})", path=str(file), place=f"line {err.lineno}"
        ) from None
    try:
        return LlamaConfig.from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from None


def _weights_path(folder: Path) -> Path:
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if (folder / name).exists():
            return folder / name
    raise FormatError(f"{folder}: no model.safetensors or model.safetensors.index.json", path=str(folder))


def open_checkpoint(path: str | os.PathLike[str]) -> tuple[LlamaConfig, Path, Checkpoint]:
    """(model config, weights file, memory-mapped tensors) of an HF checkpoint folder."""
    folder = Path(path)
    config = read_config(folder)
    weights_file = _weights_path(folder)
    return config, weights_file, load_checkpoint(weights_file)


def check_checkpoint(
    checkpoint: Checkpoint, weights_file: Path, expected: dict[str, tuple[int, ...]], config: LlamaConfig
) -> None:
    """FormatError naming the tensor when `checkpoint` lacks a name of `expected` (name -> shape),
    holds it in another shape, or holds a tensor the model has no place for."""
    present = set(checkpoint)
    for name, shape in expected.items():
        if name not in present:
            raise FormatError(
                f"{weights_file}: tensor {name!r} is missing", path=str(weights_file), place=name
            )
        _, source_shape = checkpoint.info(name)
        if tuple(source_shape) != tuple(shape):
            raise FormatError(
                f"{weights_file}: tensor {name!r} has shape {list(source_shape)}, the config implies "
                f"{list(shape)}",
                path=str(weights_file),
                place=name,
            )
    allowed_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(
        n for n in present - expected.keys() - allowed_extra if not n.endswith(_IGNORED_SUFFIXES)
    )
    if unexpected:
        raise FormatError(
            f"{weights_file}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}",
            path=str(weights_file),
            place=unexpected[0],
        )


def load_model(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> CausalLM:
    """Loads an HF checkpoint folder into a `CausalLM` on `device`. `dtype` defaults to the
    checkpoint's own dtype. Missing, unexpected or misshapen tensors raise FormatError naming them."""
    config, weights_file, checkpoint = open_checkpoint(path)
    if dtype is None:
        dtype = checkpoint[next(iter(checkpoint))].dtype if len(checkpoint) else torch.float32

    with torch.device("meta"):
        model = CausalLM(config)
    model.to(dtype=dtype)
    model.to_empty(device=device)  # uninitialised storage, allocated once on the target device
    if config.tie_word_embeddings:
        model.tie_weights()

    expected = dict(model.named_parameters())  # tied weights appear once, under the embedding name
    check_checkpoint(checkpoint, weights_file, {n: tuple(p.shape) for n, p in expected.items()}, config)
    for name, param in expected.items():
        with torch.no_grad():
            param.copy_(checkpoint[name])  # mapped file pages -> target device, converting dtype on the way
    return model


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_config(config: LlamaConfig, folder: str | os.PathLike[str], dtype: torch.dtype) -> None:
    out = config.to_dict()
    out["torch_dtype"] = str(dtype).removeprefix("torch.")
    Path(folder).mkdir(parents=True, exist_ok=True)
    _write_json_atomic(Path(folder) / "config.json", out)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an HF checkpoint holds: parameters with HF names, tied `lm_head` left out."""
    state = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=True)}
    config = getattr(model, "config", None)
    if config is not None and config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_model(
    model: CausalLM,
    folder: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> list[Path]:
    """Writes config.json and the weights (sharded with an index above `max_shard_bytes`).
    Returns the files written. Stale shards of an earlier save in the same folder are removed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model_state(model)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    save_dtype = next(iter(state.values())).dtype

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes

    for stale in [*folder.glob("model-*-of-*.safetensors"), folder / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    written: list[Path] = []
    if len(shards) == 1:
        save_safetensors(shards[0], folder / "model.safetensors")
        written.append(folder / "model.safetensors")
    else:
        (folder / "model.safetensors").unlink(missing_ok=True)
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, folder / name)
            written.append(folder / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json_atomic(folder / "model.safetensors.index.json", index)
        written.append(folder / "model.safetensors.index.json")
    save_config(model.config, folder, save_dtype)
    written.append(folder / "config.json")
    return written

"""Training across GPUs and machines on PyTorch's own engine: DDP and FSDP2, launched by torchrun.

    torchrun --nproc-per-node 8 -m ferrotune train cfg.toml          # strategy = "ddp" | "fsdp"

A run goes through these pieces, top to bottom in this file:

1. `init_distributed()` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK, picks the backend (NCCL on
   CUDA, gloo on CPU), binds this process to its GPU and returns a `DistEnv`.
2. Data: rank r of W reads rows r, r+W, r+2W, ... of each global batch (`rank_rows`), so the W
   local batches of one step are exactly the global batch a single process would read, with no
   overlap and no row lost (a short last batch leaves some ranks with fewer rows, never duplicates).
3. `wrap_model()`: DDP replicates the model and all-reduces gradients; FSDP2 (`fully_shard`) shards
   every parameter on dim 0 per decoder block, then the root (embeddings, final norm, lm_head),
   with bf16 compute copies and fp32 gradient reduction (`MixedPrecisionPolicy`) and optionally
   parameters and optimizer state on the CPU (`CPUOffloadPolicy`). Quantized storage (`NF4Linear`'s
   uint8 codes and raw-byte statistics, re-registered from buffers to frozen parameters) gets its
   own group per block with no dtype cast, so it is sharded like any weight and all-gathered bit
   for bit.
4. Loss: each rank sums the token losses of its rows and divides by the GLOBAL count of trained
   tokens N (`global_sum`), times W because DDP and FSDP average gradients over ranks:

       grad = (1/W) * sum_r d(W * L_r / N) = d(sum_r L_r) / N

   which is the single-process gradient of the mean token loss over the global batch.
5. Checkpoints: `save_sharded` / `load_sharded` write and read torch.distributed.checkpoint (DCP)
   folders in which every rank writes its own shards of the trainable parameters and their
   optimizer state; DCP reshards on load, so a run resumes on any number of ranks, one process
   included. `gather_full_state_dict` assembles full tensors on rank 0
   for a Hugging Face or PEFT export; with `trainable_only=True` it gathers just the adapter, whole.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ferrotune.errors import ConfigError, FormatError

STRATEGIES = ("none", "ddp", "fsdp")
PROGRESS = "progress.json"  # the training loop's name for a checkpoint's progress record
CHECKPOINT_FORMAT = "torch.distributed.checkpoint"


# --------------------------------------------------------------------------------------------------
# 1. Process group
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among `world_size` processes, its rank on this machine
    (`local_rank`, which picks the GPU) and its device. `backend` is None for a plain single
    process run without a process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (or any launcher setting RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(
    device: str | None = None, *, init_method: str | None = None, timeout_minutes: float = 30.0
) -> DistEnv:
    """Joins the process group torchrun set up and returns this process's `DistEnv`.

    `device` is "cuda" or "cpu" (default: CUDA when available). Outside torchrun, and with no
    `init_method`, this is a single process run: no process group, rank 0 of 1.
    `init_method` (for example "file:///tmp/rdzv") serves launchers other than torchrun; RANK and
    WORLD_SIZE must then be set."""
    device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type not in ("cuda", "cpu"):
        raise ConfigError(f"device: expected 'cuda' or 'cpu', got {device_type!r}")
    if not launched_by_torchrun() and init_method is None and not dist.is_initialized():
        return DistEnv(device=torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu"))

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        torch_device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=torch_device if device_type == "cuda" else None,
        )
    return DistEnv(rank, world_size, local_rank, torch_device, backend)


def setup(train: Any) -> DistEnv:
    """The process group a `[train]` config section asks for: none for `strategy = "none"` (an
    error under a multi-process torchrun), else `init_distributed` on the configured device."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    if train.strategy == "none":
        if world > 1:
            raise ConfigError(f"train.strategy: launched on {world} processes; set it to 'ddp' or 'fsdp'")
        return DistEnv()
    if train.strategy not in STRATEGIES:
        raise ConfigError(f"train.strategy: expected one of {', '.join(STRATEGIES)}, got {train.strategy!r}")
    if not launched_by_torchrun():
        raise ConfigError(
            f"train.strategy = {train.strategy!r}: launch with torchrun, for example "
            "`torchrun --standalone --nproc-per-node 2 -m ferrotune train config.toml`"
        )
    device = str(train.device)
    return init_distributed(None if device == "auto" else device.split(":")[0])


def shutdown(env: DistEnv) -> None:
    """Leaves the process group (waits for every rank first)."""
    if env.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def global_sum(value: float | int | torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of `value` over all ranks (float64 on this rank's device; a copy, the input is kept)."""
    total = torch.as_tensor(value, dtype=torch.float64).detach().clone().to(env.device)
    if env.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def loss_scale(env: DistEnv) -> int:
    """Factor on a rank's `sum of token losses / global token count` so that the gradient averaging
    of DDP and FSDP yields the single-process gradient (see the module docstring)."""
    return env.world_size


# --------------------------------------------------------------------------------------------------
# 2. Data: which rows each rank reads
# --------------------------------------------------------------------------------------------------


def rank_rows(n: int, rank: int, world_size: int) -> range:
    """Positions, among `n` rows, that rank `rank` of `world_size` reads: rank, rank+W, ...

    Over all ranks these ranges cover 0..n-1 exactly once. Taken per global batch, the local
    batches of one step together hold exactly the rows one process would read for that step."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} out of range for world size {world_size}")
    return range(rank, n, world_size)


def check_divisible(global_batch: int, env: DistEnv, what: str = "batch_size") -> int:
    """Rows per rank for a global batch; an error naming `what` when it does not split evenly."""
    if global_batch % env.world_size:
        raise ConfigError(
            f"{what}: the global batch of {global_batch} rows does not split over {env.world_size} ranks"
        )
    return global_batch // env.world_size


# --------------------------------------------------------------------------------------------------
# 3. Wrapping the model
# --------------------------------------------------------------------------------------------------


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, `model.layers` in Hugging Face naming (`model.model.layers`)."""
    for path in ("model.layers", "layers"):
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return list(module)
    raise ConfigError("strategy = 'fsdp': the model has no `model.layers` list of decoder blocks to shard")


def holds_quantized_storage(module: nn.Module) -> bool:
    """True for a module whose own parameters include integer tensors (NF4 packed codes)."""
    return any(not p.dtype.is_floating_point for p in module.parameters(recurse=False))


def quantized_storage_as_parameters(model: nn.Module) -> int:
    """`NF4Linear` keeps its 4-bit codes and raw statistics in uint8 buffers; FSDP shards only
    parameters, so those buffers are re-registered as frozen parameters under the same names (the
    state dict is unchanged; the small constant tables stay buffers). Returns how many moved."""
    try:
        from ferrotune.quant.nf4 import NF4Linear
    except ImportError:  # pragma: no cover  (a build without the quant module)
        return 0
    moved = 0
    for module in model.modules():
        if not isinstance(module, NF4Linear):
            continue
        for name, buffer in list(module.named_buffers(recurse=False)):
            if name in module._non_persistent_buffers_set or buffer is None:
                continue
            del module._buffers[name]
            module.register_parameter(name, nn.Parameter(buffer, requires_grad=False))
            moved += 1
    return moved


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself under a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _device_mesh(env: DistEnv, shard_group_size: int | None) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    if shard_group_size is None or shard_group_size == env.world_size:
        return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("shard",))
    if shard_group_size < 1 or env.world_size % shard_group_size:
        raise ConfigError(
            f"fsdp_shard_group_size: {shard_group_size} does not divide the world size {env.world_size}"
        )
    # HSDP: shard within groups (one machine), replicate across them.
    return init_device_mesh(
        env.device.type,
        (env.world_size // shard_group_size, shard_group_size),
        mesh_dim_names=("replicate", "shard"),
    )


def wrap_model(
    model: nn.Module,
    env: DistEnv,
    strategy: str,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    shard_group_size: int | None = None,
) -> nn.Module:
    """Prepares `model` (already on `env.device`, or on the meta device for FSDP) for `strategy`.

    - "none": returned as is.
    - "ddp": `DistributedDataParallel`; every rank holds the whole model, gradients are averaged.
    - "fsdp": FSDP2 in place. Per decoder block: the modules holding quantized storage form one
      group with no dtype cast, then the block itself (attention, MLP, norms, adapters); finally the
      root. `param_dtype` (bf16 on GPU) is the compute copy of floating parameters, `reduce_dtype`
      the gradient reduction dtype; `cpu_offload` keeps shards, gradients and optimizer state on
      the CPU; `shard_group_size` < world size gives HSDP (shard within, replicate across groups).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "none":
        return model
    if not env.distributed:
        raise ConfigError(f"strategy = {strategy!r} needs a process group: launch with torchrun")
    if strategy == "ddp":
        if cpu_offload or shard_group_size:
            raise ConfigError("cpu_offload and fsdp_shard_group_size apply to strategy = 'fsdp' only")
        # No buffer needs syncing each step (the 4-bit codes are constant): broadcasting them
        # every forward would move the whole quantized model.
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == "cuda" else None, broadcast_buffers=False
        )

    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    quantized_storage_as_parameters(model)
    mesh = _device_mesh(env, shard_group_size)
    compute = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    storage = MixedPrecisionPolicy()  # quantized codes and their scales travel untouched
    offload = CPUOffloadPolicy(pin_memory=env.device.type == "cuda") if cpu_offload else OffloadPolicy()
    for block in decoder_blocks(model):
        quantized = [m for m in block.modules() if holds_quantized_storage(m)]
        if quantized:
            try:
                fully_shard(
                    quantized,
                    mesh=mesh,
                    mp_policy=storage,
                    offload_policy=offload,
                    reshard_after_forward=reshard_after_forward,
                )
            except RuntimeError as error:
                if "floating point dtype" not in str(error):
                    raise
                raise ConfigError(
                    f"strategy = 'fsdp' with a 4-bit base: this PyTorch ({torch.__version__}) cannot shard "
                    "uint8 parameters with FSDP2 (pytorch/pytorch#177844, fixed in later releases); "
                    "upgrade PyTorch, or use strategy = 'ddp' for QLoRA"
                ) from error
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=compute,
            offload_policy=offload,
            reshard_after_forward=reshard_after_forward,
        )
    fully_shard(model, mesh=mesh, mp_policy=compute, offload_policy=offload)
    return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Around one micro-batch's backward: with `enabled=False`, DDP skips its all-reduce (the
    gradients accumulate locally until the last micro-batch). FSDP always reduce-scatters, so
    its accumulated gradients stay sharded (1/W of the memory) instead of whole."""
    if not enabled and isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clips the global gradient norm over all ranks' shards to `max_norm`; returns the norm
    before clipping (a plain scalar tensor, the same on every rank)."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if _is_dtensor(norm) else norm


def wrap_for_training(model: nn.Module, env: DistEnv, train: Any, precision: str) -> nn.Module:
    """`wrap_model` with the settings of a `[train]` config section (`strategy`,
    `fsdp_cpu_offload`, `fsdp_shard_group_size`); bf16 compute copies under "bf16-mixed"."""
    if env.distributed and train.strategy == "none":
        raise ConfigError(
            f"train.strategy: launched on {env.world_size} processes; set it to 'ddp' or 'fsdp'"
        )
    if train.strategy == "ddp":
        model = model.to(env.device)
    if train.strategy == "fsdp" and is_fsdp(model):
        return model  # sharded while loading (ferrotune.train.sharded_load)
    return wrap_model(
        model,
        env,
        train.strategy,
        param_dtype=torch.bfloat16 if precision == "bf16-mixed" else None,
        reduce_dtype=torch.float32,
        cpu_offload=train.fsdp_cpu_offload,
        shard_group_size=train.fsdp_shard_group_size or None,
    )


def load_full_state_dict(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], *, strict: bool = True
) -> None:
    """Fills a (possibly sharded, possibly meta-initialised then `to_empty`) model from full tensors
    given on every rank, for example a memory-mapped Hugging Face checkpoint: each rank copies only
    its own shard, so no rank ever holds a second full copy of the model. A tied weight may be
    given under either of its names (HF checkpoints leave out `lm_head.weight` when tied)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = dict(tensors)
    names_of: dict[int, list[str]] = {}
    for name, param in unwrap(model).named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for names in names_of.values():
        given = [n for n in names if n in state]
        for name in names:
            if given and name not in state:
                state[name] = state[given[0]]
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


# --------------------------------------------------------------------------------------------------
# 4. Checkpoints
# --------------------------------------------------------------------------------------------------


def gather_full_state_dict(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors under their plain names (no DDP/FSDP prefixes) on rank 0, an
    empty dict on the other ranks. Every rank must call it (it all-gathers each shard).

    `trainable_only=True` gathers only the parameters with `requires_grad` (the adapter of a LoRA /
    QLoRA run): each tensor whole, never a rank's local shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    if trainable_only and state:  # rank 0 holds the result: it must be the whole adapter
        expected = {name for name, p in unwrap(model).named_parameters() if p.requires_grad}
        missing = sorted(expected - set(state))
        if missing:
            raise RuntimeError(f"adapter gather incomplete: missing {missing[:5]}")
        # torch keeps the second name of a tied frozen weight (lm_head of tied embeddings): drop it
        state = {name: tensor for name, tensor in state.items() if name in expected}
    return state


@contextlib.contextmanager
def full_parameters(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Within the block, the parameters named in `tensors` (as `gather_full_state_dict` returns
    them) are those full tensors instead of this rank's shards; tied parameters stay tied. Lets
    the single-process writers (`save_model`, `save_adapter`) export a sharded model from rank 0.
    The model must not run forward or backward inside the block."""
    root = unwrap(model)
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    replacement: dict[int, nn.Parameter] = {}
    try:
        for fqn, param in list(root.named_parameters(remove_duplicate=False)):
            if id(param) not in replacement:
                if fqn not in tensors:
                    continue
                replacement[id(param)] = nn.Parameter(tensors[fqn], requires_grad=False)
            owner_path, _, pname = fqn.rpartition(".")
            owner = root.get_submodule(owner_path)
            swapped.append((owner, pname, param))
            owner._parameters[pname] = replacement[id(param)]
        yield root
    finally:
        for owner, pname, param in reversed(swapped):
            owner._parameters[pname] = param


@contextlib.contextmanager
def full_model_on_main(model: nn.Module, env: DistEnv) -> Iterator[nn.Module | None]:
    """Every rank enters (the shards are all-gathered); rank 0 gets the model with full CPU
    parameters for a single-process writer, the other ranks None. All leave together."""
    state = gather_full_state_dict(model)
    try:
        if env.is_main:
            with full_parameters(model, state) as full:
                yield full
        else:
            yield None
    finally:
        barrier(env)


def export_model(model: nn.Module, folder: str | os.PathLike[str], env: DistEnv, **save_options: Any) -> None:
    """Consolidated Hugging Face checkpoint of a DDP / FSDP model, written by rank 0 with
    `ferrotune.models.save_model` (every rank must call this: the shards are all-gathered)."""
    from ferrotune.models.load import save_model

    with full_model_on_main(model, env) as full:
        if full is not None:
            save_model(full, folder, **save_options)  # type: ignore[arg-type]


def export_adapter(
    model: nn.Module, folder: str | os.PathLike[str], env: DistEnv, name: str = "default", **save_options: Any
) -> None:
    """PEFT adapter folder (adapter_config.json + adapter_model.safetensors) of a DDP / FSDP model,
    written by rank 0 with `ferrotune.peft.save_adapter`. Only the trainable tensors are gathered,
    each whole: an FSDP rank's local shard never reaches the file (every rank must call this)."""
    from ferrotune.peft import adapter_state_dict, save_adapter

    state = gather_full_state_dict(model, trainable_only=True)
    if env.is_main:
        with full_parameters(model, state) as full:
            partial = [k for k, v in adapter_state_dict(full, name).items() if _is_dtensor(v)]
            if partial:
                raise RuntimeError(f"adapter {name!r}: {partial[:3]} are not trainable, so not gathered")
            save_adapter(full, os.fspath(folder), name, **save_options)
    barrier(env)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for a folder written by `save_sharded`."""
    return os.path.isfile(os.path.join(path, ".metadata"))


def unwrap_for_plain_checkpoint(model: nn.Module) -> nn.Module:
    """The module whose names match a single-process checkpoint; FSDP-sharded models cannot load
    one in place (resume such a run on one process, or from a sharded checkpoint)."""
    if is_fsdp(model):
        raise ConfigError(
            "train.strategy = 'fsdp' cannot resume from a single-process checkpoint; "
            "resume it with strategy 'none' or 'ddp'"
        )
    return unwrap(model)


def _checkpoint_options() -> Any:
    """Checkpoints hold what training changes: the trainable parameters and their optimizer state
    (a LoRA / QLoRA checkpoint is the adapter; the frozen base comes from the base model)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _tmp_dir(path: str) -> str:
    return path.rstrip("/") + ".partial"


def save_sharded(
    path: str | os.PathLike[str],
    model: nn.Module,
    env: DistEnv,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: Mapping[str, Any] | None = None,
) -> None:
    """Writes a sharded checkpoint folder with torch.distributed.checkpoint: each rank writes its
    own shards of the trainable parameters and their optimizer state, rank 0 adds `progress.json` (step, data
    position, ... as given, plus the world size). The folder appears under `path` only once complete (written beside it,
    then renamed); a checkpoint already there is replaced. Multi-node runs need `path` on a
    filesystem every node sees."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = os.fspath(path)
    options = _checkpoint_options()
    tmp = _tmp_dir(final)
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(env)
    model_state, optim_state = get_state_dict(
        model, [optimizer] if optimizer is not None else [], options=options
    )
    state: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        state["optim"] = optim_state
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not env.distributed)
    if env.is_main:
        meta = {**dict(trainer_state or {}), "world_size": env.world_size, "format": CHECKPOINT_FORMAT}
        with open(os.path.join(tmp, PROGRESS), "w") as f:
            json.dump(meta, f, indent=1)
        old = final.rstrip("/") + ".old"
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier(env)


def load_sharded(
    path: str | os.PathLike[str],
    model: nn.Module,
    env: DistEnv,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Loads a `save_sharded` folder into `model` (and `optimizer`), whatever the number of ranks
    that wrote it and whatever this run's strategy; returns the saved trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = os.fspath(path)
    meta_path = os.path.join(folder, PROGRESS)
    if not os.path.isfile(meta_path) or not is_sharded_checkpoint(folder):
        raise FormatError(f"{folder}: not a sharded checkpoint (no {PROGRESS} and .metadata)", path=folder)
    with open(meta_path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise FormatError(
                f"{meta_path}: line {e.lineno}: {e.msg}", path=meta_path, place=f"line {e.lineno}"
            ) from None
    read_checkpoint_metadata(folder)  # a bad or tampered record fails here, naming the file
    optimizers = [optimizer] if optimizer is not None else []
    options = _checkpoint_options()
    model_state, optim_state = get_state_dict(model, optimizers, options=options)
    state: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        state["optim"] = optim_state
    dcp.load(state, storage_reader=safe_reader(folder), no_dist=not env.distributed)
    set_state_dict(
        model,
        optimizers,
        model_state_dict=state["model"],
        optim_state_dict=state.get("optim", {}),
        options=options,
    )
    return {k: v for k, v in meta.items() if k not in ("world_size", "format")}


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's `.metadata` (a pickle) admitting only the plain record types DCP writes there,
    so a tampered checkpoint cannot run code when loaded."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            *(
                ("torch.distributed.checkpoint.metadata", name)
                for name in (
                    "Metadata",
                    "MetadataIndex",
                    "StorageMeta",
                    "BytesStorageMetadata",
                    "ChunkStorageMetadata",
                    "TensorProperties",
                    "TensorStorageMetadata",
                    "_MEM_FORMAT_ENCODING",
                )
            ),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("torch.serialization", "_get_layout"),  # a layout looked up by its name
            ("torch", "Size"),
            ("collections", "OrderedDict"),
            ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise FormatError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


def read_checkpoint_metadata(path: str, name: str = ".metadata") -> Any:
    """DCP's metadata record of a checkpoint folder, read with the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata

    meta_path = os.path.join(path, name)
    with open(meta_path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except FormatError as e:
            raise FormatError(f"{meta_path}: {e}", path=meta_path) from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise FormatError(f"{meta_path}: unreadable checkpoint metadata: {e}", path=meta_path) from None
    if not isinstance(metadata, Metadata):
        raise FormatError(f"{meta_path}: not a checkpoint metadata record", path=meta_path)
    return metadata


def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            rank = kwargs.get("rank")
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            metadata = read_checkpoint_metadata(os.fspath(self.path), name)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader


def safe_reader(path: str) -> Any:
    """DCP's FileSystemReader whose metadata reader cannot execute code."""
    return _safe_reader_class()(path)

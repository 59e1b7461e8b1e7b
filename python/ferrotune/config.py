"""Run configuration: typed dataclasses, loaded from TOML and overridden by `a.b=c` arguments.

    ferrotune train run.toml train.lr=1e-4 model.gradient_checkpointing=true

Every key is checked against the dataclass that owns it: an unknown key, a value of the wrong
type or one outside its allowed set raises `ConfigError` naming the full dotted key (and, for a
misspelling, the nearest valid key). Override values are parsed as TOML values (`3`, `1e-4`,
`true`, `"text"`, `[1, 2]`); a bare word that is not valid TOML is taken as a string.

A section belongs to one dataclass; methods (PEFT, preference training) add their own section
dataclasses as fields of `MethodConfig`.
"""

from __future__ import annotations

import difflib
import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from ferrotune.errors import ConfigError

T = TypeVar("T")


@dataclass
class ModelConfig:
    """The network: an HF checkpoint folder, or (`path` empty) a fresh random model whose shape is
    given in `init` with HF config.json keys (for pretraining from scratch)."""

    path: str = ""
    init: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = ""  # folder or tokenizer.json; default: the model folder
    gradient_checkpointing: bool = False
    # With checkpointing on: recompute only the first N decoder blocks ("all" or 0: every block).
    checkpoint_layers: int | Literal["all"] = "all"
    attention: Literal["auto", "sdpa", "flex"] = "auto"

    def __post_init__(self) -> None:
        layers = self.checkpoint_layers
        if layers != "all" and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0):
            raise ConfigError(f'model.checkpoint_layers: an integer >= 0 or "all", got {layers!r}')

    @property
    def checkpointed_layers(self) -> int | None:
        """`LlamaModel.checkpointed_layers`: None for every block, else the first N."""
        layers = self.checkpoint_layers
        return None if layers == "all" or layers == 0 else int(layers)


@dataclass
class DataSource:
    """One source (task) of a mixture: `[[data.sources]]` in a run config, `[[sources]]` in a
    `ferrotune prepare --mix` file. Empty options fall back to the run's own."""

    name: str = ""
    path: list[str] | str = ""  # JSONL file(s) or glob(s)
    weight: float = 1.0  # for mixing = "weights" (> 0)
    epochs: float = 1.0  # passes over the source (2.5: twice plus a random half); scales its size
    format: Literal["", "auto", "text", "chat", "prompt_completion", "preference"] = ""
    loss: Literal["", "auto", "all", "assistant", "completion"] = ""
    text_field: str = ""
    messages_field: str = ""
    prompt_field: str = ""
    completion_field: str = ""
    chosen_field: str = ""
    rejected_field: str = ""
    role_field: str = ""
    content_field: str = ""


@dataclass
class DataConfig:
    """Training data. `train` / `eval`: a folder from `ferrotune prepare`; a JSONL file, prepared
    into <run>/prepared/ by the same pipeline; or a `.txt` file (pretraining) packed in memory.
    Or, instead of `train`, a mixture: `[[data.sources]]` sampled by `mixing` (docs/data.md)."""

    train: str = ""
    eval: str = ""
    seq_len: int = 512
    eval_fraction: float = 0.0  # held out from `train` when `eval` is empty
    shuffle: bool = True
    pipeline: Literal["auto", "memory"] = "auto"  # auto: JSONL through `ferrotune prepare`
    sources: list[DataSource] = field(default_factory=list)
    # p_i = w_i / sum w  |  size_i^(1/T) / sum  |  min(size_i, cap) / sum, size_i = epochs_i * n_i
    mixing: Literal["weights", "temperature", "proportional"] = "weights"
    temperature: float = 1.0
    mix_cap: int = 0  # proportional mixing: cap on a source's size (0: none)
    mix_total: int = 0  # examples drawn in all (0: the rule's default)
    mix_unit: Literal["examples", "tokens"] = "examples"  # what sizes, shares and mix_total count
    # instead of mix_total: stop when the first source is used up (no repeats) or the last one is
    mix_stop: Literal["", "first_exhausted", "all_exhausted"] = ""


@dataclass
class TrainConfig:
    """Optimisation. The optimizer sees `batch_size * grad_accum` rows per step."""

    steps: int = 100
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # "adamw8bit": both moments stored in 8 bits, blockwise (ferrotune.train.optim8bit)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    max_grad_norm: float = 1.0  # 0: no clipping
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = "auto"
    device: str = "auto"
    compile: bool = False
    # Across GPUs / machines under torchrun (ferrotune.train.dist): "ddp" replicates the model,
    # "fsdp" shards parameters, gradients and optimizer state (FSDP2). batch_size is per GPU.
    strategy: Literal["none", "ddp", "fsdp"] = "none"
    fsdp_cpu_offload: bool = False  # shards, gradients and optimizer state in CPU memory
    # Checkpointed blocks keep their inputs in pinned host memory (needs model.gradient_checkpointing)
    activation_offload: bool = False
    fsdp_shard_group_size: int = (
        0  # 0: shard over all ranks; k: shard within groups of k, replicate across (HSDP)
    )


@dataclass
class RunConfig:
    """Where the run writes and how often."""

    output_dir: str = "runs/ferrotune"
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 0  # 0: the whole eval set
    save_every: int = 0  # 0: only the final model
    keep_checkpoints: int = 2
    resume: bool = False
    tensorboard: bool = True  # when the tensorboard package is installed
    plot: bool = True  # loss-curve PNG when matplotlib is installed


# ----------------------------------------------------------------------------------------------
# Alignment sections (`[method.reward]`, `[method.dpo]`, `[method.ppo]`, `[method.grpo]`); the
# optimisation itself (steps, lr, batch_size, ...) comes from `[train]` as for every task.
# ----------------------------------------------------------------------------------------------


@dataclass
class RewardConfig:
    """task = "reward": Bradley-Terry reward-model training on preference pairs."""

    use_margin: bool = False  # subtract each pair's "margin" field inside the sigmoid
    base: str = ""  # "" = start from model.path's decoder; a reward-model folder to continue one


@dataclass
class DPOConfig:
    """task = "dpo" | "ipo" | "simpo" | "orpo" | "kto" (the task picks the loss). `beta` is DPO's β,
    IPO's τ, SimPO's β and KTO's β; ORPO weighs its odds-ratio term by `orpo_lambda`."""

    loss_type: Literal["dpo", "ipo", "simpo", "orpo", "kto"] = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO (and SimPO) when > 0
    simpo_gamma: float = 0.5  # SimPO's target margin γ
    orpo_lambda: float = 0.1
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    reference_cache: str = ""  # safetensors file of reference log-probs, computed once; "" = live


@dataclass
class PPOConfig:
    """task = "ppo". One `[train]` step = one rollout of `rollout_batch` prompts followed by
    `ppo_epochs` passes of `minibatch`-sized updates."""

    rollout_batch: int = 64
    minibatch: int = 16
    ppo_epochs: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    value_coef: float = 0.1
    kl_coef: float = 0.05  # initial β of the per-token KL penalty
    adaptive_kl: bool = False
    kl_target: float = 6.0  # sequence KL (nats) the adaptive controller aims at
    kl_horizon: int = 10000
    whiten_advantages: bool = True
    policy_adapter: str = "policy"  # with LoRA: adapter names on the one shared base
    value_adapter: str | None = "value"  # None: value head on the policy's hidden states
    reward_model: str = ""  # a reward-model folder (task = "reward" output), or
    reward_functions: list[str] = field(default_factory=list)  # names or "module:function"


@dataclass
class GRPOConfig:
    """task = "grpo". One `[train]` step = `prompts_per_iteration` prompts x `group_size` samples,
    then `grpo_epochs` passes of `minibatch`-sized updates."""

    prompts_per_iteration: int = 16
    group_size: int = 8
    minibatch: int = 64
    grpo_epochs: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    clip_range: float = 0.2
    beta: float = 0.04  # weight of the k3 KL to the reference; 0 = no reference
    scale_rewards: bool = True  # divide advantages by the group std (False: Dr. GRPO)
    token_level_loss: bool = False  # average over all tokens (DAPO) instead of per sequence
    reward_functions: list[str] = field(default_factory=lambda: ["arithmetic"])
    reward_weights: list[float] = field(default_factory=list)  # default: 1 each


@dataclass
class MethodConfig:
    """The fine-tuning method. "full" trains every parameter; PEFT methods add their sections here."""

    name: str = "full"
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


@dataclass
class PeftSection:
    """`[peft]`: a parameter-efficient method applied on top of the training method (owned by
    ferrotune.peft). `method` is a name of `ferrotune.peft.METHODS` ("lora", "dora", "ia3",
    "houlsby", "prefix", "prompt", ...) or "" for none; `options` are that method's config fields,
    checked by `ferrotune.peft.config_from_dict`:

        [peft]
        method = "lora"
        options = { r = 16, alpha = 32, target_modules = "all-linear" }
    """

    method: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MultitaskConfig:
    """`[multitask]` (ferrotune.train.multitask): per-task loss weights, per-task evaluation and
    task-routed adapters over a mixture whose batches carry `task_ids`.

        [multitask]
        loss_weights = { reverse = 2.0, sort = 1.0 }   # default 1 for a task not named
        routed = true                # one adapter per task beside the shared [peft] adapter
        task_method = "lora"         # or "prompt" (prompt tuning, one task per packed row)
        task_options = { r = 8, alpha = 16, target_modules = "all-linear" }
        exact_match = { reverse = "data/reverse_eval.jsonl" }   # prompt/completion, greedy

    `tasks` lists the task names in index order; empty: the prepared data's metadata."""

    tasks: list[str] = field(default_factory=list)
    loss_weights: dict[str, float] = field(default_factory=dict)
    routed: bool = False
    task_method: Literal["lora", "prompt"] = "lora"
    task_options: dict[str, Any] = field(default_factory=dict)  # default: [peft] options (LoRA)
    exact_match: dict[str, str] = field(default_factory=dict)  # task -> prompt/completion JSONL
    max_new_tokens: int = 32
    exact_match_limit: int = 200  # examples per task


@dataclass
class Config:
    task: Literal["pretrain", "sft", "reward", "ppo", "dpo", "ipo", "simpo", "orpo", "kto", "grpo"] = "sft"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    peft: PeftSection = field(default_factory=PeftSection)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)


# ----------------------------------------------------------------------------------------------
# Building dataclasses from dicts, with errors that name the key
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`, converting int -> float where a float is due."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")  # type: ignore[arg-type]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Builds dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown key {prefix}{key}{hint}")
    values = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            values[f.name] = _convert(data[f.name], hints[f.name], prefix + f.name)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{prefix}{f.name}: required")
    return cls(**values)


def to_dict(obj: Any) -> Any:
    """A dataclass as plain dicts and lists (for saving with the run)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 0.0001). Values are TOML; bare words are strings."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, like train.lr=1e-4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a table")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type[T] = Config) -> T:  # type: ignore[assignment]
    """Reads a TOML file (or none: defaults), applies `a.b=c` overrides, and validates."""
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{file}: no such config file") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{file}: {err}") from None
    data = apply_overrides(data, list(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None

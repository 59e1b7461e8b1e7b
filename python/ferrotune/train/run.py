"""`ferrotune train config.toml key=value ...`: builds the model, the data and the loop from a
config, trains, and writes a checkpoint transformers loads.

    task = "pretrain"   raw text, every token trained (domain-adaptive / continued pretraining)
    task = "sft"        chat data, assistant tokens trained
    [method] name = "full" trains every parameter (PEFT methods plug in their own)

The run folder (`run.output_dir`) ends up holding config.json (the resolved config),
metrics.jsonl, loss.png, checkpoints/step-*/ (when `save_every`) and final/ (the HF checkpoint
with its tokenizer).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from ferrotune.config import Config, load_config
from ferrotune.errors import ConfigError
from ferrotune.models.llama import CausalLM, LlamaConfig
from ferrotune.models.load import load_model, save_model
from ferrotune.train import dist
from ferrotune.train.loop import RowBatches, TrainResult, resolve_device, resolve_precision, train_loop

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


@dataclass
class Outcome:
    result: TrainResult
    final_dir: Path
    model: CausalLM
    rank: int = 0  # under torchrun only rank 0 reports


def model_dtype(config: Config, device: torch.device) -> torch.dtype:
    """bf16 weights under `train.precision = "bf16"`, else fp32."""
    return torch.bfloat16 if resolve_precision(config.train.precision, device) == "bf16" else torch.float32


def build_model(config: Config, device: torch.device) -> CausalLM:
    """Loads `model.path`, or builds a random model from `model.init` (HF config keys)."""
    dtype = model_dtype(config, device)
    if config.model.path:
        model = load_model(config.model.path, device=device, dtype=dtype)
    elif config.model.init:
        torch.manual_seed(config.seed)
        model = CausalLM(LlamaConfig.from_dict(config.model.init))
        model.init_weights()
        model.to(device=device, dtype=dtype)
    else:
        raise ConfigError("model.path or model.init: one is required")
    return configure_model(model, config)


def configure_model(model: CausalLM, config: Config) -> CausalLM:
    """The run's model settings: gradient checkpointing, activation offload, attention backend,
    compiled blocks (on a built model, or a meta one before it is sharded)."""
    model.gradient_checkpointing = config.model.gradient_checkpointing
    model.model.checkpointed_layers = config.model.checkpointed_layers
    if config.train.activation_offload and not config.model.gradient_checkpointing:
        raise ConfigError(
            "train.activation_offload offloads checkpointed blocks: set model.gradient_checkpointing"
        )
    model.model.activation_offload = config.train.activation_offload
    model.model.attention_backend = config.model.attention
    if config.method.name != "full":
        raise ConfigError(f"method.name: {config.method.name!r} is not available here (full)")
    if config.train.compile:
        for layer in model.model.layers:
            layer.compile()
    return model


def load_tokenizer(config: Config) -> tuple[Any, Path]:
    from tokenizers import Tokenizer

    source = Path(config.model.tokenizer or config.model.path)
    file = source / "tokenizer.json" if source.is_dir() else source
    if not file.exists():
        raise ConfigError(f"model.tokenizer: no tokenizer.json at {source}")
    return Tokenizer.from_file(str(file)), file.parent


def split_eval(rows: Sequence, fraction: float, seed: int) -> tuple[Sequence, Sequence]:
    """Holds out a random `fraction` of the rows (lists stay lists; other sequences become views)."""
    if fraction <= 0:
        return rows, []
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = max(1, int(len(rows) * fraction))
    if isinstance(rows, list):
        return [rows[i] for i in order[cut:]], [rows[i] for i in order[:cut]]
    return Subset(rows, order[cut:]), Subset(rows, order[:cut])  # memory-mapped rows stay views


def _prepare_config(config: Config, tokenizer_dir: Path, out: Path, inputs: list[str]) -> dict[str, Any]:
    """The native prepare config of a run (its tokenizer, seq_len, seed and the task's loss), with
    the CLI's defaults for everything else."""
    from ferrotune.data import prepare as prepare_module

    parser = argparse.ArgumentParser()
    prepare_module.add_arguments(parser)
    args = parser.parse_args(
        [
            "(inputs)",
            "--tokenizer",
            str(tokenizer_dir),
            "--out",
            str(out),
            "--seq-len",
            str(config.data.seq_len),
            "--loss",
            "all" if config.task == "pretrain" else "assistant",
            "--seed",
            str(config.seed),
            "--overwrite",
            "--quiet",
        ]
    )
    return {**prepare_module.config_from_args(args), "inputs": inputs}


def _prepare_once(out: Path, native: dict[str, Any], fresh: Any) -> None:
    """Runs prepare into `out` unless `fresh(manifest)` says the folder there is current. Under
    torchrun rank 0 prepares while the others wait; prepared output is deterministic, so a resumed
    run reuses it."""
    from ferrotune.data import load_manifest
    from ferrotune.data.prepare import format_summary, prepare

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    current = (out / "manifest.json").exists() and fresh(load_manifest(out))
    if not current and (not distributed or torch.distributed.get_rank() == 0):
        summary = prepare(native, progress=False)
        print(format_summary(summary), file=sys.stderr)
    if distributed:
        torch.distributed.barrier()


def prepared_rows(path: str, config: Config, tokenizer_dir: Path, name: str) -> Sequence | None:
    """Rows from the shard pipeline: a folder `ferrotune prepare` wrote, or a JSONL file prepared
    now (Rust: chat template, tokenization, loss mask, best-fit packing) into <run>/prepared/<name>.
    None for inputs the in-memory path handles (`.txt`, or `data.pipeline = "memory"`)."""
    from ferrotune.data import PackedDataset

    source = Path(path)
    if source.is_dir():
        return PackedDataset(source, shuffle=False)
    if config.data.pipeline == "memory" or not source.name.endswith((".jsonl", ".jsonl.gz")):
        return None
    out = Path(config.run.output_dir) / "prepared" / name
    native = _prepare_config(config, tokenizer_dir, out, [str(source)])
    _prepare_once(out, native, lambda m: "mixture" not in m and m.get("seq_len") == config.data.seq_len)
    return PackedDataset(out, shuffle=False)


def mixture_rows(config: Config, tokenizer_dir: Path, split: str = "train") -> Sequence:
    """The rows of `[[data.sources]]`: the mixture sampled and prepared into <run>/prepared/train
    (prepared again when the sources or the rule changed); `split="eval"`: the examples held out
    of every source (`data.eval_fraction`) into <run>/prepared/eval. Rows carry `task_ids`."""
    from ferrotune.data import PackedDataset
    from ferrotune.data.mix import mixture_of, native_mixture, same_mixture

    if config.data.train:
        raise ConfigError("data.train and data.sources: give one (a mixture names its own files)")
    if config.data.pipeline == "memory":
        raise ConfigError('data.sources: a mixture is prepared by the shard pipeline (pipeline = "auto")')
    mix = mixture_of(config.data)
    out = Path(config.run.output_dir) / "prepared" / split
    native = {**_prepare_config(config, tokenizer_dir, out, []), "mixture": native_mixture(mix, split)}
    _prepare_once(
        out,
        native,
        lambda m: (
            all(m.get(k) == native[k] for k in ("seq_len", "seed", "loss")) and same_mixture(m, mix, split)
        ),
    )
    return PackedDataset(out, shuffle=False)


def training_rows(
    config: Config, tokenizer: Any, tokenizer_dir: Path, in_memory: Any
) -> tuple[Sequence, Sequence]:
    """(train rows, eval rows): prepared shards when possible, else `in_memory(path)`. A mixture
    holds `data.eval_fraction` of every source out before sampling, so no example (or repeat of
    one) is both trained on and evaluated."""
    if not config.data.train and not config.data.sources:
        raise ConfigError(
            "data.train: required (a prepared folder, a .jsonl or a .txt file; or data.sources)"
        )

    def rows(path: str, name: str) -> Sequence:
        found = prepared_rows(path, config, tokenizer_dir, name)
        return found if found is not None else in_memory(path)

    if config.data.sources:
        train = mixture_rows(config, tokenizer_dir)
        if config.data.eval:
            return train, rows(config.data.eval, "eval")
        held_out = mixture_rows(config, tokenizer_dir, "eval") if config.data.eval_fraction > 0 else []
        return train, held_out
    train = rows(config.data.train, "train")
    if config.data.eval:
        return train, rows(config.data.eval, "eval")
    return split_eval(train, config.data.eval_fraction, config.seed)


def finish(model: CausalLM, config: Config, tokenizer_dir: Path | None) -> Path:
    """Saves the trained model (HF layout) with its tokenizer files into <run>/final."""
    final = Path(config.run.output_dir) / "final"
    from ferrotune.peft.routed import RoutedModel
    from ferrotune.train.multitask import multitask_enabled

    if isinstance(model, RoutedModel):  # final/shared/, final/tasks/<name>/: PEFT adapter folders
        from ferrotune.peft import config_from_dict
        from ferrotune.peft.routed import save_routed

        shared = config_from_dict(config.peft.method, config.peft.options) if config.peft.method else None
        save_routed(model, final, shared, base_model_name_or_path=config.model.path or None)
    elif config.peft.method:  # [peft]: the adapter alone, in PEFT's files
        from ferrotune.peft import save_adapter

        name = "shared" if multitask_enabled(config) else "default"
        save_adapter(model, str(final), name, base_model_name_or_path=config.model.path or None)
    else:
        save_model(model, final)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists() and (tokenizer_dir / name).resolve() != (
                final / name
            ).resolve():
                shutil.copyfile(tokenizer_dir / name, final / name)
    return final


def train_from_config(config: Config, *, quiet: bool = False) -> Outcome:
    from ferrotune.train import pretrain, sft
    from ferrotune.train.align_run import ALIGNMENT_TASKS, train_alignment

    if config.task in ALIGNMENT_TASKS:
        return train_alignment(config, quiet=quiet)

    env = dist.setup(config.train)  # torchrun: join the process group, this rank's GPU
    device = env.device if env.distributed else resolve_device(config.train.device)
    quiet = quiet or not env.is_main
    torch.manual_seed(config.seed)  # `seed` decides the adapter's initial values too (every rank alike)
    tokenizer, tokenizer_dir = load_tokenizer(config)
    build_rows = pretrain.build_rows if config.task == "pretrain" else sft.build_rows
    train_rows, eval_rows = build_rows(config, tokenizer, tokenizer_dir)
    from ferrotune.train import multitask
    from ferrotune.train.sharded_load import load_sharded_model, sharded_load_blocker

    sharded = env.distributed and sharded_load_blocker(config) is None
    if sharded:  # FSDP: built on the meta device, [peft] applied, sharded, each rank reads its shards
        model = load_sharded_model(config, env, model_dtype(config, device), tokenizer=tokenizer, quiet=quiet)
    else:  # the whole model on every rank (sharded by the loop under FSDP; see sharded_load_blocker)
        model = build_model(config, device)
    # a mixture's task names: per-task evaluation always, [multitask] for routing and loss weights
    asked = multitask.multitask_enabled(config)
    tasks = (
        multitask.resolve_tasks(config, train_rows) if asked else multitask.task_names_from_rows(train_rows)
    )
    if sharded:
        pass  # [peft] was applied while loading; multi-task runs never load sharded
    elif asked:  # [peft] as the shared adapter, and one adapter per task with multitask.routed
        model = multitask.apply_multitask_peft(model, config, tasks, quiet=quiet)
    elif config.peft.method:  # [peft]: a parameter-efficient method on top (prints its trainable share)
        from ferrotune.peft import apply_peft_section

        model = apply_peft_section(model, config.peft, tokenizer=tokenizer, quiet=quiet)
    split = {"rank": env.rank, "world_size": env.world_size}  # each rank reads its rows
    batches = RowBatches(
        train_rows, config.train.batch_size, shuffle=config.data.shuffle, seed=config.seed, **split
    )
    eval_batches = (
        RowBatches(
            eval_rows, min(config.train.batch_size, len(eval_rows) // env.world_size), shuffle=False, **split
        )
        if len(eval_rows) >= env.world_size
        else None
    )
    if not quiet:
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{config.task}: {n_params / 1e6:.2f}M parameters on {device}, {len(train_rows)} rows of "
            f"{config.data.seq_len} tokens ({len(eval_rows)} held out), {config.train.steps} steps",
            file=sys.stderr,
        )
    task_weights = evaluator = None
    if tasks:
        if asked and config.multitask.loss_weights:
            task_weights = multitask.task_weight_vector(tasks, config.multitask.loss_weights)
        by_task = eval_batches if len(eval_rows) and "task_ids" in eval_rows[0] else None
        if eval_batches is not None and by_task is None and config.multitask.routed:
            raise ConfigError(
                "data.eval: a routed run evaluates on rows with task ids; leave data.eval empty "
                "(data.eval_fraction holds out mixture rows) or give a prepared mixture folder"
            )
        if by_task is not None or config.multitask.exact_match:
            from ferrotune.models.generate import stop_token_ids

            stops = stop_token_ids(tokenizer_dir, tokenizer, model)
            pad = tokenizer.token_to_id("<|pad|>")
            pad = pad if pad is not None else (stops[0] if stops else 0)
            evaluator = multitask.build_evaluator(
                config,
                tasks,
                by_task,
                tokenizer,
                stops,
                pad,
                device,
                resolve_precision(config.train.precision, device),
                env,
            )
    result = train_loop(
        model,
        config,
        batches,
        eval_batches,
        device=device,
        quiet=quiet,
        env=env,
        task_weights=task_weights,
        evaluator=evaluator,
    )
    if env.distributed:  # the shards gathered on rank 0, which writes the checkpoint
        final = Path(config.run.output_dir) / "final"
        with dist.full_model_on_main(result.model, env) as full:
            if full is not None:
                finish(full, config, tokenizer_dir)
        dist.shutdown(env)
        if not env.is_main:
            return Outcome(result, final, model, env.rank)
    else:
        final = finish(model, config, tokenizer_dir)
    summary = {
        "task": config.task,
        "steps": result.steps,
        "final_loss": result.losses[-1] if result.losses else None,
        **result.eval,
    }
    (Path(config.run.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return Outcome(result, final, model)


def multitask_summary(metrics: dict[str, Any]) -> list[str]:
    from ferrotune.train.multitask import format_task_metrics

    return [f"eval {line}" for line in format_task_metrics(metrics)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML run configuration (see examples/*.toml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, like train.lr=1e-4")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    outcome = train_from_config(config)
    if outcome.rank != 0:
        return 0
    result = outcome.result
    lines = [
        f"trained {result.steps - result.resumed_from} steps in {result.seconds:.0f}s ({result.tokens:,} tokens)",
        f"final train loss {result.losses[-1]:.4f}" if result.losses else "",
        f"eval loss {result.eval['eval_loss']:.4f}, perplexity {result.eval['eval_ppl']:.2f}"
        if result.eval
        else "",
        *multitask_summary(result.eval),
        f"model: {outcome.final_dir}",
        f"metrics: {Path(config.run.output_dir) / 'metrics.jsonl'}",
    ]
    print("\n".join(line for line in lines if line))
    return 0

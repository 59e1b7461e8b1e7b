"""`ferrotune train` for the alignment tasks: builds data, models and rewards from the config and
runs the matching loop.

    task = "reward"                         preference pairs -> reward model (final/ loads in
                                            transformers as ...ForSequenceClassification)
    task = "dpo" | "ipo" | "simpo" | "orpo" | "kto"
                                            preference pairs -> policy ([method.dpo])
    task = "ppo"                            prompts + reward model or reward functions ([method.ppo])
    task = "grpo"                           prompts + reward functions ([method.grpo])

Data: preference pairs are JSONL `{"prompt", "chosen", "rejected", "margin"?}` or a folder made by
`ferrotune prepare --format preference` (chat templates, masks and packing done there); prompts for PPO
and GRPO are JSONL `{"prompt"}`. Texts are tokenized as given (apply the chat template when
writing the file); an end-of-sequence token closes every completion.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ferrotune.config import Config, to_dict
from ferrotune.errors import ConfigError, FormatError
from ferrotune.train.alignment import has_adapters
from ferrotune.train.loop import TrainResult, resolve_device
from ferrotune.train.pretrain import special_id
from ferrotune.train.run import Outcome, build_model, finish, load_tokenizer, split_eval

ALIGNMENT_TASKS = ("reward", "ppo", "dpo", "ipo", "simpo", "orpo", "kto", "grpo")
PREFERENCE_TASKS = ("dpo", "ipo", "simpo", "orpo", "kto")


def read_prompts(path: str, tokenizer: Any) -> list[list[int]]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise FormatError(
                    f"{path}: line {number}: invalid JSON ({err.msg})", path=path, place=f"line {number}"
                ) from None
            text = record.get("prompt") if isinstance(record, dict) else None
            if not isinstance(text, str) or not text:
                raise FormatError(
                    f"{path}: line {number}: field 'prompt' must be a non-empty string",
                    path=path,
                    place=f"line {number}",
                    detail="prompt",
                )
            prompts.append(tokenizer.encode(text).ids)
    if not prompts:
        raise FormatError(f"{path}: no prompts", path=path)
    return prompts


def read_pairs(path: str, tokenizer: Any, eos: int) -> Any:
    """Preference pairs from JSONL, or a folder prepared by `ferrotune prepare` (memory-mapped)."""
    from ferrotune.train.preference_data import PreparedPreferences, read_preference_jsonl

    if Path(path).is_dir():
        return PreparedPreferences(path)
    return read_preference_jsonl(path, tokenizer, add_eos=eos)


def _special_ids(config: Config, tokenizer: Any, model_config: Any) -> tuple[int, int]:
    """(end-of-sequence id, pad id): from the model config when set, else the tokenizer."""
    eos = model_config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        eos = special_id(tokenizer, "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")
    pad = model_config.pad_token_id
    if pad is None:
        pad = tokenizer.token_to_id("<|pad|>")
    return int(eos), int(pad if pad is not None else eos)


def train_alignment(config: Config, *, quiet: bool = False) -> Outcome:
    if not config.data.train:
        raise ConfigError("data.train: required (a JSONL file)")
    started = time.perf_counter()
    device = resolve_device(config.train.device)
    tokenizer, tokenizer_dir = load_tokenizer(config)
    run_dir = Path(config.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
    torch.manual_seed(config.seed)  # `seed` decides the adapter's (and value head's) initial values
    model = build_model(config, device)
    if config.peft.method:
        from ferrotune.peft import apply_peft_section

        model = apply_peft_section(model, config.peft, tokenizer=tokenizer, quiet=quiet)
    eos, pad = _special_ids(config, tokenizer, model.config)
    common = dict(run_dir=run_dir, log_every=config.run.log_every, seed=config.seed, quiet=quiet)
    task = config.task

    if task == "reward" or task in PREFERENCE_TASKS:
        pairs = read_pairs(config.data.train, tokenizer, eos)
        if config.data.eval:
            eval_pairs = read_pairs(config.data.eval, tokenizer, eos)
        elif isinstance(pairs, list):
            pairs, eval_pairs = split_eval(pairs, config.data.eval_fraction, config.seed)
        else:
            eval_pairs = []
        if not quiet:
            print(
                f"{task}: {len(pairs)} preference pairs ({len(eval_pairs)} held out) on {device}",
                file=sys.stderr,
            )

    if task == "reward":
        from ferrotune.train.reward import (
            load_reward_model,
            reward_model_from_causal_lm,
            save_reward_model,
            train_reward_model,
        )

        if config.method.reward.base:
            reward_model = load_reward_model(config.method.reward.base, device=device)
        else:
            reward_model = reward_model_from_causal_lm(model, torch.Generator().manual_seed(config.seed))
        reward_model.config.pad_token_id = pad
        evaluation = train_reward_model(
            reward_model,
            pairs,
            config.method.reward,
            config.train,
            seq_len=config.data.seq_len,
            pad_id=pad,
            eval_pairs=eval_pairs or None,
            **common,
        )
        if has_adapters(model):
            from ferrotune.peft import merge_and_unload

            merge_and_unload(model)  # the reward model ships as one HF checkpoint
        final = save_reward_model(reward_model, run_dir / "final")
        finish_tokenizer(tokenizer_dir, final)
        history = [{"loss": evaluation["loss"]}]
        summary: dict[str, Any] = {f"eval_{k}": v for k, v in evaluation.items()}
    elif task in PREFERENCE_TASKS:
        from ferrotune.train.dpo import logp_margin, train_preference

        method = replace(config.method.dpo, loss_type=task)
        history = train_preference(
            model, pairs, method, config.train, seq_len=config.data.seq_len, pad_id=pad, **common
        )
        final = save_policy(model, config, tokenizer_dir)
        summary = {"final_" + k: v for k, v in history[-1].items() if k != "step"}
        if eval_pairs:
            summary["eval_logp_margin"] = logp_margin(
                model, eval_pairs, batch_size=config.train.batch_size, seq_len=config.data.seq_len, pad_id=pad
            )
    else:
        from ferrotune.train.rewards import token_reward

        prompts = read_prompts(config.data.train, tokenizer)
        if task == "ppo":
            from ferrotune.train.alignment import reward_from_function, reward_from_model
            from ferrotune.train.ppo import train_ppo

            ppo = config.method.ppo
            if ppo.reward_model:
                from ferrotune.train.reward import load_reward_model

                reward = reward_from_model(load_reward_model(ppo.reward_model, device=device), pad)
            else:
                reward = reward_from_function(token_reward(ppo.reward_functions, [], tokenizer, [eos]))
            history = train_ppo(
                model, prompts, reward, ppo, config.train, stop_tokens=[eos], pad_id=pad, **common
            )
        else:
            from ferrotune.train.grpo import train_grpo

            grpo = config.method.grpo
            reward_fn = token_reward(grpo.reward_functions, grpo.reward_weights, tokenizer, [eos])
            history = train_grpo(
                model, prompts, reward_fn, grpo, config.train, stop_tokens=[eos], pad_id=pad, **common
            )
        final = save_policy(model, config, tokenizer_dir)
        summary = {"first_reward": history[0]["reward"], "final_reward": history[-1]["reward"]}

    summary = {"task": task, "steps": config.train.steps, **summary}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    losses = [h["loss"] for h in history if "loss" in h]
    result = TrainResult(
        steps=config.train.steps, losses=losses, seconds=time.perf_counter() - started, run_dir=run_dir
    )
    if not quiet:
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    return Outcome(result, final, model)


def save_policy(model: Any, config: Config, tokenizer_dir: Path | None) -> Path:
    """The trained policy in <run>/final: an HF checkpoint after full fine-tuning; with PEFT, the
    policy adapter in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
    if not has_adapters(model):
        return finish(model, config, tokenizer_dir)
    from ferrotune.peft import adapter_names, save_adapter

    final = Path(config.run.output_dir) / "final"
    save_adapter(
        model, str(final), adapter_names(model)[0], base_model_name_or_path=config.model.path or None
    )
    finish_tokenizer(tokenizer_dir, final)
    return final


def finish_tokenizer(tokenizer_dir: Path | None, final: Path) -> None:
    """Copies the tokenizer files next to a saved reward model."""
    import shutil

    from ferrotune.train.run import TOKENIZER_FILES

    if tokenizer_dir is None:
        return
    for name in TOKENIZER_FILES:
        source = tokenizer_dir / name
        if source.exists() and source.resolve() != (final / name).resolve():
            shutil.copyfile(source, final / name)

"""Dataset mixtures for `ferrotune prepare --mix mix.toml` and `[[data.sources]]` in a run config.

A mixture is several sources (tasks), each one or more JSONL files with its own format and loss
options, and a rule that sets each source's share p_i of the examples; the native core draws a
fixed number of examples from each (largest-remainder rounding of p_i * total, whole passes then a
seeded subset, one seeded shuffle) and stores each token's task in the shards (`task_ids`).
With n_i the usable examples of source i and size_i = epochs_i * n_i:

    weights       p_i = weight_i / sum_j weight_j
    temperature   p_i = size_i^(1/T) / sum_j size_j^(1/T)
    proportional  p_i = min(size_i, mix_cap) / sum_j min(size_j, mix_cap)

A mix file holds the same keys as the run config's `[data]` mixture keys:

    mixing = "temperature"     # weights | temperature | proportional
    temperature = 2.0
    mix_cap = 0                # proportional: cap on a source's size (0: none)
    mix_total = 0              # examples drawn in all (0: sum of the (capped) sizes)
    holdout = 0.0              # per source, kept out of the sampling: a fraction, or a count (>= 1)
    mix_unit = "examples"      # or "tokens": sizes, shares and mix_total count tokens
    mix_stop = ""              # instead of mix_total: "first_exhausted" (no source repeats) or
                               # "all_exhausted" (every example at least once; oversampling)

    [[sources]]
    name = "math"
    path = ["math/*.jsonl"]    # relative paths: from the mix file's folder
    weight = 3.0
    epochs = 2.5
    format = "chat"            # optional, like loss and the *_field options
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ferrotune.config import DataSource, from_dict
from ferrotune.errors import ConfigError

_OPTIONS = (
    "format",
    "loss",
    "text_field",
    "messages_field",
    "prompt_field",
    "completion_field",
    "chosen_field",
    "rejected_field",
    "role_field",
    "content_field",
)


@dataclass
class Mixture:
    """The sources and the rule (the keys of a mix file)."""

    sources: list[DataSource] = field(default_factory=list)
    mixing: Literal["weights", "temperature", "proportional"] = "weights"
    temperature: float = 1.0
    mix_cap: int = 0
    mix_total: int = 0
    holdout: float = 0.0
    mix_unit: Literal["examples", "tokens"] = "examples"
    mix_stop: Literal["", "first_exhausted", "all_exhausted"] = ""


def check_mixture(mix: Mixture, where: str) -> None:
    """Raises ConfigError naming `where` and the field for options that cannot work."""
    if not mix.sources:
        raise ConfigError(f"{where}sources: no sources")
    names: set[str] = set()
    for i, s in enumerate(mix.sources):
        at = f"{where}sources[{i}]"
        if not s.name:
            raise ConfigError(f"{at}.name: required")
        if s.name in names:
            raise ConfigError(f"{at}.name: {s.name!r} appears twice")
        names.add(s.name)
        if not s.path or (isinstance(s.path, list) and not all(s.path)):
            raise ConfigError(f"{at}.path: required (JSONL files or globs)")
        if not s.weight > 0:
            raise ConfigError(f"{at}.weight: must be > 0, got {s.weight}")
        if not s.epochs > 0:
            raise ConfigError(f"{at}.epochs: must be > 0, got {s.epochs}")
    if mix.mixing == "temperature" and not mix.temperature > 0:
        raise ConfigError(f"{where}temperature: must be > 0, got {mix.temperature}")
    if mix.mix_cap < 0 or mix.mix_total < 0:
        raise ConfigError(f"{where}mix_cap and mix_total: must be >= 0")
    if mix.mix_stop and mix.mix_total:
        raise ConfigError(f"{where}mix_stop and mix_total: give one")
    if not mix.holdout >= 0:
        raise ConfigError(f"{where}holdout: must be >= 0, got {mix.holdout}")


def load_mixture(path: str | Path) -> Mixture:
    """A mix file (TOML, or JSON when it ends in .json), checked; relative paths are resolved from
    the file's folder."""
    file = Path(path)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such mix file") from None
    try:
        data = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{file}: {err}") from None
    try:
        mix = from_dict(Mixture, data)
        check_mixture(mix, "")
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from None
    for s in mix.sources:
        s.path = [p if Path(p).is_absolute() else str(file.parent / p) for p in paths(s)]
    return mix


def mixture_of(data: Any) -> Mixture:
    """The mixture of a run config's `[data]` section (`data.sources` and the mixing keys); its
    `eval_fraction` (without `data.eval`) is held out of every source before sampling."""
    mix = Mixture(
        sources=list(data.sources),
        mixing=data.mixing,
        temperature=data.temperature,
        mix_cap=data.mix_cap,
        mix_total=data.mix_total,
        holdout=data.eval_fraction if not data.eval else 0.0,
        mix_unit=data.mix_unit,
        mix_stop=data.mix_stop,
    )
    check_mixture(mix, "data.")
    return mix


def paths(source: DataSource) -> list[str]:
    return [source.path] if isinstance(source.path, str) else list(source.path)


def native_mixture(mix: Mixture, split: str = "train") -> dict[str, Any]:
    """The `mixture` entry of the native prepare config. `split`: "train" samples the examples not
    held out; "eval" takes the held-out examples of every source once."""
    sources = []
    for s in mix.sources:
        entry: dict[str, Any] = {
            "name": s.name,
            "inputs": paths(s),
            "weight": s.weight,
            "epochs": s.epochs,
        }
        entry.update({k: getattr(s, k) for k in _OPTIONS if getattr(s, k)})
        sources.append(entry)
    return {
        "sources": sources,
        "mixing": mix.mixing,
        "temperature": mix.temperature,
        "mix_cap": mix.mix_cap,
        "mix_total": mix.mix_total,
        "holdout": mix.holdout,
        "split": split,
        "mix_unit": mix.mix_unit,
        "mix_stop": mix.mix_stop,
    }


def same_mixture(manifest: dict[str, Any], mix: Mixture, split: str = "train") -> bool:
    """Whether a prepared folder's manifest was made from this mixture (same sources, options,
    rule and split)."""
    report = manifest.get("mixture")
    if not report:
        return False

    def given(config: dict[str, Any]) -> dict[str, Any]:  # options left out and null are alike
        sources = [{k: v for k, v in s.items() if v is not None} for s in config["sources"]]
        return {**config, "sources": sources}

    return given(report["config"]) == given(native_mixture(mix, split))


def format_mixture(report: dict[str, Any]) -> list[str]:
    """The summary's per-task table: target and realised shares, examples available/taken."""
    rule = report["mixing"]
    if report.get("temperature") is not None:
        rule += f" T={report['temperature']:g}"
    if report.get("mix_cap"):
        rule += f" cap={report['mix_cap']:,}"
    held = sum(t["examples_held_out"] for t in report["tasks"])
    if report["split"] == "eval":
        rule = "held-out examples of each source"
    elif held:
        rule += f", {held:,} examples held out for eval"
    lines = [
        f"  mixture ({rule}), {report['total']:,} {'tokens aimed at' if report['unit'] == 'tokens' else 'examples drawn'}; "
        "shares target -> realised:",
        f"    {'task':<16} {'target':>7} {'examples':>9} {'tok(exp)':>9} {'tokens':>7} {'loss tok':>8}"
        f" {'available':>10} {'taken':>9} {'repeated':>9}",
    ]
    for t in report["tasks"]:
        lines.append(
            f"    {t['name'][:16]:<16} {100 * t['target_share']:6.2f}% {100 * t['example_share']:8.2f}%"
            f" {100 * t['target_token_share']:8.2f}% {100 * t['token_share']:6.2f}%"
            f" {100 * t['trained_token_share']:7.2f}% {t['examples_available']:>10,}"
            f" {t['examples_taken']:>9,} {t['examples_repeated']:>9,}"
        )
    return lines

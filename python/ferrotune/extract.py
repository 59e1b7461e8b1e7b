"""`ferrotune extract BASE TUNED OUT --rank R`: a LoRA of rank R that approximates the change from
a base model to a fine-tuned one, written as a PEFT adapter.

For each targeted weight (default: every `*_proj` of the decoder layers), Δ = W_tuned − W_base and
its best rank-R approximation by truncated SVD (randomized for large weights), split as
B = U·√S, A = √S·Vᵀ with lora_alpha = R. The summary says how much of ‖Δ‖² the rank keeps.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from ferrotune import _native


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
) -> dict[str, Any]:
    """Writes the rank-`rank` LoRA of `tuned - base` to the adapter folder `out`. `targets`: a
    list of module names or a regular expression (PEFT's target_modules)."""
    return _native.extract_adapter(
        os.fspath(base),
        os.fspath(tuned),
        os.fspath(out),
        rank=rank,
        targets=targets if isinstance(targets, str) or targets is None else list(targets),
        seed=seed,
        overwrite=overwrite,
        progress=progress,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="base model folder")
    parser.add_argument("tuned", help="fine-tuned model folder (same architecture)")
    parser.add_argument("out", help="output adapter folder")
    parser.add_argument("--rank", type=int, required=True, help="LoRA rank")
    parser.add_argument("--targets", nargs="+", default=None, help="module names, or one regular expression")
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD")
    parser.add_argument("--overwrite", action="store_true", help="replace files in a non-empty OUT")


def run(args: argparse.Namespace) -> int:
    targets: str | list[str] | None = args.targets
    if targets is not None and len(targets) == 1 and any(c in targets[0] for c in "*|()[]\\"):
        targets = targets[0]  # one argument with regex syntax: a regular expression
    summary = extract_adapter(
        args.base,
        args.tuned,
        args.out,
        rank=args.rank,
        targets=targets,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=True,
    )
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"extracted {summary['modules']} modules at rank {args.rank} into {args.out}: the rank keeps "
        f"{summary['mean_energy']:.1%} of the update on average (worst module {summary['min_energy']:.1%})"
    )
    return 0

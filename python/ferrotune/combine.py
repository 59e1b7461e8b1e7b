"""`ferrotune combine ADAPTER... --weights W... OUT`: several PEFT LoRA adapters combined into one
adapter, or (with `--base`) merged into a model, with PEFT's `add_weighted_adapter` methods:

    linear, cat, svd                        weighted sums (cat: stacked, exact; svd: re-ranked)
    ties, ties_svd                          TIES: magnitude pruning to `--density`, majority sign
    dare_linear, dare_ties (+ _svd)         DARE: random pruning to `--density`, rescaled (seeded)
    magnitude_prune (+ _svd)                magnitude pruning, then a weighted sum

The `_svd` methods combine the full updates s·B·A and re-factor them at `--svd-rank` with a
truncated SVD (exact for small matrices, randomized for large ones). See
`rust/src/merge/combine.rs` for the formulas.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ferrotune import _native
from ferrotune.merge import merge_adapter


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
    base: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    probe: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Combines `adapters` into the adapter folder `out`, or with `base` into the model folder
    `out`: the combined adapter is then written to a temporary folder beside `out`, merged (and
    probed against the base plus the combined adapter), and removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    target = out if base is None else Path(tempfile.mkdtemp(prefix=f".{out.name}.combined-", dir=out.parent))
    try:
        summary: dict[str, Any] = _native.combine_adapters(
            [os.fspath(a) for a in adapters],
            [float(w) for w in weights],
            os.fspath(target),
            method=method,
            density=density,
            majority_sign=majority_sign,
            svd_rank=svd_rank,
            seed=seed,
            overwrite=overwrite or base is not None,
        )
        if base is not None:
            summary["merge"] = merge_adapter(
                base, target, out, overwrite=overwrite, probe=probe, progress=progress
            )
    finally:
        if base is not None:
            shutil.rmtree(target, ignore_errors=True)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="+", help="PEFT adapter folders, then the output folder")
    parser.add_argument("--weights", type=float, nargs="+", required=True, help="one weight per adapter")
    parser.add_argument(
        "--method", default="linear", help="linear, cat, svd, ties, dare_linear, dare_ties, ..."
    )
    parser.add_argument("--density", type=float, default=None, help="fraction kept by TIES / DARE / pruning")
    parser.add_argument("--majority-sign", default="total", choices=["total", "frequency"])
    parser.add_argument(
        "--svd-rank", type=int, default=None, help="rank of the _svd methods (default: largest)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE and the randomized SVD")
    parser.add_argument("--base", default=None, help="merge the combination into this model instead")
    parser.add_argument("--overwrite", action="store_true", help="replace files in a non-empty output")


def run(args: argparse.Namespace) -> int:
    *adapters, out = args.adapters
    if not adapters:
        print("error: give at least one adapter and the output folder", file=sys.stderr)
        return 2
    summary = combine_adapters(
        adapters,
        args.weights,
        out,
        method=args.method,
        density=args.density,
        majority_sign=args.majority_sign,
        svd_rank=args.svd_rank,
        seed=args.seed,
        base=args.base,
        overwrite=args.overwrite,
        progress=True,
    )
    what = "model" if args.base else "adapter"
    report = summary.get("merge", {}).get("probe")
    if report is not None:
        print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    print(
        f"combined {len(adapters)} adapters ({args.method}) into the {what} {out}: "
        f"{summary['modules']} modules at rank {summary['rank']}"
    )
    return 0

"""`ferrotune merge BASE ADAPTER OUT`: a PEFT LoRA adapter (LoRA, rsLoRA, DoRA, rank and alpha
patterns, modules_to_save) merged into a Hugging Face model, written as a complete model folder.

The merge itself is native (`rust/src/merge/apply.rs`): tensor by tensor from the memory-mapped
checkpoint, each tensor in its own dtype, computed in f32, rows in parallel, shards written as the
base's, so memory stays at a few tensors whatever the model size:

    W' = W + s · B A                          s = alpha / r  (rsLoRA: alpha / sqrt(r))
    W' = m ⊙ (W + s · B A) / ‖W + s · B A‖    DoRA, norm of each output row

It ends with the probe check (`ferrotune.probe`): merged versus unmerged logits on a few inputs,
computed natively too, so the whole command never imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from ferrotune import _native
from ferrotune.errors import ConfigError
from ferrotune.probe import DEFAULT_INPUTS, DEFAULT_THRESHOLD, DEFAULT_TOKENS, probe_merge


def merge_adapter(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    probe: bool = True,
    probe_threshold: float | None = None,
    progress: bool = False,
    original: str | os.PathLike[str] | None = None,
    requantize: bool = False,
    probe_inputs: int = DEFAULT_INPUTS,
    probe_tokens: int = DEFAULT_TOKENS,
) -> dict[str, Any]:
    """Merges `adapter` into `base`, writing the model folder `out`. Returns the native summary,
    plus `probe` (a `ferrotune.probe.ProbeReport`, on `probe_inputs` x `probe_tokens` ids) when
    `probe` is set; when no probe can run on this model (an architecture neither the native pass
    nor the torch reference covers), `probe` is None and a warning says why.

    For a 4-bit (bitsandbytes NF4/FP4) `base`, the merge targets its dequantized weights (those the
    adapter was trained against), unless `original` names the 16-bit checkpoint it was quantized
    from: the merge then targets those, and the probe measures the difference against the 4-bit
    model the adapter was trained on. `requantize` writes the merged model back in 4 bits."""
    target = base if original is None else original
    summary: dict[str, Any] = _native.merge_adapter(
        os.fspath(target),
        os.fspath(adapter),
        os.fspath(out),
        overwrite=overwrite,
        progress=progress,
        requantize=requantize,
    )
    if probe:
        threshold = DEFAULT_THRESHOLD if probe_threshold is None else probe_threshold
        started = time.perf_counter()
        try:
            summary["probe"] = probe_merge(
                base,
                adapter,
                out,
                inputs=probe_inputs,
                tokens=probe_tokens,
                threshold=threshold,
                progress=progress,
            )
        except ConfigError as err:
            # Only models neither probe covers get here (the merge itself is architecture-blind).
            summary["probe"] = None
            summary["warnings"].append(f"probe not run: {err}")
        summary["probe_seconds"] = time.perf_counter() - started
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="base model: HF folder (single or sharded), index or safetensors file")
    parser.add_argument(
        "adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)"
    )
    parser.add_argument("out", help="output model folder (created; must be empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace files in a non-empty OUT")
    parser.add_argument("--no-probe", action="store_true", help="skip the merged-vs-unmerged logits check")
    parser.add_argument(
        "--probe-threshold",
        type=float,
        default=None,
        help="warn when merged vs unmerged logits differ by more than this fraction of the adapter's own "
        "effect on them (default 0.5)",
    )
    parser.add_argument(
        "--probe-inputs", type=int, default=DEFAULT_INPUTS, help="probe sequences (default %(default)s)"
    )
    parser.add_argument(
        "--probe-tokens",
        type=int,
        default=DEFAULT_TOKENS,
        help="tokens per probe sequence (default %(default)s)",
    )
    parser.add_argument(
        "--original",
        default=None,
        help="for a 4-bit BASE: merge into this 16-bit checkpoint it was quantized from instead of the "
        "dequantized 4-bit weights (the probe then shows what that costs)",
    )
    parser.add_argument(
        "--requantize", action="store_true", help="write the merged model back in 4 bits (bitsandbytes NF4)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    summary = merge_adapter(
        args.base,
        args.adapter,
        args.out,
        overwrite=args.overwrite,
        probe=not args.no_probe,
        probe_threshold=args.probe_threshold,
        progress=not args.quiet,
        original=args.original,
        requantize=args.requantize,
        probe_inputs=args.probe_inputs,
        probe_tokens=args.probe_tokens,
    )
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"merged {summary['modules_merged']} LoRA modules ({summary['dora_modules']} DoRA, "
        f"{summary['tensors_replaced']} tensors replaced) into {args.out}: "
        f"{summary['bytes_written'] / 1e9:.2f} GB in {summary['shards']} shard(s), "
        f"{summary['tensors_copied']} tensors copied, {summary['seconds']:.2f} s"
    )
    report = summary.get("probe")
    if report is not None:
        print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    print(f"done in {time.perf_counter() - started:.2f} s")
    return 0

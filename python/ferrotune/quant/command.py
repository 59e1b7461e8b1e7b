"""`ferrotune quantize IN_DIR OUT_DIR`: stream a Hugging Face checkpoint into a bitsandbytes 4-bit
checkpoint (NF4 or FP4, double-quantized scales by default) that transformers loads with
bitsandbytes. The work is native (Rust); this module parses arguments and prints the summary.
It does not import torch, so the command's memory stays near one tensor."""

from __future__ import annotations

import argparse
import json

from ferrotune import _native


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="checkpoint folder (config.json + *.safetensors, sharded or not)")
    parser.add_argument("output", help="folder for the 4-bit checkpoint (created)")
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    parser.add_argument("--blocksize", type=int, default=64, help="elements per absmax block (32..4096)")
    parser.add_argument(
        "--no-double-quant", action="store_true", help="keep fp32 absmax (no 8-bit double quantization)"
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=None,
        metavar="MODULE",
        help="module left in 16 bits (repeatable; default lm_head; embeddings and norms always stay)",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-tensor progress")


def run(args: argparse.Namespace) -> int:
    summary = json.loads(
        _native.quantize_checkpoint_dir(
            args.input,
            args.output,
            blocksize=args.blocksize,
            quant_type=args.quant_type,
            double_quant=not args.no_double_quant,
            skip=args.skip,
            progress=not args.quiet,
        )
    )
    print(
        f"wrote {args.output}: {summary['quantized_tensors']} tensors in 4 bits, "
        f"{summary['kept_tensors']} kept, {summary['input_bytes'] / 1e6:.1f} MB -> "
        f"{summary['output_bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f} s"
    )
    return 0

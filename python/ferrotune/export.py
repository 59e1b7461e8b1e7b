"""`ferrotune export MODEL OUT --format gguf --dtype f16|bf16|q8_0`: a Hugging Face Llama-family
model folder (Llama, Mistral: llama.cpp's `llama` architecture; Qwen2, Qwen3: its `qwen2` and
`qwen3`) as one GGUF v3 file for llama.cpp and the tools built on it.

The writer is native (`rust/src/merge/gguf.rs`): tensors renamed to llama.cpp's names
(`token_embd`, `blk.N.attn_q`, ..., `output`), q/k rows permuted for the `llama` architecture's
rotary layout,
norms kept in F32, the other tensors stored as F16, BF16 or Q8_0 (blocks of 32: f16 scale +
32 int8), 32-byte aligned, with the hyperparameters, the tokenizer (a byte-level BPE tokenizer.json
as llama.cpp's "gpt2" model, or a SentencePiece tokenizer.model as its "llama" model), the special
token ids and the chat template as metadata.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ferrotune import _native


def export_gguf(
    model: str | os.PathLike[str], out: str | os.PathLike[str], *, dtype: str = "f16", progress: bool = False
) -> dict[str, Any]:
    """Writes the model folder `model` as the GGUF file `out`; returns `tensors`, `bytes`, `seconds`."""
    return _native.export_gguf(os.fspath(model), os.fspath(out), dtype=dtype, progress=progress)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face model folder (llama, mistral, qwen2 or qwen3)")
    parser.add_argument("out", help="output file (e.g. model-q8_0.gguf)")
    parser.add_argument("--format", default="gguf", choices=["gguf"], help="output format")
    parser.add_argument(
        "--dtype", default="f16", choices=["f16", "bf16", "q8_0"], help="type of the matrices"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    summary = export_gguf(args.model, args.out, dtype=args.dtype, progress=not args.quiet)
    print(
        f"wrote {args.out}: {summary['tensors']} tensors, {summary['bytes'] / 1e9:.3f} GB ({args.dtype}) "
        f"in {summary['seconds']:.2f} s",
        file=sys.stdout,
    )
    return 0

"""`ferrotune COMMAND ...`: the command line. Each command lives in its own module, which
defines `add_arguments(parser)` and `run(args) -> int`; it is imported only when used, so
`ferrotune --help` and `--version` start fast."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> (module, one-line summary). Modules register here, nothing else.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("ferrotune.data.prepare", "tokenize, mask and pack JSONL into training shards"),
    "train": ("ferrotune.train.run", "train from a TOML config: pretrain or sft, full fine-tuning"),
    "generate": ("ferrotune.models.generate", "continue prompts with a trained model (KV cache)"),
    "quickstart": (
        "ferrotune.quickstart",
        "tokenizer + tiny model, pretraining, SFT, eval: the whole job on a CPU",
    ),
    "merge": ("ferrotune.merge", "merge a PEFT LoRA adapter into a Hugging Face model"),
    "combine": ("ferrotune.combine", "combine LoRA adapters (linear, TIES, DARE, SVD) into one"),
    "extract": ("ferrotune.extract", "extract a LoRA from a fine-tuned model and its base"),
    "export": ("ferrotune.export", "export a model to GGUF (F16, BF16, Q8_0) for llama.cpp"),
    "quantize": ("ferrotune.quant.command", "quantize a checkpoint to bitsandbytes 4-bit (NF4/FP4)"),
}


def _version() -> str:
    from ferrotune._native import __version__

    return __version__


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<12}{summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="ferrotune",
        description="Fine-tune large language models.",
        epilog=f"commands:\n{lines}\n\nRun `ferrotune COMMAND --help` for a command's options."
        if COMMANDS
        else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ferrotune {_version()}")
    parser.add_argument("command", nargs="?", choices=sorted(COMMANDS), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        parser.parse_args(argv[:1])  # --help, --version, or an error naming the bad command
        parser.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"ferrotune {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        code = int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if _launched_by_torchrun():
        _leave_without_teardown(code)
    return code


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ


def _leave_without_teardown(code: int) -> None:
    """A torchrun rank whose work is done (outputs written and closed, process group left) exits
    at once: gloo's background threads have been seen to abort in the interpreter's teardown
    ("terminate called without an active exception"), turning a finished run into a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())

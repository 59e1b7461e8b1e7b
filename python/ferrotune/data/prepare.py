"""`ferrotune prepare`: JSONL files to packed, tokenized shards (the work runs in Rust on every
core; this module parses options, shows progress and prints the summary).

    ferrotune prepare data/*.jsonl.gz --tokenizer path/to/model --out prepared/ --seq-len 4096
    ferrotune prepare --mix mix.toml --tokenizer path/to/model --out prepared/   # a mixture

A mixture (`--mix`, see `ferrotune.data.mix`) samples several sources into one folder whose shards
also carry each token's task (`task_ids`); the summary reports each task's target and realised
shares of examples and tokens.

Ctrl-C stops the run and removes everything it had written.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from ferrotune import _native
from ferrotune.errors import Cancelled, ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", help="JSONL files or globs (.jsonl.gz is decompressed)")
    parser.add_argument(
        "--mix", help="a mixture file (TOML or JSON: sources, weights, mixing rule) instead of inputs"
    )
    parser.add_argument(
        "--split",
        default="train",
        choices=["train", "eval"],
        help="with --mix and a holdout: the sampled mixture (train) or the held-out examples (eval)",
    )
    parser.add_argument(
        "--tokenizer", required=True, help="folder with tokenizer.json (+ tokenizer_config.json)"
    )
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per packed row (default 2048)")
    parser.add_argument(
        "--format",
        default="auto",
        choices=["auto", "text", "chat", "prompt_completion", "preference"],
        help="input shape (default: detected per line)",
    )
    parser.add_argument(
        "--loss",
        default="auto",
        choices=["auto", "all", "assistant", "completion"],
        help="tokens that take loss (auto: all for text, assistant for chat, completion otherwise)",
    )
    parser.add_argument("--packing", default="bfd", choices=["bfd", "greedy", "none"])
    parser.add_argument(
        "--overlong",
        default="split",
        choices=["split", "truncate", "drop"],
        help="documents longer than --seq-len (default split; pairs are truncated)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-bad", action="store_true", help="skip malformed lines, report them")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--chat-template", help="a Jinja file replacing the tokenizer's template")
    parser.add_argument("--eos-token", help="EOS token text when the tokenizer config names none")
    parser.add_argument("--rows-per-shard", type=int, default=0, help="default: about 64 MB per shard")
    parser.add_argument("--window-tokens", type=int, default=4 << 20, help="BFD window (bounds memory)")
    parser.add_argument("--threads", type=int, default=0, help="worker threads (default: all cores)")
    for field in ("text", "messages", "prompt", "completion", "chosen", "rejected", "role", "content"):
        parser.add_argument(f"--{field}-field", default=field, help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    fields = ("text", "messages", "prompt", "completion", "chosen", "rejected", "role", "content")
    config: dict[str, Any] = {
        "inputs": list(args.inputs),
        "output": args.out,
        "tokenizer": args.tokenizer,
        "format": args.format,
        "loss": args.loss,
        "seq_len": args.seq_len,
        "packing": args.packing,
        "overlong": args.overlong,
        "seed": args.seed,
        "skip_bad": args.skip_bad,
        "overwrite": args.overwrite,
        "chat_template": args.chat_template,
        "eos_token": args.eos_token,
        "rows_per_shard": args.rows_per_shard,
        "window_tokens": args.window_tokens,
        "threads": args.threads,
    }
    for f in fields:
        config[f"{f}_field"] = getattr(args, f"{f}_field")
    mix_file = getattr(args, "mix", None)
    if mix_file and args.inputs:
        raise ConfigError("give input files or --mix, not both (a mixture names its files)")
    if not mix_file and not args.inputs:
        raise ConfigError("no input files (give JSONL files or globs, or --mix mix.toml)")
    if mix_file:
        from ferrotune.data.mix import load_mixture, native_mixture

        config["inputs"] = []
        config["mixture"] = native_mixture(load_mixture(mix_file), getattr(args, "split", "train"))
    return config


def prepare(config: dict[str, Any], *, progress: bool = True) -> dict[str, Any]:
    """Runs `prepare` with `config` (the keys of `config_from_args`); returns the summary.
    Shows a progress line on stderr; Ctrl-C cancels cleanly (raises KeyboardInterrupt)."""
    job = _native.PrepareJob(json.dumps(config))
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            outcome["summary"] = job.run()
        except BaseException as e:
            outcome["error"] = e
        finally:
            done.set()

    # Waiting on an Event, not Thread.join: a join interrupted by Ctrl-C can return early on the
    # next call (CPython < 3.13), and the native job must finish its cleanup before we exit.
    thread = threading.Thread(target=work, name="ferrotune-prepare", daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        while not done.wait(0.5):
            if progress:
                _show_progress(job.progress(), time.monotonic() - started)
    except KeyboardInterrupt:
        job.cancel()
        while not done.wait(0.1):
            pass
        if progress:
            print(file=sys.stderr)
        raise
    if progress:
        _show_progress(job.progress(), time.monotonic() - started)
        print(file=sys.stderr)
    if "error" in outcome:
        raise outcome["error"]
    return json.loads(outcome["summary"])


def _show_progress(p: dict[str, int], elapsed: float) -> None:
    done = p["bytes_read"] / p["total_bytes"] if p["total_bytes"] else 0.0
    eta = elapsed * (1 - done) / done if done > 0 else float("nan")
    rate = p["tokens"] / elapsed if elapsed > 0 else 0.0
    bad = f" | {p['bad_lines']:,} bad" if p["bad_lines"] else ""
    print(
        f"\r{100 * done:5.1f}% | {p['documents']:,} documents | {p['tokens'] / 1e6:,.1f} M tokens "
        f"| {rate / 1e6:.2f} M tok/s | {p['rows']:,} rows{bad} | ETA {_seconds(eta)}   ",
        end="",
        file=sys.stderr,
        flush=True,
    )


def _seconds(s: float) -> str:
    if s != s:  # NaN
        return "--"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f} min"


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable end-of-run report."""
    m = summary["manifest"]
    lines = [
        f"prepared {summary['output']} in {summary['seconds']:.1f}s "
        f"({summary['tokens_per_second'] / 1e6:.2f} M tokens/s"
        + (", fast encoder" if summary["fast_encoder"] else "")
        + ")",
        f"  {m['kind']} data, {m['documents']:,} documents, {m['tokens']:,} tokens "
        f"({m['trained_tokens']:,} trained)",
        f"  {m['rows']:,} rows of {m['seq_len']} ({m['packing']} packing; lower bound {m['rows_lower_bound']:,}), "
        f"packing efficiency {100 * m['packing_efficiency']:.2f}%, {len(m['shards'])} shard(s)",
    ]
    dropped = []
    for key, label in (
        ("split", "split"),
        ("truncated", "truncated"),
        ("dropped", "dropped"),
        ("empty", "empty (skipped)"),
        ("no_trained_tokens", "without trained tokens (skipped)"),
        ("bad_lines", "bad lines (skipped)"),
    ):
        if m[key]:
            dropped.append(f"{m[key]:,} {label}")
    if dropped:
        lines.append("  over-long/skipped: " + ", ".join(dropped) + f"; {m['tokens_lost']:,} tokens lost")
    if m.get("mixture"):
        from ferrotune.data.mix import format_mixture

        lines.extend(format_mixture(m["mixture"]))
    elif len(m["sources"]) > 1:
        for s in m["sources"]:
            lines.append(f"  {s['path']}: {s['documents']:,} documents, {s['tokens']:,} tokens")
    if summary.get("bad_lines_report") and m["bad_lines"]:
        lines.append(f"  bad lines listed in {summary['bad_lines_report']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        summary = prepare(config_from_args(args), progress=not args.quiet)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Cancelled:
        print("cancelled; nothing was written", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0

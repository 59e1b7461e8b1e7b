#!/usr/bin/env python3
"""`ferrotune prepare` against the peer (HF tokenizers encode_batch + datasets + TRL bfd_split),
end to end on the corpus of ../shared/bench/make_corpus.py, in the same run.

Each measurement runs in a fresh process (so peak RSS is its own), ours and the peer's
alternating --reps times. Prints ONE JSON line:
  {"bench": "prepare", "figures": {"ours": {...}, "peer": {...}}, "speedup": ..., ...}
with, per side, e2e seconds, tokens, tokens/s, packed rows (and the lower bound), padding fraction
and peak RSS (MiB). Ours reads raw.jsonl, tokenizes with the `tokenizers` crate (or the fast
encoder when wired in), packs with windowed best-fit-decreasing and WRITES the shards to disk; the
peer keeps its packed Arrow table in memory.

    python bench/prepare_bench.py --data /tmp/bench_data --peer-python /tmp/peervenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_SCRIPT = os.environ.get("PACK_PEER", "/work/shared/bench/pack_peer.py")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def ours_phase(args: argparse.Namespace) -> None:
    """One run of ours in this (fresh) process; prints a JSON line."""
    from ferrotune.data.prepare import prepare

    out = os.path.join(args.tmp, f"ft_prepare_bench_{os.getpid()}")
    config = {
        "inputs": [os.path.join(args.data, "raw.jsonl")],
        "output": out,
        "tokenizer": args.data,
        "seq_len": args.seq_len,
        "eos_token": "<|endoftext|>",
        "window_tokens": args.window_tokens,
    }
    t0 = time.perf_counter()
    summary = prepare(config, progress=False)
    elapsed = time.perf_counter() - t0
    m = summary["manifest"]
    shutil.rmtree(out, ignore_errors=True)
    print(
        json.dumps(
            {
                "e2e_s": elapsed,
                "tokens": m["tokens"],
                "e2e_tok_per_s": m["tokens"] / elapsed,
                "packed_rows": m["rows"],
                "rows_lower_bound": m["rows_lower_bound"],
                "padding_fraction": 1 - m["packing_efficiency"],
                "documents": m["documents"],
                "split": m["split"],
                "fast_encoder": summary["fast_encoder"],
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def aggregate(runs: list[dict]) -> dict:
    agg: dict = {"n": len(runs)}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            agg[key] = statistics.median(values)
            if key in ("e2e_s", "e2e_tok_per_s", "peak_rss_mb"):
                agg[key + "_range"] = [min(values), max(values)]
        else:
            agg[key] = values[0]
    return agg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/bench_data")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--window-tokens", type=int, default=4 << 20)
    ap.add_argument("--peer-python", default="/tmp/peervenv/bin/python", help="'' skips the peer")
    ap.add_argument("--peer-global", action="store_true", help="also the peer's global BFD row count")
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase == "ours":
        ours_phase(args)
        return
    ours_cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--phase",
        "ours",
        "--data",
        args.data,
        "--seq-len",
        str(args.seq_len),
        "--window-tokens",
        str(args.window_tokens),
        "--tmp",
        args.tmp,
    ]
    peer_cmd = [
        args.peer_python,
        PEER_SCRIPT,
        "--phase",
        "e2e",
        "--data",
        args.data,
        "--seq-len",
        str(args.seq_len),
        "--tmp",
        args.tmp,
    ]
    ours, peer = [], []
    t0 = time.time()
    for rep in range(args.reps):
        ours.append(run_json(ours_cmd))
        print(f"rep {rep} ours: {json.dumps(ours[-1])}", file=sys.stderr, flush=True)
        if args.peer_python:
            peer.append(run_json(peer_cmd))
            print(f"rep {rep} peer: {json.dumps(peer[-1])}", file=sys.stderr, flush=True)
    result: dict = {
        "bench": "prepare",
        "seq_len": args.seq_len,
        "reps": args.reps,
        "data": args.data,
        "nproc": os.cpu_count(),
        "loadavg_start_end": None,
        "figures": {"ours": aggregate(ours)},
    }
    if peer:
        result["figures"]["peer"] = aggregate(peer)
        result["speedup"] = (
            result["figures"]["ours"]["e2e_tok_per_s"] / result["figures"]["peer"]["e2e_tok_per_s"]
        )
        # same-rep ratios are the fairer figure on a shared, noisy machine
        result["speedup_per_rep"] = [
            o["e2e_tok_per_s"] / p["e2e_tok_per_s"] for o, p in zip(ours, peer, strict=True)
        ]
    if args.peer_global and args.peer_python:
        run_json([args.peer_python, PEER_SCRIPT, "--phase", "prepare", "--data", args.data])
        g = run_json(
            [
                args.peer_python,
                PEER_SCRIPT,
                "--phase",
                "trl_bfd_split_global",
                "--data",
                args.data,
                "--seq-len",
                str(args.seq_len),
                "--tmp",
                args.tmp,
            ]
        )
        result["figures"]["peer_global_bfd_rows"] = g["packed_rows"]
    result["loadavg_start_end"] = os.getloadavg()
    result["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

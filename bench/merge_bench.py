#!/usr/bin/env python3
"""`ferrotune merge` beside the PEFT peer (`../shared/bench/merge_peer.py`) in the same run, on the
very same files: the peer's setup phase builds a random TinyLlama-1.1B-shaped bf16 model and a PEFT
LoRA r=16 all-linear adapter under DATA/base and DATA/adapter (reused when present).

Each rep, alternating peer and ours, each in a fresh interpreter with the same untimed preparation
(old outputs removed, os.sync(), base + adapter read once so the page cache is warm):
  peer: `merge_peer.py --phase merge` (PEFT load -> merge_and_unload -> save_pretrained) in VENV_PEER
  ours: `ferrotune merge DATA/base DATA/adapter DATA/ours` (its Python entry point, probe check
        included; `torch_imported` records whether torch was imported), and once more with --no-probe
Wall time of the whole process (interpreter start, imports, work), the peer's own in-process total,
and each process's peak RSS (VmHWM). Then the two merged models are compared tensor by tensor.

Usage: python bench/merge_bench.py --data /tmp/merge_data --peer-python /tmp/peervenv/bin/python
Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

PEER = "/work/shared/bench/merge_peer.py"


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def phase_ours(args: argparse.Namespace) -> None:
    """One merge through the CLI entry point, in this fresh interpreter."""
    started = time.perf_counter()
    from ferrotune.merge import merge_adapter

    summary = merge_adapter(
        os.path.join(args.data, "base"),
        os.path.join(args.data, "adapter"),
        os.path.join(args.data, "ours"),
        probe=not args.no_probe,
    )
    total = time.perf_counter() - started
    report = summary.get("probe")
    print(
        json.dumps(
            {
                "total_s": total,
                "native_merge_s": summary["seconds"],
                "probe_s": summary.get("probe_seconds", 0.0),
                "probe_divergence": report.divergence if report else None,
                "probe_relative": report.relative_divergence if report else None,
                "probe_adapter_effect": report.adapter_effect if report else None,
                "probe_engine": report.engine if report else None,
                "torch_imported": "torch" in sys.modules,
                "bytes_written": summary["bytes_written"],
                "peak_rss_mb": vm_hwm_mb(),
            }
        )
    )


def phase_compare(args: argparse.Namespace) -> None:
    """Our merged tensors against the peer's (PEFT rounds B@A to bf16 before adding; we round once)."""
    import torch
    from ferrotune.io import load_checkpoint

    ours = load_checkpoint(os.path.join(args.data, "ours"))
    peer = load_checkpoint(os.path.join(args.data, "merged"))
    assert sorted(ours) == sorted(peer), "tensor names differ"
    mismatched = total = 0
    max_diff = 0.0
    for name in peer:
        a, b = ours[name], peer[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        mismatched += int((a != b).sum())
        total += a.numel()
        max_diff = max(max_diff, float((a.float() - b.float()).abs().max()))
    print(
        json.dumps(
            {
                "tensors": len(peer),
                "elements_differing": mismatched,
                "elements": total,
                "fraction_differing": mismatched / total,
                "max_abs_diff": max_diff,
                "torch": torch.__version__,
            }
        )
    )


def prepare(data: str, outputs: tuple[str, ...]) -> None:
    """Untimed, before every run: outputs removed, dirty pages flushed, inputs in the page cache."""
    for out in outputs:
        shutil.rmtree(os.path.join(data, out), ignore_errors=True)
    os.sync()
    for sub in ("base", "adapter"):
        folder = os.path.join(data, sub)
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def timed(cmd: list[str]) -> tuple[float, dict]:
    started = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-5000:])
        raise RuntimeError(f"{cmd[:3]} failed with rc={p.returncode}")
    line = [x for x in p.stdout.splitlines() if x.startswith("{")][-1]
    return wall, json.loads(line)


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        else:
            out[key] = values[0]
    return out


def driver(args: argparse.Namespace) -> None:
    if not os.path.exists(os.path.join(args.data, "adapter", "adapter_model.safetensors")):
        subprocess.run(
            [args.peer_python, args.peer_script, "--phase", "setup", "--data", args.data], check=True
        )
    me = os.path.abspath(__file__)
    peer_runs, ours_runs, ours_noprobe_runs = [], [], []
    for rep in range(args.reps):
        prepare(args.data, ("merged", "ours"))
        wall, r = timed([args.peer_python, args.peer_script, "--phase", "merge", "--data", args.data])
        peer_runs.append({"wall_s": wall, **r})
        print(f"rep {rep} peer: {json.dumps(peer_runs[-1])}", file=sys.stderr, flush=True)
        ours_variants = [(ours_runs, []), (ours_noprobe_runs, ["--no-probe"])]
        # alternate which of our two runs follows the peer (the first one shares the machine with
        # the peer's late writeback)
        for runs, extra in ours_variants if rep % 2 == 0 else ours_variants[::-1]:
            prepare(args.data, ("ours",))
            wall, r = timed([sys.executable, me, "--phase", "ours", "--data", args.data, *extra])
            runs.append({"wall_s": wall, **r})
            print(f"rep {rep} ours{extra}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    _, compare = timed([sys.executable, me, "--phase", "compare", "--data", args.data])
    peer, ours, noprobe = summarize(peer_runs), summarize(ours_runs), summarize(ours_noprobe_runs)
    result = {
        "bench": "merge",
        "reps": args.reps,
        "peer": peer,
        "ours": ours,
        "ours_no_probe": noprobe,
        "speedup_wall": peer["wall_s"]["median"] / ours["wall_s"]["median"],
        "speedup_wall_no_probe": peer["wall_s"]["median"] / noprobe["wall_s"]["median"],
        "speedup_vs_peer_in_process_total": peer["total_s"]["median"] / ours["wall_s"]["median"],
        "rss_ratio": ours["peak_rss_mb"]["median"] / peer["peak_rss_mb"]["median"],
        "rss_ratio_no_probe": noprobe["peak_rss_mb"]["median"] / peer["peak_rss_mb"]["median"],
        "compare_with_peer_output": compare,
        "nproc": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
    }
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/merge_data")
    ap.add_argument("--peer-python", default="/tmp/peervenv/bin/python")
    ap.add_argument("--peer-script", default=PEER)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase == "ours":
        phase_ours(args)
    elif args.phase == "compare":
        phase_compare(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()

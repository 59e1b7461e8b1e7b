#!/usr/bin/env python3
"""Fast BPE encoder vs HF tokenizers on the whole benchmark corpus, in the same run.

Encodes every document of `raw.jsonl` (from ../shared/bench/make_corpus.py) with HF
`Tokenizer.encode_batch` and with `ferrotune._native.FastBpe.encode_batch_flat`, asserts that every
document's ids are identical, and prints one JSON line with tokens/s for both (best of --reps,
each timed from Python strings in to ids out; ids exclude BOS/EOS). Also reported: CPU seconds
(user + system of the process), since wall time on a shared machine depends on its load.

    python bench/bpe_bench.py --data /tmp/corpus [--tokenizer PATH] [--reps 3]

--family llama3|qwen2 instead trains a 32k tokenizer of that family (Llama 3 split regex with
ignore_merges, or NFC + Qwen2 regex) on the first 12 MB of the corpus, as make_corpus.py trains
its GPT-2 style one. --chatml encodes chat.jsonl rendered as ChatML text, so special tokens sit
inside every document.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def read_texts(path: str, field: str, limit: int | None) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)[field])
            if limit and len(texts) >= limit:
                break
    return texts


def read_chatml(path: str, limit: int | None) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            messages = json.loads(line)["messages"]
            texts.append("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages))
            if limit and len(texts) >= limit:
                break
    return texts


def train_family(family: str, raw_path: str, out_path: str):
    """A 32k byte-level BPE of `family`, trained like make_corpus.py trains its tokenizer."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import bpe_builders

    pattern = {"llama3": bpe_builders.LLAMA3_PATTERN, "qwen2": bpe_builders.QWEN2_PATTERN}[family]
    tok = Tokenizer(models.BPE(ignore_merges=family == "llama3"))
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=32000,
        min_frequency=2,
        special_tokens=["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(read_texts(raw_path, "text", None)[:1600], trainer=trainer)
    data = json.loads(tok.to_str())
    data["model"]["ignore_merges"] = family == "llama3"
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/corpus", help="make_corpus.py output folder")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: DATA/tokenizer.json)")
    ap.add_argument("--file", default="raw.jsonl")
    ap.add_argument("--field", default="text")
    ap.add_argument("--limit", type=int, default=None, help="only the first N documents")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--family", choices=["llama3", "qwen2"], default=None, help="train this tokenizer family")
    ap.add_argument("--chatml", action="store_true", help="encode chat.jsonl rendered as ChatML")
    args = ap.parse_args()

    import numpy as np
    import torch
    from ferrotune._native import FastBpe
    from tokenizers import Tokenizer

    tok_path = args.tokenizer or os.path.join(args.data, "tokenizer.json")
    if args.family:
        tok_path = os.path.join(args.data, f"tokenizer_{args.family}.json")
        if not os.path.exists(tok_path):
            train_family(args.family, os.path.join(args.data, "raw.jsonl"), tok_path)
    if args.chatml:
        texts = read_chatml(os.path.join(args.data, "chat.jsonl"), args.limit)
    else:
        texts = read_texts(os.path.join(args.data, args.file), args.field, args.limit)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"{len(texts)} documents, {n_bytes / 1e6:.1f} MB", file=sys.stderr)

    hf = Tokenizer.from_file(tok_path)
    fast = FastBpe.from_file(tok_path)
    if fast is None:
        print(json.dumps({"bench": "bpe", "error": f"{tok_path}: not supported by FastBpe"}))
        return 1

    hf_times, fast_times, hf_cpu, fast_cpu = [], [], [], []
    hf_ids: list[list[int]] = []
    for rep in range(args.reps):
        c0, t0 = time.process_time(), time.perf_counter()
        hf_ids = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
        hf_times.append(time.perf_counter() - t0)
        hf_cpu.append(time.process_time() - c0)
        c0, t0 = time.process_time(), time.perf_counter()
        ids_t, offsets_t = fast.encode_batch_flat(texts)
        fast_times.append(time.perf_counter() - t0)
        fast_cpu.append(time.process_time() - c0)
        print(
            f"rep {rep}: hf {hf_times[-1]:.2f} s (cpu {hf_cpu[-1]:.2f} s), "
            f"fast {fast_times[-1]:.2f} s (cpu {fast_cpu[-1]:.2f} s)",
            file=sys.stderr,
        )

    # Every document, token for token.
    ids = torch.from_dlpack(ids_t).numpy().astype(np.int64)
    offsets = torch.from_dlpack(offsets_t).numpy()
    n_tokens = int(offsets[-1])
    assert n_tokens == sum(len(x) for x in hf_ids), "total token counts differ"
    hf_flat = np.fromiter((t for x in hf_ids for t in x), dtype=np.int64, count=n_tokens)
    hf_offsets = np.concatenate([[0], np.cumsum([len(x) for x in hf_ids])])
    mismatched = [i for i in range(len(texts)) if hf_offsets[i + 1] != offsets[i + 1]]
    if not mismatched:
        diff = np.nonzero(hf_flat != ids)[0]
        mismatched = sorted({int(np.searchsorted(offsets, d, side="right") - 1) for d in diff[:100]})
    identical = not mismatched
    hf_best, fast_best = min(hf_times), min(fast_times)
    out = {
        "bench": "bpe",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_commit(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "tokenizer": tok_path,
        "text": "chat.jsonl as ChatML" if args.chatml else args.file,
        "load_average_1min": round(os.getloadavg()[0], 1),
        "documents": len(texts),
        "text_mb": round(n_bytes / 1e6, 2),
        "tokens": n_tokens,
        "identical_ids_all_documents": identical,
        "first_mismatched_documents": mismatched[:10],
        "hf_encode_batch_s": round(hf_best, 3),
        "hf_tokens_per_s": round(n_tokens / hf_best),
        "fast_encode_batch_s": round(fast_best, 3),
        "fast_tokens_per_s": round(n_tokens / fast_best),
        "speedup": round(hf_best / fast_best, 2),
        "hf_cpu_s": round(min(hf_cpu), 3),
        "hf_tokens_per_cpu_s": round(n_tokens / min(hf_cpu)),
        "fast_cpu_s": round(min(fast_cpu), 3),
        "fast_tokens_per_cpu_s": round(n_tokens / min(fast_cpu)),
        "reps": args.reps,
    }
    print(json.dumps(out))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())

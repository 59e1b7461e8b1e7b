"""Peak memory of `prepare` does not grow with the corpus: with the pipeline bounded to a few MB
(64 KB line batches, a 32k-token packing window, 64-row shards), a corpus 12x larger, whose
packed output (~70 MB) is far above that bound, must not raise the peak RSS by more than 20 MB."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = [f"w{i}" for i in range(500)]


def write_corpus(path: Path, megabytes: float) -> int:
    line_words = [" ".join(WORDS[(d * 31 + k * 7) % 500] for k in range(40 + d % 300)) for d in range(97)]
    lines = [json.dumps({"text": t}) + "\n" for t in line_words]
    size, n = 0, 0
    with open(path, "w") as f:
        while size < megabytes * 1e6:
            line = lines[n % len(lines)]
            f.write(line)
            size += len(line)
            n += 1
    return n


def peak_rss_of_prepare(corpus: Path, tok: Path, out: Path) -> dict:
    code = textwrap.dedent(
        f"""
        import json
        from ferrotune.data.prepare import prepare
        s = prepare({{"inputs": [{str(corpus)!r}], "output": {str(out)!r}, "tokenizer": {str(tok)!r},
                     "seq_len": 256, "window_tokens": 32768, "batch_bytes": 65536, "rows_per_shard": 64,
                     "max_carried_rows": 64, "eos_token": "[EOS]"}}, progress=False)
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
        print(json.dumps({{"peak_mb": int(hwm) / 1024, "tokens": s["manifest"]["tokens"]}}))
        """
    )
    out_text = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True
    )
    return json.loads(out_text.stdout.strip().splitlines()[-1])


def test_peak_rss_does_not_grow_with_corpus_size(tmp_path):
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    write_corpus(tmp_path / "small.jsonl", 2)
    write_corpus(tmp_path / "large.jsonl", 24)
    small = peak_rss_of_prepare(tmp_path / "small.jsonl", tmp_path / "tok", tmp_path / "out_small")
    large = peak_rss_of_prepare(tmp_path / "large.jsonl", tmp_path / "tok", tmp_path / "out_large")
    output_mb = sum(p.stat().st_size for p in (tmp_path / "out_large").iterdir()) / 2**20
    assert large["tokens"] > 10 * small["tokens"]
    assert output_mb > 60, output_mb  # what an unbounded pipeline would have had to hold
    assert large["peak_mb"] - small["peak_mb"] < 20, (small, large)

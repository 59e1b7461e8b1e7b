"""`ferrotune prepare` end to end: shards and manifest, packing modes, masks through the whole
pipeline, PackedDataset (zero-copy, shuffle, rank split, resume) and collate, bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ferrotune import _native
from ferrotune.data import PackedDataset, batches, collate, load_manifest
from ferrotune.data.prepare import prepare
from ferrotune.errors import FormatError
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_data_templates import make_tokenizer_dir

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "happy",
    "cats",
    "sleep",
    "near",
    "warm",
    "fires",
]


def text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"), "qwen2_5")


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def run_prepare(tok_dir: Path, inputs: list[Path | str], out: Path, **kw) -> dict:
    config = {
        "inputs": [str(p) for p in inputs],
        "output": str(out),
        "tokenizer": str(tok_dir),
        "seq_len": 64,
    }
    config.update(kw)
    return prepare(config, progress=False)


def rows_of(path: Path) -> list[dict[str, torch.Tensor]]:
    ds = PackedDataset(path, shuffle=False)
    return [ds[i] for i in range(len(ds))]


def documents(row: dict[str, torch.Tensor], prefix: str = "") -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each document of a row, from its document ids."""
    docs = row[prefix + "document_ids"]
    out = []
    for d in range(int(docs.max()) + 1):
        sel = docs == d
        assert row[prefix + "position_ids"][sel].tolist() == list(range(int(sel.sum())))
        out.append((row[prefix + "input_ids"][sel].tolist(), row[prefix + "labels"][sel].tolist()))
    return out


def test_raw_text_rows_hold_every_document_exactly(tok_dir, tmp_path):
    texts = [text(i, 3 + (i * 13) % 40) for i in range(60)]
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:30]])
    src2 = write_jsonl(tmp_path / "b.jsonl.gz", [{"text": t} for t in texts[30:]], gz=True)
    summary = run_prepare(tok_dir, [tmp_path / "*.jsonl*"], tmp_path / "out", rows_per_shard=4, seq_len=256)
    m = load_manifest(tmp_path / "out")
    assert summary["manifest"]["rows"] == m["rows"] and len(m["shards"]) > 1
    assert [s["documents"] for s in m["sources"]] == [30, 30]
    assert m["sources"][0]["path"] == str(src) and m["sources"][1]["path"] == str(src2)
    ref = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos = ref.token_to_id("<|im_end|>")
    want = sorted(tuple([*ref.encode(t).ids, eos]) for t in texts)
    got = []
    for row in rows_of(tmp_path / "out"):
        for ids, labels in documents(row):
            assert labels == [*ids[1:], -100]  # raw text: every next token, nothing across documents
            got.append(tuple(ids))
        pad = row["document_ids"] == -1
        assert (row["labels"][pad] == -100).all() and (row["position_ids"][pad] == 0).all()
    assert sorted(got) == want
    assert m["tokens"] == sum(len(w) for w in want)
    assert m["rows"] <= m["rows_lower_bound"] + 1
    assert m["split"] == 0
    assert m["packing_efficiency"] == pytest.approx(m["tokens"] / (m["rows"] * 256))


def test_deterministic_for_a_seed_and_any_thread_count(tok_dir, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": text(i, 5 + i % 50)} for i in range(200)])
    common = {"rows_per_shard": 8, "window_tokens": 512}
    run_prepare(tok_dir, [src], tmp_path / "a", seed=3, threads=1, **common)
    run_prepare(tok_dir, [src], tmp_path / "b", seed=3, threads=2, **common)
    run_prepare(tok_dir, [src], tmp_path / "c", seed=4, **common)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / files[0]).read_bytes() != (tmp_path / "c" / files[0]).read_bytes()


def test_overlong_policies_and_packing_modes(tok_dir, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": text(i, 150 if i % 5 == 0 else 10)} for i in range(20)])
    split = run_prepare(tok_dir, [src], tmp_path / "split")["manifest"]
    trunc = run_prepare(tok_dir, [src], tmp_path / "trunc", overlong="truncate")["manifest"]
    drop = run_prepare(tok_dir, [src], tmp_path / "drop", overlong="drop")["manifest"]
    greedy = run_prepare(tok_dir, [src], tmp_path / "greedy", packing="greedy")["manifest"]
    none = run_prepare(tok_dir, [src], tmp_path / "none", packing="none")["manifest"]
    total = split["sources"][0]["tokens"]
    assert split["split"] == 4 and split["tokens"] == total and split["tokens_lost"] == 0
    assert trunc["truncated"] == 4 and trunc["tokens"] == total - trunc["tokens_lost"] > 0
    assert drop["dropped"] == 4 and drop["documents"] == 16
    assert greedy["tokens"] == total and greedy["rows"] == -(-total // 64)
    assert none["rows"] == none["documents"]
    for row in rows_of(tmp_path / "greedy")[:-1]:
        assert (row["document_ids"] >= 0).all()  # every greedy row but the last is full


def test_chat_and_prompt_completion_masks_through_the_pipeline(tok_dir, tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi dog"}, {"role": "assistant", "content": "the cat"}]}
    pc = {"prompt": "the quick", "completion": " brown fox"}
    src = write_jsonl(tmp_path / "a.jsonl", [chat, pc])
    run_prepare(tok_dir, [src], tmp_path / "out", packing="none", seq_len=256)
    ours = _native.DataTokenizer(str(tok_dir))
    want = {
        tuple(ours.encode_line(json.dumps(r))[0][0]): ours.encode_line(json.dumps(r))[0][1]
        for r in (chat, pc)
    }
    rows = rows_of(tmp_path / "out")
    assert len(rows) == 2
    for row in rows:
        ((ids, labels),) = documents(row)
        assert labels == want[tuple(ids)]
    hf = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    for ids, labels in want.items():
        trained = [ids[t + 1] for t in range(len(ids) - 1) if labels[t] != -100]
        assert hf.decode(trained, skip_special_tokens=False) in ("the cat<|im_end|>", " brown fox<|im_end|>")


def test_preference_pairs_stay_together(tok_dir, tmp_path):
    rows = [
        {"prompt": f"q {text(i, 3)}", "chosen": f" {text(i, 2 + i % 9)}", "rejected": f" {text(i + 1, 4)}"}
        for i in range(30)
    ]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    m = run_prepare(tok_dir, [src], tmp_path / "out")["manifest"]
    assert m["kind"] == "preference" and m["lanes"] == ["chosen_", "rejected_"]
    ours = _native.DataTokenizer(str(tok_dir))
    want = {
        tuple(ours.encode_line(json.dumps(r))[0][0]): tuple(ours.encode_line(json.dumps(r))[1][0])
        for r in rows
    }
    seen = 0
    ds = PackedDataset(tmp_path / "out", shuffle=False)
    for row in ds:
        chosen, rejected = documents(row, "chosen_"), documents(row, "rejected_")
        assert len(chosen) == len(rejected)
        for (c, _), (r, _) in zip(chosen, rejected, strict=True):
            assert want[tuple(c)] == tuple(r)
            seen += 1
    assert seen == 30
    batch = collate([ds[0], ds[1]])
    assert set(batch) == {
        p + f
        for p in ("chosen_", "rejected_")
        for f in ("input_ids", "labels", "position_ids", "document_ids")
    }


def test_packed_dataset_zero_copy_shuffle_ranks_resume(tok_dir, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": text(i, 20 + i % 30)} for i in range(120)])
    run_prepare(tok_dir, [src], tmp_path / "out", rows_per_shard=5)
    full = PackedDataset(tmp_path / "out", shuffle=False)
    n = full.total_rows
    assert n > 10
    # zero-copy: a row is a view of the memory-mapped shard
    row = full[0]
    assert row["input_ids"].dtype == torch.int32 and row["input_ids"].shape == (64,)
    assert row["input_ids"].untyped_storage().nbytes() >= 5 * 64 * 4
    a = [PackedDataset(tmp_path / "out", seed=1).global_index(i) for i in range(n)]
    b = [PackedDataset(tmp_path / "out", seed=1).global_index(i) for i in range(n)]
    c = [PackedDataset(tmp_path / "out", seed=2).global_index(i) for i in range(n)]
    assert a == b and a != c and sorted(a) == list(range(n))
    ranks = [PackedDataset(tmp_path / "out", seed=1, rank=r, world_size=3) for r in range(3)]
    assert all(len(d) == -(-n // 3) for d in ranks)  # equal steps on every rank
    shares = [{d.global_index(i) for i in range(len(d))} - {-1} for d in ranks]
    assert not (shares[0] & shares[1]) and not (shares[1] & shares[2]) and not (shares[0] & shares[2])
    assert set.union(*shares) == set(range(n))  # no row left out
    for d in ranks:  # a rank short of rows ends on a padding row that trains nothing
        if d.global_index(len(d) - 1) == -1:
            pad = d[len(d) - 1]
            assert (pad["labels"] == -100).all() and (pad["document_ids"] == -1).all()
    resumed = PackedDataset(tmp_path / "out", seed=1, rank=1, world_size=3, start_step=2, batch_size=2)
    assert [resumed.global_index(i) for i in range(len(resumed))] == [
        ranks[1].global_index(i) for i in range(4, len(ranks[1]))
    ]
    out = list(batches(full, 4))
    assert out[0]["input_ids"].shape == (4, 64) and out[0]["input_ids"].dtype == torch.int64
    assert out[0]["document_ids"].dtype == torch.int32
    assert sum(b["input_ids"].shape[0] for b in out) == n
    assert torch.equal(out[0]["labels"][1], full[1]["labels"].long())


def test_bad_lines_error_or_skip_with_report(tok_dir, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(
        '{"text": "the dog"}\n{"text": "the cat"}\n{"messages": [{"role": "user"}], "x": 1}\n{oops\n'
    )
    with pytest.raises(FormatError) as info:
        run_prepare(tok_dir, [src], tmp_path / "out")
    assert info.value.path == str(src) and info.value.place == "line 3, field messages"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # nothing half-written
    summary = run_prepare(tok_dir, [src], tmp_path / "out", skip_bad=True)
    assert summary["manifest"]["bad_lines"] == 2 and summary["manifest"]["documents"] == 2
    report = [json.loads(line) for line in (tmp_path / "out" / "bad_lines.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in report] == [(3, "messages"), (4, "(line)")]
    assert "invalid JSON" in report[1]["error"]
    src.write_text('{"text": 7}\n')
    with pytest.raises(FormatError, match=r"line 1, field text: must be a string"):
        run_prepare(tok_dir, [src], tmp_path / "out2")


def test_existing_output_needs_overwrite(tok_dir, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "the dog"}])
    run_prepare(tok_dir, [src], tmp_path / "out")
    with pytest.raises(ValueError, match="exists"):
        run_prepare(tok_dir, [src], tmp_path / "out")
    run_prepare(tok_dir, [src], tmp_path / "out", overwrite=True, seq_len=32)
    assert load_manifest(tmp_path / "out")["seq_len"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out"]


def test_cli_prints_progress_and_summary(tok_dir, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": text(i, 30)} for i in range(50)])
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ferrotune",
            "prepare",
            str(src),
            "--tokenizer",
            str(tok_dir),
            "--out",
            str(tmp_path / "out"),
            "--seq-len",
            "128",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "50 documents" in out.stdout and "packing efficiency" in out.stdout
    assert "tok/s" in out.stderr and "ETA" in out.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "ferrotune",
            "prepare",
            str(tmp_path / "missing.jsonl"),
            "--tokenizer",
            str(tok_dir),
            "--out",
            str(tmp_path / "o2"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "missing.jsonl" in bad.stderr


def test_dataloader_workers_reopen_the_shards(tok_dir, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": text(i, 20 + i % 30)} for i in range(40)])
    run_prepare(tok_dir, [src], tmp_path / "out")
    ds = PackedDataset(tmp_path / "out", seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate, num_workers=2)
    got = torch.cat([b["input_ids"] for b in loader])
    want = torch.stack([ds[i]["input_ids"] for i in range(len(ds))]).long()
    assert torch.equal(got, want)


def test_ctrl_c_leaves_nothing_behind(tmp_path):
    import signal
    import time

    from tokenizers import models, pre_tokenizers

    words = [f"w{i}" for i in range(300)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    line = json.dumps({"text": " ".join(words * 3)}) + "\n"
    (tmp_path / "big.jsonl").write_text(line * 40_000)  # ~ 100 MB: many seconds of work
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferrotune", "prepare", str(tmp_path / "big.jsonl"), "--tokenizer",
         str(tmp_path / "tok"), "--out", str(tmp_path / "out"), "--eos-token", "[UNK]"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # background shells ignore it
    )  # fmt: skip

    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "tok"]

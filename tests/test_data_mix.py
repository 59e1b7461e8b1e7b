"""Dataset mixtures end to end: `ferrotune prepare` with a mixture (weights, temperature, capped
proportional, epochs) on a three-source corpus of unequal sizes, realised shares against the
targets (computed here from the rule's formula), task ids of every packed token against the source
of its document, determinism, the `--mix` file and `[[data.sources]]` in a run config, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from ferrotune.config import load_config
from ferrotune.data import PackedDataset, collate
from ferrotune.data.prepare import prepare
from ferrotune.errors import ConfigError
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_data_templates import make_tokenizer_dir

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "cats"]
# (name, examples, words per example): unequal sizes and lengths, each source marked by its
# first word so a document's text tells which source it came from.
SOURCES = [("alpha", 5000, 4), ("bravo", 1000, 9), ("charlie", 200, 16)]
SEQ_LEN = 128
# Realised shares against the targets: the contract is 2 points; exact counts do much better on
# this corpus (measured: < 0.03 points), so half a point still catches any bias.
TOLERANCE = 0.005


def example(marker: str, i: int, n_words: int) -> str:
    """Unique per i: the digits of i in base len(WORDS) pick the first words."""
    words, k = [], i
    for _ in range(n_words):
        words.append(WORDS[k % len(WORDS)])
        k = k // len(WORDS) + 7 * len(words)
    return f"{marker} {i} " + " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    tok = make_tokenizer_dir(root / "tok", "qwen2_5")
    files = {}
    for name, n, words in SOURCES:
        path = root / f"{name}.jsonl"
        if name == "bravo":  # a chat source: its own format and (assistant-only) loss
            lines = [
                {
                    "messages": [
                        {"role": "user", "content": "say"},
                        {"role": "assistant", "content": example(name, i, words)},
                    ]
                }
                for i in range(n)
            ]
        else:
            lines = [{"text": example(name, i, words)} for i in range(n)]
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        files[name] = path
    return root, tok, files


def run_mix(corpus, out_name: str, mixing: str = "weights", sources: list[dict] | None = None, **kw) -> dict:
    root, tok, files = corpus
    if sources is None:
        sources = [{"name": name, "inputs": [str(files[name])]} for name, _, _ in SOURCES]
    for s in sources:
        if s["name"] == "bravo":
            s.setdefault("format", "chat")
            s.setdefault("loss", "assistant")
    config = {
        "inputs": [],
        "output": str(root / out_name),
        "tokenizer": str(tok),
        "seq_len": SEQ_LEN,
        "format": "text",
        "loss": "all",
        "overwrite": True,
        "mixture": {"mixing": mixing, "sources": sources, **kw},
    }
    return prepare(config, progress=False)


def documents_by_task(path: Path) -> tuple[list[tuple[int, tuple[int, ...], int]], list[str]]:
    """Every document in the shards as (task id, token ids, trained tokens), read from the rows."""
    ds = PackedDataset(path, shuffle=False)
    batch = collate([ds[i] for i in range(len(ds))])  # (R, T) each
    docs = []
    for ids, labels, doc_ids, task_ids in zip(
        batch["input_ids"], batch["labels"], batch["document_ids"], batch["task_ids"], strict=True
    ):
        for d in range(int(doc_ids.max()) + 1):
            sel = doc_ids == d
            tasks = task_ids[sel].unique().tolist()
            assert len(tasks) == 1, "one document, one task"
            docs.append((tasks[0], tuple(ids[sel].tolist()), int((labels[sel] != -100).sum())))
        assert (task_ids[doc_ids < 0] == -1).all(), "padding has task id -1"
    return docs, ds.task_names


def realised(docs) -> tuple[list[float], list[float], list[float]]:
    """Shares of documents, tokens and trained tokens per task."""
    n = len(SOURCES)
    count, tokens, trained = [0] * n, [0] * n, [0] * n
    for task, ids, t in docs:
        count[task] += 1
        tokens[task] += len(ids)
        trained[task] += t
    return (
        [c / sum(count) for c in count],
        [c / sum(tokens) for c in tokens],
        [c / sum(trained) for c in trained],
    )


def expected_token_shares(shares: list[float], summary: dict) -> list[float]:
    """p_i * mean_len_i / sum_j p_j * mean_len_j, mean lengths from the available examples."""
    tasks = summary["manifest"]["mixture"]["tasks"]
    means = [t["tokens_available"] / t["examples_available"] for t in tasks]
    norm = sum(p * m for p, m in zip(shares, means, strict=True))
    return [p * m / norm for p, m in zip(shares, means, strict=True)]


def check_shares(corpus, summary: dict, target: list[float]) -> list:
    root = Path(summary["output"])
    docs, names = documents_by_task(root)
    assert names == [name for name, _, _ in SOURCES]
    examples, tokens, trained = realised(docs)
    token_target = expected_token_shares(target, summary)
    for i, task in enumerate(summary["manifest"]["mixture"]["tasks"]):
        assert task["target_share"] == pytest.approx(target[i], abs=1e-9)
        assert abs(examples[i] - target[i]) < TOLERANCE, (task["name"], examples, target)
        assert abs(tokens[i] - token_target[i]) < TOLERANCE, (task["name"], tokens, token_target)
        # the report agrees with what the shards hold
        assert task["example_share"] == pytest.approx(examples[i], abs=1e-9)
        assert task["token_share"] == pytest.approx(tokens[i], abs=1e-9)
        assert task["trained_token_share"] == pytest.approx(trained[i], abs=1e-9)
        assert task["target_token_share"] == pytest.approx(token_target[i], abs=1e-9)
    return docs


SIZES = [n for _, n, _ in SOURCES]


def test_weights_match_targets_and_task_ids_match_sources(corpus):
    summary = run_mix(corpus, "weights", "weights", mix_total=4000, sources=None)
    docs = check_shares(corpus, summary, [1 / 3, 1 / 3, 1 / 3])  # default weight 1 each
    # every document's task id is the source its text came from
    tok = Tokenizer.from_file(str(corpus[1] / "tokenizer.json"))
    names = [name for name, _, _ in SOURCES]
    markers = Counter()
    for task, ids, _ in docs:
        text = tok.decode(list(ids))
        found = [n for n in names if n in text]
        assert found == [names[task]], (text, names[task])
        markers[task] += 1
    tasks = summary["manifest"]["mixture"]["tasks"]
    assert [t["examples_taken"] for t in tasks] == [1334, 1333, 1333]  # largest remainder of 4000/3
    assert [t["examples_repeated"] for t in tasks] == [0, 333, 1133]
    assert [t["examples_available"] for t in tasks] == SIZES


def test_explicit_weights(corpus):
    _, _, files = corpus
    sources = [
        {"name": name, "inputs": [str(files[name])], "weight": w}
        for (name, _, _), w in zip(SOURCES, [5.0, 3.0, 2.0], strict=True)
    ]
    summary = run_mix(corpus, "explicit", "weights", sources=sources)
    check_shares(corpus, summary, [0.5, 0.3, 0.2])
    assert summary["manifest"]["mixture"]["total"] == sum(SIZES)  # default budget: the corpus size
    # HF's stopping strategies: stop when charlie (200 at 20%) is used up, or alpha (5000 at 50%)
    first = run_mix(corpus, "first", "weights", sources=sources, mix_stop="first_exhausted")
    tasks = first["manifest"]["mixture"]["tasks"]
    assert [t["examples_taken"] for t in tasks] == [500, 300, 200]
    assert [t["examples_repeated"] for t in tasks] == [0, 0, 0]
    every = run_mix(corpus, "every", "weights", sources=sources, mix_stop="all_exhausted")
    tasks = every["manifest"]["mixture"]["tasks"]
    assert [t["examples_taken"] for t in tasks] == [5000, 3000, 2000]
    assert [t["examples_distinct"] for t in tasks] == SIZES


@pytest.mark.parametrize("temperature", [1.0, 2.0, 1000.0])
def test_temperature_sampling(corpus, temperature):
    summary = run_mix(corpus, f"temp{temperature}", "temperature", temperature=temperature)
    raw = [n ** (1 / temperature) for n in SIZES]
    target = [r / sum(raw) for r in raw]
    check_shares(corpus, summary, target)
    if temperature > 100:
        assert all(abs(p - 1 / 3) < 0.01 for p in target)  # large T: close to uniform


def test_capped_proportional_mixing_and_epochs(corpus):
    _, _, files = corpus
    epochs = [1.0, 1.0, 2.5]
    sources = [
        {"name": name, "inputs": [str(files[name])], "epochs": e}
        for (name, _, _), e in zip(SOURCES, epochs, strict=True)
    ]
    summary = run_mix(corpus, "capped", "proportional", sources=sources, mix_cap=1000)
    sizes = [min(n * e, 1000) for n, e in zip(SIZES, epochs, strict=True)]  # 1000, 1000, 500
    docs = check_shares(corpus, summary, [s / sum(sizes) for s in sizes])
    tasks = summary["manifest"]["mixture"]["tasks"]
    assert [t["examples_taken"] for t in tasks] == [1000, 1000, 500]
    # 2.5 epochs of charlie: every example twice, half of them a third time
    per_example = Counter(ids for task, ids, _ in docs if task == 2)
    assert sorted(Counter(per_example.values()).items()) == [(2, 100), (3, 100)]
    # alpha is downsampled to 1000 distinct examples
    alpha = [ids for task, ids, _ in docs if task == 0]
    assert len(set(alpha)) == len(alpha) == 1000


@pytest.mark.parametrize("mixing", ["weights", "temperature"])
def test_token_unit_mixing_hits_token_shares(corpus, mixing):
    _, _, files = corpus
    weights = [5.0, 3.0, 2.0]
    sources = [
        {"name": name, "inputs": [str(files[name])], "weight": w}
        for (name, _, _), w in zip(SOURCES, weights, strict=True)
    ]
    summary = run_mix(corpus, f"tokens_{mixing}", mixing, sources=sources, mix_unit="tokens", temperature=2.0)
    tasks = summary["manifest"]["mixture"]["tasks"]
    if mixing == "weights":
        token_target = [w / sum(weights) for w in weights]
    else:  # temperature over token counts
        raw = [t["tokens_available"] ** 0.5 for t in tasks]
        token_target = [r / sum(raw) for r in raw]
    docs, _ = documents_by_task(Path(summary["output"]))
    _, tokens, _ = realised(docs)
    for i, task in enumerate(tasks):
        assert task["target_token_share"] == pytest.approx(token_target[i], abs=1e-9)
        assert abs(tokens[i] - token_target[i]) < TOLERANCE, (tokens, token_target)
    # the token budget defaults to the corpus' tokens
    assert summary["manifest"]["mixture"]["total"] == sum(t["tokens_available"] for t in tasks)
    assert abs(sum(len(ids) for _, ids, _ in docs) / summary["manifest"]["mixture"]["total"] - 1) < 0.01


def test_same_seed_same_bytes_other_seed_other_draws(corpus):
    a = run_mix(corpus, "det_a", "temperature", temperature=2.0)
    root = corpus[0]
    cfg_threads = {
        "inputs": [],
        "output": str(root / "det_b"),
        "tokenizer": str(corpus[1]),
        "seq_len": SEQ_LEN,
        "format": "text",
        "loss": "all",
        "overwrite": True,
        "threads": 1,
        "mixture": {
            "mixing": "temperature",
            "temperature": 2.0,
            "sources": [
                {
                    "name": n,
                    "inputs": [str(corpus[2][n])],
                    **({"format": "chat", "loss": "assistant"} if n == "bravo" else {}),
                }
                for n, _, _ in SOURCES
            ],
        },
    }
    b = prepare(cfg_threads, progress=False)
    files_a = [(root / "det_a" / s["file"]).read_bytes() for s in a["manifest"]["shards"]]
    files_b = [(root / "det_b" / s["file"]).read_bytes() for s in b["manifest"]["shards"]]
    assert files_a == files_b
    c = prepare({**cfg_threads, "output": str(root / "det_c"), "seed": 1}, progress=False)
    files_c = [(root / "det_c" / s["file"]).read_bytes() for s in c["manifest"]["shards"]]
    assert files_a != files_c


def test_mix_file_cli_and_summary(corpus, tmp_path):
    _root, tok, files = corpus
    mix = tmp_path / "mix.toml"
    # relative paths resolve from the mix file's folder
    for name in files:
        (tmp_path / f"{name}.jsonl").write_bytes(files[name].read_bytes())
    mix.write_text(
        'mixing = "proportional"\nmix_cap = 1000\n'
        '[[sources]]\nname = "alpha"\npath = "alpha.jsonl"\n'
        '[[sources]]\nname = "bravo"\npath = ["bravo.jsonl"]\nformat = "chat"\nloss = "assistant"\n'
        '[[sources]]\nname = "charlie"\npath = "charlie.jsonl"\nepochs = 2.5\n'
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ferrotune", "prepare", "--mix", str(mix), "--tokenizer", str(tok)]
    cmd += ["--out", str(out), "--seq-len", str(SEQ_LEN), "--format", "text", "--loss", "all", "--quiet"]
    done = subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout)
    tasks = summary["manifest"]["mixture"]["tasks"]
    assert [t["examples_taken"] for t in tasks] == [1000, 1000, 500]
    assert summary["manifest"]["task_names"] == ["alpha", "bravo", "charlie"]
    human = subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True, check=True).stdout
    assert "mixture (proportional cap=1,000)" in human
    assert "charlie" in human and "40.00%" in human  # 1000 / 2500 of the examples
    # holdout: 50 examples of each source kept out of the sampling; --split eval writes them
    mix.write_text(mix.read_text().replace("mix_cap = 1000\n", "mix_cap = 1000\nholdout = 50\n"))
    train = json.loads(
        subprocess.run([*cmd, "--overwrite", "--json"], capture_output=True, text=True, check=True).stdout
    )
    tasks = train["manifest"]["mixture"]["tasks"]
    assert [t["examples_taken"] for t in tasks] == [1000, 950, 375]  # min(cap, epochs * (n - 50))
    assert [t["examples_held_out"] for t in tasks] == [50, 50, 50]
    held = subprocess.run(
        [*cmd, "--overwrite", "--split", "eval", "--json"], capture_output=True, text=True, check=True
    )
    tasks = json.loads(held.stdout)["manifest"]["mixture"]["tasks"]
    assert [t["examples_taken"] for t in tasks] == [50, 50, 50]
    assert [t["examples_repeated"] for t in tasks] == [0, 0, 0]
    eval_docs, _ = documents_by_task(out)
    assert len({ids for _, ids, _ in eval_docs}) == 150


def test_bad_mixtures_name_the_field(corpus, tmp_path):
    from ferrotune.data.mix import load_mixture

    root, tok, files = corpus
    cases = {
        'wieght = 2.0\nname = "a"\npath = "a.jsonl"': "sources[0].wieght",
        'weight = 0\nname = "a"\npath = "a.jsonl"': "sources[0].weight: must be > 0",
        'name = "a"': "sources[0].path: required",
    }
    # the CLI prints the error and exits with 2
    bad = tmp_path / "cli.toml"
    bad.write_text('[[sources]]\nname = "a"\npath = "a.jsonl"\nepochs = 0\n')
    cmd = [
        sys.executable,
        "-m",
        "ferrotune",
        "prepare",
        "--mix",
        str(bad),
        "--tokenizer",
        str(tok),
        "--out",
        str(tmp_path / "o"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2 and "cli.toml: sources[0].epochs: must be > 0" in done.stderr, done.stderr
    for body, message in cases.items():
        mix = tmp_path / "bad.toml"
        mix.write_text(f"[[sources]]\n{body}\n")
        with pytest.raises(
            ConfigError, match=rf"bad\.toml: .*{message}".replace("[", r"\[").replace("]", r"\]")
        ):
            load_mixture(mix)
    # a missing file names the file; a source with no usable example names the source
    with pytest.raises(OSError, match=r"nope\.jsonl"):
        run_mix(corpus, "bad1", sources=[{"name": "a", "inputs": [str(root / "nope.jsonl")]}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match=r'mixture source "e" \(.*empty.jsonl\): no usable examples'):
        run_mix(
            corpus,
            "bad2",
            sources=[{"name": "a", "inputs": [str(files["alpha"])]}, {"name": "e", "inputs": [str(empty)]}],
        )
    assert not (root / "bad2").exists()
    with pytest.raises(ValueError, match=r'sources\[1\] \("b"\)\.epochs: must be > 0'):
        run_mix(
            corpus,
            "bad3",
            sources=[
                {"name": "a", "inputs": [str(files["alpha"])]},
                {"name": "b", "inputs": [str(files["alpha"])], "epochs": -1},
            ],
        )
    with pytest.raises(ValueError, match="unknown field `wieght`"):
        run_mix(corpus, "bad4", sources=[{"name": "a", "inputs": [str(files["alpha"])], "wieght": 1}])


def test_run_config_sources_prepare_a_mixture_with_task_ids(corpus, tmp_path):
    from ferrotune.train.loop import RowBatches
    from ferrotune.train.run import training_rows

    _root, tok, files = corpus
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'task = "pretrain"\n[model]\ntokenizer = "{tok}"\n[run]\noutput_dir = "{tmp_path / "run"}"\n'
        f'[data]\nseq_len = {SEQ_LEN}\nmixing = "temperature"\ntemperature = 2.0\neval_fraction = 0.1\n'
        f'[[data.sources]]\nname = "alpha"\npath = "{files["alpha"]}"\n'
        f'[[data.sources]]\nname = "charlie"\npath = ["{files["charlie"]}"]\nweight = 2.0\n'
    )
    config = load_config(toml)
    assert [s.name for s in config.data.sources] == ["alpha", "charlie"]
    train, held_out = training_rows(config, None, tok, in_memory=None)
    # eval_fraction is held out of every source before sampling: no example in both
    train_docs, _ = documents_by_task(tmp_path / "run" / "prepared" / "train")
    eval_docs, eval_names = documents_by_task(tmp_path / "run" / "prepared" / "eval")
    assert eval_names == ["alpha", "charlie"] and len(held_out) > 0
    assert not {ids for _, ids, _ in train_docs} & {ids for _, ids, _ in eval_docs}
    assert Counter(task for task, _, _ in eval_docs) == {0: 500, 1: 20}  # 10% of each, once
    assert len({ids for _, ids, _ in eval_docs}) == 520
    alpha = [ids for task, ids, _ in train_docs if task == 0]
    assert len(set(alpha)) == len(alpha) < 4500  # downsampled from the 4500 left, no repeats
    assert len({ids for task, ids, _ in train_docs if task == 1}) == 180  # upsampled: all 180 left
    batch = next(iter(RowBatches(train, 4, seed=0).epoch(0)))
    assert batch["task_ids"].shape == (4, SEQ_LEN) and batch["task_ids"].dtype == torch.int64
    assert ((batch["task_ids"] >= 0) == (batch["document_ids"] >= 0)).all()
    manifest = json.loads((tmp_path / "run" / "prepared" / "train" / "manifest.json").read_text())
    assert manifest["task_names"] == ["alpha", "charlie"]
    first = manifest["mixture"]["tasks"][0]["target_share"]
    assert first == pytest.approx(4500**0.5 / (4500**0.5 + 180**0.5))
    # the same rule reuses the folder; a changed one prepares again
    stamp = (tmp_path / "run" / "prepared" / "train" / "manifest.json").stat().st_mtime_ns
    training_rows(config, None, tok, in_memory=None)
    assert (tmp_path / "run" / "prepared" / "train" / "manifest.json").stat().st_mtime_ns == stamp
    again = load_config(toml, ["data.temperature=1.0"])
    training_rows(again, None, tok, in_memory=None)
    manifest = json.loads((tmp_path / "run" / "prepared" / "train" / "manifest.json").read_text())
    assert manifest["mixture"]["tasks"][0]["target_share"] == pytest.approx(4500 / 4680)
    # bad keys name themselves
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.wieght"):
        load_config(toml, ["data.sources=[{name = 'a', path = 'x', wieght = 1}]"])
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.weight: must be > 0"):
        training_rows(
            load_config(
                toml, ["data.sources=[{name = 'a', path = 'x'}, {name = 'b', path = 'y', weight = -1}]"]
            ),
            None,
            tok,
            in_memory=None,
        )
    with pytest.raises(ConfigError, match=r"data\.train and data\.sources"):
        training_rows(load_config(toml, ["data.train=x.jsonl"]), None, tok, in_memory=None)


def test_single_source_prepare_is_unchanged(corpus, tmp_path):
    _root, tok, files = corpus
    config = {
        "inputs": [str(files["charlie"])],
        "output": str(tmp_path / "one"),
        "tokenizer": str(tok),
        "seq_len": SEQ_LEN,
    }
    summary = prepare(config, progress=False)
    assert "mixture" not in summary["manifest"] and "task_names" not in summary["manifest"]
    ds = PackedDataset(tmp_path / "one", shuffle=False)
    assert "task_ids" not in ds[0] and ds.task_names == []
    assert "task_ids" not in collate([ds[0]])


def test_preference_mixture_tags_both_lanes(corpus, tmp_path):
    _root, tok, _files = corpus
    sources = []
    for t, (name, n) in enumerate([("short", 60), ("long", 20)]):
        path = tmp_path / f"{name}.jsonl"
        lines = [
            {
                "prompt": f"q {name} {i}",
                "chosen": example(name, i, 3 + 6 * t),
                "rejected": example(name, i + 1, 2),
            }
            for i in range(n)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        sources.append({"name": name, "inputs": [str(path)], "format": "preference", "loss": "completion"})
    config = {"inputs": [], "output": str(tmp_path / "pref"), "tokenizer": str(tok), "seq_len": SEQ_LEN}
    config["mixture"] = {"mixing": "weights", "sources": sources}
    summary = prepare(config, progress=False)
    assert summary["manifest"]["kind"] == "preference"
    ds = PackedDataset(tmp_path / "pref", shuffle=False)
    batch = collate([ds[i] for i in range(len(ds))])
    counts = Counter()
    for side in ("chosen_", "rejected_"):
        docs, tasks = batch[side + "document_ids"], batch[side + "task_ids"]
        assert tasks.dtype == torch.int64 and ((tasks >= 0) == (docs >= 0)).all()
    for cd, ct, rd, rt in zip(
        batch["chosen_document_ids"],
        batch["chosen_task_ids"],
        batch["rejected_document_ids"],
        batch["rejected_task_ids"],
        strict=True,
    ):
        for d in range(int(cd.max()) + 1):  # document k of both lanes is one pair: one task
            (task,) = ct[cd == d].unique().tolist()
            assert rt[rd == d].unique().tolist() == [task]
            counts[task] += 1
    assert counts == {0: 40, 1: 40}  # equal weights over 80 pairs


def test_train_runs_on_a_mixture(corpus, tmp_path, capsys):
    from ferrotune.cli import main

    _root, tok, files = corpus
    vocab = Tokenizer.from_file(str(tok / "tokenizer.json")).get_vocab_size()
    (tmp_path / "run.toml").write_text(
        f"""
task = "pretrain"
[model]
init = {{ vocab_size = {vocab}, hidden_size = 32, intermediate_size = 48, num_hidden_layers = 1, num_attention_heads = 4, num_key_value_heads = 2 }}
tokenizer = "{tok}"
[data]
seq_len = 64
mixing = "weights"
mix_total = 300
eval_fraction = 0.05
[[data.sources]]
name = "alpha"
path = "{files["alpha"]}"
[[data.sources]]
name = "charlie"
path = "{files["charlie"]}"
weight = 3.0
[train]
steps = 3
batch_size = 2
[run]
output_dir = "{tmp_path / "run"}"
log_every = 1
eval_batches = 1
tensorboard = false
plot = false
"""
    )
    assert main(["train", str(tmp_path / "run.toml")]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    tasks = json.loads((tmp_path / "run" / "prepared" / "train" / "manifest.json").read_text())["mixture"][
        "tasks"
    ]
    assert [t["examples_taken"] for t in tasks] == [75, 225]
    assert [t["examples_held_out"] for t in tasks] == [250, 10]

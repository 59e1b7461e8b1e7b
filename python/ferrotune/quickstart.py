"""`ferrotune quickstart` (`make demo`): the whole job, small enough for a laptop CPU.

1. trains a byte-level BPE tokenizer on a short text shipped with the package (a made-up
   archipelago: islands, their trades, lighthouses, seasons);
2. builds a tiny Llama-style model and pretrains it on that text (continued pretraining path:
   raw text, packed rows, every token trained), measuring held-out perplexity before and after;
3. fine-tunes it with SFT (assistant-only loss) on instructions built from the same world:
   reversing a list of words, and answering questions about a passage;
4. evaluates exact match on held-out instructions, generates answers with the KV cache, and prints
   a summary of what it did and where every file is.

Both training stages go through `ferrotune train`'s own code path with TOML configs written into
the run folder, so `ferrotune train <run>/pretrain.toml` repeats a stage by hand.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from ferrotune.config import load_config
from ferrotune.models.generate import generate
from ferrotune.models.load import load_model
from ferrotune.train.loop import RowBatches, evaluate
from ferrotune.train.run import train_from_config
from ferrotune.train.text_data import END, SPECIAL_TOKENS, read_texts, render_prompt, text_rows

# The plain template of ferrotune.train.text_data, as the Jinja chat template HF tools read.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}<|end|>"
    "{% else %}<|user|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WORDS = ["salt", "amber", "wool", "figs", "glass", "rope", "honey", "tin", "boat", "sea", "hill", "lamp"]


def data_file(name: str) -> Path:
    return Path(str(resources.files("ferrotune") / "quickstart_data" / name))


def train_tokenizer(corpus: Path, folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(corpus)], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"eos_token": END, "pad_token": "<|pad|>", "bos_token": None, "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def instructions(seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """SFT pairs (train, held out). Two skills: reversing a word list (held out: unseen lists), and
    answering a question about a passage of the shipped text (held out: islands never asked about
    in training, so the answer must be read from the passage)."""
    rng = random.Random(seed)
    facts = json.loads(data_file("islands.json").read_text())
    passages = read_texts(data_file("islands.txt"))
    questions = {
        "export": "What does {n} trade?",
        "color": "What colour is the lighthouse of {n}?",
        "season": "When is the festival of {n}?",
    }
    names = sorted(facts)
    rng.shuffle(names)
    held_names = set(names[:6])
    train_qa, held_qa = [], []
    for name in names:
        for key, question in questions.items():
            for passage in passages:
                if f"{name} " in passage and f" {facts[name][key]}" in passage:
                    pair = {
                        "prompt": f"{passage}\nQuestion: {question.format(n=name)}",
                        "response": facts[name][key],
                    }
                    (held_qa if name in held_names else train_qa).append(pair)
    reverse: dict[str, str] = {}
    while len(reverse) < 1600:
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
        reverse[f"Reverse the words: {' '.join(words)}"] = " ".join(reversed(words))
    items = [{"prompt": p, "response": r} for p, r in reverse.items()]
    held_rev, train_rev = items[:40], items[40:]
    rng.shuffle(held_qa)
    return train_qa * 4 + train_rev, held_rev + held_qa[:30]


def exact_match(
    model, tokenizer, pairs: list[dict[str, str]], stop: int, pad: int
) -> tuple[float, list[str]]:
    prompts = [tokenizer.encode(render_prompt(p["prompt"]), add_special_tokens=False).ids for p in pairs]
    outputs = generate(model, prompts, max_new_tokens=24, stop_tokens=[stop], pad_id=pad)
    answers = [tokenizer.decode(o).strip() for o in outputs]
    hits = sum(a == p["response"] for a, p in zip(answers, pairs, strict=True))
    return hits / len(pairs), answers


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    parser.add_argument("--pretrain-steps", type=int, default=100)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (a model this small runs best on one)"
    )


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus = data_file("islands.txt")
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731

    say(f"[1/4] tokenizer: byte-level BPE trained on {corpus.name} ({corpus.stat().st_size:,} bytes)")
    tokenizer_dir = out / "tokenizer"
    train_tokenizer(corpus, tokenizer_dir, vocab_size=640)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    pad, end = tokenizer.token_to_id("<|pad|>"), tokenizer.token_to_id(END)

    texts = read_texts(corpus)
    random.Random(0).shuffle(texts)
    (out / "data").mkdir(exist_ok=True)
    write_jsonl(out / "data" / "pretrain.jsonl", [{"text": t} for t in texts[10:]])
    write_jsonl(out / "data" / "pretrain_eval.jsonl", [{"text": t} for t in texts[:10]])
    train_sft, held_sft = instructions(seed=0)
    write_jsonl(
        out / "data" / "sft.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["response"]},
                ]
            }
            for r in train_sft
        ],
    )

    model_init = {
        "model_type": "llama",
        "vocab_size": tokenizer.get_vocab_size(),
        "hidden_size": 128,
        "intermediate_size": 320,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "eos_token_id": end,
        "pad_token_id": pad,
    }
    pretrain_toml = write_toml(
        out / "pretrain.toml",
        f"""
task = "pretrain"
seed = 0
[model]
init = {json.dumps(model_init).replace('": ', '" = ').replace("{", "{ ").replace("}", " }")}
tokenizer = "{tokenizer_dir}"
[data]
train = "{out / "data" / "pretrain.jsonl"}"
eval = "{out / "data" / "pretrain_eval.jsonl"}"
seq_len = 128
[train]
steps = {args.pretrain_steps}
batch_size = 8
lr = 3e-3
warmup_steps = 15
weight_decay = 0.05
device = "cpu"
[run]
output_dir = "{out / "pretrain"}"
log_every = 25
""",
    )
    say(f"[2/4] continued pretraining: {pretrain_toml}")
    config = load_config(pretrain_toml)
    base = load_config(pretrain_toml, ["train.steps=0"])
    from ferrotune.train.run import build_model

    untrained = build_model(base, torch.device("cpu"))
    eval_rows = text_rows(texts[:10], tokenizer, 128, end, pad)
    before = evaluate(
        untrained, RowBatches(eval_rows, len(eval_rows), shuffle=False).epoch(0), torch.device("cpu"), "fp32"
    )
    pretrained = train_from_config(config)
    after = pretrained.result.eval

    sft_toml = write_toml(
        out / "sft.toml",
        f"""
task = "sft"
seed = 0
[model]
path = "{pretrained.final_dir}"
[data]
train = "{out / "data" / "sft.jsonl"}"
seq_len = 128
eval_fraction = 0.05
[train]
steps = {args.sft_steps}
batch_size = 8
lr = 2e-3
warmup_steps = 20
weight_decay = 0.05
device = "cpu"
[run]
output_dir = "{out / "sft"}"
log_every = 25
""",
    )
    say(f"[3/4] SFT (assistant-only loss): {sft_toml}")
    tuned = train_from_config(load_config(sft_toml))

    say("[4/4] evaluation on held-out instructions (greedy decoding, KV cache)")
    model = load_model(tuned.final_dir)
    reverse = [p for p in held_sft if p["prompt"].startswith("Reverse")]
    facts = [p for p in held_sft if not p["prompt"].startswith("Reverse")]
    rev_score, rev_answers = exact_match(model, tokenizer, reverse, end, pad)
    fact_score, fact_answers = exact_match(model, tokenizer, facts, end, pad)
    base_model = load_model(pretrained.final_dir)
    base_score, _ = exact_match(base_model, tokenizer, reverse, end, pad)

    elapsed = time.perf_counter() - start
    summary = {
        "pretrain_eval_ppl_before": before["eval_ppl"],
        "pretrain_eval_ppl_after": after.get("eval_ppl"),
        "reverse_exact_match_before_sft": base_score,
        "reverse_exact_match": rev_score,
        "island_questions_exact_match": fact_score,
        "seconds": elapsed,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    example_rev, example_fact = reverse[0], facts[0]
    print(
        f"""
ferrotune quickstart finished in {elapsed:.0f}s.

What it did
  tokenizer   byte-level BPE, {tokenizer.get_vocab_size()} tokens, trained on the shipped text
  model       Llama-style, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, 4 layers, GQA, tied embeddings
  pretrain    {args.pretrain_steps} steps on raw text: held-out perplexity {before["eval_ppl"]:.1f} -> {after.get("eval_ppl", float("nan")):.1f}
  SFT         {args.sft_steps} steps, assistant-only loss, {len(train_sft)} instructions
  eval        reverse-the-words, {len(reverse)} unseen lists: exact match {base_score:.0%} before SFT -> {rev_score:.0%} after
              questions on passages about {len(facts)} unseen island/question pairs: exact match {fact_score:.0%}

Generated answers
  > {example_rev["prompt"]}
    {rev_answers[0]}   (expected: {example_rev["response"]})
  > {example_fact["prompt"].replace(chr(10), chr(10) + "    ")}
    {fact_answers[0]}   (expected: {example_fact["response"]})

Files (under {out})
  tokenizer/            tokenizer.json, tokenizer_config.json
  pretrain.toml, sft.toml   the two run configs (rerun: ferrotune train {out / "sft.toml"})
  pretrain/final/       pretrained model (HF format: config.json, model.safetensors, tokenizer)
  sft/final/            fine-tuned model; try: ferrotune generate --chat {tuned.final_dir} "Reverse the words: sea boat lamp"
  */metrics.jsonl, */loss.png   per-step metrics and loss curves
  summary.json          the figures above
"""
    )
    return 0

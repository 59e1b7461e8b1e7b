"""Speed never changes results: a short real training run with the fast paths against the same run
on the plain references, for full fine-tuning and for LoRA.

Fast: the Triton kernels (RMSNorm, RoPE, SwiGLU, NF4), the fused LoRA node, the chunked LM-head
loss and FlexAttention over packed rows. Reference: `kernels.set_enabled(False)` (every kernel
takes its PyTorch formula, LoRA the plain module composition), the full-logits loss and SDPA
with a dense document mask. Both start from the same seed and see the same batches.

The data is real text: the quickstart's island corpus (python/ferrotune/quickstart_data) and more
passages made from its templates and facts, tokenized by a byte-level BPE trained here and packed
into rows by ferrotune's pipeline (`ferrotune.train.text_data.text_rows`: document ids, restarting
positions, no loss across documents).

bf16 noise: the reference run again with another data order. The fast paths hold when the fast
curve sits as close to the reference as the two reference runs sit to each other.

    python bench/parity_gpu.py                  # ~100M Llama shape, bf16, 300 steps (H200: < 3 min)
    python bench/parity_gpu.py --tiny           # CPU, seconds (tests/test_kernels_lora.py runs it)

Prints one JSON object (and writes $OUT/parity.json when OUT is set).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from ferrotune import kernels
from ferrotune.kernels import linear_cross_entropy, linear_cross_entropy_reference
from ferrotune.kernels.adamw import AdamW
from ferrotune.kernels.lora import set_fused_lora
from ferrotune.models.llama import CausalLM, LlamaConfig
from ferrotune.peft import LoraConfig, apply_peft
from ferrotune.quickstart import PASSAGES, WORDS, data_file, train_tokenizer
from ferrotune.train.text_data import SPECIAL_TOKENS, read_texts, text_rows

FULL_SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12,
                  num_key_value_heads=4, rope_theta=500000.0, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Data: the island corpus, grown from its own templates, packed by ferrotune's text pipeline
# ----------------------------------------------------------------------------------------------


def island_corpus(documents: int, seed: int = 0) -> list[str]:
    """The shipped passages plus `documents` made-up ones: each a few passages about islands
    (the templates of `ferrotune quickstart`, facts drawn at random) and sometimes a word-list
    reversal, so the text has both local grammar and facts to pick up."""
    rng = random.Random(seed)
    facts = json.loads(data_file("islands.json").read_text())
    names = sorted(facts)
    values = {
        key: sorted({str(f[key]) for f in facts.values()}) for key in ("export", "color", "season", "animal")
    }
    templates = [t for shapes in PASSAGES.values() for t in shapes]
    shipped = read_texts(data_file("islands.txt"))
    texts = list(shipped)
    for _ in range(documents):
        parts = []
        for _ in range(rng.randint(2, 6)):
            fill = {k: rng.choice(v) for k, v in values.items()}
            fill.update(n=rng.choice(names), boats=rng.randint(3, 40))
            parts.append(rng.choice(templates).format(**fill))
        if rng.random() < 0.3:
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
            parts.append(f"Reverse the words: {' '.join(words)}. Answer: {' '.join(reversed(words))}.")
        if rng.random() < 0.3:
            parts.append(rng.choice(shipped))
        texts.append(" ".join(parts))
    return texts


def packed_rows(texts: list[str], vocab_size: int, seq_len: int, folder: Path) -> tuple[list[dict], int]:
    """Rows of `seq_len` tokens (input_ids, labels, position_ids, document_ids) and the vocabulary."""
    from tokenizers import Tokenizer

    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(texts))
    train_tokenizer(corpus, folder / "tokenizer", vocab_size)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer" / "tokenizer.json"))
    pad, eos = tokenizer.token_to_id(SPECIAL_TOKENS[0]), tokenizer.token_to_id(SPECIAL_TOKENS[1])
    return text_rows(texts, tokenizer, seq_len, eos, pad), tokenizer.get_vocab_size()


def batch_order(rows: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of row indices: shuffled epochs under `seed`."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(rows))
        rng.shuffle(epoch)
        order += epoch
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


# ----------------------------------------------------------------------------------------------
# One training run
# ----------------------------------------------------------------------------------------------


def build(
    shape: dict, vocab: int, method: str, device: str, dtype: torch.dtype
) -> tuple[torch.nn.Module, CausalLM]:
    torch.manual_seed(0)
    model = CausalLM(LlamaConfig(vocab_size=vocab, **shape))
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    model.to(device=device, dtype=dtype)
    if method == "lora":
        wrapped = apply_peft(model, LoraConfig(r=16, alpha=32, dropout=0.05, target_modules="all-linear"))
        return wrapped, model
    return model, model


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    rows: list[dict],
    vocab: int,
    *,
    shape: dict,
    method: str,
    fast: bool,
    data_seed: int,
    steps: int,
    batch_size: int,
    device: str,
    dtype: torch.dtype,
) -> dict:
    """Per-10-step mean losses of one run, plus its time and throughput."""
    kernels.set_enabled(fast)
    set_fused_lora("always" if fast else "never")  # on the CPU too: the node is plain PyTorch
    try:
        model, lm = build(shape, vocab, method, device, dtype)
        lm.model.attention_backend = ("flex" if device == "cuda" else "auto") if fast else "sdpa"
        loss_fn = linear_cross_entropy if fast else linear_cross_entropy_reference
        params = [p for p in model.parameters() if p.requires_grad]
        peak = 1e-3 if method == "lora" else 6e-4
        optimizer = AdamW if fast else torch.optim.AdamW  # the Triton step against torch's
        opt = optimizer(params, lr=peak, betas=(0.9, 0.95), weight_decay=0.0)
        torch.manual_seed(1234)  # dropout masks: the same stream for fast and reference
        losses = []
        model.train()
        tokens = 0
        start = time.perf_counter()
        for step, picks in enumerate(batch_order(len(rows), batch_size, steps, data_seed)):
            batch = {k: torch.stack([rows[i][k] for i in picks]).to(device) for k in rows[0]}
            hidden = lm.hidden_states(
                batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"]
            )
            loss = loss_fn(
                hidden.reshape(-1, hidden.shape[-1]), lm.lm_head.weight, batch["labels"].reshape(-1)
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, steps, peak, max(steps // 15, 1))
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
            tokens += int((batch["document_ids"] >= 0).sum())
        curve = (
            torch.stack(losses).view(-1, 10).mean(1).tolist()
            if steps % 10 == 0
            else [float(x) for x in losses]
        )
        seconds = time.perf_counter() - start
    finally:
        kernels.set_enabled(True)
        set_fused_lora("auto")
    return {"curve": [round(v, 5) for v in curve], "final": round(curve[-1], 5), "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1)}  # fmt: skip


def smoothed(curve: list[float], window: int = 3) -> list[float]:
    """Centred moving average (shorter at the ends)."""
    half = window // 2
    return [sum(curve[max(0, i - half) : i + half + 1]) / len(curve[max(0, i - half) : i + half + 1]) for i in range(len(curve))]  # fmt: skip


def max_gap(a: list[float], b: list[float]) -> float:
    return round(max(abs(x - y) for x, y in zip(smoothed(a), smoothed(b), strict=True)), 5)


def compare(method: str, rows: list[dict], vocab: int, **run: object) -> dict:
    fast = train(rows, vocab, method=method, fast=True, data_seed=0, **run)  # type: ignore[arg-type]
    ref = train(rows, vocab, method=method, fast=False, data_seed=0, **run)  # type: ignore[arg-type]
    other_order = train(rows, vocab, method=method, fast=False, data_seed=1, **run)  # type: ignore[arg-type]
    gap, noise = max_gap(fast["curve"], ref["curve"]), max_gap(ref["curve"], other_order["curve"])
    out = {
        "fast": fast,
        "reference": ref,
        "reference_other_data_order": other_order,
        "max_smoothed_gap_fast_vs_reference": gap,
        "bf16_noise_estimate": noise,
        "final_gap": round(abs(fast["final"] - ref["final"]), 5),
        "within_noise": gap <= noise,
    }
    print(f"{method}: fast {fast['final']:.4f} reference {ref['final']:.4f} gap {gap:.4f} noise {noise:.4f} "
          f"({fast['seconds']}s / {ref['seconds']}s)", file=sys.stderr, flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized model and data, a few steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--interpret", action="store_true",
                        help="on the CPU, run the Triton kernels under Triton's interpreter (slow; needs TRITON_INTERPRET=1)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.tiny:
        shape, steps, batch_size, seq_len, documents, vocab_size = TINY_SHAPE, 20, 2, 64, 120, 320
        device, dtype = "cpu", torch.float32
    else:
        shape, steps, batch_size, seq_len, documents, vocab_size = FULL_SHAPE, 300, 8, 1024, 12000, 2048
        device, dtype = "cuda", torch.bfloat16
    steps = args.steps or steps
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows, vocab = packed_rows(island_corpus(documents), vocab_size, seq_len, Path(tmp))
    run = dict(shape=shape, steps=steps, batch_size=batch_size, device=device, dtype=dtype)
    interpreter = contextlib.nullcontext()
    if device == "cpu" and args.interpret:
        from ferrotune.kernels._dispatch import cpu_interpreter

        interpreter = cpu_interpreter()  # the fast run takes the Triton kernels on the CPU too
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
                    "shape": shape, "vocab": vocab, "rows": len(rows), "seq_len": seq_len, "batch_size": batch_size,
                    "steps": steps, "curve_every_steps": 10 if steps % 10 == 0 else 1}  # fmt: skip
    with interpreter:
        for method in args.methods.split(","):
            result[method] = compare(method, rows, vocab, **run)
    result["seconds"] = round(time.perf_counter() - started, 1)
    line = json.dumps(result)
    print(line, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "parity.json").write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()

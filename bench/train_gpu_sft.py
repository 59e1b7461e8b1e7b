"""A short bf16 SFT run on CUDA with ferrotune's own loop: a random-init Llama-style model, packed
rows of synthetic instruction data (assistant-only labels), FlexAttention document masking.
Prints one JSON object: the loss curve, tokens/s (steady state, after compile warmup), step time,
peak memory and an MFU estimate.

    python bench/train_gpu_sft.py                       # ~0.5B model, 8 x 4096-token rows per step
    python bench/train_gpu_sft.py --size small --steps 30

The task is learnable (the reply repeats the prompt's tokens in reverse): the loss starts near
log(vocab) and falls once the model learns to copy. `--size tiny --device cpu` smoke-tests the script.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import torch
from ferrotune.config import Config, ModelConfig, RunConfig, TrainConfig
from ferrotune.models.llama import CausalLM, LlamaConfig
from ferrotune.train.loop import RowBatches, train_loop

SIZES = {
    "tiny": (64, 2, 4, 2, 128),  # a CPU smoke test of this script: --size tiny --device cpu
    # name: hidden, layers, heads, kv heads, intermediate
    "small": (768, 12, 12, 4, 2048),
    "medium": (1536, 16, 12, 4, 4096),
    "large": (2048, 24, 16, 8, 5632),
}


def synthetic_rows(n_rows: int, seq_len: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Packed rows of (prompt, reply = reversed prompt) documents of 64..512 tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        ids = torch.zeros(seq_len, dtype=torch.long)
        labels = torch.full((seq_len,), -100, dtype=torch.long)
        positions = torch.zeros(seq_len, dtype=torch.long)
        documents = torch.full((seq_len,), -1, dtype=torch.int32)
        start, doc = 0, 0
        while True:
            half = int(torch.randint(32, 256, (1,), generator=g))
            if start + 2 * half + 1 > seq_len:
                break
            prompt = torch.randint(3, vocab, (half,), generator=g)
            tokens = torch.cat([prompt, torch.tensor([1]), prompt.flip(0)])
            n = len(tokens)
            ids[start : start + n] = tokens
            labels[start + half : start + n - 1] = tokens[half + 1 :]
            positions[start : start + n] = torch.arange(n)
            documents[start : start + n] = doc
            start, doc = start + n, doc + 1
        rows.append(
            {"input_ids": ids, "labels": labels, "position_ids": positions, "document_ids": documents}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    parser.add_argument("--attention", choices=["auto", "sdpa", "flex"], default="auto")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device (or --size tiny --device cpu for a smoke test)")

    hidden, layers, heads, kv_heads, intermediate = SIZES[args.size]
    model_config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=args.seq_len,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    with device:
        model = CausalLM(model_config)
    model.init_weights()
    model.gradient_checkpointing = args.gradient_checkpointing
    model.model.attention_backend = args.attention
    if args.compile:
        for layer in model.model.layers:
            layer.compile()
    n_params = sum(p.numel() for p in model.parameters())

    rows = synthetic_rows(args.batch_size * 16, args.seq_len, args.vocab, seed=0)
    run_dir = tempfile.mkdtemp(prefix="ferrotune-bench-")
    config = Config(
        task="sft",
        model=ModelConfig(),
        train=TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=1e-3,
            warmup_steps=min(10, args.steps // 5),
            weight_decay=0.1,
            precision="bf16-mixed" if cuda else "fp32",
        ),
        run=RunConfig(output_dir=run_dir, log_every=1, tensorboard=False, plot=False),
    )
    stamps: list[float] = []
    losses: list[float] = []

    def on_step(step: int, loss: float) -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        losses.append(loss)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_loop(
        model, config, RowBatches(rows, args.batch_size, seed=0), device=device, on_step=on_step
    )
    warm = min(5, len(stamps) - 2)
    tokens_per_step = sum(int((r["document_ids"] >= 0).sum()) for r in rows) / len(rows) * args.batch_size
    steady = (stamps[-1] - stamps[warm]) / (len(stamps) - 1 - warm)
    tokens_per_s = tokens_per_step / steady
    # 6 N per token for the matmuls, plus attention 12 * layers * hidden * (mean causal context) per token.
    flops_per_token = 6 * n_params + 12 * layers * hidden * 256
    peak_flops = 989e12  # H100/H200 dense bf16
    print(
        json.dumps(
            {
                "bench": "train_gpu_sft",
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "torch": torch.__version__,
                "size": args.size,
                "parameters": n_params,
                "batch_rows": args.batch_size,
                "seq_len": args.seq_len,
                "attention": args.attention,
                "gradient_checkpointing": args.gradient_checkpointing,
                "compile": args.compile,
                "steps": args.steps,
                "loss_first": losses[0],
                "loss_last": losses[-1],
                "loss_uniform": math.log(args.vocab),
                "loss_curve": [round(x, 4) for x in losses],
                "step_seconds_steady": steady,
                "tokens_per_s": tokens_per_s,
                "mfu_estimate": tokens_per_s * flops_per_token / peak_flops,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "wall_seconds": time.perf_counter() - start,
                "train_tokens": result.tokens,
            }
        )
    )


if __name__ == "__main__":
    main()

"""Alignment loops on the GPU: DPO step throughput (packed preference pairs, bf16 autocast) and one
GRPO iteration (KV-cache sampling + update) on a random ~0.3B Llama. Prints one JSON object.

    PYTHONPATH=python python bench/align_gpu.py [--steps 20]

Smoke-testable on CPU with `--tiny` (a toy model, a few steps).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from ferrotune.config import DPOConfig, GRPOConfig, TrainConfig
from ferrotune.models.llama import CausalLM, LlamaConfig
from ferrotune.train.dpo import train_preference
from ferrotune.train.grpo import train_grpo
from ferrotune.train.preference_data import PreferencePair


def model(tiny: bool, device: torch.device) -> CausalLM:
    shape = (
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        if tiny
        else dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=4,
        )
    )
    lm = CausalLM(LlamaConfig(vocab_size=32000 if not tiny else 512, pad_token_id=0, **shape))
    lm.init_weights()
    return lm.to(device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = random.Random(0)
    vocab = 512 if args.tiny else 32000
    lengths = (16, 48) if args.tiny else (128, 384)

    def text(n: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(n)]

    pairs = [
        PreferencePair(text(rng.randint(*lengths)), text(rng.randint(*lengths)), text(rng.randint(*lengths)))
        for _ in range(64 if args.tiny else 2048)
    ]
    seq_len = 256 if args.tiny else 2048
    batch = 2 if args.tiny else 8
    policy = model(args.tiny, device)
    train = TrainConfig(steps=args.steps, batch_size=batch, lr=1e-6, precision="auto")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    history = train_preference(
        policy, pairs, DPOConfig(beta=0.1), train, seq_len=seq_len, pad_id=0, log_every=args.steps, quiet=True
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    dpo_seconds = time.perf_counter() - start
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "params_m": round(sum(p.numel() for p in policy.parameters()) / 1e6, 1),
        "dpo_steps": args.steps,
        "dpo_rows_per_step": batch,
        "dpo_seq_len": seq_len,
        "dpo_step_s": round(dpo_seconds / args.steps, 4),
        "dpo_final_loss": history[-1]["loss"],
        "dpo_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device.type == "cuda"
        else None,
    }

    prompts = [text(32) for _ in range(64)]
    grpo = GRPOConfig(
        prompts_per_iteration=8 if not args.tiny else 2,
        group_size=8,
        minibatch=16,
        max_new_tokens=64 if not args.tiny else 8,
    )
    start = time.perf_counter()
    train_grpo(
        policy,
        prompts,
        lambda p, c: float(len(c) % 2),
        grpo,
        TrainConfig(steps=2, lr=1e-6),
        stop_tokens=[],
        pad_id=0,
        quiet=True,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    result["grpo_iteration_s"] = round((time.perf_counter() - start) / 2, 3)
    result["grpo_samples_per_iteration"] = grpo.prompts_per_iteration * grpo.group_size
    result["grpo_new_tokens"] = grpo.max_new_tokens
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""GPU memory of loading a pretrained model for FSDP2: the whole model on every rank, then sharded
(`--mode whole`, the path `ferrotune train` keeps for DoRA, PiSSA, from-scratch runs) against
shard-by-shard loading (`--mode sharded`, ferrotune.train.sharded_load).

Rank 0 first writes a random-init checkpoint of the chosen shape (bf16 safetensors) under --dir,
unless one is there. Each mode then loads it with LoRA (r=16 on all linear layers) or for full
fine-tuning, runs one forward and backward on fixed tokens, and prints one JSON line per rank:
peak GPU memory while loading, peak GPU memory after the step, peak process RSS, load seconds,
the loss and the gradient norm (the same in both modes: the adapters come from the same seed).
Run each mode in its own process, since RSS peaks are per process:

    torchrun --standalone --nproc-per-node 2 bench/fsdp_load_gpu.py --mode whole   --shape 8b --dir /tmp/ck8b
    torchrun --standalone --nproc-per-node 2 bench/fsdp_load_gpu.py --mode sharded --shape 8b --dir /tmp/ck8b
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch
from ferrotune.config import Config, ModelConfig, PeftSection, TrainConfig
from ferrotune.models import CausalLM, LlamaConfig, save_model
from ferrotune.train import dist
from shapes import L1B, L8B  # bench/shapes.py, beside this script

SHAPES = {
    "tiny": dict(  # a smoke test of this script on CPU: --device cpu --shape tiny
        vocab_size=320,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "1b": L1B,
    "8b": L8B,
}


def write_checkpoint(folder: str, shape: str, device: str) -> None:
    if os.path.exists(os.path.join(folder, "config.json")):
        return
    with torch.device(device):
        model = CausalLM(LlamaConfig(**SHAPES[shape])).to(torch.bfloat16)
    model.init_weights(std=0.02, generator=torch.Generator(device).manual_seed(0))
    save_model(model, folder)
    del model


def gpu_peak_gib(cuda: bool) -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("whole", "sharded"), required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--dir", required=True, help="checkpoint folder (written once by rank 0)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    cuda = args.device == "cuda"

    train = TrainConfig(strategy="fsdp", precision="bf16", device=args.device)
    peft = PeftSection("lora", {"r": 16, "alpha": 32, "target_modules": "all-linear"})
    config = Config(
        model=ModelConfig(path=args.dir, gradient_checkpointing=True),
        train=train,
        peft=peft if args.method == "lora" else PeftSection(),
    )
    env = dist.setup(train)
    if env.is_main:
        write_checkpoint(args.dir, args.shape, args.device)
    dist.barrier(env)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    torch.manual_seed(0)
    started = time.perf_counter()
    if args.mode == "sharded":
        from ferrotune.train.sharded_load import load_sharded_model, sharded_load_blocker

        assert sharded_load_blocker(config) is None, sharded_load_blocker(config)
        model = load_sharded_model(config, env, torch.bfloat16, quiet=True)
    else:
        from ferrotune.peft import apply_peft_section
        from ferrotune.train.run import build_model

        model = apply_peft_section(build_model(config, env.device), config.peft, quiet=True)
        model = dist.wrap_for_training(model, env, train, "bf16")
    if cuda:
        torch.cuda.synchronize()
    load_seconds = time.perf_counter() - started
    load_peak = gpu_peak_gib(cuda)

    ids = torch.randint(
        0, SHAPES[args.shape]["vocab_size"], (1, 512), generator=torch.Generator().manual_seed(1)
    )
    ids = ids.to(env.device)
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(dist.clip_grad_norm(trainable, 1e9))  # depends on LoRA's A: B's gradient is A x
    record = {
        "mode": args.mode,
        "shape": args.shape,
        "method": args.method,
        "rank": env.rank,
        "world_size": env.world_size,
        "load_seconds": round(load_seconds, 2),
        "gpu_peak_load_gib": load_peak,
        "gpu_peak_step_gib": gpu_peak_gib(cuda),
        "rss_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "loss": float(loss),
        "grad_norm": grad_norm,
    }
    print(json.dumps(record), flush=True)
    dist.shutdown(env)


if __name__ == "__main__":
    main()

"""Multi-GPU training throughput and loss parity: FSDP2 through ferrotune.train.dist.

Cases (random-init weights, random token ids, AdamW, the same global batch at every world size):
  lora8b   LoRA r=16 alpha=32 on q,k,v,o,gate,up,down of the Llama-3.1-8B shape, base in bf16,
           adapter fp32 master weights, gradient checkpointing; global batch 8 x 2048
  full1b   full fine-tuning of the Llama-3.2-1B shape (tied embeddings), fp32 master weights,
           bf16 compute, fp32 gradient reduction; global batch 16 x 2048
  qlora8b  (optional) lora8b over NF4 base weights (double quantization): the 4-bit codes are
           sharded by FSDP like any weight

Each rank takes rows rank, rank+W, ... of every global batch and accumulates micro-batches of
`--micro-batch` rows, so a GPU does the same work per micro-batch at every world size; the loss is
the token mean over the global batch. Run it at 1 and at N GPUs and compare:

    torchrun --nproc-per-node 2 bench/dist_gpu.py lora8b,full1b      # FSDP2 on 2 GPUs
    torchrun --nproc-per-node 1 bench/dist_gpu.py lora8b,full1b      # the same code on 1 GPU
    python bench/dist_gpu.py lora8b,full1b --strategy none            # plain single GPU, autocast bf16

Every rank prints one JSON line per case (its own loss on its rows, the global loss per step,
tokens/s on this GPU, peak memory); rank 0 then prints a `summary` line. `--out FILE` appends them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from ferrotune.kernels.adamw import AdamW
from ferrotune.models import CausalLM, LlamaConfig
from ferrotune.peft import LoraConfig, apply_peft
from ferrotune.train import dist as fd
from shapes import L1B, L8B  # bench/shapes.py, beside this script

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)  # a CPU smoke test of this script
# case -> (shape, method, global batch rows, gradient checkpointing)
CASES = {
    "lora8b": (L8B, "lora", 8, True),
    "qlora8b": (L8B, "qlora", 8, True),
    "full1b": (L1B, "full", 16, False),
    "tiny_lora": (TINY, "lora", 8, True),
    "tiny_full": (TINY, "full", 8, False),
    "tiny_qlora": (TINY, "qlora", 8, True),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cases", nargs="?", default="lora8b,full1b")
    p.add_argument("--strategy", choices=["fsdp", "none"], default="fsdp")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4, help="rows per GPU per forward/backward")
    p.add_argument("--global-batch", type=int, default=0, help="rows per optimizer step (0: the case's)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--cpu-offload", action="store_true")
    p.add_argument(
        "--keep-unsharded", action="store_true", help="no reshard after forward (no re-gather in backward)"
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: smoke test (gloo)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    return p.parse_args()


def emit(record: dict, out: str | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(shape: dict, method: str, device: torch.device) -> CausalLM:
    """The same random weights on every rank and world size: built on the meta device, allocated
    on this GPU, filled from a seeded CUDA generator."""
    config = LlamaConfig(**shape)
    with torch.device("meta"):
        model = CausalLM(config)
    model.to(dtype=torch.float32 if method == "full" else torch.bfloat16)
    model.to_empty(device=device)
    model.init_weights(std=0.02, generator=torch.Generator(device).manual_seed(0))
    if method == "qlora":
        from ferrotune.quant.nf4 import quantize_linears

        quantize_linears(model, device=device)  # NF4 + double quantization, all but lm_head
    if method in ("lora", "qlora"):
        torch.manual_seed(1)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        apply_peft(model, LoraConfig(r=16, alpha=32, target_modules=targets))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp32 master weights of the adapter
    return model


def global_batches(n: int, rows: int, seq: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, vocab, (rows, seq + 1), generator=g) for _ in range(n)]


def run_case(name: str, args: argparse.Namespace, env: fd.DistEnv) -> dict:
    shape, method, case_batch, checkpointing = CASES[name]
    global_batch = args.global_batch or case_batch
    local_rows = fd.check_divisible(global_batch, env, "--global-batch")
    if local_rows % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} does not divide {local_rows} rows per GPU")
    accumulation = local_rows // args.micro_batch

    device, cuda = env.device, env.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    model = build(shape, method, device)
    model.gradient_checkpointing = checkpointing
    model = fd.wrap_model(
        model,
        env,
        args.strategy,
        param_dtype=torch.bfloat16,
        reduce_dtype=torch.float32,
        cpu_offload=args.cpu_offload,
        reshard_after_forward=not args.keep_unsharded,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    # the trainer's choice (build_optimizer): the Triton AdamW where every shard is on the GPU
    optimizer = (
        AdamW(params, lr=1e-5) if cuda and not args.cpu_offload else torch.optim.AdamW(params, lr=1e-5)
    )
    synchronize(device)
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if cuda else 0.0
    setup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    vocab = shape["vocab_size"]
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.strategy == "none" and cuda)
    rows = list(fd.rank_rows(global_batch, env.rank, env.world_size))
    global_tokens = global_batch * args.seq  # every token is trained
    losses, local_losses, times = [], [], []
    for step, batch in enumerate(global_batches(args.warmup + args.steps, global_batch, args.seq, vocab)):
        local = batch[rows].to(device, non_blocking=True)  # (local_rows, seq + 1)
        synchronize(device)
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        for micro in range(accumulation):
            chunk = local[micro * args.micro_batch : (micro + 1) * args.micro_batch]
            with fd.gradient_sync(model, micro == accumulation - 1), autocast:
                # summed token loss through the fused linear cross-entropy (no logits tensor)
                loss = model(chunk[:, :-1], labels=chunk[:, 1:])
                (loss * fd.loss_scale(env) / global_tokens).backward()
            loss_sum += loss.detach()
            del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        local_losses.append(float(loss_sum) / (local_rows * args.seq))
        losses.append(float(fd.global_sum(loss_sum, env)) / global_tokens)

    step_s = statistics.median(times)
    record = dict(
        case=name,
        rank=env.rank,
        world_size=env.world_size,
        strategy=args.strategy,
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        method=method,
        global_batch=global_batch,
        micro_batch=args.micro_batch,
        accumulation=accumulation,
        seq=args.seq,
        grad_ckpt=checkpointing,
        cpu_offload=args.cpu_offload,
        reshard_after_forward=not args.keep_unsharded,
        trainable=sum(p.numel() for p in params),  # a DTensor's numel is the full tensor's
        loss_per_step=[round(x, 5) for x in losses],
        rank_loss_per_step=[round(x, 5) for x in local_losses],
        step_s_median=round(step_s, 4),
        tokens_per_s_per_gpu=round(local_rows * args.seq / step_s, 1),
        tokens_per_s_total=round(global_tokens / step_s, 1),
        weights_gib=round(weights_gib, 2),
        peak_mem_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        setup_s=round(setup_s, 1),
    )
    del model, optimizer, params
    if cuda:
        torch.cuda.empty_cache()
    return record


def main() -> int:
    args = parse_args()
    if args.strategy == "fsdp" and not fd.launched_by_torchrun():
        # One process without torchrun: a one-rank process group, so the FSDP path is the same.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
    env = fd.init_distributed(args.device)
    if args.strategy == "none" and env.world_size > 1:
        raise SystemExit("--strategy none is the one-GPU baseline: run it without torchrun")
    records = []
    for name in args.cases.split(","):
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}; cases: {', '.join(CASES)}")
        record = run_case(name, args, env)
        emit(record, args.out)
        records.append(record)
        fd.barrier(env)
    if env.is_main:
        for r in records:
            emit(
                dict(
                    summary=r["case"],
                    world_size=r["world_size"],
                    strategy=r["strategy"],
                    loss_per_step=r["loss_per_step"],
                    tokens_per_s_per_gpu=r["tokens_per_s_per_gpu"],
                    peak_mem_gib_rank0=r["peak_mem_gib"],
                ),
                args.out,
            )
    fd.shutdown(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())

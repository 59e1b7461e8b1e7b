"""ferrotune on one GPU, case for case beside `../shared/bench/hf_peer_gpu.py`.

Same cases, same random-init Llama shapes and random token ids, same LoRA (r=16, alpha=32 on
q,k,v,o,gate,up,down), fused AdamW, same timing (warm-up steps, then the median step between
`torch.cuda.synchronize()` calls) and the same JSON fields, one line per case, so the ratio comes
from one run. Our differences are the point: the chunked LM-head loss (no full logits), the
Triton kernels, packed rows with a document mask instead of padding (varlen cases), NF4 through
ferrotune.quant, LoRA as one fused autograd node (`_unfused` cases: the plain composition), and
block inputs offloaded to host memory (`_offload` cases, and the 131k QLoRA case).

    python bench/train_gpu.py lora8b,qlora8b,full1b,lora8b_varlen     # OUT=dir for results.jsonl
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import sys
import time

import torch
from ferrotune import kernels
from ferrotune.kernels import linear_cross_entropy
from ferrotune.kernels.adamw import AdamW
from ferrotune.kernels.lora import set_fused_lora
from ferrotune.models.llama import CausalLM, LlamaConfig
from shapes import L1B, L8B, LORA_TARGETS  # bench/shapes.py: the shapes every GPU bench uses

OUT = os.environ.get("OUT", "/tmp")


# Experiments: BENCH_SDPA=flash|efficient|cudnn pins SDPA's backend; BENCH_CE_CHUNK=tokens per
# cross-entropy chunk (default: 1 GiB of logits); BENCH_STEPS=timed steps per case.
CE_CHUNK = int(os.environ["BENCH_CE_CHUNK"]) if os.environ.get("BENCH_CE_CHUNK") else None


def sdpa_backend():
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    choice = os.environ.get("BENCH_SDPA", "")
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}  # fmt: skip
    return sdpa_kernel(backends[choice]) if choice else contextlib.nullcontext()


def emit(record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(os.path.join(OUT, "results.jsonl"), "a") as f:
        f.write(line + "\n")


def build(shape: dict, mode: str) -> CausalLM:
    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CausalLM(config).to(torch.bfloat16)
    model.init_weights()
    if mode == "qlora":
        from ferrotune.quant.nf4 import quantize_linears

        quantize_linears(model, skip=("lm_head",))
        gc.collect()
        torch.cuda.empty_cache()
    if mode in ("lora", "qlora"):
        from ferrotune.peft import LoraConfig, apply_peft

        model = apply_peft(model, LoraConfig(r=16, alpha=32, dropout=0.0, target_modules=LORA_TARGETS))
    return model


def lognormal_lengths(budget: int, n: int, seed: int = 2) -> list[list[int]]:
    """The peer's SFT-like lengths (lognormal, median ~450, clipped to [32, 4096]), drawn with the
    same generator and the same batch-filling rule, so both sides see the same documents."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lens: list[int] = []
        while True:
            length = int(min(4096, max(32, math.exp(rng.gauss(math.log(450), 0.9)))))
            if (len(lens) + 1) * max([*lens, length]) > budget:
                break
            lens.append(length)
        out.append(lens)
    return out


def pack_rows(batches: list[list[int]], row: int) -> list[list[int]]:
    """The peer's documents (all its batches, flattened) packed best-fit-decreasing into rows of
    `row` tokens, as `ferrotune prepare` packs: the same documents, without the padding."""
    rows: list[list[int]] = []
    space: list[int] = []
    for length in sorted((n for lens in batches for n in lens), reverse=True):
        best = min((i for i in range(len(rows)) if space[i] >= length), key=lambda i: space[i], default=None)
        if best is None:
            rows.append([])
            space.append(row)
            best = len(rows) - 1
        rows[best].append(length)
        space[best] -= length
    return rows


def packed_row(lengths: list[int], vocab: int, g: torch.Generator, row: int) -> dict[str, torch.Tensor]:
    """One packed row of `row` tokens: positions restart per document, document ids keep
    attention inside each document, and the tail is one padding run (document id -1, no loss).
    One fixed row length keeps the compiled attention kernel from recompiling for every batch."""
    pad = row - sum(lengths)
    assert pad >= 0
    lengths = [*lengths, pad] if pad else lengths
    total = row
    ids = torch.randint(0, vocab, (1, total), device="cuda", generator=g)
    doc = torch.repeat_interleave(
        torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda")
    )
    starts = torch.cumsum(torch.tensor([0, *lengths[:-1]], device="cuda"), 0)
    pos = torch.arange(total, device="cuda") - torch.repeat_interleave(
        starts, torch.tensor(lengths, device="cuda")
    )
    labels = torch.roll(ids, -1, dims=1)
    last = torch.cumsum(torch.tensor(lengths, device="cuda"), 0) - 1
    labels[0, last] = -100
    doc = doc.to(torch.int32)
    if pad:
        doc[-pad:] = -1
        labels[0, -pad:] = -100
    return dict(input_ids=ids, labels=labels, position_ids=pos[None], document_ids=doc[None])


def train_case(
    name, shape, mode, bsz, seq, gc_on, steps=5, warm=2, varlen=False, compile_blocks=False, checkpointed=None,
    fused=True, offload=False,
):  # fmt: skip
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    steps = int(os.environ.get("BENCH_STEPS", steps))  # more timed steps, to see their spread
    t0 = time.time()
    model = build(shape, mode)
    inner = model.model if hasattr(model, "model") and isinstance(model.model, CausalLM) else model
    inner.gradient_checkpointing = gc_on
    inner.model.checkpointed_layers = checkpointed
    inner.model.activation_offload = offload  # checkpointed blocks keep their inputs in host memory
    set_fused_lora("auto" if fused else "never")  # "never": LoRA as the plain module composition
    if compile_blocks:
        kernels.set_enabled(False)  # Inductor fuses the plain formulas itself
        if os.environ.get("BENCH_ACT_BUDGET"):  # the partitioner recomputes until saved activations fit
            from torch._functorch import config as functorch_config

            functorch_config.activation_memory_budget = float(os.environ["BENCH_ACT_BUDGET"])
        for layer in inner.model.layers:
            layer.compile(mode=os.environ.get("BENCH_COMPILE_MODE") or None)
    weights_gib = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    params = [p for p in model.parameters() if p.requires_grad]
    ntrain = sum(p.numel() for p in params)
    opt = AdamW(params, lr=1e-5)  # the trainer's CUDA optimizer (ferrotune.kernels.adamw)
    setup_s = time.time() - t0
    model.train()
    vocab = shape["vocab_size"]
    g = torch.Generator(device="cuda").manual_seed(1)
    # varlen: the peer's documents for 6x its step count, packed into rows of its token budget.
    batches = pack_rows(lognormal_lengths(bsz * seq, 6 * (warm + steps)), bsz * seq) if varlen else None
    if varlen:
        steps = len(batches) - warm
    times, useful = [], 0
    loss = torch.zeros(())
    for i in range(warm + steps):
        if varlen:
            batch = packed_row(batches[i], vocab, g, bsz * seq)
        else:
            ids = torch.randint(0, vocab, (bsz, seq), device="cuda", generator=g)
            labels = torch.roll(ids, -1, dims=1)
            labels[:, -1] = -100
            batch = dict(input_ids=ids, labels=labels)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with sdpa_backend():
            hidden = inner.hidden_states(
                batch["input_ids"],
                position_ids=batch.get("position_ids"),
                document_ids=batch.get("document_ids"),
            )
        kernels.set_enabled(True)  # the loss kernel stays on outside the compiled blocks
        loss = linear_cross_entropy(hidden, inner.lm_head.weight, batch["labels"], chunk_size=CE_CHUNK)
        kernels.set_enabled(not compile_blocks)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warm:
            times.append(time.perf_counter() - start)
            useful += sum(batches[i]) if varlen else bsz * seq  # real tokens, as the peer counts them
    in_order = [round(t, 4) for t in times]
    times.sort()
    med = times[len(times) // 2]
    emit(dict(case=name, impl="ferrotune", mode=mode, bsz=bsz, seq=seq, grad_ckpt=gc_on, liger=False, varlen=varlen,
              trainable=ntrain, step_s_median=round(med, 4), step_s_min=round(times[0], 4),
              tokens_per_s=round(bsz * seq / med, 1), useful_tokens_per_s=round(useful / sum(times), 1),
              weights_gib=round(weights_gib, 2), peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
              setup_s=round(setup_s, 1), loss=loss.item(), compiled=compile_blocks, checkpointed_layers=checkpointed,
              fused_lora=fused and mode != "full" and not compile_blocks, activation_offload=offload,
              offloaded_gib_per_step=round(offloaded_gib(inner), 2),
              sdpa=os.environ.get("BENCH_SDPA", "auto"), ce_chunk=CE_CHUNK, step_s_all=in_order))  # fmt: skip
    kernels.set_enabled(True)
    set_fused_lora("auto")
    del model, opt, params, loss
    gc.collect()
    torch.cuda.empty_cache()


def offloaded_gib(model: CausalLM) -> float:
    """Block inputs moved to host memory per step (0 without offload)."""
    offloader = model.model._offloader
    if offloader is None or offloader.stats.passes == 0:
        return 0.0
    return offloader.stats.to_host_bytes / 2**30 / offloader.stats.passes


CASES = {
    "lora8b": lambda: train_case("lora8b", L8B, "lora", 4, 2048, True),
    "lora8b_sel22": lambda: train_case("lora8b_sel22", L8B, "lora", 4, 2048, True, checkpointed=22),
    "lora8b_sel24": lambda: train_case("lora8b_sel24", L8B, "lora", 4, 2048, True, checkpointed=24),
    "full1b_compiled": lambda: train_case(
        "full1b_compiled", L1B, "full", 8, 2048, False, compile_blocks=True
    ),
    "full1b_gc8": lambda: train_case("full1b_gc8", L1B, "full", 8, 2048, True, checkpointed=8),
    "lora8b_nogc": lambda: train_case("lora8b_nogc", L8B, "lora", 4, 2048, False),
    "lora8b_sel22_compiled": lambda: train_case(
        "lora8b_sel22_compiled", L8B, "lora", 4, 2048, True, compile_blocks=True, checkpointed=22
    ),
    "lora8b_compiled": lambda: train_case("lora8b_compiled", L8B, "lora", 4, 2048, True, compile_blocks=True),
    "qlora8b": lambda: train_case("qlora8b", L8B, "qlora", 4, 2048, True),
    "qlora8b_sel27": lambda: train_case("qlora8b_sel27", L8B, "qlora", 4, 2048, True, checkpointed=27),
    "qlora8b_sel28": lambda: train_case("qlora8b_sel28", L8B, "qlora", 4, 2048, True, checkpointed=28),
    "full1b": lambda: train_case("full1b", L1B, "full", 8, 2048, False),
    "lora8b_varlen": lambda: train_case("lora8b_varlen", L8B, "lora", 8, 2048, True, varlen=True),
    "lora8b_16k": lambda: train_case("lora8b_16k", L8B, "lora", 1, 16384, True, steps=3, warm=1),
    "lora8b_32k": lambda: train_case("lora8b_32k", L8B, "lora", 1, 32768, True, steps=3, warm=1),
    "lora8b_65k": lambda: train_case("lora8b_65k", L8B, "lora", 1, 65536, True, steps=2, warm=1),
    # QLoRA 8B on one 131,072-token sequence: every block checkpointed, block inputs in host memory
    "qlora8b_131k": lambda: train_case(
        "qlora8b_131k", L8B, "qlora", 1, 131072, True, steps=1, warm=1, offload=True
    ),
    "qlora8b_131k_nooffload": lambda: train_case(
        "qlora8b_131k_nooffload", L8B, "qlora", 1, 131072, True, steps=2, warm=1
    ),
    # activation offload (ferrotune.train.offload) against the same case without it
    "lora8b_65k_offload": lambda: train_case(
        "lora8b_65k_offload", L8B, "lora", 1, 65536, True, steps=2, warm=1, offload=True
    ),
    "lora8b_offload": lambda: train_case("lora8b_offload", L8B, "lora", 4, 2048, True, offload=True),
    "qlora8b_offload": lambda: train_case("qlora8b_offload", L8B, "qlora", 4, 2048, True, offload=True),
    # the fused LoRA node (kernels.lora_linear) is the default; these take the plain composition
    "lora8b_unfused": lambda: train_case("lora8b_unfused", L8B, "lora", 4, 2048, True, fused=False),
    "lora8b_sel22_unfused": lambda: train_case(
        "lora8b_sel22_unfused", L8B, "lora", 4, 2048, True, checkpointed=22, fused=False
    ),
    "qlora8b_unfused": lambda: train_case("qlora8b_unfused", L8B, "qlora", 4, 2048, True, fused=False),
    "lora8b_sel22_fused": lambda: train_case(
        "lora8b_sel22_fused", L8B, "lora", 4, 2048, True, checkpointed=22
    ),
}

if __name__ == "__main__":
    for case in (sys.argv[1] if len(sys.argv) > 1 else "lora8b").split(","):
        try:
            CASES[case]()
        except Exception as e:  # one failed case must not hide the others' figures
            import traceback

            traceback.print_exc()
            emit(dict(case=case, impl="ferrotune", error=repr(e)[:500]))
            gc.collect()
            torch.cuda.empty_cache()

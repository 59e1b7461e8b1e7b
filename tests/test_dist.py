"""Distributed training on 2 CPU processes (gloo): DDP and FSDP2 give the single-process losses and
weights on the same global batch; sharded checkpoints resume on 2 ranks and on 1; adapters gathered
under FSDP are whole; quantized (uint8) storage is sharded and all-gathered bit for bit.

The engine-level tests use a small stand-in decoder (below) with the Hugging Face layout the real
model has (`model.layers.{i}`); the ranks are spawned with torch.multiprocessing and meet at a store
this process hosts on a free port, as torchrun's workers meet at its agent's store."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import sys
import traceback

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from ferrotune.errors import ConfigError, FormatError
from ferrotune.train import dist as fd
from safetensors.torch import load_file, save_file
from torch import nn
from torch.multiprocessing.spawn import ProcessException
from torch.utils._python_dispatch import TorchDispatchMode

VOCAB, DIM, LAYERS, ROWS, SEQ = 48, 16, 3, 4, 12
STEPS = 3

# --------------------------------------------------------------------------------------------------
# Stand-in model: embeddings, decoder blocks (norm + MLP with residual), final norm, lm_head
# --------------------------------------------------------------------------------------------------


class LoraLinear(nn.Module):
    """y = base(x) + (x A^T) B^T * scale, the base frozen."""

    def __init__(self, base: nn.Module, in_f: int, out_f: int, rank: int = 4):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(in_f, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_f, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.1)  # nonzero so that every adapter tensor trains
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * 2.0


class FourBitLinear(nn.Module):
    """4-bit blockwise storage as NF4 keeps it: two codes per uint8 byte, flat, one fp32 absmax per
    block of 16 weights; forward dequantizes. Both are frozen parameters (so FSDP shards them)."""

    LEVELS = torch.linspace(-1.0, 1.0, 16)

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        blocks = weight.reshape(-1, 16)  # (n_blocks, 16)
        absmax = blocks.abs().amax(dim=1)
        codes = ((blocks / absmax[:, None]).unsqueeze(-1) - self.LEVELS).abs().argmin(-1)
        codes = codes.reshape(-1).to(torch.uint8)
        packed = codes[0::2] << 4 | codes[1::2]  # (numel / 2,)
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.absmax = nn.Parameter(absmax, requires_grad=False)

    def weight(self) -> torch.Tensor:
        codes = torch.stack([self.packed >> 4, self.packed & 15], dim=1).reshape(-1).long()
        values = self.LEVELS.to(self.absmax.device)[codes].reshape(-1, 16) * self.absmax[:, None]
        return values.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(DIM)
        self.up_proj = nn.Linear(DIM, 2 * DIM)
        self.down_proj = nn.Linear(2 * DIM, DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down_proj(F.silu(self.up_proj(self.norm(h))))


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.RMSNorm(DIM)


class TinyDecoder(nn.Module):
    def __init__(self, method: str = "full") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Body()
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        if method in ("lora", "qlora"):
            for p in self.parameters():
                p.requires_grad_(False)
            for block in self.model.layers:
                for name in ("up_proj", "down_proj"):
                    base: nn.Module = getattr(block, name)
                    in_f, out_f = base.in_features, base.out_features
                    if method == "qlora":
                        base = FourBitLinear(base.weight.detach())
                    setattr(block, name, LoraLinear(base, in_f, out_f))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)  # (B, T, D)
        for block in self.model.layers:
            h = block(h)
        return self.lm_head(self.model.norm(h))  # (B, T, V)


def global_batches() -> list[dict[str, torch.Tensor]]:
    """STEPS global batches of ROWS rows; rows have different numbers of trained tokens, so the
    ranks' token counts differ and a per-rank mean would give the wrong loss."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS + 2):
        ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
        labels = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
        for row in range(ROWS):
            labels[row, : 2 + 3 * row] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def train_steps(model, optimizer, env, batches, params) -> list[float]:
    """One optimizer step per global batch; this rank takes rows rank, rank+W, ..."""
    losses = []
    for batch in batches:
        rows = list(fd.rank_rows(ROWS, env.rank, env.world_size))
        ids, labels = batch["input_ids"][rows], batch["labels"][rows]
        n_global = fd.global_sum((labels != -100).sum(), env)
        logits = model(ids)
        loss_sum = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
        (loss_sum * fd.loss_scale(env) / n_global.float()).backward()
        fd.clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(fd.global_sum(loss_sum.detach(), env) / n_global))
    return losses


def make_optimizer(model: nn.Module) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=3e-2, weight_decay=0.01), params


def single_process(method: str, batches) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = TinyDecoder(method)
    optimizer, params = make_optimizer(model)
    losses = train_steps(model, optimizer, fd.DistEnv(), batches, params)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Running 2 ranks
# --------------------------------------------------------------------------------------------------


SHARDED_JOB = "job_sharded_"


def _entry(rank: int, world: int, port: int, job: str, out: str) -> None:
    # What torchrun gives each worker: its rank, and a rendezvous store hosted outside the workers.
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",
        TORCHELASTIC_RESTART_COUNT="0",
    )
    torch.set_num_threads(1)
    env = fd.init_distributed("cpu")
    try:
        if job.startswith(SHARDED_JOB):  # job_sharded_<method>: one `ferrotune train` run per method
            sharded_train_job(env, out, job.removeprefix(SHARDED_JOB))
        else:
            globals()[job](env, out)
    except BaseException:
        with open(os.path.join(out, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    else:
        open(os.path.join(out, f"done{rank}"), "w").close()  # every output of this rank is written
    finally:
        fd.shutdown(env)
    # Leave without the interpreter's teardown: gloo's background threads have been seen to abort
    # there on this CPU ("terminate called without an active exception") after the work was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(job: str, tmp_path, world: int = 2) -> str:
    """Runs `job(env, out)` on `world` spawned ranks as torchrun would (the store lives in this
    process, on a free port, so the ranks can come and go in any order)."""
    from torch.distributed import TCPStore

    out = str(tmp_path / job)
    os.makedirs(out, exist_ok=True)
    store = TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    try:
        mp.start_processes(_entry, args=(world, store.port, job, out), nprocs=world, start_method="spawn")
    except ProcessException as failure:
        errors = []
        for name in sorted(n for n in os.listdir(out) if n.startswith("error")):
            with open(os.path.join(out, name)) as f:
                errors.append(f.read())
        finished = all(os.path.exists(os.path.join(out, f"done{r}")) for r in range(world))
        if errors or not finished:
            pytest.fail("a rank failed:\n" + "\n".join(errors or [str(failure)]))
        # Every rank finished its job and wrote its outputs; only the process teardown failed.
    finally:
        del store
    return out


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _record(
    env: fd.DistEnv, out: str, name: str, model: nn.Module, losses: list[float], *, trainable_only=False
):
    state = fd.gather_full_state_dict(model, trainable_only=trainable_only)
    if env.is_main:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, f"{name}.safetensors"))
    else:
        assert state == {}, "only rank 0 receives the gathered state"
    with open(os.path.join(out, f"{name}.rank{env.rank}.json"), "w") as f:
        json.dump(losses, f)


# name -> (strategy, method, wrap_model options): the 4-bit storage, CPU offload, HSDP, DDP with
# frozen parameters (the real model covers DDP / FSDP full fine-tuning and FSDP LoRA below).
STANDIN_RUNS = {
    "fsdp-qlora": ("fsdp", "qlora", {}),
    "fsdp-lora-offload": ("fsdp", "lora", {"cpu_offload": True}),
    "hsdp-full": ("fsdp", "full", {"shard_group_size": 1}),
    "ddp-lora": ("ddp", "lora", {}),
}


def job_strategies(env: fd.DistEnv, out: str) -> None:
    batches = global_batches()[:STEPS]
    for name, (strategy, method, options) in STANDIN_RUNS.items():
        model = fd.wrap_model(TinyDecoder(method), env, strategy, **options)
        optimizer, params = make_optimizer(model)
        losses = train_steps(model, optimizer, env, batches, params)
        _record(env, out, name, model, losses)
        if method != "full":
            _record(env, out, f"{name}-adapter", model, losses, trainable_only=True)
        if method == "qlora":  # the 4-bit codes are sharded, not replicated
            packed = model.model.layers[0].up_proj.base.packed
            with open(os.path.join(out, f"packed.rank{env.rank}.json"), "w") as f:
                json.dump({"local": packed.to_local().numel(), "full": packed.numel()}, f)


def _assert_close_states(got: dict, want: dict, atol: float = 2e-5) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert got[name].dtype == want[name].dtype, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=atol, msg=name)


def test_fsdp_qlora_offload_hsdp_ddp_match_single_process(tmp_path):
    out = run_ranks("job_strategies", tmp_path)
    batches = global_batches()[:STEPS]
    for name, (_, method, _) in STANDIN_RUNS.items():
        want_losses, want_state = single_process(method, batches)
        for rank in (0, 1):
            losses = read_json(os.path.join(out, f"{name}.rank{rank}.json"))
            assert losses == pytest.approx(want_losses, rel=1e-5), (name, rank)
        assert want_losses[-1] < want_losses[0]  # it trains
        _assert_close_states(load_file(os.path.join(out, f"{name}.safetensors")), want_state)
        if method != "full":
            # The adapter gathered under FSDP: every trainable tensor, whole, equal to the reference.
            adapter = load_file(os.path.join(out, f"{name}-adapter.safetensors"))
            trainable = {n for n, p in TinyDecoder(method).named_parameters() if p.requires_grad}
            assert set(adapter) == trainable and len(adapter) == 4 * LAYERS
            _assert_close_states(adapter, {k: want_state[k] for k in trainable})
    for rank in (0, 1):
        packed = read_json(os.path.join(out, f"packed.rank{rank}.json"))
        assert packed["local"] * 2 == packed["full"] == DIM * 2 * DIM // 2


# --------------------------------------------------------------------------------------------------
# Sharded checkpoints
# --------------------------------------------------------------------------------------------------


def job_checkpoint(env: fd.DistEnv, out: str) -> None:
    """Uninterrupted: 2 steps, save, 2 more. Resumed: a fresh model loads the checkpoint and runs
    the same 2 steps. Full fine-tuning and LoRA (whose checkpoint holds the adapter only)."""
    batches = global_batches()
    for method in ("full", "lora"):
        model = fd.wrap_model(TinyDecoder(method), env, "fsdp")
        optimizer, params = make_optimizer(model)
        train_steps(model, optimizer, env, batches[:2], params)
        fd.save_sharded(os.path.join(out, f"ckpt-{method}"), model, env, optimizer, {"step": 2})
        straight = train_steps(model, optimizer, env, batches[2:4], params)
        _record(env, out, f"straight-{method}", model, straight)

        model = fd.wrap_model(TinyDecoder(method), env, "fsdp")
        optimizer, params = make_optimizer(model)
        assert fd.load_sharded(os.path.join(out, f"ckpt-{method}"), model, env, optimizer) == {"step": 2}
        resumed = train_steps(model, optimizer, env, batches[2:4], params)
        _record(env, out, f"resumed-{method}", model, resumed)


def test_sharded_checkpoint_resumes_on_2_ranks_and_on_1(tmp_path):
    out = run_ranks("job_checkpoint", tmp_path)
    for method in ("full", "lora"):
        straight = read_json(os.path.join(out, f"straight-{method}.rank0.json"))
        resumed = read_json(os.path.join(out, f"resumed-{method}.rank0.json"))
        assert resumed == pytest.approx(straight, rel=1e-6)
        final = load_file(os.path.join(out, f"straight-{method}.safetensors"))
        _assert_close_states(load_file(os.path.join(out, f"resumed-{method}.safetensors")), final, atol=1e-6)
        ckpt = os.path.join(out, f"ckpt-{method}")
        assert read_json(os.path.join(ckpt, "progress.json"))["world_size"] == 2
        metadata = fd.read_checkpoint_metadata(ckpt).state_dict_metadata
        saved = {name for name in metadata if name.startswith("model.")}
        trainable = {f"model.{n}" for n, p in TinyDecoder(method).named_parameters() if p.requires_grad}
        assert saved == trainable  # the adapter alone for LoRA: the frozen base is not copied

        # One process, no process group, plain model: the 2-rank checkpoint resharded onto 1 rank.
        env = fd.DistEnv()
        model = TinyDecoder(method)
        optimizer, params = make_optimizer(model)
        assert fd.load_sharded(ckpt, model, env, optimizer)["step"] == 2
        one_rank = train_steps(model, optimizer, env, global_batches()[2:4], params)
        assert one_rank == pytest.approx(straight, rel=1e-5)
        _assert_close_states(dict(model.state_dict()), final)


def test_checkpoint_metadata_cannot_run_code(tmp_path):
    env = fd.DistEnv()
    model = TinyDecoder("full")
    fd.save_sharded(tmp_path / "ckpt", model, env)
    fd.load_sharded(tmp_path / "ckpt", TinyDecoder("full"), env)  # a clean checkpoint loads

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "ckpt" / ".metadata", "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(FormatError, match="not allowed"):
        fd.load_sharded(tmp_path / "ckpt", model, env)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(FormatError, match="not a sharded checkpoint"):
        fd.load_sharded(tmp_path, model, env)


# --------------------------------------------------------------------------------------------------
# Pieces that need no process group
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 8, 33])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_rank_rows_cover_every_row_once(n, world):
    parts = [list(fd.rank_rows(n, r, world)) for r in range(world)]
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(n))  # no overlap, nothing lost
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_rank_rows_of_a_step_are_the_global_batch():
    """Rank r reading rows r, r+W, ... of its local stream takes, at local step s with local batch b,
    exactly the rows s*W*b .. (s+1)*W*b - 1 of the one-process stream."""
    world, local_batch, n = 4, 3, 60
    streams = [list(fd.rank_rows(n, r, world)) for r in range(world)]
    for step in range(n // (world * local_batch)):
        rows = sorted(i for s in streams for i in s[step * local_batch : (step + 1) * local_batch])
        assert rows == list(range(step * world * local_batch, (step + 1) * world * local_batch))


def test_bad_settings_are_named():
    env = fd.DistEnv()
    with pytest.raises(ConfigError, match="strategy"):
        fd.wrap_model(TinyDecoder(), env, "zero3")
    with pytest.raises(ConfigError, match="torchrun"):
        fd.wrap_model(TinyDecoder(), env, "fsdp")
    with pytest.raises(ConfigError, match="batch_size"):
        fd.check_divisible(5, fd.DistEnv(world_size=2, backend="gloo"))
    with pytest.raises(ConfigError, match="rank 2 out of range"):
        fd.rank_rows(4, 2, 2)
    assert fd.wrap_model(model := TinyDecoder(), env, "none") is model


# --------------------------------------------------------------------------------------------------
# The real model (ferrotune.models) with packed rows, LoRA (ferrotune.peft) and the exports
# --------------------------------------------------------------------------------------------------


def tiny_config():
    from ferrotune.models import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )


def tiny_llama(method: str = "full"):
    from ferrotune.models import CausalLM
    from ferrotune.peft import LoraConfig, apply_peft

    model = CausalLM(tiny_config())
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    if method == "qlora":
        from ferrotune.quant.nf4 import quantize_linears

        quantize_linears(model)  # NF4, double quantization, blocks of 64
    if method in ("lora", "qlora"):
        torch.manual_seed(1)
        model = apply_peft(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        for p in model.parameters():  # B = 0 at init: start it elsewhere so every tensor moves
            if p.requires_grad and p.ndim == 2 and not p.any():
                p.data.normal_(0.0, 0.05)
    return model


def packed_batches(n: int) -> list[dict[str, torch.Tensor]]:
    """Global batches of ROWS packed rows (contract: pre-shifted labels, position ids restarting
    per document, document ids, -1 / -100 on padding), documents of random lengths."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
        labels = torch.full((ROWS, SEQ), -100)
        positions = torch.zeros(ROWS, SEQ, dtype=torch.long)
        documents = torch.full((ROWS, SEQ), -1, dtype=torch.int32)
        for row in range(ROWS):
            start, doc = 0, 0
            end = SEQ - row  # later rows carry padding
            while start < end:
                length = min(int(torch.randint(2, 7, (1,), generator=g)), end - start)
                span = slice(start, start + length)
                positions[row, span] = torch.arange(length)
                documents[row, span] = doc
                labels[row, start : start + length - 1] = ids[row, start + 1 : start + length]
                start, doc = start + length, doc + 1
        out.append({"input_ids": ids, "labels": labels, "position_ids": positions, "document_ids": documents})
    return out


def train_model_steps(model, optimizer, env, batches, params) -> list[float]:
    losses = []
    for batch in batches:
        rows = list(fd.rank_rows(ROWS, env.rank, env.world_size))
        local = {k: v[rows] for k, v in batch.items()}
        n_global = fd.global_sum((local["labels"] != -100).sum(), env)
        logits = model(
            local["input_ids"], position_ids=local["position_ids"], document_ids=local["document_ids"]
        )
        loss_sum = F.cross_entropy(logits.reshape(-1, VOCAB), local["labels"].reshape(-1), reduction="sum")
        (loss_sum * fd.loss_scale(env) / n_global.float()).backward()
        fd.clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(fd.global_sum(loss_sum.detach(), env) / n_global))
    return losses


MODEL_RUNS = (("ddp", "full"), ("fsdp", "full"), ("fsdp", "lora"), ("fsdp", "qlora"))


def job_real_model(env: fd.DistEnv, out: str) -> None:
    batches = packed_batches(STEPS)
    for strategy, method in MODEL_RUNS:
        model = fd.wrap_model(tiny_llama(method), env, strategy)
        optimizer, params = make_optimizer(model)
        losses = train_model_steps(model, optimizer, env, batches, params)
        with open(os.path.join(out, f"{strategy}-{method}.rank{env.rank}.json"), "w") as f:
            json.dump(losses, f)
        if method != "full":
            fd.export_adapter(model, os.path.join(out, f"{strategy}-{method}-adapter"), env)
        if method != "qlora":
            fd.export_model(model, os.path.join(out, f"{strategy}-{method}-model"), env)
        else:  # the 4-bit codes are sharded, not replicated: each rank holds half of them
            qweight = model.model.layers[0].mlp.up_proj.base_layer.qweight
            with open(os.path.join(out, f"qweight.rank{env.rank}.json"), "w") as f:
                json.dump({"local": qweight.to_local().numel(), "full": qweight.numel()}, f)

    # A model too big for one device: built on the meta device, sharded, allocated shard by shard,
    # then each rank copies only its shard from the memory-mapped checkpoint exported above.
    from ferrotune.io import load_checkpoint
    from ferrotune.models import CausalLM

    with torch.device("meta"):
        model = CausalLM(tiny_config())
    fd.wrap_model(model, env, "fsdp")
    model.to_empty(device=env.device)
    fd.load_full_state_dict(model, load_checkpoint(os.path.join(out, "fsdp-full-model", "model.safetensors")))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    fd.export_model(model, os.path.join(out, "meta-loaded-model"), env)


def test_real_model_ddp_fsdp_lora_qlora_match_single_process_and_export_whole(tmp_path):
    from ferrotune.models import save_model
    from ferrotune.peft import save_adapter

    out = run_ranks("job_real_model", tmp_path)
    batches = packed_batches(STEPS)
    for strategy, method in MODEL_RUNS:
        model = tiny_llama(method)
        optimizer, params = make_optimizer(model)
        start = [p.detach().clone() for p in params]
        want = train_model_steps(model, optimizer, fd.DistEnv(), batches, params)
        assert all(not torch.allclose(a, b) for a, b in zip(start, params, strict=True))  # all trained
        name = f"{strategy}-{method}"
        for rank in (0, 1):
            assert read_json(os.path.join(out, f"{name}.rank{rank}.json")) == pytest.approx(want, rel=1e-5)
        if method != "qlora":
            save_model(model, tmp_path / f"ref-{name}-model")
            _assert_close_states(
                load_file(os.path.join(out, f"{name}-model", "model.safetensors")),
                load_file(tmp_path / f"ref-{name}-model" / "model.safetensors"),
            )
        if name == "fsdp-full":
            _assert_close_states(
                load_file(os.path.join(out, "meta-loaded-model", "model.safetensors")),
                load_file(os.path.join(out, "fsdp-full-model", "model.safetensors")),
                atol=0,
            )
        if method != "full":
            # The adapter exported under FSDP: PEFT's keys, every tensor whole, the same config.
            save_adapter(model, str(tmp_path / f"ref-{name}-adapter"))
            got = load_file(os.path.join(out, f"{name}-adapter", "adapter_model.safetensors"))
            ref = load_file(tmp_path / f"ref-{name}-adapter" / "adapter_model.safetensors")
            assert len(ref) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
            _assert_close_states(got, ref)
            assert read_json(os.path.join(out, f"{name}-adapter", "adapter_config.json")) == read_json(
                str(tmp_path / f"ref-{name}-adapter" / "adapter_config.json")
            )
    for rank in (0, 1):  # QLoRA: 4-bit codes of up_proj (48 x 32 / 2 bytes), half on each rank
        qweight = read_json(os.path.join(out, f"qweight.rank{rank}.json"))
        assert qweight["full"] == 48 * 32 // 2 and qweight["local"] * 2 == qweight["full"]


# --------------------------------------------------------------------------------------------------
# The training loop (ferrotune.train.loop) under torchrun-style ranks
# --------------------------------------------------------------------------------------------------


def loop_rows() -> list[dict[str, torch.Tensor]]:
    """16 packed rows (the batch contract), unequal trained-token counts."""
    return [{k: v[row] for k, v in batch.items()} for batch in packed_batches(4) for row in range(ROWS)]


def loop_config(out: str, strategy: str, world: int, **run):
    from ferrotune.config import Config, RunConfig, TrainConfig

    train = TrainConfig(
        steps=4,
        batch_size=4 // world,
        grad_accum=2,
        lr=1e-2,
        warmup_steps=1,
        weight_decay=0.1,
        strategy=strategy,
    )
    run_cfg = RunConfig(output_dir=out, log_every=1, save_every=2, tensorboard=False, plot=False, **run)
    return Config(seed=3, train=train, run=run_cfg)


class Killed(Exception):
    pass


def job_loop(env: fd.DistEnv, out: str) -> None:
    from ferrotune.train.loop import RowBatches, train_loop

    def batches():
        return RowBatches(loop_rows(), 2, seed=5, rank=env.rank, world_size=env.world_size)

    for strategy in ("ddp", "fsdp"):
        config = loop_config(os.path.join(out, strategy), strategy, env.world_size)
        result = train_loop(tiny_llama(), config, batches(), env=env)
        with open(os.path.join(out, f"loop-{strategy}.rank{env.rank}.json"), "w") as f:
            json.dump(result.losses, f)

    def kill_at_three(step: int, loss: float) -> None:
        if step == 3:
            raise Killed

    cut = os.path.join(out, "cut")
    with contextlib.suppress(Killed):
        train_loop(tiny_llama(), loop_config(cut, "fsdp", 2), batches(), env=env, on_step=kill_at_three)
    resumed = train_loop(tiny_llama("full"), loop_config(cut, "fsdp", 2, resume=True), batches(), env=env)
    with open(os.path.join(out, f"loop-resumed.rank{env.rank}.json"), "w") as f:
        json.dump([resumed.resumed_from, *resumed.losses], f)


def test_training_loop_on_2_ranks_equals_one_process_and_resumes_on_1(tmp_path):
    from ferrotune.train.loop import RowBatches, latest_checkpoint, train_loop

    out = run_ranks("job_loop", tmp_path)
    reference = train_loop(
        tiny_llama(),
        loop_config(str(tmp_path / "one"), "none", 1),
        RowBatches(loop_rows(), 4, seed=5),
        quiet=True,
    )
    assert len(reference.losses) == 4
    for strategy in ("ddp", "fsdp"):
        for rank in (0, 1):
            got = read_json(os.path.join(out, f"loop-{strategy}.rank{rank}.json"))
            assert got == pytest.approx(reference.losses, rel=1e-5), (strategy, rank)
    # Only rank 0 logs: one metrics file, one line per step.
    metrics = (tmp_path / "job_loop" / "fsdp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3, 4]

    # Killed after step 3, resumed on 2 ranks from the sharded step-2 checkpoint.
    resumed = read_json(os.path.join(out, "loop-resumed.rank0.json"))
    assert resumed[0] == 2 and resumed[1:] == pytest.approx(reference.losses[2:], rel=1e-5)

    # The same 2-rank checkpoint resumed by one plain process.
    cut = tmp_path / "job_loop" / "cut"
    assert latest_checkpoint(cut).name == "step-000002" and fd.is_sharded_checkpoint(latest_checkpoint(cut))
    one = train_loop(
        tiny_llama(),
        loop_config(str(cut), "none", 1, resume=True),
        RowBatches(loop_rows(), 4, seed=5),
        quiet=True,
    )
    assert one.resumed_from == 2 and one.losses == pytest.approx(reference.losses[2:], rel=1e-5)


# --------------------------------------------------------------------------------------------------
# `torchrun --nproc-per-node 2 -m ferrotune train cfg.toml`
# --------------------------------------------------------------------------------------------------

RUN_TOML = """
task = "pretrain"
seed = 4
[model]
tokenizer = "{tok}"
init = {{ vocab_size = 320, hidden_size = 32, intermediate_size = 48, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, tie_word_embeddings = true }}
[data]
train = "{corpus}"
seq_len = 32
eval_fraction = 0.25
[train]
steps = 3
batch_size = 2
lr = 1e-2
warmup_steps = 1
strategy = "fsdp"
[run]
output_dir = "{out}"
log_every = 1
save_every = 2
tensorboard = false
plot = false
"""


def word_corpus_and_tokenizer(tmp_path, documents: int):
    """corpus.txt (`documents` blank-line separated lines of random words) and a 320-token BPE
    trained on it in tmp_path/tok; returns the corpus path."""
    import random

    from ferrotune.quickstart import train_tokenizer

    rng = random.Random(0)
    words = ["salt", "amber", "wool", "figs", "glass", "rope", "honey", "tin", "boat", "sea"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(" ".join(rng.choices(words, k=rng.randint(5, 30))) for _ in range(documents))
    )
    train_tokenizer(corpus, tmp_path / "tok", vocab_size=320)
    return corpus


def test_torchrun_ferrotune_train_fsdp_equals_one_process(tmp_path):
    import subprocess
    import sys

    from ferrotune.config import load_config
    from ferrotune.train.run import train_from_config

    corpus = word_corpus_and_tokenizer(tmp_path, documents=60)
    toml = tmp_path / "run.toml"
    toml.write_text(RUN_TOML.format(tok=tmp_path / "tok", corpus=corpus, out=tmp_path / "two"))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, "-m", "ferrotune", "train", str(toml)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final train loss" in done.stdout and done.stdout.count("model:") == 1  # rank 0 reports

    # One process, the same global batch (2 rows x 2 ranks).
    overrides = ["train.strategy=none", "train.batch_size=4", f"run.output_dir={tmp_path / 'one'}"]
    one = train_from_config(load_config(toml, overrides), quiet=True)

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    assert losses("two") == pytest.approx(one.result.losses, rel=1e-5) and len(one.result.losses) == 3
    evals = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    two_eval = [r for r in evals if "eval_loss" in r][-1]
    assert two_eval["eval_loss"] == pytest.approx(one.result.eval["eval_loss"], rel=1e-5)
    assert two_eval["eval_tokens"] == one.result.eval["eval_tokens"] > 0  # both ranks' rows counted
    _assert_close_states(
        load_file(tmp_path / "two" / "final" / "model.safetensors"),
        load_file(tmp_path / "one" / "final" / "model.safetensors"),
    )
    assert (tmp_path / "two" / "final" / "tokenizer.json").exists()
    assert fd.is_sharded_checkpoint(tmp_path / "two" / "checkpoints" / "step-000002")


# --------------------------------------------------------------------------------------------------
# `ferrotune train` under FSDP from a pretrained checkpoint: loaded shard by shard
# --------------------------------------------------------------------------------------------------

LOAD_TOML = """
task = "pretrain"
seed = 4
[model]
path = "{base}"
tokenizer = "{tok}"
[data]
train = "{corpus}"
seq_len = 32
[train]
steps = 3
batch_size = 2
lr = 1e-2
warmup_steps = 1
strategy = "fsdp"
{offload}
[run]
output_dir = "{out}"
log_every = 1
tensorboard = false
plot = false
{peft}
"""
LORA_SECTION = '[peft]\nmethod = "lora"\noptions = { r = 4, alpha = 8, target_modules = "all-linear" }'
DORA_SECTION = '[peft]\nmethod = "dora"\noptions = { r = 4, alpha = 8, target_modules = "all-linear" }'
# IA3 with a trained copy of the (tied) lm_head: the copy is filled from the embedding's rows
IA3_SECTION = (
    '[peft]\nmethod = "ia3"\noptions = { target_modules = ["k_proj", "v_proj", "down_proj"], '
    'modules_to_save = ["lm_head"] }'
)
HOULSBY_SECTION = '[peft]\nmethod = "houlsby"\noptions = { bottleneck_size = 8, activation = "gelu" }'
# the prefix encoders (E' and its MLP; E) sit at the model level, outside the decoder blocks:
# the root fully_shard shards them
PREFIX_SECTION = (
    '[peft]\nmethod = "prefix"\n'
    "options = { num_virtual_tokens = 3, prefix_projection = true, encoder_hidden_size = 16 }"
)
P_TUNING_V2_SECTION = '[peft]\nmethod = "p_tuning_v2"\noptions = { num_virtual_tokens = 3 }'
PROMPT_SECTION = '[peft]\nmethod = "prompt"\noptions = { num_virtual_tokens = 3 }'
P_TUNING_SECTION = '[peft]\nmethod = "prompt"\noptions = { num_virtual_tokens = 3, encoder = "mlp", encoder_hidden_size = 16 }'
P_TUNING_LSTM_SECTION = '[peft]\nmethod = "prompt"\noptions = { num_virtual_tokens = 3, encoder = "lstm", encoder_hidden_size = 8 }'
PEFT_SECTIONS = {
    "lora": LORA_SECTION,
    "ia3": IA3_SECTION,
    "dora": DORA_SECTION,
    "houlsby": HOULSBY_SECTION,
    "prefix": PREFIX_SECTION,
    "p_tuning_v2": P_TUNING_V2_SECTION,
    "prompt": PROMPT_SECTION,
    "p_tuning": P_TUNING_SECTION,
    "p_tuning_lstm": P_TUNING_LSTM_SECTION,
}
ADAPTER_SEED = 11  # the global RNG state LoRA draws its A matrices from, the same in every run


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage an operator allocates on a real device (for a sharded
    parameter, the local shard this rank holds). A result sharing an input's storage (a view, an
    in-place update, a slice of the mapped file) allocates nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes, self.op = 0, ""

    @staticmethod
    def _storages(tree) -> list[torch.UntypedStorage]:
        from torch.distributed.tensor import DTensor
        from torch.utils._pytree import tree_leaves

        found = []
        for t in tree_leaves(tree):
            local = t.to_local() if isinstance(t, DTensor) else t
            if isinstance(local, torch.Tensor) and not local.is_meta:
                found.append(local.untyped_storage())
        return found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {s.data_ptr() for s in self._storages((args, kwargs))}
        for storage in self._storages(out):
            if storage.data_ptr() not in given and storage.nbytes() > self.nbytes:
                self.nbytes, self.op = storage.nbytes(), str(func)
        return out


def sharded_train_job(env: fd.DistEnv, out: str, method: str) -> None:
    """Runs `ferrotune train` from the config the test wrote, with two probes: the whole-model
    loader is forbidden, and the model reaching the training loop is inspected (every parameter
    a DTensor holding its local shard only; the largest tensor allocated while building it)."""
    from ferrotune.config import load_config
    from ferrotune.train import run

    def whole_model_load(*args, **kwargs):
        raise AssertionError("ferrotune.models.load.load_model: the whole model on one rank")

    allocation = LargestAllocation()
    train_loop = run.train_loop

    def inspect_then_train(model, *args, **kwargs):
        allocation.__exit__(None, None, None)
        params = dict(model.named_parameters())
        lm = getattr(model, "base_model", model)  # the CausalLM under a PrefixModel
        lm_head = getattr(lm.lm_head, "original_module", lm.lm_head)  # under a modules_to_save copy
        record = {
            "largest_allocation": allocation.nbytes,
            "largest_allocation_op": allocation.op,
            "largest_parameter": max(p.numel() * p.element_size() for p in params.values()),
            "full": {name: list(p.shape) for name, p in params.items()},
            "local": {
                name: list(p.to_local().shape) if fd._is_dtensor(p) else None for name, p in params.items()
            },
            "tied": lm_head.weight is lm.model.embed_tokens.weight,
        }
        with open(os.path.join(out, f"shards.rank{env.rank}.json"), "w") as f:
            json.dump(record, f)
        return train_loop(model, *args, **kwargs)

    run.load_model = whole_model_load  # this process only: the rank that the test spawned
    run.train_loop = inspect_then_train
    torch.manual_seed(ADAPTER_SEED)
    allocation.__enter__()
    run.train_from_config(load_config(os.path.join(out, f"{method}.toml")))


def sharded_runs_equal_one_process(tmp_path, methods: dict[str, int]) -> None:
    """For each method (-> the number of tensors its final file holds): `ferrotune train` on 2
    ranks loads shard by shard (`sharded_train_job`) and gives the losses and final weights of
    one process with the whole model and the same global batch."""
    from ferrotune.config import load_config
    from ferrotune.models import CausalLM, LlamaConfig, save_model
    from ferrotune.train.run import train_from_config

    corpus = word_corpus_and_tokenizer(tmp_path, documents=40)
    base = CausalLM(
        LlamaConfig(
            vocab_size=321,  # odd: the ranks' shards of the embedding differ by a row
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    base.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    save_model(base, tmp_path / "base")

    for method, n_tensors in methods.items():
        job = f"{SHARDED_JOB}{method}"
        (tmp_path / job).mkdir()
        peft = PEFT_SECTIONS.get(method, "")
        offload = "fsdp_cpu_offload = true" if method == "lora" else ""  # shards kept on the CPU
        text = dict(base=tmp_path / "base", tok=tmp_path / "tok", corpus=corpus, peft=peft, offload=offload)
        toml = tmp_path / job / f"{method}.toml"
        toml.write_text(LOAD_TOML.format(out=tmp_path / job / "run", **text))
        out = run_ranks(job, tmp_path)

        # One process, the whole model, the same global batch (2 rows x 2 ranks).
        torch.manual_seed(ADAPTER_SEED)
        one_dir = tmp_path / f"one-{method}"
        overrides = ["train.strategy=none", "train.fsdp_cpu_offload=false", "train.batch_size=4"]
        one = train_from_config(load_config(toml, [*overrides, f"run.output_dir={one_dir}"]), quiet=True)
        lines = (tmp_path / job / "run" / "metrics.jsonl").read_text().splitlines()
        two = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
        assert two == pytest.approx(one.result.losses, rel=1e-5) and len(two) == 3, method
        weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
        got, want = (
            load_file(tmp_path / job / "run" / "final" / weights),
            load_file(one_dir / "final" / weights),
        )
        assert set(got) == set(want) and len(got) == n_tensors, (method, sorted(got))
        _assert_close_states(got, want)

        for rank in (0, 1):
            shards = read_json(os.path.join(out, f"shards.rank{rank}.json"))
            assert shards["tied"]
            # every parameter sharded on dim 0 as FSDP2 splits it: rank 0 ceil(rows / 2) rows, rank 1 the rest
            for name, (rows, *rest) in shards["full"].items():
                half = (rows + 1) // 2
                assert shards["local"][name] == [half if rank == 0 else rows - half, *rest], name
            # nothing larger than a shard was allocated on the rank while loading: the biggest is
            # this rank's rows of the embedding (321 x 32 fp32), never a whole parameter
            assert shards["largest_parameter"] == 321 * 32 * 4
            assert 0 < shards["largest_allocation"] <= 161 * 32 * 4, shards["largest_allocation_op"]


def test_fsdp_train_loads_shard_by_shard_and_equals_one_process(tmp_path):
    # full: 2 x 9 + 2 tensors; LoRA: A and B of 7 linears x 2 layers; IA3: 3 vectors x 2 layers
    # and the lm_head copy; DoRA: A, B and m of 7 linears x 2 layers
    sharded_runs_equal_one_process(
        tmp_path, {"full": 2 * 9 + 2, "lora": 2 * 7 * 2, "ia3": 2 * 3 + 1, "dora": 2 * 7 * 3}
    )


def test_fsdp_train_loads_bottleneck_and_prefix_shard_by_shard(tmp_path):
    # Houlsby: down and up (weight, bias) after attention and after the MLP of 2 layers; prefix
    # tuning and P-tuning v2: E (the encoder's output, as PEFT saves it)
    sharded_runs_equal_one_process(tmp_path, {"houlsby": 2 * 2 * 4, "prefix": 1, "p_tuning_v2": 1})


# --------------------------------------------------------------------------------------------------
# PackedDataset (ferrotune.data): each rank reads its own rows of the prepared shards
# --------------------------------------------------------------------------------------------------


def prepared_folder(path, shard_rows=(7, 6), seq_len=8):
    """A folder in `ferrotune prepare`'s layout whose row r holds r in every input id."""
    from ferrotune.io import save_safetensors

    path.mkdir()
    shards, start = [], 0
    for k, rows in enumerate(shard_rows):
        ids = torch.arange(start, start + rows, dtype=torch.int32)[:, None].expand(rows, seq_len).contiguous()
        tensors = {
            "input_ids": ids,
            "labels": ids.clone(),
            "position_ids": torch.arange(seq_len, dtype=torch.int32).expand(rows, seq_len).contiguous(),
            "document_ids": torch.zeros(rows, seq_len, dtype=torch.int32),
        }
        save_safetensors(tensors, path / f"shard-{k:05d}.safetensors")
        shards.append({"file": f"shard-{k:05d}.safetensors", "rows": rows})
        start += rows
    manifest = {
        "format": "ferrotune.packed",
        "format_version": 1,
        "seq_len": seq_len,
        "lanes": [""],
        "shards": shards,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return start


@pytest.mark.parametrize("shuffle", [False, True])
def test_packed_dataset_ranks_read_every_row_once(tmp_path, shuffle):
    from ferrotune.data import PackedDataset, collate

    total = prepared_folder(tmp_path / "prepared")  # 13 rows: not a multiple of 2, 3 or 4
    for world in (1, 2, 3, 4):
        ranks = [
            PackedDataset(tmp_path / "prepared", shuffle=shuffle, seed=1, rank=r, world_size=world)
            for r in range(world)
        ]
        assert len({len(d) for d in ranks}) == 1  # the same number of steps on every rank
        seen: list[int] = []
        for d in ranks:
            for i in range(len(d)):
                row = d[i]
                if int(d.global_index(i)) < 0:  # a rank short of rows ends on a padding row
                    assert (row["labels"] == -100).all() and (row["document_ids"] == -1).all()
                else:
                    assert int(row["input_ids"][0]) == d.global_index(i)
                    seen.append(d.global_index(i))
        assert sorted(seen) == list(range(total))  # no overlap, no row lost

        # Step s of rank r (b rows each) holds rows s*W*b .. (s+1)*W*b - 1 of the one-process order.
        one = PackedDataset(tmp_path / "prepared", shuffle=shuffle, seed=1)
        b = 2
        for step in range(len(ranks[0]) // b):
            local = [d.global_index(i) for d in ranks for i in range(step * b, (step + 1) * b)]
            want = [one.global_index(i) for i in range(step * world * b, min((step + 1) * world * b, total))]
            assert sorted(x for x in local if x >= 0) == sorted(want)
        batch = collate([ranks[-1][i] for i in range(len(ranks[-1]))])
        assert batch["input_ids"].dtype == torch.int64 and batch["document_ids"].dtype == torch.int32


def test_fsdp_trains_prompt_tuning_and_p_tuning_as_one_process(tmp_path):
    # prompt tuning and P-tuning (MLP encoder): E, as PEFT saves it
    sharded_runs_equal_one_process(tmp_path, {"prompt": 1, "p_tuning": 1, "p_tuning_lstm": 1})

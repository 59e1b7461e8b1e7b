"""The training loop: gradient accumulation equals one large batch of the same tokens; a killed and
resumed run draws the same loss curve as an uninterrupted one; checkpoints are atomic; the lr
schedule, evaluation and logs are what they claim."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from ferrotune.config import Config, RunConfig, TrainConfig
from ferrotune.models.llama import CausalLM, LlamaConfig
from ferrotune.train.loop import (
    RowBatches,
    accumulate_gradients,
    collate,
    evaluate,
    latest_checkpoint,
    learning_rate,
    train_loop,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VOCAB = 41
CPU = torch.device("cpu")


def tiny_model(seed: int = 0) -> CausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(seed)
    model = CausalLM(config)
    model.init_weights(std=0.05)
    return model


def packed_rows(n: int, length: int = 24, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Rows in the batch contract: several documents per row, prompt tokens masked, padding at the end
    (so rows hold different numbers of trained tokens)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.zeros(length, dtype=torch.long)
        labels = torch.full((length,), -100, dtype=torch.long)
        positions = torch.zeros(length, dtype=torch.long)
        documents = torch.full((length,), -1, dtype=torch.int32)
        start, doc = 0, 0
        while True:
            size = int(torch.randint(4, 12, (1,), generator=g))
            if start + size > length - int(torch.randint(0, 6, (1,), generator=g)):
                break
            tokens = torch.randint(1, VOCAB, (size,), generator=g)
            prompt = int(torch.randint(1, size - 1, (1,), generator=g))
            ids[start : start + size] = tokens
            labels[start + prompt - 1 : start + size - 1] = tokens[prompt:]
            positions[start : start + size] = torch.arange(size)
            documents[start : start + size] = doc
            start, doc = start + size, doc + 1
        rows.append(
            {"input_ids": ids, "labels": labels, "position_ids": positions, "document_ids": documents}
        )
    return rows


def grads(model: CausalLM) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_accumulation_equals_one_large_batch():
    rows = packed_rows(4)
    counts = [int((r["labels"] != -100).sum()) for r in rows]
    assert len(set(counts)) > 1  # unequal token counts, so per-micro-batch means would be wrong

    model = tiny_model()
    big = collate(rows)
    logits = model(big["input_ids"], position_ids=big["position_ids"], document_ids=big["document_ids"])
    reference_loss = F.cross_entropy(logits.view(-1, VOCAB), big["labels"].view(-1), ignore_index=-100)
    reference_loss.backward()
    reference = grads(model)

    for split in ([rows[:2], rows[2:]], [[r] for r in rows], [rows[:1], rows[1:]]):
        model.zero_grad()
        loss, tokens = accumulate_gradients(model, [collate(part) for part in split], CPU)
        assert tokens == sum(counts)
        torch.testing.assert_close(loss, reference_loss.detach(), rtol=1e-6, atol=1e-6)
        for name, g in grads(model).items():
            torch.testing.assert_close(g, reference[name], rtol=1e-5, atol=1e-7)

    # The naive average of per-micro-batch means is measurably different here.
    model.zero_grad()
    for part in ([rows[0]], rows[1:]):
        batch = collate(part)
        logits = model(
            batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"]
        )
        (F.cross_entropy(logits.view(-1, VOCAB), batch["labels"].view(-1), ignore_index=-100) / 2).backward()
    naive = grads(model)
    assert not all(torch.allclose(naive[n], reference[n], rtol=1e-4) for n in reference)


def make_config(tmp_path, **train) -> Config:
    return Config(
        seed=3,
        train=TrainConfig(
            **{
                "steps": 6,
                "batch_size": 2,
                "grad_accum": 2,
                "lr": 3e-3,
                "warmup_steps": 2,
                "weight_decay": 0.1,
                "max_grad_norm": 0.5,
                **train,
            }
        ),
        run=RunConfig(output_dir=str(tmp_path), log_every=1, save_every=2, tensorboard=False, plot=False),
    )


def test_loop_with_accumulation_matches_one_large_batch(tmp_path):
    rows = packed_rows(8)
    a = train_loop(tiny_model(), make_config(tmp_path / "a"), RowBatches(rows, 2, shuffle=False), quiet=True)
    b = train_loop(
        tiny_model(),
        make_config(tmp_path / "b", batch_size=4, grad_accum=1),
        RowBatches(rows, 4, shuffle=False),
        quiet=True,
    )
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=1e-6)
    assert a.losses[-1] < a.losses[0]


class Killed(Exception):
    pass


def test_resume_gives_the_same_loss_curve(tmp_path):
    rows = packed_rows(10, seed=1)
    full = train_loop(tiny_model(), make_config(tmp_path / "full"), RowBatches(rows, 2, seed=5), quiet=True)
    assert len(full.losses) == 6

    def kill_at_five(step: int, loss: float) -> None:
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train_loop(
            tiny_model(),
            make_config(tmp_path / "cut"),
            RowBatches(rows, 2, seed=5),
            on_step=kill_at_five,
            quiet=True,
        )
    assert latest_checkpoint(tmp_path / "cut").name == "step-000004"
    (tmp_path / "cut" / "checkpoints" / ".step-000006.tmp").mkdir()  # a half-written checkpoint
    assert latest_checkpoint(tmp_path / "cut").name == "step-000004"

    config = make_config(tmp_path / "cut")
    config.run.resume = True
    fresh = tiny_model(seed=123)  # different weights: everything must come from the checkpoint
    resumed = train_loop(fresh, config, RowBatches(rows, 2, seed=5), quiet=True)
    assert resumed.resumed_from == 4
    assert resumed.losses == full.losses[4:]  # bit for bit on CPU

    logged = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logged if "loss" in r] == full.losses
    kept = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("step-*"))
    assert kept == ["step-000002", "step-000004"]


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1, schedule="cosine")
    lrs = [learning_rate(s, cfg) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))
    cfg.schedule = "linear"
    assert learning_rate(6, cfg) == pytest.approx(1.0 - 0.9 * 0.5)
    assert learning_rate(10, cfg) == pytest.approx(0.1)
    cfg.schedule = "cosine"
    assert learning_rate(10, cfg) == pytest.approx(0.1)


def test_evaluate_is_token_mean_cross_entropy():
    model = tiny_model()
    rows = packed_rows(6, seed=2)
    result = evaluate(model, RowBatches(rows, 3, shuffle=False).epoch(0), CPU, "fp32")
    big = collate(rows)
    with torch.no_grad():
        logits = model(big["input_ids"], position_ids=big["position_ids"], document_ids=big["document_ids"])
    expected = F.cross_entropy(logits.view(-1, VOCAB), big["labels"].view(-1), ignore_index=-100)
    assert result["eval_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert result["eval_ppl"] == pytest.approx(math.exp(float(expected)), rel=1e-5)
    assert result["eval_tokens"] == int((big["labels"] != -100).sum())


def test_progress_line_and_metrics(tmp_path, capsys):
    config = make_config(tmp_path, steps=4)
    config.run.log_every = 2
    rows = packed_rows(8)
    result = train_loop(tiny_model(), config, RowBatches(rows, 2), eval_batches=RowBatches(rows[:4], 2))
    err = capsys.readouterr().err
    assert "step 2/4 | loss" in err and "tok/s" in err and "ETA" in err and "mem" in err
    assert "eval at step 4" in err
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert records[-1]["step"] == 4 and "eval_ppl" in records[-1]
    # 4 steps x 2 micro-batches x 2 rows = two epochs of the 8 rows
    assert result.tokens == 2 * sum(int((r["document_ids"] >= 0).sum()) for r in rows)


def test_bf16_autocast_step_is_close_to_fp32():
    batch = collate(packed_rows(2))
    model = tiny_model()
    fp32, _ = accumulate_gradients(model, [batch], CPU, "fp32")
    fp32_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    bf16, _ = accumulate_gradients(model, [batch], CPU, "bf16-mixed")
    assert abs(float(bf16) - float(fp32)) < 0.02 * float(fp32)
    cosine = F.cosine_similarity(model.lm_head.weight.grad.flatten(), fp32_grad.flatten(), dim=0)
    assert cosine > 0.99
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_chunked_cross_entropy_equals_full_logits():
    from ferrotune.train.losses import chunked_cross_entropy_sum, token_cross_entropy_sum

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels[0, :4] = -100
    full = token_cross_entropy_sum(hidden @ weight.T, labels)
    full.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    chunked = chunked_cross_entropy_sum(hidden, weight, labels, chunk_tokens=4)
    chunked.backward()
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(hidden.grad, grads[0])
    torch.testing.assert_close(weight.grad, grads[1])


def test_tensorboard_events_and_loss_curve_png(tmp_path):
    """With tensorboard and matplotlib installed (both in the test environment) a run writes
    TensorBoard scalars for every logged metric and a loss-curve PNG at the end."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(tmp_path, steps=4)
    config.run.tensorboard = True
    config.run.plot = True
    rows = packed_rows(8)
    result = train_loop(
        tiny_model(), config, RowBatches(rows, 2), eval_batches=RowBatches(rows[:4], 2), quiet=True
    )
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    torch.testing.assert_close(
        torch.tensor([v for _, v in losses]), torch.tensor(result.losses), rtol=1e-5, atol=1e-6
    )
    assert "eval_loss" in events.Tags()["scalars"]

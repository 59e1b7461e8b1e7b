"""Multi-task training: per-task loss weights (and the chunked LM-head loss with per-token
weights), per-task evaluation, task-routed adapters (LoRA and prompt tuning) that load in HF PEFT,
and three synthetic tasks learned from one mixture.

The tasks, on lists of 3-5 "words" (token ids 3..18):
    reverse   REV w1 w2 w3 SEP -> w3 w2 w1
    sort      SORT w1 w2 w3 SEP -> the words in ascending order
    copy      COPY w1 w2 w3 SEP -> w1 w2 w3
in unequal amounts. One tiny Llama trained in full on the mixture must reach each task's exact
match bar (greedy, KV cache); then task-routed LoRA adapters over that model, given the prompts
WITHOUT the instruction token, must learn all three: the prompts of the three tasks are then
identical, so only the routing can tell them apart.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import tomllib
import warnings

import ferrotune.peft as fp
import pytest
import torch
import transformers
from ferrotune.config import Config, MultitaskConfig, RunConfig, TrainConfig
from ferrotune.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from ferrotune.models.llama import CausalLM, LlamaConfig
from ferrotune.models.load import save_model
from ferrotune.peft.prefix import PrefixModel
from ferrotune.peft.routed import (
    RoutedLoraLinear,
    apply_routed,
    load_routed,
    routed_layers,
    routed_lora_reference,
    save_routed,
)
from ferrotune.train.loop import RowBatches, accumulate_gradients, train_loop
from ferrotune.train.losses import token_cross_entropy_per_token
from ferrotune.train.multitask import TaskEvaluator, task_weight_vector, token_weights

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", module="peft")

PAD, SEP, EOS = 0, 1, 2
WORDS = list(range(3, 19))
REV, SORT, COPY = 19, 20, 21
UNK = 22  # the tokenizer's unknown token (never in the data)
VOCAB = 23
ROW = 64
TASKS = ["reverse", "sort", "copy"]
INSTRUCTIONS = [REV, SORT, COPY]
SIZES = [3000, 1500, 600]  # unequal task sizes
Example = tuple[int, list[int], list[int]]  # (task index, prompt, answer + EOS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and leave the other core to other jobs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def answer(task: int, words: list[int]) -> list[int]:
    return [list(reversed(words)), sorted(words), list(words)][task]


def example(rng: random.Random, task: int, instructed: bool = True) -> Example:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
    head = [INSTRUCTIONS[task]] if instructed else []
    return task, [*head, *words, SEP], [*answer(task, words), EOS]


def pack_tasks(examples: list[Example]) -> list[dict[str, torch.Tensor]]:
    """Greedy packing into rows of ROW tokens, answer-only loss, task id per token (-1: padding)."""
    rows: list[list[Example]] = [[]]
    for ex in examples:
        if sum(len(p) + len(a) for _, p, a in rows[-1]) + len(ex[1]) + len(ex[2]) > ROW:
            rows.append([])
        rows[-1].append(ex)
    out = []
    for docs in rows:
        ids = torch.full((ROW,), PAD, dtype=torch.long)
        labels = torch.full((ROW,), -100, dtype=torch.long)
        positions = torch.zeros(ROW, dtype=torch.long)
        documents = torch.full((ROW,), -1, dtype=torch.int32)
        tasks = torch.full((ROW,), -1, dtype=torch.long)
        start = 0
        for d, (task, prompt, ans) in enumerate(docs):
            tokens = torch.tensor(prompt + ans)
            n = len(tokens)
            ids[start : start + n] = tokens
            labels[start + len(prompt) - 1 : start + n - 1] = tokens[len(prompt) :]
            positions[start : start + n] = torch.arange(n)
            documents[start : start + n] = d
            tasks[start : start + n] = task
            start += n
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "position_ids": positions,
                "document_ids": documents,
                "task_ids": tasks,
            }
        )
    return out


def tiny_llama(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=ROW,
        )
    )
    model.init_weights()
    return model


def run_config(out: str, steps: int, lr: float, weights: dict[str, float] | None = None) -> Config:
    return Config(
        task="sft",
        seed=0,
        train=TrainConfig(steps=steps, batch_size=16, lr=lr, warmup_steps=10, weight_decay=0.01),
        run=RunConfig(output_dir=out, log_every=1000, tensorboard=True, plot=False),
        multitask=MultitaskConfig(tasks=TASKS, loss_weights=weights or {}),
    )


def held_out(seed: int, instructed: bool, n: int = 60) -> dict[str, list[tuple[list[int], list[int]]]]:
    rng = random.Random(seed)
    return {
        name: [(p, a[:-1]) for _, p, a in (example(rng, k, instructed) for _ in range(n))]
        for k, name in enumerate(TASKS)
    }


def evaluator(sets, eval_rows=None) -> TaskEvaluator:  # type: ignore[no-untyped-def]
    batches = RowBatches(eval_rows, 16, shuffle=False) if eval_rows else None
    return TaskEvaluator(
        TASKS, batches, sets, device=torch.device("cpu"), stop_tokens=[EOS], pad_id=PAD, max_new_tokens=6
    )


# ----------------------------------------------------------------------------------------------
# Loss weights
# ----------------------------------------------------------------------------------------------


def test_weighted_loss_is_the_weighted_token_mean_over_the_step() -> None:
    """L = Σ w_t CE_t / Σ w_t over both micro-batches; gradients equal autograd of that formula."""
    torch.manual_seed(0)
    model = tiny_llama()
    rng = random.Random(3)
    rows = pack_tasks([example(rng, k) for k in (0, 1, 2) * 12])
    micro = [
        RowBatches(rows, 2, shuffle=False).epoch(0).__next__(),
        RowBatches(rows[2:], 2, shuffle=False).epoch(0).__next__(),
    ]
    lam = task_weight_vector(TASKS, {"reverse": 3.0, "copy": 0.5})
    assert lam.tolist() == [3.0, 1.0, 0.5]
    loss, _ = accumulate_gradients(model, micro, torch.device("cpu"), task_weights=lam)
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    num = den = 0.0
    for mb in micro:
        w = token_weights(mb, lam)
        per_token = token_cross_entropy_per_token(
            model(mb["input_ids"], position_ids=mb["position_ids"], document_ids=mb["document_ids"]),
            mb["labels"],
        )
        num, den = num + (w * per_token).sum(), den + w.sum()
    reference = num / den
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-7)
    # every weight 1: the plain token mean
    plain, _ = accumulate_gradients(model, micro, torch.device("cpu"))
    ones, _ = accumulate_gradients(model, micro, torch.device("cpu"), task_weights=torch.ones(3))
    torch.testing.assert_close(plain, ones)


def test_model_loss_takes_token_weights_on_both_head_paths() -> None:
    """`model(..., labels=, token_weights=)`: the chunked head and a wrapped head (LoRA on lm_head,
    full logits) both give Σ_t w_t CE_t."""
    rng = random.Random(4)
    batch = (
        RowBatches(pack_tasks([example(rng, k) for k in (0, 1, 2) * 4]), 2, shuffle=False).epoch(0).__next__()
    )
    w = token_weights(batch, torch.tensor([2.0, 0.5, 1.0]))
    inputs = {"position_ids": batch["position_ids"], "document_ids": batch["document_ids"]}
    for model in (tiny_llama(), fp.apply_peft(tiny_llama(), fp.LoraConfig(r=2, target_modules=["lm_head"]))):
        with torch.no_grad():
            logits = model(batch["input_ids"], **inputs)
            want = (token_cross_entropy_per_token(logits, batch["labels"]) * w).sum()
            got = model(batch["input_ids"], **inputs, labels=batch["labels"], token_weights=w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_linear_cross_entropy_takes_token_weights() -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (300,), generator=g)
    labels[::7] = -100
    w = torch.rand(300, generator=g) * 3
    fast = linear_cross_entropy(hidden, weight, labels, chunk_size=64, token_weights=w)
    dh, dw = torch.autograd.grad(fast, (hidden, weight))
    ref = linear_cross_entropy_reference(hidden, weight, labels, token_weights=w)
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(dh, rh)
    torch.testing.assert_close(dw, rw)
    # the reference is the formula: Σ w CE / Σ w over trained tokens
    ce = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="none")
    keep = labels != -100
    torch.testing.assert_close(ref, (w * ce)[keep].sum() / w[keep].sum())


# ----------------------------------------------------------------------------------------------
# Routed adapters
# ----------------------------------------------------------------------------------------------


def routed_lora_model(seed: int = 1) -> fp.PrefixModel:
    model = tiny_llama(seed)
    model = fp.apply_peft(model, fp.LoraConfig(r=4, alpha=8, target_modules="all-linear"), "shared")
    routed = apply_routed(model, TASKS, fp.LoraConfig(r=2, alpha=4, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in routed.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return routed.eval()


def test_routed_lora_equals_the_per_task_loop_and_trains_only_its_tasks_adapter() -> None:
    routed = routed_lora_model()
    layer = routed_layers(routed)[0][1]
    assert isinstance(layer, RoutedLoraLinear)
    x = torch.randn(3, 10, 64)
    layer.task_ids = torch.tensor([[0] * 5 + [1] * 5, [2] * 10, [-1] * 3 + [1] * 7])  # per token
    torch.testing.assert_close(layer(x), routed_lora_reference(layer, x))
    layer.task_ids = torch.tensor([2, 0, 1])  # per row
    torch.testing.assert_close(layer(x), routed_lora_reference(layer, x))
    # a batch of task-1 tokens only: no gradient reaches tasks 0 and 2
    ids = torch.randint(3, 19, (2, 8))
    routed(ids, task_ids=torch.ones(2, 8, dtype=torch.long)).sum().backward()
    grads = layer.lora_A.grad.abs().sum(dim=(1, 2))
    assert grads[1] > 0 and grads[0] == 0 and grads[2] == 0
    # gradient checkpointing recomputes in backward with the routing the forward used
    mixed = torch.tensor([[0] * 4 + [2] * 4, [1] * 8])
    routed.zero_grad()
    routed.train()
    routed(ids, task_ids=mixed).square().mean().backward()
    plain = [p.grad.clone() for p in routed.parameters() if p.requires_grad]
    routed.zero_grad()
    routed.gradient_checkpointing = True
    routed(ids, task_ids=mixed).square().mean().backward()
    for want, p in zip(plain, [p for p in routed.parameters() if p.requires_grad], strict=True):
        torch.testing.assert_close(p.grad, want)


def test_routed_lora_saves_as_peft_adapters_that_load_in_peft_and_back(tmp_path) -> None:
    routed = routed_lora_model()
    base_dir = tmp_path / "base"
    save_model(tiny_llama(1), base_dir)  # the same random base as routed_lora_model(1)
    out = save_routed(routed, tmp_path / "adapters", fp.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    assert sorted(p.name for p in (out / "tasks").iterdir()) == sorted(TASKS)
    for folder in [out / "shared", *(out / "tasks" / t for t in TASKS)]:
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, str(out / "shared"), adapter_name="shared")
    for task in TASKS:
        theirs.load_adapter(str(out / "tasks" / task), adapter_name=task)
    theirs.eval()
    ids = torch.randint(3, 19, (2, 9), generator=torch.Generator().manual_seed(2))
    back = load_routed(tiny_llama(1), out).eval()
    outputs = []
    with torch.no_grad():
        for k, task in enumerate(TASKS):
            ours = routed(ids, task_ids=torch.full((2,), k))
            theirs.base_model.set_adapter(["shared", task])  # PEFT: several LoRA adapters active at once
            torch.testing.assert_close(ours, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(back(ids, task_ids=torch.full((2,), k)), ours)
            outputs.append(ours)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2  # the tasks' adapters really differ


def test_routed_prompts_route_each_row_to_its_tasks_prompt_and_load_in_peft(tmp_path) -> None:
    model = tiny_llama(2)
    routed = apply_routed(model, TASKS, fp.PromptConfig(num_virtual_tokens=3)).eval()
    ids = torch.randint(3, 19, (3, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mixed = routed(ids, task_ids=torch.tensor([2, 0, 1]))  # one forward, three tasks
    out = save_routed(routed, tmp_path / "prompts")
    base_dir = tmp_path / "base"
    save_model(tiny_llama(2), base_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    for row, k in enumerate([2, 0, 1]):
        # ferrotune's single-prompt model and PEFT's prompt tuning, each with task k's prompt alone
        single = fp.load_adapter(tiny_llama(2), str(out / "tasks" / TASKS[k]))
        assert isinstance(single, PrefixModel)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(out / "tasks" / TASKS[k])).eval()
        with torch.no_grad():
            torch.testing.assert_close(mixed[row : row + 1], single(ids[row : row + 1]), rtol=1e-4, atol=1e-5)
            peft_logits = theirs(input_ids=ids[row : row + 1]).logits[:, 3:]
        torch.testing.assert_close(mixed[row : row + 1], peft_logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="several tasks"):
        routed(ids, task_ids=torch.tensor([[0] * 4 + [1] * 3] * 3))


# ----------------------------------------------------------------------------------------------
# Learning three tasks from one mixture
# ----------------------------------------------------------------------------------------------


LETTERS = "abcdefghijklmnop"  # the 16 words as text: token id 3 + index
NAMES = ["REV", "SORT", "COPY"]


def make_tokenizer(folder) -> None:  # type: ignore[no-untyped-def]
    """A word-level tokenizer whose ids are the test's token ids (EOS "</s>" = 2, SEP "=" = 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "=": SEP, "</s>": EOS, **{c: 3 + i for i, c in enumerate(LETTERS)}}
    vocab.update({name: token for name, token in zip(NAMES, INSTRUCTIONS, strict=True)}, **{"<unk>": UNK})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))


def as_text(ids: list[int]) -> str:
    return " ".join(
        {PAD: "<pad>", SEP: "=", EOS: "</s>", **dict(zip(INSTRUCTIONS, NAMES, strict=True))}.get(t)
        or LETTERS[t - 3]
        for t in ids
    )


MIX_WEIGHTS = {"reverse": 3.0, "sort": 2.0, "copy": 1.0}
MIX_TOTAL = 4800  # reverse 2400 of 3000 available, sort 1600 of 1500 (repeats), copy 800 of 600


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """The three sources (unequal sizes, held-out prompts removed) sampled by weight through the
    data pipeline (`[[data.sources]]` -> Rust prepare -> shards with task_ids)."""
    from ferrotune.config import DataConfig, DataSource
    from ferrotune.train.run import mixture_rows

    root = tmp_path_factory.mktemp("mixture")
    make_tokenizer(root / "tok")
    rng = random.Random(0)
    sets = held_out(100, instructed=True)
    seen = {tuple(p) for s in sets.values() for p, _ in s}
    sources = []
    for k, (name, size) in enumerate(zip(TASKS, SIZES, strict=True)):
        with (root / f"{name}.jsonl").open("w") as f:
            for _ in range(size):
                _, prompt, ans = example(rng, k)
                if tuple(prompt) not in seen:
                    f.write(
                        json.dumps({"prompt": as_text(prompt), "completion": " " + as_text(ans[:-1])}) + "\n"
                    )
        sources.append(
            DataSource(
                name=name, path=str(root / f"{name}.jsonl"), weight=MIX_WEIGHTS[name], loss="completion"
            )
        )
    config = Config(
        task="sft",
        data=DataConfig(sources=sources, mixing="weights", mix_total=MIX_TOTAL, seq_len=ROW),
        run=RunConfig(output_dir=str(root / "run")),
    )
    rows = mixture_rows(config, root / "tok")
    return rows, sets, root


def test_mixture_through_the_pipeline_has_its_target_shares(mixture) -> None:
    rows, _, _ = mixture
    assert rows.task_names == TASKS
    report = rows.manifest["mixture"]["tasks"]
    total = sum(MIX_WEIGHTS.values())
    documents = dict.fromkeys(range(3), 0)  # counted from the shards' task ids, row by row
    for i in range(len(rows)):
        row = rows[i]
        ids, docs = row["task_ids"], row["document_ids"]
        for d in docs[docs >= 0].unique().tolist():
            tasks = ids[docs == d].unique().tolist()
            assert len(tasks) == 1  # a document has one task
            documents[tasks[0]] += 1
    for k, entry in enumerate(report):
        target = MIX_WEIGHTS[TASKS[k]] / total
        realised = documents[k] / sum(documents.values())
        print(f"{TASKS[k]}: target {target:.3f}, realised {realised:.3f} ({documents[k]} examples)")
        assert entry["target_share"] == pytest.approx(target)
        assert abs(realised - target) <= 0.02
        assert entry["example_share"] == pytest.approx(realised, abs=1e-9)


@pytest.fixture(scope="module")
def mixture_model(mixture):
    """One model trained in full on the pipeline's mixture rows."""
    rows, sets, root = mixture
    rng = random.Random(5)
    eval_rows = pack_tasks([example(rng, k) for k in (0, 1, 2) * 30])
    model = tiny_llama(0)
    config = run_config(str(root / "train"), 300, 3e-3, {"sort": 2.0})  # sort is the harder task
    result = train_loop(
        model,
        config,
        RowBatches(rows, 16, seed=0),
        task_weights=task_weight_vector(TASKS, config.multitask.loss_weights),
        evaluator=evaluator(sets, eval_rows),
        quiet=True,
    )
    return model, result, root / "train"


BARS = {"reverse": 0.8, "sort": 0.8, "copy": 0.8}


def test_one_model_trained_on_the_mixture_passes_each_tasks_bar(mixture_model) -> None:
    _, result, out = mixture_model
    metrics = result.eval
    print({k: round(v, 3) for k, v in metrics.items()})
    for task, bar in BARS.items():
        assert metrics[f"eval/{task}/exact_match"] >= bar, (task, metrics)
        assert metrics[f"eval/{task}/accuracy"] >= 0.9
        assert metrics[f"eval/{task}/loss"] < 0.5
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(f"eval/{t}/exact_match" in r for r in logged for t in TASKS)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"]
    assert {f"eval/{t}/{m}" for t in TASKS for m in ("loss", "accuracy", "exact_match")} <= set(tags)


ROUTED = {  # per-task adapter, learning rate, steps
    "lora": (fp.LoraConfig(r=4, alpha=8, target_modules="all-linear"), 1e-2, 150),
    "prompt": (fp.PromptConfig(num_virtual_tokens=2), 3e-2, 150),
}


@pytest.mark.parametrize("method", list(ROUTED))
def test_routed_adapters_learn_all_three_tasks_from_identical_prompts(
    method, mixture_model, tmp_path
) -> None:
    """Shared LoRA + one adapter per task over the mixture model, prompts without the
    instruction token: only the routing tells the tasks apart. Prompt tuning needs one task per
    row, so its rows are packed task by task."""
    task_config, lr, steps = ROUTED[method]
    base, _, _ = mixture_model
    plain = held_out(200, instructed=False)
    seen = {tuple(p) for s in plain.values() for p, _ in s}
    before = evaluator(plain)(base)
    # without the instruction token the base cannot tell the tasks apart: at most one task right
    assert sum(before[f"eval/{t}/exact_match"] >= 0.5 for t in TASKS) <= 1, before
    rng = random.Random(1)
    examples = [example(rng, k, instructed=False) for k, n in enumerate(SIZES) for _ in range(n)]
    examples = [e for e in examples if tuple(e[1]) not in seen]
    if method == "lora":
        rng.shuffle(examples)
        rows = pack_tasks(examples)  # rows mix tasks: LoRA routes per token
    else:
        rows = [r for k in range(3) for r in pack_tasks([e for e in examples if e[0] == k])]
    model = fp.apply_peft(
        copy.deepcopy(base), fp.LoraConfig(r=4, alpha=8, target_modules="all-linear"), "shared"
    )
    torch.manual_seed(1)
    routed = apply_routed(model, TASKS, copy.deepcopy(task_config))
    result = train_loop(
        routed,
        run_config(str(tmp_path), steps, lr),
        RowBatches(rows, 16, seed=1),
        evaluator=evaluator(plain),
        quiet=True,
    )
    print(
        method,
        {k: round(v, 3) for k, v in before.items()},
        "->",
        {k: round(v, 3) for k, v in result.eval.items()},
    )
    for task in TASKS:
        assert result.eval[f"eval/{task}/exact_match"] >= 0.8, (task, result.eval)


def test_ferrotune_train_runs_a_routed_mixture_from_the_cli(mixture, tmp_path, capsys) -> None:
    """`ferrotune train` with [[data.sources]], a shared LoRA and routed per-task LoRA: per-task
    eval in the summary and the logs, final/shared + final/tasks/<name> loadable back."""
    from ferrotune.cli import main

    _, sets, root = mixture
    with (tmp_path / "sort_eval.jsonl").open("w") as f:
        for prompt, completion in sets["sort"][:20]:
            f.write(json.dumps({"prompt": as_text(prompt), "completion": as_text(completion)}) + "\n")
    sources = "\n".join(
        f'[[data.sources]]\nname = "{t}"\npath = "{root / (t + ".jsonl")}"\nweight = {MIX_WEIGHTS[t]}\nloss = "completion"'
        for t in TASKS
    )
    init = "{ vocab_size = 23, hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2 }"
    (tmp_path / "run.toml").write_text(
        f"""
task = "sft"
[model]
init = {init}
tokenizer = "{root / "tok"}"
[data]
seq_len = 64
eval_fraction = 0.1
mixing = "weights"
mix_total = 600
{sources}
[train]
steps = 4
batch_size = 4
lr = 1e-3
[run]
output_dir = "{tmp_path / "run"}"
log_every = 2
plot = false
[peft]
method = "lora"
options = {{ r = 4, alpha = 8, target_modules = "all-linear" }}
[multitask]
routed = true
task_options = {{ r = 2, alpha = 4 }}
loss_weights = {{ sort = 2.0 }}
exact_match = {{ sort = "{tmp_path / "sort_eval.jsonl"}" }}
max_new_tokens = 6
"""
    )
    assert main(["train", str(tmp_path / "run.toml"), "run.save_every=2"]) == 0
    capsys.readouterr()
    # the routed adapters' checkpoint resumes: the step-2 checkpoint, then the same last 2 steps
    first = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(tmp_path / "run" / "final")
    assert main(["train", str(tmp_path / "run.toml"), "run.save_every=2", "run.resume=true"]) == 0
    captured = capsys.readouterr()
    assert "resumed from" in captured.err
    again = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = lambda records: [(r["step"], round(r["loss"], 5)) for r in records if "loss" in r]  # noqa: E731
    assert losses(again) == losses(first)
    out = captured.out
    print(captured.err, out)
    for task in TASKS:
        assert f"eval task {task} | loss" in out
    assert "exact_match" in out
    final = tmp_path / "run" / "final"
    assert json.loads((final / "routing.json").read_text())["tasks"] == TASKS
    assert json.loads((final / "shared" / "adapter_config.json").read_text())["r"] == 4
    for task in TASKS:
        assert json.loads((final / "tasks" / task / "adapter_config.json").read_text())["r"] == 2
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "eval/sort/exact_match" in r][-1]
    assert {f"eval/{t}/loss" for t in TASKS} <= set(last)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval/sort/exact_match"] == last["eval/sort/exact_match"]
    # back into ferrotune over the same random base (model.init with seed 0)
    torch.manual_seed(0)
    base = CausalLM(LlamaConfig.from_dict(tomllib.loads(f"x = {init}")["x"]))
    base.init_weights()
    routed = load_routed(base, final).eval()
    ids = torch.randint(3, 19, (1, 6))
    with torch.no_grad():
        logits = [routed(ids, task_ids=torch.tensor([k])) for k in range(3)]
    assert (logits[0] - logits[1]).abs().max() > 0  # each task has its own trained adapter


# ----------------------------------------------------------------------------------------------
# Two ranks (DDP on gloo): the weighted loss is normalised over both ranks' tokens
# ----------------------------------------------------------------------------------------------


def ddp_rows() -> list[dict[str, torch.Tensor]]:
    rng = random.Random(9)
    return pack_tasks([example(rng, k % 3) for k in range(150)])


def ddp_model() -> torch.nn.Module:
    model = fp.apply_peft(tiny_llama(3), fp.LoraConfig(r=2, alpha=4, target_modules="all-linear"), "shared")
    torch.manual_seed(3)
    return apply_routed(model, TASKS, fp.LoraConfig(r=2, alpha=4, target_modules="all-linear"))


def weighted_steps(model, env, rows_per_rank: int) -> tuple[list[float], dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    """3 AdamW steps of the routed model with loss weights, 2 micro-batches each."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    stream = RowBatches(
        ddp_rows(), rows_per_rank, shuffle=False, rank=env.rank, world_size=env.world_size
    ).epoch(0)
    lam = torch.tensor([3.0, 1.0, 0.25])
    losses = []
    for _ in range(3):
        loss, _ = accumulate_gradients(
            model, [next(stream), next(stream)], torch.device("cpu"), env=env, task_weights=lam
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    inner = getattr(model, "module", model)
    return losses, {n: p.detach().clone() for n, p in inner.named_parameters() if p.requires_grad}


def _ddp_rank(rank: int, port: int, out: str) -> None:
    import os
    import sys

    from ferrotune.train import dist as fd
    from safetensors.torch import save_file

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ.update(
        MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0"
    )
    torch.set_num_threads(1)
    env = fd.init_distributed("cpu")
    losses, state = weighted_steps(fd.wrap_model(ddp_model(), env, "ddp"), env, 2)
    save_file(state, f"{out}/state{rank}.safetensors")
    with open(f"{out}/losses{rank}.json", "w") as f:
        json.dump(losses, f)
    fd.shutdown(env)
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort in interpreter teardown on this CPU (see test_dist)


def test_weighted_routed_training_on_two_ranks_equals_one_process(tmp_path) -> None:
    import torch.multiprocessing as mp
    from ferrotune.train.dist import DistEnv
    from safetensors.torch import load_file
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    mp.start_processes(_ddp_rank, args=(store.port, str(tmp_path)), nprocs=2, start_method="spawn")
    del store
    want_losses, want_state = weighted_steps(ddp_model(), DistEnv(), 4)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"losses{rank}.json").read_text()) == pytest.approx(
            want_losses, rel=1e-5
        )
        got = load_file(str(tmp_path / f"state{rank}.safetensors"))
        assert set(got) == set(want_state)
        for name, value in want_state.items():
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=2e-5, msg=name)

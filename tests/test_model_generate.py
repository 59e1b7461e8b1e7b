"""KV-cache generation: cached and uncached decoding give the same tokens; a batch of prompts of
different lengths gives each row what it gives alone; greedy matches transformers' greedy decoding;
stop tokens, top-k, top-p and seeded sampling behave as specified; `ferrotune generate` runs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from ferrotune.cli import COMMANDS
from ferrotune.models import load_model
from ferrotune.models.generate import Sampling, generate, next_tokens
from ferrotune.models.llama import CausalLM, LlamaConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VOCAB = 53


def tiny_model(model_type: str = "llama", **overrides) -> CausalLM:
    config = LlamaConfig(
        model_type=model_type,
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **overrides,
    )
    torch.manual_seed(0)
    model = CausalLM(config)
    model.init_weights(std=0.3)  # peaky logits: greedy choices are far from ties
    return model.eval()


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 6)]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral"])
def test_cached_equals_uncached(model_type):
    model = tiny_model(model_type, sliding_window=5 if model_type == "mistral" else None)
    cached = generate(model, prompts(), max_new_tokens=12)
    uncached = generate(model, prompts(), max_new_tokens=12, use_cache=False)
    assert cached == uncached
    assert all(len(row) == 12 for row in cached)
    sampled = dict(max_new_tokens=12, sampling=Sampling(temperature=1.0, top_k=20, top_p=0.9), seed=4)
    assert generate(model, prompts(), **sampled) == generate(model, prompts(), use_cache=False, **sampled)


def test_batch_rows_equal_prompts_alone():
    model = tiny_model()
    batched = generate(model, prompts(), max_new_tokens=10)
    for prompt, row in zip(prompts(), batched, strict=True):
        assert generate(model, [prompt], max_new_tokens=10) == [row]


def test_greedy_matches_transformers(tmp_path):
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0.0, 0.3) if "norm" not in name else p.fill_(1.0)
    hf.eval().save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    prompt = prompts()[1]
    ref = hf.generate(
        torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert generate(ours, [prompt], max_new_tokens=10) == [ref[0, len(prompt) :].tolist()]


def test_stop_tokens_end_each_row_independently():
    model = tiny_model()
    free = generate(model, prompts(), max_new_tokens=10)
    stop = free[1][4]  # row 1 stops at its 5th token (or earlier if that token came before)
    stopped = generate(model, prompts(), max_new_tokens=10, stop_tokens=[stop])
    for full, cut in zip(free, stopped, strict=True):
        expected = full[: full.index(stop)] if stop in full else full
        assert cut == expected
    assert len(stopped[1]) <= 4


def test_top_k_and_top_p_restrict_the_choice():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, VOCAB, generator=g) * 3
    top3 = logits.topk(3).indices
    for _ in range(20):
        picked = next_tokens(logits, Sampling(temperature=1.0, top_k=3), g)
        assert all(p in t for p, t in zip(picked.tolist(), top3.tolist(), strict=True))
    # A tiny top_p keeps only the most likely token: sampling becomes greedy.
    assert torch.equal(next_tokens(logits, Sampling(temperature=2.0, top_p=1e-6), g), logits.argmax(-1))
    assert torch.equal(next_tokens(logits, Sampling(temperature=1.0, top_k=1), g), logits.argmax(-1))
    # top_p = 0.5 on a known distribution: tokens 0 (0.4) and 1 (0.3) make the nucleus.
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    seen = {int(next_tokens(probs.log(), Sampling(temperature=1.0, top_p=0.5), g)) for _ in range(200)}
    assert seen == {0, 1}


def test_sampling_is_seeded():
    model = tiny_model()
    sampling = Sampling(temperature=1.5)
    a = generate(model, prompts(), max_new_tokens=8, sampling=sampling, seed=3)
    b = generate(model, prompts(), max_new_tokens=8, sampling=sampling, seed=3)
    c = generate(model, prompts(), max_new_tokens=8, sampling=sampling, seed=4)
    assert a == b and a != c
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_generate_command(tmp_path, capsys):
    from ferrotune.cli import main
    from ferrotune.models import save_model
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        ["the cat sat on the mat and the dog ran"],
        trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]),
    )
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    model = tiny_model(eos_token_id=1)
    save_model(model, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert "generate" in COMMANDS
    assert main(["generate", str(tmp_path), "the cat", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the cat")

"""`ferrotune train config.toml key=value`: pretraining then SFT from TOML, end to end on a tiny
model; the final checkpoint loads in transformers with the same logits; chat data gets an
assistant-only loss; bad data names the file and line."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from ferrotune.cli import main
from ferrotune.errors import FormatError
from ferrotune.models import load_model
from ferrotune.train.text_data import SPECIAL_TOKENS, pack, read_conversations, render_chat
from tokenizers import Tokenizer, models, pre_tokenizers, trainers


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TEXT = "the boat sails to the island and the keeper lights the lamp on the hill by the sea"


@pytest.fixture
def tokenizer_dir(tmp_path):
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        [TEXT, "Question ?"], trainers.WordLevelTrainer(special_tokens=["<unk>", *SPECIAL_TOKENS])
    )
    folder = tmp_path / "tok"
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_pretrain_then_sft_from_toml(tmp_path, tokenizer_dir, capsys):
    words = TEXT.split()
    (tmp_path / "corpus.txt").write_text("\n\n".join(" ".join(words[i:] + words[:i]) for i in range(12)))
    with (tmp_path / "chat.jsonl").open("w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": " ".join(words[i : i + 3]), "response": words[i + 3]}) + "\n")
    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    (tmp_path / "pretrain.toml").write_text(
        f"""
task = "pretrain"
[model]
init = {{ vocab_size = {vocab}, hidden_size = 32, intermediate_size = 48, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2 }}
tokenizer = "{tokenizer_dir}"
[data]
train = "{tmp_path / "corpus.txt"}"
seq_len = 32
eval_fraction = 0.2
[train]
steps = 100
batch_size = 2
lr = 1e-2
[run]
output_dir = "{tmp_path / "pre"}"
log_every = 2
"""
    )
    assert main(["train", str(tmp_path / "pretrain.toml"), "train.steps=6", "run.save_every=3"]) == 0
    out = capsys.readouterr().out
    assert "trained 6 steps" in out and "eval loss" in out
    final = tmp_path / "pre" / "final"
    assert (final / "tokenizer.json").exists()
    assert (tmp_path / "pre" / "checkpoints" / "step-000003" / "optimizer.safetensors").exists()
    metrics = [json.loads(line) for line in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]

    ours = load_model(final)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final)
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids), rtol=1e-4, atol=1e-5)

    (tmp_path / "sft.toml").write_text(
        f"""
task = "sft"
[model]
path = "{final}"
[data]
train = "{tmp_path / "chat.jsonl"}"
seq_len = 24
pipeline = "memory"
[train]
steps = 4
batch_size = 2
[run]
output_dir = "{tmp_path / "sft"}"
"""
    )
    assert main(["train", str(tmp_path / "sft.toml")]) == 0
    assert (tmp_path / "sft" / "final" / "model.safetensors").exists()


def test_train_command_reports_config_errors(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text('task = "sft"\n[train]\nlearning_rate = 1e-4\n')
    assert main(["train", str(tmp_path / "bad.toml")]) == 2
    assert "unknown key train.learning_rate" in capsys.readouterr().err


def test_chat_rows_train_only_assistant_tokens(tokenizer_dir):
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    messages = [
        {"role": "user", "content": "the boat"},
        {"role": "assistant", "content": "sails"},
        {"role": "user", "content": "the keeper"},
        {"role": "assistant", "content": "lights the lamp"},
    ]
    ids, trained = render_chat(messages, tokenizer)
    (row,) = pack([(ids, trained)], 40, pad_id=0)
    targets = [int(t) for t in row["labels"] if t != -100]
    vocab = tokenizer.get_vocab()
    expected = [vocab[w] for w in ["sails", "<|end|>", "lights", "the", "lamp", "<|end|>"]]
    assert targets == expected
    assert int((row["document_ids"] == 0).sum()) == len(ids)


def test_bad_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n')
    with pytest.raises(FormatError, match=r"chat\.jsonl:2"):
        read_conversations(path)
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(FormatError, match="record 1"):
        read_conversations(path)


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} <|end|>"
    "{% else %}<|user|> {{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def test_jsonl_goes_through_the_prepare_pipeline(tmp_path, tokenizer_dir):
    """JSONL data is prepared by the Rust pipeline (chat template, assistant-only mask, packing) into
    the run folder; the loop trains on the memory-mapped shards."""
    (tokenizer_dir / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE, "eos_token": "<|end|>", "pad_token": "<|pad|>"})
    )
    words = TEXT.split()
    with (tmp_path / "chat.jsonl").open("w") as f:
        for i in range(14):
            messages = [
                {"role": "user", "content": " ".join(words[i : i + 3])},
                {"role": "assistant", "content": words[i + 3]},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    (tmp_path / "sft.toml").write_text(
        f"""
task = "sft"
[model]
init = {{ vocab_size = {vocab}, hidden_size = 32, intermediate_size = 48, num_hidden_layers = 1, num_attention_heads = 2 }}
tokenizer = "{tokenizer_dir}"
[data]
train = "{tmp_path / "chat.jsonl"}"
seq_len = 32
[train]
steps = 3
batch_size = 2
[run]
output_dir = "{tmp_path / "run"}"
"""
    )
    assert main(["train", str(tmp_path / "sft.toml")]) == 0
    from ferrotune.data import PackedDataset

    rows = PackedDataset(tmp_path / "run" / "prepared" / "train", shuffle=False)
    vocab_map = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab()
    end = vocab_map["<|end|>"]
    trained = [int(t) for row in rows for t in row["labels"] if t != -100]
    # Exactly the 14 one-word replies and their end-of-turn tokens take loss.
    assert len(trained) == 28 and trained.count(end) == 14
    assert sorted(t for t in trained if t != end) == sorted(vocab_map[w] for w in words[3:17])


def test_seed_decides_the_adapter_initialisation(tmp_path, tokenizer_dir):
    """`seed` fixes everything random in a run from `model.path`, the adapter's initial values
    included: the same seed twice gives the same LoRA A, another seed another one."""
    from ferrotune.models import CausalLM, LlamaConfig, save_model
    from safetensors.torch import load_file

    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    base = CausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    base.init_weights(generator=torch.Generator().manual_seed(0))
    save_model(base, tmp_path / "base")
    words = TEXT.split()
    with (tmp_path / "chat.jsonl").open("w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": " ".join(words[i : i + 3]), "response": words[i + 3]}) + "\n")
    (tmp_path / "lora.toml").write_text(
        f"""
task = "sft"
[model]
path = "{tmp_path / "base"}"
tokenizer = "{tokenizer_dir}"
[data]
train = "{tmp_path / "chat.jsonl"}"
seq_len = 24
pipeline = "memory"
[train]
steps = 1
batch_size = 2
lr = 0.0
[peft]
method = "lora"
"""
    )

    def initial_lora_a(seed: int, name: str) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        assert main(["train", str(tmp_path / "lora.toml"), f"seed={seed}", f"run.output_dir={out}"]) == 0
        (adapter,) = out.glob("final/**/adapter_model.safetensors")
        return {k: v for k, v in load_file(adapter).items() if "lora_A" in k}

    first, again, other = initial_lora_a(1, "a"), initial_lora_a(1, "b"), initial_lora_a(2, "c")
    assert first and sorted(first) == sorted(again) == sorted(other)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)

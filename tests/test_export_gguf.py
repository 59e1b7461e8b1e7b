"""`ferrotune export --format gguf` read back by the `gguf` package (test-only reference): metadata,
tokenizer, chat template, tensor names, shapes and values, Q8_0 bytes against gguf's own
quantizer. The q/k permutation reference below is written from llama.cpp's documented layout."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from ferrotune.export import export_gguf
from ferrotune.io import load_checkpoint

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CONFIG = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=50000.0,
    tie_word_embeddings=False,
)
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf") / "model"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG, bos_token_id=1, eos_token_id=2))
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [
        "the quick brown fox jumps over the lazy dog",
        "merging adapters into models, then exporting",
    ] * 50
    tok.train_from_iterator(text, trainer)
    tok.add_tokens(["<extra>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": TEMPLATE}
        )
    )
    return folder


def permute_for_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head go from HF's (2, D/2) rotate-half order to interleaved (D/2, 2) pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_tensors(model_dir) -> dict[str, np.ndarray]:
    ck = load_checkpoint(model_dir)
    out = {}
    for name in ck:
        w = ck[name].float().numpy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        elif name == "lm_head.weight":
            out["output.weight"] = w
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            new = {
                "input_layernorm.weight": "attn_norm.weight",
                "post_attention_layernorm.weight": "ffn_norm.weight",
                "self_attn.q_proj.weight": "attn_q.weight",
                "self_attn.k_proj.weight": "attn_k.weight",
                "self_attn.v_proj.weight": "attn_v.weight",
                "self_attn.o_proj.weight": "attn_output.weight",
                "mlp.gate_proj.weight": "ffn_gate.weight",
                "mlp.up_proj.weight": "ffn_up.weight",
                "mlp.down_proj.weight": "ffn_down.weight",
            }[rest]
            if new == "attn_q.weight":
                w = permute_for_llama_cpp(w, CONFIG["num_attention_heads"])
            elif new == "attn_k.weight":
                w = permute_for_llama_cpp(w, CONFIG["num_key_value_heads"])
            out[f"blk.{layer}.{new}"] = w
    return out


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_gguf_reads_back_to_the_same_tensors(model_dir, tmp_path, dtype):
    out = tmp_path / f"model-{dtype}.gguf"
    summary = export_gguf(model_dir, out, dtype=dtype)
    reader = gguf.GGUFReader(out)
    assert summary["bytes"] == out.stat().st_size

    expected = expected_tensors(model_dir)
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(expected)
    ggml = gguf.GGMLQuantizationType
    matrix_type = {"f16": ggml.F16, "bf16": ggml.BF16, "q8_0": ggml.Q8_0}[dtype]
    for name, ref in expected.items():
        t = tensors[name]
        assert list(reversed([int(d) for d in t.shape])) == list(ref.shape), name
        assert t.data_offset % 32 == 0
        if ref.ndim == 1:
            assert t.tensor_type == ggml.F32
            np.testing.assert_array_equal(t.data.reshape(-1), ref.reshape(-1))
            continue
        assert t.tensor_type == matrix_type, name
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        if dtype == "f16":
            np.testing.assert_array_equal(raw.view(np.float16), ref.astype(np.float16).reshape(-1))
        elif dtype == "bf16":
            np.testing.assert_array_equal(raw, gguf.quants.quantize(ref, ggml.BF16).reshape(-1))
        else:
            np.testing.assert_array_equal(raw, gguf.quants.quantize(ref, ggml.Q8_0).reshape(-1), err_msg=name)
            back = gguf.quants.dequantize(raw, ggml.Q8_0).reshape(ref.shape)
            step = np.abs(ref).reshape(-1, 32).max(axis=1) / 127
            assert np.all(np.abs(back - ref).reshape(-1, 32) <= step[:, None] * 0.57 + 1e-12)

    file_type = {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == file_type
    assert field(reader, "llama.block_count") == CONFIG["num_hidden_layers"]
    assert field(reader, "llama.embedding_length") == CONFIG["hidden_size"]
    assert field(reader, "llama.feed_forward_length") == CONFIG["intermediate_size"]
    assert field(reader, "llama.attention.head_count") == CONFIG["num_attention_heads"]
    assert field(reader, "llama.attention.head_count_kv") == CONFIG["num_key_value_heads"]
    assert field(reader, "llama.context_length") == CONFIG["max_position_embeddings"]
    assert field(reader, "llama.rope.dimension_count") == 16
    assert field(reader, "llama.rope.freq_base") == pytest.approx(CONFIG["rope_theta"])
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)


def test_gguf_tokenizer_and_chat_template(model_dir, tmp_path):
    out = tmp_path / "model.gguf"
    export_gguf(model_dir, out, dtype="f16")
    reader = gguf.GGUFReader(out)
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == CONFIG["vocab_size"]
    for text, i in vocab.items():
        assert tokens[i] == text
    assert tokens[-1] == f"[PAD{CONFIG['vocab_size'] - 1}]"
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[vocab["<s>"]] == gguf.TokenType.CONTROL
    assert types[vocab["<extra>"]] == gguf.TokenType.USER_DEFINED
    assert types[vocab["the"]] == gguf.TokenType.NORMAL
    assert types[-1] == gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    assert field(reader, "tokenizer.ggml.merges") == merges
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.bos_token_id") == vocab["<s>"]
    assert field(reader, "tokenizer.ggml.eos_token_id") == vocab["</s>"]
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.chat_template") == TEMPLATE


def test_export_cli_and_bad_models(model_dir, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ferrotune",
            "export",
            str(model_dir),
            str(tmp_path / "m.gguf"),
            "--dtype",
            "q8_0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and (tmp_path / "m.gguf").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(Exception, match="model_type"):
        export_gguf(bad, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_models_export_under_their_own_architecture(model_dir, tmp_path, model_type):
    """Qwen2 (q/k/v biases, tied embeddings) and Qwen3 (per-head q/k norms, head_dim apart from
    hidden / heads) as llama.cpp's `qwen2` / `qwen3`: metadata under the architecture's prefix,
    every tensor name one gguf-py lists for that architecture, and the values as stored (these
    architectures rotate halves, as HF: no q/k permutation)."""
    torch.manual_seed(1)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, rope_theta=1e6)  # fmt: skip
    if model_type == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32))
    folder = tmp_path / "model"
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the module's byte-level BPE
        (folder / name).write_bytes((model_dir / name).read_bytes())
    out = tmp_path / "model.gguf"
    export_gguf(folder, out, dtype="f16")

    reader = gguf.GGUFReader(out)
    assert field(reader, "general.architecture") == model_type
    assert field(reader, f"{model_type}.block_count") == 2
    assert field(reader, f"{model_type}.attention.head_count_kv") == 2
    assert field(reader, f"{model_type}.rope.freq_base") == pytest.approx(1e6)
    if model_type == "qwen3":
        assert field(reader, "qwen3.attention.key_length") == 32
    arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[model_type]
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    got = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    for name in got:
        base = name.rsplit(".", 1)[0]  # without .weight / .bias
        assert (
            base in allowed or base.replace("blk.0.", "blk.{bid}.").replace("blk.1.", "blk.{bid}.") in allowed
        ), name

    ck = load_checkpoint(folder)
    hf_to_gguf = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                  "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_norm.weight": "attn_k_norm.weight"}  # fmt: skip
    for layer in range(2):
        for hf, ours in hf_to_gguf.items():
            key = f"model.layers.{layer}.{hf}"
            if key in ck:
                want = ck[key].float().numpy()
                np.testing.assert_allclose(
                    got[f"blk.{layer}.{ours}"].reshape(want.shape), want, rtol=1e-3, atol=1e-6
                )
    assert ("output.weight" in got) == (model_type == "qwen3")  # tied: llama.cpp reuses token_embd
    if model_type == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(got)
    else:
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= set(got)


def sentencepiece_model_dir(folder, with_tokenizer_json: bool):
    """A Llama-2-style folder: a SentencePiece BPE model with byte fallback trained here (pieces
    0-2 the unknown/BOS/EOS controls, one user-defined piece), one added token past the model's
    own in added_tokens.json, and config.json's vocabulary larger than both (padding)."""
    spm = pytest.importorskip("sentencepiece")
    import io

    model = io.BytesIO()
    text = [
        "the quick brown fox jumps over the lazy dog",
        "merging adapters into models, then exporting",
    ] * 50
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=320, model_type="bpe",
        byte_fallback=True, user_defined_symbols=["<sep>"], minloglevel=2,
    )  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    base = processor.vocab_size()
    (folder / "added_tokens.json").write_text(json.dumps({"<tool>": base, "<s>": 1}))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True})
    )
    torch.manual_seed(2)
    config = transformers.LlamaConfig(**{**CONFIG, "vocab_size": base + 8}, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    if with_tokenizer_json:  # what HF writes beside it: BPE with byte fallback, not byte-level
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(byte_fallback=True, unk_token="<unk>"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
        tok.add_special_tokens(["<unk>", "<s>", "</s>"])
        tok.save(str(folder / "tokenizer.json"))
    return folder, base, config.vocab_size


@pytest.mark.parametrize("with_tokenizer_json", [False, True])
def test_sentencepiece_tokenizers_export_as_llama_cpp_converts_them(tmp_path, with_tokenizer_json):
    """Tokens, scores and types equal gguf-py's `SentencePieceVocab` of the same folder (read by
    the sentencepiece library), then `[PADn]` entries up to config.json's vocabulary, as
    llama.cpp's converter pads; llama.cpp's "llama" tokenizer model with the special ids."""
    folder, base, vocab_size = sentencepiece_model_dir(tmp_path / "spm", with_tokenizer_json)
    out = tmp_path / "spm.gguf"
    export_gguf(folder, out, dtype="f16")
    reader = gguf.GGUFReader(out)
    expected = list(gguf.vocab.SentencePieceVocab(folder).all_tokens())
    assert len(expected) == base + 1  # the model's pieces and <tool>
    tokens = field(reader, "tokenizer.ggml.tokens")
    scores = field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(scores) == len(types) == vocab_size
    for i, (text, score, kind) in enumerate(expected):
        assert (tokens[i], scores[i], types[i]) == (text.decode(), pytest.approx(score), int(kind)), i
    for i in range(len(expected), vocab_size):
        assert (tokens[i], scores[i], types[i]) == (f"[PAD{i}]", -10000.0, gguf.TokenType.UNUSED)
    assert {gguf.TokenType.BYTE, gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN} <= set(types)
    assert types[tokens.index("<sep>")] == gguf.TokenType.NORMAL  # user-defined pieces, as the converters
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.pre") == "default"
    assert "tokenizer.ggml.merges" not in reader.fields
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert field(reader, "tokenizer.ggml.unknown_token_id") == 0
    assert field(reader, "tokenizer.ggml.add_bos_token") is True


def test_a_broken_sentencepiece_model_is_named(tmp_path):
    folder, _, _ = sentencepiece_model_dir(tmp_path / "spm", with_tokenizer_json=False)
    data = (folder / "tokenizer.model").read_bytes()
    (folder / "tokenizer.model").write_bytes(data[: len(data) // 3])
    with pytest.raises(Exception, match=r"tokenizer\.model"):
        export_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()

"""PEFT methods on our Llama model, against HF PEFT over the transformers model (test-only
oracles): an adapter trained here loads in PEFT with the same logits and a PEFT adapter loads here
with the same logits, for LoRA, rsLoRA, DoRA, IA3, prefix tuning and prompt tuning. Also: packed
rows, KV-cache generation and gradient checkpointing for every method; bottleneck adapters."""

from __future__ import annotations

import copy
import json
import warnings

import ferrotune.peft as fp
import pytest
import torch
import transformers
from ferrotune.errors import ConfigError
from ferrotune.models import load_model
from ferrotune.models.generate import generate
from ferrotune.peft.adapter import BottleneckAdapter
from ferrotune.peft.lora import LoraLinear

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", module="peft")

VOCAB = 53
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny Llama saved by transformers (non-trivial norms), and the folder."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny_llama")
    hf.save_pretrained(folder)
    return hf.eval(), folder


def randomize(model: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))

# method -> (our config, PEFT's LoRA options, leading virtual positions in PEFT's logits)
METHODS = {
    "lora": (fp.LoraConfig(r=4, alpha=8, target_modules=ALL), dict(r=4, lora_alpha=8, target_modules=ALL), 0),
    "rslora": (
        fp.LoraConfig(r=4, alpha=8, target_modules=ALL, use_rslora=True),
        dict(r=4, lora_alpha=8, target_modules=ALL, use_rslora=True),
        0,
    ),
    "dora": (
        fp.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True),
        dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
        0,
    ),
    "ia3": (fp.IA3Config(), dict(), 0),
    "ia3_all_linear": (
        fp.IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"]),
        dict(target_modules="all-linear", feedforward_modules=["down_proj"]),
        0,
    ),
    "prefix": (fp.PrefixConfig(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=16), {}, 0),
    "p_tuning_v2": (fp.PrefixConfig(num_virtual_tokens=5), {}, 0),
    "prompt": (fp.PromptConfig(num_virtual_tokens=5), {}, 5),
    "p_tuning_mlp": (fp.PromptConfig(num_virtual_tokens=4, encoder="mlp", encoder_hidden_size=16), {}, 4),
    "p_tuning_lstm": (fp.PromptConfig(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=16), {}, 4),
}


def peft_config(method: str):  # type: ignore[no-untyped-def]
    kw = METHODS[method][1]
    if method in ("lora", "rslora", "dora"):
        return peft.LoraConfig(task_type="CAUSAL_LM", **kw)
    if method.startswith("ia3"):
        return peft.IA3Config(task_type="CAUSAL_LM", **kw)
    if method == "prefix":
        return peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=16
        )
    if method == "p_tuning_v2":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    if method.startswith("p_tuning_"):
        return peft.PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=4,
            encoder_reparameterization_type=method.removeprefix("p_tuning_").upper(),
            encoder_hidden_size=16,
        )
    return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)


def peft_logits(model, ids: torch.Tensor, p: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(input_ids=ids).logits[:, p:]  # prompt tuning returns the virtual positions too


@pytest.mark.parametrize("method", list(METHODS))
def test_ours_loads_in_peft_with_the_same_logits(method: str, checkpoint, tmp_path) -> None:
    hf, folder = checkpoint
    ours_cfg, _, p = METHODS[method]
    ours = fp.apply_peft(load_model(folder, dtype=torch.float32), copy.deepcopy(ours_cfg))
    randomize(ours)
    ours.eval()
    fp.save_adapter(ours, str(tmp_path / "a"))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "a")).eval()
    with torch.no_grad():
        out = ours(IDS)
        with fp.disable_adapter(ours):
            plain = ours(IDS)
    assert (out - plain).abs().max() > 1e-2  # the adapter really changes the logits
    torch.testing.assert_close(out, peft_logits(theirs, IDS, p), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_adapter_loads_here_with_the_same_logits(method: str, checkpoint, tmp_path) -> None:
    hf, folder = checkpoint
    p = METHODS[method][2]
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft_config(method))
    randomize(theirs, seed=2)
    theirs.eval()
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = fp.load_adapter(load_model(folder, dtype=torch.float32), str(tmp_path / "p")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), peft_logits(theirs, IDS, p), rtol=1e-4, atol=1e-5)


def packed_row(docs: list[torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(1, length, dtype=torch.long)
    positions = torch.zeros(1, length, dtype=torch.long)
    documents = torch.full((1, length), -1, dtype=torch.int32)
    start = 0
    for d, doc in enumerate(docs):
        ids[0, start : start + len(doc)] = doc
        positions[0, start : start + len(doc)] = torch.arange(len(doc))
        documents[0, start : start + len(doc)] = d
        start += len(doc)
    return {"input_ids": ids, "position_ids": positions, "document_ids": documents}


ALL_METHODS = {
    **{k: v[0] for k, v in METHODS.items()},
    "houlsby": fp.BottleneckConfig(bottleneck_size=8, placement="houlsby"),
    "pfeiffer": fp.BottleneckConfig(bottleneck_size=8, placement="pfeiffer"),
}


@pytest.mark.parametrize("method", list(ALL_METHODS))
def test_packed_rows_equal_documents_alone(method: str, checkpoint) -> None:
    _, folder = checkpoint
    model = fp.apply_peft(load_model(folder, dtype=torch.float32), copy.deepcopy(ALL_METHODS[method]))
    randomize(model)
    model.eval()
    g = torch.Generator().manual_seed(9)
    docs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (5, 7, 4)]
    with torch.no_grad():
        packed = model(**packed_row(docs, 18))
        start = 0
        for doc in docs:
            alone = model(doc[None])
            torch.testing.assert_close(packed[0, start : start + len(doc)], alone[0], rtol=1e-4, atol=1e-5)
            start += len(doc)


@pytest.mark.parametrize("method", list(ALL_METHODS))
def test_kv_cache_generation_equals_recomputation(method: str, checkpoint) -> None:
    _, folder = checkpoint
    model = fp.apply_peft(load_model(folder, dtype=torch.float32), copy.deepcopy(ALL_METHODS[method]))
    randomize(model)
    prompts = [[3, 5, 7, 9, 11], [4, 6]]
    with torch.no_grad():
        cached = generate(model, prompts, max_new_tokens=6, use_cache=True)
        recomputed = generate(model, prompts, max_new_tokens=6, use_cache=False)
        # and the first token is what a plain forward of the prompt predicts
        first = model(torch.tensor([prompts[0]]))[0, -1].argmax().item()
    assert cached == recomputed
    assert cached[0][0] == first


@pytest.mark.parametrize("method", list(ALL_METHODS))
def test_gradient_checkpointing_gives_the_same_gradients(method: str, checkpoint) -> None:
    _, folder = checkpoint
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = fp.apply_peft(load_model(folder, dtype=torch.float32), copy.deepcopy(ALL_METHODS[method]))
        randomize(model)
        model.gradient_checkpointing = checkpointing
        model.train()
        batch = packed_row([IDS[0, :6], IDS[1, :9]], 16)
        model(**batch).float().square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_only_adapter_parameters_train(checkpoint) -> None:
    _, folder = checkpoint
    for method, config in ALL_METHODS.items():
        model = fp.apply_peft(load_model(folder, dtype=torch.float32), copy.deepcopy(config))
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert names, method
        for n in names:
            assert any(k in n for k in ("lora_", "ia3_l", "prompt_encoders", "_adapter.")), (method, n)
        report = fp.trainable_parameters(model)
        assert 0 < report.percent < 50, (method, str(report))  # a tiny model: large shares


def test_bottleneck_placement_zero_start_and_roundtrip(checkpoint, tmp_path) -> None:
    _, folder = checkpoint
    base = load_model(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = base(IDS)
    houlsby = fp.apply_peft(copy.deepcopy(base), fp.BottleneckConfig(bottleneck_size=8, activation="gelu"))
    layer = houlsby.model.layers[0]
    assert isinstance(layer.attn_adapter, BottleneckAdapter) and isinstance(
        layer.mlp_adapter, BottleneckAdapter
    )
    pfeiffer = fp.apply_peft(
        copy.deepcopy(base), fp.BottleneckConfig(bottleneck_size=8, placement="pfeiffer")
    )
    assert pfeiffer.model.layers[0].attn_adapter is None
    assert isinstance(pfeiffer.model.layers[1].mlp_adapter, BottleneckAdapter)
    with torch.no_grad():
        torch.testing.assert_close(houlsby(IDS), expected)  # zero-initialised up-projection
    randomize(houlsby)
    keys = fp.adapter_state_dict(houlsby)
    assert "base_model.model.model.layers.1.attn_adapter.down.weight" in keys
    assert keys["base_model.model.model.layers.0.mlp_adapter.up.bias"].shape == (32,)
    fp.save_adapter(houlsby, str(tmp_path / "b"))
    again = fp.load_adapter(copy.deepcopy(base), str(tmp_path / "b"))
    with torch.no_grad():
        torch.testing.assert_close(again(IDS), houlsby(IDS))


def test_second_all_linear_adapter_lands_beside_the_first_as_in_peft(checkpoint, tmp_path) -> None:
    """`all-linear` selects the base model's linears only: a second adapter (and a LoRA after a
    bottleneck or a P-tuning encoder) never wraps an adapter's own layers nor `lm_head`."""
    hf, folder = checkpoint
    ours = load_model(folder, dtype=torch.float32).eval()
    ours = fp.apply_peft(ours, fp.LoraConfig(r=4, alpha=8, target_modules="all-linear"), "one")
    ours = fp.apply_peft(ours, fp.LoraConfig(r=2, alpha=4, target_modules="all-linear", use_dora=True), "two")
    randomize(ours)
    wrapped = {n: m for n, m in ours.named_modules() if isinstance(m, LoraLinear)}
    assert sorted(wrapped) == sorted(f"model.layers.{i}.{part}.{leaf}" for i in (0, 1) for part, leaf in (
        ("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
        ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"),
    ))  # fmt: skip
    assert all(m.adapter_names() == ["one", "two"] for m in wrapped.values())
    # PEFT's multi-adapter model over the transformers model: same keys, same logits
    theirs = peft.get_peft_model(
        copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_name="one"
    )
    theirs.add_adapter("two", peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True))
    for name in ("one", "two"):
        state = fp.adapter_state_dict(ours, name)
        assert sorted(state) == sorted(peft.get_peft_model_state_dict(theirs, adapter_name=name))
        peft.set_peft_model_state_dict(theirs, state, adapter_name=name)
    theirs.eval()
    for active in (["one"], ["two"], ["one", "two"]):
        fp.set_active(ours, active)
        theirs.base_model.set_adapter(active)
        with torch.no_grad():
            torch.testing.assert_close(ours(IDS), peft_logits(theirs, IDS, 0), rtol=1e-4, atol=1e-5)
    # a saved all-linear adapter loads as a third one, beside the others, with the same logits
    fp.save_adapter(ours, str(tmp_path / "two"), "two")
    ours = fp.load_adapter(ours, str(tmp_path / "two"), "three")
    assert all(m.adapter_names() == ["one", "two", "three"] for m in wrapped.values())
    with torch.no_grad():
        loaded = ours(IDS)
        fp.set_active(ours, "two")
        torch.testing.assert_close(loaded, ours(IDS))
    # adapter internals are never targets: a bottleneck's and a prompt encoder's linears stay plain
    model = load_model(folder, dtype=torch.float32)
    model = fp.apply_peft(model, fp.BottleneckConfig(bottleneck_size=8), "adapter")
    model = fp.apply_peft(model, fp.PromptConfig(num_virtual_tokens=2, encoder="mlp"), "ptune")
    model = fp.apply_peft(model, fp.LoraConfig(r=2, target_modules="all-linear"), "lora")
    lora_layers = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLinear))
    assert lora_layers == sorted(f"base_model.{n}" for n in wrapped)


def test_prefix_and_prompt_adapters_switch_and_disable(checkpoint) -> None:
    _, folder = checkpoint
    model = load_model(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        base = model(IDS)
    model = fp.apply_peft(model, fp.PrefixConfig(num_virtual_tokens=3), "pre")
    model = fp.apply_peft(model, fp.PromptConfig(num_virtual_tokens=4, init="vocab"), "pro")
    model = fp.apply_peft(model, fp.LoraConfig(r=2, alpha=4), "lo")
    randomize(model)
    outs = {}
    with torch.no_grad():
        for name in ("pre", "pro", "lo"):
            fp.set_active(model, name)
            outs[name] = model(IDS)
        with fp.disable_adapter(model):
            torch.testing.assert_close(model(IDS), base)
        fp.set_active(model, ["pro", "lo"])  # virtual tokens combine with weight adapters
        both = model(IDS)  # the prompt's keys/values now go through the LoRA too
    torch.testing.assert_close(both, model(IDS).detach())  # cached (no grad) == recomputed
    assert all(not torch.allclose(outs[a], outs[b]) for a, b in (("pre", "pro"), ("pro", "lo")))
    assert not torch.allclose(both, outs["pro"])
    fp.set_active(model, ["pre", "pro"])
    with pytest.raises(ConfigError, match="switched, not combined"), torch.no_grad():
        model(IDS)


def test_prompt_text_init_uses_the_token_embeddings(checkpoint) -> None:
    _, folder = checkpoint
    model = load_model(folder, dtype=torch.float32)
    embed = model.model.embed_tokens.weight.detach().clone()
    model = fp.apply_peft(
        model, fp.PromptConfig(num_virtual_tokens=5, init="text", init_text="ab"), tokenizer=lambda t: [7, 9]
    )
    prompt = model.prompt_encoders["default"].embedding.weight
    torch.testing.assert_close(prompt, embed[[7, 9, 7, 9, 7]])


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_encoder_computes_peft_prompt_encoder(encoder: str) -> None:
    """P-tuning's reparameterisation is PEFT's `PromptEncoder` (same module names and function)."""
    from ferrotune.peft.prompt import PromptEncoder
    from peft.tuners.p_tuning.model import PromptEncoder as PeftPromptEncoder

    torch.manual_seed(0)
    theirs = PeftPromptEncoder(
        peft.PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=4,
            token_dim=32,
            num_transformer_submodules=1,
            num_attention_heads=4,
            num_layers=2,
            encoder_reparameterization_type=encoder.upper(),
            encoder_hidden_size=16,
        )
    )
    config = fp.PromptConfig(num_virtual_tokens=4, encoder=encoder, encoder_hidden_size=16)
    ours = PromptEncoder(config, 32, None)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    expected = theirs(torch.arange(4)[None])[0]  # (P, hidden)
    torch.testing.assert_close(ours.prompt_embeddings(), expected)
    assert (expected - theirs.embedding.weight).abs().max() > 1e-2  # the encoder does something


def test_prompt_vocab_and_random_init(checkpoint) -> None:
    """`vocab`: P rows of the token embedding table; `random`: N(0, 1), PEFT's RANDOM init."""
    _, folder = checkpoint
    model = load_model(folder, dtype=torch.float32)
    embed = model.model.embed_tokens.weight.detach().clone()
    g = torch.Generator().manual_seed(4)
    vocab = (
        fp.apply_peft(copy.deepcopy(model), fp.PromptConfig(num_virtual_tokens=6, init="vocab"), generator=g)
        .prompt_encoders["default"]
        .embedding.weight.detach()
    )
    ids = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(vocab, embed[ids])
    torch.manual_seed(0)
    random = fp.apply_peft(model, fp.PromptConfig(num_virtual_tokens=400, init="random"))
    values = random.prompt_encoders["default"].embedding.weight.detach()
    assert abs(float(values.mean())) < 0.05 and abs(float(values.std()) - 1.0) < 0.05
    assert not any(torch.allclose(row, e) for row in values[:6] for e in embed)


def test_peft_section_of_a_run_config(checkpoint, tmp_path, capsys) -> None:
    from ferrotune.config import load_config

    _, folder = checkpoint
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[peft]\nmethod = "dora"\noptions = { r = 4, alpha = 8, target_modules = "all-linear" }\n'
    )
    config = load_config(toml, ["peft.options.dropout=0.1"])
    model = fp.apply_peft_section(load_model(folder, dtype=torch.float32), config.peft)
    lora = model.model.layers[0].mlp.down_proj
    assert lora.is_dora("default") and lora.rank["default"] == 4 and lora.lora_dropout["default"].p == 0.1
    assert "peft dora: trainable params:" in capsys.readouterr().err
    none = load_config(None)
    plain = load_model(folder, dtype=torch.float32)
    assert fp.apply_peft_section(plain, none.peft) is plain
    with pytest.raises(ConfigError, match=r"peft\.options\.rank: not an option of 'lora'"):
        fp.apply_peft_section(plain, load_config(None, ["peft.method=lora", "peft.options.rank=4"]).peft)
    with pytest.raises(ConfigError, match=r"peft\.method: 'lorra' is not one of"):
        fp.apply_peft_section(plain, load_config(None, ["peft.method=lorra"]).peft)


def test_ferrotune_train_with_a_peft_section(checkpoint, tmp_path, capsys) -> None:
    """`ferrotune train` with `[peft]`: prints the trainable share, trains only the adapter and
    writes PEFT's files, which HF PEFT loads over the transformers model with our logits."""
    from ferrotune.cli import main
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf, folder = checkpoint
    text = "the boat sails to the island and the keeper lights the lamp on the hill by the sea"
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        [text], trainers.WordLevelTrainer(special_tokens=["<unk>", "<|endoftext|>"])
    )
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert tokenizer.get_vocab_size() <= VOCAB
    words = text.split()
    (tmp_path / "corpus.txt").write_text("\n\n".join(" ".join(words[i:] + words[:i]) for i in range(12)))
    (tmp_path / "run.toml").write_text(
        f"""
task = "pretrain"
[model]
path = "{folder}"
tokenizer = "{tmp_path}"
[data]
train = "{tmp_path / "corpus.txt"}"
seq_len = 32
[train]
steps = 4
batch_size = 2
lr = 1e-2
[run]
output_dir = "{tmp_path / "out"}"
tensorboard = false
plot = false
[peft]
method = "dora"
options = {{ r = 4, alpha = 8, target_modules = "all-linear" }}
"""
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(tmp_path / "run.toml")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "peft dora: trainable params:" in capsys.readouterr().err
    final = tmp_path / "out" / "final"
    raw = json.loads((final / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["use_dora"] and raw["base_model_name_or_path"] == str(folder)
    ours = fp.load_adapter(load_model(folder, dtype=torch.float32), str(final)).eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(final)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(input_ids=IDS).logits, rtol=1e-4, atol=1e-5)
        with fp.disable_adapter(ours):
            assert (ours(IDS) - hf(input_ids=IDS).logits).abs().max() < 1e-4  # the base stayed frozen

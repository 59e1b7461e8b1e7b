"""Packed rows are exact: attention never crosses documents. Changing one document never changes
another's logits in the same row; a packed row's per-document losses equal each document run
alone; the FlexAttention path equals the dense-mask path; the extension points of the model
contract (inputs_embeds, prefix_kv, adapters, gradient checkpointing) behave as specified."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ferrotune.models.llama import CausalLM, LlamaConfig, dense_attention_mask
from torch import nn


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VOCAB = 61


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
    model.init_weights(std=0.1)
    return model.eval()


def pack(docs: list[torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """One packed row in the batch contract: positions restart per document, -1 documents pad."""
    ids = torch.zeros(length, dtype=torch.long)
    positions = torch.zeros(length, dtype=torch.long)
    documents = torch.full((length,), -1, dtype=torch.int32)
    labels = torch.full((length,), -100, dtype=torch.long)
    start = 0
    for d, doc in enumerate(docs):
        n = len(doc)
        ids[start : start + n] = doc
        positions[start : start + n] = torch.arange(n)
        documents[start : start + n] = d
        labels[start : start + n - 1] = doc[1:]
        start += n
    return {
        "input_ids": ids[None],
        "labels": labels[None],
        "position_ids": positions[None],
        "document_ids": documents[None],
    }


def random_docs(seed: int, lengths: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def run(model: CausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(
            batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"]
        )


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral"])
def test_changing_one_document_leaves_the_others_unchanged(model_type):
    model = tiny_model(model_type, sliding_window=5 if model_type == "mistral" else None)
    docs = random_docs(0, [7, 11, 5])
    base = run(model, pack(docs, 28))
    changed = list(docs)
    changed[1] = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(9))
    after = run(model, pack(changed, 28))
    assert not torch.allclose(base[0, 7:18], after[0, 7:18])  # the changed document did change
    torch.testing.assert_close(after[0, :7], base[0, :7], rtol=0, atol=1e-6)
    torch.testing.assert_close(after[0, 18:23], base[0, 18:23], rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_packed_losses_equal_documents_alone(model_type):
    model = tiny_model(model_type, sliding_window=4 if model_type == "mistral" else None)
    docs = random_docs(1, [9, 4, 13])
    batch = pack(docs, 30)
    logits = run(model, batch)[0]
    start = 0
    for doc in docs:
        n = len(doc)
        alone = run(model, pack([doc], n))[0]
        packed_loss = F.cross_entropy(logits[start : start + n - 1], doc[1:])
        alone_loss = F.cross_entropy(alone[: n - 1], doc[1:])
        torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logits[start : start + n], alone, rtol=1e-5, atol=1e-5)
        start += n


def test_unpacked_batch_uses_plain_causal_attention_and_agrees_with_one_document():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(ids)
        as_documents = model(ids, document_ids=torch.zeros(2, 16, dtype=torch.int32))
    torch.testing.assert_close(plain, as_documents, rtol=1e-5, atol=1e-5)


def test_kept_rope_tables_equal_tables_from_explicit_positions():
    """Rows without position ids share tables kept across calls: the logits and gradients equal those
    from explicit positions 0..T-1, lengths change between calls, and only a few tables are kept."""
    model = tiny_model()
    inner = model.model
    g = torch.Generator().manual_seed(4)
    for length in (16, 9, 5, 16, 7, 11, 13):
        ids = torch.randint(0, VOCAB, (2, length), generator=g)
        kept = model(ids)
        kept.square().mean().backward()
        kept_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        explicit = model(ids, position_ids=torch.arange(length).expand(2, length))
        explicit.square().mean().backward()
        torch.testing.assert_close(kept, explicit, rtol=0, atol=0)
        for a, p in zip(kept_grads, model.parameters(), strict=True):
            torch.testing.assert_close(a, p.grad, rtol=0, atol=0)
        model.zero_grad()
    assert len(inner._rope_tables) == 4
    assert (9, torch.device("cpu"), torch.float32) not in inner._rope_tables  # the oldest went first
    assert (16, torch.device("cpu"), torch.float32) in inner._rope_tables  # used again, so kept longer
    with torch.inference_mode():  # tables made here could not be saved for backward later: not kept
        model(torch.randint(0, VOCAB, (1, 3), generator=g))
    assert (3, torch.device("cpu"), torch.float32) not in inner._rope_tables


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [None, 6])
def test_flex_attention_path_equals_dense_mask(window):
    model = tiny_model("mistral", sliding_window=window)
    docs = random_docs(4, [10, 3, 12, 7])
    batch = pack(docs, 40)
    batch = {k: torch.cat([v, v.roll(5, dims=1)]) for k, v in batch.items()}  # two different rows
    model.model.attention_backend = "sdpa"
    dense = run(model, batch)
    model.model.attention_backend = "flex"
    try:
        flex = run(model, batch)
    finally:
        model.model.attention_backend = "auto"
    real = batch["document_ids"] >= 0
    torch.testing.assert_close(flex[real], dense[real], rtol=1e-5, atol=1e-5)


def test_dense_mask_rule():
    docs = torch.tensor([[0, 0, 1, 1, 1, -1]], dtype=torch.int32)
    mask = dense_attention_mask(docs, docs, 0, window=2, prefix_len=1)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 0, 0, 1, 0, 0, 0],
            [1, 0, 0, 1, 1, 0, 0],
            [1, 0, 0, 0, 1, 1, 0],
            [1, 0, 0, 0, 0, 0, 1],
        ]
    )
    assert torch.equal(mask, expected)


def test_inputs_embeds_equals_input_ids():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=model.model.embed_tokens(ids)), model(ids))
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.model.embed_tokens(ids))


def test_prefix_kv_is_seen_by_every_query_and_changes_outputs():
    model = tiny_model()
    config = model.config
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(7)
    shape = (2, config.num_key_value_heads, 3, config.head_dim)
    prefix = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(2)]
    with torch.no_grad():
        plain = model(ids)
        with_prefix = model(ids, prefix_kv=prefix)
    assert not torch.allclose(plain[:, 0], with_prefix[:, 0])  # even the first query sees the prefix

    # Reference: attention over [prefix; causal keys] computed by hand for layer 0's output.
    layer = model.model.layers[0]
    captured = {}
    layer.self_attn.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    with torch.no_grad():
        model(ids, prefix_kv=prefix)
        x = layer.input_layernorm(model.model.embed_tokens(ids))
        attn = layer.self_attn
        q = attn.q_proj(x).view(2, 8, 4, -1).transpose(1, 2)
        k = attn.k_proj(x).view(2, 8, 2, -1).transpose(1, 2)
        v = attn.v_proj(x).view(2, 8, 2, -1).transpose(1, 2)
        from ferrotune.models.llama import apply_rope, rope_inverse_frequencies

        freqs = torch.arange(8)[:, None].float() * rope_inverse_frequencies(config)
        angles = torch.cat((freqs, freqs), -1)
        q, k = apply_rope(q, angles.cos(), angles.sin()), apply_rope(k, angles.cos(), angles.sin())
        k = torch.cat((prefix[0][0], k), 2).repeat_interleave(2, dim=1)
        v = torch.cat((prefix[0][1], v), 2).repeat_interleave(2, dim=1)
        scores = q @ k.transpose(-1, -2) / config.head_dim**0.5  # (B, H, 8, 11)
        allowed = torch.ones(8, 11, dtype=torch.bool)
        allowed[:, 3:] = torch.ones(8, 8).tril().bool()
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        expected = attn.o_proj((weights @ v).transpose(1, 2).reshape(2, 8, -1))
    torch.testing.assert_close(captured["out"], expected, rtol=1e-5, atol=1e-5)


class Bottleneck(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.down, self.up = nn.Linear(dim, 4), nn.Linear(4, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.relu(self.down(x)))


def test_adapters_apply_to_sublayer_outputs():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = model(ids)
        for layer in model.model.layers:
            layer.attn_adapter = Bottleneck(48)
            layer.mlp_adapter = Bottleneck(48)
        torch.testing.assert_close(model(ids), before)  # zero-initialised up: identity
        model.model.layers[1].mlp_adapter.up.bias.fill_(0.5)
        assert not torch.allclose(model(ids), before)
    assert "model.layers.0.attn_adapter.down.weight" in dict(model.named_parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model()
    model.train()
    batch = pack(random_docs(10, [6, 9]), 16)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        logits = model(
            batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"]
        )
        F.cross_entropy(logits.view(-1, VOCAB), batch["labels"].view(-1), ignore_index=-100).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing = True
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-7)

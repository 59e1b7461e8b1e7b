"""The Llama family in one file: Llama 2 / 3.x, Mistral, Qwen2 / 2.5 and Qwen3, chosen by `config.json`.

A decoder-only transformer with pre-norm residual blocks:

    h = x + attn(rmsnorm(x))            attention with rotary positions, grouped-query heads
    y = h + mlp(rmsnorm(h))             mlp(x) = down(silu(gate(x)) * up(x))
    logits = lm_head(rmsnorm(y_last))

The families differ only in small switches, all read from the HF config:
- Llama 3.x: RoPE frequencies rescaled (`rope_scaling.rope_type = "llama3"`); Llama 2: plain RoPE.
- Mistral: an optional sliding attention window (`sliding_window`).
- Qwen2 / 2.5: biases on the q, k, v projections.
- Qwen3: RMSNorm over each head of q and k before RoPE (`q_norm`, `k_norm`).
- any: `tie_word_embeddings` shares the embedding matrix with the output head.

Parameter names are Hugging Face's own (`model.layers.0.self_attn.q_proj.weight`, ...) and the RoPE
layout is HF's "rotate half", so HF checkpoints load one to one. Every projection is a plain
`nn.Linear` attribute, so PEFT and quantization wrappers replace modules by name.

Attention (one mask rule for every path): query token i may see key token j when j is not after i,
both belong to the same document, and (with a sliding window) i - j < window; prefix keys
(`prefix_kv`) are visible to every query. The paths that implement it:
- plain causal batch: `scaled_dot_product_attention(is_causal=True)`;
- packed rows (`document_ids`): FlexAttention with a document block mask (compiled, on CUDA), or
  SDPA with the explicit boolean mask (CPU, and any case FlexAttention does not cover);
- decoding with a `KVCache`: SDPA with the explicit mask over cached keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ferrotune import kernels
from ferrotune.errors import ConfigError
from ferrotune.kernels._dispatch import triton_runs_on

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


# ----------------------------------------------------------------------------------------------
# Configuration: the fields of HF's config.json that shape the network.
# ----------------------------------------------------------------------------------------------


@dataclass
class LlamaConfig:
    """Mirrors HF `config.json`. Keys this model does not use are kept in `extra` and written back
    on save, so a checkpoint round-trips unchanged."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    model_type: str = "llama"
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = False
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type: {self.model_type!r} is not supported (one of {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act: {self.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if self.model_type in ("qwen2", "qwen3") and self.use_sliding_window:
            raise ConfigError("use_sliding_window: per-layer sliding windows of Qwen are not supported")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if rope_type not in (None, "default", "linear", "llama3"):
            raise ConfigError(f"rope_scaling.rope_type: {rope_type!r} is not supported (linear, llama3)")

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 always has q/k/v biases; the others follow `attention_bias`."""
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def attention_window(self) -> int | None:
        """The sliding attention window, or None for full causal attention."""
        if self.model_type == "mistral":
            return self.sliding_window
        return None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LlamaConfig:
        """Reads an HF config dict (transformers 4 `rope_theta`/`rope_scaling` or 5 `rope_parameters`)."""
        raw = dict(raw)
        known = {f.name for f in fields(cls)} - {"extra"}
        rope_parameters = raw.pop("rope_parameters", None)
        if rope_parameters:
            rope_parameters = dict(rope_parameters)
            raw.setdefault("rope_theta", rope_parameters.pop("rope_theta", 10000.0))
            if rope_parameters.get("rope_type", "default") != "default":
                raw.setdefault("rope_scaling", rope_parameters)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if name not in raw:
                raise ConfigError(f"{name}: missing from the model config")
        values = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known}
        try:
            return cls(**values, extra=extra)
        except TypeError as err:
            raise ConfigError(f"model config: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The HF config dict (transformers 4 layout, which transformers 5 also reads)."""
        out: dict[str, Any] = dict(self.extra)
        for f in fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out.setdefault("architectures", [ARCHITECTURES[self.model_type]])
        if self.model_type == "qwen2":
            out.pop("attention_bias", None)
            out.pop("mlp_bias", None)
        return out


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (as HF does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)  # Triton on CUDA, the plain formula elsewhere


def rope_inverse_frequencies(config: LlamaConfig, device: torch.device | None = None) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/d) for i < d/2, rescaled for long context when configured:
    - linear: all frequencies divided by `factor`;
    - llama3: wavelengths longer than original_ctx/low_freq_factor are divided by `factor`, shorter
      than original_ctx/high_freq_factor are kept, and those in between interpolate smoothly."""
    dim = config.head_dim
    assert dim is not None
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    )
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        original = float(scaling["original_max_position_embeddings"])
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension (HF's RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin. x: (B, H, T, D); cos, sin: (B, 1, T, D). The formula the
    attention's fused path (`ferrotune.kernels.apply_rope`, token-major) must equal."""
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------
# Attention masks: one rule, three representations
# ----------------------------------------------------------------------------------------------


@dataclass
class AttentionMask:
    """What a decoder layer needs to mask attention, built once per forward pass.
    Exactly one representation is set: `causal` (SDPA is_causal), `dense` (bool (B, 1, Tq, Tk),
    True = may attend, prefix columns first) or `block` (a FlexAttention BlockMask)."""

    causal: bool = False
    dense: torch.Tensor | None = None
    block: Any = None


def dense_attention_mask(
    query_documents: torch.Tensor,  # (B, Tq) document id of each query
    key_documents: torch.Tensor,  # (B, Tk) document id of each key
    query_offset: int,  # slot of the first query among the keys (cached length)
    window: int | None,
    prefix_len: int = 0,
) -> torch.Tensor:
    """allowed[b, 0, i, j] = key j is not after query i, same document, inside the window; the first
    `prefix_len` columns (prefix keys) are always allowed. Returns bool (B, 1, Tq, prefix_len + Tk)."""
    tq, tk = query_documents.shape[1], key_documents.shape[1]
    device = query_documents.device
    q_slot = torch.arange(query_offset, query_offset + tq, device=device)[:, None]  # (Tq, 1)
    k_slot = torch.arange(tk, device=device)[None, :]  # (1, Tk)
    allowed = k_slot <= q_slot  # (Tq, Tk)
    if window is not None:
        allowed = allowed & (q_slot - k_slot < window)
    same_document = query_documents[:, :, None] == key_documents[:, None, :]  # (B, Tq, Tk)
    allowed = allowed[None] & same_document
    if prefix_len:
        visible = torch.ones(allowed.shape[0], tq, prefix_len, dtype=torch.bool, device=device)
        allowed = torch.cat((visible, allowed), dim=-1)
    return allowed[:, None]


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def document_block_mask(document_ids: torch.Tensor, window: int | None) -> Any:
    """A FlexAttention BlockMask for packed rows: causal, same document, inside the window.
    Blocks that cross no allowed pair are skipped entirely, so the cost follows the documents."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = document_ids.to(torch.int32)

    def mask_mod(b: Any, h: Any, q: Any, k: Any) -> Any:
        allowed = (k <= q) & (docs[b, q] == docs[b, k])
        if window is not None:
            allowed = allowed & (q - k < window)
        return allowed

    batch, length = docs.shape
    # Compiled mask construction on CUDA: the eager one materialises a (B, T, T) boolean first.
    return create_block_mask(mask_mod, batch, None, length, length, device=docs.device, _compile=docs.is_cuda)


_compiled_flex: Any = None


def flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, scale: float
) -> torch.Tensor:
    """FlexAttention, compiled once on CUDA (eager elsewhere, which is slow but exact)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    fn = flex
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


# ----------------------------------------------------------------------------------------------
# KV cache for decoding
# ----------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer for up to `max_length` slots, filled left to right.
    All rows share the slot count; rows of different lengths are left-padded (padding slots carry
    document id -1, so real tokens never attend to them)."""

    def __init__(
        self,
        config: LlamaConfig,
        batch_size: int,
        max_length: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ):
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)
        ]
        self.document_ids = torch.zeros(batch_size, max_length, device=device, dtype=torch.int32)
        self.length = 0  # slots filled so far
        self.max_length = max_length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores k, v (B, n_kv, t, D) at the next t slots; returns all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} slots needed, {self.max_length} allocated")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


# ----------------------------------------------------------------------------------------------
# Decoder block
# ----------------------------------------------------------------------------------------------


def project(x: torch.Tensor, projections: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    """Each projection of the same input x (q, k, v; gate, up). Plain `nn.Linear`s on the fast
    path become one node whose backward sums the input gradient inside the GEMMs
    (`kernels.shared_input_linears`); adapters and quantized layers run as their own modules."""
    if triton_runs_on(x) and all(type(p) is nn.Linear for p in projections):
        linears = cast(tuple[nn.Linear, ...], projections)
        return kernels.shared_input_linears(x, [p.weight for p in linears], [p.bias for p in linears])
    return tuple(p(x) for p in projections)


def plain_rms_norm(norm: nn.Module) -> bool:
    """An RMSNorm that the fused kernels below may run in place of its module call: not wrapped or
    replaced by an adapter method, and with no hooks that the call would have run."""
    return type(norm) is RMSNorm and not (norm._forward_hooks or norm._forward_pre_hooks)


def norm_beside_residual(x: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, norm(x)) for a block input that also runs on as the residual: on the fast path the
    residual's gradient is summed inside the RMSNorm's backward kernel."""
    if plain_rms_norm(norm):
        return kernels.rms_norm_beside_residual(x, norm.weight, norm.eps)
    return x, norm(x)


def add_then_norm(x: torch.Tensor, r: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + r, norm(x + r)): one fused kernel each way for an RMSNorm on the fast path."""
    if plain_rms_norm(norm):
        return kernels.add_rms_norm(x, r, norm.weight, norm.eps)
    h = x + r
    return h, norm(h)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        d, n_heads, n_kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        assert d is not None and n_kv is not None
        self.layer_index = layer_index
        self.head_dim, self.n_heads, self.n_kv_heads = d, n_heads, n_kv
        self.q_proj = nn.Linear(config.hidden_size, n_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, n_kv * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, n_kv * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(n_heads * d, config.hidden_size, bias=config.o_bias)
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, hidden)
        cos: torch.Tensor,  # (B, 1, T, D)
        sin: torch.Tensor,  # (B, 1, T, D)
        mask: AttentionMask,
        kv_cache: KVCache | None = None,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(batch, length, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim)  # (B, T, KV, D)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # RoPE on the token-major layout: the Triton kernel on CUDA, `apply_rope`'s formula elsewhere;
        # either way q and k keep their dtype (under autocast the tables are fp32, q and k bf16).
        q, k = kernels.apply_rope_pair(q, k, cos[:, 0], sin[:, 0])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)  # (B, KV, S, D)
        if prefix_kv is not None:
            prefix_k, prefix_v = prefix_kv  # (B, KV, P, D)
            k = torch.cat((prefix_k.to(k.dtype), k), dim=2)
            v = torch.cat((prefix_v.to(v.dtype), v), dim=2)

        scale = 1.0 / math.sqrt(self.head_dim)
        gqa = self.n_kv_heads != self.n_heads
        if mask.block is not None:
            out = flex_attention(q, k, v, mask.block, scale)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.dense, is_causal=mask.causal, scale=scale, enable_gqa=gqa
            )  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """down(act(gate(x)) * up(x)), plus `residual` when given (the block's residual stream,
        which the fused path adds inside the down projection's GEMM)."""
        if self.act is F.silu and type(self.down_proj) is nn.Linear and x.is_cuda:
            # Plain down projection: the fused path that recomputes silu(g) * u in backward.
            down = self.down_proj
            gate, up = project(x, (self.gate_proj, self.up_proj))
            return kernels.swiglu_linear(gate, up, down.weight, down.bias, residual)
        if self.act is F.silu:
            out = self.down_proj(kernels.swiglu(*project(x, (self.gate_proj, self.up_proj))))  # fused on CUDA
        else:
            out = self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return out if residual is None else residual + out


class DecoderLayer(nn.Module):
    """x + adapter(attn(norm(x))), then h + adapter(mlp(norm(h))). `attn_adapter` / `mlp_adapter`
    are None unless a PEFT method installs a module (B, T, hidden) -> (B, T, hidden) that owns its
    skip connection (a Houlsby/Pfeiffer bottleneck adapter returns x + up(act(down(x))))."""

    def __init__(self, config: LlamaConfig, layer_index: int):
        super().__init__()
        self.self_attn = Attention(config, layer_index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn_adapter: nn.Module | None = None
        self.mlp_adapter: nn.Module | None = None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, hidden)
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        kv_cache: KVCache | None = None,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x, normed = norm_beside_residual(x, self.input_layernorm)
        attn = self.self_attn(normed, cos, sin, mask, kv_cache, prefix_kv)
        if self.attn_adapter is not None:
            attn = self.attn_adapter(attn)
        h, normed = add_then_norm(x, attn, self.post_attention_layernorm)  # h = x + attn
        if (
            self.mlp_adapter is None
            and type(self.mlp) is MLP
            and not (self.mlp._forward_hooks or self.mlp._forward_pre_hooks)
        ):
            return self.mlp(normed, residual=h)  # h + mlp(normed), the sum taken inside the MLP
        mlp = self.mlp(normed)
        if self.mlp_adapter is not None:
            mlp = self.mlp_adapter(mlp)
        return h + mlp


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm; `forward` returns final hidden states."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        # With checkpointing on, only the first N blocks recompute (None: all). Memory left over
        # by full checkpointing buys speed: each block not recomputed saves a forward pass.
        self.checkpointed_layers: int | None = None
        # Checkpointed blocks keep their inputs in host memory (ferrotune.train.offload).
        self.activation_offload = False
        self._offloader: Any = None
        # "auto": FlexAttention for packed rows on CUDA, SDPA otherwise; "sdpa"; "flex" (tests).
        self.attention_backend = "auto"
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self._rope_tables: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        """RoPE inv_freq (D/2,), computed once per device (kept out of the state dict)."""
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inverse_frequencies(self.config, device)
        return self._inv_freq[device]

    def rope_angles(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables cos, sin (B, 1, T, D) for position_ids (B, T): fp32 angles, then cast to the
        activation dtype (as HF does)."""
        freqs = position_ids[..., None].float() * self.inverse_frequencies(position_ids.device)  # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def rope_tables(
        self, length: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables (1, 1, T, D) of positions 0..T-1, which every unpacked row shares: computed
        once per (length, device, dtype) and reused by later steps (the few most recent kept)."""
        if torch.is_inference_mode_enabled():  # inference tensors could not be saved for backward later
            return self.rope_angles(torch.arange(length, device=device)[None], dtype)
        key = (length, device, dtype)
        tables = self._rope_tables.pop(key, None)
        if tables is None:
            tables = self.rope_angles(torch.arange(length, device=device)[None], dtype)
            while len(self._rope_tables) >= 4:
                self._rope_tables.pop(next(iter(self._rope_tables)))
        self._rope_tables[key] = tables  # most recent last
        return tables

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T) -> (B, T, hidden). With tied embeddings on the fast path, the
        table's gradient from this lookup is added into the head's gradient row by row
        (`kernels.tied_embedding`) instead of as a dense (vocab, hidden) tensor."""
        table = self.embed_tokens
        weight = table.weight
        sparse_grad = (
            self.config.tie_word_embeddings
            and type(table) is nn.Embedding
            and type(weight) is nn.Parameter  # not an FSDP2 shard or other tensor subclass
            and weight.requires_grad
            and torch.is_grad_enabled()
            and triton_runs_on(weight)
            and table.padding_idx is None
            and table.max_norm is None
            and not table.scale_grad_by_freq
            and not (table._forward_hooks or table._forward_pre_hooks)
            and not (torch.distributed.is_available() and torch.distributed.is_initialized())
        )
        return kernels.tied_embedding(input_ids, weight) if sparse_grad else table(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        *,
        inputs_embeds: torch.Tensor | None = None,  # (B, T, hidden)
        position_ids: torch.Tensor | None = None,  # (B, T)
        document_ids: torch.Tensor | None = None,  # (B, T), -1 = padding
        kv_cache: KVCache | None = None,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, hidden)
        batch, length = x.shape[:2]
        offset = kv_cache.length if kv_cache is not None else 0
        if prefix_kv is not None and len(prefix_kv) != len(self.layers):
            raise ValueError(f"prefix_kv has {len(prefix_kv)} entries for {len(self.layers)} layers")

        if position_ids is None and offset == 0:
            cos, sin = self.rope_tables(length, x.device, x.dtype)  # (1, 1, T, D), kept across steps
        else:
            if position_ids is None:
                position_ids = torch.arange(offset, offset + length, device=x.device).expand(batch, length)
            cos, sin = self.rope_angles(position_ids, x.dtype)  # (B, 1, T, D)

        mask = self._attention_mask(x, document_ids, kv_cache, prefix_kv)
        offloader = self._block_offloader() if self.activation_offload and torch.is_grad_enabled() else None
        for i, layer in enumerate(self.layers):
            prefix = prefix_kv[i] if prefix_kv is not None else None
            recompute = self.checkpointed_layers is None or i < self.checkpointed_layers
            if self.gradient_checkpointing and recompute and self.training and kv_cache is None:
                if offloader is not None and prefix is None:
                    x = offloader.checkpoint(partial(layer, cos=cos, sin=sin, mask=mask), x)
                else:
                    x = checkpoint(layer, x, cos, sin, mask, None, prefix, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache, prefix)
        if kv_cache is not None:
            kv_cache.length += length
        return self.norm(x)

    def _block_offloader(self) -> Any:
        from ferrotune.train.offload import BlockOffloader

        if self._offloader is None:
            self._offloader = BlockOffloader()
        self._offloader.begin_pass()
        return self._offloader

    def _attention_mask(
        self,
        x: torch.Tensor,
        document_ids: torch.Tensor | None,
        kv_cache: KVCache | None,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> AttentionMask:
        batch, length = x.shape[:2]
        window = self.config.attention_window
        prefix_len = prefix_kv[0][0].shape[2] if prefix_kv else 0
        if kv_cache is not None:
            offset = kv_cache.length
            docs = (
                document_ids.to(torch.int32)
                if document_ids is not None
                else torch.zeros(batch, length, dtype=torch.int32, device=x.device)
            )
            kv_cache.document_ids[:, offset : offset + length] = docs
            keys = kv_cache.document_ids[:, : offset + length]
            return AttentionMask(dense=dense_attention_mask(docs, keys, offset, window, prefix_len))
        windowed = window is not None and length > window
        if document_ids is None and not windowed and not prefix_len:
            return AttentionMask(causal=True)
        if document_ids is None:
            document_ids = torch.zeros(batch, length, dtype=torch.int32, device=x.device)
        use_flex = self.attention_backend == "flex" or (
            self.attention_backend == "auto" and x.is_cuda and flex_attention_available()
        )
        if use_flex and not prefix_len:
            return AttentionMask(block=document_block_mask(document_ids, window))
        return AttentionMask(dense=dense_attention_mask(document_ids, document_ids, 0, window, prefix_len))


class CausalLM(nn.Module):
    """LlamaModel plus the output head. `forward` returns logits (B, T, V); `hidden_states` returns
    the final normed hidden states (B, T, hidden) for chunked losses that apply `lm_head` piecewise."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        return self.model(
            input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            document_ids=document_ids,
            kv_cache=kv_cache,
            prefix_kv=prefix_kv,
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        labels: torch.Tensor | None = None,  # (B, T) pre-shifted targets, -100 = no loss
        token_weights: torch.Tensor | None = None,  # (B, T) per-token loss weights (multi-task)
    ) -> torch.Tensor:
        """Logits (B, T, V); with `labels`, the summed token cross-entropy instead (an fp32
        scalar: sum over trained positions of -log softmax(logits)[label], each term times its
        token weight when given), which a plain linear head computes chunk by chunk without
        materialising the logits (`kernels.linear_cross_entropy`)."""
        hidden = self.hidden_states(
            input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            document_ids=document_ids,
            kv_cache=kv_cache,
            prefix_kv=prefix_kv,
        )
        if labels is None:
            return self.lm_head(hidden)  # (B, T, V)
        head = self.lm_head
        if type(head) is nn.Linear and head.bias is None:
            return kernels.linear_cross_entropy(
                hidden, head.weight, labels, normalizer=1.0, token_weights=token_weights
            )
        logits = head(hidden)  # a wrapped head (modules_to_save, LoRA on lm_head): full logits
        losses = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="none",
        )  # (B*T,), 0 where no loss is taken
        return (losses if token_weights is None else losses * token_weights.reshape(-1)).sum()

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.model.gradient_checkpointing = enabled

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init for training from scratch: N(0, std) matrices, zero biases, unit norms."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.normal_(0.0, std, generator=generator)
                    if isinstance(module, nn.Linear) and module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
        if self.config.tie_word_embeddings:
            self.tie_weights()

    def make_kv_cache(self, batch_size: int, max_length: int) -> KVCache:
        weight = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_length, weight.device, weight.dtype)


LlamaForCausalLM = CausalLM

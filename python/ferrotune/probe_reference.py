"""The torch reference of the merge probe (`ferrotune.probe`): the same three passes (base,
unmerged, merged) over the same probe ids, run by our PyTorch decoder layers
(`ferrotune.models.llama`) in the checkpoints' own dtype. The merge runs the native probe
(`rust/src/merge/forward.rs`, f32, no torch); this module is its plain reference in the tests and
its fallback for models or adapters the native pass does not cover.

The passes run layer by layer over memory-mapped weights (`torch.func.functional_call` on a
decoder layer built on the meta device), so the probe holds one layer of each checkpoint at a
time, whatever the model size; the base and unmerged passes share one batch, so each weight is
read once per checkpoint. In bf16, the rounding of the activations alone moves the logits by a
few percent of the adapter's effect (the native pass, in f32, does not add that).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ferrotune import _native
from ferrotune.io import load_checkpoint, to_torch
from ferrotune.models.llama import AttentionMask, CausalLM, rope_inverse_frequencies
from ferrotune.models.load import read_config
from ferrotune.probe import DEFAULT_INPUTS, DEFAULT_THRESHOLD, DEFAULT_TOKENS, ProbeReport, probe_inputs


class _UnmergedLinear(nn.Module):
    """A linear layer with its LoRA applied beside it (never folded into the weight), on the rows
    of the batch selected by `lora_rows` (B, 1, 1) bool; the other rows get the plain layer. One
    read of the weight thus serves the base and the unmerged passes."""

    def __init__(
        self,
        like: nn.Linear,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        magnitude: torch.Tensor | None,
        lora_rows: torch.Tensor,
        lora_bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty_like(like.weight, device="meta"), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty_like(like.bias, device="meta"), requires_grad=False)
            if like.bias is not None
            else None
        )
        self.a, self.b, self.scale, self.magnitude = a, b, scale, magnitude  # (r, in), (out, r), (out,)
        self.lora_bias = lora_bias  # (out,): lora_B's bias (PEFT `lora_bias`)
        self.lora_rows = lora_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, in) -> (B, T, out)
        plain = F.linear(x, self.weight)
        lora_bias = None if self.lora_bias is None else self.lora_bias.to(x.dtype)
        lora = F.linear(F.linear(x, self.a.to(x.dtype)), self.b.to(x.dtype), lora_bias) * self.scale
        if self.magnitude is None:
            adapted = plain + lora
        else:
            # DoRA: the norm of each output row of W + s·BA, in f32, treated as a constant.
            merged = self.weight.float() + self.scale * (self.b.float() @ self.a.float())  # (out, in)
            factor = (self.magnitude.float() / merged.norm(dim=1)).to(x.dtype)  # (out,)
            adapted = (plain + lora) * factor
        out = torch.where(self.lora_rows, adapted, plain)
        return out + self.bias if self.bias is not None else out


def _module_parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, leaf = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), leaf


def _checkpoint_path(folder: Path) -> Path:
    index = folder / "model.safetensors.index.json"
    return index if index.exists() else folder / "model.safetensors"


def _is_4bit(folder: Path) -> bool:
    config = folder / "config.json"
    return config.exists() and "quantization_config" in json.loads(config.read_text())


def _weights(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` (names relative to it) as views of the mapped file; 4-bit
    weights dequantized to their 16-bit dtype, as the forward pass of a 4-bit model sees them.
    The checkpoint is opened per call, so its pages leave the resident set with the views."""
    path = _checkpoint_path(folder)
    if _is_4bit(folder):
        return {name[len(prefix) :]: to_torch(t) for name, t in _native.read_dequantized(path, prefix)}
    checkpoint = load_checkpoint(path)
    return {name[len(prefix) :]: checkpoint[name] for name in checkpoint if name.startswith(prefix)}


def probe_merge_reference(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    merged: str | os.PathLike[str],
    *,
    inputs: int = DEFAULT_INPUTS,
    tokens: int = DEFAULT_TOKENS,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
) -> ProbeReport:
    """Runs the base, unmerged and merged models on the probe inputs with torch; see
    `ferrotune.probe`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls over weights streamed once: threads only add barriers
    try:
        with torch.no_grad():
            return _probe(Path(base), Path(adapter), Path(merged), inputs, tokens, threshold, seed)
    finally:
        torch.set_num_threads(threads)


def _probe(
    base: Path, adapter: Path, merged: Path, inputs: int, tokens: int, threshold: float, seed: int
) -> ProbeReport:
    config = read_config(merged)
    config.extra.pop("quantization_config", None)
    description = _native.read_adapter(adapter)
    adapter_weights = load_checkpoint(adapter / "adapter_model.safetensors")
    replaced = {name: adapter_weights[key] for name, key in description["replacements"].items()}
    modules = {m["module"]: m for m in description["modules"]}
    with torch.device("meta"):
        skeleton = CausalLM(config)
    ids = torch.tensor(probe_inputs(config.vocab_size, inputs, tokens, seed))  # (B, T)
    pair_ids = torch.cat((ids, ids))  # (2B, T): rows [0, B) unmerged, [B, 2B) base
    lora_rows = (torch.arange(2 * inputs) < inputs)[:, None, None]  # (2B, 1, 1)

    # Embeddings. (2B, T, hidden) for the unmerged + base pair, (B, T, hidden) merged.
    base_embed = _weights(base, "model.embed_tokens.")["weight"]
    unmerged_embed = replaced.get("model.embed_tokens.weight", base_embed)
    pair = torch.cat((F.embedding(ids, unmerged_embed), F.embedding(ids, base_embed)))
    lora = modules.get("model.embed_tokens")
    if lora is not None:  # lora_embedding_A (r, vocab), lora_embedding_B (dim, r)
        a, b = adapter_weights[lora["a"]].float(), adapter_weights[lora["b"]].float()
        pair = pair + (F.embedding(pair_ids, a.T) @ b.T * lora["scale"] * lora_rows).to(pair.dtype)
    dtype = pair.dtype
    merged_hidden = F.embedding(ids, _weights(merged, "model.embed_tokens.")["weight"])
    del base_embed, unmerged_embed

    positions = torch.arange(tokens)
    freqs = positions[None, :, None].float() * rope_inverse_frequencies(config, torch.device("cpu"))
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (1, 1, T, D): the same for every row
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    mask = AttentionMask(causal=True)

    for i, layer in enumerate(skeleton.model.layers):
        prefix = f"model.layers.{i}."
        with_lora = copy.deepcopy(layer)
        for path, m in modules.items():
            if not path.startswith(prefix):
                continue
            if m["layout"] != "linear":
                raise ValueError(f"probe: module {path} has a transposed LoRA layout, not a Llama linear")
            parent, leaf = _module_parent(with_lora, path[len(prefix) :])
            magnitude = adapter_weights[m["magnitude"]] if m["magnitude"] else None
            wrapped = _UnmergedLinear(
                getattr(parent, leaf),
                adapter_weights[m["a"]],
                adapter_weights[m["b"]],
                m["scale"],
                magnitude,
                lora_rows,
                adapter_weights[m["bias"]] if m["bias"] else None,
            )
            setattr(parent, leaf, wrapped)
        weights = _weights(base, prefix)
        overrides = {k[len(prefix) :]: v for k, v in replaced.items() if k.startswith(prefix)}
        if overrides:  # the adapter replaces tensors of this layer: the two passes differ
            unmerged = functional_call(with_lora, {**weights, **overrides}, (pair[:inputs], cos, sin, mask))
            plain = functional_call(layer, weights, (pair[inputs:], cos, sin, mask))
            pair = torch.cat((unmerged, plain))
        else:
            pair = functional_call(with_lora, weights, (pair, cos, sin, mask))
        del weights
        merged_hidden = functional_call(layer, _weights(merged, prefix), (merged_hidden, cos, sin, mask))

    def head(folder: Path, hidden: torch.Tensor, overrides: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = {**_weights(folder, ""), **overrides}
        normed = functional_call(skeleton.model.norm, {"weight": weights["model.norm.weight"]}, (hidden,))
        out = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
        return F.linear(normed, out).float()  # (B, T, V)

    unmerged = head(base, pair[:inputs], replaced)
    logits = {
        "unmerged": unmerged,
        "base": head(base, pair[inputs:], {}),
        "merged": head(merged, merged_hidden, {}),
    }
    divergence = float((logits["merged"] - logits["unmerged"]).abs().max())
    return ProbeReport(
        divergence=divergence,
        adapter_effect=float((logits["unmerged"] - logits["base"]).abs().max()),
        max_logit=float(logits["unmerged"].abs().max()),
        threshold=threshold,
        inputs=inputs,
        tokens=tokens,
        engine="torch",
    )

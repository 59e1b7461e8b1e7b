"""The check that ends every merge: merged versus unmerged logits on a few probe inputs.

Three forward passes over the same probe token ids (random ids from a fixed seed):

    base       the base model alone
    unmerged   the base model with the adapter applied on the side, as during training:
               y = x Wᵀ + s · (x Aᵀ) Bᵀ          (LoRA / rsLoRA)
               y = m / ‖W + s·BA‖ ⊙ (x Wᵀ + s · (x Aᵀ) Bᵀ)   (DoRA, norm per output row)
               with `modules_to_save` tensors taken from the adapter
    merged     the merged checkpoint alone

`divergence = max |merged - unmerged|` is what the merge lost (rounding to the storage dtype, a
different target weight for quantized bases, or a bug); `adapter_effect = max |unmerged - base|`
is how much the adapter changes the model. The merge is flagged when the divergence exceeds
`threshold` times the largest unmerged logit.

The passes run layer by layer over memory-mapped weights (`torch.func.functional_call` on a
decoder layer built on the meta device), so the probe holds one layer of each checkpoint at a
time, whatever the model size. It computes in the checkpoints' own dtype.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ferrotune import _native
from ferrotune.io import load_checkpoint
from ferrotune.models.llama import AttentionMask, CausalLM, rope_inverse_frequencies
from ferrotune.models.load import read_config

DEFAULT_THRESHOLD = 0.05


@dataclass
class ProbeReport:
    divergence: float  # max |merged - unmerged| logit
    relative_divergence: float  # divergence / max |unmerged| logit
    adapter_effect: float  # max |unmerged - base| logit
    max_logit: float
    threshold: float
    inputs: int
    tokens: int

    @property
    def ok(self) -> bool:
        return self.relative_divergence <= self.threshold

    def summary(self) -> str:
        verdict = "ok" if self.ok else f"WARNING: above the threshold {self.threshold:g}"
        return (
            f"probe ({self.inputs} inputs x {self.tokens} tokens): merged vs unmerged logits differ by at most "
            f"{self.divergence:.4g} ({self.relative_divergence:.2%} of the largest logit {self.max_logit:.4g}); "
            f"the adapter itself moves them by up to {self.adapter_effect:.4g}: {verdict}"
        )


class _UnmergedLinear(nn.Module):
    """A linear layer with its LoRA applied beside it (never folded into the weight)."""

    def __init__(
        self, like: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor | None
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty_like(like.weight, device="meta"), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty_like(like.bias, device="meta"), requires_grad=False)
            if like.bias is not None
            else None
        )
        self.a, self.b, self.scale, self.magnitude = a, b, scale, magnitude  # (r, in), (out, r), (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a.to(x.dtype), self.b.to(x.dtype)
        lora = F.linear(F.linear(x, a), b) * self.scale  # (..., out)
        if self.magnitude is None:
            return F.linear(x, self.weight, self.bias) + lora
        # DoRA: the norm of each output row of W + s·BA, computed in f32 and treated as a constant.
        merged = self.weight.float() + self.scale * (self.b.float() @ self.a.float())  # (out, in)
        factor = (self.magnitude.float() / merged.norm(dim=1)).to(x.dtype)  # (out,)
        out = (F.linear(x, self.weight) + lora) * factor
        return out + self.bias if self.bias is not None else out


def _module_parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, leaf = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), leaf


def _checkpoint_path(folder: str | os.PathLike[str]) -> Path:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    return index if index.exists() else folder / "model.safetensors"


def probe_inputs(vocab_size: int, inputs: int = 2, tokens: int = 8, seed: int = 0) -> torch.Tensor:
    """Probe token ids (inputs, tokens): uniform over the vocabulary, fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (inputs, tokens), generator=generator)


def _layer_weights(
    folder: Path, prefix: str, overrides: Mapping[str, torch.Tensor]
) -> Callable[[], dict[str, torch.Tensor]]:
    """A loader of the tensors under `prefix` (names relative to it): mapped views, overlaid by
    `overrides`. The checkpoint is opened per call and dropped by the caller, so its pages leave
    the resident set with it."""

    def load() -> dict[str, torch.Tensor]:
        checkpoint = load_checkpoint(_checkpoint_path(folder))
        weights = {name[len(prefix) :]: checkpoint[name] for name in checkpoint if name.startswith(prefix)}
        for name, tensor in overrides.items():
            if name.startswith(prefix):
                weights[name[len(prefix) :]] = tensor
        return weights

    return load


def probe_merge(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    merged: str | os.PathLike[str],
    *,
    inputs: int = 2,
    tokens: int = 8,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
) -> ProbeReport:
    """Runs the base, unmerged and merged models on the probe inputs; see the module docstring."""
    base, adapter, merged = Path(base), Path(adapter), Path(merged)
    config = read_config(merged)
    description = _native.read_adapter(adapter)
    adapter_weights = load_checkpoint(adapter / "adapter_model.safetensors")
    replacements = {name: adapter_weights[key] for name, key in description["replacements"].items()}
    modules = {m["module"]: m for m in description["modules"]}

    with torch.device("meta"):
        skeleton = CausalLM(config)
    ids = probe_inputs(config.vocab_size, inputs, tokens, seed)  # (B, T)
    dtype = load_checkpoint(_checkpoint_path(merged))["model.embed_tokens.weight"].dtype

    # Embeddings: (B, T, hidden) for each of the three passes.
    def embed(folder: Path, overrides: Mapping[str, torch.Tensor], with_lora: bool) -> torch.Tensor:
        weight = _layer_weights(folder, "model.embed_tokens.", overrides)()["weight"]
        x = F.embedding(ids, weight)
        lora = modules.get("model.embed_tokens") if with_lora else None
        if lora is not None:  # lora_embedding_A (r, vocab), lora_embedding_B (dim, r)
            a, b = adapter_weights[lora["a"]].float(), adapter_weights[lora["b"]].float()
            x = x + (F.embedding(ids, a.T) @ b.T * lora["scale"]).to(x.dtype)
        return x

    hidden = {
        "base": embed(base, {}, False),
        "unmerged": embed(base, replacements, True),
        "merged": embed(merged, {}, False),
    }
    positions = torch.arange(tokens).expand(inputs, tokens)
    freqs = positions[..., None].float() * rope_inverse_frequencies(config, torch.device("cpu"))
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
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
                getattr(parent, leaf), adapter_weights[m["a"]], adapter_weights[m["b"]], m["scale"], magnitude
            )
            setattr(parent, leaf, wrapped)
        for name, folder, module, overrides in (
            ("base", base, layer, {}),
            ("unmerged", base, with_lora, replacements),
            ("merged", merged, layer, {}),
        ):
            weights = _layer_weights(folder, prefix, overrides)()
            with torch.no_grad():
                hidden[name] = functional_call(module, weights, (hidden[name], cos, sin, mask))
            del weights

    logits = {}
    for name, folder, overrides in (
        ("base", base, {}),
        ("unmerged", base, replacements),
        ("merged", merged, {}),
    ):
        final = _layer_weights(folder, "", overrides)
        weights = {
            k: v
            for k, v in final().items()
            if k in ("model.norm.weight", "lm_head.weight", "model.embed_tokens.weight")
        }
        head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
        with torch.no_grad():
            normed = functional_call(
                skeleton.model.norm, {"weight": weights["model.norm.weight"]}, (hidden[name],)
            )
            logits[name] = F.linear(normed, head).float()  # (B, T, V)
        del weights

    divergence = float((logits["merged"] - logits["unmerged"]).abs().max())
    max_logit = float(logits["unmerged"].abs().max())
    return ProbeReport(
        divergence=divergence,
        relative_divergence=divergence / max_logit if max_logit > 0 else math.inf,
        adapter_effect=float((logits["unmerged"] - logits["base"]).abs().max()),
        max_logit=max_logit,
        threshold=threshold,
        inputs=inputs,
        tokens=tokens,
    )

"""The check that ends every merge: merged versus unmerged logits on a few probe inputs.

Three forward passes over the same probe token ids (uniform over the vocabulary, fixed by a seed):

    base       the base model alone (4-bit weights dequantized, as the adapter was trained on them)
    unmerged   the base model with the adapter applied beside its weights, as during training:
               y = x Wᵀ + s · (x Aᵀ) Bᵀ                          (LoRA / rsLoRA)
               y = m / ‖W + s·BA‖ ⊙ (x Wᵀ + s · (x Aᵀ) Bᵀ)        (DoRA, norm per output row)
               with `modules_to_save` tensors taken from the adapter
    merged     the merged checkpoint alone

`divergence = max |merged - unmerged|` is what the merge lost (rounding to the storage dtype, a
different target weight for quantized bases, or a bug); `adapter_effect = max |unmerged - base|`
is how much the adapter changes the model. The merge is flagged when the divergence exceeds
`threshold` (0.5) times the adapter's effect: the merged model then misses or distorts a large
part of what the adapter does.

The passes run natively (`rust/src/merge/forward.rs`): the Llama-family decoder in f32, layer by
layer straight from the memory-mapped checkpoints, so a merge never imports torch. Models or
adapters the native forward pass does not cover run through the torch reference instead
(`ferrotune.probe_reference`, which computes in the checkpoints' own dtype), and the report says so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from ferrotune import _native
from ferrotune.errors import ConfigError

DEFAULT_THRESHOLD = 0.5
DEFAULT_INPUTS = 2
DEFAULT_TOKENS = 8


@dataclass
class ProbeReport:
    divergence: float  # max |merged - unmerged| logit
    adapter_effect: float  # max |unmerged - base| logit
    max_logit: float  # max |unmerged| logit
    threshold: float
    inputs: int
    tokens: int
    engine: str = "native"  # "native" (f32, Rust) or "torch" (the reference, checkpoint dtype)
    note: str | None = None  # why the torch reference ran instead of the native pass

    @property
    def relative_divergence(self) -> float:
        """Divergence as a fraction of the adapter's effect."""
        if self.adapter_effect > 0:
            return self.divergence / self.adapter_effect
        return 0.0 if self.divergence == 0 else math.inf

    @property
    def ok(self) -> bool:
        return self.relative_divergence <= self.threshold  # False for NaN logits too

    def summary(self) -> str:
        verdict = (
            "ok"
            if self.ok
            else f"WARNING: the merged model diverges by more than {self.threshold:g} x the adapter's own effect"
        )
        text = (
            f"probe ({self.inputs} inputs x {self.tokens} tokens): merged vs unmerged logits differ by at most "
            f"{self.divergence:.4g}, {self.relative_divergence:.1%} of the adapter's effect ({self.adapter_effect:.4g}; "
            f"largest logit {self.max_logit:.4g}): {verdict}"
        )
        return f"{text} ({self.note})" if self.note else text


def probe_inputs(
    vocab_size: int, inputs: int = DEFAULT_INPUTS, tokens: int = DEFAULT_TOKENS, seed: int = 0
) -> list[list[int]]:
    """Probe token ids, `inputs` lists of `tokens`: uniform over the vocabulary, fixed by `seed`
    (the same ids for the native pass and the torch reference)."""
    return _native.probe_inputs(vocab_size, inputs, tokens, seed)


def probe_merge(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    merged: str | os.PathLike[str],
    *,
    inputs: int = DEFAULT_INPUTS,
    tokens: int = DEFAULT_TOKENS,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
    progress: bool = False,
) -> ProbeReport:
    """Runs the base, unmerged and merged models on the probe inputs; see the module docstring.
    Raises ConfigError when neither the native pass nor the torch reference covers the model."""
    result = _native.probe_merge(
        os.fspath(base),
        os.fspath(adapter),
        os.fspath(merged),
        inputs=inputs,
        tokens=tokens,
        seed=seed,
        progress=progress,
    )
    return _report_from_native(result, base, adapter, merged, threshold=threshold, seed=seed)


def _report_from_native(
    result: dict[str, Any],
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    merged: str | os.PathLike[str],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
) -> ProbeReport:
    """The report of a native probe `result` (`_native.probe_merge`'s dict); where the native pass
    declined, the torch reference's report on the same inputs. Raises ConfigError when neither
    covers the model."""
    inputs, tokens = result["inputs"], result["tokens"]
    if result["supported"]:
        return ProbeReport(
            divergence=result["divergence"],
            adapter_effect=result["adapter_effect"],
            max_logit=result["max_logit"],
            threshold=threshold,
            inputs=inputs,
            tokens=tokens,
        )
    from ferrotune.probe_reference import probe_merge_reference  # imports torch: only here

    try:
        report = probe_merge_reference(
            base, adapter, merged, inputs=inputs, tokens=tokens, threshold=threshold, seed=seed
        )
    except (ConfigError, ValueError, KeyError) as err:
        raise ConfigError(f"no probe covers this model: native: {result['reason']}; torch: {err}") from err
    report.note = f"torch reference: the native probe does not cover {result['reason']}"
    return report

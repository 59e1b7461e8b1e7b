"""Losses as pure functions of tensors.

Labels are pre-shifted (see the batch contract): labels[b, t] is the token position t must predict,
or -100 where no loss is taken. The language-modelling loss is the mean over trained tokens:

    L = (1 / N) * sum_{(b, t): labels[b, t] != -100} -log softmax(logits[b, t])[labels[b, t]]

where N is the number of trained tokens. Under gradient accumulation N counts the tokens of ALL
micro-batches of the step, so the accumulated gradient equals that of one large batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def trained_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many positions carry a loss (int64 scalar)."""
    return (labels != IGNORE_INDEX).sum()


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum of -log p(label) over trained positions. logits (B, T, V) any float dtype, computed in fp32."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, normalizer: torch.Tensor | int | None = None
):
    """Summed token cross-entropy divided by `normalizer` (default: this batch's trained tokens)."""
    if normalizer is None:
        normalizer = trained_tokens(labels)
    return token_cross_entropy_sum(logits, labels) / torch.as_tensor(normalizer).clamp(min=1)


def token_cross_entropy_per_token(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log p(label) per position (B, T) in fp32, 0 where labels are -100."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,  # (B, T, hidden) final normed hidden states
    head_weight: torch.Tensor,  # (V, hidden)
    labels: torch.Tensor,  # (B, T)
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """Same value as `token_cross_entropy_sum(hidden @ head_weight.T, labels)` but computes the
    logits only for trained positions, `chunk_tokens` rows at a time, so the (tokens, V) logits
    matrix never exists whole (large vocabularies)."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    flat_hidden, flat_labels = flat_hidden[keep], flat_labels[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_labels.shape[0], chunk_tokens):
        logits = flat_hidden[start : start + chunk_tokens] @ head_weight.T  # (chunk, V)
        total = total + F.cross_entropy(
            logits.float(), flat_labels[start : start + chunk_tokens], reduction="sum"
        )
    return total

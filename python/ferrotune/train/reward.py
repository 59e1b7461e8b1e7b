"""Reward models: a scalar head on the decoder, trained on preference pairs with the Bradley-Terry
loss (Ouyang et al. 2022), optionally with a per-pair margin (Llama 2):

    r(x, y) = w · h_last(x, y)                 h_last: final hidden state of the last token
    L       = -log σ(r(x, y_w) - r(x, y_l) - m)
    accuracy = P[r(x, y_w) > r(x, y_l)] on held-out pairs

The network is `LlamaModel` plus `score = Linear(hidden, 1, bias=False)`, parameter names as
transformers' `LlamaForSequenceClassification` (`model.*`, `score.weight`); `save_reward_model`
writes a folder that transformers loads as that class (num_labels = 1, pad_token_id set), and
which scores the same. In a packed row each document is scored at its own last token; an unpacked
row (no document ids) is scored at its last non-pad token, as transformers does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ferrotune.config import RewardConfig, TrainConfig
from ferrotune.errors import ConfigError, FormatError
from ferrotune.io import load_checkpoint
from ferrotune.models.llama import LlamaConfig, LlamaModel
from ferrotune.models.load import model_state, read_config, save_config
from ferrotune.train.alignment import MetricsLog, autocast, cycle, lr_at, make_optimizer, optimizer_step
from ferrotune.train.preference_data import PreferenceData, source_batches
from ferrotune.train.preference_losses import bradley_terry_loss

SEQUENCE_CLASSIFIERS = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
}


def last_token_index(document_ids: torch.Tensor, num_documents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of the last token of each document of each row, and whether that document exists.
    document_ids (B, T) with -1 on padding -> (index (B, D) int64, present (B, D) bool)."""
    batch, length = document_ids.shape
    docs = document_ids.long()
    slots = torch.arange(length, device=docs.device).expand(batch, length)
    keep = docs >= 0
    index = torch.full((batch, num_documents), -1, dtype=torch.long, device=docs.device)
    index.scatter_reduce_(1, torch.where(keep, docs, 0), torch.where(keep, slots, -1), reduce="amax")
    return index.clamp(min=0), index >= 0


class RewardModel(nn.Module):
    """The decoder with a scalar head. `forward` returns one score per document (B, D)."""

    def __init__(self, config: LlamaConfig, backbone: LlamaModel | None = None):
        super().__init__()
        self.config = config
        self.model = backbone if backbone is not None else LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    def token_scores(
        self,
        input_ids: torch.Tensor,  # (B, T)
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The head applied at every position: (B, T)."""
        hidden = self.model(input_ids, position_ids=position_ids, document_ids=document_ids)  # (B, T, H)
        return self.score(hidden).squeeze(-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        num_documents: int | None = None,
    ) -> torch.Tensor:
        """Scores (B, D): each document's score at its last token (0 for absent documents). Without
        `document_ids` every row is one document ending at its last non-pad token."""
        scores = self.token_scores(input_ids, position_ids=position_ids, document_ids=document_ids)
        docs = document_ids
        if docs is None:
            pad = self.config.pad_token_id
            docs = torch.where(input_ids != pad, 0, -1) if pad is not None else torch.zeros_like(input_ids)
        if num_documents is None:
            num_documents = int(docs.max().item()) + 1 if docs.numel() else 1
        index, present = last_token_index(docs, max(num_documents, 1))
        return scores.gather(1, index) * present


def init_score_head(model: RewardModel, generator: torch.Generator | None = None) -> None:
    """N(0, 1/(hidden + 1)) as in Stiennon et al. 2020: scores start near zero with unit variance."""
    with torch.no_grad():
        std = 1.0 / (model.config.hidden_size + 1) ** 0.5
        model.score.weight.normal_(0.0, std, generator=generator)


def reward_model_from_causal_lm(lm: nn.Module, generator: torch.Generator | None = None) -> RewardModel:
    """A reward model that starts from a language model (usually the SFT policy): the decoder is
    shared (not copied), the LM head dropped, the score head freshly initialised."""
    config = lm.config
    reward = RewardModel(config, backbone=lm.model)
    reward.score.to(device=lm.model.embed_tokens.weight.device, dtype=lm.model.embed_tokens.weight.dtype)
    init_score_head(reward, generator)
    return reward


# ----------------------------------------------------------------------------------------------
# Files in transformers' layout


def save_reward_model(
    model: RewardModel, folder: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> Path:
    """Writes config.json (architectures = [...ForSequenceClassification], num_labels = 1) and
    model.safetensors (`model.*`, `score.weight`). pad_token_id must be set: transformers needs it
    to find each row's last token."""
    from ferrotune.io import save_safetensors

    if model.config.pad_token_id is None:
        raise ConfigError("pad_token_id: a reward model needs one to find the last token of padded rows")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model_state(model)
    state.pop("lm_head.weight", None)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    save_safetensors(state, folder / "model.safetensors")
    config = LlamaConfig.from_dict(model.config.to_dict())
    config.extra.update(
        architectures=[SEQUENCE_CLASSIFIERS[config.model_type]],
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        num_labels=1,
    )
    config.tie_word_embeddings = False  # no LM head in this checkpoint
    save_config(config, folder, next(iter(state.values())).dtype)
    return folder


def load_reward_model(
    folder: str | os.PathLike[str], device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> RewardModel:
    """Loads a reward model saved here or by transformers (…ForSequenceClassification, 1 label)."""
    folder = Path(folder)
    config = read_config(folder)
    num_labels = len(config.extra.get("id2label", {"0": ""})) or config.extra.get("num_labels", 1)
    if num_labels != 1:
        raise FormatError(f"{folder}/config.json: a reward model has 1 label, found {num_labels}")
    weights = folder / "model.safetensors"
    checkpoint = load_checkpoint(weights)
    with torch.device("meta"):
        model = RewardModel(config)
    if dtype is None:
        dtype = checkpoint["score.weight"].dtype if "score.weight" in checkpoint else torch.float32
    model.to(dtype=dtype)
    model.to_empty(device=device)
    expected = dict(model.named_parameters())
    for name, param in expected.items():
        if name not in checkpoint:
            raise FormatError(f"{weights}: tensor {name!r} is missing", path=str(weights), place=name)
        source = checkpoint[name]
        if tuple(source.shape) != tuple(param.shape):
            raise FormatError(
                f"{weights}: tensor {name!r} has shape {list(source.shape)}, expected {list(param.shape)}",
                path=str(weights),
                place=name,
            )
        with torch.no_grad():
            param.copy_(source)
    unexpected = sorted(set(checkpoint) - expected.keys())
    if unexpected:
        raise FormatError(
            f"{weights}: unexpected tensors {unexpected[:5]}", path=str(weights), place=unexpected[0]
        )
    return model


# ----------------------------------------------------------------------------------------------
# Training


def pair_scores(
    model: RewardModel, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen and rejected scores of every pair in a packed batch, flattened: ((N,), (N,), margin (N,))."""
    present = batch["pair_index"] >= 0  # (B, D)
    width = present.shape[1]
    scores = {
        side: model(
            batch[f"{side}_input_ids"],
            position_ids=batch[f"{side}_position_ids"],
            document_ids=batch[f"{side}_document_ids"],
            num_documents=width,
        )
        for side in ("chosen", "rejected")
    }
    return scores["chosen"][present], scores["rejected"][present], batch["margin"][present]


@torch.no_grad()
def evaluate_reward_model(
    model: RewardModel, pairs: PreferenceData, *, batch_size: int, seq_len: int, pad_id: int
) -> dict[str, float]:
    """Mean Bradley-Terry loss, accuracy (chosen scored above rejected) and mean score gap."""
    was_training = model.training
    model.eval()
    device = model.score.weight.device
    losses, correct, gaps = [], [], []
    for batch in source_batches(pairs, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device):
            chosen, rejected, _ = pair_scores(model, batch)
        chosen, rejected = chosen.float(), rejected.float()
        losses.append(bradley_terry_loss(chosen, rejected))
        correct.append((chosen > rejected).float())
        gaps.append(chosen - rejected)
    model.train(was_training)
    return {
        "loss": float(torch.cat(losses).mean()),
        "accuracy": float(torch.cat(correct).mean()),
        "margin": float(torch.cat(gaps).mean()),
    }


def train_reward_model(
    model: RewardModel,
    pairs: PreferenceData,
    method: RewardConfig,
    train: TrainConfig,
    *,
    seq_len: int,
    pad_id: int,
    eval_pairs: PreferenceData | None = None,
    run_dir: str | Path | None = None,
    log_every: int = 10,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, float]:
    """Trains the trainable parameters of `model` for `train.steps` optimizer steps of
    `train.grad_accum` micro-batches of `train.batch_size` packed rows; the Bradley-Terry loss is
    averaged over every pair of the step. Returns the final evaluation (on `eval_pairs`, or the
    training pairs when none are given)."""
    device = model.score.weight.device
    optimizer = make_optimizer(model, train)
    params = [p for p in model.parameters() if p.requires_grad]
    log = MetricsLog(run_dir, train.steps, "reward", quiet)
    micro_batches = cycle(
        lambda epoch: source_batches(
            pairs, batch_size=train.batch_size, seq_len=seq_len, pad_id=pad_id, seed=seed, epoch=epoch
        ),
        train.steps * train.grad_accum,
    )
    model.train()
    for step in range(train.steps):
        group = [{k: v.to(device) for k, v in next(micro_batches).items()} for _ in range(train.grad_accum)]
        total_pairs = sum(int((b["pair_index"] >= 0).sum()) for b in group)
        loss_sum, correct = 0.0, 0.0
        for batch in group:
            with autocast(device, train.precision):
                chosen, rejected, margin = pair_scores(model, batch)
            losses = bradley_terry_loss(chosen, rejected, margin if method.use_margin else None)
            (losses.sum() / total_pairs).backward()
            loss_sum += float(losses.detach().sum())
            correct += float((chosen > rejected).float().sum())
        lr = lr_at(step, train)
        grad_norm = optimizer_step(optimizer, params, lr, train.max_grad_norm)
        if (step + 1) % log_every == 0 or step + 1 == train.steps:
            log.log(
                step + 1,
                loss=loss_sum / total_pairs,
                accuracy=correct / total_pairs,
                lr=lr,
                grad_norm=grad_norm,
            )
    final = evaluate_reward_model(
        model, eval_pairs or pairs, batch_size=train.batch_size, seq_len=seq_len, pad_id=pad_id
    )
    log.log(train.steps, **{f"eval_{k}": v for k, v in final.items()})
    if not quiet:
        print(log.summary())
    return final

"""Text generation with a KV cache: greedy, temperature, top-k, top-p, stop tokens, batches of
prompts of different lengths, and `ferrotune generate`.

Prompts of different lengths are left-padded to a common length. Padding slots carry document
id -1 so no real token attends to them, and positions count from each row's first real token, so
every row computes exactly what it would compute alone. Each step feeds one new token per row;
the cache keeps the keys and values of everything before it. `use_cache=False` recomputes the
whole sequence every step (the reference the cached path must reproduce token for token).

Sampling of the next token from logits z (per row):
    greedy (temperature == 0): argmax z
    otherwise p = softmax(z / temperature), restricted to the k most likely tokens (top_k) and to
    the smallest set whose probability reaches top_p (nucleus), renormalised, then sampled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ferrotune.models.llama import CausalLM


@dataclass
class Sampling:
    """How the next token is chosen. temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1.0: no limit

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> chosen token ids (B,)."""
    if sampling.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass ranked above each token
        drop_sorted = before >= sampling.top_p  # the top token always has before == 0: kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts -> (input_ids, position_ids, document_ids), each (B, L), left-padded."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    positions = torch.zeros((len(prompts), length), dtype=torch.long)
    documents = torch.full((len(prompts), length), -1, dtype=torch.int32)
    for row, prompt in enumerate(prompts):
        start = length - len(prompt)
        ids[row, start:] = torch.tensor(list(prompt), dtype=torch.long)
        positions[row, start:] = torch.arange(len(prompt))
        documents[row, start:] = 0
    return ids.to(device), positions.to(device), documents.to(device)


@torch.no_grad()
def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    use_cache: bool = True,
    seed: int | None = None,
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Continues each prompt by up to `max_new_tokens` tokens. A row stops after emitting a token
    in `stop_tokens` (which is not returned). Returns the new tokens of each row."""
    sampling = sampling or Sampling()
    device = model.model.embed_tokens.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    ids, positions, documents = left_pad(prompts, pad_id, device)
    batch = ids.shape[0]
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []

    cache = model.make_kv_cache(batch, ids.shape[1] + max_new_tokens) if use_cache else None
    step_ids, step_positions, step_documents = ids, positions, documents
    for _ in range(max_new_tokens):
        logits = model(step_ids, position_ids=step_positions, document_ids=step_documents, kv_cache=cache)
        token = next_tokens(logits[:, -1], sampling, generator)  # (B,)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        new_tokens.append(token)
        if on_step is not None:
            on_step(token)
        finished |= torch.isin(token, stop)
        if bool(finished.all()):
            break
        next_position = positions[:, -1:] + 1  # (B, 1)
        positions = torch.cat((positions, next_position), dim=1)
        documents = torch.cat((documents, torch.zeros_like(documents[:, -1:])), dim=1)
        ids = torch.cat((ids, token[:, None]), dim=1)
        if cache is not None:
            step_ids, step_positions, step_documents = token[:, None], next_position, documents[:, -1:]
        else:
            step_ids, step_positions, step_documents = ids, positions, documents
    model.train(was_training)

    out: list[list[int]] = []
    stop_set = set(stop_tokens)
    generated = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in range(batch)]
    for row in generated:
        kept: list[int] = []
        for token in row:
            if token in stop_set:
                break
            kept.append(token)
        out.append(kept)
    return out


# ----------------------------------------------------------------------------------------------
# Text in, text out
# ----------------------------------------------------------------------------------------------


def stop_token_ids(folder: Path, tokenizer: object, model: CausalLM) -> list[int]:
    """End-of-sequence ids from config.json, generation_config.json and tokenizer_config.json."""
    ids: set[int] = set()
    candidates: list[object] = [model.config.eos_token_id]
    generation_config = folder / "generation_config.json"
    if generation_config.exists():
        candidates.append(json.loads(generation_config.read_text()).get("eos_token_id"))
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.exists():
        eos = json.loads(tokenizer_config.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            candidates.append(tokenizer.token_to_id(eos))  # type: ignore[attr-defined]
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, list):
            ids.update(x for x in c if isinstance(x, int))
    return sorted(ids)


def generate_text(
    folder: str | Path,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    sampling: Sampling | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int | None = 0,
    model: CausalLM | None = None,
) -> list[str]:
    """Loads the checkpoint (and its tokenizer.json) from `folder` and continues each prompt."""
    from tokenizers import Tokenizer

    from ferrotune.models.load import load_model

    folder = Path(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if model is None:
        model = load_model(folder, device=device, dtype=dtype)
    encoded = [tokenizer.encode(p).ids for p in prompts]
    stops = stop_token_ids(folder, tokenizer, model)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (stops[0] if stops else 0)
    outputs = generate(
        model,
        encoded,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_tokens=stops,
        pad_id=pad,
        seed=seed,
    )
    return [tokenizer.decode(o) for o in outputs]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint folder (config.json, safetensors, tokenizer.json)")
    parser.add_argument("prompt", nargs="*", help="prompts (default: one per line on stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument(
        "--chat", action="store_true", help="wrap each prompt in the plain chat template of ferrotune SFT"
    )


def run(args: argparse.Namespace) -> int:
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        print("no prompt given", file=sys.stderr)
        return 2
    start = time.perf_counter()
    if args.chat:
        from ferrotune.train.text_data import render_prompt

        prompts = [render_prompt(p) for p in prompts]
    outputs = generate_text(
        args.model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        sampling=Sampling(args.temperature, args.top_k, args.top_p),
        device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        seed=args.seed,
    )
    for prompt, output in zip(prompts, outputs, strict=True):
        print(f"{prompt}{output}")
    print(f"[{len(prompts)} prompt(s) in {time.perf_counter() - start:.1f}s]", file=sys.stderr)
    return 0

"""Small datasets straight from text files, tokenised and packed in memory (for quick runs and the
quickstart; large corpora go through `ferrotune prepare` and memory-mapped shards instead).

Every row follows the batch contract: `input_ids`, pre-shifted `labels` (-100 where no loss is
taken), `position_ids` restarting at each document and `document_ids` (-1 on padding).

Chat examples are rendered with a fixed plain template (special tokens `<|user|>`, `<|assistant|>`,
`<|end|>`); only the assistant replies and their closing `<|end|>` carry a loss:

    <|user|>\n{prompt}\n<|assistant|>\n{reply}<|end|>
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ferrotune.errors import FormatError

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", USER, ASSISTANT, END]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Parses a JSONL file; a bad line raises FormatError naming the file and line."""
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise FormatError(
                    f"{path}:{number}: invalid JSON ({err.msg})", path=str(path), place=f"line {number}"
                ) from None
            if not isinstance(record, dict):
                raise FormatError(
                    f"{path}:{number}: expected an object", path=str(path), place=f"line {number}"
                )
            records.append(record)
    return records


def read_texts(path: str | Path) -> list[str]:
    """Documents of a `.txt` file (separated by blank lines) or a JSONL file's `text` fields."""
    path = Path(path)
    if path.suffix == ".txt":
        return [doc.strip() for doc in path.read_text(encoding="utf-8").split("\n\n") if doc.strip()]
    texts = []
    for number, record in enumerate(read_jsonl(path), start=1):
        if not isinstance(record.get("text"), str):
            raise FormatError(
                f"{path}: record {number}: missing string field 'text'", path=str(path), place="text"
            )
        texts.append(record["text"])
    return texts


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Chat records: `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "response"}`."""
    conversations = []
    for number, record in enumerate(read_jsonl(path), start=1):
        where = f"{path}: record {number}"
        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not all(
                isinstance(m, dict)
                and isinstance(m.get("content"), str)
                and m.get("role") in ("system", "user", "assistant")
                for m in messages
            ):
                raise FormatError(
                    f"{where}: field 'messages' must hold {{role, content}} objects",
                    path=str(path),
                    place="messages",
                )
            conversations.append(messages)
        elif isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
            conversations.append(
                [
                    {"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]},
                ]
            )
        else:
            raise FormatError(
                f"{where}: expected 'messages' or 'prompt' and 'response'", path=str(path), place="messages"
            )
    return conversations


def render_chat(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per token, whether it is trained (assistant replies only)."""
    ids: list[int] = []
    trained: list[bool] = []

    def add(text: str, train: bool) -> None:
        piece = tokenizer.encode(text, add_special_tokens=False).ids
        ids.extend(piece)
        trained.extend([train] * len(piece))

    for message in messages:
        if message["role"] == "assistant":
            add(f"{ASSISTANT}\n", False)
            add(f"{message['content']}{END}", True)
        else:
            add(f"{USER}\n{message['content']}\n", False)
    return ids, trained


def render_prompt(prompt: str) -> str:
    """The text a model trained on `render_chat` continues with its answer."""
    return f"{USER}\n{prompt}\n{ASSISTANT}\n"


def pack(
    documents: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Packs documents (token ids, trained mask) into rows of `seq_len`, first fit in order; a
    document longer than a row is cut into row-sized pieces. labels[t] = ids[t + 1] when token t + 1
    is trained and in the same document, else -100."""
    pieces: list[tuple[list[int], list[bool]]] = []
    for ids, trained in documents:
        for start in range(0, len(ids), seq_len):
            if len(ids[start : start + seq_len]) > 1:
                pieces.append((ids[start : start + seq_len], trained[start : start + seq_len]))
    rows: list[list[tuple[list[int], list[bool]]]] = []
    room: list[int] = []
    for piece in pieces:
        for i, free in enumerate(room):
            if len(piece[0]) <= free:
                rows[i].append(piece)
                room[i] -= len(piece[0])
                break
        else:
            rows.append([piece])
            room.append(seq_len - len(piece[0]))
    out = []
    for row in rows:
        ids = torch.full((seq_len,), pad_id, dtype=torch.long)
        labels = torch.full((seq_len,), -100, dtype=torch.long)
        positions = torch.zeros(seq_len, dtype=torch.long)
        documents = torch.full((seq_len,), -1, dtype=torch.int32)
        start = 0
        for d, (piece_ids, piece_trained) in enumerate(row):
            n = len(piece_ids)
            tokens = torch.tensor(piece_ids)
            target = torch.where(torch.tensor(piece_trained[1:]), tokens[1:], torch.tensor(-100))
            ids[start : start + n] = tokens
            labels[start : start + n - 1] = target
            positions[start : start + n] = torch.arange(n)
            documents[start : start + n] = d
            start += n
        out.append({"input_ids": ids, "labels": labels, "position_ids": positions, "document_ids": documents})
    return out


def text_rows(
    texts: list[str], tokenizer: Any, seq_len: int, eos_id: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Raw text for (continued) pretraining: every token trained, an end-of-text token after each."""
    docs = []
    for text in texts:
        ids = [*tokenizer.encode(text, add_special_tokens=False).ids, eos_id]
        docs.append((ids, [True] * len(ids)))
    return pack(docs, seq_len, pad_id)


def chat_rows(
    conversations: list[list[dict[str, str]]], tokenizer: Any, seq_len: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Chat data for SFT: assistant-only loss."""
    return pack([render_chat(c, tokenizer) for c in conversations], seq_len, pad_id)

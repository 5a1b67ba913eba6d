"""Training data for the engine: records -> token ids with a response mask -> padded batches.

A record is one of
  {"prompt": str, "response": str}   the prompt becomes a user message in the chat template;
  {"messages": [...]}                 the last assistant message is the response;
  {"text": str}                       plain text, every token is a target (knowledge-injection corpora).
Only response tokens (plus the EOS that ends them) carry loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stratos.io import DataError, iter_jsonl

IGNORE = -100


@dataclass
class Encoded:
    """One tokenised example. ``labels[t]`` is the target at position t (IGNORE outside the response)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_targets(self) -> int:
        # Targets are predicted from the previous position, so position 0 never counts.
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class EncodeStats:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.kept}/{self.records} examples kept, {self.truncated} truncated to max_length, "
            f"{self.dropped_empty} dropped with no response tokens left"
        )


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read training records from JSONL, checking each has a usable shape (errors name file:line)."""
    out = []
    for lineno, rec in iter_jsonl(path):
        if not ({"prompt", "response"} <= rec.keys() or "messages" in rec or "text" in rec):
            raise DataError(
                f"{path}:{lineno}: a record needs 'prompt' and 'response', 'messages', or 'text' "
                f"(found keys: {', '.join(sorted(rec)) or 'none'})"
            )
        out.append(rec)
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _split_messages(rec: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    if "messages" in rec:
        msgs = rec["messages"]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise ValueError("'messages' must end with an assistant message (the response)")
        return msgs[:-1], msgs[-1]["content"]
    return [{"role": "user", "content": rec["prompt"]}], rec["response"]


def encode_record(rec: dict[str, Any], tokenizer: Any, max_length: int, *, chat: bool = True) -> tuple[Encoded, bool]:
    """Tokenise one record. Returns the example and whether it was truncated."""
    eos = tokenizer.eos_token_id
    if "text" in rec and "prompt" not in rec and "messages" not in rec:
        prompt_ids: list[int] = []
        response_ids = tokenizer(rec["text"], add_special_tokens=False)["input_ids"] + [eos]
        bos = tokenizer.bos_token_id
        if bos is not None and bos != eos:
            prompt_ids = [bos]  # the first text token needs something to be predicted from
    else:
        context, response = _split_messages(rec)
        if chat:
            prompt_text = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
        else:
            prompt_text = "\n".join(m["content"] for m in context) + "\n"
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        # "response_ids": the exact tokens a teacher sampled (top-k KD aligns its signal to them).
        ids_given = rec.get("response_ids")
        response_ids = (list(ids_given) if ids_given is not None else tokenizer(response, add_special_tokens=False)["input_ids"]) + [eos]
    ids = prompt_ids + response_ids
    labels = [IGNORE] * len(prompt_ids) + response_ids
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length]), truncated


def encode(records: Iterable[dict[str, Any]], tokenizer: Any, max_length: int, *, chat: bool = True) -> tuple[list[Encoded], EncodeStats]:
    """Tokenise records; examples left with no response token are dropped and counted, never silently."""
    stats = EncodeStats()
    out = []
    for i, rec in enumerate(records):
        stats.records += 1
        try:
            ex, truncated = encode_record(rec, tokenizer, max_length, chat=chat)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"record {i}: {e}") from None
        stats.truncated += truncated
        if ex.num_targets == 0:
            stats.dropped_empty += 1
            continue
        out.append(ex)
        stats.kept += 1
    return out, stats


@dataclass
class Batch:
    """A padded batch. ``target_mask`` [B, T-1] marks positions whose next token is a target,
    in the order teacher signals are stored: row by row, left to right."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    indices: list[int]

    @property
    def target_mask(self) -> torch.Tensor:
        return self.labels[:, 1:] != IGNORE

    @property
    def targets(self) -> torch.Tensor:
        return self.labels[:, 1:][self.target_mask]

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.sum())


def collate(examples: Sequence[Encoded], indices: Sequence[int], pad_id: int) -> Batch:
    """Right-pad to the longest example of the batch."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return Batch(ids, mask, labels, list(indices))


def data_fingerprint(examples: Sequence[Encoded]) -> str:
    from stratos.io import sha256_text

    return sha256_text([(e.input_ids, e.labels) for e in examples])

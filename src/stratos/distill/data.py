"""Training data for the engine: records -> token ids with a response mask -> padded batches.

A record is one of
  {"prompt": str, "response": str}   the prompt becomes a user message in the chat template;
  {"messages": [...]}                 the last assistant message is the response;
  {"text": str}                       plain text, every token is a target (knowledge-injection corpora).
Only response tokens (plus the EOS that ends them) carry loss.

A prompt or messages record may also carry ``"teacher_messages": [...]``: the chat the teacher answered
(ending with the user's turn), where it saw more than the student will (worked examples, the task's
rules, a system prompt). The teacher's signal is then computed on those messages followed by the same
response, the student's on its own prompt: context distillation (``teacher_record``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from stratos.io import DataError, iter_jsonl, json_kind
from stratos.models.generate import encode_prompt

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


class Records(list):
    """Training records that remember where each one came from (``where[i]`` = ``"path:line"``), so a
    problem found later, at tokenisation, still names the line to fix."""

    def __init__(self, records: Iterable[dict[str, Any]] = (), where: Iterable[str] = ()):
        super().__init__(records)
        self.where = list(where)


def record_location(records: Any, i: int) -> str:
    """Where record ``i`` came from: its ``path:line``, or ``record N`` (from 1) for records built in code."""
    where = getattr(records, "where", None)
    return where[i] if where and i < len(where) else f"record {i + 1}"


def _chat_problem(msgs: Any, name: str) -> str | None:
    """What is wrong with a list of chat messages in field ``name``, or None."""
    if not isinstance(msgs, list):
        return f"'{name}' must be a list of {{role, content}} objects, got {json_kind(msgs)}"
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"'{name}[{j}]' must be an object with 'role' and 'content', got {json_kind(m)}"
        for key in ("role", "content"):
            if key not in m:
                return f"'{name}[{j}]' has no '{key}'"
            if not isinstance(m[key], str):
                return f"'{name}[{j}].{key}' must be a string, got {json_kind(m[key])}"
    return None


def _teacher_messages_problem(rec: dict[str, Any]) -> str | None:
    msgs = rec["teacher_messages"]
    if "messages" not in rec and "prompt" not in rec:
        return "'teacher_messages' needs a 'prompt' or 'messages' record: it replaces the prompt on the teacher's side"
    if problem := _chat_problem(msgs, "teacher_messages"):
        return problem
    if not msgs or msgs[-1]["role"] != "user":
        return ("'teacher_messages' must end with a user message (the response follows it), "
                + (f"the last is {msgs[-1]['role']!r}" if msgs else "it is empty"))
    return None


def _messages_problem(msgs: Any) -> str | None:
    if problem := _chat_problem(msgs, "messages"):
        return problem
    if not msgs:
        return "'messages' is empty; it needs the prompt and then an assistant message (the response)"
    if msgs[-1]["role"] != "assistant":
        return f"'messages' must end with an assistant message (the response); the last is {msgs[-1]['role']!r}"
    if len(msgs) == 1:
        return "'messages' has only the assistant message; the messages before it (the prompt) are missing"
    return None


def _token_problem(tok: Any) -> bool:
    """Whether a top-k token is unreadable: not a string, or a malformed ``token_id:N`` / ``bytes:HEX``."""
    if not isinstance(tok, str):
        return True
    if tok.startswith("token_id:"):
        return not tok[9:].isdigit()
    if tok.startswith("bytes:"):
        return len(tok[6:]) % 2 != 0 or any(c not in "0123456789abcdefABCDEF" for c in tok[6:])
    return False


def _topk_problem(sig: Any) -> str | None:
    # The shape `stratos synth` writes with top_logprobs: {"tokens": [t, ...], "top": [[[t, logprob], ...], ...]}.
    shape = "'topk' must be {\"tokens\": [...], \"top\": [[[token, logprob], ...], ...]} as stratos synth writes it"
    if not isinstance(sig, dict) or not isinstance(sig.get("tokens"), list) or not isinstance(sig.get("top"), list):
        return shape
    if len(sig["top"]) != len(sig["tokens"]):
        return f"'topk' has {len(sig['tokens'])} tokens but {len(sig['top'])} positions in 'top'"
    for j, tok in enumerate(sig["tokens"]):
        if _token_problem(tok):
            return f"'topk.tokens[{j}]' is not a token string: {tok!r}"
    for p, pos in enumerate(sig["top"]):
        if not isinstance(pos, list):
            return shape
        for pair in pos:
            if (not isinstance(pair, list) or len(pair) != 2 or _token_problem(pair[0])
                    or isinstance(pair[1], bool) or not isinstance(pair[1], (int, float))):
                return f"'topk.top[{p}]' must hold [token, logprob] pairs, found {pair!r}"
    return None


def record_problem(rec: dict[str, Any], *, need_response: bool = True) -> str | None:
    """What is wrong with a record's shape, in one line, or None. It follows the order
    ``encode_record`` reads a record in: 'messages', else 'prompt' and 'response', else 'text'.
    ``need_response=False``: a prompt alone is a record too (RL samples its responses: grpo, opd)."""
    for key in ("prompt", "response", "text"):
        if key in rec and not isinstance(rec[key], str):
            return f"'{key}' must be a string, got {json_kind(rec[key])}"
    if "messages" in rec:
        if problem := _messages_problem(rec["messages"]):
            return problem
    elif "prompt" in rec:
        if "response" not in rec and need_response:
            return ("a record with 'prompt' needs 'response' too (prompt-only records are for RL: "
                    "algorithm grpo or opd)")
    elif "text" not in rec:
        return (f"a record needs 'prompt' and 'response', 'messages', or 'text' "
                f"(found keys: {', '.join(sorted(rec)) or 'none'})")
    ids = rec.get("response_ids")
    if ids is not None:
        if not isinstance(ids, list):
            return f"'response_ids' must be a list of token ids, got {json_kind(ids)}"
        for j, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                return f"'response_ids[{j}]' must be a token id (an integer >= 0), got {t!r}"
    if "teacher_messages" in rec and (problem := _teacher_messages_problem(rec)):
        return problem
    if rec.get("topk"):
        return _topk_problem(rec["topk"])
    return None


def load_records(path: str | Path, *, need_response: bool = True) -> Records:
    """Read training records from JSONL, checking every record's shape now (errors name file:line),
    so bad data fails before models load rather than mid-training. ``need_response=False`` accepts
    prompt-only records (RL)."""
    out = Records()
    for lineno, rec in iter_jsonl(path):
        if problem := record_problem(rec, need_response=need_response):
            raise DataError(f"{path}:{lineno}: {problem}")
        out.append(rec)
        out.where.append(f"{path}:{lineno}")
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _split_messages(rec: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    if "messages" in rec:
        msgs = rec["messages"]
        return msgs[:-1], msgs[-1]["content"]
    return [{"role": "user", "content": rec["prompt"]}], rec["response"]


def teacher_record(rec: dict[str, Any]) -> dict[str, Any]:
    """``rec`` as its teacher was asked: its ``teacher_messages`` then the same response, as a messages
    record (no ``response_ids`` or ``topk``: they belong to the student's tokens); ``rec`` itself when it
    has none."""
    if "teacher_messages" not in rec:
        return rec
    _, response = _split_messages(rec)
    return {"messages": [*rec["teacher_messages"], {"role": "assistant", "content": response}]}


def teacher_prompts(records: Iterable[dict[str, Any]], tokenizer: Any) -> dict[tuple[int, ...], list[int]] | None:
    """The teacher's prompt ids by the student's, for the records that carry ``teacher_messages`` (None when
    none does): what ``stratos.teachers.signal.PromptedSignal`` puts before a response for the teacher, for
    every row with that prompt (the data's own and the student's samples). A student prompt asked of the
    teacher two ways raises DataError naming the record."""
    out: dict[tuple[int, ...], list[int]] = {}
    for i, rec in enumerate(records):
        if "teacher_messages" not in rec:
            continue
        student = tuple(encode_prompt(tokenizer, _split_messages(rec)[0]))
        teacher = encode_prompt(tokenizer, rec["teacher_messages"])
        if out.setdefault(student, teacher) != teacher:
            raise DataError(f"{record_location(records, i)}: its prompt appears in another record with other "
                            "'teacher_messages'; the teacher's side of a prompt must be one chat")
    return out or None


def encode_record(rec: dict[str, Any], tokenizer: Any, max_length: int) -> tuple[Encoded, bool]:
    """Tokenise one record (of a shape ``record_problem`` accepts). Returns the example and whether it
    was truncated; ``response_ids`` outside the tokenizer's vocabulary raise ValueError."""
    eos = tokenizer.eos_token_id
    if "text" in rec and "prompt" not in rec and "messages" not in rec:
        prompt_ids: list[int] = []
        response_ids = tokenizer(rec["text"], add_special_tokens=False)["input_ids"] + [eos]
        bos = tokenizer.bos_token_id
        if bos is not None and bos != eos:
            prompt_ids = [bos]  # the first text token needs something to be predicted from
    else:
        context, response = _split_messages(rec)
        prompt_ids = encode_prompt(tokenizer, context)  # as generation and the server encode it
        # "response_ids": the exact tokens a teacher sampled (top-k KD aligns its signal to them).
        ids_given = rec.get("response_ids")
        if ids_given is not None:
            # An id past the vocabulary would index outside the embedding mid-training.
            vocab = len(tokenizer)
            if (bad := next((t for t in ids_given if t >= vocab), None)) is not None:
                raise ValueError(f"'response_ids' holds token id {bad}, outside the tokenizer's vocabulary of "
                                 f"{vocab} tokens (made with another tokenizer?)")
        response_ids = (list(ids_given) if ids_given is not None else tokenizer(response, add_special_tokens=False)["input_ids"]) + [eos]
    ids = prompt_ids + response_ids
    labels = [IGNORE] * len(prompt_ids) + response_ids
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length]), truncated


def encode(records: Iterable[dict[str, Any]], tokenizer: Any, max_length: int) -> tuple[list[Encoded], EncodeStats]:
    """Tokenise records; examples left with no response token are dropped and counted, never silently.
    A bad record raises DataError naming its ``path:line`` (records from ``load_records``) or ``record N``."""
    from jinja2 import TemplateError  # what a chat template raises for messages it refuses

    stats = EncodeStats()
    out = []
    for i, rec in enumerate(records):
        stats.records += 1
        # Records built in code skipped load_records' check; those from a file pass it again cheaply.
        problem = record_problem(rec) if isinstance(rec, dict) else f"expected a dict, got {type(rec).__name__}"
        if problem:
            raise DataError(f"{record_location(records, i)}: {problem}")
        try:
            ex, truncated = encode_record(rec, tokenizer, max_length)
        except (KeyError, TypeError, ValueError, TemplateError) as e:
            raise DataError(f"{record_location(records, i)}: {e}") from None
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
    weights: torch.Tensor | None = None  # [num_targets] per-token weights of the loss (None: all 1)
    # Other per-token values an algorithm reads, each [num_targets] (grpo: advantage, old_logp, ref_logp).
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def with_weights(self, weights: torch.Tensor) -> "Batch":
        """The batch with per-token loss weights, one per target token in ``target_mask`` order."""
        self._check_per_token("weights", weights)
        return replace(self, weights=weights)

    def with_values(self, **values: torch.Tensor) -> "Batch":
        """The batch with more per-token values (one per target token, ``target_mask`` order)."""
        for name, v in values.items():
            self._check_per_token(name, v)
        return replace(self, values={**self.values, **values})

    def _check_per_token(self, name: str, v: torch.Tensor) -> None:
        if v.shape != (self.num_targets,):
            raise ValueError(f"{name} must have shape ({self.num_targets},), got {tuple(v.shape)}")

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

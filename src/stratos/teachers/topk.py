"""The API teacher's signal: its top-k log-probs per response token, as KD targets.

APIs return at most ~20 log-probs per token, not the distribution. So both distributions are
compared over k + 1 buckets: the teacher's top-k tokens, plus one bucket for all remaining mass
(``1 - sum(top-k)`` for the teacher; for the student the exact softmax mass outside those k
tokens; ``stratos.distill.topk.topk_log_probs``). Any registered divergence then applies
unchanged, since it only sees two distributions over the same buckets.

The records carry the signal (``rec["topk"]``, written by ``stratos synth`` with
``top_logprobs: k``): the teacher's sampled tokens and, per token, ``[[token, logprob], ...]``.
A token is ``token_id:N`` (exact), ``bytes:HEX`` (mapped through the student's byte-level
vocabulary) or text. Tokens the student's vocabulary lacks fall into the remainder bucket.

An API teacher's tokenizer is rarely the student's. When the teacher's tokens are not the student's
tokens of the response but spell its bytes, the two tokenisations are aligned by bytes as
cross-tokenizer KD aligns them (``stratos.distill.crosstok.align``): each student position that
starts a span both share takes the teacher's top-k at the position starting the same span, its tokens
mapped to the student tokens with exactly their bytes. Positions inside a span, positions without a
signal (OpenAI omits the final EOS), and records whose tokens spell something else (or come as
``token_id:N`` of another vocabulary) get a one-hot target on the reference token: for those tokens KD
reduces to cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stratos.distill.data import IGNORE, Batch, Records, encode_record
from stratos.distill.topk import FLOOR


def vocab_by_bytes(tokenizer: Any) -> dict[bytes, int]:
    """Each token's raw bytes -> its id, read as cross-tokenizer KD reads them (``stratos.distill.crosstok``:
    where several spell the same bytes, the one the tokenizer writes, ``ids_by_bytes``); special tokens by
    their text, as an API may return them."""
    from stratos.distill.crosstok import ids_by_bytes, token_bytes

    pieces = token_bytes(tokenizer)
    out = ids_by_bytes(tokenizer, pieces)
    for tok, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if pieces[i] is None:
            out.setdefault(tok.encode(), i)
    return out


def token_id(token: str, table: dict[bytes, int], vocab_size: int) -> int:
    """The id of a token as synth stores it, or -1 when the vocabulary lacks it."""
    if token.startswith("token_id:"):
        i = int(token[9:])
        return i if 0 <= i < vocab_size else -1
    raw = bytes.fromhex(token[6:]) if token.startswith("bytes:") else token.encode()
    return table.get(raw, -1)


def with_teacher_tokens(records: Sequence[dict[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """Records whose top-k signal maps fully onto the vocabulary get ``response_ids``: the tokens
    the teacher really sampled. Re-tokenising the text could split it differently (a model may
    sample a non-canonical tokenisation) and shift every later position of the signal."""
    table, vocab, eos = vocab_by_bytes(tokenizer), len(tokenizer), tokenizer.eos_token_id
    out = Records(where=getattr(records, "where", ()))  # keep each record's path:line for encode's errors
    for rec in records:
        sig = rec.get("topk")
        if sig and "response_ids" not in rec:
            ids = [token_id(t, table, vocab) for t in sig["tokens"]]
            if ids and ids[-1] == eos:
                ids = ids[:-1]  # the engine appends EOS itself
            if ids and min(ids) >= 0:
                rec = {**rec, "response_ids": ids}
        out.append(rec)
    return out


@dataclass
class TopKSignal:
    """Per example, ``ids`` [targets, k] (-1 = empty slot) and ``logp`` [targets, k] aligned to the
    example's target positions, in the order the engine's ``Batch.targets`` lists them."""

    ids: list[torch.Tensor]
    logp: list[torch.Tensor]
    k: int
    stats: dict[str, int] = field(default_factory=dict)
    head: Any = None  # no teacher head: the targets are already distributions

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]], tokenizer: Any, max_length: int) -> "TopKSignal":
        """Build the targets of the examples ``encode(records, ...)`` keeps, in the same order."""
        table = vocab_by_bytes(tokenizer)
        vocab = len(tokenizer)
        k = max((len(pos) for r in records if r.get("topk") for pos in r["topk"]["top"]), default=1)
        k = max(k, 1)
        pieces, prefixed = None, False  # the student's token bytes (and dummy prefix), read once a record needs aligning by bytes
        stats = {"examples": 0, "with_topk": 0, "aligned_by_bytes": 0, "misaligned": 0, "positions": 0,
                 "topk_positions": 0, "unmapped": 0}
        all_ids, all_logp = [], []
        for rec in records:
            ex, _ = encode_record(rec, tokenizer, max_length)
            if ex.num_targets == 0:
                continue  # encode() drops these too
            stats["examples"] += 1
            labels = [t for t in ex.labels[1:] if t != IGNORE]
            ids = torch.full((len(labels), k), -1, dtype=torch.long)
            logp = torch.full((len(labels), k), FLOOR, dtype=torch.float32)
            ids[:, 0] = torch.tensor(labels)  # one-hot on the reference token unless the teacher says more
            logp[:, 0] = 0.0
            sig = rec.get("topk")
            if sig:
                t_ids = [token_id(t, table, vocab) for t in sig["tokens"]]
                m = min(len(t_ids), len(labels))
                partner: dict[int, int] | None = {p: p for p in range(m)}
                if t_ids[:m] != labels[:m]:  # another tokenisation: align by bytes
                    if pieces is None:
                        from stratos.distill.crosstok import adds_dummy_prefix, token_bytes

                        pieces = token_bytes(tokenizer)
                        prefixed = adds_dummy_prefix(tokenizer, pieces)
                    partner = _by_bytes(rec, sig, tokenizer, pieces, labels, prefixed)
                if partner is None:
                    stats["misaligned"] += 1
                else:
                    stats["with_topk"] += 1
                    stats["aligned_by_bytes"] += t_ids[:m] != labels[:m]
                    for p, j in partner.items():
                        if j < len(sig["top"]) and _fill(ids, logp, p, sig["top"][j], table, vocab, stats):
                            stats["topk_positions"] += 1
            stats["positions"] += len(labels)
            all_ids.append(ids)
            all_logp.append(logp)
        return cls(all_ids, all_logp, k, stats)

    def topk(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.ids[i] for i in batch.indices]), torch.cat([self.logp[i] for i in batch.indices])


def _fill(ids: torch.Tensor, logp: torch.Tensor, p: int, top: list, table: dict[bytes, int], vocab: int,
          stats: dict[str, int]) -> bool:
    """Position ``p``'s targets from one teacher position's top-k ``[[token, logprob], ...]``: the tokens
    the vocabulary has (each once, most likely first); False, leaving the one-hot, when it has none."""
    pairs, seen = [], set()
    for tok, lp in top:
        i = token_id(tok, table, vocab)
        if i < 0:
            stats["unmapped"] += 1
        elif i not in seen:
            seen.add(i)
            pairs.append((i, float(lp)))
    if not pairs:
        return False
    pairs.sort(key=lambda x: -x[1])
    ids[p] = -1
    logp[p] = FLOOR
    ids[p, : len(pairs)] = torch.tensor([i for i, _ in pairs])
    logp[p, : len(pairs)] = torch.tensor([lp for _, lp in pairs])
    return True


def _by_bytes(rec: dict[str, Any], sig: dict[str, Any], tokenizer: Any, pieces: Sequence[bytes | None],
              labels: Sequence[int], prefixed: bool) -> dict[int, int] | None:
    """Student target index -> the teacher position starting the same span of the response's bytes, for
    the student targets that start one (the student's EOS pairs with a teacher token after the text, when
    the signal has one); None when the teacher's tokens do not spell the response (or are ids of another
    vocabulary) or the student's targets are not its tokenisation of it. A student whose tokenizer puts a
    dummy prefix before the text (``prefixed``: ``adds_dummy_prefix``) keeps its first target's one-hot: the
    teacher's tokens there have no space, and a byte-for-byte map would send them to tokens it does not write
    at that point."""
    from stratos.distill.crosstok import _response_text, align, byte_offsets

    data = _response_text(rec).encode()
    t_offsets, pos = [], 0
    for t in sig["tokens"]:
        b = None if t.startswith("token_id:") else bytes.fromhex(t[6:]) if t.startswith("bytes:") else t.encode()
        if b is None or pos >= len(data) or data[pos: pos + len(b)] != b:
            break
        t_offsets.append((pos, pos + len(b)))
        pos += len(b)
    if pos != len(data):
        return None  # the tokens spell something else (what follows the text, e.g. an end token, is left out)
    text = data.decode()
    s_ids = list(rec.get("response_ids") or tokenizer(text, add_special_tokens=False)["input_ids"])
    if list(labels[: len(s_ids)]) != s_ids[: len(labels)]:
        return None
    try:
        s_offsets = byte_offsets(tokenizer, text, s_ids, pieces)
    except ValueError:
        return None
    partner = {k: j for k, j in align(s_offsets, t_offsets, len(data)).pairs if k < len(labels)}
    if prefixed:  # the student writes '▁hello' where the teacher's tokens say 'hello'
        partner.pop(0, None)
    if len(labels) > len(s_ids) and len(sig["tokens"]) > len(t_offsets):  # the EOS after the text, on both sides
        partner[len(s_ids)] = len(t_offsets)
    return partner

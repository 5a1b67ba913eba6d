"""Cross-tokenizer KD: a teacher whose tokenizer is not the student's teaches through the same loss.

Two tokenizers cut the same response into different tokens. What they share is its bytes, so the
alignment is by bytes (``align``): each side's tokens get byte offsets, and the response is cut into
*spans* at the byte boundaries both sides have. Each span is covered exactly by one or more
consecutive tokens on each side. At the student position that starts a span (the position predicting
its first token) and the teacher position that starts the same span, both models predict the next
text from the same byte prefix, so their next-token distributions are comparable; positions inside
a span have no teacher counterpart and train on cross-entropy alone.

The distributions live in different vocabularies. ``VocabMap`` maps each teacher token whose bytes
equal one student token's bytes exactly (their probability mass summed when several do); the share
of the teacher's mass that maps this way is what the planner measures (``mapped_mass``). A student
token that several teacher tokens spell gets their chained mass p(a) p(b | a) ... p(x | a b ...)
along the teacher's own tokens of the text (``CrossHead.project``), up to ``ctkd.max_chain`` teacher tokens
(``MAX_CHAIN``, 2, by default); a span start whose student token takes more trains on CE alone. Per span
start, the ``ctkd.method``:

- ``hybrid`` (default): the registered divergence (``loss``) on the mapped part, both distributions
  over the mapped student tokens plus one "other" bucket holding the rest of each side's mass, plus
  ``uld_weight`` x the Universal Logit Distillation term (Boizard et al. 2024) on the rest: the L1
  distance between the sorted probabilities of the teacher's unmapped tokens and the student's
  tokens outside the map;
- ``uld``: the ULD term alone, over the full distributions;
- ``shared``: the mapped part alone.

With one tokenizer on both sides every token maps to itself, both "other" buckets are empty and the
hybrid term is the plain divergence (tests/test_crosstok.py checks it to 1e-6 relative).

``CrossTokenizerSignal`` is a teacher signal like any other (``stratos.distill.signal``): it wraps the
teacher-side signal (online, cached or worker processes, on the teacher's own tokenization of the
records) and returns, per student target, the teacher's hidden state at the matching span start;
its head (``CrossHead``) carries the map, and ``kd_mask(batch)`` says which student targets have one.
The losses never know.
"""

from __future__ import annotations

import json
import math
import re
import sys
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stratos.distill.data import IGNORE, Batch, Encoded, collate, encode_record, record_location, teacher_record
from stratos.distill.head import OutputHead
from stratos.distill.signal import TeacherView
from stratos.models import template_stops
from stratos.spec import CtkdSpec

METHODS = ("hybrid", "uld", "shared")

# ---------------------------------------------------------------------------------------- token bytes


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet read backwards: the printable character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_kind(tokenizer: Any) -> str:
    """How the tokenizer's vocabulary spells bytes: ``bytelevel`` (GPT-2, Llama 3, SmolLM2, Qwen),
    ``metaspace`` (SentencePiece: Llama 2, Gemma, Mistral; '▁' for a space, ``<0xNN>`` byte fallback)
    or ``text`` (anything else: the vocabulary's strings are the text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "metaspace" if any("▁" in t for t in list(tokenizer.get_vocab())[:2000]) else "text"
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    text = json.dumps(decoder)
    if '"ByteLevel"' in text:
        return "bytelevel"
    if '"Metaspace"' in text or "▁" in text or '"ByteFallback"' in text:
        return "metaspace"
    return "text"


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes of each token id's text (None for special tokens, which stand for no text).

    Read from the vocabulary by the tokenizer's kind (``_decoder_kind``), once per tokenizer; added
    tokens that are not special (a domain's symbols) are their own text."""
    vocab = tokenizer.get_vocab()
    out: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    kind = _decoder_kind(tokenizer)
    decode = _byte_decoder() if kind == "bytelevel" else None
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for piece, i in vocab.items():
        fallback = _BYTE_FALLBACK.fullmatch(piece) if kind == "metaspace" else None
        if fallback:  # a byte of a byte-fallback vocabulary, even where it was registered as a special token
            out[i] = bytes([int(fallback.group(1), 16)])
        elif i in special or (i in added and added[i].special):
            out[i] = None
        elif i in added:
            out[i] = added[i].content.encode()
        elif decode is not None:
            try:
                out[i] = bytes(decode[c] for c in piece)
            except KeyError:  # not a byte-level piece (e.g. an unknown-token marker)
                out[i] = None
        elif kind == "metaspace":
            out[i] = piece.replace("▁", " ").encode()
        else:
            out[i] = piece.encode()
    return out


def ids_by_bytes(tokenizer: Any, pieces: Sequence[bytes | None] | None = None, rows: int | None = None
                 ) -> dict[bytes, int]:
    """Each byte string a token of ``tokenizer`` spells -> the token it writes for those bytes (ids below
    ``rows``). Where several spell the same bytes (a byte-fallback vocabulary's ``<0x3A>`` and its ``:``), the
    one its own cut of that text is, when that is a single token; else the lowest id that is not a
    byte-fallback piece; else the lowest. A student is never taught a token its tokenizer does not write:
    Gemma's ``<0x3A>``, mapped to from a teacher's ``:``, drove a pretrained student to answer nothing
    (docs/engine.md, "the map")."""
    pieces = token_bytes(tokenizer) if pieces is None else pieces
    rows = len(pieces) if rows is None else min(rows, len(pieces))
    by: dict[bytes, list[int]] = {}
    for i, b in enumerate(pieces[:rows]):
        if b is not None:
            by.setdefault(b, []).append(i)
    out = {b: ids[0] for b, ids in by.items()}
    dupes = []
    for b, ids in by.items():
        if len(ids) > 1:
            try:
                dupes.append((b, b.decode()))
            except UnicodeDecodeError:  # part of a character: no text of its own to cut
                dupes.append((b, None))
    if not dupes:
        return out
    fallback = {i for piece, i in tokenizer.get_vocab().items() if _BYTE_FALLBACK.fullmatch(piece)}
    texts = [t for _, t in dupes if t is not None]
    cuts = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    for b, text in dupes:
        cut = next(cuts) if text is not None else []
        ids = by[b]
        out[b] = cut[0] if len(cut) == 1 and cut[0] in ids else next((i for i in ids if i not in fallback), ids[0])
    return out


# ---------------------------------------------------------------------------------------- alignment


def byte_offsets(tokenizer: Any, text: str, ids: Sequence[int], pieces: Sequence[bytes | None] | None = None
                 ) -> list[tuple[int, int]]:
    """``[start, end)`` byte offsets in ``text`` (UTF-8) of each token of ``ids``, the tokenizer's
    tokenisation of ``text``.

    From the tokens' own bytes when they spell ``text`` exactly (byte-level BPE, SentencePiece with
    byte fallback; a SentencePiece dummy-prefix space on the first token is allowed for): exact to the
    byte even where one character is split over several tokens. Otherwise from the fast tokenizer's
    offset mapping (characters turned into bytes; tokens sharing one character each get its bytes up
    to where the next token starts). A tokenizer with neither raises ValueError."""
    data = text.encode()
    pieces = pieces if pieces is not None else token_bytes(tokenizer)
    own = [pieces[i] if i < len(pieces) else None for i in ids]
    if all(p is not None for p in own):
        joined = b"".join(own)  # type: ignore[arg-type]
        shift = 0 if joined == data else 1 if joined == b" " + data else None
        if shift is not None:
            out, pos = [], -shift
            for p in own:
                end = pos + len(p)  # type: ignore[arg-type]
                out.append((max(0, pos), max(0, end)))
                pos = end
            return out
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as e:
        raise ValueError(f"{type(tokenizer).__name__}: its tokens do not spell the text byte for byte and it has no "
                         f"offset mapping (a fast tokenizer has one), so it cannot be aligned: {e}") from None
    if list(enc["input_ids"]) != list(ids):
        raise ValueError("the offset mapping is of another tokenisation than the ids given")
    char_to_byte = [0]
    for ch in text:
        char_to_byte.append(char_to_byte[-1] + len(ch.encode()))
    out = []
    for a, b in enc["offset_mapping"]:
        out.append((char_to_byte[a], char_to_byte[b]))
    # Monotone, gap-free: a token's start is the previous one's end (trimmed spaces join the token after).
    fixed, pos = [], 0
    for a, b in out:
        b = max(b, pos)
        fixed.append((pos, b))
        pos = b
    if fixed:
        fixed[-1] = (fixed[-1][0], len(data))
    return fixed


@dataclass
class Alignment:
    """Spans of one response: ``bounds`` [0, c_1, ..., len] cut at the byte boundaries both sides share;
    ``student_span`` / ``teacher_span``: the span of each token (in order); ``pairs``: for each span,
    the index of the student token and of the teacher token that start it."""

    bounds: list[int]
    student_span: list[int]
    teacher_span: list[int]
    student_ends: list[int]  # the byte where each token ends
    teacher_ends: list[int]

    def spelling(self, s_token: int, t_token: int) -> int:
        """How many teacher tokens, from ``t_token`` (the one starting the span) on, spell student token
        ``s_token`` (the one starting it): k when the student's token ends where the k-th of them ends, 0
        when it ends inside one of them (the student splits what the teacher keeps whole)."""
        end, k = self.student_ends[s_token], t_token
        while k < len(self.teacher_ends) and self.teacher_ends[k] < end:
            k += 1
        return k - t_token + 1 if k < len(self.teacher_ends) and self.teacher_ends[k] == end else 0

    @property
    def pairs(self) -> list[tuple[int, int]]:
        s_first = _firsts(self.student_span)
        t_first = _firsts(self.teacher_span)
        return [(s_first[k], t_first[k]) for k in sorted(s_first.keys() & t_first.keys())]


def _firsts(span_of: Sequence[int]) -> dict[int, int]:
    first: dict[int, int] = {}
    for i, k in enumerate(span_of):
        first.setdefault(k, i)
    return first


def align(student: Sequence[tuple[int, int]], teacher: Sequence[tuple[int, int]], length: int) -> Alignment:
    """Group two tokenisations of one ``length``-byte text into spans covering the same bytes.

    A span ends where a student token and a teacher token end at the same byte; a token belongs to
    the span its first byte falls in (an empty token to the span it sits at the start of)."""
    shared = {b for _, b in student if 0 < b < length} & {b for _, b in teacher if 0 < b < length}
    bounds = [0, *sorted(shared), length] if length > 0 else [0, 0]

    def spans(offsets: Sequence[tuple[int, int]]) -> list[int]:
        last = len(bounds) - 2
        return [min(last, bisect_right(bounds, a) - 1) for a, _ in offsets]

    return Alignment(bounds, spans(student), spans(teacher), [b for _, b in student], [b for _, b in teacher])


# ---------------------------------------------------------------------------------------- the vocabulary map


@dataclass
class VocabMap:
    """Teacher token -> the student token with exactly its bytes (-1 where none).

    ``t2s`` [teacher rows] (the teacher head's rows: padding rows map to nothing); the EOS tokens of
    both sides map to each other (both end the answer), and special tokens of the same name map to
    each other."""

    t2s: torch.Tensor
    student_rows: int
    stats: dict[str, Any] = field(default_factory=dict)
    # Student tokens that no one teacher token spells, by the teacher token that ends them: ``chain`` [E, 3]
    # rows (prefix, x, s) with bytes(s) = the bytes of prefix ``prefix`` + bytes(x), e.g. the student's
    # 'Ġ97' from the prefix 'Ġ9' and the teacher's '7' (see CrossHead); ``prefixes``: each prefix's bytes ->
    # its id; ``teacher_bytes``: each teacher token's bytes, to spell a path of them (``prefix_ids``).
    chain: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    prefixes: dict[bytes, int] = field(default_factory=dict)
    teacher_bytes: list[bytes | None] = field(default_factory=list)
    # Per prefix id: whether one teacher token spells the prefix (its entries are two-token spellings).
    single_prefix: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def prefix_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` [T, L]: per row, a path of teacher tokens (-1 after its end) -> [T, L]: the id of the
        prefix spelt by the path's first l + 1 tokens at column l, -1 where no student token extends that
        prefix by one teacher token (or the path has ended)."""
        out = torch.full_like(tokens, -1)
        for r, path in enumerate(tokens.tolist()):
            spelt = b""
            for level, t in enumerate(path):
                piece = self.teacher_bytes[t] if 0 <= t < len(self.teacher_bytes) else None
                if piece is None:
                    break
                spelt += piece
                out[r, level] = self.prefixes.get(spelt, -1)
        return out

    @property
    def image(self) -> torch.Tensor:
        """The student ids some teacher token maps to, sorted."""
        return torch.unique(self.t2s[self.t2s >= 0])

    @classmethod
    def build(cls, student_tok: Any, teacher_tok: Any, *, student_rows: int, teacher_rows: int,
              mapping: str = "exact") -> "VocabMap":
        """``mapping`` (``ctkd.map``): ``exact``, a teacher token maps to the student token of exactly its bytes,
        if any; ``first_token``, also a teacher token with no such student token maps to the first token of the
        student's own cut of its text (the teacher's 'Ġword' to the 'Ġwo' of the student's 'Ġwo rd'): where the
        student splits what the teacher keeps whole, the teacher's mass on the whole goes to the token the
        student would write first, instead of to ULD."""
        if mapping not in ("exact", "first_token"):
            raise ValueError(f"ctkd.map: expected 'exact' or 'first_token', not {mapping!r}")
        s_bytes, t_bytes = token_bytes(student_tok), token_bytes(teacher_tok)
        by_bytes = ids_by_bytes(student_tok, s_bytes, student_rows)
        t2s = torch.full((teacher_rows,), -1, dtype=torch.long)
        for i, b in enumerate(t_bytes[:teacher_rows]):
            if b is not None and b in by_bytes:
                t2s[i] = by_bytes[b]
        s_special = {t.content: i for i, t in (getattr(student_tok, "added_tokens_decoder", {}) or {}).items()
                     if t.special and i < student_rows}
        for i, t in (getattr(teacher_tok, "added_tokens_decoder", {}) or {}).items():
            if t.special and i < teacher_rows and t.content in s_special:
                t2s[i] = s_special[t.content]
        if teacher_tok.eos_token_id is not None and student_tok.eos_token_id is not None:
            t2s[teacher_tok.eos_token_id] = student_tok.eos_token_id
        exact = int((t2s >= 0).sum())
        if mapping == "first_token":
            t_special = {i for i, t in (getattr(teacher_tok, "added_tokens_decoder", {}) or {}).items() if t.special}
            rest, texts = [], []
            for i, b in enumerate(t_bytes[:teacher_rows]):
                if t2s[i] >= 0 or b is None or i in t_special:
                    continue
                try:
                    texts.append(b.decode())  # a token holding part of a character has no text of its own
                except UnicodeDecodeError:
                    continue
                rest.append(i)
            if texts:
                for i, ids in zip(rest, student_tok(texts, add_special_tokens=False)["input_ids"]):
                    if ids and ids[0] < student_rows and s_bytes[ids[0]] is not None and \
                            t_bytes[i].startswith(s_bytes[ids[0]]):
                        t2s[i] = ids[0]
        t_by = ids_by_bytes(teacher_tok, t_bytes, teacher_rows)
        prefixes: dict[bytes, int] = {}
        chain = [(prefixes.setdefault(b[:k], len(prefixes)), t_by[b[k:]], i)
                 for i, b in enumerate(s_bytes[:student_rows]) if b is not None and b not in t_by
                 for k in range(1, len(b)) if b[k:] in t_by]
        mapped = int((t2s >= 0).sum())
        stats = {"teacher_vocab": len(teacher_tok), "student_vocab": len(student_tok), "mapped_teacher_tokens": mapped,
                 "exactly_mapped_teacher_tokens": exact, "map": mapping,
                 "mapped_student_tokens": int(torch.unique(t2s[t2s >= 0]).numel()),
                 "vocab_overlap": exact / max(1, len(teacher_tok)),  # byte for byte
                 "chained_student_tokens": len({e[2] for e in chain})}
        single = torch.tensor([b in t_by for b in prefixes], dtype=torch.bool)  # dicts keep insertion order
        return cls(t2s, student_rows, stats, torch.tensor(chain, dtype=torch.long).reshape(-1, 3), prefixes,
                   list(t_bytes[:teacher_rows]), single)

    def to(self, device: Any) -> "VocabMap":
        return VocabMap(self.t2s.to(device), self.student_rows, self.stats, self.chain.to(device), self.prefixes,
                        self.teacher_bytes, self.single_prefix.to(device))


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``, without a pass over them at temperature 1."""
    return logits if temperature == 1.0 else logits / temperature


def uld_distance(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Universal Logit Distillation per row: the L1 distance between two sets of probabilities sorted
    (the shorter padded with zeros). Only the top min(n_q, n_p) of each are sorted: past them the
    shorter side is zero, and the longer side adds the mass left over. Zero entries change nothing, so a
    side may be given at full width with the entries it leaves out set to zero."""
    k = min(q.shape[-1], p.shape[-1])
    if k == 0:
        return q.sum(-1) + p.sum(-1)
    q_top = torch.topk(q, k, dim=-1).values
    p_top = torch.topk(p, k, dim=-1).values
    rest = (q.sum(-1) - q_top.sum(-1)) + (p.sum(-1) - p_top.sum(-1))
    return (q_top - p_top).abs().sum(-1) + rest.clamp_min(0)


class CrossHead(nn.Module):
    """The teacher's output head (its own vocabulary) with the map into the student's: what ``kd_terms``
    takes as the teacher head in cross-tokenizer KD. ``terms`` is the method's per-token KD term.

    A row of the signal (``CrossTokenizerSignal.hidden``) holds, for a chain of up to ``levels`` teacher
    tokens: the teacher's hidden state where the span starts and at each of the next ``levels - 1``
    positions inside the teacher's span (zeros past its end), then the teacher's tokens t_1, t_2, ... of
    the span (-1 past it), then per level l the id of the prefix t_1 ... t_l (``VocabMap.prefix_ids``; -1
    where no student token extends it by one teacher token). With them the teacher's probability of a
    student token spelt t_1 ... t_l x is p(t_1) p(t_2 | t_1) ... p(x | t_1 ... t_l): where a student merges
    what the teacher splits (the student's 'Ġ97' against the teacher's 'Ġ', '9', '7'), the mass of each
    prefix goes on to the longer student tokens it continues into, and only the rest stays where the prefix
    was. Only the paths along the text's own teacher tokens are followed: a student token whose teacher
    spelling leaves that path after its first token ('Ġ85' when the text has 'Ġ97') gets p(Ġ) p(85 | Ġ) if
    '85' is one teacher token, and nothing longer."""

    def __init__(self, head: OutputHead, vmap: VocabMap, method: str = "hybrid", uld_weight: float = 1.0,
                 levels: int = 1):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"ctkd.method must be one of {', '.join(METHODS)}, got {method!r}")
        self.head, self.method, self.uld_weight, self.stats = head, method, float(uld_weight), vmap.stats
        self.levels = levels
        t2s = vmap.t2s
        # The categories: every student token that a teacher token, or a chain of at most ``levels`` of them,
        # spells. Those of one or two teacher tokens are categories at every position; the longer ones only
        # where a position's chain reaches them (``chained_only``, below).
        # (A map built without ``single_prefix``, by hand, counts every entry as a two-token spelling.)
        two = vmap.single_prefix[vmap.chain[:, 0]] if vmap.single_prefix.numel() else \
            torch.ones(vmap.chain.shape[0], dtype=torch.bool)
        chain = vmap.chain if levels > 2 else vmap.chain[two]
        static = torch.unique(torch.cat([t2s[t2s >= 0], vmap.chain[two, 2]]))
        image = torch.unique(torch.cat([static, chain[:, 2]]))
        col = torch.full((vmap.student_rows,), -1, dtype=torch.long)
        col[image] = torch.arange(image.numel())
        s_rest = torch.ones(vmap.student_rows, dtype=torch.bool)
        s_rest[image] = False
        # Each teacher row's column among [categories..., other].
        where = torch.where(t2s >= 0, col[t2s.clamp_min(0)], torch.full_like(t2s, image.numel()))
        # Categories that only a chain of three or more reaches: a row whose chain does not reach one gives it no
        # teacher mass, and the student's mass there counts as "other", as for a student token outside them.
        chained_only = torch.ones(image.numel(), dtype=torch.bool)
        chained_only[col[static]] = False
        self._chained, self._plain_rest = bool(chained_only.any()), int(s_rest.sum())
        for name, t in (("t2s", t2s), ("image", image), ("where", where), ("s_rest", s_rest), ("t_rest", t2s < 0),
                        ("chain", chain), ("chain_col", col[chain[:, 2]]), ("chained_only", chained_only),
                        # The student tokens ULD may compare: those outside the categories, then the chained-only.
                        ("rest_ids", torch.cat([torch.nonzero(s_rest).flatten(), image[chained_only]]))):
            self.register_buffer(name, t, persistent=False)

    @property
    def vocab_size(self) -> int:
        """The teacher's vocabulary: the width of the logits it computes (what sizes a chunk)."""
        return self.head.vocab_size

    def hold_in(self, dtype: torch.dtype) -> "CrossHead":
        """The teacher's head in ``dtype`` alone (``OutputHead.hold_in``)."""
        self.head.hold_in(dtype)
        return self

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """The teacher's logits where each span starts (a signal row's first ``hidden_size`` columns)."""
        return self.head(rows[:, : self.head.hidden_size])

    def project(self, p: torch.Tensor, rows: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's probabilities ``p`` [n, V_t] over the categories (mapped student tokens, then
        "other"), with each chained student token's mass moved there from where its prefix's mass was; and
        ``p`` itself with what left "other" taken off the span's first teacher token, in place (no [n, V_t]
        copy: the caller's ``p`` is consumed).

        Per level l, for the rows whose teacher span has a token after t_1 ... t_l: q = p(. | t_1 ... t_l)
        from the hidden state there; each student token t_1 ... t_l x gets path x q(x), where path =
        p(t_1 ... t_l) is the prefix's probability, taken from ``home``, the column holding it (t_1's
        category at level 1; the student token t_1 ... t_l where there is one, else where it was)."""
        p_cat = p.new_zeros(p.shape[0], self.image.numel() + 1).index_add_(1, self.where, p)
        d, c = self.head.hidden_size, self.levels
        if c < 2 or self.chain.numel() == 0 or rows.shape[-1] < c * d + 2 * (c - 1):
            return p_cat, p
        ids = rows[:, c * d:].round().long()
        toks, pids = ids[:, : c - 1], ids[:, c - 1:]
        r = torch.nonzero(toks[:, 0] >= 0).squeeze(-1)  # rows whose teacher span goes on past its first token
        first = toks[r, 0]
        path, home, other = p[r, first], self.where[first], self.image.numel()
        for level in range(1, c):
            if r.numel() == 0:
                break
            q = torch.softmax(_scaled(self.head(rows[r, level * d: (level + 1) * d]), temperature), dim=-1)
            pid = pids[r, level - 1]
            nxt = toks[r, level] if level < c - 1 else None
            use = torch.isin(self.chain[:, 0], pid[pid >= 0])  # the table's entries for this level's prefixes
            if bool(use.any()):
                entries, cols = self.chain[use], self.chain_col[use]
                hit = entries[None, :, 0] == pid[:, None]  # [R, E]
                mass = path[:, None] * q[:, entries[:, 1]] * hit
                moved = mass.sum(-1)
                p_cat[r, home] -= moved
                p_cat[r] = p_cat[r].index_add(1, cols, mass)
                out = home == other  # mass that left "other" is mass of t_1's no longer unmapped
                p[r[out], first[out]] = (p[r[out], first[out]] - moved[out]).clamp_min(0)
                if nxt is not None:  # the text's path goes on: into the student token t_1 ... t_l t_(l+1), if any
                    on = hit & (entries[None, :, 1] == nxt[:, None])
                    home = torch.where(on.any(-1), cols[on.to(torch.uint8).argmax(-1)], home)
            if nxt is None:
                break
            path = path * q.gather(1, nxt.clamp_min(0)[:, None]).squeeze(1)
            keep = nxt >= 0
            r, first, path, home = r[keep], first[keep], path[keep], home[keep]
        return p_cat, p

    def terms(self, s_logits: torch.Tensor, rows: torch.Tensor, fn: Any, temperature: float,
              kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The method's per-token KD term (before the temperature scaling the objective applies), and
        whether the student's top token is the teacher's top category."""
        s_logp = F.log_softmax(_scaled(s_logits, temperature), dim=-1)
        t_logits = self(rows)
        p = torch.softmax(_scaled(t_logits, temperature), dim=-1)
        if self.method == "uld":
            agree = s_logits.argmax(-1) == self.t2s[t_logits.argmax(-1)]
            return self.uld_weight * uld_distance(torch.exp(s_logp), p), agree
        del t_logits  # [n, V_t]: freed before the projection allocates its own
        p_cat, p_rest = self.project(p, rows, temperature)
        tiny = torch.finfo(p.dtype).tiny
        s_mapped = s_logp[:, self.image]
        chained = self._chained
        if chained:  # the student's rest: outside the categories, and the chained-only ones this row did not reach
            unreached = self.chained_only & (p_cat[:, :-1] == 0)  # [n, categories]
            s_other = torch.logsumexp(torch.cat([s_logp[:, self.s_rest], s_mapped.masked_fill(~unreached, -math.inf)],
                                                dim=-1), dim=-1, keepdim=True)
            s_mapped = s_mapped.masked_fill(unreached, -math.inf)
        else:
            s_other = (torch.logsumexp(s_logp[:, self.s_rest], dim=-1, keepdim=True) if bool(self.s_rest.any())
                       else s_logp.new_full((s_logp.shape[0], 1), float("-inf")))
        # Both sides floored at the smallest float alike, so an empty "other" bucket adds nothing.
        s_cat = torch.cat([s_mapped, s_other], dim=-1).clamp_min(math.log(tiny))
        per_token = fn(s_cat, torch.log(p_cat.clamp_min(tiny)), None, **kwargs)
        if self.method == "hybrid":  # ULD on the unmapped tokens: the mapped ones zeroed in place, not copied out
            rest = torch.exp(s_logp[:, self.rest_ids])
            if chained:  # the chained-only tokens a row reached are categories there, not ULD's
                keep = torch.cat([unreached.new_ones(unreached.shape[0], self._plain_rest),
                                  unreached[:, self.chained_only]], -1)
                rest = rest.masked_fill(~keep, 0.0)
            per_token = per_token + self.uld_weight * uld_distance(rest, p_rest.masked_fill_(~self.t_rest, 0.0))
        top = p_cat.argmax(-1)
        agree = (top < self.image.numel()) & (s_logits.argmax(-1) == self.image[top.clamp_max(self.image.numel() - 1)])
        return per_token, agree


# ---------------------------------------------------------------------------------------- paired data


def _response_text(rec: dict[str, Any]) -> str:
    if "messages" in rec:
        return rec["messages"][-1]["content"]
    if "prompt" in rec:
        return rec["response"]
    return rec["text"]


def _target_tokens(ex: Encoded) -> list[int]:
    """For each target of ``ex`` (in order), the index of its token in the response (which the labels
    hold from the first labelled position on; position 0 is never a target)."""
    first = next((i for i, x in enumerate(ex.labels) if x != IGNORE), len(ex.labels))
    return [i - first for i in range(max(1, first), len(ex.labels)) if ex.labels[i] != IGNORE]


# The longest chain of teacher tokens whose probability reaches one student token (CrossHead.project:
# p(t_1) p(t_2 | t_1) ... ); a span start whose student token takes more trains on CE alone. The default is
# the spec's (``ctkd.max_chain``), read from there so that the two cannot differ.
MAX_CHAIN: int = CtkdSpec.model_fields["max_chain"].default


def pairs_eos(teacher_tok: Any) -> bool:
    """Whether the teacher's EOS is where it ends its turn, so that the student's EOS can be distilled against it.
    Not for a teacher on our ChatML fallback whose vocabulary lacks ``<|im_end|>`` (``template_stops``; a base
    model's GGUF, such as Gemma 3 270M's): it closes a turn by writing that string as text, so at the response's
    end its distribution is on the string's first piece, which the map would send to a text token of the
    student's, teaching it not to stop. Its EOS probability there says nothing, and the student's EOS takes CE."""
    return not template_stops(teacher_tok)


def adds_dummy_prefix(tokenizer: Any, pieces: Sequence[bytes | None] | None = None) -> bool:
    """Whether the tokenizer puts a space before a text it encodes on its own: the dummy prefix of SentencePiece
    tokenizers of the Llama 2 kind (``▁hello`` for ``hello``), which ``byte_offsets`` allows for."""
    pieces = pieces if pieces is not None else token_bytes(tokenizer)
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    first = pieces[ids[0]] if ids and ids[0] < len(pieces) else None
    return first is not None and first.startswith(b" ")


def _boundaries(student_tok: Any, teacher_tok: Any, s_pieces: Sequence[bytes | None],
                t_pieces: Sequence[bytes | None]) -> dict[str, bool]:
    """Which of a response's boundary spans pair (``_pair_targets``' ``eos`` and ``first``), once per pair of
    tokenizers: the EOS unless the teacher ends its turn in text (``pairs_eos``); the first span unless exactly
    one side puts a dummy prefix before the text (``adds_dummy_prefix``)."""
    return {"eos": pairs_eos(teacher_tok),
            "first": adds_dummy_prefix(student_tok, s_pieces) == adds_dummy_prefix(teacher_tok, t_pieces)}


def _pair_targets(s_targets: Sequence[int], n_student: int, t_ex: Encoded, t_ids: Sequence[int],
                  al: Alignment, max_chain: int, eos: bool = True,
                  first: bool = True) -> tuple[list[int], list[list[int]], list[list[int]], int]:
    """For each student target (its index among the response tokens; ``n_student``, one past the text,
    is the EOS): the teacher target starting the same span (-1: none); the chain's levels 1 ..
    ``max_chain`` - 1: the teacher targets at the span's next positions while the teacher's span goes on,
    and the teacher tokens t_1, t_2, ... the span starts with (both -1 past its end); and how many span
    starts were left to CE because the student's token there is spelt by more than ``max_chain`` teacher
    tokens. The teacher's mass cannot reach such a token (it would stop on a shorter one, the student's
    ' 9' for a ' 97' it must write), so KD there would pull away from the data: those positions train on
    CE, as positions inside a span do. The EOS each side appends after the text is one more span, pairing
    the two EOS tokens, unless ``eos`` is False (``pairs_eos``: the teacher ends its turn in text, not with
    its EOS token): the student's EOS then trains on CE. So does the first span where ``first`` is False (a dummy
    prefix on one side, ``adds_dummy_prefix``: there one side writes ``▁hello`` where the other writes ``hello``, and the
    map, which goes by bytes, would credit the student's token with the teacher's ``Ġhello``, or the teacher's
    ``▁hello`` to the student's ``Ġhello``, a token neither writes at that point)."""
    partner = {**dict(al.pairs), n_student: len(t_ids)} if eos else dict(al.pairs)
    if not first:
        partner.pop(0, None)
    t_target = {tok: j for j, tok in enumerate(_target_tokens(t_ex))}
    row, chain_targets, chain_tokens, too_long = [], [], [], 0
    for k in s_targets:
        j = partner.get(k, -1)
        if 0 <= j < len(t_ids) and k < n_student and al.spelling(k, j) > max_chain:
            j, too_long = -1, too_long + 1
        row.append(t_target.get(j, -1) if j >= 0 else -1)
        at, tokens = [-1] * (max_chain - 1), [-1] * (max_chain - 1)
        if row[-1] >= 0:
            for level in range(1, max_chain):
                i = j + level
                if i >= len(t_ids) or al.teacher_span[i] != al.teacher_span[j] or i not in t_target:
                    break
                at[level - 1], tokens[level - 1] = t_target[i], t_ids[i - 1]
        chain_targets.append(at)
        chain_tokens.append(tokens)
    return row, chain_targets, chain_tokens, too_long


def _teacher_example(rec: dict[str, Any], teacher_tok: Any) -> Encoded:
    """``rec`` as its teacher reads it (``teacher_record``), encoded whole: the student's ``max_length`` bounds
    what the student trains on, and the teacher must see the same response whatever its own prompt's length
    (its chat template's system turn, or a context-distillation prompt with worked examples, can be several
    times the student's). ``_read_up_to`` then cuts it after the last target read."""
    return encode_record(teacher_record(rec), teacher_tok, sys.maxsize)[0]


def _read_up_to(t_ex: Encoded, row: Sequence[int], chain_targets: Sequence[Sequence[int]]) -> Encoded:
    """``t_ex`` cut after the last of its targets that ``row`` or ``chain_targets`` (indices among its targets,
    -1 none) read, so the teacher computes no position past what the student's kept targets pair with; with
    none read, its prompt and first response token."""
    last = max([x for x in row if x >= 0] + [x for r in chain_targets for x in r if x >= 0], default=-1)
    first = next((i for i, x in enumerate(t_ex.labels) if x != IGNORE), len(t_ex.labels))
    end = first + _target_tokens(t_ex)[last] + 1 if last >= 0 else min(len(t_ex.labels), first + 1)
    return Encoded(t_ex.input_ids[:end], t_ex.labels[:end])


def _chain_tensor(rows: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), width)


@dataclass
class PairedData:
    """The records encoded for both sides, and per kept example the teacher target (its index among the
    teacher example's targets) that each student target is distilled against, or -1 (CE only)."""

    student: list[Encoded]
    teacher: list[Encoded]
    target_map: list[list[int]]
    stats: dict[str, Any]
    # What CrossHead chains, per kept example a [targets, max_chain - 1] tensor for each: the teacher targets
    # at the span's next positions, the teacher tokens the span starts with (``_pair_targets``), and the
    # prefix ids of those tokens (``VocabMap.prefix_ids``, filled in by the signal that holds the map).
    max_chain: int = 1
    chain_targets: list[torch.Tensor] = field(default_factory=list)
    chain_tokens: list[torch.Tensor] = field(default_factory=list)
    chain_prefixes: list[torch.Tensor] = field(default_factory=list)


def pair_records(records: Sequence[dict[str, Any]], student_tok: Any, teacher_tok: Any, max_length: int,
                 max_chain: int | None = None) -> PairedData:
    """Encode each record with both tokenizers (each side's own chat template around the same response
    text) and align the responses by bytes. Records the student side drops (no target left after
    truncation) are dropped on both sides, so ``student`` equals what ``encode`` gives. ``max_chain``:
    the longest chain of teacher tokens followed (default ``MAX_CHAIN``)."""
    from stratos.io import DataError

    max_chain = MAX_CHAIN if max_chain is None else max_chain
    s_pieces, t_pieces = token_bytes(student_tok), token_bytes(teacher_tok)
    bounds = _boundaries(student_tok, teacher_tok, s_pieces, t_pieces)
    out_s, out_t, maps, chain_targets, chain_tokens = [], [], [], [], []
    spans = aligned = targets = beyond_chain = 0
    for i, rec in enumerate(records):
        try:
            s_ex, _ = encode_record(rec, student_tok, max_length)
            own = {k: v for k, v in rec.items() if k not in ("response_ids", "topk")}  # the student's tokens
            t_ex = _teacher_example(own, teacher_tok)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{record_location(records, i)}: {e}") from None
        if s_ex.num_targets == 0:
            continue
        text = _response_text(rec)
        s_ids = rec.get("response_ids") or student_tok(text, add_special_tokens=False)["input_ids"]
        t_ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
        al = align(byte_offsets(student_tok, text, s_ids, s_pieces), byte_offsets(teacher_tok, text, t_ids, t_pieces),
                   len(text.encode()))
        row, at, tokens, too_long = _pair_targets(_target_tokens(s_ex), len(s_ids), t_ex, t_ids, al, max_chain,
                                                  **bounds)
        beyond_chain += too_long
        out_s.append(s_ex)
        out_t.append(_read_up_to(t_ex, row, at))
        maps.append(row)
        chain_targets.append(_chain_tensor(at, max_chain - 1))
        chain_tokens.append(_chain_tensor(tokens, max_chain - 1))
        spans += len(al.bounds)  # the text's spans and the EOS
        aligned += sum(1 for x in row if x >= 0)
        targets += len(row)
    stats = {"examples": len(out_s), "student_targets": targets, "aligned_targets": aligned,
             "aligned_share": aligned / max(1, targets), "spans": spans, "beyond_chain": beyond_chain}
    return PairedData(out_s, out_t, maps, stats, max_chain, chain_targets, chain_tokens)


class CrossTokenizerSignal(TeacherView):
    """A teacher signal in the student's tokens, from a teacher-side signal in the teacher's.

    ``inner`` is any signal (OnlineTeacher, HiddenStateCache, TeacherPool) over ``paired.teacher``;
    ``hidden(batch)`` gives one row per student target: the teacher's hidden state at the matching span
    start and at the chain's next positions, the chain's teacher tokens and prefix ids (see ``CrossHead``;
    zeros and -1 where there is none; ``kd_mask`` marks the targets without a span start False)."""

    def __init__(self, inner: Any, paired: PairedData, vmap: VocabMap, *, teacher_pad_id: int, method: str = "hybrid",
                 uld_weight: float = 1.0):
        super().__init__(inner)
        self.pad_id, self.vmap = teacher_pad_id, vmap
        self.paired = self._with_prefixes(paired)
        self.head = CrossHead(inner.head, vmap, method, uld_weight, levels=paired.max_chain)
        self._last: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None

    def _with_prefixes(self, paired: PairedData) -> PairedData:
        """A copy of ``paired`` with the prefix ids of its chains (``VocabMap.prefix_ids``), computed once; the
        caller's ``paired`` is left as it was (it may be shared with another signal)."""
        return replace(paired, chain_prefixes=[self.vmap.prefix_ids(t) for t in paired.chain_tokens])

    def _pairing(self, batch: Batch) -> tuple[PairedData, Sequence[int]]:
        """The paired data of ``batch``'s rows and their indices in it: the records' own, paired up front."""
        return self.paired, batch.indices

    def _teacher_batch(self, batch: Batch) -> Batch:
        paired, rows = self._pairing(batch)
        return collate([paired.teacher[i] for i in rows], list(rows), self.pad_id)

    def _index(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per student target of ``batch``: the row of the teacher batch's hidden states where its span starts,
        and per chain level the row of the teacher's next position, its token and prefix id (-1: none).
        Kept for the last batch asked: ``hidden`` and ``kd_mask`` both need it for each batch."""
        if self._last is not None and self._last[0] is batch.input_ids:
            return self._last[1]
        paired, batch_rows = self._pairing(batch)
        rows, nxt, offset = [], [], 0
        for i in batch_rows:
            starts = torch.tensor(paired.target_map[i], dtype=torch.long)
            for out, m in ((rows, starts), (nxt, paired.chain_targets[i])):
                out.append(torch.where(m >= 0, m + offset, torch.full_like(m, -1)))
            offset += paired.teacher[i].num_targets
        index = (torch.cat(rows), torch.cat(nxt), torch.cat([paired.chain_tokens[i] for i in batch_rows]),
                 torch.cat([paired.chain_prefixes[i] for i in batch_rows]))
        self._last = (batch.input_ids, index)
        return index

    def hidden(self, batch: Batch) -> torch.Tensor:
        h = self.teacher_hidden(batch)
        rows, nxt, tokens, prefixes = (t.to(h.device) for t in self._index(batch))
        # One row per student target: [span start | each chain level's position | tokens | prefix ids]
        # (CrossHead reads them; ids as floats are exact in float32 up to 2^24).
        at = [h[m.clamp_min(0)] * (m >= 0).unsqueeze(-1).to(h.dtype) for m in (rows, *nxt.unbind(1))]
        return torch.cat([*at, tokens.to(h.dtype), prefixes.to(h.dtype)], dim=-1)

    def kd_mask(self, batch: Batch) -> torch.Tensor:
        return self._index(batch)[0] >= 0


class SampledCrossSignal(CrossTokenizerSignal):
    """Across tokenizers for batches made while training: the student's own samples (gkd, opd), whose text
    exists only once sampled. Each row's response is read back from the batch's own tokens as bytes (what
    the student wrote, however it cut it), put after its record's prompt in the teacher's chat template,
    and aligned by bytes as ``pair_records`` aligns a record, when the batch comes. ``prompts[i]`` is the
    record of example i (the rows' ``batch.indices``). A response whose bytes are not valid UTF-8 is cut
    at the last whole character. The text ends at the first special token (the student's end token, or
    one sampled mid-text), which pairs with the teacher's EOS (``pairs_eos``); nothing after it has a counterpart.
    Targets without one train on CE, as inside a span: on the student's own samples at temperature 1
    its expected gradient is zero (E_y~q grad log q(y) = 0), so it adds noise, not a pull."""

    def __init__(self, inner: Any, prompts: Sequence[dict[str, Any]], student_tok: Any, teacher_tok: Any,
                 vmap: VocabMap, *, teacher_pad_id: int, method: str = "hybrid",
                 uld_weight: float = 1.0, max_chain: int | None = None):
        chain = MAX_CHAIN if max_chain is None else max_chain
        super().__init__(inner, PairedData([], [], [], {}, chain), vmap, teacher_pad_id=teacher_pad_id,
                         method=method, uld_weight=uld_weight)
        self.prompts, self.teacher_tok = prompts, teacher_tok
        self.s_pieces, self.t_pieces = token_bytes(student_tok), token_bytes(teacher_tok)
        self.bounds = _boundaries(student_tok, teacher_tok, self.s_pieces, self.t_pieces)
        self._paired: tuple[torch.Tensor, PairedData] | None = None
        self.stats = {"rows": 0, "unpaired_rows": 0, "student_targets": 0, "aligned_targets": 0, "beyond_chain": 0}

    def _pairing(self, batch: Batch) -> tuple[PairedData, Sequence[int]]:
        if self._paired is None or self._paired[0] is not batch.input_ids:
            self._paired = (batch.input_ids, self._pair_batch(batch))
        return self._paired[1], range(len(batch.indices))

    def _pair_batch(self, batch: Batch) -> PairedData:
        teacher, maps, chain_targets, chain_tokens = [], [], [], []
        width = self.paired.max_chain - 1
        for r, i in enumerate(batch.indices):
            where = torch.nonzero(batch.target_mask[r]).flatten()
            start, n = int(where[0]) + 1, len(where)  # targets follow the prompt without a gap
            response = batch.input_ids[r, start: start + n].tolist()
            t_ex, paired = self._pair_row(self.prompts[i], response)
            teacher.append(t_ex)
            none = [[-1] * width] * n
            row, at, tokens, too_long = paired if paired is not None else ([-1] * n, none, none, 0)
            maps.append(row)
            chain_targets.append(_chain_tensor(at, width))
            chain_tokens.append(_chain_tensor(tokens, width))
            self.stats["rows"] += 1
            self.stats["unpaired_rows"] += paired is None
            self.stats["student_targets"] += n
            self.stats["aligned_targets"] += sum(1 for x in row if x >= 0)
            self.stats["beyond_chain"] += too_long
        return self._with_prefixes(PairedData([], teacher, maps, {}, self.paired.max_chain, chain_targets,
                                              chain_tokens))

    def _pair_row(self, record: dict[str, Any], response: list[int]) -> tuple[Encoded, Any]:
        """The teacher's example of ``record``'s prompt with the text of ``response`` (the student's tokens, up
        to the first special token: its end token, or one sampled mid-text, after which nothing pairs) and
        the pairing of the response's targets (None: unpaired)."""
        stop = next((k for k, t in enumerate(response) if t >= len(self.s_pieces) or self.s_pieces[t] is None),
                    len(response))
        pieces = [self.s_pieces[t] for t in response[:stop]]
        data = b"".join(pieces)
        cut = len(data)
        while cut > max(0, len(data) - 3):  # an incomplete last character (a sample stopped inside it)
            try:
                data[:cut].decode()
                break
            except UnicodeDecodeError:
                cut -= 1
        try:
            text = data[:cut].decode()
        except UnicodeDecodeError:
            text = None
        rec = _with_response(record, text or "")
        t_ex = _teacher_example(rec, self.teacher_tok)
        if text is None or "text" in record:  # a text row: no prompt sampled
            return _read_up_to(t_ex, [], []), None
        t_ids = self.teacher_tok(text, add_special_tokens=False)["input_ids"]
        try:
            t_offsets = byte_offsets(self.teacher_tok, text, t_ids, self.t_pieces)
        except ValueError:
            return t_ex, None
        s_offsets, pos = [], 0
        for p in pieces:  # the student's own bytes, cut where the text was
            s_offsets.append((min(pos, cut), min(pos + len(p), cut)))
            pos += len(p)
        al = align(s_offsets, t_offsets, cut)
        # The special token that ended the text (index ``stop``) pairs with the teacher's EOS (``pairs_eos``).
        paired = _pair_targets(range(len(response)), stop, t_ex, t_ids, al, self.paired.max_chain, **self.bounds)
        return _read_up_to(t_ex, paired[0], paired[1]), paired


def _with_response(record: dict[str, Any], text: str) -> dict[str, Any]:
    """``record`` with ``text`` as its response (the last message of a conversation), nothing else kept
    that belongs to another response (token ids, top-k log-probs)."""
    rec = {k: v for k, v in record.items() if k not in ("response_ids", "topk")}
    if "text" in rec:
        rec["text"] = text
    elif "messages" in rec:
        rec["messages"] = [*rec["messages"][:-1], {**rec["messages"][-1], "content": text}]
    else:
        rec["response"] = text
    return rec


@torch.no_grad()
def measure_mapping(teacher: Any, student_tok: Any, teacher_tok: Any, records: Sequence[dict[str, Any]],
                    *, max_length: int = 512, batch_size: int = 8, mapping: str = "exact",
                    max_chain: int | None = None) -> dict[str, Any]:
    """What cross-tokenizer KD would have to work with, measured on ``records`` (the task's answers) through
    the engine's own signal and head (``CrossTokenizerSignal``, ``CrossHead.project``): the vocabulary overlap,
    the share of student targets KD applies at (span starts whose student token is at most ``MAX_CHAIN``
    teacher tokens), and ``mapped_mass``, the mean share of the teacher's probability, at those span
    starts, that the exact part of the loss matches token for token: its mass on
    tokens that map to a student token plus the chained mass p(t_1) p(t_2 | t_1) ... of student tokens spelt
    by several teacher tokens (``unchained_mass`` leaves the chained part out). The planner compares ``mapped_mass``
    with ``ctkd.min_mapped_mass``. How far the teacher agrees with the data there: ``target_mass``, its mean
    mapped probability on the records' own student token, and ``target_top``, the share of those targets where
    that token is its most likely category. ``mapping``: the map, ``ctkd.map`` (``VocabMap.build``); ``max_chain``:
    the longest chain followed (default ``MAX_CHAIN``)."""
    from stratos.teachers.signal import OnlineTeacher

    paired = pair_records(records, student_tok, teacher_tok, max_length, max_chain)
    online = OnlineTeacher(teacher)
    vmap = VocabMap.build(student_tok, teacher_tok, student_rows=len(student_tok), teacher_rows=online.head.vocab_size,
                          mapping=mapping)
    t_pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else teacher_tok.eos_token_id
    s_pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else student_tok.eos_token_id
    signal = CrossTokenizerSignal(online, paired, vmap, teacher_pad_id=t_pad)
    head = signal.head.to(online.head.weight.device)
    category = torch.full((vmap.student_rows,), head.image.numel(), dtype=torch.long)  # "other" unless mapped
    category[head.image.cpu()] = torch.arange(head.image.numel())
    exact = unchained = on_target = 0.0
    n = top_is_target = 0
    for start in range(0, len(paired.student), batch_size):
        idx = list(range(start, min(start + batch_size, len(paired.student))))
        batch = collate([paired.student[i] for i in idx], idx, s_pad)
        kd = signal.kd_mask(batch)
        rows = signal.hidden(batch)[kd.to(online.head.weight.device)].float()
        p = torch.softmax(head(rows), dim=-1)
        unchained += float((p * (head.t2s >= 0)).sum())
        p_cat, _ = head.project(p, rows, 1.0)  # consumes p
        exact += float(p_cat[:, :-1].sum())  # every category but "other"
        # The data's own student token at each of these targets (the labelled positions after the first, in
        # order, as _target_tokens counts them), as a category.
        targets = torch.tensor([x for i in idx for x in paired.student[i].labels[1:] if x != IGNORE])
        cat = category[targets[kd]].to(p_cat.device)
        on_target += float(p_cat.gather(1, cat[:, None]).masked_fill((cat == head.image.numel())[:, None], 0).sum())
        top_is_target += int(((p_cat.argmax(-1) == cat) & (cat < head.image.numel())).sum())
        n += rows.shape[0]
    return {"mapped_mass": exact / max(1, n), "unchained_mass": unchained / max(1, n),
            "target_mass": on_target / max(1, n), "target_top": top_is_target / max(1, n),
            "vocab_overlap": vmap.stats["vocab_overlap"], "aligned_share": paired.stats["aligned_share"],
            "positions": n, "examples": len(paired.teacher), "map": vmap.stats["map"]}

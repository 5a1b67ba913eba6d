"""The dynamic batcher: one background thread owns the model and serves every request.

HTTP handlers never touch the model. They turn a request into a :class:`Job` (token ids plus
sampling parameters) and :meth:`BatchEngine.submit` it to a bounded queue; a full queue is an
immediate :class:`QueueFull` (the server answers 503). The engine thread takes whatever is
waiting, up to ``max_batch_size`` rows, and runs them as one *wave*: a left-padded prefill, then
step-wise decoding with the KV cache where each step is one forward pass for all live rows.
Each row keeps its own temperature, top-p, seed, stop strings and logprob settings; finished
and cancelled rows are dropped from the batch (and from the cache) as soon as they end, so a
long request does not make short ones pay for its padding.

Events (one per generated token, one at the end) go back to the handler through ``Job.emit``,
which the server wires to its event loop; the engine itself knows nothing about HTTP.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from stratos.models.arch import cache_arg
from stratos.models.generate import decode_layout

log = logging.getLogger("stratos.serve")


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should retry later."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new work."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob plus the top k
    ignore_eos: bool = False  # keep generating past EOS (fixed-length load tests)


@dataclass
class TokenEvent:
    """One generated token of one row (``index`` is the choice index within the job)."""

    index: int
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None
    text: str  # the row's whole text so far (stop strings already cut)


@dataclass
class FinishEvent:
    index: int
    text: str
    reason: str  # 'stop' | 'length' | 'cancelled' | 'error'
    num_tokens: int
    error: str | None = None


@dataclass
class Job:
    """One HTTP request: one or more rows (prompts x n) sharing sampling parameters."""

    rows: list[tuple[list[int], int]]  # (prompt token ids, choice index)
    params: SamplingParams
    emit: Callable[[TokenEvent | FinishEvent], None]
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        # Read by the engine thread between steps; a plain bool is enough under the GIL.
        self.cancelled = True


@dataclass
class _Row:
    job: Job
    index: int
    prompt: list[int]
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {ids} if isinstance(ids, int) else set(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def context_length(model: Any) -> int:
    """The longest sequence the model takes (prompt + generated)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None) or getattr(getattr(cfg, "text_config", None), key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


class BatchEngine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        batch_wait_s: float = 0.005,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos or {0})
        self.context_length = context_length(model)
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._carry: deque[Job] = deque()  # taken from the queue but left for the next wave
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.waves = 0  # statistics, for /health and tests
        self.rows_served = 0

    # ------------------------------------------------------------------ public

    def start(self) -> "BatchEngine":
        self._thread = threading.Thread(target=self._serve, name="stratos-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise EngineStopped("the server is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def stop(self, timeout: float | None = None) -> None:
        """Finish the work already submitted, then end the thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._carry)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        with decode_layout(self.model):  # the weights stay fixed while serving: their decode copies too
            self._loop()

    def _loop(self) -> None:
        while True:
            jobs = self._collect()
            if not jobs:
                if self._stopping.is_set() and self.waiting == 0:
                    return
                continue
            try:
                self._run_wave(jobs)
            except Exception as e:  # one bad wave must not kill the server
                log.exception("generation failed")
                for job in jobs:
                    for _, index in job.rows:
                        job.emit(FinishEvent(index, "", "error", 0, error=f"generation failed: {type(e).__name__}"))

    def _take(self, timeout: float) -> Job | None:
        if self._carry:
            return self._carry.popleft()
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _collect(self) -> list[Job]:
        """Block for one job, then give concurrent arrivals ``batch_wait_s`` to join the wave."""
        first = self._take(timeout=0.1)
        if first is None:
            return []
        jobs, rows = [first], len(first.rows)
        deadline = time.monotonic() + self.batch_wait_s
        while rows < self.max_batch_size:
            job = self._take(timeout=max(0.0, deadline - time.monotonic()))
            if job is None:
                break
            if rows + len(job.rows) > self.max_batch_size:
                self._carry.appendleft(job)  # keeps arrival order for the next wave
                break
            jobs.append(job)
            rows += len(job.rows)
        return [j for j in jobs if not self._drop_if_cancelled(j)]

    @staticmethod
    def _drop_if_cancelled(job: Job) -> bool:
        if job.cancelled:
            for _, index in job.rows:
                job.emit(FinishEvent(index, "", "cancelled", 0))
        return job.cancelled

    # ------------------------------------------------------------------ one wave

    @torch.inference_mode()
    def _run_wave(self, jobs: Sequence[Job]) -> None:
        rows = [_Row(job, index, prompt, _generator(job.params.seed, index)) for job in jobs for prompt, index in job.rows]
        self.waves += 1
        self.rows_served += len(rows)
        length = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's next token lands in the same column
            ids[i, length - len(r.prompt) :] = torch.tensor(r.prompt, dtype=torch.long)
            mask[i, length - len(r.prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # logits_to_keep=1: a prefill never materialises batch x prompt x vocab logits.
        cache = DynamicCache()  # filled in place by every forward below
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **cache_arg(self.model, cache))
        logits = out.logits[:, -1, :].float()
        positions = positions[:, -1:]
        while True:
            next_ids = self._step(rows, logits)
            live = [i for i, r in enumerate(rows) if not r.done]
            if not live:
                return
            if len(live) < len(rows):  # drop finished rows from the batch and the cache
                keep = torch.tensor(live, device=self.device)
                cache.batch_select_indices(keep)
                rows = [rows[i] for i in live]
                next_ids, mask, positions = next_ids[keep], mask[keep], positions[keep]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            positions = positions + 1
            out = self.model(
                input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                **cache_arg(self.model, cache),
            )
            logits = out.logits[:, -1, :].float()

    def _step(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Pick each row's next token, report it, and mark rows that end here."""
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = torch.empty(len(rows), dtype=torch.long)
        greedy = logits.argmax(dim=-1).cpu()
        for i, r in enumerate(rows):
            p = r.job.params
            chosen[i] = greedy[i] if p.temperature == 0 else _sample(logits[i], p.temperature, p.top_p, r.generator)
        chosen_lp = logprobs.gather(1, chosen.to(logits.device)[:, None])[:, 0].cpu().tolist()
        want_top = max((r.job.params.logprobs or 0) for r in rows)
        top_v = top_i = None
        if want_top:
            top_v, top_i = logprobs.topk(want_top, dim=-1)
            top_v, top_i = top_v.cpu().tolist(), top_i.cpu().tolist()
        for i, r in enumerate(rows):
            p, tok = r.job.params, int(chosen[i])
            if r.job.cancelled:
                r.done = True
                r.job.emit(FinishEvent(r.index, r.text, "cancelled", len(r.tokens)))
                continue
            r.tokens.append(tok)
            is_eos = tok in self.eos and not p.ignore_eos
            if not is_eos:
                r.text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
            reason = None
            if is_eos:
                reason = "stop"
            elif p.stop:
                cut = _first_stop(r.text, p.stop)
                if cut is not None:
                    r.text, reason = r.text[:cut], "stop"
            if reason is None and len(r.tokens) >= p.max_tokens:
                reason = "length"
            if reason is None and len(r.prompt) + len(r.tokens) >= self.context_length:
                reason = "length"
            top = None
            if p.logprobs is not None and top_i is not None:
                top = list(zip(top_i[i][: p.logprobs], top_v[i][: p.logprobs]))
            r.job.emit(TokenEvent(r.index, tok, chosen_lp[i] if p.logprobs is not None else None,
                                  top if p.logprobs is not None else None, r.text))
            if reason is not None:
                r.done = True
                r.job.emit(FinishEvent(r.index, r.text, reason, len(r.tokens)))
        return chosen.to(self.device)


def _generator(seed: int | None, index: int) -> torch.Generator:
    # A seeded request gives the same text every time, whatever else shares its wave; choices
    # of one request (n > 1) get different but reproducible streams.
    g = torch.Generator()
    base = seed if seed is not None else random.getrandbits(48)
    g.manual_seed((base * 1_000_003 + index) % (1 << 63))
    return g


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    probs = torch.softmax(logits.cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(cuts) if cuts else None

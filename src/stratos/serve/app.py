"""The OpenAI-compatible HTTP API over a :class:`BatchEngine` (Starlette app, run by uvicorn).

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.
Handlers validate and tokenize, hand a Job to the engine, and turn its events into OpenAI
responses or server-sent events. Every error leaves as OpenAI's JSON error shape; stack traces
stay in the server log.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from stratos.models.generate import encode_prompt
from stratos.serve.engine import BatchEngine, EngineStopped, FinishEvent, Job, QueueFull, SamplingParams, TokenEvent
from stratos.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse

log = logging.getLogger("stratos.serve")


@dataclass
class ServerLimits:
    """What one request may ask for; the defaults come from ServeSpec."""

    max_tokens: int = 1024  # largest max_tokens accepted
    max_prompt_tokens: int | None = None  # None: the model's context length minus one
    max_request_bytes: int = 1_000_000
    max_n: int = 16
    request_timeout_s: float = 300.0


@dataclass
class _Choice:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # text length before each token
    reason: str | None = None
    num_tokens: int = 0
    error: str | None = None
    sent: int = 0  # streaming: characters already sent
    sent_tokens: int = 0  # streaming: tokens whose logprobs were already sent


def create_app(engine: BatchEngine, model_name: str, *, aliases: tuple[str, ...] = (), api_key: str | None = None,
               limits: ServerLimits | None = None) -> Starlette:
    limits = limits or ServerLimits()
    tok = engine.tokenizer
    names = {model_name, *aliases}
    created = int(time.time())
    max_prompt = limits.max_prompt_tokens or engine.context_length - 1

    @lru_cache(maxsize=65536)
    def decoded(token_id: int) -> str:
        return tok.decode([token_id])

    def token_text(token_id: int, as_ids: bool) -> str:
        # Token ids are exact where decoded pieces are not (half a UTF-8 character decodes to U+FFFD).
        return f"token_id:{token_id}" if as_ids else decoded(token_id)

    # ------------------------------------------------------------------ helpers

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not reveal how much of a guessed key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > limits.max_request_bytes:
            raise ApiError(413, f"request body over {limits.max_request_bytes} bytes", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_request_bytes:
                raise ApiError(413, f"request body over {limits.max_request_bytes} bytes", code="request_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def check_model(name: str) -> None:
        if name not in names:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves `{model_name}`.",
                           type="not_found_error", param="model", code="model_not_found")

    def sampling(req: Any, prompt_lens: list[int], max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        longest = max(prompt_lens)
        if longest > max_prompt:
            raise ApiError(400, f"prompt has {longest} tokens; this server takes at most {max_prompt}",
                           param="prompt" if isinstance(req, CompletionRequest) else "messages",
                           code="context_length_exceeded")
        room = engine.context_length - longest
        if max_tokens is None:
            max_tokens = min(limits.max_tokens, room)
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                           param="max_tokens")
        if max_tokens > room:
            raise ApiError(400, f"This model's maximum context length is {engine.context_length} tokens; the prompt "
                           f"({longest} tokens) plus max_tokens ({max_tokens}) is more.", param="max_tokens",
                           code="context_length_exceeded")
        if req.n > limits.max_n:
            raise ApiError(400, f"n is {req.n}; this server allows at most {limits.max_n}", param="n")
        if req.n * len(prompt_lens) > engine.max_batch_size:
            raise ApiError(400, f"prompts x n is {req.n * len(prompt_lens)}; this server batches at most "
                           f"{engine.max_batch_size} sequences per request", param="n")
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=tuple(req.stop),
                              seed=req.seed, logprobs=logprobs, ignore_eos=req.ignore_eos)

    def submit(rows: list[tuple[list[int], int]], params: SamplingParams) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(rows, params, emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            engine.submit(job)
        except QueueFull:
            raise ApiError(503, "the server is busy: its request queue is full; retry shortly", type="server_error",
                           code="overloaded", headers={"Retry-After": "1"}) from None
        except EngineStopped:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down",
                           headers={"Retry-After": "5"}) from None
        return job, events

    def apply(choices: dict[int, _Choice], ev: TokenEvent | FinishEvent) -> _Choice:
        c = choices[ev.index]
        if isinstance(ev, TokenEvent):
            c.offsets.append(len(c.text))
            c.tokens.append(ev.token_id)
            c.text = ev.text
            if ev.logprob is not None:
                c.logprobs.append(ev.logprob)
                c.tops.append(ev.top or [])
        else:
            c.text, c.reason, c.num_tokens, c.error = ev.text, ev.reason, ev.num_tokens, ev.error
        return c

    async def collect(job: Job, events: asyncio.Queue, n_rows: int) -> dict[int, _Choice]:
        choices = {index: _Choice() for _, index in job.rows}
        done = 0
        deadline = time.monotonic() + limits.request_timeout_s
        try:
            while done < n_rows:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise asyncio.TimeoutError
                ev = await asyncio.wait_for(events.get(), timeout=left)
                apply(choices, ev)
                done += isinstance(ev, FinishEvent)
        except asyncio.TimeoutError:
            job.cancel()
            raise ApiError(504, f"generation took longer than {limits.request_timeout_s:g} s", type="server_error",
                           code="timeout") from None
        except BaseException:
            job.cancel()  # the client went away: stop spending compute on it
            raise
        if any(c.error for c in choices.values()):
            raise ApiError(500, "generation failed; see the server log", type="server_error")
        return choices

    def completion_logprobs(c: _Choice, ids: bool, start: int = 0, end: int | None = None) -> dict[str, Any]:
        sl = slice(start, end if end is not None else len(c.logprobs))
        return {
            "tokens": [token_text(t, ids) for t in c.tokens[sl]],
            "token_logprobs": c.logprobs[sl],
            "top_logprobs": [{token_text(t, ids): lp for t, lp in top} for top in c.tops[sl]],
            "text_offset": c.offsets[sl],
        }

    def chat_logprobs(c: _Choice, ids: bool, start: int = 0, end: int | None = None) -> dict[str, Any]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            s = token_text(t, ids)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        sl = slice(start, end if end is not None else len(c.logprobs))
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                            for t, lp, top in zip(c.tokens[sl], c.logprobs[sl], c.tops[sl])]}

    def usage(prompt_lens: list[int], choices: dict[int, _Choice]) -> dict[str, int]:
        prompt = sum(prompt_lens)
        completion = sum(c.num_tokens for c in choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def stream(job: Job, events: asyncio.Queue, n_rows: int, prompt_lens: list[int], req: Any, chat: bool,
               rid: str) -> StreamingResponse:
        """Server-sent events: a chunk whenever a choice has new text that no stop string can still take back."""
        holdback = max((len(s) for s in req.stop), default=1) - 1
        obj = "chat.completion.chunk" if chat else "text_completion"
        want_lp = job.params.logprobs is not None

        def chunk(choices_: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                    "choices": choices_, **extra}
            return f"data: {json.dumps(body)}\n\n"

        def piece(index: int, c: _Choice, final: bool) -> dict[str, Any] | None:
            safe = len(c.text) if final else max(c.sent, len(c.text) - holdback)
            while not final and safe > c.sent and c.text[safe - 1] == "\ufffd":
                safe -= 1  # half of a multi-byte character: wait for the rest
            if safe <= c.sent and not final:
                return None
            text, c.sent = c.text[c.sent : safe], safe
            lp_end = len(c.logprobs)
            lp = None
            if want_lp:
                lp = (chat_logprobs if chat else completion_logprobs)(c, req.return_tokens_as_token_ids,
                                                                      c.sent_tokens, lp_end)
            c.sent_tokens = lp_end
            reason = c.reason if final else None
            if chat:
                return {"index": index, "delta": {"content": text} if text else {}, "logprobs": lp, "finish_reason": reason}
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}

        async def body() -> AsyncIterator[str]:
            choices = {index: _Choice() for _, index in job.rows}
            done = 0
            deadline = time.monotonic() + limits.request_timeout_s
            try:
                if chat:
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None} for i in sorted(choices)])
                while done < n_rows:
                    ev = await asyncio.wait_for(events.get(), timeout=max(0.0, deadline - time.monotonic()))
                    c = apply(choices, ev)
                    final = isinstance(ev, FinishEvent)
                    done += final
                    if c.error:
                        err = ApiError(500, "generation failed; see the server log", type="server_error")
                        yield f"data: {json.dumps(err.body())}\n\n"
                        return
                    p = piece(ev.index, c, final)
                    if p is not None:
                        yield chunk([p])
                if req.stream_options and req.stream_options.include_usage:
                    yield chunk([], usage=usage(prompt_lens, choices))
                yield "data: [DONE]\n\n"
            except asyncio.TimeoutError:
                job.cancel()
                err = ApiError(504, f"generation took longer than {limits.request_timeout_s:g} s",
                               type="server_error", code="timeout")
                yield f"data: {json.dumps(err.body())}\n\n"
            finally:
                job.cancel()  # no-op when finished; stops the rows when the client disconnected

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ routes

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok" if engine.alive else "starting", "model": model_name,
                             "waiting": engine.waiting, "waves": engine.waves, "rows_served": engine.rows_served})

    async def models(request: Request) -> Response:
        check_auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "stratos",
             "max_model_len": engine.context_length}]})

    async def completions(request: Request) -> Response:
        check_auth(request)
        req: CompletionRequest = parse(CompletionRequest, await read_json(request))
        check_model(req.model)
        if req.echo:
            raise ApiError(400, "echo is not supported by the built-in server", param="echo")
        p = req.prompt
        if isinstance(p, str):
            prompts = [p]
        elif all(isinstance(x, str) for x in p):
            prompts = list(p)
        elif all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = [list(x) for x in p]
        ids = [tok(x, add_special_tokens=True)["input_ids"] if isinstance(x, str) else x for x in prompts]
        vocab = len(tok)
        if any(not x for x in ids):
            raise ApiError(400, "prompt is empty", param="prompt")
        if any(t < 0 or t >= vocab for x in ids for t in x if isinstance(t, int)):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        lens = [len(x) for x in ids]
        params = sampling(req, lens, req.max_tokens, req.logprobs)
        rows = [(x, i * req.n + j) for i, x in enumerate(ids) for j in range(req.n)]
        job, events = submit(rows, params)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return stream(job, events, len(rows), lens, req, chat=False, rid=rid)
        choices = await collect(job, events, len(rows))
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": i, "text": c.text, "finish_reason": c.reason,
                         "logprobs": completion_logprobs(c, req.return_tokens_as_token_ids)
                         if req.logprobs is not None else None}
                        for i, c in sorted(choices.items())],
            "usage": usage(lens, choices),
        })

    async def chat(request: Request) -> Response:
        check_auth(request)
        req: ChatRequest = parse(ChatRequest, await read_json(request))
        check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = encode_prompt(tok, messages)
        except Exception as e:  # a template that rejects this conversation (roles, order)
            raise ApiError(400, f"the model's chat template rejected the messages: {e}", param="messages") from None
        lens = [len(ids)]
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling(req, lens, req.max_completion_tokens or req.max_tokens, logprobs)
        rows = [(ids, j) for j in range(req.n)]
        job, events = submit(rows, params)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return stream(job, events, len(rows), lens, req, chat=True, rid=rid)
        choices = await collect(job, events, len(rows))
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.reason,
                         "logprobs": chat_logprobs(c, req.return_tokens_as_token_ids) if req.logprobs else None}
                        for i, c in sorted(choices.items())],
            "usage": usage(lens, choices),
        })

    # ------------------------------------------------------------------ errors

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), type=kind).body(), status_code=exc.status_code,
                            headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return JSONResponse(ApiError(500, "internal server error", type="server_error").body(), status_code=500)

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ],
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
    )

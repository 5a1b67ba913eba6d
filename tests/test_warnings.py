"""`stratos run` of a tiny spec end to end with warnings turned into errors, in every process it starts
(the server and any worker processes too), and no warning logged by a library (transformers logs its
deprecations, e.g. of ``past_key_values``, instead of warning). The warnings we cannot fix are listed,
each with its reason, in one place: ``stratos.known_warnings.KNOWN_WARNINGS``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_run import ROOT, tiny_spec  # noqa: F401  (the fixture: two tiny Llamas on 2-digit arithmetic)

# Imported first by every Python process whose PYTHONPATH starts with its folder (sys.flags keep `site` on):
# warnings become errors except the known ones; library log records at WARNING or above are written to a file.
SITECUSTOMIZE = '''
import logging, os, warnings

warnings.simplefilter("error")
from stratos.known_warnings import filter_known

filter_known("import")

_handle = logging.Logger.handle


def _record(self, record):
    # Called only for records the logger lets through; our own `stratos.*` warnings are messages to the user.
    if record.levelno >= logging.WARNING and not record.name.startswith("stratos"):
        with open(os.environ["STRATOS_TEST_LOGGED_WARNINGS"], "a") as f:
            f.write(f"pid {os.getpid()}: {record.name} {record.levelname}: {record.getMessage()}\\n")
    return _handle(self, record)


logging.Logger.handle = _record
'''


def _strict_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    logged = tmp_path / "logged-warnings.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src"), str(ROOT)]),
           "STRATOS_TEST_LOGGED_WARNINGS": str(logged), "STRATOS_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONWARNINGS", None)
    return env, logged


def _logged(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_the_strict_environment_fails_on_the_old_cache_keyword(tmp_path, tiny_tokenizer):
    """The harness can fail: `past_key_values=` (what serve/engine.py and plan/calibration.py once passed)
    is an error in it, and a warning a library logs is recorded."""
    from stratos.models.tiny import save_model, tiny_llama

    env, logged = _strict_env(tmp_path)
    model = save_model(tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1), tiny_tokenizer, tmp_path / "m")
    script = ("import torch; from transformers import AutoModelForCausalLM, DynamicCache; "
              "from transformers.utils import logging; from stratos.models.arch import cache_arg; "
              f"m = AutoModelForCausalLM.from_pretrained({str(model)!r}); ids = torch.tensor([[5, 6]]); "
              "m(input_ids=ids, **cache_arg(m, DynamicCache())); print('current keyword: ok', flush=True); "
              "logging.get_logger('transformers.x').warning('a library says'); "
              "m(input_ids=ids, past_key_values=DynamicCache()); print('deprecated keyword: ok')")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == ["current keyword: ok"], done.stdout + done.stderr[-3000:]
    assert done.returncode == 1 and "FutureWarning: `past_key_values` is deprecated" in done.stderr, done.stderr[-3000:]
    assert "transformers.x WARNING: a library says" in _logged(logged)

def test_a_tiny_spec_runs_end_to_end_without_a_warning(tiny_spec, tmp_path):  # noqa: F811
    data = yaml.safe_load(tiny_spec.read_text())
    # Every stage does its work, compress included: pruning with KD recovery, torchao int8, GGUF and ONNX exports.
    data["distill"]["max_length"] = 160  # KD recovery needs room for the response after the chat template
    data["compress"] = {"enabled": True, "prune_ratio": 0.25, "recovery_steps": 4, "quantize": "int8",
                        "export": ["gguf", "onnx"], "eval_size": 4, "speed_tokens": 4}
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(data))
    env, logged = _strict_env(tmp_path)
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "stratos.cli", "run", str(spec), "--run-dir", str(run_dir),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert _logged(logged) == "", _logged(logged)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values()), manifest["stages"]
    report = json.loads((run_dir / "compress" / "compress_report.json").read_text())
    exports = {e["format"]: e for e in report["exports"]}
    assert exports["gguf"]["ok"] and exports["onnx"]["ok"], exports


def test_known_warnings_are_ignored_only_in_their_scope():
    import warnings

    from stratos.known_warnings import KNOWN_WARNINGS, _category, known

    for w in KNOWN_WARNINGS:
        assert w.scope in {"import", "onnx-export"} and len(w.reason) > 40, w
        assert issubclass(_category(w.category), Warning), w
    note = ("Exporting aten::index operator of advanced indexing in opset 17 ...", UserWarning, "x.py", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with known("onnx-export"):
            warnings.warn_explicit(*note, module="torch.onnx.utils")  # listed: ignored
            with pytest.raises(UserWarning):
                warnings.warn_explicit(*note, module="stratos.compress.export")  # same text, another module
            with pytest.raises(UserWarning):
                warnings.warn_explicit("something new", UserWarning, "x.py", 1, module="torch.onnx.utils")
        with pytest.raises(UserWarning):  # outside its scope
            warnings.warn_explicit(*note, module="torch.onnx.utils")

"""The bad-input corpus: every case in tests/bad_inputs/ is one clear error.

Each case is a folder: the files a user would have (specs, data, model folders) and ``case.yaml``:

    args: [validate, spec.yaml]          # the stratos command line, run in a copy of the folder
    expect: ["line 3: task.train_size"]  # each must appear in what it prints
    problems: 1                           # error lines expected (default 1)
    setup: tiny-model                     # optional: build ./model (a tiny Llama folder) first
    why: the issue bullet it covers

The command runs in-process through ``stratos.cli.main`` (so the corpus stays fast) and must exit 2,
print one ``error:`` line per problem naming the field path or file:line, print no traceback, and
leave the folder exactly as it was.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stratos.cli import main

HERE = Path(__file__).resolve().parent
CASES = sorted(p for p in (HERE / "bad_inputs").iterdir() if (p / "case.yaml").is_file())


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _tiny_model(path: Path) -> None:
    from stratos.models.tiny import build_tokenizer, save_model, tiny_llama

    tok = build_tokenizer([f"{a}+{b}={a + b}" for a in range(30) for b in range(30)], vocab_size=300)
    save_model(tiny_llama(tok, max_position_embeddings=64), tok, path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "model"
    _tiny_model(path)
    return path


def test_the_corpus_is_large_enough_and_committed_whole():
    assert len(CASES) >= 60, f"{len(CASES)} cases"
    # A case file git ignores (e.g. a runs/ folder) is missing from a fresh clone: the case would then
    # test something else, or start a real run.
    git = shutil.which("git")
    if git and (HERE.parent / ".git").exists():
        ignored = subprocess.run([git, "ls-files", "--others", "--ignored", "--exclude-standard", str(HERE / "bad_inputs")],
                                 capture_output=True, text=True, cwd=HERE.parent).stdout.split()
        assert not ignored, f"ignored by git, so missing from a clone: {ignored}"


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_bad_input_is_one_clear_error(case, tmp_path, monkeypatch, capsys, request):
    meta = yaml.safe_load((case / "case.yaml").read_text())
    work = tmp_path / "work"
    shutil.copytree(case, work, ignore=shutil.ignore_patterns("case.yaml"))
    if meta.get("setup") == "tiny-model":
        shutil.copytree(request.getfixturevalue("tiny_model_dir"), work / "model")
    monkeypatch.chdir(work)
    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _snapshot(work)
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in meta["args"]])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err, err
    for needle in meta["expect"]:
        assert needle in err, f"{needle!r} not in:\n{err}"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == meta.get("problems", 1), err
    assert _snapshot(work) == before, "the command changed the files"

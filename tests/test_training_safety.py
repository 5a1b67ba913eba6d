"""Training that cannot go on stops cleanly: a diverging run keeps its last good checkpoint and saves
no model; a checkpoint is resumed only by a run of the same settings and data; bad data leaves no
folder behind; the teacher-signal cache key hashes the weights themselves."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stratos.cli import main
from stratos.distill import distill
from stratos.teachers.signal import model_fingerprint
from stratos.errors import TrainingError
from stratos.io import DataError
from stratos.models.tiny import save_model, tiny_llama
from stratos.spec import DistillSpec
from tests.conftest import addition_records


def _cfg(**kw) -> DistillSpec:
    base = dict(loss="ce", max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
                save_steps=1, logging_steps=1, warmup_ratio=0.0)
    return DistillSpec(**{**base, **kw})


def _student(tok):
    return tiny_llama(tok, hidden_size=32, num_hidden_layers=1, seed=3)


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(tok, cfg, out, records=None, **kw):
    return distill(_student(tok), tok, records or addition_records(32), cfg, out, progress=False, **kw)


# --------------------------------------------------------------------------- divergence


# "gradient norm": a NaN gradient under a finite loss (as an overflow in the backward pass makes one), from
# step 2 on; a learning rate cannot make one portably: at 1e4 the second step's gradient norm is NaN on some
# CPUs and exactly 0 on others (the first step saturates the model). "loss": at 1e10 the loss itself.
@pytest.mark.parametrize(("lr", "max_grad_norm", "what"), [(1e-3, None, "gradient norm"), (1e10, 1.0, "loss")])
def test_a_diverging_step_stops_before_the_optimizer_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_tokenizer, lr, max_grad_norm, what
):
    cfg = _cfg(learning_rate=lr, max_grad_norm=max_grad_norm)
    out = tmp_path / "out"
    _run(tiny_tokenizer, cfg, out, stop_after=1)  # step 1 is still good: its checkpoint is the one to protect
    ckpt = out / "checkpoints" / "step-0000001"
    before = _files(out)  # the checkpoint, metrics.jsonl, and the model this first call saved
    student = _student(tiny_tokenizer)
    if what == "gradient norm":  # the resumed run's first backward pass is step 2's
        student.model.layers[0].mlp.down_proj.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.raises(TrainingError) as info:
        distill(student, tiny_tokenizer, addition_records(32), cfg, out, progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"step 2: the {what} (nan) is not finite" in msg
    assert str(ckpt) in msg and "distill.learning_rate" in msg
    assert ("distill.max_grad_norm" in msg) == (max_grad_norm is None)
    # Byte for byte: no new checkpoint, model or metrics row, and the good checkpoint untouched.
    assert _files(out) == before
    # The optimizer did not step: the weights are still those of the good checkpoint.
    saved = load_file(str(ckpt / "trainable.safetensors"))
    for name, p in student.named_parameters():
        assert torch.equal(p.detach(), saved[name]), name


def test_a_run_diverging_before_its_first_checkpoint_says_so(tmp_path, tiny_tokenizer):
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match="step 2: .* not finite; .*no checkpoint yet"):
        _run(tiny_tokenizer, _cfg(learning_rate=1e10, save_steps=100), out)
    assert not (out / "checkpoints").exists() and not (out / "model").exists()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.fixture
def cli_dir(tmp_path, tiny_tokenizer, monkeypatch):
    """A user's folder: ./model (a tiny Llama) and ./data.jsonl; the CLI runs in it, in-process."""
    save_model(_student(tiny_tokenizer), tiny_tokenizer, tmp_path / "model")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in addition_records(32)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STRATOS_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _cli(capsys, *args: str) -> tuple[int, str]:
    argv = ["distill", "--student", "model", "--data", "data.jsonl", "--loss", "ce", "--batch-size", "4",
            "--max-steps", "6", "--save-steps", "1", "--out", "out", *args]
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_cli_a_diverging_run_exits_2_with_one_line(cli_dir, capsys):
    code, err = _cli(capsys, "--lr", "1e10")
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged at step 2" in errors[0], err
    assert "out/checkpoints/step-0000001 is kept" in err and "--lr" in err
    assert not (cli_dir / "out" / "model").exists()


# --------------------------------------------------------------------------- what a checkpoint was made from


def test_resume_with_the_same_settings_is_bitwise_exact(tmp_path, tiny_tokenizer):
    full = _student(tiny_tokenizer)
    distill(full, tiny_tokenizer, addition_records(32), _cfg(), tmp_path / "full", progress=False)
    _run(tiny_tokenizer, _cfg(), tmp_path / "split", stop_after=3)
    # Checkpointing and logging settings may change between the two halves: they do not shape training.
    resumed = _student(tiny_tokenizer)
    res = distill(resumed, tiny_tokenizer, addition_records(32), _cfg(save_steps=2, logging_steps=3, save_total_limit=1),
                  tmp_path / "split", progress=False)
    assert res.resumed_from == 3 and res.steps == 6
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"cfg": {"learning_rate": 2e-3}}, "distill.learning_rate: 0.001 then, 0.002 now"),
        ({"cfg": {"max_steps": 12}}, "distill.max_steps: 6 then, 12 now"),  # the LR schedule's length
        ({"records": addition_records(32, seed=1)}, "the training data differs"),
    ],
    ids=["learning-rate", "max-steps", "data"],
)
def test_resume_from_a_checkpoint_of_other_settings_or_data_is_refused(tmp_path, tiny_tokenizer, change, expect):
    out = tmp_path / "out"
    _run(tiny_tokenizer, _cfg(), out, stop_after=2)
    before = _files(out)
    with pytest.raises(TrainingError) as info:
        _run(tiny_tokenizer, _cfg(**change.get("cfg", {})), out, records=change.get("records"))
    msg = str(info.value)
    assert expect in msg and str(out / "checkpoints" / "step-0000002") in msg, msg
    assert "--out" in msg and "--overwrite" in msg
    assert _files(out) == before  # refused before anything was written


def test_a_checkpoint_that_does_not_record_what_it_was_made_from_is_refused(tmp_path, tiny_tokenizer):
    out = tmp_path / "out"
    _run(tiny_tokenizer, _cfg(), out, stop_after=2)
    state = out / "checkpoints" / "step-0000002" / "state.json"
    old = json.loads(state.read_text())
    del old["made_from"]  # as Stratos wrote checkpoints before it recorded this
    state.write_text(json.dumps(old))
    with pytest.raises(TrainingError, match="does not record the settings and data it was made from.*--overwrite"):
        _run(tiny_tokenizer, _cfg(), out)


def test_cli_resume_with_other_settings_is_refused(cli_dir, capsys):
    assert _cli(capsys, "--lr", "1e-3", "--max-steps", "2")[0] == 0
    before = _files(cli_dir / "out")
    code, err = _cli(capsys, "--lr", "1e-3", "--max-steps", "4", "--resume")
    assert code == 2 and "Traceback" not in err, err
    assert "distill.max_steps: 2 then, 4 now" in err and "step-0000002" in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    assert _files(cli_dir / "out") == before
    # The advice works: --overwrite instead of --resume starts over.
    assert _cli(capsys, "--lr", "1e-3", "--max-steps", "4", "--overwrite")[0] == 0
    assert (cli_dir / "out" / "model").is_dir()


# --------------------------------------------------------------------------- bad data, cache keys


def test_bad_data_leaves_no_output_folder(tmp_path, tiny_tokenizer):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="record"):
        _run(tiny_tokenizer, _cfg(), out, records=[{"prompt": "1+1=", "response": "2"}, {"prompt": "1+2="}])
    assert not out.exists()


def test_model_fingerprint_hashes_the_weights_not_their_sums(tiny_tokenizer):
    a, b = _student(tiny_tokenizer), _student(tiny_tokenizer)
    assert model_fingerprint(a) == model_fingerprint(b)  # equal weights, equal keys
    w = b.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        assert w[0, 0] != w[0, 1]
        w[0, 0], w[0, 1] = w[0, 1].clone(), w[0, 0].clone()  # same sum and abs-sum, other weights
    wa = a.model.layers[0].mlp.up_proj.weight.double()
    assert w.double().sum().item() == pytest.approx(wa.sum().item(), rel=1e-12)
    assert w.double().abs().sum().item() == pytest.approx(wa.abs().sum().item(), rel=1e-12)
    assert model_fingerprint(a) != model_fingerprint(b)
    # bf16 weights (no numpy dtype) hash too, and differ from their fp32 originals.
    assert model_fingerprint(_student(tiny_tokenizer).to(torch.bfloat16)) != model_fingerprint(a)

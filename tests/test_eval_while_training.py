"""Evaluation while training: eval_steps, eval_samples and load_best_model_at_end, for real on tiny models."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from stratos.distill import distill
from stratos.distill.evaluation import TaskEvaluator, evaluator_for, validation_examples
from stratos.models.tiny import tiny_llama
from stratos.spec import DistillSpec, SpecError, TaskSpec, parse_spec
from stratos.tasks import get_task
from tests.conftest import addition_records

RECORDS = addition_records(32, seed=1)


def spec(**kw) -> DistillSpec:
    base = {"algorithm": "sft", "max_steps": 8, "per_device_train_batch_size": 4, "learning_rate": 3e-3,
            "report_to": [], "logging_steps": 1, "bf16": False, "warmup_ratio": 0.0}
    return DistillSpec(**{**base, **kw})


def student(tok):
    return tiny_llama(tok, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, seed=3)


def rows_of(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


class Scripted:
    """An evaluator with predetermined accuracies per step; it records the steps it was called at."""

    def __init__(self, accuracies: dict[int, float]):
        self.accuracies, self.calls = accuracies, []

    def __call__(self, model, step):
        self.calls.append(step)
        return {"eval_accuracy": self.accuracies[step], "eval_n": 3}


def test_task_evaluator_scores_exactly_eval_samples_examples(tiny_tokenizer):
    task_spec = TaskSpec(name="arithmetic", options={"digits": 2}, seed=2)
    assert evaluator_for(task_spec, tiny_tokenizer, spec(), max_new_tokens=6) is None  # no eval_steps
    ev = evaluator_for(task_spec, tiny_tokenizer, spec(eval_steps=2, eval_samples=4), max_new_tokens=6,
                       held_out=3, batch_size=4)
    assert isinstance(ev, TaskEvaluator) and len(ev.examples) == 4
    # Validation questions: the eval split past the 3 the eval stage scores (arithmetic draws in a fixed order).
    drawn = get_task("arithmetic", digits=2).examples("eval", 7, seed=2)
    assert [e.id for e in ev.examples] == [e.id for e in drawn[3:]]
    model = student(tiny_tokenizer)
    model.train()
    before = {n: p.clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    out = ev(model, 2)
    assert 0.0 <= out["eval_accuracy"] <= 1.0 and 0.0 <= out["eval_credit"] <= 1.0
    assert out["eval_n"] == 4
    assert model.training, "the model is put back in train mode"
    assert torch.equal(rng, torch.get_rng_state()), "evaluation leaves the training RNG alone"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_validation_questions_are_never_the_eval_stages(tmp_path, tiny_tokenizer):
    # Mahjong draws its eval questions in no prefix order: the validation ones are told apart by their text.
    task = get_task("mahjong:discard")
    scored = {e.question for e in task.examples("eval", 40, seed=1)}
    val = validation_examples(task, 16, seed=1, held_out=40)
    assert len(val) == 16 and len({e.question for e in val}) == 16
    assert not scored & {e.question for e in val}
    # The run's default: the spec's task.eval_size questions are the eval stage's.
    task_spec = TaskSpec(name="mahjong:discard", eval_size=40, seed=1)
    ev = evaluator_for(task_spec, tiny_tokenizer, spec(eval_steps=2, eval_samples=16), max_new_tokens=6, task=task)
    assert [e.id for e in ev.examples] == [e.id for e in val]

    # A split too small for both: what is left past the eval stage's, said; none left, an error naming the option.
    lines = [json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(60)]
    (tmp_path / "qa.jsonl").write_text("\n".join(lines) + "\n")
    small = get_task("jsonl", path=tmp_path / "qa.jsonl", eval_fraction=0.5)
    split = len(small.examples("eval"))
    assert 10 < split < 50
    with pytest.warns(UserWarning, match=f"holds only {split - 10} questions beyond the 10 the eval stage scores"):
        val = validation_examples(small, 50, seed=0, held_out=10)
    assert [e.id for e in val] == [e.id for e in small.examples("eval", seed=0)[10:]]
    jsonl_spec = TaskSpec(name="jsonl", path=str(tmp_path / "qa.jsonl"), options={"eval_fraction": 0.5})
    with pytest.raises(ValueError, match=rf"distill.eval_samples \(8\): the task's eval split holds no question "
                                         rf"beyond the {split} the eval stage scores"):
        evaluator_for(jsonl_spec, tiny_tokenizer, spec(eval_steps=2, eval_samples=8), max_new_tokens=6,
                      held_out=split, task=small)
    # A question space that cannot give both: the error says what was asked of it and why.
    with pytest.raises(ValueError, match=r"distill.eval_samples \(4\): the eval stage's 8 questions and 4 validation "
                                         r"questions, 12 in all, are more than the task's eval split gives \(arithmetic"):
        evaluator_for(TaskSpec(name="arithmetic", options={"digits": 1}, eval_size=8), tiny_tokenizer,
                      spec(eval_steps=2, eval_samples=4), max_new_tokens=6)


def test_eval_rows_every_eval_steps_and_at_the_last_step_without_changing_training(tmp_path, tiny_tokenizer):
    task = get_task("arithmetic", digits=1)
    ev = TaskEvaluator(task, task.examples("eval", 2), tiny_tokenizer, max_new_tokens=4)
    cfg = spec(max_steps=5, eval_steps=2, save_steps=10)
    a, b = student(tiny_tokenizer), student(tiny_tokenizer)
    distill(a, tiny_tokenizer, RECORDS, cfg, tmp_path / "eval", progress=False, evaluator=ev)
    with pytest.warns(UserWarning, match="no evaluator"):  # eval_steps without an evaluator: said, not silent
        distill(b, tiny_tokenizer, RECORDS, cfg, tmp_path / "plain", progress=False)

    rows = rows_of(tmp_path / "eval")
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]
    assert all(0 <= r["eval_accuracy"] <= 1 and r["eval_n"] == 2 for r in evals)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]  # the training rows are all still there
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # one row per step: eval values join the step's row
    assert not any("eval_accuracy" in r for r in rows_of(tmp_path / "plain"))
    # Evaluating changes nothing about the optimisation: the same weights bit for bit.
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    # The final metrics (result.json) carry the last evaluation and the best evaluated checkpoint (5: saved at the end).
    final = json.loads((tmp_path / "eval" / "result.json").read_text())["final_metrics"]
    assert final["eval_accuracy"] == evals[-1]["eval_accuracy"] and final["best_step"] == 5
    assert "model_step" not in final  # load_best_model_at_end was off

    # The report draws the eval curve below the loss and names the best step.
    from stratos.report import build_report, plots

    assert plots.training_curves(rows, best_step=5).startswith("data:image/png;base64,")
    only_eval = [{k: v for k, v in r.items() if k == "step" or k.startswith("eval_")} for r in evals]
    assert plots.training_curves(only_eval) is not None  # rows of eval values alone draw too
    run = tmp_path / "run"
    (run / "distill").mkdir(parents=True)
    (run / "distill" / "metrics.jsonl").write_text((tmp_path / "eval" / "metrics.jsonl").read_text())
    result = json.loads((tmp_path / "eval" / "result.json").read_text())
    result["final_metrics"].update(best_step=4, best_eval_accuracy=0.5, model_step=4)
    (run / "distill" / "result.json").write_text(json.dumps(result))
    (run / "manifest.json").write_text(json.dumps({"name": "t", "stages": {"distill": {"status": "done", "artifacts": {
        "metrics_path": "distill/metrics.jsonl", "steps": 5}}}}))
    page = build_report(run).read_text()
    assert "Evaluated 3 times while training" in page and "the best checkpoint is step <b>4</b>" in page
    assert "load_best_model_at_end" in page


def test_load_best_model_at_end_keeps_and_loads_the_best_checkpoint(tmp_path, tiny_tokenizer):
    # Best at step 4; step 8 ties it (the earlier wins). save_total_limit 1 would delete step 4 without protection.
    ev = Scripted({2: 0.25, 4: 0.75, 6: 0.5, 8: 0.75})
    cfg = spec(eval_steps=2, save_steps=2, save_total_limit=1, load_best_model_at_end=True)
    model = student(tiny_tokenizer)
    res = distill(model, tiny_tokenizer, RECORDS, cfg, tmp_path, progress=False, evaluator=ev)
    assert ev.calls == [2, 4, 6, 8]
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert ckpts == ["step-0000004", "step-0000008"]
    best = load_file(str(tmp_path / "checkpoints" / "step-0000004" / "trainable.safetensors"))
    last = load_file(str(tmp_path / "checkpoints" / "step-0000008" / "trainable.safetensors"))
    assert any(not torch.equal(best[n], last[n]) for n in best), "training moved the weights after step 4"
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), best[n]), n
    assert res.final_metrics["best_step"] == 4 and res.final_metrics["best_eval_accuracy"] == 0.75
    assert res.final_metrics["model_step"] == 4 and res.steps == 8
    state = json.loads((tmp_path / "checkpoints" / "step-0000008" / "state.json").read_text())
    assert state["best"] == {"step": 4, "eval_accuracy": 0.75}
    # The saved model is the best one too.
    saved = load_file(str(res.model_dir / "model.safetensors"))
    assert torch.equal(saved["model.embed_tokens.weight"], best["model.embed_tokens.weight"])


def test_a_resumed_run_keeps_the_best_of_before_the_kill(tmp_path, tiny_tokenizer):
    # If the resumed call forgot step 4, the best would be step 6.
    accuracies = {2: 0.25, 4: 0.75, 6: 0.5, 8: 0.5}
    cfg = spec(eval_steps=2, save_steps=2, save_total_limit=1, load_best_model_at_end=True)
    model = student(tiny_tokenizer)
    first = Scripted(accuracies)
    distill(model, tiny_tokenizer, RECORDS, cfg, tmp_path, progress=False, evaluator=first, stop_after=5)
    assert first.calls == [2, 4]  # step 5 ends the call (checkpoint) but is no eval step
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-0000004", "step-0000005"]

    second = Scripted(accuracies)
    # eval_samples is bookkeeping: a resume may change it (it does not shape the optimisation).
    res = distill(student(tiny_tokenizer), tiny_tokenizer, RECORDS, cfg.model_copy(update={"eval_samples": 8}),
                  tmp_path, progress=False, evaluator=second)
    assert second.calls == [6, 8] and res.resumed_from == 5
    assert res.final_metrics["best_step"] == 4 and res.final_metrics["model_step"] == 4
    best = load_file(str(tmp_path / "checkpoints" / "step-0000004" / "trainable.safetensors"))
    saved = load_file(str(res.model_dir / "model.safetensors"))
    for n in best:
        assert torch.equal(saved[n], best[n]), n

    # A rerun after the end (e.g. killed before the model was saved) loads the same best again.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = distill(student(tiny_tokenizer), tiny_tokenizer, RECORDS, cfg, tmp_path, progress=False,
                        evaluator=Scripted(accuracies))
    assert again.resumed_from == 8 and again.final_metrics["model_step"] == 4


def test_spec_checks_load_best_model_at_end():
    with pytest.raises(ValueError) as e:
        DistillSpec(load_best_model_at_end=True)
    assert e.value.errors()[0]["loc"] == ("load_best_model_at_end",) and "needs eval_steps" in str(e.value)
    with pytest.raises(ValueError) as e:
        DistillSpec(eval_steps=3, save_steps=200, load_best_model_at_end=True)
    assert "save_steps (200) to be a multiple of eval_steps (3)" in str(e.value)
    DistillSpec(eval_steps=50, save_steps=200, load_best_model_at_end=True)  # fine
    DistillSpec(eval_steps=3)  # evaluation alone needs nothing else
    with pytest.raises(ValueError, match="greater than 0"):
        DistillSpec(eval_samples=0)
    # A phase inherits what it does not set, and is checked with it.
    ok = DistillSpec(eval_steps=10, save_steps=20, phases=[{"algorithm": "sft", "load_best_model_at_end": True}])
    assert ok.phase_configs()[0].load_best_model_at_end
    with pytest.raises(ValueError, match=r"phases\[0\]: load_best_model_at_end needs save_steps \(15\)"):
        DistillSpec(eval_steps=10, phases=[{"algorithm": "sft", "load_best_model_at_end": True, "save_steps": 15}])
    # In a spec file the error names the field.
    data = {"task": {"name": "arithmetic"}, "teachers": [{"model": "t"}], "students": [{"model": "s"}],
            "distill": {"load_best_model_at_end": True}}
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert e.value.problems == [("distill.load_best_model_at_end: load_best_model_at_end needs eval_steps: the best "
                                 "checkpoint is the one with the highest eval accuracy, measured every eval_steps steps")]

"""On-policy training: the student's own samples as training data (gkd), seeded by step so that a
resumed run samples exactly what an uninterrupted one did."""

from __future__ import annotations

import torch

from stratos.distill import distill
from stratos.models.generate import sample_ids
from stratos.models.tiny import tiny_llama
from stratos.spec import DistillSpec
from tests.conftest import addition_records, kill_when


def _models(tok):
    teacher = tiny_llama(tok, hidden_size=48, num_hidden_layers=2, seed=1, initializer_range=0.3)
    student = tiny_llama(tok, hidden_size=32, num_hidden_layers=1, seed=2)
    return teacher, student


def test_sampled_ids_are_seeded_and_end_at_their_eos(tiny_tokenizer):
    _, model = _models(tiny_tokenizer)
    prompts = [tiny_tokenizer("12+7=")["input_ids"], tiny_tokenizer("3+45=")["input_ids"][:2]]
    eos = [tiny_tokenizer.eos_token_id]
    kw = dict(max_new_tokens=12, temperature=1.0, pad_id=tiny_tokenizer.pad_token_id, eos_ids=eos)
    torch.manual_seed(123)
    before = torch.rand(())
    a = sample_ids(model, prompts, seed=7, **kw)
    torch.manual_seed(123)
    assert torch.rand(()) == before  # the caller's RNG is left alone
    assert sample_ids(model, prompts, seed=7, **kw) == a
    assert sample_ids(model, prompts, seed=8, **kw) != a
    for row in a:
        assert 1 <= len(row) <= 12
        assert eos[0] not in row[:-1]  # cut at the first EOS, which it keeps
    assert model.training  # back in the mode it came in


def _cfg(**kw) -> DistillSpec:
    base = {"algorithm": "gkd", "loss": "rkl", "kd_ratio": 1.0, "lmbda": 1.0, "max_steps": 6, "save_steps": 3,
            "per_device_train_batch_size": 4, "learning_rate": 3e-3, "max_completion_length": 8, "logging_steps": 1,
            "warmup_ratio": 0.0, "report_to": [], "bf16": False}
    return DistillSpec(**{**base, **kw})


def test_gkd_trains_on_its_own_samples_and_resumes_to_the_same_weights(tiny_tokenizer, tmp_path):
    records = addition_records(24, seed=3)
    teacher, student = _models(tiny_tokenizer)
    full = distill(student, tiny_tokenizer, records, _cfg(), tmp_path / "full", teacher=teacher, progress=False)
    assert full.signal["mode"] == "online"  # the teacher scores tokens that exist only during training
    rows = [r for r in map(eval_json, (tmp_path / "full" / "metrics.jsonl").read_text().splitlines())]
    assert all(r["on_policy_fraction"] == 1.0 and r["rollout_tokens"] > 0 for r in rows)

    _, resumed = _models(tiny_tokenizer)
    first = distill(resumed, tiny_tokenizer, records, _cfg(), tmp_path / "cut", teacher=teacher, progress=False,
                    stop_after=4)
    assert first.steps == 4
    _, fresh = _models(tiny_tokenizer)  # as a new process: the weights come back from the step-4 checkpoint
    second = distill(fresh, tiny_tokenizer, records, _cfg(), tmp_path / "cut", teacher=teacher, progress=False)
    assert second.resumed_from == 4 and second.steps == 6
    for (name, a), (_, b) in zip(student.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name

    # lmbda 0 is off-policy KD on the data's responses: no sampling at all.
    _, off = _models(tiny_tokenizer)
    distill(off, tiny_tokenizer, records, _cfg(lmbda=0.0, max_steps=2), tmp_path / "off", teacher=teacher,
            progress=False)
    rows = [eval_json(line) for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["on_policy_fraction"] == 0.0 and "rollout_tokens" not in r for r in rows)


def test_gkd_trains_the_students_own_samples_on_the_divergence_alone(tiny_tokenizer, tmp_path):
    """kd_ratio mixes CE into gkd only on the data's responses: the student's own samples are no reference,
    so on them (lmbda 1: every micro-batch) kd_ratio 0.5 trains exactly as kd_ratio 1. On the data's
    responses (lmbda 0) the two differ, as in kd."""
    records = addition_records(24, seed=3)
    teacher, _ = _models(tiny_tokenizer)
    weights: dict[tuple[float, float], dict[str, torch.Tensor]] = {}
    for lmbda in (1.0, 0.0):
        for ratio in (0.5, 1.0):
            _, student = _models(tiny_tokenizer)
            distill(student, tiny_tokenizer, records, _cfg(loss="fkl", kd_ratio=ratio, lmbda=lmbda, max_steps=3),
                    tmp_path / f"{lmbda}-{ratio}", teacher=teacher, progress=False)
            weights[lmbda, ratio] = student.state_dict()

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(weights[1.0, 0.5], weights[1.0, 1.0])
    assert not same(weights[0.0, 0.5], weights[0.0, 1.0])


def eval_json(line: str) -> dict:
    import json

    return json.loads(line)


def test_gkd_lowers_reverse_kl_on_the_students_own_samples_more_than_kd(tiny_tokenizer, tmp_path):
    """Same teacher, data, divergence (reverse KL) and steps: gkd (lmbda 1) trains on the student's own
    samples, kd on the data's responses, which this teacher would not write. On unseen prompts, where
    the student samples its own answers, gkd's reverse KL to the teacher is lower in every seed, by a
    gap of the means over three standard errors."""
    from stratos.distill import kl_on_own_samples

    unseen = addition_records(48, seed=77)
    result: dict[str, list[float]] = {"gkd": [], "kd": []}
    for seed in (0, 1, 2):
        for algo in result:
            teacher = tiny_llama(tiny_tokenizer, hidden_size=48, num_hidden_layers=2, seed=1, initializer_range=0.3)
            student = tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=2 + seed)
            cfg = _cfg(algorithm=algo, max_steps=30, save_steps=100, logging_steps=100, max_completion_length=16,
                       per_device_train_batch_size=8, seed=seed, teacher_signal="online", learning_rate=1e-2)
            distill(student, tiny_tokenizer, addition_records(64, seed=3), cfg, tmp_path / f"{algo}-{seed}",
                    teacher=teacher, progress=False)
            result[algo].append(kl_on_own_samples(student, teacher, tiny_tokenizer, unseen, max_new_tokens=16,
                                                  seed=99))
    # Every kd seed above every gkd seed, and the gap of the means over 3 standard errors of the difference.
    kd, gkd = torch.tensor(result["kd"]), torch.tensor(result["gkd"])
    standard_error = float((kd.var() / len(kd) + gkd.var() / len(gkd)).sqrt())
    assert kd.min() > gkd.max() and float(kd.mean() - gkd.mean()) > 3 * standard_error, result


class EvenDigitTask:
    """A task whose reward a tiny model can learn in a few RL steps: answer with an even digit. A
    student trained on uniformly random digits answers even about half the time."""

    name = "even-digit"

    def examples(self, split, n, seed=0):
        from stratos.tasks import Example

        base = 0 if split == "train" else 10_000
        return [Example(f"{split}-{i}", f"{base + i}+{seed}=", 0) for i in range(n)]

    def prompt(self, ex, *, rules=False):
        return ex.question

    def target(self, ex, *, rationale=False):
        return "0"

    def parse(self, text, ex=None):
        text = text.strip()
        return text[0] if text and text[0].isdigit() else None

    def score(self, ex, answer):
        from stratos.tasks import Score

        ok = answer is not None and int(answer) % 2 == 0
        return Score(ok, float(ok))

    def describe(self):
        return "Answer with an even digit."


def test_grpo_raises_accuracy_above_its_sft_start(tiny_tokenizer, tmp_path):
    """From a weak SFT start (random digits: about half even), grpo with the task's verifier as the
    reward lifts greedy eval accuracy above the start's 95% interval."""
    import random

    from stratos.evaluate import evaluate
    from stratos.tasks import to_records

    task = EvenDigitTask()
    rng = random.Random(0)
    train = task.examples("train", 64)
    sft_records = [{**r, "response": str(rng.randrange(10))} for r in to_records(task, train)]
    student = tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=5)
    base = {"max_completion_length": 2, "logging_steps": 1, "save_steps": 100, "report_to": [], "bf16": False,
            "warmup_ratio": 0.0, "lr_scheduler_type": "constant"}
    distill(student, tiny_tokenizer, sft_records,
            DistillSpec(algorithm="sft", max_steps=80, per_device_train_batch_size=16, learning_rate=1e-2, **base),
            tmp_path / "sft", progress=False)
    held_out = task.examples("eval", 100)
    start = evaluate(student, tiny_tokenizer, task, held_out, max_new_tokens=2)
    assert start.unparsed == 0 and 0.2 < start.accuracy < 0.8  # a digit, even about half the time

    res = distill(student, tiny_tokenizer, to_records(task, train),
                  DistillSpec(algorithm="grpo", num_generations=4, max_steps=20, per_device_train_batch_size=16,
                              learning_rate=3e-3, temperature=1.0, **base),
                  tmp_path / "grpo", task=task, progress=False)
    rows = [eval_json(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["reward"] > rows[0]["reward"]
    end = evaluate(student, tiny_tokenizer, task, held_out, max_new_tokens=2)
    assert end.accuracy > start.ci_high, (start.accuracy, end.accuracy, res.final_metrics)


def test_a_grpo_run_killed_with_sigkill_resumes_to_the_same_weights(tiny_tokenizer, tmp_path):
    """`stratos distill` with grpo in a subprocess, SIGKILLed once it has checkpoints, then resumed
    from a checkpoint inside a block of num_iterations=2 updates on one batch of rollouts (with a KL to
    the reference, beta): the rollouts are seeded by (seed, step) and the block's are read back with
    their log-probabilities, so it ends with the uninterrupted run's weights."""
    import shutil

    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest
    import yaml
    from safetensors.torch import load_file

    from stratos.cli import main
    from stratos.models.tiny import save_model

    model = save_model(tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=6), tiny_tokenizer,
                       tmp_path / "student")
    spec = tmp_path / "grpo.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "grpo", "task": {"name": "arithmetic", "options": {"digits": 1}, "train_size": 32, "eval_size": 4},
        "teachers": [{"model": str(model)}], "students": [{"model": str(model)}],
        "distill": {"algorithm": "grpo", "num_generations": 4, "max_completion_length": 4, "max_steps": 10,
                    "num_iterations": 2, "beta": 0.05, "save_steps": 1, "per_device_train_batch_size": 8,
                    "learning_rate": 1e-3, "report_to": []},
    }))
    with pytest.raises(SystemExit):
        main(["distill", str(spec), "--out", str(tmp_path / "full")])
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "STRATOS_CACHE": str(tmp_path / "cache")}
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "stratos.cli", "distill", str(spec), "--out", str(killed)]
    kill_when(cmd, env, lambda: any(p.name >= "step-0000004" for p in killed.glob("checkpoints/step-*")))
    assert not (killed / "model").exists()
    # Resume from inside a block (an odd step): its rollouts were drawn by weights no checkpoint keeps.
    ckpts = sorted(killed.glob("checkpoints/step-*"))
    if int(ckpts[-1].name.split("-")[1]) % 2 == 0:
        shutil.rmtree(ckpts[-1])
    again = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = json_of(killed / "result.json")["resumed_from"]
    assert resumed >= 3 and resumed % 2 == 1
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def json_of(path):
    import json

    return json.loads(path.read_text())


def test_opd_learns_from_the_teacher_and_the_verifier_on_the_same_samples(tiny_tokenizer, tmp_path):
    """opd: grpo's groups and reward, plus the reverse KL to the teacher on the same samples (the
    teacher scores them online). Both terms train: the divergence on the student's own samples falls
    below grpo's at the same steps and seed; without a usable teacher a plan trains grpo instead."""
    from stratos.distill import kl_on_own_samples
    from stratos.distill.recipe import resolve
    from stratos.tasks import to_records

    task = EvenDigitTask()
    records = to_records(task, task.examples("train", 32))
    teacher = tiny_llama(tiny_tokenizer, hidden_size=48, num_hidden_layers=2, seed=1, initializer_range=0.3)
    kl = {}
    for algo in ("grpo", "opd"):
        student = tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=5)
        cfg = DistillSpec(algorithm=algo, loss="rkl", kd_ratio=1.0, num_generations=4, max_completion_length=4,
                          max_steps=12, per_device_train_batch_size=16, learning_rate=3e-3, save_steps=100,
                          logging_steps=1, report_to=[], bf16=False, warmup_ratio=0.0)
        res = distill(student, tiny_tokenizer, records, cfg, tmp_path / algo, teacher=teacher if algo == "opd" else None,
                      task=task, progress=False)
        rows = [eval_json(line) for line in (tmp_path / algo / "metrics.jsonl").read_text().splitlines()]
        assert all("reward" in r for r in rows)
        if algo == "opd":
            assert res.signal["mode"] == "online" and all(r["kd"] > 0 for r in rows)
        kl[algo] = kl_on_own_samples(student, teacher, tiny_tokenizer, records[:16], max_new_tokens=4, seed=3)
    assert kl["opd"] < kl["grpo"], kl
    fallback = resolve(DistillSpec(algorithm="opd", loss="rkl"), match="text")
    assert [p.algorithm for p in fallback.phases] == ["grpo"] and "grpo instead" in fallback.phases[0].reason


def test_grpo_options_clip_the_ratio_keep_a_reference_and_sum_user_rewards(tiny_tokenizer, tmp_path):
    """num_iterations reuses a batch of rollouts, its ratio to the sampling policy clipped at epsilon
    (1 on a block's first update, so nothing clipped there); beta keeps the KL to the student as the
    run started (0 at the first step, then growing); reward_funcs adds a user's function, as TRL
    calls it, to the verifier's credit, weighted."""
    from stratos.tasks import to_records

    (tmp_path / "my_rewards.py").write_text(
        "def short(prompts, completions, answer, **columns):\n"
        "    assert len(prompts) == len(completions) == len(answer) == len(columns['type'])\n"
        "    return [1.0 - min(len(c), 4) / 4 for c in completions]\n")
    task = EvenDigitTask()
    student = tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=5)
    fn = f"{tmp_path / 'my_rewards.py'}:short"
    cfg = DistillSpec(algorithm="grpo", num_generations=4, max_completion_length=3, max_steps=6, num_iterations=3,
                      epsilon=0.05, beta=0.1, reward_funcs=["verifier", fn], reward_weights=[1.0, 0.5],
                      per_device_train_batch_size=16, learning_rate=2e-2, save_steps=100, logging_steps=1,
                      report_to=[], bf16=False, warmup_ratio=0.0, lr_scheduler_type="constant")
    distill(student, tiny_tokenizer, to_records(task, task.examples("train", 16)), cfg, tmp_path / "run", task=task,
            progress=False)
    rows = [eval_json(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, later = rows[0::3], [r for i, r in enumerate(rows) if i % 3]
    assert all("reward" in r for r in first) and not any("reward" in r for r in later)  # one rollout per block
    for r in first:
        assert abs(r["reward"] - (r["reward/verifier"] + 0.5 * r[f"reward/{fn}"])) < 1e-6
        assert r["clipped"] == 0.0  # the policy that sampled is the one training: ratio 1
    assert any(r["clipped"] > 0 for r in later)  # later updates move the ratio past 1 +- epsilon
    assert rows[0]["kl_ref"] < 1e-6 < rows[-1]["kl_ref"]
    assert len(list((tmp_path / "run" / "grpo").glob("rollouts-*.safetensors"))) == 2


def test_bad_reward_functions_are_named(tiny_tokenizer, tmp_path):
    import pytest
    from pydantic import ValidationError

    from stratos.errors import TrainingError
    from stratos.tasks import to_records

    with pytest.raises(ValidationError, match=r"reward_funcs\[1\] 'nocolon'"):
        DistillSpec(algorithm="grpo", reward_funcs=["verifier", "nocolon"])
    with pytest.raises(ValidationError, match="reward_weights has 1 value"):
        DistillSpec(algorithm="grpo", reward_funcs=["verifier", "a:b"], reward_weights=[1.0])
    task = EvenDigitTask()
    student = tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=5)
    records = to_records(task, task.examples("train", 8))
    for name, message in [("no_such_module_x:f", "cannot load 'no_such_module_x:f': ModuleNotFoundError"),
                          (f"{tmp_path / 'missing.py'}:f", "cannot load .*missing.py:f': FileNotFoundError")]:
        with pytest.raises(TrainingError, match=message):
            distill(student, tiny_tokenizer, records, DistillSpec(algorithm="grpo", reward_funcs=[name], max_steps=1),
                    tmp_path / "bad", task=task, progress=False)
    (tmp_path / "r.py").write_text("def wrong(prompts, completions, **kw):\n    return [1.0]\n")
    with pytest.raises(TrainingError, match="returned 1 values for 16 completions"):
        distill(student, tiny_tokenizer, records,
                DistillSpec(algorithm="grpo", reward_funcs=[f"{tmp_path / 'r.py'}:wrong"], max_steps=1,
                            per_device_train_batch_size=16, max_completion_length=2, report_to=[]),
                tmp_path / "bad2", task=task, progress=False)
    assert not (tmp_path / "bad").exists()


def test_seq_kd_trains_on_the_teachers_own_samples(tiny_tokenizer):
    """gkd with seq_kd: the micro-batches that are not on-policy (all of them at lmbda 0) hold the
    teacher's samples of their prompts, seeded like the student's."""
    import pytest

    from stratos.distill.data import encode
    from stratos.distill.sources import OnPolicySource
    from stratos.errors import TrainingError
    from stratos.models.generate import _eos_ids

    teacher, student = _models(tiny_tokenizer)
    examples, _ = encode(addition_records(8, seed=3), tiny_tokenizer, 64)
    cfg = _cfg(lmbda=0.0, seq_kd=True, per_device_train_batch_size=4)
    with pytest.raises(TrainingError, match="seq_kd needs the teacher model"):
        OnPolicySource(examples, tiny_tokenizer, cfg, tiny_tokenizer.pad_token_id)
    source = OnPolicySource(examples, tiny_tokenizer, cfg, tiny_tokenizer.pad_token_id, teacher=teacher)
    info = source.prepare(1, student)
    assert info["teacher_sampled_fraction"] == 1.0 and info["on_policy_fraction"] == 0.0
    batch = source.micro_batches(1)[0]
    prompts = [OnPolicySource._prompt(examples[i]) for i in batch.indices]
    expected = sample_ids(teacher, prompts, max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                          seed=(cfg.seed * 1_000_003 + 1) * 2,  # step 1's teacher samples
                          pad_id=tiny_tokenizer.pad_token_id, eos_ids=_eos_ids(teacher, tiny_tokenizer))
    for row, p, c in zip(batch.input_ids.tolist(), prompts, expected):
        assert row[: len(p) + len(c)] == p + c
    assert any(c != examples[i].input_ids[len(p):] for i, p, c in zip(batch.indices, prompts, expected))

    # Records that gave the teacher worked examples (teacher_messages): it samples from those, and its answer
    # trains after the student's own prompt.
    from stratos.distill.data import teacher_prompts

    plain = expected

    shown = [{**r, "teacher_messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"},
                                        {"role": "user", "content": r["prompt"]}]} for r in addition_records(8, seed=3)]
    asked = teacher_prompts(shown, tiny_tokenizer)
    source = OnPolicySource(examples, tiny_tokenizer, cfg, tiny_tokenizer.pad_token_id, teacher=teacher,
                            teacher_prompts=asked)
    source.prepare(1, student)
    batch = source.micro_batches(1)[0]
    expected = sample_ids(teacher, [asked[tuple(p)] for p in prompts], max_new_tokens=cfg.max_completion_length,
                          temperature=cfg.temperature, seed=(cfg.seed * 1_000_003 + 1) * 2,
                          pad_id=tiny_tokenizer.pad_token_id, eos_ids=_eos_ids(teacher, tiny_tokenizer))
    for row, p, c in zip(batch.input_ids.tolist(), prompts, expected):
        assert row[: len(p) + len(c)] == p + c
    assert expected != plain  # the worked examples changed what it wrote


def test_rl_takes_prompt_only_records_and_the_verifier_sees_their_meta(tiny_tokenizer, tmp_path):
    """RL's data is prompts (with what the verifier needs): grpo trains on records without a response,
    where SFT refuses them by line; a task record's meta reaches the verifier (Mahjong's partial credit
    for a discard one step worse needs the shanten after each discard)."""
    import pytest

    from stratos.distill.sources import record_example
    from stratos.io import DataError, write_jsonl
    from stratos.tasks import grade, to_records
    from stratos.tasks.mahjong import MahjongTask

    task = EvenDigitTask()
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, [{"prompt": r["prompt"], "answer": r["answer"]} for r in to_records(task, task.examples("train", 8))])
    student = tiny_llama(tiny_tokenizer, hidden_size=32, num_hidden_layers=1, seed=5)
    res = distill(student, tiny_tokenizer, path, DistillSpec(algorithm="grpo", max_steps=1, per_device_train_batch_size=8,
                                                             max_completion_length=2, report_to=[]),
                  tmp_path / "rl", task=task, progress=False)
    assert res.steps == 1
    with pytest.raises(DataError, match=r"prompts.jsonl:1: .*prompt-only records are for RL"):
        distill(student, tiny_tokenizer, path, DistillSpec(algorithm="sft", max_steps=1), tmp_path / "sft", progress=False)

    mj = MahjongTask(types=("discard",))
    ex = mj.examples("train", 1)[0]
    rec = to_records(mj, [ex])[0]
    after = ex.meta["shanten_after"]
    near = next(t for t, s in after.items() if s == min(after.values()) + 1)  # a discard one step worse
    assert grade(mj, record_example(rec), f"Answer: {near}")[1].credit == 0.5
    assert grade(mj, record_example({k: v for k, v in rec.items() if k != "meta"}), f"Answer: {near}")[1].credit == 0.0


def test_scale_rewards_group_batch_and_none_are_trls():
    """The three scalings of GRPO's advantages, on rewards worked by hand; true and false are group and none."""
    from stratos.distill.sources import advantages

    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # a group with signal, one that ties
    centred = torch.tensor([[0.5, -0.5, 0.5, -0.5], [0.0, 0.0, 0.0, 0.0]])
    group_std = torch.tensor([[0.57735027], [0.0]])  # Bessel-corrected: sqrt(4 * 0.25 / 3)
    batch_std = r.flatten().std()  # 0.4629..., over the step's 8 rewards
    adv, ties = advantages(r, "group", batch_std)
    assert ties == 1 and torch.allclose(adv, centred / (group_std + 1e-4))
    assert torch.allclose(advantages(r, "batch", batch_std)[0], centred / (batch_std + 1e-4))
    assert torch.equal(advantages(r, "none", batch_std)[0], centred)
    assert DistillSpec(scale_rewards=True).scale_rewards == "group"
    assert DistillSpec(scale_rewards=False).scale_rewards == "none"


def test_verifier_exact_rewards_a_correct_answer_only():
    """reward_funcs 'verifier' pays the task's partial credit (Mahjong: 0.5 for a discard a step worse);
    'verifier_exact' pays 1 for a correct answer and 0 otherwise, so a policy cannot live on partial credit."""
    import pytest

    from stratos.distill.rewards import Rewards
    from stratos.distill.sources import record_example
    from stratos.errors import TrainingError
    from stratos.tasks import get_task, grade, to_records

    task = get_task("mahjong:discard", notation="spaced")
    records = to_records(task, task.examples("train", 20))
    pairs = []  # (record, completion) with partial credit, and with full credit
    for r in records:
        ex = record_example(r)
        for tile in dict.fromkeys(task.prompt(ex).split("\n")[0].split(":")[1].split()):
            g = grade(task, ex, f"Answer: {tile}")[1]
            if 0 < g.credit < 1 or g.correct:
                pairs.append((r, f"Answer: {tile}", g))
    partial = next(p for p in pairs if 0 < p[2].credit < 1)
    full = next(p for p in pairs if p[2].correct)
    rewards = Rewards.from_config(DistillSpec(algorithm="grpo", reward_funcs=["verifier", "verifier_exact"],
                                              reward_weights=[1.0, 10.0]), task)
    total, means = rewards([partial[0], full[0]], [partial[1], full[1]])
    assert means["reward/verifier"] == pytest.approx((partial[2].credit + 1.0) / 2)
    assert means["reward/verifier_exact"] == pytest.approx(0.5)  # the partial answer earns nothing
    assert total == pytest.approx([partial[2].credit, 1.0 + 10.0])
    with pytest.raises(TrainingError, match="rewards with the task's verifier"):
        Rewards.from_config(DistillSpec(algorithm="grpo", reward_funcs=["verifier_exact"]), None)

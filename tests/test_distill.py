"""The engine end to end, for real: a teacher trained here, distilled into a smaller student;
a run killed with SIGKILL and resumed; LoRA; the CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stratos.distill import distill, kl_to_teacher
from stratos.models.tiny import build_tokenizer, save_model, tiny_llama
from stratos.spec import DistillSpec, LoraSpec
from tests.conftest import kill_when

ROOT = Path(__file__).resolve().parents[1]


def reversal_records(n: int, seed: int) -> list[dict]:
    """Toy task: reverse a string of 3-6 digits. Learnable in seconds, never solved by chance."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
        out.append({"prompt": f"reverse {s}", "response": s[::-1]})
    return out


@pytest.fixture(scope="module")
def char_tokenizer():
    return build_tokenizer([], vocab_size=260)  # the byte alphabet and specials only: one token per character


def accuracy(model, tok, records) -> float:
    tok.padding_side = "left"
    try:
        prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                           tokenize=False) for r in records]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        model.eval()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    finally:
        tok.padding_side = "right"
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(t.strip() == r["response"] for t, r in zip(texts, records)) / len(records)


def test_student_learns_the_task_from_a_trained_teacher(tmp_path, char_tokenizer):
    tok = char_tokenizer
    train, held_out = reversal_records(2000, seed=0), reversal_records(150, seed=99)
    teacher = tiny_llama(tok, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, seed=1)
    sft = DistillSpec(loss="ce", num_train_epochs=3, per_device_train_batch_size=32, learning_rate=1e-3,
                      report_to=[], save_steps=10_000)
    distill(teacher, tok, train, sft, tmp_path / "teacher", progress=False)
    teacher_acc = accuracy(teacher, tok, held_out)
    assert teacher_acc >= 0.9

    # Half the teacher's parameters: a narrower MLP and one KV head.
    student = tiny_llama(tok, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         intermediate_size=128, seed=2)
    assert sum(p.numel() for p in student.parameters()) < 0.5 * sum(p.numel() for p in teacher.parameters())
    acc_before = accuracy(student, tok, held_out)
    kl_before = kl_to_teacher(student, teacher, tok, held_out)
    kd = DistillSpec(loss="fkl", num_train_epochs=5, per_device_train_batch_size=32, learning_rate=1e-3,
                     report_to=[], save_steps=10_000)
    res = distill(student, tok, train, kd, tmp_path / "student", teacher=teacher, cache_root=tmp_path / "cache",
                  progress=False)
    kl_after = kl_to_teacher(student, teacher, tok, held_out)
    acc_after = accuracy(student, tok, held_out)
    assert kl_after < 0.2 * kl_before
    assert acc_before <= 0.02 and acc_after >= 0.6, (acc_before, acc_after)
    assert res.signal["mode"] == "cached" and res.signal["bytes_per_token"] == 128 * 2
    # The metrics file has the KL falling from the first log line to the last.
    rows = [json.loads(x) for x in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kd"] < 0.2 * rows[0]["kd"]
    # The saved student is an ordinary HF folder with the same behaviour.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(res.model_dir)
    assert accuracy(reloaded, tok, held_out[:50]) == accuracy(student, tok, held_out[:50])


def _cli(out: Path, teacher: Path, student: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stratos.cli", "distill", "--teacher", str(teacher), "--student", str(student),
            "--data", str(data), "--out", str(out), "--max-steps", "60", "--batch-size", "8", "--save-steps", "5",
            "--lr", "1e-3", "--seed", "7", *extra]


def test_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path, char_tokenizer):
    tok = char_tokenizer
    teacher = save_model(tiny_llama(tok, hidden_size=64, num_hidden_layers=2, seed=1), tok, tmp_path / "teacher")
    student = save_model(tiny_llama(tok, hidden_size=32, num_hidden_layers=2, seed=2), tok, tmp_path / "student")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reversal_records(300, seed=3)))
    # STRATOS_CPU_BF16=0: this CPU is taken for one without native bf16, so `bf16: auto` trains in fp32 here
    # whatever the machine (result.json records it).
    env = {**os.environ, "STRATOS_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT / "src"),
           "STRATOS_CPU_BF16": "0"}

    subprocess.run(_cli(tmp_path / "full", teacher, student, data), check=True, env=env, capture_output=True)
    # No spec, no task, no eval: the model card says what trained it and that nothing was measured.
    card = (tmp_path / "full" / "model" / "README.md").read_text()
    # Local paths appear by their last part only: the card travels with the model, the paths are this machine's.
    assert card.startswith("---\nlibrary_name: transformers") and f"# {student.name}, distilled" in card
    assert f"from the teacher {teacher.name} (`{teacher.name}`)" in card
    assert f"Training records: 300 (from `{data.name}`)" in card and str(tmp_path) not in card
    assert "60 optimizer steps, teacher signal cached" in card and "Evaluation while training" not in card
    assert "Accuracy and speed were not measured by `stratos distill`" in card and "--task TASK" in card

    ckpts = tmp_path / "killed" / "checkpoints"
    kill_when(_cli(tmp_path / "killed", teacher, student, data), env,
              lambda: any(p.name >= "step-0000015" for p in ckpts.glob("step-*")))
    assert not (tmp_path / "killed" / "model").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    assert 15 <= killed_at < 60

    # Without --resume the CLI refuses to clobber the interrupted run.
    refused = subprocess.run(_cli(tmp_path / "killed", teacher, student, data), env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    subprocess.run(_cli(tmp_path / "killed", teacher, student, data, "--resume"), check=True, env=env,
                   capture_output=True)
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    result = json.loads((tmp_path / "killed" / "result.json").read_text())
    assert result["resumed_from"] == killed_at and result["steps"] == 60
    assert result["precision"] == ("bf16" if torch.cuda.is_available() else "fp32")
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "a step was logged twice after the resume"


def test_lora_trains_adapters_and_saves_a_plain_model(tmp_path, char_tokenizer):
    tok = char_tokenizer
    student = tiny_llama(tok, hidden_size=64, num_hidden_layers=2, seed=2)
    before = {n: p.clone() for n, p in student.named_parameters()}
    cfg = DistillSpec(loss="ce", max_steps=30, per_device_train_batch_size=16, learning_rate=5e-3,
                      lora=LoraSpec(r=4, alpha=8), report_to=[], logging_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # peft's deprecated call inside get_peft_model is filtered
        res = distill(student, tok, reversal_records(200, seed=4), cfg, tmp_path / "lora", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["ce"] < rows[0]["ce"]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(res.model_dir)
    names = {n for n, _ in merged.named_parameters()}
    assert not any("lora" in n for n in names)  # merged: loads without peft
    changed = [n for n, p in merged.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("q_proj" in n for n in changed)
    assert torch.equal(merged.model.embed_tokens.weight, before["model.embed_tokens.weight"])  # frozen


def test_gradient_checkpointing_recomputes_each_layer_and_trains_the_same(tmp_path, char_tokenizer):
    """distill.gradient_checkpointing: every decoder layer runs again in the backward pass (its MLP is called
    twice per step), and the run ends at the weights of a run without it."""
    records, out = reversal_records(64, seed=5), {}
    for on in (False, True):
        student = tiny_llama(char_tokenizer, hidden_size=64, num_hidden_layers=2, seed=2)
        calls = []
        student.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        cfg = DistillSpec(loss="ce", max_steps=4, per_device_train_batch_size=16, learning_rate=5e-3, bf16=False,
                          report_to=[], save_steps=1000, gradient_checkpointing=on)
        distill(student, char_tokenizer, records, cfg, tmp_path / str(on), progress=False)
        out[on] = len(calls), {n: p.detach().clone() for n, p in student.named_parameters()}
    assert out[False][0] == 4 and out[True][0] == 8
    for name, p in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], p, rtol=1e-5, atol=1e-7)


def test_cli_reports_bad_data_by_file_and_line(tmp_path, char_tokenizer):
    student = save_model(tiny_llama(char_tokenizer, hidden_size=32, num_hidden_layers=1), char_tokenizer,
                         tmp_path / "s")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, "-m", "stratos.cli", "distill", "--student", str(student), "--data",
                          str(data), "--loss", "ce", "--out", str(tmp_path / "o")], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 2
    assert f"{data}:2: invalid JSON" in res.stderr
    assert "Traceback" not in res.stderr

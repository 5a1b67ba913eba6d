"""Context distillation: records' ``teacher_messages`` (what the teacher saw: worked examples, rules, a system
prompt) are read by the teacher, the student's own prompt by the student. Real tiny models, trained for real."""

from __future__ import annotations

import json
import re

import pytest
import torch

from stratos.distill import distill, kl_to_teacher
from stratos.distill.data import IGNORE, Encoded, collate, encode, load_records, teacher_prompts, teacher_record
from stratos.distill.signal import PromptedSignal
from stratos.io import DataError
from stratos.models.tiny import tiny_llama
from stratos.spec import DistillSpec
from stratos.teachers.signal import OnlineTeacher

from conftest import addition_records

SHOTS = [{"role": "system", "content": "Worked examples: 12+30=42 and 7+8=15. Add exactly."},
         {"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]


def _with_context(records):
    return [{**r, "teacher_messages": [*SHOTS, {"role": "user", "content": r["prompt"]}]} for r in records]


def _cfg(**kw):
    return DistillSpec(**{"loss": "fkl", "kd_ratio": 1.0, "max_steps": 3, "per_device_train_batch_size": 4,
                          "learning_rate": 3e-3, "warmup_ratio": 0.0, "report_to": [], "bf16": False,
                          "save_steps": 1000, "logging_steps": 1, **kw})


def test_the_teacher_reads_its_own_prompt_then_the_same_response(tiny_tokenizer):
    tok, teacher = tiny_tokenizer, tiny_llama(tiny_tokenizer, seed=2)
    records = _with_context(addition_records(6))
    student_ex, _ = encode(records, tok, 128)
    teacher_ex, _ = encode([teacher_record(r) for r in records], tok, 256)
    signal = PromptedSignal(OnlineTeacher(teacher), teacher_prompts(records, tok), tok.pad_token_id)
    batch = collate(student_ex[:4], [0, 1, 2, 3], tok.pad_token_id)
    t_batch = collate(teacher_ex[:4], [0, 1, 2, 3], tok.pad_token_id)
    assert torch.equal(signal._teacher_batch(batch).input_ids, t_batch.input_ids)  # the teacher's chat, same response
    got = signal.hidden(batch)
    assert got.shape[0] == batch.num_targets
    assert torch.equal(got, OnlineTeacher(teacher).hidden(t_batch))
    assert not torch.allclose(got, OnlineTeacher(teacher).hidden(batch))  # the context changes what it says

    # The student's own samples (gkd, opd): the row's prompt is looked up by its tokens, its sample follows.
    first = next(k for k, t in enumerate(student_ex[0].labels) if t != IGNORE)
    prompt = student_ex[0].input_ids[:first]
    t_prompt = signal.prompts[tuple(prompt)]
    sample = [tok.convert_tokens_to_ids("7"), tok.eos_token_id]
    own = collate([Encoded(prompt + sample, [IGNORE] * len(prompt) + sample)], [0], tok.pad_token_id)
    want = collate([Encoded(t_prompt + sample, [IGNORE] * len(t_prompt) + sample)], [0], tok.pad_token_id)
    assert torch.equal(signal.hidden(own), OnlineTeacher(teacher).hidden(want))


def test_cached_and_online_context_signals_train_alike_and_unlike_the_plain_teacher(tiny_tokenizer, tmp_path):
    tok, teacher = tiny_tokenizer, tiny_llama(tiny_tokenizer, seed=2)
    plain = addition_records(12)
    records = _with_context(plain)
    first_kd = {}
    for name, recs, mode in (("cached", records, "cached"), ("online", records, "online"), ("plain", plain, "cached")):
        res = distill(tiny_llama(tok, seed=1), tok, recs, _cfg(teacher_signal=mode), tmp_path / name,
                      teacher=teacher, cache_root=tmp_path / "cache", progress=False)
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        first_kd[name] = next(r["kd"] for r in rows if "kd" in r)
        if name != "plain":
            info = res.signal["teacher_prompts"]
            assert info["examples"] == info["of"] == 12 and info["extra_prompt_tokens"] > 10
        else:
            assert "teacher_prompts" not in res.signal
    assert first_kd["cached"] == pytest.approx(first_kd["online"], rel=1e-4)  # the cache holds the teacher's view
    assert abs(first_kd["cached"] - first_kd["plain"]) > 1e-3 * first_kd["plain"]


def test_a_student_distilled_with_context_ends_nearer_the_teacher_with_it(tiny_tokenizer, tmp_path):
    """Each student matches the teacher it was shown: the one distilled from the teacher with worked examples in
    view is nearer that teacher on held-out records (and further from the teacher without them) than the one
    distilled from the plain teacher, on the same records and steps."""
    tok, teacher = tiny_tokenizer, tiny_llama(tiny_tokenizer, seed=2)
    plain = addition_records(48, seed=3)
    train, held = plain[:32], plain[32:]
    with torch.no_grad():
        teacher.model.norm.weight.mul_(4.0)  # sharper logits: a random teacher's are nearly uniform
    students = {}
    for name, recs in (("context", _with_context(train)), ("plain", train)):
        students[name] = tiny_llama(tok, seed=1)
        distill(students[name], tok, recs, _cfg(max_steps=80, per_device_train_batch_size=8), tmp_path / name,
                teacher=teacher, cache_root=tmp_path / "cache", progress=False)
    to_context = {k: kl_to_teacher(s, teacher, tok, _with_context(held)) for k, s in students.items()}
    to_plain = {k: kl_to_teacher(s, teacher, tok, held) for k, s in students.items()}
    assert to_context["context"] < 0.85 * to_context["plain"], to_context
    assert to_plain["plain"] < 0.85 * to_plain["context"], to_plain


def test_bad_teacher_messages_name_the_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "data.jsonl"
    cases = [({"prompt": "1+1=", "response": "2", "teacher_messages": "1+1="}, "'teacher_messages' must be a list"),
             ({"prompt": "1+1=", "response": "2", "teacher_messages": [{"role": "assistant", "content": "x"}]},
              "must end with a user message"),
             ({"text": "1+1=2", "teacher_messages": [{"role": "user", "content": "x"}]}, "needs a 'prompt' or"),
             ({"prompt": "1+1=", "response": "2", "teacher_messages": [{"role": "user"}]},
              "'teacher_messages[0]' has no 'content'")]
    for rec, msg in cases:
        path.write_text(json.dumps({"prompt": "2+2=", "response": "4"}) + "\n" + json.dumps(rec) + "\n")
        with pytest.raises(DataError, match=f"data.jsonl:2: .*{re.escape(msg)}"):
            load_records(path)
    # One prompt asked of the teacher two ways: which chat would the teacher read?
    two = [{"prompt": "1+1=", "response": "2", "teacher_messages": [{"role": "user", "content": c}]} for c in "ab"]
    path.write_text("".join(json.dumps(r) + "\n" for r in two))
    with pytest.raises(DataError, match="data.jsonl:2: its prompt appears in another record"):
        teacher_prompts(load_records(path), tiny_tokenizer)

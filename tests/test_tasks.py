"""Tasks: registry, arithmetic, jsonl (generic tasks). Mahjong lives in test_tasks_mahjong.py."""

from __future__ import annotations

import json

import pytest

from stratos.tasks import Example, TaskError, corpus, get_task, grade, register_task, to_records


def test_registry_has_builtins_and_reports_unknown():
    task = get_task("arithmetic", digits=2, ops="+-")
    assert task.name == "arithmetic"
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="arithmetic.*digitz"):
        get_task("arithmetic", digitz=3)


def test_user_task_registers_and_is_found():
    @register_task("echo-test")
    def make(sub=None, word="hi"):
        t = get_task("arithmetic")
        t.name = f"echo-test:{word}"
        return t

    assert get_task("echo-test", word="yo").name == "echo-test:yo"


def test_arithmetic_splits_are_seeded_and_disjoint():
    task = get_task("arithmetic", digits=2, ops="+-*")
    train = task.examples("train", 300, seed=1)
    ev = task.examples("eval", 100, seed=1)
    assert [e.question for e in train] == [e.question for e in task.examples("train", 300, seed=1)]
    assert [e.question for e in train] != [e.question for e in task.examples("train", 300, seed=2)]
    # Disjoint across seeds too: the partition of the question space does not depend on the seed.
    other_train = task.examples("train", 300, seed=7)
    assert not {e.question for e in ev} & ({e.question for e in train} | {e.question for e in other_train})
    assert len({e.question for e in train}) == 300
    for e in train + ev:
        a, b, op = e.meta["a"], e.meta["b"], e.meta["op"]
        assert e.answer == {"+": a + b, "-": a - b, "*": a * b}[op]


def test_arithmetic_too_small_space_is_an_error():
    with pytest.raises(ValueError, match="only about"):
        get_task("arithmetic", digits=1).examples("eval", 50)


def test_arithmetic_with_a_fixed_second_operand():
    task = get_task("arithmetic", digits=3, b=1, eval_fraction=0.4)
    ev, train = task.examples("eval", 200), task.examples("train", 300)
    assert all(e.meta["b"] == 1 and e.answer == e.meta["a"] + 1 for e in ev + train)
    assert ev[0].question == f"What is {ev[0].meta['a']} + 1?"
    assert len({e.meta["a"] for e in ev}) == 200 and not {e.meta["a"] for e in ev} & {e.meta["a"] for e in train}
    # 1,000 questions in all: 40% of them held out gives at most 200 eval questions, and the error says what to raise.
    with pytest.raises(ValueError, match="raise digits or eval_fraction, or lower n"):
        task.examples("eval", 201)
    with pytest.raises(TaskError, match="b must be a non-negative integer"):
        get_task("arithmetic", b=-1)


@pytest.mark.parametrize("rationale", [False, True])
def test_arithmetic_round_trip_and_records(rationale):
    task = get_task("arithmetic", ops="+-")
    exs = task.examples("train", 50)
    for ex in exs:
        answer, score = grade(task, ex, task.target(ex, rationale=rationale))
        assert answer == ex.answer and score.correct and score.credit == 1.0
    recs = to_records(task, exs, rationale=rationale)
    assert set(recs[0]) == {"prompt", "response", "answer", "type", "id"} | ({"meta"} if exs[0].meta else set())
    assert recs[0].get("meta", {}) == exs[0].meta  # what the verifier needs besides the answer, for RL
    json.dumps(recs)  # the engine writes them as JSONL
    assert recs[0]["response"].endswith(f"Answer: {exs[0].answer}")
    assert "Answer: <number>" in recs[0]["prompt"]


def test_arithmetic_parser_tolerance():
    task = get_task("arithmetic")
    ex = Example(id="x", question="What is 600 + 634?", answer=1234)
    assert grade(task, ex, "Let me see: 600 + 634. The answer is: 1,234.")[1].correct
    assert grade(task, ex, "answer = 1234")[1].correct
    assert grade(task, ex, "600 + 634 = 1234")[1].correct  # no marker: the last number
    assert grade(task, ex, "")[0] is None and not grade(task, ex, "")[1].correct
    assert not grade(task, ex, "Answer: 1235")[1].correct
    assert grade(task, Example("y", "q", -5), "Answer: -5")[1].correct


def test_generic_corpus_has_rules_and_worked_examples():
    task = get_task("arithmetic")
    recs = corpus(task, 3)
    assert len(recs) == 4 and all(set(r) == {"text"} for r in recs)
    assert "column" in recs[0]["text"] and "Answer:" in recs[1]["text"]


# --------------------------------------------------------------------------- jsonl


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_jsonl_reports_malformed_line_by_number(tmp_path):
    from stratos.io import DataError

    bad = _write(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "b"}, "", '{"prompt": "x", "answer": ', {"prompt": "c"}])
    with pytest.raises(DataError, match=r"d\.jsonl:3: invalid JSON"):
        get_task("jsonl", path=bad)
    bad = _write(tmp_path / "e.jsonl", [{"prompt": "a", "answer": "b"}, {"prompt": "c"}])
    with pytest.raises(DataError, match=r"e\.jsonl:2: missing key 'answer'"):
        get_task("jsonl", path=bad)
    with pytest.raises(DataError, match="cannot read"):
        get_task("jsonl", path=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown jsonl scorer"):
        get_task("jsonl", path=_write(tmp_path / "f.jsonl", [{"prompt": "a", "answer": "b"}]), scorer="fuzzy")


def test_jsonl_splits_and_duplicates_are_counted(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i), "type": "even" if i % 2 == 0 else "odd"} for i in range(200)]
    task = get_task("jsonl", path=_write(tmp_path / "d.jsonl", rows + rows[:3]))
    assert task.duplicates == 3
    train, ev = task.examples("train"), task.examples("eval")
    assert len(train) + len(ev) == 200 and not {e.question for e in train} & {e.question for e in ev}
    assert [e.id for e in task.examples("train", 10, seed=3)] == [e.id for e in task.examples("train", 10, seed=3)]
    assert {e.type for e in train} == {"even", "odd"}


def score_len(pred, answer):  # a user scorer: partial credit by length
    return min(len(pred), len(answer)) / max(len(pred), len(answer), 1)


@pytest.mark.parametrize(
    "scorer,answer,output,correct",
    [
        ("exact", "Paris", "Answer: Paris", True),
        ("exact", "Paris", "paris", False),
        ("normalized", "The Eiffel Tower", "Answer: eiffel tower.", True),
        ("regex", r"\d{3}-\d{4}", "Answer: 555-1234", True),
        ("regex", r"\d{3}-\d{4}", "555-12345", False),
        ("numeric", 3.14159, "Answer: 3.14159", True),
        ("numeric", "1,000", "It is 1000.0", True),
        ("numeric", 2, "Answer: two", False),
        ("tests.test_tasks:score_len", "abcd", "Answer: abcd", True),
    ],
)
def test_jsonl_scorers(tmp_path, scorer, answer, output, correct):
    task = get_task("jsonl", path=_write(tmp_path / "d.jsonl", [{"prompt": "q", "answer": answer}]), scorer=scorer)
    ex = task._rows[0]
    assert grade(task, ex, output)[1].correct is correct
    assert not grade(task, ex, "")[1].correct


def test_jsonl_user_scorer_partial_credit(tmp_path):
    task = get_task("jsonl", path=_write(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "abcd"}]),
                    scorer="tests.test_tasks:score_len")
    score = grade(task, task._rows[0], "ab")[1]
    assert not score.correct and score.credit == 0.5


def test_task_from_spec_passes_path_scorer_and_options(tmp_path):
    from stratos.spec import TaskSpec
    from stratos.tasks import task_from_spec

    path = _write(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "answer": i} for i in range(30)])
    task = task_from_spec(TaskSpec(name="jsonl", path=path, scorer="numeric", options={"eval_fraction": 0.5}))
    ex = task.examples("eval")[0]
    assert task.eval_fraction == 0.5 and grade(task, ex, f"Answer: {ex.answer}.0")[1].correct
    assert task_from_spec(TaskSpec(name="arithmetic", options={"digits": 2})).digits == 2

"""Bad data files are one clear DataError naming the file and line: JSONL reading, training
records (at load and at tokenisation), the jsonl task's answers and ids, and eval prompts that do
not fit the model's context."""

from __future__ import annotations

import json
import re

import pytest

from stratos.distill.data import Records, encode, load_records, record_problem
from stratos.io import DataError, iter_jsonl, read_jsonl
from stratos.tasks import get_task


def _lines(path, *lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


GOOD = '{"prompt": "1+2=", "response": "3"}'


# ----------------------------------------------------------------------------- iter_jsonl


@pytest.mark.parametrize(
    "line,message",
    [
        (b'{"prompt": "caf\xe9"}', "not UTF-8 text (invalid continuation byte"),
        (b"\x1f\x8b\x08\x00\x00", "not UTF-8 text"),
        (b'{"a": 1}\x00\x00', "not UTF-8 text (a NUL byte at byte 9"),
        (b'{"score": NaN}', "non-finite number NaN"),
        (b'{"score": Infinity}', "non-finite number Infinity"),
        (b'{"score": [-Infinity]}', "non-finite number -Infinity"),
        (b'{"score": 1e999}', "non-finite number 1e999"),
        (b'{"prompt": "a"', "invalid JSON: Expecting ',' delimiter (column 15)"),
        (b"[" * 100_000, "invalid JSON: nested too deeply"),
        (b'["a", "b"]', "expected a JSON object, got an array"),
        (b'"text"', "expected a JSON object, got a string"),
        (b"null", "expected a JSON object, got null"),
    ],
)
def test_a_bad_line_is_named_by_file_and_line(tmp_path, line, message):
    path = _lines(tmp_path / "d.jsonl", GOOD, b"", line, GOOD)
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)
    assert len(info.value.lines()) == 1


def test_readable_jsonl_variants_are_accepted(tmp_path):
    # A byte-order mark, CRLF line ends, blank lines, non-ASCII text and big-but-finite numbers are all fine.
    path = tmp_path / "d.jsonl"
    path.write_bytes('\ufeff{"a": "café"}\r\n\r\n{"b": 1e300, "c": -2.5}\r\n'.encode())
    assert list(iter_jsonl(path)) == [(1, {"a": "café"}), (3, {"b": 1e300, "c": -2.5})]


def test_a_file_that_cannot_be_read(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: cannot read file: No such file"):
        read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "shards.jsonl").mkdir()
    with pytest.raises(DataError, match=r"shards\.jsonl: cannot read file: Is a directory"):
        read_jsonl(tmp_path / "shards.jsonl")


# ----------------------------------------------------------------------------- training records

SYNTH_TOPK = {"tokens": ["token_id:40", "bytes:3f", "x"], "top": [[["token_id:40", -0.1]], [["bytes:3f", 0.0]], []]}


@pytest.mark.parametrize(
    "rec",
    [
        {"prompt": "p", "response": "r", "answer": None, "id": 3},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
        {"text": ""},
        {"text": "t", "response": "ignored"},
        {"prompt": "p", "response": "r", "response_ids": [0, 5]},
        {"prompt": "p", "response": "r", "response_ids": None},
        {"prompt": "p", "response": "r", "topk": SYNTH_TOPK},
    ],
)
def test_good_records_pass(rec):
    assert record_problem(rec) is None


@pytest.mark.parametrize(
    "rec,message",
    [
        ({"answer": "3"}, "a record needs 'prompt' and 'response', 'messages', or 'text' (found keys: answer)"),
        ({"prompt": "p", "answer": "3"}, "a record with 'prompt' needs 'response' too"),
        ({"prompt": 12, "response": "r"}, "'prompt' must be a string, got a number"),
        ({"prompt": "p", "response": None}, "'response' must be a string, got null"),
        ({"text": ["a", "b"]}, "'text' must be a string, got an array"),
        ({"messages": "user: hi"}, "'messages' must be a list of {role, content} objects, got a string"),
        ({"messages": []}, "'messages' is empty"),
        ({"messages": ["hi", {"role": "assistant", "content": "a"}]}, "'messages[0]' must be an object"),
        ({"messages": [{"content": "u"}, {"role": "assistant", "content": "a"}]}, "'messages[0]' has no 'role'"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "'messages[0]' has no 'content'"),
        ({"messages": [{"role": "user", "content": ["part"]}, {"role": "assistant", "content": "a"}]},
         "'messages[0].content' must be a string, got an array"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]},
         "must end with an assistant message (the response); the last is 'user'"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "has only the assistant message"),
        ({"prompt": "p", "response": "r", "response_ids": "1 2"}, "'response_ids' must be a list of token ids, got a string"),
        ({"prompt": "p", "response": "r", "response_ids": [1, "2"]}, "'response_ids[1]' must be a token id"),
        ({"prompt": "p", "response": "r", "response_ids": [1, True]}, "'response_ids[1]' must be a token id"),
        ({"prompt": "p", "response": "r", "response_ids": [-1]}, "'response_ids[0]' must be a token id"),
        ({"prompt": "p", "response": "r", "response_ids": [1.0]}, "'response_ids[0]' must be a token id"),
        ({"prompt": "p", "response": "r", "topk": [1]}, "'topk' must be"),
        ({"prompt": "p", "response": "r", "topk": {"tokens": ["a"], "top": []}}, "'topk' has 1 tokens but 0 positions"),
        ({"prompt": "p", "response": "r", "topk": {"tokens": ["token_id:x"], "top": [[]]}}, "'topk.tokens[0]'"),
        ({"prompt": "p", "response": "r", "topk": {"tokens": ["a"], "top": [[["a", "-1"]]]}}, "'topk.top[0]' must hold"),
        ({"prompt": "p", "response": "r", "topk": {"tokens": ["a"], "top": [[["bytes:zz", -1]]]}}, "'topk.top[0]' must hold"),
    ],
)
def test_load_records_checks_every_record_shape(tmp_path, rec, message):
    path = _lines(tmp_path / "train.jsonl", GOOD, GOOD, json.dumps(rec))
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)


def test_load_records_remembers_where_each_record_came_from(tmp_path):
    path = _lines(tmp_path / "train.jsonl", GOOD, "", '{"text": "t"}')
    records = load_records(path)
    assert isinstance(records, Records) and isinstance(records, list) and len(records) == 2
    assert records.where == [f"{path}:1", f"{path}:3"]
    with pytest.raises(DataError, match="no records"):
        load_records(_lines(tmp_path / "empty.jsonl", "", ""))


def test_encode_names_the_line_of_an_id_outside_the_vocabulary(tmp_path, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    path = _lines(tmp_path / "train.jsonl", GOOD, json.dumps({"prompt": "1+1=", "response": "2", "response_ids": [5, vocab]}))
    records = load_records(path)  # the shape is fine: only the tokenizer knows the id is too large
    with pytest.raises(DataError, match=rf"train\.jsonl:2: 'response_ids' holds token id {vocab}, outside the "
                                        rf"tokenizer's vocabulary of {vocab} tokens"):
        encode(records, tiny_tokenizer, 64)
    examples, stats = encode(records[:1], tiny_tokenizer, 64)
    assert stats.kept == 1 and examples[0].num_targets > 0


def test_encode_counts_records_built_in_code_from_one(tiny_tokenizer):
    records = [json.loads(GOOD), json.loads(GOOD), {"prompt": "p", "response": ["r"]}]
    with pytest.raises(DataError, match=r"^record 3: 'response' must be a string, got an array$"):
        encode(records, tiny_tokenizer, 64)
    with pytest.raises(DataError, match=r"^record 1: 'response_ids' holds token id 100000"):
        encode([{"prompt": "p", "response": "r", "response_ids": [100_000]}], tiny_tokenizer, 64)


def test_encode_names_the_line_a_chat_template_refuses(tmp_path, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    records = load_records(_lines(tmp_path / "train.jsonl", GOOD))
    with pytest.raises(DataError, match=r"train\.jsonl:1: roles must alternate user/assistant"):
        encode(records, tok, 64)


def test_top_k_records_keep_their_lines(tmp_path, tiny_tokenizer):
    from stratos.teachers.topk import with_teacher_tokens

    rec = {"prompt": "p", "response": "r", "topk": {"tokens": ["token_id:5"], "top": [[["token_id:5", -0.1]]]}}
    path = _lines(tmp_path / "train.jsonl", GOOD, json.dumps(rec))
    out = with_teacher_tokens(load_records(path), tiny_tokenizer)
    assert out[1]["response_ids"] == [5] and out.where == [f"{path}:1", f"{path}:2"]


# ----------------------------------------------------------------------------- the jsonl task


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"prompt": "q3", "answer": null}', "'answer' is null"),
        ('{"prompt": "q3", "answer": ""}', "'answer' is empty"),
        ('{"prompt": "q3", "answer": " \\n"}', "'answer' is empty"),
        ('{"prompt": "q3", "answer": NaN}', "non-finite number NaN"),
        ('{"prompt": "q3", "answer": -Infinity}', "non-finite number -Infinity"),
        ('{"prompt": "q3", "answer": "3", "id": ["x"]}', "'id' must be a string or an integer"),
    ],
)
def test_jsonl_task_rejects_answers_it_cannot_score(tmp_path, line, message):
    path = _lines(tmp_path / "d.jsonl", '{"prompt": "q1", "answer": 1}', '{"prompt": "q2", "answer": 0}', line)
    with pytest.raises(DataError) as info:
        get_task("jsonl", path=path)
    assert str(info.value).startswith(f"{path}:3: ") and message in str(info.value)


def test_jsonl_task_duplicate_ids_name_both_lines_and_duplicate_prompts_are_dropped(tmp_path):
    path = _lines(tmp_path / "d.jsonl", '{"prompt": "q1", "answer": 1, "id": 7}', '{"prompt": "q2", "answer": 2}',
                  '{"prompt": "q3", "answer": 3, "id": "7"}')
    with pytest.raises(DataError, match=r"d\.jsonl:3: duplicate id '7', already on line 1"):
        get_task("jsonl", path=path)
    # The same line twice is a repeated prompt: dropped and counted, as before, not an id clash.
    path = _lines(tmp_path / "e.jsonl", '{"prompt": "q1", "answer": 1, "id": "a"}', '{"prompt": "q1", "answer": 1, "id": "a"}',
                  '{"prompt": "q2", "answer": false}')
    task = get_task("jsonl", path=path)
    assert task.duplicates == 1 and [r.id for r in task._rows] == ["a", "line3"]


# ----------------------------------------------------------------------------- eval prompts and the context


@pytest.fixture(scope="module")
def short_model(tiny_tokenizer):
    from stratos.models.tiny import tiny_llama

    return tiny_llama(tiny_tokenizer, max_position_embeddings=48)


def test_eval_prompt_past_the_context_is_named_by_line_before_generating(tmp_path, short_model, tiny_tokenizer):
    from stratos.evaluate import evaluate

    long = " ".join(f"{a}+{a}={2 * a}" for a in range(30))
    path = _lines(tmp_path / "d.jsonl", '{"prompt": "1+2=", "answer": "3"}', json.dumps({"prompt": long, "answer": "0"}))
    task = get_task("jsonl", path=path, eval_fraction=1.0)
    exs = task.examples("eval")
    preds = tmp_path / "preds.jsonl"
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: the prompt is \d+ tokens, leaving no room in the model's "
                                        r"context of 48 tokens; shorten it$"):
        evaluate(short_model, tiny_tokenizer, task, exs, max_new_tokens=4, predictions_path=preds)
    assert not preds.exists()

    # A prompt that fits but leaves less room than max_new_tokens: the message says how far to lower it.
    short = [ex for ex in exs if ex.meta["line"] == 1]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: the prompt is \d+ tokens and max_new_tokens 60: \d+, past the "
                                        r"model's context of 48 tokens; lower max_new_tokens to \d+ or shorten"):
        evaluate(short_model, tiny_tokenizer, task, short, max_new_tokens=60)
    res = evaluate(short_model, tiny_tokenizer, task, short, max_new_tokens=4)
    assert res.n == 1


def test_eval_context_check_names_a_generated_example_by_id(short_model, tiny_tokenizer):
    from stratos.evaluate import evaluate

    task = get_task("arithmetic", digits=2)
    exs = task.examples("eval", 3)
    with pytest.raises(DataError, match=r"^example '[^']+': the prompt is .* \(2 more examples too long\)$"):
        evaluate(short_model, tiny_tokenizer, task, exs, max_new_tokens=48)


def test_eval_through_an_endpoint_is_not_checked_here():
    from stratos.evaluate import evaluate
    from stratos.models.generate import Generation

    task = get_task("arithmetic", digits=2)
    exs = task.examples("eval", 2)
    res = evaluate(None, None, task, exs, max_new_tokens=10_000,
                   generate_fn=lambda prompts, **_: [Generation("", 1, "stop") for _ in prompts])
    assert res.n == 2

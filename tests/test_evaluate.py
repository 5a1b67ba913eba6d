"""The generation helper and the evaluator, on tiny real models (and a perfect/oracle generate_fn)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from stratos.evaluate import EvalResult, evaluate, paired_difference, wilson_interval
from stratos.models.generate import Generation, generate
from stratos.tasks import get_task
from stratos.tasks.base import grade, messages


@pytest.fixture(scope="module")
def noisy_model(tiny_tokenizer):
    from stratos.models.tiny import tiny_llama

    # A large init makes a random model's greedy choices depend on every prompt token, which is
    # what catches padding mistakes (a near-uniform model gives the same output whatever the input).
    return tiny_llama(tiny_tokenizer, initializer_range=0.3)


def test_batched_generation_matches_one_by_one(noisy_model, tiny_tokenizer):
    prompts = ["1+1=", "a much longer prompt: 12+34=", [{"role": "user", "content": "99+1="}], "7+8="]
    batched = generate(noisy_model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(noisy_model, tiny_tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert [b[0].text for b in batched] == [s[0].text for s in single]
    assert all(len(b) == 1 and b[0].num_tokens <= 6 for b in batched)
    assert {b[0].finish_reason for b in batched} <= {"stop", "length"}


def test_sampling_n_and_seed(noisy_model, tiny_tokenizer):
    out = generate(noisy_model, tiny_tokenizer, ["1+1=", "2+2="], max_new_tokens=5, temperature=1.0, n=3, seed=4)
    again = generate(noisy_model, tiny_tokenizer, ["1+1=", "2+2="], max_new_tokens=5, temperature=1.0, n=3, seed=4)
    assert [len(o) for o in out] == [3, 3]
    assert [[g.text for g in o] for o in out] == [[g.text for g in o] for o in again]
    assert len({g.text for g in out[0]}) > 1  # samples differ


def test_stop_strings_end_generation(noisy_model, tiny_tokenizer):
    free = generate(noisy_model, tiny_tokenizer, ["12+34="], max_new_tokens=12)[0][0]
    assert len(free.text) > 2
    stop = free.text[2]
    cut = generate(noisy_model, tiny_tokenizer, ["12+34="], max_new_tokens=12, stop=[stop])[0][0]
    assert stop not in cut.text and free.text.startswith(cut.text)
    assert cut.finish_reason == "stop"


def test_a_turn_written_in_chatml_as_text_ends_there():
    """A base model on the ChatML fallback whose vocabulary lacks <|im_end|> (Gemma 3 270M's GGUF) closes its
    turn by writing the string, never its EOS token; generation ends there rather than at the length limit."""
    import torch

    from stratos.models import DEFAULT_CHAT_TEMPLATE, template_stops
    from stratos.models.generate import encode_prompt
    from stratos.models.tiny import build_tokenizer, tiny_llama

    turn = "ok<|im_end|>\n<|im_start|>user\nmore please"
    tok = build_tokenizer([turn] * 5, vocab_size=300, chatml=False)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE and template_stops(tok) == ("<|im_end|>",)
    assert "<|im_end|>" not in tok.get_vocab() and len(tok("<|im_end|>")["input_ids"]) > 1

    # A model that has learnt to answer "hi" by writing `turn`: its turn's end as text, then an invented next turn.
    model = tiny_llama(tok, hidden_size=32, num_hidden_layers=1)
    prompt = encode_prompt(tok, "hi")
    ids = torch.tensor([prompt + tok(turn)["input_ids"]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    free = generate(model, tok, [tok.decode(prompt)], max_new_tokens=20, chat=False)[0][0]
    assert free.text.startswith("ok<|im_end|>") and "more" in free.text  # what it writes, left unstopped
    out = generate(model, tok, ["hi"], max_new_tokens=20)[0][0]
    assert (out.text, out.finish_reason) == ("ok", "stop")
    # A vocabulary that has <|im_end|> as a token stops at its EOS token instead: no stop string is added.
    assert template_stops(build_tokenizer(["hi"], vocab_size=300)) == ()


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(10, 10)[0] > 0.69


def test_paired_difference_counts_the_questions_only_one_model_gets_right():
    a = [True, True, False, False, True]
    b = [True, False, True, False, False]
    d = paired_difference(a, b)
    # 2 questions right only for a, 1 only for b: +1/5, and a half-width of 1.96 sqrt(2 + 1 - 1/5) / 5.
    assert (d["only_a"], d["only_b"], d["n"]) == (2, 1, 5) and d["difference"] == pytest.approx(0.2)
    assert (d["a"], d["b"]) == (0.6, 0.4) and d["a"] - d["b"] == pytest.approx(d["difference"])
    assert d["ci_high"] - d["difference"] == pytest.approx(1.959964 * (2.8 ** 0.5) / 5)
    # The same answers: no difference and no width; swapped models: the sign flips.
    assert paired_difference(a, a)["ci_low"] == paired_difference(a, a)["ci_high"] == 0.0
    assert paired_difference(b, a)["difference"] == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="same questions"):
        paired_difference(a, b[:4])


def test_evaluate_with_a_perfect_and_a_wrong_endpoint(tmp_path):
    """The generate_fn seam (an API endpoint later): answers from the task's own targets score 1."""
    task = get_task("arithmetic", ops="+-")
    exs = task.examples("eval", 40)
    by_prompt = {task.prompt(e): task.target(e) for e in exs}

    def perfect(prompts, *, max_new_tokens, batch_size):
        return [Generation(by_prompt[p[-1]["content"]], 4, "stop") for p in prompts]

    res = evaluate(None, None, task, exs, generate_fn=perfect, predictions_path=tmp_path / "p.jsonl")
    assert isinstance(res, EvalResult) and res.n == 40 and res.accuracy == 1.0 and res.mean_credit == 1.0
    assert set(res.per_type) == {"+", "-"} and sum(v["n"] for v in res.per_type.values()) == 40
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all(r["correct"] and r["parsed"] == r["answer"] for r in rows)
    json.dumps(res.to_dict())

    def silent(prompts, *, max_new_tokens, batch_size):  # each answer from a request that took 0.25 s
        return [Generation("", max_new_tokens, "length", latency_s=0.25) for _ in prompts]

    res = evaluate(None, None, task, exs, generate_fn=silent)
    assert res.accuracy == 0.0 and res.unparsed == 40 and res.truncated == 40 and res.ci_high < 0.1
    assert res.per_request and res.mean_latency_s == pytest.approx(0.25)  # the request's time, not the batch's

    def every_third(prompts, *, max_new_tokens, batch_size):  # right on examples 0, 3, 6...; a wrong number else
        return [Generation(by_prompt[p[-1]["content"]] if i % 3 == 0 else "-99999", 2, "stop")
                for i, p in enumerate(prompts)]

    res = evaluate(None, None, task, exs, generate_fn=every_third)
    assert res.accuracy == 14 / 40 and (res.ci_low, res.ci_high) == wilson_interval(14, 40)
    assert res.unparsed == 0 and res.truncated == 0 and res.generated_tokens == 80
    for typ, got in res.per_type.items():
        right = [i % 3 == 0 for i, e in enumerate(exs) if e.type == typ]
        assert got["n"] == len(right) and got["accuracy"] == sum(right) / len(right)


def test_evaluate_local_model_and_cli(noisy_model, tiny_tokenizer, tmp_path):
    task = get_task("arithmetic", digits=2)
    exs = task.examples("eval", 12)
    res = evaluate(noisy_model, tiny_tokenizer, task, exs, batch_size=5, max_new_tokens=4,
                   predictions_path=tmp_path / "preds.jsonl")
    # The score is the task's grader on the model's greedy answers, generated here one by one.
    direct = [generate(noisy_model, tiny_tokenizer, [messages(task, e)], max_new_tokens=4)[0][0] for e in exs]
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows] == [g.text for g in direct]
    k = sum(grade(task, e, g.text)[1].correct for e, g in zip(exs, direct))
    assert res.n == 12 and res.accuracy == k / 12 and (res.ci_low, res.ci_high) == wilson_interval(k, 12)
    assert res.generated_tokens == sum(g.num_tokens for g in direct) > 0
    assert res.tokens_per_s == pytest.approx(res.generated_tokens / res.total_s)
    assert res.mean_latency_s == pytest.approx(res.total_s / 12)  # no request latencies: wall time per example
    assert not res.per_request  # so the report shows no latency for it

    # Worked examples before every question (what synth.few_shot shows a teacher): scored on that chat.
    from stratos.synth import worked_context, worked_examples

    context = worked_context(task, worked_examples(task, 2, 0, []))
    assert [m["role"] for m in context] == ["user", "assistant"] * 2
    res = evaluate(noisy_model, tiny_tokenizer, task, exs[:4], max_new_tokens=4, context=context,
                   predictions_path=tmp_path / "shots.jsonl")
    direct = [generate(noisy_model, tiny_tokenizer, [[*context, *messages(task, e)]], max_new_tokens=4)[0][0]
              for e in exs[:4]]
    rows = [json.loads(line) for line in (tmp_path / "shots.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows] == [g.text for g in direct]

    # The CLI loads a model folder like any other.
    folder = tmp_path / "model"
    noisy_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    from stratos.cli import app

    r = CliRunner().invoke(app, ["eval", "--model", str(folder), "--task", "arithmetic", "-O", "digits=2", "--n", "6",
                                 "--max-new-tokens", "3", "--out", str(tmp_path / "cli.jsonl"),
                                 "--json", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 6
    r = CliRunner().invoke(app, ["eval", "--model", str(folder), "--task", "arithmetic", "-O", "digits=2", "--n", "2",
                                 "--max-new-tokens", "3", "--few-shot", "2", "--json", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.json").read_text())["few_shot"] == 2
    r = CliRunner().invoke(app, ["eval", "--model", str(folder), "--task", "nope"])
    assert r.exit_code == 2 and "unknown task" in r.output


def test_leakage_finds_an_eval_question_inside_a_training_prompt_whatever_its_case_and_spacing():
    from stratos.evaluate import leakage
    from stratos.tasks import task_from_spec
    from stratos.spec import TaskSpec

    task = task_from_spec(TaskSpec(name="arithmetic", options={"digits": 2}))
    evals = task.examples("eval", 20, seed=0)
    train = [{"prompt": task.prompt(ex), "response": "x"} for ex in task.examples("train", 50, seed=0)]
    clean = leakage(task, evals, train)
    assert clean["found"] == 0 and clean["eval_questions"] == 20 and clean["training_records"] == 50
    # A regenerated eval question, wrapped in a teacher's rules and spaced and cased differently, is found.
    leaked = train + [{"prompt": "RULES: add.\n\n" + "  ".join(evals[3].question.upper().split()) + "\nAnswer:"}]
    found = leakage(task, evals, leaked)
    assert found["found"] == 1 and found["found_ids"] == [evals[3].id]
    # An eval question shown to the teacher as a worked example (its teacher_messages) is found too.
    shown = train + [{**train[0], "teacher_messages": [{"role": "user", "content": task.prompt(evals[5])},
                                                       {"role": "assistant", "content": "x"},
                                                       {"role": "user", "content": train[0]["prompt"]}]}]
    assert leakage(task, evals, shown)["found_ids"] == [evals[5].id]


def test_leakage_compares_questions_as_the_model_reads_them():
    """A task that renders hands in another notation in its prompts (Mahjong's ``spaced``) is checked
    on the rendered question, the text the training records hold."""
    from stratos.evaluate import leakage
    from stratos.tasks.mahjong import MahjongTask

    task = MahjongTask(types=("discard",), notation="spaced")
    evals = task.examples("eval", 10, seed=0)
    assert task.prompt(evals[2]) != evals[2].question  # the hand is spelt out tile by tile
    records = [{"prompt": task.prompt(ex), "response": task.target(ex)} for ex in task.examples("train", 30)]
    assert leakage(task, evals, records)["found"] == 0
    found = leakage(task, evals, records + [{"prompt": task.prompt(evals[2]), "response": "Answer: 1m"}])
    assert found["found"] == 1 and found["found_ids"] == [evals[2].id]


def test_accuracy_per_question_group_in_results_and_report():
    """A task that groups its questions (Mahjong discards: ready or one from ready after the best
    discard) gets accuracy per group; the report shows one column per model."""
    from stratos.report import _by_group

    task = get_task("mahjong:discard")
    exs = task.examples("eval", 12, seed=0)
    by_prompt = {messages(task, ex)[-1]["content"]: ex for ex in exs}

    def right_on_ready_only(prompts, *, max_new_tokens, batch_size):
        out = []
        for p in prompts:
            ex = by_prompt[p[-1]["content"]]
            text = task.target(ex) if ex.meta["class"] == 0 else "Answer: 9z"
            out.append(Generation(text, 3, "stop"))
        return out

    res = evaluate(None, None, task, exs, generate_fn=right_on_ready_only)
    groups = res.per_group
    assert set(groups) == {"discard: ready after the best discard", "discard: 1 from ready after the best discard"}
    assert groups["discard: ready after the best discard"]["accuracy"] == 1.0
    assert groups["discard: 1 from ready after the best discard"]["accuracy"] == 0.0
    assert sum(g["n"] for g in groups.values()) == 12 and res.accuracy == groups[
        "discard: ready after the best discard"]["n"] / 12
    html = _by_group({"rows": [{"role": "student", **res.to_dict()}]})
    assert "Accuracy by question group" in html and "100.0% of" in html and "0.0% of" in html
    assert _by_group({"rows": [{"role": "student", "per_group": {}}]}) == ""


@pytest.mark.parametrize("head", ["transposed", "onednn"])
def test_decode_layout_takes_the_copies_for_few_rows_and_restores_the_layers(tiny_tokenizer, monkeypatch, head):
    """Decode steps (at most DECODE_ROWS rows) go through copies of the fp32 weights made on entry (transposed,
    or oneDNN's for a weight as large as a vocabulary head: here every weight, by lowering the size); wider
    inputs through the weights themselves. Zeroing the weights inside the context shows which path each took."""
    import torch
    from torch import nn

    from stratos.models import generate
    from stratos.models.generate import DECODE_ROWS, decode_layout
    from stratos.models.tiny import tiny_llama

    if head == "onednn":
        if not torch.backends.mkldnn.is_available():
            pytest.skip("this torch has no oneDNN")
        monkeypatch.setattr(generate, "ONEDNN_MIN_WEIGHT", 1)

    model = tiny_llama(tiny_tokenizer, initializer_range=0.3).eval()
    ids = torch.tensor([tiny_tokenizer("12+34=")["input_ids"]])
    assert ids.numel() <= DECODE_ROWS
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with decode_layout(model):
            patched = [m for m in model.modules() if "forward" in vars(m)]
            kinds = {m.forward.__qualname__.split(".")[0] for m in patched}
            fast = model(input_ids=ids).logits
            for m in patched:
                if m.weight is not model.get_input_embeddings().weight:  # a tied head: the embedding too
                    m.weight.zero_()
            from_copies = model(input_ids=ids).logits
            wide = model(input_ids=ids.repeat(DECODE_ROWS, 1)).logits
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert patched and len(patched) == len(linears)
    assert kinds == {"_onednn_forward" if head == "onednn" else "_decode_forward"}
    assert not any("forward" in vars(m) for m in model.modules())  # restored on exit
    assert torch.allclose(fast, plain, rtol=1e-4, atol=1e-5)
    assert torch.allclose(from_copies, fast, rtol=1e-6, atol=1e-6)  # few rows: the copies, made on entry
    assert not torch.allclose(wide[:1], plain, rtol=1e-2, atol=1e-2)  # many rows: the (zeroed) weights
    monkeypatch.setenv("STRATOS_DECODE_LAYOUT", "0")
    with decode_layout(model):
        assert not any("forward" in vars(m) for m in model.modules())

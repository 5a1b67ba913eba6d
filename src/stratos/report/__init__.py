"""``report.html``: one self-contained page (figures embedded) that tells what a run did and what it got.

    build_report("runs/mahjong-20261125-101500")   # also: stratos report RUN_DIR

It reads only what the stages wrote into the run directory (manifest.json, spec.yaml,
plan/plan.json and plan.png, synth/stats.json, distill/metrics.jsonl, compress/report.json,
eval/results.json and the eval predictions), so it can be rebuilt at any time, and a run whose
later stages have not happened yet still gets a report of what there is.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import yaml

from stratos.io import atomic_write_text
from stratos.report import plots
from stratos.report.card import asked_teacher_sentence, teacher_context, teacher_gain_sentence

__all__ = ["build_report", "results_table"]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        continue  # a line cut by a crash: the report shows the rest
                if limit and len(rows) >= limit:
                    break
    except OSError:
        pass
    return rows


def _artifact(manifest: dict[str, Any], run_dir: Path, stage: str, key: str) -> Path | None:
    value = manifest.get("stages", {}).get(stage, {}).get("artifacts", {}).get(key)
    return run_dir / value if isinstance(value, str) else None


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int) and abs(x) >= 10_000:
        return f"{x / 1e6:.1f}M" if abs(x) >= 1e6 else f"{x:,}"
    return _e(x)


def _table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""  # a list of facts has no header row
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


def _img(uri: str | None, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">' if uri else f'<p class="muted">no data for: {_e(alt)}</p>'


def usd_per_mtok(usd_per_hour: float | None, tokens_per_s: float | None) -> float | None:
    """$ per million generated tokens at a server's hourly price and a measured throughput."""
    if usd_per_hour is None or not tokens_per_s:
        return None
    return usd_per_hour / (tokens_per_s * 3600) * 1e6


def results_table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The comparison table of eval/results.json: one row per model, as the report shows it."""
    # Dollars per token are the serving server's price at the throughput measured here: only a
    # figure when that server is this machine.
    price = results.get("serving_usd_per_hour") if results.get("serving_local", True) else None
    headers = ["model", "what", "accuracy", "95% CI", "params", "size (MB)", "tokens/s", "latency (ms)", "$ / M tokens"]
    rows = []
    for r in results.get("rows", []):
        tps = r.get("output_tokens_per_s") or r.get("tokens_per_s")
        latency = r.get("latency_ms", {}).get("p50") if isinstance(r.get("latency_ms"), dict) else None
        if latency is None and r.get("mean_latency_s") and r.get("per_request"):  # batched wall time is no latency
            latency = 1000 * r["mean_latency_s"]
        rows.append([
            f"<b>{_e(r['role'])}</b>", _e(r.get("model", "")), f"{r['accuracy']:.3f}",
            f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]", _fmt(r.get("params")), _fmt(r.get("size_mb"), 1),
            _fmt(tps, 1), _fmt(latency, 0), _fmt(usd_per_mtok(price, tps), 2),
        ])
    return headers, rows


def _headline(results: dict[str, Any]) -> str:
    rows = {r["role"]: r for r in results.get("rows", [])}
    teacher = rows.get("teacher (zero-shot)")
    final = rows.get("deployed student") or rows.get("compressed student") or rows.get("student")
    if not teacher or not final:
        return ""
    size = (f", at {final['params'] / teacher['params']:.0%} of the teacher's parameters"
            if final.get("params") and teacher.get("params") else "")
    points = f"<b>{100 * (final['accuracy'] - teacher['accuracy']):+.1f} points</b>"
    # A ratio only where it means something: x / 0 is no multiple, and 0 / 0 is none at all.
    compare = (f"<b>{final['accuracy'] / teacher['accuracy']:.1f}x</b> and {points}" if teacher["accuracy"] > 0
               else points)
    shown = asked_teacher_sentence(results, lambda r: f"<b>{r['accuracy']:.1%}</b>")
    shown_text = " " + shown if shown else ""
    return (f'<p class="headline">The {_e(final["role"])} answers <b>{final["accuracy"]:.1%}</b> of '
            f'{results.get("n", "?")} held-out <code>{_e(results.get("task", ""))}</code> questions correctly, '
            f'against <b>{teacher["accuracy"]:.1%}</b> for the teacher zero-shot: {compare}{size}.{shown_text}</p>')


def _teacher_gain(results: dict[str, Any]) -> str:
    text = teacher_gain_sentence(results)
    return f"<h3>What the teacher adds</h3><p>{_e(text)}</p>" if text else ""


def _by_group(results: dict[str, Any]) -> str:
    """Accuracy per question group (``EvalResult.per_group``), one column per model, when the task
    groups its questions in more than one way."""
    rows = [r for r in results.get("rows", []) if r.get("per_group")]
    groups = sorted({g for r in rows for g in r["per_group"]})
    if len(groups) < 2:
        return ""
    body = []
    for g in groups:
        cells = []
        for r in rows:
            v = r["per_group"].get(g)
            cells.append("–" if v is None else
                         f"{v['accuracy']:.1%} of {v['n']} [{v['ci_low']:.1%}, {v['ci_high']:.1%}]")
        body.append([_e(g), *cells])
    return ("<h3>Accuracy by question group</h3>"
            + _table(["question group", *(r["role"] for r in rows)], body)
            + "<p class='muted'>Each cell: accuracy, the number of questions of that group the model answered "
              "(a model evaluated on a sample has fewer), and the 95% Wilson interval.</p>")


def _leakage(results: dict[str, Any]) -> str:
    """Whether any eval question appears in the training data (``stratos.evaluate.leakage``)."""
    leak = results.get("leakage")
    if not leak:
        return ""
    if leak["found"]:
        return (f"<p class='headline bad'><b>{leak['found']} of the {leak['eval_questions']} eval questions appear in "
                f"the training data</b> (e.g. {_e(', '.join(leak['found_ids']))}): the accuracy above overstates what "
                f"the student does on questions it has not seen. Checked: {_e(leak['how'])}.</p>")
    return (f"<p>No eval question appears in the training data: {leak['eval_questions']:,} questions checked against "
            f"{leak['training_records']:,} training records ({_e(leak['how'])}).</p>")


def _examples(eval_dir: Path, k: int = 4) -> str:
    parts = []
    for path in sorted(eval_dir.glob("predictions-*.jsonl")):
        rows = _read_jsonl(path, limit=2000)
        if not rows:
            continue
        right = [r for r in rows if r.get("correct")][:k]
        wrong = [r for r in rows if not r.get("correct")][:k]
        table = _table(
            ["", "question", "output", "parsed", "reference answer"],
            [["✓" if r.get("correct") else "✗", f"<pre>{_e(r.get('prompt', ''))[:600]}</pre>",
              f"<pre>{_e(r.get('output', ''))[:400]}</pre>", _e(r.get("parsed")), _e(r.get("answer"))]
             for r in right + wrong], cls="examples")
        name = path.stem.removeprefix("predictions-").replace("-", " ")
        parts.append(f"<details><summary>{_e(name)}: {len(right)} right and {len(wrong)} wrong of "
                     f"{len(rows)}</summary>{table}</details>")
    return "".join(parts) or '<p class="muted">no predictions yet</p>'


def _eval_while_training(metrics: list[dict[str, Any]], final: dict[str, Any]) -> str:
    """A sentence on the evaluations while training (distill.eval_steps): the last, the best checkpoint,
    and which step's weights the saved model holds (distill.load_best_model_at_end)."""
    evals = [r for r in metrics if isinstance(r.get("eval_accuracy"), (int, float)) and "step" in r]
    if not evals:
        return ""
    last = evals[-1]
    n = f" on {_e(last['eval_n'])} validation questions (none among the eval stage's)" if last.get("eval_n") else ""
    text = (f"Evaluated {len(evals)} times while training{n}: eval accuracy <b>{last['eval_accuracy']:.3f}</b> "
            f"at the last evaluation (step {_e(last['step'])})")
    best, acc = final.get("best_step"), final.get("best_eval_accuracy")
    if isinstance(best, int) and isinstance(acc, (int, float)):
        text += f"; the best checkpoint is step <b>{best}</b> ({acc:.3f})"
        if final.get("model_step") == best:
            text += (". The saved model holds the weights of that step (<code>load_best_model_at_end</code>), "
                     "not of the last step")
    return f"<p>{text}.</p>"


def _constraints(results: dict[str, Any], predicted: dict[str, Any]) -> str:
    """The verdict on each of the spec's constraints, measured, beside what the plan predicted."""
    verdicts = results.get("verdicts")
    if verdicts is None:
        return ("<h2>Constraints</h2><p class='muted'>not judged yet: the eval stage measures the deployed student "
                "against the spec's constraints</p>")
    if not verdicts:
        return "<h2>Constraints</h2><p class='muted'>the spec sets no constraint</p>"
    from stratos.verdicts import FORMATS

    pred_key = {"min_accuracy": "accuracy", "max_latency_ms": "latency_ms", "budget_usd": "cost_usd"}
    rows = []
    for v in verdicts:
        f = FORMATS[v["constraint"]].format
        state = ("<span class='muted'>not measured</span>" if v["met"] is None else
                 "<b class='ok'>met</b>" if v["met"] else f"<b class='bad'>missed</b>: {_e(v['shortfall'])}")
        pred = predicted.get(pred_key[v["constraint"]])
        # What load the plan's latency is for, in the cell: a plan written before 2026-12-05 predicted one
        # request alone, which is not like for like with the p50 under the eval's load.
        load = f" ({_predicted_load(predicted)})" if v["constraint"] == "max_latency_ms" else ""
        rows.append([f"<code>{_e(v['constraint'])}</code>", _e(f(v["limit"])), state,
                     _e(f(v["measured"])) if v["measured"] is not None else "–",
                     _e(f(pred) + load) if isinstance(pred, (int, float)) else "–", _e(v["how"])])
    n_missed = sum(1 for v in verdicts if v["met"] is False)
    summary = (f"<p class='headline bad'>The deployed student misses {n_missed} of the spec's {len(verdicts)} "
               "constraint(s): <code>stratos run</code> exits 3 on it.</p>" if n_missed else
               f"<p class='headline ok'>The deployed student meets all {len(verdicts)} of the spec's constraints, "
               "measured.</p>")
    note = ("<p class='muted'>Predicted: the plan's prediction for the chosen teacher, student and servers (its "
            "latency is the p50 it predicts for the eval's load test on the serving server).</p>")
    return ("<h2>Constraints</h2>" + summary
            + _table(["constraint", "limit", "verdict", "measured", "predicted by the plan", "how it was measured"],
                     rows) + note)


def _predicted_load(predicted: dict[str, Any]) -> str:
    """The load the plan predicted latency for (``costmodel.LoadTest``), in words."""
    from stratos.plan.costmodel import LoadTest

    load = predicted.get("latency_load")
    return f"p50 of {LoadTest(**load).label()}" if load else "one request at a time"


def _attempts(manifest: dict[str, Any]) -> str:
    """Each attempt at meeting the constraints (``stratos.attempts``): what it tried, what it measured."""
    attempts = manifest.get("attempts") or []
    if not attempts or (len(attempts) == 1 and not attempts[0].get("next")):
        return ""
    rows = []
    for a in attempts:
        r = a.get("result") or {}
        lat = r.get("latency_ms") or {}
        where = (f"<a href='{_e(a['dir'])}'>{_e(a['dir'])}/</a>" if a.get("dir") else "this run's stage folders")
        rows.append([str(a["number"]), f"<b>{_e(a['action'])}</b>: {_e(a['why'])}",
                     f"{r['accuracy']:.1%} (n={r.get('n')})" if isinstance(r.get("accuracy"), (int, float)) else "–",
                     f"{lat['p50']:,.0f} / {lat['p95']:,.0f}" if lat.get("p50") is not None else "–",
                     "<br>".join(_e(v) for v in r.get("verdicts", [])) or "–", where])
    last = attempts[-1].get("next", "")
    deployed = (f"The deployed student is attempt {attempts[-1]['number']}'s; the earlier attempts' models stay in "
                "their folders." if len(attempts) > 1 else "")
    return ("<h3>Attempts</h3>" + _table(["attempt", "what it tried", "accuracy (deployed)", "latency p50 / p95 (ms)",
                                          "verdicts", "files"], rows)
            + f"<p>{_e(deployed)} {_e(last[:1].upper() + last[1:]) + '.' if last.startswith('no retry') else ''}</p>")


def _measured(results: dict[str, Any], what: str) -> str:
    """The deployed student's measured accuracy or p50 latency, to set beside the plan's prediction."""
    final = next((r for r in results.get("rows", []) if r.get("role") == "deployed student"), None)
    if final is None:
        return ""
    if what == "accuracy":
        return f" (deployed student measured: {final['accuracy']:.3f})"
    p50 = (final.get("latency_ms") or {}).get("p50")
    clients = (results.get("bench") or {}).get("clients", "?")
    return f" (measured p50: {p50:,.0f} at {_e(clients)} concurrent clients)" if p50 is not None else ""


def _data_tables(stats: dict[str, Any], path: Path, run_dir: Path) -> str:
    """The synth stage's statistics for people: where the rows came from, per question type, and spending."""
    rows = stats.get("rows") or {}
    usage = stats.get("usage") or {}
    facts = _table(["", ""], [
        ["teacher", _e(stats.get("teacher"))],
        ["teacher prompts x samples", f"{_fmt(stats.get('prompts'))} x {_fmt(stats.get('samples_per_prompt'))}"],
        ["teacher answers kept by the verifier" if stats.get("verified", True) else
         "teacher answers the verifier accepts (every answer kept: synth.verify false)",
         f"{stats['acceptance']:.1%}" if isinstance(stats.get("acceptance"), (int, float)) else "–"],
        ["what the teacher saw beyond the student's prompt", _e(teacher_context(stats) or "nothing")],
        ["rows", ", ".join(f"{_e(k)} {_fmt(v)}" for k, v in rows.items()) or "–"],
        ["duplicates dropped", _fmt(stats.get("duplicates_dropped"))],
        ["API spend ($)", _fmt(usage.get("cost_usd"), 4) + (" (stopped by the budget)" if usage.get("budget_stopped")
                                                           else "")],
    ])
    by_type = stats.get("by_type") or {}
    types = _table(["question type", "prompts", "samples", "solved", "acceptance"],
                   [[_e(t), _fmt(d.get("prompts")), _fmt(d.get("samples")), _fmt(d.get("solved")),
                     f"{d['acceptance']:.1%}" if isinstance(d.get("acceptance"), (int, float)) else "–"]
                    for t, d in by_type.items()]) if by_type else ""
    link = _rel(path, run_dir)
    return facts + types + f"<p class='muted'>All figures: <a href='{_e(link)}'>{_e(link)}</a>.</p>"


def _rel(path: Path, run_dir: Path) -> Path:
    """A run's file as the report links it: relative to the run directory when inside it."""
    try:
        return Path(path).relative_to(run_dir)
    except ValueError:
        return Path(path)


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:14px}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f5f5f5}.muted{color:#888}.headline{font-size:17px;background:#eef6ff;padding:.8em;border-radius:6px}
pre{white-space:pre-wrap;margin:0;font-size:12.5px;max-width:520px}img{max-width:100%}
.ok{color:#1a7f37}.bad{color:#cf222e}code{background:#f3f3f3;padding:0 .2em}
.headline.bad{background:#fff0f0}.headline.ok{background:#eefbf0}
"""


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` for a run directory (or ``out``) and return its path."""
    run_dir = Path(run_dir)
    manifest = _read_json(run_dir / "manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"{run_dir}: no manifest.json; is this a `stratos run` directory?")
    stages = manifest.get("stages", {})
    sections: list[str] = []

    # --- the constraints first: did the deployed student meet what the spec asked, measured?
    results = _read_json(run_dir / "eval" / "results.json") or {}
    plan = _read_json(run_dir / "plan" / "plan.json")
    sections.append(_constraints(results, (plan or {}).get("predicted", {})) + _attempts(manifest))

    # --- results: what a reader came for
    if results:
        headers, rows = results_table(results)
        bench = results.get("bench") or {}
        note = (f"<p class='muted'>Accuracy on the same {results.get('n')} held-out questions for every model. "
                f"tokens/s: batched greedy generation on this machine ({_e(stages.get('eval', {}).get('device', '?'))}); "
                f"the deployed student's latency (p50) and "
                f"tokens/s come from a load test of its HTTP endpoint ({_e(bench.get('clients', '?'))} concurrent "
                f"clients, {_e(bench.get('requests', '?'))} requests, "
                f"{(bench.get('output_tokens') or 0) / max(1, bench.get('ok') or 1):.0f} tokens each on average); "
                "a model asked through an API shows its mean request time; one that generated in batches here has "
                "no latency. "
                + (f"$ / M tokens: the chosen serving server ({_e(results.get('serving_server'))}, "
                   f"${_fmt(results.get('serving_usd_per_hour'), 2)}/h) at the throughput measured here.</p>"
                   if results.get("serving_local", True) else
                   f"$ / M tokens: none, since the plan serves on {_e(results.get('serving_server'))}, not on this "
                   "machine, and these throughputs were measured here.</p>"))
        sections.append("<h2>Results</h2>" + _headline(results) + _leakage(results) + _table(headers, rows) + note
                        + _teacher_gain(results) + _img(plots.accuracy_bars(results.get("rows", [])), "accuracy")
                        + _by_group(results))
    else:
        sections.append("<h2>Results</h2><p class='muted'>the eval stage has not run yet</p>")

    # --- the plan
    if plan:
        png = run_dir / "plan" / "plan.png"
        reasons = "".join(f"<li>{_e(r)}</li>" for r in plan.get("reasons", []))
        pred = plan.get("predicted", {})
        facts = _table(["", ""], [
            ["teacher", _e(plan["teacher"].get("name"))], ["student", _e(plan["student"].get("name"))],
            ["strategy", _e(plan["strategy"].get("kind"))], ["match", _e(plan["match"].get("mode"))],
            ["training", _e(" -> ".join(p["algorithm"] + " (loss " + p["config"]["loss"] + ")"
                                        for p in plan.get("settings", {}).get("phases", [])))],
            ["training server", _e(plan["training_server"].get("name"))],
            ["serving server", _e(plan["serving_server"].get("name"))],
            ["predicted accuracy", _fmt(pred.get("accuracy")) + _measured(results, "accuracy")],
            ["predicted cost ($)", _fmt(pred.get("cost_usd"), 2)],
            [f"predicted latency (ms) on {_e(plan['serving_server'].get('name'))}, {_e(_predicted_load(pred))}",
             _fmt(pred.get("latency_ms"), 0) + _measured(results, "latency")],
            ["candidates (total / feasible / on the front)",
             " / ".join(str(plan.get("counts", {}).get(k, "?")) for k in ("total", "feasible", "front"))],
        ])
        # The Pareto plot only when it has a choice to show: one feasible candidate is a point on axes.
        several = (plan.get("counts", {}).get("feasible") or 0) > 1
        sections.append("<h2>Plan</h2>" + facts + f"<h3>Why</h3><ul>{reasons}</ul>"
                        + (_img(plots.png_uri(png.read_bytes()), "Pareto front") if png.is_file() and several else ""))

    # --- data
    stats_path = _artifact(manifest, run_dir, "synth", "stats_path") or run_dir / "synth" / "stats.json"
    stats = _read_json(stats_path)
    if stats:
        sections.append("<h2>Training data</h2>" + _data_tables(stats, stats_path, run_dir))

    # --- training
    metrics_path = _artifact(manifest, run_dir, "distill", "metrics_path") or run_dir / "distill" / "metrics.jsonl"
    metrics = _read_jsonl(metrics_path)
    if metrics:
        d = stages.get("distill", {}).get("artifacts", {})
        final = (_read_json(metrics_path.parent / "result.json") or {}).get("final_metrics") or {}
        sections.append("<h2>Training</h2>"
                        f"<p>{_fmt(d.get('steps'))} steps, loss <code>{_e(d.get('loss'))}</code>, teacher signal "
                        f"<code>{_e(d.get('signal'))}</code>, {_fmt(d.get('tokens_per_second'), 0)} tokens/s.</p>"
                        + _eval_while_training(metrics, final)
                        + _img(plots.training_curves(metrics, final.get("best_step")), "training curves"))

    # --- compression (the steps' sizes and speeds; every figure in compress_report.json)
    comp_path = _artifact(manifest, run_dir, "compress", "report_path") or run_dir / "compress" / "compress_report.json"
    comp = _read_json(comp_path)
    if isinstance(comp, dict) and comp.get("rows"):
        cols = [("step", "step"), ("params", "params"), ("size (MB)", "size_mb"),
                ("tokens/s at batch 1", "tokens_per_s"), ("accuracy", "accuracy")]
        chosen = comp.get("chosen")
        sections.append("<h2>Compression</h2>"
                        + _table([h for h, _ in cols], [[_fmt(r.get(k)) for _, k in cols] for r in comp["rows"]])
                        + (f"<p>Deployed: {_e(chosen['why'])}.</p>" if chosen else "")
                        + f"<p class='muted'>All figures: <a href='{_e(_rel(comp_path, run_dir))}'>"
                        f"{_e(_rel(comp_path, run_dir))}</a>.</p>")

    # --- stage costs
    stage_rows, cost_pts = [], []
    for name, rec in stages.items():
        pred, meas = rec.get("predicted_seconds"), rec.get("seconds")
        ratio = f"{meas / pred:.2f}" if pred and meas else "–"
        status = rec.get("status", "?")
        cls = "ok" if status == "done" else "bad"
        stage_rows.append([_e(name), f'<span class="{cls}">{_e(status)}</span>', _e(rec.get("device", "?")),
                           _fmt(pred, 1), _fmt(meas, 1), ratio, _e(rec.get("started", "")),
                           _e(rec.get("error", ""))[:300]])
        cost_pts.append((name, pred, meas))
    sections.append("<h2>Stages: predicted vs measured</h2>"
                    "<p class='muted'>A stage's prediction is shown only when it ran on the device the plan priced "
                    "(its training server, this machine).</p>"
                    + _table(["stage", "status", "device", "predicted (s)", "measured (s)", "measured / predicted",
                              "started", "error"], stage_rows) + _img(plots.stage_costs(cost_pts), "stage costs"))

    sections.append("<h2>Example predictions</h2>" + _examples(run_dir / "eval"))
    spec_text = (run_dir / "spec.yaml").read_text() if (run_dir / "spec.yaml").is_file() else yaml.safe_dump(
        manifest.get("spec", {}), sort_keys=False)  # the spec as the user writes one, not a JSON dump
    sections.append(f"<h2>Spec</h2><pre>{_e(spec_text)}</pre>")

    title = f"Stratos run: {manifest.get('name', run_dir.name)}"
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"
            f"<p class='muted'>{_e(run_dir)} · updated {_e(manifest.get('updated', ''))}</p>"
            + "".join(sections) + "</body></html>\n")
    path = Path(out) if out else run_dir / "report.html"
    atomic_write_text(path, page)
    return path

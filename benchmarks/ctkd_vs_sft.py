"""Cross-tokenizer KD against SFT on the same data and steps, with a teacher that knows the task.

The task is "What is N + 1?" for N in 10..999 (SmolLM2-135M-Instruct, de-quantised from its Q4_1
GGUF, answers it correctly about 60% of the time zero-shot; this script measures it on the eval
questions), or with ``--task title`` a word written with a capital first letter (``questions``). The
student is a small Llama trained from scratch with its own byte-level BPE tokenizer (not the teacher's
49,152-token one), or with ``--student`` a pretrained model of another tokenizer, on the same records
(the oracle's answers, or with ``--responses teacher`` the teacher's own greedy answers, right or wrong, or
with ``--responses sampled`` its samples) and the same steps:

- sft:  cross-entropy on the records;
- ctkd: kd_ratio x cross-tokenizer KD to the teacher (hybrid: its distribution mapped into the
        student's vocabulary where tokens are byte-identical, ULD on the rest) + the rest CE.

Each is trained with several seeds and scored greedily on the held-out questions; the table gives
each seed's accuracy, the means, the pooled standard error of the difference and the teacher's
exactly-mapped probability share (what the planner measures).

    python benchmarks/ctkd_vs_sft.py --steps 560            # 3 seeds: one of the runs docs/benchmarks.md records
    python benchmarks/ctkd_vs_sft.py --seeds 1 --steps 500  # another (the others: --steps 650, --kd-ratio)
    python benchmarks/ctkd_vs_sft.py --steps 500 --responses teacher   # the teacher's own answers as the data
    python benchmarks/ctkd_vs_sft.py --steps 500 --methods ctkd --max-chain 4    # chains of up to four
    python benchmarks/ctkd_vs_sft.py --steps 500 --tune-teacher 40   # a teacher fine-tuned on the train answers first
    # the teacher sampled with 4 worked examples in view, every distinct sample kept unchecked (the alignment
    # example's data), KD at the plan's kd_ratio for such data; a pretrained student of another tokenizer:
    python benchmarks/ctkd_vs_sft.py --responses sampled --kd-ratio 0.9 --student gemma3-270m --steps 40 \
        --lr 5e-5 --bf16 --seeds 1
    # the other way round, on words (--task title), where Gemma's larger vocabulary keeps whole what
    # SmolLM2's splits, so that part of the teacher's probability maps to no student token (ULD's part):
    python benchmarks/ctkd_vs_sft.py --task title --teacher gemma3-270m --student smollm2-135m-instruct \
        --responses sampled --kd-ratio 0.9 --train-size 200 --steps 150 --lr 5e-5 --bf16
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import torch

from stratos.distill import distill
from stratos.distill import crosstok
from stratos.distill.crosstok import measure_mapping
from stratos.models import load
from stratos.models.generate import generate
from stratos.models.tiny import build_tokenizer, tiny_llama
from stratos.spec import DistillSpec
from stratos.tasks.base import answer_span

INT = re.compile(r"-?\d+")


def questions(seed: int = 0, task: str = "add1") -> tuple[list[dict], list[dict], list[dict]]:
    """The task's records, shuffled by ``seed``: 600 to train on, 250 held out, the rest for worked examples.

    - ``add1``: "What is N + 1?" for N in 10..999, answered "Answer: N+1";
    - ``title``: "Write the word 'w' with a capital first letter.", answered "W" (the word capitalised): the
      words are every run of 5 to 9 lowercase ASCII letters that SmolLM2's vocabulary holds as one token after
      a space (13,796: mostly English words, some fragments such as 'tantal'); capitalised and at the start of
      the answer, a larger vocabulary keeps more of them whole."""
    if task == "title":
        from stratos.models import load_tokenizer

        vocab = load_tokenizer("smollm2-135m-instruct").get_vocab()
        words = sorted({w[1:] for w in vocab if w[:1] == "\u0120" and w[1:].isalpha() and w[1:].isascii()
                        and w[1:].islower() and 5 <= len(w) - 1 <= 9})
        random.Random(seed).shuffle(words)
        recs = [{"prompt": f"Write the word '{w}' with a capital first letter.", "response": w.capitalize(),
                 "answer": w.capitalize()} for w in words]
    else:
        ns = list(range(10, 1000))
        random.Random(seed).shuffle(ns)
        recs = [{"prompt": f"What is {n} + 1? Reply with 'Answer: <number>'.", "response": f"Answer: {n + 1}",
                 "answer": n + 1} for n in ns]
    return recs[:600], recs[600:850], recs[850:]


def parse(text: str) -> int | None:
    span = answer_span(text)
    nums = INT.findall(span)
    if not nums:
        return None
    return int(nums[0] if span is not text else nums[-1])


def correct(text: str, rec: dict) -> bool:
    """Whether a model's text answers ``rec``: the number (``add1``) or the text's first line, exactly."""
    if isinstance(rec["answer"], str):
        return text.strip().split("\n")[0].strip() == rec["answer"]
    return parse(text) == rec["answer"]


def accuracy(model, tok, recs, max_new_tokens: int) -> float:
    outs = generate(model, tok, [[{"role": "user", "content": r["prompt"]}] for r in recs],
                    max_new_tokens=max_new_tokens, batch_size=32)
    return sum(correct(o[0].text, r) for o, r in zip(outs, recs)) / len(recs)


def mean_se(xs: list[float], n: int) -> tuple[float, float]:
    """The mean of per-seed accuracies, each over ``n`` questions, and its standard error: the larger of
    the binomial one (each accuracy's variance, averaged over seeds) and the one between seeds."""
    m = sum(xs) / len(xs)
    within = sum(x * (1 - x) / n for x in xs) / len(xs) ** 2
    between = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else 0.0
    return m, math.sqrt(max(within, between))


def compare(accuracies: dict[str, list[float]], n: int, first_seed: int = 0) -> str:
    """Print a markdown table of per-seed accuracies, mean and SE, one row per method (the first is
    the baseline); return the last method's gain over the first with the pooled SE of that difference,
    in words."""
    base_accs, last_accs = list(accuracies.values())[0], list(accuracies.values())[-1]
    seeds = len(base_accs)
    print()
    print(f"| method | {' | '.join(f'seed {s}' for s in range(first_seed, first_seed + seeds))} | mean | SE |")
    print(f"|---|{'---|' * seeds}---|---|")
    for name, accs in accuracies.items():
        m, se = mean_se(accs, n)
        print(f"| {name} | {' | '.join(f'{a:.1%}' for a in accs)} | {m:.1%} | {se:.1%} |")
    return gain_words(base_accs, last_accs, n)


def gain_words(base_accs: list[float], accs: list[float], n: int) -> str:
    """The mean gain of ``accs`` over ``base_accs`` with the pooled SE of that difference, in words."""
    (m0, se0), (m1, se1) = mean_se(base_accs, n), mean_se(accs, n)
    gain, pooled = m1 - m0, math.sqrt(se0**2 + se1**2)
    in_se = f"{gain / pooled:.1f} SE" if pooled else "no spread to measure it against"
    return f"gain {100 * gain:+.1f} points; pooled SE of the difference {100 * pooled:.1f} points ({in_se})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="add1", choices=["add1", "title"],
                    help="add1: 'What is N + 1?'; title: a word written with a capital first letter (questions())")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--steps", type=int, default=560)
    ap.add_argument("--kd-ratio", type=float, default=0.2)
    ap.add_argument("--method", default="hybrid", choices=["hybrid", "uld", "shared"])
    ap.add_argument("--map", default="exact", choices=["exact", "first_token"], help="ctkd.map")
    ap.add_argument("--methods", nargs="+", default=["sft", "ctkd"], choices=["sft", "ctkd"])
    ap.add_argument("--max-chain", type=int, default=None,
                    help="the longest chain of teacher tokens whose mass reaches one student token; span starts "
                         "whose student token the teacher spells with more train on CE (default: the engine's "
                         "ctkd.max_chain, 2). The docs' runs without the rule (chains of two, no CE beyond) were "
                         "made at commit ab87ba2 with --max-chain 99")
    ap.add_argument("--student", default=None, metavar="MODEL",
                    help="a pretrained student with its own tokenizer (an alias, e.g. gemma3-270m, or a path) in "
                         "place of the from-scratch Llama; --hidden, --layers do not apply")
    ap.add_argument("--student-layers", type=int, default=None, metavar="N",
                    help="with --student: keep N evenly spaced pretrained layers of it (config_overrides "
                         "num_hidden_layers, as a spec shrinks a student)")
    ap.add_argument("--bf16", action="store_true", help="train the student under bf16 autocast (default fp32)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--responses", default="oracle", choices=["oracle", "teacher", "sampled"],
                    help="the records' responses: the oracle's answers; the teacher's own greedy answers "
                         "(right or wrong); or 'sampled': the teacher asked with --shots worked examples before "
                         "each question, --samples samples per question at temperature 0.8 (top_p 0.95, synth's "
                         "defaults), every distinct one kept unchecked, and KD reading the teacher with the "
                         "examples in view (the alignment example's data: synth.verify false, synth.few_shot)")
    ap.add_argument("--shots", type=int, default=4, help="with --responses sampled: worked examples shown the "
                    "teacher (the oracle's answers to questions neither trained on nor held out)")
    ap.add_argument("--samples", type=int, default=2, help="with --responses sampled: samples per question")
    ap.add_argument("--tune-teacher", type=int, default=0, metavar="STEPS",
                    help="first fine-tune the teacher by SFT on the 600 train questions' oracle answers for STEPS steps "
                         "of 16 (lr 5e-5; saved under OUT/teacher-tuned and reused from there)")
    ap.add_argument("--train-size", type=int, default=600,
                    help="train on the first N of the 600 train questions (the same 250 held out)")
    ap.add_argument("--out", type=Path, default=Path("runs/ctkd_vs_sft"))
    ap.add_argument("--pool", type=Path, nargs="+", metavar="OUT",
                    help="train nothing: pool the seeds of earlier runs' OUT/results.json into one table")
    args = ap.parse_args()
    if args.pool:
        return pool(args.pool)

    if args.student_layers and not args.student:
        raise SystemExit("--student-layers: give --student too (it cuts a pretrained student)")
    max_chain = args.max_chain if args.max_chain is not None else crosstok.MAX_CHAIN
    train, held_out, _ = questions(task=args.task)
    if not 0 < args.train_size <= len(train):
        raise SystemExit(f"--train-size {args.train_size}: give 1 to {len(train)}")
    train = train[:args.train_size]
    teacher, t_tok = load(args.teacher)
    about = {"smollm2-135m-instruct": " (de-quantised Q4_1)", "gemma3-270m": " (base, de-quantised Q4_K_M)"}.get(
        args.teacher, "")
    if args.tune_teacher:
        teacher = tuned_teacher(teacher, t_tok, questions(task=args.task)[0], args.tune_teacher,
                                args.out / "teacher-tuned")
        about += f", fine-tuned {args.tune_teacher} steps on the train questions' oracle answers"
    t0 = time.perf_counter()
    teacher_acc = accuracy(teacher, t_tok, held_out, max_new_tokens=16)
    print(f"teacher {args.teacher}{about}: {teacher_acc:.1%} of {len(held_out)} held-out questions "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.responses == "teacher":
        outs = generate(teacher, t_tok, [[{"role": "user", "content": r["prompt"]}] for r in train],
                        max_new_tokens=16, batch_size=32)
        train = [{**r, "response": o[0].text.strip()} for r, o in zip(train, outs)]
        right = sum(correct(r["response"], r) for r in train) / len(train)
        print(f"responses: the teacher's greedy answers, {right:.1%} of the {len(train)} right "
              f"(e.g. {train[0]['response']!r})", flush=True)
    elif args.responses == "sampled":
        saved = f"sampled-{args.task}-{args.teacher}-{len(train)}q-{args.shots}shots-{args.samples}x.jsonl"
        train = sampled(teacher, t_tok, train, held_out, questions(task=args.task)[2][:args.shots], args.samples,
                        args.out / saved)
    if args.student:
        from stratos.models import load_tokenizer

        tok = load_tokenizer(args.student)
    else:
        tok = build_tokenizer([r["prompt"] + " " + r["response"] for r in train], vocab_size=320)
    mapping = measure_mapping(teacher, tok, t_tok, train[:64], max_length=64, mapping=args.map, max_chain=max_chain)
    print(f"student tokenizer: {len(tok)} tokens; teacher's: {len(t_tok)}; {mapping['vocab_overlap']:.1%} of the "
          f"teacher's vocabulary maps byte for byte; {mapping['mapped_mass']:.1%} of its probability at the "
          f"{mapping['positions']} aligned positions of 64 train answers falls on mapped tokens, "
          f"{mapping['target_mass']:.1%} on the answers' own tokens (its top choice at {mapping['target_top']:.1%} "
          f"of them)", flush=True)

    results: dict[str, list[float]] = {m: [] for m in args.methods}
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for method in args.methods:
            torch.manual_seed(seed)
            if args.student:
                layers = {"num_hidden_layers": args.student_layers} if args.student_layers else None
                student = load(args.student, with_tokenizer=False, config_overrides=layers)
            else:
                student = tiny_llama(tok, hidden_size=args.hidden, num_hidden_layers=args.layers, seed=seed,
                                     num_attention_heads=4, num_key_value_heads=4)
            cfg = DistillSpec(algorithm="sft" if method == "sft" else "kd", loss="fkl", kd_ratio=args.kd_ratio,
                              ctkd={"method": args.method, "map": args.map, "max_chain": max_chain},
                              max_steps=args.steps, per_device_train_batch_size=16,
                              learning_rate=args.lr, warmup_ratio=0.05, max_length=64, seed=seed, report_to=[],
                              logging_steps=50, bf16=args.bf16)
            t = time.perf_counter()
            res = distill(student, tok, train, cfg, args.out / f"{method}-seed{seed}", teacher=teacher,
                          teacher_tokenizer=t_tok, cache_root=args.out / "teacher-cache", resume=False,
                          progress=False)
            acc = accuracy(student, tok, held_out, max_new_tokens=8)
            results[method].append(acc)
            rows.append({"seed": seed, "method": method, "accuracy": acc, "train_s": res.seconds,
                         "signal": res.signal.get("ctkd")})
            print(f"seed {seed} {method:5s}: {acc:.1%} ({time.perf_counter() - t:.0f} s)", flush=True)
            save(args, teacher_acc, mapping, rows, max_chain, len(held_out))  # after every run: a crash loses no seed

    names = {"sft": "SFT", "ctkd": f"cross-tokenizer KD ({args.method}, map {args.map}, kd_ratio {args.kd_ratio:g}, "
                                    f"max chain {max_chain})"}
    gain = compare({names[m]: results[m] for m in args.methods}, len(held_out), args.first_seed)
    if len(args.methods) < 2:
        gain = "one method, no gain"
    print(f"\n{gain}; teacher {teacher_acc:.1%}; responses: {args.responses}'s; "
          f"mapped share {mapping['mapped_mass']:.1%}; {len(train)} train and {len(held_out)} held-out questions, "
          f"{args.steps} steps of 16 examples")


def save(args, teacher_acc: float, mapping: dict, rows: list[dict], max_chain: int, held_out: int) -> None:
    """``OUT/results.json``: the runs so far (``--pool`` reads it)."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"teacher_accuracy": teacher_acc, "mapping": mapping,
                                                       "rows": rows, "max_chain": max_chain, "held_out": held_out,
                                                       "args": {k: str(v) for k, v in vars(args).items()}},
                                                      indent=2))


def sampled(teacher, t_tok, train: list[dict], held_out: list[dict], shots: list[dict], samples: int,
            saved: Path) -> list[dict]:
    """``train``'s questions answered by the teacher with the records ``shots`` as worked examples before each
    (the oracle's answers to questions after the held-out ones: neither trained on nor scored), ``samples`` per question at
    temperature 0.8, top_p 0.95; every distinct answer kept, right or wrong, each record carrying the chat the
    teacher answered (``teacher_messages``: KD reads the teacher with the examples in view). Prints the teacher's
    greedy accuracy on ``held_out`` with the examples and the share of samples that are right. Kept in
    ``saved`` (JSON lines; its first line the figures printed) and read back from there by a later run."""
    if saved.is_file():
        head, *rows = saved.read_text().splitlines()
        print(f"{json.loads(head)['words']} (read back from {saved})", flush=True)
        return [json.loads(r) for r in rows]
    context = []
    for r in shots:
        context += [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
    asked = [[*context, {"role": "user", "content": r["prompt"]}] for r in held_out]
    outs = generate(teacher, t_tok, asked, max_new_tokens=16, batch_size=32)
    acc = sum(correct(o[0].text, r) for o, r in zip(outs, held_out)) / len(held_out)
    print(f"teacher with {len(shots)} worked examples: {acc:.1%} of {len(held_out)} held-out questions (greedy)", flush=True)
    msgs = [[*context, {"role": "user", "content": r["prompt"]}] for r in train]
    outs = generate(teacher, t_tok, msgs, max_new_tokens=16, batch_size=32, temperature=0.8, top_p=0.95, n=samples,
                    seed=0)
    out, drawn, right = [], 0, 0
    for r, m, gens in zip(train, msgs, outs):
        seen = set()
        for g in gens:
            drawn += 1
            right += correct(g.text, r)
            text = g.text.strip()
            if text and text not in seen:
                seen.add(text)
                out.append({**r, "response": text, "teacher_messages": m})
    kept_right = sum(correct(r["response"], r) for r in out)
    words = (f"teacher with {len(shots)} worked examples: {acc:.1%} of {len(held_out)} held-out questions (greedy); "
             f"responses: {drawn} teacher samples, {right / drawn:.1%} right; {len(out)} distinct kept unchecked, "
             f"{kept_right / len(out):.1%} of them right (e.g. {out[0]['response']!r})")
    print(words.split("; ", 1)[1], flush=True)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text("\n".join(json.dumps(x) for x in [{"words": words}, *out]) + "\n")
    return out


def tuned_teacher(teacher, tok, records: list[dict], steps: int, out: Path):
    """``teacher`` fine-tuned by SFT on ``records`` for ``steps`` steps of 16 (lr 5e-5, seed 0), or the one an
    earlier run saved in ``out`` with the same steps."""
    from stratos.models import load

    done = out / "steps.txt"
    if done.exists() and done.read_text() == str(steps):
        return load(str(out / "model"))[0]
    cfg = DistillSpec(algorithm="sft", loss="ce", kd_ratio=0.0, max_steps=steps, per_device_train_batch_size=16,
                      learning_rate=5e-5, warmup_ratio=0.1, max_length=64, seed=0, report_to=[], logging_steps=10)
    t0 = time.perf_counter()
    distill(teacher, tok, records, cfg, out, resume=False, progress=False)
    done.write_text(str(steps))
    print(f"teacher fine-tuned: {steps} steps of 16 on {len(records)} records ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    return teacher


def pool(outs: list[Path]) -> None:
    """One table over the seeds of several runs (``--first-seed`` 0, 3, 6, ...): SFT, and CTKD by the
    ``--max-chain`` it ran with; the gain of each CTKD row over SFT, paired by seed, with its pooled SE."""
    by: dict[str, dict[int, float]] = {}
    for out in outs:
        res = json.loads((out / "results.json").read_text())
        n = res["held_out"]
        for row in res["rows"]:
            name = "SFT" if row["method"] == "sft" else f"CTKD, max chain {res['max_chain']}"
            by.setdefault(name, {})[row["seed"]] = row["accuracy"]
    seeds = sorted(by.get("SFT", {}))
    if not seeds or seeds != list(range(seeds[0], seeds[0] + len(seeds))) or \
            any(sorted(accs) != seeds for accs in by.values()):
        raise SystemExit("the runs must cover the same consecutive seeds on every side: "
                         f"{ {k: sorted(v) for k, v in by.items()} }")
    table = {"SFT": [by["SFT"][s] for s in seeds],
             **{k: [v[s] for s in seeds] for k, v in sorted(by.items()) if k != "SFT"}}
    compare(table, n, seeds[0])
    for name, accs in table.items():
        if name != "SFT":
            print(f"{name} against SFT over seeds {seeds[0]}-{seeds[-1]}: {gain_words(table['SFT'], accs, n)}")


if __name__ == "__main__":
    main()

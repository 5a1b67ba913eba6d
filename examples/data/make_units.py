"""Writes units.jsonl, the example "own data" task of examples/my-data.yaml: time-unit questions
with numeric answers, in the JSONL form any user's task takes (prompt, answer, type, id).

    python examples/data/make_units.py          # rewrites examples/data/units.jsonl (seeded, deterministic)
"""

import json
import random
from pathlib import Path


def rows(n: int = 600, seed: int = 0):
    rng = random.Random(seed)
    seen = set()
    while len(seen) < n:
        kind = rng.choice(["h2min", "min2s", "d2h"])
        if kind == "h2min":
            h, m = rng.randint(1, 9), rng.randint(0, 59)
            q, a = f"How many minutes are in {h} hours and {m} minutes?", h * 60 + m
        elif kind == "min2s":
            m, s = rng.randint(1, 9), rng.randint(0, 59)
            q, a = f"How many seconds are in {m} minutes and {s} seconds?", m * 60 + s
        else:
            d, h = rng.randint(1, 6), rng.randint(0, 23)
            q, a = f"How many hours are in {d} days and {h} hours?", d * 24 + h
        if q in seen:
            continue
        seen.add(q)
        yield {"prompt": q + " Reply with 'Answer: <number>'.", "answer": a, "type": kind, "id": f"units-{len(seen)}"}


if __name__ == "__main__":
    out = Path(__file__).with_name("units.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    print(f"wrote {out}")

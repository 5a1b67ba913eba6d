"""The Mahjong task: every stored answer agrees with a fresh oracle computation, parsers round-trip,
scorers handle the awkward outputs, splits are disjoint and seeded."""

from __future__ import annotations

import re

import pytest
from mahjong.shanten import Shanten

from stratos.tasks import corpus, get_task, grade, to_records
from stratos.tasks.mahjong import (
    canonical_key,
    hand_from_compact,
    hand_value,
    parse_tiles,
    tile_name,
    to_compact,
)

SIZES = {"waits": 1500, "shanten": 600, "complete": 1000, "discard": 250, "score": 300}


@pytest.fixture(scope="module")
def generated():
    return {typ: get_task(f"mahjong:{typ}").examples("train", n, seed=3) for typ, n in SIZES.items()}


def _hand(ex):
    # The hand as the question shows it, so a question that misprints its hand fails too.
    return hand_from_compact(re.search(r"Hand \(\d+ tiles\): (\S+)", ex.question).group(1))


def _shanten(c):
    return Shanten.calculate_shanten(c)


def test_waits_agree_with_a_fresh_oracle(generated):
    for ex in generated["waits"]:
        c = _hand(ex)
        assert sum(c) == 13 and max(c) <= 4
        # Independent check through the shanten calculator rather than the agari check used to build it.
        fresh = []
        for t in range(34):
            if c[t] < 4:
                c[t] += 1
                if _shanten(c) == -1:
                    fresh.append(t)
                c[t] -= 1
        assert ex.answer == to_compact(fresh), ex.question
    classes = {ex.meta["class"] for ex in generated["waits"]}
    assert classes == {1, 2, 3}
    assert any(ex.meta["shape"] == "chiitoitsu" for ex in generated["waits"])


def test_other_types_agree_with_a_fresh_oracle(generated):
    for ex in generated["shanten"]:
        c = _hand(ex)
        assert sum(c) == 13 and ex.answer == _shanten(c)
    assert {ex.answer for ex in generated["shanten"]} == {0, 1, 2, 3}
    for ex in generated["complete"]:
        c = _hand(ex)
        assert sum(c) == 14 and ex.answer == (_shanten(c) == -1)
    assert sum(ex.answer for ex in generated["complete"]) == len(generated["complete"]) // 2
    shapes = {ex.meta["shape"] for ex in generated["complete"] if ex.answer}
    assert shapes == {"regular", "chiitoitsu", "kokushi"}
    for ex in generated["discard"]:
        c = _hand(ex)
        after = {}
        for t in range(34):
            if c[t]:
                c[t] -= 1
                after[t] = _shanten(c)
                c[t] += 1
        best = min(after.values())
        assert ex.answer == to_compact(t for t, s in after.items() if s == best)
    for ex in generated["score"]:
        q = ex.question
        win = parse_tiles(re.search(r"won on (\S+) by", q).group(1))[0]
        winds = ["East", "South", "West", "North"]
        seat = 27 + winds.index(re.search(r"seat wind (\w+)", q).group(1))
        rnd = 27 + winds.index(re.search(r"round wind (\w+)", q).group(1))
        res = hand_value(_hand(ex), win, tsumo="tsumo" in q, riichi="after declaring riichi" in q,
                         seat_wind=seat, round_wind=rnd)
        assert res.error is None and ex.answer == {"han": res.han, "fu": res.fu}


@pytest.mark.parametrize("rationale", [False, True])
def test_format_then_parse_round_trips(generated, rationale):
    for typ, exs in generated.items():
        task = get_task(f"mahjong:{typ}")
        for ex in exs[:150]:
            text = task.target(ex, rationale=rationale)
            answer, score = grade(task, ex, text)
            assert score.correct and score.credit == 1.0, (typ, text)
            if typ != "discard":  # a discard answer is one of the optimal tiles, the stored answer all of them
                assert answer == ex.answer


def test_rationales_come_from_the_oracle(generated):
    task = get_task("mahjong:waits")
    ex = next(e for e in generated["waits"] if e.meta["class"] == 3)
    text = task.target(ex, rationale=True)
    for t in parse_tiles(ex.answer):
        line = next(line for line in text.splitlines() if line.startswith(f"- {tile_name(t)}:"))
        melds = hand_from_compact(line.split(":", 1)[1].split("(")[0])
        c = _hand(ex)
        c[t] += 1
        assert melds == c  # the decomposition shown uses exactly the hand plus the winning tile


def test_discard_split_rationale_reads_the_hand_into_blocks_and_brackets_only_optimal_spares(generated):
    """Every worked discard uses exactly the hand's tiles, its blocks are real melds, pairs and
    partials, and each bracketed (spare) tile is an optimal discard by a fresh oracle computation."""
    task = get_task("mahjong:discard")
    read = 0
    for ex in generated["discard"]:
        c = _hand(ex)
        text = task.target(ex, rationale=True)
        first, answer = text.splitlines()[0], text.splitlines()[-1]
        if first.startswith("Shanten left by each discard"):  # no reading keeps only optimal spares
            continue
        read += 1
        form, body = first.split(": ", 1)
        assert form in ("Split", "Seven pairs", "Thirteen orphans"), first
        groups = body.split()
        assert hand_from_compact(" ".join(g.strip("[]") for g in groups)) == c, (ex.meta["hand"], first)
        spares = [parse_tiles(g) for g in groups if g.startswith("[")]
        after = {}
        for t in {t for g in spares for t in g}:
            c[t] -= 1
            after[t] = _shanten(c)
            c[t] += 1
        low = min(_shanten([n - (i == t) for i, n in enumerate(c)]) for t in range(34) if c[t])
        assert spares and all(s == low for s in after.values()), (ex.meta["hand"], first)
        assert answer == f"Answer: {tile_name(spares[0][0])}"
        for g in groups:
            tiles = parse_tiles(g)
            if g.startswith("[") or form != "Split" or len(tiles) == 1:
                continue
            gaps = [b - a for a, b in zip(tiles, tiles[1:])]
            suited = tiles[0] < 27 and tiles[0] // 9 == tiles[-1] // 9
            assert gaps in ([0], [0, 0], [1], [2]) or (gaps == [1, 1] and suited), g
            assert set(gaps) <= {0} or suited, g
    assert read >= 0.97 * len(generated["discard"])


@pytest.mark.parametrize("hand, expected", [
    # a run read before the spare copy; two partial melds and a pair; the lowest spare is the answer
    ("3455m45667789p33z", "Split: 3m4m5m [5m] 4p5p6p 6p7p8p 7p9p 3z3z\nAnswer: 5m"),
    # seven pairs: the lone tiles are spare
    ("1145577m2266p22s7z", "Seven pairs: 1m1m [4m] 5m5m 7m7m 2p2p 6p6p 2s2s [7z]\nAnswer: 4m"),
    # seven pairs with only seven kinds: the lone 1z is needed, the third 3s is spare
    ("113334488s12233z", "Seven pairs: 1s1s 3s3s [3s] 4s4s 8s8s 1z 2z2z 3z3z\nAnswer: 3s"),
    # thirteen orphans: the simple 7m and the second 9p are spare, the 9m pair is kept
    ("799m199p19s123467z", "Thirteen orphans: [7m] 9m9m 1p 9p [9p] 1s 9s 1z 2z 3z 4z 6z 7z\nAnswer: 7m"),
])
def test_discard_split_rationale_on_hand_made_hands(hand, expected):
    from stratos.tasks.base import Example
    from stratos.tasks.mahjong import best_discards

    task = get_task("mahjong:discard")
    c = hand_from_compact(hand)
    ex = Example("x", f"Hand (14 tiles): {hand}", to_compact(best_discards(c)), "discard", {"hand": hand, "class": 0})
    assert task.target(ex, rationale=True) == expected


def test_discard_rationale_falls_back_to_the_table_where_four_copies_break_the_reading():
    """555m111p2999s3333z: a split would bracket 2s too, but the lone 3z left after discarding it
    cannot wait (all four copies are in the hand), so only 3z is optimal and the table is used."""
    from stratos.tasks.base import Example
    from stratos.tasks.mahjong import best_discards, discard_shanten

    task = get_task("mahjong:discard")
    hand = "555m111p2999s3333z"
    c = hand_from_compact(hand)
    after = {tile_name(t): s for t, s in discard_shanten(c).items()}
    ex = Example("x", f"Hand (14 tiles): {hand}", to_compact(best_discards(c)), "discard",
                 {"hand": hand, "class": 0, "shanten_after": after})
    text = task.target(ex, rationale=True)
    assert text.startswith("Shanten left by each discard") and text.endswith("Answer: 3z")
    table = get_task("mahjong:discard", discard_rationale="table")
    assert table.target(ex, rationale=True) == text


def test_tile_parser_tolerance():
    assert to_compact(parse_tiles("123m456p789s11z")) == "123m456p789s11z"
    assert to_compact(parse_tiles("1m 4m, 5s and East")) == "14m5s"
    assert to_compact(parse_tiles("1 4 m")) == "14m"
    assert to_compact(parse_tiles("0p")) == "5p"  # red five
    assert parse_tiles("8z 9z") == [] and parse_tiles("I'm not sure") == []
    assert to_compact(parse_tiles("1M2P")) == "1m2p"


def test_scorer_edge_cases():
    task = get_task("mahjong:waits")
    ex = next(e for e in task.examples("eval", 30) if e.meta["class"] == 2)
    a, b = parse_tiles(ex.answer)
    assert grade(task, ex, "")[1] == grade(task, ex, "Answer: none")[1]
    assert not grade(task, ex, "")[1].correct and grade(task, ex, "")[1].credit == 0.0
    one = grade(task, ex, f"Answer: {tile_name(a)}")[1]  # recall 1/2, precision 1
    assert not one.correct and one.credit == pytest.approx(2 / 3)
    extra_tile = next(t for t in range(34) if t not in (a, b))
    extra = grade(task, ex, f"Answer: {tile_name(a)} {tile_name(b)} {tile_name(extra_tile)}")[1]
    assert not extra.correct and extra.credit == pytest.approx(0.8)
    repeated = grade(task, ex, f"Answer: {tile_name(a)}{tile_name(a)} {tile_name(b)} {tile_name(b)}")[1]
    assert repeated.correct  # a set: naming a tile twice is the same answer
    reordered = grade(task, ex, f"I think the waits are\nAnswer: {tile_name(b)}, {tile_name(a)}.")[1]
    assert reordered.correct

    disc = get_task("mahjong:discard")
    ex = disc.examples("eval", 5)[0]
    best = parse_tiles(ex.answer)
    assert grade(disc, ex, f"Answer: {tile_name(best[-1])}")[1].correct
    hand = _hand(ex)
    worse = [t for t in range(34) if hand[t] and t not in best]
    assert not grade(disc, ex, f"Answer: {tile_name(worse[0])}")[1].correct
    assert not grade(disc, ex, f"Answer: {tile_name(best[0])} {tile_name(worse[0])}")[1].correct  # one tile only

    sh = get_task("mahjong:shanten")
    ex = next(e for e in sh.examples("eval", 20) if e.answer == 2)
    assert grade(sh, ex, "Answer: 1")[1].credit == 0.5 and not grade(sh, ex, "Answer: 1")[1].correct
    comp = get_task("mahjong:complete")
    ex = next(e for e in comp.examples("eval", 10) if e.answer)
    assert grade(comp, ex, "Yes, it is.")[1].correct and not grade(comp, ex, "Answer: no")[1].correct
    sc = get_task("mahjong:score")
    ex = sc.examples("eval", 3)[0]
    half = grade(sc, ex, f"Answer: {ex.answer['han']} han {ex.answer['fu'] + 10} fu")[1]
    assert not half.correct and half.credit == 0.5


def test_splits_disjoint_and_seeded():
    task = get_task("mahjong")  # the mixed task
    train = task.examples("train", 400, seed=0)
    ev = task.examples("eval", 200, seed=0)
    assert {e.type for e in ev} == {"waits", "shanten", "complete", "discard"}
    other_seed_train = task.examples("train", 400, seed=1)
    train_keys = {e.meta["key"] for e in train + other_seed_train}
    assert not train_keys & {e.meta["key"] for e in ev}
    assert [(e.question, e.answer) for e in ev] == [(e.question, e.answer) for e in task.examples("eval", 200, seed=0)]
    assert [e.question for e in train] != [e.question for e in other_seed_train]
    # The key is symmetric: a hand with its suits swapped is the same hand for the split.
    c = hand_from_compact("123m456p789s1122z3z")
    swapped = hand_from_compact("123s456m789p3344z5z")
    assert canonical_key(c) == canonical_key(swapped)


def test_records_and_corpus():
    task = get_task("mahjong:waits")
    exs = task.examples("train", 20)
    recs = to_records(task, exs, rules=True, rationale=True)
    assert recs[0]["prompt"].startswith("Rules:") and "Answer: " in recs[0]["response"]
    assert recs[0]["answer"] == exs[0].answer and recs[0]["type"] == "waits"
    texts = corpus(task, 10)
    assert all(set(r) == {"text"} for r in texts)
    assert any("thirteen orphans" in r["text"] for r in texts) and sum("Question:" in r["text"] for r in texts) == 10
    eval_keys = {canonical_key(hand_from_compact(e.meta["hand"])) for e in task.examples("eval", 100)}
    assert not eval_keys & {e.meta["key"] for e in task.examples("train", 10)}


def test_options_and_errors():
    one_suit = get_task("mahjong:waits", suits="m", honors=False, min_waits=3, max_waits=5)
    exs = one_suit.examples("train", 30)
    assert all(set(e.meta["hand"]) <= set("123456789m") for e in exs)
    assert all(len(parse_tiles(e.answer)) >= 3 for e in exs)
    assert {e.meta["class"] for e in exs} == {3, 4, 5}
    with pytest.raises(ValueError, match="unknown question type"):
        get_task("mahjong:riichi")
    with pytest.raises(ValueError, match="suits"):
        get_task("mahjong:waits", suits="x")
    with pytest.raises(ValueError, match="mixed task needs the example"):
        get_task("mahjong").parse("Answer: 1m")


def _split_reward():
    """benchmarks/mahjong_split_reward.py, whose checker the GRPO figures in docs/engine.md rest on."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mahjong_split_reward.py"
    spec = importlib.util.spec_from_file_location("mahjong_split_reward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("notation", ["spaced", "compact"])
def test_the_faithful_reading_check_passes_the_oracles_readings_and_fails_broken_ones(notation):
    """Every oracle reading (not the table fallback) is faithful, in either notation of the hand; a
    reading that drops, adds or changes a tile, breaks a block, or answers other than its first spare
    is not; right_and_faithful also needs an optimal answer."""
    reward = _split_reward()
    task = get_task("mahjong:discard", notation=notation)
    checked = 0
    for ex in task.examples("train", 300, seed=5):
        prompt, text = task.prompt(ex), task.target(ex, rationale=True)
        first, answer = text.splitlines()[0], text.splitlines()[-1]
        if first.startswith("Shanten left by each discard"):
            assert not reward.faithful(prompt, text)  # no reading to check
            continue
        checked += 1
        assert reward.faithful(prompt, text), text
        assert reward.right_and_faithful([prompt], [text], [ex.answer]) == [1.0]
        blocks = first.split(": ", 1)[1].split()
        tiles = [t for b in blocks for t in re.findall(r"[1-9][mpsz]", b)]
        broken = [
            text.replace(first, f"{first.split(': ')[0]}: " + " ".join(blocks[1:])),  # a block dropped
            text.replace(first, first + " " + tiles[0]),  # a tile added
            text.replace(answer, "Answer: " + next(t for t in tiles if t not in answer)),  # not the first spare
        ]
        for b in broken:
            assert not reward.faithful(prompt, b), b
            assert reward.right_and_faithful([prompt], [b], [ex.answer]) == [0.0]
    assert checked >= 290
    # A block that is no meld, pair or partial (9s 1p 5z) though every tile is kept, and a wrong answer
    # from a faithful reading.
    hand = "Hand (14 tiles): 1m 2m 3m 4p 5p 6p 7s 8s 9s 1p 9s 5z 2z 2z\n"
    good = "Split: 1m2m3m [1p] 4p5p6p 7s8s9s [9s] [5z] 2z2z\nAnswer: 1p"
    assert reward.faithful(hand, good)
    assert not reward.faithful(hand, "Split: 1m2m3m 1p9s5z 4p5p6p 7s8s9s 2z2z\nAnswer: 1p")
    assert reward.split_faithful([hand], [good]) == [1.0]
    assert reward.right_and_faithful([hand], [good], ["9s"]) == [0.0]

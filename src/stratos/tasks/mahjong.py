"""``mahjong``: Riichi Mahjong hand reasoning, with the PyPI ``mahjong`` package as the exact oracle.

Question types (each its own sub-task, ``mahjong:<type>``; plain ``mahjong`` mixes the first four):

- ``waits``    13-tile ready hand -> the complete set of winning tiles   ``Answer: 25m8s``
- ``shanten``  13-tile hand -> how many tiles from ready (0 = ready)     ``Answer: 2``
- ``complete`` 14-tile hand -> is it a winning hand?                     ``Answer: yes`` / ``Answer: no``
- ``discard``  14-tile hand -> a discard leaving the lowest shanten      ``Answer: 7p``
- ``score``    winning hand + conditions -> han and fu                    ``Answer: 3 han 40 fu``

Data is made by *reverse synthesis*: a complete hand is built first (four melds and a pair,
seven pairs or thirteen orphans, never more than four copies of a tile), the question is derived
from it (take a tile out, swap tiles in), and the full answer is then always recomputed with the
oracle, because the hand the question ends up with can have answers the construction did not
intend (a hand built for one wait often has three). Answer classes are balanced (number of waits,
shanten values, yes/no), and hands are canonicalised (suits permuted, honours sorted) so that the
train and eval splits never share a hand, not even up to symmetry.

Tiles are 34 kinds, index 0-8 = 1m-9m, 9-17 = 1p-9p, 18-26 = 1s-9s, 27-33 = 1z-7z (East, South,
West, North, White, Green, Red). Hands use compact notation: digits then the suit letter.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mahjong.agari import Agari
from mahjong.hand_calculating.divider import HandDivider
from mahjong.hand_calculating.hand import HandCalculator
from mahjong.hand_calculating.hand_config import HandConfig
from mahjong.shanten import Shanten
from mahjong.tile import TilesConverter

from stratos.tasks.base import Example, Score, answer_span, check_split, register_task, split_of

TYPES = ("waits", "shanten", "complete", "discard", "score")
DEFAULT_MIX = ("waits", "shanten", "complete", "discard")
SUITS = "mpsz"
HONOR_NAMES = ["East", "South", "West", "North", "White", "Green", "Red"]
TERMINALS_AND_HONORS = [0, 8, 9, 17, 18, 26, *range(27, 34)]
Counts = list[int]  # 34 tile counts

# --------------------------------------------------------------------------- notation


def tile_name(t: int) -> str:
    return f"{t % 9 + 1}{SUITS[t // 9]}"


def to_compact(tiles: Iterable[int] | Counts, *, counts: bool = False) -> str:
    """Compact notation, suits in m p s z order: ``[0, 1, 2, 27, 27]`` -> ``123m11z``."""
    seq = [t for t, c in enumerate(tiles) for _ in range(c)] if counts else sorted(tiles)
    out = []
    for s, suit in enumerate(SUITS):
        digits = "".join(str(t % 9 + 1) for t in seq if t // 9 == s)
        if digits:
            out.append(digits + suit)
    return "".join(out)


_GROUP_RE = re.compile(r"((?:[0-9][\s,]*)+)([mpsz])(?![a-z])", re.IGNORECASE)


def parse_tiles(text: str) -> list[int]:
    """Tiles in a text: compact (``123m11z``) or written apart (``1m 2m, 3m``); red fives (0) count as 5.

    Digits that cannot be tiles (``8z``, ``9z``) are ignored rather than guessed at.
    """
    tiles = []
    for digits, suit in _GROUP_RE.findall(text):
        s = SUITS.index(suit.lower())
        for d in re.sub(r"[\s,]", "", digits):
            v = 5 if d == "0" else int(d)
            if s == 3 and v > 7:
                continue
            tiles.append(s * 9 + v - 1)
    return tiles


def counts_of(tiles: Iterable[int]) -> Counts:
    c = [0] * 34
    for t in tiles:
        c[t] += 1
    return c


def hand_from_compact(text: str) -> Counts:
    return counts_of(parse_tiles(text))


# --------------------------------------------------------------------------- the oracle


def is_complete(c: Counts) -> bool:
    """Four melds and a pair, seven (distinct) pairs, or thirteen orphans."""
    return sum(c) == 14 and Agari.is_agari(c)


def shanten(c: Counts) -> int:
    """Tiles short of ready (13 tiles: 0 = ready) / of complete (14 tiles: -1 = complete)."""
    return Shanten.calculate_shanten(c)


def waits(c: Counts) -> list[int]:
    """Every tile that completes a 13-tile hand. A tile whose four copies are all in the hand cannot
    be drawn, so it is not a wait (the usual Riichi convention)."""
    out = []
    for t in range(34):
        if c[t] < 4:
            c[t] += 1
            if Agari.is_agari(c):
                out.append(t)
            c[t] -= 1
    return out


def discard_shanten(c: Counts) -> dict[int, int]:
    """Shanten left after discarding each kind of tile in a 14-tile hand."""
    out = {}
    for t in range(34):
        if c[t]:
            c[t] -= 1
            out[t] = shanten(c)
            c[t] += 1
    return out


def best_discards(c: Counts) -> list[int]:
    ds = discard_shanten(c)
    low = min(ds.values())
    return [t for t, s in ds.items() if s == low]


def decompositions(c: Counts) -> list[list[list[int]]]:
    """Every split of a complete hand into melds and a pair (or seven pairs); thirteen orphans gives []."""
    return HandDivider.divide_hand(c)


def hand_value(c: Counts, win_tile: int, *, tsumo: bool, riichi: bool, seat_wind: int, round_wind: int) -> Any:
    """Han, fu and yaku of a closed winning hand (the oracle's HandResponse)."""
    tiles136 = TilesConverter.to_136_array(c)
    win136 = next(i for i in tiles136 if i // 4 == win_tile)
    config = HandConfig(is_tsumo=tsumo, is_riichi=riichi, player_wind=seat_wind, round_wind=round_wind)
    return HandCalculator.estimate_hand_value(tiles136, win136, config=config)


def canonical_key(c: Counts) -> str:
    """The same hand up to symmetries that change no answer of the structure questions: the three
    number suits permuted, and honour kinds relabelled (sorted counts). Used for the split."""
    suits = [tuple(c[9 * s : 9 * s + 9]) for s in range(3)]
    best = min(tuple(itertools.chain.from_iterable(p)) for p in itertools.permutations(suits))
    honors = tuple(sorted(c[27:], reverse=True))
    return "".join(map(str, best + honors))


# --------------------------------------------------------------------------- reverse synthesis


@dataclass
class HandSampler:
    """Builds complete hands at random, within the four-copies limit.

    ``suits``: number suits to draw from ("mps"; "m" gives one-suit hands with many waits);
    ``honors``: whether honour tiles appear; ``shapes``: weights of regular / seven pairs /
    thirteen orphans hands; ``sequence_p``: chance a meld is a run rather than a triplet.
    """

    suits: str = "mps"
    honors: bool = True
    shapes: dict[str, float] = field(default_factory=lambda: {"regular": 0.85, "chiitoitsu": 0.12, "kokushi": 0.03})
    sequence_p: float = 0.65

    def __post_init__(self) -> None:
        if not self.suits or any(s not in "mps" for s in self.suits):
            raise ValueError(f"mahjong: suits must be made of 'm', 'p', 's' (got {self.suits!r})")
        bad = set(self.shapes) - {"regular", "chiitoitsu", "kokushi"}
        if bad or not any(v > 0 for v in self.shapes.values()):
            raise ValueError(f"mahjong: shapes takes weights for regular, chiitoitsu, kokushi (got {self.shapes})")
        self._kinds = [9 * "mps".index(s) + i for s in self.suits for i in range(9)] + (list(range(27, 34)) if self.honors else [])
        self._run_starts = [9 * "mps".index(s) + i for s in self.suits for i in range(7)]
        if not self.honors or set(self.suits) != set("mps"):
            self.shapes = {k: v for k, v in self.shapes.items() if k != "kokushi"} or {"regular": 1.0}

    @property
    def kinds(self) -> list[int]:
        return self._kinds

    def complete_hand(self, rng: random.Random) -> tuple[Counts, str]:
        shape = rng.choices(list(self.shapes), weights=list(self.shapes.values()))[0]
        if shape == "chiitoitsu":
            return counts_of(t for t in rng.sample(self._kinds, 7) for _ in range(2)), shape
        if shape == "kokushi":
            return counts_of(TERMINALS_AND_HONORS + [rng.choice(TERMINALS_AND_HONORS)]), shape
        while True:
            c = [0] * 34
            ok = True
            for _ in range(4):
                if rng.random() < self.sequence_p:
                    s = rng.choice(self._run_starts)
                    meld = [s, s + 1, s + 2]
                else:
                    meld = [rng.choice(self._kinds)] * 3
                for t in meld:
                    c[t] += 1
                if max(c) > 4:
                    ok = False
                    break
            pair = rng.choice(self._kinds)
            c[pair] += 2
            if ok and max(c) <= 4:
                return c, "regular"

    def swap_tiles(self, c: Counts, k: int, rng: random.Random) -> Counts:
        """Replace k tiles of the hand by other kinds (the hand grows no fifth copy)."""
        c = list(c)
        for _ in range(k):
            out = rng.choice([t for t in range(34) if c[t]])
            choices = [t for t in self._kinds if c[t] < 4 and t != out]
            c[out] -= 1
            c[rng.choice(choices)] += 1
        return c


# --------------------------------------------------------------------------- the discard rationale

Item = tuple[str, tuple[int, ...]]  # ("meld" | "pair" | "partial" | "single", tiles)


def _regular_splits(c: Counts) -> Iterable[list[Item]]:
    """Every split of a hand into melds (triplet or run), pairs, two-tile partial melds and single
    tiles, each as its items in reading order: at the lowest tile left, a triplet first, then a run,
    a pair, a partial with the next tile, one with a gap, and the tile alone last. Lazy, so a caller
    that wants the first split of some kind stops early."""
    c = list(c)
    items: list[Item] = []

    def rec(i: int) -> Iterable[list[Item]]:
        while i < 34 and not c[i]:
            i += 1
        if i == 34:
            yield list(items)
            return
        number, r = i < 27, i % 9
        options: list[Item] = []
        if c[i] >= 3:
            options.append(("meld", (i, i, i)))
        if number and r <= 6 and c[i + 1] and c[i + 2]:
            options.append(("meld", (i, i + 1, i + 2)))
        if c[i] >= 2:
            options.append(("pair", (i, i)))
        if number and r <= 7 and c[i + 1]:
            options.append(("partial", (i, i + 1)))
        if number and r <= 6 and c[i + 2]:
            options.append(("partial", (i, i + 2)))
        options.append(("single", (i,)))
        for item in options:
            for t in item[1]:
                c[t] -= 1
            items.append(item)
            yield from rec(i)
            items.pop()
            for t in item[1]:
                c[t] += 1

    yield from rec(0)


def _regular_value(items: list[Item]) -> tuple[int, list[bool]]:
    """The shanten a regular split gives, 8 - 2 x melds - partials - head (melds and partials count
    up to four; the first pair is the head, later pairs are partials), and which items are spare:
    the singles and the partials beyond that cap."""
    melds = sum(kind == "meld" for kind, _ in items)
    room, head, spare = 4 - melds, False, []
    for kind, _ in items:
        useful = kind == "meld"
        if kind == "pair" and not head:
            head = useful = True
        elif kind in ("pair", "partial") and room > 0:
            room, useful = room - 1, True
        spare.append(not useful)
    partials = 4 - melds - room
    return 8 - 2 * melds - partials - head, spare


def _seven_pairs(c: Counts) -> tuple[str, list[Item], int, list[bool]]:
    """Pairs kept; third and fourth copies spare, and lone tiles too unless the hand needs them to
    reach seven different kinds."""
    kinds = sum(1 for n in c if n)
    items: list[Item] = []
    spare: list[bool] = []
    for t in range(34):
        if c[t] >= 2:
            items.append(("pair", (t, t)))
            spare.append(False)
        elif c[t]:
            items.append(("single", (t,)))
            spare.append(kinds > 7)
        items += [("single", (t,))] * max(0, c[t] - 2)
        spare += [True] * max(0, c[t] - 2)
    pairs = sum(k == "pair" for k, _ in items)
    return "Seven pairs", items, 6 - pairs + max(0, 7 - kinds), spare


def _thirteen_orphans(c: Counts) -> tuple[str, list[Item], int, list[bool]]:
    items: list[Item] = []
    spare: list[bool] = []
    pair = next((t for t in TERMINALS_AND_HONORS if c[t] >= 2), None)
    for t in range(34):
        n = c[t]
        if n and t in TERMINALS_AND_HONORS:
            items.append(("pair" if t == pair else "single", (t,) * (2 if t == pair else 1)))
            spare.append(False)
            n -= len(items[-1][1])
        items += [("single", (t,))] * n
        spare += [True] * n
    kinds = sum(1 for t in TERMINALS_AND_HONORS if c[t])
    return "Thirteen orphans", items, 13 - kinds - (pair is not None), spare


def split_rationale(c: Counts, best: Sequence[int]) -> tuple[str, int] | None:
    """A worked discard that a small model can follow: the hand read once in tile order into melds,
    pairs and partial melds, with the spare tiles (those no block needs) in brackets. Discarding a
    spare keeps every block, so it keeps the lowest shanten; the answer is the first spare.

    The split is the first regular one in reading order (``_regular_splits``) that reaches the
    lowest shanten and whose spare tiles are all optimal discards (checked against the oracle's
    ``best``); a hand that only seven pairs or thirteen orphans bring that low is read as such.
    None when no such reading exists (a few hands that need four copies of a tile counted apart)."""
    best_set = set(best)
    c = list(c)
    c[best[0]] -= 1
    low = shanten(c)
    c[best[0]] += 1

    def fits(value: int, items: list[Item], spare: list[bool]) -> bool:
        tiles = [t for item, s in zip(items, spare) if s for t in item[1]]
        return value == low and bool(tiles) and set(tiles) <= best_set

    found = None
    for items in _regular_splits(c):
        value, spare = _regular_value(items)
        if fits(value, items, spare):
            found = ("Split", items, spare)
            break
    if found is None:
        for name, items, value, spare in (_seven_pairs(c), _thirteen_orphans(c)):
            if fits(value, items, spare):
                found = (name, items, spare)
                break
    if found is None:
        return None
    name, items, spare = found
    text = " ".join(f"[{''.join(map(tile_name, tiles))}]" if s else "".join(map(tile_name, tiles))
                    for (_, tiles), s in zip(items, spare))
    return f"{name}: {text}", next(item[1][0] for item, s in zip(items, spare) if s)


# --------------------------------------------------------------------------- the task


RULES = [
    (
        "Riichi Mahjong tiles. There are 34 kinds of tile and four copies of each. Three number suits run "
        "from 1 to 9: characters (man, m), circles (pin, p) and bamboo (sou, s). Seven honour tiles have no "
        "numbers: the winds East, South, West, North and the dragons White, Green, Red. In compact notation "
        "the digits come before their suit letter: 123m is 1, 2, 3 of characters; honours use z, 1z-4z for "
        "East, South, West, North and 5z-7z for White, Green, Red. So 123m456p789s1122z is a 13-tile hand."
    ),
    (
        "Melds and pairs. A meld is three tiles: a run (three consecutive numbers of one suit, such as 345p; "
        "runs do not wrap from 9 to 1, and honours never form runs) or a triplet (three identical tiles, such "
        "as 777s or 555z). A pair is two identical tiles. A hand holds 13 tiles and wins with a 14th."
    ),
    (
        "Complete (winning) hands. Fourteen tiles are complete when they split into four melds and one pair. "
        "Two special hands also win: seven pairs (seven different pairs; four identical tiles are not two "
        "pairs) and thirteen orphans (one of each terminal and honour, 1m 9m 1p 9p 1s 9s and 1z-7z, plus a "
        "second copy of any one of them)."
    ),
    (
        "Waits. A 13-tile hand is ready (tenpai) when some 14th tile would complete it; those tiles are its "
        "waits. A hand can wait on several tiles, and one tile can complete it in several ways: 2345m with "
        "a finished rest waits on 2m and 5m (pair 22m + run 345m, or run 234m + pair 55m). "
        "A tile whose four copies are already in the hand cannot be drawn and is not a wait."
    ),
    (
        "Shanten. The shanten number of a 13-tile hand is how many tiles it must still exchange to become "
        "ready: 0 means ready, 1 means one useful draw (with a discard) from ready, and so on. Count it "
        "from the best split of the hand into melds, partial melds (two tiles one draw from a meld, such as "
        "45m or 46m or 77p) and a pair. Seven pairs and thirteen orphans are counted too; the lowest wins."
    ),
    (
        "Discards. With 14 tiles a player discards one. The best discards are those that leave the lowest "
        "shanten: keep tiles that belong to melds, pairs and partial melds; let go of isolated tiles, "
        "honours first when they are lone, then terminals far from other tiles."
    ),
    (
        "Scoring. A winning hand needs at least one yaku (riichi, all simples, pinfu, a dragon triplet, "
        "seven pairs, ...). Yaku give han; fu come from the hand's shape: 20 base (25 for seven pairs), "
        "+10 for a closed ron, +2 for a self-draw except with pinfu, points for triplets (more for "
        "terminals, honours and concealed ones), for a pair of dragons or of one's own or the round wind, "
        "and for a closed, edge or pair wait; the total rounds up to the next 10."
    ),
]

_FORMATS = {
    "waits": "List every winning tile in compact notation, then end with a line like 'Answer: 25m8s'.",
    "shanten": "Give the shanten number (0 if the hand is ready) and end with a line like 'Answer: 1'.",
    "complete": "Say whether these 14 tiles are a complete hand; end with 'Answer: yes' or 'Answer: no'.",
    "discard": "Name one tile to discard, in compact notation; end with a line like 'Answer: 9p'.",
    "score": "Give the han and fu of the hand; end with a line like 'Answer: 2 han 30 fu'.",
}


def _f1(pred: set[int], true: set[int]) -> float:
    hit = len(pred & true)
    if not hit:
        return 0.0
    p, r = hit / len(pred), hit / len(true)
    return 2 * p * r / (p + r)


def _describe_blocks(blocks: Sequence[Sequence[int]]) -> str:
    return " ".join(to_compact(b) for b in sorted(blocks, key=lambda b: (len(b) == 2, b)))


def _explain_complete(c: Counts) -> str:
    splits = decompositions(c)
    if splits:
        blocks = splits[0]
        kind = "seven pairs" if len(blocks) == 7 else "four melds and a pair"
        return f"{_describe_blocks(blocks)} ({kind})"
    return "thirteen orphans"


@dataclass
class MahjongTask:
    """Mahjong hand questions. Options (spec ``task.options``), all optional:

    ``types`` (list, for the mixed task), ``suits`` ("mps"), ``honors`` (True), ``shapes``
    (weights of regular / chiitoitsu / kokushi complete hands), ``min_waits`` / ``max_waits``
    (waits questions: the number of winning tiles; answers are balanced over min..max, the top
    class meaning "max or more"), ``max_shanten`` (shanten questions, balanced over 0..max),
    ``max_best_discards`` (discard questions: at most this many optimal tiles, so guessing
    scores low), ``balance`` (True), ``eval_fraction`` (share of hands held out, 0.125),
    ``notation`` ("compact": ``123m11z``; "spaced": ``1m 2m 3m 1z 1z``, each tile with its suit,
    which small models read far more easily; answers are compact either way),
    ``discard_rationale`` (the worked answer of a discard question: "split", the hand read into
    blocks with the spare tiles in brackets, see ``split_rationale``; or "table", the shanten each
    discard leaves).
    """

    types: tuple[str, ...] = DEFAULT_MIX
    suits: str = "mps"
    honors: bool = True
    shapes: dict[str, float] | None = None
    min_waits: int = 1
    max_waits: int = 3
    max_shanten: int = 3
    max_best_discards: int = 3
    balance: bool = True
    eval_fraction: float = 0.125
    notation: str = "compact"
    discard_rationale: str = "split"
    name: str = "mahjong"

    def __post_init__(self) -> None:
        self.types = tuple([self.types] if isinstance(self.types, str) else self.types)
        bad = [t for t in self.types if t not in TYPES]
        if not self.types or bad:
            raise ValueError(f"mahjong: unknown question type(s) {bad}; types are {', '.join(TYPES)}")
        if not 1 <= self.min_waits <= self.max_waits <= 13:
            raise ValueError("mahjong: need 1 <= min_waits <= max_waits <= 13")
        if self.notation not in ("compact", "spaced"):
            raise ValueError(f"mahjong: notation must be 'compact' or 'spaced', not {self.notation!r}")
        if self.discard_rationale not in ("split", "table"):
            raise ValueError(f"mahjong: discard_rationale must be 'split' or 'table', not {self.discard_rationale!r}")
        if not 0 <= self.max_shanten <= 6:
            raise ValueError("mahjong: max_shanten must be between 0 and 6")
        kw = {"shapes": dict(self.shapes)} if self.shapes else {}
        self.sampler = HandSampler(suits=self.suits, honors=self.honors, **kw)
        if len(self.types) == 1:
            self.name = f"mahjong:{self.types[0]}"

    # ------------------------------------------------------------------ examples

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        check_split(split)
        share = [n // len(self.types) + (i < n % len(self.types)) for i in range(len(self.types))]
        out: list[Example] = []
        seen: set[str] = set()
        for typ, k in zip(self.types, share):
            rng = random.Random(f"mahjong:{typ}:{split}:{seed}")
            out += self._generate(typ, split, k, rng, seen)
        random.Random(f"mahjong:order:{split}:{seed}").shuffle(out)
        for i, ex in enumerate(out):
            ex.id = f"mahjong-{split}-{seed}-{i}-{ex.type}"
        return out

    def _generate(self, typ: str, split: str, n: int, rng: random.Random, seen: set[str]) -> list[Example]:
        make, classes = getattr(self, f"_make_{typ}"), self._classes(typ)
        quota = {c: math.ceil(n / len(classes)) for c in classes} if self.balance else None
        out: list[Example] = []
        tries, budget = 0, 400 * n + 2000
        while len(out) < n:
            tries += 1
            if tries > budget:
                if quota is None:
                    raise RuntimeError(f"mahjong:{typ}: could not build {n} {split} questions; loosen the options")
                quota = None  # some class is too rare under these options: stop balancing rather than loop
                budget += 400 * n + 2000
            hand = make(rng)
            if hand is None:
                continue
            c, ex = hand
            key = canonical_key(c)
            if key in seen or split_of(key, self.eval_fraction) != split:
                continue
            ex = ex()  # the oracle runs only for hands that belong to this split
            if ex is None:
                continue
            cls = ex.meta["class"]
            if quota is not None:
                if quota.get(cls, 0) <= 0:
                    continue
                quota[cls] -= 1
            seen.add(key)
            ex.meta["hand"] = to_compact(c, counts=True)
            ex.meta["key"] = key
            out.append(ex)
        return out

    def _classes(self, typ: str) -> list[Any]:
        if typ == "waits":
            return list(range(self.min_waits, self.max_waits + 1))
        if typ == "shanten":
            return list(range(0, self.max_shanten + 1))
        if typ == "complete":
            return [True, False]
        if typ == "discard":
            return [0, 1]  # shanten left by the best discard (2+ with few best tiles is rare from these hands)
        return ["ron", "tsumo"]

    # Each _make_* builds a hand (cheap) and returns it with a thunk that runs the oracle and builds
    # the Example, so hands of the other split cost no oracle call.

    def _make_waits(self, rng: random.Random):
        full, shape = self.sampler.complete_hand(rng)
        c = list(full)
        c[rng.choice([t for t in range(34) if c[t]])] -= 1

        def build() -> Example | None:
            ws = waits(c)  # the full answer, not just the tile taken out
            if not ws or len(ws) < self.min_waits:
                return None
            cls = min(len(ws), self.max_waits)
            return Example("", f"Hand (13 tiles): {to_compact(c, counts=True)}\nWhich tiles complete this hand?",
                           to_compact(ws), "waits", {"class": cls, "shape": shape})

        return c, build

    def _make_shanten(self, rng: random.Random):
        full, _ = self.sampler.complete_hand(rng)
        c = list(full)
        c[rng.choice([t for t in range(34) if c[t]])] -= 1
        c = self.sampler.swap_tiles(c, rng.choice([0, 1, 2, 3, 4, 5, 6]), rng)

        def build() -> Example | None:
            s = shanten(c)
            if s > self.max_shanten:
                return None
            return Example("", f"Hand (13 tiles): {to_compact(c, counts=True)}\nWhat is the shanten number of this hand?",
                           s, "shanten", {"class": s})

        return c, build

    def _make_complete(self, rng: random.Random):
        full, shape = self.sampler.complete_hand(rng)
        positive = rng.random() < 0.5
        c = full if positive else self.sampler.swap_tiles(full, rng.choice([1, 1, 1, 2]), rng)

        def build() -> Example:
            ok = is_complete(c)  # a swap can land on another complete hand: the oracle decides
            return Example("", f"Hand (14 tiles): {to_compact(c, counts=True)}\nIs this a complete (winning) hand?",
                           ok, "complete", {"class": ok, "shape": shape})

        return c, build

    def _make_discard(self, rng: random.Random):
        full, _ = self.sampler.complete_hand(rng)
        c = self.sampler.swap_tiles(full, rng.choice([1, 1, 2, 2, 3, 4]), rng)

        def build() -> Example | None:
            if is_complete(c):
                return None
            ds = discard_shanten(c)
            low = min(ds.values())
            best = [t for t, s in ds.items() if s == low]
            if low > 1 or len(best) > self.max_best_discards:
                return None
            return Example("", f"Hand (14 tiles): {to_compact(c, counts=True)}\nWhich tile should be discarded to "
                           "leave the lowest shanten?", to_compact(best), "discard",
                           {"class": low, "shanten_after": {tile_name(t): s for t, s in ds.items()}})

        return c, build

    def _make_score(self, rng: random.Random):
        full, _ = self.sampler.complete_hand(rng)
        win = rng.choice([t for t in range(34) if full[t]])
        tsumo, riichi = rng.random() < 0.5, rng.random() < 0.5
        seat, rnd = rng.choice([27, 28, 29, 30]), rng.choice([27, 28])

        def build() -> Example | None:
            res = hand_value(full, win, tsumo=tsumo, riichi=riichi, seat_wind=seat, round_wind=rnd)
            if res.error:  # no yaku: the hand cannot win as stated
                return None
            how = "self-draw (tsumo)" if tsumo else "discard (ron)"
            q = (f"Hand (14 tiles): {to_compact(full, counts=True)}\nClosed hand, won on {tile_name(win)} by {how}"
                 f"{', after declaring riichi' if riichi else ', no riichi'}; seat wind {HONOR_NAMES[seat - 27]}, "
                 f"round wind {HONOR_NAMES[rnd - 27]}, no dora. How many han and fu is it worth?")
            return Example("", q, {"han": res.han, "fu": res.fu}, "score",
                           {"class": "tsumo" if tsumo else "ron", "yaku": [str(y) for y in res.yaku],
                            "fu_details": [f"{d['reason']} {d['fu']}" for d in res.fu_details or []]})

        return full, build

    # ------------------------------------------------------------------ prompts and targets

    def domain_tokens(self) -> list[str]:
        """The 34 tile names: a task tokenizer keeps each one a single token."""
        return [tile_name(t) for t in range(34)]

    def prompt(self, ex: Example, *, rules: bool = False) -> str:
        head = "Rules:\n" + self.describe() + "\n\n" if rules else ""
        question = ex.question
        if self.notation == "spaced" and "hand" in ex.meta:
            hand = ex.meta["hand"]
            question = question.replace(hand, " ".join(tile_name(t) for t in parse_tiles(hand)), 1)
        return f"{head}{question}\n{_FORMATS[ex.type]}"

    def target(self, ex: Example, *, rationale: bool = False) -> str:
        answer = self.format_answer(ex.type, ex.answer)
        if ex.type == "discard" and rationale and self.discard_rationale == "split":
            worked = split_rationale(hand_from_compact(ex.meta["hand"]), parse_tiles(str(ex.answer)))
            if worked is not None:  # the answer is the split's first spare tile
                return f"{worked[0]}\nAnswer: {tile_name(worked[1])}"
        if ex.type == "discard":
            # Any optimal tile is right: name one picked at random (seeded by the hand) rather than
            # always the first in tile order, so a student learns which tiles are optimal instead
            # of an arbitrary tie-break on top of it.
            best = parse_tiles(str(ex.answer))
            answer = tile_name(random.Random(ex.meta.get("key", ex.question)).choice(best))
        final = f"Answer: {answer}"
        if not rationale:
            return final
        return f"{self.rationale(ex)}\n{final}"

    def format_answer(self, typ: str, answer: Any) -> str:
        if typ == "waits":
            return str(answer)
        if typ == "shanten":
            return str(answer)
        if typ == "complete":
            return "yes" if answer else "no"
        if typ == "discard":
            return to_compact(parse_tiles(str(answer))[:1])  # one tile; any optimal one is right
        return f"{answer['han']} han {answer['fu']} fu"

    def rationale(self, ex: Example) -> str:
        """A step-by-step explanation derived from the oracle, for chain-of-thought training data."""
        c = hand_from_compact(ex.meta["hand"])
        if ex.type == "waits":
            lines = ["Try each tile that could complete the hand:"]
            for t in parse_tiles(ex.answer):
                c[t] += 1
                lines.append(f"- {tile_name(t)}: {_explain_complete(c)}")
                c[t] -= 1
            lines.append("No other tile completes it.")
            return "\n".join(lines)
        if ex.type == "shanten":
            s = ex.answer
            if s == 0:
                return f"The hand is ready: it wins on {to_compact(waits(c))}, so it is 0 tiles from ready."
            better = []
            for t in range(34):
                if c[t] < 4:
                    c[t] += 1
                    if shanten(c) < s:
                        better.append(t)
                    c[t] -= 1
            return (f"No split of the hand is ready. The draws that bring it one step closer are "
                    f"{to_compact(better)}; it needs {s} such useful draws to be ready, so shanten is {s}.")
        if ex.type == "complete":
            if ex.answer:
                return f"It splits as {_explain_complete(c)}, so it is complete."
            return (f"It cannot be split into four melds and a pair, it is not seven distinct pairs and not "
                    f"thirteen orphans (it needs {shanten(c) + 1} more exchange(s) to win), so it is not complete.")
        if ex.type == "discard":
            after = ex.meta["shanten_after"]
            items = ", ".join(f"{t} -> {s}" for t, s in sorted(after.items(), key=lambda kv: parse_tiles(kv[0])))
            return (f"Shanten left by each discard: {items}. The lowest is {min(after.values())}, "
                    f"reached by discarding {ex.answer}.")
        yaku = ", ".join(ex.meta["yaku"]) or "none"
        fu = ", ".join(ex.meta["fu_details"]) or "base"
        return f"Yaku: {yaku}, {ex.answer['han']} han. Fu: {fu}; rounded up: {ex.answer['fu']} fu."

    def group(self, ex: Example) -> str:
        """The question's type and answer class, for accuracy per group (``EvalResult.per_group``)."""
        cls = ex.meta.get("class")
        if ex.type == "discard":
            label = "ready after the best discard" if cls == 0 else f"{cls} from ready after the best discard"
        elif ex.type == "waits":
            label = f"{cls}{' or more' if cls == self.max_waits else ''} winning tile{'s' * (cls != 1)}"
        elif ex.type == "shanten":
            label = f"shanten {cls}"
        elif ex.type == "complete":
            label = "complete" if cls else "not complete"
        else:
            label = str(cls)
        return f"{ex.type}: {label}"

    # ------------------------------------------------------------------ parsing and scoring

    def parse(self, text: str, ex: Example | None = None) -> Any | None:
        typ = ex.type if ex is not None else (self.types[0] if len(self.types) == 1 else None)
        if typ is None:
            raise ValueError("mahjong: the mixed task needs the example to know which answer to parse")
        span = answer_span(text)
        if typ in ("waits", "discard"):
            tiles = sorted(set(parse_tiles(span)))
            return to_compact(tiles) if tiles else None
        if typ == "shanten":
            m = re.search(r"-?\d+", span)
            if m:
                return int(m.group())
            return 0 if re.search(r"\b(tenpai|ready)\b", span, re.IGNORECASE) else None
        if typ == "complete":
            low = span.lower()
            m = re.search(r"\b(yes|no|true|false|not complete|not a complete|incomplete|complete)\b", low)
            if not m:
                return None
            return m.group(1) in ("yes", "true", "complete")
        m_han = re.search(r"(\d+)\s*han", span, re.IGNORECASE)
        m_fu = re.search(r"(\d+)\s*fu", span, re.IGNORECASE)
        if not m_han and not m_fu:
            return None
        return {"han": int(m_han.group(1)) if m_han else None, "fu": int(m_fu.group(1)) if m_fu else None}

    def score(self, ex: Example, answer: Any | None) -> Score:
        if answer is None:
            return Score(False, 0.0)
        if ex.type == "waits":
            pred, true = set(parse_tiles(str(answer))), set(parse_tiles(ex.answer))
            return Score(pred == true, _f1(pred, true))  # precision/recall as partial credit
        if ex.type == "shanten":
            d = abs(int(answer) - int(ex.answer))
            return Score(d == 0, max(0.0, 1 - d / 2))
        if ex.type == "complete":
            ok = bool(answer) == bool(ex.answer)
            return Score(ok, float(ok))
        if ex.type == "discard":
            tiles = set(parse_tiles(str(answer)))
            if len(tiles) != 1:  # one discard, not a list to pick from
                return Score(False, 0.0)
            name = tile_name(tiles.pop())
            if name in parse_tiles_names(ex.answer):
                return Score(True, 1.0)
            after = ex.meta.get("shanten_after")  # absent from a record without meta: no partial credit
            if not after:
                return Score(False, 0.0)
            return Score(False, 0.5 if after.get(name) == min(after.values()) + 1 else 0.0)
        han_ok, fu_ok = answer.get("han") == ex.answer["han"], answer.get("fu") == ex.answer["fu"]
        return Score(han_ok and fu_ok, 0.5 * han_ok + 0.5 * fu_ok)

    # ------------------------------------------------------------------ knowledge injection

    def describe(self) -> str:
        return "\n".join(RULES)

    def corpus(self, n_examples: int = 200, seed: int = 0) -> list[dict[str, str]]:
        """Knowledge-injection text: each rule paragraph, then worked examples (question, oracle rationale,
        answer) from the *train* split only, as ``{"text": ...}`` records for the KD engine."""
        out = [{"text": para} for para in RULES]
        for ex in self.examples("train", n_examples, seed=seed) if n_examples else []:
            out.append({"text": f"Question: {ex.question}\n{self.target(ex, rationale=True)}"})
        return out


def parse_tiles_names(text: str) -> set[str]:
    return {tile_name(t) for t in parse_tiles(text)}


@register_task("mahjong")
def make_mahjong(
    sub: str | None = None,
    *,
    types: Sequence[str] | str | None = None,
    suits: str = "mps",
    honors: bool = True,
    shapes: dict[str, float] | None = None,
    min_waits: int = 1,
    max_waits: int = 3,
    max_shanten: int = 3,
    max_best_discards: int = 3,
    balance: bool = True,
    eval_fraction: float = 0.125,
    notation: str = "compact",
    discard_rationale: str = "split",
) -> MahjongTask:
    if sub and types:
        raise ValueError("mahjong: give the question type as 'mahjong:<type>' or as options.types, not both")
    chosen = (sub,) if sub else tuple([types] if isinstance(types, str) else types or DEFAULT_MIX)
    return MahjongTask(types=chosen, suits=suits, honors=honors, shapes=shapes, min_waits=min_waits,
                       max_waits=max_waits, max_shanten=max_shanten, max_best_discards=max_best_discards,
                       balance=balance, eval_fraction=eval_fraction, notation=notation,
                       discard_rationale=discard_rationale)

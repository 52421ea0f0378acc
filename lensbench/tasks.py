"""Synthetic tasks and shipped item sets with gold answers (for :func:`lensbench.filler_sweep` and friends).

Every generator returns a list of items ``{"question": str, "answer": str, "meta": {...}}``; answers start with a
space so that ``question + "\\nAnswer:" + answer`` tokenises naturally. Generators are pure functions of their
seed. ``three_sum`` follows Pfau, Merrill & Bowman ("Let's Think Dot by Dot"): length-n sequences of d-digit
tuples mod 10, positive iff some triple sums to 0 mod 10 in every digit; labels are verified by brute force.
"""

from __future__ import annotations

import itertools
import json
import random
from importlib import resources

from .errors import InputError

__all__ = ["three_sum", "three_sum_label", "two_sum_transform", "arithmetic", "multi_hop", "factual",
           "filler_string", "format_tuples"]


def _check(v, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InputError(f"{name} must be an int {rng}, got {v!r}.")
    return v


def _rate(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise InputError(f"{name} must be a number in [0, 1], got {v!r}.")
    return float(v)


def format_tuples(tuples) -> str:
    """``[[1, 2], [3, 4]]`` → ``"12 34"`` (the paper's format: digits of a tuple joined, tuples space-separated)."""
    return " ".join("".join(str(d) for d in t) for t in tuples)


def three_sum_label(tuples, mod: int = 10) -> bool:
    """Brute force: does some triple i < j < k sum to 0 (mod ``mod``) in every coordinate?"""
    for a, b, c in itertools.combinations(tuples, 3):
        if all((x + y + z) % mod == 0 for x, y, z in zip(a, b, c)):
            return True
    return False


def filler_string(length: int, unit: str = " .") -> str:
    """The paper's filler for 3SUM of length n: n² copies of ``unit``."""
    return unit * (length * length)


def _planted_labels(rng_key: str, n_items: int, positive_rate: float) -> tuple[random.Random, list[bool]]:
    """(the item generator seeded by ``rng_key``, ``n_items`` wanted labels in a random order, of which
    ``round(n_items * positive_rate)`` are True); ``positive_rate`` is validated here."""
    positive_rate = _rate(positive_rate, "positive_rate")
    rng = random.Random(rng_key)
    n_pos = round(n_items * positive_rate)
    wants = [True] * n_pos + [False] * (n_items - n_pos)
    rng.shuffle(wants)
    return rng, wants


def three_sum(n_items: int, length: int = 8, dim: int = 3, *, seed: int = 0, positive_rate: float = 0.5,
              mod: int = 10) -> list[dict]:
    """3SUM items: ``question`` = the tuples (``"123 456 …"``), ``answer`` = ``" True"``/``" False"``.

    Positives are planted at ``positive_rate`` (a random triple whose third tuple is minus the sum of the other
    two); negatives are near misses (a planted triple with 1–3 of its digits corrupted), re-drawn until brute
    force says negative. ``meta``: ``tuples``, ``label`` (brute force), ``planted`` (the triple's indices),
    ``filler`` (n² dots).
    """
    n_items = _check(n_items, "n_items", 1)
    length = _check(length, "length", 3, 64)
    dim = _check(dim, "dim", 1, 8)
    mod = _check(mod, "mod", 2, 10)
    rng, wants = _planted_labels(f"three_sum:{seed}:{length}:{dim}:{mod}", n_items, positive_rate)
    items = []
    for want in wants:
        for _attempt in range(10_000):
            tup = [[rng.randrange(mod) for _ in range(dim)] for _ in range(length)]
            i, j, k = sorted(rng.sample(range(length), 3))
            tup[k] = [(-(x + y)) % mod for x, y in zip(tup[i], tup[j])]
            if not want:  # near miss: corrupt 1..min(3, dim) digits of the planted triple
                cells = [(r, c) for r in (i, j, k) for c in range(dim)]
                for r, c in rng.sample(cells, rng.randint(1, min(3, dim))):
                    tup[r][c] = (tup[r][c] + rng.randrange(1, mod)) % mod
            label = three_sum_label(tup, mod)
            if label == want:
                break
        else:  # pragma: no cover - unreachable for sane sizes
            raise InputError(f"could not generate a {'positive' if want else 'negative'} 3SUM item with "
                             f"length={length}, dim={dim}, mod={mod}; increase dim.")
        items.append({"question": format_tuples(tup), "answer": " True" if label else " False",
                      "meta": {"tuples": tup, "label": label, "planted": [i, j, k],
                               "filler": filler_string(length)}})
    return items


def two_sum_transform(n_items: int, length: int = 6, dim: int = 3, *, seed: int = 0, positive_rate: float = 0.5,
                      mod: int = 10) -> list[dict]:
    """2SUM-Transform (after the paper): the tuples are shown shifted by a secret digit ``s`` (given at the end);
    positive iff two *original* tuples sum to 0 mod 10 in every coordinate. Labels by brute force."""
    n_items = _check(n_items, "n_items", 1)
    length = _check(length, "length", 2, 64)
    dim = _check(dim, "dim", 1, 8)
    rng, wants = _planted_labels(f"two_sum:{seed}:{length}:{dim}:{mod}", n_items, positive_rate)

    def label_of(t):
        return any(all((x + y) % mod == 0 for x, y in zip(a, b)) for a, b in itertools.combinations(t, 2))

    items = []
    for want in wants:
        while True:
            tup = [[rng.randrange(mod) for _ in range(dim)] for _ in range(length)]
            i, j = sorted(rng.sample(range(length), 2))
            tup[j] = [(-x) % mod for x in tup[i]]
            if not want:
                c = rng.randrange(dim)
                tup[j][c] = (tup[j][c] + rng.randrange(1, mod)) % mod
            if label_of(tup) == want:
                break
        s = rng.randrange(1, mod)
        shown = [[(x + s) % mod for x in t] for t in tup]
        items.append({"question": f"{format_tuples(shown)} | shift {s}", "answer": " True" if want else " False",
                      "meta": {"tuples": tup, "shown": shown, "shift": s, "label": want}})
    return items


def arithmetic(n_items: int, digits: int = 2, *, ops: str = "+-", seed: int = 0) -> list[dict]:
    """``"What is 23 + 45?"`` → ``" 68"``, with a short chain of thought in ``cot`` (tens, then units)."""
    n_items = _check(n_items, "n_items", 1)
    digits = _check(digits, "digits", 1, 6)
    if not ops or any(o not in "+-*" for o in ops):
        raise InputError(f"ops must be a non-empty string of '+', '-', '*', got {ops!r}.")
    rng = random.Random(f"arith:{seed}:{digits}:{ops}")
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1
    items = []
    for _ in range(n_items):
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(ops)
        if op == "-" and b > a:
            a, b = b, a
        val = a + b if op == "+" else a - b if op == "-" else a * b
        if op == "*":
            cot = f"{a} * {b} = {a} * {b // 10 * 10} + {a} * {b % 10} = {a * (b // 10 * 10)} + {a * (b % 10)} = {val}."
        else:
            ta, tb = a // 10 * 10, b // 10 * 10
            part = ta + tb if op == "+" else ta - tb
            rest = a % 10 + b % 10 if op == "+" else a % 10 - b % 10
            cot = f"{ta} {op} {tb} = {part}, {a % 10} {op} {b % 10} = {rest}, {part} + {rest} = {val}."
        items.append({"question": f"What is {a} {op} {b}?", "answer": f" {val}", "cot": cot,
                      "meta": {"a": a, "b": b, "op": op, "label": val}})
    return items


_NAMES = ("Alice Bruno Chen Dara Emil Farah Goran Hana Ivan Juno Kofi Lena Milo Nadia Omar Priya Quinn Rosa "
          "Sami Tomas Uma Vera Wei Xena Yusuf Zoe").split()
_CITIES = {"Paris": "France", "Rome": "Italy", "Madrid": "Spain", "Berlin": "Germany", "Tokyo": "Japan",
           "Cairo": "Egypt", "Lima": "Peru", "Oslo": "Norway", "Dublin": "Ireland", "Athens": "Greece",
           "Lisbon": "Portugal", "Vienna": "Austria", "Warsaw": "Poland", "Moscow": "Russia",
           "Nairobi": "Kenya", "Ottawa": "Canada", "Beijing": "China", "Delhi": "India", "Seoul": "Korea",
           "Havana": "Cuba"}


def multi_hop(n_items: int, *, hops: int = 2, seed: int = 0) -> list[dict]:
    """Two-hop facts: ``"Alice is friends with Bruno. Bruno lives in Lima. In which city does Alice's friend
    live?"`` → ``" Lima"``; ``hops=3`` adds the country (``" Peru"``). Distractor facts are mixed in."""
    n_items = _check(n_items, "n_items", 1)
    hops = _check(hops, "hops", 2, 3)
    rng = random.Random(f"multihop:{seed}:{hops}")
    items = []
    for _ in range(n_items):
        a, b, c, d = rng.sample(_NAMES, 4)
        city, other = rng.sample(list(_CITIES), 2)
        facts = [f"{a} is friends with {b}.", f"{b} lives in {city}.", f"{c} is friends with {d}.",
                 f"{d} lives in {other}."]
        rng.shuffle(facts)
        if hops == 2:
            q, ans = f"In which city does {a}'s friend live?", city
        else:
            q, ans = f"In which country does {a}'s friend live?", _CITIES[city]
        items.append({"question": " ".join(facts) + " " + q, "answer": " " + ans,
                      "meta": {"person": a, "friend": b, "city": city, "label": ans}})
    return items


def factual(n: int | None = None, *, category: str | None = None, style: str = "qa") -> list[dict]:
    """The shipped short factual / cloze items (written for this project), each
    ``{"question", "answer", "cloze", "meta": {"category"}}``: ``question`` is a question (``"What is the
    capital of France?"``), ``cloze`` a sentence the answer completes. ``style="cloze"`` puts the cloze in
    ``question`` with ``template=""`` (the answer follows directly; SmolLM2-135M answers these far better than
    the questions). ``n`` limits the count; ``category`` filters."""
    if style not in ("qa", "cloze"):
        raise InputError(f"style={style!r}; use 'qa' or 'cloze'.")
    path = resources.files("lensbench.data").joinpath("items", "factual.jsonl")
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if category is not None:
        cats = sorted({it["meta"]["category"] for it in items})
        if category not in cats:
            raise InputError(f"category={category!r}; the shipped categories are {cats}.")
        items = [it for it in items if it["meta"]["category"] == category]
    if n is not None:
        items = items[:_check(n, "n", 1)]
    if style == "cloze":
        items = [dict(it, question=it["cloze"], template="") for it in items]
    return items

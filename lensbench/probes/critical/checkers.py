"""Answer checkers: named ``text -> bool`` callables that decide whether a finished response is right."""

from __future__ import annotations

import math
import re
import types
from collections.abc import Callable

from ...errors import InputError


class Checker:
    """A named ``text -> bool`` answer checker (the name goes into cache keys and error messages)."""

    def __init__(self, fn: Callable[[str], bool], name: str):
        self.fn, self.name = fn, name

    def __call__(self, text: str) -> bool:
        return bool(self.fn(text))

    def __repr__(self) -> str:
        return self.name


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_number(text: str, which: str = "last") -> float | None:
    """The first or last number in ``text`` (thousands separators allowed), or None."""
    found = [s for s in _NUM.findall(text) if s.strip(",")]
    if not found:
        return None
    s = (found[-1] if which == "last" else found[0]).replace(",", "")
    try:
        return float(s)
    except ValueError:
        return None


def number(gold: float | int | str, *, rel_tol: float = 1e-6, abs_tol: float = 0.0, which: str = "last") -> Checker:
    """Checker: the ``which`` ("last" or "first") number in the text equals ``gold`` within tolerances."""
    try:
        g = float(str(gold).replace(",", ""))
    except ValueError as e:
        raise InputError(f"number(gold={gold!r}): gold must be a number.") from e
    if which not in ("last", "first"):
        raise InputError("number(which=...) must be 'last' or 'first'.")

    def check(text: str) -> bool:
        x = extract_number(text, which)
        return x is not None and math.isclose(x, g, rel_tol=rel_tol, abs_tol=abs_tol)
    return Checker(check, f"number({g!r}, rel_tol={rel_tol!r}, abs_tol={abs_tol!r}, which={which!r})")


def exact(gold: str, *, strip: bool = True, ignore_case: bool = False, extract: str | None = None) -> Checker:
    """Checker: the text (or the first group of regex ``extract`` found in it) equals ``gold``."""
    if not isinstance(gold, str):
        raise InputError(f"exact(gold=...) must be a string, got {type(gold).__name__}.")
    pat = re.compile(extract) if extract else None

    def norm(s: str) -> str:
        s = s.strip() if strip else s
        return s.lower() if ignore_case else s

    def check(text: str) -> bool:
        if pat is not None:
            mt = pat.search(text)
            if mt is None:
                return False
            text = mt.group(1) if mt.groups() else mt.group(0)
        return norm(text) == norm(gold)
    return Checker(check, f"exact({gold!r}, strip={strip}, ignore_case={ignore_case}, extract={extract!r})")


def regex(pattern: str, flags: int = 0) -> Checker:
    """Checker: ``re.search(pattern, text)`` finds a match."""
    try:
        pat = re.compile(pattern, flags)
    except re.error as e:
        raise InputError(f"regex(pattern={pattern!r}) is not a valid regular expression: {e}") from e
    return Checker(lambda text: pat.search(text) is not None, f"regex({pattern!r}, flags={int(flags)})")


checkers = types.SimpleNamespace(number=number, exact=exact, regex=regex, Checker=Checker,
                                 extract_number=extract_number)


def _checker_name(checker) -> str:
    if isinstance(checker, Checker):
        return checker.name
    return getattr(checker, "__qualname__", None) or getattr(checker, "__name__", None) or repr(checker)


def _run_checker(checker, text: str) -> bool:
    try:
        return bool(checker(text))
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported with its name
        raise InputError(
            f"checker={_checker_name(checker)} raised {type(e).__name__}: {e} (on the response text "
            f"{text[:120]!r}); fix the checker so it returns True/False for any text.") from e

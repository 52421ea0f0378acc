"""Declarative parameter validation: a probe states its constraints once, as a table; one helper checks them.

>>> @validate_params({"k": [Interval(int, 1, None)], "per": [Options({"prompt", "pooled"})], "seed": [None, int]})
... def probe(m, k=10, per="prompt", seed=None): ...

A parameter passes when it meets *any* of its constraints. A failure raises :class:`~lensbench.errors.InputError`
naming the function, the parameter, the value given and what is allowed, e.g.
``neighborhood_overlap: k=0 is not allowed; k must be an int >= 1.``
Constraints:

- a type (``int``, ``float``, ``str``, ``bool``, ``dict``, ...): ``isinstance``; ``int`` and ``float`` refuse
  ``bool``, ``float`` accepts ints; numpy scalars count as Python numbers;
- ``None``: the value ``None``;
- ``"callable"``: any callable;
- :class:`Interval` ``(type, low, high, closed=...)``: a number of that type in a range;
- :class:`Options` ``({...})``: one of the listed values (``"auto"`` for ``batch_size`` is ``Options({"auto"})``);
- :class:`SequenceOf` ``(constraint, min_len=1)``: a list/tuple (not a string) whose items meet the constraint;
- :class:`Check` ``(predicate, description)``: anything else, described in words.

Parameters absent from the table are not checked here (their checks need the model or the data).
"""

from __future__ import annotations

import functools
import inspect
import numbers
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["DROP", "Check", "Interval", "Options", "SequenceOf", "caller_stacklevel", "check_params", "renamed_params",
           "validate_params"]


def _is_number(v: Any, kind: type) -> bool:
    if isinstance(v, bool):
        return False
    if kind is int:
        return isinstance(v, numbers.Integral)
    if kind is float:
        return isinstance(v, numbers.Real)
    return isinstance(v, kind)


class Interval:
    """A number of ``kind`` (``int`` or ``float``) between ``low`` and ``high`` (``None`` = unbounded).

    ``closed``: which ends belong to the range, ``"both"`` (default), ``"left"``, ``"right"`` or ``"neither"``.
    """

    def __init__(self, kind: type, low: float | None, high: float | None, closed: str = "both"):
        if closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"closed={closed!r}")
        self.kind, self.low, self.high, self.closed = kind, low, high, closed

    def __call__(self, v: Any) -> bool:
        if not _is_number(v, self.kind):
            return False
        if v != v:  # NaN
            return False
        lo_in = self.closed in ("both", "left")
        hi_in = self.closed in ("both", "right")
        if self.low is not None and (v < self.low or (v == self.low and not lo_in)):
            return False
        return not (self.high is not None and (v > self.high or (v == self.high and not hi_in)))

    def __str__(self) -> str:
        name = "an int" if self.kind is int else "a number"
        lo_op = ">=" if self.closed in ("both", "left") else ">"
        hi_op = "<=" if self.closed in ("both", "right") else "<"
        if self.low is not None and self.high is not None:
            lb = "[" if lo_op == ">=" else "("
            rb = "]" if hi_op == "<=" else ")"
            return f"{name} in {lb}{self.low}, {self.high}{rb}"
        if self.low is not None:
            return f"{name} {lo_op} {self.low}"
        if self.high is not None:
            return f"{name} {hi_op} {self.high}"
        return name


class Options:
    """One of a fixed set of values."""

    def __init__(self, values: Iterable):
        self.values = tuple(values)

    def __call__(self, v: Any) -> bool:
        try:
            return v in self.values
        except TypeError:  # unhashable / incomparable
            return False

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(x) for x in sorted(self.values, key=str))


class SequenceOf:
    """A list or tuple (not a string) of at least ``min_len`` items, each meeting ``item``."""

    def __init__(self, item: Any, min_len: int = 1):
        self.item, self.min_len = item, int(min_len)

    def __call__(self, v: Any) -> bool:
        if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
            return False
        return len(v) >= self.min_len and all(_meets(x, self.item) for x in v)

    def __str__(self) -> str:
        least = "a non-empty" if self.min_len == 1 else (f"at least {self.min_len} items in a" if self.min_len else "a")
        return f"{least} list/tuple of {_describe(self.item)} values"


class Check:
    """Any other rule: ``predicate(value) -> bool`` and the words that describe an allowed value."""

    def __init__(self, predicate: Callable[[Any], bool], description: str):
        self.predicate, self.description = predicate, description

    def __call__(self, v: Any) -> bool:
        try:
            return bool(self.predicate(v))
        except Exception:  # a predicate that cannot judge the value refuses it
            return False

    def __str__(self) -> str:
        return self.description


_TYPE_WORDS = {int: "an int", float: "a number", str: "a string", bool: "True or False", dict: "a dict",
               list: "a list", tuple: "a tuple"}


def _describe(c: Any) -> str:
    if c is None:
        return "None"
    if c == "callable":
        return "a callable"
    if isinstance(c, type):
        return _TYPE_WORDS.get(c, f"a {c.__name__}")
    return str(c)


def _meets(v: Any, c: Any) -> bool:
    if c is None:
        return v is None
    if isinstance(c, str):
        if c == "callable":
            return callable(v)
        raise TypeError(f"unknown constraint {c!r}")
    if isinstance(c, type):
        if c in (int, float):
            return _is_number(v, c)
        if c is bool:
            return isinstance(v, bool)
        return isinstance(v, c)
    return c(v)


def check_params(constraints: dict[str, list], values: dict[str, Any], *, caller: str) -> None:
    """Check ``values`` against ``constraints`` (name → list of constraints, any of which suffices)."""
    for name, allowed in constraints.items():
        if name not in values:
            continue
        v = values[name]
        if any(_meets(v, c) for c in allowed):
            continue
        what = " or ".join(_describe(c) for c in allowed)
        shown = repr(v)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise InputError(f"{caller}: {name}={shown} is not allowed; {name} must be {what}.")


def validate_params(constraints: dict[str, list]):
    """Decorator: check the call's arguments against ``constraints`` before the function runs.

    The table is kept on the function as ``fn.parameter_constraints`` (the contract test and the docs read it).
    """

    def deco(fn):
        sig = inspect.signature(fn)
        unknown = set(constraints) - set(sig.parameters)
        if unknown:
            raise TypeError(f"{fn.__qualname__}: constraints for unknown parameters {sorted(unknown)}")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError:
                return fn(*args, **kwargs)  # let Python raise its own message for a wrong call
            check_params(constraints, bound.arguments, caller=fn.__name__)
            return fn(*args, **kwargs)

        wrapper.parameter_constraints = constraints
        return wrapper

    return deco


def caller_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that points at the first frame outside lensbench (the user's call),
    however many lensbench wrappers sit in between."""
    import sys
    pkg = str(Path(__file__).resolve().parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(pkg):
        frame, level = frame.f_back, level + 1
    return level


DROP = object()  #: returned by a rename's converter: the old keyword is ignored


def renamed_params(renames: dict[str, str | tuple[str, Callable[[Any], Any]]], *, since: str = "0.2"):
    """Decorator: accept old keyword names as deprecated aliases of new ones.

    ``{"steps": "n_steps"}`` forwards the value; ``{"exclude_bos": ("exclude_first", convert)}`` forwards
    ``convert(old_value)`` (return :data:`DROP` to ignore the old keyword, e.g. for its old ``None`` default).
    The old name still works, with a ``FutureWarning`` that names the new one and points at the caller; passing
    both is an error. Put it *outside* :func:`validate_params` so the checks see the new names. Stacked
    decorators merge their tables in ``fn.renamed_params``.
    """

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, spec in renames.items():
                if old not in kwargs:
                    continue
                new, convert = (spec, None) if isinstance(spec, str) else spec
                value = kwargs.pop(old)
                if convert is not None:
                    value = convert(value)
                    if value is DROP:
                        continue
                if new in kwargs:
                    raise InputError(f"{fn.__name__}: pass {new}= only ({old}= is its old name).")
                warnings.warn(f"{fn.__name__}: {old}= is renamed {new}= (since lensbench {since}); the old name "
                              "will be removed.", FutureWarning, stacklevel=caller_stacklevel())
                kwargs[new] = value
            return fn(*args, **kwargs)

        wrapper.renamed_params = {**getattr(fn, "renamed_params", {}),
                                  **{o: (v if isinstance(v, str) else v[0]) for o, v in renames.items()}}
        return wrapper

    return deco

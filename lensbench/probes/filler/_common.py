"""Helpers shared by the filler probes: token ids, the constraints their parameter tables share, summary-table
formatting."""

from __future__ import annotations

import numpy as np

from ...errors import InputError
from ...model import LensModel
from ...validation import Interval, Options

#: constraints every filler probe states the same way (see :mod:`lensbench.validation`)
SHARED_PARAMS = {
    "m": [LensModel],
    "seed": [Interval(int, 0, None)],
    "batch_size": [Options({"auto"}), Interval(int, 1, None)],
    "progress": [bool],
}
#: the bootstrap settings of the probes that report confidence intervals
CI_PARAMS = {"n_boot": [Interval(int, 1, None)], "ci": [Interval(float, 0, 1, closed="neither")]}


def _ids(m: LensModel, text: str, *, bos: bool, param: str) -> list[int]:
    if bos:
        return m.encode(text, param=param).tolist()
    if not isinstance(text, str):
        raise InputError(f"{param} must be a string, got {type(text).__name__}.")
    return list(m.tokenizer(text, add_special_tokens=False)["input_ids"])


def _tup(iv) -> tuple[float, float]:
    """``(lo, hi)`` of a :class:`lensbench.stats.Interval` as plain floats."""
    return (float(iv.lo), float(iv.hi))


def _clip(iv, lo: float, hi: float) -> tuple[float, float]:
    """An interval of a proportion (or a difference of two) clipped to its range (a t interval on 0/1 values can
    cross 0 or 1; the true value cannot)."""
    return (float(min(max(iv.lo, lo), hi)), float(max(min(iv.hi, hi), lo))) if np.isfinite(iv.lo) else _tup(iv)


def _summary_frame(summary: list[dict]):
    """A DataFrame of summary rows, each ``(lo, hi)`` confidence interval ``x_ci`` split into ``x_ci_lo``/``x_ci_hi``."""
    import pandas as pd
    rows = []
    for r in summary:
        r = dict(r)
        for k in [k for k in r if k.endswith("_ci")]:
            r[k + "_lo"], r[k + "_hi"] = r.pop(k)
        rows.append(r)
    return pd.DataFrame(rows)

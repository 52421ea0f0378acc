"""The section format of ``bench/REPRODUCTIONS.md`` and the verdict rules every section uses.

A section is a dict::

    {"paper": str, "claim": str,
     "theirs": {"quote": str, ...numbers},      # the paper's numbers, quoted text + values
     "ours": {...numbers computed in this run},
     "setting": str, "n": int | dict, "interval": str (how it was made),
     "verdict": "reproduced" | "not reproduced" | "not comparable", "reason": str, "seed": int | dict}

Verdicts are never typed: each section calls one of the rules below on numbers of the same run.

* :func:`interval_verdict` — ours is an interval ``(lo, hi)``; the paper's claim is a direction against a
  reference value (``"above"``/``"below"``) or a value to contain (``"contains"``). Reproduced iff the whole
  interval lies on the claimed side (or contains the value); a missing/NaN interval is "not comparable".
* :func:`all_verdict` — a conjunction of named boolean checks (e.g. "tuned below logit at every layer");
  reproduced iff all hold, "not comparable" if any check is ``None`` (could not be computed).
* :func:`not_comparable` — the setting the paper's number needs is absent (reason says which).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

VERDICTS = ("reproduced", "not reproduced", "not comparable")
KEYS = ("paper", "claim", "theirs", "ours", "setting", "n", "interval", "verdict", "reason", "seed")


def _finite(*xs) -> bool:
    return all(x is not None and isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def interval_verdict(lo: float | None, hi: float | None, ref: float, side: str, what: str = "ours") -> tuple[str, str]:
    """Rule for one interval ``[lo, hi]`` against ``ref``: ``side`` in {"above", "below", "contains"}.

    Returns ``(verdict, reason)``; NaN/None bounds -> "not comparable"."""
    if side not in ("above", "below", "contains"):
        raise ValueError(f"side must be above/below/contains, not {side!r}")
    if not _finite(lo, hi):
        return "not comparable", f"{what}: no finite interval in this run"
    iv = f"{what} 95% CI [{lo:.4g}, {hi:.4g}]"
    if side == "above":
        ok = lo > ref
        rel = "lies above" if ok else "does not lie above"
    elif side == "below":
        ok = hi < ref
        rel = "lies below" if ok else "does not lie below"
    else:
        ok = lo <= ref <= hi
        rel = "contains" if ok else "excludes"
    return ("reproduced" if ok else "not reproduced"), f"{iv} {rel} {ref:.4g}"


def all_verdict(checks: Mapping[str, bool | None]) -> tuple[str, str]:
    """Conjunction of named checks: all True -> reproduced; any None -> not comparable; else not reproduced."""
    if not checks:
        return "not comparable", "no check could be made"
    missing = [k for k, v in checks.items() if v is None]
    if missing:
        return "not comparable", "not computable in this run: " + "; ".join(missing)
    failed = [k for k, v in checks.items() if not v]
    if failed:
        return "not reproduced", "fails: " + "; ".join(failed) + (
            "" if len(failed) == len(checks) else " (holds: " + "; ".join(k for k in checks if checks[k]) + ")")
    return "reproduced", "holds: " + "; ".join(checks)


def not_comparable(reason: str) -> tuple[str, str]:
    """The paper's setting is not available in this run."""
    return "not comparable", reason


def combine(verdicts: list[tuple[str, str]]) -> tuple[str, str]:
    """Several items of one paper: any not reproduced -> not reproduced; else any not comparable -> not
    comparable; else reproduced. Reasons are joined."""
    vs = [v for v, _ in verdicts]
    why = " | ".join(r for _, r in verdicts)
    if "not reproduced" in vs:
        return "not reproduced", why
    if "not comparable" in vs or not vs:
        return "not comparable", why
    return "reproduced", why


def section(paper: str, claim: str, theirs: dict, ours: dict, setting: str, n, interval: str,
            verdict: tuple[str, str], seed) -> dict:
    """Assemble (and validate) a section dict."""
    v, why = verdict
    if v not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, not {v!r}")
    return {"paper": paper, "claim": claim, "theirs": theirs, "ours": ours, "setting": setting, "n": n,
            "interval": interval, "verdict": v, "reason": why, "seed": seed}


def not_run(paper: str, reason: str, seed=None) -> dict:
    """A section that could not run (module missing or an error)."""
    return section(paper, "", {}, {}, "not run", 0, "", not_comparable(f"not run: {reason}"), seed)


def _fmt(x, depth: int = 0) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, Mapping):
        if depth >= 1:
            return json.dumps(x, default=_jsonable)[:600]
        return "<br>".join(f"**{k}**: {_fmt(v, depth + 1)}" for k, v in x.items())
    if isinstance(x, (list, tuple)):
        s = "[" + ", ".join(_fmt(v, depth + 1) for v in x[:40]) + (", …" if len(x) > 40 else "") + "]"
        return s
    return str(x)


def _jsonable(x):
    try:
        import numpy as np
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(x)


def render_markdown(sections: list[dict], header: str = "") -> str:
    """``sections`` -> one markdown document: a summary table, then one block per section."""
    out = ["# Reproductions", ""]
    if header:
        out += [header, ""]
    out += ["| paper | verdict | reason |", "|---|---|---|"]
    for s in sections:
        r = str(s.get("reason", "")).replace("|", "/").replace("\n", " ")
        out.append(f"| {s.get('paper', '?')} | **{s.get('verdict', '?')}** | {r[:300]} |")
    out.append("")
    for s in sections:
        if s.get("module"):
            out += [f'<a id="{s["module"]}"></a>', ""]  # stable link target: REPRODUCTIONS.md#tuned_lens
        out += [f"## {s.get('paper', '?')}", ""]
        if s.get("claim"):
            out += [f"*Claim:* {s['claim']}", ""]
        out += ["| | |", "|---|---|"]
        for k in ("theirs", "ours", "setting", "n", "interval", "verdict", "reason", "seed", "wall_s", "run"):
            if k in s:
                v = _fmt(s[k]).replace("|", "/").replace("\n", " ")
                out.append(f"| {k} | {v} |")
        out.append("")
    return "\n".join(out)


def to_json(sections: list[dict], meta: dict) -> str:
    return json.dumps({"meta": meta, "sections": sections}, indent=1, default=_jsonable)


_MODEL = {}


def default_model():
    """``lb.load()`` once per process (every section of one run shares the default model; probes do not
    modify it)."""
    if "m" not in _MODEL:
        import lensbench as lb
        _MODEL["m"] = lb.load()
    return _MODEL["m"]

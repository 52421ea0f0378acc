"""Views of critical-token results: tokens coloured by a weight (HTML) and the two arms' success curves (plotly)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ._common import _clean

if TYPE_CHECKING:
    from ..probes.critical.contrastive import ContrastiveResult
    from ..probes.critical.rollouts import CriticalTokensResult

__all__ = ["token_html", "critical_html", "critical_figure", "contrastive_figure"]


def token_html(tokens: Sequence[str], weights, *, css_class: str = "lb-crit-tok", selected: int | None = None,
               titles: Sequence[str] | None = None) -> str:
    """Tokens as spans with a red background of opacity ``weight`` (NaN: grey dotted, not evaluated)."""
    parts = []
    for i, (tok, w) in enumerate(zip(tokens, weights)):
        w = float(w)
        if math.isnan(w):
            bg = "transparent;border-bottom:1px dotted #999"
        else:
            bg = f"rgba(220,40,40,{max(0.0, min(1.0, w)):.3f})"
        border = ";outline:2px solid #1f5fbf" if selected == i else ""
        title = html.escape(titles[i] if titles else f"{i}: {w:.3f}", quote=True)
        text = html.escape(tok).replace("\n", "↵<br>") or "∅"
        parts.append(f"<span class='{css_class}' data-i='{i}' title='{title}' style='background:{bg}{border};"
                     f"white-space:pre-wrap'>{text}</span>")
    return "<div style='line-height:1.9;font-family:monospace'>" + "".join(parts) + "</div>"


def critical_html(res: CriticalTokensResult, *, by: str = "criticality", selected: int | None = None) -> str:
    """The units of ``res`` coloured by ``by`` (clipped to [0, 1]; NaN: not evaluated), with both arms in the titles."""
    w = getattr(res, by).numpy()
    w = np.where(np.isnan(w), np.nan, np.clip(w, 0, 1))
    titles = [f"{i}: keep {float(res.keep_acc[i]):.2f}, replace {float(res.replace_acc[i]):.2f}, "
              f"{by} {float(getattr(res, by)[i]):.2f}" for i in range(len(res.units))]
    return token_html(res.units, w, selected=selected, titles=titles)


def critical_figure(res: CriticalTokensResult, *, height: int = 380):
    """Success rate of the keep and replace arms over units, with Wilson bands and the critical unit marked."""
    import plotly.graph_objects as go
    idx = [i for i in range(len(res.units)) if not math.isnan(float(res.keep_acc[i]))]
    x = [f"{i}:{_clean(res.units[i])[:12]}" for i in idx]
    traces = []
    for arm, colour in (("keep", "31,95,191"), ("replace", "214,118,19")):
        acc = getattr(res, f"{arm}_acc").numpy()[idx]
        lo, hi = getattr(res, f"{arm}_lo").numpy()[idx], getattr(res, f"{arm}_hi").numpy()[idx]
        traces.append(go.Scatter(x=x + x[::-1], y=list(hi) + list(lo[::-1]), fill="toself", hoverinfo="skip",
                                 fillcolor=f"rgba({colour},0.15)", line={"width": 0}, showlegend=False))
        traces.append(go.Scatter(x=x, y=acc, mode="lines+markers", name=f"{arm} arm", line={"color": f"rgb({colour})"}))
    fig = go.Figure(traces)
    title = f"success rate per {res.granularity} (prompt only: {res.base_accuracy:.2f})"
    if res.critical_index is not None and res.critical_index in idx:
        ci = res.critical_index
        fig.add_vline(x=idx.index(ci), line={"color": "red", "dash": "dash"})
        title += f" · critical: {ci} {_clean(res.units[ci])!r}"
    fig.update_layout(title=title, yaxis={"title": "success rate", "range": [-0.02, 1.02]}, height=height,
                      legend={"orientation": "h"}, margin={"t": 50, "b": 40})
    return fig


def contrastive_figure(res: ContrastiveResult, *, height: int = 380):
    """Per scored token (x = ``"t:token"`` for t = 1..T-1): bars of the criticality 1 − p_ce (left axis, [0, 1])
    and a line of log p_pos − log p_neg (right axis)."""
    import plotly.graph_objects as go
    x = [f"{t}:{_clean(tok)}" for t, tok in enumerate(res.tokens)][1:]
    fig = go.Figure([go.Bar(x=x, y=(1 - res.p_ce).numpy(), name="1 − p_ce"),
                     go.Scatter(x=x, y=res.logprob_diff.numpy(), name="log p_pos − log p_neg", yaxis="y2",
                                mode="lines+markers")])
    fig.update_layout(title=f"contrastive estimation (β = {res.beta:g}): criticality 1 − p_ce per token",
                      yaxis={"title": "1 − p_ce", "range": [0, 1]},
                      yaxis2={"title": "log-prob difference", "overlaying": "y", "side": "right"},
                      height=height, legend={"orientation": "h"})
    return fig

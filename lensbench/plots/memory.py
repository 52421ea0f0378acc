"""Figures of contextual-memory results: the per-class summary with its CIs, and per-token scores of one text."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    from ..probes.memory import ContextualMemoryResult

__all__ = ["memory_classes_figure", "memory_figure", "memory_tokens_figure"]


def memory_tokens_figure(res: ContextualMemoryResult, text: int = 0):
    """One bar per scored token of text ``text``: ``res.score_per_token`` where ``res.text_index == text``."""
    import plotly.graph_objects as go
    sel = res.text_index == text
    toks = [t for t, s in zip(res.token, sel) if s]
    fig = go.Figure(go.Bar(x=list(range(int(sel.sum()))), y=res.score_per_token[sel], hovertext=toks,
                           marker_color="#4c78a8"))
    fig.update_layout(title=f"Contextual memory per token (text {text}): C per prefix token, nats",
                      xaxis=dict(tickvals=list(range(len(toks))), ticktext=toks, tickangle=-60),
                      yaxis_title="−log P(prefix | e_i) / n_prefix", height=380)
    return fig


def memory_classes_figure(res: ContextualMemoryResult):
    """One bar per token class with tokens (``class_n > 0``): ``class_mean`` with asymmetric error bars to
    ``class_lo`` / ``class_hi``."""
    import plotly.graph_objects as go
    ok = res.class_n > 0
    cls = [c for c, o in zip(res.classes, ok) if o]
    n_texts_of = res.class_n_texts if res.class_n_texts is not None else np.full(len(res.classes), -1)
    fig = go.Figure(go.Bar(
        x=cls, y=res.class_mean[ok], marker_color="#4c78a8",
        error_y=dict(type="data", symmetric=False, array=(res.class_hi - res.class_mean)[ok],
                     arrayminus=(res.class_mean - res.class_lo)[ok]),
        hovertext=[f"{n} tokens from {t} texts" for n, t in zip(res.class_n[ok], n_texts_of[ok])]))
    n_texts = len(set(np.asarray(res.text_index).tolist()))
    fig.update_layout(title="Contextual memory by token class (lower = more of the prefix recoverable)"
                            f"<br><sup>95% CIs resample the {n_texts} texts (t interval below 20); "
                            f"{int(res.class_n.sum())} tokens</sup>", margin={"t": 80},
                      yaxis_title="mean −log P(prefix | e_i) per prefix token, nats", height=380)
    return fig


def memory_figure(res: ContextualMemoryResult, kind: str = "classes", text: int = 0):
    """``kind="classes"``: :func:`memory_classes_figure`; ``"tokens"``: :func:`memory_tokens_figure` of ``text``."""
    if kind == "tokens":
        return memory_tokens_figure(res, text)
    if kind != "classes":
        raise InputError(f"figure: kind={kind!r} is not allowed; kind must be one of 'classes', 'tokens'.")
    return memory_classes_figure(res)

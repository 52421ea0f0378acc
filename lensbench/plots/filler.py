"""Figures of the filler-token probes: class-ablation bars, sweep curves over N, probe accuracy per layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    from ..probes.filler import FillerAblationResult, FillerProbeResult, FillerSweepResult

__all__ = ["ablation_figure", "sweep_figure", "probe_figure"]

_MARGIN = dict(l=60, r=20, t=60, b=60)
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def ablation_figure(res: FillerAblationResult, metric: str = "delta_loss"):
    """Bars per class: class removal vs the random control, with CIs over texts (``res.summary()``).

    ``metric``: ``"delta_loss"`` (Δ mean NLL of the continuation) or ``"accuracy"`` (items with answers; the
    unedited accuracy as a dotted line). One bar trace per arm, x = class labels.
    """
    import plotly.graph_objects as go
    rows = res.summary()
    names = [r["class"] for r in rows]
    fig = go.Figure()
    if metric == "accuracy":
        if "acc_orig" not in rows[0]:
            raise InputError("metric='accuracy' needs items with answers; these were plain texts.")
        for key, ci, label in (("acc_class", "acc_class_ci", "class removed"),
                               ("acc_control", "acc_control_ci", "random control")):
            y = [r[key] for r in rows]
            lo = [r[key] - (r["acc_orig"] + r[ci][0]) for r in rows]
            hi = [(r["acc_orig"] + r[ci][1]) - r[key] for r in rows]
            fig.add_trace(go.Bar(x=names, y=y, name=label, error_y=dict(type="data", array=hi, arrayminus=lo)))
        fig.add_hline(y=rows[0]["acc_orig"], line_dash="dot", annotation_text="unedited")
        title, yt = "greedy exact match after removing each class", "accuracy"
    elif metric == "delta_loss":
        for key, ci, label in (("delta_loss", "delta_ci", "class removed"),
                               ("control_delta_loss", "control_ci", "random control (same #tokens)")):
            y = [r[key] for r in rows]
            fig.add_trace(go.Bar(x=names, y=y, name=label, error_y=dict(
                type="data", array=[r[ci][1] - r[key] for r in rows],
                arrayminus=[r[key] - r[ci][0] for r in rows])))
        r0 = rows[0]
        title = (f"Δ loss on the unedited continuation ({round(res.settings.get('ci', 0.95) * 100)}% "
                 f"{r0['ci_method']} CI over {r0['n_texts']} texts"
                 + (f", {r0['n_tokens']} tokens)" if r0["n_tokens"] is not None else ")"))
        yt = "Δ mean NLL (nats / token)"
    else:
        raise InputError(f"metric={metric!r}; use 'delta_loss' or 'accuracy'.")
    fig.update_layout(title=f"filler ablation · {title}", barmode="group", yaxis_title=yt, xaxis_title="class",
                      height=380, margin=_MARGIN)
    return fig


def sweep_figure(res: FillerSweepResult, metric: str = "delta_logprob", kinds: Sequence[str] | None = None):
    """One curve per filler kind against N, with a CI band over items (``res.summary()``).

    ``metric``: ``"delta_logprob"`` (vs N = 0), ``"logprob"`` or ``"accuracy"``; ``kinds``: the kinds to draw
    (default all). Per kind with CIs and more than one N: a band trace, then the line trace.
    """
    import plotly.graph_objects as go

    from ..probes.filler.sweep import SPECIAL_FILLERS
    if metric not in ("delta_logprob", "logprob", "accuracy"):
        raise InputError(f"metric={metric!r}; use 'delta_logprob', 'logprob' or 'accuracy'.")
    rows = res.summary()
    if metric == "delta_logprob" and rows and "delta_logprob" not in rows[0]:
        raise InputError("metric='delta_logprob' needs count 0 among counts; use 'logprob'.")
    ci_key = {"delta_logprob": "delta_ci", "accuracy": "accuracy_ci"}.get(metric)
    fig = go.Figure()
    for k, kind in enumerate(res.kinds):
        if kinds is not None and kind not in kinds:
            continue
        rs = [r for r in rows if r["kind"] == kind]
        x = [r["count"] for r in rs]
        y = [r[metric] for r in rs]
        col = _PALETTE[k % len(_PALETTE)]
        if ci_key and len(rs) > 1:
            lo = [r[ci_key][0] for r in rs]
            hi = [r[ci_key][1] for r in rs]
            fig.add_trace(go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", line={"width": 0},
                                     fillcolor=col, opacity=0.15, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=repr(kind) if kind.strip() != kind
                                 or kind not in SPECIAL_FILLERS else kind, line={"color": col}))
    label = {"delta_logprob": "Δ log p(answer) vs N = 0", "logprob": "log p(answer)",
             "accuracy": "greedy exact match"}[metric]
    fig.update_layout(title=f"filler sweep · {label} per filler kind", xaxis_title="N filler tokens",
                      yaxis_title=label, height=380, margin=_MARGIN)
    return fig


_COMPARE_LABELS = {"last_question": "last question token", "no_filler": "no-filler control, last position",
                   "question_mean": "question positions (mean)"}


def probe_figure(res: FillerProbeResult):
    """CV accuracy per layer of the three probes (filler positions, comparison position, shuffled labels), ±1 sd
    over folds as error bars, the majority-class rate as a dotted line."""
    import plotly.graph_objects as go
    fig = go.Figure()
    names = {"filler": f"filler positions ({res.pool})", "question": _COMPARE_LABELS.get(res.compare, res.compare),
             "shuffled": "filler, shuffled labels"}
    from ..probes.filler.probe import PROBE_ARMS
    for arm in PROBE_ARMS:
        fig.add_trace(go.Scatter(x=res.layers, y=getattr(res, f"{arm}_acc").numpy(), mode="lines+markers",
                                 name=names[arm], error_y=dict(type="data", array=getattr(res, f"{arm}_std").numpy())))
    fig.add_hline(y=res.majority, line_dash="dot", annotation_text="majority class")
    fig.update_layout(title=f"filler probe · CV accuracy of a logistic probe per layer ({res.n_fillers} × "
                      f"{res.filler!r}; n = {len(res.labels)} items, "
                      f"{res.settings.get('folds', '?')}-fold, ±1 sd over folds)", xaxis_title="layer",
                      yaxis_title="accuracy", height=380)
    return fig

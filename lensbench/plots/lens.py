"""Figures of lens results: the layers × positions heatmap, its HTML table, and per-layer sweep curves."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import numpy as np

from ._common import _clean

if TYPE_CHECKING:
    from ..probes.lens import LensResult, LensSweepResult

STAT_LABELS = {
    "entropy": "entropy H(p_l) [nats]",
    "kl_to_final": "KL(p_L || p_l) [nats]",
    "ce_next": "cross-entropy vs next token [nats]",
    "top1_confidence": "-log max p_l [nats]",
    "target_prob": "target probability",
    "target_rank": "target rank (0 = top)",
    "top1_prob": "top-1 probability",
}


def lens_heatmap_data(res: LensResult, stat: str = "top1_prob", k_hover: int = 5):
    """z ([n_layers, T]), cell text (top-1 tokens) and hover text (top-k with probabilities)."""
    z = res.stat(stat).numpy().astype(float)
    topk = res.top_tokens(k_hover)
    probs = res.top_probs[..., :k_hover].numpy()
    n, T = z.shape
    text = [[(_clean(topk[i][t][0]).replace(" ", "␣") if not topk[i][t][0].strip() else _clean(topk[i][t][0]))[:8]
             for t in range(T)] for i in range(n)]
    hover = [[
        f"layer {res.layers[i]} · pos {t} {html.escape(repr(res.tokens[t]))}<br>{stat} = {z[i, t]:.4g}<br>"
        + "<br>".join(f"{html.escape(repr(topk[i][t][j]))}: {probs[i, t, j]:.3f}" for j in range(len(topk[i][t])))
        for t in range(T)] for i in range(n)]
    return z, text, hover


def lens_heatmap(res: LensResult, stat: str = "top1_prob", *, k_hover: int = 5, title: str | None = None,
                 height: int | None = None):
    """Layers × positions heatmap coloured by ``stat``; each cell shows the layer's top-1 token."""
    import plotly.graph_objects as go

    z, text, hover = lens_heatmap_data(res, stat, k_hover)
    x = [f"{t}:{_clean(tok)}" for t, tok in enumerate(res.tokens)]
    fig = go.Figure(go.Heatmap(
        z=z, x=x, y=[str(la) for la in res.layers], text=text, texttemplate="%{text}", textfont={"size": 9},
        hovertext=hover, hoverinfo="text", colorscale="Viridis", colorbar={"title": {"text": stat, "side": "right"}}))
    fig.update_layout(
        title=title or f"{res.lens} lens · {STAT_LABELS.get(stat, stat)} · target: {res.target}",
        xaxis_title="position: input token", yaxis_title="layer", height=height or max(380, 18 * len(res.layers) + 160),
        margin=dict(l=60, r=20, t=60, b=80))
    return fig


def lens_result_html(res: LensResult, *, max_tokens: int = 16, max_layers: int = 12) -> str:
    """HTML table of the top-1 token per (layer, position): the first ``max_tokens`` positions of the last
    ``max_layers`` layers, last layers first."""
    top1 = res.top_tokens(1)
    n_tok = min(max_tokens, len(res.tokens))
    head = "".join(f"<th>{html.escape(t)}</th>" for t in res.tokens[:max_tokens])
    rows = "".join(
        f"<tr><th>{la}</th>" + "".join(f"<td>{html.escape(top1[i][t][0])}</td>" for t in range(n_tok)) + "</tr>"
        for i, la in list(enumerate(res.layers))[::-1][:max_layers])
    return (f"<b>LensResult</b> ({res.lens} lens, {html.escape(res.model_name)}): {len(res.layers)} layers × "
            f"{len(res.tokens)} tokens, top-1 per cell (last layers first); <code>.figure()</code> plots it."
            f"<table><tr><th>layer</th>{head}</tr>{rows}</table>")


def sweep_figure(sweep: LensSweepResult, stat: str = "kl_to_final"):
    """Per-layer mean with the inter-quantile band of a :class:`LensSweepResult`."""
    import plotly.graph_objects as go
    si = sweep.stats.index(stat)
    mean = sweep.mean[si].numpy()
    q = np.asarray(sweep.q)
    qs = sweep.quantiles[si].numpy()
    lo, hi = int(np.argmin(q)), int(np.argmax(q))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=sweep.layers + sweep.layers[::-1], y=list(qs[:, hi]) + list(qs[::-1, lo]),
                             fill="toself", line={"width": 0}, opacity=0.25, name=f"q{q[lo]:g}–q{q[hi]:g}"))
    med = int(np.argmin(np.abs(q - 0.5)))
    fig.add_trace(go.Scatter(x=sweep.layers, y=qs[:, med], mode="lines", line={"dash": "dot"}, name="median"))
    fig.add_trace(go.Scatter(x=sweep.layers, y=mean, mode="lines+markers", name="mean"))
    fig.update_layout(title=f"{sweep.lens} lens · {stat} per layer over {sweep.n_texts} texts ({sweep.n_tokens} tokens)",
                      xaxis_title="layer", yaxis_title=stat, height=380)
    return fig


def compare_sweeps(sweeps: dict[str, LensSweepResult], stat: str = "kl_to_final"):
    """One line per sweep (e.g. logit vs tuned) of the per-layer mean of ``stat``."""
    import plotly.graph_objects as go
    fig = go.Figure()
    for name, sw in sweeps.items():
        fig.add_trace(go.Scatter(x=sw.layers, y=sw.mean[sw.stats.index(stat)].numpy(), mode="lines+markers", name=name))
    fig.update_layout(title=f"{stat} per layer", xaxis_title="layer", yaxis_title=stat, height=380)
    return fig

"""Figures of representation-geometry results (per-layer profiles, linearity, shuffle, correlation)."""

from __future__ import annotations

import numpy as np

from ._common import _clean


def geometry_profile(res, *, max_lines: int = 12):
    """One line per prompt (or the pooled cloud) of a per-layer geometric measure."""
    import plotly.graph_objects as go
    fig = go.Figure()
    for i, p in enumerate(res.prompts[:max_lines]):
        name = p if p == "pooled" else f"{i}: {p[:30]}"
        fig.add_trace(go.Scatter(x=res.layers, y=res.values[i], mode="lines+markers", name=name))
    if len(res.prompts) > 1:
        fig.add_trace(go.Scatter(x=res.layers, y=np.nanmean(res.values, 0), mode="lines", name="mean",
                                 line={"width": 4, "color": "black"}))
    est = res.settings.get("estimator", "")
    fig.update_layout(title=f"{res.measure} per layer {('(' + est + ')') if est else ''}", xaxis_title="layer",
                      yaxis_title=res.measure, height=380)
    return fig


def linearity_figure(res):
    import plotly.graph_objects as go
    fig = go.Figure([go.Scatter(x=res.layers, y=res.score, mode="lines+markers", name="with residual"),
                     go.Scatter(x=res.layers, y=res.score_no_residual, mode="lines+markers", name="without residual")])
    fig.update_layout(title=f"linearity of layer l → l+1 (N = {res.n_points} pooled tokens, d = {res.d_model})",
                      xaxis_title="layer l", yaxis_title="1 − ‖XA − Y‖²", height=380)
    return fig


def nonlinearity_heatmap(res):
    import plotly.graph_objects as go
    x = [f"{t}:{_clean(tok)}" for t, tok in enumerate(res.tokens)]
    fig = go.Figure(go.Heatmap(z=res.per_token, x=x, y=[str(la) for la in res.layers], colorscale="Magma",
                               colorbar={"title": "‖x̃A − ỹ‖"}))
    fig.update_layout(title="per-token nonlinearity of layer l → l+1", xaxis_title="token", yaxis_title="layer l",
                      height=max(380, 16 * len(res.layers) + 160))
    return fig


def shuffle_figure(res):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=2, subplot_titles=("ID per layer", "loss"))
    for i, s in enumerate(res.levels):
        fig.add_trace(go.Scatter(x=res.layers, y=res.id[i], mode="lines", name=f"S={s} ({4 ** s} blocks)"), 1, 1)
    fig.add_trace(go.Bar(x=[f"S={s}" for s in res.levels], y=res.loss, name="loss", showlegend=False), 1, 2)
    fig.update_layout(title="block-shuffle baseline", height=380)
    return fig


def correlation_figure(res):
    import plotly.graph_objects as go
    fig = go.Figure([go.Scatter(x=res.layers, y=res.pearson_r, mode="lines+markers", name="Pearson r"),
                     go.Scatter(x=res.layers, y=res.spearman_r, mode="lines+markers", name="Spearman ρ")])
    fig.update_layout(title=f"correlation of {res.measure} with loss across {res.n_prompts} prompts",
                      xaxis_title="layer", yaxis_title="correlation", yaxis_range=[-1, 1], height=380)
    return fig

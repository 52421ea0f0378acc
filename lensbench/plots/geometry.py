"""Figures of representation-geometry results (per-layer profiles, linearity, shuffle, correlation).

Each figure of a result computed on token clouds says in a subtitle which cloud conventions were used
(``exclude_first``, ``last_layer`` in the result's ``settings``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._common import _clean

if TYPE_CHECKING:
    from ..probes.geometry import CorrelationResult, GeometryResult, LinearityResult, ShuffleResult

__all__ = ["conventions", "correlation_figure", "geometry_profile", "linearity_figure", "nonlinearity_heatmap",
           "shuffle_figure"]


def conventions(settings: dict) -> str:
    """The cloud conventions recorded in a result's ``settings``, in words ("" when none is recorded)."""
    ef = settings.get("exclude_first", settings.get("exclude_bos"))
    first = {True: "first token excluded", "bos": "BOS excluded", False: "all tokens"}.get(ef, "")
    last = {"post_norm": "last layer after the final norm", "pre_norm": "last layer before the final norm"}.get(
        settings.get("last_layer"), "")
    return " · ".join(x for x in (first, last) if x)


def _annotate(fig, settings: dict):
    desc = conventions(settings)
    if desc:
        title = fig.layout.title.text or ""
        fig.update_layout(title=f"{title}<br><sup>{desc}</sup>", margin={"t": 80})
    return fig


def geometry_profile(res: GeometryResult, *, max_lines: int = 12):
    """One line per prompt (the first ``max_lines``; or the pooled cloud) of ``res.values[i]`` against
    ``res.layers``, and their mean over all rows (``nanmean`` of ``values``, ``[n_layers]``) when there are
    several."""
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
    return _annotate(fig, res.settings)


def linearity_figure(res: LinearityResult):
    """The in-sample scores with and without the residual against ``res.layers`` and, when the result has
    them, the held-out scores (dotted)."""
    import plotly.graph_objects as go
    fig = go.Figure([go.Scatter(x=res.layers, y=res.score, mode="lines+markers", name="with residual"),
                     go.Scatter(x=res.layers, y=res.score_no_residual, mode="lines+markers", name="without residual")])
    if res.score_heldout is not None:
        for y, name in ((res.score_heldout, "with residual, held-out half"),
                        (res.score_no_residual_heldout, "without residual, held-out half")):
            fig.add_trace(go.Scatter(x=res.layers, y=y, mode="lines+markers", name=name, line={"dash": "dot"}))
    fig.update_layout(title=f"linearity of layer l → l+1 (N = {res.n_points} pooled tokens, d = {res.d_model})",
                      xaxis_title="layer l", yaxis_title="1 − ‖XA − Y‖²", height=380)
    return _annotate(fig, res.settings)


def nonlinearity_heatmap(res: LinearityResult):
    """``res.per_token`` (``[n_transitions, T]``) as a heatmap: transitions l → l+1 by tokens of ``res.prompt``."""
    import plotly.graph_objects as go
    x = [f"{t}:{_clean(tok)}" for t, tok in enumerate(res.tokens)]
    fig = go.Figure(go.Heatmap(z=res.per_token, x=x, y=[str(la) for la in res.layers], colorscale="Magma",
                               colorbar={"title": "‖x̃A − ỹ‖"}))
    fig.update_layout(title="per-token nonlinearity of layer l → l+1", xaxis_title="token", yaxis_title="layer l",
                      height=max(380, 16 * len(res.layers) + 160))
    return _annotate(fig, res.settings)


def shuffle_figure(res: ShuffleResult):
    """Left: the ID profile (``res.id[i]``) of each shuffle level S; right: the loss of each level."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=2, subplot_titles=("ID per layer", "loss"))
    for i, s in enumerate(res.levels):
        fig.add_trace(go.Scatter(x=res.layers, y=res.id[i], mode="lines", name=f"S={s} ({4 ** s} blocks)"), 1, 1)
    fig.add_trace(go.Bar(x=[f"S={s}" for s in res.levels], y=res.loss, name="loss", showlegend=False), 1, 2)
    fig.update_layout(title="block-shuffle baseline", height=380)
    return _annotate(fig, res.settings)


def correlation_figure(res: CorrelationResult):
    """Pearson r and Spearman ρ per layer (``[n_layers]`` each)."""
    import plotly.graph_objects as go
    fig = go.Figure([go.Scatter(x=res.layers, y=res.pearson_r, mode="lines+markers", name="Pearson r"),
                     go.Scatter(x=res.layers, y=res.spearman_r, mode="lines+markers", name="Spearman ρ")])
    fig.update_layout(title=f"correlation of {res.measure} with loss across {res.n_prompts} prompts",
                      xaxis_title="layer", yaxis_title="correlation", yaxis_range=[-1, 1], height=380)
    return fig

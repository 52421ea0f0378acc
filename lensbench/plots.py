"""Static plotly figures for results (no Jupyter needed; widgets reuse these builders)."""

from __future__ import annotations

import html

import numpy as np


def _clean(tok: str) -> str:
    return tok.replace("\n", "\\n").replace("\t", "\\t")


def lens_heatmap_data(res, stat: str = "top1_prob", k_hover: int = 5):
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


def lens_heatmap(res, stat: str = "top1_prob", *, k_hover: int = 5, title: str | None = None, height: int | None = None):
    """Layers × positions heatmap coloured by ``stat``; each cell shows the layer's top-1 token."""
    import plotly.graph_objects as go

    from .probes.lens import STAT_LABELS
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


def sweep_figure(sweep, stat: str = "kl_to_final"):
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


def compare_sweeps(sweeps: dict, stat: str = "kl_to_final"):
    """One line per sweep (e.g. logit vs tuned) of the per-layer mean of ``stat``."""
    import plotly.graph_objects as go
    fig = go.Figure()
    for name, sw in sweeps.items():
        fig.add_trace(go.Scatter(x=sw.layers, y=sw.mean[sw.stats.index(stat)].numpy(), mode="lines+markers", name=name))
    fig.update_layout(title=f"{stat} per layer", xaxis_title="layer", yaxis_title=stat, height=380)
    return fig


# --------------------------------------------------------------------------------------------- geometry
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


# --------------------------------------------------------------------------------------------- attribution
def attribution_html(res, target: int | None = None) -> str:
    """The source text with each token's background coloured by its (normalised) score for one target."""
    t = len(res.target_tokens) - 1 if target is None else target
    s = res.normalized()[t]
    spans = []
    for i, tok in enumerate(res.source_tokens):
        v = float(s[i])
        if np.isnan(v):
            color = "transparent"
        elif v >= 0:
            color = f"rgba(220,40,40,{min(1.0, v):.2f})"
        else:
            color = f"rgba(40,90,220,{min(1.0, -v):.2f})"
        title = "" if np.isnan(v) else f"{float(res.scores[t, i]):.4g}"
        spans.append(f"<span class='lb-src' data-i='{i}' title='{title}' style='background:{color};"
                     f"padding:1px 0;border-radius:2px'>{html.escape(tok)}</span>")
    head = (f"<div><b>{res.method}</b> → target <code>{html.escape(res.target_tokens[t])!s}</code>"
            + (f" vs <code>{html.escape(res.contrast)}</code>" if res.contrast else "") + "</div>")
    return head + "<div style='white-space:pre-wrap;font-family:monospace;line-height:1.8'>" + "".join(spans) + "</div>"


def attribution_figure(res, target: int | None = None):
    """Heatmap targets × sources (several targets) or a bar chart over sources (one target)."""
    import plotly.graph_objects as go
    x = [f"{i}:{_clean(t)}" for i, t in enumerate(res.source_tokens)]
    if len(res.target_tokens) > 1 and target is None:
        fig = go.Figure(go.Heatmap(z=res.normalized().numpy(), x=x,
                                   y=[f"{p}:{_clean(t)}" for p, t in zip(res.target_positions, res.target_tokens)],
                                   colorscale="RdBu", zmid=0, reversescale=True))
        fig.update_layout(title=f"{res.method}: generated tokens × sources (normalised per row)",
                          xaxis_title="source", yaxis_title="target", height=max(380, 22 * len(res.target_tokens) + 160))
        return fig
    t = len(res.target_tokens) - 1 if target is None else target
    fig = go.Figure(go.Bar(x=x, y=res.scores[t].numpy()))
    fig.update_layout(title=f"{res.method} → {res.target_tokens[t]!r}" + (f" vs {res.contrast!r}" if res.contrast else ""),
                      xaxis_title="source token", yaxis_title="score", height=380)
    return fig

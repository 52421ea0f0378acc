"""Views of attribution results: coloured source text (HTML) and plotly heatmap/bars."""

from __future__ import annotations

import html

import numpy as np

from ._common import _clean


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

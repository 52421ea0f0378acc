"""Views of attribution results: coloured source text (HTML), plotly heatmap/bars, and faithfulness scores."""

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


def faithfulness_figure(res):
    """Two panels: mean soft sufficiency / comprehensiveness of the method beside its random control (bars), and
    F after deleting the top-k tokens, one line per target."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=2, subplot_titles=("soft scores (mean over targets)", "deletion curves"))
    names = ["sufficiency", "comprehensiveness"]
    fig.add_trace(go.Bar(name=res.method or "method", x=names, y=[res[n + "_mean"] for n in names]), 1, 1)
    fig.add_trace(go.Bar(name="random control", x=names, y=[res[n + "_random_mean"] for n in names]), 1, 1)
    tokens = res.target_tokens or [""] * len(res.deletion_lengths)
    for k, curve in enumerate(res["deletion_curves"]):
        fig.add_trace(go.Scatter(x=list(range(len(curve))), y=curve, mode="lines+markers",
                                 name=f"{k}:{_clean(tokens[k])}"), 1, 2)
    fig.update_xaxes(title_text="top-k tokens deleted", row=1, col=2)
    fig.update_yaxes(title_text="log p(target)", row=1, col=2)
    fig.update_layout(title=f"faithfulness of {res.method}", barmode="group", height=380)
    return fig


def faithfulness_html(res) -> str:
    """A compact table: the method's mean soft scores, the random control's and their ratio."""
    n_targets = len(res.deletion_lengths)
    rows = "".join(
        f"<tr><td>{s}</td><td>{res[s + '_mean']:.3f}</td><td>{res[s + '_random_mean']:.3f}</td>"
        f"<td>{res[s + '_ratio']:.2f}</td></tr>" for s in ("sufficiency", "comprehensiveness"))
    return (f"<div><b>FaithfulnessResult</b> of <code>{html.escape(res.method)}</code> "
            f"({n_targets} target{'' if n_targets == 1 else 's'})</div><table class='lb-faith'><tr><th>score</th><th>method</th>"
            f"<th>random</th><th>ratio</th></tr>{rows}</table>")

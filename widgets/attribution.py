"""``AttributionExplorer``: per-token colouring for several attribution methods, click a generated token to
make it the target, a targets × sources heatmap, and a faithfulness table.

Each method's :func:`lensbench.attribute` runs once at construction (with ``generate=N``); selecting a method
or a target redraws from those results.
"""

from __future__ import annotations

import html

import ipywidgets as W
import plotly.graph_objects as go

import lensbench as lb
from lensbench.plots import attribution_figure, attribution_html

from ._chrome import USER_ERRORS, error_html, tag
from ._figsync import SyncedVBox

DEFAULT_METHODS = ("saliency", "grad_x_input", "integrated_gradients", "occlusion", "rollout")


class AttributionExplorer(SyncedVBox):
    """Attribution of a prompt's next token, or of each token of a greedy generation.

    Args:
        m: a :class:`lensbench.LensModel`; text: the prompt.
        methods: methods shown side by side (small multiples); the first is the main one.
        generate: tokens to generate and attribute (0 = the next token only).
        method_options: per-method keyword arguments for :func:`lensbench.attribute`
            (default: the library's, i.e. integrated gradients with its measured default baseline and
            n_steps=50; the panel shows which baseline each result used and its completeness gap).
        target: the token to explain when ``generate=0`` (string or id; default: the greedy next token).

    Attributes:
        results: method -> :class:`lensbench.AttributionResult`; target_buttons: one toggle per target token.
    """

    def __init__(self, m, text: str = "The capital of France is", *, methods=DEFAULT_METHODS, generate: int = 6,
                 method_options: dict | None = None, target: str | int | None = None):
        self.m = m
        opts = dict(method_options or {})
        self.error = W.HTML("")
        self.results: dict[str, lb.AttributionResult] = {}
        try:
            for meth in methods:
                kw = dict(opts.get(meth, {}), **({"target": target} if target is not None else {}))
                self.results[meth] = lb.attribute(m, text, method=meth, generate=generate, progress=False, **kw)
        except USER_ERRORS as e:
            self.error.value = error_html(e)
        first = next(iter(self.results.values()), None)
        targets = first.target_tokens if first else []
        self.method = W.Dropdown(options=list(self.results), description="method")
        self.target_buttons = W.ToggleButtons(
            options=[(f"{i}: {t!r}", i) for i, t in enumerate(targets)], value=len(targets) - 1 if targets else None,
            description="target", style={"button_width": "auto"})
        self.main = W.HTML("")
        self.baseline_info = W.HTML("")
        self.multiples = W.HTML("")
        self.heatmap = go.FigureWidget()
        self.faith_button = W.Button(description="Compute faithfulness", icon="check")
        self.faith = W.HTML("")
        tag((self.method, "lb-attr-method"), (self.target_buttons, "lb-attr-targets"), (self.main, "lb-attr-main"),
            (self.baseline_info, "lb-attr-baseline"))
        self.method.observe(lambda _c: self.redraw(), names="value")
        self.target_buttons.observe(lambda _c: self.redraw(), names="value")
        self.faith_button.on_click(lambda _b: self.compute_faithfulness())
        super().__init__([self.error, self.method, self.target_buttons, self.main, self.baseline_info,
                          self.multiples, self.heatmap,
                          W.HBox([self.faith_button]), self.faith])
        self.add_class("lb-attribution-explorer")
        self.redraw()

    @property
    def target(self) -> int:
        return self.target_buttons.value or 0

    def redraw(self) -> None:
        if not self.results:
            return
        res = self.results[self.method.value]
        self.main.value = attribution_html(res, target=self.target)
        self.baseline_info.value = self.baseline_text(res, self.target)
        cells = "".join(f"<div style='flex:1 1 45%;border:1px solid #ddd;padding:4px;margin:2px'>"
                        f"{attribution_html(r, target=self.target)}</div>"
                        for name, r in self.results.items() if name != self.method.value)
        self.multiples.value = f"<div style='display:flex;flex-wrap:wrap'>{cells}</div>"
        fig = attribution_figure(res, target=None if len(res.target_tokens) > 1 else 0)
        with self.heatmap.batch_update():
            self.heatmap.data = []
            self.heatmap.add_trace(fig.data[0])
            self.heatmap.layout = fig.layout

    @staticmethod
    def baseline_text(res: lb.AttributionResult, target: int) -> str:
        """One line: the baseline a result used and, for integrated gradients, its completeness gap."""
        if not res.baseline:
            return ""
        line = f"baseline: <code>{html.escape(res.baseline)}</code>"
        if res.completeness is not None and res.relative_gap is not None:
            gap, rel = float(res.completeness[target]), float(res.relative_gap[target])
            ok = abs(rel) <= 0.05
            line += (f" · completeness gap {gap:+.3f} = {rel:+.1%} of |F(x) − F(x')| "
                     + ("(within 5%)" if ok else "<b style='color:#b00'>(over 5%: not converged)</b>"))
        return f"<div style='font-size:12px'>{line}</div>"

    def compute_faithfulness(self, n_samples: int = 8) -> None:
        """Soft sufficiency / comprehensiveness of every method (model passes; on request only)."""
        rows = []
        for name, r in self.results.items():
            f = lb.faithfulness(self.m, r, n_samples=n_samples)
            rows.append(f"<tr><td>{name}</td><td>{f['sufficiency_mean']:.3f}</td>"
                        f"<td>{f['comprehensiveness_mean']:.3f}</td><td>{f['sufficiency_ratio']:.2f}</td>"
                        f"<td>{f['comprehensiveness_ratio']:.2f}</td></tr>")
        self.faith.value = ("<table class='lb-faith'><tr><th>method</th><th>soft sufficiency</th>"
                            "<th>soft comprehensiveness</th><th>suff./random</th><th>comp./random</th></tr>"
                            + "".join(rows) + "</table>")

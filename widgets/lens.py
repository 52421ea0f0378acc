"""``LogitLensExplorer``: an interactive logit/tuned lens over ipywidgets + plotly ``FigureWidget``.

Only public probe functions are called: :func:`lensbench.logit_lens` when a text is (re)submitted, and
:meth:`LensResult.retarget` for a new target token. Every other interaction (statistic, hover, layer/position
sliders, lens switch) redraws from results already held — no model pass.
"""

from __future__ import annotations

import ipywidgets as W
import plotly.graph_objects as go

import lensbench as lb
from lensbench.plots import STAT_LABELS, lens_heatmap, lens_heatmap_data

from ._chrome import USER_ERRORS, error_html, status_html, tag
from ._figsync import SyncedVBox

STAT_CHOICES = [(STAT_LABELS[k], k) for k in
                ("top1_prob", "entropy", "kl_to_final", "ce_next", "top1_confidence", "target_prob", "target_rank")]


class LogitLensExplorer(SyncedVBox):
    """Layers × positions heatmap of a lens statistic, with hover top-k, a target box, sliders and a lens switch.

    Args:
        m: a :class:`lensbench.LensModel`.
        text: the text to analyse.
        tuned: optional :class:`lensbench.TunedLens` (enables the logit/tuned switch).
        compare: optional second text, shown as a second heatmap under the first.
        top_k: predictions kept per cell (hover shows 5, the side panel all ``top_k``).
        stat: initial colouring statistic.

    Attributes:
        results: ``{"logit": LensResult, "tuned": LensResult}`` for the main text.
        heatmap, topk_fig: the plotly ``FigureWidget`` s; ``compare_heatmap`` when comparing.
        error: an ``HTML`` widget where bad input is explained (no traceback in the notebook).
    """

    def __init__(self, m, text: str = "The capital of France is", *, tuned: lb.TunedLens | None = None,
                 compare: str | None = None, top_k: int = 10, stat: str = "top1_prob"):
        self.m, self.tuned, self.top_k = m, tuned, top_k
        self.results: dict[str, lb.LensResult] = {}
        self.compare_results: dict[str, lb.LensResult] = {}
        self.text_box = W.Textarea(value=text, description="text", layout=W.Layout(width="70%", height="60px"))
        self.run_button = W.Button(description="Run lens", button_style="primary", icon="play")
        self.compare_box = W.Text(value=compare or "", description="compare", placeholder="optional second text",
                                  layout=W.Layout(width="70%"))
        self.stat = W.Dropdown(options=STAT_CHOICES, value=stat, description="colour")
        self.target = W.Text(value="", description="target", placeholder="e.g. ' Paris' (empty = next token)",
                             continuous_update=False)
        self.lens_switch = W.ToggleButtons(options=["logit", "tuned"] if tuned is not None else ["logit"],
                                           value="logit", description="lens")
        self.layer = W.IntSlider(description="layer", min=0, max=m.n_layers, value=m.n_layers,
                                 continuous_update=False)
        self.position = W.IntSlider(description="position", min=0, max=0, value=0, continuous_update=False)
        self.error = W.HTML("")
        self.status = W.HTML("")
        # plain figures first: the first run draws into them, and only then are they wrapped as FigureWidgets, so
        # the first draw travels in the widgets' initial state (comm open) — no transient trace message that a
        # front end still loading plotly's JavaScript could miss (the "empty plot under load" of the browser test)
        self.heatmap = go.Figure(layout={"autosize": True})
        self.topk_fig = go.Figure(layout={"width": 330, "height": 380})
        self.compare_heatmap = go.Figure(layout={"autosize": True})
        self.compare_box_widget = W.Box([], layout=W.Layout(display="none"))
        tag((self.layer, "lb-layer-slider"), (self.position, "lb-position-slider"), (self.target, "lb-target-box"),
            (self.stat, "lb-stat"), (self.run_button, "lb-run"))
        self.run_button.on_click(lambda _b: self.run())
        self.stat.observe(lambda _c: self._redraw(), names="value")
        self.lens_switch.observe(lambda _c: self._redraw(), names="value")
        self.target.observe(lambda _c: self._retarget(), names="value")
        self.layer.observe(lambda _c: self._draw_topk(), names="value")
        self.position.observe(lambda _c: self._draw_topk(), names="value")
        self.run()
        self.heatmap, self.topk_fig, self.compare_heatmap = (
            go.FigureWidget(f) for f in (self.heatmap, self.topk_fig, self.compare_heatmap))
        self.compare_box_widget.children = (self.compare_heatmap,)
        controls = W.VBox([W.HBox([self.text_box, self.run_button]), self.compare_box,
                           W.HBox([self.stat, self.target, self.lens_switch], layout=W.Layout(flex_flow="row wrap")),
                           self.error, self.status])
        side = W.VBox([self.layer, self.position, self.topk_fig], layout=W.Layout(width="340px", min_width="340px"))
        super().__init__([controls, W.HBox([W.Box([self.heatmap], layout=W.Layout(flex="1 1 auto", min_width="0")),
                                            side]), self.compare_box_widget])
        self.add_class("lb-lens-explorer")

    # ---- model work (only on a new text)
    def _compute(self, text: str) -> dict[str, lb.LensResult]:
        out = {"logit": lb.logit_lens(self.m, text, top_k=self.top_k, keep_hidden=True, progress=False)}
        if self.tuned is not None:
            out["tuned"] = lb.logit_lens(self.m, text, top_k=self.top_k, lens=self.tuned, keep_hidden=True,
                                         progress=False)
        return out

    def run(self) -> None:
        """Run the lens on the text box (and the compare box); the only place the model is called."""
        self.error.value = ""
        try:
            self.results = self._compute(self.text_box.value)
            cmp = self.compare_box.value
            self.compare_results = self._compute(cmp) if cmp.strip() else {}
            if self.target.value:
                self._apply_target()
        except USER_ERRORS as e:
            self.error.value = error_html(e)
            return
        T = len(self.results["logit"].tokens)
        self.position.max = T - 1
        self.position.value = T - 1
        self._redraw()

    def _apply_target(self) -> None:
        tgt = self.target.value or None
        self.results = {k: r.retarget(self.m, tgt) for k, r in self.results.items()}
        self.compare_results = {k: r.retarget(self.m, tgt) for k, r in self.compare_results.items()}

    def _retarget(self) -> None:
        self.error.value = ""
        if not self.results:
            return
        try:
            self._apply_target()
        except USER_ERRORS as e:
            self.error.value = error_html(e)
            return
        if self.target.value and self.stat.value not in ("target_prob", "target_rank"):
            self.stat.value = "target_prob"  # triggers a redraw
        else:
            self._redraw()

    # ---- drawing (no model pass)
    @property
    def current(self) -> lb.LensResult:
        return self.results[self.lens_switch.value]

    def _fill(self, fig: go.FigureWidget, res: lb.LensResult, title_prefix: str = "") -> None:
        new = lens_heatmap(res, stat=self.stat.value)
        with fig.batch_update():
            if not fig.data:
                fig.add_trace(new.data[0])
            else:
                z, text, hover = lens_heatmap_data(res, self.stat.value)
                tr = fig.data[0]
                tr.z, tr.text, tr.hovertext, tr.x, tr.y = z, text, hover, new.data[0].x, new.data[0].y
                tr.colorbar.title.text = self.stat.value
            fig.layout.title = title_prefix + new.layout.title.text
            fig.layout.height = new.layout.height
            fig.layout.xaxis.title = new.layout.xaxis.title
            fig.layout.yaxis.title = new.layout.yaxis.title
            fig.layout.margin = new.layout.margin

    def _redraw(self) -> None:
        if not self.results:
            return
        self._fill(self.heatmap, self.current)
        if self.compare_results:
            self._fill(self.compare_heatmap, self.compare_results[self.lens_switch.value], "compare · ")
            self.compare_box_widget.layout.display = "flex"
        else:
            self.compare_heatmap.data = []
            self.compare_box_widget.layout.display = "none"
        self._draw_topk()
        r = self.current
        self.status.value = status_html(f"{r.lens} lens · {len(r.layers)} layers × {len(r.tokens)} tokens · "
                                        f"{r.model_name}", "note")

    # ---- selection from outside (e.g. the Workbench); no model pass
    def show_layer(self, layer: int) -> None:
        """Select ``layer`` (clamped to 0..L): the top-k panel and the outlined heatmap cell follow."""
        self.layer.value = max(self.layer.min, min(self.layer.max, int(layer)))

    def show_position(self, position: int) -> None:
        """Select token ``position`` (clamped to the text): the top-k panel and the outlined cell follow."""
        self.position.value = max(self.position.min, min(self.position.max, int(position)))

    def _mark_selection(self, li: int, t: int) -> None:
        box = dict(type="rect", xref="x", yref="y", x0=t - 0.5, x1=t + 0.5, y0=li - 0.5, y1=li + 0.5,
                   line=dict(color="#e4572e", width=3), fillcolor="rgba(0,0,0,0)")
        self.heatmap.layout.shapes = [box]

    def _draw_topk(self) -> None:
        if not self.results:
            return
        r = self.current
        li = r.layers.index(self.layer.value) if self.layer.value in r.layers else len(r.layers) - 1
        t = min(self.position.value, len(r.tokens) - 1)
        toks = r.top_tokens(self.top_k)[li][t]
        probs = r.top_probs[li, t].tolist()
        title = f"layer {r.layers[li]} · pos {t} {r.tokens[t]!r}: top-{len(toks)}"
        self._mark_selection(li, t)
        with self.topk_fig.batch_update():
            labels = [repr(x) for x in toks][::-1]
            if not self.topk_fig.data:
                self.topk_fig.add_trace(go.Bar(x=probs[::-1], y=labels, orientation="h"))
            else:
                self.topk_fig.data[0].x, self.topk_fig.data[0].y = probs[::-1], labels
            self.topk_fig.layout.title = {"text": title, "font": {"size": 12}}
            self.topk_fig.layout.xaxis.title = "probability"
            self.topk_fig.layout.height = 380
            self.topk_fig.layout.margin = dict(l=110, r=10, t=50, b=40)

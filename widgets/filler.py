"""``FillerExplorer``: token-class ablation bars (class removal vs random control, CIs that resample texts, with
n), filler-sweep curves per filler kind (CIs over items), and a text view of what was removed.

The probes run once at construction (or pass precomputed results); every control only redraws.
"""

from __future__ import annotations

import html

import ipywidgets as W
import plotly.graph_objects as go

import lensbench as lb

from ._chrome import USER_ERRORS, error_html, tag
from ._figsync import SyncedVBox


class FillerExplorer(SyncedVBox):
    """Explore :func:`lensbench.filler_ablation` and :func:`lensbench.filler_sweep` results.

    Args:
        m: a :class:`lensbench.LensModel` (may be None when both results are given).
        texts: texts or items for the ablation (default: three shipped sample texts, first 600 characters).
        items: items for the sweep (default: 8 shipped factual items).
        ablation, sweep: precomputed results (skip the corresponding probe).
        classes, fillers, counts: forwarded to the probes; ablation_options / sweep_options: further keywords.

    Attributes:
        ablation, sweep: the results; ablation_metric, sweep_metric, cls, text_index, control: the controls;
        ablation_fig, sweep_fig: plotly FigureWidgets; text: the removal view.
    """

    def __init__(self, m=None, texts=None, items=None, *, ablation=None, sweep=None,
                 classes=("punctuation", "stopwords", "articles"), fillers=(" .", "counting", "random_words"),
                 counts=(0, 4, 16), ablation_options: dict | None = None, sweep_options: dict | None = None):
        self.m = m
        self.error = W.HTML("")
        self.ablation, self.sweep = ablation, sweep
        try:
            if self.ablation is None:
                texts = texts if texts is not None else [t[:600] for t in lb.sample_texts(3)]
                self.ablation = lb.filler_ablation(m, texts, classes=classes, progress=False,
                                                   **(ablation_options or {}))
            if self.sweep is None:
                items = items if items is not None else lb.tasks.factual(style="cloze")[::30][:8]
                self.sweep = lb.filler_sweep(m, items, fillers=fillers, counts=counts, progress=False,
                                             **(sweep_options or {}))
        except USER_ERRORS as e:
            self.error.value = error_html(e)
        has_acc = self.ablation is not None and bool(self.ablation.correct_orig.isfinite().any())
        self.ablation_metric = W.Dropdown(options=[("Δ loss", "delta_loss")] + ([("accuracy", "accuracy")]
                                          if has_acc else []), description="ablation")
        self.sweep_metric = W.Dropdown(options=[("Δ log p vs N=0", "delta_logprob"), ("log p(answer)", "logprob"),
                                                ("exact match", "accuracy")], description="sweep")
        if self.sweep is not None and 0 not in self.sweep.counts:
            self.sweep_metric.options = self.sweep_metric.options[1:]
        n_texts = len(self.ablation.contexts) if self.ablation is not None else 1
        self.cls = W.Dropdown(options=list(self.ablation.classes) if self.ablation is not None else [],
                              description="class")
        self.text_index = W.IntSlider(value=0, min=0, max=max(0, n_texts - 1), description="text")
        self.control = W.ToggleButtons(options=[("class removed", False), ("random control", True)], value=False)
        self.ablation_fig = go.FigureWidget()
        self.sweep_fig = go.FigureWidget()
        self.text = W.HTML("")
        self.stats = W.HTML("")
        tag((self.ablation_metric, "lb-filler-ablation-metric"), (self.sweep_metric, "lb-filler-sweep-metric"),
            (self.cls, "lb-filler-class"), (self.text_index, "lb-filler-index"), (self.control, "lb-filler-control"),
            (self.text, "lb-filler-textview"), (self.ablation_fig, "lb-filler-ablation-plot"),
            (self.sweep_fig, "lb-filler-sweep-plot"))
        self.ablation_metric.observe(lambda _c: self.draw_ablation(), names="value")
        self.sweep_metric.observe(lambda _c: self.draw_sweep(), names="value")
        for w in (self.cls, self.text_index, self.control):
            w.observe(lambda _c: self.draw_text(), names="value")
        super().__init__([self.error, W.HBox([self.ablation_metric, self.sweep_metric]),
                          W.HBox([self.ablation_fig, self.sweep_fig]),
                          W.HBox([self.cls, self.text_index, self.control]), self.stats, self.text])
        self.add_class("lb-filler-explorer")
        self.draw_ablation()
        self.draw_sweep()
        self.draw_text()

    @staticmethod
    def _set(target: go.FigureWidget, fig: go.Figure) -> None:
        with target.batch_update():
            target.data = []
            for tr in fig.data:
                target.add_trace(tr)
            fig.layout.width = 560
            target.layout = fig.layout

    def draw_ablation(self) -> None:
        if self.ablation is not None:
            self._set(self.ablation_fig, self.ablation.figure(self.ablation_metric.value))

    def draw_sweep(self) -> None:
        if self.sweep is not None and self.sweep_metric.value:
            self._set(self.sweep_fig, self.sweep.figure(self.sweep_metric.value))

    def draw_text(self) -> None:
        a = self.ablation
        if a is None or self.cls.value is None:
            return
        c, n = a.classes.index(self.cls.value), self.text_index.value
        removed = a.control_removed_tokens[c, 0, n] if self.control.value else a.removed_tokens[c, n]
        loss = a.loss_control[c, 0, n] if self.control.value else a.loss_class[c, n]
        self.stats.value = (f"<span class='lb-filler-stats'>{html.escape(self.cls.value)} · text {n}: "
                            f"{int(removed)} of {int(a.context_tokens[n])} context tokens "
                            f"{'replaced' if a.mode == 'replace' else 'removed'} · unit frequency "
                            f"{float(a.frequency[c, n]):.1%} · continuation loss {float(a.loss_orig[n]):.3f} → "
                            f"{float(loss):.3f} · stop-word list: {html.escape(str(a.settings.get('stopwords', '?')))}"
                            "</span>")
        self.text.value = a.removal_html(c, n, control=self.control.value)

"""``GeometryExplorer``: intrinsic dimension, overlap, cosine, anisotropy, linearity and loss correlation.

The model runs once, at construction (one capture of the texts, one of the shuffled prompt); every view is
then computed by public probe functions from that capture (``lb.intrinsic_dimension(m, capture, ...)``), so
switching estimator, scale, measure or layer never re-runs the model. Clouds follow the probes' defaults:
position 0 (the attention sink) is excluded; the **last layer** dropdown picks the last layer after the final
norm (HF ``hidden_states[-1]``, the papers') or before it; every figure's subtitle says which.
"""

from __future__ import annotations

import warnings

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

import lensbench as lb

from ._chrome import USER_ERRORS, error_html, tag
from ._figsync import SyncedVBox

VIEWS = [("ID profile", "id"), ("neighbourhood overlap", "overlap"), ("cosine similarity", "cosine"),
         ("anisotropy", "anisotropy"), ("linearity per layer", "linearity"),
         ("per-token nonlinearity", "nonlinearity"), ("shuffled vs original", "shuffle"),
         ("log-ID vs loss", "scatter")]

LAYER_VIEWS = ("id", "overlap", "cosine", "anisotropy", "linearity")  # views whose x axis is the layer


class GeometryExplorer(SyncedVBox):
    """Geometry views over one capture of ``texts``.

    Args:
        m: a :class:`lensbench.LensModel`.
        texts: prompts (several, for profiles and the loss correlation).
        prompt: the prompt for the per-token nonlinearity heatmap and the shuffle baseline (default texts[0]).
        shuffle_levels: block-shuffle levels S for the shuffled-vs-original view (() to skip).

    Attributes:
        capture: the :class:`lensbench.Capture` every view is computed from; fig: the plotly FigureWidget.
    """

    def __init__(self, m, texts, *, prompt: str | None = None, shuffle_levels=(0, 2, 5), k: int = 10):
        self.m = m
        self.error = W.HTML("")
        self.fig = go.FigureWidget()
        self.view = W.Dropdown(options=VIEWS, value="id", description="view")
        self.estimator = W.Dropdown(options=list(lb.probes.geometry.ESTIMATORS), value="gride",
                                    description="estimator")
        self.scale = W.Dropdown(options=[2, 4, 8, 16, 32], value=4, description="GRIDE n2")
        self.last_layer = W.Dropdown(options=[("after final norm", "post_norm"), ("before final norm", "pre_norm")],
                                     value="post_norm", description="last layer")
        self.layer = W.IntSlider(description="layer", min=0, max=m.n_layers, value=m.n_layers // 2,
                                 continuous_update=False)
        self.k = k
        tag((self.view, "lb-geo-view"), (self.estimator, "lb-geo-estimator"), (self.layer, "lb-geo-layer"))
        self.capture, self.prompt, self.linearity, self.shuffle = None, prompt or "", None, None
        try:  # bad input is shown in the explorer, never raised into the notebook
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.capture = m.capture(texts, progress=False)
                self.prompt = prompt or self.capture.texts[0]
                self.linearity = lb.linearity(m, self.capture, prompt=self.prompt, progress=False)
                self.shuffle = (lb.shuffle_baseline(m, self.prompt, levels=tuple(shuffle_levels), progress=False)
                                if shuffle_levels else None)
        except USER_ERRORS as e:
            self.capture = None
            self._startup_error = error_html(e)
        self._cache: dict = {}
        for w in (self.view, self.estimator, self.scale, self.layer, self.last_layer):
            w.observe(lambda _c: self.redraw(), names="value")
        super().__init__([W.HBox([self.view, self.estimator, self.scale, self.last_layer]), self.layer, self.error,
                          self.fig])
        self.add_class("lb-geometry-explorer")
        self.redraw()

    def measure(self, name: str) -> lb.GeometryResult:
        """A per-prompt measure from the held capture (memoised)."""
        key = (name, self.estimator.value, self.scale.value, self.last_layer.value)
        if key not in self._cache:
            ll = self.last_layer.value
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "id":
                    r = lb.intrinsic_dimension(self.m, self.capture, estimator=self.estimator.value,
                                               scale=self.scale.value, last_layer=ll)
                elif name == "overlap":
                    r = lb.neighborhood_overlap(self.m, self.capture, k=self.k, last_layer=ll)
                elif name == "cosine":
                    r = lb.cosine_similarity(self.m, self.capture, last_layer=ll)
                else:
                    r = lb.anisotropy(self.m, self.capture, last_layer=ll)
            self._cache[key] = r
        return self._cache[key]

    def _figure(self) -> go.Figure:
        v = self.view.value
        if v in ("id", "overlap", "cosine", "anisotropy"):
            return self.measure(v).figure()
        if v == "linearity":
            return self.linearity.figure()
        if v == "nonlinearity":
            return self.linearity.figure("per_token")
        if v == "shuffle":
            if self.shuffle is None:
                raise lb.InputError("no shuffle baseline: build the explorer with shuffle_levels=(0, 2, 5).")
            return self.shuffle.figure()
        res = self.measure("id")
        j = res.layers.index(self.layer.value)
        x, y = np.log(res.values[:, j]), res.loss
        fig = go.Figure(go.Scatter(x=x, y=y, mode="markers", text=[p[:40] for p in res.prompts]))
        title = f"layer {self.layer.value}: log ID vs loss over {len(y)} prompts"
        if len(y) >= 3:
            corr = lb.geometry_loss_correlation(res)
            title += f" · Pearson r = {corr.pearson_r[j]:.2f} (p = {corr.pearson_p[j]:.2g})"
        fig.update_layout(title=title, xaxis_title="log ID", yaxis_title="mean next-token loss", height=380)
        return fig

    def redraw(self) -> None:
        if self.capture is None:  # the texts were refused at construction: keep showing why
            self.error.value = getattr(self, "_startup_error", "")
            return
        self.error.value = ""
        try:
            new = self._figure()
        except USER_ERRORS as e:
            self.error.value = error_html(e)
            return
        with self.fig.batch_update():
            self.fig.data = []
            for tr in new.data:
                self.fig.add_trace(tr)
            self.fig.layout = new.layout
        if self.view.value in LAYER_VIEWS:  # click a point of a per-layer profile to pick that layer
            for tr in self.fig.data:
                tr.on_click(self._picked)

    def _picked(self, _trace, points, _state) -> None:
        if points.xs:
            self.pick_layer(int(round(float(points.xs[0]))))

    def pick_layer(self, layer: int) -> None:
        """Select ``layer`` (the ``layer`` slider; observers such as the Workbench follow). No model pass."""
        self.layer.value = max(self.layer.min, min(self.layer.max, int(layer)))

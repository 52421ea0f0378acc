"""``Workbench``: one app over every probe explorer — a model/text input, a tab per explorer, shared state.

Pick a token position in the lens and jump to its attribution; pick a layer in geometry and the lens shows that
layer. Model work (loading, building an explorer) runs in a background thread: the notebook's widgets stay live,
a progress line counts the model's forward passes, and **Cancel** stops the job at the next forward pass of a
block. A bad input (empty text, unknown model, a too-long text, ...) is shown as a message in the app.

Tabs come from a small registry, :data:`EXPLORERS` (name -> :class:`TabSpec`), so a new explorer becomes a tab
with one :func:`register_explorer` call. Each tab is built lazily (when first shown) and rebuilt only when what it
depends on (model, text, selected position) changed: switching back to a built tab, moving the lens sliders or
picking a geometry layer never runs the model.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import ipywidgets as W

import lensbench as lb
from lensbench.engine import Cancelled as EngineCancelled
from lensbench.engine import cancel_scope

from ._figsync import sync_figure_widgets

__all__ = ["Workbench", "TabSpec", "EXPLORERS", "register_explorer", "Cancelled"]


class Cancelled(Exception):  # noqa: N818 - reads naturally: "raise Cancelled"
    """Raised inside a Workbench job (at the next model forward) after **Cancel** was pressed."""


@dataclass
class TabSpec:
    """One Workbench tab.

    Attributes:
        name: the tab title.
        build: ``build(wb) -> widget``; runs in the worker thread and may run the model.
        key: ``key(wb) -> hashable``: the tab is rebuilt when this changes (default: model and text).
    """

    name: str
    build: Callable[[Workbench], W.Widget]
    key: Callable[[Workbench], Hashable] | None = None

    def key_for(self, wb: Workbench) -> Hashable:
        return self.key(wb) if self.key is not None else (id(wb.m), wb.text)


def _build_lens(wb: Workbench) -> W.Widget:
    from .lens import LogitLensExplorer
    ex = LogitLensExplorer(wb.m, wb.text, tuned=wb.tuned, **wb.options.get("lens", {}))
    for w in (ex.text_box, ex.run_button):  # the Workbench's own text box drives it
        w.layout.display = "none"
    return ex


def _build_geometry(wb: Workbench) -> W.Widget:
    from .geometry import GeometryExplorer
    texts = wb.geometry_texts if wb.geometry_texts is not None else (
        [wb.text] + [t[:400] for t in lb.sample_texts(3)])
    opts = {"shuffle_levels": ()}
    opts.update(wb.options.get("geometry", {}))
    ex = GeometryExplorer(wb.m, texts, prompt=wb.text, **opts)
    if wb.layer is not None:
        ex.pick_layer(wb.layer)
    return ex


def _build_attribution(wb: Workbench) -> W.Widget:
    from .attribution import AttributionExplorer
    prefix, target = wb.prediction_at(wb.position)
    opts = {"methods": ("saliency", "grad_x_input", "integrated_gradients", "occlusion"), "generate": 0}
    opts.update(wb.options.get("attribution", {}))
    return AttributionExplorer(wb.m, prefix, target=target, **opts)


def _build_critical(wb: Workbench) -> W.Widget:
    """Rollout criticality of the token at the selected position: prompt = the text before it, response = the
    rest, only that token evaluated (``positions=[0]``); default checker: the text's last word is reproduced."""
    import re

    from .critical import CriticalTokenExplorer
    opts = {"n_samples": 8, "max_new_tokens": 8}
    opts.update(wb.options.get("critical", {}))
    ids = wb.m.encode(wb.text)
    p = len(ids) - 1 if wb.position is None else min(wb.position, len(ids) - 1)
    if p < 1:
        raise lb.InputError("criticality needs at least one prompt token before the selected position; "
                            "pick a later position in the lens.")
    dec = wb.m.tokenizer.decode
    prompt, response = dec(ids[:p].tolist(), skip_special_tokens=True), dec(ids[p:].tolist(), skip_special_tokens=True)
    checker = opts.pop("checker", None)
    if checker is None:
        words = re.findall(r"\w+", wb.text)
        if not words:
            raise lb.InputError("the text has no word to check; pass options={'critical': {'checker': ...}}.")
        checker = lb.checkers.regex(re.escape(words[-1]))
    return CriticalTokenExplorer(wb.m, prompt, response, checker=checker, positions=[0], **opts)


def _build_filler(wb: Workbench) -> W.Widget:
    """Token-class ablation on the text (plus shipped texts, for spread) and the filler sweep. The ablation scores
    a continuation of each context, so a text of fewer than 24 words/punctuation marks is left out (a note says so)."""
    import re

    from .filler import FillerExplorer
    long_enough = len(re.findall(r"\w+|[^\w\s]", wb.text)) >= 24
    opts = {"texts": ([wb.text] if long_enough else []) + [t[:400] for t in lb.sample_texts(3 - long_enough)]}
    opts.update(wb.options.get("filler", {}))
    ex = FillerExplorer(wb.m, **opts)
    if not long_enough and "texts" not in wb.options.get("filler", {}):
        note = W.HTML("<small>The text is too short for the ablation (it scores a continuation): the ablation uses "
                      "three shipped texts. Type 24+ words to include yours.</small>")
        return W.VBox([note, ex])
    return ex


def _position_key(wb: Workbench) -> Hashable:
    return (id(wb.m), wb.text, wb.position)


#: The Workbench's tabs, in order: name -> :class:`TabSpec`. Extend with :func:`register_explorer`.
EXPLORERS: dict[str, TabSpec] = {
    "lens": TabSpec("lens", _build_lens),
    "geometry": TabSpec("geometry", _build_geometry),
    "attribution": TabSpec("attribution", _build_attribution, _position_key),
}
EXPLORERS["filler"] = TabSpec("filler", _build_filler)
EXPLORERS["criticality"] = TabSpec("criticality", _build_critical, _position_key)


def register_explorer(name: str, build: Callable[[Workbench], W.Widget],
                      key: Callable[[Workbench], Hashable] | None = None) -> None:
    """Add (or replace) a Workbench tab: ``build(wb)`` returns the explorer widget (may run the model).

    ``key(wb)`` says when the tab is stale (default: model and text; use ``wb.position`` for a per-token view).
    """
    EXPLORERS[name] = TabSpec(name, build, key)


def _msg(text: str, colour: str = "#b00", icon: str = "⚠") -> str:
    return f"<span style='color:{colour}'>{icon} {html.escape(text)}</span>"


class Workbench(W.VBox):
    """Every probe explorer in one app, linked.

    Args:
        m: a :class:`lensbench.LensModel`; anything else :func:`lensbench.load` accepts (``None``/``"default"``,
            a hub id, a directory, an nnsight ``LanguageModel``, a ``TransformerBridge``) is loaded in the background.
        text: the text every tab looks at.
        tuned: optional :class:`lensbench.TunedLens` for the lens tab's logit/tuned switch.
        geometry_texts: texts for the geometry tab (default: ``text`` plus three shipped sample texts).
        tabs: names from :data:`EXPLORERS` to show (default: all registered).
        options: per-tab keyword arguments for the explorers, e.g. ``{"attribution": {"methods": ("saliency",)}}``.
        background: run model work in a worker thread (default). ``False`` runs it in the caller (scripts).

    Attributes:
        m, text: the current model and text; position: the selected token position (the lens position slider;
            the attribution tab explains the prediction made there); layer: the selected layer.
        explorers: tab name -> the built explorer widget.
        message: an ``HTML`` widget where errors and job outcomes are shown (never a traceback in the notebook).
        last_error: the exception behind the last error message (for debugging), or None.
    """

    def __init__(self, m=None, text: str = "The capital of France is Paris.", *, tuned=None,
                 geometry_texts: list[str] | None = None, tabs: list[str] | None = None,
                 options: dict | None = None, background: bool = True):
        self.m = m if isinstance(m, lb.LensModel) else None
        self.tuned, self.geometry_texts, self.background = tuned, geometry_texts, background
        self.options = options or {}
        names = list(EXPLORERS) if tabs is None else list(tabs)
        unknown = [n for n in names if n not in EXPLORERS]
        if unknown:
            raise lb.InputError(f"tabs={unknown} are not registered explorers; choose from {list(EXPLORERS)}.")
        self.specs = [EXPLORERS[n] for n in names]
        self.text = text
        self.position: int | None = None
        self.layer: int | None = None
        self.explorers: dict[str, W.Widget] = {}
        self._built: dict[str, Hashable] = {}
        self.last_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._hooks: list = []
        self._passes = 0
        self._t0 = 0.0
        self._last_ui = 0.0

        # ---- input row
        shown = self.m.name if self.m is not None else (m if isinstance(m, str) else
                                                         "default" if m is None else type(m).__name__)
        self.model_box = W.Text(value=shown, description="model",
                                placeholder="default, a hub id or a local directory", layout=W.Layout(width="420px"))
        self.load_button = W.Button(description="Load", icon="download")
        self.text_box = W.Textarea(value=text, description="text", layout=W.Layout(width="70%", height="56px"))
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.cancel_button = W.Button(description="Cancel", button_style="warning", icon="stop", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="200px"))
        self.progress_label = W.HTML("")
        self.message = W.HTML("")
        for w, cls in ((self.model_box, "lb-wb-model"), (self.load_button, "lb-wb-load"),
                       (self.text_box, "lb-wb-text"), (self.run_button, "lb-wb-run"),
                       (self.cancel_button, "lb-wb-cancel"), (self.progress, "lb-wb-progress"),
                       (self.progress_label, "lb-wb-progress-label"), (self.message, "lb-wb-message")):
            w.add_class(cls)
        self.load_button.on_click(lambda _b: self.load(self.model_box.value))
        self.run_button.on_click(lambda _b: self.run())
        self.cancel_button.on_click(lambda _b: self.cancel())

        # ---- link buttons (pure UI until the target tab is built)
        self.to_attribution = W.Button(description="Attribute this position →", icon="arrow-right",
                                       tooltip="explain the prediction at the selected lens position",
                                       layout=W.Layout(width="auto"))
        self.to_attribution.add_class("lb-wb-to-attribution")
        self.to_attribution.on_click(lambda _b: self.jump_to_attribution())
        self.to_lens = W.Button(description="Lens at this layer →", icon="arrow-right",
                                tooltip="show the logit lens at the layer picked here",
                                layout=W.Layout(width="auto"))
        self.to_lens.add_class("lb-wb-to-lens")
        self.to_lens.on_click(lambda _b: self.show_lens_layer(self._geometry_layer()))
        self.to_critical = W.Button(description="Criticality of this token →", icon="arrow-right",
                                    tooltip="rollouts keeping vs replacing the token at the selected lens position",
                                    layout=W.Layout(width="auto"))
        self.to_critical.add_class("lb-wb-to-critical")
        self.to_critical.on_click(lambda _b: self.jump_to_criticality())
        self.link_bars = {"lens": [b for b, n in ((self.to_attribution, "attribution"),
                                                   (self.to_critical, "criticality")) if n in names],
                          "geometry": [self.to_lens] if "lens" in names else []}

        # ---- tabs
        self.holders = {s.name: W.VBox([W.HTML("<i>not computed yet</i>")]) for s in self.specs}
        pages = [W.VBox([W.HBox(self.link_bars.get(s.name, [])), self.holders[s.name]]) for s in self.specs]
        self.tabs = W.Tab(children=pages)
        for i, s in enumerate(self.specs):
            self.tabs.set_title(i, s.name)
        self.tabs.add_class("lb-wb-tabs")
        self.tabs.observe(lambda _c: self._ensure_selected(), names="selected_index")

        header = W.VBox([W.HBox([self.model_box, self.load_button]),
                         W.HBox([self.text_box, W.VBox([self.run_button, self.cancel_button])]),
                         W.HBox([self.progress, self.progress_label]), self.message])
        super().__init__([header, self.tabs])
        self.add_class("lb-workbench")
        self._update_links()
        if self.m is None:
            self.load(m)
        else:
            self.run()

    # ------------------------------------------------------------------ public actions
    @property
    def busy(self) -> bool:
        """True while a background job runs (a job's own follow-up, started from its thread, is allowed)."""
        t = self._thread
        return t is not None and t.is_alive() and t is not threading.current_thread()

    def _repr_mimebundle_(self, **kw):
        sync_figure_widgets(self)
        return super()._repr_mimebundle_(**kw)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current job ends (scripts and tests); True if nothing is running any more."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (t := self._thread) is not None and t is not threading.current_thread():
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():  # timed out
                return False
            if self._thread is t:  # no follow-up job was started
                break
        return not self.busy

    def cancel(self) -> None:
        """Stop the running job at the model's next forward pass; already-built tabs stay as they were."""
        if self.busy:
            self._cancel.set()
            self.progress_label.value = "<small>cancelling…</small>"

    def load(self, model=None) -> bool:
        """Load ``model`` (None/"default", a hub id, a directory, or any object :func:`lensbench.load` takes)
        in the background, then run on the text. Cancel takes effect once loading returns (the result is dropped)."""
        if isinstance(model, str):
            spec = None if model.strip() in ("", "default") else model.strip()
        else:
            spec = model

        def job():
            m = lb.load(spec)
            self._check_cancel()
            self.m = m
            self.model_box.value = m.name
            self._invalidate()
            return lambda: self.run()
        what = spec if isinstance(spec, str) else ("the default model" if spec is None else type(spec).__name__)
        return self._start(f"loading {what}", job)

    def run(self, text: str | None = None) -> bool:
        """Take the text box (or ``text``), forget stale tabs, and build the tab on screen."""
        if self.busy:
            self.message.value = _msg("busy: wait for the running job or press Cancel.", "#a60", "⏳")
            return False
        if text is not None:
            self.text_box.value = text
        new = self.text_box.value
        if not new.strip():
            self._error("text is empty: type a sentence in the text box, then press Run.")
            return False
        if self.m is None:
            self._error("no model loaded: press Load (empty or 'default' loads the embedded model).")
            return False
        if new != self.text:
            self.position = None
        self.text = new
        self.message.value = ""
        return self._ensure_selected()

    def select_tab(self, name: str) -> None:
        """Show tab ``name`` (builds it in the background if it is missing or stale)."""
        i = [s.name for s in self.specs].index(name)
        if self.tabs.selected_index == i:
            self._ensure_selected()  # already shown: rebuild if stale (no change event would fire)
        else:
            self.tabs.selected_index = i

    def jump_to_attribution(self, position: int | None = None) -> None:
        """Explain the prediction at lens ``position`` (default: the lens's selected position) in the attribution tab."""
        if position is not None:
            self.set_position(position)
        self.select_tab("attribution")

    def jump_to_criticality(self, position: int | None = None) -> None:
        """Rollout criticality of the token at lens ``position`` (default: the selected one) in its tab."""
        if position is not None:
            self.set_position(position)
        self.select_tab("criticality")

    def set_position(self, position: int) -> None:
        """Select a token position (moves the lens position slider when the lens is built). No model pass."""
        lens = self.explorers.get("lens")
        if lens is not None and self._built.get("lens") == EXPLORERS["lens"].key_for(self):
            lens.show_position(position)  # its observer sets self.position (clamped)
        else:
            self.position = int(position)
            self._update_links()

    def show_lens_layer(self, layer: int) -> None:
        """Show the lens at ``layer`` (top-k panel and outlined cell) and switch to the lens tab."""
        self.layer = int(layer)
        if "lens" in self.explorers:
            self.explorers["lens"].show_layer(layer)
        self.select_tab("lens")

    def tokens(self) -> list[str]:
        """The text's tokens as the probes see them (tokenizer only, no model pass)."""
        return self.m.to_str_tokens(self.m.encode(self.text))

    def prediction_at(self, position: int | None) -> tuple[str, int | None]:
        """``(prefix text, target id)`` for the prediction made at ``position`` (None: the last token).

        The prefix is the text up to and including token ``position``; the target is the text's next token, or
        None (the model's greedy next token) at the last position.
        """
        ids = self.m.encode(self.text)
        T = len(ids)
        if position is None or position >= T - 1:
            return self.text, None
        if position < 0:
            raise lb.InputError(f"position={position} must be >= 0.")
        prefix = self.m.tokenizer.decode(ids[:position + 1].tolist(), skip_special_tokens=True)
        return prefix, int(ids[position + 1])

    # ------------------------------------------------------------------ tab building
    def _ensure_selected(self) -> bool:
        if not self.specs or self.m is None or self.tabs.selected_index is None:
            return False
        spec = self.specs[self.tabs.selected_index]
        if self._built.get(spec.name) == spec.key_for(self):
            return False
        if self.busy:  # built when the running job ends
            return False
        return self._start(f"building {spec.name}", lambda: self._build(spec))

    def _build(self, spec: TabSpec):
        key = spec.key_for(self)
        ex = spec.build(self)
        self._check_cancel()
        self.explorers[spec.name] = ex
        self._built[spec.name] = key
        sync_figure_widgets(ex)  # the figures' full state travels with the view (no lost first draw)
        self.holders[spec.name].children = [ex]
        if spec.name == "lens":
            ex.position.observe(lambda c: self._on_lens_position(c["new"]), names="value")
            ex.layer.observe(lambda c: setattr(self, "layer", c["new"]), names="value")
            self.position = None if self.position is None else min(self.position, ex.position.max)
            if self.position is not None:
                ex.show_position(self.position)
            if self.layer is not None:
                ex.show_layer(self.layer)
        elif spec.name == "geometry":
            ex.layer.observe(lambda c: self._on_geometry_layer(c["new"]), names="value")
        err = getattr(ex, "error", None)
        if isinstance(err, W.HTML) and err.value:
            self.message.value = err.value  # the explorer's own message, repeated at the top
        self._update_links()
        return None

    def _invalidate(self) -> None:
        self._built.clear()
        self.explorers.clear()
        self.position = None
        for h in self.holders.values():
            h.children = [W.HTML("<i>not computed yet</i>")]

    def _on_lens_position(self, p: int) -> None:
        self.position = int(p)
        self._update_links()

    def _on_geometry_layer(self, layer: int) -> None:
        self.layer = int(layer)
        if "lens" in self.explorers:
            self.explorers["lens"].show_layer(layer)  # no model pass
        self._update_links()

    def _geometry_layer(self) -> int:
        geo = self.explorers.get("geometry")
        if geo is not None:
            return int(geo.layer.value)
        return self.layer if self.layer is not None else (self.m.n_layers if self.m is not None else 0)

    def _update_links(self) -> None:
        p = "last" if self.position is None else self.position
        self.to_attribution.description = f"Attribute position {p} →"
        self.to_critical.description = f"Criticality of token {p} →"
        self.to_lens.description = f"Lens at layer {self._geometry_layer()} →"

    # ------------------------------------------------------------------ jobs
    def _error(self, text: str, exc: BaseException | None = None) -> None:
        self.last_error = exc
        self.message.value = _msg(text)

    def _check_cancel(self) -> None:
        if self._cancel.is_set() and threading.current_thread() is self._worker:
            raise Cancelled

    def _on_forward(self, *_args) -> None:
        if threading.current_thread() is not self._worker:
            return
        self._check_cancel()

    def _on_model_forward(self, *_args) -> None:
        if threading.current_thread() is not self._worker:
            return
        self._check_cancel()
        self._passes += 1
        now = time.perf_counter()
        if now - self._last_ui > 0.25:
            self._last_ui = now
            self.progress_label.value = (f"<small>{html.escape(self._label)} · {self._passes} forward passes · "
                                         f"{now - self._t0:.1f} s</small>")

    def _install_hooks(self) -> None:
        if self.m is None:
            return
        self._hooks.append(self.m.model.register_forward_pre_hook(self._on_model_forward))
        for blk in self.m.blocks:
            self._hooks.append(blk.register_forward_pre_hook(self._on_forward))

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _start(self, label: str, job: Callable[[], Callable | None]) -> bool:
        with self._lock:
            if self.busy:
                self.message.value = _msg("busy: wait for the running job or press Cancel.", "#a60", "⏳")
                return False
            self._cancel.clear()
            self._label, self._passes, self._t0, self._last_ui = label, 0, time.perf_counter(), 0.0
            self.progress.max, self.progress.value, self.progress.bar_style = 1, 0, "info"
            self.progress_label.value = f"<small>{html.escape(label)}…</small>"
            self.run_button.disabled = self.load_button.disabled = True
            self.cancel_button.disabled = False
            if self.background:
                self._thread = threading.Thread(target=self._work, args=(job,), daemon=True, name="lb-workbench")
                self._worker = self._thread
                self._thread.start()
                return True
        self._worker = threading.current_thread()
        self._work(job)
        return True

    def _work(self, job) -> None:
        then = None
        outcome, style = "done", "success"
        self._install_hooks()
        try:
            with cancel_scope(self._cancel):  # every engine primitive stops at its next batch or step, too
                then = job()
        except (Cancelled, EngineCancelled):
            outcome, style = "cancelled", "warning"
            self.message.value = _msg(f"{self._label}: cancelled (press Run or revisit the tab to redo it).",
                                      "#a60", "■")
        except (lb.LensbenchError, ValueError) as e:
            outcome, style = "failed", "danger"
            self._error(str(e), e)
        except Exception as e:  # noqa: BLE001 - shown in the app, never as a kernel traceback
            outcome, style = "failed", "danger"
            self._error(f"{type(e).__name__}: {e}", e)
        finally:
            self._remove_hooks()
            dt = time.perf_counter() - self._t0
            self.progress.value, self.progress.bar_style = 1, style
            self.progress_label.value = (f"<small>{html.escape(self._label)}: {outcome} · {self._passes} forward "
                                         f"passes · {dt:.1f} s</small>")
            self.run_button.disabled = self.load_button.disabled = False
            self.cancel_button.disabled = True
            self._worker = None
        if outcome == "done":
            if then is not None:
                then()
            else:
                self._ensure_selected()  # a tab selected while this job ran

"""``Workbench``: one app over every probe explorer — a model/text input, a tab per explorer, shared state.

Pick a token position in the lens and jump to its attribution; pick a layer in geometry and the lens shows that
layer. Model work (loading, building an explorer) runs in a background thread (:class:`~._jobs.JobRunner`): the
notebook's widgets stay live, a progress line counts the model's forward passes, and **Cancel** stops the job at
the next forward pass of a block. A bad input (empty text, unknown model, a too-long text, ...) is shown as a
message in the app.

Tabs come from a small registry, :data:`EXPLORERS` (name -> :class:`TabSpec`), so a new explorer becomes a tab
with one :func:`register_explorer` call. Each tab is built lazily (when first shown) and rebuilt only when what it
depends on (model, text, selected position) changed: switching back to a built tab, moving the lens sliders or
picking a geometry layer never runs the model.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import ipywidgets as W

import lensbench as lb

from ._chrome import placeholder_html, tag
from ._figsync import SyncedVBox, sync_figure_widgets
from ._jobs import Cancelled, JobRunner
from ._tabs import DEFAULT_TABS, Link, TabSpec

__all__ = ["Workbench", "TabSpec", "Link", "EXPLORERS", "register_explorer", "Cancelled"]

#: The Workbench's tabs, in order: name -> :class:`TabSpec`. Extend with :func:`register_explorer`.
EXPLORERS: dict[str, TabSpec] = {spec.name: spec for spec in DEFAULT_TABS}


def register_explorer(name: str, build: Callable[[Workbench], W.Widget],
                      key: Callable[[Workbench], Hashable] | None = None, *, needs: tuple[str, ...] = (),
                      attach: Callable[[Workbench, W.Widget], None] | None = None,
                      links: tuple[Link, ...] = ()) -> None:
    """Add (or replace) a Workbench tab: ``build(wb)`` returns the explorer widget (may run the model).

    ``key(wb)`` says when the tab is stale (default: model and text, plus the Workbench attributes in ``needs``;
    ``needs=("position",)`` for a per-token view). ``attach(wb, widget)`` and ``links``: see :class:`TabSpec`.
    """
    EXPLORERS[name] = TabSpec(name, build, key, needs=tuple(needs), attach=attach, links=tuple(links))


_NOT_COMPUTED = "not computed yet"


class Workbench(SyncedVBox):
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
        to_attribution, to_critical, to_lens: the link buttons (one attribute per :class:`Link` of a shown tab);
            links: ``(Link, button)`` pairs.
        jobs: the :class:`~._jobs.JobRunner` that runs the model work.
    """

    def __init__(self, m=None, text: str = "The capital of France is Paris.", *, tuned=None,
                 geometry_texts: list[str] | None = None, tabs: list[str] | None = None,
                 options: dict | None = None, background: bool = True):
        self.m = m if isinstance(m, lb.LensModel) else None
        self.tuned, self.geometry_texts = tuned, geometry_texts
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
        tag((self.model_box, "lb-wb-model"), (self.load_button, "lb-wb-load"), (self.text_box, "lb-wb-text"),
            (self.run_button, "lb-wb-run"), (self.cancel_button, "lb-wb-cancel"), (self.progress, "lb-wb-progress"),
            (self.progress_label, "lb-wb-progress-label"), (self.message, "lb-wb-message"))
        self.load_button.on_click(lambda _b: self.load(self.model_box.value))
        self.run_button.on_click(lambda _b: self.run())
        self.cancel_button.on_click(lambda _b: self.cancel())
        self.jobs = JobRunner(progress=self.progress, label=self.progress_label, message=self.message,
                              cancel_button=self.cancel_button, locked=(self.run_button, self.load_button),
                              model=lambda: self.m, background=background, on_idle=self._ensure_selected,
                              thread_name="lb-workbench")

        # ---- tabs, each page with its link buttons (pure UI until the target tab is built)
        self.links: list[tuple[Link, W.Button]] = []
        self.holders = {s.name: W.VBox([W.HTML(placeholder_html(_NOT_COMPUTED))]) for s in self.specs}
        pages = []
        for s in self.specs:
            bar = []
            for link in s.links:
                b = W.Button(description=link.label(self), icon="arrow-right", tooltip=link.tooltip,
                             layout=W.Layout(width="auto"))
                b.add_class(link.css)
                b.on_click(lambda _b, link=link: link.follow(self))
                setattr(self, link.attr, b)
                self.links.append((link, b))
                if link.target in names:
                    bar.append(b)
            pages.append(W.VBox([W.HBox(bar), self.holders[s.name]]))
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
        return self.jobs.busy

    @property
    def last_error(self) -> BaseException | None:
        """The exception behind the last error message, or None."""
        return self.jobs.last_error

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current job ends (scripts and tests); True if nothing is running any more."""
        return self.jobs.wait(timeout)

    def cancel(self) -> None:
        """Stop the running job at the model's next forward pass; already-built tabs stay as they were."""
        self.jobs.cancel()

    def load(self, model=None) -> bool:
        """Load ``model`` (None/"default", a hub id, a directory, or any object :func:`lensbench.load` takes)
        in the background, then run on the text. Cancel takes effect once loading returns (the result is dropped)."""
        if isinstance(model, str):
            spec = None if model.strip() in ("", "default") else model.strip()
        else:
            spec = model
        what = spec if isinstance(spec, str) else ("the default model" if spec is None else type(spec).__name__)
        return self.jobs.start(f"loading {what}", lambda: lb.load(spec), deliver=self._adopt, then=self.run)

    def run(self, text: str | None = None) -> bool:
        """Take the text box (or ``text``), forget stale tabs, and build the tab on screen."""
        if self.busy:
            return self.jobs.refuse_busy()
        if text is not None:
            self.text_box.value = text
        new = self.text_box.value
        if not new.strip():
            self.jobs.show_error("text is empty: type a sentence in the text box, then press Run.")
            return False
        if self.m is None:
            self.jobs.show_error("no model loaded: press Load (empty or 'default' loads the embedded model).")
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
        if self.is_current("lens"):
            self.explorers["lens"].show_position(position)  # its observer sets self.position (clamped)
        else:
            self.note_selection(position=position)

    def show_lens_layer(self, layer: int) -> None:
        """Show the lens at ``layer`` (top-k panel and outlined cell) and switch to the lens tab."""
        self.layer = int(layer)
        if "lens" in self.explorers:
            self.explorers["lens"].show_layer(layer)
        self.select_tab("lens")

    def note_selection(self, *, position: int | None = None, layer: int | None = None) -> None:
        """Record a selected position and/or layer made in a tab and refresh the link buttons. No model pass."""
        if position is not None:
            self.position = int(position)
        if layer is not None:
            self.layer = int(layer)
        self._update_links()

    def is_current(self, name: str) -> bool:
        """True when tab ``name`` is built and not stale."""
        return name in self.explorers and self._built.get(name) == EXPLORERS[name].key_for(self)

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

        def work():
            key = spec.key_for(self)
            return key, spec.build(self)
        return self.jobs.start(f"building {spec.name}", work, deliver=lambda built: self._install(spec, *built))

    def _install(self, spec: TabSpec, key: Hashable, ex: W.Widget) -> None:
        self.explorers[spec.name] = ex
        self._built[spec.name] = key
        sync_figure_widgets(ex)  # the figures' full state travels with the view (no lost first draw)
        self.holders[spec.name].children = [ex]
        if spec.attach is not None:
            spec.attach(self, ex)
        err = getattr(ex, "error", None)
        if isinstance(err, W.HTML) and err.value:
            self.message.value = err.value  # the explorer's own message, repeated at the top
        self._update_links()

    def _adopt(self, m: lb.LensModel) -> None:
        self.m = m
        self.model_box.value = m.name
        self._invalidate()

    def _invalidate(self) -> None:
        self._built.clear()
        self.explorers.clear()
        self.position = None
        for h in self.holders.values():
            h.children = [W.HTML(placeholder_html(_NOT_COMPUTED))]

    def _update_links(self) -> None:
        for link, button in self.links:
            button.description = link.label(self)


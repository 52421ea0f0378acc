"""The Workbench's tabs: each is one :class:`TabSpec` — its title, how to build it, what it depends on, how it
joins the shared selection once built, and the link buttons its page carries.

Builders run in the Workbench's job thread and may run the model; ``attach`` hooks and links never do.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ipywidgets as W

import lensbench as lb

from ._chrome import status_html

if TYPE_CHECKING:
    from .workbench import Workbench

__all__ = ["Link", "TabSpec", "DEFAULT_TABS"]


@dataclass(frozen=True)
class Link:
    """A button on a tab's page that opens another tab.

    Attributes:
        target: the tab it opens; the button is shown only when that tab is in the Workbench.
        attr: the Workbench attribute that holds the button (e.g. ``"to_attribution"``); css: its DOM class.
        label: ``label(wb) -> str``, refreshed whenever the selection changes; tooltip: its hover text.
        follow: ``follow(wb)``, run on click.
    """

    target: str
    attr: str
    css: str
    label: Callable[[Workbench], str]
    tooltip: str
    follow: Callable[[Workbench], None]


@dataclass
class TabSpec:
    """One Workbench tab.

    Attributes:
        name: the tab title (and its name in :data:`~lensbench.widgets.workbench.EXPLORERS`).
        build: ``build(wb) -> widget``; runs in the worker thread and may run the model.
        key: ``key(wb) -> hashable``: the tab is rebuilt when this changes (default: model, text and ``needs``).
        needs: further Workbench attributes the tab depends on (e.g. ``("position",)``), when ``key`` is None.
        attach: ``attach(wb, widget)``, run once a build is in place: observe its controls, apply the selection.
        links: the link buttons on this tab's page.
    """

    name: str
    build: Callable[[Workbench], W.Widget]
    key: Callable[[Workbench], Hashable] | None = None
    needs: tuple[str, ...] = ()
    attach: Callable[[Workbench, W.Widget], None] | None = None
    links: tuple[Link, ...] = ()

    def key_for(self, wb: Workbench) -> Hashable:
        """What the built tab was computed from; a different value means the tab is stale."""
        if self.key is not None:
            return self.key(wb)
        return (id(wb.m), wb.text, *(getattr(wb, n) for n in self.needs))


def _position_label(wb: Workbench) -> str:
    return "last" if wb.position is None else str(wb.position)


# ---------------------------------------------------------------------------------------------- lens
def _build_lens(wb: Workbench) -> W.Widget:
    from .lens import LogitLensExplorer
    ex = LogitLensExplorer(wb.m, wb.text, tuned=wb.tuned, **wb.options.get("lens", {}))
    for w in (ex.text_box, ex.run_button):  # the Workbench's own text box drives it
        w.layout.display = "none"
    return ex


def _attach_lens(wb: Workbench, ex: W.Widget) -> None:
    """The lens position slider is the Workbench's selected position; its layer slider the selected layer."""
    ex.position.observe(lambda c: wb.note_selection(position=c["new"]), names="value")
    ex.layer.observe(lambda c: wb.note_selection(layer=c["new"]), names="value")
    wb.position = None if wb.position is None else min(wb.position, ex.position.max)
    if wb.position is not None:
        ex.show_position(wb.position)
    if wb.layer is not None:
        ex.show_layer(wb.layer)


_LENS_LINKS = (
    Link("attribution", "to_attribution", "lb-wb-to-attribution", lambda wb: f"Attribute position {_position_label(wb)} →",
         "explain the prediction at the selected lens position", lambda wb: wb.jump_to_attribution()),
    Link("criticality", "to_critical", "lb-wb-to-critical", lambda wb: f"Criticality of token {_position_label(wb)} →",
         "rollouts keeping vs replacing the token at the selected lens position", lambda wb: wb.jump_to_criticality()),
)


# ---------------------------------------------------------------------------------------------- geometry
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


def _geometry_picked(wb: Workbench, layer: int) -> None:
    wb.note_selection(layer=layer)
    lens = wb.explorers.get("lens")
    if lens is not None:
        lens.show_layer(layer)  # no model pass


def _attach_geometry(wb: Workbench, ex: W.Widget) -> None:
    """A layer picked in geometry becomes the selected layer, and the lens shows it."""
    ex.layer.observe(lambda c: _geometry_picked(wb, c["new"]), names="value")


def _geometry_layer(wb: Workbench) -> int:
    """The layer picked in geometry (before geometry is built: the selected layer, else the last one)."""
    geo = wb.explorers.get("geometry")
    if geo is not None:
        return int(geo.layer.value)
    return wb.layer if wb.layer is not None else (wb.m.n_layers if wb.m is not None else 0)


_GEOMETRY_LINKS = (
    Link("lens", "to_lens", "lb-wb-to-lens", lambda wb: f"Lens at layer {_geometry_layer(wb)} →",
         "show the logit lens at the layer picked here", lambda wb: wb.show_lens_layer(_geometry_layer(wb))),
)


# ---------------------------------------------------------------------------------------------- attribution
def _build_attribution(wb: Workbench) -> W.Widget:
    from .attribution import AttributionExplorer
    prefix, target = wb.prediction_at(wb.position)
    opts = {"methods": ("saliency", "grad_x_input", "integrated_gradients", "occlusion"), "generate": 0}
    opts.update(wb.options.get("attribution", {}))
    return AttributionExplorer(wb.m, prefix, target=target, **opts)


# ---------------------------------------------------------------------------------------------- filler
def _build_filler(wb: Workbench) -> W.Widget:
    """Token-class ablation on the text (plus shipped texts, for spread) and the filler sweep. The ablation scores
    a continuation of each context, so a text of fewer than 24 words/punctuation marks is left out (a note says so)."""
    from .filler import FillerExplorer
    long_enough = len(re.findall(r"\w+|[^\w\s]", wb.text)) >= 24
    opts = {"texts": ([wb.text] if long_enough else []) + [t[:400] for t in lb.sample_texts(3 - long_enough)]}
    opts.update(wb.options.get("filler", {}))
    ex = FillerExplorer(wb.m, **opts)
    if not long_enough and "texts" not in wb.options.get("filler", {}):
        note = W.HTML(status_html("The text is too short for the ablation (it scores a continuation): the ablation "
                                  "uses three shipped texts. Type 24+ words to include yours.", "note"))
        return W.VBox([note, ex])
    return ex


# ---------------------------------------------------------------------------------------------- criticality
def _build_critical(wb: Workbench) -> W.Widget:
    """Rollout criticality of the token at the selected position: prompt = the text before it, response = the
    rest, only that token evaluated (``positions=[0]``); default checker: the text's last word is reproduced."""
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


#: The shipped tabs, in order.
DEFAULT_TABS: tuple[TabSpec, ...] = (
    TabSpec("lens", _build_lens, attach=_attach_lens, links=_LENS_LINKS),
    TabSpec("geometry", _build_geometry, attach=_attach_geometry, links=_GEOMETRY_LINKS),
    TabSpec("attribution", _build_attribution, needs=("position",)),
    TabSpec("filler", _build_filler),
    TabSpec("criticality", _build_critical, needs=("position",)),
)

"""Make nested plotly ``FigureWidget`` s carry their whole figure in their synced state.

A ``FigureWidget`` sends traces added after construction as transient ``_py2js_*`` messages; its synced
``_widget_data`` / ``_widget_layout`` state is refreshed only at construction and in its own ``_repr_mimebundle_``
(when it is displayed directly). Inside a container (an explorer, the Workbench) a front end that loads the
figure's JavaScript late — plotly >= 6 ``FigureWidget`` is an anywidget with a multi-MB bundle — misses those
messages and draws an empty plot (plotly/plotly.py#4998; the intermittent "first draw lost" of the lens browser
test). :func:`sync_figure_widgets` refreshes that state the same way plotly's ``_repr_mimebundle_`` does;
:class:`SyncedVBox` (the explorers' and the Workbench's base) does it whenever it is displayed.
"""

from __future__ import annotations

from copy import deepcopy

import ipywidgets as W


def sync_figure_widgets(widget) -> int:
    """Refresh the synced figure state of every ``FigureWidget`` inside ``widget`` (recursively); returns how many."""
    n = 0
    stack, seen = [widget], set()
    while stack:
        w = stack.pop()
        if id(w) in seen:
            continue
        seen.add(id(w))
        if hasattr(w, "_widget_data") and hasattr(w, "_layout_obj") and hasattr(w, "_data"):
            w._widget_layout = deepcopy(w._layout_obj._props)
            w._widget_data = deepcopy(w._data)
            n += 1
        stack.extend(getattr(w, "children", ()) or ())
    return n


class SyncedVBox(W.VBox):
    """A ``VBox`` whose nested ``FigureWidget`` s carry their whole figure when it is displayed."""

    def _repr_mimebundle_(self, **kw):
        sync_figure_widgets(self)
        return super()._repr_mimebundle_(**kw)

"""Static figures and HTML views of results, one module per probe family (no Jupyter needed; widgets reuse them).

Result classes' ``figure()`` methods call these builders; nothing here runs a model.
"""

from ._common import _clean
from .attribution import attribution_figure, attribution_html
from .critical import critical_figure, critical_html, token_html
from .geometry import (
    correlation_figure,
    geometry_profile,
    linearity_figure,
    nonlinearity_heatmap,
    shuffle_figure,
)
from .lens import STAT_LABELS, compare_sweeps, lens_heatmap, lens_heatmap_data, sweep_figure

__all__ = [
    "STAT_LABELS", "attribution_figure", "attribution_html", "compare_sweeps", "correlation_figure", "critical_figure",
    "critical_html", "geometry_profile", "lens_heatmap", "lens_heatmap_data", "linearity_figure",
    "nonlinearity_heatmap", "shuffle_figure", "sweep_figure", "token_html", "_clean",
]

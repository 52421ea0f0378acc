"""Static figures and HTML views of results, one module per probe family (no Jupyter needed; widgets reuse them).

Result classes' ``figure()`` methods call these builders; nothing here runs a model. Names that two families share
(``sweep_figure``) are exported with the family's prefix; the modules keep the short names.
"""

from . import attribution, critical, filler, geometry, lens, memory
from ._common import _clean
from .attribution import attribution_figure, attribution_html, faithfulness_figure, faithfulness_html
from .critical import contrastive_figure, critical_figure, critical_html, token_html
from .filler import ablation_figure, probe_figure
from .filler import sweep_figure as filler_sweep_figure
from .geometry import (
    correlation_figure,
    geometry_profile,
    linearity_figure,
    nonlinearity_heatmap,
    shuffle_figure,
)
from .lens import STAT_LABELS, compare_sweeps, lens_heatmap, lens_heatmap_data, lens_result_html, sweep_figure
from .memory import memory_classes_figure, memory_figure, memory_tokens_figure

__all__ = [
    "STAT_LABELS", "ablation_figure", "attribution", "attribution_figure", "attribution_html", "compare_sweeps",
    "contrastive_figure", "correlation_figure", "faithfulness_figure", "faithfulness_html", "critical", "critical_figure", "critical_html", "filler",
    "filler_sweep_figure", "geometry", "geometry_profile", "lens", "lens_heatmap", "lens_heatmap_data",
    "lens_result_html", "linearity_figure", "memory", "memory_classes_figure", "memory_figure",
    "memory_tokens_figure", "nonlinearity_heatmap", "probe_figure", "shuffle_figure", "sweep_figure", "token_html",
    "_clean",
]

"""lensbench.widgets: Jupyter explorers over the probes (ipywidgets + plotly FigureWidget).

Import as ``from lensbench.widgets import LogitLensExplorer``; the package lives in the top-level ``widgets/``
folder and is installed as ``lensbench.widgets``. Importing ``lensbench`` alone never imports this.
"""

from .attribution import AttributionExplorer
from .geometry import GeometryExplorer
from .lens import LogitLensExplorer

__all__ = ["LogitLensExplorer", "GeometryExplorer", "AttributionExplorer"]

# --- FillerExplorer (issue 6) goes here ---
from .filler import FillerExplorer  # noqa: E402

__all__ += ["FillerExplorer"]

# --- CriticalTokenExplorer (issue 7) goes here ---
from .critical import CriticalTokenExplorer  # noqa: E402

__all__ += ["CriticalTokenExplorer"]

from .workbench import Workbench  # noqa: E402 - the Workbench tabs over every explorer above (issue 8)

__all__ += ["Workbench"]

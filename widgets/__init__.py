"""lensbench.widgets: Jupyter explorers over the probes (ipywidgets + plotly FigureWidget).

Import as ``from lensbench.widgets import LogitLensExplorer``; the package lives in the top-level ``widgets/``
folder and is installed as ``lensbench.widgets``. Importing ``lensbench`` alone never imports this.
"""

from .attribution import AttributionExplorer
from .critical import CriticalTokenExplorer
from .filler import FillerExplorer
from .geometry import GeometryExplorer
from .lens import LogitLensExplorer
from .workbench import Workbench  # the Workbench tabs over every explorer above

__all__ = ["LogitLensExplorer", "GeometryExplorer", "AttributionExplorer", "FillerExplorer", "CriticalTokenExplorer",
           "Workbench"]

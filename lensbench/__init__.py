"""lensbench: probes for looking inside any Hugging Face causal LM.

>>> import lensbench as lb
>>> m = lb.load()                                        # embedded SmolLM2-135M-Instruct, offline
>>> res = lb.logit_lens(m, "The capital of France is", target=" Paris")
"""

from . import estimators
from .capture import Capture, CaptureBatch
from .data import sample_texts
from .errors import AnatomyError, InputError, LensbenchError, ModelLoadError, ModelRunError
from .model import Anatomy, LensModel, load
from .probes.attribution import AttributionResult, attribute, faithfulness
from .probes.geometry import (
    CorrelationResult,
    GeometryResult,
    LinearityResult,
    ShuffleResult,
    anisotropy,
    cosine_similarity,
    geometry_loss_correlation,
    intrinsic_dimension,
    linearity,
    neighborhood_overlap,
    shuffle_baseline,
)
from .probes.lens import LensResult, LensSweepResult, TunedLens, lens_sweep, logit_lens, train_tuned_lens
from .results import Result

__version__ = "0.1.0"
__all__ = [
    "load", "LensModel", "Anatomy", "Capture", "CaptureBatch", "Result",
    "logit_lens", "lens_sweep", "train_tuned_lens", "TunedLens", "LensResult", "LensSweepResult",
    "estimators", "intrinsic_dimension", "neighborhood_overlap", "cosine_similarity", "anisotropy", "linearity",
    "shuffle_baseline", "geometry_loss_correlation", "GeometryResult", "LinearityResult", "ShuffleResult",
    "CorrelationResult", "attribute", "faithfulness", "AttributionResult", "sample_texts", "LensbenchError",
    "InputError", "AnatomyError", "ModelLoadError", "ModelRunError",
]

# --- filler tokens (issue 6): exports go here ---
from . import tasks  # noqa: E402
from .probes.filler import (  # noqa: E402
    FillerAblationResult,
    FillerProbeResult,
    FillerSweepResult,
    filler_ablation,
    filler_probe,
    filler_sweep,
)

__all__ += ["tasks", "filler_ablation", "filler_sweep", "filler_probe", "FillerAblationResult",
            "FillerSweepResult", "FillerProbeResult"]

# --- critical tokens (issue 7): exports go here ---
from .probes.critical import (  # noqa: E402
    ContrastiveResult,
    CriticalTokensResult,
    checkers,
    contrastive_tokens,
    critical_tokens,
    pass_at_k,
    wilson_interval,
)

__all__ += ["critical_tokens", "contrastive_tokens", "CriticalTokensResult", "ContrastiveResult", "checkers",
            "pass_at_k", "wilson_interval"]
from . import stats  # noqa: E402
from .probes.attribution import CompletenessWarning, ConvergenceWarning  # noqa: E402

__all__ += ["stats", "CompletenessWarning", "ConvergenceWarning"]

# --- contextual memory (issue 4): exports go here ---
from .probes.memory import ContextualMemoryResult, contextual_memory  # noqa: E402

__all__ += ["contextual_memory", "ContextualMemoryResult"]


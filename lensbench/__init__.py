"""lensbench: probes for looking inside any Hugging Face causal LM.

>>> import lensbench as lb
>>> m = lb.load()                                        # embedded SmolLM2-135M-Instruct, offline
>>> res = lb.logit_lens(m, "The capital of France is", target=" Paris")
"""

from . import engine, engines, estimators, stats, tasks
from .capture import Capture, CaptureBatch
from .data import sample_texts
from .errors import AnatomyError, InputError, LensbenchError, ModelLoadError, ModelRunError
from .model import Anatomy, LensModel, load
from .probes.attribution import (
    AttributionResult,
    CompletenessWarning,
    ConvergenceWarning,
    FaithfulnessResult,
    attribute,
    faithfulness,
)
from .probes.critical import (
    ContrastiveResult,
    CriticalTokensResult,
    checkers,
    contrastive_tokens,
    critical_tokens,
    pass_at_k,
    train_negative_model,
    wilson_interval,
)
from .probes.filler import (
    FillerAblationResult,
    FillerProbeResult,
    FillerSweepResult,
    filler_ablation,
    filler_probe,
    filler_sweep,
)
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
from .probes.memory import ContextualMemoryResult, contextual_memory
from .results import Result

__version__ = "0.1.0"
__all__ = [
    "load", "LensModel", "Anatomy", "Capture", "CaptureBatch", "Result", "engine", "engines", "estimators", "stats", "tasks",
    "sample_texts", "LensbenchError", "InputError", "AnatomyError", "ModelLoadError", "ModelRunError",
    # lens
    "logit_lens", "lens_sweep", "train_tuned_lens", "TunedLens", "LensResult", "LensSweepResult",
    # geometry and contextual memory
    "intrinsic_dimension", "neighborhood_overlap", "cosine_similarity", "anisotropy", "linearity",
    "shuffle_baseline", "geometry_loss_correlation", "GeometryResult", "LinearityResult", "ShuffleResult",
    "CorrelationResult", "contextual_memory", "ContextualMemoryResult",
    # attribution
    "attribute", "faithfulness", "AttributionResult", "FaithfulnessResult", "CompletenessWarning", "ConvergenceWarning",
    # filler tokens
    "filler_ablation", "filler_sweep", "filler_probe", "FillerAblationResult", "FillerSweepResult",
    "FillerProbeResult",
    # critical tokens
    "critical_tokens", "contrastive_tokens", "train_negative_model", "CriticalTokensResult", "ContrastiveResult",
    "checkers",
    "pass_at_k", "wilson_interval",
]

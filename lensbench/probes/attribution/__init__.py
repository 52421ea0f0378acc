"""Token attribution: which input tokens made the model produce a token (or each token of a generation).

Each method is a registered object (:mod:`.registry`) carrying and checking its own options:

* :class:`Saliency`, :class:`GradXInput`, :class:`IntegratedGradients` (:mod:`.gradients`): gradients through the
  output of ``get_input_embeddings()`` (so every architecture works), taken in float32 even for a bfloat16
  model (:func:`lensbench.engine.float32` feeds float32 copies of the weights; the user's model is never
  re-cast);
* :class:`Occlusion` (:mod:`.occlusion`): one source replaced by a baseline, or deleted;
* :class:`Attention`, :class:`Rollout`, :class:`ValueNorm` (:mod:`.attention`): from the eager kernel's weights;
* :class:`ReAGent` (:mod:`.reagent`): recursive random replacement, from token ids through any backend.

:func:`attribute` (:mod:`.api`) routes keyword options to the chosen method (``method="integrated_gradients",
n_steps=64`` or ``method=IntegratedGradients(n_steps=64)``); :func:`faithfulness` (:mod:`.faithful`) scores a
result. Every batched pass (IG nodes, occlusion variants, ReAGent probes, faithfulness masks) runs through
:func:`lensbench.engine.run_batches`: ``batch_size="auto"`` or rows per forward, halved on out-of-memory and
retried with identical rows. Baselines are in :mod:`.baselines`, the shared passes in :mod:`._passes`.
"""

from __future__ import annotations

from ._passes import eager_attention
from .api import attribute
from .attention import Attention, Rollout, ValueNorm
from .baselines import BASELINE_KINDS, DEFAULT_BASELINE, GAP_TOLERANCE, baseline_embedding
from .faithful import FaithfulnessResult, faithfulness
from .gradients import GradXInput, IntegratedGradients, Saliency
from .occlusion import Occlusion
from .reagent import ReAGent
from .registry import (
    GRADIENT_METHODS,
    LINEAR_METHODS,
    METHODS,
    AttributionMethod,
    Call,
    Scores,
    get_method,
    method_class,
    register,
    unregister,
)
from .result import AttributionResult, CompletenessWarning, ConvergenceWarning

_BUILTIN = (Saliency, GradXInput, IntegratedGradients, Occlusion, Attention, Rollout, ValueNorm, ReAGent)
for _cls in _BUILTIN:
    register(_cls)  # in the order METHODS lists them
attribute.renamed_params = {old: new for c in _BUILTIN for old, new in c.renamed.items()}  # old option names
del _cls

__all__ = [
    "attribute", "faithfulness", "AttributionResult", "FaithfulnessResult", "CompletenessWarning",
    "ConvergenceWarning",
    # the registry
    "METHODS", "GRADIENT_METHODS", "LINEAR_METHODS", "AttributionMethod", "Call", "Scores", "register",
    "unregister", "get_method", "method_class",
    # the methods
    "Saliency", "GradXInput", "IntegratedGradients", "Occlusion", "Attention", "Rollout", "ValueNorm", "ReAGent",
    # baselines
    "BASELINE_KINDS", "DEFAULT_BASELINE", "GAP_TOLERANCE", "baseline_embedding", "eager_attention",
]

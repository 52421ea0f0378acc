"""The one runtime under every probe: four primitives, each batched with out-of-memory back-off, progress and
cooperative cancellation, each reading the capability flags measured once at load (``LensModel.capabilities``).

========================================  =============================================  ==========================
pass                                      primitive                                      used by
========================================  =============================================  ==========================
forward + per-batch reduction             :func:`lensbench.capture.capture` (``reduce=``)  lens, geometry, memory
log-probs of given continuation spans     :func:`score_spans`                            filler, contrastive, faith.
generation from a shared prefix           :class:`PrefixCache`, :func:`sample`            critical tokens, filler
gradients w.r.t. input embeddings         :func:`embeds_logits` (float32 upcast)          attribution
========================================  =============================================  ==========================

Probes never call the model themselves; they call these.
"""

from __future__ import annotations

from .batches import Cancelled, cancel_scope, check_cancelled, run_batches
from .generate import RolloutRequest, greedy, sample
from .grads import call, compute_dtype, embeds_logits, float32, forward_outputs, ids_logits
from .prefix import KVCache, PrefixCache
from .spans import SpanScore, readout, score_spans

__all__ = ["run_batches", "Cancelled", "cancel_scope", "check_cancelled", "score_spans", "SpanScore", "readout",
           "KVCache", "PrefixCache", "RolloutRequest", "sample", "greedy", "embeds_logits", "ids_logits",
           "forward_outputs", "float32", "call", "compute_dtype"]

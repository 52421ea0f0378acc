"""Critical tokens: which tokens of a reasoning trajectory decide its outcome (spec ``critical.md``).

* :func:`critical_tokens` (:mod:`.rollouts`): for each response unit (token, or sentence with
  ``granularity="sentence"``) sample continuations with the unit kept and replaced, check each finished response
  with a :mod:`checker <.checkers>`, and name the critical unit under a decision rule with stated power; the
  sentence mode (:mod:`.sentences`) is thought anchors' resampling / counterfactual importance.
* :func:`contrastive_tokens` (:mod:`.contrastive`): p_ce(t) = softmax((1+β)·log p_pos − β·log p_neg)[y_t];
  :func:`train_negative_model` makes the negative model (a merged LoRA on wrong trajectories).
* :mod:`lensbench.plots.critical`: HTML and plotly views. Shared statistics (Wilson, pass@k) live in :mod:`lensbench.stats`.

Every model pass goes through :mod:`lensbench.engine` (prefix cache, seeded batched sampling with out-of-memory
splitting) and the model's backend.
"""

from __future__ import annotations

from ...engine import PrefixCache, RolloutRequest
from ...engine.generate import hf_sampler, seeded_choice
from ...plots.critical import critical_figure, critical_html, token_html
from ...stats import pass_at_k, wilson_interval, wilson_upper
from .checkers import Checker, checkers, exact, extract_number, number, regex
from .contrastive import ContrastiveResult, contrastive_tokens, train_negative_model
from .rollouts import (
    CRITICAL_THRESHOLD,
    RULES,
    CriticalTokensResult,
    PowerWarning,
    critical_index,
    critical_tokens,
    decision_summary,
    prefix_fails,
    rule_false_positive_rate,
    rule_max_failures,
    rule_min_n,
)
from .sentences import SIMILARITY_CALIBRATION, calibrate_similarity, model_sentence_embedder, split_sentences

PrefixState = PrefixCache  # the name this probe used before the engine had one prefix cache

__all__ = ["critical_tokens", "contrastive_tokens", "train_negative_model", "CriticalTokensResult", "ContrastiveResult", "checkers",
           "Checker", "number", "exact", "regex", "extract_number", "pass_at_k", "wilson_interval", "wilson_upper",
           "critical_index", "prefix_fails", "rule_max_failures", "rule_min_n", "rule_false_positive_rate",
           "decision_summary", "PowerWarning", "RULES", "CRITICAL_THRESHOLD", "split_sentences",
           "model_sentence_embedder", "calibrate_similarity", "SIMILARITY_CALIBRATION", "hf_sampler",
           "RolloutRequest", "PrefixCache", "PrefixState", "seeded_choice", "critical_figure", "critical_html",
           "token_html"]

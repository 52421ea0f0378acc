"""Filler tokens: do tokens that look empty (punctuation, stopwords, articles, runs of dots) carry computation?

Three probes, after LLM-Microscope (removing stopwords/punctuation/articles lowers accuracy) and "Let's Think
Dot by Dot" (Pfau, Merrill & Bowman: meaningless filler can stand in for a chain of thought):

* :func:`filler_ablation` (:mod:`.ablation`) — remove a token class from each context at the *word* level and
  re-tokenise (or replace its tokens with a neutral token, keeping positions), then measure the change in mean
  loss on a held-out continuation / answer span that is never edited, against a seeded random-removal control
  that removes exactly as many tokens of non-class words. CIs resample texts (:func:`lensbench.stats.mean_ci`).
* :func:`filler_sweep` (:mod:`.sweep`) — answer log-probability and greedy exact match after N filler tokens of
  several kinds, with the question's KV cache (and each filler run's prefix) reused across arms.
* :func:`filler_probe` (:mod:`.probe`) — per-layer logistic probes on the residual at filler positions predicting
  the answer, vs the same probe at the last question token (which has seen the same question; like-for-like)
  and a shuffled-label control.

The text edits (units, classes, stop-word lists) are in :mod:`.text`. Every model pass goes through
:mod:`lensbench.engine` (span scoring, the KV cache, batched forwards through the model's backend).

Definitions used throughout:

* a *unit* is a word (``\\w+`` with inner apostrophes) or a single non-space, non-word character, together with
  the whitespace before it; class membership is decided per unit;
* "tokens removed" = length of the context's token ids before minus after the edit (word-level removal) or the
  number of tokens replaced (position-keeping mode);
* greedy exact match of an answer = the model's argmax equals the gold token at every answer position under
  teacher forcing, which is exactly "greedy decoding starts with the gold answer".
"""

from __future__ import annotations

from ...engine import score_spans
from .ablation import FillerAblationResult, filler_ablation
from .probe import PROBE_ARMS, PROBE_COMPARE, FillerProbeResult, filler_probe
from .sweep import SPECIAL_FILLERS, FillerSweepResult, filler_sweep
from .sweep import _filler_ids as _filler_ids  # used by tests and bench/bench_filler.py
from .text import (
    ARTICLES,
    CLASSES,
    FUNCTION_WORDS,
    STOPWORD_SOURCES,
    class_mask,
    is_punctuation,
    normalize_classes,
    remove_units,
    split_units,
    stop_words,
)

__all__ = ["filler_ablation", "filler_sweep", "filler_probe", "FillerAblationResult", "FillerSweepResult",
           "FillerProbeResult", "split_units", "is_punctuation", "normalize_classes", "class_mask", "remove_units",
           "stop_words", "FUNCTION_WORDS", "STOPWORD_SOURCES", "ARTICLES", "CLASSES", "SPECIAL_FILLERS",
           "PROBE_COMPARE", "PROBE_ARMS"]


def _score_batch(m, seqs, n_ans, batch_size: int | str = "auto"):
    """``[(sum log p, exact, per-token log p)]`` of each sequence's last ``n_ans[i]`` tokens (kept for
    ``bench/bench_filler.py``; :func:`lensbench.engine.score_spans`)."""
    return score_spans(m, seqs, n_ans, batch_size=batch_size)

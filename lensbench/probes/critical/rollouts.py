"""Rollout criticality (Lin et al., "Critical Tokens Matter"): keep / replace arms per response unit, sampled through
the generation engine, and the decision rule that names the critical unit with a stated false-positive rate.

Every sampled token is the argmax of (filtered logits / T + Gumbel noise), the noise drawn from a ``torch.Generator``
seeded by (seed, prefix length, arm, sample index, step): a sample does not depend on which other samples share its
batch, so results are identical whatever ``batch_size``, after an out-of-memory split, and when a run was resumed
(up to batch-size-dependent float rounding of the logits, which can only matter at exact near-ties).
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ...cache import read_json, write_json_atomic
from ...capture import forward_batch
from ...engine import PrefixCache, RolloutRequest, check_cancelled, run_batches
from ...engine.generate import _mix, hf_sampler, seeded_choice
from ...errors import InputError, LensbenchError
from ...model import LensModel, check_text
from ...plots.critical import critical_figure, critical_html
from ...results import Result
from ...stats import pass_at_k, wilson_interval, wilson_upper
from ...validation import Check, Interval, Options, SequenceOf, check_params, validate_params
from .checkers import _checker_name, _run_checker
from .sentences import (
    _answer_kl,
    _calibration,
    _default_embedder,
    first_sentence_cosines,
    sentence_record,
    split_sentences,
)

__all__ = ["critical_tokens", "CriticalTokensResult", "CRITICAL_THRESHOLD", "RULES", "PowerWarning",
           "prefix_fails", "rule_max_failures", "rule_min_n", "rule_false_positive_rate", "decision_summary",
           "critical_index"]

CRITICAL_THRESHOLD = 3 / 64


# ============================================================================================ decision rule
#: the decision rules :func:`critical_tokens` can apply to a prefix's keep-arm successes (see :func:`prefix_fails`).
RULES = ("wilson", "paper")


class PowerWarning(UserWarning):
    """The chosen ``n_samples`` is too small for the critical-token rule to be able to declare anything."""


#: the decision rule's parameters, shared by :func:`critical_tokens` and the rule's helpers below
_RULE_PARAMS = {
    "rule": [Options(RULES)],
    "alpha": [Interval(float, 0, 0.5, closed="neither")],
    "threshold": [Interval(float, 0, 1, closed="neither")],
}


def _check_rule(rule: str, alpha: float, threshold: float, caller: str = "prefix_fails") -> None:
    check_params(_RULE_PARAMS, {"rule": rule, "alpha": alpha, "threshold": threshold}, caller=caller)


def prefix_fails(successes, n, *, rule: str = "wilson", alpha: float = 0.05,
                 threshold: float = CRITICAL_THRESHOLD) -> np.ndarray:
    """Whether each prefix counts as *failing* (its true keep-arm success rate is below ``threshold``).

    ``rule="wilson"`` (default): the one-sided ``1 − alpha`` Wilson upper bound on the success rate is below
    ``threshold`` (3/64, the cDPO reset threshold). A prefix whose true rate is >= threshold is then declared
    failing with probability about ``alpha`` or less (exactly: :func:`rule_false_positive_rate`); at
    ``alpha=0.05`` the rule needs n >= 56 to fire at all and at n = 64 it fires on 0/64 (the paper's sample
    size and verdict). ``rule="paper"``: the observed rate is exactly 0 (Lin et al.'s rule; no error control:
    at n = 16 a prefix with true rate 0.1 fails with probability 0.9**16 = 0.185).

    Args: successes, n: arrays of counts (NaN where not evaluated: never failing).
    Returns: bool array of the broadcast shape.
    """
    _check_rule(rule, alpha, threshold)
    c = np.atleast_1d(np.asarray(successes, dtype=float))
    nn = np.broadcast_to(np.asarray(n, dtype=float), c.shape)
    ok = np.isfinite(c) & np.isfinite(nn) & (nn > 0)
    out = np.zeros(c.shape, dtype=bool)
    if rule == "paper":
        out[ok] = c[ok] == 0
    else:
        out[ok] = wilson_upper(c[ok], nn[ok], alpha) < threshold
    return out


def rule_max_failures(n: int, *, rule: str = "wilson", alpha: float = 0.05,
                      threshold: float = CRITICAL_THRESHOLD) -> int:
    """The largest success count out of ``n`` that the rule still calls failing (−1: it can never fire at n).
    The rule's verdict is monotone in the count, so "failing" is exactly ``successes <= rule_max_failures(n)``."""
    fails = prefix_fails(np.arange(n + 1), n, rule=rule, alpha=alpha, threshold=threshold)
    return int(np.flatnonzero(fails).max()) if fails.any() else -1


def rule_min_n(*, rule: str = "wilson", alpha: float = 0.05, threshold: float = CRITICAL_THRESHOLD,
               n_max: int = 100_000) -> int:
    """The smallest number of samples at which the rule can declare a prefix failing (0 successes)."""
    _check_rule(rule, alpha, threshold, "rule_min_n")
    if rule == "paper":
        return 1
    from scipy import stats as _st
    z2 = float(_st.norm.ppf(1 - alpha)) ** 2
    n = max(1, math.floor(z2 * (1 - threshold) / threshold))  # Wilson upper bound of 0/n is z²/(n + z²)
    while n <= n_max and not prefix_fails(0, n, rule=rule, alpha=alpha, threshold=threshold)[0]:
        n += 1
    return n


def rule_false_positive_rate(n: int, p: float, *, rule: str = "wilson", alpha: float = 0.05,
                             threshold: float = CRITICAL_THRESHOLD) -> float:
    """Exact probability that one prefix with true keep-arm success rate ``p`` is declared failing from
    ``n`` samples: P(Binomial(n, p) <= :func:`rule_max_failures`). For p >= threshold this is a false positive;
    it is largest at p = threshold (the worst case over all non-failing prefixes)."""
    from scipy import stats as _st
    k = rule_max_failures(n, rule=rule, alpha=alpha, threshold=threshold)
    return 0.0 if k < 0 else float(_st.binom.cdf(k, n, p))


def decision_summary(n: int, *, rule: str = "wilson", alpha: float = 0.05, threshold: float = CRITICAL_THRESHOLD,
                     fpr_at: float = 0.1) -> dict:
    """The critical-token rule with its power, as stored in :attr:`CriticalTokensResult.decision`.

    Keys: rule, alpha, threshold, n_samples, max_failures (failing iff successes <= this), min_n (smallest n at
    which the rule can fire), can_fire, fpr_at (a true success rate) and fpr (exact P(declared failing | fpr_at)),
    fpr_worst (exact P(declared failing | p = threshold), the worst case over non-failing prefixes), text."""
    k = rule_max_failures(n, rule=rule, alpha=alpha, threshold=threshold)
    fpr = rule_false_positive_rate(n, fpr_at, rule=rule, alpha=alpha, threshold=threshold)
    worst = rule_false_positive_rate(n, threshold, rule=rule, alpha=alpha, threshold=threshold)
    what = (f"one-sided {100 * (1 - alpha):g}% Wilson upper bound on the keep-arm success rate < {threshold:.4g}"
            if rule == "wilson" else "observed keep-arm success rate == 0 (Lin et al.)")
    text = (f"failing prefix: {what}; n = {n}: " + (f"fires at <= {k} successes" if k >= 0 else "can never fire")
            + f" (needs n >= {rule_min_n(rule=rule, alpha=alpha, threshold=threshold)}); P(declared | p = {fpr_at:g}) "
            f"= {fpr:.3g}, P(declared | p = {threshold:.4g}) = {worst:.3g}")
    return {"rule": rule, "alpha": float(alpha), "threshold": float(threshold), "n_samples": int(n),
            "max_failures": k, "min_n": rule_min_n(rule=rule, alpha=alpha, threshold=threshold), "can_fire": k >= 0,
            "fpr_at": float(fpr_at), "fpr": fpr, "fpr_worst": worst, "text": text}


def critical_index(keep_acc: Sequence[float], threshold: float = CRITICAL_THRESHOLD, *,
                   n: int | Sequence[int] | None = None, rule: str = "paper", alpha: float = 0.05) -> int | None:
    """The critical unit: the last token of the first *failing* prefix; reset if a later prefix gets back above
    ``threshold`` (observed keep-accuracy > threshold, the paper's reset). NaN entries (positions not evaluated)
    are skipped. None if no such unit.

    ``rule="paper"`` (this function's default, Lin et al.): failing = keep-accuracy exactly 0.
    ``rule="wilson"`` (the default of :func:`critical_tokens`): failing = :func:`prefix_fails` on the counts
    ``keep_acc * n`` (``n`` required: per-unit sample counts or one int)."""
    acc = np.asarray(keep_acc, dtype=float)
    if rule == "wilson":
        if n is None:
            raise InputError("critical_index(rule='wilson') needs n (the number of samples per prefix).")
        nn = np.broadcast_to(np.asarray(n, dtype=float), acc.shape)
        fails = prefix_fails(np.round(acc * nn), nn, rule=rule, alpha=alpha, threshold=threshold)
    else:
        _check_rule(rule, alpha, threshold, "critical_index")
        fails = acc == 0
    crit = None
    for i, a in enumerate(acc):
        if math.isnan(a):
            continue
        if crit is None and fails[i]:
            crit = i
        elif crit is not None and a > threshold:
            crit = None
    return crit


# ============================================================================================ results
@dataclasses.dataclass(eq=False)
class CriticalTokensResult(Result):
    """Rollout criticality of each response unit (token or sentence).

    Attributes:
        units: text of each unit (token strings, or sentences); unit_spans: ``[start, end)`` token span per unit.
        keep_acc, replace_acc ``[U]``: success rates (NaN where not evaluated); keep_lo/hi, replace_lo/hi: Wilson
            95 % intervals; keep_success / replace_success / replace_n: counts (replace_n is the number of
            counterfactual rollouts kept in sentence mode).
        drop ``[U]``: acc_keep(i) − acc_keep(i+1) (NaN when either is missing); criticality ``[U]``: accuracy
            before unit i minus acc_keep(i) (the drop *caused* by unit i; before unit 0 is ``base_accuracy``, the
            prompt-only accuracy); counterfactual_importance ``[U]``: acc_keep(i) − replace_acc(i).
        pass_at_k ``[U, len(ks)]`` from the keep arm; critical_index: the last unit of the first failing prefix
            (reset by a later prefix above ``threshold``) or None.
        keep_upper ``[U]``: one-sided ``1 − alpha`` Wilson upper bound of the keep arm; failing ``[U]`` (bool):
            the rule's verdict per evaluated prefix; decision: the rule and its power (:func:`decision_summary`:
            rule, alpha, threshold, n_samples, max_failures, min_n, can_fire, fpr_at, fpr, fpr_worst, text).
        resampling_kl ``[U]``: KL(answers resampled from unit i || answers resampled from unit i+1) (thought
            anchors' resampling importance; the answer is the checker's verdict unless ``answer=`` was given);
            counterfactual_kl ``[U]``: KL(answers of the (counterfactual) replace arm || keep arm);
            kl_smoothing: their add-α smoothing; answer: what an answer is.
        similarity_threshold, embedder, calibration (sentence mode): the counterfactual filter's cosine
            threshold, the embedder's name and, with ``similarity_threshold="auto"``, its calibration
            (:func:`calibrate_similarity`).
        evaluated: unit indices evaluated; continuations: one dict per evaluated unit (``unit``, ``keep`` texts,
            ``keep_ok``, ``replace`` texts, ``replace_ok``, ``replace_first`` (the replacing token or regenerated
            sentence), ``dissimilar`` flags in sentence mode); n_rollouts: rollouts generated in this call (0 when
            everything came from the cache).

    ``to_dataframe()``: one row per unit: ``unit`` (index), ``text``, ``start`` and ``end`` (its token span),
    ``keep_acc``, ``keep_lo``, ``keep_hi``, ``replace_acc``, ``replace_lo``, ``replace_hi``, ``drop``,
    ``criticality``, ``counterfactual_importance``, ``keep_success``, ``replace_success``, ``replace_n``,
    ``keep_upper``, ``resampling_kl``, ``counterfactual_kl`` (NaN where not evaluated), ``failing``, one
    ``pass@k`` column per k (``pass@1`` by default) and ``critical`` (True at ``critical_index``).
    """

    prompt: str
    response: str
    units: list
    unit_spans: list
    token_ids: torch.Tensor
    granularity: str
    keep_acc: torch.Tensor
    keep_lo: torch.Tensor
    keep_hi: torch.Tensor
    keep_success: torch.Tensor
    replace_acc: torch.Tensor
    replace_lo: torch.Tensor
    replace_hi: torch.Tensor
    replace_success: torch.Tensor
    replace_n: torch.Tensor
    drop: torch.Tensor
    criticality: torch.Tensor
    counterfactual_importance: torch.Tensor
    pass_at_k: torch.Tensor
    ks: list
    base_accuracy: float
    critical_index: int | None
    evaluated: list
    continuations: list
    n_samples: int
    settings: dict
    checker: str = ""
    threshold: float = CRITICAL_THRESHOLD
    model_name: str = ""
    n_rollouts: int = 0
    mode: str = "rollout"
    keep_upper: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0))
    failing: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0, dtype=torch.bool))
    decision: dict = dataclasses.field(default_factory=dict)
    resampling_kl: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0))
    counterfactual_kl: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0))
    similarity_threshold: float | None = None
    embedder: str = ""
    calibration: dict = dataclasses.field(default_factory=dict)
    answer: str = "verdict"
    kl_smoothing: float = 1.0

    def continuations_at(self, unit: int) -> dict | None:
        """The sampled continuations of ``unit`` (None if it was not evaluated)."""
        for c in self.continuations:
            if c["unit"] == unit:
                return c
        return None

    def to_dataframe(self):
        import pandas as pd
        rows = []
        for i, u in enumerate(self.units):
            row = {"unit": i, "text": u, "start": self.unit_spans[i][0], "end": self.unit_spans[i][1]}
            for name in ("keep_acc", "keep_lo", "keep_hi", "replace_acc", "replace_lo", "replace_hi", "drop",
                         "criticality", "counterfactual_importance", "keep_success", "replace_success", "replace_n",
                         "keep_upper", "resampling_kl", "counterfactual_kl"):
                v = getattr(self, name)
                row[name] = float(v[i]) if len(v) == len(self.units) else float("nan")
            row["failing"] = bool(self.failing[i]) if len(self.failing) == len(self.units) else None
            for j, k in enumerate(self.ks):
                row[f"pass@{k}"] = float(self.pass_at_k[i, j])
            row["critical"] = i == self.critical_index
            rows.append(row)
        return pd.DataFrame(rows)

    def figure(self, **kw):
        return critical_figure(self, **kw)

    def _repr_html_(self) -> str:
        crit = "none" if self.critical_index is None else (
            f"{self.critical_index} {html.escape(repr(self.units[self.critical_index]))}")
        rule = f"<br><small>{html.escape(self.decision['text'])}</small>" if self.decision else ""
        return (f"<b>CriticalTokensResult</b> ({self.granularity}s, {self.n_samples} samples/arm, prompt-only "
                f"accuracy {self.base_accuracy:.2f}, critical {self.granularity}: {crit}){rule}<br>"
                + critical_html(self))


# ============================================================================================ rollouts
def _settings(temperature, top_p, max_new_tokens, stop) -> dict:
    """The sampling settings (checked by :data:`_CRITICAL_TOKENS_PARAMS`) as stored in results and cache keys."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    return {"temperature": float(temperature), "top_p": float(top_p), "max_new_tokens": int(max_new_tokens),
            "stop": stop}


def _cut_stop(text: str, stop: list[str]) -> str:
    cut = len(text)
    for s in stop:
        j = text.find(s)
        if j >= 0:
            cut = min(cut, j + len(s))
    return text[:cut]


class _Engine:
    """The rollouts of one run: continuations of prompt + response[:upto] + forced tokens, each row seeded by
    (seed, prefix length, arm, row), one :class:`~lensbench.engine.PrefixCache` moved from prefix to prefix."""

    def __init__(self, m, prompt_ids, resp_ids, checker, n, settings, seed, sampler, batch_size):
        self.m, self.prompt_ids, self.resp_ids = m, prompt_ids, resp_ids
        self.checker, self.n, self.st, self.seed = checker, n, settings, seed
        self.sampler, self.batch_size = sampler, batch_size
        self.state = PrefixCache(m)
        self.n_rollouts = 0

    def next_logits(self, prefix: list[int]) -> torch.Tensor:
        """Float32 logits ``[V]`` after ``prefix``: from the prefix cache on the hf backend, else one forward
        through the model's backend."""
        if self.m.backend == "hf":
            return self.state.advance(prefix)
        return forward_batch(self.m, [torch.tensor(prefix, dtype=torch.long)], []).logits[0, -1].float()

    def texts(self, upto: int, first: list[list[int]], gens: list) -> list[tuple[str, str]]:
        """(response head incl. forced tokens, continuation cut at a stop string) per row."""
        tok = self.m.tokenizer
        out = []
        for f, g in zip(first, gens):
            head = tok.decode(self.resp_ids[:upto] + list(f), skip_special_tokens=True)
            tail = g if isinstance(g, str) else tok.decode(list(g), skip_special_tokens=True)
            out.append((head, _cut_stop(tail, self.st["stop"])))
        return out

    def rollouts(self, upto: int, first: list[list[int]], arms: list[str]) -> list[tuple[str, str]]:
        """Continuations of prompt + response[:upto] + first[j] for each row j, ``batch_size`` rows per sampler
        call (``"auto"``: a token budget over prefix + forced + new tokens; the hf engine halves a call on
        out-of-memory itself)."""
        prefix = self.prompt_ids + self.resp_ids[:upto]
        seeds = [_mix(self.seed, len(prefix), arm, j) for arm, j in _arm_index(arms)]
        longest = len(prefix) + max(len(f) for f in first) + int(self.st["max_new_tokens"])
        out: list = [None] * len(first)

        def step(idx: list[int]) -> None:
            req = RolloutRequest(self.m, prefix, [first[j] for j in idx], [seeds[j] for j in idx], self.st,
                                 self.state)
            gens = self.sampler(req)
            if len(gens) != len(req.first):
                raise LensbenchError(f"sampler returned {len(gens)} continuations for {len(req.first)} rows")
            for j, g in zip(idx, gens):
                out[j] = g

        # every row is seeded on its own, so neither the batch size nor an out-of-memory halving changes a sample
        run_batches(self.m, [range(longest)] * len(first), step, batch_size=self.batch_size, progress=False,
                    longest_first=False)
        self.n_rollouts += len(first)
        return self.texts(upto, first, out)

    def check(self, pairs) -> list[bool]:
        return [_run_checker(self.checker, h + t) for h, t in pairs]


def _arm_index(arms: list[str]):
    counts: dict[str, int] = {}
    for a in arms:
        counts[a] = counts.get(a, -1) + 1
        yield a, counts[a]


def _token_unit(eng: _Engine, i: int) -> dict:
    """Keep and replace arms at response token i (both from the cache of prompt + response[:i])."""
    n, y = eng.n, eng.resp_ids[i]
    prefix = eng.prompt_ids + eng.resp_ids[:i]
    logits = eng.next_logits(prefix).clone()
    logits[y] = float("-inf")
    alt_seeds = [_mix(eng.seed, len(prefix), "alt", j) for j in range(n)]
    if torch.isinf(logits).all():
        raise LensbenchError(f"no alternative token at position {i}: the vocabulary has one token")
    alts = seeded_choice(logits[None].expand(n, -1), alt_seeds, temperature=eng.st["temperature"],
                         top_p=eng.st["top_p"]).tolist()
    first = [[y]] * n + [[a] for a in alts]
    pairs = eng.rollouts(i, first, ["keep"] * n + ["replace"] * n)
    ok = eng.check(pairs)
    tok = eng.m.tokenizer
    return {"unit": i, "keep": [h + t for h, t in pairs[:n]], "keep_ok": ok[:n],
            "replace": [h + t for h, t in pairs[n:]], "replace_ok": ok[n:],
            "replace_first": [tok.decode([a]) for a in alts], "head": len(tok.decode(eng.resp_ids[:i]))}


def _free_prefix(eng: _Engine, upto: int) -> dict:
    """Free rollouts from prompt + response[:upto] (nothing forced)."""
    pairs = eng.rollouts(upto, [[]] * eng.n, ["free"] * eng.n)
    ok = eng.check(pairs)
    return {"upto": upto, "texts": [h + t for h, t in pairs], "tails": [t for _, t in pairs], "ok": ok}


def _require_hf_engine(m: LensModel) -> None:
    """The in-process engine runs the transformers model itself: refuse other backends instead of bypassing them."""
    if m.backend == "hf":
        return
    raise InputError(
        f"critical_tokens samples rollouts with the in-process HF engine, which runs the transformers model "
        f"directly; {m.name} was loaded with backend={m.backend!r}, and lensbench does not fall back to the raw "
        "model silently. Wrap the same underlying model with backend='hf': lb.load(m.model, m.tokenizer) (no copy "
        "of the weights), or pass your own sampler=.")


def _finite_number(v) -> bool:
    return Interval(float, None, None)(v) and math.isfinite(v)


def _stop_string(v) -> bool:
    return isinstance(v, str) and bool(v)


_CRITICAL_TOKENS_PARAMS = {
    "m": [LensModel],
    "response": [str],
    "checker": ["callable"],
    "n_samples": [Interval(int, 1, None)],
    "mode": [Check(lambda v: v == "rollout", "'rollout' (the contrastive estimate is "
                   "lb.contrastive_tokens(m_pos, m_neg, text))")],
    "granularity": [Options({"token", "sentence"})],
    "temperature": [Interval(float, 0, None)],
    "top_p": [Interval(float, 0, 1, closed="right")],
    "max_new_tokens": [Interval(int, 1, None)],
    "stop": [None, Check(_stop_string, "a non-empty string"),
             SequenceOf(Check(_stop_string, "non-empty string"), min_len=0)],
    "seed": [int],
    "search": [Options({"full", "coarse"})],
    "stride": [Interval(int, 1, None)],
    **_RULE_PARAMS,
    "fpr_at": [Interval(float, 0, 1)],
    "similarity_threshold": [Options({"auto"}), Check(_finite_number, "a finite number")],
    "embedder": [None, "callable"],
    "answer": [None, "callable"],
    "kl_smoothing": [Interval(float, 0, None, closed="neither")],
    "sampler": [None, "callable"],
    "batch_size": [Options({"auto"}), Interval(int, 1, None)],
    "cache_dir": [None, str, os.PathLike],
    "progress": [bool],
}


@validate_params(_CRITICAL_TOKENS_PARAMS)
def critical_tokens(m: LensModel, prompt: str, response: str, *, checker: Callable[[str], bool],
                    n_samples: int = 64, mode: str = "rollout", granularity: str = "token",
                    temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64,
                    stop: str | Sequence[str] | None = None, seed: int = 0, positions: Sequence[int] | None = None,
                    search: str = "full", stride: int = 8, refine_drop: float = 0.25,
                    threshold: float = CRITICAL_THRESHOLD, rule: str = "wilson", alpha: float = 0.05,
                    fpr_at: float = 0.1, pass_k: Sequence[int] = (1, 4, 16),
                    similarity_threshold: float | str = "auto",
                    embedder: Callable[[list[str]], torch.Tensor] | None = None,
                    answer: Callable[[str], Any] | None = None, kl_smoothing: float = 1.0,
                    sampler: Callable[[RolloutRequest], list] | None = None, batch_size: int | str = "auto",
                    cache_dir: str | os.PathLike | None = None, progress: bool = True,
                    engine=None) -> CriticalTokensResult:
    """Rollout criticality of every token (or sentence) of ``response`` to ``prompt``.

    Args:
        checker: ``text -> bool`` on the *response* text (response prefix + forced token + continuation); use
            :data:`lensbench.checkers` (``number(gold, rel_tol=...)``, ``exact(...)``, ``regex(...)``).
        n_samples: continuations per arm and unit (default 64, the paper's / cDPO's sample size: the smallest
            power of two at which the default rule can fire is 64; it needs n >= 56).
        granularity: ``"token"`` (keep vs forbid-the-token arms) or ``"sentence"`` (thought anchors, Bogdan et
            al. 2025: keep = rollouts after sentence i, i.e. resampled from sentence i+1; replace = rollouts from
            before sentence i, i.e. sentence i resampled; the counterfactual replace arm keeps only those whose
            regenerated first sentence has cosine < ``similarity_threshold`` to sentence i under ``embedder``).
        temperature, top_p, max_new_tokens, stop: sampling settings (stop strings end a continuation;
            temperature 0 is greedy: every sample is the same and the replace arm takes the runner-up token).
        seed: results are a deterministic function of the seed (independent of ``batch_size`` and resuming).
        positions: evaluate only these units (others are NaN); search: ``"full"`` or ``"coarse"`` (every
            ``stride``-th unit plus the last, then bisect between evaluated neighbours whose keep-accuracy differs
            by >= ``refine_drop``, that the rule calls failing on one side only, or that lie on either side of
            ``threshold``, down to adjacent units).
        threshold, rule, alpha: the critical-unit decision. A prefix is *failing* when (``rule="wilson"``,
            default) the one-sided ``1 − alpha`` Wilson upper bound on its keep-arm success rate is below
            ``threshold`` (3/64), or (``rule="paper"``, Lin et al.'s rule, no error control) when its observed
            keep-accuracy is 0. The critical unit is the last unit of the first failing prefix, reset when a later
            prefix's observed keep-accuracy exceeds ``threshold``. ``result.decision`` states the rule's power:
            the exact binomial P(a prefix is declared failing | true rate ``fpr_at``), the worst case at
            p = threshold, and the smallest n at which the rule can fire; a :class:`PowerWarning` is issued when
            ``n_samples`` is below it (the critical unit is then always None).
        pass_k: k values for pass@k.
        similarity_threshold: ``"auto"`` (default): calibrated for the embedder by :func:`calibrate_similarity`
            (thought anchors' 0.8 is specific to all-MiniLM-L6-v2); or a number.
        embedder: ``list[str] -> [n, D]`` sentence embeddings; default :func:`model_sentence_embedder` (the
            model's own middle layer, sink position excluded, mean-centred).
        answer: ``text -> hashable`` final answer for the KL importances (default: the checker's verdict, so the
            answer distribution is correct / wrong); kl_smoothing: add-α smoothing of those distributions.
        sampler: ``RolloutRequest -> list of generated id lists (or continuation strings)``; default
            :func:`hf_sampler` (:func:`lensbench.engine.sample`: batched ``generate`` reusing the prefix KV cache,
            rows split on out-of-memory). It runs the transformers model itself, so a model loaded through
            another backend (nnsight, TransformerLens) is refused unless a sampler is given.
        engine: what generates the rollouts: ``None``/``"hf"`` (default, the in-process engine above) or
            ``lb.engines.VLLM(url)``, a vLLM server (one seeded request per row; its prefix cache does the reuse).
            The replace arm's alternative token is drawn in-process from the model's own next-token logits by the
            same seeded rule for every engine, so only the continuations come from the engine. The engine is
            recorded in ``result.settings["engine"]``; ``sampler=`` and ``engine=`` are exclusive.
        batch_size: rows per sampler call, or ``"auto"`` (a token budget over prefix + new tokens); results do not
            depend on it. cache_dir: directory for per-unit results (resumable; keyed by the model's weight
            fingerprint, not its name).
    """
    check_text(prompt, "prompt")
    if not response.strip():
        raise InputError("response is empty; pass the model's response (reasoning trajectory) to analyse.")
    n_samples, stride = int(n_samples), int(stride)
    decision = decision_summary(n_samples, rule=rule, alpha=alpha, threshold=threshold, fpr_at=fpr_at)
    if not decision["can_fire"]:
        warnings.warn(f"critical_tokens: n_samples={n_samples} is too small for rule={rule!r} (alpha={alpha:g}) to "
                      f"declare any prefix failing: it needs n_samples >= {decision['min_n']}, so critical_index "
                      f"will be None. Sample more, or pass rule='paper' (observed 0/{n_samples}; P(declared | true "
                      f"rate {fpr_at:g}) = {rule_false_positive_rate(n_samples, fpr_at, rule='paper'):.3g}).",
                      PowerWarning, stacklevel=2)
    settings = _settings(temperature, top_p, max_new_tokens, stop)
    prompt_ids = m.encode(prompt, param="prompt").tolist()
    resp_ids = m.tokenizer(response, add_special_tokens=False)["input_ids"]
    if not resp_ids:
        raise InputError("response produced no tokens; pass a non-empty response.")
    total = len(prompt_ids) + len(resp_ids) + max_new_tokens + 1
    if total > m.max_length:
        raise InputError(f"prompt + response + max_new_tokens is {total} tokens but {m.name} accepts at most "
                         f"{m.max_length}; shorten the response or lower max_new_tokens.")
    tokens = m.to_str_tokens(resp_ids)
    spans = [(i, i + 1) for i in range(len(resp_ids))] if granularity == "token" else split_sentences(tokens)
    units = tokens if granularity == "token" else [m.tokenizer.decode(resp_ids[a:b]) for a, b in spans]
    U = len(units)
    if positions is not None:
        positions = sorted({int(p) % U if -U <= int(p) < U else -1 for p in positions})
        if not positions or positions[0] < 0:
            raise InputError(f"positions must be unit indices in [-{U}, {U}) ({U} {granularity}s in the response).")
    ks = [int(k) for k in pass_k if 1 <= int(k) <= n_samples] or [1]

    emb = None
    if granularity == "sentence":
        emb = embedder if embedder is not None else _default_embedder(m)
    emb_name = getattr(emb, "__name__", None) or getattr(emb, "__qualname__", None) or repr(emb)
    from ...engines import resolve_engine
    if engine is not None and sampler is not None:
        raise InputError("pass either sampler= or engine=, not both.")
    engine = resolve_engine(engine)
    if sampler is None and engine.name != "hf":
        sampler = engine.sample
    if sampler is None:
        _require_hf_engine(m)
        m.require_prefix_cache("critical_tokens")  # the in-process sampler reuses a cropped prefix cache
    engine_name = engine.describe()["engine"] if sampler in (None, engine.sample) else "sampler"
    eng = _Engine(m, prompt_ids, resp_ids, checker, n_samples, settings, seed, sampler or hf_sampler, batch_size)
    # the weights' fingerprint, not the name: two models called alike must never share rollouts
    key = _mix("critical/2", getattr(m, "fingerprint", None) or m.name, str(m.dtype), prompt_ids, resp_ids,
               _checker_name(checker), n_samples, settings, seed, granularity,
               "hf_sampler" if sampler in (None, hf_sampler) else
               engine_name if engine_name != "sampler" else getattr(sampler, "__qualname__", repr(sampler)),
               emb_name if granularity == "sentence" else None)
    cdir = Path(cache_dir) / f"{key:016x}" if cache_dir is not None else None
    memo: dict[Any, dict] = {}

    def cached(name: str, fn):
        if name in memo:
            return memo[name]
        path = cdir / f"{name}.json" if cdir is not None else None
        rec = read_json(path) if path is not None and path.exists() else None
        if rec is None:
            rec = fn()
            if path is not None:
                write_json_atomic(path, rec)
        memo[name] = rec
        return rec

    bar = tqdm(total=U, desc=f"critical {granularity}s", disable=not progress, leave=False)

    def free(upto: int) -> dict:
        return cached(f"free{upto:06d}", lambda: _free_prefix(eng, upto))

    def unit(i: int) -> dict:
        check_cancelled()
        if granularity == "token":
            rec = cached(f"tok{i:06d}", lambda: _token_unit(eng, i))
        else:
            a, b = spans[i]
            after, before = free(b), free(a)
            sim = cached(f"sim{i:06d}", lambda: first_sentence_cosines(emb, units[i], before["tails"]))
            rec = sentence_record(i, after, before, sim["cos"])
        bar.update(1)
        return rec

    def fails(rec: dict) -> bool:
        return bool(prefix_fails(sum(rec["keep_ok"]), len(rec["keep_ok"]), rule=rule, alpha=alpha,
                                 threshold=threshold)[0])

    try:
        base = free(0)
        recs: dict[int, dict] = {}
        if search == "full" or positions is not None:
            for i in (positions if positions is not None else range(U)):
                recs[i] = unit(i)
        else:
            for i in sorted(set(range(0, U, stride)) | {U - 1}):
                recs[i] = unit(i)
            while True:
                done = sorted(recs)
                todo = []
                for a, b in zip(done, done[1:]):
                    if b - a < 2:
                        continue
                    ka, kb = np.mean(recs[a]["keep_ok"]), np.mean(recs[b]["keep_ok"])
                    # refine wherever the rule's verdict (failing) or the reset condition could change in between
                    if abs(ka - kb) >= refine_drop or ((ka > threshold) != (kb > threshold)) or (
                            fails(recs[a]) != fails(recs[b])):
                        todo.append((a + b) // 2)
                if not todo:
                    break
                for i in todo:
                    recs[i] = unit(i)
    finally:
        bar.close()
    sim_t = None
    calibration: dict = {}
    if granularity == "sentence":
        if similarity_threshold == "auto":
            calibration = _calibration(emb)
            sim_t = float(calibration["threshold"])
        else:
            sim_t = float(similarity_threshold)
    return _assemble(m, prompt, response, units, spans, resp_ids, granularity, recs, base, n_samples,
                     dict(settings, engine=engine_name), checker, threshold, ks, eng.n_rollouts, decision=decision, sim_t=sim_t, emb_name=emb_name,
                     calibration=calibration, answer=answer, kl_smoothing=float(kl_smoothing))


def _assemble(m, prompt, response, units, spans, resp_ids, granularity, recs, base, n, settings, checker, threshold,
              ks, n_rollouts, *, decision, sim_t, emb_name, calibration, answer, kl_smoothing
              ) -> CriticalTokensResult:
    U = len(units)
    nan = float("nan")
    ks_ = np.full(U, nan)
    kn = np.full(U, nan)
    rs = np.full(U, nan)
    rn = np.full(U, nan)
    pk = np.full((U, len(ks)), nan)
    ans_keep: dict[int, list] = {}
    ans_rep: dict[int, list] = {}
    ans_rep_all: dict[int, list] = {}

    def answers(texts, oks):
        return [bool(o) for o in oks] if answer is None else [answer(t) for t in texts]
    conts = []
    for i in sorted(recs):
        r = dict(recs[i])
        if "cos" in r:
            r["dissimilar"] = [bool(c < sim_t) for c in r["cos"]]
        ks_[i], kn[i] = sum(r["keep_ok"]), len(r["keep_ok"])
        mask = r.get("dissimilar") or [True] * len(r["replace_ok"])
        rs[i] = sum(ok for ok, keepit in zip(r["replace_ok"], mask) if keepit)
        rn[i] = sum(mask)
        for j, k in enumerate(ks):
            pk[i, j] = pass_at_k(int(kn[i]), int(ks_[i]), k)
        ans_keep[i] = answers(r["keep"], r["keep_ok"])
        rep = answers(r["replace"], r["replace_ok"])
        ans_rep_all[i] = rep
        ans_rep[i] = [a for a, keepit in zip(rep, mask) if keepit]
        conts.append(r)
    with np.errstate(invalid="ignore", divide="ignore"):
        keep = ks_ / kn
        rep = rs / rn
    klo, khi = wilson_interval(ks_, kn)
    rlo, rhi = wilson_interval(rs, rn)
    kup = np.full(U, nan)
    ev = np.isfinite(kn)
    kup[ev] = wilson_upper(ks_[ev], kn[ev], decision["alpha"])
    failing = prefix_fails(ks_, kn, rule=decision["rule"], alpha=decision["alpha"], threshold=threshold)
    drop = np.full(U, nan)
    drop[:-1] = keep[:-1] - keep[1:]
    base_acc = float(np.mean(base["ok"]))
    before = np.concatenate([[base_acc], keep[:-1]])
    crit = before - keep
    cfi = keep - rep
    # KL importances (thought anchors): resampling = KL(answers resampled from unit i || from unit i+1);
    # counterfactual = KL(answers of the counterfactual replace arm || answers with unit i kept)
    base_ans = answers(base["texts"], base["ok"])
    rkl = np.full(U, nan)
    ckl = np.full(U, nan)
    for i in recs:
        prev = base_ans if i == 0 else ans_keep.get(i - 1)
        if granularity == "sentence":
            prev = ans_rep_all[i]  # the free rollouts from before sentence i, identical to keep(i-1)
        if prev is not None:
            rkl[i] = _answer_kl(prev, ans_keep[i], kl_smoothing)
        ckl[i] = _answer_kl(ans_rep[i], ans_keep[i], kl_smoothing)

    def t(a):
        return torch.tensor(a, dtype=torch.float32)
    return CriticalTokensResult(
        prompt=prompt, response=response, units=list(units), unit_spans=[list(s) for s in spans],
        token_ids=torch.tensor(resp_ids, dtype=torch.long), granularity=granularity, keep_acc=t(keep),
        keep_lo=t(klo), keep_hi=t(khi), keep_success=t(ks_), replace_acc=t(rep), replace_lo=t(rlo),
        replace_hi=t(rhi), replace_success=t(rs), replace_n=t(rn), drop=t(drop), criticality=t(crit),
        counterfactual_importance=t(cfi), pass_at_k=t(pk), ks=list(ks), base_accuracy=base_acc,
        critical_index=critical_index(keep, threshold, n=np.where(ev, kn, 1.0), rule=decision["rule"],
                                      alpha=decision["alpha"]),
        evaluated=sorted(recs), continuations=conts, n_samples=n,
        settings=settings, checker=_checker_name(checker), threshold=float(threshold), model_name=m.name,
        n_rollouts=n_rollouts, keep_upper=t(kup), failing=torch.tensor(failing & ev, dtype=torch.bool),
        decision=dict(decision), resampling_kl=t(rkl), counterfactual_kl=t(ckl),
        similarity_threshold=None if sim_t is None else float(sim_t),
        embedder=emb_name if granularity == "sentence" else "", calibration=dict(calibration),
        answer="verdict" if answer is None else _checker_name(answer), kl_smoothing=kl_smoothing)

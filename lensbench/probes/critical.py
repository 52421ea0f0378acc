"""Critical tokens: which tokens of a reasoning trajectory decide its outcome.

Three probes (spec ``critical.md``; "Critical Tokens Matter", Lin et al.; "thought anchors" resampling):

* :func:`critical_tokens` (``mode="rollout"``): for each response position i sample ``n_samples`` continuations
  from prompt + response[:i+1] (the *keep* arm: token i kept) and from prompt + response[:i] with token i
  forbidden (the *replace* arm: an alternative token drawn from the renormalised distribution), check each
  finished response with a ``checker`` and report both success-rate curves with Wilson intervals, the drops
  acc_keep(i) − acc_keep(i+1), unbiased pass@k and the critical token under a decision rule with stated power
  (default: a prefix is failing when the one-sided 95 % Wilson upper bound of its keep-arm success rate is below
  the paper's 3/64 — it needs n >= 56 and fires on 0/64; ``rule="paper"`` is Lin et al.'s observed-zero rule;
  ``result.decision`` holds the exact binomial false-positive rate). ``granularity="sentence"`` does the same per
  sentence (thought anchors, Bogdan et al. 2025): keep = rollouts after the sentence, replace = rollouts from
  before it whose regenerated first sentence is *dissimilar* to the original (cosine below a threshold
  calibrated for the embedder; thought anchors' 0.8 belongs to all-MiniLM-L6-v2) — resampling and counterfactual
  importance as accuracy differences and as KL divergences of the answer distributions (add-one smoothed;
  deviation: the answer is the checker's verdict unless ``answer=`` is given).
* :func:`contrastive_tokens`: p_ce(t) = softmax((1+β)·z_pos − β·z_neg)[y_t] and log p_pos − log p_neg per token.

Speed: every sample of one prefix runs in one batched ``generate`` (in chunks of ``batch_size`` rows) that
reuses the prefix KV cache (computed once, extended incrementally from one prefix to the next and expanded over
the batch); ``search="coarse"`` evaluates every ``stride``-th position and bisects around drops; ``cache_dir``
stores each finished position atomically so an interrupted run resumes where it stopped.

Reproducibility: every sampled token is the argmax of (filtered logits / T + Gumbel noise), the noise drawn from a
``torch.Generator`` seeded by (seed, prefix length, arm, sample index, step). A sample therefore does not depend
on which other samples share its batch: results are identical for identical seeds whatever ``batch_size`` and
whether a run was resumed (up to batch-size-dependent float rounding of the logits, which can only matter at
exact near-ties).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import html
import inspect
import math
import os
import re
import types
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cache import read_json, write_json_atomic
from ..errors import InputError, LensbenchError
from ..model import LensModel, check_text
from ..results import Result
from ..stats import wilson_interval, wilson_upper

CRITICAL_THRESHOLD = 3 / 64
_SENT_END = re.compile(r"[.!?](?=\s|$)|\n")


# ============================================================================================ checkers
class Checker:
    """A named ``text -> bool`` answer checker (the name goes into cache keys and error messages)."""

    def __init__(self, fn: Callable[[str], bool], name: str):
        self.fn, self.name = fn, name

    def __call__(self, text: str) -> bool:
        return bool(self.fn(text))

    def __repr__(self) -> str:
        return self.name


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_number(text: str, which: str = "last") -> float | None:
    """The first or last number in ``text`` (thousands separators allowed), or None."""
    found = [s for s in _NUM.findall(text) if s.strip(",")]
    if not found:
        return None
    s = (found[-1] if which == "last" else found[0]).replace(",", "")
    try:
        return float(s)
    except ValueError:
        return None


def number(gold: float | int | str, *, rel_tol: float = 1e-6, abs_tol: float = 0.0, which: str = "last") -> Checker:
    """Checker: the ``which`` ("last" or "first") number in the text equals ``gold`` within tolerances."""
    try:
        g = float(str(gold).replace(",", ""))
    except ValueError as e:
        raise InputError(f"number(gold={gold!r}): gold must be a number.") from e
    if which not in ("last", "first"):
        raise InputError("number(which=...) must be 'last' or 'first'.")

    def check(text: str) -> bool:
        x = extract_number(text, which)
        return x is not None and math.isclose(x, g, rel_tol=rel_tol, abs_tol=abs_tol)
    return Checker(check, f"number({g!r}, rel_tol={rel_tol!r}, abs_tol={abs_tol!r}, which={which!r})")


def exact(gold: str, *, strip: bool = True, ignore_case: bool = False, extract: str | None = None) -> Checker:
    """Checker: the text (or the first group of regex ``extract`` found in it) equals ``gold``."""
    if not isinstance(gold, str):
        raise InputError(f"exact(gold=...) must be a string, got {type(gold).__name__}.")
    pat = re.compile(extract) if extract else None

    def norm(s: str) -> str:
        s = s.strip() if strip else s
        return s.lower() if ignore_case else s

    def check(text: str) -> bool:
        if pat is not None:
            mt = pat.search(text)
            if mt is None:
                return False
            text = mt.group(1) if mt.groups() else mt.group(0)
        return norm(text) == norm(gold)
    return Checker(check, f"exact({gold!r}, strip={strip}, ignore_case={ignore_case}, extract={extract!r})")


def regex(pattern: str, flags: int = 0) -> Checker:
    """Checker: ``re.search(pattern, text)`` finds a match."""
    try:
        pat = re.compile(pattern, flags)
    except re.error as e:
        raise InputError(f"regex(pattern={pattern!r}) is not a valid regular expression: {e}") from e
    return Checker(lambda text: pat.search(text) is not None, f"regex({pattern!r}, flags={int(flags)})")


checkers = types.SimpleNamespace(number=number, exact=exact, regex=regex, Checker=Checker,
                                 extract_number=extract_number)


def _checker_name(checker) -> str:
    if isinstance(checker, Checker):
        return checker.name
    return getattr(checker, "__qualname__", None) or getattr(checker, "__name__", None) or repr(checker)


def _run_checker(checker, text: str) -> bool:
    try:
        return bool(checker(text))
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported with its name
        raise InputError(
            f"checker={_checker_name(checker)} raised {type(e).__name__}: {e} (on the response text "
            f"{text[:120]!r}); fix the checker so it returns True/False for any text.") from e


# ============================================================================================ statistics
#: the decision rules :func:`critical_tokens` can apply to a prefix's keep-arm successes (see :func:`prefix_fails`).
RULES = ("wilson", "paper")


class PowerWarning(UserWarning):
    """The chosen ``n_samples`` is too small for the critical-token rule to be able to declare anything."""


def _check_rule(rule: str, alpha: float, threshold: float) -> None:
    if rule not in RULES:
        raise InputError(f"rule={rule!r}: use 'wilson' (one-sided Wilson upper bound < threshold) or 'paper' "
                         "(observed keep-accuracy == 0).")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 0.5:
        raise InputError(f"alpha must be a number in (0, 0.5), got {alpha!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise InputError(f"threshold must be a number in (0, 1), got {threshold!r}.")


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
    _check_rule(rule, alpha, threshold)
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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 − C(n−c, k) / C(n, k) (Chen et al. 2021), computed as a stable product."""
    if not (isinstance(n, (int, np.integer)) and isinstance(c, (int, np.integer)) and isinstance(k, (int, np.integer))):
        raise InputError("pass_at_k needs integer n, c, k.")
    if not 0 <= c <= n or not 1 <= k <= n:
        raise InputError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


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
        _check_rule(rule, alpha, threshold)
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


# ============================================================================================ sampling
def _mix(*parts) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _filter_logits(z: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Temperature-scaled logits with everything outside the top-p nucleus set to -inf (float32, [..., V])."""
    z = z.float() / max(temperature, 1e-6)
    if top_p < 1.0:
        srt, idx = torch.sort(z, dim=-1, descending=True)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum - torch.softmax(srt, -1) >= top_p  # keep the smallest set reaching top_p (always >= 1 token)
        srt = srt.masked_fill(drop, float("-inf"))
        z = torch.empty_like(z).scatter_(-1, idx, srt)
    return z


def _gumbel(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64).clamp_(1e-300, 1 - 1e-16)
    return (-torch.log(-torch.log(u))).float()


def seeded_choice(logits: torch.Tensor, seeds: Sequence[int], *, temperature: float = 1.0,
                  top_p: float = 1.0) -> torch.Tensor:
    """One token per row of ``logits`` ([B, V]): argmax(filtered logits / T + Gumbel(seed_row)) — a sample from
    softmax(logits / T) restricted to the top-p nucleus; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.float().argmax(-1)
    z = _filter_logits(logits, temperature, top_p)
    noise = torch.stack([_gumbel(s, z.shape[-1]) for s in seeds]).to(z.device)
    return (z + noise).argmax(-1)


class _SeededSampling:
    """Logits processor for ``generate(do_sample=False)``: adds per-row seeded Gumbel noise so greedy decoding
    *samples*, each row from its own seed stream (independent of batch composition)."""

    def __init__(self, seeds: Sequence[int], start: int, temperature: float, top_p: float):
        self.seeds, self.start, self.temperature, self.top_p = list(seeds), start, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature <= 0:
            return scores
        step = input_ids.shape[1] - self.start
        z = _filter_logits(scores, self.temperature, self.top_p)
        noise = torch.stack([_gumbel(_mix(s, step), z.shape[-1]) for s in self.seeds]).to(z.device)
        return z + noise


class PrefixState:
    """KV cache of the current prefix, extended incrementally (and cropped when a shorter prefix comes)."""

    def __init__(self, m: LensModel):
        self.m = m
        self.ids: list[int] = []
        self.cache = None
        self.logits: torch.Tensor | None = None
        self.reuse = True
        self.forward_tokens = 0  # tokens run through the model to build prefixes (for benchmarks)

    @torch.no_grad()
    def advance(self, ids: Sequence[int]) -> torch.Tensor:
        """Make the cache hold ``ids`` and return the float32 logits at its last position ([V])."""
        ids = [int(i) for i in ids]
        if self.cache is not None and ids == self.ids and self.logits is not None:
            return self.logits
        common = 0
        if self.cache is not None:
            while common < min(len(ids), len(self.ids)) and ids[common] == self.ids[common]:
                common += 1
        if common == len(ids):  # need at least one new token to get logits at the end
            common -= 1
        if self.cache is not None and common > 0:
            if common < len(self.ids):
                self.cache.crop(common - len(self.ids))
        else:
            self.cache, common = None, 0
        new = torch.tensor([ids[common:]], device=self.m.input_device)
        kw = {"use_cache": True}
        params = inspect.signature(self.m.model.forward).parameters
        if self.cache is not None:
            kw["cache" if "cache" in params else "past_key_values"] = self.cache
        if "logits_to_keep" in params:
            kw["logits_to_keep"] = 1
        out = self.m.model(input_ids=new, **kw)
        self.forward_tokens += new.shape[1]
        cache = getattr(out, "cache", None)  # transformers >= 5.2x names it `cache`
        self.cache = cache if cache is not None else out.past_key_values
        self.ids = ids
        self.logits = out.logits[0, -1].float()
        return self.logits

    def expanded(self, rows: int, drop_last: bool):
        """A private copy of the cache, repeated over ``rows`` (optionally without the last position)."""
        c = copy.deepcopy(self.cache)
        if drop_last:
            c.crop(-1)
        c.batch_repeat_interleave(rows)
        return c


@dataclasses.dataclass
class RolloutRequest:
    """What a sampler is asked for: one continuation per row of ``first`` appended to ``prefix_ids``.

    Attributes:
        m: the LensModel; prefix_ids: prompt + response prefix (list of ids); first: per row, ids forced right
            after the prefix (``[y_i]`` keep, ``[alt]`` replace, ``[]`` free); seeds: per-row seeds;
            settings: temperature, top_p, max_new_tokens, stop; state: the :class:`PrefixState` (KV cache).
    """

    m: LensModel
    prefix_ids: list
    first: list
    seeds: list
    settings: dict
    state: PrefixState | None = None


@torch.no_grad()
def hf_sampler(req: RolloutRequest) -> list[list[int]]:
    """Default sampler: one ``generate`` call for all rows, reusing the prefix KV cache expanded over the batch.

    Rows must share the length of their forced tokens (the engine groups them so)."""
    from transformers import GenerationConfig, LogitsProcessorList
    m, st = req.m, req.settings
    n_first = {len(f) for f in req.first}
    if len(n_first) != 1:
        raise LensbenchError("hf_sampler: all rows of one call must force the same number of tokens")
    rows = torch.tensor([list(req.prefix_ids) + list(f) for f in req.first], device=m.input_device)
    state = req.state
    kw: dict[str, Any] = {}
    if state is not None and state.reuse:
        state.advance(req.prefix_ids)
        kw["cache"] = state.expanded(len(rows), drop_last=n_first == {0})
    tok = m.tokenizer
    eos = getattr(m.model.generation_config, "eos_token_id", None) or tok.eos_token_id
    gc = GenerationConfig(do_sample=False, max_new_tokens=int(st["max_new_tokens"]), pad_token_id=tok.pad_token_id,
                          eos_token_id=eos, stop_strings=list(st.get("stop") or []) or None)
    proc = _SeededSampling(req.seeds, rows.shape[1], float(st["temperature"]), float(st["top_p"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = m.model.generate(input_ids=rows, attention_mask=torch.ones_like(rows), generation_config=gc,
                               logits_processor=LogitsProcessorList([proc]),
                               tokenizer=tok if st.get("stop") else None, **kw)
    res = []
    pad = tok.pad_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    for row in out[:, rows.shape[1]:].tolist():
        ids = []
        for t in row:
            if t in eos_ids:
                break
            ids.append(t)
        if pad not in eos_ids:
            while ids and ids[-1] == pad:
                ids.pop()
        res.append(ids)
    return res


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


@dataclasses.dataclass(eq=False)
class ContrastiveResult(Result):
    """Contrastive estimation between a positive and a negative model on one text.

    Attributes:
        tokens: all T tokens of the text; token_ids ``[T]``.
        p_ce ``[T-1]``: softmax_v((1+β) z_pos − β z_neg)[y_t] for scored tokens 1..T-1;
        logprob_diff ``[T-1]``: log p_pos(y_t) − log p_neg(y_t); logp_pos / logp_neg ``[T-1]``.
        beta, text, pos_name, neg_name.
    """

    tokens: list
    token_ids: torch.Tensor
    p_ce: torch.Tensor
    logprob_diff: torch.Tensor
    logp_pos: torch.Tensor
    logp_neg: torch.Tensor
    beta: float
    text: str
    pos_name: str = ""
    neg_name: str = ""

    @property
    def criticality(self) -> torch.Tensor:
        """1 − p_ce: the criticality weight of each scored token ([T-1])."""
        return 1 - self.p_ce

    def to_dataframe(self):
        import pandas as pd
        return pd.DataFrame({"position": range(1, len(self.tokens)), "token": self.tokens[1:],
                             "p_ce": self.p_ce.numpy(), "criticality": (1 - self.p_ce).numpy(),
                             "logprob_diff": self.logprob_diff.numpy(), "logp_pos": self.logp_pos.numpy(),
                             "logp_neg": self.logp_neg.numpy()})

    def figure(self, **kw):
        import plotly.graph_objects as go
        x = [f"{t}:{_clean(tok)}" for t, tok in enumerate(self.tokens)][1:]
        fig = go.Figure([go.Bar(x=x, y=(1 - self.p_ce).numpy(), name="1 − p_ce"),
                         go.Scatter(x=x, y=self.logprob_diff.numpy(), name="log p_pos − log p_neg", yaxis="y2",
                                    mode="lines+markers")])
        fig.update_layout(title=f"contrastive estimation (β = {self.beta:g}): criticality 1 − p_ce per token",
                          yaxis={"title": "1 − p_ce", "range": [0, 1]},
                          yaxis2={"title": "log-prob difference", "overlaying": "y", "side": "right"},
                          height=kw.get("height", 380), legend={"orientation": "h"})
        return fig

    def _repr_html_(self) -> str:
        return (f"<b>ContrastiveResult</b> (β = {self.beta:g}, {len(self.tokens) - 1} scored tokens; colour = "
                "1 − p_ce)<br>" + token_html(self.tokens[1:], (1 - self.p_ce).numpy()))


# ============================================================================================ html / figures
def _clean(tok: str) -> str:
    return tok.replace("\n", "\\n").replace("\t", "\\t")


def token_html(tokens: Sequence[str], weights, *, css_class: str = "lb-crit-tok", selected: int | None = None,
               titles: Sequence[str] | None = None) -> str:
    """Tokens as spans with a red background of opacity ``weight`` (NaN: grey dotted, not evaluated)."""
    parts = []
    for i, (tok, w) in enumerate(zip(tokens, weights)):
        w = float(w)
        if math.isnan(w):
            bg = "transparent;border-bottom:1px dotted #999"
        else:
            bg = f"rgba(220,40,40,{max(0.0, min(1.0, w)):.3f})"
        border = ";outline:2px solid #1f5fbf" if selected == i else ""
        title = html.escape(titles[i] if titles else f"{i}: {w:.3f}", quote=True)
        text = html.escape(tok).replace("\n", "↵<br>") or "∅"
        parts.append(f"<span class='{css_class}' data-i='{i}' title='{title}' style='background:{bg}{border};"
                     f"white-space:pre-wrap'>{text}</span>")
    return "<div style='line-height:1.9;font-family:monospace'>" + "".join(parts) + "</div>"


def critical_html(res: CriticalTokensResult, *, by: str = "criticality", selected: int | None = None) -> str:
    w = getattr(res, by).numpy()
    w = np.where(np.isnan(w), np.nan, np.clip(w, 0, 1))
    titles = [f"{i}: keep {float(res.keep_acc[i]):.2f}, replace {float(res.replace_acc[i]):.2f}, "
              f"{by} {float(getattr(res, by)[i]):.2f}" for i in range(len(res.units))]
    return token_html(res.units, w, selected=selected, titles=titles)


def critical_figure(res: CriticalTokensResult, *, height: int = 380):
    """Success rate of the keep and replace arms over units, with Wilson bands and the critical unit marked."""
    import plotly.graph_objects as go
    idx = [i for i in range(len(res.units)) if not math.isnan(float(res.keep_acc[i]))]
    x = [f"{i}:{_clean(res.units[i])[:12]}" for i in idx]
    traces = []
    for arm, colour in (("keep", "31,95,191"), ("replace", "214,118,19")):
        acc = getattr(res, f"{arm}_acc").numpy()[idx]
        lo, hi = getattr(res, f"{arm}_lo").numpy()[idx], getattr(res, f"{arm}_hi").numpy()[idx]
        traces.append(go.Scatter(x=x + x[::-1], y=list(hi) + list(lo[::-1]), fill="toself", hoverinfo="skip",
                                 fillcolor=f"rgba({colour},0.15)", line={"width": 0}, showlegend=False))
        traces.append(go.Scatter(x=x, y=acc, mode="lines+markers", name=f"{arm} arm", line={"color": f"rgb({colour})"}))
    fig = go.Figure(traces)
    title = f"success rate per {res.granularity} (prompt only: {res.base_accuracy:.2f})"
    if res.critical_index is not None and res.critical_index in idx:
        ci = res.critical_index
        fig.add_vline(x=idx.index(ci), line={"color": "red", "dash": "dash"})
        title += f" · critical: {ci} {_clean(res.units[ci])!r}"
    fig.update_layout(title=title, yaxis={"title": "success rate", "range": [-0.02, 1.02]}, height=height,
                      legend={"orientation": "h"}, margin={"t": 50, "b": 40})
    return fig


# ============================================================================================ units
def split_sentences(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of sentences: a sentence ends after a token ending in . ! ? (followed by
    whitespace or the end) or containing a newline."""
    spans, start = [], 0
    n = len(tokens)
    for i, t in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < n else ""
        end = "\n" in t or (t.rstrip().endswith((".", "!", "?")) and t == t.rstrip() and (nxt[:1].isspace()
                                                                                           or i + 1 == n))
        end = end or (t.rstrip() != t and t.rstrip().endswith((".", "!", "?")))
        if end and i + 1 > start:
            spans.append((start, i + 1))
            start = i + 1
    if start < n:
        spans.append((start, n))
    return spans


def _first_sentence(text: str) -> str:
    mt = _SENT_END.search(text)
    return text[: mt.end()] if mt else text


#: Calibration set for sentence-similarity thresholds (written for this project): (sentence, a paraphrase of it,
#: a different sentence on the same kind of problem). :func:`calibrate_similarity` places the threshold where it
#: best separates the paraphrase pairs (similar: not a counterfactual) from the different pairs (dissimilar).
SIMILARITY_CALIBRATION = (
    ("Tom has 3 apples and buys 5 more.", "Tom buys 5 more apples, and he already had 3.",
     "Each box holds 12 eggs."),
    ("So he has 8 apples in total.", "In total he has 8 apples.", "First we multiply 7 by 2."),
    ("She gave 7 stickers to her friend.", "Her friend got 7 of her stickers.", "The train travels for 3 hours."),
    ("We need to add the two numbers.", "The two numbers have to be added.", "The answer is 45 chairs."),
    ("Let me check the subtraction again.", "I will double-check that subtraction.", "There are 14 boys in the class."),
    ("A pencil costs 2 dollars.", "One pencil is 2 dollars.", "Lily reads 8 pages every day."),
    ("Then we subtract 6 from 15.", "Next, take 6 away from 15.", "The farmer buys 19 more cows."),
    ("The total cost is 14 dollars.", "Altogether it costs 14 dollars.", "Let us first read the question."),
    ("Each row has 9 chairs.", "There are 9 chairs in every row.", "So the final answer is 20."),
    ("Wait, that is not right.", "Hmm, that seems wrong.", "Multiply the price by the number of pencils."),
    ("He spent 18 dollars on a book.", "The book cost him 18 dollars.", "Mia has 7 bags of oranges."),
    ("Therefore the answer is 42.", "So the answer must be 42.", "The class has 17 girls."),
    ("The cat sat on the mat.", "A cat was sitting on the mat.", "The river flows to the sea."),
    ("It rained all day yesterday.", "Yesterday it was raining the whole day.", "She plays the violin well."),
    ("The meeting starts at noon.", "At twelve o'clock the meeting begins.", "Add two cups of lentils."),
    ("I think we should divide by 4.", "Dividing by 4 seems like the right step.", "The shop closes at nine."),
)


def _reference_sentences(k: int = 64) -> list[str]:
    from ..data import sample_texts
    sents = []
    for text in sample_texts():
        for part in re.split(r"(?<=[.!?])\s+|\n+", text):
            part = part.strip()
            if len(part.split()) >= 3:
                sents.append(part)
    step = max(1, len(sents) // k)
    return sents[::step][:k]


def model_sentence_embedder(m: LensModel, layer: int | None = None, *, skip_first: bool = True,
                            centre: bool = True, reference: Sequence[str] | None = None
                            ) -> Callable[[list[str]], torch.Tensor]:
    """Offline default sentence embedder: the residual stream of ``m`` at ``layer`` (default: the middle layer),
    mean-pooled over the sentence's tokens, minus the mean embedding of a reference set of sentences.

    * ``skip_first=True``: the sentence is encoded after one sink token (BOS, else EOS) and that position 0 is
      left out of the pool. The first position of a sequence carries massive, input-independent activations
      (the attention sink); pooled in, they dominate every embedding and make any two sentences look alike
      (cosine ~1 on the default model, so a 0.8 filter never finds a counterfactual).
    * ``centre=True``: residual streams are anisotropic (a large shared mean direction); subtracting the mean of
      ``reference`` sentences (default: 64 sentences of the shipped sample texts, computed on the first call)
      makes the cosine measure what distinguishes sentences.

    ``skip_first=False, centre=False`` is the previous embedder (mean over all tokens, no BOS, uncentred).
    Returns ``[n, d_model]`` float32 on the CPU; empty strings embed to zeros. The embedder exposes ``.mean``
    (the centring vector, after the first call) and a ``__name__`` that goes into cache keys.
    """
    layer = m.n_layers // 2 if layer is None else m.check_layers(layer, "layer")[0]
    tok = m.tokenizer
    sink = getattr(tok, "bos_token_id", None)
    if sink is None:
        sink = getattr(tok, "eos_token_id", None)
    state: dict[str, Any] = {"mean": None}

    @torch.no_grad()
    def raw(texts: Sequence[str], batch: int = 32) -> torch.Tensor:
        out = torch.zeros(len(texts), m.d_model)
        rows = []  # (index, ids, first pooled position)
        for j, t in enumerate(texts):
            ids = tok(t, add_special_tokens=False)["input_ids"][: m.max_length - 1] if t.strip() else []
            if not ids:
                continue
            first = 0
            if skip_first:
                if sink is not None:
                    ids, first = [int(sink)] + list(ids), 1
                elif len(ids) > 1:
                    first = 1
            rows.append((j, list(ids), first))
        rows.sort(key=lambda r: len(r[1]))
        for s0 in range(0, len(rows), batch):  # right padding: causal attention leaves real positions exact
            chunk = rows[s0:s0 + batch]
            T = max(len(r[1]) for r in chunk)
            ids = torch.tensor([r[1] + [r[1][-1]] * (T - len(r[1])) for r in chunk])
            mask = torch.tensor([[1] * len(r[1]) + [0] * (T - len(r[1])) for r in chunk])
            with m.hooks([layer]) as store:
                m.forward(ids, attention_mask=mask)
            h = store[layer].float().cpu()
            for b, (j, r, first) in enumerate(chunk):
                out[j] = h[b, first:len(r)].mean(0)
        return out

    def embed(texts: list[str]) -> torch.Tensor:
        e = raw(texts)
        if not centre:
            return e
        if state["mean"] is None:
            state["mean"] = raw(list(reference) if reference is not None else _reference_sentences()).mean(0)
            embed.mean = state["mean"]
        blank = e.abs().sum(-1) == 0
        e = e - state["mean"]
        e[blank] = 0
        return e
    embed.mean = None
    embed.__name__ = (f"model_sentence_embedder(layer={layer}, skip_first={skip_first}, centre={centre}"
                      + (", reference=custom" if reference is not None else "") + ")")
    return embed


def calibrate_similarity(embedder: Callable[[list[str]], torch.Tensor],
                         pairs: Sequence[tuple[str, str, str]] = SIMILARITY_CALIBRATION) -> dict:
    """Calibrate the counterfactual filter's cosine threshold for ``embedder``.

    Thought anchors (Bogdan et al. 2025) call a regenerated sentence a counterfactual when its cosine to the
    original is below 0.8 under all-MiniLM-L6-v2, an embedder for which paraphrases score above ~0.8. Cosines
    of other embedders live on other scales, so the threshold is re-derived for each: embed every (sentence,
    paraphrase, different) triple of ``pairs`` and take the threshold that best separates paraphrase cosines
    (similar: excluded) from different-sentence cosines (dissimilar: kept), by balanced accuracy (the midpoint
    of the best gap; the middle of tied candidates).

    Returns: dict with threshold, balanced_accuracy, paraphrase_cos and different_cos (lists), n_pairs.
    """
    texts = [t for tr in pairs for t in tr]
    e = embedder(texts).float().reshape(len(pairs), 3, -1)
    para = torch.nn.functional.cosine_similarity(e[:, 0], e[:, 1], dim=-1).tolist()
    diff = torch.nn.functional.cosine_similarity(e[:, 0], e[:, 2], dim=-1).tolist()
    vals = np.unique(np.concatenate([para, diff]))
    cands = (vals[:-1] + vals[1:]) / 2 if len(vals) > 1 else vals
    pa, di = np.asarray(para), np.asarray(diff)
    ba = np.array([(np.mean(pa >= t) + np.mean(di < t)) / 2 for t in cands])
    best = np.flatnonzero(ba == ba.max())
    t = float(cands[best[len(best) // 2]])
    return {"threshold": t, "balanced_accuracy": float(ba.max()), "paraphrase_cos": [float(x) for x in para],
            "different_cos": [float(x) for x in diff], "n_pairs": len(pairs)}


# ============================================================================================ the probe
def _settings(temperature, top_p, max_new_tokens, stop) -> dict:
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise InputError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}.")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
    if isinstance(stop, str):
        stop = [stop]
    stop = list(stop or [])
    if not all(isinstance(s, str) and s for s in stop):
        raise InputError("stop must be a string or a list of non-empty strings.")
    return {"temperature": float(temperature), "top_p": float(top_p), "max_new_tokens": max_new_tokens,
            "stop": stop}


def _cut_stop(text: str, stop: list[str]) -> str:
    cut = len(text)
    for s in stop:
        j = text.find(s)
        if j >= 0:
            cut = min(cut, j + len(s))
    return text[:cut]


class _Engine:
    def __init__(self, m, prompt_ids, resp_ids, checker, n, settings, seed, sampler, batch_size, progress):
        self.m, self.prompt_ids, self.resp_ids = m, prompt_ids, resp_ids
        self.checker, self.n, self.st, self.seed = checker, n, settings, seed
        self.sampler, self.batch_size = sampler, batch_size
        self.state = PrefixState(m)
        self.n_rollouts = 0

    def texts(self, upto: int, first: list[list[int]], gens: list) -> list[str]:
        tok = self.m.tokenizer
        out = []
        for f, g in zip(first, gens):
            head = tok.decode(self.resp_ids[:upto] + list(f), skip_special_tokens=True)
            tail = g if isinstance(g, str) else tok.decode(list(g), skip_special_tokens=True)
            out.append((head, _cut_stop(tail, self.st["stop"])))
        return out

    def rollouts(self, upto: int, first: list[list[int]], arms: list[str]) -> list[tuple[str, str]]:
        """Continuations of prompt + response[:upto] + first[j] for each row j, in chunks of batch_size."""
        prefix = self.prompt_ids + self.resp_ids[:upto]
        seeds = [_mix(self.seed, len(prefix), arm, j) for arm, j in _arm_index(arms)]
        out: list = []
        for s in range(0, len(first), self.batch_size):
            req = RolloutRequest(self.m, prefix, first[s:s + self.batch_size], seeds[s:s + self.batch_size],
                                 self.st, self.state)
            gens = self.sampler(req)
            if len(gens) != len(req.first):
                raise LensbenchError(f"sampler returned {len(gens)} continuations for {len(req.first)} rows")
            out += gens
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
    logits = eng.state.advance(prefix).clone()
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


_DEFAULT_EMBEDDERS: dict = {}


def _default_embedder(m: LensModel):
    """One default embedder per model (its centring mean and calibration are computed once per session)."""
    key = (getattr(m, "fingerprint", None) or m.name, id(m))
    if key not in _DEFAULT_EMBEDDERS:
        _DEFAULT_EMBEDDERS.clear()
        _DEFAULT_EMBEDDERS[key] = model_sentence_embedder(m)
    return _DEFAULT_EMBEDDERS[key]


def _calibration(emb) -> dict:
    cal = getattr(emb, "calibration", None)
    if cal is None:
        cal = calibrate_similarity(emb)
        try:
            emb.calibration = cal
        except (AttributeError, TypeError):  # a callable that takes no attributes: recalibrate next time
            pass
    return cal


def _answer_kl(p_answers: Sequence, q_answers: Sequence, alpha: float) -> float:
    """KL(p || q) in nats between the empirical answer distributions of two rollout sets, with add-``alpha``
    smoothing over the union of answers seen in either (NaN if a set is empty)."""
    if not len(p_answers) or not len(q_answers):
        return float("nan")
    support = sorted({repr(a) for a in p_answers} | {repr(a) for a in q_answers})
    pc = np.array([sum(repr(a) == s for a in p_answers) for s in support], dtype=float) + alpha
    qc = np.array([sum(repr(a) == s for a in q_answers) for s in support], dtype=float) + alpha
    p, q = pc / pc.sum(), qc / qc.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return float(terms.sum())


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
                    sampler: Callable[[RolloutRequest], list] | None = None, batch_size: int = 32,
                    cache_dir: str | os.PathLike | None = None, progress: bool = True) -> CriticalTokensResult:
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
            :func:`hf_sampler` (batched ``generate`` reusing the prefix KV cache).
        batch_size: rows per ``generate`` call; cache_dir: directory for per-unit results (resumable; keyed by
            the model's weight fingerprint, not its name).
    """
    if mode != "rollout":
        raise InputError(f"mode={mode!r}: critical_tokens supports mode='rollout'; for the contrastive estimate "
                         "use lb.contrastive_tokens(m_pos, m_neg, text).")
    if granularity not in ("token", "sentence"):
        raise InputError(f"granularity={granularity!r}: use 'token' or 'sentence'.")
    check_text(prompt, "prompt")
    if not isinstance(response, str) or not response.strip():
        raise InputError("response is empty; pass the model's response (reasoning trajectory) to analyse.")
    if not callable(checker):
        raise InputError("checker must be a callable text -> bool, e.g. lb.checkers.number(42).")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise InputError(f"n_samples must be a positive int, got {n_samples!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}.")
    if search not in ("full", "coarse"):
        raise InputError(f"search={search!r}: use 'full' or 'coarse'.")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise InputError(f"stride must be a positive int, got {stride!r}.")
    _check_rule(rule, alpha, threshold)
    if isinstance(fpr_at, bool) or not isinstance(fpr_at, (int, float)) or not 0 <= fpr_at <= 1:
        raise InputError(f"fpr_at must be a success rate in [0, 1], got {fpr_at!r}.")
    if not (similarity_threshold == "auto" or (isinstance(similarity_threshold, (int, float))
                                               and not isinstance(similarity_threshold, bool)
                                               and math.isfinite(similarity_threshold))):
        raise InputError(f"similarity_threshold must be 'auto' or a number, got {similarity_threshold!r}.")
    if isinstance(kl_smoothing, bool) or not isinstance(kl_smoothing, (int, float)) or not kl_smoothing > 0:
        raise InputError(f"kl_smoothing must be a positive number, got {kl_smoothing!r}.")
    if answer is not None and not callable(answer):
        raise InputError("answer must be a callable text -> answer, e.g. lb.checkers.extract_number.")
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
    if sampler is None:  # the in-process sampler reuses a cropped prefix cache: refuse models that cannot
        m.require_prefix_cache("critical_tokens")
    eng = _Engine(m, prompt_ids, resp_ids, checker, n_samples, settings, seed, sampler or hf_sampler, batch_size,
                  progress)
    # the weights' fingerprint, not the name: two models called alike must never share rollouts
    key = _mix("critical/2", getattr(m, "fingerprint", None) or m.name, str(m.dtype), prompt_ids, resp_ids,
               _checker_name(checker), n_samples, settings, seed, granularity,
               getattr(sampler or hf_sampler, "__qualname__", repr(sampler)),
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
        if granularity == "token":
            rec = cached(f"tok{i:06d}", lambda: _token_unit(eng, i))
        else:
            a, b = spans[i]
            after, before = free(b), free(a)

            def cf():
                tails = [_first_sentence(t) for t in before["tails"]]
                e = emb([units[i]] + tails).float()
                cos = torch.nn.functional.cosine_similarity(e[:1], e[1:], dim=-1)
                return {"cos": [float(c) for c in cos.tolist()]}
            sim = cached(f"sim{i:06d}", cf)
            rec = {"unit": i, "keep": after["texts"], "keep_ok": after["ok"], "replace": before["texts"],
                   "replace_ok": before["ok"], "replace_first": [_first_sentence(t) for t in before["tails"]],
                   "cos": sim["cos"]}
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
    return _assemble(m, prompt, response, units, spans, resp_ids, granularity, recs, base, n_samples, settings,
                     checker, threshold, ks, eng.n_rollouts, decision=decision, sim_t=sim_t, emb_name=emb_name,
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


# ============================================================================================ contrastive
def _same_tokenizer(a, b) -> bool:
    if a is b:
        return True
    try:
        return len(a) == len(b) and a.get_vocab() == b.get_vocab() and (
            getattr(a, "all_special_tokens", None) == getattr(b, "all_special_tokens", None))
    except Exception:  # noqa: BLE001
        return False


@torch.no_grad()
def _last_hidden(m: LensModel, ids: torch.Tensor, adapter: str | None) -> torch.Tensor:
    """Last block output at positions 0..T-2 (the positions that predict tokens 1..T-1)."""
    with _adapter(m, adapter):
        L = m.n_layers
        kw = {}
        if "logits_to_keep" in inspect.signature(m.model.forward).parameters:
            kw["logits_to_keep"] = 1
        with m.hooks([L]) as store:
            m.forward(ids[None], **kw)
        return store[L][0, :-1]


class _adapter:
    """Activate a peft adapter by name for the call (restoring the previously active one)."""

    def __init__(self, m: LensModel, name: str | None):
        self.m, self.name, self.old = m, name, None

    def __enter__(self):
        if self.name is None:
            return self
        model = self.m.model
        if not hasattr(model, "set_adapter"):
            raise InputError(f"adapter {self.name!r} was given but {self.m.name} has no peft adapters "
                             "(load a peft model with lb.load(peft_model, tokenizer)).")
        self.old = getattr(model, "active_adapter", None)
        if callable(self.old):
            self.old = self.old()
        try:
            model.set_adapter(self.name)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"adapter {self.name!r} could not be activated on {self.m.name}: {e}") from e
        return self

    def __exit__(self, *exc):
        if self.name is not None and self.old is not None:
            self.m.model.set_adapter(self.old)


def contrastive_tokens(m_pos: LensModel, m_neg: LensModel, text: str, *, beta: float = 1.0,
                       pos_adapter: str | None = None, neg_adapter: str | None = None, add_bos: bool | None = None,
                       chunk: int = 256) -> ContrastiveResult:
    """Contrastive estimation: teacher-force ``text`` through both models and score each token y_t (t >= 1) by
    p_ce(t) = softmax_v((1+β)·z_pos(t) − β·z_neg(t))[y_t] (criticality 1 − p_ce) and the log-likelihood
    difference log p_pos(y_t) − log p_neg(y_t).

    Two LoRA adapters on one peft base: pass the same LensModel twice with ``pos_adapter="pos",
    neg_adapter="neg"``. Tokenizers must match. Logits are computed ``chunk`` positions at a time in float32.
    """
    check_text(text, "text")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not math.isfinite(beta):
        raise InputError(f"beta must be a finite number, got {beta!r}.")
    if not (isinstance(m_pos, LensModel) and isinstance(m_neg, LensModel)):
        raise InputError("m_pos and m_neg must be LensModels (wrap each with lb.load(model, tokenizer)).")
    if not _same_tokenizer(m_pos.tokenizer, m_neg.tokenizer):
        raise InputError(f"m_pos ({m_pos.name}) and m_neg ({m_neg.name}) have different tokenizers; contrastive "
                         "estimation compares the two models token by token, so they must share one vocabulary "
                         "(use two fine-tunes or adapters of the same base model).")
    if m_pos.vocab_size != m_neg.vocab_size:
        raise InputError(f"m_pos has {m_pos.vocab_size} output logits but m_neg has {m_neg.vocab_size}; both must "
                         "score the same vocabulary.")
    ids = m_pos.encode(text, add_bos=add_bos)
    if len(ids) < 2:
        raise InputError("text must be at least 2 tokens long: the first token is not scored.")
    y = ids[1:]
    T1 = len(y)
    p_ce, lp_pos, lp_neg = torch.empty(T1), torch.empty(T1), torch.empty(T1)
    hp = _last_hidden(m_pos, ids, pos_adapter)
    hn = _last_hidden(m_neg, ids, neg_adapter)
    for s in range(0, T1, chunk):
        sl = slice(s, s + chunk)
        with torch.no_grad(), _adapter(m_pos, pos_adapter):
            zp = m_pos.unembed(hp[sl])
        with torch.no_grad(), _adapter(m_neg, neg_adapter):
            zn = m_neg.unembed(hn[sl]).to(zp.device)
        yy = y[sl].to(zp.device)[:, None]
        lp = torch.log_softmax(zp, -1)
        ln = torch.log_softmax(zn, -1)
        # log-softmax first: per-position constants cancel exactly in the contrast
        zc = (1 + beta) * lp - beta * ln
        p_ce[sl] = torch.softmax(zc, -1).gather(-1, yy)[:, 0].cpu()
        lp_pos[sl] = lp.gather(-1, yy)[:, 0].cpu()
        lp_neg[sl] = ln.gather(-1, yy)[:, 0].cpu()
    return ContrastiveResult(tokens=m_pos.to_str_tokens(ids), token_ids=ids.cpu(), p_ce=p_ce,
                             logprob_diff=lp_pos - lp_neg, logp_pos=lp_pos, logp_neg=lp_neg, beta=float(beta),
                             text=text, pos_name=m_pos.name + (f" [{pos_adapter}]" if pos_adapter else ""),
                             neg_name=m_neg.name + (f" [{neg_adapter}]" if neg_adapter else ""))


__all__ = ["critical_tokens", "contrastive_tokens", "CriticalTokensResult", "ContrastiveResult", "checkers",
           "Checker", "number", "exact", "regex", "pass_at_k", "wilson_interval", "wilson_upper", "critical_index",
           "prefix_fails", "rule_max_failures", "rule_min_n", "rule_false_positive_rate", "decision_summary",
           "PowerWarning", "RULES", "split_sentences", "model_sentence_embedder", "calibrate_similarity",
           "SIMILARITY_CALIBRATION", "hf_sampler", "RolloutRequest", "PrefixState", "seeded_choice"]

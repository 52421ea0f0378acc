"""Critical tokens: which tokens of a reasoning trajectory decide its outcome.

Three probes (spec ``critical.md``; "Critical Tokens Matter", Lin et al.; "thought anchors" resampling):

* :func:`critical_tokens` (``mode="rollout"``): for each response position i sample ``n_samples`` continuations
  from prompt + response[:i+1] (the *keep* arm: token i kept) and from prompt + response[:i] with token i
  forbidden (the *replace* arm: an alternative token drawn from the renormalised distribution), check each
  finished response with a ``checker`` and report both success-rate curves with Wilson intervals, the drops
  acc_keep(i) − acc_keep(i+1), unbiased pass@k and the paper's critical-token rule. ``granularity="sentence"``
  does the same per sentence: keep = rollouts after the sentence, replace = rollouts from before it whose
  regenerated first sentence is *dissimilar* to the original (cosine < 0.8 of sentence embeddings) —
  resampling and counterfactual importance.
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
def wilson_interval(successes, n, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (lo, hi) for ``successes`` out of ``n`` (arrays; NaN where n == 0 or NaN)."""
    c = np.asarray(successes, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = c / n
        den = 1 + z * z / n
        mid = (p + z * z / (2 * n)) / den
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
        lo, hi = np.clip(mid - half, 0, 1), np.clip(mid + half, 0, 1)
    bad = ~(n > 0)
    lo[bad] = np.nan
    hi[bad] = np.nan
    return lo, hi


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 − C(n−c, k) / C(n, k) (Chen et al. 2021), computed as a stable product."""
    if not (isinstance(n, (int, np.integer)) and isinstance(c, (int, np.integer)) and isinstance(k, (int, np.integer))):
        raise InputError("pass_at_k needs integer n, c, k.")
    if not 0 <= c <= n or not 1 <= k <= n:
        raise InputError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def critical_index(keep_acc: Sequence[float], threshold: float = CRITICAL_THRESHOLD) -> int | None:
    """The paper's rule: the last token of the first prefix whose keep-accuracy is 0; reset if a later prefix
    gets back above ``threshold``. NaN entries (positions not evaluated) are skipped. None if no such token."""
    crit = None
    for i, a in enumerate(keep_acc):
        a = float(a)
        if math.isnan(a):
            continue
        if crit is None and a == 0:
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
        pass_at_k ``[U, len(ks)]`` from the keep arm; critical_index: the paper's critical unit or None.
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
                         "criticality", "counterfactual_importance", "keep_success", "replace_success", "replace_n"):
                row[name] = float(getattr(self, name)[i])
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
        return (f"<b>CriticalTokensResult</b> ({self.granularity}s, {self.n_samples} samples/arm, prompt-only "
                f"accuracy {self.base_accuracy:.2f}, critical {self.granularity}: {crit})<br>"
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


def model_sentence_embedder(m: LensModel, layer: int | None = None) -> Callable[[list[str]], torch.Tensor]:
    """Offline default sentence embedder: mean-pooled residual stream of ``m`` at ``layer`` (default: the middle
    layer) over the sentence's tokens (no BOS). Returns ``[n, d_model]`` float32."""
    layer = m.n_layers // 2 if layer is None else m.check_layers(layer, "layer")[0]

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for t in texts:
            if not t.strip():
                out.append(torch.zeros(m.d_model))
                continue
            ids = m.encode(t, add_bos=False, truncate=True)[None]
            with m.hooks([layer]) as store:
                m.forward(ids)
            out.append(store[layer][0].float().mean(0).cpu())
        return torch.stack(out)
    embed.__name__ = f"model_sentence_embedder(layer={layer})"
    return embed


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


def critical_tokens(m: LensModel, prompt: str, response: str, *, checker: Callable[[str], bool],
                    n_samples: int = 32, mode: str = "rollout", granularity: str = "token",
                    temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64,
                    stop: str | Sequence[str] | None = None, seed: int = 0, positions: Sequence[int] | None = None,
                    search: str = "full", stride: int = 8, refine_drop: float = 0.25,
                    threshold: float = CRITICAL_THRESHOLD, pass_k: Sequence[int] = (1, 4, 16),
                    similarity_threshold: float = 0.8, embedder: Callable[[list[str]], torch.Tensor] | None = None,
                    sampler: Callable[[RolloutRequest], list] | None = None, batch_size: int = 32,
                    cache_dir: str | os.PathLike | None = None, progress: bool = True) -> CriticalTokensResult:
    """Rollout criticality of every token (or sentence) of ``response`` to ``prompt``.

    Args:
        checker: ``text -> bool`` on the *response* text (response prefix + forced token + continuation); use
            :data:`lensbench.checkers` (``number(gold, rel_tol=...)``, ``exact(...)``, ``regex(...)``).
        n_samples: continuations per arm and unit.
        granularity: ``"token"`` (keep vs forbid-the-token arms) or ``"sentence"`` (resampling and counterfactual
            importance: keep = rollouts after sentence i; replace = rollouts from before sentence i whose first
            regenerated sentence has cosine < ``similarity_threshold`` to sentence i under ``embedder``, default
            :func:`model_sentence_embedder`).
        temperature, top_p, max_new_tokens, stop: sampling settings (stop strings end a continuation;
            temperature 0 is greedy: every sample is the same and the replace arm takes the runner-up token).
        seed: results are a deterministic function of the seed (independent of ``batch_size`` and resuming).
        positions: evaluate only these units (others are NaN); search: ``"full"`` or ``"coarse"`` (every
            ``stride``-th unit plus the last, then bisect between evaluated neighbours whose keep-accuracy differs
            by >= ``refine_drop`` or crosses ``threshold``, down to adjacent units).
        threshold: reset threshold of the critical-token rule (default 3/64); pass_k: k values for pass@k.
        sampler: ``RolloutRequest -> list of generated id lists (or continuation strings)``; default
            :func:`hf_sampler` (batched ``generate`` reusing the prefix KV cache).
        batch_size: rows per ``generate`` call; cache_dir: directory for per-unit results (resumable).
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

    eng = _Engine(m, prompt_ids, resp_ids, checker, n_samples, settings, seed, sampler or hf_sampler, batch_size,
                  progress)
    key = _mix("critical/1", m.name, str(m.dtype), prompt_ids, resp_ids, _checker_name(checker), n_samples,
               settings, seed, granularity, getattr(sampler or hf_sampler, "__qualname__", repr(sampler)),
               similarity_threshold if granularity == "sentence" else None)
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
    emb = embedder if embedder is not None else (model_sentence_embedder(m) if granularity == "sentence" else None)

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
                return {"dissimilar": [bool(c < similarity_threshold) for c in cos.tolist()]}
            sim = cached(f"sim{i:06d}", cf)
            rec = {"unit": i, "keep": after["texts"], "keep_ok": after["ok"], "replace": before["texts"],
                   "replace_ok": before["ok"], "replace_first": [_first_sentence(t) for t in before["tails"]],
                   "dissimilar": sim["dissimilar"]}
        bar.update(1)
        return rec

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
                    if abs(ka - kb) >= refine_drop or ((ka > threshold) != (kb > threshold)) or (
                            (ka == 0) != (kb == 0)):
                        todo.append((a + b) // 2)
                if not todo:
                    break
                for i in todo:
                    recs[i] = unit(i)
    finally:
        bar.close()
    return _assemble(m, prompt, response, units, spans, resp_ids, granularity, recs, base, n_samples, settings,
                     checker, threshold, ks, eng.n_rollouts)


def _assemble(m, prompt, response, units, spans, resp_ids, granularity, recs, base, n, settings, checker, threshold,
              ks, n_rollouts) -> CriticalTokensResult:
    U = len(units)
    nan = float("nan")
    ks_ = np.full(U, nan)
    kn = np.full(U, nan)
    rs = np.full(U, nan)
    rn = np.full(U, nan)
    pk = np.full((U, len(ks)), nan)
    conts = []
    for i in sorted(recs):
        r = recs[i]
        ks_[i], kn[i] = sum(r["keep_ok"]), len(r["keep_ok"])
        mask = r.get("dissimilar") or [True] * len(r["replace_ok"])
        rs[i] = sum(ok for ok, keepit in zip(r["replace_ok"], mask) if keepit)
        rn[i] = sum(mask)
        for j, k in enumerate(ks):
            pk[i, j] = pass_at_k(int(kn[i]), int(ks_[i]), k)
        conts.append(dict(r))
    with np.errstate(invalid="ignore", divide="ignore"):
        keep = ks_ / kn
        rep = rs / rn
    klo, khi = wilson_interval(ks_, kn)
    rlo, rhi = wilson_interval(rs, rn)
    drop = np.full(U, nan)
    drop[:-1] = keep[:-1] - keep[1:]
    base_acc = float(np.mean(base["ok"]))
    before = np.concatenate([[base_acc], keep[:-1]])
    crit = before - keep
    cfi = keep - rep

    def t(a):
        return torch.tensor(a, dtype=torch.float32)
    return CriticalTokensResult(
        prompt=prompt, response=response, units=list(units), unit_spans=[list(s) for s in spans],
        token_ids=torch.tensor(resp_ids, dtype=torch.long), granularity=granularity, keep_acc=t(keep),
        keep_lo=t(klo), keep_hi=t(khi), keep_success=t(ks_), replace_acc=t(rep), replace_lo=t(rlo),
        replace_hi=t(rhi), replace_success=t(rs), replace_n=t(rn), drop=t(drop), criticality=t(crit),
        counterfactual_importance=t(cfi), pass_at_k=t(pk), ks=list(ks), base_accuracy=base_acc,
        critical_index=critical_index(keep, threshold), evaluated=sorted(recs), continuations=conts, n_samples=n,
        settings=settings, checker=_checker_name(checker), threshold=float(threshold), model_name=m.name,
        n_rollouts=n_rollouts)


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
           "Checker", "number", "exact", "regex", "pass_at_k", "wilson_interval", "critical_index", "split_sentences",
           "model_sentence_embedder", "hf_sampler", "RolloutRequest", "PrefixState", "seeded_choice"]

"""The filler sweep: answer log-probability and greedy exact match after N filler tokens of several kinds
(literal strings, counting, the question repeated, random words; optionally each item's chain of thought).

With ``reuse_cache`` the question runs once per item (:class:`lensbench.engine.KVCache`); the filler kinds share
it, their longest filler run goes through once and every shorter N crops the cache back. Without it every arm
is a full sequence scored by :func:`lensbench.engine.score_spans`. Both give the same numbers, and neither
depends on ``batch_size`` or where memory ran out.
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ...engine import KVCache, run_batches, score_spans
from ...engine.prefix import CropUnsupported
from ...errors import InputError
from ...model import LensModel
from ...plots.filler import sweep_figure
from ...results import Result
from ...stats import mean_ci
from ...validation import Check, Interval, SequenceOf, validate_params
from ._common import CI_PARAMS, SHARED_PARAMS, _clip, _ids, _summary_frame, _tup

SPECIAL_FILLERS = ("counting", "repeat_question", "random_words", "cot")
_RANDOM_WORDS = (
    "apple river stone cloud paper lamp window garden violin mirror ladder candle basket pepper rocket forest "
    "button castle pencil blanket bottle marble tunnel harbor feather lantern meadow copper walnut saddle orbit "
    "velvet canyon pillow thunder biscuit falcon glacier ribbon compass anchor kettle parrot tulip granite"
).split()


@dataclasses.dataclass(eq=False)
class FillerSweepResult(Result):
    """Answer log-probability and greedy exact match after N filler tokens of each kind.

    Attributes (K kinds, M counts, N items):
        kinds: filler kinds (a literal string such as ``" ."``, or ``"counting"``, ``"repeat_question"``,
            ``"random_words"``, ``"cot"``); counts: the N values (number of filler *tokens*).
        logprob: ``[K, M, N]`` float64 sum of log p(answer tokens | question, fillers, template); NaN where an arm
            does not exist (``"cot"`` has one arm, stored at count index 0, its length in ``n_tokens``).
        correct: ``[K, M, N]`` greedy exact match (1/0, NaN where absent).
        n_tokens: ``[K, M, N]`` filler tokens actually inserted (``cot``: the chain's length).
        questions, answers: the items; template: text between fillers and answer; settings; model_name.

    ``to_dataframe()``: :meth:`summary` as a table, one row per (kind, count): ``kind``, ``count``,
    ``filler_tokens``, ``logprob`` (mean), ``accuracy``, ``delta_logprob`` and ``delta_accuracy`` (vs count 0),
    ``accuracy_ci_lo`` / ``accuracy_ci_hi``, ``delta_ci_lo`` / ``delta_ci_hi``, ``delta_accuracy_ci_lo`` /
    ``delta_accuracy_ci_hi`` (95 %, over items), ``n_items`` and ``ci_method``.
    """

    kinds: list
    counts: list
    logprob: torch.Tensor
    correct: torch.Tensor
    n_tokens: torch.Tensor
    questions: list
    answers: list
    template: str = ""
    settings: dict = dataclasses.field(default_factory=dict)
    model_name: str = ""

    def summary(self) -> list[dict]:
        """One row per (kind, count): mean log p, Δ vs N=0 and accuracy, each with a CI over items, and n.

        Items are independent (one value each), so the CIs are :func:`lensbench.stats.mean_ci` with
        ``clusters=None``: a Student-t interval below 20 items, a BCa bootstrap from 20 on (``ci_method``).
        ``n_items`` counts the items of the row (an arm that does not exist for an item is NaN and left out).
        """
        st = self.settings
        kw = dict(level=st.get("ci", 0.95), seed=st.get("seed", 0), n_boot=st.get("n_boot", 2000))
        base_lp = self.logprob[0, self.counts.index(0)] if 0 in self.counts else None
        base_ok = self.correct[0, self.counts.index(0)] if 0 in self.counts else None
        rows = []
        for k, kind in enumerate(self.kinds):
            for j, cnt in enumerate(self.counts):
                lp, ok = self.logprob[k, j].numpy(), self.correct[k, j].numpy()
                if not np.isfinite(lp).any():
                    continue
                if kind == "cot":
                    cnt = int(round(float(np.nanmean(self.n_tokens[k, j].numpy()))))
                acc = mean_ci(ok, **kw)
                r = {"kind": kind, "count": cnt, "filler_tokens": float(np.nanmean(self.n_tokens[k, j].numpy())),
                     "logprob": float(np.nanmean(lp)), "accuracy": acc.estimate, "accuracy_ci": _clip(acc, 0, 1),
                     "n_items": acc.n, "ci_method": acc.method}
                if base_lp is not None:
                    d = mean_ci(lp - base_lp.numpy(), **kw)
                    da = mean_ci(ok - base_ok.numpy(), **kw)
                    r.update(delta_logprob=d.estimate, delta_ci=_tup(d), delta_accuracy=da.estimate,
                             delta_accuracy_ci=_clip(da, -1, 1))
                rows.append(r)
        return rows

    def to_dataframe(self):
        return _summary_frame(self.summary())

    def figure(self, metric: str = "delta_logprob", kinds: Sequence[str] | None = None):
        """Curves per filler kind against N with CI bands over items (:meth:`summary`); ``metric``:
        ``"delta_logprob"``, ``"logprob"`` or ``"accuracy"``. See :func:`lensbench.plots.filler.sweep_figure`."""
        return sweep_figure(self, metric, kinds)


def _filler_ids(m: LensModel, kind: str, n: int, item: dict, rng: random.Random) -> list[int]:
    """The first ``n`` tokens of a filler of ``kind`` (prefix-consistent in ``n``)."""
    if n == 0:
        return []
    tok = m.tokenizer
    if kind == "counting":
        ids: list[int] = []
        k = 1
        while len(ids) < n:
            ids += tok(f" {k}", add_special_tokens=False)["input_ids"]
            k += 1
        return ids[:n]
    if kind == "repeat_question":
        unit = tok(" " + item["question"].strip(), add_special_tokens=False)["input_ids"]
    elif kind == "random_words":
        ids = []
        while len(ids) < n:
            ids += tok(" " + rng.choice(_RANDOM_WORDS), add_special_tokens=False)["input_ids"]
        return ids[:n]
    else:
        unit = tok(kind, add_special_tokens=False)["input_ids"]
    if not unit:
        raise InputError(f"fillers contains {kind!r}, which tokenises to nothing; use e.g. ' .'.")
    return (unit * (n // len(unit) + 1))[:n]


def _normalize_sweep_items(items) -> list[dict]:
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, (list, tuple)) or not items:
        raise InputError("items must be a non-empty list of dicts {'question': ..., 'answer': ...} "
                         "(e.g. lb.tasks.factual() or lb.tasks.arithmetic(20)).")
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("question"), str) or not it["question"].strip() \
                or not isinstance(it.get("answer"), str) or not it["answer"].strip():
            raise InputError(f"items[{i}] must be a dict with non-empty string 'question' and 'answer' fields.")
    return list(items)


def _nonempty_str(v) -> bool:
    return isinstance(v, str) and bool(v)


_FILLER = Check(_nonempty_str, "a non-empty string")
_FILLER_SWEEP_PARAMS = {
    **SHARED_PARAMS, **CI_PARAMS,
    "fillers": [_FILLER, SequenceOf(_FILLER, min_len=0)],
    "counts": [Interval(int, 0, None), SequenceOf(Interval(int, 0, None))],
    "template": [None, str],
    "cot": [bool],
    "reuse_cache": [bool],
}


@validate_params(_FILLER_SWEEP_PARAMS)
def filler_sweep(m: LensModel, items, *, fillers=(" .",), counts=(0, 8, 32, 128), template: str | None = None,
                 cot: bool = False, reuse_cache: bool = True, seed: int = 0, n_boot: int = 1000,
                 ci: float = 0.95, batch_size: int | str = "auto", progress: bool = True,
                 engine=None) -> FillerSweepResult:
    """Score ``question + N fillers + template + answer`` for every filler kind and N.

    Args:
        items: dicts with ``question`` and ``answer`` (the answer usually starts with a space); an item may carry
            its own ``template`` and, for ``cot=True``, a ``cot`` chain of thought.
        fillers: kinds: any literal string (its tokens repeated, e.g. ``" ."``, ``"..."``), ``"counting"``
            (`` 1 2 3 …``), ``"repeat_question"`` (the question again), ``"random_words"`` (random common words,
            the same number of tokens: a control). N counts filler *tokens* (the first N of the repeated string).
        counts: the N values; 0 = no intermediate tokens (shared by every kind).
        template: text between fillers and answer (default ``item.get("template", "\\nAnswer:")``).
        cot: add an arm ``"cot"`` with each item's ``cot`` text in place of the fillers.
        reuse_cache: run the question once per item and reuse its KV cache (and each filler run's prefix, longest
            N first, cropping the cache) across arms; ``False`` recomputes every arm from scratch (same numbers).
        seed: seeds the random-word control and the bootstrap. n_boot, ci: bootstrap resamples (from 20 items on)
            and CI level of :meth:`FillerSweepResult.summary`.
        batch_size: rows per forward pass — filler kinds extended together on the question's cache, or arms
            scored together from scratch — or ``"auto"`` (a token budget, halved on out-of-memory).
        engine: what scores the arms: ``None``/``"hf"`` (in-process, default) or ``lb.engines.VLLM(url)`` (a vLLM
            server's ``prompt_logprobs``; arms are sent as full sequences and its prefix cache does the reuse, so
            ``reuse_cache`` is moot). Recorded in ``result.settings["engine"]``.

    On a model loaded through another backend (nnsight, TransformerLens) the arms are scored from scratch through
    that backend (the cached path would run the transformers model directly).
    """
    items = _normalize_sweep_items(items)
    if isinstance(fillers, str):
        fillers = (fillers,)
    counts = sorted({int(c) for c in (counts if isinstance(counts, (list, tuple)) else (counts,))})
    if cot and not all(isinstance(it.get("cot"), str) and it["cot"] for it in items):
        raise InputError("cot=True needs a 'cot' string in every item (lb.tasks.arithmetic(..) has one).")
    kinds = list(dict.fromkeys(fillers)) + (["cot"] if cot else [])
    K, M, N = len(kinds), len(counts), len(items)
    lp = torch.full((K, M, N), float("nan"), dtype=torch.float64)
    ok = torch.full((K, M, N), float("nan"))
    ntok = torch.zeros((K, M, N))
    from ...engines import resolve_engine
    engine = resolve_engine(engine)
    if engine.name != "hf" or m.backend != "hf":
        reuse_cache = False  # scored as full sequences by the engine / through the backend
    if reuse_cache and not m.capabilities["prefix_cache"]:
        warnings.warn(f"filler_sweep: {m.name} cannot reuse a prefix cache "
                      f"({m.capabilities['prefix_cache_reason']}); scoring every arm from scratch "
                      "(reuse_cache=False: the same numbers, slower).", stacklevel=2)
        reuse_cache = False
    bar = tqdm(total=N, desc="filler sweep", disable=not progress or N <= 1, leave=False)
    for i, it in enumerate(items):
        tmpl = it.get("template", "\nAnswer:") if template is None else template
        q_ids = _ids(m, it["question"], bos=True, param=f"items[{i}]['question']")
        tail = _ids(m, tmpl, bos=False, param="template") if tmpl else []
        a_ids = _ids(m, it["answer"], bos=False, param=f"items[{i}]['answer']")
        arms = []   # (k, [(j, filler ids)]) with fillers of one kind as prefixes of the longest
        for k, kind in enumerate(kinds):
            if kind == "cot":
                arms.append((k, _Arm([(0, _ids(m, " " + it["cot"].strip(), bos=False, param="cot"))])))
                continue
            rng = random.Random(f"{seed}:{i}:{kind}")
            full = _filler_ids(m, kind, counts[-1], it, rng)
            arms.append((k, [(j, full[:c]) for j, c in enumerate(counts)]))
        total = len(q_ids) + max(len(f) for _, a in arms for _, f in a) + len(tail) + len(a_ids)
        if total > m.max_length:
            raise InputError(f"items[{i}] with {counts[-1]} fillers is {total} tokens, more than {m.name}'s "
                             f"{m.max_length}; use smaller counts or shorter questions.")
        scores: dict[tuple[int, int], tuple] = {}
        if reuse_cache:
            try:
                _sweep_cached(m, q_ids, arms, tail, a_ids, scores, batch_size)
            except CropUnsupported as e:
                warnings.warn(f"this model's KV cache cannot be cropped ({e}); recomputing each arm from scratch",
                              stacklevel=2)
                scores.clear()
                _sweep_scratch(m, q_ids, arms, tail, a_ids, scores, batch_size)
        else:
            _sweep_scratch(m, q_ids, arms, tail, a_ids, scores, batch_size, engine)
        zero = [(k, j) for k, arm in arms if not _is_cot(arm) for j, f in arm if not f]
        for k, j in zero:   # N = 0 is one arm shared by every kind (batched rows may differ in the last bits)
            scores[(k, j)] = scores[zero[0]]
        for k, arm in arms:
            for j, f in arm:
                s = scores[(k, j)]
                lp[k, j, i], ok[k, j, i], ntok[k, j, i] = s[0], float(s[1]), len(f)
        bar.update(1)
    bar.close()
    return FillerSweepResult(kinds=kinds, counts=list(counts), logprob=lp, correct=ok, n_tokens=ntok,
                             questions=[it["question"] for it in items], answers=[it["answer"] for it in items],
                             template="\nAnswer:" if template is None else template,
                             settings={"seed": seed, "n_boot": n_boot, "ci": ci, "reuse_cache": reuse_cache,
                                       "engine": engine.name},
                             model_name=m.name)


def _sweep_scratch(m: LensModel, q_ids, arms, tail, a_ids, scores, batch_size, engine=None) -> None:
    """Every arm as a full sequence ``question + fillers + template + answer`` (identical ones once), scored
    together by :func:`score_spans`."""
    seqs: dict[tuple, list] = {}
    for k, arm in arms:
        for j, f in arm:
            seqs.setdefault(tuple(q_ids + f + tail + a_ids), []).append((k, j))
    keys = list(seqs)
    score = score_spans if engine is None or engine.name == "hf" else engine.score
    for key, s in zip(keys, score(m, [list(x) for x in keys], [len(a_ids)] * len(keys), batch_size=batch_size)):
        for kj in seqs[key]:
            scores[kj] = s


def _sweep_cached(m: LensModel, q_ids, arms, tail, a_ids, scores, batch_size) -> None:
    """The question once (one row). The filler kinds go in groups of ``batch_size`` rows (halved on
    out-of-memory, each try on a fresh copy of the question's cache): the group's longest filler runs in one
    call, then each N (longest first) crops back to question + N and scores template + answer for the whole
    group in one call. A ``cot`` arm then extends its own copy of the question's cache."""
    q = KVCache(m)
    q.extend([q_ids])
    plain = [(k, dict(arm)) for k, arm in arms if not _is_cot(arm)]
    if plain:
        _sweep_kinds(m, q, plain, tail, a_ids, q_ids, scores, batch_size)
    for k, arm in arms:
        if _is_cot(arm):
            f = arm[0][1]
            kv = q.copy()
            kv.extend([f])
            scores[(k, 0)] = _score_tail(kv, q.length, [f], tail, a_ids, q_ids)[0]


def _sweep_kinds(m: LensModel, q: KVCache, plain, tail, a_ids, q_ids, scores, batch_size) -> None:
    """The filler kinds ``plain`` (``[(k, {j: filler ids})]``) on the question's cache ``q`` (left unchanged)."""
    q_len = q.length
    js = sorted(plain[0][1], key=lambda j: -len(plain[0][1][j]))   # longest N first
    width = q_len + len(plain[0][1][js[0]]) + max(1, len(tail)) + len(a_ids)

    def step(idx: list[int]) -> None:
        kv = q.copy()
        kv.repeat(len(idx))
        if plain[idx[0]][1][js[0]]:
            kv.extend([plain[r][1][js[0]] for r in idx])
        for j in js:
            for r, s in zip(idx, _score_tail(kv, q_len, [plain[r][1][j] for r in idx], tail, a_ids, q_ids)):
                scores[(plain[r][0], j)] = s

    run_batches(m, [range(width)] * len(plain), step, batch_size=batch_size, progress=False, longest_first=False)


def _is_cot(arm) -> bool:
    return getattr(arm, "cot", False)


class _Arm(list):
    """A list of ``(count index, filler ids)`` marked as a chain-of-thought arm."""
    cot = True


def _score_tail(kv: KVCache, q_len: int, fs: list[list[int]], tail, a_ids, q_ids) -> list:
    """Score template + answer after question + fillers ``fs`` (one row per cache row, equal lengths; the cache
    holds at least question + fillers and is cropped to exactly that)."""
    n = len(fs[0])
    kv.crop(q_len + n)
    if tail:
        rows = [tail + a_ids for _ in fs]
    else:  # no template: the context's last token predicts the first answer token; run it again
        kv.crop(q_len + n - 1)
        rows = [(q_ids + f)[-1:] + a_ids for f in fs]
    out = kv.extend(rows, score_last=len(a_ids))
    kv.crop(q_len + n)
    return out

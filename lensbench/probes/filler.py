"""Filler tokens: do tokens that look empty (punctuation, stopwords, articles, runs of dots) carry computation?

Three probes, after LLM-Microscope (removing stopwords/punctuation/articles lowers accuracy) and "Let's Think
Dot by Dot" (Pfau, Merrill & Bowman: meaningless filler can stand in for a chain of thought):

* :func:`filler_ablation` — remove a token class from each context at the *word* level and re-tokenise (or
  replace its tokens with a neutral token, keeping positions), then measure the change in mean loss on a
  held-out continuation / answer span that is never edited, against a seeded random-removal control that removes
  exactly as many tokens of non-class words. CIs resample texts (:func:`lensbench.stats.mean_ci`).
* :func:`filler_sweep` — answer log-probability and greedy exact match after N filler tokens of several kinds,
  with the question's KV cache (and each filler run's prefix) reused across arms.
* :func:`filler_probe` — per-layer logistic probes on the residual at filler positions predicting the answer, vs
  the same probe at the last question token (which has seen the same question; like-for-like) and a
  shuffled-label control.

Definitions used throughout:

* a *unit* is a word (``\\w+`` with inner apostrophes) or a single non-space, non-word character, together with
  the whitespace before it; class membership is decided per unit;
* "tokens removed" = length of the context's token ids before minus after the edit (word-level removal) or the
  number of tokens replaced (position-keeping mode);
* greedy exact match of an answer = the model's argmax equals the gold token at every answer position under
  teacher forcing, which is exactly "greedy decoding starts with the gold answer".
"""

from __future__ import annotations

import dataclasses
import random
import re
import unicodedata
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..model import LensModel
from ..results import Result
from ..stats import mean_ci

ARTICLES = frozenset({"a", "an", "the"})
CLASSES = ("punctuation", "stopwords", "articles", "commas")
SPECIAL_FILLERS = ("counting", "repeat_question", "random_words", "cot")
_UNIT = re.compile(r"(\s*)(\w+(?:['’]\w+)*|[^\w\s])")
_RANDOM_WORDS = (
    "apple river stone cloud paper lamp window garden violin mirror ladder candle basket pepper rocket forest "
    "button castle pencil blanket bottle marble tunnel harbor feather lantern meadow copper walnut saddle orbit "
    "velvet canyon pillow thunder biscuit falcon glacier ribbon compass anchor kettle parrot tulip granite"
).split()


#: Closed-class English function words (the default "stopwords" class): determiners and quantifiers, pronouns,
#: prepositions, conjunctions and subordinators, wh-words, auxiliaries and modals (with their negative
#: contractions), and a few closed-class adverbs / particles. No numerals and no open-class words: unlike
#: scikit-learn's ``ENGLISH_STOP_WORDS`` (a retrieval list) it does not contain "one", "fifty", "hundred",
#: "system", "fire", "bill", "interest", "amount", "found", "call", ... — removing those deletes content, not
#: filler. Close in spirit to NLTK's English list (function words only), which is what "removing stopwords" means
#: in LLM-Microscope's ablation (determiners, articles, punctuation: "tokens often seen as minor").
FUNCTION_WORDS = frozenset("""
a an the this that these those each every either neither some any no all both several enough such what which
whose whatever whichever another other others
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she her hers
herself it its itself they them their theirs themselves who whom whoever whomever oneself
someone somebody something anyone anybody anything everyone everybody everything nobody nothing none
about above across after against along amid among amongst around as at before behind below beneath beside
besides between beyond by despite down during except for from in inside into near of off on onto out outside
over per since than through throughout till to toward towards under underneath unlike until up upon via with
within without
and but or nor so yet because although though while whereas if unless whether once lest when whenever where
wherever whereby wherein why how
am is are was were be been being have has had having do does did doing will would shall should can could may
might must ought
isn't aren't wasn't weren't hasn't haven't hadn't doesn't don't didn't won't wouldn't shan't shouldn't can't
cannot couldn't mightn't mustn't
not also just only even too very then there here
""".split())
STOPWORD_SOURCES = ("function", "sklearn")


def stop_words(source: str = "function") -> frozenset[str]:
    """The stop-word list of the ``"stopwords"`` class.

    ``"function"`` (default): :data:`FUNCTION_WORDS`, a closed-class function-word list. ``"sklearn"``:
    scikit-learn's ``ENGLISH_STOP_WORDS`` (318 words, ships offline; the default before issue 13 — it also holds
    numerals and content words such as "one", "fifty", "system", "fire", "bill", "interest", "amount").
    """
    if source == "function":
        return FUNCTION_WORDS
    if source == "sklearn":
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
        return frozenset(ENGLISH_STOP_WORDS)
    raise InputError(f"stop-word source {source!r}; use one of {STOPWORD_SOURCES} or pass a list of words.")


# --------------------------------------------------------------------------------------------- text editing
def split_units(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, piece)`` of every unit; ``text[start:end]`` is the unit with its leading whitespace.

    Trailing whitespace of the text is not part of any unit (it is kept by :func:`remove_units`).
    """
    return [(mt.start(), mt.end(), mt.group(2)) for mt in _UNIT.finditer(text)]


def is_punctuation(piece: str) -> bool:
    return len(piece) == 1 and unicodedata.category(piece).startswith("P")


def _class_test(name: str, stopwords: frozenset[str]):
    if name == "punctuation":
        return is_punctuation
    if name == "stopwords":
        return lambda p: p.lower() in stopwords
    if name == "articles":
        return lambda p: p.lower() in ARTICLES
    if name == "commas":
        return lambda p: p == ","
    raise InputError(f"classes contains {name!r}; known classes are {CLASSES} or combinations of them such as "
                     "('punctuation', 'stopwords') or 'punctuation+stopwords'.")


def normalize_classes(classes) -> list[tuple[str, tuple[str, ...]]]:
    """``[(label, (class, ...)), ...]`` from ``("punctuation", ("punctuation", "stopwords"), "a+b", ...)``."""
    if isinstance(classes, str):
        classes = (classes,)
    if not isinstance(classes, (list, tuple)) or not classes:
        raise InputError(f"classes must be a non-empty tuple of class names from {CLASSES} (or tuples / '+'-joined "
                         f"names for combinations), got {classes!r}.")
    out = []
    for c in classes:
        parts = tuple(c.split("+")) if isinstance(c, str) else tuple(c) if isinstance(c, (list, tuple)) else None
        if not parts or not all(isinstance(p, str) and p for p in parts):
            raise InputError(f"classes contains {c!r}; use a class name from {CLASSES}, a '+'-joined name or a "
                             "tuple of names.")
        for p in parts:
            _class_test(p, frozenset())
        out.append(("+".join(parts), parts))
    return out


def class_mask(units: Sequence[tuple[int, int, str]], parts: Sequence[str], stopwords: frozenset[str]) -> list[bool]:
    tests = [_class_test(p, stopwords) for p in parts]
    return [any(t(piece) for t in tests) for _, _, piece in units]


def remove_units(text: str, units: Sequence[tuple[int, int, str]], drop: Sequence[bool]) -> str:
    """``text`` without the dropped units. A dropped unit's leading whitespace moves to the next kept unit when
    that one had none (``"word (see"`` minus ``(`` gives ``"word see"``)."""
    out, pending, pos = [], "", 0
    for (s, e, piece), d in zip(units, drop):
        out.append(text[pos:s])  # inter-unit text (none for a regex match sequence) kept verbatim
        ws = text[s:e - len(piece)]
        if d:
            pending = pending or ws
        else:
            out.append((ws or pending) + piece)
            pending = ""
        pos = e
    out.append(text[pos:])
    res = "".join(out)
    return res.lstrip() if drop and drop[0] and not text[:1].isspace() else res


# --------------------------------------------------------------------------------------------- scoring
def _ids(m: LensModel, text: str, *, bos: bool, param: str) -> list[int]:
    if bos:
        return m.encode(text, param=param).tolist()
    if not isinstance(text, str):
        raise InputError(f"{param} must be a string, got {type(text).__name__}.")
    return list(m.tokenizer(text, add_special_tokens=False)["input_ids"])


def _call(m: LensModel, ids: torch.Tensor, **kw):
    if "past_key_values" in kw and _cache_kwarg(m) != "past_key_values":
        kw["cache"] = kw.pop("past_key_values")
    try:
        return m.model(input_ids=ids, logits_to_keep=1, **kw)
    except TypeError:
        return m.model(input_ids=ids, **kw)


def _cache_kwarg(m: LensModel) -> str:
    import inspect
    try:
        params = inspect.signature(m.model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def _score_batch(m: LensModel, seqs: list[list[int]], n_ans: list[int], batch_size: int = 8):
    """Teacher-forced answer scores for full sequences whose last ``n_ans[i]`` tokens are the answer.

    Returns per sequence ``(sum log p(answer), all-argmax-correct, per-token log-probs)``. Right padding; only the
    answer-predicting positions are unembedded (the last block's output through :meth:`LensModel.unembed`).
    """
    L = m.n_layers
    out: list = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    pad = m.tokenizer.pad_token_id or 0
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        T = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, :len(seqs[i])] = 1
        with m.hooks([L]) as store:
            _call(m, ids.to(m.input_device), attention_mask=mask.to(m.input_device), use_cache=False)
        h = store[L]
        rows, cols, gold = [], [], []
        for r, i in enumerate(idx):
            n, a = len(seqs[i]), n_ans[i]
            rows += [r] * a
            cols += list(range(n - a - 1, n - 1))
            gold += seqs[i][n - a:]
        out_b = _readout(m, h[torch.tensor(rows, device=h.device), torch.tensor(cols, device=h.device)], gold)
        k = 0
        for i in idx:
            a = n_ans[i]
            lp, ok = out_b[0][k:k + a], out_b[1][k:k + a]
            out[i] = (float(lp.sum()), bool(ok.all()), lp)
            k += a
    return out


def _readout(m: LensModel, h: torch.Tensor, gold: list[int]):
    """log p(gold) and argmax == gold for rows of last-block outputs ``h`` ([n, d]); float32 log-softmax."""
    lp_all, hit = [], []
    g = torch.tensor(gold, device=m.device)
    for s in range(0, len(gold), 64):
        z = m.unembed(h[s:s + 64])
        lps = torch.log_softmax(z, -1)
        lp_all.append(lps.gather(-1, g[s:s + 64, None])[:, 0].double().cpu())
        hit.append((z.argmax(-1) == g[s:s + 64]).cpu())
    return torch.cat(lp_all), torch.cat(hit)


@torch.no_grad()
def _extend(m: LensModel, cache, rows: list[list[int]], score_last: int = 0):
    """Run ``rows`` (equal lengths, one per cache row) on top of ``cache`` (mutated in place). If ``score_last``
    = a > 0, score each row's last ``a`` ids as an answer (the position before each predicts it) and return
    ``[(sum lp, exact, per-token lp)]`` per row."""
    L = m.n_layers
    x = torch.tensor(rows, device=m.input_device)
    past = cache.get_seq_length()
    mask = torch.ones((x.shape[0], past + x.shape[1]), dtype=torch.long, device=m.input_device)
    with m.hooks([L]) as store:
        _call(m, x, past_key_values=cache, use_cache=True, attention_mask=mask)
    if not score_last:
        return None
    a, n = score_last, x.shape[1]
    if a >= n:
        raise InputError("internal: the scored span must be preceded by at least one token in the same call")
    h = store[L][:, n - a - 1:n - 1].reshape(-1, store[L].shape[-1])
    lp, ok = _readout(m, h, [t for r in rows for t in r[n - a:]])
    return [(float(lp[r * a:(r + 1) * a].sum()), bool(ok[r * a:(r + 1) * a].all()), lp[r * a:(r + 1) * a])
            for r in range(len(rows))]


def _new_cache(m: LensModel):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=m.model.config)
    except TypeError:  # pragma: no cover - older signature
        return DynamicCache()


# --------------------------------------------------------------------------------------------- inputs
def _normalize_items(texts, param: str, *, continuation_words: int) -> list[dict]:
    """Items ``{"context", "continuation", "has_answer"}`` from strings or ``{"question", "answer"}`` dicts."""
    if isinstance(texts, (str, dict)):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts:
        raise InputError(f"{param} must be a non-empty list of strings or of items {{'question': ..., 'answer': "
                         "...}} (e.g. lb.tasks.factual()).")
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            if not t.strip():
                raise InputError(f"{param}[{i}] is empty; pass some text.")
            units = split_units(t)
            if len(units) <= continuation_words:
                raise InputError(f"{param}[{i}] has {len(units)} words/punctuation marks, not more than "
                                 f"continuation_words={continuation_words}; pass a longer text or a smaller "
                                 "continuation_words.")
            cut = units[len(units) - continuation_words][0]
            out.append({"context": t[:cut], "bridge": "", "continuation": t[cut:], "has_answer": False})
        elif isinstance(t, dict):
            q, a = t.get("question"), t.get("answer")
            if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
                raise InputError(f"{param}[{i}] must have non-empty string 'question' and 'answer' fields, got "
                                 f"keys {sorted(t)}.")
            tmpl = t.get("template", "")
            if not isinstance(tmpl, str):
                raise InputError(f"{param}[{i}]['template'] must be a string.")
            out.append({"context": q, "bridge": tmpl, "continuation": a, "has_answer": True})
        else:
            raise InputError(f"{param}[{i}] is a {type(t).__name__}; pass strings or dicts with 'question' and "
                             "'answer'.")
    return out


def _check_int(v, name: str, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise InputError(f"{name} must be an int >= {lo}, got {v!r}.")
    return int(v)


# --------------------------------------------------------------------------------------------- ablation

def _tup(iv) -> tuple[float, float]:
    """``(lo, hi)`` of a :class:`lensbench.stats.Interval` as plain floats."""
    return (float(iv.lo), float(iv.hi))


def _clip(iv, lo: float, hi: float) -> tuple[float, float]:
    """An interval of a proportion (or a difference of two) clipped to its range (a t interval on 0/1 values can
    cross 0 or 1; the true value cannot)."""
    return (float(min(max(iv.lo, lo), hi)), float(max(min(iv.hi, hi), lo))) if np.isfinite(iv.lo) else _tup(iv)


def _summary_frame(summary: list[dict]):
    """A DataFrame of summary rows, each ``(lo, hi)`` confidence interval ``x_ci`` split into ``x_ci_lo``/``x_ci_hi``."""
    import pandas as pd
    rows = []
    for r in summary:
        r = dict(r)
        for k in [k for k in r if k.endswith("_ci")]:
            r[k + "_lo"], r[k + "_hi"] = r.pop(k)
        rows.append(r)
    return pd.DataFrame(rows)

@dataclasses.dataclass(eq=False)
class FillerAblationResult(Result):
    """Token-class ablation of contexts, scored on an unedited continuation / answer span.

    Attributes (C classes, S control seeds, N texts):
        classes: class labels (``"punctuation"``, ``"punctuation+stopwords"``, ...).
        loss_orig: ``[N]`` mean NLL per continuation token of the unedited context.
        loss_class: ``[C, N]`` after removing the class; loss_control: ``[C, S, N]`` after the random control.
        correct_orig / correct_class / correct_control: greedy exact match of the answer (items only; NaN for
            plain texts), shaped like the losses.
        frequency: ``[C, N]`` fraction of the context's units (words / punctuation marks) in the class.
        removed_tokens: ``[C, N]`` tokens removed (or replaced); control_removed_tokens: ``[C, S, N]``.
        context_tokens: ``[N]`` token count of each unedited context.
        contexts, continuations: the texts; edited: ``[C][N]`` edited contexts; removed_words: ``[C][N]`` the
            removed units; control_edited: ``[C][N]`` the first seed's control context.
        mode: ``"remove"`` (word level, re-tokenised) or ``"replace"`` (tokens → ``replacement``, positions kept).
        settings: seeds, CI settings, stop-word source; model_name.
        token_loss_orig: ``[N, T]`` NLL of every continuation token (T = longest continuation, NaN padding);
            token_loss_class ``[C, N, T]``, token_loss_control ``[C, S, N, T]`` likewise (the continuation is
            never edited, so its tokens are the same in every variant and the per-token Δ is well defined).
            ``None`` in results saved before issue 13 (then :meth:`summary` falls back to per-text means).
    """

    classes: list
    loss_orig: torch.Tensor
    loss_class: torch.Tensor
    loss_control: torch.Tensor
    correct_orig: torch.Tensor
    correct_class: torch.Tensor
    correct_control: torch.Tensor
    frequency: torch.Tensor
    removed_tokens: torch.Tensor
    control_removed_tokens: torch.Tensor
    context_tokens: torch.Tensor
    contexts: list
    continuations: list
    edited: list
    removed_words: list
    control_edited: list
    mode: str = "remove"
    settings: dict = dataclasses.field(default_factory=dict)
    model_name: str = ""
    token_loss_orig: torch.Tensor | None = None
    token_loss_class: torch.Tensor | None = None
    token_loss_control: torch.Tensor | None = None

    @property
    def delta(self) -> torch.Tensor:
        """``[C, N]`` loss change from removing the class (per-text mean over continuation tokens)."""
        return self.loss_class - self.loss_orig[None]

    @property
    def control_delta(self) -> torch.Tensor:
        """``[C, N]`` loss change from the random control, averaged over seeds."""
        return (self.loss_control - self.loss_orig[None, None]).mean(1)

    def token_deltas(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per continuation token of class ``c``: ``(Δ class, Δ control (seed mean), Δ class − Δ control,
        text index)``, flat float64 arrays over all texts' tokens (padding dropped)."""
        if self.token_loss_orig is None:
            raise InputError("this result has no per-token losses (saved before issue 13); use weight='texts'.")
        o = self.token_loss_orig.double()
        d = self.token_loss_class[c].double() - o
        cd = self.token_loss_control[c].double().mean(0) - o
        idx = torch.arange(o.shape[0])[:, None].expand_as(o)
        ok = torch.isfinite(o)
        return d[ok].numpy(), cd[ok].numpy(), (d - cd)[ok].numpy(), idx[ok].numpy()

    def summary(self, weight: str = "tokens") -> list[dict]:
        """One dict per class: frequency, effect, control effect, their difference, CIs, accuracy, and the n.

        Args:
            weight: ``"tokens"`` (default): Δ loss is the pooled mean over all continuation tokens of all texts
                and its CI resamples *texts* (the tokens of one text share a context; they are not independent):
                :func:`lensbench.stats.mean_ci` with ``clusters`` = text index — a cluster-robust Student-t
                interval below 20 texts, a BCa cluster bootstrap from 20 on. ``"texts"``: every text weighs
                the same (mean of per-text means; before issue 13 this, with a percentile bootstrap).

        ``n_texts``, ``n_tokens`` (scored continuation tokens) and ``ci_method`` are in every row; accuracy CIs
        are over items (independent, one value each; ``n_items``).
        """
        if weight not in ("tokens", "texts"):
            raise InputError(f"weight={weight!r}; use 'tokens' (pooled over tokens, CI over texts) or 'texts'.")
        if weight == "tokens" and self.token_loss_orig is None:
            weight = "texts"
        st = self.settings
        kw = dict(level=st.get("ci", 0.95), seed=st.get("seed", 0), n_boot=st.get("n_boot", 2000))
        n_tok = int(torch.isfinite(self.token_loss_orig).sum()) if self.token_loss_orig is not None else None
        rows = []
        for c, name in enumerate(self.classes):
            if weight == "tokens":
                d, cd, ex, g = self.token_deltas(c)
            else:
                d, cd = self.delta[c].double().numpy(), self.control_delta[c].double().numpy()
                ex, g = d - cd, None
            di, ci_, ei = (mean_ci(v, clusters=g, **kw) for v in (d, cd, ex))
            row = {
                "class": name, "frequency": float(self.frequency[c].mean()),
                "tokens_removed": float(self.removed_tokens[c].float().mean()),
                "token_share_removed": float((self.removed_tokens[c].float() / self.context_tokens.float()).mean()),
                "loss_orig": float(self.loss_orig.mean()), "loss_class": float(self.loss_class[c].mean()),
                "delta_loss": di.estimate, "delta_ci": _tup(di),
                "control_delta_loss": ci_.estimate, "control_ci": _tup(ci_),
                "excess_delta": ei.estimate, "excess_ci": _tup(ei),
                "n_texts": di.n_clusters, "n_tokens": n_tok, "ci_method": di.method, "weight": weight,
            }
            if torch.isfinite(self.correct_orig).any():
                a_c = mean_ci((self.correct_class[c] - self.correct_orig).numpy(), **kw)
                a_k = mean_ci((self.correct_control[c].mean(0) - self.correct_orig).numpy(), **kw)
                row.update(acc_orig=float(self.correct_orig.nanmean()),
                           acc_class=float(self.correct_class[c].nanmean()),
                           acc_control=float(self.correct_control[c].nanmean()),
                           acc_class_ci=_clip(a_c, -1, 1), acc_control_ci=_clip(a_k, -1, 1), n_items=a_c.n)
            rows.append(row)
        return rows

    def to_dataframe(self, weight: str = "tokens"):
        return _summary_frame(self.summary(weight))

    def figure(self, metric: str = "delta_loss"):
        """Bars per class (class removal vs random control) with CIs over texts (:meth:`summary`); ``metric``:
        ``"delta_loss"`` or ``"accuracy"`` (items with answers)."""
        import plotly.graph_objects as go
        rows = self.summary()
        names = [r["class"] for r in rows]
        fig = go.Figure()
        if metric == "accuracy":
            if "acc_orig" not in rows[0]:
                raise InputError("metric='accuracy' needs items with answers; these were plain texts.")
            for key, ci, label in (("acc_class", "acc_class_ci", "class removed"),
                                   ("acc_control", "acc_control_ci", "random control")):
                y = [r[key] for r in rows]
                lo = [r[key] - (r["acc_orig"] + r[ci][0]) for r in rows]
                hi = [(r["acc_orig"] + r[ci][1]) - r[key] for r in rows]
                fig.add_trace(go.Bar(x=names, y=y, name=label, error_y=dict(type="data", array=hi, arrayminus=lo)))
            fig.add_hline(y=rows[0]["acc_orig"], line_dash="dot", annotation_text="unedited")
            title, yt = "greedy exact match after removing each class", "accuracy"
        elif metric == "delta_loss":
            for key, ci, label in (("delta_loss", "delta_ci", "class removed"),
                                   ("control_delta_loss", "control_ci", "random control (same #tokens)")):
                y = [r[key] for r in rows]
                fig.add_trace(go.Bar(x=names, y=y, name=label, error_y=dict(
                    type="data", array=[r[ci][1] - r[key] for r in rows],
                    arrayminus=[r[key] - r[ci][0] for r in rows])))
            r0 = rows[0]
            title = (f"Δ loss on the unedited continuation ({round(self.settings.get('ci', 0.95) * 100)}% "
                     f"{r0['ci_method']} CI over {r0['n_texts']} texts"
                     + (f", {r0['n_tokens']} tokens)" if r0["n_tokens"] is not None else ")"))
            yt = "Δ mean NLL (nats / token)"
        else:
            raise InputError(f"metric={metric!r}; use 'delta_loss' or 'accuracy'.")
        fig.update_layout(title=f"filler ablation · {title}", barmode="group", yaxis_title=yt, xaxis_title="class",
                          height=380, margin=dict(l=60, r=20, t=60, b=60))
        return fig

    def removal_html(self, cls: int | str = 0, index: int = 0, *, control: bool = False) -> str:
        """The context with removed units struck through (class or control), then the continuation."""
        import html as _h
        c = self.classes.index(cls) if isinstance(cls, str) else int(cls)
        ctx = self.contexts[index]
        removed = set(map(tuple, self.settings.get("_removed_spans", {}).get(f"{c}:{index}:{int(control)}", [])))
        parts, pos = [], 0
        for s, e, _piece in split_units(ctx):
            parts.append(_h.escape(ctx[pos:s]))
            seg = _h.escape(ctx[s:e])
            parts.append(f"<del class='lb-filler-removed' style='background:#fdd'>{seg}</del>" if (s, e) in removed
                         else seg)
            pos = e
        parts.append(_h.escape(ctx[pos:]))
        return (f"<div class='lb-filler-text' style='white-space:pre-wrap;font-family:monospace'>{''.join(parts)}"
                f"<span style='background:#dfd' title='scored continuation (never edited)'>"
                f"{_h.escape(self.continuations[index])}</span></div>")


def _pick_control(m: LensModel, ctx: str, units, cls_mask, target: int, n_ctx: int, rng: random.Random,
                  mode: str, tok_units) -> tuple[list[bool], int]:
    """Random non-class units whose removal removes exactly ``target`` tokens (greedy on the real
    re-tokenised length); returns (drop mask, tokens removed — equal to ``target`` unless impossible)."""
    cand = [i for i, c in enumerate(cls_mask) if not c]
    rng.shuffle(cand)
    drop = [False] * len(units)
    if mode == "replace":
        # position-keeping: replace exactly `target` random tokens of non-class units
        toks = [t for t, u in enumerate(tok_units) if u is not None and not cls_mask[u]]
        chosen = set(rng.sample(toks, min(target, len(toks))))
        return [t in chosen for t in range(len(tok_units))], len(chosen)
    best = (None, -1)
    for _attempt in range(24):   # greedy passes in random orders (re-tokenisation is not additive), then swaps
        drop = [False] * len(units)
        removed = 0
        for i in cand:
            if removed == target:
                break
            drop[i] = True
            r = n_ctx - len(_ids(m, remove_units(ctx, units, drop), bos=True, param="texts"))
            if r > target:
                drop[i] = False
            else:
                removed = r
        if removed == target:
            return drop, removed
        if removed > best[1]:
            best = (list(drop), removed)
        rng.shuffle(cand)
    drop, removed = best
    for d in [i for i in cand if drop[i]]:      # swap one dropped unit for one kept unit
        for u in [i for i in cand if not drop[i]]:
            drop[d], drop[u] = False, True
            r = n_ctx - len(_ids(m, remove_units(ctx, units, drop), bos=True, param="texts"))
            if r == target:
                return drop, r
            drop[d], drop[u] = True, False
    return drop, removed


def _token_units(m: LensModel, ctx: str, units) -> tuple[list[int], list[int | None]]:
    """Context ids (tokenizer's own BOS behaviour) and, per token, the unit holding all its non-space chars."""
    enc = m.tokenizer(ctx, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    owner = [None] * len(ids)
    spans = [(s + (len(ctx[s:e]) - len(ctx[s:e].lstrip())), e) for s, e, _ in units]
    for t, (a, b) in enumerate(offs):
        if b <= a:
            continue
        core = [k for k in range(a, b) if not ctx[k].isspace()]
        if not core:
            continue
        hits = {u for u, (s, e) in enumerate(spans) if s <= core[0] < e and s <= core[-1] < e}
        owner[t] = hits.pop() if len(hits) == 1 else None
    return list(ids), owner


def filler_ablation(m: LensModel, texts, *, classes=("punctuation", "stopwords", "articles"),
                    mode: str = "remove", replacement: str = " _", stopwords: str | Sequence[str] | None = None,
                    continuation_words: int = 16, n_control: int = 3, seed: int = 0, n_boot: int = 1000,
                    ci: float = 0.95, batch_size: int = 8, progress: bool = True) -> FillerAblationResult:
    """Remove a token class from each context and measure the loss change on an unedited span.

    Args:
        m: the model. texts: strings (the last ``continuation_words`` units — words and punctuation marks — are
            the scored continuation, the rest the context) or items ``{"question", "answer"}`` (the question
            is the edited context, an item's ``template`` (default "") stays unedited between it and the answer, the
            answer is the scored span; accuracy = greedy exact match of the answer).
        classes: class names from ``("punctuation", "stopwords", "articles", "commas")``; a tuple of names or a
            ``"+"``-joined name removes their union (``("punctuation", "stopwords")``).
        mode: ``"remove"``: drop the units and re-tokenise (LLM-Microscope style); ``"replace"``: replace every
            token of the class's units by ``replacement`` (one token), keeping all positions.
        stopwords: the ``"stopwords"`` class: ``"function"`` (default, :data:`FUNCTION_WORDS`: closed-class
            function words — determiners, pronouns, prepositions, conjunctions, auxiliaries, particles),
            ``"sklearn"`` (scikit-learn's ``ENGLISH_STOP_WORDS``, the default before issue 13; it also removes
            numerals and content words such as "one", "system", "fire", "bill"), or your own list of words.
        n_control: seeds of the random control, which removes exactly as many tokens (remove mode: a random
            set of non-class units whose re-tokenised removal shortens the context by the same number of tokens;
            replace mode: the same number of random non-class tokens replaced).
        seed: seeds the control and the bootstrap. n_boot, ci: bootstrap resamples (used from 20 texts on) and
            CI level of :meth:`FillerAblationResult.summary` (CIs resample texts, see there).
    """
    if not isinstance(m, LensModel):
        raise InputError(f"m must be a LensModel (lb.load(...)), got {type(m).__name__}.")
    if mode not in ("remove", "replace"):
        raise InputError(f"mode={mode!r}; use 'remove' (word-level, re-tokenised) or 'replace' (keep positions).")
    continuation_words = _check_int(continuation_words, "continuation_words", 1)
    n_control = _check_int(n_control, "n_control", 1)
    _check_int(seed, "seed")
    if not 0 < ci < 1:
        raise InputError(f"ci={ci!r} must be in (0, 1), e.g. 0.95.")
    cls = normalize_classes(classes)
    if stopwords is None or stopwords in STOPWORD_SOURCES:
        src = stopwords or "function"
        sw = stop_words(src)
        sw_src = ("function words (lensbench FUNCTION_WORDS)" if src == "function" else "sklearn ENGLISH_STOP_WORDS")
    else:
        if isinstance(stopwords, str) or not all(isinstance(w, str) for w in stopwords):
            raise InputError(f"stopwords must be one of {STOPWORD_SOURCES} or a list of words (strings), e.g. "
                             "['the', 'of', 'and'].")
        sw, sw_src = frozenset(w.lower() for w in stopwords), f"user list ({len(stopwords)} words)"
    rep_id = None
    if mode == "replace":
        rep_id = m.token_id(replacement, param="replacement")
    items = _normalize_items(texts, "texts", continuation_words=continuation_words)
    C, S, N = len(cls), n_control, len(items)
    nan = float("nan")
    loss = {"orig": torch.full((N,), nan), "class": torch.full((C, N), nan), "ctrl": torch.full((C, S, N), nan)}
    tok_loss: dict[tuple, torch.Tensor] = {}   # (key..., n) -> [T_n] per-token NLL
    corr = {k: torch.full_like(v, nan) for k, v in loss.items()}
    freq = torch.zeros(C, N)
    rem = torch.zeros(C, N, dtype=torch.long)
    crem = torch.zeros(C, S, N, dtype=torch.long)
    nctx = torch.zeros(N, dtype=torch.long)
    edited = [[""] * N for _ in range(C)]
    ctrl_edited = [[""] * N for _ in range(C)]
    removed_words = [[[] for _ in range(N)] for _ in range(C)]
    spans: dict[str, list] = {}
    bar = tqdm(total=N, desc="filler ablation", disable=not progress or N <= 1, leave=False)
    for n, it in enumerate(items):
        ctx, cont = it["context"], it["continuation"]
        units = split_units(ctx)
        cont_ids = _ids(m, cont, bos=False, param="texts")
        bridge = _ids(m, it["bridge"], bos=False, param="texts") if it["bridge"] else []
        ctx_ids, tok_units = _token_units(m, ctx, units)
        nctx[n] = len(ctx_ids)
        variants: dict[tuple, list] = {}   # ids -> [(key, ...)]: identical inputs are scored once

        def add(ids, key, variants=variants, tail=tuple(bridge + cont_ids)):
            variants.setdefault(tuple(ids) + tail, []).append(key)

        add(ctx_ids, ("orig",))
        for c, (_label, parts) in enumerate(cls):
            mask = class_mask(units, parts, sw)
            freq[c, n] = sum(mask) / max(1, len(units))
            removed_words[c][n] = [units[i][2] for i in range(len(units)) if mask[i]]
            spans[f"{c}:{n}:0"] = [[units[i][0], units[i][1]] for i in range(len(units)) if mask[i]]
            if mode == "remove":
                new = remove_units(ctx, units, mask)
                new_ids = _ids(m, new, bos=True, param="texts") if new.strip() else ctx_ids[:1] if (
                    m.tokenizer.bos_token_id is not None and ctx_ids[:1] == [m.tokenizer.bos_token_id]) else []
                if not new_ids:
                    raise InputError(f"removing {_label!r} from texts[{n}] leaves no context; pass longer texts.")
                edited[c][n] = new
                k = len(ctx_ids) - len(new_ids)
            else:
                tok_drop = [u is not None and mask[u] for u in tok_units]
                new_ids = [rep_id if d else t for t, d in zip(ctx_ids, tok_drop)]
                edited[c][n] = m.tokenizer.decode(new_ids, skip_special_tokens=True)
                k = sum(tok_drop)
            rem[c, n] = k
            add(new_ids, ("class", c))
            for s in range(S):
                rng = random.Random(f"{seed}:{n}:{c}:{s}")
                drop, got = _pick_control(m, ctx, units, mask, k, len(ctx_ids), rng, mode, tok_units)
                if mode == "remove":
                    cnew = remove_units(ctx, units, drop) if any(drop) else ctx
                    cids = _ids(m, cnew, bos=True, param="texts")
                    if s == 0:
                        spans[f"{c}:{n}:1"] = [[units[i][0], units[i][1]] for i in range(len(units)) if drop[i]]
                else:
                    cids = [rep_id if d else t for t, d in zip(ctx_ids, drop)]
                    cnew = m.tokenizer.decode(cids, skip_special_tokens=True)
                    if s == 0:
                        spans[f"{c}:{n}:1"] = [[units[u][0], units[u][1]] for u in
                                               sorted({tok_units[t] for t, d in enumerate(drop) if d})]
                crem[c, s, n] = got
                if s == 0:
                    ctrl_edited[c][n] = cnew
                add(cids, ("ctrl", c, s))
        keys = list(variants)
        scores = _score_batch(m, [list(k) for k in keys], [len(cont_ids)] * len(keys), batch_size=batch_size)
        for k, (lp, ok, tok) in zip(keys, scores):
            nll = -lp / len(cont_ids)
            for key in variants[k]:
                tok_loss[key + (n,)] = -tok.float()
                if key[0] == "orig":
                    loss["orig"][n], corr["orig"][n] = nll, float(ok)
                elif key[0] == "class":
                    loss["class"][key[1], n], corr["class"][key[1], n] = nll, float(ok)
                else:
                    loss["ctrl"][key[1], key[2], n], corr["ctrl"][key[1], key[2], n] = nll, float(ok)
        if not it["has_answer"]:
            for v in corr.values():
                v[..., n] = nan
        bar.update(1)
    bar.close()
    T = max(len(v) for v in tok_loss.values())
    tl = {"orig": torch.full((N, T), nan), "class": torch.full((C, N, T), nan), "ctrl": torch.full((C, S, N, T), nan)}
    for key, v in tok_loss.items():
        tl[key[0]][key[1:]][:len(v)] = v
    return FillerAblationResult(
        token_loss_orig=tl["orig"], token_loss_class=tl["class"], token_loss_control=tl["ctrl"],
        classes=[label for label, _ in cls], loss_orig=loss["orig"], loss_class=loss["class"],
        loss_control=loss["ctrl"], correct_orig=corr["orig"], correct_class=corr["class"],
        correct_control=corr["ctrl"], frequency=freq, removed_tokens=rem, control_removed_tokens=crem,
        context_tokens=nctx, contexts=[it["context"] for it in items],
        continuations=[it["bridge"] + it["continuation"] for it in items], edited=edited, removed_words=removed_words,
        control_edited=ctrl_edited, mode=mode,
        settings={"seed": seed, "n_control": S, "n_boot": n_boot, "ci": ci, "stopwords": sw_src,
                  "continuation_words": continuation_words, "replacement": replacement if mode == "replace" else "",
                  "_removed_spans": spans},
        model_name=m.name)


# --------------------------------------------------------------------------------------------- sweep
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
        """Curves per filler kind against N with CI bands over items (:meth:`summary`); ``metric``: ``"delta_logprob"``,
        ``"logprob"`` or ``"accuracy"``."""
        import plotly.graph_objects as go
        if metric not in ("delta_logprob", "logprob", "accuracy"):
            raise InputError(f"metric={metric!r}; use 'delta_logprob', 'logprob' or 'accuracy'.")
        rows = self.summary()
        if metric == "delta_logprob" and rows and "delta_logprob" not in rows[0]:
            raise InputError("metric='delta_logprob' needs count 0 among counts; use 'logprob'.")
        ci_key = {"delta_logprob": "delta_ci", "accuracy": "accuracy_ci"}.get(metric)
        fig = go.Figure()
        palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
        for k, kind in enumerate(self.kinds):
            if kinds is not None and kind not in kinds:
                continue
            rs = [r for r in rows if r["kind"] == kind]
            x = [r["count"] for r in rs]
            y = [r[metric] for r in rs]
            col = palette[k % len(palette)]
            if ci_key and len(rs) > 1:
                lo = [r[ci_key][0] for r in rs]
                hi = [r[ci_key][1] for r in rs]
                fig.add_trace(go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", line={"width": 0},
                                         fillcolor=col, opacity=0.15, showlegend=False, hoverinfo="skip"))
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=repr(kind) if kind.strip() != kind
                                     or kind not in SPECIAL_FILLERS else kind, line={"color": col}))
        label = {"delta_logprob": "Δ log p(answer) vs N = 0", "logprob": "log p(answer)",
                 "accuracy": "greedy exact match"}[metric]
        fig.update_layout(title=f"filler sweep · {label} per filler kind", xaxis_title="N filler tokens",
                          yaxis_title=label, height=380, margin=dict(l=60, r=20, t=60, b=60))
        return fig


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


def filler_sweep(m: LensModel, items, *, fillers=(" .",), counts=(0, 8, 32, 128), template: str | None = None,
                 cot: bool = False, reuse_cache: bool = True, seed: int = 0, n_boot: int = 1000,
                 ci: float = 0.95, progress: bool = True) -> FillerSweepResult:
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
    """
    if not isinstance(m, LensModel):
        raise InputError(f"m must be a LensModel (lb.load(...)), got {type(m).__name__}.")
    items = _normalize_sweep_items(items)
    if isinstance(fillers, str):
        fillers = (fillers,)
    if not isinstance(fillers, (list, tuple)) or not all(isinstance(f, str) and f for f in fillers):
        raise InputError(f"fillers must be a tuple of non-empty strings (e.g. (' .', '...', 'counting')), got "
                         f"{fillers!r}.")
    if isinstance(counts, int):
        counts = (counts,)
    if not isinstance(counts, (list, tuple)) or not counts:
        raise InputError(f"counts must be a non-empty tuple of ints >= 0 such as (0, 8, 32), got {counts!r}.")
    counts = sorted({_check_int(c, "counts") for c in counts})
    if not 0 < ci < 1:
        raise InputError(f"ci={ci!r} must be in (0, 1).")
    if cot and not all(isinstance(it.get("cot"), str) and it["cot"] for it in items):
        raise InputError("cot=True needs a 'cot' string in every item (lb.tasks.arithmetic(..) has one).")
    kinds = list(dict.fromkeys(fillers)) + (["cot"] if cot else [])
    K, M, N = len(kinds), len(counts), len(items)
    lp = torch.full((K, M, N), float("nan"), dtype=torch.float64)
    ok = torch.full((K, M, N), float("nan"))
    ntok = torch.zeros((K, M, N))
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
        if reuse_cache and not m.capabilities["prefix_cache"]:
            warnings.warn(f"filler_sweep: {m.name} cannot reuse a prefix cache "
                          f"({m.capabilities['prefix_cache_reason']}); scoring every arm from scratch "
                          "(reuse_cache=False: the same numbers, slower).", stacklevel=2)
            reuse_cache = False
        if reuse_cache:
            _sweep_cached(m, q_ids, arms, tail, a_ids, scores)
        else:
            for k, arm in arms:
                for j, f in arm:
                    if (0, j) in scores and not f and kinds[k] != "cot":
                        scores[(k, j)] = scores[(0, j)]
                        continue
                    scores[(k, j)] = _score_batch(m, [q_ids + f + tail + a_ids], [len(a_ids)])[0]
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
                             settings={"seed": seed, "n_boot": n_boot, "ci": ci, "reuse_cache": reuse_cache},
                             model_name=m.name)


def _sweep_cached(m: LensModel, q_ids, arms, tail, a_ids, scores) -> None:
    """The question once (batch 1; a ``cot`` arm runs on it and is cropped off), then the cache is repeated
    for the filler kinds and every kind's longest filler run goes through in one batched call; each N (longest
    first) crops the cache to question + N and scores template + answer for all kinds in one call."""
    cache = _new_cache(m)
    _extend(m, cache, [q_ids])
    q_len = cache.get_seq_length()
    try:
        plain = []
        for k, arm in arms:
            if _is_cot(arm):
                f = arm[0][1]
                scores[(k, 0)] = _score_tail(m, cache, q_len, q_ids + f, f, tail, a_ids, [k])[0]
                _crop(cache, q_len)
            else:
                plain.append((k, arm))
        if not plain:
            return
        ks = [k for k, _ in plain]
        by_j = {j: [dict(arm)[j] for _, arm in plain] for j in dict(plain[0][1])}
        longest = max(by_j, key=lambda j: len(by_j[j][0]))
        if len(ks) > 1:
            cache.batch_repeat_interleave(len(ks))
        if by_j[longest][0]:
            _extend(m, cache, by_j[longest])
        for j in sorted(by_j, key=lambda j: -len(by_j[j][0])):
            fs = by_j[j]
            n = len(fs[0])
            _crop(cache, q_len + n)
            res = _score_tail(m, cache, q_len, None, fs, tail, a_ids, ks, q_ids=q_ids)
            for k, r in zip(ks, res):
                scores[(k, j)] = r
    except _CropUnsupported as e:
        warnings.warn(f"this model's KV cache cannot be cropped ({e}); recomputing each arm from scratch",
                      stacklevel=3)
        for k, arm in arms:
            for j, f in arm:
                scores[(k, j)] = _score_batch(m, [q_ids + f + tail + a_ids], [len(a_ids)])[0]


def _is_cot(arm) -> bool:
    return getattr(arm, "cot", False)


class _Arm(list):
    """A list of ``(count index, filler ids)`` marked as a chain-of-thought arm."""
    cot = True


def _score_tail(m, cache, q_len, ctx, fs, tail, a_ids, ks, q_ids=None):
    """Score template + answer after the cached context (question + fillers ``fs``, one row per kind)."""
    if ctx is not None:  # single cot row: extend by the chain first
        _extend(m, cache, [fs])
        fs = [fs]
    n = len(fs[0])
    if tail:
        rows = [tail + a_ids for _ in fs]
    else:  # no template: the context's last token predicts the first answer token; run it again
        _crop(cache, q_len + n - 1)
        rows = [(q_ids + f)[-1:] + a_ids if q_ids is not None else (ctx[-1:] + a_ids) for f in fs]
    out = _extend(m, cache, rows, score_last=len(a_ids))
    _crop(cache, q_len + n)
    return out


class _CropUnsupported(Exception):
    pass


def _crop(cache, length: int) -> None:
    """Shorten ``cache`` to ``length`` tokens (transformers 5 ``crop`` takes minus the tokens to remove)."""
    cur = cache.get_seq_length()
    if cur == length:
        return
    try:
        cache.crop(length - cur)
    except Exception as e:  # noqa: BLE001 - sliding-window / exotic caches: fall back to recomputation
        raise _CropUnsupported(str(e)) from e
    if cache.get_seq_length() != length:
        raise _CropUnsupported(f"crop left {cache.get_seq_length()} tokens instead of {length}")


# --------------------------------------------------------------------------------------------- probes
@dataclasses.dataclass(eq=False)
class FillerProbeResult(Result):
    """Per-layer cross-validated accuracy of logistic probes predicting the answer from the residual stream.

    Attributes:
        layers: probed layers. filler_acc, question_acc, shuffled_acc: ``[n_layers]`` mean CV accuracy at the
            filler positions, at the comparison position (``compare``), and at filler positions with shuffled
            labels. filler_std, question_std, shuffled_std: their std over folds. majority: majority-class rate.
        labels: the label of every item (strings); n_fillers, filler, pool (filler side: ``"mean"``/``"last"``);
        compare: what the filler positions are compared with (see :func:`filler_probe`); settings; model_name.
    """

    layers: list
    filler_acc: torch.Tensor
    question_acc: torch.Tensor
    shuffled_acc: torch.Tensor
    filler_std: torch.Tensor
    question_std: torch.Tensor
    shuffled_std: torch.Tensor
    majority: float
    labels: list
    n_fillers: int
    filler: str
    pool: str = "mean"
    settings: dict = dataclasses.field(default_factory=dict)
    model_name: str = ""
    compare: str = "last_question"

    def to_dataframe(self):
        import pandas as pd
        return pd.DataFrame({"layer": self.layers, "filler_acc": self.filler_acc.numpy(),
                             "question_acc": self.question_acc.numpy(), "shuffled_acc": self.shuffled_acc.numpy(),
                             "filler_std": self.filler_std.numpy(), "question_std": self.question_std.numpy(),
                             "shuffled_std": self.shuffled_std.numpy(), "majority": self.majority,
                             "n_items": len(self.labels), "folds": self.settings.get("folds"),
                             "compare": self.compare})

    def figure(self):
        import plotly.graph_objects as go
        fig = go.Figure()
        qname = {"last_question": "last question token", "no_filler": "no-filler control, last position",
                 "question_mean": "question positions (mean)"}.get(self.compare, self.compare)
        for key, name in (("filler", f"filler positions ({self.pool})"), ("question", qname),
                          ("shuffled", "filler, shuffled labels")):
            acc, sd = getattr(self, key + "_acc").numpy(), getattr(self, key + "_std").numpy()
            fig.add_trace(go.Scatter(x=self.layers, y=acc, mode="lines+markers", name=name,
                                     error_y=dict(type="data", array=sd)))
        fig.add_hline(y=self.majority, line_dash="dot", annotation_text="majority class")
        fig.update_layout(title=f"filler probe · CV accuracy of a logistic probe per layer ({self.n_fillers} × "
                          f"{self.filler!r}; n = {len(self.labels)} items, "
                          f"{self.settings.get('folds', '?')}-fold, ±1 sd over folds)", xaxis_title="layer",
                          yaxis_title="accuracy", height=380)
        return fig


PROBE_COMPARE = ("last_question", "no_filler", "question_mean")


def filler_probe(m: LensModel, items, *, filler: str = " .", n_fillers: int = 16, layers=None,
                 template: str | None = None, label=None, pool: str = "mean", compare: str = "last_question",
                 folds: int = 5, seed: int = 0, C: float = 1.0, batch_size: int = 16,
                 progress: bool = True) -> FillerProbeResult:
    """Logistic probes (scikit-learn) per layer on the residual at filler positions predicting each item's label
    (``item["meta"]["label"]`` when present, else the answer string), vs a like-for-like comparison position and
    shuffled labels.

    The input is ``question + n_fillers × filler`` (+ ``template`` if given). Filler side: ``pool`` =
    ``"mean"`` over the filler positions or ``"last"`` (the last filler). Every filler position has seen the
    whole question, so the comparison must have too ("Let's Think Dot by Dot" asks what the filler positions
    add to what the model already has after reading the question):

    * ``compare="last_question"`` (default): the last question token, which has seen exactly the whole question
      (causal attention: it is the same state as the last position of the question run without fillers);
    * ``"no_filler"``: the last position of ``question + template`` run *without* fillers — the state the
      no-filler arm predicts the answer from (equals ``"last_question"`` when ``template`` is None);
    * ``"question_mean"``: the mean over the question positions after BOS, the behaviour before issue 13. Not
      like-for-like: early positions have seen only a prefix, and at layer 0 the mean holds the label word's own
      embedding, so it decodes labels the fillers could never see in the embeddings.

    Stratified ``folds``-fold CV, seeded; ``*_std`` is the std over folds.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    if not isinstance(m, LensModel):
        raise InputError(f"m must be a LensModel (lb.load(...)), got {type(m).__name__}.")
    items = _normalize_sweep_items(items)
    n_fillers = _check_int(n_fillers, "n_fillers", 1)
    if pool not in ("mean", "last"):
        raise InputError(f"pool={pool!r}; use 'mean' or 'last'.")
    if compare not in PROBE_COMPARE:
        raise InputError(f"compare={compare!r}; use one of {PROBE_COMPARE}.")
    layers = m.check_layers(layers)
    if label is None:
        labels = [str(it.get("meta", {}).get("label", it["answer"])) if isinstance(it.get("meta"), dict)
                  else it["answer"] for it in items]
    elif callable(label):
        labels = [str(label(it)) for it in items]
    else:
        raise InputError("label must be None (meta['label'] or the answer) or a function item -> label.")
    y = np.asarray(labels)
    classes, cnt = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise InputError(f"filler_probe needs at least two distinct labels, got only {classes.tolist()}.")
    folds = _check_int(folds, "folds", 2)
    if cnt.min() < folds:
        raise InputError(f"the rarest label has {int(cnt.min())} items, fewer than folds={folds}; pass more items "
                         "or fewer folds.")
    t = _ids(m, template, bos=False, param="template") if template else []
    # one run per item (two with compare="no_filler"): (ids, [(feature key, (start, end)), ...])
    runs = []
    for i, it in enumerate(items):
        q = _ids(m, it["question"], bos=True, param=f"items[{i}]['question']")
        f = _filler_ids(m, filler, n_fillers, it, random.Random(f"{seed}:{i}"))
        fs, fe = len(q), len(q) + len(f)
        spec = [("f", (fs, fe) if pool == "mean" else (fe - 1, fe))]
        if compare == "last_question":
            spec.append(("q", (len(q) - 1, len(q))))
        elif compare == "question_mean":
            spec.append(("q", (1 if len(q) > 1 else 0, len(q))))
        runs.append((i, q + f + t, spec))
        if compare == "no_filler":
            runs.append((i, q + t, [("q", (len(q + t) - 1, len(q + t)))]))
    feats = {key: {la: [None] * len(items) for la in layers} for key in ("f", "q")}
    pad = m.tokenizer.pad_token_id or 0
    bar = tqdm(total=len(runs), desc="filler probe", disable=not progress, leave=False)
    with torch.no_grad():
        for b in range(0, len(runs), batch_size):
            chunk = runs[b:b + batch_size]
            T = max(len(s) for _, s, _ in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (_, s, _) in enumerate(chunk):   # right padding: causal positions are unaffected
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
            with m.hooks(layers) as store:
                _call(m, ids.to(m.input_device), attention_mask=mask.to(m.input_device), use_cache=False)
            for r, (i, _, spec) in enumerate(chunk):
                for key, (s0, s1) in spec:
                    for la in layers:
                        feats[key][la][i] = store[la][r, s0:s1].float().mean(0).cpu().numpy()
            bar.update(len(chunk))
    bar.close()
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    y_shuf = np.random.default_rng(seed).permutation(y)
    res = {k: [] for k in ("f", "q", "s")}
    for la in layers:
        Xf, Xq = np.stack(feats["f"][la]), np.stack(feats["q"][la])
        for key, X, yy in (("f", Xf, y), ("q", Xq, y), ("s", Xf, y_shuf)):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
            sc = cross_val_score(clf, X, yy, cv=cv)
            res[key].append((sc.mean(), sc.std()))
    tt = {k: (torch.tensor([a for a, _ in v], dtype=torch.float32),
              torch.tensor([s for _, s in v], dtype=torch.float32)) for k, v in res.items()}
    return FillerProbeResult(layers=layers, filler_acc=tt["f"][0], question_acc=tt["q"][0], shuffled_acc=tt["s"][0],
                             filler_std=tt["f"][1], question_std=tt["q"][1], shuffled_std=tt["s"][1],
                             majority=float(cnt.max() / cnt.sum()), labels=labels, n_fillers=n_fillers,
                             filler=filler, pool=pool, compare=compare,
                             settings={"folds": folds, "seed": seed, "C": C, "compare": compare},
                             model_name=m.name)

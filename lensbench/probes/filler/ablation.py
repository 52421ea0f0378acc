"""Token-class ablation: remove a class (punctuation, stop words, articles, commas) from each context at the word
level and re-tokenise (or replace its tokens, keeping positions), then measure the loss change on a held-out span
that is never edited, against a seeded random control that removes exactly as many tokens of non-class words.

Every variant of a text is scored in one :func:`lensbench.engine.score_spans` call (batched through the model's
backend, halved on out-of-memory); CIs resample texts (:func:`lensbench.stats.mean_ci`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ...engine import score_spans
from ...errors import InputError
from ...model import LensModel
from ...plots.filler import ablation_figure
from ...results import Result
from ...stats import mean_ci
from ...validation import Check, Interval, Options, validate_params
from ._common import CI_PARAMS, SHARED_PARAMS, _clip, _ids, _summary_frame, _tup
from .text import STOPWORD_SOURCES, class_mask, normalize_classes, remove_units, split_units, stop_words


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
            ``None`` in results saved before per-token losses were kept (then :meth:`summary` falls back to per-text means).

    ``to_dataframe(weight="tokens")``: :meth:`summary` as a table, one row per class: ``class``, ``frequency``,
    ``tokens_removed``, ``token_share_removed``, ``loss_orig``, ``loss_class``, ``delta_loss`` (class − orig),
    ``control_delta_loss`` (random control − orig), ``excess_delta`` (their difference), ``delta_ci_lo`` /
    ``delta_ci_hi``, ``control_ci_lo`` / ``control_ci_hi``, ``excess_ci_lo`` / ``excess_ci_hi`` (95 %),
    ``n_texts``, ``n_tokens``, ``ci_method`` and ``weight``; accuracy columns too when items have answers.
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
    token_loss_orig: torch.Tensor | None = None
    token_loss_class: torch.Tensor | None = None
    token_loss_control: torch.Tensor | None = None
    mode: str = "remove"
    settings: dict = dataclasses.field(default_factory=dict)
    model_name: str = ""

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
            raise InputError("this result has no per-token losses (saved by an older lensbench); use weight='texts'.")
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
                the same (mean of per-text means; older versions did this, with a percentile bootstrap).

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
        ``"delta_loss"`` or ``"accuracy"`` (items with answers). See :func:`lensbench.plots.filler.ablation_figure`."""
        return ablation_figure(self, metric)

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


def _is_word_list(v) -> bool:
    return not isinstance(v, (str, bytes)) and all(isinstance(w, str) for w in v)


_FILLER_ABLATION_PARAMS = {
    **SHARED_PARAMS, **CI_PARAMS,
    "mode": [Options({"remove", "replace"})],
    "replacement": [str],
    "stopwords": [None, Options(STOPWORD_SOURCES), Check(_is_word_list, "a list of words (strings)")],
    "continuation_words": [Interval(int, 1, None)],
    "n_control": [Interval(int, 1, None)],
}


@validate_params(_FILLER_ABLATION_PARAMS)
def filler_ablation(m: LensModel, texts, *, classes=("punctuation", "stopwords", "articles"),
                    mode: str = "remove", replacement: str = " _", stopwords: str | Sequence[str] | None = None,
                    continuation_words: int = 16, n_control: int = 3, seed: int = 0, n_boot: int = 1000,
                    ci: float = 0.95, batch_size: int | str = "auto", progress: bool = True) -> FillerAblationResult:
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
            ``"sklearn"`` (scikit-learn's ``ENGLISH_STOP_WORDS``, the old default; it also removes
            numerals and content words such as "one", "system", "fire", "bill"), or your own list of words.
        n_control: seeds of the random control, which removes exactly as many tokens (remove mode: a random
            set of non-class units whose re-tokenised removal shortens the context by the same number of tokens;
            replace mode: the same number of random non-class tokens replaced).
        seed: seeds the control and the bootstrap. n_boot, ci: bootstrap resamples (used from 20 texts on) and
            CI level of :meth:`FillerAblationResult.summary` (CIs resample texts, see there).
        batch_size: sequences per forward pass, or ``"auto"`` (a token budget, halved on out-of-memory; the
            scores do not depend on it).
    """
    continuation_words, n_control = int(continuation_words), int(n_control)
    cls = normalize_classes(classes)
    if stopwords is None or isinstance(stopwords, str):
        src = stopwords or "function"
        sw = stop_words(src)
        sw_src = ("function words (lensbench FUNCTION_WORDS)" if src == "function" else "sklearn ENGLISH_STOP_WORDS")
    else:
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
        scores = score_spans(m, [list(k) for k in keys], [len(cont_ids)] * len(keys), batch_size=batch_size)
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

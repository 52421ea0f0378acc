"""Sentence importance (thought anchors, Bogdan et al. 2025): sentence spans of a response, the regenerated first
sentence of a rollout, the offline sentence embedder (the model's own residual stream) and the calibration of the
cosine threshold that calls a regenerated sentence a counterfactual, and the KL importances of answer
distributions."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ...capture import forward_batch
from ...engine import run_batches
from ...model import LensModel
from ...validation import Interval, Options, SequenceOf, renamed_params, validate_params

__all__ = ["split_sentences", "model_sentence_embedder", "calibrate_similarity", "SIMILARITY_CALIBRATION"]

_SENT_END = re.compile(r"[.!?](?=\s|$)|\n")


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
    from ...data import sample_texts
    sents = []
    for text in sample_texts():
        for part in re.split(r"(?<=[.!?])\s+|\n+", text):
            part = part.strip()
            if len(part.split()) >= 3:
                sents.append(part)
    step = max(1, len(sents) // k)
    return sents[::step][:k]


@renamed_params({"skip_first": "exclude_first"})
@validate_params({"m": [LensModel], "exclude_first": [bool], "centre": [bool],
                  "reference": [None, SequenceOf(str)], "batch_size": [Options({"auto"}), Interval(int, 1, None)]})
def model_sentence_embedder(m: LensModel, layer: int | None = None, *, exclude_first: bool = True,
                            centre: bool = True, reference: Sequence[str] | None = None,
                            batch_size: int | str = "auto") -> Callable[[list[str]], torch.Tensor]:
    """Offline default sentence embedder: the residual stream of ``m`` at ``layer`` (default: the middle layer),
    mean-pooled over the sentence's tokens, minus the mean embedding of a reference set of sentences.

    * ``exclude_first=True``: the sentence is encoded after one sink token (BOS, else EOS) and that position 0 is
      left out of the pool. The first position of a sequence carries massive, input-independent activations
      (the attention sink); pooled in, they dominate every embedding and make any two sentences look alike
      (cosine ~1 on the default model, so a 0.8 filter never finds a counterfactual).
    * ``centre=True``: residual streams are anisotropic (a large shared mean direction); subtracting the mean of
      ``reference`` sentences (default: 64 sentences of the shipped sample texts, computed on the first call)
      makes the cosine measure what distinguishes sentences.

    ``exclude_first=False, centre=False`` is the previous embedder (mean over all tokens, no BOS, uncentred).
    The forwards run through the model's backend, ``batch_size`` sentences at a time (``"auto"``: a token
    budget, halved on out-of-memory). Returns ``[n, d_model]`` float32 on the CPU; empty strings embed to zeros. The embedder exposes ``.mean``
    (the centring vector, after the first call) and a ``__name__`` that goes into cache keys.
    """
    layer = m.n_layers // 2 if layer is None else m.check_layers(layer, "layer")[0]
    tok = m.tokenizer
    sink = getattr(tok, "bos_token_id", None)
    if sink is None:
        sink = getattr(tok, "eos_token_id", None)
    state: dict[str, Any] = {"mean": None}

    @torch.no_grad()
    def raw(texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), m.d_model)
        rows = []  # (index, ids, first pooled position)
        for j, t in enumerate(texts):
            ids = tok(t, add_special_tokens=False)["input_ids"][: m.max_length - 1] if t.strip() else []
            if not ids:
                continue
            first = 0
            if exclude_first:
                if sink is not None:
                    ids, first = [int(sink)] + list(ids), 1
                elif len(ids) > 1:
                    first = 1
            rows.append((j, list(ids), first))
        seqs = [torch.tensor(r[1], dtype=torch.long) for r in rows]

        def step(idx: list[int]) -> None:  # right padding: causal attention leaves real positions exact
            h = forward_batch(m, [seqs[i] for i in idx], [layer], indices=idx, logits=False).hidden[layer]
            h = h.float().cpu()
            for b, i in enumerate(idx):
                j, r, first = rows[i]
                out[j] = h[b, first:len(r)].mean(0)
        run_batches(m, seqs, step, batch_size=batch_size, progress=False, desc="sentence embeddings")
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
    # the name goes into rollout cache keys: it keeps the option's old spelling so that existing caches still match
    embed.__name__ = (f"model_sentence_embedder(layer={layer}, skip_first={exclude_first}, centre={centre}"
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


def first_sentence_cosines(emb: Callable[[list[str]], torch.Tensor], sentence: str, tails: Sequence[str]) -> dict:
    """``{"cos": [n]}``: cosine between ``sentence`` and the first sentence of each rollout continuation."""
    e = emb([sentence] + [_first_sentence(t) for t in tails]).float()
    cos = torch.nn.functional.cosine_similarity(e[:1], e[1:], dim=-1)
    return {"cos": [float(c) for c in cos.tolist()]}


def sentence_record(i: int, after: dict, before: dict, cos: list[float]) -> dict:
    """Sentence ``i``'s arms from the free rollouts after it (keep) and before it (replace: the sentence
    resampled), with the cosines of the regenerated first sentences."""
    return {"unit": i, "keep": after["texts"], "keep_ok": after["ok"], "replace": before["texts"],
            "replace_ok": before["ok"], "replace_first": [_first_sentence(t) for t in before["tails"]], "cos": cos}

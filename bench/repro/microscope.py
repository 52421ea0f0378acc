"""Reproduction: LLM-Microscope (Razzhigaev et al. 2025) / "Your Transformer is Secretly Linear".

Setting: the default model on the shipped texts: :func:`lensbench.linearity` (held-out scores beside the papers'
in-sample ones), :func:`lensbench.filler_ablation` on the shipped factual items (stop words / punctuation /
articles removed vs the random-removal control) and :func:`lensbench.contextual_memory` against the per-token
nonlinearity of the same text.

Verdict rules (:func:`common.combine` of three items):

* linearity: the held-out with-residual score is ≥ 0.99 for every layer pair (theirs 0.9965–0.9998), and the
  median over the middle third of layer pairs of the held-out no-residual score (a median: one
  ill-conditioned pair's large negative held-out score must not decide it) is below the smallest
  with-residual score (theirs ≈ 0.43–0.49);
* removal: for stop words, the per-item loss increase over the random control (mean of its seeds) has a
  :func:`lensbench.stats.mean_ci` interval above 0 (the paper: stop words hurt most);
* nonlinearity vs contextuality: Pearson r over the tokens of one text, Fisher-z 95% interval above 0
  (theirs 0.2–0.5).
"""

from __future__ import annotations

import math

import numpy as np

import lensbench as lb
from bench.repro import common
from lensbench.stats import pearson_interval

PAPER = "LLM-Microscope: Uncovering the Hidden Role of Punctuation in Context Memory of Transformers (Razzhigaev et al. 2025)"
CLAIM = ("layer-to-layer maps are near-linear with the residual, far less without; removing stop words / "
         "punctuation / articles hurts; nonlinearity correlates with contextuality")
THEIRS = {"quote": "OPT-125m linearity 0.9965–0.9998 for all layer pairs (~14k tokens), ≈ 0.43–0.49 mid-layers "
                   "without the residual; Llama-3.2-3B MMLU 0.398 → 0.347 without stopwords, 0.391 without "
                   "punctuation, 0.386 without articles; Pearson(nonlinearity, contextuality) 0.2–0.5",
          "linearity_range": [0.9965, 0.9998], "no_residual_mid": [0.43, 0.49],
          "mmlu": {"orig": 0.398, "stopwords": 0.347, "punctuation": 0.391, "articles": 0.386},
          "pearson_nonlin_context": [0.2, 0.5]}


def run(quick: bool = False, seed: int = 0) -> dict:
    m = common.default_model()
    texts = lb.sample_texts()
    n_lin, chars = (3, 1200) if quick else (12, None)
    cut = (lambda t: t[:chars]) if chars else (lambda t: t)
    lin = lb.linearity(m, [cut(t) for t in texts[:n_lin]], progress=False, seed=seed)
    sh = np.asarray(lin.score_heldout, dtype=float)
    snh = np.asarray(lin.score_no_residual_heldout, dtype=float)
    n = len(sh)
    mid = snh[n // 3: max(n // 3 + 1, 2 * n // 3)]
    lin_v = common.all_verdict({
        f"held-out linearity min {np.nanmin(sh):.4f} ≥ 0.99": bool(np.nanmin(sh) >= 0.99),
        f"mid-layer median no-residual {np.nanmedian(mid):.3f} < min with-residual {np.nanmin(sh):.4f}":
            bool(np.nanmedian(mid) < np.nanmin(sh))})

    items = lb.tasks.factual(8 if quick else 60)
    fa = lb.filler_ablation(m, items, n_control=2 if quick else 3, seed=seed, progress=False,
                            n_boot=200 if quick else 1000)
    lo_, lc, lctl = (np.asarray(x, dtype=float) for x in (fa.loss_orig, fa.loss_class, fa.loss_control))
    removal = {}
    for ci, c in enumerate(fa.classes):
        d = lc[ci] - np.nanmean(lctl[ci], 0)
        iv = lb.stats.mean_ci(d, seed=seed)
        removal[c] = {"loss_increase": round(float(np.nanmean(lc[ci] - lo_)), 4),
                      "control_increase": round(float(np.nanmean(lctl[ci] - lo_[None])), 4),
                      "minus_control": [round(float(x), 4) for x in (iv.estimate, iv.lo, iv.hi)],
                      "acc": round(float(np.nanmean(np.asarray(fa.correct_class, dtype=float)[ci])), 4)}
    removal["orig_acc"] = round(float(np.nanmean(np.asarray(fa.correct_orig, dtype=float))), 4)
    key = next((c for c in fa.classes if c == "stopwords"), fa.classes[0])
    e, lo, hi = removal[key]["minus_control"]
    rem_v = common.interval_verdict(lo, hi, 0.0, "above", what=f"{key} removal loss − random control")

    text = cut(texts[0])[:1500]
    lin1 = lb.linearity(m, [text], prompt=text, progress=False, seed=seed)
    nonlin = np.nanmean(np.asarray(lin1.per_token, dtype=float), 0)  # [T]
    cm = lb.contextual_memory(m, [text, cut(texts[1])[:1500]], n_steps=40 if quick else 300, seed=seed, progress=False,
                              n_boot=200 if quick else 1000)
    pos = np.asarray(cm.position, dtype=int)
    sc = np.asarray(cm.score_per_token, dtype=float)
    ok = (np.asarray(cm.text_index) == 0) & (pos >= 0) & (pos < len(nonlin))
    x, y = nonlin[pos[ok]], sc[ok]
    good = np.isfinite(x) & np.isfinite(y)
    r = float(np.corrcoef(x[good], y[good])[0, 1]) if good.sum() > 3 else math.nan
    rlo, rhi = pearson_interval(r, int(good.sum()))
    cor_v = common.interval_verdict(rlo, rhi, 0.0, "above", what="Pearson(nonlinearity, contextuality)")

    ours = {"linearity_heldout": [round(float(x), 4) for x in sh],
            "linearity_insample": [round(float(x), 4) for x in np.asarray(lin.score, dtype=float)],
            "no_residual_heldout": [round(float(x), 4) for x in snh],
            "no_residual_mid_median": round(float(np.nanmedian(mid)), 4), "removal": removal,
            "pearson_nonlin_context": round(r, 4), "pearson_ci": [round(rlo, 4), round(rhi, 4)],
            "items": {"linearity": lin_v[0], "removal": rem_v[0], "correlation": cor_v[0]}}
    return common.section(
        PAPER, CLAIM, THEIRS, ours,
        setting=(f"default model; linearity on {n_lin} shipped texts ({int(lin.n_points)} tokens, d = {lin.d_model}); "
                 f"removal on {len(items)} shipped factual items (loss of the gold answer); correlation on one text"
                 + (" (quick: shortened)" if quick else "")),
        n={"linearity_tokens": int(lin.n_points), "removal_items": len(items), "correlation_tokens": int(good.sum())},
        interval="held-out scores (no interval: a single fit); mean_ci over items for removal; Fisher-z for r",
        verdict=common.combine([lin_v, rem_v, cor_v]), seed=seed)

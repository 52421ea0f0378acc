"""Reproduction: The Geometry of Tokens in Internal Representations of LLMs (Viswanathan et al. 2025).

Setting: the default model, GRIDE intrinsic dimension per prompt per layer (:func:`lensbench.intrinsic_dimension`,
``per="prompt"``) on the shipped texts; block-shuffled variants (:func:`lensbench.shuffle_baseline`, S = 0 vs the
largest level); Pearson(log ID, loss) per layer (:func:`lensbench.geometry_loss_correlation`).

Verdict rules (all from this run, :func:`common.combine` of three items):

Layer 0 (the embedding lookup: repeated tokens are duplicate points) is left out of every item.

* shape: per-prompt differences ``peak − first`` and ``peak − last`` (peak = the layer of the mean profile's
  maximum) both have a :func:`lensbench.stats.mean_ci` interval above 0, and the peak is not at the first/last
  layer;
* shuffle: per text, ``peak ID(shuffled) − peak ID(original)`` and ``loss(shuffled) − loss(original)`` have
  intervals above 0;
* correlation: at the layer of the largest |r|, the Fisher-z 95% interval of Pearson r lies above 0 (the paper's
  ≈ 0.5 is reported beside it, with whether that interval contains 0.5).
"""

from __future__ import annotations

import math

import numpy as np

import lensbench as lb
from bench.repro import common
from lensbench.stats import pearson_interval

PAPER = "The Geometry of Tokens in Internal Representations of Large Language Models (Viswanathan et al. 2025)"
CLAIM = ("per-prompt intrinsic dimension rises, peaks in early-middle layers and falls; shuffled text raises the "
         "peak and the loss; log ID correlates positively with the loss")
THEIRS = {"quote": "GPT-2 small 3.6 → 7.1 plateau → 6.3; Pythia-160m peak 8.1 at layer 8; Pearson ≈ 0.5; "
                   "Llama-3-8B shuffled peak ≈ 1.5× higher",
          "gpt2_first_peak_last": [3.6, 7.1, 6.3], "pythia160m_peak": 8.1, "pythia160m_peak_layer": 8,
          "pearson": 0.5, "shuffled_peak_ratio_llama3_8b": 1.5}


def run(quick: bool = False, seed: int = 0) -> dict:
    m = common.default_model()
    texts = lb.sample_texts()
    n_id, n_shuf, chars = (4, 2, 1500) if quick else (24, 6, None)
    cut = (lambda t: t[:chars]) if chars else (lambda t: t)
    geo = lb.intrinsic_dimension(m, [cut(t) for t in texts[:n_id]], per="prompt", progress=False, seed=seed)
    V = np.asarray(geo.values, dtype=float)[:, 1:]  # [prompts, layers]; the embedding layer is a lookup table
    layers = list(geo.layers)[1:]
    prof = np.nanmean(V, 0)
    pk = int(np.nanargmax(prof))
    rise = lb.stats.mean_ci(V[:, pk] - V[:, 0], seed=seed)
    fall = lb.stats.mean_ci(V[:, pk] - V[:, -1], seed=seed)
    shape_v = common.all_verdict({
        f"peak at layer {layers[pk]} is interior": 0 < pk < len(layers) - 1,
        f"rise peak−first {rise.estimate:.3g} CI [{rise.lo:.3g}, {rise.hi:.3g}] > 0": bool(rise.lo > 0),
        f"fall peak−last {fall.estimate:.3g} CI [{fall.lo:.3g}, {fall.hi:.3g}] > 0": bool(fall.lo > 0)})

    levels = (0, 2) if quick else (0, 4)
    d_peak, d_loss, ratio = [], [], []
    for i, t in enumerate(texts[:n_shuf]):
        sb = lb.shuffle_baseline(m, cut(t), levels=levels, seed=seed + i, progress=False)
        idm = np.asarray(sb.id, dtype=float)[:, 1:]
        loss = np.asarray(sb.loss, dtype=float)
        d_peak.append(np.nanmax(idm[-1]) - np.nanmax(idm[0]))
        d_loss.append(loss[-1] - loss[0])
        ratio.append(np.nanmax(idm[-1]) / np.nanmax(idm[0]))
    ip, il = lb.stats.mean_ci(np.array(d_peak), seed=seed), lb.stats.mean_ci(np.array(d_loss), seed=seed)
    shuf_v = common.all_verdict({
        f"shuffled peak − original {ip.estimate:.3g} CI [{ip.lo:.3g}, {ip.hi:.3g}] > 0": bool(ip.lo > 0),
        f"shuffled loss − original {il.estimate:.3g} CI [{il.lo:.3g}, {il.hi:.3g}] > 0": bool(il.lo > 0)})

    cor = lb.geometry_loss_correlation(geo)
    r = np.asarray(cor.pearson_r, dtype=float)
    r = r[1:]
    j = int(np.nanargmax(np.abs(r))) if np.isfinite(r).any() else 0
    lo, hi = pearson_interval(float(r[j]), int(cor.n_prompts))
    cor_v = common.interval_verdict(lo, hi, 0.0, "above", what=f"Pearson r at layer {layers[j]}")
    cor_v = (cor_v[0], cor_v[1] + (f"; contains the paper's 0.5: {lo <= 0.5 <= hi}" if math.isfinite(lo) else ""))

    ours = {"layers": layers, "mean_id_profile": [round(float(x), 3) for x in prof],
            "first_peak_last": [round(float(prof[0]), 3), round(float(prof[pk]), 3), round(float(prof[-1]), 3)],
            "peak_layer": layers[pk], "peak_depth_fraction": round(pk / (len(layers) - 1), 3),
            "shuffle_levels": list(levels), "shuffled_peak_ratio": round(float(np.mean(ratio)), 3),
            "shuffle_peak_diff": [round(float(ip.estimate), 3), round(float(ip.lo), 3), round(float(ip.hi), 3)],
            "shuffle_loss_diff": [round(float(il.estimate), 3), round(float(il.lo), 3), round(float(il.hi), 3)],
            "pearson_per_layer": [round(float(x), 3) for x in r], "pearson_max_layer": layers[j],
            "pearson_max": round(float(r[j]), 3), "pearson_ci": [round(lo, 3), round(hi, 3)],
            "items": {"shape": shape_v[0], "shuffle": shuf_v[0], "correlation": cor_v[0]}}
    return common.section(
        PAPER, CLAIM, THEIRS, ours,
        setting=(f"default model, GRIDE per prompt, {n_id} shipped texts for the profile/correlation, {n_shuf} for "
                 f"shuffle levels {levels}" + (f" (quick: {chars} chars each)" if quick else "")),
        n={"prompts": n_id, "shuffle_texts": n_shuf},
        interval="lensbench.stats.mean_ci over prompts (differences); Fisher-z 95% interval for Pearson r",
        verdict=common.combine([shape_v, shuf_v, cor_v]), seed=seed)

"""Reproduction: ReAGent (Zhao & Shan 2024) and soft sufficiency/comprehensiveness (Zhao & Aletras 2023).

Setting: the default model, the shipped factual cloze items whose gold answer is one token of the model's
tokenizer (``lb.tasks.factual``; a multi-token answer has no single target logit), every attribution method of :func:`lensbench.attribute`, scored by :func:`lensbench.faithfulness` with the
keep-rate-matched random control (``random="permute"``: the method's own scores shuffled over positions).

Per method, per item: ``Δ = soft comprehensiveness − its random control`` (and the same for sufficiency).
Interval: :func:`lensbench.stats.mean_ci` over items. Verdict rule: ReAGent "among the most faithful" iff
(a) ReAGent's comprehensiveness Δ interval lies above 0 (better than its matched random control) and (b) its mean
Δ ranks in the top half of the methods.
"""

from __future__ import annotations

import numpy as np

import lensbench as lb
from bench.repro import common

PAPER = "ReAGent: a model-agnostic feature attribution method for generative LMs (Zhao & Shan 2024)"
CLAIM = "ReAGent is among the most faithful attribution methods (soft comprehensiveness/sufficiency) on GPT-2/OPT"
THEIRS = {"quote": "ReAGent among the most faithful on GPT-2/OPT (soft-NC/soft-NS, Zhao & Aletras 2023 metrics; "
                   "qualitative ranking)", "reagent_rank": "top group"}
METHODS = ("saliency", "grad_x_input", "integrated_gradients", "occlusion", "attention", "rollout", "reagent")


def run(quick: bool = False, seed: int = 0) -> dict:
    m = common.default_model()
    n_items = 4 if quick else 16
    items = [it for it in lb.tasks.factual()
             if len(m.tokenizer(it["answer"], add_special_tokens=False)["input_ids"]) == 1][:n_items]
    methods = ("saliency", "occlusion", "reagent") if quick else METHODS
    kw = {"integrated_gradients": {"n_steps": 8 if quick else 32}, "reagent": {"max_steps": 40 if quick else 600}}
    per: dict[str, dict[str, list]] = {}
    for meth in methods:
        dc, ds = [], []
        for i, it in enumerate(items):
            res = lb.attribute(m, it["cloze"], target=it["answer"], method=meth, seed=seed + i, progress=False,
                               **kw.get(meth, {}))
            f = lb.faithfulness(m, res, n_samples=4 if quick else 16, seed=seed + i)
            dc.append(f["comprehensiveness_mean"] - f["comprehensiveness_random_mean"])
            ds.append(f["sufficiency_mean"] - f["sufficiency_random_mean"])
        per[meth] = {"comp": dc, "suff": ds}
    ivc = {k: lb.stats.mean_ci(np.array(v["comp"]), seed=seed) for k, v in per.items()}
    ivs = {k: lb.stats.mean_ci(np.array(v["suff"]), seed=seed) for k, v in per.items()}
    rank = sorted(ivc, key=lambda k: -ivc[k].estimate)
    r = rank.index("reagent") + 1
    a = ivc["reagent"]
    v = common.all_verdict({
        f"ReAGent comprehensiveness − random {a.estimate:.3g} CI [{a.lo:.3g}, {a.hi:.3g}] > 0": bool(a.lo > 0),
        f"ReAGent ranks {r} of {len(rank)} by comprehensiveness gain (top half)": r <= (len(rank) + 1) // 2})
    ours = {"comprehensiveness_minus_random": {k: [round(float(x), 4) for x in (iv.estimate, iv.lo, iv.hi)]
                                               for k, iv in ivc.items()},
            "sufficiency_minus_random": {k: [round(float(x), 4) for x in (iv.estimate, iv.lo, iv.hi)]
                                         for k, iv in ivs.items()},
            "rank_by_comprehensiveness_gain": rank}
    return common.section(
        PAPER, CLAIM, THEIRS, ours,
        setting=f"default model, {len(items)} shipped factual cloze items, methods {list(methods)}",
        n={"items": len(items), "methods": len(methods)},
        interval="lensbench.stats.mean_ci over items of (method − keep-rate-matched random control)",
        verdict=v, seed=seed)

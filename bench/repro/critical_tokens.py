"""Reproduction: Critical Tokens Matter (Lin et al. 2024) — rollouts and contrastive estimation.

Setting: the default model, shipped arithmetic problems (``lb.tasks.arithmetic``) that its greedy chat answer gets
wrong; :func:`lensbench.critical_tokens` (the paper's rollout rule ``rule="paper"``: observed keep-arm success 0,
coarse search) on that response with ``lb.checkers.number(gold)``. At each item's critical token
(``critical_index``) we pool the rollout successes when the token is replaced vs kept. The rule's false-positive
rate (:func:`lensbench.probes.critical.rule_false_positive_rate`: the exact binomial probability that a prefix whose
true success rate is p is declared failing) is reported at p = 3/64 and p = 0.1 for the n used.

Contrastive estimation: the positive model is the default model itself; the negative model is a LoRA (rank 8 on
the attention projections, AdamW) trained on the model's own *wrong* greedy answers to a disjoint pool of shipped
arithmetic items (another seed; never the analysed ones). The paper trains both models (on correct and incorrect
trajectories of GSM8K/MATH); using the base as the positive model is our deviation. For every evaluated response
token we compare the contrastive criticality 1 − p_ce (β = 1) with the rollout criticality replace_acc − keep_acc
(how much forcing another token there raises the success rate).

Intervals: :func:`lensbench.wilson_interval` of the pooled success counts; Spearman's ρ over the evaluated tokens of
all analysed items with a Fisher-z interval (:func:`lensbench.stats.pearson_interval`, approximate for ρ).
Verdicts: rollouts "reproduced" iff the replaced interval lies entirely above the kept one (lo_replace > hi_keep);
contrastive "reproduced" iff ρ's interval lies above 0; "not comparable" if no item was wrong, no critical token
was found, or fewer than 4 tokens were evaluated.
"""

from __future__ import annotations

import time

import numpy as np
import torch

import lensbench as lb
from bench.repro import common
from lensbench import engine
from lensbench.probes.critical import rule_false_positive_rate

LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the attention projections (the recorded setting)
PAPER = "Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning Capability (Lin et al. 2024)"
CLAIM = "in wrong reasoning trajectories some tokens are critical: replacing them raises the success rate of rollouts"
THEIRS = {"quote": "replacing the critical token (e.g. 'owed') turns a near-0 rollout success rate into a high one; "
                   "contrastive estimation identifies critical tokens (GSM8K/MATH, Llama-3/DeepSeek)",
          "keep_success": "≈ 0", "replace_success": "high"}


def _chat(m, q: str) -> str:
    msg = [{"role": "user", "content": q + " Answer with a short explanation and end with the number."}]
    return m.tokenizer.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)


def _greedy(m, prompt: str, n_new: int) -> str:
    return m.tokenizer.decode(engine.greedy(m, m.encode(prompt, add_bos=False), n_new), skip_special_tokens=True)


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).statistic)


def run(quick: bool = False, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    m = common.default_model()
    n_items, n_resp, n_s, n_new, max_wrong = (6, 24, 2, 6, 1) if quick else (40, 48, 32, 16, 3)
    n_pool, lora_steps = (3, 2) if quick else (24, 60)
    items = lb.tasks.arithmetic(n_items, digits=2, seed=seed)
    rows, wrong, analysed = [], 0, []
    for it in items:
        if wrong >= max_wrong:
            break
        gold = it["meta"]["label"]
        prompt = _chat(m, it["question"])
        response = _greedy(m, prompt, n_resp)
        chk = lb.checkers.number(gold)
        if chk(response):
            continue
        wrong += 1
        r = lb.critical_tokens(m, prompt, response, checker=chk, n_samples=n_s, max_new_tokens=n_new,
                               temperature=0.7, search="coarse", stride=8, rule="paper", seed=seed,
                               progress=False)
        analysed.append((prompt, response, r))
        ci = r.critical_index
        if ci is None or ci < 0:
            rows.append({"question": it["question"], "critical": None})
            continue
        rows.append({"question": it["question"], "critical": int(ci), "token": r.units[ci],
                     "keep_success": int(round(float(r.keep_acc[ci]) * n_s)),
                     "replace_success": int(round(float(r.replace_acc[ci]) * int(np.asarray(r.replace_n)[ci]))),
                     "replace_n": int(np.asarray(r.replace_n)[ci]), "keep_n": n_s})
    found = [x for x in rows if x["critical"] is not None]
    if not found:
        v = common.not_comparable(f"{wrong} wrong items, no critical token found" if wrong else "no wrong item")
        ks = kn = rs = rn = 0
        klo = khi = rlo = rhi = float("nan")
    else:
        ks, kn = sum(x["keep_success"] for x in found), sum(x["keep_n"] for x in found)
        rs, rn = sum(x["replace_success"] for x in found), sum(x["replace_n"] for x in found)
        (klo,), (khi,) = lb.wilson_interval(np.array([ks]), np.array([kn]))
        (rlo,), (rhi,) = lb.wilson_interval(np.array([rs]), np.array([rn]))
        v = common.interval_verdict(float(rlo), float(rhi), float(khi), "above", what="replaced success")
        v = (v[0], v[1] + f" (the kept interval's upper bound; kept CI [{klo:.3g}, {khi:.3g}])")
    fpr = {f"p={p:.3g}": rule_false_positive_rate(n_s, p, rule="paper") for p in (3 / 64, 0.1)}

    # ---- contrastive estimation: a negative LoRA on wrong answers to a disjoint pool of items
    t0 = time.perf_counter()
    pool = lb.tasks.arithmetic(n_pool, digits=2, seed=seed + 1000)
    asked = {it["question"] for it in items}
    pairs = []
    for it in pool:
        if it["question"] in asked:
            continue
        p = _chat(m, it["question"])
        a = _greedy(m, p, n_resp)
        if not lb.checkers.number(it["meta"]["label"])(a):
            pairs.append((p, a))
    crit_ce, crit_roll, per_item = [], [], []
    losses = []
    if pairs and analysed:
        m_neg, losses = lb.train_negative_model(m, pairs, n_steps=lora_steps, seed=seed, progress=False,
                                                 target_modules=LORA_MODULES)
        for prompt, response, r in analysed:
            ce = lb.contrastive_tokens(m, m_neg, prompt + response, beta=1.0)
            n_r = len(r.token_ids)
            c_ce = (1 - ce.p_ce)[-n_r:].double().numpy()
            roll = (r.replace_acc - r.keep_acc).double().numpy()
            ev = np.isfinite(roll)
            crit_ce.extend(c_ce[ev].tolist())
            crit_roll.extend(roll[ev].tolist())
            per_item.append(_spearman(c_ce[ev], roll[ev]) if ev.sum() >= 3 else float("nan"))
    n_tok = len(crit_ce)
    if n_tok >= 4:
        rho = _spearman(crit_ce, crit_roll)
        rlo_, rhi_ = lb.stats.pearson_interval(rho, n_tok)
        cv = common.interval_verdict(rlo_, rhi_, 0.0, "above", what="Spearman ρ(1 − p_ce, replace − keep)")
    else:
        rho = rlo_ = rhi_ = float("nan")
        cv = common.not_comparable(f"{n_tok} evaluated tokens ({len(pairs)} wrong pool answers for the LoRA)")
    contrastive = {"lora_training_data": f"{len(pairs)} wrong greedy answers of the default model to shipped "
                                         f"arithmetic items (seed {seed + 1000}, disjoint from the analysed ones)",
                   "lora": f"rank 8 on q/k/v/o, AdamW lr 2e-3, {lora_steps} steps (one answer per step), loss "
                           + (f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "n/a"),
                   "spearman": rho, "ci": [rlo_, rhi_], "n_tokens": n_tok, "per_item_spearman": per_item,
                   "wall_s": round(time.perf_counter() - t0, 1)}
    v = common.combine([v, cv])
    ours = {"items": rows, "keep": [ks, kn, float(klo), float(khi)], "replace": [rs, rn, float(rlo), float(rhi)],
            "wrong_items": wrong, "rule_false_positive_rate": fpr, "contrastive": contrastive}
    return common.section(
        PAPER, CLAIM, THEIRS, ours,
        setting=(f"default model, greedy chat answers to {len(items)} shipped 2-digit arithmetic items, first "
                 f"{max_wrong} wrong ones; rollouts: {n_s} samples, {n_new} new tokens, T = 0.7, coarse search, "
                 f"rule 'paper'; contrastive: base model vs a LoRA on {len(pairs)} wrong answers to other items"),
        n={"wrong_items": wrong, "critical_found": len(found), "keep_rollouts": kn, "replace_rollouts": rn,
           "contrastive_tokens": n_tok, "lora_pairs": len(pairs)},
        interval=("Wilson 95% (lensbench.wilson_interval) of pooled rollout successes at the critical tokens; "
                  "Fisher-z 95% for Spearman ρ over the evaluated tokens"),
        verdict=v, seed=seed)

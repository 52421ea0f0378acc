"""Reproduction: Critical Tokens Matter (Lin et al. 2024) — rollout part.

Setting: the default model, shipped arithmetic problems (``lb.tasks.arithmetic``) that its greedy chat answer gets
wrong; :func:`lensbench.critical_tokens` (the paper's rollout rule ``rule="paper"``, coarse search) on that response with
``lb.checkers.number(gold)``. At each item's critical token (``critical_index``) we pool the rollout successes
when the token is replaced vs kept.

Interval: :func:`lensbench.wilson_interval` of the pooled success counts. Verdict rule: "reproduced" iff the
replaced interval lies entirely above the kept one (lo_replace > hi_keep); "not comparable" if no item was
wrong or no critical token was found. The contrastive (LoRA) estimate is not run by this module and is
reported as not comparable.
"""

from __future__ import annotations

import numpy as np
import torch

import lensbench as lb
from bench.repro import common

PAPER = "Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning Capability (Lin et al. 2024)"
CLAIM = "in wrong reasoning trajectories some tokens are critical: replacing them raises the success rate of rollouts"
THEIRS = {"quote": "replacing the critical token (e.g. 'owed') turns a near-0 rollout success rate into a high one; "
                   "contrastive estimation identifies critical tokens (GSM8K/MATH, Llama-3/DeepSeek)",
          "keep_success": "≈ 0", "replace_success": "high"}


def _chat(m, q: str) -> str:
    msg = [{"role": "user", "content": q + " Answer with a short explanation and end with the number."}]
    return m.tokenizer.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)


def run(quick: bool = False, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    m = common.default_model()
    n_items, n_resp, n_s, n_new, max_wrong = (6, 24, 2, 6, 1) if quick else (40, 48, 16, 16, 4)
    items = lb.tasks.arithmetic(n_items, digits=2, seed=seed)
    rows, wrong = [], 0
    for it in items:
        if wrong >= max_wrong:
            break
        gold = it["meta"]["label"]
        prompt = _chat(m, it["question"])
        ids = m.encode(prompt, add_bos=False)[None]
        with torch.no_grad():
            out = m.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=n_resp, pad_token_id=m.tokenizer.pad_token_id)
        response = m.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        chk = lb.checkers.number(gold)
        if chk(response):
            continue
        wrong += 1
        r = lb.critical_tokens(m, prompt, response, checker=chk, n_samples=n_s, max_new_tokens=n_new,
                               temperature=0.7, search="coarse", stride=8, rule="paper", seed=seed,
                               progress=False)
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
    cv = common.not_comparable("contrastive estimate (LoRA pair) not run in this module")
    ours = {"items": rows, "keep": [ks, kn, float(klo), float(khi)], "replace": [rs, rn, float(rlo), float(rhi)],
            "wrong_items": wrong, "contrastive": cv[1]}
    return common.section(
        PAPER, CLAIM, THEIRS, ours,
        setting=(f"default model, greedy chat answers to {len(items)} shipped 2-digit arithmetic items, first "
                 f"{max_wrong} wrong ones; rollouts: {n_s} samples, {n_new} new tokens, T = 0.7, coarse search"),
        n={"wrong_items": wrong, "critical_found": len(found), "keep_rollouts": kn, "replace_rollouts": rn},
        interval="Wilson 95% (lensbench.wilson_interval) of pooled rollout successes at the critical tokens",
        verdict=v, seed=seed)

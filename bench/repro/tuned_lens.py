"""Reproduction: Eliciting Latent Predictions with the Tuned Lens (Belrose et al. 2023).

Setting: the default model; a tuned lens trained with :func:`lensbench.train_tuned_lens` on the first shipped
texts, then per-layer KL(p_L || p_l) of the logit lens and the tuned lens on *held-out* shipped texts
(:func:`lensbench.logit_lens` with and without ``lens=``).

Interval: per layer, the logit − tuned KL gap, :func:`lensbench.stats.mean_ci` over held-out tokens clustered by
text. Verdict rule (:func:`common.all_verdict`): (a) the gap's interval lies above 0 at every layer except the
last (where both lenses are the model's output), and (b) the largest mean gap is in the first half of the layers.
"""

from __future__ import annotations

import numpy as np
import torch

import lensbench as lb
from bench.repro import common

PAPER = "Eliciting Latent Predictions from Transformers with the Tuned Lens (Belrose et al. 2023)"
CLAIM = "the tuned lens has lower KL to the final distribution than the logit lens at every layer, most in early layers"
THEIRS = {"quote": "tuned lens KL below logit lens at every layer on every model; the logit lens is worst in "
                   "early layers (qualitative, Fig. 1/3)", "tuned_below_logit_every_layer": True,
          "largest_gap": "early layers"}


def run(quick: bool = False, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    m = common.default_model()
    texts = lb.sample_texts()
    n_train, n_test = (4, 2) if quick else (18, 6)
    chars = 400 if quick else None
    train = [t[:chars] if chars else t for t in texts[:n_train]]
    test = [t[:chars] if chars else t for t in texts[n_train:n_train + n_test]]
    steps = 10 if quick else 120
    tl = lb.train_tuned_lens(m, train, n_steps=steps, max_tokens=256 if quick else 4096, heldout=0.1, eval_every=steps,
                             seed=seed, progress=False)
    rl = lb.logit_lens(m, test, top_k=1, progress=False)
    rt = lb.logit_lens(m, test, top_k=1, lens=tl, progress=False)
    layers = list(rl[0].layers)
    L = len(layers)
    gaps, clus = [], []
    for i, (a, b) in enumerate(zip(rl, rt)):
        d = (torch.as_tensor(a.kl_to_final) - torch.as_tensor(b.kl_to_final)).float().numpy()  # [L, T]
        gaps.append(d[:, 1:])  # position 0 (BOS / first token) is trivial
        clus.append(np.full(d.shape[1] - 1, i))
    G = np.concatenate(gaps, 1)
    C = np.concatenate(clus)
    logit_kl = [float(np.mean(np.concatenate([torch.as_tensor(a.kl_to_final).float().numpy()[j, 1:] for a in rl])))
                for j in range(L)]
    tuned_kl = [float(np.mean(np.concatenate([torch.as_tensor(b.kl_to_final).float().numpy()[j, 1:] for b in rt])))
                for j in range(L)]
    ivs = [lb.stats.mean_ci(G[j], C, seed=seed) for j in range(L)]
    inner = list(range(L - 1))
    below = all(ivs[j].lo > 0 for j in inner)
    worst = int(np.argmax([ivs[j].estimate for j in inner]))
    early = worst < (L - 1) / 2
    v = common.all_verdict({
        f"gap CI > 0 at all {len(inner)} non-final layers (fails at {[layers[j] for j in inner if not ivs[j].lo > 0]})": below,
        f"largest gap at layer {layers[worst]} of {L - 1} is in the first half": early})
    ours = {"layers": layers, "logit_kl": [round(x, 4) for x in logit_kl], "tuned_kl": [round(x, 4) for x in tuned_kl],
            "gap": [round(float(iv.estimate), 4) for iv in ivs], "gap_lo": [round(float(iv.lo), 4) for iv in ivs],
            "gap_hi": [round(float(iv.hi), 4) for iv in ivs], "largest_gap_layer": layers[worst]}
    return common.section(
        PAPER, CLAIM, THEIRS, ours,
        setting=(f"{m.name if hasattr(m, 'name') else 'default model'}; tuned lens {steps} SGD steps on {n_train} "
                 f"shipped texts, evaluated on {n_test} held-out texts" + (" (quick: 400 chars each)" if quick else "")),
        n={"heldout_tokens": int(G.shape[1]), "heldout_texts": n_test},
        interval="95% CI of mean(logit KL − tuned KL) per layer, lensbench.stats.mean_ci clustered by text",
        verdict=v, seed=seed)

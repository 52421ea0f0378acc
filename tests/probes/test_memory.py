"""Contextual memory: a known-answer head, seeding and persistence, token classes, CIs over texts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lensbench as lb


def _markov_texts(n_texts=6, T=100, V=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (T,), generator=g) for _ in range(n_texts)], g


def test_contextual_memory_known_answer():
    """Features that literally contain one-hot codes of the two previous tokens let the head reconstruct those
    two prefix tokens almost perfectly; random features cannot beat the uniform code length log V."""
    from lensbench.probes.memory import fit_contextual_memory
    V, W = 30, 2
    ids, g = _markov_texts(V=V)

    def informative(seq):
        F = torch.zeros(len(seq), 2 * V)
        for j in (1, 2):
            F[torch.arange(j, len(seq)), (j - 1) * V + seq[:-j]] = 1.0
        return F
    emb = torch.randn(V, 8, generator=g)
    kw = dict(window=W, lr=1e-2, progress=False)
    a = fit_contextual_memory([informative(s) for s in ids], ids, emb, steps=150, folds=1, **kw)
    # held-out scoring (cross-fitted): random features carry nothing that transfers to unseen texts
    b = fit_contextual_memory([torch.randn(len(s), 2 * V, generator=g) for s in ids], ids, emb, steps=80, folds=2,
                              **kw)
    full = a["n_prefix"] == W
    assert a["score_per_token"][full].mean() < 0.3                    # ≈ 0: the prefix is in the features
    assert b["score_per_token"][full].mean() > 0.8 * np.log(V)        # held-out texts: no better than chance
    assert np.allclose(a["score"], a["score_per_token"] * a["n_prefix"])


def test_contextual_memory_seeded_bf16_and_io(tiny, tmp_path):
    m = tiny("llama", torch.bfloat16)
    texts = [t[:300] for t in lb.sample_texts(4)]
    kw = dict(window=4, steps=8, progress=False)
    r1 = lb.contextual_memory(m, texts, **kw)
    r2 = lb.contextual_memory(m, texts, **kw)
    r3 = lb.contextual_memory(m, texts, seed=1, **kw)
    assert np.array_equal(r1.score, r2.score) and not np.array_equal(r1.score, r3.score)
    assert np.isfinite(r1.score).all() and (r1.score >= 0).all() and len(r1.token) == len(r1.score)
    assert set(r1.token_class) <= {"punctuation", "stopword", "content", "other"} and r1.class_n.sum() > 0
    ok = r1.class_n > 1
    assert (r1.class_lo[ok] <= r1.class_mean[ok]).all() and (r1.class_mean[ok] <= r1.class_hi[ok]).all()
    summ = r1.summary()
    assert {"n_tokens", "n_texts", "ci_method"} <= set(summ.columns) and summ["n_texts"].max() <= len(texts)
    again = lb.Result.load(r1.save(tmp_path / "cm"))
    assert again == r1 and len(r1.to_dataframe()) == len(r1.score) and len(r1.summary()) == 4
    assert r1.figure() is not None and r1.figure("tokens") is not None
    cap = m.capture(texts, layers=r1.settings["layers"], progress=False)   # one capture, many probes
    assert np.array_equal(lb.contextual_memory(m, cap, **kw).score, r1.score)


def test_token_classes():
    from lensbench.probes.memory import token_class
    assert [token_class(t) for t in [" the", ",", " Paris", " 1984", "Ġand", ".\n", " "]] == [
        "stopword", "punctuation", "content", "other", "stopword", "punctuation", "other"]


@pytest.mark.parametrize("kw, match", [(dict(window=0), "window"), (dict(steps=0), "steps"),
                                       (dict(folds=5), "folds"), (dict(layers=[99]), "layers")])
def test_contextual_memory_bad_input(tiny, kw, match):
    with pytest.raises(lb.InputError, match=match):
        lb.contextual_memory(tiny("llama"), ["one text here.", "another text."], progress=False, **kw)


def test_contextual_memory_ci_resamples_texts(tiny):
    """The per-class CIs are lensbench.stats.mean_ci with the texts as clusters (a t interval below 20 texts),
    not a bootstrap over the overlapping tokens; the summary says how many tokens and texts each row has."""
    from lensbench.stats import mean_ci
    m = tiny("llama")
    texts = [t[:300] for t in lb.sample_texts(4)]
    r = lb.contextual_memory(m, texts, window=4, steps=8, progress=False)
    full = r.n_prefix == 4
    cls = np.asarray(r.token_class)
    for j, c in enumerate(r.classes):
        sel = full & (cls == c)
        ref = mean_ci(r.score_per_token[sel], clusters=r.text_index[sel])
        assert r.class_n[j] == ref.n and r.class_n_texts[j] == ref.n_clusters
        if ref.n_clusters >= 2:
            assert r.class_ci_method[j] == "t"
            assert (r.class_lo[j], r.class_hi[j]) == pytest.approx((ref.lo, ref.hi), rel=1e-12)


def test_memory_summary_intervals_cover_with_correlated_tokens():
    """Tokens of one text share a text-level effect: over 200 simulated data sets of 6 texts x 80 tokens, the
    interval over texts covers the true mean about 95% of the time; a token bootstrap covers far less."""
    from lensbench.probes.memory import _summarise
    rng = np.random.default_rng(0)
    hits, n_sets = 0, 200
    for _ in range(n_sets):
        text = np.repeat(np.arange(6), 80)
        x = rng.normal(0, 1, 6)[text] + rng.normal(0, 0.3, len(text))      # true mean 0
        n, nt, mean, lo, hi, meth = _summarise(x, ["content"] * len(x), np.ones(len(x), bool), text, 200, 0)
        j = list(lb.probes.memory.CLASSES).index("content")
        assert nt[j] == 6 and n[j] == 480 and meth[j] == "t"
        hits += lo[j] <= 0 <= hi[j]
    assert hits / n_sets > 0.88
    with pytest.warns(DeprecationWarning):
        from lensbench.probes.memory import bootstrap_ci
        assert np.isfinite(bootstrap_ci(np.arange(10.0))).all()

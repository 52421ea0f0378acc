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
    a = fit_contextual_memory([informative(s) for s in ids], ids, emb, n_steps=150, folds=1, **kw)
    # held-out scoring (cross-fitted): random features carry nothing that transfers to unseen texts
    b = fit_contextual_memory([torch.randn(len(s), 2 * V, generator=g) for s in ids], ids, emb, n_steps=80,
                              folds=2, **kw)
    full = a["n_prefix"] == W
    assert a["score_per_token"][full].mean() < 0.3                    # ≈ 0: the prefix is in the features
    assert b["score_per_token"][full].mean() > 0.8 * np.log(V)        # held-out texts: no better than chance
    assert np.allclose(a["score"], a["score_per_token"] * a["n_prefix"])


def test_contextual_memory_seeded_bf16_and_io(tiny, tmp_path):
    m = tiny("llama", torch.bfloat16)
    texts = [t[:300] for t in lb.sample_texts(4)]
    kw = dict(window=4, n_steps=8, progress=False)
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
    bars = r1.figure().data[0]
    shown = r1.class_n > 0
    assert list(bars.x) == [c for c, s in zip(r1.classes, shown) if s]
    assert np.allclose(bars.y, r1.class_mean[shown])
    assert np.allclose(bars.error_y.array, (r1.class_hi - r1.class_mean)[shown])
    assert np.allclose(bars.error_y.arrayminus, (r1.class_mean - r1.class_lo)[shown])
    per_token = r1.figure("tokens", text=1).data[0]
    assert np.array_equal(per_token.y, r1.score_per_token[r1.text_index == 1])
    assert list(per_token.hovertext) == [t for t, i in zip(r1.token, r1.text_index) if i == 1]
    with pytest.raises(lb.InputError, match="kind"):
        r1.figure("magic")
    cap = m.capture(texts, layers=r1.settings["layers"], progress=False)   # one capture, many probes
    assert np.array_equal(lb.contextual_memory(m, cap, **kw).score, r1.score)


def test_token_classes():
    from lensbench.probes.memory import token_class
    assert [token_class(t) for t in [" the", ",", " Paris", " 1984", "Ġand", ".\n", " "]] == [
        "stopword", "punctuation", "content", "other", "stopword", "punctuation", "other"]


@pytest.mark.parametrize("kw, match", [(dict(window=0), "window"), (dict(steps=0), "n_steps"),
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
    r = lb.contextual_memory(m, texts, window=4, n_steps=8, progress=False)
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


# --------------------------------------------------------------------------------------------- parameters
TWO = ["one text here, and more of it.", "another text, with words."]
BAD_MEMORY = [("window", 0), ("window", 2.0), ("n_steps", 0), ("lr", 0.0), ("lr", -1e-3), ("train_batch_size", 0),
              ("hidden", 0), ("folds", 0), ("seed", 0.5), ("progress", 1)]


@pytest.mark.parametrize("param, value", BAD_MEMORY + [("n_boot", 0), ("exclude_first", "first"), ("batch_size", 0),
                                                       ("batch_size", "max")], ids=str)
def test_contextual_memory_refuses_bad_values_by_name(tiny, param, value):
    with pytest.raises(lb.InputError) as e:
        lb.contextual_memory(tiny("llama"), TWO, **{"progress": False, param: value})
    assert str(e.value).startswith(f"contextual_memory: {param}={value!r} is not allowed; {param} must be ")


@pytest.mark.parametrize("param, value", BAD_MEMORY + [("embeddings", [[0.0]])], ids=str)
def test_fit_contextual_memory_refuses_bad_values_by_name(param, value):
    from lensbench.probes.memory import fit_contextual_memory
    ids, g = _markov_texts(n_texts=2, T=10)
    with pytest.raises(lb.InputError) as e:
        fit_contextual_memory([torch.randn(10, 4)] * 2, ids, **{"embeddings": torch.randn(30, 4), "progress": False,
                                                                param: value})
    assert str(e.value).startswith(f"fit_contextual_memory: {param}={value!r} is not allowed; {param} must be ")


def test_old_names_are_aliases(tiny):
    """steps=, batch= and exclude_bos= still work, each with a FutureWarning pointing at the caller, and give the
    same scores as n_steps=, train_batch_size= and exclude_first= (exclude_bos=True is exclude_first="bos")."""
    import warnings

    from lensbench.probes.memory import fit_contextual_memory
    m = tiny("llama")
    cap = m.capture(TWO, layers=[1, 2], progress=False)
    kw = dict(layers=[1, 2], window=3, folds=1, progress=False)
    with pytest.warns(FutureWarning) as rec:
        old = lb.contextual_memory(m, cap, steps=6, batch=16, exclude_bos=True, **kw)
    named = sorted(str(r.message).split(":")[1].split("=")[0].strip() for r in rec
                   if issubclass(r.category, FutureWarning))
    assert named == ["batch", "exclude_bos", "steps"]
    assert all(r.filename == __file__ for r in rec if issubclass(r.category, FutureWarning))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        new = lb.contextual_memory(m, cap, n_steps=6, train_batch_size=16, exclude_first="bos", **kw)
        off = lb.contextual_memory(m, cap, n_steps=6, train_batch_size=16, exclude_first=False, **kw)
    assert old == new and new.settings["n_steps"] == 6 and new.settings["train_batch_size"] == 16
    with pytest.warns(FutureWarning, match="exclude_bos"):
        assert lb.contextual_memory(m, cap, n_steps=6, train_batch_size=16, exclude_bos=False, **kw) == off
    with pytest.raises(lb.InputError, match="pass n_steps= only"):
        lb.contextual_memory(m, cap, steps=6, n_steps=6, **kw)
    assert lb.contextual_memory.renamed_params == {"steps": "n_steps", "batch": "train_batch_size",
                                                   "exclude_bos": "exclude_first"}
    ids, g = _markov_texts(n_texts=2, T=12)
    feats = [torch.randn(12, 4, generator=g) for _ in ids]
    args = (feats, ids, torch.randn(30, 4, generator=g))
    with pytest.warns(FutureWarning, match="steps= is renamed n_steps="):
        a = fit_contextual_memory(*args, steps=5, batch=8, folds=1, progress=False)
    b = fit_contextual_memory(*args, n_steps=5, train_batch_size=8, folds=1, progress=False)
    assert np.array_equal(a["score"], b["score"]) and a["train_loss"] == b["train_loss"]


def test_exclude_first_true_drops_position_0(tiny):
    """exclude_first=True leaves position 0 out whatever the token (the tiny tokenizer adds no BOS, so the
    default "bos" keeps it): it is neither scored nor reconstructed."""
    m = tiny("llama")
    cap = m.capture(TWO, layers=[2], progress=False)
    kw = dict(layers=[2], window=3, n_steps=4, folds=1, progress=False)
    keep, drop = lb.contextual_memory(m, cap, **kw), lb.contextual_memory(m, cap, exclude_first=True, **kw)
    assert keep.position.min() == 1 and drop.position.min() == 2
    assert (keep.n_prefix == np.minimum(keep.position, 3)).all()
    assert (drop.n_prefix == np.minimum(drop.position - 1, 3)).all()
    assert drop.settings["exclude_first"] is True and keep.settings["exclude_first"] == "bos"


def test_same_scores_from_texts_and_from_a_capture(tiny, monkeypatch):
    m = tiny("llama")
    kw = dict(layers=[1, 2], window=3, n_steps=6, progress=False)
    a = lb.contextual_memory(m, TWO, **kw)
    cap = m.capture(TWO, layers=[1, 2], progress=False)

    def no_model_pass(*a, **k):
        raise AssertionError("contextual_memory given a capture ran the model")
    monkeypatch.setattr(m, "capture", no_model_pass)
    b = lb.contextual_memory(m, cap, **kw)
    assert np.array_equal(a.score, b.score) and a.token == b.token and np.array_equal(a.class_mean, b.class_mean,
                                                                                       equal_nan=True)

"""Geometry: estimators on manifolds of known dimension, agreement with scikit-dimension, identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lensbench as lb
from lensbench import estimators as E
from lensbench.probes.geometry import block_shuffle, linear_fit


def _plane(N=2000, d=5, D=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, d, generator=g, dtype=torch.float64) @ torch.randn(d, D, generator=g, dtype=torch.float64)


def _sphere(N=2000, d=5, D=50, seed=0):
    """Uniform points on the curved d-sphere S^d ⊂ R^{d+1}, rotated into R^D."""
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(N, d + 1, generator=g, dtype=torch.float64)
    S = S / S.norm(dim=1, keepdim=True)
    Q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    return torch.cat([S, torch.zeros(N, D - d - 1, dtype=torch.float64)], 1) @ Q


@pytest.mark.parametrize("cloud", [_plane, _sphere], ids=["linear", "curved"])
@pytest.mark.parametrize("name, fn", [
    ("twonn", E.twonn), ("twonn_mle", lambda X: E.twonn(X, method="mle")), ("gride", E.gride),
    ("gride_8", lambda X: E.gride(X, 4, 8)), ("mle", E.mle)])
def test_known_dimension(cloud, name, fn):
    assert fn(cloud()) == pytest.approx(5, rel=0.10), name


def test_pca_on_linear_manifold():
    assert E.pca_dim(_plane(), 0.999) == 5
    assert E.pca_dim(_plane(d=3), 0.999) == 3


def test_three_dim_manifold_is_not_five():
    assert E.gride(_sphere(d=3)) == pytest.approx(3, rel=0.1)


@pytest.mark.parametrize("method", ["linear", "mle"])
def test_twonn_agrees_with_scikit_dimension(method):
    skdim = pytest.importorskip("skdim")
    for X in (_plane(), _sphere(), torch.rand(1500, 12, dtype=torch.float64)):
        ref = skdim.id.TwoNN(method=method).fit(X.numpy()).dimension_
        assert E.twonn(X, method=method) == pytest.approx(ref, rel=1e-6)


def test_gride_smallest_scale_is_twonn_mle():
    """GRIDE with n1=1, n2=2 has the closed form (N−1)/Σ log μ: TwoNN's MLE without discarding."""
    X = _sphere(seed=3)
    mu = E._ratios(X, 1, 2)[0]
    mu = E._filter_outliers(mu)
    closed = (mu.numel() - 1) / mu.log().sum()
    assert E.gride(X, 1, 2) == pytest.approx(float(closed), rel=1e-8)


def test_gride_profile_scales():
    prof = E.gride_profile(_plane(N=1000), max_n2=32)
    assert list(prof) == [2, 4, 8, 16, 32]
    assert prof[4] == pytest.approx(E.gride(_plane(N=1000), 2, 4))
    assert all(v == pytest.approx(5, rel=0.15) for v in prof.values())


def test_duplicates_removed_and_reported():
    X = _plane(N=1000)
    Xd = torch.cat([X, X[:200]])
    d, info = E.twonn(Xd, return_info=True)
    assert info.removed == 200 and d == pytest.approx(E.twonn(X), rel=1e-9)


def test_knn_matches_brute_force():
    X = torch.randn(300, 7, dtype=torch.float64)
    D, I = E.knn(X, 5, chunk=17)  # noqa: E741
    full = torch.cdist(X, X)
    full.fill_diagonal_(float("inf"))
    v, i = full.topk(5, largest=False)
    assert torch.equal(I, i) and torch.allclose(D, v, atol=1e-9)


def _brute(X, k):
    """Reference neighbours: float64 distances by differences, self excluded, stable sort (ties → lower index)."""
    d = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    d.fill_diagonal_(float("inf"))
    v, i = torch.sort(d, dim=1, stable=True)
    return v[:, :k].sqrt(), i[:, :k]


def test_knn_exact_where_float32_cannot_rank(monkeypatch):
    """Near-equidistant points (a simplex perturbed by 1e-9) defeat the float32 screen: the certificate must
    send those rows to the exact fallback, and the result must equal the float64 brute force."""
    g = torch.Generator().manual_seed(1)
    X = 1e3 + torch.eye(120, dtype=torch.float64) + 1e-9 * torch.rand(120, 120, generator=g, dtype=torch.float64)
    calls = []
    real = E._exact_rows
    monkeypatch.setattr(E, "_exact_rows", lambda X, rows, k: calls.append(len(rows)) or real(X, rows, k))
    D, I = E.knn(X, 6)  # noqa: E741
    assert calls and calls[0] > 100                          # the spy: uncertifiable rows took the exact path
    v, i = _brute(X, 6)
    assert torch.equal(I, i) and torch.allclose(D, v, rtol=1e-12)
    Y = torch.randn(700, 30, generator=g, dtype=torch.float64) * torch.logspace(0, 3, 30, dtype=torch.float64)
    Y[5] = Y[9]                                               # an exact tie: neighbour order by index
    D, I = E.knn(Y, 10, chunk=64)  # noqa: E741
    v, i = _brute(Y, 10)
    assert torch.equal(I, i) and torch.allclose(D, v, rtol=1e-12)


def test_dedup_keeps_first_occurrences_in_order():
    X = torch.randn(50, 4, dtype=torch.float64)
    Xd = torch.cat([X, X[[3, 7, 3]], -0.0 * X[:1] + X[:1]])
    U, info = E.dedup(Xd)
    assert info.removed == 4 and torch.equal(U, X)
    assert E.dedup(X)[1].removed == 0


def test_neighbors_shared_across_estimators():
    X = _sphere(N=1500)
    nb = E.neighbors(X, 8)
    assert E.twonn(nb) == E.twonn(X) and E.gride(nb, 4, 8) == E.gride(X, 4, 8) and E.mle(nb, 8) == E.mle(X, 8)
    assert E.gride_profile(nb) == E.gride_profile(X, 8)
    with pytest.raises(lb.InputError, match="neighbours"):
        E.gride(nb, 8, 16)


def test_overlap_identical_to_per_token_set_loop():
    """χ_k per token equals a per-token Python loop with sets under the same neighbour definition, also with
    repeated points (exact distance ties)."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(300, 20, generator=g, dtype=torch.float64)
    X[10:20] = X[0]                                           # ties, as repeated tokens at the embedding layer
    Y = X + 0.5 * torch.randn(300, 20, generator=g, dtype=torch.float64)
    k = 7

    def sets(Z):
        out = []
        for i in range(len(Z)):
            d = ((Z - Z[i]) ** 2).sum(1).numpy()
            d[i] = np.inf
            out.append(set(np.argsort(d, kind="stable")[:k].tolist()))
        return out
    a, b = sets(X), sets(Y)
    loop = np.array([len(a[i] & b[i]) / k for i in range(len(X))])
    ours = E.neighbor_overlap(X, Y, k).numpy()
    assert np.array_equal(ours, loop) and ours.mean() == loop.mean()


def test_overlap_identities():
    X = _sphere(N=800)
    assert E.neighbor_overlap(X, X, 10).mean() == 1.0
    perm = torch.randperm(800, generator=torch.Generator().manual_seed(0))
    shuffled = E.neighbor_overlap(X, X[perm], 10).mean()
    assert shuffled == pytest.approx(10 / 800, abs=0.01)
    # a mild perturbation keeps most neighbours
    assert E.neighbor_overlap(X, X + 1e-3 * torch.randn_like(X), 10).mean() > 0.9


def test_linearity_identities():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3000, 40, generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))[0]
    assert linear_fit(X, X @ Q)[0] == pytest.approx(1, abs=1e-10)
    assert linear_fit(X, 2 * X)[0] == pytest.approx(1, abs=1e-10)
    rnd = linear_fit(X, torch.randn(3000, 40, generator=g, dtype=torch.float64))[0]
    assert rnd == pytest.approx(40 / 3000, abs=0.01)  # independent: only chance fit, ≈ d/N
    small = torch.randn(30, 40, generator=g, dtype=torch.float64)
    assert linear_fit(small, torch.randn(30, 40, generator=g, dtype=torch.float64))[0] == pytest.approx(1, abs=1e-8)


def test_block_shuffle():
    ids = torch.arange(100)
    assert torch.equal(block_shuffle(ids, 0), ids)
    s2 = block_shuffle(ids, 2, seed=1)
    assert sorted(s2.tolist()) == list(range(100)) and not torch.equal(s2, ids)
    assert torch.equal(s2, block_shuffle(ids, 2, seed=1))
    jumps = (s2[1:] - s2[:-1] != 1).sum()
    assert jumps <= 15  # 16 blocks stay contiguous inside


def test_estimator_bad_input():
    with pytest.raises(lb.InputError, match="shape"):
        E.twonn(torch.randn(10))
    with pytest.raises(lb.InputError, match="NaN"):
        E.twonn(torch.tensor([[1.0, float("nan")], [0.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(lb.InputError, match="k=5"):
        E.knn(torch.randn(4, 2), 5)


# --------------------------------------------------------------------------------------------- model level
LONG = " ".join(t[:700] for t in lb.sample_texts(3))


def test_intrinsic_dimension_on_model(tiny):
    m = tiny("llama")
    with pytest.warns(UserWarning, match="T ≳ 500"):
        res = lb.intrinsic_dimension(m, [LONG[:600], LONG[600:1300], LONG[1300:2000]], estimator="twonn")
    assert res.values.shape == (3, m.n_layers + 1) and np.isfinite(res.values).all()
    cap = m.capture(LONG[:600], progress=False)
    assert res.values[0, 1] == pytest.approx(E.twonn(cap.hidden_states(0)[1][1:]), rel=1e-6)  # position 0 out
    pooled = lb.intrinsic_dimension(m, [LONG[:600], LONG[600:1300]], per="pooled")
    assert pooled.values.shape == (1, m.n_layers + 1) and pooled.prompts == ["pooled"]
    assert np.isfinite(res.loss).all() and (res.loss > 0).all()


def test_model_dtype_and_backend_agree(tiny):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = lb.intrinsic_dimension(tiny("llama"), LONG[:1500], estimator="twonn")
        b = lb.intrinsic_dimension(tiny("llama", torch.bfloat16), LONG[:1500], estimator="twonn")
    assert np.allclose(a.values, b.values, rtol=0.15)
    from test_capture import _nnsight_and_bridge
    hf, nn, br = _nnsight_and_bridge()
    ref = lb.neighborhood_overlap(hf, LONG[:800], k=5).values
    for other in (nn, br):
        assert np.allclose(lb.neighborhood_overlap(other, LONG[:800], k=5).values, ref, atol=0.02)


def test_overlap_cosine_anisotropy_on_model(tiny):
    m = tiny("gpt2")
    ov = lb.neighborhood_overlap(m, [LONG[:500], LONG[500:1000]], k=5)
    assert ov.layers == [0, 1] and ((ov.values >= 0) & (ov.values <= 1)).all()
    cos = lb.cosine_similarity(m, LONG[:400])
    cap = m.capture(LONG[:400], progress=False)
    X = torch.nn.functional.normalize(cap.hidden_states(0)[1][1:].double(), dim=1)
    C = X @ X.T
    n = C.shape[0]
    assert cos.values[0, 1] == pytest.approx(float((C.sum() - C.diagonal().sum()) / (n * n - n)), rel=1e-6)
    an = lb.anisotropy(m, LONG[:400])
    assert ((an.values > 0) & (an.values <= 1)).all()


def test_linearity_on_model(tiny):
    m = tiny("llama")
    texts = [t[:1500] for t in lb.sample_texts(4)]
    lin = lb.linearity(m, texts, prompt="The capital of France is Paris.")
    assert len(lin.layers) == m.n_layers and lin.n_points > 4 * lin.d_model
    assert (lin.score > lin.score_no_residual).all()  # the residual makes adjacent layers near-linear
    assert lin.per_token.shape == (m.n_layers, len(lin.tokens))
    with pytest.warns(UserWarning, match="N <= d\\+1"):
        lb.linearity(m, "hello world")


def test_shuffle_and_correlation(tiny, tmp_path):
    m = tiny("llama")
    sh = lb.shuffle_baseline(m, LONG[:1200], levels=(0, 2, 5))
    assert sh.id.shape == (3, m.n_layers + 1) and sh.loss.shape == (3,)
    geo = lb.intrinsic_dimension(m, [t[:800] for t in lb.sample_texts(5)], estimator="twonn")
    corr = lb.geometry_loss_correlation(geo)
    assert corr.pearson_r.shape == (m.n_layers + 1,) and (np.abs(corr.pearson_r) <= 1).all()
    fake = lb.GeometryResult("id", [0], ["a", "b", "c", "d"], np.exp(np.array([[1.0], [2.0], [3.0], [5.0]])),
                             np.zeros((4, 1)), np.array([1.0, 2.0, 3.0, 5.0]), [1] * 4, np.zeros((4, 1)))
    c = lb.geometry_loss_correlation(fake)
    assert c.pearson_r[0] == pytest.approx(1) and c.spearman_r[0] == pytest.approx(1) and c.pearson_p[0] < 1e-3
    for r in (sh, geo, corr, lb.linearity(m, [t[:1500] for t in lb.sample_texts(3)])):
        again = lb.Result.load(r.save(tmp_path / type(r).__name__))
        assert again == r and len(r.to_dataframe()) > 0 and r.figure() is not None


@pytest.mark.parametrize("kw, match", [(dict(estimator="magic"), "estimator"), (dict(scale=1), "scale"),
                                       (dict(per="token"), "per")])
def test_bad_arguments(tiny, kw, match):
    with pytest.raises(lb.InputError, match=match):
        lb.intrinsic_dimension(tiny("llama"), "hello world there", **kw)


def test_one_capture_many_probes(tiny):
    """Geometry from an existing capture equals geometry that runs the model itself."""
    m = tiny("llama")
    texts = [LONG[:600], LONG[600:1200]]
    cap = m.capture(texts, progress=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = lb.intrinsic_dimension(m, texts, estimator="twonn")
        b = lb.intrinsic_dimension(m, cap, estimator="twonn")
    assert np.allclose(a.values, b.values, rtol=1e-6) and np.allclose(a.loss, b.loss, rtol=1e-5)
    ov = lb.neighborhood_overlap(m, cap, k=5)
    assert np.allclose(ov.values, lb.neighborhood_overlap(m, texts, k=5).values)
    lin = lb.linearity(m, cap, prompt=texts[0])
    assert np.allclose(lin.score, lb.linearity(m, texts, prompt=texts[0]).score, atol=1e-8)


# --------------------------------------------------------------------------------------------- contextual memory
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


# --------------------------------------------------------------------------------------------- issue 13, item 6
def test_twonn_without_discarding_is_the_mle_not_infinity():
    """discard_fraction=0: −log(1−F) is ∞ at the largest μ, so the linear fit gave d = ∞; DADApy switches to
    the MLE (N−1)/Σ log μ — checked against brute-force neighbour distances."""
    X = _sphere(N=800, D=12, seed=4)
    r, _ = _brute(X, 2)
    logmu = torch.log(r[:, 1] / r[:, 0])
    ref = (len(logmu) - 1) / float(logmu.sum())
    for method in ("linear", "mle"):
        d = E.twonn(X, discard_fraction=0, method=method)
        assert np.isfinite(d) and d == pytest.approx(ref, rel=1e-9)
    assert ref == pytest.approx(5, rel=0.1)


def _tied_cloud(N=1500, n_tied=40, seed=0):
    """A 5-d Gaussian cloud on a dyadic grid plus, for n_tied of its points c, the four points c ± δe1, c ± δe2
    (exact in float64): those c have r1 = r2 = r3 = r4 = δ, i.e. μ = 1 at every scale up to n2 = 4."""
    g = torch.Generator().manual_seed(seed)
    X = torch.round(torch.randn(N, 5, generator=g, dtype=torch.float64) * 1024) / 1024
    c, d = X[:n_tied], 2.0 ** -12
    e1, e2 = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    e1[0], e2[1] = d, d
    return torch.cat([X, c + e1, c - e1, c + e2, c - e2])


def _dadapy_gride(mus, n1, n2, d0=1e-3, d1=1e3, eps=1e-7):
    """DADApy's _argmax_loglik transcribed: μ = 1 nudged by 10·eps, outliers cut, bisection on the score with
    1 − μ^{−d} floored at 2·eps."""
    mus = mus.copy()
    mus[mus == 1] += 10 * np.finfo(np.float64).eps
    q95, q50 = np.percentile(mus, [95, 50])
    mus = mus[mus < 20 * (q95 - q50) + q50]
    N = len(mus)

    def score(d):
        one = 1.0 - mus ** (-d)
        one[one < 2 * eps] = 2 * eps
        return np.sum(((1 - n2 + n1) / one + n2 - 1.0) * np.log(mus)) - (N - 1) / d
    l1 = score(d1)
    while abs(d0 - d1) > eps:
        d2 = (d0 + d1) / 2.0
        if score(d2) * l1 > 0:
            d1 = d2
        else:
            d0 = d2
    return (d0 + d1) / 2.0


def test_gride_with_tied_distances_as_dadapy():
    """μ = 1 (tied neighbour distances) made the score 0/0: brentq raised on NaN. Now μ = 1 is handled as DADApy
    does, and the estimate equals DADApy's algorithm on brute-force distances."""
    X = _tied_cloud()
    r, _ = _brute(X, 4)
    for n1, n2 in ((1, 2), (2, 4)):
        mus = (r[:, n2 - 1] / r[:, n1 - 1]).numpy()
        assert (mus == 1).sum() >= 40                                  # the ties are there
        d = E.gride(X, n1, n2)
        assert np.isfinite(d) and d == pytest.approx(_dadapy_gride(mus, n1, n2), rel=1e-5)
        assert d == pytest.approx(5, rel=0.15)
    prof = E.gride_profile(X, max_n2=8)
    assert all(np.isfinite(v) for v in prof.values())


def test_heldout_linearity_against_numpy_lstsq():
    """In sample, unrelated clouds score ≈ d/N (0.5 at N = 2d) and 1 at N <= d+1; the held-out score (fit on
    one half, score on the other) is ≈ 0 or below — checked against numpy's lstsq on the same split."""
    from lensbench.probes.geometry import linear_fit_heldout, split_halves
    g = torch.Generator().manual_seed(5)
    d = 40
    for N in (30, 80, 4000):
        X = torch.randn(N, d, generator=g, dtype=torch.float64)
        Y = torch.randn(N, d, generator=g, dtype=torch.float64)
        tr, te = split_halves(N, seed=3)
        x, y = X.numpy(), Y.numpy()
        mx, my = x[tr].mean(0), y[tr].mean(0)
        sx = np.linalg.norm(x[tr] - mx) / np.sqrt(len(tr))
        sy = np.linalg.norm(y[tr] - my) / np.sqrt(len(tr))
        A = np.linalg.lstsq((x[tr] - mx) / sx, (y[tr] - my) / sy, rcond=None)[0]
        yt = (y[te] - my) / sy
        ref = 1 - ((((x[te] - mx) / sx) @ A - yt) ** 2).sum() / (yt ** 2).sum()
        held = linear_fit_heldout(X, Y, seed=3)
        assert held == pytest.approx(ref, rel=1e-8, abs=1e-8)
        assert held < 0.05
    # structured: Y = XQ + small noise stays near 1 held out
    X = torch.randn(3000, d, generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    assert linear_fit_heldout(X, X @ Q + 0.01 * torch.randn(3000, d, generator=g, dtype=torch.float64)) > 0.99


def test_first_position_excluded_whatever_the_tokenizer(tiny):
    """The tiny tokenizer adds no BOS (like SmolLM2): position 0 must still leave every cloud by default;
    exclude_first="bos" and the deprecated exclude_bos=True keep it (no literal BOS)."""
    import warnings
    m = tiny("llama")
    text = LONG[:600]
    cap = m.capture(text, progress=False)
    assert int(cap.input_ids(0)[0]) != m.tokenizer.bos_token_id
    h = cap.hidden_states(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = lb.intrinsic_dimension(m, text, estimator="twonn", layers=[1])
        old = lb.intrinsic_dimension(m, text, estimator="twonn", layers=[1], exclude_first="bos")
        alias = lb.intrinsic_dimension(m, text, estimator="twonn", layers=[1], exclude_bos=True)
        an = lb.anisotropy(m, text, layers=[1])
    assert new.values[0, 0] == pytest.approx(E.twonn(h[1][1:]), rel=1e-9)
    assert new.n_tokens == [h.shape[1] - 1] and new.settings["exclude_first"] is True
    assert old.values[0, 0] == pytest.approx(E.twonn(h[1]), rel=1e-9) and alias == old
    from lensbench.probes.geometry import anisotropy_of
    assert an.values[0, 0] == pytest.approx(anisotropy_of(h[1][1:]), rel=1e-9)
    assert "first token excluded" in new.figure().layout.title.text


def test_post_norm_last_layer_is_hf_hidden_states(tiny):
    """last_layer="post_norm" (default): the cloud of layer L is HF hidden_states[-1] (after the final norm),
    from the raw HF model; "pre_norm" is the last block's output before it."""
    import warnings
    m = tiny("llama")
    text = LONG[:600]
    ids = m.encode(text)[None]
    with torch.no_grad():
        hs = m.model(ids, output_hidden_states=True).hidden_states
    L = m.n_layers
    post, pre = hs[-1][0, 1:].double(), m.capture(text, progress=False).hidden_states(0)[L][1:].double()
    assert not torch.allclose(post, pre, atol=1e-3)              # the final norm matters
    from lensbench.probes.geometry import anisotropy_of, cosine_stats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        an = lb.anisotropy(m, text, layers=[L])
        an_pre = lb.anisotropy(m, text, layers=[L], last_layer="pre_norm")
        cos = lb.cosine_similarity(m, text, layers=[L])
        tw = lb.intrinsic_dimension(m, text, estimator="twonn", layers=[L])
    assert an.values[0, 0] == pytest.approx(anisotropy_of(post), rel=1e-5)
    assert an_pre.values[0, 0] == pytest.approx(anisotropy_of(pre), rel=1e-5)
    assert cos.values[0, 0] == pytest.approx(cosine_stats(post)[0], rel=1e-5)
    assert tw.values[0, 0] == pytest.approx(E.twonn(post), rel=1e-4)
    assert an.settings["last_layer"] == "post_norm" and "after the final norm" in an.figure().layout.title.text
    lin = lb.linearity(m, [t[:1500] for t in lb.sample_texts(4)], layers=[L - 1, L])
    assert lin.settings["last_layer"] == "post_norm" and lin.layers == [L - 1]


def test_linearity_reports_heldout_and_warns_below_10d(tiny):
    m = tiny("llama")
    texts = [t[:200] for t in lb.sample_texts(2)]               # N between d+1 and 10·d pooled tokens
    with pytest.warns(UserWarning, match="N < 10·d"):
        lin = lb.linearity(m, texts)
    assert lin.d_model + 1 < lin.n_points < 10 * lin.d_model
    assert lin.score_heldout.shape == lin.score.shape and np.isfinite(lin.score_heldout).all()
    assert (lin.score_heldout < lin.score).all()                # in sample is optimistic
    df = lin.to_dataframe()
    assert {"linearity_heldout", "linearity_no_residual_heldout", "n_points"} <= set(df.columns)


# --------------------------------------------------------------------------------------------- issue 13, item 7
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

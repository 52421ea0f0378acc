"""Estimators: intrinsic dimension on manifolds of known dimension, agreement with scikit-dimension and DADApy,
exact neighbours, duplicates, neighbourhood overlap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lensbench as lb
from lensbench import estimators as E


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


def test_estimator_bad_input():
    with pytest.raises(lb.InputError, match="shape"):
        E.twonn(torch.randn(10))
    with pytest.raises(lb.InputError, match="NaN"):
        E.twonn(torch.tensor([[1.0, float("nan")], [0.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(lb.InputError, match="k=5"):
        E.knn(torch.randn(4, 2), 5)


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


X20 = torch.randn(200, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
BAD_ESTIMATOR_OPTIONS = [
    ("knn", lambda **k: E.knn(X20, **{"k": 3, **k}), [("k", 0), ("k", 2.0), ("chunk", 0)]),
    ("neighbors", lambda **k: E.neighbors(X20, **{"k": 3, **k}), [("k", -1), ("remove_duplicates", "no")]),
    ("twonn", lambda **k: E.twonn(X20, **k), [("discard_fraction", 1.0), ("discard_fraction", -0.1),
                                              ("method", "magic"), ("return_info", 1)]),
    ("gride", lambda **k: E.gride(X20, **k), [("n1", 0), ("n2", 1), ("return_info", "yes")]),
    ("gride_profile", lambda **k: E.gride_profile(X20, **k), [("max_n2", 1)]),
    ("mle", lambda **k: E.mle(X20, **k), [("k", 2), ("k", None)]),
    ("pca_dim", lambda **k: E.pca_dim(X20, **k), [("var", 0.0), ("var", 1.5)]),
    ("neighbor_overlap", lambda **k: E.neighbor_overlap(X20, X20, **k), [("k", 0)]),
]


@pytest.mark.parametrize("name, call, param, value",
                         [(n, c, p, v) for n, c, bad in BAD_ESTIMATOR_OPTIONS for p, v in bad],
                         ids=lambda x: x if isinstance(x, str) else None)
def test_estimator_options_refused_by_name(name, call, param, value):
    with pytest.raises(lb.InputError) as e:
        call(**{param: value})
    assert str(e.value).startswith(f"{name}: {param}={value!r} is not allowed; {param} must be "), str(e.value)


def test_rules_that_need_the_points_stay_with_the_points():
    """n1 < n2 and k < N are checked where the points are, with the same messages as before."""
    with pytest.raises(lb.InputError, match="need 1 <= n1 < n2, got n1=4, n2=4"):
        E.gride(X20, 4, 4)
    with pytest.raises(lb.InputError, match="k=200 neighbours need at least k\\+1 points; got N=200"):
        E.knn(X20, 200)
    assert E.knn(X20, np.int64(3))[1].shape == (200, 3)            # a numpy int is an int
    assert E.pca_dim(X20, 1) == 6 and E.twonn(X20, discard_fraction=0) > 0

"""Intrinsic-dimension estimators and neighbour statistics on point clouds (torch; CPU or GPU).

Every function takes ``X``: an ``[N, D]`` torch tensor or numpy array (or, for the estimators, a precomputed
:class:`Neighbors`, so one neighbour search serves TwoNN, every GRIDE scale and MLE). Neighbours are exact:
a float32 Gram matmul of the centred points proposes ``k + margin`` candidates per point (``topk``), their
distances are recomputed exactly in float64 by differences and re-sorted (ties broken by the lower index),
and a rigorous float32 rounding bound certifies, row by row, that no true neighbour was missed — the rare
rows it cannot certify are recomputed against every point in float64. Chunked over query rows (memory
O(chunk · N)), no Python loop over points, so 50k points fit on a 24 GB machine.

>>> from lensbench import estimators as E
>>> X = torch.randn(2000, 5) @ torch.randn(5, 100)       # a 5-dim plane in R^100
>>> E.twonn(X), E.gride(X), E.mle(X), E.pca_dim(X, 0.99)   # all ≈ 5
>>> nb = E.neighbors(X, 8); E.twonn(nb), E.gride_profile(nb)   # one neighbour search, many estimates
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .validation import Interval, Options, validate_params

__all__ = ["knn", "neighbors", "Neighbors", "dedup", "twonn", "gride", "gride_profile", "mle", "pca_dim",
           "neighbor_overlap", "DedupInfo"]

_U32 = 2.0 ** -24  # unit roundoff of float32
_RERANK_ROWS = 32  # query rows per exact re-ranking block (≈ 32 × k × D × 8 bytes, cache-sized)

# constraints of the estimators' options (see :mod:`lensbench.validation`); rules that need the points
# (k < N, n2 <= the neighbours held) are checked where the points are
_K = [Interval(int, 1, None)]
_KNN_PARAMS = {"k": _K, "chunk": [None, Interval(int, 1, None)]}
_NEIGHBORS_PARAMS = {"k": _K, "remove_duplicates": [bool]}
_TWONN_PARAMS = {"discard_fraction": [Interval(float, 0, 1, closed="left")], "method": [Options(("linear", "mle"))],
                 "return_info": [bool]}
_GRIDE_PARAMS = {"n1": [Interval(int, 1, None)], "n2": [None, Interval(int, 2, None)], "return_info": [bool]}
_GRIDE_PROFILE_PARAMS = {"max_n2": [None, Interval(int, 2, None)]}
_MLE_PARAMS = {"k": [Interval(int, 3, None)]}
_PCA_DIM_PARAMS = {"var": [Interval(float, 0, 1, closed="right")]}
_NEIGHBOR_OVERLAP_PARAMS = {"k": _K}


def as_points(X, *, dtype: torch.dtype | None = None, param: str = "X", check: bool = True) -> torch.Tensor:
    """Validate and convert ``X`` to a 2-D floating tensor (float64 where the device supports it)."""
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(X)
    if not isinstance(X, torch.Tensor):
        raise InputError(f"{param} must be a torch tensor or numpy array of shape [N, D].")
    if X.dim() != 2:
        raise InputError(f"{param} must have shape [N, D], got {tuple(X.shape)}.")
    if dtype is None:
        dtype = torch.float32 if X.device.type == "mps" else torch.float64
    X = X.to(dtype)
    if check and not bool(torch.isfinite(X.sum(1)).all()):  # a row sum is finite iff the row is (barring overflow)
        if not bool(torch.isfinite(X).all()):
            raise InputError(f"{param} contains NaN or inf (a bfloat16 overflow?); load the model in float32.")
    return X


@dataclass
class DedupInfo:
    n_in: int
    n_out: int

    @property
    def removed(self) -> int:
        return self.n_in - self.n_out


def _dup_mask(X: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool, True for rows that exactly repeat an earlier row. A random projection (the same
    elementwise reduction for every row, so equal rows hash equally) proposes collisions; only colliding
    rows are compared exactly."""
    N = X.shape[0]
    dup = torch.zeros(N, dtype=torch.bool, device=X.device)
    if N < 2:
        return dup
    r = torch.randn(X.shape[1], generator=torch.Generator().manual_seed(12345), dtype=torch.float64).to(X)
    h = (X * r).sum(1)
    hs, order = torch.sort(h, stable=True)            # equal hashes: ascending original index
    brk = hs[1:] != hs[:-1]
    if bool(brk.all()):
        return dup
    gid = torch.cat([torch.zeros(1, dtype=torch.long, device=X.device), torch.cumsum(brk.long(), 0)])
    first = torch.zeros(int(gid[-1]) + 1, dtype=torch.long, device=X.device)
    first.scatter_reduce_(0, gid, torch.arange(N, device=X.device), reduce="amin", include_self=False)
    lead = order[first[gid]]                          # each sorted row's group leader (earliest index)
    multi = lead != order
    rows, leads = order[multi], lead[multi]
    eq = (X[rows] == X[leads]).all(1)
    dup[rows[eq]] = True
    for g in torch.unique(gid[multi][~eq]).tolist():  # a hash collision of distinct rows: compare pairwise
        idx = order[gid == g]
        Z = X[idx]
        same = (Z[:, None, :] == Z[None, :, :]).all(-1)
        dup[idx] = torch.tril(same, diagonal=-1).any(1)
    return dup


def dedup(X) -> tuple[torch.Tensor, DedupInfo]:
    """Drop exact duplicate rows (they make neighbour distances zero), keeping first occurrences in order.
    Returns (unique points, counts). Cost O(N·D) plus a sort of N hashes."""
    X = as_points(X)
    dup = _dup_mask(X)
    U = X[~dup] if bool(dup.any()) else X
    return U, DedupInfo(X.shape[0], U.shape[0])


def _chunk_rows(N: int, width: int, budget_bytes: int = 256 * 2**20, itemsize: int = 8) -> int:
    return max(1, min(N, budget_bytes // (itemsize * max(width, 1))))


def _exact_rows(X: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float64 distances of ``rows`` to every point by differences, self excluded; the k
    smallest, ties to the lower index. Chunked; used for rows the float32 screen cannot certify."""
    N, D = X.shape
    outd, outi = [], []
    step = _chunk_rows(len(rows), N * D)
    for s in range(0, len(rows), step):
        r = rows[s:s + step]
        d2 = torch.linalg.vector_norm(X[None, :, :] - X[r, None, :], dim=-1)
        d2[torch.arange(len(r), device=X.device), r] = float("inf")
        v, o = torch.sort(d2, dim=1, stable=True)
        outd.append(v[:, :k])
        outi.append(o[:, :k])
    return torch.cat(outd), torch.cat(outi)


def _knn_dist(X: torch.Tensor, k: int, chunk: int | None = None, margin: int | None = None):
    """Exact k-NN distances (float64, by differences) and indices of already-validated points ``X``."""
    N, D = X.shape
    margin = 2 + k // 4 if margin is None else margin
    kc = min(N - 1, k + margin)
    Xc = X - X.mean(0)                                            # centring shrinks the float32 error
    Xf = Xc.float()
    # Rounding bound (Higham: a float32 dot product of length D errs by <= γ_D Σ|a||b|; plus the casts):
    # |fl(d²_ij) − d²_ij| <= c (|x_i|² + |x_j|²) with c = 2(D+5)u (10% safety added). The screen ranks the
    # lower bounds LB_ij = (1 − c)(|x_i|² + |x_j|²) − 2 x_i·x_j <= d²_ij; within a row the |x_i|² term is a
    # constant, so one addmm per chunk ranks them and |x_i|² is added to the kc survivors only.
    c = 2.2 * (D + 5) * _U32
    sqc = (torch.linalg.vector_norm(Xc, dim=1) ** 2 * (1 - c)).float()
    chunk = chunk or _chunk_rows(N, N, itemsize=4)
    D2 = torch.empty(N, k, dtype=X.dtype, device=X.device)
    I = torch.empty(N, k, dtype=torch.long, device=X.device)  # noqa: E741
    bad = []
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        d2 = torch.addmm(sqc[None, :], Xf[s:e], Xf.T, alpha=-2)
        ar = torch.arange(e - s, device=X.device)
        d2[ar, ar + s] = float("inf")
        v, i = torch.topk(d2, kc, dim=1, largest=False, sorted=False)
        del d2
        i = torch.sort(i, dim=1).values                            # candidates by index: ties → lower index
        ex = torch.empty(e - s, kc, dtype=X.dtype, device=X.device)
        for b in range(0, e - s, _RERANK_ROWS):                    # exact distances by differences, in blocks
            b2 = min(e - s, b + _RERANK_ROWS)                      # that stay in cache
            diff = X[i[b:b2]]
            diff -= X[s + b:s + b2, None, :]
            ex[b:b2] = torch.linalg.vector_norm(diff, dim=-1)
        ex, o2 = torch.sort(ex, dim=1, stable=True)
        if kc < N - 1:
            lb = v.max(1).values.double() + sqc[s:e].double()      # every non-candidate's lower bound is larger
            ok = ex[:, k - 1].square() * (1 + 1e-12) < lb
            if not bool(ok.all()):
                bad.append(torch.nonzero(~ok).flatten() + s)
        D2[s:e], I[s:e] = ex[:, :k], i.gather(1, o2[:, :k])
    if bad:
        rows = torch.cat(bad)
        D2[rows], I[rows] = _exact_rows(X, rows, k)
    return D2, I


@validate_params(_KNN_PARAMS)
def knn(X, k: int, *, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact distances and indices of each point's ``k`` nearest neighbours (self excluded), ascending,
    ties broken by the lower index. Returns ``([N, k] float64 distances, [N, k] long indices)``."""
    X = as_points(X)
    N = X.shape[0]
    if k >= N:
        raise InputError(f"k={k} neighbours need at least k+1 points; got N={N}.")
    return _knn_dist(X, k, chunk)


@dataclass
class Neighbors:
    """A precomputed exact neighbour search on de-duplicated points: pass it to :func:`twonn`,
    :func:`gride`, :func:`gride_profile` or :func:`mle` in place of ``X`` to share one search."""

    dist: torch.Tensor      # [N, k] float64, ascending
    index: torch.Tensor     # [N, k] long, into the de-duplicated points
    info: DedupInfo

    @property
    def k(self) -> int:
        return self.dist.shape[1]


@validate_params(_NEIGHBORS_PARAMS)
def neighbors(X, k: int, *, remove_duplicates: bool = True) -> Neighbors:
    """The ``k`` exact nearest neighbours of every point after dropping exact duplicates."""
    if remove_duplicates:
        X, info = dedup(X)
    else:
        X = as_points(X)
        info = DedupInfo(X.shape[0], X.shape[0])
    N = X.shape[0]
    if k >= N:
        raise InputError(f"k={k} neighbours need at least k+1 distinct points; got N={N}.")
    dist, i = _knn_dist(X, k)
    return Neighbors(dist, i, info)


def _nb(X, k: int, what: str) -> Neighbors:
    if isinstance(X, Neighbors):
        if X.k < k:
            raise InputError(f"{what} needs {k} neighbours; the Neighbors passed hold only {X.k}: "
                             f"compute them with E.neighbors(X, k={k}).")
        return X
    return neighbors(X, k)


def _ratios(X, n1: int, n2: int) -> tuple[torch.Tensor, DedupInfo]:
    nb = _nb(X, n2, f"n2={n2}")
    mu = nb.dist[:, n2 - 1] / nb.dist[:, n1 - 1]
    mu = mu[torch.isfinite(mu) & (nb.dist[:, n1 - 1] > 0)]
    return mu, nb.info


@validate_params(_TWONN_PARAMS)
def twonn(X, *, discard_fraction: float = 0.1, method: str = "linear", return_info: bool = False):
    """TwoNN (Facco et al. 2017): the ratio μ = r2/r1 of each point's two nearest-neighbour distances.

    ``method="linear"``: least-squares fit through the origin of −log(1−F(μ)) = d·log μ after discarding the
    largest ``discard_fraction`` of μ (as scikit-dimension). ``method="mle"``: the censored maximum-likelihood
    form, (k−1)/(Σ_{i≤k} log μ_(i) + (N−k)·log μ_(k)) ((N−1)/Σ log μ with ``discard_fraction=0``).
    With ``discard_fraction=0`` the linear fit is undefined (the largest μ has F = 1, so −log(1−F) = ∞ and
    d = ∞); as DADApy does (``fraction=1`` switches its "base" fit to "ml"), the MLE (N−1)/Σ log μ is
    returned instead. Tied distances (μ = 1, log μ = 0) are kept, as in DADApy and scikit-dimension.
    ``X`` may be a :class:`Neighbors` with k ≥ 2.
    """
    mu, info = _ratios(X, 1, 2)
    N = mu.numel()
    k = int(N * (1 - discard_fraction))
    if k < 2:
        raise InputError("fewer than 2 distinct points left; TwoNN needs more points.")
    if k == N and method == "linear":  # F(μ_max) = 1: the linear fit would give d = ∞ (DADApy: use the MLE)
        method = "mle"
    logmu = torch.sort(mu).values[:k].log()
    if method == "mle":
        d = (k - 1) / (logmu.sum() + (N - k) * logmu[-1])
    else:
        F = torch.arange(1, k + 1, dtype=logmu.dtype, device=logmu.device) / N
        y = -torch.log1p(-F)
        d = (logmu * y).sum() / (logmu * logmu).sum()
    d = float(d)
    return (d, info) if return_info else d


_GRIDE_EPS = 1e-7  # DADApy's precision ``eps``: 1 − μ^{−d} is floored at 2·eps in the likelihood's score


def _gride_mle(mu, n1: int, n2: int) -> float:
    """Maximise the GRIDE log-likelihood in d on [0.001, 1000]: the root of its derivative, which is
    strictly decreasing in d, by Brent's method (float64, on the CPU: N numbers).

    Tied distances (μ = 1) make the score's term log μ / (1 − μ^{−d}) 0/0 (NaN). As DADApy's
    ``_argmax_loglik``: μ = 1 is nudged to 1 + 10·eps(float64) and 1 − μ^{−d} is floored at 2·1e-7, so a
    tied point adds ≈ 0 to both sums and 1 to N."""
    from scipy.optimize import brentq
    mu = mu.double().cpu().numpy() if isinstance(mu, torch.Tensor) else np.asarray(mu, np.float64)
    mu = np.where(mu == 1, 1 + 10 * np.finfo(np.float64).eps, mu)
    logmu = np.log(mu)
    N = logmu.size
    a = n2 - n1 - 1
    s = logmu.sum()

    def dlogL(d: float) -> float:
        # d/dd of (N-1) log d + a Σ log(μ^d - 1) - ((n2-1) d + 1) Σ log μ   (N-1 as in DADApy's form)
        if a > 0:  # μ^d log μ / (μ^d − 1) = log μ / (1 − μ^{−d}), the denominator floored as DADApy does
            term = a * (logmu / np.maximum(-np.expm1(-d * logmu), 2 * _GRIDE_EPS)).sum()
        else:
            term = 0.0
        return (N - 1) / d + term - (n2 - 1) * s

    lo, hi = 1e-3, 1e3
    if dlogL(hi) > 0:
        return hi
    if dlogL(lo) < 0:
        return lo
    return float(brentq(dlogL, lo, hi, xtol=1e-13, rtol=4 * np.finfo(float).eps, maxiter=500))


def _filter_outliers(mu: torch.Tensor) -> torch.Tensor:
    """Drop μ >= q50 + 20·(q95 − q50) (DADApy's and scikit-dimension's strict ``mu < mu_max``)."""
    q50, q95 = torch.quantile(mu, torch.tensor([0.5, 0.95], dtype=mu.dtype, device=mu.device))
    return mu[mu < q50 + 20 * (q95 - q50)]


@validate_params(_GRIDE_PARAMS)
def gride(X, n1: int = 2, n2: int | None = None, *, return_info: bool = False):
    """GRIDE (Denti et al. 2022): ID from μ = r_{n2}/r_{n1}; ``n2`` defaults to 2·n1 ("scale" = n2).

    Outlying ratios μ >= q50 + 20·(q95 − q50) are dropped before the fit, and tied distances (μ = 1) are
    regularised, as DADApy does (see :func:`_gride_mle`). ``X`` may be a :class:`Neighbors` with k ≥ n2.
    """
    n2 = 2 * n1 if n2 is None else n2
    if not 1 <= n1 < n2:
        raise InputError(f"need 1 <= n1 < n2, got n1={n1}, n2={n2}.")
    mu, info = _ratios(X, n1, n2)
    mu = _filter_outliers(mu)
    if mu.numel() < 2:
        raise InputError("fewer than 2 distinct points left; GRIDE needs more points.")
    d = _gride_mle(mu, n1, n2)
    return (d, info) if return_info else d


@validate_params(_GRIDE_PROFILE_PARAMS)
def gride_profile(X, max_n2: int | None = None) -> dict[int, float]:
    """Multiscale GRIDE: ``{n2: d}`` for n2 = 2, 4, 8, … (n1 = n2/2) up to ``max_n2`` (default N/4; the
    largest scale a :class:`Neighbors` holds when one is passed). One neighbour search serves every scale."""
    if isinstance(X, Neighbors):
        N, cap = X.dist.shape[0], X.k
    else:
        X, _ = dedup(X)
        N = X.shape[0]
        cap = N - 1
    max_n2 = min(max_n2 or max(2, N // 4), cap)
    scales = [2 ** j for j in range(1, 32) if 2 ** j <= min(max_n2, N - 1)]
    if not scales:
        raise InputError("too few points for a GRIDE profile.")
    nb = X if isinstance(X, Neighbors) else neighbors(X, scales[-1], remove_duplicates=False)
    out = {}
    for n2 in scales:
        mu, _ = _ratios(nb, n2 // 2, n2)
        out[n2] = _gride_mle(_filter_outliers(mu), n2 // 2, n2)
    return out


@validate_params(_MLE_PARAMS)
def mle(X, k: int = 20) -> float:
    """Levina–Bickel maximum-likelihood ID with ``k`` neighbours; the inverse estimates are averaged over
    points (MacKay & Ghahramani's correction). ``X`` may be a :class:`Neighbors` with at least k."""
    dist = _nb(X, k, f"mle with k={k}").dist[:, :k]
    logs = torch.log(dist[:, -1:] / dist[:, :-1])          # log(T_k / T_j), j < k
    inv = logs.sum(1) / (k - 1)                            # E[inv] = 1/d: averaging inverses is unbiased
    return float(1.0 / inv.mean())


@validate_params(_PCA_DIM_PARAMS)
def pca_dim(X, var: float = 0.9) -> int:
    """Number of principal components needed to explain a fraction ``var`` of the variance."""
    X = as_points(X)
    if X.shape[0] < 2:
        raise InputError(f"PCA needs at least 2 points, got N={X.shape[0]}.")
    Xc = X - X.mean(0)
    s = torch.linalg.svdvals(Xc) ** 2
    if float(s.sum()) == 0:
        return 0  # identical points span no direction
    frac = torch.cumsum(s, 0) / s.sum()
    return int((frac < var - 1e-12).sum().item() + 1)


def overlap_counts(IX: torch.Tensor, IY: torch.Tensor) -> torch.Tensor:
    """``[N]`` long: |row i of IX ∩ row i of IY| for two ``[N, k]`` neighbour-index tables (sorted search)."""
    k = IY.shape[1]
    IY_sorted = torch.sort(IY, dim=1).values
    pos = torch.searchsorted(IY_sorted, IX).clamp_max(k - 1)
    return (IY_sorted.gather(1, pos) == IX).sum(1)


@validate_params(_NEIGHBOR_OVERLAP_PARAMS)
def neighbor_overlap(X, Y, k: int = 10) -> torch.Tensor:
    """Per-point overlap |N_k^X(i) ∩ N_k^Y(i)| / k of the k-neighbourhoods of the same points in two spaces.

    Returns ``[N]`` float64; the mean is χ_k. Self is excluded from both neighbourhoods; neighbours are exact
    (float64 distances; ties to the lower index); duplicates are kept (the same points in both spaces).
    """
    X = as_points(X, param="X")
    Y = as_points(Y, param="Y")
    if X.shape[0] != Y.shape[0]:
        raise InputError("X and Y must have the same number of rows (the same points in two spaces).")
    _, IX = knn(X, k)
    _, IY = knn(Y, k)
    return overlap_counts(IX, IY).double() / k


def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)

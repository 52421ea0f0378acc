"""Shared statistics: intervals that cover, stated with their n and how they were made.

Every probe that reports an interval uses these (one implementation, one vocabulary):

* :func:`mean_ci` — the mean of per-token (or per-item) values with a confidence interval that resamples
  **clusters** (texts, items), not the overlapping tokens inside them. Tokens of one text share a context, so a
  token-level bootstrap treats correlated values as independent and its interval is too narrow.
  With fewer than 20 clusters it uses a Student-t interval on the cluster-robust standard error of the ratio
  mean (percentile bootstraps under-cover at small n); from 20 clusters on, a BCa cluster bootstrap.
* :func:`wilson_interval` — the Wilson score interval of a binomial proportion (arrays).
* :func:`wilson_upper` — its one-sided upper bound, for decision rules with a stated false-positive rate.
* :func:`pass_at_k` — the unbiased pass@k estimate from n samples with c successes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .errors import InputError

__all__ = ["Interval", "mean_ci", "wilson_interval", "wilson_upper", "pass_at_k", "SMALL_N"]

#: below this many clusters :func:`mean_ci` uses a t interval instead of a bootstrap.
SMALL_N = 20


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with its interval.

    Attributes:
        estimate: the pooled mean (sum of values / number of values).
        lo, hi: the interval's ends (NaN when it cannot be made: fewer than 2 clusters).
        n: number of finite values. n_clusters: number of clusters (texts/items) they came from.
        method: ``"t"`` (cluster-robust Student-t), ``"bca"`` (BCa cluster bootstrap), ``"percentile"``
            (percentile cluster bootstrap) or ``"none"``.
        level: the confidence level.
    """

    estimate: float
    lo: float
    hi: float
    n: int
    n_clusters: int
    method: str
    level: float

    def as_tuple(self) -> tuple[float, float]:
        return (self.lo, self.hi)

    def describe(self) -> str:
        """One phrase for tables: ``"95% t interval over 8 texts (n=412 tokens)"``."""
        return f"{round(self.level * 100)}% {self.method} interval over {self.n_clusters} clusters (n={self.n})"


def _ratio_means(sums: np.ndarray, counts: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return sums[idx].sum(-1) / counts[idx].sum(-1)


def mean_ci(values, clusters=None, *, level: float = 0.95, method: str = "auto", n_boot: int = 2000,
            seed: int = 0) -> Interval:
    """Mean of ``values`` with a confidence interval that resamples ``clusters``.

    Args:
        values: ``[n]`` numbers (non-finite ones are dropped).
        clusters: ``[n]`` cluster labels (e.g. the text index of each token); ``None``: each value is its
            own cluster (independent items).
        level: confidence level.
        method: ``"auto"`` (``"t"`` below :data:`SMALL_N` clusters, else ``"bca"``), ``"t"``, ``"bca"`` or
            ``"percentile"``.
        n_boot: bootstrap resamples (bootstrap methods). seed: their seed.

    Returns:
        :class:`Interval`; the estimate is the pooled mean, whatever the method.
    """
    v = np.asarray(values, dtype=float).ravel()
    g = np.arange(len(v)) if clusters is None else np.asarray(clusters).ravel()
    if len(g) != len(v):
        raise ValueError(f"mean_ci: {len(v)} values but {len(g)} cluster labels.")
    ok = np.isfinite(v)
    v, g = v[ok], g[ok]
    if method not in ("auto", "t", "bca", "percentile"):
        raise ValueError(f"mean_ci: method={method!r}; use 'auto', 't', 'bca' or 'percentile'.")
    if len(v) == 0:
        return Interval(math.nan, math.nan, math.nan, 0, 0, "none", level)
    _, inv = np.unique(g, return_inverse=True)
    k = int(inv.max()) + 1
    sums = np.bincount(inv, weights=v, minlength=k)
    counts = np.bincount(inv, minlength=k).astype(float)
    est = float(sums.sum() / counts.sum())
    if k < 2:
        return Interval(est, math.nan, math.nan, len(v), k, "none", level)
    if method == "auto":
        method = "t" if k < SMALL_N else "bca"
    a = (1 - level) / 2
    if method == "t":
        from scipy import stats as _st
        # cluster-robust (linearised) variance of the ratio mean sum(S_c) / sum(N_c)
        resid = sums - est * counts
        se = math.sqrt(k / (k - 1) * float((resid ** 2).sum())) / counts.sum()
        q = float(_st.t.ppf(1 - a, k - 1))
        return Interval(est, est - q * se, est + q * se, len(v), k, "t", level)
    rng = np.random.default_rng(seed)
    boot = _ratio_means(sums, counts, rng.integers(0, k, size=(n_boot, k)))
    if method == "percentile":
        lo, hi = np.quantile(boot, [a, 1 - a])
        return Interval(est, float(lo), float(hi), len(v), k, "percentile", level)
    # BCa: bias correction from the bootstrap, acceleration from the cluster jackknife
    from scipy import stats as _st
    frac = (np.sum(boot < est) + 0.5 * np.sum(boot == est)) / n_boot
    if frac <= 0 or frac >= 1:  # degenerate (e.g. all clusters equal): no spread to correct
        return Interval(est, float(boot.min()), float(boot.max()), len(v), k, "bca", level)
    z0 = _st.norm.ppf(frac)
    jack = (sums.sum() - sums) / (counts.sum() - counts)
    d = jack.mean() - jack
    den = 6.0 * float((d ** 2).sum()) ** 1.5
    acc = float((d ** 3).sum()) / den if den > 0 else 0.0
    z = _st.norm.ppf([a, 1 - a])
    p = _st.norm.cdf(z0 + (z0 + z) / (1 - acc * (z0 + z)))
    lo, hi = np.quantile(boot, np.clip(p, 0, 1))
    return Interval(est, float(lo), float(hi), len(v), k, "bca", level)


def wilson_interval(successes, n, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (lo, hi) for ``successes`` out of ``n`` (arrays; NaN where n == 0 or NaN)."""
    c = np.atleast_1d(np.asarray(successes, dtype=float))
    n = np.atleast_1d(np.asarray(n, dtype=float))
    with np.errstate(invalid="ignore", divide="ignore"):
        p = c / n
        den = 1 + z * z / n
        mid = (p + z * z / (2 * n)) / den
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
        lo, hi = np.clip(mid - half, 0, 1), np.clip(mid + half, 0, 1)
    bad = ~(n > 0)
    lo[bad] = np.nan
    hi[bad] = np.nan
    return lo, hi


def wilson_upper(successes, n, alpha: float = 0.05) -> np.ndarray:
    """One-sided ``1 − alpha`` Wilson upper bound on a binomial proportion (arrays)."""
    from scipy import stats as _st
    return wilson_interval(successes, n, z=float(_st.norm.ppf(1 - alpha)))[1]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 − C(n−c, k) / C(n, k) (Chen et al. 2021), computed as a stable product."""
    if not (isinstance(n, (int, np.integer)) and isinstance(c, (int, np.integer)) and isinstance(k, (int, np.integer))):
        raise InputError("pass_at_k needs integer n, c, k.")
    if not 0 <= c <= n or not 1 <= k <= n:
        raise InputError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pearson_interval(r: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Fisher-z interval for a Pearson correlation ``r`` of ``n`` pairs: ``tanh(atanh(r) ± z/√(n−3))``.

    NaN bounds when ``n < 4`` or ``r`` is not finite."""
    import math
    from statistics import NormalDist
    if n < 4 or not math.isfinite(r):
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + level / 2)
    c, se = math.atanh(max(min(r, 0.999999), -0.999999)), 1 / math.sqrt(n - 3)
    return math.tanh(c - z * se), math.tanh(c + z * se)

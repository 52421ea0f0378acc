"""lensbench.stats: intervals that cover, checked by simulation against the truth they estimate."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as st

from lensbench.stats import SMALL_N, mean_ci, wilson_interval, wilson_upper


def _clustered(rng, k, per, icc_sd=1.0):
    """k texts x per tokens; tokens of one text share an offset (true mean 0)."""
    off = rng.normal(0, icc_sd, k)
    vals = (off[:, None] + rng.normal(0, 1, (k, per))).ravel()
    return vals, np.repeat(np.arange(k), per)


@pytest.mark.parametrize("k", [6, 12, 40])
def test_cluster_interval_covers_where_token_bootstrap_does_not(k):
    rng = np.random.default_rng(0)
    reps = 300 if k < SMALL_N else 150
    cover_cluster = cover_token = 0
    for r in range(reps):
        v, g = _clustered(rng, k, 30)
        iv = mean_ci(v, g, n_boot=400, seed=r)
        cover_cluster += iv.lo <= 0 <= iv.hi
        tok = mean_ci(v, None, method="percentile", n_boot=400, seed=r)   # the old, token-level interval
        cover_token += tok.lo <= 0 <= tok.hi
    # binomial slack: 3 standard errors below the nominal 95%
    slack = 3 * np.sqrt(0.95 * 0.05 / reps)
    assert cover_cluster / reps >= 0.95 - slack - (0.02 if k >= SMALL_N else 0), cover_cluster / reps
    assert cover_token / reps < 0.6  # tokens treated as independent: far too narrow


def test_interval_reports_n_and_method():
    v, g = _clustered(np.random.default_rng(1), 5, 10)
    iv = mean_ci(v, g)
    assert (iv.n, iv.n_clusters, iv.method) == (50, 5, "t")
    assert iv.estimate == pytest.approx(v.mean())
    big = mean_ci(*_clustered(np.random.default_rng(1), 30, 4))
    assert big.method == "bca" and big.n_clusters == 30 and "30 clusters" in big.describe()
    assert np.isnan(mean_ci([1.0, 2.0], [0, 0]).lo)          # one cluster: no interval
    assert mean_ci([], None).n == 0
    assert mean_ci([1.0, np.nan, 3.0]).n == 2                # non-finite values dropped


def test_t_interval_matches_textbook_for_independent_items():
    x = np.random.default_rng(2).normal(size=9)
    iv = mean_ci(x, method="t")
    lo, hi = st.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=x.std(ddof=1) / np.sqrt(len(x)))
    assert (iv.lo, iv.hi) == pytest.approx((lo, hi))


def test_wilson_matches_closed_form_and_upper_bound():
    lo, hi = wilson_interval([0, 5, 10, 3], [10, 10, 10, 0])
    assert lo[0] == 0 and hi[0] == pytest.approx(0.2775, abs=1e-4)
    assert np.isnan(lo[3]) and np.isnan(hi[3])
    # one-sided upper bound at alpha = 0.05 is the two-sided bound at z = 1.645
    assert wilson_upper(0, 64, 0.05)[0] == pytest.approx(wilson_interval(0, 64, z=1.6448536)[1][0])


def test_pearson_interval_matches_scipy():
    import numpy as np
    from scipy import stats as sps

    from lensbench.stats import pearson_interval
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = 0.5 * x + rng.normal(size=30)
    res = sps.pearsonr(x, y)
    ci = res.confidence_interval(0.95)
    lo, hi = pearson_interval(float(res.statistic), 30)
    assert abs(lo - ci.low) < 1e-4 and abs(hi - ci.high) < 1e-4
    assert all(v != v for v in pearson_interval(0.3, 3))  # n < 4: NaN

"""The bad-input matrix: every public probe function x every kind of bad input gives ONE clear
:class:`lensbench.InputError` (or ``LensbenchError`` for numerical failures) naming the parameter and what to do —
never a deep ``IndexError``/``RuntimeError`` from torch or transformers.  Property-based tests (hypothesis) throw
random unicode text and parameter values at the probes; whether an input is valid is decided from the input, and a
valid one must give a sound result while an invalid one must raise our own validation error.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lensbench as lb

TEXT = "The quick brown fox jumps over the lazy dog near the river bank. " * 2
LONG = "word " * 5000  # > the tiny models' 4096-token context


@pytest.fixture(scope="module")
def m(tiny):
    return tiny("llama")


def _texts(x):
    return x if isinstance(x, list) else [x]


# name -> f(m, text, **kw); each probe called the way a user would, with cheap settings
PROBES = {
    "logit_lens": lambda m, x, **k: lb.logit_lens(m, x, progress=False, **k),
    "lens_sweep": lambda m, x, **k: lb.lens_sweep(m, _texts(x), progress=False, **k),
    "intrinsic_dimension": lambda m, x, **k: lb.intrinsic_dimension(m, x, progress=False, **k),
    "neighborhood_overlap": lambda m, x, **k: lb.neighborhood_overlap(m, x, progress=False, **k),
    "cosine_similarity": lambda m, x, **k: lb.cosine_similarity(m, x, progress=False, **k),
    "anisotropy": lambda m, x, **k: lb.anisotropy(m, x, progress=False, **k),
    "linearity": lambda m, x, **k: lb.linearity(m, x, progress=False, **k),
    "shuffle_baseline": lambda m, x, **k: lb.shuffle_baseline(m, x, progress=False, **k),
    "attribute": lambda m, x, **k: lb.attribute(m, x, method="saliency", progress=False, **k),
    "capture": lambda m, x, **k: m.capture(x, progress=False, **k),
}
TEXT_PROBES = sorted(PROBES)
LAYER_PROBES = ["logit_lens", "intrinsic_dimension", "neighborhood_overlap", "cosine_similarity", "anisotropy",
                "linearity", "shuffle_baseline", "capture"]
TARGET_PROBES = ["logit_lens", "attribute"]

# (case id, text, expected message pattern)
TEXT_CASES = [
    ("empty", "", r"empty or whitespace"),
    ("whitespace", " \n\t ", r"empty or whitespace"),
    ("non-string", 123, r"must be a string"),
    ("none", None, r"must be a string"),
    ("list-with-non-string", ["fine text", 4.5], r"must be a string"),
    ("empty-list", [], r"empty list|at least one"),
]


ONE_TEXT_PROBES = ("attribute", "shuffle_baseline")  # take one text, so list cases do not apply


@pytest.mark.parametrize("probe,case,text,pattern", [
    pytest.param(p, *c, id=f"{c[0]}-{p}") for c in TEXT_CASES for p in TEXT_PROBES
    if not (p in ONE_TEXT_PROBES and isinstance(c[1], list))])
def test_bad_text(m, probe, case, text, pattern):
    with pytest.raises(lb.InputError, match=pattern):
        PROBES[probe](m, text)


@pytest.mark.parametrize("probe", sorted(set(TEXT_PROBES) - {"lens_sweep"}))
def test_too_long_text_says_how_to_fix(m, probe):
    """Longer than the context window: the message gives the limit and the fixes (split / truncate=True)."""
    with pytest.raises(lb.InputError, match=r"accepts at most 4096.*truncate=True"):
        PROBES[probe](m, LONG)


def test_sweep_splits_long_texts_into_windows(m):
    """The dataset sweep is the one probe built for long documents: it windows them instead of refusing."""
    res = lb.lens_sweep(m, [LONG], max_tokens_per_text=64, progress=False)
    assert res.n_tokens > 0


@pytest.mark.parametrize("layers", [99, -99, [0, 99], "2", [], 1.5, [True]], ids=str)
@pytest.mark.parametrize("probe", LAYER_PROBES)
def test_bad_layers(m, probe, layers):
    with pytest.raises(lb.InputError, match=r"layers"):
        PROBES[probe](m, TEXT, layers=layers)


@pytest.mark.parametrize("top_k", [0, -3, 10**7, 2.5], ids=str)
def test_bad_top_k(m, top_k):
    with pytest.raises(lb.InputError, match=r"top_k must be an int in \[1, "):
        lb.logit_lens(m, TEXT, top_k=top_k, progress=False)


@pytest.mark.parametrize("target", ["", "xyzzy qwerty zork", -1, 10**9, 3.5, [1]], ids=str)
@pytest.mark.parametrize("probe", TARGET_PROBES)
def test_bad_target(m, probe, target):
    with pytest.raises(lb.InputError, match=r"target"):
        PROBES[probe](m, TEXT, target=target)


def test_single_token_text(m):
    """One token: probes that can answer do; the others say how many tokens they need."""
    one = "a"
    lens = lb.logit_lens(m, one, progress=False)
    assert lens.entropy.shape[1] == len(lens.tokens) >= 1
    assert torch.isfinite(lens.entropy).all() and (lens.entropy >= 0).all()
    assert (lens.entropy <= np.log(m.vocab_size) + 1e-4).all()
    att = lb.attribute(m, one, method="saliency", progress=False)
    assert att.scores.shape[1] == len(att.source_tokens) >= 1
    assert torch.isfinite(att.scores).all() and (att.scores >= 0).all()    # saliency: gradient norms
    assert torch.isfinite(att.f_value).all() and (att.f_value <= 0).all()  # F = log p(target)
    for probe, pattern in (("intrinsic_dimension", r"at least|need"), ("neighborhood_overlap", r"needs? more|at least")):
        with pytest.raises(lb.InputError, match=pattern):
            PROBES[probe](m, one)
    with pytest.raises(lb.InputError, match=r"token"):
        lb.train_tuned_lens(m, [one], n_steps=1, progress=False)


@pytest.mark.parametrize("kw,pattern", [
    ({"method": "magic"}, r"method='magic' is unknown"),
    ({"n_steps": 0}, r"n_steps"),
    ({"generate": -1}, r"generate"),
    ({"method": "reagent", "top_k": 0}, r"top_k"),
    ({"method": "reagent", "ratio": 1.5}, r"ratio"),
    ({"contrast": "xyzzy qwerty"}, r"contrast"),
    ({"baseline": "nonsense", "method": "integrated_gradients"}, r"baseline"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_attribution_options(m, kw, pattern):
    kw = {"method": "saliency", **kw}
    with pytest.raises(lb.InputError, match=pattern):
        lb.attribute(m, TEXT, progress=False, **kw)


@pytest.mark.parametrize("kw,pattern", [
    ({"estimator": "magic"}, r"estimator"),
    ({"per": "sentence"}, r"per"),
    ({"scale": 0}, r"scale"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_geometry_options(m, kw, pattern):
    with pytest.raises(lb.InputError, match=pattern):
        lb.intrinsic_dimension(m, TEXT, **kw)


@pytest.mark.parametrize("k", [0, -1, 10**6])
def test_bad_overlap_k(m, k):
    with pytest.raises(lb.InputError, match=r"k"):
        lb.neighborhood_overlap(m, TEXT, k=k, progress=False)


@pytest.mark.parametrize("X,pattern", [
    (np.zeros((0, 5)), r"at least|points"),
    (np.ones(10), r"2-D|\[N, D\]"),
    (np.full((50, 4), np.nan), r"NaN|non-finite"),
    (np.vstack([np.random.default_rng(0).normal(size=(49, 4)), [[np.inf] * 4]]), r"NaN|non-finite|inf"),
    (np.ones((50, 4)), r"distinct|duplicate"),
], ids=["empty", "1-D", "nan", "inf", "all-duplicates"])
@pytest.mark.parametrize("estimator", ["twonn", "gride", "mle", "pca_dim"])
def test_bad_estimator_arrays(estimator, X, pattern):
    if estimator == "pca_dim" and pattern == r"distinct|duplicate":
        # PCA of identical points is well defined: dimension 0, not an error
        assert lb.estimators.pca_dim(X) == 0
        return
    with pytest.raises(lb.InputError, match=pattern):
        getattr(lb.estimators, estimator)(X)


# ------------------------------------------------------------------------------------ NaN/inf in hidden states
@contextlib.contextmanager
def _poisoned(m, value=float("inf"), block=0):
    """Make block ``block`` output ``value`` everywhere (what a bfloat16 overflow looks like downstream)."""
    mod = m.blocks[block]

    def hook(_mod, _inp, out):
        if isinstance(out, tuple):  # added, not replaced: the autograd graph stays connected
            return (out[0] + value,) + tuple(out[1:])
        return out + value
    h = mod.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("probe", ["logit_lens", "intrinsic_dimension", "linearity", "attribute",
                                   "neighborhood_overlap"])
def test_non_finite_hidden_states(m, probe, value):
    """Overflowed activations are reported as such (with the fix: float32), not as garbage numbers."""
    with _poisoned(m, value), pytest.raises(lb.LensbenchError, match=r"non-finite|NaN|inf"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PROBES[probe](m, TEXT)


# ------------------------------------------------------------------------------------ widgets
@pytest.mark.parametrize("bad", ["", "   ", "word " * 5000])
def test_widgets_show_bad_input_in_the_app(m, bad):
    """A widget never raises into the kernel for bad text: it shows the message in its error area."""
    from lensbench.widgets import AttributionExplorer, GeometryExplorer, LogitLensExplorer
    for cls in (LogitLensExplorer, GeometryExplorer, AttributionExplorer):
        w = cls(m, bad) if cls is not GeometryExplorer else cls(m, [bad])
        assert w.error.value, f"{cls.__name__} showed no message for {bad[:10]!r}"
        assert "⚠" in w.error.value and "Traceback" not in w.error.value


# ------------------------------------------------------------------------------------ property-based
# Each property decides from the input alone whether it is valid; a valid input must give a sound result and an
# invalid one must raise InputError. Nothing is caught: a probe that refused everything would fail.
_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_text(text: str) -> bool:
    return bool(text.strip())


def _expected_layers(layers, L: int) -> list[int] | None:
    """The layers a valid ``layers`` selects (sorted, negatives from the end), or None if it is invalid."""
    if layers is None:
        return list(range(L + 1))
    layers = [layers] if isinstance(layers, int) else layers
    if not layers or not all(-(L + 1) <= la <= L for la in layers):
        return None
    return sorted({la % (L + 1) for la in layers})


@_SETTINGS
@given(text=st.text(min_size=0, max_size=60))
def test_property_any_unicode_text(m, text):
    """Random unicode (incl. control characters, surrogates-free emoji, RTL): a result iff there is text."""
    if not _valid_text(text):
        with pytest.raises(lb.InputError, match=r"empty or whitespace"):
            lb.logit_lens(m, text, top_k=3, progress=False)
    else:
        res = lb.logit_lens(m, text, top_k=3, progress=False)
        T = len(res.tokens)
        assert T >= 1 and res.entropy.shape == (m.n_layers + 1, T) and res.top_ids.shape == (m.n_layers + 1, T, 3)
        assert torch.isfinite(res.entropy).all() and (res.entropy >= 0).all()
        assert (res.entropy <= np.log(m.vocab_size) + 1e-4).all()
        p = res.top_probs
        assert (p > 0).all() and (p.sum(-1) <= 1 + 1e-5).all() and (p[..., :-1] >= p[..., 1:]).all()


@_SETTINGS
@given(top_k=st.one_of(st.integers(-5, 400), st.integers(-5, 10**6)),
       layers=st.one_of(st.none(), st.integers(-10, 10), st.lists(st.integers(-10, 10), max_size=4)))
def test_property_lens_parameters(m, top_k, layers):
    expected = _expected_layers(layers, m.n_layers)
    if not 1 <= top_k <= m.vocab_size or expected is None:
        with pytest.raises(lb.InputError, match=r"top_k|layers"):
            lb.logit_lens(m, "Hello there, general", top_k=top_k, layers=layers, progress=False)
    else:
        res = lb.logit_lens(m, "Hello there, general", top_k=top_k, layers=layers, progress=False)
        assert list(res.layers) == expected
        assert res.top_ids.shape == (len(expected), len(res.tokens), top_k)
        assert ((res.top_ids >= 0) & (res.top_ids < m.vocab_size)).all()
        assert (res.top_probs.sum(-1) <= 1 + 1e-5).all()


@_SETTINGS
@given(text=st.text(min_size=0, max_size=40), method=st.sampled_from(["saliency", "occlusion", "rollout"]))
def test_property_attribution_text(m, text, method):
    if not _valid_text(text):
        with pytest.raises(lb.InputError, match=r"empty or whitespace"):
            lb.attribute(m, text, method=method, progress=False)
    else:
        res = lb.attribute(m, text, method=method, progress=False)
        assert res.scores.shape == (1, len(res.source_tokens)) and res.method == method
        assert torch.isfinite(res.scores).all()
        assert torch.isfinite(res.f_value).all() and (res.f_value <= 0).all()  # F = log p(target)
        if method in ("saliency", "rollout"):  # gradient norms / attention mass
            assert (res.scores >= 0).all()


#: fewest distinct points each estimator needs: TwoNN 2 neighbours (+ 90 % kept >= 2), GRIDE n2=4, MLE k=20
_MIN_POINTS = {"twonn": 3, "gride": 5, "mle": 21}


@_SETTINGS
@given(n=st.integers(0, 40), d=st.integers(1, 6), dup=st.booleans())
def test_property_estimators(n, d, dup):
    X = np.random.default_rng(n * 7 + d).normal(size=(n, d))  # n distinct points (Gaussian)
    if dup and n:
        X = np.vstack([X, X[:1]])  # a duplicate adds no distinct point
    for name, least in _MIN_POINTS.items():
        if n < least:
            with pytest.raises(lb.InputError):
                getattr(lb.estimators, name)(X)
        else:
            v = getattr(lb.estimators, name)(X)
            assert np.isfinite(v) and 0 < v < 1000, (name, v)


# ------------------------------------------------------------------------------------ filler, memory, critical tokens
MORE_PROBES = {  # name -> (f(m, x), the parameter name the message must mention)
    "filler_ablation": (lambda m, x: lb.filler_ablation(m, x, n_boot=10), "texts"),
    "filler_sweep": (lambda m, x: lb.filler_sweep(m, x, counts=(0, 2)), "items"),
    "contextual_memory": (lambda m, x: lb.contextual_memory(m, x, n_steps=1), "texts"),
    "critical_tokens": (lambda m, x: lb.critical_tokens(m, x, "so the answer is 4", checker=lambda t: True,
                                                         n_samples=1), "prompt"),
    "contrastive_tokens": (lambda m, x: lb.contrastive_tokens(m, m, x), "text"),
}


@pytest.mark.parametrize("case,text", [("empty", ""), ("whitespace", "  "), ("int", 123), ("none", None),
                                       ("empty-list", []), ("too-long", LONG)], ids=lambda v: str(v)[:10])
@pytest.mark.parametrize("probe", sorted(MORE_PROBES))
def test_bad_text_later_probes(m, probe, case, text):
    f, param = MORE_PROBES[probe]
    with pytest.raises(lb.InputError) as e:
        f(m, text)
    assert param in str(e.value), f"message does not name {param!r}: {e.value}"


def test_checker_that_raises_is_named(m):
    def broken_checker(text):
        raise ZeroDivisionError("oops")
    with pytest.raises(lb.LensbenchError, match=r"broken_checker"):
        lb.critical_tokens(m, "Two plus two is", " four", checker=broken_checker, n_samples=2,
                           max_new_tokens=2)

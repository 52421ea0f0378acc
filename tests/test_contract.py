"""The contract every public probe keeps, checked the way scikit-learn's ``check_estimator`` checks estimators.

Each probe in :data:`PROBES` runs on tiny random models (2 layers, d=64) with the smallest settings that mean
something, and its result must: save and load back bit-exactly (every field), give a non-empty dataframe with
its columns, a plotly figure with at least one trace of finite data and a non-empty HTML repr; a bfloat16 copy
of the same weights must agree with float32 within a tolerance stated per probe; and a bad parameter must raise
:class:`lensbench.InputError` naming that parameter. A public function of ``lensbench`` whose return annotation
names a :class:`lensbench.Result` subclass and that is not registered here fails
:func:`test_every_public_probe_is_registered`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import lensbench as lb
from lensbench.testing import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")

TEXT = "The quick brown fox jumps over the lazy dog. The capital of France is Paris. Hello world, hello lens."
TEXTS = [TEXT, "One, two, three, four, five; six seven eight nine ten! Language models predict the next token.",
         "Numbers: 12 + 30 = 42, 7 * 6 = 42. Le chat est noir. Der Hund ist braun. The quick brown fox."]
PROMPT, RESPONSE = "Q: two plus two? A:", " the cat sat"
LABELLED = [{"question": f"The {w} fox number {i}", "answer": f" {w}"} for i in range(6) for w in ("quick", "lazy")]


@dataclasses.dataclass
class Models:
    """The models one dtype of a case runs on: ``m`` (tiny llama, seed 0) and ``other`` (tiny llama, seed 1,
    same tokenizer), both built in float32 and cast, so the two dtypes hold the same weights up to rounding."""

    m: lb.LensModel
    other: lb.LensModel


@dataclasses.dataclass(frozen=True)
class ProbeCase:
    """One registered probe call.

    ``make_args(models) -> (args, kwargs)``; ``bad_kwargs``: parameter -> a value the probe must refuse;
    ``columns``: the dataframe's columns; ``compare``: the float fields compared between float32 and bfloat16
    with ``np.allclose(..., atol=atol, rtol=rtol)``; ``accepted``: parameter -> why that bad value is not
    refused with an ``InputError`` naming it today (the case is a strict xfail)."""

    name: str
    fn: Callable[..., Any]
    make_args: Callable[[Models], tuple[tuple, dict]]
    bad_kwargs: dict[str, Any]
    columns: tuple[str, ...]
    compare: tuple[str, ...]
    atol: float
    rtol: float = 0.0
    accepted: dict[str, str] = dataclasses.field(default_factory=dict)


def _geometry(ms: Models) -> lb.GeometryResult:
    return lb.intrinsic_dimension(ms.m, TEXTS, estimator="twonn", progress=False)


_GEOMETRY_COLUMNS = ("prompt", "text", "layer", "spread", "loss", "n_tokens", "duplicates")
_ATTRIBUTION_COLUMNS = ("target", "target_token", "source", "source_token", "score")


def _attribute(method: str, **kw) -> Callable[[Models], tuple[tuple, dict]]:
    return lambda ms: ((ms.m, TEXT), dict(method=method, progress=False, **kw))


# Tolerances: bfloat16 keeps 8 significant bits (a relative step of 2**-8 ~ 0.4 %) in every weight and every
# residual of the 2 blocks, while readouts, statistics and estimators run in float32/float64. Measured on these
# inputs the largest float32-bfloat16 difference of each compared field is at most a quarter of its tolerance.
PROBES: list[ProbeCase] = [
    # log-probabilities, entropies and KL of order 1-10 nats: ~0.2 % relative error measured, 2 % allowed
    ProbeCase("logit_lens", lb.logit_lens, lambda ms: ((ms.m, TEXT), dict(top_k=3, progress=False)),
              dict(top_k=0, batch_size=0),
              ("layer", "position", "token", "top1", "top1_prob", "entropy", "kl_to_final", "ce_next",
               "top1_confidence", "target_prob", "target_rank"),
              ("entropy", "kl_to_final", "ce_next", "logsumexp", "top_probs"), atol=0.02, rtol=0.02),
    # per-layer means over ~100 tokens; target_rank means (~190) move by a fraction of a rank
    ProbeCase("lens_sweep", lb.lens_sweep, lambda ms: ((ms.m, TEXTS), dict(progress=False)),
              dict(batch_size=0, q=(1.5,), max_tokens_per_text=0),
              ("stat", "layer", "mean", "q0.1", "q0.25", "q0.5", "q0.75", "q0.9"),
              ("mean",), atol=0.05, rtol=0.02),
    # TwoNN divides nearest-neighbour distances: rounding of the points moves the ID by ~1 % (0.8 % measured)
    ProbeCase("intrinsic_dimension", lb.intrinsic_dimension,
              lambda ms: ((ms.m, TEXTS), dict(estimator="twonn", progress=False)),
              dict(scale=0, estimator="magic", per="magic", max_points=0),
              ("id",) + _GEOMETRY_COLUMNS, ("values", "loss"), atol=0.02, rtol=0.1),
    # overlap of k=3 neighbourhoods over ~35 tokens: one swapped neighbour of one token moves it by ~0.01
    ProbeCase("neighborhood_overlap", lb.neighborhood_overlap,
              lambda ms: ((ms.m, TEXTS), dict(k=3, progress=False)),
              dict(k=0, batch_size=0), ("overlap",) + _GEOMETRY_COLUMNS, ("values",), atol=0.05),
    # mean cosines in [-1, 1]: 1e-3 measured
    ProbeCase("cosine_similarity", lb.cosine_similarity, lambda ms: ((ms.m, TEXTS), dict(progress=False)),
              dict(last_layer="magic", exclude_first="magic"), ("cosine",) + _GEOMETRY_COLUMNS,
              ("values", "spread"), atol=0.01),
    ProbeCase("anisotropy", lb.anisotropy, lambda ms: ((ms.m, TEXTS), dict(progress=False)),
              dict(last_layer="magic", batch_size=0), ("anisotropy",) + _GEOMETRY_COLUMNS, ("values",), atol=0.01),
    # least-squares fit scores in [0, 1] (held-out ~2e-3 measured)
    ProbeCase("linearity", lb.linearity, lambda ms: ((ms.m, TEXTS), dict(progress=False)),
              dict(last_layer="magic", max_points=0),
              ("layer", "next_layer", "linearity", "linearity_no_residual", "linearity_heldout",
               "linearity_no_residual_heldout", "n_points"),
              ("score", "score_no_residual", "score_heldout", "score_no_residual_heldout"), atol=0.01),
    # the TwoNN ID as above, on shuffled copies of one text
    ProbeCase("shuffle_baseline", lb.shuffle_baseline,
              lambda ms: ((ms.m, " ".join(TEXTS)), dict(levels=(0, 1), estimator="twonn", progress=False)),
              dict(scale=0, estimator="magic", levels=(-1,)), ("S", "blocks", "layer", "id", "loss"),
              ("loss", "id"), atol=0.02, rtol=0.1),
    # Pearson r over 3 prompts of IDs that move by ~1 %: 0.015 measured
    ProbeCase("geometry_loss_correlation", lb.geometry_loss_correlation, lambda ms: ((), dict(result=_geometry(ms))),
              dict(result="not a result"), ("layer", "pearson_r", "pearson_p", "spearman_r", "spearman_p"),
              ("pearson_r", "spearman_r"), atol=0.06),
    # decoders trained for 5 steps on the captured features: per-token scores of ~4 nats move by ~2e-3
    ProbeCase("contextual_memory", lb.contextual_memory,
              lambda ms: ((ms.m, TEXTS), dict(window=4, n_steps=5, n_boot=10, progress=False)),
              dict(window=0, batch_size=0, folds=0, n_boot=0),  # folds=1 is valid: in-sample scores
              ("text", "position", "token", "class", "n_prefix", "C", "C_per_token"),
              ("score_per_token", "class_mean"), atol=0.02, rtol=0.01),
    # gradients (run in float32 from the bfloat16 weights) of a log-prob: the weights' rounding alone moves the
    # gradient norms (~6) by ~0.04
    ProbeCase("attribute[saliency]", lb.attribute, _attribute("saliency"),
              dict(method="magic", objective="magic"), _ATTRIBUTION_COLUMNS, ("scores", "f_value"),
              atol=0.1, rtol=0.02),
    ProbeCase("attribute[integrated_gradients]", lb.attribute, _attribute("integrated_gradients", n_steps=4),
              dict(n_steps=0, internal_batch_size=0), _ATTRIBUTION_COLUMNS,
              ("scores", "f_value", "f_baseline"), atol=0.02, rtol=0.02),
    # log-prob differences of order 1 after deleting a token: 0.015 measured
    ProbeCase("attribute[occlusion]", lb.attribute, _attribute("occlusion"), dict(batch_size=0),
              _ATTRIBUTION_COLUMNS, ("scores", "f_value"), atol=0.05, rtol=0.02),
    ProbeCase("attribute[rollout]", lb.attribute, _attribute("rollout"), dict(method="magic"),
              _ATTRIBUTION_COLUMNS, ("scores",), atol=0.01),
    # mean NLLs of ~5.6 nats over 8 continuation tokens: 2e-3 measured
    ProbeCase("filler_ablation", lb.filler_ablation,
              lambda ms: ((ms.m, [TEXT]), dict(classes=("articles",), continuation_words=6, n_control=1,
                                                n_boot=10, progress=False)),
              dict(ci=1.5, mode="magic", n_control=-1),
              ("class", "frequency", "tokens_removed", "loss_orig", "loss_class", "delta_loss",
               "control_delta_loss", "excess_delta", "n_texts", "delta_ci_lo", "delta_ci_hi"),
              ("loss_orig", "loss_class", "loss_control"), atol=0.05, rtol=0.01),
    # sums of answer log-probs (~26 nats over several tokens): 0.04 measured
    ProbeCase("filler_sweep", lb.filler_sweep,
              lambda ms: ((ms.m, lb.tasks.arithmetic(3, seed=1)), dict(counts=(0, 2), n_boot=10, progress=False)),
              dict(ci=1.5, counts=(-1,), n_boot=0),
              ("kind", "count", "filler_tokens", "logprob", "accuracy", "n_items", "delta_logprob"),
              ("logprob",), atol=0.15, rtol=0.01),
    # cross-validated accuracy of 12 items in 2 folds: one flipped prediction moves a fold's accuracy by 1/6
    ProbeCase("filler_probe", lb.filler_probe,
              lambda ms: ((ms.m, LABELLED), dict(n_fillers=2, layers=[0, 2], folds=2, progress=False)),
              dict(folds=1, pool="magic", C=0),
              ("layer", "filler_acc", "question_acc", "shuffled_acc", "majority", "n_items", "folds"),
              ("filler_acc", "question_acc"), atol=1 / 6 + 1e-9),
    # seeded sampling: a bfloat16 probability that moves across a uniform draw flips one rollout, i.e. one
    # accuracy by 1 / n_samples = 0.5 (none flips on these inputs)
    ProbeCase("critical_tokens", lb.critical_tokens,
              lambda ms: ((ms.m, PROMPT, RESPONSE), dict(checker=lambda t: "a" in t, n_samples=2, max_new_tokens=2,
                                                         progress=False)),
              dict(n_samples=0, granularity="word", top_p=0, threshold=1.5),
              ("unit", "text", "start", "end", "keep_acc", "keep_lo", "keep_hi", "replace_acc", "drop",
               "criticality", "critical"),
              ("keep_acc", "replace_acc"), atol=0.5),
    # log-probs of ~9 nats from two models: 0.015 measured
    ProbeCase("contrastive_tokens", lb.contrastive_tokens, lambda ms: ((ms.m, ms.other, TEXT), {}),
              dict(beta=float("nan"), chunk=0),
              ("position", "token", "p_ce", "logprob_diff", "logp_pos", "logp_neg"),
              ("p_ce", "logprob_diff", "logp_pos", "logp_neg"), atol=0.03, rtol=0.01),
    # Hellinger-distance scores in [0, 1] between float32 softmaxes of bfloat16 logits: 2e-3 measured
    ProbeCase("faithfulness", lb.faithfulness,
              lambda ms: ((ms.m, lb.attribute(ms.m, TEXT, method="integrated_gradients", n_steps=4, progress=False)),
                          dict(n_samples=4)),
              dict(random="magic", batch_size=0, n_samples=0),
              ("target", "target_token", "sufficiency", "comprehensiveness", "sufficiency_random",
               "comprehensiveness_random", "kept", "kept_random"),
              ("sufficiency", "comprehensiveness", "sufficiency_random", "comprehensiveness_random"), atol=0.02),
]
CASES = {c.name: c for c in PROBES}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def zoo(tiny):
    """dtype -> :class:`Models`."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        out[dtype] = Models(tiny("llama", dtype), lb.load(*tiny_model("llama", seed=1, dtype=dtype)))
    return out


@pytest.fixture(scope="module")
def run(zoo):
    """``run(case, dtype=float32)``: the case's result, computed once per module."""
    cache: dict = {}

    def get(case: ProbeCase, dtype=torch.float32):
        if (case.name, dtype) not in cache:
            args, kwargs = case.make_args(zoo[dtype])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[case.name, dtype] = case.fn(*args, **kwargs)
        return cache[case.name, dtype]
    return get


# ------------------------------------------------------------------------------------------------ registry
def _result_names(fn) -> set[str]:
    """Names of Result subclasses in ``fn``'s return annotation (string or evaluated)."""
    ann = inspect.signature(fn).return_annotation
    text = ann if isinstance(ann, str) else repr(ann)
    scope = {**vars(lb), **getattr(inspect.unwrap(fn), "__globals__", {})}
    return {w for w in re.findall(r"[A-Za-z_]\w*", text)
            if isinstance(scope.get(w), type) and issubclass(scope[w], lb.Result)}


def _public_probes() -> dict[str, Callable]:
    return {n: getattr(lb, n) for n in lb.__all__
            if inspect.isfunction(inspect.unwrap(getattr(lb, n))) and _result_names(getattr(lb, n))}


def test_every_public_probe_is_registered():
    public = _public_probes()
    # the scan itself works: it finds probes of every family
    assert {"logit_lens", "intrinsic_dimension", "attribute", "filler_sweep", "critical_tokens"} <= set(public)
    registered = {c.fn for c in PROBES}
    missing = sorted(n for n, f in public.items() if f not in registered)
    assert not missing, f"public probes returning a Result with no ProbeCase in tests/test_contract.py: {missing}"


def test_registry_calls_what_lensbench_exports():
    exported = {id(getattr(lb, n)) for n in lb.__all__}
    assert all(id(c.fn) in exported for c in PROBES)
    assert len(CASES) == len(PROBES)


# ------------------------------------------------------------------------------------------------ per case
def _same_bits(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        if a.dtype == torch.bool:
            return torch.equal(a, b)
        return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and a.tobytes() == b.tobytes())
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_bits(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b) and all(_same_bits(a[k], b[k]) for k in a))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_load_round_trip_is_exact(run, name, tmp_path):
    res = run(CASES[name])
    assert isinstance(res, lb.Result)
    path = res.save(tmp_path / "res")
    for again in (type(res).load(path), lb.Result.load(path)):
        assert type(again) is type(res) and again == res
        for f in dataclasses.fields(res):
            assert _same_bits(getattr(res, f.name), getattr(again, f.name)), f.name


@pytest.mark.parametrize("name", sorted(CASES))
def test_dataframe_has_its_columns(run, name):
    df = run(CASES[name]).to_dataframe()
    assert len(df) > 0
    missing = set(CASES[name].columns) - set(df.columns)
    assert not missing, f"to_dataframe() lacks {sorted(missing)}; has {list(df.columns)}"


def _numeric(trace) -> list[np.ndarray]:
    out = []
    for key in ("x", "y", "z", "values"):
        v = getattr(trace, key, None)
        if v is None:
            continue
        a = np.asarray(v)
        if a.dtype.kind in "biuf":
            out.append(a.astype(float))
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_figure_has_a_trace_of_finite_data(run, name):
    import plotly.graph_objects as go
    fig = run(CASES[name]).figure()
    assert isinstance(fig, go.Figure) and len(fig.data) >= 1
    arrays = [a for t in fig.data for a in _numeric(t)]
    assert not any(np.isinf(a).any() for a in arrays), "a trace holds ±inf"
    assert any(np.isfinite(a).any() for a in arrays), "no trace holds a finite number"


@pytest.mark.parametrize("name", sorted(CASES))
def test_html_repr_is_not_empty(run, name):
    res = run(CASES[name])
    html = res._repr_html_()
    assert isinstance(html, str) and html.strip().startswith("<") and len(html) > 40


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_and_bfloat16_agree(run, name):
    case = CASES[name]
    a, b = run(case, torch.float32), run(case, torch.bfloat16)
    assert type(a) is type(b)
    for field in case.compare:
        x = np.asarray(getattr(a, field), dtype=float)
        y = np.asarray(getattr(b, field), dtype=float)
        assert x.shape == y.shape and x.size > 0, field
        assert np.isfinite(x).any(), f"{field} is all NaN: nothing is compared"
        assert np.array_equal(np.isnan(x), np.isnan(y)), f"{field}: NaN in different places"
        assert np.allclose(x, y, atol=case.atol, rtol=case.rtol, equal_nan=True), \
            f"{field}: max |float32 - bfloat16| = {np.nanmax(np.abs(x - y)):.4g}"


def _bad_params():
    for case in PROBES:
        for param, value in case.bad_kwargs.items():
            marks = [pytest.mark.xfail(strict=True, reason=case.accepted[param])] if param in case.accepted else []
            yield pytest.param(case.name, param, value, marks=marks, id=f"{case.name}-{param}={value!r}")


@pytest.mark.parametrize("name,param,value", list(_bad_params()))
def test_bad_parameter_is_refused_by_name(zoo, name, param, value):
    case = CASES[name]
    args, kwargs = case.make_args(zoo[torch.float32])
    with pytest.raises(lb.InputError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case.fn(*args, **{**kwargs, param: value})
    assert re.search(rf"\b{re.escape(param)}\b", str(e.value)), f"message does not name {param!r}: {e.value}"


# ------------------------------------------------------------------------------------------------ faithfulness
# beyond the contract: the metrics' own bounds and the random control's matched keep rate
_FAITH_FIELDS = ("sufficiency", "comprehensiveness", "sufficiency_random", "comprehensiveness_random", "kept")


@pytest.fixture(scope="module")
def faith(zoo):
    out = {}
    for dtype, ms in zoo.items():
        att = lb.attribute(ms.m, TEXT, method="integrated_gradients", n_steps=4, progress=False)
        out[dtype] = (att, lb.faithfulness(ms.m, att, n_samples=4))
    return out


def test_faithfulness_scores_and_dtypes(faith):
    a, b = faith[torch.float32][1], faith[torch.bfloat16][1]
    for field in _FAITH_FIELDS:
        x, y = np.asarray(a[field], dtype=float), np.asarray(b[field], dtype=float)
        assert x.shape == (1,) and np.isfinite(x).all(), field
        # Hellinger distances in [0, 1] between float32 softmaxes of bfloat16 logits: 2e-3 measured
        assert np.allclose(x, y, atol=0.02), (field, x, y)
    # sufficiency = 1 - D(p, p_keep) / D(p, p_null) <= 1; comprehensiveness = D(p, p_drop) / D(p, p_null) >= 0
    assert a["sufficiency"][0] <= 1 and a["comprehensiveness"][0] >= 0 and 0 < a["kept"][0] == pytest.approx(a["kept_random"][0], rel=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_docstring_names_its_dataframe_columns(run, name):
    """A reader of ``help(ResultClass)`` learns every column ``to_dataframe()`` gives (as ``name``)."""
    res = run(CASES[name])
    doc = type(res).__doc__ or ""
    cols = [str(c) for c in res.to_dataframe().columns]
    missing = [c for c in cols if f"``{c}``" not in doc]
    assert not missing, f"{type(res).__name__}'s docstring does not name the columns {missing} (all: {cols})"

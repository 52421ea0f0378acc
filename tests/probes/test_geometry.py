"""Geometry probes on models: ID, overlap, cosine, anisotropy, linearity, shuffle baseline, correlation with loss,
the cloud conventions (first position, last layer) and one capture serving many probes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import lensbench as lb
from lensbench import estimators as E
from lensbench.probes.geometry import anisotropy_of, block_shuffle, estimate_id, linear_fit


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
    two = m.capture([LONG[:600], LONG[600:1300]], layers=[1], progress=False)
    cloud = torch.cat([two.hidden_states(i)[0][1:] for i in range(2)])         # both prompts, position 0 out
    assert pooled.values[0, 1] == pytest.approx(estimate_id(cloud, "gride", 4)[0], rel=1e-5)
    assert pooled.n_tokens == [cloud.shape[0]]
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
    h = m.capture(LONG[:500], progress=False).hidden_states(0)
    assert ov.values[0, 0] == pytest.approx(float(E.neighbor_overlap(h[0][1:], h[1][1:], 5).mean()), rel=1e-6)
    cos = lb.cosine_similarity(m, LONG[:400])
    cap = m.capture(LONG[:400], progress=False)
    X = torch.nn.functional.normalize(cap.hidden_states(0)[1][1:].double(), dim=1)
    C = X @ X.T
    n = C.shape[0]
    assert cos.values[0, 1] == pytest.approx(float((C.sum() - C.diagonal().sum()) / (n * n - n)), rel=1e-6)
    an = lb.anisotropy(m, LONG[:400])
    assert ((an.values > 0) & (an.values <= 1)).all()
    assert an.values[0, 1] == pytest.approx(anisotropy_of(cap.hidden_states(0)[1][1:]), rel=1e-6)


def test_linearity_on_model(tiny):
    m = tiny("llama")
    texts = [t[:1500] for t in lb.sample_texts(4)]
    lin = lb.linearity(m, texts, prompt="The capital of France is Paris.")
    assert len(lin.layers) == m.n_layers and lin.n_points > 4 * lin.d_model
    assert (lin.score > lin.score_no_residual).all()  # the residual makes adjacent layers near-linear
    assert lin.per_token.shape == (m.n_layers, len(lin.tokens))
    # with the prompt as the whole pool, 1 − mean(per_token²) over its tokens is the in-sample score
    own = lb.linearity(m, texts[0], prompt=texts[0])
    assert own.per_token.shape[1] == own.n_points
    assert 1 - (own.per_token ** 2).mean(1) == pytest.approx(own.score, rel=1e-6)
    with pytest.warns(UserWarning, match="N <= d\\+1"):
        lb.linearity(m, "hello world")


def test_shuffle_and_correlation(tiny, tmp_path):
    m = tiny("llama")
    sh = lb.shuffle_baseline(m, LONG[:1200], levels=(0, 2, 5))
    assert sh.id.shape == (3, m.n_layers + 1) and sh.loss.shape == (3,)
    plain = lb.intrinsic_dimension(m, LONG[:1200])                          # S = 0 is the text itself
    assert np.allclose(sh.id[0], plain.values[0], rtol=1e-6) and sh.loss[0] == pytest.approx(plain.loss[0])
    assert not np.allclose(sh.id[2], sh.id[0])                              # S = 5: every token moved
    geo = lb.intrinsic_dimension(m, [t[:800] for t in lb.sample_texts(5)], estimator="twonn")
    corr = lb.geometry_loss_correlation(geo)
    assert corr.pearson_r.shape == (m.n_layers + 1,) and (np.abs(corr.pearson_r) <= 1).all()
    from scipy import stats
    ref = stats.pearsonr(np.log(geo.values[:, 1]), geo.loss)
    assert corr.pearson_r[1] == pytest.approx(ref.statistic) and corr.pearson_p[1] == pytest.approx(ref.pvalue)
    fake = lb.GeometryResult("id", [0], ["a", "b", "c", "d"], np.exp(np.array([[1.0], [2.0], [3.0], [5.0]])),
                             np.zeros((4, 1)), np.array([1.0, 2.0, 3.0, 5.0]), [1] * 4, np.zeros((4, 1)))
    c = lb.geometry_loss_correlation(fake)
    assert c.pearson_r[0] == pytest.approx(1) and c.spearman_r[0] == pytest.approx(1) and c.pearson_p[0] < 1e-3
    for r in (sh, geo, corr, lb.linearity(m, [t[:1500] for t in lb.sample_texts(3)])):
        again = lb.Result.load(r.save(tmp_path / type(r).__name__))
        assert again == r and len(r.to_dataframe()) > 0


@pytest.mark.parametrize("kw, match", [(dict(estimator="magic"), "estimator"), (dict(scale=1), "scale"),
                                       (dict(per="token"), "per")])
def test_bad_arguments(tiny, kw, match):
    with pytest.raises(lb.InputError, match=match):
        lb.intrinsic_dimension(tiny("llama"), "hello world there", **kw)


def test_one_capture_many_probes(tiny, monkeypatch):
    """Every geometry probe that reads only activations gives, from an existing capture and without a model
    pass, the numbers it computes from the texts."""
    import warnings

    import lensbench.probes.geometry as G
    m = tiny("llama")
    texts = [LONG[:600], LONG[600:1200]]
    cap = m.capture(texts, progress=False)
    probes = {
        "intrinsic_dimension": lambda x: lb.intrinsic_dimension(m, x, estimator="twonn", progress=False),
        "pooled_id": lambda x: lb.intrinsic_dimension(m, x, per="pooled", progress=False),
        "neighborhood_overlap": lambda x: lb.neighborhood_overlap(m, x, k=5, progress=False),
        "cosine_similarity": lambda x: lb.cosine_similarity(m, x, progress=False),
        "anisotropy": lambda x: lb.anisotropy(m, x, progress=False),
        "linearity": lambda x: lb.linearity(m, x, prompt=texts[1], progress=False),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_text = {k: f(texts) for k, f in probes.items()}
        pools_text = G.pooled_clouds(m, texts, layers=[0, 2], progress=False)

        def no_model_pass(*a, **k):
            raise AssertionError("a probe given a capture ran the model")
        monkeypatch.setattr(G, "capture", no_model_pass)
        monkeypatch.setattr(m, "capture", no_model_pass)
        from_cap = {k: f(cap) for k, f in probes.items()}
        pools_cap = G.pooled_clouds(m, cap, layers=[0, 2], progress=False)
    for k in probes:
        a, b = from_text[k], from_cap[k]
        if k == "linearity":
            assert np.allclose(a.score, b.score, atol=1e-8) and np.allclose(a.score_heldout, b.score_heldout,
                                                                            atol=1e-8)
            assert b.tokens == a.tokens and np.allclose(a.per_token, b.per_token, rtol=1e-4, atol=1e-5)
        else:
            assert np.allclose(a.values, b.values, rtol=1e-6), k
            assert np.allclose(a.loss, b.loss, rtol=1e-5) and a.n_tokens == b.n_tokens, k
    for x, y in zip(pools_text[0], pools_cap[0]):
        assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5)


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


# --------------------------------------------------------------------------------------------- parameters
def _geo_calls(m):
    import lensbench.probes.geometry as G
    text = LONG[:300]
    return {
        "intrinsic_dimension": lambda **k: lb.intrinsic_dimension(m, text, **{"progress": False, **k}),
        "pooled_clouds": lambda **k: G.pooled_clouds(m, text, **{"progress": False, **k}),
        "neighborhood_overlap": lambda **k: lb.neighborhood_overlap(m, text, **{"progress": False, **k}),
        "cosine_similarity": lambda **k: lb.cosine_similarity(m, text, **{"progress": False, **k}),
        "anisotropy": lambda **k: lb.anisotropy(m, text, **{"progress": False, **k}),
        "linearity": lambda **k: lb.linearity(m, text, **{"progress": False, **k}),
        "shuffle_baseline": lambda **k: lb.shuffle_baseline(m, text, **{"progress": False, **k}),
        "geometry_loss_correlation": lambda **k: lb.geometry_loss_correlation(**k),
        "estimate_id": lambda **k: G.estimate_id(torch.randn(50, 4), **k),
        "block_shuffle": lambda **k: G.block_shuffle(**{"ids": torch.arange(10), "S": 1, **k}),
        "split_halves": lambda **k: G.split_halves(**{"N": 10, **k}),
        "linear_fit": lambda **k: G.linear_fit(torch.randn(20, 3), torch.randn(20, 3), **k),
        "linear_fit_heldout": lambda **k: G.linear_fit_heldout(torch.randn(20, 3), torch.randn(20, 3), **k),
    }


_VIEW_BAD = [("exclude_first", "magic"), ("last_layer", "magic")]
_RUN_BAD = [("batch_size", 0), ("batch_size", "big"), ("progress", "yes")]
BAD_GEOMETRY = {
    "intrinsic_dimension": _VIEW_BAD + _RUN_BAD + [("estimator", "magic"), ("scale", 1), ("scale", 2.5),
                                                   ("per", "token"), ("max_points", 0), ("seed", 1.5)],
    "pooled_clouds": _VIEW_BAD + [("max_points", -1), ("seed", "0"), ("batch_size", -2)],
    "neighborhood_overlap": _VIEW_BAD + _RUN_BAD + [("k", 0), ("k", True)],
    "cosine_similarity": _VIEW_BAD + _RUN_BAD,
    "anisotropy": _VIEW_BAD + _RUN_BAD,
    "linearity": _VIEW_BAD + _RUN_BAD + [("prompt", 3), ("max_points", 0), ("seed", None)],
    "shuffle_baseline": _VIEW_BAD + _RUN_BAD + [("levels", (-1,)), ("levels", ()), ("levels", 2),
                                                ("estimator", "magic"), ("scale", 0), ("seed", None)],
    "geometry_loss_correlation": [("result", "not a result"), ("log", "yes")],
    "estimate_id": [("estimator", "magic"), ("scale", 0), ("var", 0.0), ("var", 1.5), ("k", 2)],
    "block_shuffle": [("ids", [1, 2, 3]), ("S", -1), ("seed", 0.5)],
    "split_halves": [("N", -1), ("seed", None)],
    "linear_fit": [("rcond", -1.0), ("rcond", 1.0)],
    "linear_fit_heldout": [("rcond", -1.0), ("seed", "0")],
}


@pytest.mark.parametrize("fn, param, value", [(f, p, v) for f, bad in BAD_GEOMETRY.items() for p, v in bad],
                         ids=lambda x: str(x)[:14])
def test_bad_parameter_named_with_its_value(tiny, fn, param, value):
    """Each function refuses a bad value before any work, naming itself, the parameter, the value and what
    is allowed."""
    kw = {param: value}
    if fn == "geometry_loss_correlation" and param != "result":
        kw["result"] = _fake_geometry()
    with pytest.raises(lb.InputError) as e:
        _geo_calls(tiny("llama"))[fn](**kw)
    msg = str(e.value)
    assert msg.startswith(f"{fn}: {param}={value!r} is not allowed; {param} must be "), msg


def _fake_geometry():
    return lb.GeometryResult("id", [0], ["a", "b", "c", "d"], np.exp(np.array([[1.0], [2.0], [3.0], [5.0]])),
                             np.zeros((4, 1)), np.array([1.0, 2.0, 3.0, 5.0]), [1] * 4, np.zeros((4, 1)))


@pytest.mark.parametrize("fn", ["intrinsic_dimension", "pooled_clouds", "neighborhood_overlap", "cosine_similarity",
                                "anisotropy", "linearity", "shuffle_baseline"])
def test_exclude_bos_is_an_alias(tiny, fn):
    """exclude_bos= still works with a FutureWarning at the caller: True is exclude_first="bos", False is
    False (the tiny tokenizer adds no BOS, so "bos" keeps position 0 and True would drop it)."""
    import warnings
    call = _geo_calls(tiny("llama"))[fn]
    kw = {"layers": [0, 1]} | ({"levels": (0, 1)} if fn == "shuffle_baseline" else {})
    for old, new in ((True, "bos"), (False, False)):
        with pytest.warns(FutureWarning, match="exclude_bos= is renamed exclude_first=") as rec:
            a = call(exclude_bos=old, **kw)
        assert any(r.filename == __file__ and issubclass(r.category, FutureWarning) for r in rec)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            b = call(exclude_first=new, **kw)
        if fn == "pooled_clouds":
            assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
        else:
            assert a == b and a.settings["exclude_first"] == new
    with pytest.raises(lb.InputError, match="pass exclude_first= only"):
        call(exclude_bos=True, exclude_first=True, **kw)
    assert getattr(lb.probes.geometry, fn).renamed_params == {"exclude_bos": "exclude_first"}


def test_exclude_first_true_drops_position_0_where_bos_keeps_it(tiny):
    m = tiny("llama")
    with pytest.warns(UserWarning):
        a = lb.intrinsic_dimension(m, LONG[:300], layers=[1], exclude_first=True, progress=False)
        b = lb.intrinsic_dimension(m, LONG[:300], layers=[1], exclude_first="bos", progress=False)
    assert a.n_tokens[0] == b.n_tokens[0] - 1


# --------------------------------------------------------------------------------------------- figures
def _lin_result(heldout=True):
    return lb.LinearityResult(layers=[0, 1], n_points=40, d_model=8, score=np.array([0.9, 0.8]),
                              score_no_residual=np.array([0.3, 0.2]),
                              score_heldout=np.array([0.7, 0.6]) if heldout else None,
                              score_no_residual_heldout=np.array([0.1, 0.0]) if heldout else None,
                              prompt="a b c", tokens=["a", " b", "\n"], per_token=np.arange(6.0).reshape(2, 3),
                              settings={"exclude_first": True, "last_layer": "post_norm"}, model_name="tiny")


def test_figures_show_the_results_numbers():
    from lensbench.probes.geometry import CorrelationResult, ShuffleResult
    geo = _fake_geometry()
    geo.settings = {"estimator": "twonn", "exclude_first": "bos", "last_layer": "pre_norm"}
    fig = geo.figure()
    assert [list(t.y) for t in fig.data[:4]] == [list(v) for v in geo.values]
    assert fig.data[-1].name == "mean" and list(fig.data[-1].y) == pytest.approx(list(geo.values.mean(0)))
    assert "(twonn)" in fig.layout.title.text and "BOS excluded · last layer before the final norm" in \
        fig.layout.title.text
    assert len(geo.figure(max_lines=2).data) == 3
    lin = _lin_result()
    fig = lin.figure()
    assert [list(t.y) for t in fig.data] == [[0.9, 0.8], [0.3, 0.2], [0.7, 0.6], [0.1, 0.0]]
    assert [t.line.dash for t in fig.data[2:]] == ["dot", "dot"] and "N = 40" in fig.layout.title.text
    assert "first token excluded" in fig.layout.title.text
    assert len(_lin_result(heldout=False).figure().data) == 2
    heat = lin.figure("per_token").data[0]
    assert np.array_equal(np.asarray(heat.z), lin.per_token) and list(heat.x) == ["0:a", "1: b", "2:\\n"]
    sh = ShuffleResult(levels=[0, 2], loss=np.array([3.0, 5.0]), id=np.array([[4.0, 5.0], [6.0, 7.0]]),
                       layers=[0, 1], text="t", seed=0, settings={"exclude_first": False})
    fig = sh.figure()
    assert [list(t.y) for t in fig.data[:2]] == [[4.0, 5.0], [6.0, 7.0]] and fig.data[1].name == "S=2 (16 blocks)"
    assert list(fig.data[2].y) == [3.0, 5.0] and "all tokens" in fig.layout.title.text
    corr = CorrelationResult([0, 1], np.array([0.5, -0.2]), np.array([0.1, 0.2]), np.array([0.4, -0.1]),
                             np.array([0.1, 0.3]), "log id", 5)
    fig = corr.figure()
    assert [list(t.y) for t in fig.data] == [[0.5, -0.2], [0.4, -0.1]] and "5 prompts" in fig.layout.title.text


def test_linearity_results_saved_before_the_field_order_load(tmp_path):
    """A file written with the old field order and without the held-out scores loads, the new fields at their
    defaults (fields are stored by name)."""
    from lensbench.results import save_tensors
    meta = {"__class__": "LinearityResult", "arrays": {"score": True, "score_no_residual": True, "per_token": True},
            "fields": {"layers": [0, 1], "n_points": 40, "d_model": 8, "prompt": "a b c", "tokens": ["a", " b", "\n"],
                       "model_name": "tiny", "settings": {"__dict__": [["exclude_first", True]]}}}
    new = _lin_result(heldout=False)
    tensors = {k: torch.from_numpy(getattr(new, k)) for k in ("score", "score_no_residual", "per_token")}
    old = lb.Result.load(save_tensors(tmp_path / "old", tensors, meta))
    assert old.score_heldout is None and old.settings == {"exclude_first": True}
    assert dataclasses.replace(old, settings=new.settings) == new
    assert lb.Result.load(new.save(tmp_path / "new")) == new


def test_shuffling_raises_the_loss(default_model):
    """Block-shuffling a real text destroys its context: the loss rises from the text's own loss (S=0) to far
    above it when every token is moved (S=5)."""
    m = default_model
    text = LONG[:1200]
    sh = lb.shuffle_baseline(m, text, levels=(0, 5), estimator="twonn", layers=[m.n_layers // 2], progress=False)
    assert sh.loss[0] == pytest.approx(m.capture(text, layers=[0], progress=False).losses[0], rel=1e-5)
    assert sh.loss[1] > sh.loss[0] + 1.0          # measured: 3.9 → 8.0 nats
    assert np.isfinite(sh.id).all() and sh.id.shape == (2, 1)


def test_warnings_point_at_the_caller(tiny):
    m = tiny("llama")
    with pytest.warns(UserWarning, match="T ≳ 500") as rec:
        lb.intrinsic_dimension(m, LONG[:300], layers=[1], progress=False)
    with pytest.warns(UserWarning, match="N <= d\\+1") as rec2:
        lb.linearity(m, "hello world", progress=False)
    assert {r.filename for r in [*rec, *rec2] if issubclass(r.category, UserWarning)} == {__file__}

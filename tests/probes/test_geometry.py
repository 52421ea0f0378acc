"""Geometry probes on models: ID, overlap, cosine, anisotropy, linearity, shuffle baseline, correlation with loss,
the cloud conventions (first position, last layer) and one capture serving many probes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lensbench as lb
from lensbench import estimators as E
from lensbench.probes.geometry import block_shuffle, linear_fit


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

"""Logit lens and tuned lens: identities, an independent naive reference, sweeps, resume, bad input."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from conftest import ARCHS, DTYPES

import lensbench as lb
from lensbench.probes import lens as lens_mod

TEXT = "The capital of France is Paris. One, two, three!"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_last_layer_reproduces_model_logprobs(tiny, arch, dtype):
    m = tiny(arch, dtype)
    res = lb.logit_lens(m, TEXT, top_k=5, progress=False)
    with torch.no_grad():
        lp = torch.log_softmax(m.forward(res.input_ids[None]).logits[0].float(), -1)
    tol = 1e-5 if dtype == torch.float32 else 0.05
    top = lp.topk(5, -1)
    assert (res.top_probs[-1].log() - top.values).abs().max() <= tol
    nxt = res.input_ids[1:]
    assert (res.ce_next[-1, :-1] + lp[:-1].gather(-1, nxt[:, None])[:, 0]).abs().max() <= tol
    assert math.isnan(res.ce_next[-1, -1])
    assert res.kl_to_final[-1].abs().max() <= tol
    assert res.entropy.dtype == torch.float32 and torch.isfinite(res.entropy).all()


def _naive(m, text):
    """Independent reference: HF's own hidden states, full [layers, T, V] log-softmax, full sort for ranks."""
    ids = m.encode(text)
    with torch.no_grad():
        out = m.forward(ids[None], output_hidden_states=True)
    hs = [h[0] for h in out.hidden_states[:-1]]
    L = m.n_layers
    with torch.no_grad():
        final = torch.log_softmax(out.logits[0].float(), -1)
        lps = torch.stack([torch.log_softmax(m.model.lm_head(m.model.model.norm(h)).float(), -1) for h in hs]
                          + [final])
    p = lps.exp()
    nxt = ids[1:]
    ent = -(p * lps).sum(-1)
    kl = (final.exp()[None] * (final[None] - lps)).sum(-1)
    ce = torch.full((L + 1, len(ids)), float("nan"))
    ce[:, :-1] = -lps[:, :-1].gather(-1, nxt[None, :, None].expand(L + 1, -1, 1))[..., 0]
    order = lps.argsort(-1, descending=True)
    rank = torch.full((L + 1, len(ids)), float("nan"))
    rank[:, :-1] = (order[:, :-1] == nxt[None, :, None]).float().argmax(-1).float()
    return dict(entropy=ent, kl_to_final=kl, ce_next=ce, rank=rank, top=lps.topk(3, -1), lps=lps)


@pytest.mark.parametrize("arch", ["llama", "gemma", "qwen2"])
def test_agrees_with_naive_full_vocab_reference(tiny, arch):
    m = tiny(arch)
    ref = _naive(m, TEXT)
    res = lb.logit_lens(m, TEXT, top_k=3, progress=False)
    for k in ("entropy", "kl_to_final", "ce_next"):
        assert torch.allclose(getattr(res, k), ref[k], atol=2e-4, equal_nan=True), k
    assert torch.equal(res.target_rank[:, :-1], ref["rank"][:, :-1])
    assert torch.allclose(res.top_probs, ref["top"].values.exp(), atol=1e-5)
    assert torch.equal(res.top_ids, ref["top"].indices)
    assert torch.allclose(res.top1_confidence, -ref["top"].values[..., 0], atol=1e-5)


def test_chunking_does_not_change_numbers(tiny):
    m = tiny("llama")
    a = lb.logit_lens(m, TEXT, progress=False)
    b = lb.logit_lens(m, TEXT, chunk_bytes=1, progress=False)  # one position per chunk
    for k in ("entropy", "kl_to_final", "ce_next", "top_probs", "target_prob", "target_rank"):
        assert torch.allclose(getattr(a, k), getattr(b, k), atol=1e-6, equal_nan=True), k


def test_fixed_target_on_default_model(default_model):
    res = lb.logit_lens(default_model, "The capital of France is", target=" Paris", progress=False)
    assert res.target == " Paris"
    assert res.target_prob[-1, -1] == pytest.approx(0.77, abs=0.03)
    assert res.target_rank[-1, -1] == 0
    assert res.top_tokens(1)[-1][-1][0] == " Paris"
    # the answer forms late: early layers give Paris a tiny probability
    assert res.target_prob[: default_model.n_layers // 3, -1].max() < 0.05


def test_layer_subset_and_batch_of_texts(tiny):
    m = tiny("gpt2")
    full = lb.logit_lens(m, [TEXT, "hello world"], progress=False)
    assert isinstance(full, list) and len(full) == 2
    alone = lb.logit_lens(m, TEXT, progress=False)
    assert full[0].tokens == alone.tokens
    assert torch.allclose(full[0].kl_to_final, alone.kl_to_final, atol=1e-5)
    sub = lb.logit_lens(m, "hello world", layers=[0, -1], progress=False)
    assert sub.layers == [0, 2]
    assert torch.allclose(sub.entropy, full[1].entropy[[0, 2]], atol=1e-5)


def test_backends_give_same_lens():
    from test_capture import _nnsight_and_bridge
    hf, nn, br = _nnsight_and_bridge()
    ref = lb.logit_lens(hf, TEXT, progress=False)
    for other in (nn, br):
        r = lb.logit_lens(other, TEXT, progress=False)
        assert torch.allclose(r.kl_to_final, ref.kl_to_final, atol=1e-4)
        assert torch.allclose(r.top_probs, ref.top_probs, atol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(top_k=0), "top_k"), (dict(top_k=10**6), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(target="hello world fox"), "tokens"), (dict(target=10**7), "outside the vocabulary"),
    (dict(layers=[7]), "layers"), (dict(lens="tuned"), "TunedLens"),
])
def test_bad_arguments(tiny, kw, match):
    with pytest.raises(lb.InputError, match=match):
        lb.logit_lens(tiny("llama"), TEXT, progress=False, **kw)


def _refused_by_name(call, param, value):
    """`call()` raises an InputError whose message names `param` and shows `value`."""
    with pytest.raises(lb.InputError) as e:
        call()
    msg = str(e.value)
    assert re.search(rf"\b{re.escape(param)}\b", msg), msg
    assert repr(value)[:20] in msg, msg


@pytest.mark.parametrize("param, value", [
    ("top_k", 0), ("top_k", 2.5), ("top_k", 10**6), ("top_k", True), ("target", 3.5), ("target", [1]),
    ("layers", "2"), ("layers", []), ("lens", "tuned"), ("apply_final_norm", "yes"), ("batch_size", 0),
    ("batch_size", "big"), ("add_bos", 1), ("truncate", None), ("backend", "magic"), ("chunk_bytes", 0),
    ("chunk_bytes", 1.5), ("keep_hidden", "no"), ("progress", 1), ("m", "SmolLM2"),
], ids=lambda v: repr(v))
def test_logit_lens_refuses_each_bad_value_by_name(tiny, param, value):
    kw = {"m": tiny("llama"), "text": TEXT, "progress": False, param: value}
    _refused_by_name(lambda: lb.logit_lens(**kw), param, value)


@pytest.mark.parametrize("param, value", [
    ("q", (1.5,)), ("q", 0.5), ("q", ()), ("max_tokens_per_text", 1), ("max_tokens_per_text", 64.0),
    ("batch_size", 0), ("cache_dir", 3), ("histogram", "yes"), ("lens", "tuned"), ("chunk_bytes", 0),
    ("progress", "no"),
], ids=lambda v: repr(v))
def test_lens_sweep_refuses_each_bad_value_by_name(tiny, param, value):
    m = tiny("llama")
    _refused_by_name(lambda: lb.lens_sweep(m, [TEXT], **{"progress": False, param: value}), param, value)


def test_logit_lens_reads_an_existing_capture(tiny):
    m = tiny("llama")
    texts = [TEXT, "hello world, hello lens"]
    g = torch.Generator().manual_seed(0)
    tl = lb.TunedLens(0.05 * torch.randn(m.n_layers, m.d_model, m.d_model, generator=g),
                      torch.zeros(m.n_layers, m.d_model), m.name, fingerprint=m.fingerprint)
    cap = m.capture(texts, progress=False)
    calls = {"n": 0}
    h = m.model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        from_cap = lb.logit_lens(m, cap, target="e", layers=[0, -1], lens=tl, progress=False)
    finally:
        h.remove()
    assert calls["n"] == 0  # no model pass
    from_text = lb.logit_lens(m, texts, target="e", layers=[0, -1], lens=tl, progress=False)
    assert len(from_cap) == len(from_text) == 2
    for a, b in zip(from_cap, from_text):
        assert a.tokens == b.tokens and torch.equal(a.input_ids, b.input_ids) and a.layers == b.layers == [0, 2]
        assert torch.equal(a.top_ids, b.top_ids)
        for k in ("top_probs", "entropy", "kl_to_final", "ce_next", "top1_confidence", "target_prob",
                  "target_rank", "logsumexp"):
            assert torch.allclose(getattr(a, k), getattr(b, k), atol=1e-6, equal_nan=True), k
    # inside a capture's reduce, on the batch's device tensors
    per_batch = m.capture(texts, reduce=lambda batch: lb.logit_lens(m, batch, progress=False), progress=False)
    plain = lb.logit_lens(m, texts, progress=False)
    for a, b in zip(per_batch.results, plain):
        assert a.tokens == b.tokens
        assert torch.allclose(a.kl_to_final, b.kl_to_final, atol=1e-6)
        assert torch.allclose(a.top_probs, b.top_probs, atol=1e-6)
    with pytest.raises(lb.InputError, match="layers"):
        lb.logit_lens(m, m.capture(texts, layers=[0], progress=False), progress=False)


def test_sweep_reads_an_existing_capture(tiny):
    m = tiny("llama")
    texts = [t[:200] for t in lb.sample_texts(3)]
    ref = lb.lens_sweep(m, texts, max_tokens_per_text=24, progress=False)
    sw = lb.lens_sweep(m, m.capture(texts, progress=False), max_tokens_per_text=24, progress=False)
    assert (sw.n_texts, sw.n_tokens) == (ref.n_texts, ref.n_tokens) == (3, 72)
    assert torch.allclose(sw.mean, ref.mean, atol=1e-6)
    width = torch.tensor(sw.sketch_width)[:, None, None]
    assert ((sw.quantiles - ref.quantiles).abs() <= width + 1e-6).all()  # at most one bin apart


def test_nonfinite_hidden_states_are_reported(tiny):
    m = tiny("llama")
    h = m.blocks[0].register_forward_hook(lambda _m, _a, out: (out[0] * float("inf"),) + tuple(out[1:])
                                          if isinstance(out, tuple) else out * float("inf"))
    try:
        with pytest.raises(lb.LensbenchError, match="non-finite.*float32"):
            lb.logit_lens(m, TEXT, progress=False)
    finally:
        h.remove()


def test_identity_tuned_lens_equals_logit_lens(tiny):
    m = tiny("llama")
    a = lb.logit_lens(m, TEXT, progress=False)
    b = lb.logit_lens(m, TEXT, lens=lb.TunedLens.identity(m), progress=False)
    assert b.lens == "tuned"
    assert torch.allclose(a.kl_to_final, b.kl_to_final, atol=1e-5)


def _exact_quantiles(per, stat, q):
    allv = torch.cat([getattr(r, stat) for r in per], dim=1).double().numpy()
    return np.nanquantile(allv, q, axis=1, method="inverted_cdf")


def _check_sweep_against_per_text(sw, per):
    assert sw.n_tokens == sum(len(r.tokens) for r in per)
    for si, s in enumerate(sw.stats):
        allv = torch.cat([getattr(r, s) for r in per], dim=1).double()
        assert torch.allclose(sw.mean[si].double(), torch.nanmean(allv, dim=1), rtol=1e-5, atol=1e-5), s
        for qi, q in enumerate(sw.q):
            exact = _exact_quantiles(per, s, q)
            got = sw.quantiles[si, :, qi].double().numpy()
            if s == "target_rank":  # integer counts: exact
                assert np.array_equal(got, exact), (s, q, got, exact)
            else:  # bins of 0.01 nats (1e-4 in probability), read at the midpoint
                tol = sw.sketch_width[si] / 2 * (1 + 1e-6) + 1e-6
                assert np.abs(got - exact).max() <= tol, (s, q, np.abs(got - exact).max())
        assert torch.allclose(sw.quantile(s, 0.5), sw.quantiles[si, :, sw.q.index(0.5)], equal_nan=True)


def test_sweep_mean_and_quantiles_match_per_text_results(tiny):
    m = tiny("llama")
    texts = [t[:300] for t in lb.sample_texts(5)]
    sw = lb.lens_sweep(m, texts, max_tokens_per_text=None, progress=False)
    _check_sweep_against_per_text(sw, lb.logit_lens(m, texts, progress=False))


def test_sweep_quantiles_exact_on_default_model(default_model):
    """Ranks are exact (a median rank of 0 reads 0, not ~12 as from 2048-bin histograms over 49k ranks) and
    KLs above 40 nats (layer 0) are not clamped."""
    m = default_model
    texts = lb.sample_texts()[20:22]
    sw = lb.lens_sweep(m, texts, max_tokens_per_text=24, progress=False)
    per = lb.logit_lens(m, [m.tokenizer.decode(m.tokenizer(t)["input_ids"][:24]) for t in texts], progress=False)
    _check_sweep_against_per_text(sw, per)
    kl = sw.stats.index("kl_to_final")
    assert sw.quantiles[kl, 0, sw.q.index(0.5)] > 40


def test_sweep_cache_is_keyed_by_fingerprint(tiny, tmp_path):
    m = tiny("llama")
    twin = lb.load(*__import__("lensbench.testing", fromlist=["tiny_model"]).tiny_model("llama", seed=1))
    assert twin.name == m.name and twin.fingerprint != m.fingerprint
    texts = [t[:200] for t in lb.sample_texts(3)]
    lb.lens_sweep(m, texts, cache_dir=tmp_path, progress=False)
    cached = lb.lens_sweep(twin, texts, cache_dir=tmp_path, progress=False)
    assert cached == lb.lens_sweep(twin, texts, progress=False)
    assert cached.fingerprint == twin.fingerprint


def test_sweep_resumes_after_interruption(tiny, tmp_path, monkeypatch):
    m = tiny("llama")
    texts = [t[:200] for t in lb.sample_texts(12)]
    ref = lb.lens_sweep(m, texts, progress=False)
    real = lens_mod.logit_lens
    calls = {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-sweep")
        return real(*a, **kw)
    monkeypatch.setattr(lens_mod, "logit_lens", dying)
    with pytest.raises(KeyboardInterrupt):
        lb.lens_sweep(m, texts, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 8  # the first group of 8 texts was saved
    monkeypatch.setattr(lens_mod, "logit_lens", real)
    resumed = lb.lens_sweep(m, texts, cache_dir=tmp_path, progress=False)
    assert resumed == ref


def test_results_roundtrip_and_views(tiny, tmp_path):
    m = tiny("llama")
    res = lb.logit_lens(m, TEXT, target="e", progress=False)
    path = res.save(tmp_path / "r")
    again = lb.Result.load(path)
    assert isinstance(again, lb.LensResult) and again == res
    df = res.to_dataframe()
    assert len(df) == len(res.layers) * len(res.tokens)
    assert df.query("layer == 2")["top1_prob"].to_numpy() == pytest.approx(res.top_probs[-1, :, 0].numpy())
    fig = res.figure("entropy")
    assert fig.data[0].z.shape == (3, len(res.tokens))
    assert np.array_equal(fig.data[0].z, res.stat("entropy").numpy().astype(float))
    assert list(fig.data[0].y) == [str(la) for la in res.layers]
    assert len(fig.data[0].x) == len(res.tokens) and fig.data[0].x[0].startswith("0:")
    assert fig.layout.title.text == f"logit lens · entropy H(p_l) [nats] · target: {res.target}"
    html = res._repr_html_()
    assert "LensResult" in html and html.count("<tr>") == 1 + len(res.layers)
    assert html.count("<td>") == len(res.layers) * min(16, len(res.tokens))
    sw = lb.lens_sweep(m, ["hello world", TEXT], progress=False)
    sw.save(tmp_path / "s")
    assert lb.LensSweepResult.load(tmp_path / "s.safetensors") == sw
    sfig = sw.figure()
    assert len(sfig.data) == 3
    kl = sw.stats.index("kl_to_final")
    assert [t.name for t in sfig.data] == ["q0.1–q0.9", "median", "mean"]
    assert np.allclose(sfig.data[2].y, sw.mean[kl].numpy())
    assert np.allclose(sfig.data[1].y, sw.quantiles[kl, :, sw.q.index(0.5)].numpy())
    assert list(sfig.data[2].x) == sw.layers
    assert sfig.layout.title.text.startswith(f"logit lens · kl_to_final per layer over 2 texts ({sw.n_tokens} tokens)")


def test_retarget_without_forward_pass(tiny):
    m = tiny("llama")
    res = lb.logit_lens(m, TEXT, keep_hidden=True, progress=False)
    calls = {"n": 0}
    h = m.model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        re = res.retarget(m, "e")
        back = re.retarget(m, None)
    finally:
        h.remove()
    assert calls["n"] == 0
    direct = lb.logit_lens(m, TEXT, target="e", progress=False)
    assert torch.allclose(re.target_prob, direct.target_prob, atol=1e-6)
    assert torch.equal(re.target_rank, direct.target_rank)
    assert torch.allclose(back.target_prob, res.target_prob, atol=1e-6, equal_nan=True)
    # logsumexp makes any token's probability recoverable: p(top-1) from it equals top_probs
    with torch.no_grad():
        z = m.unembed(res.hidden[-1])
    assert torch.allclose(z.max(-1).values - res.logsumexp[-1], res.top_probs[-1, :, 0].log(), atol=1e-5)
    with pytest.raises(lb.InputError, match="keep_hidden"):
        lb.logit_lens(m, TEXT, progress=False).retarget(m, "e")

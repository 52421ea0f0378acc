"""Token attribution: completeness, a toy model with a known answer, rollout, contrast, Captum agreement."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from transformers import PretrainedConfig

import lensbench as lb
from lensbench.testing import OOMOnce, tiny_tokenizer

PROMPT = "The capital of France is"


class ToyBlock(nn.Module):
    """Every position receives the embedding of position j (the output depends on token j only)."""

    def __init__(self, j: int):
        super().__init__()
        self.j = j
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, h, **_):
        return (h[:, self.j: self.j + 1, :] * self.scale).expand_as(h).contiguous()


class ToyLM(nn.Module):
    def __init__(self, j: int = 2, V: int = 384, d: int = 16):
        super().__init__()
        self.config = PretrainedConfig(num_hidden_layers=1, max_position_embeddings=64, vocab_size=V)
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, d)
        self.layers = nn.ModuleList([ToyBlock(j)])
        self.lm_head = nn.Linear(d, V)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, inputs_embeds=None, output_hidden_states=False, **_):
        h0 = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        h1 = self.layers[0](h0)
        return SimpleNamespace(logits=self.lm_head(h1), hidden_states=(h0, h1) if output_hidden_states else None)


@pytest.fixture(scope="module")
def toy():
    return lb.load(ToyLM(j=2), tiny_tokenizer())


@pytest.mark.parametrize("method", ["saliency", "grad_x_input", "integrated_gradients", "occlusion"])
def test_toy_model_only_token_j_matters(toy, method):
    res = lb.attribute(toy, "hello world the fox jumps", method=method, baseline="mean", progress=False)
    s = res.scores[0].abs()
    assert s[2] > 0 and torch.all(s[torch.arange(len(s)) != 2] < 1e-6 * s[2] + 1e-9), s


@pytest.fixture(scope="module")
def confident_toy():
    """The toy with a sharp unembedding: p(y) ≈ 1. ReAGent's update 2·atanh(p(y|x) − p(y|x̃)) is bounded by p(y);
    with the plain toy (p(y) of a few percent) the updates are smaller than the U(0, 1) initial scores and the
    ranking is decided by the seed."""
    toy = ToyLM(j=2)
    with torch.no_grad():
        toy.lm_head.weight.mul_(100.0)
    return lb.load(toy, tiny_tokenizer())


@pytest.mark.parametrize("replacement", ["uniform", "predictive"])
def test_toy_model_reagent_ranks_j_first(confident_toy, replacement):
    res0 = lb.attribute(confident_toy, "hello world the fox jumps", method="reagent", max_steps=1, n_probes=1,
                        progress=False)
    assert float(res0.f_value[0]) > -0.1  # log p(y) > -0.1: the toy is confident
    for seed in (0, 1, 2):  # not a lucky initialisation: every seed, both replacement rules
        res = lb.attribute(confident_toy, "hello world the fox jumps", method="reagent", max_steps=60, n_probes=8,
                           keep_top_n=1, top_k=1, replacement=replacement, seed=seed, progress=False)
        s = res.scores[0]
        others = s[torch.arange(len(s)) != 2]
        assert int(s.argmax()) == 2 and float(s[2]) > 2 * float(others.max()), (seed, s)


def test_ig_completeness_gap_shrinks_with_steps(tiny):
    m = tiny("llama")
    gaps = [abs(float(lb.attribute(m, PROMPT, n_steps=n, progress=False).completeness[0])) for n in (2, 8, 64)]
    assert gaps[2] <= gaps[0] and gaps[2] < 0.05, gaps
    mean_gap = lb.attribute(m, PROMPT, baseline="mean", progress=False).completeness[0]
    assert abs(float(mean_gap)) < 1e-3


def test_rollout_rows_sum_to_one_and_attention(tiny):
    m = tiny("gpt2")
    before = m.model.config._attn_implementation
    for method in ("rollout", "attention"):
        r = lb.attribute(m, PROMPT, method=method, generate=3, progress=False)
        assert r.scores.shape[0] == 3
        for k in range(3):  # every target row (its sources are the tokens before it) is a distribution
            row = r.scores[k][~torch.isnan(r.scores[k])]
            assert float(row.sum()) == pytest.approx(1.0, abs=1e-5) and bool((row >= 0).all())
    assert before != "eager" and m.model.config._attn_implementation == before  # eager only during the call


@pytest.mark.parametrize("method", ["occlusion", "saliency", "integrated_gradients"])
def test_generation_rows_equal_brute_force(tiny, method):
    """Each row of a generate=N result equals the method computed directly on that target's prefix (catches
    wrong position bookkeeping, e.g. when only the predicting positions are unembedded)."""
    m = tiny("llama")
    res = lb.attribute(m, PROMPT, method=method, generate=3, baseline="zero", n_steps=4, progress=False)
    full = res.input_ids
    W = m.embed_module.weight
    for k, P in enumerate(res.target_positions):
        y = int(full[P])
        e = m.embed_module(full[:P]).detach()

        def F(x, y=y):  # log p(y) at the end of embeddings x [B, P, d]
            return torch.log_softmax(m.model(inputs_embeds=x, use_cache=False).logits[:, -1].float(), -1)[:, y]
        if method == "occlusion":
            with torch.no_grad():
                x = e[None].repeat(P, 1, 1)
                x[torch.arange(P), torch.arange(P)] = 0
                ref = F(e[None]) - F(x)
        elif method == "saliency":
            x = e[None].clone().requires_grad_(True)
            ref = torch.autograd.grad(F(x).sum(), x)[0][0].norm(dim=-1)
        else:  # 4-node Gauss-Legendre on [0, 1], zero baseline
            nodes, wts = np.polynomial.legendre.leggauss(4)
            g = torch.zeros_like(e)
            for a, w in zip(0.5 * (nodes + 1), 0.5 * wts):
                x = (float(a) * e)[None].clone().requires_grad_(True)
                g += float(w) * torch.autograd.grad(F(x).sum(), x)[0][0]
            ref = (e * g).sum(-1)
        assert W.shape[1] == e.shape[1]
        assert torch.allclose(res.scores[k, :P], ref.detach(), rtol=1e-4, atol=1e-5), (k, res.scores[k, :P], ref)
        assert torch.isnan(res.scores[k, P:]).all()


@pytest.mark.parametrize("method", ["grad_x_input", "integrated_gradients", "occlusion"])
def test_contrastive_flips_sign(tiny, method):
    m = tiny("llama")
    a = lb.attribute(m, PROMPT, target="e", contrast="a", method=method, objective="logit", n_steps=16,
                     progress=False)
    b = lb.attribute(m, PROMPT, target="a", contrast="e", method=method, objective="logit", n_steps=16,
                     progress=False)
    assert torch.allclose(a.scores, -b.scores, atol=1e-5)
    assert a.contrast == "a"


def _captum_forward(m, target_id):
    def f(ids):
        return torch.log_softmax(m.model(input_ids=ids, use_cache=False).logits[:, -1].float(), -1)[:, target_id]
    return f


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_agrees_with_captum(tiny, arch):
    captum = pytest.importorskip("captum.attr")
    m = tiny(arch)
    # Captum's LayerIntegratedGradients baseline is an *input* baseline: token id 0 by default, i.e. the
    # embedding of token 0 — lensbench's baseline=0; and with a zero-vector baseline via the layer's baselines
    res = lb.attribute(m, PROMPT, method="integrated_gradients", baseline=0, progress=False)
    ids = res.input_ids[:-1][None]
    y = int(res.target_ids[0])
    lig = captum.LayerIntegratedGradients(_captum_forward(m, y), m.embed_module)
    ref = lig.attribute(ids, baselines=None, n_steps=50, internal_batch_size=16).sum(-1)[0]
    assert torch.allclose(res.scores[0], ref.float(), rtol=1e-4, atol=1e-5)
    ours = lb.attribute(m, PROMPT, method="integrated_gradients", baseline="zero", progress=False)
    ig = captum.IntegratedGradients(lambda e: torch.log_softmax(
        m.model(inputs_embeds=e, use_cache=False).logits[:, -1].float(), -1)[:, y])
    emb = m.embed_module(ids).detach()
    ref = ig.attribute(emb, baselines=torch.zeros_like(emb), n_steps=50, internal_batch_size=16).sum(-1)[0]
    assert torch.allclose(ours.scores[0], ref.float(), rtol=1e-4, atol=1e-5)
    sal = lb.attribute(m, PROMPT, method="saliency", progress=False)  # ‖∂F/∂e_i‖₂ = L2 of Captum's |grad|
    ref = captum.Saliency(lambda e: torch.log_softmax(m.model(inputs_embeds=e, use_cache=False).logits[:, -1]
                                                      .float(), -1)[:, y]).attribute(emb).norm(dim=-1)[0]
    assert torch.allclose(sal.scores[0], ref.float(), rtol=1e-4, atol=1e-6)
    gxi = lb.attribute(m, PROMPT, method="grad_x_input", progress=False)
    ref = captum.LayerGradientXActivation(_captum_forward(m, y), m.embed_module).attribute(ids).sum(-1)[0]
    assert torch.allclose(gxi.scores[0], ref.float(), rtol=1e-4, atol=1e-6)
    occ = lb.attribute(m, PROMPT, method="occlusion", progress=False)
    mask = torch.arange(ids.shape[1])[None, :, None].expand(1, -1, m.d_model)
    ref = captum.LayerFeatureAblation(_captum_forward(m, y), m.embed_module).attribute(
        ids, layer_baselines=0.0, layer_mask=mask)[0, :, 0]
    assert torch.allclose(occ.scores[0], ref.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["integrated_gradients", "grad_x_input"])
def test_bfloat16_gradients_in_float32_leave_the_model_untouched(tiny, method):
    """Under the upcast a bfloat16 model gives the attributions of a float32 copy of itself (up to float32
    reordering noise, atol 1e-5 on scores of order 1), and its parameters are the same tensors afterwards."""
    mb = tiny("llama", torch.bfloat16)
    before = {n: (p.dtype, p.data_ptr()) for n, p in mb.model.named_parameters()}
    r16 = lb.attribute(mb, PROMPT, target="e", method=method, n_steps=16, progress=False)
    assert {n: (p.dtype, p.data_ptr()) for n, p in mb.model.named_parameters()} == before
    assert r16.settings["upcast"] is True
    m32 = lb.load(copy.deepcopy(mb.model).float(), mb.tokenizer)
    r32 = lb.attribute(m32, PROMPT, target="e", method=method, n_steps=16, progress=False)
    assert r32.settings["upcast"] is False  # a float32 model needs none
    assert torch.allclose(r16.scores, r32.scores, atol=1e-5), (r16.scores - r32.scores).abs().max()
    raw = lb.attribute(mb, PROMPT, target="e", method=method, n_steps=16, upcast=False, progress=False)
    assert raw.settings["upcast"] is False and not torch.allclose(raw.scores, r32.scores, atol=1e-5)  # it matters


@pytest.mark.parametrize("method, kw, k", [
    ("integrated_gradients", dict(n_steps=8, internal_batch_size=4), 2),   # calls: node batches, then F(x), F(x')
    ("occlusion", dict(batch_size=4), 3),                                   # F(x), then batches of variants
    ("occlusion", dict(batch_size=4, baseline="remove"), 3),
    ("reagent", dict(batch_size=4, n_probes=4, max_steps=3), 3),            # p(y|x), then probe batches
])
def test_identical_results_after_an_injected_oom(tiny, method, kw, k):
    """An out-of-memory error in the k-th forward (a batched one) halves that batch and retries it: the same numbers
    up to float32 rounding (a CPU matmul over fewer rows may round the last bit differently: atol 1e-6)."""
    m = tiny("llama")
    assert m.capabilities["embeds_forward"]  # measured before counting calls
    count = OOMOnce(m.model, k=0)
    try:
        ref = lb.attribute(m, PROMPT, target="e", method=method, progress=False, **kw)
    finally:
        count.handle.remove()
    hook = OOMOnce(m.model, k=k)
    try:
        res = lb.attribute(m, PROMPT, target="e", method=method, progress=False, **kw)
    finally:
        hook.handle.remove()
    assert hook.fired and hook.calls > count.calls + 1  # the failed batch ran again, as two halves
    assert torch.allclose(res.scores, ref.scores, rtol=0, atol=1e-6, equal_nan=True), (res.scores - ref.scores)
    assert torch.allclose(res.f_value, ref.f_value, rtol=0, atol=1e-6)


def test_faithfulness_identical_after_an_injected_oom(toy):
    res = lb.attribute(toy, "hello world the fox jumps", method="occlusion", baseline="mean", progress=False)
    ref = lb.faithfulness(toy, res, n_samples=8, batch_size=4)
    hook = OOMOnce(toy.model, k=3)  # the first masked batch (after the full and the all-masked forwards)
    try:
        f = lb.faithfulness(toy, res, n_samples=8, batch_size=4)
    finally:
        hook.handle.remove()
    assert hook.fired and np.allclose(f["sufficiency"], ref["sufficiency"], rtol=0, atol=1e-6)
    assert all(np.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(f["deletion_curves"], ref["deletion_curves"]))


def test_other_backends_refuse_embedding_methods_and_run_reagent(tiny, monkeypatch):
    """Gradient, occlusion and attention methods need the raw model: a clear error naming the backend and the
    way back to 'hf'; ReAGent runs from token ids through the nnsight trace itself (counted), same numbers."""
    pytest.importorskip("nnsight")
    import lensbench.backends.nnsight as nnsight_backend
    m = tiny("llama")
    nn_m = lb.LensModel(m.model, m.tokenizer, backend="nnsight")
    for method in ("saliency", "integrated_gradients", "occlusion", "attention", "value_norm"):
        with pytest.raises(lb.InputError, match=r"backend='nnsight'.*lb\.load\(m\.model, m\.tokenizer\)"):
            lb.attribute(nn_m, PROMPT, method=method, progress=False)
    with pytest.raises(lb.InputError, match="does not route gradient"):
        lb.attribute(nn_m, PROMPT, method="grad_x_input", progress=False)
    ref = lb.attribute(m, PROMPT, method="reagent", generate=2, n_probes=4, max_steps=3, progress=False)
    with pytest.raises(lb.InputError, match="faithfulness.*backend='nnsight'"):
        lb.faithfulness(nn_m, ref)
    calls = []
    real = nnsight_backend.run
    monkeypatch.setattr(nnsight_backend, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = lb.attribute(nn_m, PROMPT, method="reagent", generate=2, n_probes=4, max_steps=3, progress=False)
    assert len(calls) >= 2 + 1 + 2  # greedy decoding (2), and per target its full forward and replaced probes
    assert torch.equal(res.input_ids, ref.input_ids)
    assert torch.allclose(res.scores.nan_to_num(0), ref.scores.nan_to_num(0), atol=1e-6)


def test_generation_attribution(tiny, tmp_path):
    m = tiny("llama")
    res = lb.attribute(m, PROMPT, method="saliency", generate=3, progress=False)
    T = len(m.encode(PROMPT))
    assert res.scores.shape == (3, T + 2) and len(res.target_tokens) == 3
    for k in range(3):
        assert torch.isfinite(res.scores[k, : T + k]).all() and torch.isnan(res.scores[k, T + k:]).all()
    again = lb.Result.load(res.save(tmp_path / "a"))
    assert again == res
    assert len(res.to_dataframe()) == sum(T + k for k in range(3))
    assert res.figure().data[0].type == "heatmap" and "lb-src" in res._repr_html_()


def test_faithfulness(toy):
    good = lb.attribute(toy, "hello world the fox jumps", method="occlusion", baseline="mean", progress=False)
    f = lb.faithfulness(toy, good, n_samples=32)
    # the true cause kept alone suffices, dropped alone destroys the prediction
    assert f["comprehensiveness_mean"] > f["comprehensiveness_random_mean"]
    assert f["sufficiency_mean"] > f["sufficiency_random_mean"]
    curve = f["deletion_curves"][0]
    assert curve[1] < curve[0] and curve[1] == pytest.approx(curve[-1], abs=1e-4)  # deleting j is all that matters


@pytest.mark.parametrize("kw, match", [
    (dict(method="magic"), "method"), (dict(objective="loss"), "objective"),
    (dict(target="e", contrast="e"), "same token"), (dict(generate=-1), "generate"),
    (dict(target="e", generate=2), "not both"), (dict(n_steps=0), "n_steps"),
    (dict(baseline="weird"), "baseline"), (dict(method="reagent", replacement="mlm"), "replacement"),
])
def test_bad_arguments(tiny, kw, match):
    with pytest.raises(lb.InputError, match=match):
        lb.attribute(tiny("llama"), PROMPT, progress=False, **kw)


def test_value_norm_matches_a_hand_written_decomposition(tiny):
    """‖Σ_h α^h x W_V^h W_O^h‖ recomputed by hand from the attention weights and projection matrices."""
    m = tiny("llama")
    res = lb.attribute(m, PROMPT, method="value_norm", progress=False)
    ids = res.input_ids[:-1]
    attn = m.blocks[-1].self_attn
    store = {}
    h = attn.register_forward_pre_hook(lambda _m, a, kw: store.__setitem__("x", kw["hidden_states"]),
                                       with_kwargs=True)
    m.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = m.model(input_ids=ids[None], output_attentions=True, use_cache=False)
    finally:
        h.remove()
        m.model.set_attn_implementation("sdpa")
    A = out.attentions[-1][0]                      # [H, T, T]
    x = store["x"][0]
    H, hd = m.model.config.num_attention_heads, m.model.config.head_dim
    v = attn.v_proj(x).view(len(ids), -1, hd).repeat_interleave(H // m.model.config.num_key_value_heads, 1)
    manual = torch.zeros(len(ids))
    for i in range(len(ids)):
        vec = sum(A[hh, -1, i] * attn.o_proj.weight[:, hh * hd:(hh + 1) * hd] @ v[i, hh] for hh in range(H))
        manual[i] = vec.norm()
    assert torch.allclose(res.scores[0], manual, rtol=1e-4, atol=1e-6)
    with pytest.raises(lb.InputError, match="fuses"):
        lb.attribute(tiny("gpt2"), PROMPT, method="value_norm", progress=False)

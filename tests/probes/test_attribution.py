"""Token attribution: completeness, a toy model with a known answer, rollout, contrast, Captum agreement."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn
from transformers import PretrainedConfig

import lensbench as lb
from lensbench.plots._common import _clean
from lensbench.probes import attribution as A
from lensbench.testing import OOMOnce, tiny_tokenizer
from lensbench.validation import Interval

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


def _options(method: str, **kw) -> dict:
    """The options of ``kw`` that ``method`` takes (an option it does not take is refused by name)."""
    return {k: v for k, v in kw.items() if k in A.method_class(method).option_names()}


@pytest.fixture(scope="module")
def toy():
    return lb.load(ToyLM(j=2), tiny_tokenizer())


@pytest.mark.parametrize("method", ["saliency", "grad_x_input", "integrated_gradients", "occlusion"])
def test_toy_model_only_token_j_matters(toy, method):
    res = lb.attribute(toy, "hello world the fox jumps", method=method, progress=False,
                       **_options(method, baseline="mean"))
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
                           keep_top_n=1, stopping_top_k=1, replacement=replacement, seed=seed, progress=False)
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
    res = lb.attribute(m, PROMPT, method=method, generate=3, progress=False,
                       **_options(method, baseline="zero", n_steps=4))
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
    a = lb.attribute(m, PROMPT, target="e", contrast="a", method=method, objective="logit",
                     progress=False, **_options(method, n_steps=16))
    b = lb.attribute(m, PROMPT, target="a", contrast="e", method=method, objective="logit",
                     progress=False, **_options(method, n_steps=16))
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
    r16 = lb.attribute(mb, PROMPT, target="e", method=method, progress=False, **_options(method, n_steps=16))
    assert {n: (p.dtype, p.data_ptr()) for n, p in mb.model.named_parameters()} == before
    assert r16.settings["upcast"] is True
    m32 = lb.load(copy.deepcopy(mb.model).float(), mb.tokenizer)
    r32 = lb.attribute(m32, PROMPT, target="e", method=method, progress=False, **_options(method, n_steps=16))
    assert r32.settings["upcast"] is False  # a float32 model needs none
    assert torch.allclose(r16.scores, r32.scores, atol=1e-5), (r16.scores - r32.scores).abs().max()
    raw = lb.attribute(mb, PROMPT, target="e", method=method, upcast=False, progress=False,
                       **_options(method, n_steps=16))
    assert raw.settings["upcast"] is False and not torch.allclose(raw.scores, r32.scores, atol=1e-5)  # it matters


@pytest.mark.parametrize("method, kw, k", [
    ("integrated_gradients", dict(n_steps=8, batch_size=4), 2),            # calls: node batches, then F(x), F(x')
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


# ------------------------------------------------------------------------------------------------ the registry
BUILTIN = ("saliency", "grad_x_input", "integrated_gradients", "occlusion", "attention", "rollout", "value_norm",
           "reagent")


def test_methods_are_registered_objects(tiny):
    assert tuple(A.METHODS) == BUILTIN and A.METHODS == BUILTIN and "reagent" in A.METHODS
    assert tuple(A.GRADIENT_METHODS) == ("saliency", "grad_x_input", "integrated_gradients")
    assert tuple(A.LINEAR_METHODS) == ("grad_x_input", "integrated_gradients", "occlusion")
    assert [A.method_class(n).name for n in BUILTIN] == list(BUILTIN)
    ig = A.get_method("integrated_gradients", n_steps=8)
    assert isinstance(ig, A.IntegratedGradients) and ig.options() == {"n_steps": 8, "baseline": None,
                                                                      "batch_size": "auto"}
    assert A.ReAGent().stopping_top_k == 3 and A.Occlusion().baseline == "zero"
    m = tiny("llama")
    by_name = lb.attribute(m, PROMPT, method="integrated_gradients", n_steps=8, progress=False)
    by_object = lb.attribute(m, PROMPT, method=ig, progress=False)
    replaced = lb.attribute(m, PROMPT, method=A.IntegratedGradients(n_steps=3), n_steps=8, progress=False)
    assert by_name == by_object == replaced and by_name.settings["n_steps"] == 8
    occ = lb.attribute(m, PROMPT, method=A.Occlusion(baseline="remove"), progress=False)
    assert occ.method == "occlusion" and occ.baseline == "remove"
    assert occ == lb.attribute(m, PROMPT, method="occlusion", baseline="remove", progress=False)


def test_a_registered_method_runs_through_attribute(tiny):
    @dataclasses.dataclass
    class Position(A.AttributionMethod):
        """Source i scores weight × i (no model pass)."""

        name: ClassVar[str] = "position_test"
        needs: ClassVar[str] = "ids"
        parameter_constraints: ClassVar[dict] = {"weight": [Interval(float, 0, None)]}
        weight: float = 1.0

        def run(self, m, ids, targets, call):
            scores = torch.full((len(targets), len(ids) - 1), float("nan"))
            for k, (p, _) in enumerate(targets):
                scores[k, :p] = self.weight * torch.arange(p, dtype=torch.float32)
            return A.Scores(scores, torch.zeros(len(targets)))

    m = tiny("llama")
    A.register(Position)
    try:
        assert "position_test" in A.METHODS and A.METHODS[-1] == "position_test"
        r = lb.attribute(m, PROMPT, method="position_test", weight=2.0, generate=2, progress=False)
        assert r.method == "position_test" and r.settings["weight"] == 2.0
        P = r.target_positions[1]
        assert torch.equal(r.scores[1, :P], 2 * torch.arange(P, dtype=torch.float32))
        with pytest.raises(lb.InputError, match=r"weight=-1 is not allowed; weight must be a number >= 0"):
            lb.attribute(m, PROMPT, method="position_test", weight=-1, progress=False)
        with pytest.raises(lb.InputError, match="takes no option n_steps="):
            lb.attribute(m, PROMPT, method="position_test", n_steps=3, progress=False)
        other = dataclasses.make_dataclass("Other", [], bases=(Position,))
        with pytest.raises(lb.InputError, match="'position_test' exists"):
            A.register(other)
        assert A.register(other, replace=True) is other and A.method_class("position_test") is other
    finally:
        A.unregister("position_test")
    assert tuple(A.METHODS) == BUILTIN
    with pytest.raises(lb.InputError, match=r"method='position_test' is unknown"):
        lb.attribute(m, PROMPT, method="position_test", progress=False)


@pytest.mark.parametrize("method, kw, option", [
    ("saliency", dict(n_steps=8), "n_steps"), ("saliency", dict(baseline="zero"), "baseline"),
    ("occlusion", dict(n_probes=4), "n_probes"), ("integrated_gradients", dict(ratio=0.5), "ratio"),
    ("integrated_gradients", dict(n_stpes=8), "n_stpes"), ("rollout", dict(batch_size=4), "batch_size"),
])
def test_an_option_the_method_does_not_take_is_refused_by_name(tiny, method, kw, option):
    with pytest.raises(lb.InputError, match=rf"attribute: method='{method}' takes no option {option}="):
        lb.attribute(tiny("llama"), PROMPT, method=method, progress=False, **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(n_steps=0), r"attribute\(method='integrated_gradients'\): n_steps=0 is not allowed; n_steps must be "
                      r"an int >= 1\."),
    (dict(n_steps=2.5), r"n_steps=2\.5 is not allowed"),
    (dict(batch_size="big"), r"batch_size='big' is not allowed; batch_size must be an int >= 1 or one of 'auto'"),
    (dict(method="occlusion", batch_size=0), r"batch_size=0 is not allowed"),
    (dict(method="occlusion", baseline="weird"), r"baseline='weird' is not allowed; baseline must be None or one of"),
    (dict(method="reagent", ratio=1.5), r"ratio=1\.5 is not allowed; ratio must be a number in \(0, 1\)"),
    (dict(method="reagent", stopping_top_k=0), r"stopping_top_k=0 is not allowed"),
    (dict(method="reagent", on_unconverged="maybe"), r"on_unconverged='maybe' is not allowed; on_unconverged must "
                                                     r"be one of 'flag', 'raise'"),
    (dict(method="reagent", mlm="bert"), r"mlm='bert' is not allowed; mlm must be None or a callable"),
    (dict(objective="loss"), r"attribute: objective='loss' is not allowed; objective must be one of 'logit', "
                             r"'logprob', 'prob'"),
    (dict(generate=-1), r"attribute: generate=-1 is not allowed; generate must be an int >= 0"),
    (dict(seed=None), r"attribute: seed=None is not allowed"),
    (dict(progress="yes"), r"progress='yes' is not allowed; progress must be True or False"),
])
def test_bad_values_name_parameter_value_and_allowed(tiny, kw, message):
    with pytest.raises(lb.InputError, match=message):
        lb.attribute(tiny("llama"), PROMPT, **{"progress": False, **kw})


def test_method_objects_check_their_own_options():
    with pytest.raises(lb.InputError, match=r"IntegratedGradients: n_steps=0 is not allowed"):
        A.IntegratedGradients(n_steps=0)
    with pytest.raises(lb.InputError, match=r"ReAGent: ratio=0 is not allowed"):
        A.ReAGent(ratio=0)
    with pytest.raises(lb.InputError, match=r"replacement='mlm' needs mlm="):
        A.ReAGent(replacement="mlm")
    assert A.Occlusion(baseline=np.int64(3)).baseline == 3 and type(A.Occlusion(baseline=np.int64(3)).baseline) is int


@pytest.mark.parametrize("method, old, new, value, kw", [
    ("integrated_gradients", "internal_batch_size", "batch_size", 3, dict(n_steps=8)),
    ("reagent", "top_k", "stopping_top_k", 1, dict(n_probes=4, max_steps=3, keep_top_n=2)),
])
def test_old_option_names_warn_and_give_identical_numbers(tiny, method, old, new, value, kw):
    m = tiny("llama")
    with pytest.warns(FutureWarning, match=rf"attribute: {old}= is renamed {new}=") as caught:
        a = lb.attribute(m, PROMPT, method=method, progress=False, **kw, **{old: value})
    assert any(w.filename == __file__ for w in caught if issubclass(w.category, FutureWarning))  # the caller's line
    b = lb.attribute(m, PROMPT, method=method, progress=False, **kw, **{new: value})
    assert a == b and a.settings[new] == value and old not in a.settings
    with pytest.raises(lb.InputError, match=rf"pass {new}= only"):
        lb.attribute(m, PROMPT, method=method, progress=False, **kw, **{old: value, new: value})
    with pytest.raises(lb.InputError, match=rf"\b{old}=0 is not allowed"):  # named as the caller wrote it
        lb.attribute(m, PROMPT, method=method, progress=False, **kw, **{old: 0})


def test_ig_batch_size_changes_no_number(tiny):
    """Interpolation steps per pass: every batching sums the same nodes in node order."""
    m = tiny("llama")
    ref = lb.attribute(m, PROMPT, n_steps=8, batch_size=1, generate=2, progress=False)
    for bs in (3, 8, 50, "auto"):
        r = lb.attribute(m, PROMPT, n_steps=8, batch_size=bs, generate=2, progress=False)
        assert torch.allclose(r.scores, ref.scores, rtol=0, atol=1e-6, equal_nan=True), bs
        assert torch.allclose(r.completeness, ref.completeness, rtol=0, atol=1e-6), bs


def test_warnings_point_at_the_caller(tiny):
    m = tiny("llama")
    with pytest.warns(A.CompletenessWarning) as caught:
        lb.attribute(m, PROMPT, baseline="zero", n_steps=1, progress=False)
    assert caught[0].filename == __file__
    with pytest.warns(A.ConvergenceWarning) as caught:
        lb.attribute(m, PROMPT, method="reagent", max_steps=1, n_probes=2, stopping_top_k=1, keep_top_n=1,
                     progress=False)
    assert caught[0].filename == __file__


# ------------------------------------------------------------------------------------------------ views
def test_attribution_figures_show_the_result(tiny):
    m = tiny("llama")
    res = lb.attribute(m, PROMPT, method="saliency", generate=3, progress=False)
    labels = [f"{i}:{_clean(t)}" for i, t in enumerate(res.source_tokens)]
    heat = res.figure()
    assert heat.data[0].type == "heatmap" and list(heat.data[0].x) == labels
    np.testing.assert_array_equal(np.asarray(heat.data[0].z, dtype=float), res.normalized().numpy())
    assert list(heat.data[0].y) == [f"{p}:{_clean(t)}" for p, t in zip(res.target_positions, res.target_tokens)]
    bars = res.figure(target=1)
    assert bars.data[0].type == "bar" and list(bars.data[0].x) == labels
    np.testing.assert_array_equal(np.asarray(bars.data[0].y, dtype=float), res.scores[1].numpy())
    assert repr(res.target_tokens[1]) in bars.layout.title.text
    html = res._repr_html_()  # the last target: one span per source, a score title on those before it
    assert html.count("class='lb-src'") == len(res.source_tokens)
    assert f"title='{float(res.scores[-1, 0]):.4g}'" in html


def test_faithfulness_result_is_a_result_and_the_old_mapping(tiny, tmp_path):
    m = tiny("llama")
    res = lb.attribute(m, PROMPT, method="saliency", generate=2, progress=False)
    f = lb.faithfulness(m, res, n_samples=4)
    assert isinstance(f, A.FaithfulnessResult) and isinstance(f, Mapping)
    scores = ["sufficiency", "comprehensiveness", "sufficiency_random", "comprehensiveness_random", "kept",
              "kept_random"]
    assert list(f) == [*scores, *(s + "_mean" for s in scores), "sufficiency_ratio", "comprehensiveness_ratio",
                       "deletion_curves"]
    for s in scores:
        assert f[s].shape == (2,) and f[s + "_mean"] == float(f[s].mean())
    assert f["sufficiency_ratio"] == f["sufficiency_mean"] / max(f["sufficiency_random_mean"], 1e-9)
    curves = f["deletion_curves"]  # k = 0..P tokens deleted, P the target's number of sources
    assert [len(c) for c in curves] == [p + 1 for p in res.target_positions]
    assert all(np.isfinite(c).all() for c in curves) and np.isnan(f.deletion[0, -1])
    assert dict(f.items())["kept"] is f.kept and "deletion_curves" in f and f.get("nope") is None
    again = lb.Result.load(f.save(tmp_path / "f"))
    assert again == f and all(np.array_equal(a, b) for a, b in zip(again["deletion_curves"], curves))
    df = f.to_dataframe()
    assert list(df.columns) == ["target", "target_token", *scores] and list(df["target_token"]) == res.target_tokens
    assert df["sufficiency"].tolist() == f["sufficiency"].tolist()
    fig = f.figure()
    assert list(fig.data[0].y) == [f["sufficiency_mean"], f["comprehensiveness_mean"]]
    assert list(fig.data[1].y) == [f["sufficiency_random_mean"], f["comprehensiveness_random_mean"]]
    for k, c in enumerate(curves):
        assert list(fig.data[2 + k].y) == c.tolist() and list(fig.data[2 + k].x) == list(range(len(c)))
    html = f._repr_html_()
    assert "FaithfulnessResult" in html and f"{f['comprehensiveness_mean']:.3f}" in html


@pytest.mark.parametrize("kw, message", [
    (dict(n_samples=0), r"faithfulness: n_samples=0 is not allowed; n_samples must be an int >= 1"),
    (dict(random="magic"), r"random='magic' is not allowed; random must be one of 'permute', 'uniform'"),
    (dict(batch_size=0), r"batch_size=0 is not allowed"), (dict(max_k=0), r"max_k=0 is not allowed"),
    (dict(result="not a result"), r"result='not a result' is not allowed; result must be an AttributionResult"),
])
def test_faithfulness_refuses_bad_values_by_name(tiny, kw, message):
    m = tiny("llama")
    res = lb.attribute(m, PROMPT, method="saliency", progress=False)
    with pytest.raises(lb.InputError, match=message):
        lb.faithfulness(m, **{"result": res, **kw})

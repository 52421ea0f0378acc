"""Issue 13 ("faithful numbers") for attribution, each against an independent reference: IG completeness of the
default baseline (F from plain forwards of the raw HF model; Captum), occlusion by deletion (brute force on the
raw model), ReAGent's convergence flag and refusals, faithfulness's size-matched random control."""

from __future__ import annotations

import warnings

import pytest
import torch

import lensbench as lb
from lensbench.probes import attribution as A
from lensbench.probes.attribution import faithful
from lensbench.testing import ARCHITECTURES

PROMPT = "The capital of France is"
DEFAULT_PROMPTS = ["The capital of France is", "The Eiffel Tower is a famous landmark in the city of",
                   "When Mary and John went to the store, John gave a drink to"]


def _raw_logprob(m, embeds: torch.Tensor, y: int) -> float:
    """log p(y) at the last position from a plain forward of the raw HF model on embeddings [P, d]."""
    with torch.no_grad():
        lg = m.model(inputs_embeds=embeds[None].to(m.model.dtype), use_cache=False).logits[0, -1].float()
    return float(torch.log_softmax(lg, -1)[y])


def _check_completeness(m, text):
    with warnings.catch_warnings():
        warnings.simplefilter("error", A.CompletenessWarning)  # the default must not warn about itself
        res = lb.attribute(m, text, progress=False)
    assert res.baseline == A.DEFAULT_BASELINE and res.settings["n_steps"] == 50
    P, y = res.target_positions[0], int(res.target_ids[0])
    x = m.model.get_input_embeddings()(res.input_ids[:P].to(m.input_device)).detach().float()
    xb = res.baseline_embeds[0, :P]
    assert torch.isfinite(xb).all() and torch.isnan(res.baseline_embeds[0, P:]).all()
    dF = _raw_logprob(m, x, y) - _raw_logprob(m, xb, y)
    gap = float(res.scores[0].nansum()) - dF
    assert abs(gap) <= 0.05 * abs(dF), (text, gap, dF)
    assert float(res.completeness[0]) == pytest.approx(gap, abs=1e-3 + 1e-3 * abs(dF))
    return res


# F is not smooth in the embeddings here: hard top-k expert routing (MoE) and xLSTM's max-stabilised exponential
# gating switch along the path. bench/RESULTS-ig-baselines.md: every candidate baseline misses 5% on them.
NONSMOOTH = {"mixtral", "olmoe", "deepseek_v3", "deepseek_v4", "xlstm"}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_ig_default_baseline_completeness_matrix(tiny, arch):
    m = tiny(arch)
    if not m.capabilities["embeds_forward"]:  # DeepSeek-V4 routes on ids, Gemma3n adds per-layer token embeddings
        with pytest.raises(lb.InputError, match="cannot run from them"):
            lb.attribute(m, PROMPT, progress=False)
        return
    if arch in NONSMOOTH:  # no baseline can give completeness: the result must say so
        with pytest.warns(A.CompletenessWarning):
            lb.attribute(tiny(arch), PROMPT, progress=False)
        return
    _check_completeness(tiny(arch), PROMPT)


@pytest.mark.slow
def test_ig_default_baseline_completeness_default_model(default_model):
    for text in DEFAULT_PROMPTS:
        _check_completeness(default_model, text)
    with pytest.warns(A.CompletenessWarning, match="zero baseline"):  # Captum's zero baseline: a 1189% gap
        r = lb.attribute(default_model, PROMPT, baseline="zero", progress=False)
    assert abs(float(r.relative_gap[0])) > 0.05 and r.baseline == "zero"


def test_ig_default_baseline_equals_captum(tiny):
    """The same path (the recorded baseline) through Captum's IntegratedGradients (Gauss-Legendre, 50 steps)."""
    captum = pytest.importorskip("captum.attr")
    m = tiny("llama")
    res = lb.attribute(m, PROMPT, progress=False)
    P, y = res.target_positions[0], int(res.target_ids[0])
    emb = m.embed_module(res.input_ids[None, :P]).detach()
    ig = captum.IntegratedGradients(lambda e: torch.log_softmax(
        m.model(inputs_embeds=e, use_cache=False).logits[:, -1].float(), -1)[:, y])
    ref, delta = ig.attribute(emb, baselines=res.baseline_embeds[:, :P], n_steps=50, method="gausslegendre",
                              internal_batch_size=16, return_convergence_delta=True)
    assert torch.allclose(res.scores[0], ref.sum(-1)[0].float(), rtol=1e-4, atol=1e-5)
    assert float(res.completeness[0]) == pytest.approx(float(delta[0]), abs=1e-4)


def test_result_records_baseline_and_round_trips(tiny, tmp_path):
    m = tiny("llama")
    res = lb.attribute(m, PROMPT, generate=2, n_steps=8, progress=False)
    assert res.baseline == "scaled_mean_first" and res.baseline_embeds.shape == (2, res.scores.shape[1], m.d_model)
    assert torch.equal(res.baseline_embeds[0, 0], m.embed_module(res.input_ids[:1])[0].detach())  # first kept
    rebuilt = A.baseline_embedding(m, res.input_ids[: res.target_positions[1]], res.baseline).float()
    assert torch.allclose(res.baseline_embeds[1, : len(rebuilt)], rebuilt)
    assert lb.Result.load(res.save(tmp_path / "r")) == res
    assert lb.attribute(m, PROMPT, method="occlusion", progress=False).baseline == "zero"  # occlusion unchanged
    with pytest.warns(A.CompletenessWarning):
        lb.attribute(m, PROMPT, baseline="zero", n_steps=1, progress=False)


def test_occlusion_remove_equals_brute_force_deletion(tiny):
    """Every source of every generated target: F(x) − F(x without token i), plain forwards on the raw model."""
    m = tiny("llama")
    res = lb.attribute(m, PROMPT, method="occlusion", baseline="remove", generate=3, progress=False)
    full = res.input_ids

    def F(ids, y):
        with torch.no_grad():
            lg = m.model(input_ids=ids[None], use_cache=False).logits[0, -1].float()
        return float(torch.log_softmax(lg, -1)[y])
    for k, P in enumerate(res.target_positions):
        y = int(full[P])
        f0 = F(full[:P], y)
        ref = torch.tensor([f0 - F(torch.cat([full[:i], full[i + 1:P]]), y) for i in range(P)])
        assert torch.allclose(res.scores[k, :P], ref, atol=1e-4), (k, res.scores[k, :P], ref)


def test_reagent_flags_unconverged_and_refuses_contrast(tiny):
    m = tiny("llama")
    with pytest.warns(A.ConvergenceWarning, match="none of the 2 probes"):
        r = lb.attribute(m, PROMPT, method="reagent", max_steps=1, n_probes=2, stopping_top_k=1, keep_top_n=1,
                         progress=False)
    assert r.settings["converged"] == [0]
    with pytest.raises(lb.LensbenchError, match="stopping rule"):
        lb.attribute(m, PROMPT, method="reagent", max_steps=1, n_probes=2, stopping_top_k=1, keep_top_n=1,
                     on_unconverged="raise", progress=False)
    with pytest.raises(lb.InputError, match="contrast"):
        lb.attribute(m, PROMPT, method="reagent", target="e", contrast="a", progress=False)
    with pytest.raises(lb.InputError, match="logit"):
        lb.attribute(m, PROMPT, method="reagent", objective="logit", progress=False)


def test_faithfulness_random_control_keeps_as_many_tokens(tiny, monkeypatch):
    """The random control's keep probabilities sum to the method's (same expected number of kept tokens)."""
    m = tiny("llama")
    res = lb.attribute(m, PROMPT, method="grad_x_input", progress=False)
    seen = []
    real = faithful._masked_distance

    def spy(m_, ek, p_full, prob_keep, n_samples, g, **kw):
        seen.append(float(prob_keep.sum(-1).float().mean()))  # expected kept tokens per mask
        return real(m_, ek, p_full, prob_keep, n_samples, g, **kw)
    monkeypatch.setattr(faithful, "_masked_distance", spy)
    f = lb.faithfulness(m, res, n_samples=4)
    suff, comp, suff_rnd, comp_rnd = seen[:4]
    assert suff_rnd == pytest.approx(suff, abs=1e-5) and comp_rnd == pytest.approx(comp, abs=1e-5)
    assert f["kept"][0] == pytest.approx(f["kept_random"][0], abs=1e-5)


def test_explorer_and_report_show_the_baseline(tiny):
    pytest.importorskip("ipywidgets")
    from lensbench.widgets import AttributionExplorer
    ex = AttributionExplorer(tiny("llama"), PROMPT, methods=("integrated_gradients", "saliency"), generate=2,
                             method_options={"integrated_gradients": {"n_steps": 8}})
    assert "scaled_mean_first" in ex.baseline_info.value and "completeness gap" in ex.baseline_info.value

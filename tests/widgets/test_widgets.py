"""Explorers as Python objects: interactions redraw from held results and never re-run the model."""

from __future__ import annotations

import pytest
import torch

import lensbench as lb


@pytest.fixture()
def counted(tiny):
    m = tiny("llama")
    assert m.capabilities  # measured once per model with forward passes of its own, before anything is counted
    calls = {"n": 0}
    h = m.model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    yield m, calls
    h.remove()


def test_widgets_import_under_lensbench_namespace():
    from lensbench.widgets import LogitLensExplorer
    assert LogitLensExplorer.__module__ == "lensbench.widgets.lens"


def test_explorer_interactions_do_not_run_the_model(counted):
    from lensbench.widgets import LogitLensExplorer
    m, calls = counted
    tuned = lb.TunedLens.identity(m)
    tuned.b += 0.3  # a translator that visibly changes the readout
    ex = LogitLensExplorer(m, "The capital of France is Paris", tuned=tuned)
    after_build = calls["n"]
    assert after_build == 2  # one pass per lens
    z0 = ex.heatmap.data[0].z
    res = ex.results["logit"]
    assert len(z0) == m.n_layers + 1 and torch.allclose(torch.tensor(z0), res.top_probs[..., 0].double())
    ex.stat.value = "entropy"
    assert torch.allclose(torch.tensor(ex.heatmap.data[0].z), res.entropy.double())
    ex.target.value = "e"
    assert ex.stat.value == "target_prob" and ex.current.target == "e"
    direct = lb.logit_lens(m, "The capital of France is Paris", target="e", progress=False)
    calls["n"] -= 1
    assert torch.allclose(torch.tensor(ex.heatmap.data[0].z), direct.target_prob.double(), atol=1e-6)
    ex.layer.value = 1
    ex.position.value = 2
    assert ex.topk_fig.layout.title.text.startswith("layer 1 · pos 2")
    assert list(ex.topk_fig.data[0].x)[::-1] == pytest.approx(res.top_probs[1, 2].tolist())
    ex.lens_switch.value = "tuned"
    assert ex.heatmap.layout.title.text.startswith("tuned lens")
    assert calls["n"] == after_build  # nothing above ran the model


def test_explorer_bad_input_shows_message(counted):
    from lensbench.widgets import LogitLensExplorer
    m, _ = counted
    ex = LogitLensExplorer(m, "hello world")
    ex.target.value = "several tokens here"
    assert "tokens" in ex.error.value and "⚠" in ex.error.value
    ex.text_box.value = "   "
    ex.run()
    assert "empty" in ex.error.value
    assert ex.heatmap.data  # the previous heatmap stays


def test_explorer_compare_two_texts(counted):
    from lensbench.widgets import LogitLensExplorer
    m, _ = counted
    ex = LogitLensExplorer(m, "hello world", compare="Le chat est noir")
    assert ex.compare_heatmap.data and ex.compare_heatmap.layout.title.text.startswith("compare")
    assert len(ex.compare_heatmap.data[0].x) == len(ex.compare_results["logit"].tokens)


def test_geometry_explorer_views_without_model_passes(tiny):
    from lensbench.widgets import GeometryExplorer
    m = tiny("llama")
    texts = [t[:500] for t in lb.sample_texts(4)]
    ex = GeometryExplorer(m, texts, shuffle_levels=(0, 2))
    calls = {"n": 0}
    h = m.model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        seen = set()
        for _, v in ex.view.options:
            ex.view.value = v
            assert ex.error.value == "", (v, ex.error.value)
            seen.add(ex.fig.layout.title.text)
        ex.view.value = "id"
        ex.estimator.value = "twonn"
        direct = lb.intrinsic_dimension(m, ex.capture, estimator="twonn")
        assert list(ex.fig.data[0].y) == pytest.approx(direct.values[0].tolist())
        ex.view.value = "scatter"
        ex.layer.value = 1
        assert "layer 1" in ex.fig.layout.title.text and "Pearson" in ex.fig.layout.title.text
    finally:
        h.remove()
    assert calls["n"] == 0 and len(seen) == len(ex.view.options)


def test_attribution_explorer_target_click(tiny):
    from lensbench.widgets import AttributionExplorer
    m = tiny("llama")
    ex = AttributionExplorer(m, "The capital of France is", methods=("saliency", "occlusion"), generate=3)
    assert len(ex.target_buttons.options) == 3
    before = ex.main.value
    ex.target_buttons.value = 0
    assert ex.main.value != before and ex.results["saliency"].target_tokens[0] in ex.main.value
    ex.method.value = "occlusion"
    assert "occlusion" in ex.main.value and "saliency" in ex.multiples.value
    ex.compute_faithfulness(n_samples=2)
    assert "soft sufficiency" in ex.faith.value and "occlusion" in ex.faith.value
    bad = AttributionExplorer(m, "   ", methods=("saliency",))
    assert "empty" in bad.error.value

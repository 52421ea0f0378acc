"""The Workbench as a Python object: links really retarget, Cancel stops a job, bad input becomes a message,
pure UI interactions never run the model; plus the offline report and the generated API page."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lensbench as lb
from lensbench.testing import GatedForward

ROOT = Path(__file__).resolve().parents[2]
TEXT = "The capital of France is Paris"
FAST = {"attribution": {"methods": ("saliency", "occlusion")}, "geometry": {"shuffle_levels": ()}}


def _counter(m):
    calls = {"n": 0}
    h = m.model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    return calls, h


def _workbench(m, **kw):
    from lensbench.widgets import Workbench
    wb = Workbench(m, TEXT, options=FAST, **kw)
    assert wb.wait(120), "the first job did not finish"
    assert wb.message.value == "", wb.message.value
    return wb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_lens_position_jumps_to_its_attribution(tiny, dtype):
    m = tiny("llama", dtype)
    wb = _workbench(m)
    assert "lb-workbench" in wb._dom_classes and set(wb.explorers) == {"lens"}
    lens = wb.explorers["lens"]
    # the heatmap's synced state holds the whole figure (a late-loading front end must not draw an empty plot)
    assert len(lens.heatmap._widget_data) == 1
    assert torch.allclose(torch.as_tensor(lens.heatmap._widget_data[0]["z"]), torch.as_tensor(lens.heatmap.data[0].z))
    toks = wb.tokens()
    assert lens.results["logit"].tokens == toks
    calls, h = _counter(m)
    try:
        p = 3
        lens.position.value = p  # the user picks a token in the lens: pure UI
        assert wb.position == p and wb.to_attribution.description == f"Attribute position {p} →"
        assert calls["n"] == 0
        wb.jump_to_attribution()
        assert wb.tabs.selected_index == 2 and wb.wait(120), wb.message.value
    finally:
        h.remove()
    assert wb.message.value == ""
    att = wb.explorers["attribution"]
    res = att.results["saliency"]
    # the attribution explains the prediction made at lens position p: sources are tokens 0..p, target token p+1
    assert res.source_tokens == toks[:p + 1] and res.target_tokens == [toks[p + 1]]
    prefix, target = wb.prediction_at(p)
    direct = lb.attribute(m, prefix, target=target, method="saliency", progress=False)
    assert torch.allclose(res.scores, direct.scores)
    # switching back to the (built) lens tab and again to attribution runs nothing
    calls, h = _counter(m)
    try:
        wb.select_tab("lens")
        wb.select_tab("attribution")
        assert not wb.busy and calls["n"] == 0
    finally:
        h.remove()
    # jumping from another position retargets: the last position explains the model's greedy next token
    wb.jump_to_attribution(len(toks) - 1)
    assert wb.wait(120) and lens.position.value == len(toks) - 1
    res = wb.explorers["attribution"].results["saliency"]
    greedy = m.to_str_tokens([int(lb.logit_lens(m, TEXT, progress=False).top_ids[-1, -1, 0])])[0]
    assert res.source_tokens == toks and res.target_tokens == [greedy]


def test_lens_position_jumps_to_its_criticality(tiny):
    m = tiny("llama")
    wb = _workbench(m, tabs=["lens", "criticality"])
    toks = wb.tokens()
    p = 5
    wb.explorers["lens"].position.value = p
    assert wb.to_critical.description == f"Criticality of token {p} →"
    wb.options["critical"] = {"n_samples": 4, "max_new_tokens": 4}
    wb.jump_to_criticality()
    assert wb.wait(120) and wb.message.value == "", wb.message.value
    res = wb.explorers["criticality"].result
    # the prompt is the text before token p, the response starts with token p, and only token p is evaluated
    assert res.units == toks[p:] and res.evaluated == [0]
    assert not torch.isnan(res.keep_acc[0]) and torch.isnan(res.keep_acc[1:]).all()
    assert res.keep_success[0] == round(float(res.keep_acc[0]) * 4)
    wb.jump_to_criticality(0)  # nothing before token 0 to prompt with: a message, no traceback
    assert wb.wait(60) and "prompt token" in wb.message.value


def test_filler_tab_ablates_the_text(tiny):
    m = tiny("llama")
    opts = {"filler": {"items": lb.tasks.factual()[:2], "fillers": (" .",), "counts": (0, 4)}}
    from lensbench.widgets import Workbench
    text = " ".join([TEXT + "."] * 4)  # 28 words/punctuation marks: long enough to be ablated itself
    wb = Workbench(m, text, tabs=["lens", "filler"], options=opts)
    assert wb.wait(120)
    wb.select_tab("filler")
    assert wb.wait(300) and wb.message.value == "", wb.message.value
    ex = wb.explorers["filler"]
    assert ex.ablation is not None and ex.sweep is not None and ex.error.value == ""
    assert len(ex.ablation.contexts) == 3 and text.startswith(ex.ablation.contexts[0]) and ex.ablation_fig.data
    wb.run(TEXT)  # too short to ablate: shipped texts only, with a note instead of an error
    assert wb.wait(300) and wb.message.value == "", wb.message.value
    box = wb.explorers["filler"]
    assert "too short" in box.children[0].value and TEXT not in box.children[1].ablation.contexts[0]


def test_geometry_layer_shows_the_lens_at_that_layer_without_model_passes(tiny):
    m = tiny("llama")
    wb = _workbench(m)
    wb.select_tab("geometry")
    assert wb.wait(120) and wb.message.value == ""
    geo, lens = wb.explorers["geometry"], wb.explorers["lens"]
    lens.show_position(2)
    calls, h = _counter(m)
    try:
        for layer in (0, 2):
            geo.pick_layer(layer)
            assert lens.layer.value == layer and wb.layer == layer
            assert lens.topk_fig.layout.title.text.startswith(f"layer {layer} · pos 2")
            shape = lens.heatmap.layout.shapes[0]  # the outlined cell follows the selection
            assert (shape.x0, shape.y0) == (1.5, layer - 0.5)
        assert wb.to_lens.description == "Lens at layer 2 →"
        lens.show_layer(0)
        wb.select_tab("geometry")
        wb.to_lens.click()  # the link button: the lens at the layer picked in geometry, on the lens tab
        assert wb.tabs.selected_index == 0 and lens.layer.value == 2
        wb.show_lens_layer(1)
        assert wb.tabs.selected_index == 0 and lens.layer.value == 1
        assert list(lens.topk_fig.data[0].x)[::-1] == pytest.approx(lens.results["logit"].top_probs[1, 2].tolist())
        assert not wb.busy and calls["n"] == 0
    finally:
        h.remove()


def test_cancel_stops_the_job_and_keeps_the_built_tabs(tiny):
    m = tiny("llama")
    wb = _workbench(m)
    old_lens = wb.explorers["lens"]
    with GatedForward(m, "lb-workbench") as gate:  # holds the worker's first forward until Cancel is pressed
        assert wb.run("Le chat est noir")
        assert gate.entered.wait(60) and wb.busy and not wb.cancel_button.disabled
        # the app stays usable while the job runs: pure UI works, a second job is refused with a message
        old_lens.stat.value = "entropy"
        assert old_lens.heatmap.data[0].colorbar.title.text == "entropy"
        assert not wb.run("another text") and "busy" in wb.message.value
        wb.cancel_button.click()
        gate.release.set()
        assert wb.wait(60)
    assert gate.blocks == 0, "a block ran after Cancel"
    assert "cancelled" in wb.message.value and wb.progress.bar_style == "warning"
    assert wb.holders["lens"].children[0] is old_lens and wb.explorers["lens"] is old_lens
    assert wb.cancel_button.disabled and not wb.run_button.disabled
    assert wb.jobs.hooks == [] and not m.model._forward_pre_hooks  # the workbench removed its hooks
    # Run redoes the cancelled job
    assert wb.run() and wb.wait(120) and wb.message.value == ""
    assert wb.explorers["lens"].results["logit"].tokens == wb.tokens() and wb.text == "Le chat est noir"


def test_bad_input_shows_a_message_not_a_traceback(tiny, monkeypatch, tmp_path):
    from lensbench.widgets import workbench as wbm
    m = tiny("llama")
    wb = _workbench(m)
    calls, h = _counter(m)
    try:
        assert not wb.run("   ")
        assert "empty" in wb.message.value and "⚠" in wb.message.value and calls["n"] == 0
    finally:
        h.remove()
    assert wb.text == TEXT  # the last good text and its tabs stay
    assert wb.load(str(tmp_path / "no-such-model")) and wb.wait(60)
    assert "no-such-model" in wb.message.value and "not found" in wb.message.value
    assert isinstance(wb.last_error, lb.ModelLoadError) and wb.m is m
    assert wb.progress.bar_style == "danger"

    def boom(_wb):
        raise RuntimeError("boom")
    monkeypatch.setitem(wbm.EXPLORERS, "broken", wbm.TabSpec("broken", boom))
    wb2 = wbm.Workbench(m, TEXT, tabs=["broken", "lens"])
    assert wb2.wait(60) and "RuntimeError: boom" in wb2.message.value
    assert isinstance(wb2.last_error, RuntimeError)
    wb2.select_tab("lens")
    assert wb2.wait(60) and "lens" in wb2.explorers
    with pytest.raises(lb.InputError, match="not registered"):
        wbm.Workbench(m, TEXT, tabs=["nope"])


def test_model_loads_in_the_background_and_the_tabs_follow(saved_tiny, tiny):
    from lensbench.widgets import Workbench
    wb = Workbench(str(saved_tiny), TEXT, options=FAST)  # a directory: loaded by lb.load in the worker
    assert wb.wait(120) and wb.message.value == "", wb.message.value
    assert isinstance(wb.m, lb.LensModel) and wb.m.name == str(saved_tiny) and wb.model_box.value == str(saved_tiny)
    lens = wb.explorers["lens"]
    assert lens.m is wb.m  # the lens tab was built (after the load) on the loaded model
    direct = lb.logit_lens(tiny("llama"), TEXT, progress=False)  # same weights (seed 0), loaded in memory
    assert torch.allclose(lens.results["logit"].top_probs, direct.top_probs, atol=1e-5)
    m2 = tiny("llama", torch.bfloat16)
    wb.m = m2  # swapping the model object invalidates every tab key (id of the model)
    wb.select_tab("lens")
    assert wb.wait(120) and wb.explorers["lens"].m is m2


def test_registered_explorer_becomes_a_tab(tiny, monkeypatch):
    import ipywidgets as W
    from lensbench.widgets import workbench as wbm
    m = tiny("llama")
    seen = []

    def build(wb):
        seen.append(wb.position)
        return W.HTML(f"tokens: {len(wb.tokens())}")
    monkeypatch.setattr(wbm, "EXPLORERS", dict(wbm.EXPLORERS))
    wbm.register_explorer("count", build, key=lambda wb: (wb.text, wb.position))
    wb = wbm.Workbench(m, TEXT, options=FAST, tabs=["lens", "count"])
    assert wb.wait(60)
    assert [wb.tabs.get_title(i) for i in range(2)] == ["lens", "count"]
    wb.select_tab("count")
    assert wb.wait(60) and wb.explorers["count"].value == f"tokens: {len(wb.tokens())}"
    wb.explorers["lens"].position.value = 1
    wb.select_tab("lens")
    wb.select_tab("count")  # stale (position changed): rebuilt
    assert wb.wait(60) and seen == [None, 1]


def test_report_quick_is_offline_with_progress_per_section(tiny, tmp_path, capsys):
    from plotly.offline import get_plotlyjs

    from lensbench.report import SECTIONS, write_report
    m = tiny("llama")
    out = write_report(m, tmp_path / "r.html", quick=True, progress=True)
    page = out.read_text(encoding="utf-8")
    err = capsys.readouterr().err
    assert "report" in err and f"{len(SECTIONS)}/{len(SECTIONS)}" in err  # the per-section bar finished
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)\s*=\s*['\"]?(https?:)?//", page, re.I)
    assert page.count(get_plotlyjs()[:500]) == 1  # plotly.js embedded exactly once
    assert "failed</h2>" not in page
    assert page.count("class=\"plotly-graph-div\"") >= 3
    import json
    summary = json.loads((tmp_path / "r_results" / "summary.json").read_text())
    assert set(summary["section_seconds"]) == {s.__name__.removesuffix("_section") for s in SECTIONS}
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "r_results").iterdir())


def test_api_reference_is_up_to_date():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_docs.py"), "--check"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (ROOT / "docs" / "api.md").read_text()
    import lensbench.widgets as lw
    for name in list(lb.__all__) + list(lw.__all__):
        assert f"`{name}" in text, name


def test_a_registered_tab_declares_its_needs_attach_hook_and_links(tiny, monkeypatch):
    import ipywidgets as W
    from lensbench.widgets import workbench as wbm
    m = tiny("llama")
    attached = []

    def attach(wb, widget):
        attached.append((widget.value, wb.position))
    back = wbm.Link("lens", "to_lens_from_count", "lb-wb-count-to-lens", lambda wb: f"lens at {wb.position} →",
                    "back to the lens", lambda wb: wb.select_tab("lens"))
    monkeypatch.setattr(wbm, "EXPLORERS", dict(wbm.EXPLORERS))
    wbm.register_explorer("count", lambda wb: W.HTML(f"position {wb.position}"), needs=("position",),
                          attach=attach, links=(back,))
    wb = wbm.Workbench(m, TEXT, options=FAST, tabs=["lens", "count"])
    assert wb.wait(60)
    button = wb.to_lens_from_count
    assert "lb-wb-count-to-lens" in button._dom_classes and button.description == "lens at None →"
    assert wb.tabs.children[1].children[0].children == (button,)  # on the count page's link bar
    wb.explorers["lens"].position.value = 2
    assert button.description == "lens at 2 →"
    wb.select_tab("count")
    assert wb.wait(60) and attached == [("position 2", 2)]
    wb.select_tab("lens")
    wb.select_tab("count")  # same position: not rebuilt
    assert wb.wait(60) and len(attached) == 1
    button.click()
    assert wb.tabs.selected_index == 0

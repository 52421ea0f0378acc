"""The job runner on its own: a real job hands its result over, a failing job shows its error and loses nothing
already delivered, a cancelled job stops at the next forward pass (or engine check) and delivers nothing."""

from __future__ import annotations

import threading
import time

import ipywidgets as W
import pytest
import torch

import lensbench as lb
from lensbench.engine import check_cancelled
from lensbench.testing import GatedForward

TEXT = "The capital of France is Paris"


@pytest.fixture()
def runner_for():
    from lensbench.widgets._jobs import JobRunner

    def make(m=None, **kw):
        ui = {"progress": W.IntProgress(), "label": W.HTML(""), "message": W.HTML(""),
              "cancel_button": W.Button(disabled=True), "run": W.Button()}
        r = JobRunner(progress=ui["progress"], label=ui["label"], message=ui["message"],
                      cancel_button=ui["cancel_button"], locked=(ui["run"],), model=lambda: m, **kw)
        return r, ui
    return make


def test_real_job_delivers_its_result_and_counts_forward_passes(tiny, runner_for):
    m = tiny("llama")
    got, idle, calls = [], [], {"n": 0}
    r, ui = runner_for(m, on_idle=lambda: idle.append(True))
    h = m.model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        assert r.start("lens", lambda: lb.logit_lens(m, TEXT, progress=False), deliver=got.append)
        assert r.wait(120) and not r.busy
    finally:
        h.remove()
    assert len(got) == 1 and isinstance(got[0], lb.LensResult) and idle == [True]
    assert torch.allclose(got[0].top_probs, lb.logit_lens(m, TEXT, progress=False).top_probs)
    assert calls["n"] >= 1 and f"lens: done · {calls['n']} forward passes" in ui["label"].value and ui["progress"].bar_style == "success"
    assert ui["message"].value == "" and r.last_error is None
    assert ui["cancel_button"].disabled and not ui["run"].disabled
    assert r.hooks == [] and not m.model._forward_pre_hooks
    then = []
    assert r.start("again", lambda: 1, then=lambda: then.append(r.busy))  # `then` replaces on_idle
    assert r.wait(60) and then == [False] and idle == [True]


def test_failing_job_shows_the_error_and_keeps_what_was_delivered(tiny, runner_for):
    m = tiny("llama")
    store = {}
    r, ui = runner_for(m)
    assert r.start("first", lambda: lb.logit_lens(m, TEXT, progress=False), deliver=lambda v: store.update(a=v))
    assert r.wait(120) and "a" in store
    kept = store["a"]
    assert r.start("bad text", lambda: lb.logit_lens(m, "   ", progress=False), deliver=lambda v: store.update(a=v))
    assert r.wait(60)
    assert "⚠" in ui["message"].value and "empty" in ui["message"].value and "InputError" not in ui["message"].value
    assert isinstance(r.last_error, lb.InputError) and store["a"] is kept
    assert "bad text: failed" in ui["label"].value and ui["progress"].bar_style == "danger"

    def boom():
        raise RuntimeError("boom")
    assert r.start("boom", boom, deliver=lambda v: store.update(a=v))
    assert r.wait(60) and "RuntimeError: boom" in ui["message"].value and store["a"] is kept
    assert not ui["run"].disabled and r.hooks == [] and not m.model._forward_pre_hooks
    r.show_error("plain text")  # a message without an exception
    assert "plain text" in ui["message"].value and r.last_error is None


def test_cancelled_job_stops_at_the_next_forward_and_delivers_nothing(tiny, runner_for):
    m = tiny("llama")
    r, ui = runner_for(m, thread_name="lb-test-job")
    got = []
    with GatedForward(m, "lb-test-job") as gate:  # holds the job's first forward until Cancel is pressed
        assert r.start("lens", lambda: lb.logit_lens(m, TEXT, progress=False), deliver=got.append)
        assert gate.entered.wait(60) and r.busy and not ui["cancel_button"].disabled and ui["run"].disabled
        assert not r.start("second", lambda: None) and "busy" in ui["message"].value
        r.cancel()
        assert "cancelling" in ui["label"].value
        gate.release.set()
        assert r.wait(60)
    assert gate.blocks == 0 and got == []
    assert "lens: cancelled" in ui["message"].value and ui["progress"].bar_style == "warning"
    assert r.hooks == [] and not m.model._forward_pre_hooks and ui["cancel_button"].disabled


def test_cancel_reaches_engine_checks_without_a_model(runner_for):
    """Work that never calls the model still stops: Cancel sets the event of the job's cancel scope."""
    r, ui = runner_for(None)
    started = threading.Event()

    def loop():
        while True:
            started.set()
            check_cancelled()
            time.sleep(0.005)
    assert r.start("loop", loop)
    assert started.wait(30)
    r.cancel()
    assert r.wait(30) and "loop: cancelled" in ui["message"].value
    assert r.last_error is None


def test_foreground_job_runs_in_the_caller(runner_for):
    r, ui = runner_for(None, background=False)
    seen = []
    assert r.start("inline", threading.current_thread, deliver=seen.append)
    assert seen == [threading.current_thread()] and "inline: done" in ui["label"].value

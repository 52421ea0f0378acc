"""The `lensbench` command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import lensbench as lb
from lensbench.cli import app

runner = CliRunner()


def test_info(saved_tiny):
    out = runner.invoke(app, ["info", "--model", str(saved_tiny)])
    assert out.exit_code == 0, out.output
    assert "model.layers[0..1]" in out.output and "unembed(last block) == model logits" in out.output


def test_lens_html(saved_tiny, tmp_path):
    f = tmp_path / "lens.html"
    out = runner.invoke(app, ["lens", "--text", "hello world", "--model", str(saved_tiny), "--out", str(f),
                              "--stat", "entropy"])
    assert out.exit_code == 0, out.output
    page = f.read_text()
    assert "plotly" in page and "entropy" in page and "<script src=\"http" not in page  # offline


def test_errors_are_one_line(saved_tiny, tmp_path):
    out = runner.invoke(app, ["lens", "--text", "  ", "--model", str(saved_tiny), "--out", str(tmp_path / "x")])
    assert out.exit_code == 2 and "empty" in out.output and "Traceback" not in out.output
    out = runner.invoke(app, ["info", "--model", str(tmp_path / "missing-model")])
    assert out.exit_code == 2 and "not found" in out.output


def test_report_on_tiny_model(saved_tiny, tmp_path):
    f = tmp_path / "rep" / "report.html"
    out = runner.invoke(app, ["report", "--model", str(saved_tiny), "--out", str(f), "--quick"])
    assert out.exit_code == 0, out.output
    page = f.read_text()
    for section in ("Anatomy and load-time validation", "Capture statistics", "Logit lens: one prompt",
                    "Logit lens over the sample texts", "Geometry: intrinsic dimension per layer",
                    "Geometry: layer-to-layer linearity", "Geometry: log-ID vs loss",
                    "Attribution: methods side by side", "Attribution of a greedy generation"):
        assert section in page, section
    assert " failed</h2>" not in page
    assert "<script src=" not in page  # plotly is embedded: works offline
    res = f.parent / "report_results"
    sweep = lb.Result.load(res / "lens_sweep.safetensors")
    assert isinstance(sweep, lb.LensSweepResult) and sweep.n_texts == 3 and sweep.n_tokens > 0
    assert np.isfinite(sweep.mean).all()
    assert json.loads((res / "summary.json").read_text())["capture_stats"]["tokens"] > 0


@pytest.mark.slow
def test_report_quick_on_default_model(tmp_path):
    f = tmp_path / "report.html"
    out = runner.invoke(app, ["report", "--quick", "--out", str(f)])
    assert out.exit_code == 0, out.output
    assert "SmolLM2-135M-Instruct" in f.read_text()

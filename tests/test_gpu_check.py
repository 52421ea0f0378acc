"""``python -m bench.gpu_check`` (bench/gpu_check.py): its dry run (tiny shapes, CPU, the GPU machine's missing packages blocked) passes every
section, an injected correctness fault exits non-zero naming the section, and without CUDA the real mode says so
and exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
BLOCK = "--block-imports=plotly,gguf,nnsight,transformer_lens"
NO_CAPS = ("--cap-scale=100", "--budget=100000")  # a loaded CI machine must not turn a slow section into a timeout

pytestmark = pytest.mark.xdist_group("gpu_check")


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], capture_output=True, text=True, env=e,
                          cwd=ROOT, timeout=600)


def test_dry_run_every_section(tmp_path):
    p = _run(str(tmp_path), "--dry-run", BLOCK, *NO_CAPS)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {r["section"]: r for r in data["sections"]}
    assert list(rows) == [name for name, _ in gpu_check.SECTIONS]
    for name, r in rows.items():
        if name == "vllm":
            assert r["status"] == "skipped"
            continue
        assert r["status"] == "ok", (name, r.get("why"), r.get("notes"))
        assert r["checks"] and all(c["ok"] for c in r["checks"]), (name, r["checks"])
    assert rows["env"]["metrics"]["missing"] == ["plotly", "gguf", "nnsight", "transformer_lens"]
    assert rows["logit_lens"]["metrics"]["floor_ratio"] > 0 and rows["attribution"]["metrics"]["floor_ratio"] > 0
    assert rows["critical"]["metrics"]["ratio_to_generate"] > 0
    assert "| section | status |" in p.stdout and "| logit_lens | ok |" in p.stdout
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## attribution: ok" in md and "IG completeness" in md


def test_injected_fault_fails_naming_the_section(tmp_path):
    p = _run(str(tmp_path), "--dry-run", BLOCK, *NO_CAPS, "--only", "env", "build", "logit_lens",
             "--inject-fault", "logit_lens")
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "FAILED section logit_lens" in p.stderr and "GPU check FAILED: logit_lens" in p.stderr
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {r["section"]: r for r in data["sections"]}
    assert data["meta"]["failed"] == ["logit_lens"]
    assert rows["logit_lens"]["status"] == "FAIL" and rows["build"]["status"] == "ok"
    assert rows["attribution"]["status"] == "skipped"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_real_mode_without_cuda_exits_zero(tmp_path):
    p = _run(str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "no CUDA device" in p.stdout
    assert not (tmp_path / "out").exists()


def test_tokenizer_covers_the_model_vocab():
    tok = gpu_check.make_tokenizer(1024, 400)
    assert len(tok) == 1024 and tok.convert_tokens_to_ids(["<pad>", "<s>", "</s>"]) == [0, 1, 2]
    text = "The ferry was forty minutes late."
    ids = tok(text)["input_ids"]
    assert max(ids) < 400 and tok.decode(ids) == text
    assert all(isinstance(t, str) for t in tok.convert_ids_to_tokens(list(range(1000, 1024))))

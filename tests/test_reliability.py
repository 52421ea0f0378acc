"""Fault injection: out-of-memory inside the capture engine, interrupted sweeps, damaged cache files,
and long contexts on a tiny model.  Each test compares against the undisturbed computation exactly.

(The safe-loading cells — ``.bin``-only checkpoints and ``trust_remote_code`` refused unless allowed — are in
``tests/test_model.py``; a corrupted or truncated results file in ``tests/test_results.py``.)
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import lensbench as lb
from lensbench.results import save_tensors

TEXTS = [f"Sample number {i}: the river ran past the mill and {'on ' * i}into the sea." for i in range(7)]


@pytest.fixture(scope="module")
def m(tiny):
    return tiny("llama")


class _OOMAt:
    """Make the model's forward raise a CUDA-style out-of-memory error at chosen calls (1-based), or whenever
    the batch holds more than ``max_rows`` rows."""

    def __init__(self, m, monkeypatch, *, at=(), max_rows: int | None = None):
        self.calls, self.at, self.max_rows, self.raised = 0, set(at), max_rows, 0
        orig = m.model.forward

        def forward(*a, **kw):
            self.calls += 1
            ids = kw.get("input_ids", a[0] if a else None)
            too_big = self.max_rows is not None and ids is not None and ids.shape[0] > self.max_rows
            if self.calls in self.at or too_big:
                self.raised += 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return orig(*a, **kw)
        monkeypatch.setattr(m.model, "forward", forward)


def test_oom_mid_lens_backs_off_to_identical_results(m, monkeypatch):
    ref = lb.logit_lens(m, TEXTS, batch_size=4, progress=False)
    inj = _OOMAt(m, monkeypatch, max_rows=2)
    got = lb.logit_lens(m, TEXTS, batch_size=4, progress=False)
    assert inj.raised >= 1, "the fault was never injected"
    assert got == ref


def test_oom_at_a_chosen_batch_of_a_geometry_capture(m, monkeypatch):
    """One OOM at the second batch: the engine halves the batch and the capture is identical."""
    ref = m.capture(TEXTS, batch_size=4, progress=False)
    inj = _OOMAt(m, monkeypatch, at={2})
    got = m.capture(TEXTS, batch_size=4, progress=False)
    assert inj.raised == 1
    assert got.stats["oom_retries"] == 1 and got.stats["batch_size"] == 2
    for i in range(len(TEXTS)):
        assert torch.equal(got.hidden_states(i), ref.hidden_states(i))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = lb.intrinsic_dimension(m, ref, estimator="twonn")
        b = lb.intrinsic_dimension(m, got, estimator="twonn")
    assert torch.equal(torch.as_tensor(a.values), torch.as_tensor(b.values))


def test_oom_at_batch_one_tells_what_to_do(m, monkeypatch):
    _OOMAt(m, monkeypatch, max_rows=0)
    with pytest.raises(lb.InputError, match=r"out of memory with batch_size=1: use a shorter text"):
        lb.logit_lens(m, TEXTS[:2], progress=False)


def test_damaged_sweep_cache_is_recomputed_not_read(m, tmp_path):
    """A cache entry that is truncated, bit-flipped or foreign is never read as complete: warned and recomputed."""
    ref = lb.lens_sweep(m, TEXTS, progress=False)
    lb.lens_sweep(m, TEXTS, cache_dir=tmp_path, progress=False)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == len(TEXTS)
    files[0].write_bytes(files[0].read_bytes()[: len(files[0].read_bytes()) // 2])          # truncated write
    raw = bytearray(files[1].read_bytes())
    raw[-3] ^= 0xFF                                                                           # flipped byte
    files[1].write_bytes(bytes(raw))
    save_tensors(files[2], {"x": torch.zeros(1)}, {"kind": "something-else"})                 # foreign entry
    with pytest.warns(UserWarning, match=r"damaged cache file|not a lens-sweep cache entry"):
        again = lb.lens_sweep(m, TEXTS, cache_dir=tmp_path, progress=False)
    assert again == ref
    # the damaged entries were rewritten: a third run reads everything from disk without warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lb.lens_sweep(m, TEXTS, cache_dir=tmp_path, progress=False) == ref


def test_no_temporary_files_left_after_an_interrupted_save(tmp_path, monkeypatch):
    """save_tensors writes a temp file then renames: a crash mid-write leaves no file under the final name."""
    import safetensors.torch as st

    def boom(*_a, **_k):
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_tensors(tmp_path / "r.safetensors", {"x": torch.ones(3)}, {"kind": "t"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_long_context_on_a_tiny_model(dtype):
    """An 8k-token input: lens (chunked), geometry and attribution run and keep their identities.
    (Peak memory on the default model at 2k tokens is measured in bench/bench_long_context.py.)"""
    from lensbench.testing import tiny_model
    m = lb.load(*tiny_model("llama", dtype=dtype, max_position_embeddings=8192))
    assert m.max_length == 8192
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, m.vocab_size, (8192,), generator=g)
    res = lb.logit_lens(m, ids, top_k=2, progress=False)
    assert res.entropy.shape == (m.n_layers + 1, 8192)
    assert torch.isfinite(res.entropy).all() and (res.entropy >= 0).all()
    assert (res.entropy <= math.log(m.vocab_size) + 1e-3).all()
    with torch.no_grad():
        ref = torch.log_softmax(m.model(input_ids=ids[None]).logits[0].float(), -1)
    # last lens layer == the model's own next-token distribution (ce of the actual next token)
    ce_ref = -ref[:-1].gather(-1, ids[1:, None])[:, 0]
    tol = 1e-4 if dtype == torch.float32 else 0.15
    assert torch.allclose(res.ce_next[-1, :-1], ce_ref, atol=tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idr = lb.intrinsic_dimension(m, ids, estimator="twonn", layers=[1])
    assert torch.isfinite(torch.as_tensor(idr.values)).all()
    text = "The river ran past the old mill and on into the sea. "
    text = text * (2048 // len(m.encode(text)) + 3)
    n = len(m.encode(text))
    assert 2048 <= n <= 8192
    att = lb.attribute(m, text, method="grad_x_input", progress=False)
    assert att.scores.shape == (1, n) and torch.isfinite(att.scores).all()

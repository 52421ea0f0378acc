"""Tuned lens (Belrose et al. 2023): residual translators at identity, the KL objective, the tuned-lens package's
file format, fingerprint checks, and the paper's claim on the default model (beats logit and jump lenses)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_lens import _refused_by_name

import lensbench as lb
from lensbench.probes import lens as lens_mod
from lensbench.testing import tiny_model

TEXT = "The capital of France is Paris. One, two, three!"


def _reference_kl(m, text, W, b):
    """Independent reference: HF's own hidden states, translator h + h W_i^T + b_i on hidden_states[i] (the
    tuned-lens package's convention), the model's final norm and lm_head, full-vocabulary KL to the logits."""
    ids = m.encode(text)
    with torch.no_grad():
        out = m.forward(ids[None], output_hidden_states=True)
        final = torch.log_softmax(out.logits[0].float(), -1)
        rows = []
        for i in range(m.n_layers):
            h = out.hidden_states[i][0].float()
            h = h + h @ W[i].T + b[i]
            lp = torch.log_softmax(m.model.lm_head(m.model.model.norm(h)).float(), -1)
            rows.append((final.exp() * (final - lp)).sum(-1))
    return torch.stack(rows)


def _write_tuned_lens_folder(path, m, W, b, *, prefix="", name="tiny"):
    """A lens folder exactly as the tuned-lens package's TunedLens.save writes it (config.json + params.pt)."""
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for i in range(W.shape[0]):
        state[f"{prefix}{i}.weight"] = W[i].clone()
        state[f"{prefix}{i}.bias"] = b[i].clone()
    torch.save(state, path / "params.pt")
    (path / "config.json").write_text(json.dumps({
        "base_model_name_or_path": name, "d_model": m.d_model, "num_hidden_layers": m.n_layers, "bias": True,
        "base_model_revision": None, "unembed_hash": None, "lens_type": "linear_tuned_lens"}))
    return path


def test_initialisation_is_the_identity_and_residual(tiny):
    m = tiny("llama")
    tl = lb.train_tuned_lens(m, lb.sample_texts(4), n_steps=0, progress=False)
    assert torch.equal(tl.W, torch.zeros_like(tl.W)) and torch.equal(tl.b, torch.zeros_like(tl.b))
    h = torch.randn(5, m.d_model)
    assert torch.equal(tl.apply(h, 0), h)
    # the step-0 held-out curve is the logit lens's KL
    a = lb.logit_lens(m, TEXT, progress=False)
    b = lb.logit_lens(m, TEXT, lens=tl, progress=False)
    assert torch.allclose(a.kl_to_final, b.kl_to_final, atol=1e-6)
    assert tl.heldout_steps == [0] and tl.heldout_kl.shape == (1, m.n_layers)
    assert torch.isfinite(tl.heldout_kl).all() and (tl.heldout_kl > 0).all()  # KL(p_L || p_l), l < L
    assert tl.history == [] and tl.settings["n_steps"] == 0 and tl.settings["init"] == "identity"


def test_lens_matches_independent_reference_and_roundtrips(tiny, tmp_path):
    m = tiny("llama")
    g = torch.Generator().manual_seed(0)
    W = 0.05 * torch.randn(m.n_layers, m.d_model, m.d_model, generator=g)
    b = 0.1 * torch.randn(m.n_layers, m.d_model, generator=g)
    tl = lb.TunedLens(W, b, m.name, fingerprint=m.fingerprint)
    res = lb.logit_lens(m, TEXT, lens=tl, progress=False)
    ref = _reference_kl(m, TEXT, W, b)
    assert torch.allclose(res.kl_to_final[:-1], ref, atol=1e-4)
    assert res.kl_to_final[-1].abs().max() <= 1e-5  # the last layer has no translator
    again = lb.TunedLens.load(tl.save(tmp_path / "tl"))
    assert torch.equal(again.W, tl.W) and torch.equal(again.b, tl.b) and again.fingerprint == m.fingerprint
    assert torch.allclose(again.A, torch.eye(m.d_model) + W)
    old = lens_mod.save_tensors(tmp_path / "v1", {"A": tl.A, "b": b}, {"kind": "TunedLens", "model_name": m.name})
    assert torch.allclose(lb.TunedLens.load(old).W, W, atol=1e-6)  # version-1 files stored A = I + W


@pytest.mark.parametrize("prefix", ["", "layer_translators."])
def test_reads_lenses_saved_by_the_tuned_lens_package(tiny, tmp_path, prefix):
    m = tiny("llama")
    g = torch.Generator().manual_seed(1)
    W = 0.05 * torch.randn(m.n_layers, m.d_model, m.d_model, generator=g)
    b = 0.1 * torch.randn(m.n_layers, m.d_model, generator=g)
    folder = _write_tuned_lens_folder(tmp_path / "lens", m, W, b, prefix=prefix, name=m.name)
    tl = lb.TunedLens.load(folder, model=m)
    assert tl.n_layers == m.n_layers and torch.equal(tl.W, W) and torch.equal(tl.b, b)
    res = lb.logit_lens(m, TEXT, lens=tl, progress=False)
    assert torch.allclose(res.kl_to_final[:-1], _reference_kl(m, TEXT, W, b), atol=1e-4)
    # our exporter writes the same format back
    out = tl.save_tuned_lens(tmp_path / "export")
    state = torch.load(out / "params.pt", weights_only=True)
    assert set(state) == {f"{i}.{k}" for i in range(m.n_layers) for k in ("weight", "bias")}
    assert torch.equal(lb.TunedLens.from_tuned_lens(out).W, W)


def test_tuned_lens_package_file_is_checked(tiny, tmp_path):
    m = tiny("llama")
    L, d = m.n_layers, m.d_model
    bad = _write_tuned_lens_folder(tmp_path / "short", m, torch.zeros(L - 1, d, d), torch.zeros(L - 1, d))
    with pytest.raises(lb.LensbenchError, match="keys do not match"):
        lb.TunedLens.load(bad)
    other = lb.load(*tiny_model("llama", num_hidden_layers=4))
    good = _write_tuned_lens_folder(tmp_path / "good", m, torch.zeros(L, d, d), torch.zeros(L, d), name="someone/else")
    with pytest.raises(lb.InputError, match="trained for L=2"):
        lb.TunedLens.load(good, model=other)
    with pytest.warns(UserWarning, match="someone/else"):
        lb.TunedLens.load(good, model=m)


def test_lens_trained_on_other_weights_is_refused(tiny):
    m = tiny("llama")
    twin = lb.load(*tiny_model("llama", seed=1))  # same architecture and name, other weights
    assert twin.name == m.name and twin.fingerprint != m.fingerprint
    tl = lb.TunedLens.identity(m)
    with pytest.raises(lb.InputError, match="fingerprint"):
        lb.logit_lens(twin, TEXT, lens=tl, progress=False)
    tl.fingerprint = twin.fingerprint  # the documented override
    lb.logit_lens(twin, TEXT, lens=tl, progress=False)


def test_training_lowers_heldout_kl_on_tiny_model(tiny):
    m = lb.load(*tiny_model("llama", num_hidden_layers=4))
    texts = lb.sample_texts()
    tl = lb.train_tuned_lens(m, texts[:6], heldout=texts[-2:], n_steps=40, progress=False)
    assert len(tl.history) == 40 and tl.settings["optimizer"] == "sgd" and tl.settings["init"] == "identity"
    assert tl.heldout_steps[0] == 0 and tl.heldout_steps[-1] == 40
    assert (tl.heldout_kl[-1] < 0.6 * tl.heldout_kl[0]).all(), tl.heldout_kl
    old = lb.train_tuned_lens(m, texts[:6], init="lstsq", optimizer="adam", lr=1e-4, n_steps=3, layers_per_step=2,
                              progress=False)
    assert len(old.history) == 3 and old.settings["init"] == "lstsq"
    assert all(math.isfinite(v) and v >= 0 for v in old.history)
    with pytest.warns(DeprecationWarning, match="tokens_per_step"):
        lb.train_tuned_lens(m, texts[:2], n_steps=1, batch_tokens=16, progress=False)


def test_steps_is_the_old_name_of_n_steps(tiny):
    m = tiny("llama")
    texts = lb.sample_texts(3)
    kw = dict(max_tokens=64, tokens_per_step=16, heldout=0, progress=False)
    new = lb.train_tuned_lens(m, texts, n_steps=3, **kw)
    with pytest.warns(FutureWarning, match="n_steps"):
        old = lb.train_tuned_lens(m, texts, steps=3, **kw)
    assert torch.equal(old.W, new.W) and torch.equal(old.b, new.b) and old.history == new.history
    assert not torch.equal(new.W, torch.zeros_like(new.W))  # three steps moved the translators
    with pytest.raises(lb.InputError, match="n_steps"):
        lb.train_tuned_lens(m, texts, steps=3, n_steps=3, **kw)


@pytest.mark.parametrize("param, value", [
    ("n_steps", -1), ("n_steps", 2.0), ("lr", -1.0), ("momentum", 1.0), ("momentum", -0.1), ("weight_decay", -1e-3),
    ("tokens_per_step", 0), ("max_tokens", 0), ("init", "random"), ("optimizer", "lbfgs"), ("warmup_steps", -1),
    ("clip_grad", -1.0), ("layers_per_step", 0), ("heldout", 1.5), ("heldout", -1), ("heldout", True),
    ("heldout", [1, 2]), ("heldout_tokens", -1), ("eval_every", -1), ("ridge", -1.0), ("window", 1),
    ("seed", None), ("batch_size", 0), ("batch_tokens", 0), ("progress", "no"), ("m", "SmolLM2"),
], ids=lambda v: repr(v))
def test_train_tuned_lens_refuses_each_bad_value_by_name(tiny, param, value):
    kw = {"m": tiny("llama"), "texts": [TEXT], "progress": False, param: value}
    _refused_by_name(lambda: lb.train_tuned_lens(**kw), param, value)


def test_nesterov_sgd_needs_momentum(tiny):
    with pytest.raises(lb.InputError, match=r"momentum=0 .*optimizer='sgd'"):
        lb.train_tuned_lens(tiny("llama"), [TEXT], momentum=0.0, progress=False)


@pytest.mark.parametrize("loader, kw", [
    ("load", {"path": 3}), ("load", {"path": "x.safetensors", "model": "SmolLM2"}),
    ("from_tuned_lens", {"folder": None}), ("from_tuned_lens", {"folder": "lens", "model": 1}),
], ids=str)
def test_lens_loaders_refuse_bad_values_by_name(loader, kw):
    param, value = list(kw.items())[-1]
    _refused_by_name(lambda: getattr(lb.TunedLens, loader)(**kw), param, value)

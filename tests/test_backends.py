"""Every forward-only probe through the nnsight and TransformerLens backends: same numbers as hf, the backend's
trace really ran, and on nnsight the reductions run inside the trace and save only reduced statistics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_capture import _nnsight_and_bridge

import lensbench as lb
from lensbench import backends
from lensbench.backends import nnsight as nn_backend
from lensbench.engine import score_spans

TEXT = "The capital of France is Paris, one two three four five six seven eight nine ten"
LONG = (TEXT + ". The quick brown fox jumps over the lazy dog. Hello world, hello lens. ") * 4
TEXTS = [LONG[:300], LONG[100:400], LONG[200:500]]


@pytest.fixture(scope="module")
def models():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _nnsight_and_bridge()


def _forwards(m) -> list[int]:
    """A forward hook counting the HF model's own calls."""
    n = [0]
    m.model.register_forward_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    return n


def _close(a, b, atol):
    if isinstance(a, torch.Tensor):
        a, b = a.numpy(), b.numpy()
    return np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), atol=atol, equal_nan=True)


PROBES = {
    "logit_lens": lambda m: lb.logit_lens(m, TEXT, progress=False).kl_to_final,
    "lens_sweep": lambda m: lb.lens_sweep(m, TEXTS, progress=False).to_dataframe().select_dtypes("number").to_numpy(),
    "intrinsic_dimension": lambda m: lb.intrinsic_dimension(m, TEXTS, estimator="twonn", progress=False).values,
    "linearity": lambda m: lb.linearity(m, TEXTS, progress=False).score,
    "shuffle_baseline": lambda m: lb.shuffle_baseline(m, LONG, levels=(0, 2), estimator="twonn",
                                                      progress=False).id,
    "cosine_similarity": lambda m: lb.cosine_similarity(m, TEXTS, progress=False).values,
    "anisotropy": lambda m: lb.anisotropy(m, TEXTS, progress=False).values,
    "neighborhood_overlap": lambda m: lb.neighborhood_overlap(m, TEXTS, k=5, progress=False).values,
    "geometry_loss_correlation": lambda m: lb.geometry_loss_correlation(
        lb.intrinsic_dimension(m, TEXTS, estimator="twonn", progress=False)).pearson_r,
    "contextual_memory": lambda m: lb.contextual_memory(m, TEXTS, n_steps=5, n_boot=10, progress=False).to_dataframe()
    .select_dtypes("number").to_numpy(),
    "score_spans": lambda m: torch.cat([s.token_logprobs for s in score_spans(
        m, [m.encode(t)[:12].tolist() for t in TEXTS], [4, 3, 5])]),
}


@pytest.mark.parametrize("probe", sorted(PROBES))
@pytest.mark.parametrize("which", ["nnsight", "transformer_lens"])
def test_probe_through_backend(models, probe, which):
    hf, nn, br = models
    m = nn if which == "nnsight" else br
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PROBES[probe](hf)
        n = _forwards(m)
        before = dict(backends.CALLS)
        got = PROBES[probe](m)
    ran = backends.CALLS[which] - before[which]
    assert ran >= 1 and backends.CALLS["hf"] == before["hf"], (probe, which)  # no silent fallback to hf
    assert n[0] == ran  # every model forward was one of the backend's traces / run_with_cache calls
    assert _close(got, ref, atol=1e-4), (probe, which)


def test_lens_saves_only_reduced_statistics(default_model):
    """The lens's reduction runs inside the nnsight trace and saves O(L·T·k): ≪ L·T·d hidden states, ≪ T·V."""
    from nnsight import LanguageModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn = lb.load(LanguageModel(default_model.model, tokenizer=default_model.tokenizer), validate=False)
        ref = lb.logit_lens(default_model, TEXT, top_k=5, progress=False)
        del nn_backend.SAVED_BYTES[:]
        r = lb.logit_lens(nn, TEXT, top_k=5, progress=False)
    assert torch.allclose(r.top_probs, ref.top_probs, atol=1e-5) and torch.equal(r.top_ids, ref.top_ids)
    L1, T, d, V = nn.n_layers + 1, len(r.tokens), nn.d_model, nn.vocab_size
    saved = sum(nn_backend.SAVED_BYTES)
    assert len(nn_backend.SAVED_BYTES) == 1
    assert saved < L1 * T * d * 4 / 8 and saved < T * V * 4 / 8, (saved, L1 * T * d * 4, T * V * 4)
    print(f"lens saved {saved} B; hidden states {L1 * T * d * 4} B; logits {T * V * 4} B")


def test_remote_local_round_trip(models):
    """``m.remote = "local"``: nnsight serialises the trace as for NDIF, deserialises it with non-installed
    modules hidden and runs it; the reductions' source travels with the request (lensbench registered by value)."""
    hf, nn, _ = models
    ref = lb.logit_lens(hf, TEXT, progress=False)
    nn.remote = "local"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            before = backends.CALLS["nnsight"]
            r = lb.logit_lens(nn, TEXT, progress=False)
            cap = nn.capture(TEXTS, layers=[1], reduce=lambda b: [b.hidden[1][i, b.span(i)].norm(dim=-1)
                                                                  for i in range(len(b.indices))],
                             progress=False)
    finally:
        nn.remote = False
    assert backends.CALLS["nnsight"] > before
    assert torch.allclose(r.kl_to_final, ref.kl_to_final, atol=1e-5)
    full = hf.capture(TEXTS, layers=[1], progress=False)
    for i in range(len(TEXTS)):
        assert torch.allclose(cap.results[i], full.hidden_states(i)[0].norm(dim=-1), atol=1e-5)


def test_load_takes_remote_for_nnsight_models_only(tiny):
    from nnsight import LanguageModel
    m = tiny("llama")
    nn = lb.load(LanguageModel(m.model, tokenizer=m.tokenizer), remote="local")
    assert nn.remote == "local" and nn.backend == "nnsight"
    assert lb.load(m.model, m.tokenizer).remote is False
    with pytest.raises(lb.InputError, match="nnsight LanguageModel"):
        lb.load(m.model, m.tokenizer, remote=True)

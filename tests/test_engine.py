"""The runtime's primitives against plain forwards of the raw HF model (independent references)."""

from __future__ import annotations

import threading

import pytest
import torch

import lensbench as lb
from lensbench import engine
from lensbench.engine.prefix import CropUnsupported
from lensbench.testing import OOMOnce, tiny_model


def _reference_span_logprobs(model, seq: list[int], n: int) -> torch.Tensor:
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
    return torch.stack([lp[t - 1, seq[t]] for t in range(len(seq) - n, len(seq))])


SEQS = [[1, 5, 9, 14, 3, 22, 7], [1, 8, 8, 30], [1, 40, 41, 42, 43, 44, 45, 46, 47, 10], [1, 3, 4]]
SPANS = [2, 1, 4, 2]


def test_score_spans_equals_plain_forward(tiny):
    m = tiny("llama")
    res = engine.score_spans(m, SEQS, SPANS, batch_size=3)
    for s, a, r in zip(SEQS, SPANS, res):
        ref = _reference_span_logprobs(m.model, s, a)
        assert torch.allclose(r.token_logprobs, ref, atol=1e-5)
        assert r.logprob == pytest.approx(float(ref.sum()), abs=1e-5)
        lp, exact, toks = r  # unpacks like the old (sum, exact, per-token) tuple
        assert exact == all(
            int(m.model(input_ids=torch.tensor([s])).logits[0, t - 1].argmax()) == s[t]
            for t in range(len(s) - a, len(s)))


def test_score_spans_identical_under_injected_oom(tiny):
    m = tiny("llama")
    ref = engine.score_spans(m, SEQS, SPANS, batch_size=4)
    hook = OOMOnce(m.model, k=1)
    try:
        got = engine.score_spans(m, SEQS, SPANS, batch_size=4)
    finally:
        hook.remove()
    assert hook.fired and hook.calls > 2  # the batch of 4 failed, then ran as smaller batches
    for a, b in zip(ref, got):
        assert torch.allclose(a.token_logprobs, b.token_logprobs, atol=1e-6)


def test_score_spans_rejects_a_span_without_context(tiny):
    with pytest.raises(lb.InputError, match="context token"):
        engine.score_spans(tiny("llama"), [[1, 2]], [2])


def test_prefix_cache_moves_between_prefixes_like_fresh_forwards(tiny):
    m = tiny("llama")
    pc = engine.PrefixCache(m)
    seq = SEQS[2]
    for n in (4, 7, 5, 10, 2, 3):  # grow, shrink (crop), grow again
        got = pc.advance(seq[:n])
        with torch.no_grad():
            ref = m.model(input_ids=torch.tensor([seq[:n]])).logits[0, -1].float()
        assert torch.allclose(got, ref, atol=1e-4), n
        assert pc.cache.get_seq_length() == n
    assert pc.forward_tokens < sum((4, 7, 5, 10, 2, 3))  # the common part was reused


def test_kv_cache_extend_scores_and_crop(tiny):
    m = tiny("llama")
    kv = engine.KVCache(m)
    q, a = [1, 5, 9, 14], [3, 22]
    kv.extend([q])
    kv.repeat(2)
    res = kv.extend([[7] + a, [8] + a], score_last=2)
    for first, r in zip((7, 8), res):
        ref = _reference_span_logprobs(m.model, q + [first] + a, 2)
        assert torch.allclose(r.token_logprobs, ref, atol=1e-5)
    kv.crop(4)
    assert kv.length == 4
    with pytest.raises(CropUnsupported):
        engine.KVCache(m).crop(3)


def test_float32_upcast_leaves_the_model_untouched_and_matches_a_float32_copy():
    model, tok = tiny_model("llama", dtype=torch.bfloat16)
    m = lb.load(model, tok)
    before = {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()}
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    emb = m.embed_module(ids).detach().float().requires_grad_(True)
    with engine.float32(m) as active:
        assert active
        z = engine.embeds_logits(m, emb, keep=1)[0, -1]
        assert z.dtype == torch.float32
        z.log_softmax(-1)[7].backward()
    g = emb.grad.clone()
    assert {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()} == before
    ref_model = tiny_model("llama", dtype=torch.bfloat16)[0].float()   # the same bf16 weights, cast once
    e2 = ref_model.get_input_embeddings()(ids).detach().float().requires_grad_(True)
    ref_model(inputs_embeds=e2).logits[0, -1].log_softmax(-1)[7].backward()
    assert torch.allclose(g, e2.grad, atol=1e-5, rtol=1e-4)


def test_sampling_is_identical_when_rows_are_split_by_oom(tiny):
    m = tiny("llama")
    st = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 6, "stop": None}
    req = engine.RolloutRequest(m, [1, 5, 9, 14], [[3]] * 4, [11, 12, 13, 14], st, engine.PrefixCache(m))
    ref = engine.sample(req)
    hook = OOMOnce(m.model, k=2)
    try:
        got = engine.sample(engine.RolloutRequest(m, [1, 5, 9, 14], [[3]] * 4, [11, 12, 13, 14], st,
                                                  engine.PrefixCache(m)))
    finally:
        hook.remove()
    assert hook.fired
    assert got == ref
    assert len({tuple(r) for r in ref}) > 1  # the seeds really differ per row


def test_cancel_scope_stops_at_the_next_batch(tiny):
    m = tiny("llama")
    ev = threading.Event()
    seen = []

    def step(idx):
        seen.append(idx)
        ev.set()

    with engine.cancel_scope(ev), pytest.raises(engine.Cancelled):
        engine.run_batches(m, SEQS, step, batch_size=1, progress=False)
    assert len(seen) == 1
    engine.run_batches(m, SEQS, lambda idx: None, batch_size=1, progress=False)  # outside the scope: runs

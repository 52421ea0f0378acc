"""Critical tokens: rollout criticality with keep/replace arms, pass@k, Wilson intervals, the paper's
critical-token rule, seeded and chunk-independent sampling with the prefix KV cache reused, coarse-to-fine search,
resumable on-disk cache, sentence-level resampling / counterfactual importance, and contrastive estimation
(two models, two peft LoRA adapters on one base). Tiny random models throughout; the default model only where a
claim needs a real tokenizer."""

from __future__ import annotations

import copy
import dataclasses
import math
from math import comb

import numpy as np
import pytest
import torch

import lensbench as lb
from lensbench.errors import InputError
from lensbench.probes.critical import (
    CRITICAL_THRESHOLD,
    PowerWarning,
    RolloutRequest,
    critical_index,
    hf_sampler,
    prefix_fails,
    rule_false_positive_rate,
    rule_max_failures,
    rule_min_n,
    split_sentences,
    wilson_interval,
)
from lensbench.testing import tiny_model

# small sample counts keep these tests fast; the rule's power warning is tested on its own
pytestmark = pytest.mark.filterwarnings("ignore::lensbench.probes.critical.PowerWarning")

PROMPT = "Q: two plus two? A:"
RESPONSE = "the cat sat on the mat and then it ran"


# ------------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("n", [1, 5, 16, 64])
def test_pass_at_k_edges_and_formula(n):
    for k in range(1, n + 1):
        assert lb.pass_at_k(n, 0, k) == 0.0
        assert lb.pass_at_k(n, n, k) == 1.0
    for c in range(n + 1):
        for k in range(1, n + 1):
            ref = 1 - comb(n - c, k) / comb(n, k)
            assert lb.pass_at_k(n, c, k) == pytest.approx(ref, abs=1e-12)
    assert lb.pass_at_k(n, min(1, n), 1) == pytest.approx(min(1, n) / n)  # pass@1 = c / n


def test_pass_at_k_bad_input():
    with pytest.raises(InputError, match="0 <= c <= n"):
        lb.pass_at_k(4, 5, 1)


def test_wilson_known_values():
    lo, hi = wilson_interval([0, 5, 10, 3], [10, 10, 10, 0])
    assert lo[0] == 0 and hi[0] == pytest.approx(0.2775, abs=1e-4)
    assert lo[1] == pytest.approx(0.2366, abs=1e-4) and hi[1] == pytest.approx(0.7634, abs=1e-4)
    assert hi[2] == 1 and lo[2] == pytest.approx(0.7225, abs=1e-4)
    assert math.isnan(lo[3]) and math.isnan(hi[3])


def test_critical_rule_synthetic():
    assert critical_index([1, 1, 0, 0]) == 2
    assert critical_index([1, 0, 0.5, 0, 0]) == 3            # reset by a prefix back above 3/64
    assert critical_index([1, 0, 0.03, 0]) == 1               # 0.03 < 3/64: no reset
    assert critical_index([1, 0, 3 / 64, 0]) == 1            # "above" the threshold is strict
    assert critical_index([1, 0.5, 0.2]) is None
    assert critical_index([1, float("nan"), 0, float("nan")]) == 2
    assert CRITICAL_THRESHOLD == 3 / 64


def test_sentence_split():
    toks = ["The", " cat", " sat", ".", " It", " cost", " 3", ".", "5", " euros", "!", "\n", "Done"]
    spans = split_sentences(toks)
    assert spans == [(0, 4), (4, 11), (11, 12), (12, 13)]


def test_checkers():
    c = lb.checkers.number(42, rel_tol=0.01)
    assert c("so the answer is 42.") and c("1,000 then 41.7") and not c("42 apples, 7 left")
    assert lb.checkers.number("1,000")("total: 1000")
    assert lb.checkers.exact("Paris", ignore_case=True)("  paris ")
    assert lb.checkers.exact("8", extract=r"answer is (\d+)")("the answer is 8, yes")
    assert not lb.checkers.exact("8", extract=r"answer is (\d+)")("no answer")
    assert lb.checkers.regex(r"\b8 apples")("he has 8 apples")
    with pytest.raises(InputError, match="regular expression"):
        lb.checkers.regex("(")


# ------------------------------------------------------------------------------------------------ scripted sampler
def _marker_setup(m, k):
    """Response whose token k is the marker; a scripted sampler answering 42 unless the marker is in the
    (prefix + forced token); checker: final number == 42."""
    ids = m.tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    marker = ids[k]
    assert ids.count(marker) == 1, "the marker token must occur once in the response"
    calls = {"rows": 0}

    def scripted(req: RolloutRequest):
        calls["rows"] += len(req.first)
        return [" answer 13" if marker in list(req.prefix_ids) + list(f) else " answer 42" for f in req.first]
    return ids, marker, scripted, calls


@pytest.mark.parametrize("k,n,rule", [(2, 64, "wilson"), (10, 64, "wilson"), (2, 8, "paper"), (10, 8, "paper")])
def test_scripted_sampler_marker_is_critical(tiny, k, n, rule):
    m = tiny("llama")
    ids, marker, scripted, _ = _marker_setup(m, k)
    res = lb.critical_tokens(m, PROMPT, RESPONSE, checker=lb.checkers.number(42), n_samples=n, sampler=scripted,
                             rule=rule, batch_size=128, progress=False)
    n = len(ids)
    assert res.keep_acc.tolist() == [1.0] * k + [0.0] * (n - k)
    assert res.critical_index == k
    assert res.replace_acc[k] == 1.0                      # forbidding the marker rescues the answer
    assert res.replace_acc[k + 1:].tolist() == [0.0] * (n - k - 1)  # marker already in the prefix
    assert res.drop[k - 1] == 1.0 and float(np.nansum(res.drop.numpy())) == 1.0
    assert res.criticality[k] == 1.0 and res.base_accuracy == 1.0
    assert res.pass_at_k[k].tolist() == [0.0] * len(res.ks) and res.pass_at_k[0].tolist() == [1.0] * len(res.ks)
    assert res.keep_hi[k] < 0.5 < res.keep_lo[k - 1]      # Wilson bands separate the two sides
    cont = res.continuations_at(k)
    assert all(t.endswith("answer 13") for t in cont["keep"]) and not any(cont["keep_ok"])
    assert m.tokenizer.decode([marker]) not in cont["replace_first"]


def test_coarse_to_fine_finds_marker_with_fewer_units(tiny):
    m = tiny("llama")
    long_resp = " ".join([RESPONSE] * 3)
    ids = m.tokenizer(long_resp, add_special_tokens=False)["input_ids"]
    marker = ids[13]
    first_occurrence = ids.index(marker)
    assert first_occurrence % 8 != 0 and marker not in m.encode(PROMPT).tolist()
    calls = {"rows": 0}

    def scripted(req):
        calls["rows"] += len(req.first)
        return [" 13" if marker in list(req.prefix_ids) + list(f) else " 42" for f in req.first]

    full = lb.critical_tokens(m, PROMPT, long_resp, checker=lb.checkers.number(42), n_samples=4, sampler=scripted,
                              rule="paper", progress=False)
    rows_full = calls["rows"]
    calls["rows"] = 0
    coarse = lb.critical_tokens(m, PROMPT, long_resp, checker=lb.checkers.number(42), n_samples=4,
                                sampler=scripted, search="coarse", stride=8, rule="paper", progress=False)
    assert full.critical_index == first_occurrence
    assert coarse.critical_index == first_occurrence
    assert len(coarse.evaluated) < len(ids) / 2 and calls["rows"] < rows_full / 2
    # every evaluated unit agrees with the full scan; the others are NaN
    for i in range(len(ids)):
        if i in coarse.evaluated:
            assert coarse.keep_acc[i] == full.keep_acc[i]
        else:
            assert math.isnan(float(coarse.keep_acc[i]))
    assert {first_occurrence - 1, first_occurrence} <= set(coarse.evaluated)


MARKER_RESPONSE = "We add two. The marker zzz appears here. So it is done."


def _marker_sampler(m):
    """A scripted sampler: answers 13 (wrong) once the prefix holds the marker ' zzz', else 42 (right)."""
    zzz = m.tokenizer(" zzz", add_special_tokens=False)["input_ids"]

    def scripted(req):
        ids = list(req.prefix_ids)
        bad = any(ids[i:i + len(zzz)] == zzz for i in range(len(ids)))
        return [" Next step. Answer 13" if bad else " Next step. Answer 42" for _ in req.first]
    return scripted


def test_sentence_granularity_resampling_and_counterfactual(tiny):
    m = tiny("llama")
    response = MARKER_RESPONSE
    scripted = _marker_sampler(m)

    def far(texts):  # every regenerated sentence is dissimilar to the original
        return torch.tensor([[1.0, 0.0]] + [[0.0, 1.0]] * (len(texts) - 1))

    def near(texts):
        return torch.ones(len(texts), 2)

    kw = dict(checker=lb.checkers.number(42), n_samples=4, sampler=scripted, granularity="sentence",
              progress=False, rule="paper", similarity_threshold=0.8)
    res = lb.critical_tokens(m, PROMPT, response, embedder=far, **kw)
    assert res.units == ["We add two.", " The marker zzz appears here.", " So it is done."]
    assert res.keep_acc.tolist() == [1.0, 0.0, 0.0]
    assert res.critical_index == 1
    assert res.criticality.tolist() == [0.0, 1.0, 0.0]                 # resampling importance (as a drop)
    assert res.replace_n.tolist() == [4.0, 4.0, 4.0]
    assert res.counterfactual_importance.tolist() == [0.0, -1.0, 0.0]
    assert res.continuations_at(1)["replace_first"][0] == " Next step."
    same = lb.critical_tokens(m, PROMPT, response, embedder=near, **kw)
    assert same.replace_n.tolist() == [0.0, 0.0, 0.0] and torch.isnan(same.replace_acc).all()


# ------------------------------------------------------------------------------------------------ real sampling
def _letter_checker():
    return lb.checkers.regex(r"a")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_and_chunk_independent(tiny, dtype):
    m = tiny("llama", dtype)
    kw = dict(checker=_letter_checker(), n_samples=4, max_new_tokens=5, positions=[0, 9], progress=False,
              temperature=1.0)
    a = lb.critical_tokens(m, PROMPT, RESPONSE, batch_size=8, seed=3, **kw)
    b = lb.critical_tokens(m, PROMPT, RESPONSE, batch_size=3, seed=3, **kw)
    c = lb.critical_tokens(m, PROMPT, RESPONSE, batch_size=8, seed=4, **kw)
    assert a == b, "identical seeds must give identical results whatever the batch chunking"
    assert [x["keep"] for x in a.continuations] != [x["keep"] for x in c.continuations]
    assert a.evaluated == [0, 9] and math.isnan(float(a.keep_acc[1]))
    assert all(0 <= float(a.keep_acc[i]) <= 1 for i in a.evaluated)
    for cont in a.continuations:  # every kept continuation starts with the response prefix incl. token i
        head = m.tokenizer.decode(a.token_ids[: cont["unit"] + 1].tolist())
        assert all(t.startswith(head) for t in cont["keep"])
        # the replace arm never re-samples the forbidden token
        assert a.units[cont["unit"]] not in cont["replace_first"]


def test_identical_with_injected_oom_and_batch_size_1(tiny):
    """A real out-of-memory error in the middle of a batched generation (one forward pre-hook on the model, once)
    makes the engine split the rows and run them again: same continuations as without it and as one row per call."""
    m = tiny("llama")
    n = 4
    kw = dict(checker=_letter_checker(), n_samples=n, max_new_tokens=5, positions=[0, 6], progress=False, seed=2)
    ref = lb.critical_tokens(m, PROMPT, RESPONSE, **kw)
    one = lb.critical_tokens(m, PROMPT, RESPONSE, batch_size=1, **kw)
    fired = []

    def hook(_mod, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is not None and x.shape[0] == 2 * n and kwargs.get("cache", kwargs.get("past_key_values")) is not None:
            fired.append(tuple(x.shape))
            if len(fired) == 3:  # the third decoding step of the first keep + replace batch
                raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
    h = m.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        oom = lb.critical_tokens(m, PROMPT, RESPONSE, **kw)
    finally:
        h.remove()
    assert len(fired) > 3 and ref.n_rollouts == oom.n_rollouts == one.n_rollouts
    assert oom == ref and one == ref
    assert [c["keep"] + c["replace"] for c in oom.continuations] == [c["keep"] + c["replace"]
                                                                      for c in ref.continuations]


def test_other_backends_refuse_the_hf_engine_and_run_a_custom_sampler_through_theirs(tiny, monkeypatch):
    """The in-process engine runs the transformers model itself: under nnsight it is refused (naming the backend
    and the way back to 'hf'), never silently used; with a custom sampler the replace arm's alternatives and the
    contrastive scores come from nnsight traces (counted), with the numbers of the hf backend."""
    pytest.importorskip("nnsight")
    import lensbench.backends.nnsight as nnsight_backend
    m = tiny("llama")
    nn_m = lb.LensModel(m.model, m.tokenizer, backend="nnsight")
    with pytest.raises(InputError, match=r"backend='nnsight'.*backend='hf'.*lb\.load\(m\.model, m\.tokenizer\)"):
        lb.critical_tokens(nn_m, PROMPT, RESPONSE, checker=_letter_checker(), n_samples=2, progress=False)
    _, _, scripted, _ = _marker_setup(m, 2)
    kw = dict(checker=lb.checkers.number(42), n_samples=4, sampler=scripted, rule="paper", positions=[1, 2, 3],
              progress=False)
    ref = lb.critical_tokens(m, PROMPT, RESPONSE, **kw)
    ce_ref = lb.contrastive_tokens(m, m, TEXT, beta=1.0)
    calls = []
    real = nnsight_backend.run
    monkeypatch.setattr(nnsight_backend, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = lb.critical_tokens(nn_m, PROMPT, RESPONSE, **kw)
    assert len(calls) == 3                                       # one trace per evaluated unit
    assert res.critical_index == ref.critical_index == 2 and torch.equal(res.keep_acc.nan_to_num(-1), ref.keep_acc.nan_to_num(-1))
    assert [c["replace_first"] for c in res.continuations] == [c["replace_first"] for c in ref.continuations]
    ce = lb.contrastive_tokens(nn_m, nn_m, TEXT, beta=1.0)
    assert len(calls) == 5 and torch.allclose(ce.p_ce, ce_ref.p_ce, atol=1e-6)


def test_kv_cache_reuse_matches_generation_without_cache(tiny):
    m = tiny("llama")
    kw = dict(checker=_letter_checker(), n_samples=3, max_new_tokens=6, positions=[2, 7], progress=False)

    def no_cache(req):
        req.state = None
        return hf_sampler(req)
    a = lb.critical_tokens(m, PROMPT, RESPONSE, **kw)
    b = lb.critical_tokens(m, PROMPT, RESPONSE, sampler=no_cache, **kw)
    assert [x["keep"] + x["replace"] for x in a.continuations] == [x["keep"] + x["replace"] for x in b.continuations]


def test_greedy_matches_generate(tiny):
    """temperature 0 is greedy: each kept continuation equals HF's own greedy generation from that prefix."""
    m = tiny("llama")
    res = lb.critical_tokens(m, PROMPT, RESPONSE, checker=_letter_checker(), n_samples=2, max_new_tokens=6,
                             temperature=0, positions=[3], progress=False)
    prefix = m.encode(PROMPT).tolist() + res.token_ids[:4].tolist()
    ids = torch.tensor([prefix])
    out = m.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                           pad_token_id=m.tokenizer.pad_token_id)
    gen = out[0, ids.shape[1]:].tolist()
    if m.tokenizer.eos_token_id in gen:
        gen = gen[:gen.index(m.tokenizer.eos_token_id)]
    ref = m.tokenizer.decode(res.token_ids[:4].tolist()) + m.tokenizer.decode(gen)
    assert res.continuations_at(3)["keep"] == [ref, ref]


def test_interrupted_run_resumes_exactly(tiny, tmp_path):
    m = tiny("llama")
    calls = {"n": 0, "limit": None}

    def fn(text):
        calls["n"] += 1
        if calls["limit"] is not None and calls["n"] > calls["limit"]:
            raise KeyboardInterrupt
        return "a" in text
    checker = lb.checkers.Checker(fn, "contains-a")
    response = "the cat sat on the mat"
    kw = dict(checker=checker, n_samples=3, max_new_tokens=4, progress=False, seed=7)
    reference = lb.critical_tokens(m, PROMPT, response, **kw)
    calls.update(n=0, limit=22)  # 1 prompt-only batch (3) + 3 units (6 each) = 21 checks, then interrupted
    with pytest.raises(KeyboardInterrupt):
        lb.critical_tokens(m, PROMPT, response, cache_dir=tmp_path, **kw)
    stored = sorted(p.name for p in next(tmp_path.iterdir()).glob("*.json"))
    assert stored == ["free000000.json", "tok000000.json", "tok000001.json", "tok000002.json"]
    calls.update(n=0, limit=None)
    resumed = lb.critical_tokens(m, PROMPT, response, cache_dir=tmp_path, **kw)
    n_units = len(reference.units)
    assert n_units > 4
    assert resumed.n_rollouts == 2 * 3 * (n_units - 3), "only the missing units are generated again"
    assert calls["n"] == 2 * 3 * (n_units - 3)
    resumed = dataclasses.replace(resumed, n_rollouts=reference.n_rollouts)
    assert resumed == reference
    again = lb.critical_tokens(m, PROMPT, response, cache_dir=tmp_path, **kw)
    assert again.n_rollouts == 0 and dataclasses.replace(again, n_rollouts=reference.n_rollouts) == reference


def test_result_roundtrip_and_views(tiny, tmp_path):
    m = tiny("llama")
    res = lb.critical_tokens(m, PROMPT, RESPONSE, checker=_letter_checker(), n_samples=3, max_new_tokens=4,
                             positions=[0, 1, 2], progress=False)
    path = res.save(tmp_path / "crit")
    again = lb.Result.load(path)
    assert isinstance(again, lb.CriticalTokensResult) and again == res
    df = res.to_dataframe()
    assert len(df) == len(res.units) and {"keep_acc", "replace_acc", "pass@1", "critical"} <= set(df.columns)
    fig = res.figure()
    assert "success rate" in fig.layout.title.text
    band_keep, keep, band_rep, rep = fig.data
    ev = res.evaluated
    assert list(keep.x) == [f"{i}:{lb.plots._clean(res.units[i])[:12]}" for i in ev]
    assert list(keep.y) == res.keep_acc[ev].tolist() and list(rep.y) == res.replace_acc[ev].tolist()
    assert list(band_keep.y) == res.keep_hi[ev].tolist() + res.keep_lo[ev].tolist()[::-1]
    assert list(band_rep.y) == res.replace_hi[ev].tolist() + res.replace_lo[ev].tolist()[::-1]
    assert "lb-crit-tok" in res._repr_html_()


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs(tiny):
    m = tiny("llama")
    chk = _letter_checker()
    with pytest.raises(InputError, match="response is empty"):
        lb.critical_tokens(m, PROMPT, "  ", checker=chk)
    with pytest.raises(InputError, match="prompt"):
        lb.critical_tokens(m, "", RESPONSE, checker=chk)
    with pytest.raises(InputError, match="granularity"):
        lb.critical_tokens(m, PROMPT, RESPONSE, checker=chk, granularity="word")
    with pytest.raises(InputError, match="n_samples"):
        lb.critical_tokens(m, PROMPT, RESPONSE, checker=chk, n_samples=0)
    with pytest.raises(InputError, match="checker must be a callable"):
        lb.critical_tokens(m, PROMPT, RESPONSE, checker="42")
    with pytest.raises(InputError, match="positions"):
        lb.critical_tokens(m, PROMPT, RESPONSE, checker=chk, positions=[999])
    with pytest.raises(InputError, match="contrastive_tokens"):
        lb.critical_tokens(m, PROMPT, RESPONSE, checker=chk, mode="contrastive")
    for bad in (0, "big", True):
        with pytest.raises(InputError, match="batch_size must be one of 'auto' or an int >= 1"):
            lb.critical_tokens(m, PROMPT, RESPONSE, checker=chk, batch_size=bad)

    def broken(text):
        raise ValueError("no number here")
    with pytest.raises(InputError, match=r"checker=.*broken.*raised ValueError: no number here"):
        lb.critical_tokens(m, PROMPT, RESPONSE, checker=broken, n_samples=2, max_new_tokens=2, progress=False)


@pytest.mark.parametrize("kw, words", [
    ({"n_samples": 0}, "n_samples=0 is not allowed; n_samples must be an int >= 1"),
    ({"granularity": "word"}, "granularity must be one of 'sentence', 'token'"),
    ({"temperature": -1}, "temperature=-1 is not allowed; temperature must be a number >= 0"),
    ({"top_p": 0}, "top_p=0 is not allowed; top_p must be a number in (0, 1]"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1"),
    ({"stop": [""]}, "stop=[''] is not allowed"),
    ({"stop": ""}, "stop must be None or a non-empty string or a list/tuple of non-empty string values"),
    ({"seed": "1"}, "seed='1' is not allowed; seed must be an int"),
    ({"search": "fine"}, "search must be one of 'coarse', 'full'"),
    ({"stride": 0}, "stride=0 is not allowed; stride must be an int >= 1"),
    ({"rule": "bayes"}, "rule='bayes' is not allowed; rule must be one of 'paper', 'wilson'"),
    ({"alpha": 0.5}, "alpha=0.5 is not allowed; alpha must be a number in (0, 0.5)"),
    ({"threshold": 1.0}, "threshold must be a number in (0, 1)"),
    ({"fpr_at": 1.5}, "fpr_at=1.5 is not allowed; fpr_at must be a number in [0, 1]"),
    ({"similarity_threshold": float("nan")}, "similarity_threshold must be one of 'auto' or a finite number"),
    ({"kl_smoothing": 0}, "kl_smoothing=0 is not allowed; kl_smoothing must be a number > 0"),
    ({"checker": "42"}, "checker='42' is not allowed; checker must be a callable"),
    ({"answer": 3}, "answer must be None or a callable"),
    ({"embedder": 3}, "embedder must be None or a callable"),
    ({"sampler": 3}, "sampler must be None or a callable"),
    ({"batch_size": True}, "batch_size=True is not allowed"),
    ({"cache_dir": 3}, "cache_dir=3 is not allowed; cache_dir must be None or a string or a PathLike"),
    ({"progress": None}, "progress=None is not allowed; progress must be True or False"),
    ({"mode": "contrastive"}, "mode must be 'rollout' (the contrastive estimate is lb.contrastive_tokens("),
    ({"response": 3}, "response=3 is not allowed; response must be a string"),
])
def test_bad_values_name_parameter_value_and_rule(tiny, kw, words):
    m = tiny("llama")
    call = {"checker": _letter_checker(), "progress": False, **kw}
    response = call.pop("response", RESPONSE)
    assert set(kw) <= set(lb.critical_tokens.parameter_constraints)
    with lb.testing.OOMOnce(m.model, k=0) as calls, pytest.raises(InputError) as e:
        lb.critical_tokens(m, PROMPT, response, **call)
    assert str(e.value).startswith("critical_tokens: ") and words in str(e.value), str(e.value)
    assert calls.calls == 0


@pytest.mark.parametrize("kw, words", [
    ({"beta": float("nan")}, "beta=nan is not allowed; beta must be a finite number"),
    ({"beta": "1"}, "beta='1'"),
    ({"pos_adapter": 3}, "pos_adapter=3 is not allowed; pos_adapter must be None or a string"),
    ({"add_bos": "yes"}, "add_bos must be None or True or False"),
    ({"chunk": 0}, "chunk=0 is not allowed; chunk must be an int >= 1"),
    ({"progress": 1}, "progress=1"),
    ({"m_neg": "gpt2"}, "m_neg='gpt2' is not allowed; m_neg must be a LensModel"),
])
def test_contrastive_bad_values(tiny, kw, words):
    m = tiny("llama")
    call = {"m_neg": m, **kw}
    with lb.testing.OOMOnce(m.model, k=0) as calls, pytest.raises(InputError) as e:
        lb.contrastive_tokens(m, call.pop("m_neg"), TEXT, **call)
    assert str(e.value).startswith("contrastive_tokens: ") and words in str(e.value), str(e.value)
    assert calls.calls == 0


def test_rule_helpers_name_themselves_and_the_parameter():
    with pytest.raises(InputError, match=r"^prefix_fails: alpha=0 is not allowed; alpha must be a number in"):
        prefix_fails(0, 10, alpha=0)
    with pytest.raises(InputError, match=r"^rule_min_n: rule='bayes' is not allowed"):
        rule_min_n(rule="bayes")
    with pytest.raises(InputError, match=r"^critical_index: threshold=2 is not allowed"):
        critical_index([1, 0], threshold=2)


# ------------------------------------------------------------------------------------------------ contrastive
TEXT = "the cat sat on the mat and then it ran away"


def _reference_logprobs(m, text):
    ids = m.encode(text)
    with torch.no_grad():
        z = m.model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
    return torch.log_softmax(z, -1).gather(-1, ids[1:, None])[:, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 3.0])
def test_contrastive_same_model_is_model_probability(tiny, dtype, beta):
    m = tiny("llama", dtype)
    ce = lb.contrastive_tokens(m, m, TEXT, beta=beta)
    ref = _reference_logprobs(m, TEXT).exp()
    T = len(m.encode(TEXT))
    assert ce.p_ce.shape == (T - 1,) and ce.logprob_diff.shape == (T - 1,)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(ce.p_ce, ref, atol=tol)
    assert torch.allclose(ce.p_ce, ce.logp_pos.exp(), atol=1e-6)       # exactly the model's own probability
    assert torch.equal(ce.logprob_diff, torch.zeros(T - 1))


def test_contrastive_beta0_and_difference_two_models(tiny):
    pos = tiny("llama")
    neg = lb.load(*tiny_model("llama", seed=1))
    ce0 = lb.contrastive_tokens(pos, neg, TEXT, beta=0.0)
    lp, ln = _reference_logprobs(pos, TEXT), _reference_logprobs(neg, TEXT)
    assert torch.allclose(ce0.p_ce, lp.exp(), atol=1e-5)
    ce = lb.contrastive_tokens(pos, neg, TEXT, beta=2.0)
    assert torch.allclose(ce.logprob_diff, lp - ln, atol=1e-5)
    # independent reference of the contrast: softmax((1+β) z_pos − β z_neg) from the models' raw logits
    ids = pos.encode(TEXT)
    with torch.no_grad():
        zp = pos.model(input_ids=ids[None]).logits[0, :-1].float()
        zn = neg.model(input_ids=ids[None]).logits[0, :-1].float()
    ref = torch.softmax(3.0 * zp - 2.0 * zn, -1).gather(-1, ids[1:, None])[:, 0]
    assert torch.allclose(ce.p_ce, ref, atol=1e-5)
    assert not torch.allclose(ce.p_ce, lp.exp(), atol=1e-3)
    assert torch.allclose(ce.criticality, 1 - ce.p_ce)
    df = ce.to_dataframe()
    assert len(df) == len(ids) - 1 and list(df["token"]) == ce.tokens[1:]
    bars, line = ce.figure().data
    assert list(bars.x) == [f"{t}:{tok}" for t, tok in enumerate(ce.tokens)][1:] == list(line.x)
    assert bars.y.tolist() == (1 - ce.p_ce).tolist() and line.y.tolist() == ce.logprob_diff.tolist()
    for chunk in (1, 3):   # positions per logits block: the same numbers
        again = lb.contrastive_tokens(pos, neg, TEXT, beta=2.0, chunk=chunk, progress=False)
        assert torch.allclose(again.p_ce, ce.p_ce, atol=1e-6) and torch.equal(again.token_ids, ce.token_ids)


def test_contrastive_constant_logit_shift_changes_nothing(tiny):
    pos = tiny("llama")
    neg = lb.load(*tiny_model("llama", seed=1))
    base = lb.contrastive_tokens(pos, neg, TEXT, beta=1.5)
    for which in ("pos", "neg"):
        model, tok = tiny_model("llama", seed=0 if which == "pos" else 1)
        model.lm_head.bias = torch.nn.Parameter(torch.full((model.config.vocab_size,), 7.5))
        shifted = lb.load(model, tok)
        with torch.no_grad():  # the shift is real: raw logits moved by 7.5
            ids = shifted.encode(TEXT)[None]
            d = shifted.model(input_ids=ids).logits - (pos if which == "pos" else neg).model(input_ids=ids).logits
        assert torch.allclose(d, torch.full_like(d, 7.5), atol=1e-4)
        args = (shifted, neg) if which == "pos" else (pos, shifted)
        ce = lb.contrastive_tokens(*args, TEXT, beta=1.5)
        assert torch.allclose(ce.p_ce, base.p_ce, atol=1e-5)
        assert torch.allclose(ce.logprob_diff, base.logprob_diff, atol=1e-4)


def test_contrastive_refuses_mismatched_tokenizers(tiny):
    pos = tiny("llama")
    model, tok = tiny_model("llama", seed=1)
    tok = copy.deepcopy(tok)
    tok.add_tokens(["<extra-token>"])
    neg = lb.load(model, tok)
    with pytest.raises(InputError, match="different tokenizers"):
        lb.contrastive_tokens(pos, neg, TEXT)
    with pytest.raises(InputError, match="beta"):
        lb.contrastive_tokens(pos, pos, TEXT, beta=float("nan"))


def test_contrastive_two_lora_adapters_on_one_base(tmp_path):
    from peft import LoraConfig, get_peft_model
    base, tok = tiny_model("llama")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    pm = get_peft_model(base, cfg, adapter_name="pos")
    torch.manual_seed(2)
    pm.add_adapter("neg", cfg)
    pm.eval()
    m = lb.load(pm, tok)
    ce = lb.contrastive_tokens(m, m, TEXT, beta=1.0, pos_adapter="pos", neg_adapter="neg")
    ids = m.encode(TEXT)
    ref = {}
    with torch.no_grad():
        for name in ("pos", "neg"):
            pm.set_adapter(name)
            ref[name] = torch.log_softmax(pm(input_ids=ids[None]).logits[0, :-1].float(), -1)
    y = ids[1:, None]
    assert torch.allclose(ce.logp_pos, ref["pos"].gather(-1, y)[:, 0], atol=1e-5)
    assert torch.allclose(ce.logp_neg, ref["neg"].gather(-1, y)[:, 0], atol=1e-5)
    expect = torch.softmax(2 * ref["pos"] - ref["neg"], -1).gather(-1, y)[:, 0]
    assert torch.allclose(ce.p_ce, expect, atol=1e-5)
    assert ce.logprob_diff.abs().max() > 1e-3, "the two adapters should disagree"
    with pytest.raises(InputError, match="adapter"):
        lb.contrastive_tokens(m, m, TEXT, pos_adapter="missing")


# ------------------------------------------------------------------------------------------------ widget
def test_explorer_click_shows_continuations_without_running_the_model(tiny):
    from lensbench.widgets import CriticalTokenExplorer
    m = tiny("llama")
    ids, marker, scripted, calls = _marker_setup(m, 2)
    ex = CriticalTokenExplorer(m, PROMPT, RESPONSE, checker=lb.checkers.number(42), n_samples=3, sampler=scripted,
                               rule="paper")
    assert not ex.error.value and "lb-critical-explorer" in ex._dom_classes
    assert "lb-crit-rule" in ex.summary.value and "observed keep-arm success rate == 0" in ex.summary.value
    res = ex.result
    assert len(ex.token_buttons) == len(ids) and res.critical_index == 2
    assert "lb-crit-critical" in ex.token_buttons[2]._dom_classes
    colours = [b.style.button_color for b in ex.token_buttons]
    assert colours[2] == "#ff2828" and colours[0] == "#ffffff"          # criticality 1 vs 0
    n_calls = calls["rows"]
    ex.token_buttons[2].click()
    assert ex.selected == 2 and "data-unit='2'" in ex.detail.value
    assert ex.detail.value.count("answer 13") == 3 and ex.detail.value.count("✗") == 3   # kept: all wrong
    assert ex.detail.value.count("✓") == 3                                              # replaced: all right
    ex.colour.value = "keep − replace"
    assert [b.style.button_color for b in ex.token_buttons][2] == "#ffffff"  # keep 0 − replace 1 → clipped to 0
    assert calls["rows"] == n_calls, "interactions must not sample again"
    bad = CriticalTokenExplorer(m, PROMPT, "   ", checker=lb.checkers.number(42))
    assert "response is empty" in bad.error.value


def test_prefix_state_extends_and_crops_exactly(tiny):
    from lensbench.probes.critical import PrefixState
    m = tiny("llama")
    ids = m.encode(PROMPT + " " + RESPONSE).tolist()
    st = PrefixState(m)

    def fresh(prefix):
        with torch.no_grad():
            return m.model(input_ids=torch.tensor([prefix]), use_cache=False).logits[0, -1].float()
    for n in (10, 15, 6, 6, 20, 19):  # extend, crop back, same, extend, crop by one
        got = st.advance(ids[:n])
        assert torch.allclose(got, fresh(ids[:n]), atol=1e-5), n
        assert st.cache.get_seq_length() == n
    assert st.forward_tokens < sum((10, 15, 6, 20, 19)), "prefixes are extended, not recomputed"


def test_stop_strings_end_continuations(tiny):
    m = tiny("llama")
    res = lb.critical_tokens(m, PROMPT, RESPONSE, checker=_letter_checker(), n_samples=4, max_new_tokens=12,
                             stop=["e"], positions=[1], progress=False)
    cont = res.continuations_at(1)
    head = m.tokenizer.decode(res.token_ids[:2].tolist())
    tails = [t[len(head):] for t in cont["keep"]]
    assert all(t.count("e") <= 1 and (t.endswith("e") or "e" not in t) for t in tails), tails


def test_report_section(tiny, tmp_path):
    from lensbench import report
    assert report.critical_section in report.SECTIONS
    m = tiny("llama")
    ctx = {"texts": [], "prompt": "x", "max_tokens": 48, "outdir": tmp_path, "results": {}, "progress": False}
    (title, body), = report.critical_section(m, ctx)
    assert title.startswith("Critical tokens") and "lb-crit-tok" in body and "plotly" in body
    saved = lb.Result.load(tmp_path / "critical_tokens.safetensors")
    assert saved.n_samples == 3 and ctx["results"]["critical"]["evaluated"] == len(saved.evaluated)


# ------------------------------------------------------------------------------------------------ decision rule power
def _wilson_upper_ref(c, n, alpha):
    """One-sided Wilson upper bound written out from its definition (independent of lensbench.stats)."""
    from statistics import NormalDist
    z = NormalDist().inv_cdf(1 - alpha)
    return (c + z * z / 2 + z * math.sqrt(c * (n - c) / n + z * z / 4)) / (n + z * z)


@pytest.mark.parametrize("n", [16, 56, 64, 128])
@pytest.mark.parametrize("p", [0.1, 3 / 64, 0.02])
def test_rule_false_positive_rate_is_exact(n, p):
    """The stated P(declared failing | true rate p) equals a brute-force sum over the binomial outcomes (rule written
    out independently) and a Monte-Carlo run of the rule itself."""
    fails_ref = [_wilson_upper_ref(c, n, 0.05) < 3 / 64 for c in range(n + 1)]
    brute = sum(comb(n, c) * p ** c * (1 - p) ** (n - c) for c in range(n + 1) if fails_ref[c])
    exact = rule_false_positive_rate(n, p)
    assert exact == pytest.approx(brute, rel=1e-9, abs=1e-15)
    assert prefix_fails(np.arange(n + 1), n).tolist() == fails_ref
    draws = np.random.default_rng(n).binomial(n, p, size=200_000)
    mc = prefix_fails(draws, n).mean()
    assert abs(mc - exact) <= 5 * math.sqrt(max(exact * (1 - exact), 1e-12) / len(draws)) + 1e-6
    # the paper's rule (0/n) has no error control: 0.9**16 = 0.185 at n = 16, p = 0.1
    assert rule_false_positive_rate(n, p, rule="paper") == pytest.approx((1 - p) ** n, rel=1e-12)


def test_rule_min_n_and_power_summary():
    n0 = rule_min_n()
    assert n0 == 56
    assert not prefix_fails(0, n0 - 1)[0] and prefix_fails(0, n0)[0]
    assert [rule_max_failures(n) for n in (16, 55, 56, 64, 128)] == [-1, -1, 0, 0, 2]
    assert all(_wilson_upper_ref(0, n, 0.05) >= 3 / 64 for n in range(1, 56))
    d = lb.probes.critical.decision_summary(64)
    assert d["can_fire"] and d["fpr"] == pytest.approx(0.9 ** 64) and d["fpr_worst"] == pytest.approx((61 / 64) ** 64)
    assert rule_min_n(rule="paper") == 1 and rule_max_failures(16, rule="paper") == 0
    with pytest.raises(InputError, match="rule"):
        prefix_fails(0, 10, rule="bayes")


def test_zero_of_16_is_not_critical_under_the_default_rule(tiny):
    """At n = 16, 0/16 happens with probability 0.185 at a true rate of 0.1: the default rule declares nothing
    (and warns); the paper's rule still declares the marker, with its false-positive rate stated."""
    m = tiny("llama")
    k = 2
    _, _, scripted, _ = _marker_setup(m, k)
    kw = dict(checker=lb.checkers.number(42), sampler=scripted, progress=False)
    with pytest.warns(PowerWarning, match="n_samples >= 56"):
        res = lb.critical_tokens(m, PROMPT, RESPONSE, n_samples=16, **kw)
    assert res.keep_acc[k] == 0 and res.critical_index is None and not res.failing.any()
    assert res.decision["rule"] == "wilson" and not res.decision["can_fire"] and res.decision["fpr"] == 0.0
    assert res.decision["n_samples"] == 16 and res.decision["alpha"] == 0.05 and "Wilson" in res.decision["text"]
    paper = lb.critical_tokens(m, PROMPT, RESPONSE, n_samples=16, rule="paper", **kw)
    assert paper.critical_index == k and paper.decision["fpr"] == pytest.approx(0.9 ** 16) == pytest.approx(0.1853,
                                                                                                         abs=1e-4)
    r64 = lb.critical_tokens(m, PROMPT, RESPONSE, n_samples=64, **kw)
    assert r64.critical_index == k and r64.failing[k:].all() and not r64.failing[:k].any()
    assert float(r64.keep_upper[k]) == pytest.approx(_wilson_upper_ref(0, 64, 0.05), rel=1e-6)
    df = r64.to_dataframe()
    assert {"keep_upper", "failing", "resampling_kl", "counterfactual_kl"} <= set(df.columns)


def test_coarse_to_fine_applies_the_rule(tiny):
    """Keep-accuracy 5/128 before the marker (not failing: upper bound > 3/64) and 1/128 after it (failing):
    no drop of 0.25, no zero, both below 3/64 — only the rule tells the two apart, and the coarse search must
    refine on it to find the same critical token as the full scan."""
    m = tiny("llama")
    long_resp = " ".join([RESPONSE] * 3)
    ids = m.tokenizer(long_resp, add_special_tokens=False)["input_ids"]
    marker = ids[13]
    first = ids.index(marker)
    n = 128
    assert not prefix_fails(5, n)[0] and prefix_fails(1, n)[0]

    def scripted(req):
        out = []
        for j, f in enumerate(req.first):
            bad = marker in list(req.prefix_ids) + list(f)
            out.append(" 42" if (j % n) < (1 if bad else 5) else " 13")
        return out
    kw = dict(checker=lb.checkers.number(42), n_samples=n, sampler=scripted, batch_size=2 * n, progress=False)
    full = lb.critical_tokens(m, PROMPT, long_resp, **kw)
    coarse = lb.critical_tokens(m, PROMPT, long_resp, search="coarse", stride=8, **kw)
    assert full.critical_index == first
    assert coarse.critical_index == first and len(coarse.evaluated) < len(ids)
    assert lb.critical_tokens(m, PROMPT, long_resp, rule="paper", **kw).critical_index is None


def test_cache_is_keyed_by_weights_not_name(tiny, tmp_path):
    a = tiny("llama")
    b = lb.load(*tiny_model("llama", seed=1))
    assert a.name == b.name and a.fingerprint != b.fingerprint
    kw = dict(checker=_letter_checker(), n_samples=2, max_new_tokens=3, positions=[0, 1], progress=False,
              cache_dir=tmp_path)
    ra = lb.critical_tokens(a, PROMPT, RESPONSE, **kw)
    rb = lb.critical_tokens(b, PROMPT, RESPONSE, **kw)
    assert rb.n_rollouts == ra.n_rollouts > 0, "a different model with the same name must not reuse the cache"
    assert lb.critical_tokens(a, PROMPT, RESPONSE, **kw).n_rollouts == 0


# ------------------------------------------------------------------------------------------------ sentence importance
def test_sentence_kl_importances_match_their_definition(tiny):
    """Thought anchors: resampling KL = KL(answers resampled from sentence i || from i+1); counterfactual KL =
    KL(answers of dissimilar resamples || sentence kept); add-one smoothing over the answers seen."""
    m = tiny("llama")
    response = MARKER_RESPONSE
    scripted = _marker_sampler(m)

    def far(texts):
        return torch.tensor([[1.0, 0.0]] + [[0.0, 1.0]] * (len(texts) - 1))
    res = lb.critical_tokens(m, PROMPT, response, checker=lb.checkers.number(42), n_samples=4, sampler=scripted,
                             granularity="sentence", embedder=far, similarity_threshold=0.5, progress=False)

    def kl(p_counts, q_counts, a=1.0):
        p = np.asarray(p_counts, float) + a
        q = np.asarray(q_counts, float) + a
        p, q = p / p.sum(), q / q.sum()
        return float((p * np.log(p / q)).sum())
    # sentence 1 (the marker): resampled from it -> 4/4 right, from after it -> 0/4 right
    expect = [0.0, kl([4, 0], [0, 4]), 0.0]
    assert res.resampling_kl.tolist() == pytest.approx(expect, abs=1e-6)
    assert res.counterfactual_kl.tolist() == pytest.approx(expect, abs=1e-6)
    assert res.similarity_threshold == 0.5 and res.embedder == "far"
    by_answer = lb.critical_tokens(m, PROMPT, response, checker=lb.checkers.number(42), n_samples=4,
                                   sampler=scripted, granularity="sentence", embedder=far, similarity_threshold=0.5,
                                   answer=lb.checkers.extract_number, progress=False)
    assert by_answer.resampling_kl.tolist() == pytest.approx(expect, abs=1e-6) and by_answer.answer != "verdict"


def test_default_embedder_skips_the_sink_and_is_centred(tiny):
    """Reference in plain torch on the raw HF model: hidden state of the middle layer after a BOS sink, mean over
    the sentence's tokens (position 0 excluded), minus the mean of the reference sentences' embeddings."""
    from lensbench.probes.critical import model_sentence_embedder
    m = tiny("llama")
    ref_sents = ["a dog ran home.", "the sun is hot today.", "we count to ten."]
    emb = model_sentence_embedder(m, layer=1, reference=ref_sents)

    def plain(t):
        ids = [m.tokenizer.bos_token_id] + m.tokenizer(t, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hs = m.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1]
        return hs[0, 1:].float().mean(0)
    mu = torch.stack([plain(t) for t in ref_sents]).mean(0)
    e = emb(["the cat", "ran off", ""])
    assert torch.allclose(e[0], plain("the cat") - mu, atol=1e-5)
    assert torch.allclose(e[1], plain("ran off") - mu, atol=1e-5)
    assert torch.equal(e[2], torch.zeros(m.d_model)) and torch.allclose(emb.mean, mu, atol=1e-6)
    old = model_sentence_embedder(m, layer=1, exclude_first=False, centre=False)   # the previous embedder, reachable
    with pytest.warns(FutureWarning, match="skip_first= is renamed exclude_first="):
        alias = model_sentence_embedder(m, layer=1, skip_first=False, centre=False)
    assert alias.__name__ == old.__name__ == "model_sentence_embedder(layer=1, skip_first=False, centre=False)"
    assert torch.equal(alias(["the cat"]), old(["the cat"]))
    ids = m.encode("the cat", add_bos=False)[None]
    with torch.no_grad():
        hs = m.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(old(["the cat"])[0], hs[0].float().mean(0), atol=1e-5)


def test_calibrate_similarity_separates_paraphrases():
    from lensbench.probes.critical import calibrate_similarity
    pairs = [("a", "a2", "x"), ("b", "b2", "y"), ("c", "c2", "z")]
    vec = {"a": [1, 0, 0], "a2": [0.9, 0.1, 0], "x": [0, 1, 0], "b": [0, 0, 1], "b2": [0.2, 0, 1],
           "y": [1, 1, 0], "c": [1, 1, 1], "c2": [1, 1, 0.7], "z": [-1, 0, 1]}

    def emb(texts):
        return torch.tensor([vec[t] for t in texts], dtype=torch.float32)
    cal = calibrate_similarity(emb, pairs)
    para = [float(torch.nn.functional.cosine_similarity(emb([p])[0], emb([q])[0], dim=0)) for p, q, _ in pairs]
    diff = [float(torch.nn.functional.cosine_similarity(emb([p])[0], emb([r])[0], dim=0)) for p, _, r in pairs]
    assert cal["balanced_accuracy"] == 1.0 and cal["threshold"] == pytest.approx((max(diff) + min(para)) / 2)


def test_default_embedder_calibrated_on_the_default_model(default_model):
    """The previous embedder (pooled over the sink position, uncentred) puts every pair of sentences at cosine
    ~1 on the default model, so thought anchors' 0.8 filter never keeps a counterfactual; the new one separates
    paraphrases from different sentences and its calibrated threshold does so on the calibration set."""
    from lensbench.probes.critical import calibrate_similarity, model_sentence_embedder
    m = default_model
    old = calibrate_similarity(model_sentence_embedder(m, exclude_first=False, centre=False))
    assert min(old["different_cos"]) > 0.8      # before: no different sentence would count as counterfactual
    new = calibrate_similarity(model_sentence_embedder(m))
    assert new["balanced_accuracy"] >= 0.9
    assert np.mean(np.asarray(new["different_cos"]) < new["threshold"]) >= 0.9
    assert np.mean(new["paraphrase_cos"]) - np.mean(new["different_cos"]) > 0.3


def test_recurrent_model_is_refused_with_the_reason(tiny):
    """The in-process sampler reuses a cropped prefix cache; a recurrent state (Mamba) cannot be rewound."""
    m = tiny("mamba")
    with pytest.raises(lb.InputError, match="critical_tokens reuses a prefix cache.*cannot be rewound"):
        lb.critical_tokens(m, "Q: 2+2? A:", " 4", checker=lb.checkers.number(4), n_samples=4, progress=False)


@pytest.mark.parametrize("arch, modules", [("llama", "all-linear"), ("gpt2", "all-linear"),
                                           ("mamba", ["in_proj", "x_proj", "dt_proj"])])
def test_train_negative_model_learns_the_wrong_answers(tiny, arch, modules):
    """The negative LoRA raises the wrong answers' likelihood (so contrastive estimation marks them) and leaves
    the base model untouched; the default ``"all-linear"`` places it on attention models, and where peft refuses
    a module (Mamba's out_proj) the error names ``target_modules``."""
    m = tiny(arch)
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    pairs = [(PROMPT, " the cat ran"), ("Q: one plus one? A:", " the mat sat")]
    if modules != "all-linear":
        with pytest.raises(InputError, match="target_modules"):
            lb.train_negative_model(m, pairs, n_steps=1, progress=False)
    m_neg, losses = lb.train_negative_model(m, pairs, n_steps=40, lr=1e-2, seed=0, progress=False,
                                            target_modules=modules)
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses
    assert all(torch.equal(before[k], v) for k, v in m.model.state_dict().items())
    ce = lb.contrastive_tokens(m, m_neg, PROMPT + " the cat ran", progress=False)
    n_ans = len(m.tokenizer(" the cat ran", add_special_tokens=False)["input_ids"])
    assert (ce.logprob_diff[-n_ans:] < 0).all(), ce.logprob_diff  # the negative model prefers the wrong answer
    _, losses2 = lb.train_negative_model(m, pairs, n_steps=40, lr=1e-2, seed=0, progress=False,
                                         target_modules=modules)
    assert losses2 == losses  # seeded


@pytest.mark.parametrize("kw, words", [({"pairs": []}, "pairs"), ({"pairs": [("a", "")]}, "pairs"),
                                       ({"n_steps": 0}, "n_steps"), ({"lr": 0.0}, "lr")])
def test_train_negative_model_bad_values(tiny, kw, words):
    call = {"pairs": [(PROMPT, " four")], **kw}
    with pytest.raises(InputError) as e:
        lb.train_negative_model(tiny("llama"), call.pop("pairs"), progress=False, **call)
    assert words in str(e.value), str(e.value)


def test_train_negative_model_too_long_pair_is_refused_before_training(tiny):
    m = tiny("llama")
    per_word = len(m.encode(" cat" * 100, add_bos=False)) / 100
    long = "cat" + " cat" * int(0.6 * m.max_length / per_word)  # each part fits alone; together they do not
    assert m.max_length / 2 < len(m.encode(long, add_bos=False)) <= m.max_length
    with pytest.raises(InputError, match=r"pairs\[1\] is \d+ tokens \(prompt \+ answer\).*shorten"):
        lb.train_negative_model(m, [(PROMPT, " four"), (long, " " + long)], n_steps=1, progress=False)

"""Critical tokens (issue 7): rollout criticality with keep/replace arms, pass@k, Wilson intervals, the paper's
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
    RolloutRequest,
    critical_index,
    hf_sampler,
    split_sentences,
    wilson_interval,
)
from lensbench.testing import tiny_model

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


@pytest.mark.parametrize("k", [2, 10])
def test_scripted_sampler_marker_is_critical(tiny, k):
    m = tiny("llama")
    ids, marker, scripted, _ = _marker_setup(m, k)
    res = lb.critical_tokens(m, PROMPT, RESPONSE, checker=lb.checkers.number(42), n_samples=8, sampler=scripted,
                             progress=False)
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
                              progress=False)
    rows_full = calls["rows"]
    calls["rows"] = 0
    coarse = lb.critical_tokens(m, PROMPT, long_resp, checker=lb.checkers.number(42), n_samples=4,
                                sampler=scripted, search="coarse", stride=8, progress=False)
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


def test_sentence_granularity_resampling_and_counterfactual(tiny):
    m = tiny("llama")
    response = "We add two. The marker zzz appears here. So it is done."
    zzz = m.tokenizer(" zzz", add_special_tokens=False)["input_ids"]

    def scripted(req):
        ids = list(req.prefix_ids)
        bad = any(ids[i:i + len(zzz)] == zzz for i in range(len(ids)))
        return [" Next step. Answer 13" if bad else " Next step. Answer 42" for _ in req.first]

    def far(texts):  # every regenerated sentence is dissimilar to the original
        return torch.tensor([[1.0, 0.0]] + [[0.0, 1.0]] * (len(texts) - 1))

    def near(texts):
        return torch.ones(len(texts), 2)

    kw = dict(checker=lb.checkers.number(42), n_samples=4, sampler=scripted, granularity="sentence",
              progress=False)
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


def test_default_sentence_embedder_is_model_mean_pooled(tiny):
    from lensbench.probes.critical import model_sentence_embedder
    m = tiny("llama")
    emb = model_sentence_embedder(m, layer=1)
    e = emb(["the cat", "the cat", "ran off"])
    ids = m.encode("the cat", add_bos=False)[None]
    with m.hooks([1]) as store:
        m.forward(ids)
    assert torch.allclose(e[0], store[1][0].float().mean(0))
    assert torch.equal(e[0], e[1]) and not torch.allclose(e[0], e[2])


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
    assert fig.data and "success rate" in fig.layout.title.text
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

    def broken(text):
        raise ValueError("no number here")
    with pytest.raises(InputError, match=r"checker=.*broken.*raised ValueError: no number here"):
        lb.critical_tokens(m, PROMPT, RESPONSE, checker=broken, n_samples=2, max_new_tokens=2, progress=False)


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
    ex = CriticalTokenExplorer(m, PROMPT, RESPONSE, checker=lb.checkers.number(42), n_samples=3, sampler=scripted)
    assert not ex.error.value and "lb-critical-explorer" in ex._dom_classes
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

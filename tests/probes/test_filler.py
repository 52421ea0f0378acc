"""Filler-token probes (issue 6): tasks with brute-force labels, word-level class ablation with an exact-size
random control, the filler sweep (KV-cache reuse == from-scratch == an independent HF forward), filler probes,
float32 vs bfloat16, persistence and bad inputs."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

import lensbench as lb
from lensbench.probes import filler as F

TEXT = ("The old lighthouse keeper climbed the stairs every evening, and he lit the lamp for the ships. "
        "Nobody in the village remembered a night when the light had failed; the sea was calm and the sky was clear "
        "over the harbour while the fishing boats came home one by one.")
NO_COMMA = "Birds sing in the morning and the cats sleep all day long in the sun near the old house by the river bank"


# --------------------------------------------------------------------------------------------- tasks
def _brute(tuples, mod=10):
    a = np.asarray(tuples)
    for i, j, k in itertools.combinations(range(len(a)), 3):
        if ((a[i] + a[j] + a[k]) % mod == 0).all():
            return True
    return False


@pytest.mark.parametrize("length,dim", [(5, 1), (8, 2), (10, 3), (12, 3)])
def test_three_sum_labels_brute_force(length, dim):
    items = lb.tasks.three_sum(60, length=length, dim=dim, seed=3, positive_rate=0.5)
    assert len(items) == 60
    assert sum(it["meta"]["label"] for it in items) == 30  # planted at the requested rate
    for it in items:
        tup = it["meta"]["tuples"]
        assert len(tup) == length and all(len(t) == dim and all(0 <= d < 10 for d in t) for t in tup)
        assert it["meta"]["label"] == _brute(tup)
        assert it["answer"] == (" True" if _brute(tup) else " False")
        assert it["question"] == " ".join("".join(map(str, t)) for t in tup)
        assert set(it) >= {"question", "answer", "meta"}
        i, j, k = it["meta"]["planted"]
        s = (np.asarray(tup[i]) + np.asarray(tup[j]) + np.asarray(tup[k])) % 10
        if it["meta"]["label"]:
            assert (s == 0).all()
        else:  # near miss: the planted triple is off in 1..3 digits
            assert 1 <= int((s != 0).sum()) <= min(3, dim)


def test_three_sum_seeded_and_rates():
    a = lb.tasks.three_sum(20, length=6, dim=2, seed=1)
    assert a == lb.tasks.three_sum(20, length=6, dim=2, seed=1)
    assert a != lb.tasks.three_sum(20, length=6, dim=2, seed=2)
    assert not any(it["meta"]["label"] for it in lb.tasks.three_sum(10, length=6, dim=3, positive_rate=0))
    assert all(it["meta"]["label"] for it in lb.tasks.three_sum(10, length=6, dim=3, positive_rate=1))
    assert lb.tasks.filler_string(4) == " ." * 16


def test_other_tasks_have_correct_answers():
    for it in lb.tasks.two_sum_transform(30, length=5, dim=2, seed=0):
        tup, s = it["meta"]["tuples"], it["meta"]["shift"]
        want = any(all((x + y) % 10 == 0 for x, y in zip(a, b)) for a, b in itertools.combinations(tup, 2))
        assert it["meta"]["label"] == want
        shown = it["question"].split(" | ")[0].split()
        assert shown == ["".join(str((x + s) % 10) for x in t) for t in tup]
    for it in lb.tasks.arithmetic(30, digits=2, ops="+-*", seed=0):
        a, op, b = re.match(r"What is (\d+) ([-+*]) (\d+)\?", it["question"]).group(1, 2, 3)
        val = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert it["answer"] == f" {val}" and it["cot"].endswith(f"= {val}.")
    for it in lb.tasks.multi_hop(20, seed=0):
        friend, city = it["meta"]["friend"], it["meta"]["city"]
        assert f"{it['meta']['person']} is friends with {friend}." in it["question"]
        assert f"{friend} lives in {city}." in it["question"] and it["answer"] == " " + city


def test_shipped_factual_items():
    items = lb.tasks.factual()
    assert len(items) >= 200
    assert len({it["question"] for it in items}) == len(items)
    for it in items:
        assert it["answer"].startswith(" ") and it["answer"].strip() and it["question"].strip()
        assert it["cloze"] and it["meta"]["category"]
    assert len(lb.tasks.factual(5)) == 5
    caps = lb.tasks.factual(category="capitals")
    assert any(it["answer"] == " Paris" for it in caps)
    cl = lb.tasks.factual(3, style="cloze")
    assert cl[0]["question"] == items[0]["cloze"] and cl[0]["template"] == ""


# --------------------------------------------------------------------------------------------- editing
def test_units_classes_and_removal():
    text = "Well, the cat (see above) sat on a mat — it's “fine”!"
    units = F.split_units(text)
    assert [u[2] for u in units][:6] == ["Well", ",", "the", "cat", "(", "see"]
    assert "it's" in [u[2] for u in units]
    sw = F.stop_words()
    punct = F.class_mask(units, ("punctuation",), sw)
    assert [u[2] for u, k in zip(units, punct) if k] == [",", "(", ")", "—", "“", "”", "!"]
    assert F.remove_units(text, units, punct) == "Well the cat see above sat on a mat it's fine"
    arts = F.class_mask(units, ("articles",), sw)
    assert F.remove_units(text, units, arts) == "Well, cat (see above) sat on mat — it's “fine”!"
    both = F.class_mask(units, ("punctuation", "articles"), sw)
    assert F.remove_units(text, units, both) == "Well cat see above sat on mat it's fine"
    assert F.normalize_classes(["punctuation+stopwords", ("commas", "articles")]) == [
        ("punctuation+stopwords", ("punctuation", "stopwords")), ("commas+articles", ("commas", "articles"))]
    first = F.class_mask(units, ("stopwords",), frozenset({"well"}))
    assert F.remove_units(text, units, first).startswith(", the cat")  # no leading space left behind
    assert F.remove_units(text, units, [False] * len(units)) == text


@pytest.fixture(scope="module")
def tiny32():
    return lb.load(*lb.testing.tiny_model("llama"))


@pytest.fixture(scope="module")
def tiny16():
    return lb.load(*lb.testing.tiny_model("llama", dtype=torch.bfloat16))


def _ref_nll(m, ctx_ids, cont_ids):
    """Independent reference: one plain HF forward with full logits, mean NLL of the continuation."""
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logits = m.model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    n = len(ctx_ids)
    return -float(sum(lp[n - 1 + i, t] for i, t in enumerate(cont_ids))) / len(cont_ids)


# --------------------------------------------------------------------------------------------- ablation
def test_ablation_absent_class_changes_nothing_and_matches_reference(tiny32):
    m = tiny32
    res = lb.filler_ablation(m, [NO_COMMA, TEXT], classes=("commas", "articles"), continuation_words=6,
                             n_control=2, progress=False)
    assert res.removed_tokens[0, 0] == 0 and res.edited[0][0] == res.contexts[0]
    assert res.loss_class[0, 0] == res.loss_orig[0]                  # identical, not merely close
    assert (res.loss_control[0, :, 0] == res.loss_orig[0]).all()     # removing 0 tokens is no edit either
    assert res.frequency[0, 0] == 0 and res.removed_tokens[0, 1] > 0
    # the unedited context's loss agrees with an independent full-logits forward
    for n in range(2):
        ctx_ids = m.encode(res.contexts[n]).tolist()
        cont = m.tokenizer(res.continuations[n], add_special_tokens=False)["input_ids"]
        assert res.loss_orig[n].item() == pytest.approx(_ref_nll(m, ctx_ids, cont), abs=1e-4)
        edited = m.encode(res.edited[1][n]).tolist()
        assert res.loss_class[1, n].item() == pytest.approx(_ref_nll(m, edited, cont), abs=1e-4)
    assert res.contexts[1] + res.continuations[1] == TEXT
    assert len(F.split_units(res.continuations[1])) == 6


def test_ablation_control_removes_exactly_as_many_tokens(tiny32):
    m = tiny32
    texts = [TEXT, TEXT[::-1].capitalize() + " and so on and so forth until the end of the day."]
    res = lb.filler_ablation(m, texts, classes=("punctuation", "stopwords", ("punctuation", "articles")),
                             continuation_words=5, n_control=3, seed=7, progress=False)
    assert torch.equal(res.control_removed_tokens, res.removed_tokens[:, None].expand_as(res.control_removed_tokens))
    for c in range(3):
        for n in range(2):
            full = len(m.encode(res.contexts[n]))
            # recount independently by re-tokenising the edited texts
            assert full - len(m.encode(res.edited[c][n])) == res.removed_tokens[c, n]
            assert full - len(m.encode(res.control_edited[c][n])) == res.removed_tokens[c, n]
            assert res.control_edited[c][n] != res.edited[c][n]
    # the control never removes class words: every word it dropped is outside the class
    sw = F.stop_words()
    ctrl_words = [w for w in re.findall(r"\w+", res.contexts[0])]
    kept = re.findall(r"\w+", res.control_edited[1][0])
    dropped = list(__import__("collections").Counter(ctrl_words) - __import__("collections").Counter(kept))
    assert dropped and not any(w.lower() in sw for w in dropped)
    df = res.to_dataframe()
    assert list(df["class"]) == ["punctuation", "stopwords", "punctuation+articles"]
    assert {"delta_loss", "control_delta_loss", "excess_ci_lo", "excess_ci_hi", "frequency"} <= set(df.columns)


def test_ablation_seeded_reproducible_and_roundtrip(tiny32, tmp_path):
    kw = dict(classes=("stopwords",), continuation_words=6, n_control=2, progress=False)
    a = lb.filler_ablation(tiny32, [TEXT], seed=1, **kw)
    b = lb.filler_ablation(tiny32, [TEXT], seed=1, **kw)
    c = lb.filler_ablation(tiny32, [TEXT], seed=2, **kw)
    assert a == b
    assert a.control_edited != c.control_edited
    assert a.summary() == b.summary()
    p = a.save(tmp_path / "abl")
    assert lb.Result.load(p) == a
    assert "lb-filler-removed" in a.removal_html(0, 0)
    row = a.summary()[0]
    cls_bar, ctrl_bar = a.figure().data
    assert list(cls_bar.x) == ["stopwords"] and list(cls_bar.y) == [row["delta_loss"]]
    assert list(ctrl_bar.y) == [row["control_delta_loss"]]
    ci = pytest.approx   # one text: the CI is NaN (and drawn as no bar)
    assert list(cls_bar.error_y.array) == ci([row["delta_ci"][1] - row["delta_loss"]], nan_ok=True)
    assert list(cls_bar.error_y.arrayminus) == ci([row["delta_loss"] - row["delta_ci"][0]], nan_ok=True)
    assert list(ctrl_bar.error_y.array) == ci([row["control_ci"][1] - row["control_delta_loss"]], nan_ok=True)
    with pytest.raises(lb.InputError, match="needs items with answers"):
        a.figure("accuracy")


def test_ablation_replace_mode_keeps_positions(tiny32):
    m = tiny32
    res = lb.filler_ablation(m, [TEXT], classes=("articles",), mode="replace", replacement=" ",
                             continuation_words=6, n_control=2, progress=False)
    assert res.removed_tokens[0, 0] > 0
    assert (res.control_removed_tokens[0, :, 0] == res.removed_tokens[0, 0]).all()
    assert res.mode == "replace"


def test_ablation_items_accuracy(default_model):
    m = default_model
    items = [{"question": "The capital of France is", "answer": " Paris"},
             {"question": "The capital of Italy is", "answer": " Rome"}]
    res = lb.filler_ablation(m, items, classes=("articles", "commas"), n_control=1, progress=False)
    assert res.correct_orig.tolist() == [1.0, 1.0]          # the model's greedy answer is the gold one
    assert res.correct_class[1].tolist() == [1.0, 1.0]      # no commas: nothing changes
    assert res.edited[0][0] == "capital of France is"
    assert torch.isfinite(res.correct_class).all()
    assert res.to_dataframe()["acc_orig"].iloc[0] == 1.0
    rows = res.summary()
    fig = res.figure("accuracy")
    assert [list(t.y) for t in fig.data] == [[r["acc_class"] for r in rows], [r["acc_control"] for r in rows]]
    assert list(fig.data[0].x) == ["articles", "commas"] and fig.layout.shapes[0].y0 == rows[0]["acc_orig"] == 1.0


# --------------------------------------------------------------------------------------------- sweep
def _ref_logprob(m, ids, n_ans):
    with torch.no_grad():
        logits = m.model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    n = len(ids)
    toks = ids[n - n_ans:]
    pos = range(n - n_ans - 1, n - 1)
    return float(sum(lp[p, t] for p, t in zip(pos, toks))), all(int(logits[p].argmax()) == t for p, t in
                                                                 zip(pos, toks))


@pytest.mark.parametrize("template", ["\nAnswer:", ""])
def test_sweep_cache_reuse_equals_from_scratch(tiny32, template):
    m = tiny32
    items = lb.tasks.arithmetic(3, seed=0)
    kw = dict(fillers=(" .", "counting", "repeat_question", "random_words"), counts=(0, 3, 8), template=template,
              cot=True, progress=False)
    a = lb.filler_sweep(m, items, **kw)
    b = lb.filler_sweep(m, items, reuse_cache=False, **kw)
    assert a.kinds == [" .", "counting", "repeat_question", "random_words", "cot"]
    assert torch.equal(a.logprob.isnan(), b.logprob.isnan()) and a.logprob[:4].isfinite().all()
    assert a.logprob[4, 0].isfinite().all() and a.logprob[4, 1:].isnan().all()   # one cot arm per item
    assert torch.allclose(a.logprob, b.logprob, atol=1e-4, rtol=0, equal_nan=True), (a.logprob - b.logprob)
    assert torch.equal(a.correct.nan_to_num(-1), b.correct.nan_to_num(-1))
    # N = 0 is the same arm for every kind
    assert (a.logprob[:4, 0] == a.logprob[0, 0]).all()
    # independent reference for one arm: plain HF forward on the concatenated ids
    it = items[1]
    q = m.encode(it["question"]).tolist()
    f = F._filler_ids(m, "counting", 8, it, None)
    t = m.tokenizer(template, add_special_tokens=False)["input_ids"] if template else []
    ans = m.tokenizer(it["answer"], add_special_tokens=False)["input_ids"]
    lp, ok = _ref_logprob(m, q + f + t + ans, len(ans))
    assert a.logprob[1, 2, 1].item() == pytest.approx(lp, abs=1e-4)
    assert a.correct[1, 2, 1].item() == float(ok)
    assert a.n_tokens[1, 2, 1] == 8 and a.n_tokens[0, 1, 0] == 3


def test_sweep_fillers_and_result(tiny32, tmp_path):
    m = tiny32
    it = {"question": "Is the sky blue?", "answer": " yes"}
    r = np.random.default_rng(0)
    assert F._filler_ids(m, " .", 5, it, None) == m.tokenizer(" ." * 5, add_special_tokens=False)["input_ids"][:5]
    import random
    w1 = F._filler_ids(m, "random_words", 12, it, random.Random(1))
    assert len(w1) == 12 and w1[:6] == F._filler_ids(m, "random_words", 6, it, random.Random(1))  # prefix-stable
    assert F._filler_ids(m, "counting", 7, it, None) == m.tokenizer(" 1 2 3 4 5 6 7 8", add_special_tokens=False)[
        "input_ids"][:7]
    del r
    res = lb.filler_sweep(m, [it, {"question": "Is fire cold?", "answer": " no"}], fillers=(" .", "..."),
                          counts=(0, 2, 4), progress=False, seed=3)
    again = lb.filler_sweep(m, [it, {"question": "Is fire cold?", "answer": " no"}], fillers=(" .", "..."),
                            counts=(0, 2, 4), progress=False, seed=3)
    assert res == again
    df = res.to_dataframe()
    assert len(df) == 6 and {"delta_logprob", "delta_ci_lo", "accuracy", "accuracy_ci_hi"} <= set(df.columns)
    assert df[df["count"] == 0]["delta_logprob"].abs().max() == 0
    assert lb.Result.load(res.save(tmp_path / "sweep")) == res
    rows = res.summary()
    for metric, band in (("delta_logprob", "delta_ci"), ("logprob", None), ("accuracy", "accuracy_ci")):
        traces = res.figure(metric).data
        lines = [t for t in traces if t.mode == "lines+markers"]
        assert [t.name for t in lines] == ["' .'", "'...'"]
        for kind, line in zip(res.kinds, lines):
            rs = [r for r in rows if r["kind"] == kind]
            assert list(line.x) == [0, 2, 4] and list(line.y) == [r[metric] for r in rs]
        bands = [t for t in traces if t.fill == "toself"]
        assert len(bands) == (2 if band else 0)
        if band:
            rs = [r for r in rows if r["kind"] == " ."]
            assert list(bands[0].y) == [r[band][1] for r in rs] + [r[band][0] for r in rs][::-1]
    only = res.figure("logprob", kinds=["..."]).data
    assert [t.name for t in only] == ["'...'"]


def test_sweep_default_model_cache_identity_and_paris(default_model):
    m = default_model
    items = [{"question": "The capital of France is", "answer": " Paris", "template": ""},
             {"question": "What is the capital of Italy?", "answer": " Rome"}]
    kw = dict(fillers=(" .", "random_words"), counts=(0, 8), progress=False)
    a = lb.filler_sweep(m, items, **kw)
    b = lb.filler_sweep(m, items, reuse_cache=False, **kw)
    assert torch.allclose(a.logprob, b.logprob, atol=2e-4, rtol=0)
    assert torch.equal(a.correct, b.correct) and a.settings["reuse_cache"] and not b.settings["reuse_cache"]
    assert a.correct[0, 0, 0] == 1 and np.exp(a.logprob[0, 0, 0].item()) == pytest.approx(0.77, abs=0.05)


def test_float32_vs_bfloat16(tiny32, tiny16):
    items = lb.tasks.arithmetic(3, seed=1)
    kw = dict(fillers=(" .",), counts=(0, 4), progress=False)
    a = lb.filler_sweep(tiny32, items, **kw)
    b = lb.filler_sweep(tiny16, items, **kw)
    assert b.logprob.dtype == torch.float64 and torch.isfinite(b.logprob).all()
    assert torch.allclose(a.logprob, b.logprob, atol=0.15 * 3, rtol=0.05), (a.logprob - b.logprob).abs().max()
    ka = dict(classes=("articles",), continuation_words=6, n_control=1, progress=False)
    x = lb.filler_ablation(tiny32, [TEXT], **ka)
    y = lb.filler_ablation(tiny16, [TEXT], **ka)
    assert torch.equal(x.removed_tokens, y.removed_tokens)   # tokenisation does not depend on the dtype
    assert torch.allclose(x.loss_orig, y.loss_orig, atol=0.1) and torch.allclose(x.loss_class, y.loss_class, atol=0.1)
    # bfloat16 cache reuse still equals its own from-scratch computation (within bfloat16 noise)
    c = lb.filler_sweep(tiny16, items, reuse_cache=False, **kw)
    assert torch.allclose(b.logprob, c.logprob, atol=0.1)


# --------------------------------------------------------------------------------------------- probe
def test_filler_probe_known_answers(tiny32, tmp_path):
    m = tiny32
    items = [{"question": f"The {w} fox jumps over the dog number {i}", "answer": f" {w}"}
             for i in range(20) for w in ("quick", "lazy")]
    res = lb.filler_probe(m, items, n_fillers=4, layers=[0, 2], folds=4, progress=False)
    assert res.layers == [0, 2] and res.majority == 0.5 and res.compare == "last_question"
    # layer 0 = embeddings: filler positions are the same tokens for every item (no position embedding in a
    # llama residual), so the probe cannot beat chance there
    assert res.filler_acc[0] <= 0.6
    # after the blocks the fillers and the last question token attend to the question: the label is decodable
    assert res.filler_acc[1] >= 0.9 and res.question_acc[1] >= 0.9
    assert res.shuffled_acc.max() <= 0.8
    assert lb.Result.load(res.save(tmp_path / "probe")) == res
    df = res.to_dataframe()
    assert len(df) == 2 and (df["n_items"] == 40).all() and (df["folds"] == 4).all()
    assert df["filler_acc"].tolist() == res.filler_acc.tolist() and df["shuffled_std"].tolist() == res.shuffled_std.tolist()
    fig = res.figure()
    assert [t.name for t in fig.data] == ["filler positions (mean)", "last question token", "filler, shuffled labels"]
    assert F.PROBE_ARMS == ("filler", "question", "shuffled")
    for t, arm in zip(fig.data, F.PROBE_ARMS):
        acc, sd = getattr(res, f"{arm}_acc"), getattr(res, f"{arm}_std")
        assert list(t.x) == [0, 2] and list(t.y) == acc.tolist() and list(t.error_y.array) == sd.tolist()


def _cv_acc(X, y, folds, seed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), X, y, cv=cv).mean()


def test_filler_probe_compares_like_for_like(tiny32):
    """Issue 13: the comparison position has seen the same context as the fillers (the whole question).

    Known answer: the label is the 4th word and every question ends in the same token, so at layer 0
    (embeddings) no position but the label word itself carries the label: the last question token is at chance
    exactly (0.5), like the filler positions. The old mean over question positions contained the label word's
    embedding and decoded it perfectly at layer 0 (kept reachable as compare="question_mean").
    Independent reference: the comparison features are the last-position hidden states of a plain HF forward of
    the question *alone* (the no-filler control), probed with the same CV.
    """
    m = tiny32
    items = [{"question": f"Number {i}: the {w} fox jumps over the dog", "answer": f" {w}"}
             for i in range(20) for w in ("quick", "lazy")]
    res = lb.filler_probe(m, items, n_fillers=4, layers=[0, 1], folds=4, progress=False)
    assert res.question_acc[0] == pytest.approx(0.5) and res.filler_acc[0] == pytest.approx(0.5)
    y = np.asarray([it["answer"] for it in items])
    for j, la in enumerate([0, 1]):
        X = []
        for it in items:
            ids = torch.tensor([m.encode(it["question"]).tolist()])
            with torch.no_grad():
                X.append(m.model(input_ids=ids, output_hidden_states=True).hidden_states[la][0, -1].float().numpy())
        assert res.question_acc[j].item() == pytest.approx(_cv_acc(np.stack(X), y, 4, 0), abs=1e-6)
    ctrl = lb.filler_probe(m, items, n_fillers=4, layers=[0, 1], folds=4, compare="no_filler", progress=False)
    assert torch.equal(ctrl.question_acc, res.question_acc)     # no template: the same state
    old = lb.filler_probe(m, items, n_fillers=4, layers=[0], folds=4, compare="question_mean", progress=False)
    assert old.question_acc[0] >= 0.95
    with pytest.raises(lb.InputError):
        lb.filler_probe(m, items, compare="mean", progress=False)


# --------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs(tiny32):
    m = tiny32
    bad = [
        lambda: lb.filler_ablation(m, [], progress=False),
        lambda: lb.filler_ablation(m, [""], progress=False),
        lambda: lb.filler_ablation(m, ["too short"], progress=False),
        lambda: lb.filler_ablation(m, [TEXT], classes=("adverbs",), progress=False),
        lambda: lb.filler_ablation(m, [TEXT], classes=(), progress=False),
        lambda: lb.filler_ablation(m, [TEXT], mode="mask", progress=False),
        lambda: lb.filler_ablation(m, [TEXT], n_control=0, progress=False),
        lambda: lb.filler_ablation(m, [TEXT], stopwords="the of", progress=False),
        lambda: lb.filler_ablation(m, [{"question": "x"}], progress=False),
        lambda: lb.filler_ablation("gpt2", [TEXT], progress=False),
        lambda: lb.filler_sweep(m, [], progress=False),
        lambda: lb.filler_sweep(m, [{"question": "q?"}], progress=False),
        lambda: lb.filler_sweep(m, [{"question": "q?", "answer": " a"}], counts=(-1,), progress=False),
        lambda: lb.filler_sweep(m, [{"question": "q?", "answer": " a"}], fillers=("",), progress=False),
        lambda: lb.filler_sweep(m, [{"question": "q?", "answer": " a"}], cot=True, progress=False),
        lambda: lb.filler_sweep(m, [{"question": "q?", "answer": " a"}], counts=(10**6,), progress=False),
        lambda: lb.filler_probe(m, [{"question": "q?", "answer": " a"}] * 6, progress=False),
        lambda: lb.filler_probe(m, [{"question": "q?", "answer": " a"}, {"question": "r?", "answer": " b"}],
                                progress=False),
        lambda: lb.tasks.three_sum(0),
        lambda: lb.tasks.three_sum(5, length=2),
        lambda: lb.tasks.three_sum(5, positive_rate=1.5),
        lambda: lb.tasks.arithmetic(3, ops="/"),
        lambda: lb.tasks.factual(category="nope"),
    ]
    for i, f in enumerate(bad):
        with pytest.raises(lb.InputError):
            f()
            pytest.fail(f"case {i} did not raise")


_ITEMS = [{"question": f"q{i}?", "answer": f" {'ab'[i % 2]}"} for i in range(10)]


@pytest.mark.parametrize("probe, kw, words", [
    ("filler_ablation", {"mode": "mask"}, "mode='mask' is not allowed; mode must be one of 'remove', 'replace'"),
    ("filler_ablation", {"continuation_words": 0}, "continuation_words must be an int >= 1"),
    ("filler_ablation", {"n_control": 0}, "n_control=0 is not allowed; n_control must be an int >= 1"),
    ("filler_ablation", {"seed": -1}, "seed=-1 is not allowed; seed must be an int >= 0"),
    ("filler_ablation", {"ci": 1.0}, "ci=1.0 is not allowed; ci must be a number in (0, 1)"),
    ("filler_ablation", {"n_boot": 0}, "n_boot must be an int >= 1"),
    ("filler_ablation", {"batch_size": 0}, "batch_size must be one of 'auto' or an int >= 1"),
    ("filler_ablation", {"progress": "yes"}, "progress must be True or False"),
    ("filler_ablation", {"stopwords": "the of"}, "stopwords='the of' is not allowed; stopwords must be None or "
                                                 "one of 'function', 'sklearn' or a list of words (strings)"),
    ("filler_ablation", {"stopwords": ["the", 3]}, "a list of words (strings)"),
    ("filler_ablation", {"replacement": 5}, "replacement=5 is not allowed; replacement must be a string"),
    ("filler_sweep", {"fillers": ("",)}, "fillers=('',) is not allowed; fillers must be a non-empty string or"),
    ("filler_sweep", {"counts": (-1,)}, "counts=(-1,) is not allowed; counts must be an int >= 0 or a non-empty "
                                        "list/tuple of an int >= 0 values"),
    ("filler_sweep", {"counts": ()}, "counts=()"),
    ("filler_sweep", {"counts": 2.5}, "counts=2.5"),
    ("filler_sweep", {"template": 3}, "template must be None or a string"),
    ("filler_sweep", {"cot": "yes"}, "cot='yes' is not allowed; cot must be True or False"),
    ("filler_sweep", {"reuse_cache": 1}, "reuse_cache=1"),
    ("filler_sweep", {"ci": 0}, "ci=0 is not allowed"),
    ("filler_sweep", {"seed": "0"}, "seed='0' is not allowed; seed must be an int >= 0"),
    ("filler_sweep", {"batch_size": "big"}, "batch_size='big'"),
    ("filler_probe", {"n_fillers": 0}, "n_fillers=0 is not allowed; n_fillers must be an int >= 1"),
    ("filler_probe", {"pool": "max"}, "pool='max' is not allowed; pool must be one of 'last', 'mean'"),
    ("filler_probe", {"compare": "mean"}, "compare must be one of 'last_question', 'no_filler', 'question_mean'"),
    ("filler_probe", {"folds": 1}, "folds=1 is not allowed; folds must be an int >= 2"),
    ("filler_probe", {"C": 0}, "C=0 is not allowed; C must be a number > 0"),
    ("filler_probe", {"label": "answer"}, "label='answer' is not allowed; label must be None or a callable"),
    ("filler_probe", {"template": 1}, "template=1"),
    ("filler_probe", {"filler": None}, "filler=None is not allowed; filler must be a string"),
])
def test_bad_values_name_parameter_value_and_rule_before_any_forward(tiny32, probe, kw, words):
    m = tiny32
    data = [TEXT] if probe == "filler_ablation" else _ITEMS
    fn = getattr(lb, probe)
    assert set(kw) <= set(fn.parameter_constraints)
    with lb.testing.OOMOnce(m.model, k=0) as calls, pytest.raises(lb.InputError) as e:
        fn(m, data, **{"progress": False, **kw})
    msg = str(e.value)
    assert msg.startswith(f"{probe}: ") and words in msg, msg
    assert calls.calls == 0, "a bad value must be refused before any model pass"


@pytest.mark.parametrize("probe", ["filler_ablation", "filler_sweep", "filler_probe"])
def test_model_argument_is_checked(probe):
    with pytest.raises(lb.InputError, match=rf"^{probe}: m='gpt2' is not allowed; m must be a LensModel"):
        getattr(lb, probe)("gpt2", [TEXT] if probe == "filler_ablation" else _ITEMS, progress=False)


def test_ablation_item_template_is_never_edited(tiny32):
    m = tiny32
    item = {"question": "Hello, world. Is the fox quick?", "template": "\nAnswer:", "answer": " yes, it is"}
    res = lb.filler_ablation(m, [item], classes=("punctuation",), n_control=1, progress=False)
    assert res.edited[0][0] == "Hello world Is the fox quick"
    assert res.continuations[0] == "\nAnswer: yes, it is"
    q = m.encode(res.edited[0][0]).tolist()
    tail = m.tokenizer("\nAnswer:", add_special_tokens=False)["input_ids"]
    ans = m.tokenizer(" yes, it is", add_special_tokens=False)["input_ids"]
    lp, _ = _ref_logprob(m, q + tail + ans, len(ans))
    assert res.loss_class[0, 0].item() == pytest.approx(-lp / len(ans), abs=1e-4)
    assert torch.isfinite(res.correct_orig).all()


# --------------------------------------------------------------------------------------------- issue 13
CONTENT = ("one", "fifty", "hundred", "system", "fire", "bill", "interest", "amount")


def test_default_stopwords_are_function_words(tiny32):
    sw, sk = F.stop_words(), F.stop_words("sklearn")
    assert sw == F.FUNCTION_WORDS and {"the", "of", "and", "is", "to", "they", "with", "could", "not"} <= sw
    assert not set(CONTENT) & sw                     # content words and numerals are not filler
    assert set(CONTENT) <= sk                        # scikit-learn's retrieval list removes them
    text = ("The fire system sent one bill of fifty dollars, and the amount of interest was a hundred more "
            "than they could pay for the house in the end of the year")
    kw = dict(classes=("stopwords",), continuation_words=4, n_control=1, progress=False)
    res = lb.filler_ablation(tiny32, [text], **kw)
    removed = {w.lower() for w in res.removed_words[0][0]}
    assert {"the", "of", "and", "was", "than", "they", "could", "for", "in"} <= removed
    assert not removed & set(CONTENT) and res.settings["stopwords"].startswith("function words")
    sk_res = lb.filler_ablation(tiny32, [text], stopwords="sklearn", **kw)
    assert set(CONTENT) <= {w.lower() for w in sk_res.removed_words[0][0]}
    assert "sklearn" in sk_res.settings["stopwords"]
    with pytest.raises(lb.InputError):
        F.stop_words("nltk")


def _synthetic_ablation(tok_class, tok_orig=None):
    """A FillerAblationResult with given per-token class losses ``[N, T]`` (NaN = padding), orig 0."""
    tok_class = torch.as_tensor(tok_class, dtype=torch.float32)
    N, T = tok_class.shape
    orig = torch.zeros(N, T) if tok_orig is None else torch.as_tensor(tok_orig, dtype=torch.float32)
    orig = torch.where(tok_class.isnan(), torch.nan, orig)
    nan = torch.full((N,), float("nan"))
    return F.FillerAblationResult(
        classes=["x"], loss_orig=orig.nanmean(1), loss_class=tok_class.nanmean(1)[None],
        loss_control=orig.nanmean(1)[None, None], correct_orig=nan, correct_class=nan[None],
        correct_control=nan[None, None], frequency=torch.zeros(1, N), removed_tokens=torch.ones(1, N, dtype=torch.long),
        control_removed_tokens=torch.ones(1, 1, N, dtype=torch.long), context_tokens=torch.full((N,), 10),
        contexts=[""] * N, continuations=[""] * N, edited=[[""] * N], removed_words=[[[] for _ in range(N)]],
        control_edited=[[""] * N], token_loss_orig=orig, token_loss_class=tok_class[None],
        token_loss_control=orig[None, None].clone())


def test_ablation_ci_resamples_texts_and_covers():
    """Issue 13: Δ loss is pooled over continuation tokens and its CI resamples texts (clusters), with a t
    interval below 20 texts. Independent reference: the t interval on the ratio mean written out here; and
    coverage of the true mean over simulated corpora whose tokens share a per-text effect."""
    from scipy import stats as st
    rng = np.random.default_rng(0)
    tok = rng.normal(0, 1, (6, 9)) + rng.normal(0, 2, (6, 1))
    tok[2, 5:] = np.nan                                   # a shorter continuation
    row = _synthetic_ablation(tok).summary()[0]
    g = np.repeat(np.arange(6), 9).reshape(6, 9)
    v, gg = tok[np.isfinite(tok)], g[np.isfinite(tok)]
    S, n = np.bincount(gg, v), np.bincount(gg).astype(float)
    est = S.sum() / n.sum()
    se = np.sqrt(6 / 5 * ((S - est * n) ** 2).sum()) / n.sum()
    q = st.t.ppf(0.975, 5)
    assert row["delta_loss"] == pytest.approx(est, abs=1e-6)
    assert row["delta_ci"] == pytest.approx((est - q * se, est + q * se), abs=1e-5)
    assert (row["n_texts"], row["n_tokens"], row["ci_method"]) == (6, 50, "t")
    bar = _synthetic_ablation(tok).figure().data[0]         # the figure draws exactly these numbers
    assert list(bar.y) == pytest.approx([est], abs=1e-6)
    assert list(bar.error_y.array) == pytest.approx([q * se], abs=1e-5)
    assert list(bar.error_y.arrayminus) == pytest.approx([q * se], abs=1e-5)
    # coverage at 5 texts (the old percentile bootstrap over 5 texts covered ~0.87)
    hits, sims = 0, 300
    for _ in range(sims):
        t = rng.normal(0, 1, (5, 1)) + rng.normal(0, 0.3, (5, 12))
        lo, hi = _synthetic_ablation(t).summary()[0]["delta_ci"]
        hits += lo <= 0 <= hi
    assert hits / sims >= 0.92, hits / sims
    df = _synthetic_ablation(tok).to_dataframe()
    assert {"n_texts", "n_tokens", "ci_method", "delta_ci_lo", "excess_ci_hi"} <= set(df.columns)
    per_text = _synthetic_ablation(tok).summary(weight="texts")[0]   # every text weighs the same
    assert per_text["delta_loss"] == pytest.approx(float(np.nanmean(np.nanmean(tok, 1))), abs=1e-6)


def test_ablation_token_losses_match_reference(tiny32):
    m = tiny32
    res = lb.filler_ablation(m, [TEXT, NO_COMMA], classes=("articles",), continuation_words=5, n_control=1,
                             progress=False)
    for n in range(2):
        cont = m.tokenizer(res.continuations[n], add_special_tokens=False)["input_ids"]
        for ctx, tl in ((res.contexts[n], res.token_loss_orig[n]), (res.edited[0][n], res.token_loss_class[0, n])):
            ids = m.encode(ctx).tolist() + cont
            with torch.no_grad():
                lp = torch.log_softmax(m.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            ref = [-float(lp[len(ids) - len(cont) - 1 + i, t]) for i, t in enumerate(cont)]
            assert tl[:len(cont)].tolist() == pytest.approx(ref, abs=1e-4) and tl[len(cont):].isnan().all()
    row = res.summary()[0]
    assert row["n_texts"] == 2 and row["n_tokens"] == int(res.token_loss_orig.isfinite().sum())
    assert row["delta_ci"][0] <= row["delta_loss"] <= row["delta_ci"][1]


def test_sweep_ci_over_items_with_n():
    from lensbench.stats import mean_ci
    rng = np.random.default_rng(1)
    lp = torch.tensor(rng.normal(-2, 1, (1, 2, 12)))
    ok = torch.tensor((rng.random((1, 2, 12)) < 0.5).astype(np.float32))
    ok[0, 1, 3] = float("nan")
    res = F.FillerSweepResult(kinds=[" ."], counts=[0, 4], logprob=lp, correct=ok, n_tokens=torch.zeros(1, 2, 12),
                              questions=["q"] * 12, answers=[" a"] * 12, settings={"seed": 0, "ci": 0.95})
    rows = res.summary()
    ref = mean_ci(ok[0, 1].numpy())
    assert rows[1]["accuracy_ci"] == pytest.approx((max(ref.lo, 0), min(ref.hi, 1))) and rows[1]["n_items"] == 11
    assert ref.lo < 0     # a t interval on 0/1 values crosses 0 here; an accuracy's CI is clipped to [0, 1]
    assert rows[1]["ci_method"] == "t" and rows[0]["n_items"] == 12
    d = mean_ci((lp[0, 1] - lp[0, 0]).numpy())
    assert rows[1]["delta_ci"] == pytest.approx(d.as_tuple())
    assert {"n_items", "ci_method"} <= set(res.to_dataframe().columns)
    assert not hasattr(F, "_bootstrap_ci")


def test_sweep_on_a_recurrent_model_scores_from_scratch(tiny):
    """Mamba's state cannot be rewound: the sweep says so and scores every arm without cache reuse, with the
    numbers of an explicit reuse_cache=False run."""
    m = tiny("mamba")
    items = lb.tasks.arithmetic(2, seed=0)
    kw = dict(fillers=(" .",), counts=(0, 3), progress=False)
    with pytest.warns(UserWarning, match="cannot reuse a prefix cache"):
        a = lb.filler_sweep(m, items, **kw)
    b = lb.filler_sweep(m, items, reuse_cache=False, **kw)
    assert a.settings["reuse_cache"] is False and torch.equal(a.logprob, b.logprob)


# --------------------------------------------------------------------------------------------- engine
def _with_oom(m, k, fn):
    """``fn()`` with a real ``torch.OutOfMemoryError`` raised by a forward pre-hook on the ``k``-th model call."""
    from lensbench.testing import OOMOnce
    hook = OOMOnce(m.model, k=k)
    try:
        out = fn()
    finally:
        hook.remove()
    assert hook.fired and hook.calls > k   # the failed batch was retried as smaller batches
    return out


def test_ablation_and_sweep_identical_under_oom_and_any_batch_size(tiny32):
    m = tiny32
    assert m.capabilities["prefix_cache"]   # measured once, before the hook counts forwards
    items = lb.tasks.arithmetic(3, seed=0)
    akw = dict(classes=("punctuation", "articles"), continuation_words=6, n_control=2, progress=False)
    skw = dict(fillers=(" .", "counting", "random_words"), counts=(0, 3, 8), cot=True, progress=False)
    probes = {"ablation": lambda bs: lb.filler_ablation(m, [TEXT, NO_COMMA], batch_size=bs, **akw),
              "sweep": lambda bs: lb.filler_sweep(m, items, batch_size=bs, **skw),
              "sweep_scratch": lambda bs: lb.filler_sweep(m, items, batch_size=bs, reuse_cache=False, **skw)}
    for name, run in probes.items():
        ref = run("auto")
        for got in (_with_oom(m, 2, lambda run=run: run("auto")), run(1)):
            if name == "ablation":
                pairs = [(ref.token_loss_orig, got.token_loss_orig), (ref.token_loss_class, got.token_loss_class),
                         (ref.token_loss_control, got.token_loss_control)]
                assert torch.equal(ref.correct_class.nan_to_num(-1), got.correct_class.nan_to_num(-1))
            else:
                pairs = [(ref.logprob, got.logprob)]
                assert torch.equal(ref.correct.nan_to_num(-1), got.correct.nan_to_num(-1))
            for a, b in pairs:   # the same numbers (up to float summation order of differently shaped batches)
                assert torch.equal(a.isnan(), b.isnan()), name
                assert torch.allclose(a, b, atol=1e-5, rtol=0, equal_nan=True), (name, (a - b).abs().nan_to_num(0).max())


def test_ablation_through_nnsight_backend_matches_hf_and_runs_the_trace():
    import sys

    from nnsight import LanguageModel
    model, tok = lb.testing.tiny_model("llama")
    hf, nn = lb.load(model, tok), lb.load(LanguageModel(model, tokenizer=tok))
    assert (hf.backend, nn.backend) == ("hf", "nnsight")
    hf.capabilities, nn.capabilities   # noqa: B018 - measured before counting
    calls: list[bool] = []

    def inside_nnsight(*_):   # whether nnsight's trace machinery is on the stack of this model call
        f = sys._getframe(1)
        while f is not None and not f.f_globals.get("__name__", "").startswith("nnsight"):
            f = f.f_back
        calls.append(f is not None)

    handle = model.register_forward_pre_hook(inside_nnsight)
    kw = dict(classes=("punctuation", "articles"), continuation_words=6, n_control=2, progress=False)
    try:
        a = lb.filler_ablation(hf, [TEXT, NO_COMMA], **kw)
        hf_calls, calls[:] = list(calls), []
        b = lb.filler_ablation(nn, [TEXT, NO_COMMA], **kw)
    finally:
        handle.remove()
    assert hf_calls and not any(hf_calls)
    assert len(calls) == len(hf_calls) and all(calls)    # every forward ran inside an nnsight trace
    for x, y in ((a.token_loss_orig, b.token_loss_orig), (a.token_loss_class, b.token_loss_class),
                 (a.token_loss_control, b.token_loss_control)):
        assert torch.allclose(x, y, atol=1e-5, rtol=0, equal_nan=True)
    assert torch.equal(a.removed_tokens, b.removed_tokens) and a.edited == b.edited

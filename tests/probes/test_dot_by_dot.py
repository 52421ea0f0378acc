"""bench/repro/dot_by_dot.py: the 3SUM task, the verdict rule and the quick pipeline."""

import itertools
import math
import os

import numpy as np
import pytest
import torch

from bench.repro import dot_by_dot as D


def _reference(seq, mod=10):
    """Independent brute force: some triple of distinct positions sums to 0 mod 10 in every coordinate."""
    return any(all((a + b + c) % mod == 0 for a, b, c in zip(*t)) for t in itertools.combinations(seq, 3))


@pytest.mark.parametrize("length,dim", [(3, 1), (5, 2), (7, 3), (8, 1)])
def test_labeler_matches_brute_force_on_random_sequences(length, dim):
    rng = np.random.default_rng(length * 10 + dim)
    x = rng.integers(0, 10, size=(400, length, dim))
    got = D.label(x)
    want = np.array([_reference(s.tolist()) for s in x])
    assert (got == want).all()
    assert 0 < want.sum() < len(want) or dim == 3  # both classes occur where they are not rare


def test_labeler_identities():
    x = np.array([[[1, 2], [3, 4], [6, 4], [0, 0]]])  # 1+3+6 = 10, 2+4+4 = 10: positions 0, 1, 2
    assert D.label(x)[0]
    x2 = x.copy()
    x2[0, 2, 1] = 5  # break the only zero-sum triple (the 0 tuple needs two tuples summing to 0 as well)
    assert not _reference(x2[0].tolist()) and not D.label(x2)[0]
    # a triple needs three distinct positions: [5] + [5] + [0] is not one in a sequence of two tuples
    assert not D.label(np.array([[[5], [0]]]))[0]
    assert D.label(np.array([[[5], [5], [0]]]))[0]


@pytest.mark.parametrize("length,dim", [(4, 2), (6, 3), (10, 3)])
def test_generator_balanced_and_near_miss_negatives(length, dim):
    x, y, planted = D.generate(300, length, dim, np.random.default_rng(1))
    assert y.sum() == 150
    assert all(_reference(s.tolist()) == lab for s, lab in zip(x, y))
    for s, lab, (i, j, k) in zip(x, y, planted):
        assert i < j < k
        nonzero = int(((s[i] + s[j] + s[k]) % 10 != 0).sum())
        if lab:
            assert nonzero == 0  # the planted triple is the witness
        else:  # a near miss: the planted triple misses zero in 1..3 coordinates (1..3 digits were corrupted)
            assert 1 <= nonzero <= min(3, dim)


def test_p_random_positive_matches_the_paper_at_length_10():
    r = D.p_random_positive(10, 3, n=40_000, seed=0)
    assert r["lo"] < 0.113 < r["hi"] or abs(r["p"] - 0.113) < 0.006
    assert abs(r["independent_triples"] - (1 - 0.999 ** math.comb(10, 3))) < 1e-12


def test_cot_is_the_parallel_chain_of_thought():
    v = D.Vocab(4, 2)
    x = np.array([[[1, 2], [3, 4], [6, 4], [0, 0]]])
    c = D.Vocab.cot(v, x, np.random.default_rng(0))[0]
    assert len(c) == 4 * 3
    pairs = list(itertools.combinations(range(4), 2))
    for p, (i, j) in enumerate(pairs):
        assert c[2 * p] - v.index0 in (i, j)
        if (i, j) == (0, 1):
            assert c[2 * p + 1] == v.match0 + 2  # x0 + x1 + x2 = 0
        else:
            assert v.sum0 <= c[2 * p + 1] < v.sum0 + 10


def test_encoding_lengths_and_answer_slot():
    v = D.Vocab(5, 3)
    rng = np.random.default_rng(0)
    x, y, _ = D.generate(8, 5, 3, rng)
    for arm, extra in (("filler", 25), ("random", 25), ("no_filler", 0)):
        ids = v.encode(x, v.middle(arm, 8, rng), y)
        assert ids.shape == (8, 5 + 3 + extra, 3)
        assert (ids[:, -1, 0] == torch.where(torch.from_numpy(y), v.TRUE, v.FALSE)).all()
        assert (ids[:, -2, 0] == v.A).all() and (ids[:, 5, 0] == v.P).all()
        assert (ids[:, 5:, 1:] == v.PAD).all()


def test_verdict_rule():
    hi = {"acc": 0.95, "lo": 0.9, "hi": 0.99}
    mid = {"acc": 0.7, "lo": 0.65, "hi": 0.75}
    low = {"acc": 0.5, "lo": 0.45, "hi": 0.55}
    assert D.verdict({"filler": hi, "no_filler": mid})[0] == "reproduced"
    assert D.verdict({"filler": mid, "no_filler": hi})[0] == "not reproduced"
    assert D.verdict({"filler": {"acc": 0.8, "lo": 0.7, "hi": 0.9}, "no_filler": mid})[0] == "not reproduced"
    assert D.verdict({"filler": low, "no_filler": low, "random": low})[0] == "not comparable"
    assert D.verdict({"filler": low, "filler_cot": hi, "no_filler": mid})[0] == "reproduced"
    assert D.verdict({"filler": hi})[0] == "not comparable"


@pytest.mark.slow
def test_training_learns_an_easy_task():
    """Sanity: at length 3 (one triple: is a + b + c = 0 mod 10?) and d = 1, answer-only training without filler
    learns (0.95 after 2000 steps, ~40 s on 2 cores; at 300-500 steps it is still at chance)."""
    v = D.Vocab(3, 1)
    cfg = dict(D.FULL, length=3, dim=1, steps=2000, batch=64, lr=3e-3)
    model = D.train(v, "no_filler", cfg, 0)
    x, y, _ = D.generate(400, 3, 1, np.random.default_rng(5))
    assert D.evaluate(model, v, "no_filler", x, y, 0).mean() > 0.8


def test_quick_run_section_format():
    out = D.run(quick=True, seed=0)
    assert set(out) >= {"paper", "claim", "theirs", "ours", "setting", "n", "interval", "verdict", "reason", "seed"}
    assert out["verdict"] in ("reproduced", "not reproduced", "not comparable")
    assert out["verdict"] == D.verdict(out["ours"]["arms"])[0]  # computed from this run's numbers
    for arm in ("filler", "no_filler", "random"):
        a = out["ours"]["arms"][arm]
        assert 0 <= a["acc"] <= 1 and a["lo"] <= a["acc"] <= a["hi"]
        assert a["n_seeds"] == len(out["seed"]["seeds"])
    pr = out["ours"]["filler_probe"]["filler"]
    assert len(pr["filler"]) == len(pr["layers"]) == D.QUICK["layers"] + 1
    assert all(0 <= a <= 1 for a in pr["filler"] + pr["at_P"] + pr["shuffled"])
    assert out["seed"]["seeds"] == [0 + s for s in D.QUICK["seeds"]]


def test_training_is_seeded():
    v = D.Vocab(4, 2)
    cfg = dict(D.QUICK, steps=3)
    x, y, _ = D.generate(50, 4, 2, np.random.default_rng(3))
    a, b = (D.train(v, "filler_cot", cfg, 7) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert (D.evaluate(a, v, "filler", x, y, 7) == D.evaluate(b, v, "filler", x, y, 7)).all()


def test_parallel_workers_give_the_serial_numbers():
    """Arms × seeds run as independent one-thread jobs: two worker processes give exactly the serial results."""
    cfg = dict(steps=4, n_test=40, n_probe=40, cot_if_needed=False)
    a = D.run(quick=True, seed=0, config={**cfg, "workers": 1}, progress=False)
    b = D.run(quick=True, seed=0, config={**cfg, "workers": 2}, progress=False)
    assert a["ours"]["arms"] == b["ours"]["arms"] and a["ours"]["filler_probe"] == b["ours"]["filler_probe"]
    assert b["ours"]["workers"] == min(2, os.cpu_count() or 1)

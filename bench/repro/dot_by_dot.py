"""Reproduction: "Let's Think Dot by Dot" (Pfau, Merrill & Bowman 2024) — filler tokens on 3SUM.

Task (the paper's definition and generator): a sequence of ``n`` tuples ``x_1..x_n`` in ``Z_10^d`` is *positive*
iff some triple ``i < j < k`` has ``x_i + x_j + x_k = 0 (mod 10)`` in every coordinate. Positives are planted
(two uniform tuples and the negation of their sum, the rest uniform, positions uniform); negatives are *near
misses*: a planted zero-sum triple with 1–3 of its digits corrupted (``min(Geometric(3/4), 3)`` digits, each
moved by a nonzero offset), redrawn until brute force says negative. Labels are always brute force.

Input encoding (as in the paper's vector dataset): one position per tuple whose input embedding is the sum of
``d`` learned embeddings "digit v at coordinate c" (a tiny in-process vocabulary; ids are ``[B, T, d]`` with
``PAD`` = 0, a zero embedding, in unused slots), then ``P``, the intermediate tokens, ``A`` and the answer
(``True``/``False``). Arms, each a fresh randomly initialised ``LlamaForCausalLM`` of the same config:

* ``filler``: ``n²`` dots between ``P`` and ``A``;
* ``no_filler``: nothing between ``P`` and ``A``;
* ``random``: ``n²`` tokens drawn uniformly from 10 meaningless symbols (same length as the filler);
* ``filler_cot`` (the paper's dense supervision, run when plain filler does not learn): training mixes 50 %
  parallel chain-of-thought sequences (for every pair ``(i, j)``, the index of one summand and then either the
  index of the third summand completing a zero sum or one random coordinate of ``x_i + x_j``; the paper's
  ``rand_cot``, ``n(n−1)`` tokens, all supervised) with 50 % filler sequences; tested on filler sequences.

Supervision is answer-only (cross-entropy on the token after ``A``) for filler / no-filler / random sequences.
Accuracy = argmax over {True, False} at ``A`` on a fresh balanced test set per seed.

Interval: :func:`lensbench.stats.mean_ci` of per-item correctness with clusters = training seeds (Student-t on the
cluster-robust SE, k − 1 degrees of freedom) — the seed-to-seed spread of training, not only test-set noise.

Verdict rule (computed from this run): let F be the best filler arm (plain, or chain-of-thought-mixed when
run) and N the no-filler arm. "reproduced" if F's interval lies entirely above N's (lo_F > hi_N);
"not comparable" if no arm learned at all (every arm's upper bound < 0.6: the training budget, not filler, is
what is being measured); otherwise "not reproduced".
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time

import numpy as np
import torch

PAPER = "Let's Think Dot by Dot: Hidden Computation in Transformer Language Models (Pfau, Merrill & Bowman 2024)"
CLAIM = ("a transformer trained with n² filler dots before the answer solves 3SUM that the same transformer "
         "answering immediately cannot (length 12, d = 3: ~100 % with filler vs 66 % without)")
THEIRS = {"filler_acc": 1.00, "no_filler_acc": 0.66, "length": 12, "dim": 3, "p_random_positive_len10_d3": 0.113}

MOD = 10
N_NOISE = 10
LEARNED = 0.6  # an arm whose whole interval lies below this did not learn (balanced task: chance = 0.5)

# Full mode: 3SUM length 4, d = 1 — the largest setting where any arm rose clearly above chance in a ~1 min
# CPU run (length 5-6 at d = 3, and length 4 at d = 2, stayed at 0.50 after 400 steps); 2-layer d=64 Llama.
FULL = dict(length=4, dim=1, seeds=(0, 1, 2), steps=1000, batch=64, lr=3e-3, hidden=64, layers=2, heads=4,
            n_test=1000, n_probe=600, arms=("filler", "no_filler", "random"), cot_if_needed=True, workers=2)
QUICK = dict(length=4, dim=2, seeds=(0, 1), steps=25, batch=32, lr=3e-3, hidden=32, layers=2, heads=2,
             n_test=200, n_probe=200, arms=("filler", "no_filler", "random"), cot_if_needed=True, workers=2)


# ----------------------------------------------------------------------------------------------- the task
def triple_index(length: int) -> np.ndarray:
    """``[C(length, 3), 3]`` all index triples ``i < j < k``."""
    return np.array(list(itertools.combinations(range(length), 3)), dtype=np.int64).reshape(-1, 3)


def label(x: np.ndarray, mod: int = MOD) -> np.ndarray:
    """Brute force over all triples: ``x`` ``[B, n, d]`` ints -> ``[B]`` bool (some triple sums to 0 mod ``mod``
    in every coordinate)."""
    x = np.asarray(x)
    tri = triple_index(x.shape[1])
    if len(tri) == 0:
        return np.zeros(len(x), dtype=bool)
    s = (x[:, tri[:, 0]] + x[:, tri[:, 1]] + x[:, tri[:, 2]]) % mod  # [B, T, d]
    return (s == 0).all(-1).any(-1)


def first_match(x: np.ndarray, mod: int = MOD) -> np.ndarray:
    """``[n, n]`` for one sequence ``x`` ``[n, d]``: ``k`` of the first ``k > j`` with ``x_i + x_j + x_k = 0`` for
    ``i < j``, else -1."""
    n = len(x)
    out = -np.ones((n, n), dtype=np.int64)
    for i, j in itertools.combinations(range(n), 2):
        for k in range(j + 1, n):
            if ((x[i] + x[j] + x[k]) % mod == 0).all():
                out[i, j] = k
                break
    return out


def generate(n_items: int, length: int, dim: int, rng: np.random.Generator, positive_rate: float = 0.5,
             mod: int = MOD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced 3SUM items (the paper's generator). Returns ``x`` ``[N, n, d]``, brute-force labels ``[N]`` and the
    planted triple's indices ``[N, 3]`` (for negatives: the corrupted near-miss triple)."""
    n_pos = int(round(n_items * positive_rate))
    want = np.zeros(n_items, dtype=bool)
    want[:n_pos] = True
    rng.shuffle(want)
    xs = np.zeros((n_items, length, dim), dtype=np.int64)
    planted = np.zeros((n_items, 3), dtype=np.int64)
    todo = np.arange(n_items)
    for _ in range(1000):
        if len(todo) == 0:
            break
        m = len(todo)
        x = rng.integers(0, mod, size=(m, length, dim))
        pos = np.argsort(rng.random((m, length)), axis=1)[:, :3]
        pos.sort(axis=1)
        r = np.arange(m)
        x[r, pos[:, 2]] = (-(x[r, pos[:, 0]] + x[r, pos[:, 1]])) % mod
        neg = ~want[todo]
        if neg.any():
            k = np.minimum(rng.geometric(0.75, size=m), min(3, 3 * dim))
            for a in np.nonzero(neg)[0]:
                cells = rng.choice(3 * dim, size=k[a], replace=False)
                for c in cells:
                    row, col = pos[a, c // dim], c % dim
                    x[a, row, col] = (x[a, row, col] + rng.integers(1, mod)) % mod
        ok = label(x, mod) == want[todo]
        xs[todo[ok]] = x[ok]
        planted[todo[ok]] = pos[ok]
        todo = todo[~ok]
    if len(todo):  # pragma: no cover - unreachable for sane sizes
        raise RuntimeError(f"could not generate 3SUM items at length={length}, dim={dim}")
    return xs, label(xs, mod), planted


def p_random_positive(length: int, dim: int, n: int = 200_000, seed: int = 0, mod: int = MOD) -> dict:
    """P(a uniform random sequence is positive), brute force on ``n`` sampled sequences (Wilson interval), beside
    the independent-triples value ``1 − (1 − mod^−d)^C(length, 3)``."""
    from lensbench.stats import wilson_interval
    rng = np.random.default_rng(seed)
    hits = 0
    for s in range(0, n, 20_000):
        hits += int(label(rng.integers(0, mod, size=(min(20_000, n - s), length, dim)), mod).sum())
    lo, hi = wilson_interval(hits, n)
    approx = 1 - (1 - mod ** -dim) ** math.comb(length, 3)
    return {"p": hits / n, "lo": float(lo[0]), "hi": float(hi[0]), "n": n, "independent_triples": approx}


# ----------------------------------------------------------------------------------------------- vocabulary
class Vocab:
    """Tiny vocabulary. Ids: 0 PAD, 1 P, 2 A, 3 True, 4 False, 5 '.', then 10 noise symbols, ``d × 10`` digit
    tokens (coordinate c, value v), ``n`` index tokens ``i-``, ``n`` match tokens ``-k`` and 10 sum digits ``Fv``
    (the last three only for the chain of thought)."""

    PAD, P, A, TRUE, FALSE, DOT = 0, 1, 2, 3, 4, 5

    def __init__(self, length: int, dim: int):
        self.length, self.dim = length, dim
        self.noise0 = 6
        self.digit0 = self.noise0 + N_NOISE
        self.index0 = self.digit0 + dim * MOD
        self.match0 = self.index0 + length
        self.sum0 = self.match0 + length
        self.size = self.sum0 + MOD

    def encode(self, x: np.ndarray, middle: np.ndarray | None, y: np.ndarray) -> torch.Tensor:
        """``[B, n + 3 + M, d]`` ids: tuples, P, ``middle`` ``[B, M]`` (or nothing), A, answer."""
        B, n, d = x.shape
        M = 0 if middle is None else middle.shape[1]
        ids = np.zeros((B, n + 3 + M, d), dtype=np.int64)
        ids[:, :n, :] = self.digit0 + np.arange(d) * MOD + x
        ids[:, n, 0] = self.P
        if M:
            ids[:, n + 1:n + 1 + M, 0] = middle
        ids[:, n + 1 + M, 0] = self.A
        ids[:, n + 2 + M, 0] = np.where(y, self.TRUE, self.FALSE)
        return torch.from_numpy(ids)

    def middle(self, arm: str, B: int, rng: np.random.Generator) -> np.ndarray | None:
        n2 = self.length ** 2
        if arm in ("filler", "filler_cot"):
            return np.full((B, n2), self.DOT, dtype=np.int64)
        if arm == "random":
            return self.noise0 + rng.integers(0, N_NOISE, size=(B, n2))
        if arm == "no_filler":
            return None
        raise ValueError(arm)

    def cot(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The paper's parallel chain of thought (``rand_cot``): ``[B, n(n−1)]`` ids."""
        B, n, d = x.shape
        out = np.zeros((B, n * (n - 1)), dtype=np.int64)
        for b in range(B):
            fm = first_match(x[b])
            toks = []
            for i, j in itertools.combinations(range(n), 2):
                toks.append(self.index0 + (i if rng.random() < 0.5 else j))
                k = fm[i, j]
                toks.append(self.match0 + k if k >= 0 else self.sum0 + (x[b, i] + x[b, j])[rng.integers(d)] % MOD)
            out[b] = toks
        return out


# ----------------------------------------------------------------------------------------------- model
def make_model(vocab: Vocab, cfg: dict, seed: int):
    """A fresh ``LlamaForCausalLM`` (float32, random init under ``seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=vocab.size, hidden_size=cfg["hidden"], intermediate_size=4 * cfg["hidden"],
                       num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                       num_key_value_heads=cfg["heads"], max_position_embeddings=2 * (vocab.length ** 2 + 16),
                       pad_token_id=Vocab.PAD, bos_token_id=Vocab.P, eos_token_id=Vocab.A,
                       tie_word_embeddings=False)
    model = LlamaForCausalLM(conf).float()
    with torch.no_grad():
        model.get_input_embeddings().weight[Vocab.PAD].zero_()
    return model


def forward(model, ids: torch.Tensor, hidden: bool = False):
    """``ids`` ``[B, T, d]`` -> the model output (embeddings summed over the ``d`` slots)."""
    emb = model.get_input_embeddings()(ids).sum(-2)
    return model(inputs_embeds=emb, output_hidden_states=hidden, use_cache=False)


def _batch(vocab: Vocab, arm: str, n: int, rng: np.random.Generator):
    """Training batch: ``ids`` ``[B, T, d]``, ``targets`` ``[B, T]`` (-100 where not supervised; position t
    predicts token t + 1) and ``group`` ``[B]`` (0; for ``filler_cot``: 0 chain of thought, 1 filler — the loss
    is the mean of the two groups' mean token losses). Chain-of-thought rows (``n(n−1)`` tokens) are right-padded
    to the filler rows' length so one forward pass serves both (causal: padding after a row changes nothing)."""
    x, y, _ = generate(n, vocab.length, vocab.dim, rng)
    if arm == "filler_cot":  # half chain of thought (all tokens after P supervised), half filler (answer only)
        h = n // 2
        ids_f, tgt_f = _answer_only(vocab.encode(x[h:], vocab.middle("filler", n - h, rng), y[h:]))
        ids_c = vocab.encode(x[:h], vocab.cot(x[:h], rng), y[:h])
        tgt_c = torch.full(ids_c.shape[:2], -100, dtype=torch.long)
        tgt_c[:, vocab.length:-1] = ids_c[:, vocab.length + 1:, 0]
        T = ids_f.shape[1]
        ids_c = torch.nn.functional.pad(ids_c, (0, 0, 0, T - ids_c.shape[1]), value=Vocab.PAD)
        tgt_c = torch.nn.functional.pad(tgt_c, (0, T - tgt_c.shape[1]), value=-100)
        group = torch.cat([torch.zeros(h, dtype=torch.long), torch.ones(n - h, dtype=torch.long)])
        return torch.cat([ids_c, ids_f]), torch.cat([tgt_c, tgt_f]), group
    ids, tgt = _answer_only(vocab.encode(x, vocab.middle(arm, n, rng), y))
    return ids, tgt, torch.zeros(n, dtype=torch.long)


def _answer_only(ids: torch.Tensor):
    tgt = torch.full(ids.shape[:2], -100, dtype=torch.long)
    tgt[:, -2] = ids[:, -1, 0]
    return ids, tgt


def train(vocab: Vocab, arm: str, cfg: dict, seed: int):
    """Train one arm from scratch (AdamW, linear warm-up then cosine decay); returns the model (eval mode)."""
    model = make_model(vocab, cfg, seed)
    rng = np.random.default_rng([seed, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01, betas=(0.9, 0.98))
    steps, warm = cfg["steps"], max(1, cfg["steps"] // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        ids, tgt, group = _batch(vocab, arm, cfg["batch"], rng)
        logits = forward(model, ids).logits
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none")
        sup = (tgt != -100).float()
        gs = [g for g in range(int(group.max()) + 1)]
        loss = sum((tok[group == g].sum() / sup[group == g].sum()) for g in gs) / len(gs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return model


@torch.no_grad()
def evaluate(model, vocab: Vocab, arm: str, x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """``[N]`` bool: argmax over {True, False} at ``A`` equals the label (test arm ``filler`` for ``filler_cot``)."""
    rng = np.random.default_rng([seed, 2])
    test_arm = "filler" if arm == "filler_cot" else arm
    out = []
    for s in range(0, len(x), 250):
        ids = vocab.encode(x[s:s + 250], vocab.middle(test_arm, len(x[s:s + 250]), rng), y[s:s + 250])
        z = forward(model, ids).logits[:, -2]
        out.append((z[:, Vocab.TRUE] > z[:, Vocab.FALSE]).numpy() == y[s:s + 250])
    return np.concatenate(out)


@torch.no_grad()
def probe(model, vocab: Vocab, x: np.ndarray, y: np.ndarray, seed: int, folds: int = 5) -> dict:
    """Per-layer logistic probes (5-fold stratified CV, standardised features) predicting the label from the
    filler-arm model's hidden states: mean over the ``n²`` filler positions, vs the ``P`` position (which has seen
    the whole input and no filler: like-for-like), vs filler positions with shuffled labels.

    Returns lists over ``hidden_states`` indices 0 (embeddings) .. L (last block, after the final norm)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng([seed, 3])
    ids = vocab.encode(x, vocab.middle("filler", len(x), rng), y)
    hs = forward(model, ids, hidden=True).hidden_states
    n, n2 = vocab.length, vocab.length ** 2
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    y_shuf = rng.permutation(y)
    res = {"filler": [], "at_P": [], "shuffled": []}
    for h in hs:
        f = h[:, n + 1:n + 1 + n2].mean(1).numpy()
        p = h[:, n].numpy()
        for key, X, yy in (("filler", f, y), ("at_P", p, y), ("shuffled", f, y_shuf)):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
            res[key].append(float(cross_val_score(clf, X, yy, cv=cv).mean()))
    res["layers"] = list(range(len(hs)))
    res["n_items"] = len(y)
    res["folds"] = folds
    return res


# ----------------------------------------------------------------------------------------------- verdict
def verdict(arms: dict) -> tuple[str, str]:
    """The documented rule (module docstring) on ``{arm: {"acc", "lo", "hi"}}``."""
    fill = [a for a in ("filler", "filler_cot") if a in arms]
    if not fill or "no_filler" not in arms:
        return "not comparable", "no filler or no no-filler arm was run"
    best = max(fill, key=lambda a: arms[a]["acc"])
    F, N = arms[best], arms["no_filler"]
    if all(v["hi"] < LEARNED for v in arms.values()):
        return "not comparable", (f"no arm learned in the budget (every upper bound < {LEARNED}): the run "
                                  "measures the training budget, not filler")
    if F["lo"] > N["hi"]:
        return "reproduced", (f"{best} {F['acc']:.3f} [{F['lo']:.3f}, {F['hi']:.3f}] lies above no-filler "
                              f"{N['acc']:.3f} [{N['lo']:.3f}, {N['hi']:.3f}]")
    return "not reproduced", (f"{best} {F['acc']:.3f} [{F['lo']:.3f}, {F['hi']:.3f}] does not lie above "
                              f"no-filler {N['acc']:.3f} [{N['lo']:.3f}, {N['hi']:.3f}]")


def _summary(correct: dict) -> dict:
    """``{seed: [N] bool}`` -> accuracy with the t interval over seeds (:func:`lensbench.stats.mean_ci`)."""
    from lensbench.stats import mean_ci
    vals = np.concatenate([c.astype(float) for c in correct.values()])
    cl = np.concatenate([np.full(len(c), s) for s, c in correct.items()])
    iv = mean_ci(vals, clusters=cl, method="t")
    return {"acc": iv.estimate, "lo": iv.lo, "hi": iv.hi, "per_seed": {int(s): float(c.mean())
                                                                       for s, c in correct.items()},
            "n": iv.n, "n_seeds": iv.n_clusters}


# ----------------------------------------------------------------------------------------------- entry point
def _job(job) -> tuple[np.ndarray, dict | None, float]:
    """One (arm, seed): train, evaluate on the seed's fresh test set, probe the first seed's filler models.
    Returns (correct [n_test] bool, probe or None, this process's CPU seconds)."""
    arm, cfg, s, length, dim = job
    torch.set_num_threads(1)
    c0 = time.process_time()
    vocab = Vocab(length, dim)
    xt, yt, _ = generate(cfg["n_test"], length, dim, np.random.default_rng([s, 9]))
    model = train(vocab, arm, cfg, s)
    ok = evaluate(model, vocab, arm, xt, yt, s)
    pr = None
    if arm in ("filler", "filler_cot") and s == cfg["_first_seed"]:
        xp, yp, _ = generate(cfg["n_probe"], length, dim, np.random.default_rng([s, 8]))
        pr = probe(model, vocab, xp, yp, s)
    return ok, pr, time.process_time() - c0


def run(quick: bool = False, seed: int = 0, config: dict | None = None, progress: bool = True) -> dict:
    """Train every arm on every seed, evaluate, probe, and return the section dict (``bench/repro/common.py``
    format). Seeds are ``seed + s`` for ``s`` in the config's seeds; ``config`` overrides FULL/QUICK keys."""
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = dict(QUICK if quick else FULL)
    cfg.update(config or {})
    seeds = [seed + s for s in cfg["seeds"]]
    cfg["_first_seed"] = seeds[0]
    vocab = Vocab(cfg["length"], cfg["dim"])
    arms = list(cfg["arms"])
    correct: dict[str, dict[int, np.ndarray]] = {a: {} for a in arms}

    workers = max(1, min(int(cfg.get("workers", 2)), os.cpu_count() or 1))

    def run_arms(names):
        """Every (arm, seed) of ``names`` as independent jobs on ``workers`` processes (one torch thread each:
        these models are too small for two threads to help one run, so two runs at once is ~2x)."""
        t_arm = time.perf_counter()
        jobs = [(a, cfg, s, vocab.length, vocab.dim) for a in names for s in seeds]
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
                results = list(ex.map(_job, jobs))
        else:
            results = [_job(j) for j in jobs]
        for (a, _, s, _, _), (ok, pr, secs) in zip(jobs, results):
            correct.setdefault(a, {})[s] = ok
            train_s[a] = round(train_s.get(a, 0.0) + secs, 1)
            if pr is not None:
                probes[a] = pr
        if progress:
            print(f"dot_by_dot: {names} done ({time.perf_counter() - t_arm:.0f} s wall, {len(seeds)} seeds, "
                  f"{workers} workers)", file=sys.stderr, flush=True)

    train_s: dict = {}
    probes: dict = {}
    run_arms(arms)
    summ = {a: _summary(c) for a, c in correct.items()}
    if cfg["cot_if_needed"] and "filler_cot" not in summ and summ["filler"]["lo"] <= summ["no_filler"]["hi"]:
        arms.append("filler_cot")
        run_arms(["filler_cot"])
        summ["filler_cot"] = _summary(correct["filler_cot"])
    v, why = verdict(summ)
    chance = p_random_positive(cfg["length"], cfg["dim"], n=20_000 if quick else 200_000, seed=seed)
    ours = {a: round(summ[a]["acc"], 4) for a in arms}
    return {
        "paper": PAPER,
        "claim": CLAIM,
        "theirs": THEIRS,
        "ours": {"accuracy": ours, "arms": summ, "p_random_positive": chance,
                 "filler_probe": probes,
                 "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
                 "arm_cpu_s": train_s, "workers": workers},
        "setting": (f"3SUM length {cfg['length']}, d = {cfg['dim']}, balanced (near-miss negatives); "
                    f"LlamaForCausalLM from scratch ({cfg['layers']} layers, d_model {cfg['hidden']}, "
                    f"{cfg['heads']} heads), float32 CPU, {cfg['steps']} AdamW steps × batch {cfg['batch']}, "
                    f"answer-only loss; arms {arms}; test {cfg['n_test']} fresh items per seed"
                    + (" (quick mode: pipeline check, not the paper's numbers)" if quick else "")),
        "n": {a: summ[a]["n"] for a in arms},
        "interval": ("95% Student-t interval over training seeds (lensbench.stats.mean_ci, clusters = seeds, "
                     f"{len(seeds)} seeds)"),
        "verdict": v,
        "reason": why,
        "seed": {"base": seed, "seeds": seeds},
    }

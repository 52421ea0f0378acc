"""Representation geometry of the residual stream: intrinsic dimension, neighbourhood overlap, cosine
similarity, anisotropy, layer-to-layer linearity and per-token nonlinearity, shuffle baselines, and the
correlation of geometry with loss.

A prompt's point cloud at layer l is X ∈ R^{T×d}: its tokens' residuals (BOS excluded by default). All
statistics are computed on the model's device inside the capture engine's per-batch reduction, in float64
(float32 on devices without it), so only small per-layer numbers leave the device.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .. import estimators as E
from ..capture import Capture, CaptureBatch, capture, mean_next_token_loss
from ..errors import InputError
from ..model import LensModel
from ..results import Result

ESTIMATORS = ("gride", "twonn", "mle", "pca")
MIN_TOKENS_STABLE = 500


# --------------------------------------------------------------------------------------------- helpers
def _cloud(batch: CaptureBatch, b: int, layer: int, exclude_bos: bool) -> torch.Tensor:
    X = batch.hidden[layer][b, batch.span(b)]
    if exclude_bos:
        bos = batch.model.tokenizer.bos_token_id
        if bos is not None and int(batch.ids_of(b)[0]) == bos:
            X = X[1:]
    return X


def estimate_id(X: torch.Tensor, estimator: str = "gride", scale: int = 4, *, var: float = 0.9,
                k: int = 20) -> tuple[float, int]:
    """ID of one cloud by name. Returns (id, duplicates removed)."""
    if estimator not in ESTIMATORS:
        raise InputError(f"estimator={estimator!r} is unknown; choose one of {ESTIMATORS}.")
    U, info = E.dedup(X)
    if estimator == "pca":
        return float(E.pca_dim(U, var)), info.removed
    k = min(k, U.shape[0] - 1) if estimator == "mle" else (2 if estimator == "twonn" else scale)
    nb = E.neighbors(U, k, remove_duplicates=False)        # duplicates already dropped: one pass
    if estimator == "gride":
        d = E.gride(nb, n1=max(1, scale // 2), n2=scale)
    elif estimator == "twonn":
        d = E.twonn(nb)
    else:
        d = E.mle(nb, k=k)
    return d, info.removed


def _loss(batch: CaptureBatch, b: int) -> float:
    if batch.logits is None:
        return float("nan")
    return mean_next_token_loss(batch.logits[b, batch.span(b)], batch.ids_of(b))


def _from_capture(m: LensModel, cap: Capture, layers: list[int], reduce) -> Capture:
    """Run a geometry ``reduce`` over an existing :class:`Capture` (one text per batch, logits not needed)."""
    missing = set(layers) - set(cap.layers)
    if cap.hidden is None or missing:
        raise InputError(f"the capture lacks layers {sorted(missing)} (or was reduced); capture with layers=None.")
    results = []
    for i in range(len(cap)):
        h = cap.hidden_states(i)
        hidden = {la: h[cap.layers.index(la)][None] for la in layers}
        ids = cap.input_ids(i)
        batch = CaptureBatch(model=m, indices=[i], input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                             lengths=[len(ids)], hidden=hidden, logits=None)
        out = reduce(batch)[0]  # (values, loss, ...): the loss comes from the capture
        results.append((out[0], cap.losses[i] if cap.losses else float("nan"), *out[2:]))
    return dataclasses.replace(cap, results=results)


def _check_estimator(estimator: str, scale: int) -> None:
    if estimator not in ESTIMATORS:
        raise InputError(f"estimator={estimator!r} is unknown; choose one of {ESTIMATORS}.")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 2:
        raise InputError(f"scale must be an int >= 2 (GRIDE's n2), got {scale!r}.")


# --------------------------------------------------------------------------------------------- results
@dataclasses.dataclass(eq=False)
class GeometryResult(Result):
    """A per-layer geometric measure for each prompt (or for the pooled cloud).

    Attributes:
        measure: "id", "overlap", "cosine", "anisotropy".
        layers: layers of the columns (for "overlap", column j compares layers[j] and layers[j]+1).
        prompts: the texts (one row each; one row "pooled" when ``per="pooled"``).
        values: ``[n_rows, n_layers]`` float64.
        spread: ``[n_rows, n_layers]`` (std of the pairwise cosines for "cosine"; NaN otherwise).
        loss: ``[n_rows]`` each prompt's mean next-token cross-entropy (nats).
        n_tokens: tokens per row (after BOS exclusion); duplicates: ``[n_rows, n_layers]`` points removed.
        settings: estimator, scale, per, exclude_bos, k.
    """

    measure: str
    layers: list
    prompts: list
    values: np.ndarray
    spread: np.ndarray
    loss: np.ndarray
    n_tokens: list
    duplicates: np.ndarray
    settings: dict = dataclasses.field(default_factory=dict)
    model_name: str = ""

    def to_dataframe(self):
        import pandas as pd
        rows = []
        for i, p in enumerate(self.prompts):
            for j, la in enumerate(self.layers):
                rows.append({"prompt": i, "text": p[:60], "layer": la, self.measure: self.values[i, j],
                             "spread": self.spread[i, j], "loss": self.loss[i], "n_tokens": self.n_tokens[i],
                             "duplicates": int(self.duplicates[i, j])})
        return pd.DataFrame(rows)

    def figure(self, **kw):
        from ..plots import geometry_profile
        return geometry_profile(self, **kw)


@dataclasses.dataclass(eq=False)
class LinearityResult(Result):
    """Layer-to-layer linearity (LLM-Microscope; "Your Transformer is Secretly Linear").

    Attributes:
        layers: l for each transition l -> l+1.
        score: ``[n]`` 1 − ‖XA − Y‖²_F on centred, Frobenius-normalised clouds (with the residual).
        score_no_residual: ``[n]`` the same with Y − X in place of Y.
        n_points: pooled tokens the maps were fitted on; d_model.
        prompt, tokens: the prompt whose per-token nonlinearity is reported (may be empty).
        per_token: ``[n, T]`` ‖x̃_i A* − ỹ_i‖ per token of ``prompt`` with A* fitted on the pool
            (clouds scaled to unit mean squared norm, so 1 − mean(per_token²) over the pool = score).
    """

    layers: list
    score: np.ndarray
    score_no_residual: np.ndarray
    n_points: int
    d_model: int
    prompt: str = ""
    tokens: list = dataclasses.field(default_factory=list)
    per_token: np.ndarray | None = None
    model_name: str = ""

    def to_dataframe(self):
        import pandas as pd
        return pd.DataFrame({"layer": self.layers, "next_layer": [la + 1 for la in self.layers],
                             "linearity": self.score, "linearity_no_residual": self.score_no_residual})

    def figure(self, kind: str = "score"):
        from ..plots import linearity_figure, nonlinearity_heatmap
        return nonlinearity_heatmap(self) if kind == "per_token" else linearity_figure(self)


@dataclasses.dataclass(eq=False)
class ShuffleResult(Result):
    """Block-shuffle baseline: the prompt's tokens cut into K = 4^S blocks, blocks permuted (seeded).

    Attributes: levels S; loss ``[n_S]``; id ``[n_S, n_layers]``; layers; text; seed; estimator.
    """

    levels: list
    loss: np.ndarray
    id: np.ndarray
    layers: list
    text: str
    seed: int
    settings: dict = dataclasses.field(default_factory=dict)

    def to_dataframe(self):
        import pandas as pd
        return pd.DataFrame([{"S": s, "blocks": 4 ** s, "layer": la, "id": self.id[i, j], "loss": self.loss[i]}
                             for i, s in enumerate(self.levels) for j, la in enumerate(self.layers)])

    def figure(self):
        from ..plots import shuffle_figure
        return shuffle_figure(self)


@dataclasses.dataclass(eq=False)
class CorrelationResult(Result):
    """Per-layer correlation across prompts between a geometric measure (log ID by default) and loss.

    Attributes: layers; pearson_r, pearson_p, spearman_r, spearman_p ``[n_layers]``; measure; n_prompts.
    """

    layers: list
    pearson_r: np.ndarray
    pearson_p: np.ndarray
    spearman_r: np.ndarray
    spearman_p: np.ndarray
    measure: str
    n_prompts: int

    def to_dataframe(self):
        import pandas as pd
        return pd.DataFrame({"layer": self.layers, "pearson_r": self.pearson_r, "pearson_p": self.pearson_p,
                             "spearman_r": self.spearman_r, "spearman_p": self.spearman_p})

    def figure(self):
        from ..plots import correlation_figure
        return correlation_figure(self)


# --------------------------------------------------------------------------------------------- per-prompt measures
def _per_prompt(m: LensModel, texts, layers, fn, *, exclude_bos: bool, batch_size, progress: bool,
                adjacent: bool = False, name: str = "geometry"):
    """Run ``fn(X) -> (value, spread, dups)`` (or ``fn(X, Y)`` for adjacent layers) per prompt and layer."""
    layers = m.check_layers(layers)
    if adjacent:
        layers = [la for la in layers if la < m.n_layers]
        if not layers:
            raise InputError("adjacent-layer measures need at least one layer below the last.")
        needed = sorted(set(layers) | {la + 1 for la in layers})
    else:
        needed = layers

    def reduce(batch: CaptureBatch) -> list:
        out = []
        for b in range(len(batch.indices)):
            vals = []
            for la in layers:
                X = _cloud(batch, b, la, exclude_bos)
                if adjacent:
                    vals.append(fn(X, _cloud(batch, b, la + 1, exclude_bos)))
                else:
                    vals.append(fn(X))
            T = _cloud(batch, b, layers[0], exclude_bos).shape[0]
            out.append((vals, _loss(batch, b), T))
        return out

    if isinstance(texts, Capture):  # one capture, many probes: reuse its hidden states, no model pass
        cap = _from_capture(m, texts, needed, reduce)
    else:
        cap = capture(m, texts, layers=needed, reduce=reduce, batch_size=batch_size, progress=progress)
    vals = np.array([[v[0] for v in r[0]] for r in cap.results], dtype=np.float64)
    spread = np.array([[v[1] for v in r[0]] for r in cap.results], dtype=np.float64)
    dups = np.array([[v[2] for v in r[0]] for r in cap.results], dtype=np.int64)
    loss = np.array([r[1] for r in cap.results], dtype=np.float64)
    ntok = [int(r[2]) for r in cap.results]
    return layers, cap.texts, vals, spread, dups, loss, ntok


def intrinsic_dimension(m: LensModel, texts, *, estimator: str = "gride", scale: int = 4, per: str = "prompt",
                        layers=None, exclude_bos: bool = True, max_points: int = 50_000,
                        batch_size: int | str = "auto", progress: bool = True, seed: int = 0) -> GeometryResult:
    """Intrinsic dimension of each layer's token cloud.

    Args:
        texts: a string or list of strings.
        estimator: "gride" (default; ``scale`` = n2, n1 = n2/2), "twonn", "mle" or "pca" (90% variance).
        per: "prompt" — one ID per prompt per layer (Geometry-of-Tokens; stable for T ≳ 500, warns below);
            "pooled" — tokens of all prompts pooled per layer (LLM-Microscope).
        exclude_bos: drop a leading BOS token (it carries massive activations).
        max_points: pooled clouds larger than this are subsampled (seeded).
    """
    _check_estimator(estimator, scale)
    if per not in ("prompt", "pooled"):
        raise InputError("per must be 'prompt' or 'pooled'.")
    settings = {"estimator": estimator, "scale": scale, "per": per, "exclude_bos": exclude_bos}
    if per == "prompt":
        def fn(X):
            d, dup = estimate_id(X, estimator, scale)
            return d, float("nan"), dup
        layers, prompts, vals, spread, dups, loss, ntok = _per_prompt(
            m, texts, layers, fn, exclude_bos=exclude_bos, batch_size=batch_size, progress=progress)
        if min(ntok) < MIN_TOKENS_STABLE:
            warnings.warn(f"per='prompt' with {min(ntok)} tokens in the shortest prompt: per-prompt ID needs "
                          f"T ≳ {MIN_TOKENS_STABLE} tokens to be stable; use longer prompts or per='pooled'.",
                          stacklevel=2)
        return GeometryResult("id", layers, prompts, vals, spread, loss, ntok, dups, settings, m.name)
    pools, prompts, loss, layers = pooled_clouds(m, texts, layers=layers, exclude_bos=exclude_bos,
                                                 max_points=max_points, batch_size=batch_size,
                                                 progress=progress, seed=seed)
    vals, dups = [], []
    for X in pools:
        d, dup = estimate_id(X, estimator, scale)
        vals.append(d)
        dups.append(dup)
    n = pools[0].shape[0]
    return GeometryResult("id", layers, ["pooled"], np.array([vals]), np.full((1, len(layers)), np.nan),
                          np.array([np.nanmean(loss)]), [n], np.array([dups]), dict(settings, prompts=len(prompts)),
                          m.name)


def pooled_clouds(m: LensModel, texts, *, layers=None, exclude_bos: bool = True, max_points: int = 50_000,
                  batch_size: int | str = "auto", progress: bool = True, seed: int = 0):
    """Token clouds pooled over prompts, one ``[N, d]`` float32 CPU tensor per layer (subsampled to
    ``max_points``). Returns (clouds, texts, per-prompt losses, layers)."""
    layers = m.check_layers(layers)

    def reduce(batch: CaptureBatch) -> list:
        return [([_cloud(batch, b, la, exclude_bos).float().cpu() for la in layers], _loss(batch, b))
                for b in range(len(batch.indices))]
    if isinstance(texts, Capture):
        cap = _from_capture(m, texts, layers, reduce)
    else:
        cap = capture(m, texts, layers=layers, reduce=reduce, batch_size=batch_size, progress=progress)
    pools = [torch.cat([r[0][j] for r in cap.results]) for j in range(len(layers))]
    if pools[0].shape[0] > max_points:
        keep = torch.randperm(pools[0].shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
        pools = [p[keep] for p in pools]
    return pools, cap.texts, np.array([r[1] for r in cap.results]), layers


def neighborhood_overlap(m: LensModel, texts, *, k: int = 10, layers=None, exclude_bos: bool = True,
                         batch_size: int | str = "auto", progress: bool = True) -> GeometryResult:
    """χ_k(l, l+1): mean fraction of each token's k nearest neighbours shared by adjacent layers, per prompt."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive int, got {k!r}.")

    # each layer's neighbours serve both transitions it takes part in; an entry holds its tensor, so the
    # memory of a cached view cannot be reused by another tensor while the key (its address) is cached
    cache: dict = {}

    def nbrs(Z):
        key = (Z.data_ptr(), tuple(Z.shape), tuple(Z.stride()))
        if key not in cache:
            if len(cache) > 1:
                cache.pop(next(iter(cache)))
            cache[key] = (Z, E.knn(Z, k)[1])
        return cache[key][1]

    def fn(X, Y):
        if X.shape[0] <= k:
            raise InputError(f"a prompt has {X.shape[0]} tokens; neighbourhood overlap with k={k} needs more.")
        return float(E.overlap_counts(nbrs(X), nbrs(Y)).double().mean() / k), float("nan"), 0
    layers, prompts, vals, spread, dups, loss, ntok = _per_prompt(
        m, texts, layers, fn, exclude_bos=exclude_bos, batch_size=batch_size, progress=progress, adjacent=True)
    return GeometryResult("overlap", layers, prompts, vals, spread, loss, ntok, dups,
                          {"k": k, "exclude_bos": exclude_bos}, m.name)


def cosine_stats(X: torch.Tensor) -> tuple[float, float]:
    """Mean and std of the pairwise cosine similarity between distinct rows (diagonal excluded)."""
    Xn = E.as_points(X)
    Xn = Xn / Xn.norm(dim=1, keepdim=True).clamp_min(1e-12)
    C = Xn @ Xn.T
    N = C.shape[0]
    off = C[~torch.eye(N, dtype=torch.bool, device=C.device)]
    return float(off.mean()), float(off.std()) if N > 2 else float("nan")


def anisotropy_of(X: torch.Tensor) -> float:
    """Largest eigenvalue of the centred covariance divided by its trace."""
    Xc = E.as_points(X)
    Xc = Xc - Xc.mean(0)
    s = torch.linalg.svdvals(Xc) ** 2
    return float(s[0] / s.sum())


def cosine_similarity(m: LensModel, texts, *, layers=None, exclude_bos: bool = True,
                      batch_size: int | str = "auto", progress: bool = True) -> GeometryResult:
    """Mean (``values``) and std (``spread``) of pairwise cosine between distinct tokens, per prompt and layer."""
    def fn(X):
        mu, sd = cosine_stats(X)
        return mu, sd, 0
    layers, prompts, vals, spread, dups, loss, ntok = _per_prompt(
        m, texts, layers, fn, exclude_bos=exclude_bos, batch_size=batch_size, progress=progress)
    return GeometryResult("cosine", layers, prompts, vals, spread, loss, ntok, dups,
                          {"exclude_bos": exclude_bos, "diagonal": "excluded"}, m.name)


def anisotropy(m: LensModel, texts, *, layers=None, exclude_bos: bool = True, batch_size: int | str = "auto",
               progress: bool = True) -> GeometryResult:
    """Top eigenvalue of the centred covariance over its trace, per prompt and layer."""
    def fn(X):
        return anisotropy_of(X), float("nan"), 0
    layers, prompts, vals, spread, dups, loss, ntok = _per_prompt(
        m, texts, layers, fn, exclude_bos=exclude_bos, batch_size=batch_size, progress=progress)
    return GeometryResult("anisotropy", layers, prompts, vals, spread, loss, ntok, dups,
                          {"exclude_bos": exclude_bos}, m.name)


# --------------------------------------------------------------------------------------------- linearity
def _normalise(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    mu = X.mean(0)
    Xc = X - mu
    scale = float(Xc.norm()) / math.sqrt(X.shape[0])  # unit mean squared norm per row
    return Xc / scale, mu, scale


class _LstsqSolver:
    """Least squares Y ≈ XA for one X and several Y, via the eigendecomposition of XᵀX (float64) with a
    relative eigenvalue cutoff ``rcond`` (pseudo-inverse). Cost O(N·d²) once, then O(N·d²) per Y."""

    def __init__(self, Xn: torch.Tensor, rcond: float):
        self.Xn = Xn
        lam, V = torch.linalg.eigh(Xn.T @ Xn)
        keep = lam > rcond * lam.max()
        self.V, self.inv = V[:, keep], 1.0 / lam[keep]

    def solve(self, Yn: torch.Tensor) -> torch.Tensor:
        return self.V @ (self.inv[:, None] * (self.V.T @ (self.Xn.T @ Yn)))


def linear_fit(X, Y, *, rcond: float = 1e-12, _solver: _LstsqSolver | None = None):
    """Linearity score of Y ≈ XA on centred clouds scaled to unit mean squared norm; float64 least squares
    with a singular-value cutoff. Returns (score, A, normalisation dict). Score = 1 − ‖XA − Y‖²_F / N
    (identical to the spec's Frobenius-normalised form)."""
    X = E.as_points(X, param="X")
    Y = E.as_points(Y, param="Y")
    if X.shape[0] != Y.shape[0]:
        raise InputError("X and Y must have the same number of rows (the same tokens).")
    Xn, mx, sx = _normalise(X)
    Yn, my, sy = _normalise(Y)
    solver = _solver or _LstsqSolver(Xn, rcond)
    A = solver.solve(Yn)
    resid = Xn @ A - Yn
    score = 1.0 - float((resid ** 2).sum()) / X.shape[0]
    return score, A, {"mx": mx, "sx": sx, "my": my, "sy": sy, "solver": solver}


def linearity(m: LensModel, texts, *, prompt: str | None = None, layers=None, exclude_bos: bool = True,
              max_points: int = 50_000, batch_size: int | str = "auto", progress: bool = True,
              seed: int = 0) -> LinearityResult:
    """Layer-to-layer linearity of the pooled token clouds, with and without the residual stream, and the
    per-token nonlinearity of ``prompt`` (default: the first text) under the maps fitted on the pool.

    Warns when the pool has N <= d + 1 points (the fit is then exact and the score 1 identically).
    """
    layers = m.check_layers(layers)
    trans = [la for la in layers if la < m.n_layers]
    needed = sorted(set(trans) | {la + 1 for la in trans})
    pools, prompts, _, got = pooled_clouds(m, texts, layers=needed, exclude_bos=exclude_bos,
                                           max_points=max_points, batch_size=batch_size, progress=progress,
                                           seed=seed)
    idx = {la: i for i, la in enumerate(got)}
    N, d = pools[0].shape
    if N <= d + 1:
        warnings.warn(f"linearity fitted on N={N} points in d={d}: with N <= d+1 the least-squares fit is exact "
                      "and the score is 1 whatever the model does; pool more tokens (N >> d).", stacklevel=2)
    prompt = prompts[0] if prompt is None else prompt
    pc = m.capture(prompt, layers=needed, progress=False)
    ph = pc.hidden_states(0)
    toks = pc.tokens(0)
    if exclude_bos and m.tokenizer.bos_token_id is not None and int(pc.input_ids(0)[0]) == m.tokenizer.bos_token_id:
        ph, toks = ph[:, 1:], toks[1:]
    score, score_nr, per_tok = [], [], []
    for la in trans:
        X, Y = pools[idx[la]], pools[idx[la + 1]]
        s, A, nm = linear_fit(X, Y)
        score.append(s)
        score_nr.append(linear_fit(X, Y - X, _solver=nm["solver"])[0])
        x = (ph[idx[la]].double() - nm["mx"]) / nm["sx"]
        y = (ph[idx[la + 1]].double() - nm["my"]) / nm["sy"]
        per_tok.append((x @ A - y).norm(dim=1).numpy())
    return LinearityResult(layers=trans, score=np.array(score), score_no_residual=np.array(score_nr), n_points=N,
                           d_model=d, prompt=prompt, tokens=toks, per_token=np.stack(per_tok), model_name=m.name)


# --------------------------------------------------------------------------------------------- shuffle, correlation
def block_shuffle(ids: torch.Tensor, S: int, seed: int = 0) -> torch.Tensor:
    """Cut ``ids`` into K = 4^S near-equal consecutive blocks and permute the blocks (seeded; S=0: unchanged)."""
    K = min(4 ** S, len(ids))
    if K <= 1:
        return ids.clone()
    bounds = np.linspace(0, len(ids), K + 1).round().astype(int)
    blocks = [ids[bounds[i]: bounds[i + 1]] for i in range(K)]
    g = torch.Generator().manual_seed(seed * 1000 + S)
    perm = torch.randperm(K, generator=g)
    return torch.cat([blocks[i] for i in perm.tolist()])


def shuffle_baseline(m: LensModel, text: str, *, levels: Sequence[int] = (0, 1, 2, 3, 4, 5), seed: int = 0,
                     estimator: str = "gride", scale: int = 4, layers=None, exclude_bos: bool = True,
                     progress: bool = True) -> ShuffleResult:
    """Loss and ID profile of ``text`` with its tokens block-shuffled at each level S (K = 4^S blocks)."""
    _check_estimator(estimator, scale)
    ids = m.encode(text)
    bos = m.tokenizer.bos_token_id
    head = ids[:1] if bos is not None and int(ids[0]) == bos else ids[:0]
    body = ids[len(head):]
    variants = [torch.cat([head, block_shuffle(body, S, seed)]) for S in levels]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = intrinsic_dimension(m, variants, estimator=estimator, scale=scale, layers=layers,
                                  exclude_bos=exclude_bos, progress=progress)
    return ShuffleResult(levels=list(levels), loss=res.loss, id=res.values, layers=res.layers, text=text, seed=seed,
                         settings={"estimator": estimator, "scale": scale})


def geometry_loss_correlation(result: GeometryResult, *, log: bool = True) -> CorrelationResult:
    """Pearson and Spearman correlation (with p-values) across prompts, per layer, between a per-prompt
    measure (log of it when ``log``; default for ID) and each prompt's mean next-token loss."""
    from scipy import stats
    if result.values.shape[0] < 3:
        raise InputError("correlation across prompts needs at least 3 prompts (per='prompt').")
    v = np.log(result.values) if log else result.values
    pr, pp, sr, sp = [], [], [], []
    for j in range(v.shape[1]):
        a, b = v[:, j], result.loss
        ok = np.isfinite(a) & np.isfinite(b)
        r = stats.pearsonr(a[ok], b[ok])
        s = stats.spearmanr(a[ok], b[ok])
        pr.append(r.statistic)
        pp.append(r.pvalue)
        sr.append(s.statistic)
        sp.append(s.pvalue)
    return CorrelationResult(layers=list(result.layers), pearson_r=np.array(pr), pearson_p=np.array(pp),
                             spearman_r=np.array(sr), spearman_p=np.array(sp),
                             measure=("log " if log else "") + result.measure, n_prompts=v.shape[0])

"""Representation geometry of the residual stream: intrinsic dimension, neighbourhood overlap, cosine
similarity, anisotropy, layer-to-layer linearity and per-token nonlinearity, shuffle baselines, and the
correlation of geometry with loss.

A prompt's point cloud at layer l is X ∈ R^{T×d}: its tokens' residuals. Two conventions follow the papers
(which read Hugging Face ``hidden_states``):

* ``exclude_first=True`` (default) drops position 0 of every prompt whatever the tokenizer: with or without a
  BOS token, the first position is the attention sink and carries massive activations (SmolLM2 adds no BOS,
  so a BOS-only rule kept it in every cloud). ``exclude_first="bos"`` drops it only when it is the
  tokenizer's BOS id; ``False`` keeps every token. The old name ``exclude_bos=True`` is ``exclude_first="bos"``.
* ``last_layer="post_norm"`` (default) makes the cloud of the last layer L the final norm applied to the
  last block's output, ``final_norm(h_L)`` — what HF ``hidden_states[-1]`` holds, the papers' last layer.
  ``last_layer="pre_norm"`` uses h_L itself (the capture's layer L). Every result records both choices in
  ``settings`` and its figure says which were used.

Every probe that reads only activations takes a :class:`~lensbench.capture.Capture` in place of ``texts``
(one capture, many probes); :func:`shuffle_baseline` runs the model on shuffled copies of its text.

All statistics are computed on the model's device inside the capture engine's per-batch reduction, in float64
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
from ..plots.geometry import (
    correlation_figure,
    geometry_profile,
    linearity_figure,
    nonlinearity_heatmap,
    shuffle_figure,
)
from ..results import Result
from ..validation import (
    DROP,
    Interval,
    Options,
    SequenceOf,
    caller_stacklevel,
    renamed_params,
    validate_params,
)

ESTIMATORS = ("gride", "twonn", "mle", "pca")
MIN_TOKENS_STABLE = 500
LAST_LAYER = ("post_norm", "pre_norm")
LINEARITY_MIN_RATIO = 10  # linearity warns below N = 10·d pooled points (the in-sample score is inflated)


# --------------------------------------------------------------------------------------------- helpers
#: ``exclude_bos=`` is the old name of ``exclude_first``: True meant "drop position 0 only when it is a literal BOS"
EXCLUDE_BOS_RENAME = {"exclude_bos": ("exclude_first", lambda v: DROP if v is None else ("bos" if v else False))}


#: constraints shared by the probes that run the model (see :mod:`lensbench.validation`)
_RUN_PARAMS = {
    "m": [LensModel],
    "batch_size": [Options({"auto"}), Interval(int, 1, None)],
    "progress": [bool],
}
#: the cloud conventions
_VIEW_PARAMS = {"exclude_first": [Options((True, False, "bos"))], "last_layer": [Options(LAST_LAYER)]}
#: the ID estimator of the probes (``scale`` is GRIDE's n2)
_ESTIMATOR_PARAMS = {"estimator": [Options(ESTIMATORS)], "scale": [Interval(int, 2, None)]}
#: pooled clouds: their size and the seed of their subsample
_POOL_PARAMS = {"max_points": [Interval(int, 1, None)], "seed": [int]}


def _skip(m: LensModel, ids: torch.Tensor, exclude_first) -> int:
    """Leading positions dropped from a prompt's cloud (0 or 1)."""
    if exclude_first is True:
        return 1 if len(ids) > 1 else 0
    if exclude_first == "bos":
        bos = m.tokenizer.bos_token_id
        return 1 if bos is not None and len(ids) and int(ids[0]) == bos else 0
    return 0


def final_norm(m: LensModel, X: torch.Tensor) -> torch.Tensor:
    """``final_norm(X)``: the model's own final norm (every module between the last block and the
    unembedding), in the model's dtype on its device, returned on ``X``'s device — HF ``hidden_states[-1]``
    for the last block's output X (``[..., d_model]``)."""
    with torch.no_grad():
        return m.apply_final(X.to(dtype=m.dtype)).to(X.device)


def _layer_view(m: LensModel, X: torch.Tensor, layer: int, last_layer: str) -> torch.Tensor:
    return final_norm(m, X) if last_layer == "post_norm" and layer == m.n_layers else X


def _cloud(batch: CaptureBatch, b: int, layer: int, exclude_first, last_layer: str = "pre_norm") -> torch.Tensor:
    X = batch.hidden[layer][b, batch.span(b)]
    X = X[_skip(batch.model, batch.ids_of(b), exclude_first):]
    return _layer_view(batch.model, X, layer, last_layer)


_ESTIMATE_ID_PARAMS = {
    "estimator": [Options(ESTIMATORS)],
    "scale": [Interval(int, 1, None)],
    "var": [Interval(float, 0, 1, closed="right")],
    "k": [Interval(int, 3, None)],
}


@validate_params(_ESTIMATE_ID_PARAMS)
def estimate_id(X: torch.Tensor, estimator: str = "gride", scale: int = 4, *, var: float = 0.9,
                k: int = 20) -> tuple[float, int]:
    """ID of one cloud ``X`` (``[N, d]``) by name: GRIDE with n2 = ``scale``, TwoNN, MLE with ``k``
    neighbours or PCA at ``var`` explained variance. Returns (id, duplicates removed)."""
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
        n_tokens: tokens per row (after the first-token exclusion); duplicates: ``[n_rows, n_layers]`` points
            removed.
        settings: estimator, scale, per, exclude_first, last_layer, k.

    ``to_dataframe()``: one row per (row, layer): ``prompt`` (row index), ``text`` (its first 60 characters),
    ``layer``, the measure's value under its own name (``id``, ``overlap``, ``cosine`` or ``anisotropy``),
    ``spread``, ``loss``, ``n_tokens`` and ``duplicates``, as above.
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
        """Per-layer profile of each row (see :func:`lensbench.plots.geometry.geometry_profile`)."""
        return geometry_profile(self, **kw)


@dataclasses.dataclass(eq=False)
class LinearityResult(Result):
    """Layer-to-layer linearity (LLM-Microscope; "Your Transformer is Secretly Linear").

    Attributes (n transitions):
        layers: l for each transition l -> l+1; n_points: pooled tokens the maps were fitted on; d_model.
        score: ``[n]`` 1 − ‖XA − Y‖²_F on centred, Frobenius-normalised clouds (with the residual), in sample
            (the papers' number; inflated when N is not ≫ d: ≈ d/N for unrelated clouds, 1 at N ≤ d + 1).
        score_no_residual: ``[n]`` the same with Y − X in place of Y.
        score_heldout, score_no_residual_heldout: ``[n]`` the same scores with A fitted on a random half of
            the pooled tokens and scored on the other half (see :func:`linear_fit_heldout`): ≈ 0 or below
            for unrelated clouds whatever N/d.
        prompt, tokens: the prompt whose per-token nonlinearity is reported (may be empty).
        per_token: ``[n, T]`` ‖x̃_i A* − ỹ_i‖ per token of ``prompt`` with A* fitted on the pool
            (clouds scaled to unit mean squared norm, so 1 − mean(per_token²) over the pool = score).
        settings: exclude_first, last_layer, seed, split; model_name.

    ``to_dataframe()``: one row per transition: ``layer``, ``next_layer`` (l + 1), ``linearity`` (``score``),
    ``linearity_no_residual``, ``linearity_heldout`` and ``linearity_no_residual_heldout`` (when computed) and
    ``n_points``.
    """

    # what the maps were fitted on
    layers: list
    n_points: int
    d_model: int
    # in-sample scores, then held-out ones (absent from results saved before they existed)
    score: np.ndarray
    score_no_residual: np.ndarray
    score_heldout: np.ndarray | None = None
    score_no_residual_heldout: np.ndarray | None = None
    # the per-token view of one prompt
    prompt: str = ""
    tokens: list = dataclasses.field(default_factory=list)
    per_token: np.ndarray | None = None
    settings: dict = dataclasses.field(default_factory=dict)
    model_name: str = ""

    def to_dataframe(self):
        import pandas as pd
        df = pd.DataFrame({"layer": self.layers, "next_layer": [la + 1 for la in self.layers],
                           "linearity": self.score, "linearity_no_residual": self.score_no_residual})
        if self.score_heldout is not None:
            df["linearity_heldout"] = self.score_heldout
            df["linearity_no_residual_heldout"] = self.score_no_residual_heldout
        df["n_points"] = self.n_points
        return df

    def figure(self, kind: str = "score"):
        """``kind="score"``: the scores per transition; ``"per_token"``: the per-token nonlinearity heatmap."""
        return nonlinearity_heatmap(self) if kind == "per_token" else linearity_figure(self)


@dataclasses.dataclass(eq=False)
class ShuffleResult(Result):
    """Block-shuffle baseline: the prompt's tokens cut into K = 4^S blocks, blocks permuted (seeded).

    Attributes: levels S; loss ``[n_S]``; id ``[n_S, n_layers]``; layers; text; seed; estimator.

    ``to_dataframe()``: one row per (level, layer): ``S``, ``blocks`` (4^S), ``layer``, ``id`` and the level's
    ``loss``.
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
        """ID profiles and losses per shuffle level (see :func:`lensbench.plots.geometry.shuffle_figure`)."""
        return shuffle_figure(self)


@dataclasses.dataclass(eq=False)
class CorrelationResult(Result):
    """Per-layer correlation across prompts between a geometric measure (log ID by default) and loss.

    Attributes: layers; pearson_r, pearson_p, spearman_r, spearman_p ``[n_layers]``; measure; n_prompts.

    ``to_dataframe()``: one row per layer: ``layer``, ``pearson_r``, ``pearson_p``, ``spearman_r``,
    ``spearman_p``.
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
        """Pearson r and Spearman ρ per layer (see :func:`lensbench.plots.geometry.correlation_figure`)."""
        return correlation_figure(self)


# --------------------------------------------------------------------------------------------- per-prompt measures
def _per_prompt(m: LensModel, texts, layers, fn, *, exclude_first, last_layer: str, batch_size, progress: bool,
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
                X = _cloud(batch, b, la, exclude_first, last_layer)
                if adjacent:
                    vals.append(fn(X, _cloud(batch, b, la + 1, exclude_first, last_layer).to(X.device)))
                else:
                    vals.append(fn(X))
            T = len(batch.ids_of(b)) - _skip(batch.model, batch.ids_of(b), exclude_first)
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


_VIEW_ARGS = """        exclude_first: True (default) drops position 0 of every prompt (the attention sink, with or
            without a BOS token); "bos" only a literal BOS token (the old ``exclude_bos=True``); False keeps all.
        last_layer: "post_norm" (default) — layer L is ``final_norm(h_L)``, as HF ``hidden_states[-1]`` and
            the papers; "pre_norm" — the last block's output h_L before the final norm.
        Old name: ``exclude_bos`` (True → exclude_first="bos", False → False), with a FutureWarning."""


_INTRINSIC_DIMENSION_PARAMS = {**_RUN_PARAMS, **_VIEW_PARAMS, **_ESTIMATOR_PARAMS, **_POOL_PARAMS,
                               "per": [Options(("prompt", "pooled"))]}


@renamed_params(EXCLUDE_BOS_RENAME)
@validate_params(_INTRINSIC_DIMENSION_PARAMS)
def intrinsic_dimension(m: LensModel, texts, *, estimator: str = "gride", scale: int = 4, per: str = "prompt",
                        layers=None, exclude_first: bool | str = True, last_layer: str = "post_norm",
                        max_points: int = 50_000, batch_size: int | str = "auto", progress: bool = True,
                        seed: int = 0) -> GeometryResult:
    """Intrinsic dimension of each layer's token cloud.

    Args:
        texts: a string, a list of strings, or a :class:`~lensbench.capture.Capture` of them (no model pass).
        estimator: "gride" (default; ``scale`` = n2, n1 = n2/2), "twonn", "mle" or "pca" (90% variance).
        per: "prompt" — one ID per prompt per layer (Geometry-of-Tokens; stable for T ≳ 500, warns below);
            "pooled" — tokens of all prompts pooled per layer (LLM-Microscope).
{view}
        max_points: pooled clouds larger than this are subsampled (seeded).
    """
    settings = {"estimator": estimator, "scale": scale, "per": per, "exclude_first": exclude_first,
                "last_layer": last_layer}
    if per == "prompt":
        def fn(X):
            d, dup = estimate_id(X, estimator, scale)
            return d, float("nan"), dup
        layers, prompts, vals, spread, dups, loss, ntok = _per_prompt(
            m, texts, layers, fn, exclude_first=exclude_first, last_layer=last_layer, batch_size=batch_size,
            progress=progress)
        if min(ntok) < MIN_TOKENS_STABLE:
            warnings.warn(f"per='prompt' with {min(ntok)} tokens in the shortest prompt: per-prompt ID needs "
                          f"T ≳ {MIN_TOKENS_STABLE} tokens to be stable; use longer prompts or per='pooled'.",
                          stacklevel=caller_stacklevel())
        return GeometryResult("id", layers, prompts, vals, spread, loss, ntok, dups, settings, m.name)
    pools, prompts, loss, layers = pooled_clouds(m, texts, layers=layers, exclude_first=exclude_first,
                                                 last_layer=last_layer, max_points=max_points,
                                                 batch_size=batch_size, progress=progress, seed=seed)
    vals, dups = [], []
    for X in pools:
        d, dup = estimate_id(X, estimator, scale)
        vals.append(d)
        dups.append(dup)
    n = pools[0].shape[0]
    return GeometryResult("id", layers, ["pooled"], np.array([vals]), np.full((1, len(layers)), np.nan),
                          np.array([np.nanmean(loss)]), [n], np.array([dups]), dict(settings, prompts=len(prompts)),
                          m.name)


intrinsic_dimension.__doc__ = intrinsic_dimension.__doc__.replace("{view}", _VIEW_ARGS)


_POOLED_CLOUDS_PARAMS = {**_RUN_PARAMS, **_VIEW_PARAMS, **_POOL_PARAMS}


@renamed_params(EXCLUDE_BOS_RENAME)
@validate_params(_POOLED_CLOUDS_PARAMS)
def pooled_clouds(m: LensModel, texts, *, layers=None, exclude_first: bool | str = True,
                  last_layer: str = "post_norm", max_points: int = 50_000, batch_size: int | str = "auto",
                  progress: bool = True, seed: int = 0):
    """Token clouds pooled over prompts, one ``[N, d]`` float32 CPU tensor per layer (subsampled to
    ``max_points``; ``exclude_first``, ``last_layer`` as in :func:`intrinsic_dimension`). Returns (clouds,
    texts, per-prompt losses, layers)."""
    layers = m.check_layers(layers)

    def reduce(batch: CaptureBatch) -> list:
        return [([_cloud(batch, b, la, exclude_first, last_layer).float().cpu() for la in layers], _loss(batch, b))
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


_NEIGHBORHOOD_OVERLAP_PARAMS = {**_RUN_PARAMS, **_VIEW_PARAMS, "k": [Interval(int, 1, None)]}


@renamed_params(EXCLUDE_BOS_RENAME)
@validate_params(_NEIGHBORHOOD_OVERLAP_PARAMS)
def neighborhood_overlap(m: LensModel, texts, *, k: int = 10, layers=None, exclude_first: bool | str = True,
                         last_layer: str = "post_norm", batch_size: int | str = "auto",
                         progress: bool = True) -> GeometryResult:
    """χ_k(l, l+1): mean fraction of each token's k nearest neighbours shared by adjacent layers, per prompt
    (``exclude_first``, ``last_layer`` as in :func:`intrinsic_dimension`)."""

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
        m, texts, layers, fn, exclude_first=exclude_first, last_layer=last_layer, batch_size=batch_size,
        progress=progress, adjacent=True)
    return GeometryResult("overlap", layers, prompts, vals, spread, loss, ntok, dups,
                          {"k": k, "exclude_first": exclude_first, "last_layer": last_layer}, m.name)


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


_COSINE_SIMILARITY_PARAMS = {**_RUN_PARAMS, **_VIEW_PARAMS}


@renamed_params(EXCLUDE_BOS_RENAME)
@validate_params(_COSINE_SIMILARITY_PARAMS)
def cosine_similarity(m: LensModel, texts, *, layers=None, exclude_first: bool | str = True,
                      last_layer: str = "post_norm", batch_size: int | str = "auto",
                      progress: bool = True) -> GeometryResult:
    """Mean (``values``) and std (``spread``) of pairwise cosine between distinct tokens, per prompt and layer
    (``exclude_first``, ``last_layer`` as in :func:`intrinsic_dimension`)."""
    def fn(X):
        mu, sd = cosine_stats(X)
        return mu, sd, 0
    layers, prompts, vals, spread, dups, loss, ntok = _per_prompt(
        m, texts, layers, fn, exclude_first=exclude_first, last_layer=last_layer, batch_size=batch_size,
        progress=progress)
    return GeometryResult("cosine", layers, prompts, vals, spread, loss, ntok, dups,
                          {"exclude_first": exclude_first, "last_layer": last_layer, "diagonal": "excluded"}, m.name)


_ANISOTROPY_PARAMS = {**_RUN_PARAMS, **_VIEW_PARAMS}


@renamed_params(EXCLUDE_BOS_RENAME)
@validate_params(_ANISOTROPY_PARAMS)
def anisotropy(m: LensModel, texts, *, layers=None, exclude_first: bool | str = True, last_layer: str = "post_norm",
               batch_size: int | str = "auto", progress: bool = True) -> GeometryResult:
    """Top eigenvalue of the centred covariance over its trace, per prompt and layer (``exclude_first``,
    ``last_layer`` as in :func:`intrinsic_dimension`)."""
    def fn(X):
        return anisotropy_of(X), float("nan"), 0
    layers, prompts, vals, spread, dups, loss, ntok = _per_prompt(
        m, texts, layers, fn, exclude_first=exclude_first, last_layer=last_layer, batch_size=batch_size,
        progress=progress)
    return GeometryResult("anisotropy", layers, prompts, vals, spread, loss, ntok, dups,
                          {"exclude_first": exclude_first, "last_layer": last_layer}, m.name)


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


@validate_params({"rcond": [Interval(float, 0, 1, closed="left")]})
def linear_fit(X, Y, *, rcond: float = 1e-12, _solver: _LstsqSolver | None = None):
    """Linearity score of Y ≈ XA on centred clouds scaled to unit mean squared norm; float64 least squares
    with a singular-value cutoff. Returns (score, A, normalisation dict). Score = 1 − ‖XA − Y‖²_F / N
    (identical to the spec's Frobenius-normalised form). In sample: ≈ d/N for unrelated X, Y and exactly 1
    at N ≤ d + 1 — see :func:`linear_fit_heldout`."""
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


@validate_params({"N": [Interval(int, 0, None)], "seed": [int]})
def split_halves(N: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of ``range(N)`` into a fitting half (⌊N/2⌋ rows) and a scoring half."""
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    return perm[: N // 2], perm[N // 2:]


@validate_params({"seed": [int], "rcond": [Interval(float, 0, 1, closed="left")]})
def linear_fit_heldout(X, Y, *, seed: int = 0, rcond: float = 1e-12, split=None,
                       _solver: _LstsqSolver | None = None) -> float:
    """Held-out linearity score: A fitted (as :func:`linear_fit`) on a random half of the rows, scored on the
    other half, both halves centred and scaled with the fitting half's statistics:
    1 − Σ_test ‖x̃A − ỹ‖² / Σ_test ‖ỹ‖². Equals the in-sample score when both halves are the same rows; ≈ 0
    or below for unrelated X, Y whatever N/d (the in-sample score is ≈ d/N there, 1 at N ≤ d + 1).
    ``split``: (fit rows, score rows) to use instead of :func:`split_halves`."""
    X = E.as_points(X, param="X")
    Y = E.as_points(Y, param="Y")
    if X.shape[0] != Y.shape[0]:
        raise InputError("X and Y must have the same number of rows (the same tokens).")
    tr, te = split if split is not None else split_halves(X.shape[0], seed)
    if len(tr) < 2 or len(te) < 1:
        raise InputError(f"a held-out linearity score needs at least 4 points, got N={X.shape[0]}.")
    _, A, nm = linear_fit(X[tr], Y[tr], rcond=rcond, _solver=_solver)
    x = (X[te] - nm["mx"]) / nm["sx"]
    y = (Y[te] - nm["my"]) / nm["sy"]
    return 1.0 - float(((x @ A - y) ** 2).sum()) / float((y ** 2).sum())


_LINEARITY_PARAMS = {**_RUN_PARAMS, **_VIEW_PARAMS, **_POOL_PARAMS, "prompt": [None, str]}


@renamed_params(EXCLUDE_BOS_RENAME)
@validate_params(_LINEARITY_PARAMS)
def linearity(m: LensModel, texts, *, prompt: str | None = None, layers=None, exclude_first: bool | str = True,
              last_layer: str = "post_norm", max_points: int = 50_000, batch_size: int | str = "auto",
              progress: bool = True, seed: int = 0) -> LinearityResult:
    """Layer-to-layer linearity of the pooled token clouds, with and without the residual stream, and the
    per-token nonlinearity of ``prompt`` (default: the first text) under the maps fitted on the pool.

    Reports the papers' in-sample score and, beside it, a held-out one (maps fitted on a seeded random half
    of the pooled tokens, scored on the other half: :func:`linear_fit_heldout`). Warns when the pool has
    N < 10·d points (the in-sample score is then inflated by ≈ d/N; at N <= d + 1 it is 1 identically).
    ``exclude_first``, ``last_layer`` as in :func:`intrinsic_dimension` (with "post_norm" the transition
    L−1 → L maps onto ``final_norm(h_L)``, as the papers' HF ``hidden_states``). With a
    :class:`~lensbench.capture.Capture` as ``texts``, a ``prompt`` among its texts is read from it too.
    """
    layers = m.check_layers(layers)
    trans = [la for la in layers if la < m.n_layers]
    needed = sorted(set(trans) | {la + 1 for la in trans})
    pools, prompts, _, got = pooled_clouds(m, texts, layers=needed, exclude_first=exclude_first,
                                           last_layer=last_layer, max_points=max_points, batch_size=batch_size,
                                           progress=progress, seed=seed)
    idx = {la: i for i, la in enumerate(got)}
    N, d = pools[0].shape
    if N <= d + 1:
        warnings.warn(f"linearity fitted on N={N} points in d={d}: with N <= d+1 the least-squares fit is exact "
                      "and the score is 1 whatever the model does; pool more tokens (N >> d).", stacklevel=caller_stacklevel())
    elif N < LINEARITY_MIN_RATIO * d:
        warnings.warn(f"linearity fitted on N={N} points in d={d} (N < {LINEARITY_MIN_RATIO}·d): the in-sample "
                      f"score is inflated by about d/N = {d / N:.2f}; read the held-out score "
                      "(score_heldout) or pool more tokens.", stacklevel=caller_stacklevel())
    prompt = prompts[0] if prompt is None else prompt
    if isinstance(texts, Capture) and prompt in texts.texts:  # its hidden states are in the capture
        i = texts.texts.index(prompt)
        ph = texts.hidden_states(i)[[texts.layers.index(la) for la in needed]]
        toks, prompt_ids = texts.tokens(i), texts.input_ids(i)
    else:
        pc = m.capture(prompt, layers=needed, progress=False)
        ph, toks, prompt_ids = pc.hidden_states(0), pc.tokens(0), pc.input_ids(0)
    skip = _skip(m, prompt_ids, exclude_first)
    ph, toks = ph[:, skip:], toks[skip:]
    split = split_halves(N, seed) if N >= 4 else None
    score, score_nr, per_tok, held, held_nr = [], [], [], [], []
    for la in trans:
        X, Y = pools[idx[la]], pools[idx[la + 1]]
        s, A, nm = linear_fit(X, Y)
        score.append(s)
        score_nr.append(linear_fit(X, Y - X, _solver=nm["solver"])[0])
        if split is not None:
            Xd = X.double()
            solver = _LstsqSolver(_normalise(Xd[split[0]])[0], 1e-12)
            held.append(linear_fit_heldout(X, Y, split=split, _solver=solver))
            held_nr.append(linear_fit_heldout(X, Y - X, split=split, _solver=solver))
        else:
            held.append(float("nan"))
            held_nr.append(float("nan"))
        x = (ph[idx[la]].double() - nm["mx"]) / nm["sx"]
        y = (_layer_view(m, ph[idx[la + 1]], la + 1, last_layer).double() - nm["my"]) / nm["sy"]
        per_tok.append((x @ A - y).norm(dim=1).numpy())
    return LinearityResult(layers=trans, score=np.array(score), score_no_residual=np.array(score_nr), n_points=N,
                           d_model=d, prompt=prompt, tokens=toks, per_token=np.stack(per_tok), model_name=m.name,
                           score_heldout=np.array(held), score_no_residual_heldout=np.array(held_nr),
                           settings={"exclude_first": exclude_first, "last_layer": last_layer, "seed": seed,
                                     "split": "random halves of the pooled tokens (seeded)"})


# --------------------------------------------------------------------------------------------- shuffle, correlation
@validate_params({"ids": [torch.Tensor], "S": [Interval(int, 0, None)], "seed": [int]})
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


_SHUFFLE_BASELINE_PARAMS = {**_RUN_PARAMS, **_VIEW_PARAMS, **_ESTIMATOR_PARAMS,
                            "levels": [SequenceOf(Interval(int, 0, None))], "seed": [int]}


@renamed_params(EXCLUDE_BOS_RENAME)
@validate_params(_SHUFFLE_BASELINE_PARAMS)
def shuffle_baseline(m: LensModel, text: str, *, levels: Sequence[int] = (0, 1, 2, 3, 4, 5), seed: int = 0,
                     estimator: str = "gride", scale: int = 4, layers=None, exclude_first: bool | str = True,
                     last_layer: str = "post_norm", batch_size: int | str = "auto",
                     progress: bool = True) -> ShuffleResult:
    """Loss and ID profile of ``text`` with its tokens block-shuffled at each level S (K = 4^S blocks).

    A literal leading BOS stays in front; every other token is shuffled. ``exclude_first``, ``last_layer``
    as in :func:`intrinsic_dimension` (position 0 of each shuffled variant is dropped by default). The
    shuffled copies are new inputs, so this probe runs the model (it takes a text, not a capture)."""
    ids = m.encode(text)
    bos = m.tokenizer.bos_token_id
    head = ids[:1] if bos is not None and int(ids[0]) == bos else ids[:0]
    body = ids[len(head):]
    variants = [torch.cat([head, block_shuffle(body, S, seed)]) for S in levels]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = intrinsic_dimension(m, variants, estimator=estimator, scale=scale, layers=layers,
                                  exclude_first=exclude_first, last_layer=last_layer, batch_size=batch_size,
                                  progress=progress)
    return ShuffleResult(levels=list(levels), loss=res.loss, id=res.values, layers=res.layers, text=text, seed=seed,
                         settings={"estimator": estimator, "scale": scale, "exclude_first": exclude_first,
                                   "last_layer": last_layer})


_GEOMETRY_LOSS_CORRELATION_PARAMS = {"result": [GeometryResult], "log": [bool]}


@validate_params(_GEOMETRY_LOSS_CORRELATION_PARAMS)
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

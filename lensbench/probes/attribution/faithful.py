"""Faithfulness of an attribution: soft sufficiency / comprehensiveness (Zhao & Aletras 2023) against a random
control, and hard top-k deletion curves."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from ...model import LensModel
from ...results import Result
from ...validation import Check, Interval, Options, validate_params
from ._passes import _by_rows, _embed, _last_logits, _objective, _require_hf
from .result import AttributionResult

#: the per-target scores, in the order the mapping lists them
SCORES = ("sufficiency", "comprehensiveness", "sufficiency_random", "comprehensiveness_random", "kept", "kept_random")


@dataclasses.dataclass(eq=False)
class FaithfulnessResult(Result, Mapping):
    """Faithfulness scores of one :class:`AttributionResult`, per target.

    Attributes:
        sufficiency, comprehensiveness: ``[n_targets]`` float64, the method's soft scores;
            ``sufficiency_random``, ``comprehensiveness_random``: the same for the random control;
            ``kept``, ``kept_random``: expected number of tokens kept (Σ keep probabilities) by each.
        deletion: ``[n_targets, K_max + 1]`` float32, F after zeroing the top-0..K tokens (NaN beyond each
            target's K); deletion_lengths: K + 1 per target.
        target_tokens, method (the attribution's), model_name; settings: the options used.

    It also reads as the mapping it replaces: ``res["comprehensiveness"]`` (arrays), ``res["sufficiency_mean"]``
    (floats, for every score), ``res["sufficiency_ratio"]`` / ``res["comprehensiveness_ratio"]`` (method mean /
    random mean) and ``res["deletion_curves"]`` (one array of K + 1 values per target).

    ``to_dataframe()``: one row per target: ``target`` (index), ``target_token``, ``sufficiency``,
    ``comprehensiveness``, ``sufficiency_random``, ``comprehensiveness_random``, ``kept``, ``kept_random``.
    """

    sufficiency: np.ndarray
    comprehensiveness: np.ndarray
    sufficiency_random: np.ndarray
    comprehensiveness_random: np.ndarray
    kept: np.ndarray
    kept_random: np.ndarray
    deletion: np.ndarray
    deletion_lengths: list
    target_tokens: list = dataclasses.field(default_factory=list)
    method: str = ""
    model_name: str = ""
    settings: dict = dataclasses.field(default_factory=dict)

    # ---- the mapping view
    def _keys(self) -> list[str]:
        return [*SCORES, *(k + "_mean" for k in SCORES), "sufficiency_ratio", "comprehensiveness_ratio",
                "deletion_curves"]

    def __getitem__(self, key: str):
        if key in SCORES:
            return getattr(self, key)
        if key.endswith("_mean") and key[:-5] in SCORES:
            return float(getattr(self, key[:-5]).mean())
        if key in ("sufficiency_ratio", "comprehensiveness_ratio"):
            name = key[: -len("_ratio")]
            return self[name + "_mean"] / max(self[name + "_random_mean"], 1e-9)
        if key == "deletion_curves":
            return [row[:n] for row, n in zip(self.deletion, self.deletion_lengths)]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    __hash__ = None  # a mutable dataclass

    # ---- views
    def to_dataframe(self):
        """One row per target: its token and every score."""
        import pandas as pd
        rows = [{"target": k, "target_token": tok, **{s: float(getattr(self, s)[k]) for s in SCORES}}
                for k, tok in enumerate(self.target_tokens or [""] * len(self.sufficiency))]
        return pd.DataFrame(rows)

    def figure(self):
        """Soft scores of the method beside the random control, and the deletion curves."""
        from ...plots.attribution import faithfulness_figure
        return faithfulness_figure(self)

    def _repr_html_(self) -> str:
        from ...plots.attribution import faithfulness_html
        return faithfulness_html(self)


def _hellinger(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1))


def _masked_distance(m, ek, p_full, prob_keep, n_samples, g, batch_size: int | str = "auto") -> torch.Tensor:
    """Mean Hellinger distance to ``p_full`` with embeddings kept with probability ``prob_keep`` ``[P]`` (or one row
    per sample, ``[n_samples, P]``); the masked rows run ``batch_size`` per forward."""
    pk = prob_keep[None] if prob_keep.dim() == 1 else prob_keep
    mask = (torch.rand(n_samples, ek.shape[0], generator=g) < pk).to(ek.dtype).to(ek.device)
    lg = _by_rows(m, ek[None] * mask[..., None], lambda x: _last_logits(m, x), batch_size).float()
    return _hellinger(p_full[None], torch.softmax(lg, -1)).mean()


_FAITHFULNESS_PARAMS = {
    "result": [Check(lambda r: isinstance(r, AttributionResult), "an AttributionResult (from lensbench.attribute)")],
    "n_samples": [Interval(int, 1, None)],
    "seed": [int],
    "max_k": [None, Interval(int, 1, None)],
    "random": [Options({"permute", "uniform"})],
    "batch_size": [Interval(int, 1, None), Options({"auto"})],
}


@validate_params(_FAITHFULNESS_PARAMS)
def faithfulness(m: LensModel, result: AttributionResult, *, n_samples: int = 20, seed: int = 0,
                 max_k: int | None = None, random: str = "permute",
                 batch_size: int | str = "auto") -> FaithfulnessResult:
    """Soft sufficiency / comprehensiveness (Zhao & Aletras 2023) and hard top-k deletion curves.

    Embeddings are multiplied by Bernoulli keep-masks with keep probability s_i (sufficiency) or 1 − s_i
    (comprehensiveness), s = scores min-max normalised per target. D = Hellinger distance between the full
    next-token distributions, normalised by D(full, all-masked):
    sufficiency = 1 − D(p, p_keep)/D(p, p_null) (higher = better), comprehensiveness = D(p, p_drop)/D(p, p_null).
    Each is also given for a seeded random control. ``random="permute"`` (default) shuffles the method's own
    normalised scores over the positions (a fresh permutation per mask sample), so the control keeps exactly as
    many tokens in expectation (Σ keep probabilities equal, reported as ``kept``/``kept_random``) and differs only
    in *which* tokens; ``random="uniform"`` (U(0, 1) scores, about half the tokens kept) stays available.
    Deletion: F (log-probability of the target) after zeroing the top-k tokens, k = 0..min(P, max_k).

    Args:
        result: an attribution of ``m``'s.
        n_samples: keep-masks drawn per score and target; seed: seeds the masks and the control.
        max_k: deletion curves stop at k = max_k (None: every source).
        random: the control, ``"permute"`` or ``"uniform"``.
        batch_size: masked and deleted variants per forward (``"auto"``: a token budget), halved on
            out-of-memory with identical results.

    The model runs from edited input embeddings, so this needs the ``"hf"`` backend.
    """
    _require_hf(m, "faithfulness", "runs the model from masked input embeddings")
    g = torch.Generator().manual_seed(seed)
    ids = result.input_ids
    e = _embed(m, ids).detach()
    out = {k: [] for k in SCORES}
    curves = []
    with torch.no_grad():
        for k, P in enumerate(result.target_positions):
            ek = e[:P]
            s = result.scores[k, :P].nan_to_num(0)
            s = (s - s.min()) / (s.max() - s.min()).clamp_min(1e-12)
            p_full = torch.softmax(_last_logits(m, ek[None])[0].float(), -1)
            p_null = torch.softmax(_last_logits(m, torch.zeros_like(ek)[None])[0].float(), -1)
            d_null = _hellinger(p_full, p_null).clamp_min(1e-9)

            if random == "permute":  # a fresh permutation of the method's scores for every mask sample
                rnd = torch.stack([s[torch.randperm(P, generator=g)] for _ in range(n_samples)])
            else:
                rnd = torch.rand(P, generator=g)
            out["kept"].append(float(s.sum()))
            out["kept_random"].append(float(rnd.sum(-1).mean()))
            for key, keep in (("sufficiency", s), ("comprehensiveness", 1 - s), ("sufficiency_random", rnd),
                              ("comprehensiveness_random", 1 - rnd)):
                d = _masked_distance(m, ek, p_full, keep, n_samples, g, batch_size=batch_size) / d_null
                out[key].append(float(1 - d if key.startswith("sufficiency") else d))
            order = s.argsort(descending=True)
            K = min(P, max_k or P)
            batch = ek[None].repeat(K + 1, 1, 1)
            for j in range(1, K + 1):
                batch[j, order[:j]] = 0
            y = torch.full((K + 1,), int(result.target_ids[k]), device=ek.device)
            f = _objective(_by_rows(m, batch, lambda x: _last_logits(m, x), batch_size), y, None, "logprob")
            curves.append(f.float().cpu().numpy())
    width = max(len(c) for c in curves)
    deletion = np.full((len(curves), width), np.nan, dtype=np.float32)
    for k, c in enumerate(curves):
        deletion[k, : len(c)] = c
    return FaithfulnessResult(
        **{k: np.array(v) for k, v in out.items()}, deletion=deletion, deletion_lengths=[len(c) for c in curves],
        target_tokens=list(result.target_tokens), method=result.method, model_name=m.name,
        settings={"n_samples": n_samples, "seed": seed, "max_k": max_k, "random": random, "batch_size": batch_size})

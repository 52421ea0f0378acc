"""The attribution result and the warnings attached to it."""

from __future__ import annotations

import dataclasses
import math

import torch

from ...results import Result


class CompletenessWarning(UserWarning):
    """An integrated-gradients result whose completeness gap exceeds ``GAP_TOLERANCE`` of |F(x) − F(x')|."""


class ConvergenceWarning(UserWarning):
    """A ReAGent target for which no probe met the stopping rule (its scores average unconverged probes)."""


@dataclasses.dataclass(eq=False)
class AttributionResult(Result):
    """Attribution scores of targets to source tokens.

    Attributes:
        scores: ``[n_targets, n_sources]`` float32; NaN where a source is not before its target.
        source_tokens: all tokens of prompt + generation except the last (length n_sources).
        target_tokens: the attributed tokens (length n_targets); target_ids ``[n_targets]``.
        target_positions: index in the full sequence of each target token (sources are 0..pos-1).
        method, objective, contrast (foil string or ""); text; model_name.
        f_value: ``[n_targets]`` F(x) at each target; completeness: ``[n_targets]`` Σ attr − (F(x) − F(x'))
            for integrated gradients (NaN otherwise); settings: method options used.
        baseline: the IG/occlusion baseline used (kind: ``"scaled_mean_first"``, ``"zero"``, ``"token:<id>"``,
            ``"tensor"``, ``"remove"``, ...; "" for methods without one).
        baseline_embeds: integrated gradients only: ``[n_targets, n_sources, d]`` float32, the exact baseline
            embeddings x' of each target (NaN beyond its sources), enough to rerun the path.
        f_baseline: integrated gradients only: ``[n_targets]`` F(x').

    ``to_dataframe()``: one row per (target, source) with a score (sources after their target are left out):
    ``target`` (index), ``target_token``, ``source`` (index), ``source_token``, ``score``.
    """

    scores: torch.Tensor
    source_tokens: list
    target_tokens: list
    target_ids: torch.Tensor
    target_positions: list
    method: str
    objective: str
    text: str
    contrast: str = ""
    f_value: torch.Tensor | None = None
    completeness: torch.Tensor | None = None
    settings: dict = dataclasses.field(default_factory=dict)
    model_name: str = ""
    input_ids: torch.Tensor | None = None
    baseline: str = ""
    baseline_embeds: torch.Tensor | None = None
    f_baseline: torch.Tensor | None = None

    @property
    def relative_gap(self) -> torch.Tensor | None:
        """``[n_targets]`` completeness gap / |F(x) − F(x')| (integrated gradients; None otherwise)."""
        if self.completeness is None or self.f_baseline is None:
            return None
        return self.completeness / (self.f_value - self.f_baseline).abs().clamp_min(1e-12)

    def to_dataframe(self):
        import pandas as pd
        rows = []
        for t, tok in enumerate(self.target_tokens):
            for s, src in enumerate(self.source_tokens):
                v = float(self.scores[t, s])
                if not math.isnan(v):
                    rows.append({"target": t, "target_token": tok, "source": s, "source_token": src, "score": v})
        return pd.DataFrame(rows)

    def normalized(self) -> torch.Tensor:
        """Scores of each target scaled by the max |score| over its sources (NaN kept)."""
        s = self.scores.clone()
        den = s.nan_to_num(0).abs().amax(1, keepdim=True).clamp_min(1e-12)
        return s / den

    def figure(self, target: int | None = None):
        """Heatmap targets × sources (several targets, ``target=None``) or bars over the sources of one target."""
        from ...plots.attribution import attribution_figure
        return attribution_figure(self, target=target)

    def _repr_html_(self) -> str:
        from ...plots.attribution import attribution_html
        return attribution_html(self, target=len(self.target_tokens) - 1)

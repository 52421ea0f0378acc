"""Occlusion: F(x) − F(x with one source replaced by a baseline embedding, or deleted), every source in one
batched loop (variants per forward, halved on out-of-memory)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ... import engine
from ...errors import InputError
from ...model import LensModel
from ...validation import Interval, Options
from ._passes import _embed, _objective
from .baselines import BASELINE_KINDS, baseline_embedding
from .gradients import _WithBaseline
from .registry import AttributionMethod, Call, Scores


@dataclasses.dataclass
class Occlusion(_WithBaseline, AttributionMethod):
    """Occlusion of one source at a time (linear in F: a contrast flips the sign).

    Options:
        baseline: what replaces the source: ``"zero"`` (default; also for None), any kind of
            :func:`~lensbench.probes.attribution.baseline_embedding`, a token id, a tensor ``[d]``/``[T, d]``, or
            ``"remove"`` (delete the token: later positions shift back by one).
        batch_size: occluded variants per forward (``"auto"``: a token budget); halved on out-of-memory and
            retried, with identical results.
    """

    name: ClassVar[str] = "occlusion"
    default_baseline: ClassVar = "zero"
    linear: ClassVar[bool] = True
    uses_baseline: ClassVar[bool] = True
    parameter_constraints: ClassVar[dict] = {
        "baseline": [None, Options((*BASELINE_KINDS, "remove")), int, torch.Tensor],
        "batch_size": [Interval(int, 1, None), Options({"auto"})]}

    baseline: str | int | torch.Tensor | None = "zero"
    batch_size: int | str = "auto"

    def run(self, m: LensModel, ids: torch.Tensor, targets: list[tuple[int, int]], call: Call) -> Scores:
        m.require_embeds_forward(f"attribute(method={self.name!r})")
        scores, f = _occlusion(m, ids, targets, foil=call.foil, objective=call.objective,
                               baseline=self.resolved_baseline, batch_size=self.batch_size, progress=call.progress)
        return Scores(scores, f)


def _occlusion(m, ids, targets, *, foil, objective, baseline, batch_size, progress=False):
    """F(x) − F(x with source i replaced by the baseline, or deleted) for every source; one row per source, batched
    (``batch_size`` rows per forward, halved on out-of-memory). Returns (scores, f)."""
    T_all = len(ids)
    if baseline == "remove" and min(p for p, _ in targets) < 2:
        raise InputError("occlusion with baseline='remove' needs at least 2 tokens before each target "
                         "(deleting the only one leaves nothing to predict from).")
    e = _embed(m, ids).detach()
    last = max(p for p, _ in targets)
    pos_t = torch.tensor([p - 1 for p, _ in targets], device=e.device)
    ys = torch.tensor([y for _, y in targets], device=e.device)
    fo = None if foil is None else torch.full_like(ys, foil)
    tail = int(last - pos_t.min())            # only the positions that predict a target are unembedded
    remove = baseline == "remove"
    fv = torch.empty(last, len(targets))      # F with source i occluded, per target

    def step(idx: list[int]) -> None:
        if remove:  # deleting shifts positions: every predicting position at or after i (including i itself: the
            # token before it now predicts) moves back by one; rows are last − 1 long, the last `tail` unembedded
            batch = torch.stack([torch.cat([e[:i], e[i + 1: last]]) for i in idx])
            lg = engine.embeds_logits(m, batch, keep=tail)                 # [b, tail, V]
            off = last - 1 - tail
            rows = [_objective(lg[r, torch.where(pos_t >= i, pos_t - 1, pos_t) - off], ys, fo, objective)
                    for r, i in enumerate(idx)]
        else:
            batch = e[None, :last].repeat(len(idx), 1, 1)
            for r, i in enumerate(idx):
                batch[r, i] = base[i]
            lg = engine.embeds_logits(m, batch, keep=tail)                 # [b, tail, V]
            rows = [_objective(lg[r, pos_t - (last - tail)], ys, fo, objective) for r in range(len(idx))]
        fv[idx] = torch.stack(rows).float().cpu()

    with torch.no_grad():
        full = engine.embeds_logits(m, e[None, :last], keep=tail)[0]
        f0 = _objective(full[pos_t - (last - tail)], ys, fo, objective)
        base = None if remove else baseline_embedding(m, ids, baseline)[:last]
        engine.run_batches(m, [range(last - int(remove))] * last, step, batch_size=batch_size, progress=progress,
                           desc="occlusion", longest_first=False)
    scores = torch.full((len(targets), T_all - 1), float("nan"))
    delta = f0.float().cpu()[None] - fv                                    # [last, n_targets]
    for k, (p, _) in enumerate(targets):
        scores[k, :p] = delta[:p, k]
    return scores, f0.float().cpu()

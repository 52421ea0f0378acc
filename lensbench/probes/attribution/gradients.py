"""Gradient methods through the input embeddings: saliency, gradient × input and integrated gradients.

Gradients are taken in float32 even for a bfloat16 model (:func:`lensbench.engine.float32` feeds float32 copies of
the weights; the user's model is never re-cast).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch

from ... import engine
from ...errors import InputError
from ...model import LensModel
from ...validation import Interval, Options
from ._passes import _embed, _last_logits, _objective, _pass_dtype
from .baselines import BASELINE_KINDS, DEFAULT_BASELINE, baseline_embedding, baseline_kind
from .registry import AttributionMethod, Call, Scores

_BATCH = [Interval(int, 1, None), Options({"auto"})]
#: a baseline: None (the method's default), a kind, a token id or a tensor [d] / [T, d]
_BASELINE = [None, Options(BASELINE_KINDS), int, torch.Tensor]


def _normalise_baseline(b):
    """Integral numbers (numpy ints too) become a Python int token id."""
    if b is not None and not isinstance(b, (bool, str, torch.Tensor)) and isinstance(b, (int, np.integer)):
        return int(b)
    return b


class _WithBaseline:
    """Options of a method that compares the input with a baseline: integral token ids become ints, and ``None``
    means the method's ``default_baseline``."""

    default_baseline: ClassVar = DEFAULT_BASELINE

    def __post_init__(self) -> None:
        self.baseline = _normalise_baseline(self.baseline)
        super().__post_init__()

    @property
    def resolved_baseline(self):
        return self.default_baseline if self.baseline is None else self.baseline

    def baseline_kind(self) -> str:
        return baseline_kind(self.resolved_baseline)


class _Gradient(AttributionMethod):
    needs: ClassVar[str] = "gradients"

    def run(self, m: LensModel, ids: torch.Tensor, targets: list[tuple[int, int]], call: Call) -> Scores:
        m.require_embeds_forward(f"attribute(method={self.name!r})")
        with engine.float32(m, call.upcast) as upcast_active, torch.enable_grad():
            out = self._run(m, ids, targets, call)
        out.upcast = bool(upcast_active)
        return out

    def _run(self, m: LensModel, ids: torch.Tensor, targets: list[tuple[int, int]], call: Call) -> Scores:
        raise NotImplementedError


class _PlainGradient(_Gradient):
    """One forward + backward per target: ∂F/∂e_i at the real embeddings."""

    def _reduce(self, g: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _run(self, m, ids, targets, call):
        e = _embed(m, ids).detach().float()
        n = len(targets)
        scores = torch.full((n, len(ids) - 1), float("nan"))
        fvals = torch.empty(n)
        wdt = _pass_dtype(m)
        foil_t = None if call.foil is None else torch.tensor([call.foil], device=e.device)
        for k, (P, y) in enumerate(targets):  # sources 0..P-1; F read at position P-1
            yk = torch.tensor([y], device=e.device)
            ek = e[:P].clone().requires_grad_(True)
            F = _objective(_last_logits(m, ek[None].to(wdt)), yk, foil_t, call.objective)
            (g,) = torch.autograd.grad(F.sum(), ek)
            fvals[k] = float(F.detach())
            scores[k, :P] = self._reduce(g, ek).detach().cpu()
        return Scores(scores, fvals, completeness=torch.full((n,), float("nan")))


@dataclasses.dataclass
class Saliency(_PlainGradient):
    """‖∂F/∂e_i‖₂ for each source embedding e_i (Captum's ``Saliency`` summed as an L2 norm). No options."""

    name: ClassVar[str] = "saliency"

    def _reduce(self, g, e):
        return g.norm(dim=-1)


@dataclasses.dataclass
class GradXInput(_PlainGradient):
    """(∂F/∂e_i) · e_i for each source (linear in F: a contrast flips the sign). No options."""

    name: ClassVar[str] = "grad_x_input"
    linear: ClassVar[bool] = True

    def _reduce(self, g, e):
        return (g * e).sum(-1)


@dataclasses.dataclass
class IntegratedGradients(_WithBaseline, _Gradient):
    """Integrated gradients along the straight path e' + α (e − e'), α at Gauss–Legendre nodes on [0, 1].

    Options:
        n_steps: number of nodes (50, as Captum's default rule).
        baseline: the reference x' (see :func:`~lensbench.probes.attribution.baseline_embedding`). None:
            ``DEFAULT_BASELINE`` = ``"scaled_mean_first"`` (the real first token in row 0, elsewhere the mean
            direction of the unit-normalised vocabulary at each token's own norm). Chosen by measurement
            (``bench/ig_baselines.py`` → ``bench/RESULTS-ig-baselines.md``): in a pre-norm model (RMSNorm/LayerNorm
            before every block, e.g. Llama/SmolLM2) the norm rescales α·e back to unit size for any α > 0 while
            α = 0 gives the "empty" output, so with Captum's ``"zero"`` baseline the path is near-discontinuous at
            α = 0 and completeness fails at any practical ``n_steps`` (gap 1189% of |F(x) − F(x')| for "The
            capital of France is" on the default model at 50 steps; 0.3% with the default). Keeping the first
            token keeps the attention sink in place along the path; it therefore gets zero attribution by
            construction (IG explains the prediction *given* the first token). ``"zero"`` (Captum's
            ``IntegratedGradients`` convention), ``"mean"``, ``"pad"``, ``"unk"``, ``"bos"``, ``"eos"``,
            ``"mean_first"``, ``"pad_first"``, ``"context_mean_first"``, a token id (``0`` reproduces Captum's
            ``LayerIntegratedGradients`` default and inseq's unk-token baseline for SmolLM2) or a tensor
            ``[d]``/``[T, d]`` stay available. Models with hard top-k expert routing (MoE) are discontinuous in
            the embeddings: no baseline gives completeness there, and the warning says so.
        batch_size: interpolation steps per forward/backward pass (``"auto"``: a token budget); halved on
            out-of-memory and retried, with identical results (the nodes are summed in node order).

    The result records the baseline kind, the exact baseline embeddings, F(x') and the completeness gap
    Σ attr − (F(x) − F(x')).
    """

    name: ClassVar[str] = "integrated_gradients"
    linear: ClassVar[bool] = True
    uses_baseline: ClassVar[bool] = True
    parameter_constraints: ClassVar[dict] = {"n_steps": [Interval(int, 1, None)], "baseline": _BASELINE,
                                             "batch_size": _BATCH}
    renamed: ClassVar[dict] = {"internal_batch_size": "batch_size"}

    n_steps: int = 50
    baseline: str | int | torch.Tensor | None = None
    batch_size: int | str = "auto"

    def _run(self, m, ids, targets, call):
        baseline, n_steps = self.resolved_baseline, self.n_steps
        T_all = len(ids)
        e = _embed(m, ids).detach().float()
        n = len(targets)
        scores = torch.full((n, T_all - 1), float("nan"))
        fvals = torch.empty(n)
        fbase = torch.full((n,), float("nan"))
        comp = torch.full((n,), float("nan"))
        wdt = _pass_dtype(m)
        x, w = np.polynomial.legendre.leggauss(n_steps)
        alphas = torch.tensor(0.5 * (x + 1), dtype=torch.float32, device=e.device)
        weights = torch.tensor(0.5 * w, dtype=torch.float32, device=e.device)
        if isinstance(baseline, torch.Tensor) and baseline.dim() == 2 and len(baseline) < T_all - 1:
            raise InputError(f"baseline tensor has {len(baseline)} rows; it needs one per source ({T_all - 1}).")
        foil_t = None if call.foil is None else torch.tensor([call.foil], device=e.device)
        bases = []
        for k, (P, y) in enumerate(targets):  # sources 0..P-1; F read at position P-1
            yk = torch.tensor([y], device=e.device)
            # the baseline of each target is built from its own sources (a context mean never sees later tokens)
            bk = (baseline[:P] if isinstance(baseline, torch.Tensor) and baseline.dim() == 2
                  else baseline_embedding(m, ids[:P], baseline)).float().to(e.device)
            ek = e[:P]
            bases.append(bk.detach().cpu())
            total = torch.zeros_like(ek)

            def step(idx: list[int], ek=ek, bk=bk, yk=yk, total=total) -> None:
                a = alphas[idx]
                path = (bk[None] + a[:, None, None] * (ek - bk)[None]).requires_grad_(True)
                logits = _last_logits(m, path.to(wdt))
                F = _objective(logits, yk.expand(len(a)), None if foil_t is None else foil_t.expand(len(a)),
                               call.objective)
                (g,) = torch.autograd.grad(F.sum(), path)
                for r, i in enumerate(idx):  # node by node, in node order: the sum never depends on the batching
                    total.add_(g[r], alpha=float(weights[i]))
            engine.run_batches(m, [ek] * n_steps, step, batch_size=self.batch_size, progress=False,
                               longest_first=False)
            attr = ((ek - bk) * total).sum(-1).detach()
            with torch.no_grad():
                ends = torch.stack([ek, bk]).to(wdt)
                Fe = _objective(_last_logits(m, ends), yk.expand(2), None if foil_t is None else
                                foil_t.expand(2), call.objective)
            fvals[k] = float(Fe[0])
            fbase[k] = float(Fe[1])
            comp[k] = float(attr.sum() - (Fe[0] - Fe[1]))
            scores[k, :P] = attr.cpu()
        return Scores(scores, fvals, completeness=comp, f_baseline=fbase, baseline_embeds=bases)

"""ReAGent (Zhao & Shan 2024): recursive random replacement of the input tokens with parallel probes; runs from
token ids through the model's backend (hf, nnsight, TransformerLens)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

import torch

from ...errors import InputError, LensbenchError
from ...model import LensModel
from ...validation import Interval, Options, caller_stacklevel
from ._passes import _by_rows, _ids_logits, _last_logits, _objective
from .registry import AttributionMethod, Call, Scores
from .result import ConvergenceWarning

_POSITIVE = [Interval(int, 1, None)]


@dataclasses.dataclass
class ReAGent(AttributionMethod):
    """ReAGent's options.

    Options:
        ratio: fraction of the tokens replaced per step, in (0, 1).
        stopping_top_k: a probe stops once the target is among the model's top ``stopping_top_k`` predictions
            from the probe's ``keep_top_n`` highest-scored tokens alone (the rest replaced).
        keep_top_n: tokens kept by the stopping rule.
        max_steps: steps per probe at most; n_probes: parallel probes (their converged scores are averaged).
        replacement: ``"uniform"`` (vocabulary samples), ``"predictive"`` (the model's own next-token
            distribution) or ``"mlm"`` with ``mlm(ids [B, T], mask [B, T]) -> ids [B, T]``.
        on_unconverged: ``"flag"`` (a :class:`ConvergenceWarning`, ``settings["converged"] == 0``) or ``"raise"``.
        batch_size: probes per forward (``"auto"``: a token budget), halved on out-of-memory with identical
            results.

    The updates 2·atanh(Δp) are defined on p(target): ``contrast=`` and ``objective="logit"`` are refused;
    the call's ``seed`` seeds the draws.
    """

    name: ClassVar[str] = "reagent"
    needs: ClassVar[str] = "ids"
    parameter_constraints: ClassVar[dict] = {
        "ratio": [Interval(float, 0, 1, closed="neither")], "stopping_top_k": _POSITIVE, "keep_top_n": _POSITIVE,
        "max_steps": _POSITIVE, "n_probes": _POSITIVE, "replacement": [Options({"uniform", "predictive", "mlm"})],
        "mlm": [None, "callable"], "on_unconverged": [Options({"flag", "raise"})],
        "batch_size": [Interval(int, 1, None), Options({"auto"})]}
    renamed: ClassVar[dict] = {"top_k": "stopping_top_k"}

    ratio: float = 0.3
    stopping_top_k: int = 3
    keep_top_n: int = 5
    max_steps: int = 3000
    n_probes: int = 16
    replacement: str = "uniform"
    mlm: object = None
    on_unconverged: str = "flag"
    batch_size: int | str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.replacement == "mlm" and self.mlm is None:
            raise InputError("ReAGent: replacement='mlm' needs mlm= (a callable mlm(ids [B, T], mask [B, T]) -> "
                             "ids [B, T]); otherwise replacement must be 'uniform' or 'predictive'.")

    def check(self, m: LensModel, call: Call) -> None:
        if call.contrast or call.foil is not None:
            raise InputError("ReAGent does not support contrast=: its updates and stopping rule are defined on "
                             "p(target) alone (Zhao & Shan 2024); use a linear method (grad_x_input, "
                             "integrated_gradients, occlusion) for contrastive attribution.")
        if call.objective == "logit":
            raise InputError("ReAGent does not support objective='logit': its update 2·atanh(Δp) needs a "
                             "probability difference; use 'logprob' or 'prob' (both run on p(target); objective "
                             "sets f_value only).")

    def run(self, m: LensModel, ids: torch.Tensor, targets: list[tuple[int, int]], call: Call) -> Scores:
        scores, f, extra = _reagent(
            m, ids, targets, foil=call.foil, objective=call.objective, replacement=self.replacement,
            ratio=self.ratio, stopping_top_k=self.stopping_top_k, keep_top_n=self.keep_top_n,
            max_steps=self.max_steps, n_probes=self.n_probes, seed=call.seed, mlm=self.mlm, progress=call.progress,
            on_unconverged=self.on_unconverged, batch_size=self.batch_size)
        return Scores(scores, f, settings={"seed": call.seed, **extra})


def _replace(x: torch.Tensor, mask: torch.Tensor, replacement: str, V: int, g: torch.Generator,
             pred: torch.Tensor | None, mlm) -> torch.Tensor:
    """Copies of ``x`` ``[B, P]`` with the ``mask`` positions replaced: uniform vocabulary samples, samples from
    the model's own prediction for that position (``pred[i-1]``), or a user masked LM."""
    B, P = mask.shape
    x = x.cpu()
    if replacement == "uniform":
        r = torch.randint(0, V, (B, P), generator=g)
    elif replacement == "predictive":
        r = torch.empty(B, P, dtype=torch.long)
        r[:, 0] = torch.randint(0, V, (B,), generator=g)
        if P > 1:
            r[:, 1:] = torch.multinomial(pred[:-1], B, replacement=True, generator=g).T
    else:
        r = mlm(x.expand(B, -1), mask)
    return torch.where(mask, r, x[None])


def _reagent(m, ids, targets, *, foil, objective, replacement, ratio, stopping_top_k, keep_top_n, max_steps,
             n_probes, seed, mlm, progress, on_unconverged="flag", batch_size="auto"):
    """ReAGent (Zhao & Shan 2024): recursive random replacement with parallel probes.

    Its updates are defined on p(y) (the paper's); ``objective`` only changes the reported ``f_value``. A target
    none of whose probes converged is averaged over all probes and flagged (``converged`` count 0, a
    :class:`ConvergenceWarning`), or raises with ``on_unconverged="raise"``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    V = m.vocab_size
    scores = torch.full((len(targets), len(ids) - 1), float("nan"))
    fvals = torch.empty(len(targets))
    steps_used, n_conv = [], []
    dev = m.input_device
    for k, (P, y) in enumerate(targets):
        x = ids[:P].to(dev)
        with torch.no_grad():
            logits0 = _ids_logits(m, x[None], keep=None)[0].float()
        p_y = torch.softmax(logits0[-1], -1)[y]
        fvals[k] = float(_objective(logits0[-1:], torch.tensor([y], device=logits0.device),
                                    None if foil is None else torch.tensor([foil], device=logits0.device), objective))
        pred = torch.softmax(logits0, -1).cpu() if replacement == "predictive" else None

        logit_scores = torch.rand(n_probes, P, generator=g)
        active = torch.ones(n_probes, dtype=torch.bool)
        converged = torch.zeros(n_probes, dtype=torch.bool)
        step = 0
        for step in range(1, max_steps + 1):  # noqa: B007 - the count is reported
            a = active.nonzero()[:, 0]
            if len(a) == 0:
                break
            mask = torch.rand(len(a), P, generator=g) < ratio
            xt = _replace(x, mask, replacement, V, g, pred if replacement == "predictive" else None, mlm)
            with torch.no_grad():
                py = torch.softmax(_by_rows(m, xt, lambda r: _last_logits(m, ids=r), batch_size).float(), -1)[:, y]
            delta = (p_y - py).cpu().clamp(-0.999999, 0.999999)
            upd = 2 * torch.atanh(delta)[:, None]
            logit_scores[a] += torch.where(mask, upd, -upd)
            # stopping: keep each probe's top-n positions, replace the rest; converged if y is in the top-k
            s = torch.softmax(logit_scores[a], -1)
            n_keep = min(keep_top_n, P)
            keep = torch.zeros(len(a), P, dtype=torch.bool)
            keep.scatter_(1, s.topk(n_keep, -1).indices, True)
            xr = _replace(x, ~keep, replacement, V, g, pred if replacement == "predictive" else None, mlm)
            with torch.no_grad():
                top = _by_rows(m, xr, lambda r: _last_logits(m, ids=r), batch_size).topk(stopping_top_k, -1).indices.cpu()
            done = (top == y).any(-1)
            converged[a[done]] = True
            active[a[done]] = False
        steps_used.append(step)
        n_conv.append(int(converged.sum()))
        if not converged.any():
            msg = (f"ReAGent: none of the {n_probes} probes for target {k} met the stopping rule within "
                   f"{max_steps} steps")
            if on_unconverged == "raise":
                raise LensbenchError(msg + "; raise max_steps or n_probes, or pass on_unconverged='flag'.")
            warnings.warn(msg + "; its scores average unconverged probes (settings['converged'] == 0).",
                          ConvergenceWarning, stacklevel=caller_stacklevel())
        use = converged if converged.any() else torch.ones(n_probes, dtype=torch.bool)
        scores[k, :P] = torch.softmax(logit_scores[use], -1).mean(0)
    return scores, fvals, {"steps": steps_used, "converged": n_conv}

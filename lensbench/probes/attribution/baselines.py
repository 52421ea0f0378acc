"""Reference inputs x' for integrated gradients and occlusion: the baseline kinds and their embeddings."""

from __future__ import annotations

import torch

from ...errors import InputError
from ...model import LensModel
from ._passes import _embed, _pass_dtype

BASELINE_KINDS = ("zero", "mean", "pad", "unk", "bos", "eos", "mean_first", "context_mean_first",
                  "scaled_mean_first", "pad_first")
DEFAULT_BASELINE = "scaled_mean_first"   # chosen by measurement: bench/ig_baselines.py, bench/RESULTS-ig-baselines.md
GAP_TOLERANCE = 0.05                      # IG warns when |gap| > 5% of |F(x) − F(x')|


def baseline_embedding(m: LensModel, ids: torch.Tensor, baseline) -> torch.Tensor:
    """The IG/occlusion reference embeddings ``[T, d]`` for the tokens ``ids`` ``[T]``.

    ``"zero"`` (Captum's), ``"mean"`` (vocabulary mean embedding), ``"pad"``/``"unk"``/``"bos"``/``"eos"``, a token
    id, a tensor ``[d]`` / ``[T, d]``, or a baseline that keeps the real first token in row 0 (the attention sink of
    pre-norm models stays in place along the path; row 0 then gets zero attribution by construction):
    ``"mean_first"`` (vocabulary mean elsewhere), ``"context_mean_first"`` (mean of the text's own embeddings),
    ``"pad_first"`` (pad token elsewhere) and ``"scaled_mean_first"`` (the default: the mean direction of the
    unit-normalised vocabulary embeddings, scaled to each token's own norm, so the path stays away from the
    tiny-norm region a pre-norm model's RMSNorm/LayerNorm blows up).
    """
    W = m.embed_module.weight
    dt = _pass_dtype(m)  # float32 inside an active upcast: the baseline is not rounded to the model's dtype
    T = len(ids)
    if isinstance(baseline, torch.Tensor):
        b = baseline.to(W.device, dt)
        return b.expand(T, -1).clone() if b.dim() == 1 else b
    if isinstance(baseline, str) and baseline.endswith("_first") and baseline in BASELINE_KINDS:
        e = _embed(m, ids).detach().float()
        mu = W.detach().float().mean(0)
        if baseline == "mean_first":
            b = mu.expand(T, -1).clone()
        elif baseline == "context_mean_first":
            b = e.mean(0).expand(T, -1).clone()
        elif baseline == "scaled_mean_first":  # mean direction of the unit-normalised vocabulary, at |e_i|
            Wf = W.detach().float()
            u = (Wf / Wf.norm(dim=-1, keepdim=True).clamp_min(1e-12)).mean(0)
            b = u / u.norm().clamp_min(1e-12) * e.norm(dim=-1, keepdim=True)
        else:
            b = baseline_embedding(m, ids, "pad").float()
        b[0] = e[0]
        return b.to(dt)
    if baseline == "zero":
        return torch.zeros(T, W.shape[1], device=W.device, dtype=dt)
    if baseline == "mean":
        return W.float().mean(0).to(dt).expand(T, -1).clone()
    tok = m.tokenizer
    if isinstance(baseline, str) and baseline in ("pad", "unk", "bos", "eos"):
        tid = getattr(tok, f"{baseline}_token_id", None)
        if tid is None:
            raise InputError(f"baseline={baseline!r}: this tokenizer has no {baseline} token; use 'zero' or 'mean'.")
        baseline = tid
    if isinstance(baseline, int) and not isinstance(baseline, bool):
        return _embed(m, torch.full((T,), m.token_id(baseline, param="baseline"), dtype=torch.long))
    raise InputError(f"baseline={baseline!r} is not understood; use one of {BASELINE_KINDS}, "
                     "a token id or a tensor.")


def baseline_kind(baseline) -> str:
    """The recorded name of a baseline: its kind, ``"token:<id>"`` or ``"tensor"``."""
    if isinstance(baseline, torch.Tensor):
        return "tensor"
    return f"token:{baseline}" if isinstance(baseline, int) else str(baseline)

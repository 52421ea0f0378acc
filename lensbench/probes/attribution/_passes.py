"""The passes every attribution method shares: the objective F, embeddings in the pass dtype, last-position
logits from embeddings or token ids, batched rows with out-of-memory back-off, and backend refusals."""

from __future__ import annotations

import contextlib

import torch

from ... import engine
from ...errors import InputError
from ...model import LensModel


def _require_hf(m: LensModel, what: str, why: str) -> None:
    """Raise a clear :class:`InputError` when ``what`` needs the raw model and ``m`` runs through another backend."""
    if m.backend == "hf":
        return
    alt = (f", or use method='reagent', which runs from token ids through the {m.backend!r} backend"
           if what.startswith("attribute") else "")
    raise InputError(
        f"{what} {why}, which lensbench runs on the 'hf' backend only; {m.name} was loaded with "
        f"backend={m.backend!r}, and lensbench does not fall back to the raw model silently (nnsight exposes "
        "gradients, but lensbench does not route gradient or embedding passes through it). Wrap the same "
        "underlying transformers model with the 'hf' backend: lb.load(m.model, m.tokenizer) (no copy of the "
        f"weights){alt}.")


@contextlib.contextmanager
def eager_attention(m: LensModel):
    """Switch to the eager attention kernel (the only one that returns attention weights) for the call."""
    cfg = m.model.config
    old = getattr(cfg, "_attn_implementation", None)
    if old in (None, "eager"):
        yield
        return
    try:
        m.model.set_attn_implementation("eager")
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{m.name} cannot return attention weights ({e}); use a gradient method.") from e
    try:
        yield
    finally:
        m.model.set_attn_implementation(old)


def _objective(logits: torch.Tensor, y: torch.Tensor, foil: torch.Tensor | None, objective: str) -> torch.Tensor:
    """F for a batch: logits ``[B, V]`` at the predicting position, y/foil ``[B]`` → ``[B]`` (float32)."""
    z = logits.float()
    if foil is not None:
        if objective == "prob":
            p = torch.softmax(z, -1)
            return p.gather(-1, y[:, None])[:, 0] - p.gather(-1, foil[:, None])[:, 0]
        return z.gather(-1, y[:, None])[:, 0] - z.gather(-1, foil[:, None])[:, 0]
    if objective == "logit":
        return z.gather(-1, y[:, None])[:, 0]
    if objective == "prob":
        return torch.softmax(z, -1).gather(-1, y[:, None])[:, 0]
    return torch.log_softmax(z, -1).gather(-1, y[:, None])[:, 0]


def _pass_dtype(m: LensModel) -> torch.dtype:
    """The dtype embeddings are fed in: float32 inside an active :func:`lensbench.engine.float32`, else the
    embedding matrix's own."""
    return torch.float32 if engine.compute_dtype(m) == torch.float32 else m.embed_module.weight.dtype


def _embed(m: LensModel, ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings ``[T, d]`` of ``ids`` ``[T]`` in :func:`_pass_dtype` (a scaled embedding is then computed
    in float32 too, from float32 copies: the user's module is never re-cast)."""
    mod, x = m.embed_module, ids.to(m.input_device)
    if _pass_dtype(m) == torch.float32 and mod.weight.dtype != torch.float32:
        params = {n: t.detach().float() for n, t in list(mod.named_parameters()) + list(mod.named_buffers())
                  if t.is_floating_point()}
        return torch.func.functional_call(mod, params, (x,), strict=False)
    return mod(x)


def _ids_logits(m: LensModel, ids: torch.Tensor, keep: int | None = 1) -> torch.Tensor:
    """Logits ``[B, keep, V]`` (all positions when None) for token ids ``[B, T]`` of equal length, through the
    model's backend (``hf``: :func:`lensbench.engine.ids_logits`; nnsight/TransformerLens: their forward)."""
    if m.backend == "hf":
        return engine.ids_logits(m, ids, keep=keep)
    from ...capture import forward_batch
    out = forward_batch(m, list(ids.cpu()), [], backend=m.backend).logits
    return out if keep is None else out[:, -keep:]


def _last_logits(m: LensModel, embeds: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[B, V]`` at the last position only: the unembedding (and its backward) runs for one position
    instead of T (``logits_to_keep=1`` where the model takes it)."""
    if ids is not None:
        return _ids_logits(m, ids, keep=1)[:, -1]
    return engine.embeds_logits(m, embeds, keep=1)[:, -1]


def _by_rows(m: LensModel, x: torch.Tensor, fn, batch_size: int | str, progress: bool = False,
             desc: str = "attribute") -> torch.Tensor:
    """``fn(x[rows])`` over the rows of ``x`` ``[B, ...]`` in batches of ``batch_size`` (``"auto"``: a token budget;
    halved and retried on out-of-memory, so the rows never depend on where memory ran out), stacked ``[B, ...]``."""
    out: list = [None] * len(x)

    def step(idx: list[int]) -> None:
        y = fn(x[idx])
        for r, i in enumerate(idx):
            out[i] = y[r]
    engine.run_batches(m, list(x), step, batch_size=batch_size, progress=progress, desc=desc, longest_first=False)
    return torch.stack(out)

"""Backends run one padded forward pass and return ``(hidden: {layer: [B,T,d]}, logits [B,T,V])``.

- ``hf``: plain torch hooks on the discovered blocks (default; any transformers model).
- ``nnsight``: an nnsight ``LanguageModel`` trace; reductions run inside it, so with ``m.remote = True`` the same
  probe code runs on NDIF and only reduced statistics come back.
- ``transformer_lens``: a TransformerLens ``TransformerBridge`` ``run_with_cache``.

All three record the same tensors, so probes give the same numbers through each (tested).
"""

from __future__ import annotations

import torch

from ..errors import InputError

BACKENDS = ("hf", "nnsight", "transformer_lens")

#: forward passes run through each backend (tests count them to prove a probe used its model's backend)
CALLS: dict[str, int] = dict.fromkeys(BACKENDS, 0)


def position_ids_for(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting only real tokens (what left padding needs)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def run_backend(name: str, m, input_ids: torch.Tensor, mask: torch.Tensor, layers: list[int],
                padding_side: str = "right", logits: bool = True):
    """Hooked forward through backend ``name``: ``(hidden {layer: [B, T, d]}, logits [B, T, V] or None)``.

    ``logits=False`` lets a backend skip the output logits (the hf backend asks for the last position only).
    """
    if name == "hf":
        from .hf import run
    elif name == "nnsight":
        from .nnsight import run
    elif name == "transformer_lens":
        from .transformer_lens import run
    else:
        raise InputError(f"backend={name!r} is unknown; choose one of {BACKENDS}.")
    CALLS[name] += 1
    if name in ("hf", "nnsight"):
        return run(m, input_ids, mask, layers, padding_side, logits=logits)
    return run(m, input_ids, mask, layers, padding_side)


def run_reduced(name: str, m, input_ids: torch.Tensor, mask: torch.Tensor, layers: list[int], work,
                padding_side: str = "right", logits: bool = True):
    """``work(hidden, logits)`` on one forward through backend ``name``; on ``nnsight`` it runs inside the trace
    and only its result is saved (what makes a probe NDIF-ready)."""
    if name != "nnsight":
        hidden, out = run_backend(name, m, input_ids, mask, layers, padding_side, logits=logits)
        return work(hidden, out)
    from .nnsight import run_reduced as run
    CALLS[name] += 1
    return run(m, input_ids, mask, layers, work, padding_side, logits=logits)

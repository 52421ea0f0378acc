"""Plain torch hooks on the model's own modules (the default backend)."""

from __future__ import annotations

import inspect

import torch

from . import position_ids_for


def accepts(model, name: str) -> bool:
    """Whether ``model.forward`` takes the keyword ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def accepts_position_ids(model) -> bool:
    return accepts(model, "position_ids")


def run(m, input_ids: torch.Tensor, mask: torch.Tensor, layers: list[int], padding_side: str = "right",
        logits: bool = True):
    kw = {}
    if padding_side == "left" and accepts_position_ids(m.model):
        kw["position_ids"] = position_ids_for(mask)
    if not logits and accepts(m.model, "logits_to_keep"):
        kw["logits_to_keep"] = 1  # the [B, T, V] logits are not needed: skip one full unembedding
    with m.hooks(layers) as store:
        out = m.forward(input_ids, mask, **kw)
    return dict(store), out.logits if logits else None

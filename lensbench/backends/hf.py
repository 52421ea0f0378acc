"""Plain torch hooks on the model's own modules (the default backend)."""

from __future__ import annotations

import inspect

import torch

from . import position_ids_for


def accepts_position_ids(model) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def run(m, input_ids: torch.Tensor, mask: torch.Tensor, layers: list[int], padding_side: str = "right"):
    kw = {}
    if padding_side == "left" and accepts_position_ids(m.model):
        kw["position_ids"] = position_ids_for(mask)
    with m.hooks(layers) as store:
        out = m.forward(input_ids, mask, **kw)
    return dict(store), out.logits

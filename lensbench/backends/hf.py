"""Plain torch hooks on the model's own modules (the default backend)."""

from __future__ import annotations

import torch

from . import position_ids_for


def run(m, input_ids: torch.Tensor, mask: torch.Tensor, layers: list[int], padding_side: str = "right",
        logits: bool = True):
    kw = {}
    caps = m.capabilities  # measured once per model
    if padding_side == "left" and caps["position_ids"]:
        kw["position_ids"] = position_ids_for(mask)
    if not logits and caps["logits_to_keep"]:
        kw["logits_to_keep"] = 1  # the [B, T, V] logits are not needed: skip one full unembedding
    with m.hooks(layers) as store:
        out = m.forward(input_ids, mask, **kw)
    return dict(store), out.logits if logits else None

"""TransformerLens backend: ``TransformerBridge.run_with_cache`` with the bridge's block hooks."""

from __future__ import annotations

import torch

from ..errors import InputError


def run(m, input_ids: torch.Tensor, mask: torch.Tensor, layers: list[int], padding_side: str = "right"):
    bridge = m.wrapped
    if bridge is None or type(bridge).__name__ != "TransformerBridge":
        raise InputError("backend='transformer_lens' needs a model loaded from a TransformerBridge: "
                         "lb.load(TransformerBridge.boot_transformers(...)).")
    if padding_side == "left":
        raise InputError("backend='transformer_lens' supports padding_side='right' only.")
    names = {(0 if la == 0 else la): ("blocks.0.hook_in" if la == 0 else f"blocks.{la - 1}.hook_out")
             for la in layers}
    logits, cache = bridge.run_with_cache(input_ids, attention_mask=mask, names_filter=list(names.values()))
    hidden = {la: cache[name] for la, name in names.items()}
    return hidden, logits

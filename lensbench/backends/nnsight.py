"""nnsight backend: the same capture expressed as an nnsight trace (``m.wrapped`` is a ``LanguageModel``)."""

from __future__ import annotations

import torch

from ..errors import InputError
from ..model import _first_tensor
from . import position_ids_for


def _envoy(root, path: str):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def language_model(m):
    lm = m.wrapped
    if lm is None or not type(lm).__module__.startswith("nnsight"):
        from nnsight import LanguageModel
        lm = LanguageModel(m.model, tokenizer=m.tokenizer)
        m.wrapped = lm if m.backend == "nnsight" else m.wrapped
    return lm


def run(m, input_ids: torch.Tensor, mask: torch.Tensor, layers: list[int], padding_side: str = "right",
        remote: bool = False):
    try:
        lm = language_model(m)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise InputError("backend='nnsight' needs nnsight: pip install 'lensbench[notebook]'") from e
    blocks = _envoy(lm, m.anatomy.blocks)
    kw = {"attention_mask": mask}
    if padding_side == "left":
        kw["position_ids"] = position_ids_for(mask)
    saved = {}
    with lm.trace(input_ids, remote=remote, **kw):
        for layer in layers:
            if layer == 0:
                saved[0] = blocks[0].input.save()
            else:
                saved[layer] = blocks[layer - 1].output.save()
        logits = lm.output.logits.save()
    hidden = {k: _first_tensor(v) for k, v in saved.items()}
    return hidden, logits

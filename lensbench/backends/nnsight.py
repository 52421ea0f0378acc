"""nnsight backend: the same capture expressed as an nnsight trace (``m.wrapped`` is a ``LanguageModel``).

:func:`run_reduced` runs a per-batch reduction *inside* the trace, on the trace's own tensors, and ``.save()``s only
what it returns, so with ``m.remote`` set the same probe code runs on NDIF and only reduced statistics travel back.
``m.remote``: ``False`` (default, local), ``True`` (NDIF), ``"local"`` (nnsight's serialise / deserialise / run
dry run of the remote path), a host URL, or an nnsight ``Backend`` instance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import InputError
from ..model import _first_tensor
from . import position_ids_for

#: bytes of every value saved by each :func:`run_reduced` trace, in call order (what a remote run sends back)
SAVED_BYTES: list[int] = []


def _envoy(root, path: str):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def language_model(m):
    lm = m.wrapped
    if lm is None or not type(lm).__module__.startswith("nnsight"):
        try:
            from nnsight import LanguageModel
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise InputError("backend='nnsight' needs nnsight: pip install 'lensbench[notebook]'") from e
        lm = LanguageModel(m.model, tokenizer=m.tokenizer)
        m.wrapped = lm if m.backend == "nnsight" else m.wrapped
    return lm


def nbytes(obj: Any) -> int:
    """Total ``nbytes`` of the tensors in a nested list/tuple/dict (8 per Python number)."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 8 if isinstance(obj, (int, float, bool)) else 0


def trace_options(m) -> dict:
    """``lm.trace`` keywords for ``m.remote`` (see the module docstring)."""
    remote = getattr(m, "remote", False)
    if not remote:
        return {}
    import nnsight
    nnsight.register("lensbench")  # NDIF has no lensbench: ship the reductions' source with the request
    from nnsight.tracing.backend import Backend
    return {"backend": remote} if isinstance(remote, Backend) else {"remote": remote}


def _kwargs(mask: torch.Tensor, padding_side: str) -> dict:
    kw = {"attention_mask": mask}
    if padding_side == "left":
        kw["position_ids"] = position_ids_for(mask)
    return kw


def run(m, input_ids: torch.Tensor, mask: torch.Tensor, layers: list[int], padding_side: str = "right",
        logits: bool = True):
    """``(hidden {layer: [B, T, d]}, logits [B, T, V] or None)`` saved from one trace (saves the hidden states:
    for remote use prefer :func:`run_reduced`)."""
    lm = language_model(m)
    blocks = _envoy(lm, m.anatomy.blocks)
    saved, out = {}, None  # only saved values come back from a trace
    with lm.trace(input_ids, **trace_options(m), **_kwargs(mask, padding_side)):
        for layer in layers:
            if layer == 0:
                saved[0] = blocks[0].input.save()
            else:
                saved[layer] = blocks[layer - 1].output.save()
        if logits:
            out = lm.output.logits.save()
    hidden = {k: _first_tensor(v) for k, v in saved.items()}
    return hidden, out


def run_reduced(m, input_ids: torch.Tensor, mask: torch.Tensor, layers: list[int], work: Callable,
                padding_side: str = "right", logits: bool = True):
    """``work(hidden {layer: [B, T, d]}, logits [B, T, V] or None)`` run inside one trace; only its result is saved.

    The hidden states and logits never leave the trace (on NDIF: never leave the server); the bytes of the saved
    result are appended to :data:`SAVED_BYTES`."""
    import nnsight
    lm = language_model(m)
    blocks = _envoy(lm, m.anatomy.blocks)
    with lm.trace(input_ids, **trace_options(m), **_kwargs(mask, padding_side)):
        hidden = {}
        for layer in layers:  # in execution order, as nnsight requires
            h = blocks[0].input if layer == 0 else blocks[layer - 1].output
            hidden[layer] = m.merge_streams(_first_tensor(h))
        out_logits = lm.output.logits if logits else None
        result = nnsight.save(work(hidden, out_logits))
    SAVED_BYTES.append(nbytes(result))
    return result

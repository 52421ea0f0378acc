"""Passes from input embeddings (gradients w.r.t. them) and other forwards whose outputs a probe needs whole.

:func:`float32` runs the model with float32 *copies* of its floating parameters (``torch.func.functional_call``),
so a bfloat16/float16 model gives float32-exact gradients while the user's model — its tensors, dtype and
device map — is never touched.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from .batches import check_cancelled

_local = threading.local()


def _offloaded(model: torch.nn.Module) -> bool:
    """Weights that accelerate swaps in at run time (CPU/disk offload) cannot be replaced by copies."""
    if any(p.device.type == "meta" for p in model.parameters()):
        return True
    return any(v in ("cpu", "disk") for v in (getattr(model, "hf_device_map", None) or {}).values()) and any(
        hasattr(mod, "_hf_hook") and getattr(mod._hf_hook, "offload", False) for mod in model.modules())


@contextlib.contextmanager
def float32(m, enabled: bool = True):
    """Within the block, engine passes of ``m`` on this thread run in float32 (copies of the weights).

    Yields whether the upcast is active: False when disabled, the model is float32 already, or its weights are
    offloaded (then passes run in the model's dtype)."""
    model = m.model
    floating = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.is_floating_point() and t.dtype != torch.float32}
    if not enabled or not floating or _offloaded(model):
        yield False
        return
    params = {n: t.detach().float() for n, t in floating.items()}
    old = getattr(_local, "state", None)
    _local.state = (model, params)
    try:
        yield True
    finally:
        _local.state = old
        del params


def call(m, **kw):
    """``m.model(**kw)`` (under :func:`lensbench.model.model_errors`), in float32 inside :func:`float32`."""
    from ..model import model_errors
    check_cancelled()
    x = kw.get("input_ids", kw.get("inputs_embeds"))
    state = getattr(_local, "state", None)
    with model_errors(m, f"on an input of shape {tuple(x.shape) if isinstance(x, torch.Tensor) else '?'}"):
        if state is not None and state[0] is m.model:
            if "inputs_embeds" in kw:
                kw["inputs_embeds"] = kw["inputs_embeds"].float()
            return torch.func.functional_call(m.model, state[1], args=(), kwargs=kw, tie_weights=True,
                                              strict=False)
        return m.model(**kw)


def compute_dtype(m) -> torch.dtype:
    """The dtype passes run in right now (float32 inside an active :func:`float32`)."""
    state = getattr(_local, "state", None)
    return torch.float32 if state is not None and state[0] is m.model else m.dtype


def embeds_logits(m, embeds: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """Logits ``[B, keep, V]`` of the last ``keep`` positions (all when None) for embeddings ``[B, T, d]`` (rows of
    equal length, no mask); only those positions are unembedded when the model takes ``logits_to_keep``."""
    kw = {"inputs_embeds": embeds.to(m.input_device), "use_cache": False}
    if keep is not None and m.capabilities["logits_to_keep"]:
        kw["logits_to_keep"] = keep
    out = call(m, **kw).logits
    return out if keep is None else out[:, -keep:]


def ids_logits(m, ids: torch.Tensor, keep: int | None = 1, attention_mask: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Logits ``[B, keep, V]`` (all positions when None) for token ids ``[B, T]``."""
    kw = {"input_ids": ids.to(m.input_device), "use_cache": False}
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask.to(m.input_device)
    if keep is not None and m.capabilities["logits_to_keep"]:
        kw["logits_to_keep"] = keep
    out = call(m, **kw).logits
    return out if keep is None else out[:, -keep:]


def forward_outputs(m, ids: torch.Tensor, **kw):
    """The model's whole output object for token ids ``[B, T]`` (e.g. ``output_attentions=True``)."""
    return call(m, input_ids=ids.to(m.input_device), use_cache=False, **kw)

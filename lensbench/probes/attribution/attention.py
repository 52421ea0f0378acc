"""Attention-based methods: last-layer attention, attention rollout (Abnar & Zuidema 2020) and value-weighted
norms (Kobayashi et al. 2020), all from the eager kernel's attention weights in one forward."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ... import engine
from ...errors import InputError
from ...model import LensModel
from ._passes import _objective, eager_attention
from .registry import AttributionMethod, Call, Scores


def _attention_maps(m, ids, last, per_head: bool = False):
    with torch.no_grad(), eager_attention(m):
        out = engine.forward_outputs(m, ids[None, :last], output_attentions=True)
    att = [a[0].float() if per_head else a[0].float().mean(0) for a in out.attentions]  # L × [(H,) T, T]
    if not att:
        raise InputError(f"{m.name} returned no attention weights.")
    return att, out.logits[0]


def _attention_methods(m, ids, targets, method, *, foil, objective):
    last = max(p for p, _ in targets)
    att, logits = _attention_maps(m, ids, last)
    if method == "attention":
        A = att[-1]
    else:
        eye = torch.eye(last, device=att[0].device)
        A = eye
        for a in att:  # later layers multiply on the left
            A = (0.5 * a + 0.5 * eye) @ A
    scores = torch.full((len(targets), len(ids) - 1), float("nan"))
    for k, (p, _) in enumerate(targets):
        scores[k, :p] = A[p - 1, :p].cpu()
    ys = torch.tensor([y for _, y in targets], device=logits.device)
    pos = torch.tensor([p - 1 for p, _ in targets], device=logits.device)
    f = _objective(logits[pos], ys, None if foil is None else torch.full_like(ys, foil), objective)
    return scores, f.float().cpu()


# value-norm needs the last attention block's value and output projections; declared per naming family
_VALUE_NAMES = ("v_proj", "value", "v")
_OUT_NAMES = ("o_proj", "out_proj", "dense", "o")


def _value_norm(m, ids, targets, *, foil, objective):
    """Kobayashi et al. (2020): ‖Σ_h α^h_{p,i} (x_i W_V^h) W_O^h‖ at the last layer, head-resolved."""
    block = m.blocks[-1]
    attn = next((mod for name, mod in block.named_children() if "attn" in name or "attention" in name), None)
    vp = next((getattr(attn, n) for n in _VALUE_NAMES if isinstance(getattr(attn, n, None), torch.nn.Linear)), None)
    op = next((getattr(attn, n) for n in _OUT_NAMES if isinstance(getattr(attn, n, None), torch.nn.Linear)), None)
    if attn is None or vp is None or op is None:
        raise InputError(f"value_norm needs separate value/output projections in the attention module; "
                         f"{type(m.model).__name__} fuses them. Use 'attention', 'rollout' or a gradient method.")
    cfg = m.model.config.get_text_config() if hasattr(m.model.config, "get_text_config") else m.model.config
    H = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or m.d_model // H
    store = {}

    def pre(_mod, args, kwargs):
        store["x"] = kwargs.get("hidden_states", args[0] if args else None)
    last = max(p for p, _ in targets)
    h = attn.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        att_all, logits = _attention_maps(m, ids, last, per_head=True)
    finally:
        h.remove()
    alpha = att_all[-1]                                           # [H, T, T]
    with torch.no_grad():
        x = store["x"][0].float()                                 # [T, d] input of the attention block
        v = torch.nn.functional.linear(x, vp.weight.float(), None if vp.bias is None else vp.bias.float())
        n_kv = v.shape[-1] // hd
        v = v.view(-1, n_kv, hd).repeat_interleave(H // n_kv, dim=1)   # [T, H, hd]
        Wo = op.weight.float().view(op.weight.shape[0], H, hd)          # [d, H, hd]
        f = torch.einsum("thk,dhk->thd", v, Wo)                          # [T, H, d]
    scores = torch.full((len(targets), len(ids) - 1), float("nan"))
    for k, (p, _) in enumerate(targets):
        w = torch.einsum("ht,thd->td", alpha[:, p - 1, :p], f[:p])
        scores[k, :p] = w.norm(dim=-1).cpu()
    ys = torch.tensor([y for _, y in targets], device=logits.device)
    pos = torch.tensor([p - 1 for p, _ in targets], device=logits.device)
    fv = _objective(logits[pos], ys, None if foil is None else torch.full_like(ys, foil), objective)
    return scores, fv.float().cpu()


@dataclasses.dataclass
class Attention(AttributionMethod):
    """The last layer's attention weights from each target's predicting position (head mean). No options."""

    name: ClassVar[str] = "attention"
    needs: ClassVar[str] = "attention"

    def run(self, m: LensModel, ids: torch.Tensor, targets: list[tuple[int, int]], call: Call) -> Scores:
        return Scores(*_attention_methods(m, ids, targets, self.name, foil=call.foil, objective=call.objective))


@dataclasses.dataclass
class Rollout(Attention):
    """Attention rollout: the product over layers of 0.5·A + 0.5·I (head mean; rows are distributions). No
    options."""

    name: ClassVar[str] = "rollout"


@dataclasses.dataclass
class ValueNorm(AttributionMethod):
    """‖Σ_h α^h_{p,i} (x_i W_V^h) W_O^h‖ at the last layer (Kobayashi et al. 2020); models with separate value and
    output projections. No options."""

    name: ClassVar[str] = "value_norm"
    needs: ClassVar[str] = "attention"

    def run(self, m: LensModel, ids: torch.Tensor, targets: list[tuple[int, int]], call: Call) -> Scores:
        return Scores(*_value_norm(m, ids, targets, foil=call.foil, objective=call.objective))

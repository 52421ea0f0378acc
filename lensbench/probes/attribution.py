"""Token attribution: which input tokens made the model produce a token (or each token of a generation).

F is the target's log-probability by default (``objective="logit"``/``"prob"`` too); with ``contrast=foil`` it
is logit(y) − logit(foil) (Yin & Neubig 2022). Gradients flow through the output of
``get_input_embeddings()`` (so every architecture works) and are taken in float32 even for a bfloat16 model:
every pass runs through :mod:`lensbench.engine` (:func:`lensbench.engine.float32` feeds float32 copies of the
weights; the user's model is never re-cast), and every batched pass (IG nodes, occlusion variants, ReAGent
probes, faithfulness masks) halves its batch on out-of-memory and retries it with identical rows.

Methods: saliency, grad_x_input, integrated_gradients, occlusion, attention, rollout, value_norm, reagent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import engine
from ..errors import InputError, LensbenchError
from ..model import LensModel
from ..results import Result

METHODS = ("saliency", "grad_x_input", "integrated_gradients", "occlusion", "attention", "rollout", "value_norm",
           "reagent")
GRADIENT_METHODS = ("saliency", "grad_x_input", "integrated_gradients")
LINEAR_METHODS = ("grad_x_input", "integrated_gradients", "occlusion")  # linear in F: contrast flips sign


class CompletenessWarning(UserWarning):
    """An integrated-gradients result whose completeness gap exceeds ``GAP_TOLERANCE`` of |F(x) − F(x')|."""


class ConvergenceWarning(UserWarning):
    """A ReAGent target for which no probe met the stopping rule (its scores average unconverged probes)."""


# --------------------------------------------------------------------------------------------- result
@dataclasses.dataclass(eq=False)
class AttributionResult(Result):
    """Attribution scores of targets to source tokens.

    Attributes:
        scores: ``[n_targets, n_sources]`` float32; NaN where a source is not before its target.
        source_tokens: all tokens of prompt + generation except the last (length n_sources).
        target_tokens: the attributed tokens (length n_targets); target_ids ``[n_targets]``.
        target_positions: index in the full sequence of each target token (sources are 0..pos-1).
        method, objective, contrast (foil string or ""); text; model_name.
        f_value: ``[n_targets]`` F(x) at each target; completeness: ``[n_targets]`` Σ attr − (F(x) − F(x'))
            for integrated gradients (NaN otherwise); settings: method options used.
        baseline: the IG/occlusion baseline used (kind: ``"scaled_mean_first"``, ``"zero"``, ``"token:<id>"``,
            ``"tensor"``, ``"remove"``, ...; "" for methods without one).
        baseline_embeds: integrated gradients only: ``[n_targets, n_sources, d]`` float32, the exact baseline
            embeddings x' of each target (NaN beyond its sources), enough to rerun the path.
        f_baseline: integrated gradients only: ``[n_targets]`` F(x').
    """

    scores: torch.Tensor
    source_tokens: list
    target_tokens: list
    target_ids: torch.Tensor
    target_positions: list
    method: str
    objective: str
    text: str
    contrast: str = ""
    f_value: torch.Tensor | None = None
    completeness: torch.Tensor | None = None
    settings: dict = dataclasses.field(default_factory=dict)
    model_name: str = ""
    input_ids: torch.Tensor | None = None
    baseline: str = ""
    baseline_embeds: torch.Tensor | None = None
    f_baseline: torch.Tensor | None = None

    @property
    def relative_gap(self) -> torch.Tensor | None:
        """``[n_targets]`` completeness gap / |F(x) − F(x')| (integrated gradients; None otherwise)."""
        if self.completeness is None or self.f_baseline is None:
            return None
        return self.completeness / (self.f_value - self.f_baseline).abs().clamp_min(1e-12)

    def to_dataframe(self):
        import pandas as pd
        rows = []
        for t, tok in enumerate(self.target_tokens):
            for s, src in enumerate(self.source_tokens):
                v = float(self.scores[t, s])
                if not math.isnan(v):
                    rows.append({"target": t, "target_token": tok, "source": s, "source_token": src, "score": v})
        return pd.DataFrame(rows)

    def normalized(self) -> torch.Tensor:
        """Scores of each target scaled by the max |score| over its sources (NaN kept)."""
        s = self.scores.clone()
        den = s.nan_to_num(0).abs().amax(1, keepdim=True).clamp_min(1e-12)
        return s / den

    def figure(self, target: int | None = None):
        from ..plots import attribution_figure
        return attribution_figure(self, target=target)

    def _repr_html_(self) -> str:
        from ..plots import attribution_html
        return attribution_html(self, target=len(self.target_tokens) - 1)


# --------------------------------------------------------------------------------------------- plumbing
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
    from ..capture import forward_batch
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


BASELINE_KINDS = ("zero", "mean", "pad", "unk", "bos", "eos", "mean_first", "context_mean_first",
                  "scaled_mean_first", "pad_first")
DEFAULT_BASELINE = "scaled_mean_first"   # chosen by measurement: bench/ig_baselines.py, bench/RESULTS-ig-baselines.md
GAP_TOLERANCE = 0.05                      # IG warns when |gap| > 5% of |F(x) − F(x')|


def baseline_embedding(m: LensModel, ids: torch.Tensor, baseline) -> torch.Tensor:
    """The IG/occlusion reference embeddings ``[T, d]`` for the tokens ``ids`` ``[T]``.

    ``"zero"`` (Captum's), ``"mean"`` (vocabulary mean embedding), ``"pad"``/``"unk"``/``"bos"``/``"eos"``, a token
    id, a tensor ``[d]`` / ``[T, d]``, or a baseline that keeps the real first token in row 0 (the attention sink of
    pre-norm models stays in place along the path; row 0 then gets zero attribution by construction):
    ``"mean_first"`` (vocabulary mean elsewhere), ``"context_mean_first"`` (mean of the text's own embeddings),
    ``"pad_first"`` (pad token elsewhere) and ``"scaled_mean_first"`` (the default: the mean direction of the
    unit-normalised vocabulary embeddings, scaled to each token's own norm, so the path stays away from the
    tiny-norm region a pre-norm model's RMSNorm/LayerNorm blows up).
    """
    W = m.embed_module.weight
    dt = _pass_dtype(m)  # float32 inside an active upcast: the baseline is not rounded to the model's dtype
    T = len(ids)
    if isinstance(baseline, torch.Tensor):
        b = baseline.to(W.device, dt)
        return b.expand(T, -1).clone() if b.dim() == 1 else b
    if isinstance(baseline, str) and baseline.endswith("_first") and baseline in BASELINE_KINDS:
        e = _embed(m, ids).detach().float()
        mu = W.detach().float().mean(0)
        if baseline == "mean_first":
            b = mu.expand(T, -1).clone()
        elif baseline == "context_mean_first":
            b = e.mean(0).expand(T, -1).clone()
        elif baseline == "scaled_mean_first":  # mean direction of the unit-normalised vocabulary, at |e_i|
            Wf = W.detach().float()
            u = (Wf / Wf.norm(dim=-1, keepdim=True).clamp_min(1e-12)).mean(0)
            b = u / u.norm().clamp_min(1e-12) * e.norm(dim=-1, keepdim=True)
        else:
            b = baseline_embedding(m, ids, "pad").float()
        b[0] = e[0]
        return b.to(dt)
    if baseline == "zero":
        return torch.zeros(T, W.shape[1], device=W.device, dtype=dt)
    if baseline == "mean":
        return W.float().mean(0).to(dt).expand(T, -1).clone()
    tok = m.tokenizer
    if isinstance(baseline, str) and baseline in ("pad", "unk", "bos", "eos"):
        tid = getattr(tok, f"{baseline}_token_id", None)
        if tid is None:
            raise InputError(f"baseline={baseline!r}: this tokenizer has no {baseline} token; use 'zero' or 'mean'.")
        baseline = tid
    if isinstance(baseline, int) and not isinstance(baseline, bool):
        return _embed(m, torch.full((T,), m.token_id(baseline, param="baseline"), dtype=torch.long))
    raise InputError(f"baseline={baseline!r} is not understood; use one of {BASELINE_KINDS}, "
                     "a token id or a tensor.")


# --------------------------------------------------------------------------------------------- methods
def _grad_methods(m, ids, targets, method, *, foil, objective, n_steps, baseline, internal_batch_size):
    """Saliency, grad×input and integrated gradients for every target. Returns (scores, f, completeness)."""
    T_all = len(ids)
    e = _embed(m, ids).detach().float()
    n = len(targets)
    scores = torch.full((n, T_all - 1), float("nan"))
    fvals = torch.empty(n)
    fbase = torch.full((n,), float("nan"))
    comp = torch.full((n,), float("nan"))
    wdt = _pass_dtype(m)
    if method == "integrated_gradients":
        x, w = np.polynomial.legendre.leggauss(n_steps)
        alphas = torch.tensor(0.5 * (x + 1), dtype=torch.float32, device=e.device)
        weights = torch.tensor(0.5 * w, dtype=torch.float32, device=e.device)
        if isinstance(baseline, torch.Tensor) and baseline.dim() == 2 and len(baseline) < T_all - 1:
            raise InputError(f"baseline tensor has {len(baseline)} rows; it needs one per source ({T_all - 1}).")
    bases = []
    for k, (pos, y) in enumerate(targets):
        P = pos  # sources 0..P-1; F read at position P-1
        yk = torch.tensor([y], device=e.device)
        foil_t = None if foil is None else torch.tensor([foil], device=e.device)
        if method in ("saliency", "grad_x_input"):
            ek = e[:P].clone().requires_grad_(True)
            logits = _last_logits(m, ek[None].to(wdt))
            F = _objective(logits, yk, foil_t, objective)
            (g,) = torch.autograd.grad(F.sum(), ek)
            fvals[k] = float(F.detach())
            scores[k, :P] = (g.norm(dim=-1) if method == "saliency" else (g * ek).sum(-1)).detach().cpu()
            continue
        # integrated gradients: path e' + α (e − e'), nodes batched
        # the baseline of each target is built from its own sources (a context mean never sees later tokens)
        bk = (baseline[:P] if isinstance(baseline, torch.Tensor) and baseline.dim() == 2
              else baseline_embedding(m, ids[:P], baseline)).float().to(e.device)
        ek = e[:P]
        bases.append(bk.detach().cpu())
        total = torch.zeros_like(ek)

        def step(idx: list[int], ek=ek, bk=bk, yk=yk, foil_t=foil_t, total=total) -> None:
            a = alphas[idx]
            path = (bk[None] + a[:, None, None] * (ek - bk)[None]).requires_grad_(True)
            logits = _last_logits(m, path.to(wdt))
            F = _objective(logits, yk.expand(len(a)), None if foil_t is None else foil_t.expand(len(a)), objective)
            (g,) = torch.autograd.grad(F.sum(), path)
            for r, i in enumerate(idx):  # node by node, in node order: the sum never depends on the batching
                total.add_(g[r], alpha=float(weights[i]))
        engine.run_batches(m, [ek] * n_steps, step, batch_size=internal_batch_size, progress=False,
                           longest_first=False)
        attr = ((ek - bk) * total).sum(-1).detach()
        with torch.no_grad():
            ends = torch.stack([ek, bk]).to(wdt)
            Fe = _objective(_last_logits(m, ends), yk.expand(2), None if foil_t is None else
                            foil_t.expand(2), objective)
        fvals[k] = float(Fe[0])
        fbase[k] = float(Fe[1])
        comp[k] = float(attr.sum() - (Fe[0] - Fe[1]))
        scores[k, :P] = attr.cpu()
    return scores, fvals, comp, bases, fbase


def _occlusion(m, ids, targets, *, foil, objective, baseline, batch_size, progress=False):
    """F(x) − F(x with source i replaced by the baseline, or deleted) for every source; one row per source, batched
    (``batch_size`` rows per forward, halved on out-of-memory). Returns (scores, f)."""
    T_all = len(ids)
    if baseline == "remove" and min(p for p, _ in targets) < 2:
        raise InputError("occlusion with baseline='remove' needs at least 2 tokens before each target "
                         "(deleting the only one leaves nothing to predict from).")
    e = _embed(m, ids).detach()
    last = max(p for p, _ in targets)
    pos_t = torch.tensor([p - 1 for p, _ in targets], device=e.device)
    ys = torch.tensor([y for _, y in targets], device=e.device)
    fo = None if foil is None else torch.full_like(ys, foil)
    tail = int(last - pos_t.min())            # only the positions that predict a target are unembedded
    remove = baseline == "remove"
    fv = torch.empty(last, len(targets))      # F with source i occluded, per target

    def step(idx: list[int]) -> None:
        if remove:  # deleting shifts positions: every predicting position at or after i (including i itself: the
            # token before it now predicts) moves back by one; rows are last − 1 long, the last `tail` unembedded
            batch = torch.stack([torch.cat([e[:i], e[i + 1: last]]) for i in idx])
            lg = engine.embeds_logits(m, batch, keep=tail)                 # [b, tail, V]
            off = last - 1 - tail
            rows = [_objective(lg[r, torch.where(pos_t >= i, pos_t - 1, pos_t) - off], ys, fo, objective)
                    for r, i in enumerate(idx)]
        else:
            batch = e[None, :last].repeat(len(idx), 1, 1)
            for r, i in enumerate(idx):
                batch[r, i] = base[i]
            lg = engine.embeds_logits(m, batch, keep=tail)                 # [b, tail, V]
            rows = [_objective(lg[r, pos_t - (last - tail)], ys, fo, objective) for r in range(len(idx))]
        fv[idx] = torch.stack(rows).float().cpu()

    with torch.no_grad():
        full = engine.embeds_logits(m, e[None, :last], keep=tail)[0]
        f0 = _objective(full[pos_t - (last - tail)], ys, fo, objective)
        base = None if remove else baseline_embedding(m, ids, baseline)[:last]
        engine.run_batches(m, [range(last - int(remove))] * last, step, batch_size=batch_size, progress=progress,
                           desc="occlusion", longest_first=False)
    scores = torch.full((len(targets), T_all - 1), float("nan"))
    delta = f0.float().cpu()[None] - fv                                    # [last, n_targets]
    for k, (p, _) in enumerate(targets):
        scores[k, :p] = delta[:p, k]
    return scores, f0.float().cpu()


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


def _replace(x: torch.Tensor, mask: torch.Tensor, replacement: str, V: int, g: torch.Generator,
             pred: torch.Tensor | None, mlm) -> torch.Tensor:
    """Copies of ``x`` ``[B, P]`` with the ``mask`` positions replaced: uniform vocabulary samples, samples from
    the model's own prediction for that position (``pred[i-1]``), or a user masked LM."""
    B, P = mask.shape
    x = x.cpu()
    if replacement == "uniform":
        r = torch.randint(0, V, (B, P), generator=g)
    elif replacement == "predictive":
        r = torch.empty(B, P, dtype=torch.long)
        r[:, 0] = torch.randint(0, V, (B,), generator=g)
        if P > 1:
            r[:, 1:] = torch.multinomial(pred[:-1], B, replacement=True, generator=g).T
    else:
        r = mlm(x.expand(B, -1), mask)
    return torch.where(mask, r, x[None])


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


def _reagent(m, ids, targets, *, foil, objective, replacement, ratio, top_k, keep_top_n, max_steps, n_probes, seed,
             mlm, progress, on_unconverged="flag", batch_size="auto"):
    """ReAGent (Zhao & Shan 2024): recursive random replacement with parallel probes.

    Its updates are defined on p(y) (the paper's); ``objective`` only changes the reported ``f_value``. A target
    none of whose probes converged is averaged over all probes and flagged (``converged`` count 0, a
    :class:`ConvergenceWarning`), or raises with ``on_unconverged="raise"``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    V = m.vocab_size
    scores = torch.full((len(targets), len(ids) - 1), float("nan"))
    fvals = torch.empty(len(targets))
    steps_used, n_conv = [], []
    dev = m.input_device
    for k, (P, y) in enumerate(targets):
        x = ids[:P].to(dev)
        with torch.no_grad():
            logits0 = _ids_logits(m, x[None], keep=None)[0].float()
        p_y = torch.softmax(logits0[-1], -1)[y]
        fvals[k] = float(_objective(logits0[-1:], torch.tensor([y], device=logits0.device),
                                    None if foil is None else torch.tensor([foil], device=logits0.device), objective))
        pred = torch.softmax(logits0, -1).cpu() if replacement == "predictive" else None

        logit_scores = torch.rand(n_probes, P, generator=g)
        active = torch.ones(n_probes, dtype=torch.bool)
        converged = torch.zeros(n_probes, dtype=torch.bool)
        step = 0
        for step in range(1, max_steps + 1):  # noqa: B007 - the count is reported
            a = active.nonzero()[:, 0]
            if len(a) == 0:
                break
            mask = torch.rand(len(a), P, generator=g) < ratio
            xt = _replace(x, mask, replacement, V, g, pred if replacement == "predictive" else None, mlm)
            with torch.no_grad():
                py = torch.softmax(_by_rows(m, xt, lambda r: _last_logits(m, ids=r), batch_size).float(), -1)[:, y]
            delta = (p_y - py).cpu().clamp(-0.999999, 0.999999)
            upd = 2 * torch.atanh(delta)[:, None]
            logit_scores[a] += torch.where(mask, upd, -upd)
            # stopping: keep each probe's top-n positions, replace the rest; converged if y is in the top-k
            s = torch.softmax(logit_scores[a], -1)
            n_keep = min(keep_top_n, P)
            keep = torch.zeros(len(a), P, dtype=torch.bool)
            keep.scatter_(1, s.topk(n_keep, -1).indices, True)
            xr = _replace(x, ~keep, replacement, V, g, pred if replacement == "predictive" else None, mlm)
            with torch.no_grad():
                top = _by_rows(m, xr, lambda r: _last_logits(m, ids=r), batch_size).topk(top_k, -1).indices.cpu()
            done = (top == y).any(-1)
            converged[a[done]] = True
            active[a[done]] = False
        steps_used.append(step)
        n_conv.append(int(converged.sum()))
        if not converged.any():
            msg = (f"ReAGent: none of the {n_probes} probes for target {k} met the stopping rule within "
                   f"{max_steps} steps")
            if on_unconverged == "raise":
                raise LensbenchError(msg + "; raise max_steps or n_probes, or pass on_unconverged='flag'.")
            warnings.warn(msg + "; its scores average unconverged probes (settings['converged'] == 0).",
                          ConvergenceWarning, stacklevel=3)
        use = converged if converged.any() else torch.ones(n_probes, dtype=torch.bool)
        scores[k, :P] = torch.softmax(logit_scores[use], -1).mean(0)
    return scores, fvals, {"steps": steps_used, "converged": n_conv}


# --------------------------------------------------------------------------------------------- public API
def _backend_greedy(m: LensModel, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation (up to ``n`` tokens, the end-of-sequence token kept) of ``ids`` ``[T]`` through a non-hf
    backend: one full forward per token (no cache), as :func:`lensbench.engine.greedy` decodes on the hf one."""
    from ..engine.generate import _eos_ids
    eos = _eos_ids(m)[1]
    seq, gen = ids.clone(), []
    for _ in range(n):
        y = int(_last_logits(m, ids=seq[None])[0].argmax())
        gen.append(y)
        seq = torch.cat([seq, torch.tensor([y])])
        if y in eos:
            break
    return gen


def _resolve_targets(m: LensModel, text: str, target, generate: int, add_bos):
    ids = m.encode(text, add_bos=add_bos)
    if isinstance(generate, bool) or not isinstance(generate, int) or generate < 0:
        raise InputError(f"generate must be an int >= 0, got {generate!r}.")
    if generate > 0:
        if target is not None:
            raise InputError("pass either target= or generate=N, not both.")
        with torch.no_grad():
            gen = torch.tensor(engine.greedy(m, ids, generate, strip=False) if m.backend == "hf"
                               else _backend_greedy(m, ids, generate), dtype=torch.long)
        full = torch.cat([ids, gen])
        if len(gen) == 0:
            raise InputError("the model generated nothing (it ended immediately); attribute the next token instead.")
        targets = [(len(ids) + j, int(gen[j])) for j in range(len(gen))]
        return full, targets
    if target is None:
        with torch.no_grad():
            y = int(_last_logits(m, ids=ids[None])[0].argmax())
    else:
        y = m.token_id(target, param="target")
    return torch.cat([ids, torch.tensor([y])]), [(len(ids), y)]


def attribute(m: LensModel, text: str, *, target: str | int | None = None, method: str = "integrated_gradients",
              contrast: str | int | None = None, generate: int = 0, objective: str = "logprob",
              n_steps: int = 50, baseline=None, internal_batch_size: int | str = 16, batch_size: int | str = "auto",
              replacement: str = "uniform", ratio: float = 0.3, top_k: int = 3, keep_top_n: int = 5,
              max_steps: int = 3000, n_probes: int = 16, seed: int = 0, mlm=None, upcast: bool = True,
              add_bos: bool | None = None, progress: bool = True,
              on_unconverged: str = "flag") -> AttributionResult:
    """Attribute a target token (or each token of a greedy generation) to the tokens before it.

    Args:
        text: the prompt.
        target: token to explain (string like ``" Paris"`` or id); default: the model's greedy next token.
        method: one of ``saliency``, ``grad_x_input``, ``integrated_gradients``, ``occlusion``, ``attention``
            (last layer, head mean), ``rollout`` (attention rollout), ``value_norm`` (Kobayashi et al. 2020,
            last layer; models with separate value/output projections), ``reagent``.
        contrast: a foil token: F = logit(y) − logit(foil) (``objective="prob"``: p(y) − p(foil)).
        generate: N > 0 generates N tokens greedily and attributes each to every token before it.
        objective: ``"logprob"`` (default), ``"logit"`` or ``"prob"`` of the target.
        n_steps: integrated-gradients steps (Gauss–Legendre nodes on [0, 1], as Captum's default).
        baseline: IG/occlusion reference (see :func:`baseline_embedding`). Default ``None``: integrated gradients
            uses ``DEFAULT_BASELINE`` = ``"scaled_mean_first"`` (the real first token in row 0, elsewhere the mean
            direction of the unit-normalised vocabulary at each token's own norm), occlusion ``"zero"``.
            Chosen by measurement (``bench/ig_baselines.py`` → ``bench/RESULTS-ig-baselines.md``): in a pre-norm
            model (RMSNorm/LayerNorm before every block, e.g. Llama/SmolLM2) the norm rescales α·e back to unit
            size for any α > 0 while α = 0 gives the "empty" output, so with Captum's ``"zero"`` baseline the path is
            near-discontinuous at α = 0 and completeness fails at any practical ``n_steps`` (gap 1189% of
            |F(x) − F(x')| for "The capital of France is" on the default model at 50 steps; 0.3% with the default).
            Keeping the first token keeps the attention sink in place along the path; it therefore gets zero
            attribution by construction (IG explains the prediction *given* the first token). ``"zero"``
            (Captum's ``IntegratedGradients`` convention), ``"mean"``, ``"pad"``, ``"unk"``, ``"bos"``, ``"eos"``,
            ``"mean_first"``, ``"pad_first"``, ``"context_mean_first"``, a token id (``0`` reproduces Captum's
            ``LayerIntegratedGradients`` default and inseq's unk-token baseline for SmolLM2) or a tensor
            ``[d]``/``[T, d]`` stay available; occlusion also ``"remove"`` (delete the token). Every IG result
            records ``baseline`` (kind), ``baseline_embeds`` (the exact x'), ``f_baseline`` (F(x')),
            ``completeness`` and ``relative_gap``, and warns (:class:`CompletenessWarning`) when
            |gap| > 5% of |F(x) − F(x')|. Models with hard top-k expert routing (MoE) are discontinuous in the
            embeddings: no baseline gives completeness there, and the warning says so.
        internal_batch_size: IG nodes per forward/backward batch (16, as Captum; ``"auto"``: a token budget);
            batch_size: occlusion variants / ReAGent probes per forward (``"auto"``: a token budget). Both halve
            on out-of-memory and retry, with identical results.
        replacement, ratio, top_k, keep_top_n, max_steps, n_probes, seed, mlm: ReAGent settings —
            replacement ``"uniform"`` (vocabulary samples), ``"predictive"`` (the model's own next-token
            distribution) or ``"mlm"`` with ``mlm(ids [B,T], mask [B,T]) -> ids [B,T]``.
        upcast: run gradient methods in float32 (through float32 copies of the weights; the model itself is never
            re-cast). ``settings["upcast"]`` records whether it was active (False for a float32 model, for
            offloaded weights and for the other methods).
        progress: a progress bar.

    Backends: gradient methods, occlusion (both run from edited input embeddings) and the attention methods
    (attention weights of the eager kernel) need the ``"hf"`` backend and raise a clear :class:`InputError`
    otherwise; ReAGent runs from token ids through the model's backend (nnsight, TransformerLens).
    """
    if method not in METHODS:
        raise InputError(f"method={method!r} is unknown; choose one of {METHODS}.")
    if objective not in ("logprob", "logit", "prob"):
        raise InputError("objective must be 'logprob', 'logit' or 'prob'.")
    for name, v in (("n_steps", n_steps), ("internal_batch_size", internal_batch_size), ("batch_size", batch_size),
                    ("top_k", top_k), ("keep_top_n", keep_top_n), ("max_steps", max_steps), ("n_probes", n_probes)):
        if name.endswith("batch_size") and v == "auto":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            extra = " or 'auto'" if name.endswith("batch_size") else ""
            raise InputError(f"{name} must be a positive int{extra}, got {v!r}.")
    if isinstance(generate, bool) or not isinstance(generate, int) or generate < 0:
        raise InputError(f"generate must be an int >= 0 (tokens to generate and attribute), got {generate!r}.")
    if not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise InputError(f"ratio must be in (0, 1) (ReAGent's fraction of tokens replaced per step), got {ratio!r}.")
    if replacement not in ("uniform", "predictive", "mlm") or (replacement == "mlm" and mlm is None):
        raise InputError("replacement must be 'uniform', 'predictive' or 'mlm' (with mlm=callable).")
    if on_unconverged not in ("flag", "raise"):
        raise InputError("on_unconverged must be 'flag' or 'raise'.")
    if method == "reagent" and contrast is not None:
        raise InputError("ReAGent does not support contrast=: its updates and stopping rule are defined on p(target) "
                         "alone (Zhao & Shan 2024); use a linear method (grad_x_input, integrated_gradients, "
                         "occlusion) for contrastive attribution.")
    if method == "reagent" and objective == "logit":
        raise InputError("ReAGent does not support objective='logit': its update 2·atanh(Δp) needs a probability "
                         "difference; use 'logprob' or 'prob' (both run on p(target); objective sets f_value only).")
    if method in GRADIENT_METHODS:
        _require_hf(m, f"attribute(method={method!r})", "takes gradients through the input embeddings")
    elif method == "occlusion":
        _require_hf(m, f"attribute(method={method!r})", "runs the model from edited input embeddings")
    elif method != "reagent":
        _require_hf(m, f"attribute(method={method!r})",
                    "reads the eager kernel's attention weights from the model's own forward")
    full, targets = _resolve_targets(m, text, target, generate, add_bos)
    foil = None if contrast is None else m.token_id(contrast, param="contrast")
    if foil is not None and any(y == foil for _, y in targets):
        raise InputError("contrast is the same token as the target; pick a different foil.")
    comp = bases = fbase = None
    extra: dict = {}
    if baseline is None:
        baseline = DEFAULT_BASELINE if method == "integrated_gradients" else "zero"
    bar = tqdm(total=1, desc=f"attribute ({method})", disable=not progress, leave=False)
    if method in GRADIENT_METHODS or method == "occlusion":  # both run the model from (edited) embeddings
        m.require_embeds_forward(f"attribute(method={method!r})")
    upcast_active = False
    if method in GRADIENT_METHODS:
        with engine.float32(m, upcast) as upcast_active, torch.enable_grad():
            scores, f, comp, bases, fbase = _grad_methods(m, full, targets, method, foil=foil, objective=objective,
                                                          n_steps=n_steps, baseline=baseline,
                                                          internal_batch_size=internal_batch_size)
    elif method == "occlusion":
        scores, f = _occlusion(m, full, targets, foil=foil, objective=objective, baseline=baseline,
                               batch_size=batch_size, progress=progress)
    elif method in ("attention", "rollout"):
        scores, f = _attention_methods(m, full, targets, method, foil=foil, objective=objective)
    elif method == "value_norm":
        scores, f = _value_norm(m, full, targets, foil=foil, objective=objective)
    else:
        scores, f, extra = _reagent(m, full, targets, foil=foil, objective=objective, replacement=replacement,
                                    ratio=ratio, top_k=top_k, keep_top_n=keep_top_n, max_steps=max_steps,
                                    n_probes=n_probes, seed=seed, mlm=mlm, progress=progress,
                                    on_unconverged=on_unconverged, batch_size=batch_size)
    bar.update(1)
    bar.close()
    valid = [scores[k, :p] for k, (p, _) in enumerate(targets)]  # later sources are NaN by design (generation)
    if not torch.isfinite(f).all() or not all(bool(torch.isfinite(v).all()) for v in valid):
        raise LensbenchError(
            f"non-finite {method} scores (NaN/inf in the model's activations, e.g. a bfloat16/float16 overflow); "
            "reload the model with dtype='float32'.")
    toks = m.to_str_tokens(full)
    uses_baseline = method in ("integrated_gradients", "occlusion")
    kind = ("" if not uses_baseline else "tensor" if isinstance(baseline, torch.Tensor)
            else f"token:{baseline}" if isinstance(baseline, int) else str(baseline))
    settings = {"n_steps": n_steps, "baseline": kind, "generate": generate, "upcast": bool(upcast_active)}
    if method == "reagent":
        settings.update(replacement=replacement, ratio=ratio, top_k=top_k, keep_top_n=keep_top_n,
                        max_steps=max_steps, n_probes=n_probes, seed=seed, steps=extra.get("steps"),
                        converged=extra.get("converged"), on_unconverged=on_unconverged)
    embeds = None
    if bases is not None and method == "integrated_gradients":
        embeds = torch.full((len(targets), len(full) - 1, bases[0].shape[-1]), float("nan"))
        for k, b in enumerate(bases):
            embeds[k, : len(b)] = b.float()
        rel = (comp / (f - fbase).abs().clamp_min(1e-12)).abs()
        if bool((rel > GAP_TOLERANCE).any()):
            warnings.warn(f"integrated gradients ({kind} baseline, n_steps={n_steps}): completeness gap up to "
                          f"{float(rel.max()):.1%} of |F(x) − F(x')| (> {GAP_TOLERANCE:.0%}); the attributions are "
                          "not converged: raise n_steps or try another baseline.", CompletenessWarning,
                          stacklevel=2)
    return AttributionResult(
        scores=scores.float(), source_tokens=toks[:-1], target_tokens=[toks[p] for p, _ in targets],
        target_ids=torch.tensor([y for _, y in targets]), target_positions=[p for p, _ in targets], method=method,
        objective=objective, text=text, contrast="" if foil is None else m.tokenizer.decode([foil]),
        f_value=f.float(), completeness=None if comp is None else comp.float(), settings=settings,
        model_name=m.name, input_ids=full, baseline=kind, baseline_embeds=embeds,
        f_baseline=None if fbase is None or method != "integrated_gradients" else fbase.float())


def _hellinger(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1))


def _masked_distance(m, ek, p_full, prob_keep, n_samples, g, batch_size: int | str = "auto") -> torch.Tensor:
    """Mean Hellinger distance to ``p_full`` with embeddings kept with probability ``prob_keep`` ``[P]`` (or one row
    per sample, ``[n_samples, P]``); the masked rows run ``batch_size`` per forward."""
    pk = prob_keep[None] if prob_keep.dim() == 1 else prob_keep
    mask = (torch.rand(n_samples, ek.shape[0], generator=g) < pk).to(ek.dtype).to(ek.device)
    lg = _by_rows(m, ek[None] * mask[..., None], lambda x: _last_logits(m, x), batch_size).float()
    return _hellinger(p_full[None], torch.softmax(lg, -1)).mean()


def faithfulness(m: LensModel, result: AttributionResult, *, n_samples: int = 20, seed: int = 0,
                 max_k: int | None = None, random: str = "permute", batch_size: int | str = "auto") -> dict:
    """Soft sufficiency / comprehensiveness (Zhao & Aletras 2023) and hard top-k deletion curves.

    Embeddings are multiplied by Bernoulli keep-masks with keep probability s_i (sufficiency) or 1 − s_i
    (comprehensiveness), s = scores min-max normalised per target. D = Hellinger distance between the full
    next-token distributions, normalised by D(full, all-masked):
    sufficiency = 1 − D(p, p_keep)/D(p, p_null) (higher = better), comprehensiveness = D(p, p_drop)/D(p, p_null).
    Each is also given as a ratio to a seeded random control. ``random="permute"`` (default) shuffles the method's
    own normalised scores over the positions (a fresh permutation per mask sample), so the control keeps exactly
    as many tokens in expectation
    (Σ keep probabilities equal, reported as ``kept``/``kept_random``) and differs only in *which* tokens;
    ``random="uniform"`` (the old control: U(0, 1) scores, about half the tokens kept) stays available.
    Deletion: F after zeroing the top-k tokens. Masked and deleted variants run ``batch_size`` per forward
    (``"auto"``: a token budget, halved on out-of-memory with identical results); the model runs from edited
    input embeddings, so this needs the ``"hf"`` backend.

    Returns a dict with per-target arrays and their means.
    """
    _require_hf(m, "faithfulness", "runs the model from masked input embeddings")
    g = torch.Generator().manual_seed(seed)
    ids = result.input_ids
    e = _embed(m, ids).detach()
    if random not in ("permute", "uniform"):
        raise InputError("random must be 'permute' or 'uniform'.")
    out = {k: [] for k in ("sufficiency", "comprehensiveness", "sufficiency_random", "comprehensiveness_random",
                           "kept", "kept_random")}
    curves = []
    with torch.no_grad():
        for k, P in enumerate(result.target_positions):
            ek = e[:P]
            s = result.scores[k, :P].nan_to_num(0)
            s = (s - s.min()) / (s.max() - s.min()).clamp_min(1e-12)
            p_full = torch.softmax(_last_logits(m, ek[None])[0].float(), -1)
            p_null = torch.softmax(_last_logits(m, torch.zeros_like(ek)[None])[0].float(), -1)
            d_null = _hellinger(p_full, p_null).clamp_min(1e-9)

            if random == "permute":  # a fresh permutation of the method's scores for every mask sample
                rnd = torch.stack([s[torch.randperm(P, generator=g)] for _ in range(n_samples)])
            else:
                rnd = torch.rand(P, generator=g)
            out["kept"].append(float(s.sum()))
            out["kept_random"].append(float(rnd.sum(-1).mean()))
            for key, keep in (("sufficiency", s), ("comprehensiveness", 1 - s), ("sufficiency_random", rnd),
                              ("comprehensiveness_random", 1 - rnd)):
                d = _masked_distance(m, ek, p_full, keep, n_samples, g, batch_size=batch_size) / d_null
                out[key].append(float(1 - d if key.startswith("sufficiency") else d))
            order = s.argsort(descending=True)
            K = min(P, max_k or P)
            batch = ek[None].repeat(K + 1, 1, 1)
            for j in range(1, K + 1):
                batch[j, order[:j]] = 0
            y = torch.full((K + 1,), int(result.target_ids[k]), device=ek.device)
            f = _objective(_by_rows(m, batch, lambda x: _last_logits(m, x), batch_size), y, None, "logprob")
            curves.append(f.float().cpu().numpy())
    res = {k: np.array(v) for k, v in out.items()}
    for k in list(res):
        res[k + "_mean"] = float(res[k].mean())
    res["sufficiency_ratio"] = res["sufficiency_mean"] / max(res["sufficiency_random_mean"], 1e-9)
    res["comprehensiveness_ratio"] = res["comprehensiveness_mean"] / max(res["comprehensiveness_random_mean"], 1e-9)
    res["deletion_curves"] = curves
    return res

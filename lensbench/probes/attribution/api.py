"""``attribute``: resolve the targets, route the options to the chosen method object, run it, build the result."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from tqdm.auto import tqdm

from ... import engine
from ...errors import InputError, LensbenchError
from ...model import LensModel
from ...validation import Interval, Options, caller_stacklevel, check_params, validate_params
from ._passes import _last_logits
from .baselines import GAP_TOLERANCE
from .registry import AttributionMethod, Call, get_method, method_class
from .result import AttributionResult, CompletenessWarning

_ATTRIBUTE_PARAMS = {
    "generate": [Interval(int, 0, None)],
    "objective": [Options({"logprob", "logit", "prob"})],
    "seed": [int],
    "upcast": [bool],
    "add_bos": [None, bool],
    "progress": [bool],
}


def _backend_greedy(m: LensModel, ids: torch.Tensor, n: int) -> list[int]:
    """Greedy continuation (up to ``n`` tokens, the end-of-sequence token kept) of ``ids`` ``[T]`` through a non-hf
    backend: one full forward per token (no cache), as :func:`lensbench.engine.greedy` decodes on the hf one."""
    from ...engine.generate import _eos_ids
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
    """The full token ids ``[T]`` (prompt, then any generation) and the targets ``[(position, token id)]``."""
    ids = m.encode(text, add_bos=add_bos)
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


def _method_from(method: str | AttributionMethod, options: dict[str, Any]) -> AttributionMethod:
    """The method object for ``method`` with ``options``; old option names warn and are checked under the name
    the caller used."""
    cls = type(method) if isinstance(method, AttributionMethod) else method_class(method)
    options = dict(options)
    for old, new in cls.renamed.items():
        if old not in options:
            continue
        if new in options:
            raise InputError(f"attribute: pass {new}= only ({old}= is its old name).")
        value = options.pop(old)
        if new in cls.parameter_constraints:
            check_params({old: cls.parameter_constraints[new]}, {old: value}, caller=f"attribute(method={cls.name!r})")
        warnings.warn(f"attribute: {old}= is renamed {new}= (since lensbench 0.2); the old name will be removed.",
                      FutureWarning, stacklevel=caller_stacklevel())
        options[new] = value
    return get_method(method, caller="attribute", **options)


@validate_params(_ATTRIBUTE_PARAMS)
def attribute(m: LensModel, text: str, *, target: str | int | None = None,
              method: str | AttributionMethod = "integrated_gradients", contrast: str | int | None = None,
              generate: int = 0, objective: str = "logprob", seed: int = 0, upcast: bool = True,
              add_bos: bool | None = None, progress: bool = True, **options) -> AttributionResult:
    """Attribute a target token (or each token of a greedy generation) to the tokens before it.

    F is the target's log-probability by default (``objective="logit"``/``"prob"`` too); with ``contrast=foil``
    it is logit(y) − logit(foil) (Yin & Neubig 2022).

    Args:
        text: the prompt.
        target: token to explain (string like ``" Paris"`` or id); default: the model's greedy next token.
        method: a registered name (``lensbench.probes.attribution.METHODS``) or an
            :class:`~lensbench.probes.attribution.AttributionMethod` object: ``saliency``, ``grad_x_input``,
            ``integrated_gradients`` (default), ``occlusion``, ``attention`` (last layer, head mean), ``rollout``
            (attention rollout), ``value_norm`` (Kobayashi et al. 2020, last layer; models with separate
            value/output projections), ``reagent``.
        contrast: a foil token: F = logit(y) − logit(foil) (``objective="prob"``: p(y) − p(foil)).
        generate: N > 0 generates N tokens greedily and attributes each to every token before it.
        objective: ``"logprob"`` (default), ``"logit"`` or ``"prob"`` of the target.
        seed: seeds the random draws of stochastic methods (ReAGent).
        upcast: run gradient methods in float32 (through float32 copies of the weights; the model itself is never
            re-cast). ``settings["upcast"]`` records whether it was active (False for a float32 model, for
            offloaded weights and for the other methods).
        progress: a progress bar.
        **options: the chosen method's options, e.g. ``n_steps=``, ``baseline=``, ``batch_size=`` for
            :class:`~lensbench.probes.attribution.IntegratedGradients`; ``baseline=``, ``batch_size=`` for
            :class:`~lensbench.probes.attribution.Occlusion`; ``ratio=``, ``stopping_top_k=``, ``keep_top_n=``,
            ``max_steps=``, ``n_probes=``, ``replacement=``, ``mlm=``, ``on_unconverged=``, ``batch_size=`` for
            :class:`~lensbench.probes.attribution.ReAGent` (with a method object they replace its own). An option
            the method does not take is an error naming both. Old names: ``internal_batch_size`` (IG's
            ``batch_size``), ``top_k`` (ReAGent's ``stopping_top_k``).

    Every integrated-gradients result records ``baseline`` (kind), ``baseline_embeds`` (the exact x'),
    ``f_baseline`` (F(x')), ``completeness`` and ``relative_gap``, and warns (:class:`CompletenessWarning`) when
    |gap| > 5% of |F(x) − F(x')|.

    Backends: gradient methods, occlusion (both run from edited input embeddings) and the attention methods
    (attention weights of the eager kernel) need the ``"hf"`` backend and raise a clear :class:`InputError`
    otherwise; ReAGent runs from token ids through the model's backend (nnsight, TransformerLens).
    """
    meth = _method_from(method, options)
    name = meth.name
    call = Call(foil=None, objective=objective, contrast=contrast is not None, seed=seed, progress=progress,
                upcast=upcast)
    meth.check(m, call)  # before any model pass
    full, targets = _resolve_targets(m, text, target, int(generate), add_bos)
    foil = None if contrast is None else m.token_id(contrast, param="contrast")
    if foil is not None and any(y == foil for _, y in targets):
        raise InputError("contrast is the same token as the target; pick a different foil.")
    call = dataclasses.replace(call, foil=foil)
    bar = tqdm(total=1, desc=f"attribute ({name})", disable=not progress, leave=False)
    out = meth.run(m, full, targets, call)
    bar.update(1)
    bar.close()
    scores, f = out.scores, out.f
    valid = [scores[k, :p] for k, (p, _) in enumerate(targets)]  # later sources are NaN by design (generation)
    if not torch.isfinite(f).all() or not all(bool(torch.isfinite(v).all()) for v in valid):
        raise LensbenchError(
            f"non-finite {name} scores (NaN/inf in the model's activations, e.g. a bfloat16/float16 overflow); "
            "reload the model with dtype='float32'.")
    toks = m.to_str_tokens(full)
    kind = meth.baseline_kind() if meth.uses_baseline else ""
    settings = {**meth.settings(), "baseline": kind, "generate": int(generate), "upcast": out.upcast,
                **out.settings}
    embeds = fbase = None
    if out.baseline_embeds is not None:
        embeds = torch.full((len(targets), len(full) - 1, out.baseline_embeds[0].shape[-1]), float("nan"))
        for k, b in enumerate(out.baseline_embeds):
            embeds[k, : len(b)] = b.float()
    if out.f_baseline is not None:
        fbase = out.f_baseline.float()
        rel = (out.completeness / (f - out.f_baseline).abs().clamp_min(1e-12)).abs()
        if bool((rel > GAP_TOLERANCE).any()):
            warnings.warn(f"integrated gradients ({kind} baseline, n_steps={settings.get('n_steps')}): completeness "
                          f"gap up to {float(rel.max()):.1%} of |F(x) − F(x')| (> {GAP_TOLERANCE:.0%}); the "
                          "attributions are not converged: raise n_steps or try another baseline.",
                          CompletenessWarning, stacklevel=caller_stacklevel())
    return AttributionResult(
        scores=scores.float(), source_tokens=toks[:-1], target_tokens=[toks[p] for p, _ in targets],
        target_ids=torch.tensor([y for _, y in targets]), target_positions=[p for p, _ in targets], method=name,
        objective=objective, text=text, contrast="" if foil is None else m.tokenizer.decode([foil]),
        f_value=f.float(), completeness=None if out.completeness is None else out.completeness.float(),
        settings=settings, model_name=m.name, input_ids=full, baseline=kind, baseline_embeds=embeds,
        f_baseline=fbase)

"""A proposed drop-in replacement for ``lensbench.probes.lens._lens_stats`` (same signature and outputs).

Not used by lensbench; ``bench/try_fast.py`` monkeypatches it in to measure the effect. Changes vs the current
implementation (each measured in bench/RESULTS.md, section "Investigation"):

1. One unembedding matmul for several layers at once: the residuals of ``group`` layers for the same chunk of
   positions are stacked, so the matmul has >= ~128 rows. With 42 rows per matmul (the 8 MiB default chunk) the
   49152 x 576 unembedding (113 MB) is re-read from memory for every 42 rows; the matmul costs ~1.5x what it
   costs with >= 128 rows.  Statistics are still computed per 42-row block, which stays in the CPU cache.
2. ``torch.log_softmax`` (one fused kernel) instead of ``torch.logsumexp`` + subtraction (logsumexp is a
   composite on CPU: amax, sub, exp, sum, log, add, plus abs/eq/ne/masked_fill for infinities: 2x the time).
3. No full ``torch.isfinite(lp).all()`` pass per block: the log-partition is non-finite iff a logit is NaN/+inf,
   so checking the ``[c]`` vector is enough (and does not reject legitimate -inf logits).
4. (Rejected: entropy / KL cross term as ``bmm`` dot products — 2x faster than ``(p * lp).sum(-1)`` but its
   float32 accumulation gave KL errors of 2e-2 nats; the current ``mul + sum`` is kept.)
5. Target rank summed in int32 (``sum(dtype=torch.int32)``): the default int64 sum of a bool tensor converts
   every element.
6. The final layer's log-partition in float64 (one layer, cheap): a normalisation error delta of the final
   distribution multiplies the KL (error ~ delta * KL, 5e-3 nats at KL = 229 on layer 0 in float32).
7. The final layer (layer L) is unembedded in the first grouped matmul of each chunk, and the capture's forward
   pass is asked for the last position's logits only (``logits_to_keep=1``; ``installed()`` patches the hf
   backend for the benchmark): the forward's own [T, V] logits (100 MB at T=512, one full unembedding) were
   computed and held during the statistics but never used.  Alternative: ``final_logits=`` reuses them.
"""

from __future__ import annotations

import torch

from lensbench.errors import LensbenchError
from lensbench.probes.lens import STATS


def _bdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of two [c, V] tensors. (``torch.bmm`` would avoid the [c, V] temporary and is ~2x
    faster, but BLAS accumulates the 49152 terms far less accurately than torch's pairwise ``sum``: KL errors
    of 2e-2 nats at KL ~ 230 were measured, so it is NOT used.)"""
    return (a * b).sum(-1)


def lens_stats_fast(m, hidden, layers, ids, target, *, top_k, lens, apply_final_norm, chunk, keep_hidden=False,
                    final_logits: torch.Tensor | None = None, group_rows: int = 128):
    L = m.n_layers
    T = ids.shape[0]
    n = len(layers)
    dev = m.device
    ids = ids.to(dev)
    target = target.to(dev)
    nxt = torch.full((T,), -1, dtype=torch.long, device=dev)
    nxt[:-1] = ids[1:]
    out = {k: torch.empty(n, T, dtype=torch.float32) for k in STATS + ("logsumexp",)}
    top_ids = torch.empty(n, T, top_k, dtype=torch.long)
    top_probs = torch.empty(n, T, top_k, dtype=torch.float32)
    plain = lens is None and apply_final_norm          # layer L's readout is then the model's own logits
    jL = layers.index(L) if plain and L in layers else None
    # rows of the grouped matmuls: (j or None, layer); the final row goes first (KL needs it before the others)
    final_in_group = final_logits is None and plain
    spec = ([(jL, L)] if final_in_group else []) + [(j, la) for j, la in enumerate(layers) if j != jL]
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        c = e - s
        tgt, nx = target[s:e], nxt[s:e]
        has_t, has_n = tgt >= 0, nx >= 0
        tgt0, nx0 = tgt.clamp_min(0)[:, None], nx.clamp_min(0)[:, None]
        fin = {}

        def set_final(final_z):
            lse64 = torch.logsumexp(final_z.double(), -1)     # accurate normaliser: its error multiplies KL
            fin["lse"] = lse64.float()
            fin["lp"] = final_z - fin["lse"][:, None]
            fin["p"] = fin["lp"].exp()
            fin["neg_h"] = _bdot(fin["p"], fin["lp"])

        def stats(j, lp, lse):
            if not torch.isfinite(lse).all():
                raise LensbenchError(
                    f"non-finite log-probs at layer {layers[j]} (NaN/inf in the hidden states, e.g. a bfloat16/"
                    "float16 overflow); reload the model with dtype='float32'.")
            out["logsumexp"][j, s:e] = lse.cpu()
            p = lp.exp()
            out["entropy"][j, s:e] = (-_bdot(p, lp)).cpu()
            out["kl_to_final"][j, s:e] = (fin["neg_h"] - _bdot(fin["p"], lp)).clamp_min(0).cpu()
            tv, ti = lp.topk(top_k, -1)
            top_ids[j, s:e] = ti.cpu()
            top_probs[j, s:e] = tv.exp().cpu()
            out["top1_confidence"][j, s:e] = (-tv[:, 0]).cpu()
            t_lp = lp.gather(-1, tgt0)[:, 0]
            out["target_prob"][j, s:e] = torch.where(has_t, t_lp.exp(), torch.nan).cpu()
            rank = (lp > t_lp[:, None]).sum(-1, dtype=torch.int32).float()
            out["target_rank"][j, s:e] = torch.where(has_t, rank, torch.nan).cpu()
            n_lp = lp.gather(-1, nx0)[:, 0]
            out["ce_next"][j, s:e] = torch.where(has_n, -n_lp, torch.nan).cpu()

        if final_logits is not None:
            set_final(final_logits[s:e].float())
        elif not plain:   # lens / no final norm: the reference distribution is still the model's own output
            set_final(m.unembed(hidden[L][s:e]))
        if jL is not None and not final_in_group:
            stats(jL, fin["lp"], fin["lse"])
        g = max(1, group_rows // c)
        for g0 in range(0, len(spec), g):
            part = spec[g0: g0 + g]
            hs = []
            for j, la in part:
                h = hidden[la][s:e]
                hs.append(lens.apply(h, la) if lens is not None else h)
            Z = m.unembed(torch.cat(hs), apply_final_norm=apply_final_norm)   # [len(part) * c, V]
            for i, (j, la) in enumerate(part):
                z = Z[i * c:(i + 1) * c]
                if final_in_group and g0 == 0 and i == 0:
                    set_final(z)
                    stats(j, fin["lp"], fin["lse"])
                    continue
                lp = torch.log_softmax(z, -1)
                stats(j, lp, z[:, 0] - lp[:, 0])
            del Z
    out["top_ids"] = top_ids
    out["top_probs"] = top_probs
    if keep_hidden:
        out["hidden"] = torch.stack([(lens.apply(hidden[la], la) if lens is not None else hidden[la]).float().cpu()
                                     for la in layers])
    return out


# ---------------------------------------------------------------------------------------------- patching
import contextlib  # noqa: E402


@contextlib.contextmanager
def installed(*, reuse_final: bool = False, logits_to_keep: bool = True, group_rows: int = 256):
    """Temporarily make ``lb.logit_lens`` use :func:`lens_stats_fast` (benchmarks only).

    ``logits_to_keep``: the capture's forward pass computes the logits of the last position only
    (``logits_to_keep=1``, accepted by most ``…ForCausalLM``): the [T, V] logits (100 MB at T=512) and one
    unembedding matmul are not computed, the final layer is computed in the grouped matmuls instead.
    ``reuse_final``: instead, pass the batch's own logits as the final layer's (batches of one text only)."""
    import lensbench.backends.hf as hf_backend
    import lensbench.probes.lens as lens_mod

    orig_stats, orig_capture, orig_run = lens_mod._lens_stats, lens_mod.capture, hf_backend.run
    if logits_to_keep:
        reuse_final = False

    def run(m, input_ids, mask, layers, padding_side="right"):
        with m.hooks(layers) as store:
            out = m.forward(input_ids, mask, logits_to_keep=1)
        return dict(store), None
    current = {}

    def capture(m, texts, *args, reduce=None, **kw):
        def wrapped(batch):
            current["batch"] = batch
            try:
                return reduce(batch)
            finally:
                current.pop("batch", None)
        return orig_capture(m, texts, *args, reduce=wrapped if reduce is not None else None, **kw)

    def stats(m, hidden, layers, ids, target, **kw):
        batch = current.get("batch")
        final = None
        if reuse_final and batch is not None and batch.logits is not None and len(batch.indices) == 1:
            final = batch.logits[0, batch.span(0)]
        return lens_stats_fast(m, hidden, layers, ids, target, final_logits=final, group_rows=group_rows, **kw)

    lens_mod._lens_stats, lens_mod.capture = stats, capture
    if logits_to_keep:
        hf_backend.run = run
    try:
        yield
    finally:
        lens_mod._lens_stats, lens_mod.capture, hf_backend.run = orig_stats, orig_capture, orig_run

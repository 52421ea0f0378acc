"""Logit lens and tuned lens: what each layer would predict next, per token.

z_t^l = U · N(T_l(h_t^l)) with N the final norm, U the unembedding (+ soft-cap/scale), and T_l the identity
(logit lens) or a learned affine translator (tuned lens, Belrose et al. 2023). Statistics are computed in
float32 from log-softmax, per chunk of positions on the model's device, so memory is O(L·T·k), never O(L·T·V).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cache import ItemCache
from ..capture import CaptureBatch, capture, tokenize, windows
from ..errors import InputError, LensbenchError
from ..model import LensModel
from ..results import Result, load_tensors, save_tensors

STATS = ("entropy", "kl_to_final", "ce_next", "top1_confidence", "target_prob", "target_rank")
STAT_LABELS = {
    "entropy": "entropy H(p_l) [nats]",
    "kl_to_final": "KL(p_L || p_l) [nats]",
    "ce_next": "cross-entropy vs next token [nats]",
    "top1_confidence": "-log max p_l [nats]",
    "target_prob": "target probability",
    "target_rank": "target rank (0 = top)",
    "top1_prob": "top-1 probability",
}


# --------------------------------------------------------------------------------------------- tuned lens
class TunedLens:
    """One affine translator per layer: ``T_l(h) = h @ A_l^T + b_l`` for l < L; identity at l = L.

    Attributes:
        A: ``[L, d, d]`` float32; b: ``[L, d]`` float32; model_name: the model it was trained on.
        history: training losses (mean KL over sampled layers per step).
    """

    def __init__(self, A: torch.Tensor, b: torch.Tensor, model_name: str = "", history: list | None = None,
                 settings: dict | None = None):
        self.A, self.b, self.model_name = A, b, model_name
        self.history = list(history or [])
        self.settings = dict(settings or {})

    @property
    def n_layers(self) -> int:
        return int(self.A.shape[0])

    @classmethod
    def identity(cls, m: LensModel) -> TunedLens:
        d, L = m.d_model, m.n_layers
        return cls(torch.eye(d).repeat(L, 1, 1), torch.zeros(L, d), m.name)

    def apply(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Translate residual ``h`` ([..., d]) of ``layer``; float32 maths, returns h's dtype."""
        if layer >= self.n_layers:
            return h
        A = self.A[layer].to(h.device)
        b = self.b[layer].to(h.device)
        return (h.float() @ A.T + b).to(h.dtype)

    def check(self, m: LensModel) -> None:
        if self.n_layers != m.n_layers or self.A.shape[-1] != m.d_model:
            raise InputError(f"lens= was trained for L={self.n_layers}, d={self.A.shape[-1]} but the model has "
                             f"L={m.n_layers}, d={m.d_model}; train one for this model with lb.train_tuned_lens.")

    def save(self, path) -> Path:
        return save_tensors(path, {"A": self.A, "b": self.b},
                            {"kind": "TunedLens", "model_name": self.model_name, "history": self.history,
                             "settings": self.settings})

    @classmethod
    def load(cls, path) -> TunedLens:
        t, meta = load_tensors(path)
        if meta.get("kind") != "TunedLens":
            raise LensbenchError(f"{path} is not a saved TunedLens")
        return cls(t["A"], t["b"], meta.get("model_name", ""), meta.get("history"), meta.get("settings"))

    def __repr__(self) -> str:
        return f"TunedLens(L={self.n_layers}, d={self.A.shape[-1]}, model={self.model_name!r})"


def _lens_name(lens) -> str:
    return "logit" if lens is None else "tuned"


# --------------------------------------------------------------------------------------------- core reduction
def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of two ``[c, V]`` tensors with torch's pairwise ``sum`` (a BLAS ``bmm`` is ~2x faster
    but accumulates 49k terms far less accurately: KL errors of 2e-2 nats at KL ~ 230 were measured)."""
    return (a * b).sum(-1)


def _lens_stats(m: LensModel, hidden: dict[int, torch.Tensor], layers: list[int], ids: torch.Tensor,
                target: torch.Tensor, *, top_k: int, lens: TunedLens | None, apply_final_norm: bool,
                chunk: int, keep_hidden: bool = False, group_rows: int = 256) -> dict[str, torch.Tensor]:
    """Per-layer, per-position statistics for one text. ``hidden[l]``: ``[T, d]`` on device.

    ``target``: ``[T]`` token ids (-1 = none). Returns CPU tensors ``[n_layers, T(, k)]``.
    Positions go in chunks of ``chunk``; the residuals of several layers for one chunk are unembedded in one
    matmul of about ``group_rows`` rows (a 42-row matmul re-reads the whole unembedding for few rows), and the
    statistics are then computed per ``[chunk, V]`` block (cache-sized). The final layer's log-partition is
    computed in float64: its error multiplies the KL.
    """
    L = m.n_layers
    T = ids.shape[0]
    n = len(layers)
    dev = m.device
    ids = ids.to(dev)
    target = target.to(dev)
    nxt = torch.full((T,), -1, dtype=torch.long, device=dev)
    nxt[:-1] = ids[1:]
    # results stay on the device until the end: one transfer per text, no host sync per layer and chunk
    out = {k: torch.empty(n, T, dtype=torch.float32, device=dev) for k in STATS + ("logsumexp",)}
    top_ids = torch.empty(n, T, top_k, dtype=torch.long, device=dev)
    top_probs = torch.empty(n, T, top_k, dtype=torch.float32, device=dev)
    plain = lens is None and apply_final_norm          # layer L's readout is then the model's own logits
    jL = layers.index(L) if plain and L in layers else None
    # rows of the grouped matmuls as (index in `layers` or None, layer); the final layer first (KL needs it)
    spec = ([(jL, L)] if plain else []) + [(j, la) for j, la in enumerate(layers) if not (plain and la == L)]
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        c = e - s
        tgt, nx = target[s:e], nxt[s:e]
        has_t, has_n = tgt >= 0, nx >= 0
        tgt0, nx0 = tgt.clamp_min(0)[:, None], nx.clamp_min(0)[:, None]
        fin: dict[str, torch.Tensor] = {}

        def set_final(final_z: torch.Tensor, fin=fin) -> None:
            fin["lse"] = torch.logsumexp(final_z.double(), -1).float()
            fin["lp"] = final_z - fin["lse"][:, None]
            fin["p"] = fin["lp"].exp()
            fin["neg_h"] = _rowdot(fin["p"], fin["lp"])

        def stats(j: int, lp: torch.Tensor, lse: torch.Tensor, s=s, e=e, fin=fin, tgt0=tgt0, nx0=nx0,
                  has_t=has_t, has_n=has_n) -> None:
            if not torch.isfinite(lse).all():  # the log-partition is non-finite iff a logit is NaN / +inf
                raise LensbenchError(
                    f"non-finite log-probs at layer {layers[j]} (NaN/inf in the hidden states, e.g. a bfloat16/"
                    "float16 overflow); reload the model with dtype='float32'.")
            out["logsumexp"][j, s:e] = lse
            p = lp.exp()
            out["entropy"][j, s:e] = -_rowdot(p, lp)
            del p
            out["kl_to_final"][j, s:e] = (fin["neg_h"] - _rowdot(fin["p"], lp)).clamp_min(0)
            tv, ti = lp.topk(top_k, -1)
            top_ids[j, s:e] = ti
            top_probs[j, s:e] = tv.exp()
            out["top1_confidence"][j, s:e] = -tv[:, 0]
            t_lp = lp.gather(-1, tgt0)[:, 0]
            out["target_prob"][j, s:e] = torch.where(has_t, t_lp.exp(), torch.nan)
            rank = (lp > t_lp[:, None]).sum(-1, dtype=torch.int32).float()
            out["target_rank"][j, s:e] = torch.where(has_t, rank, torch.nan)
            n_lp = lp.gather(-1, nx0)[:, 0]
            out["ce_next"][j, s:e] = torch.where(has_n, -n_lp, torch.nan)

        if not plain:  # a tuned lens / no final norm: the reference is still the model's own output
            set_final(m.unembed(hidden[L][s:e]))
        g = max(1, group_rows // c)
        for g0 in range(0, len(spec), g):
            part = spec[g0: g0 + g]
            hs = [lens.apply(hidden[la][s:e], la) if lens is not None else hidden[la][s:e] for _, la in part]
            if plain and g0 == 0:  # the final layer's row block is the model's own output: no translator
                hs[0] = hidden[L][s:e]
            Z = m.unembed(torch.cat(hs), apply_final_norm=apply_final_norm)   # [len(part) * c, V] float32
            for i, (j, _la) in enumerate(part):
                z = Z[i * c:(i + 1) * c]
                if plain and g0 == 0 and i == 0:
                    set_final(z)
                    if j is not None:
                        stats(j, fin["lp"], fin["lse"])
                    continue
                lp = torch.log_softmax(z, -1)
                stats(j, lp, z[:, 0] - lp[:, 0])
            del Z
    out = {k: v.cpu() for k, v in out.items()}
    out["top_ids"] = top_ids.cpu()
    out["top_probs"] = top_probs.cpu()
    if keep_hidden:
        out["hidden"] = torch.stack([(lens.apply(hidden[la], la) if lens is not None else hidden[la]).float().cpu()
                                     for la in layers])
    return out


def _chunk_for(m: LensModel, chunk_bytes: int) -> int:
    return max(1, int(chunk_bytes // (4 * m.vocab_size)))


def _targets(m: LensModel, ids: torch.Tensor, target) -> tuple[torch.Tensor, str]:
    if target is None:
        t = torch.full_like(ids, -1)
        t[:-1] = ids[1:]
        return t, "next token"
    tid = m.token_id(target, param="target")
    return torch.full_like(ids, tid), m.tokenizer.decode([tid])


# --------------------------------------------------------------------------------------------- result
@dataclasses.dataclass(eq=False)
class LensResult(Result):
    """Logit/tuned lens of one text.

    Attributes:
        text, tokens: the input and its token strings (length T); input_ids ``[T]``.
        layers: layers shown (0 = embeddings … L = last block).
        top_ids, top_probs: ``[n_layers, T, k]``.
        entropy, kl_to_final, ce_next, top1_confidence, target_prob, target_rank: ``[n_layers, T]`` float32
            (``ce_next`` is NaN at the last position; target stats NaN where there is no target).
        target: the target description ("next token" or the token typed); target_ids ``[T]`` (-1 = none).
        vocab: token id -> string for every id that appears in ``top_ids`` / ``target_ids``.
        lens: "logit" or "tuned"; model_name; apply_final_norm.
        logsumexp: ``[n_layers, T]`` log-partition of each readout (so any token's probability is
            ``exp(z_token - logsumexp)``).
        hidden: ``[n_layers, T, d_model]`` the (translated) residuals when ``keep_hidden=True``, else None.
    """

    text: str
    tokens: list
    input_ids: torch.Tensor
    layers: list
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    entropy: torch.Tensor
    kl_to_final: torch.Tensor
    ce_next: torch.Tensor
    top1_confidence: torch.Tensor
    target_prob: torch.Tensor
    target_rank: torch.Tensor
    target_ids: torch.Tensor
    target: str = "next token"
    vocab: dict = dataclasses.field(default_factory=dict)
    lens: str = "logit"
    model_name: str = ""
    apply_final_norm: bool = True
    logsumexp: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    def retarget(self, m: LensModel, target: str | int | None, *, chunk_bytes: int = 8 * 2**20) -> LensResult:
        """Same result with target probability/rank for another token, without a model forward pass.

        Needs ``keep_hidden=True`` at :func:`logit_lens` time; only the unembedding of the kept (translated)
        residuals is recomputed, in chunks. ``target=None`` goes back to the actual next token.
        """
        if self.hidden is None:
            raise InputError("retarget needs the residuals: call logit_lens(..., keep_hidden=True).")
        tgt, tname = _targets(m, self.input_ids, target)
        n, T = self.entropy.shape
        prob = torch.full((n, T), torch.nan)
        rank = torch.full((n, T), torch.nan)
        rows = self.hidden.reshape(n * T, -1)
        t_all = tgt.repeat(n)
        chunk = _chunk_for(m, chunk_bytes)
        with torch.no_grad():
            for sl in range(0, n * T, chunk):
                e = min(n * T, sl + chunk)
                z = m.unembed(rows[sl:e].to(m.device), apply_final_norm=self.apply_final_norm)
                t = t_all[sl:e].to(z.device)
                ok = t >= 0
                zt = z.gather(-1, t.clamp_min(0)[:, None])[:, 0]
                lp = zt - torch.logsumexp(z, -1)
                prob.view(-1)[sl:e] = torch.where(ok, lp.exp(), torch.nan).cpu()
                rank.view(-1)[sl:e] = torch.where(ok, (z > zt[:, None]).sum(-1).float(), torch.nan).cpu()
        vocab = dict(self.vocab)
        for u in torch.unique(tgt[tgt >= 0]).tolist():
            vocab.setdefault(int(u), m.tokenizer.decode([int(u)]))
        return dataclasses.replace(self, target_prob=prob, target_rank=rank, target_ids=tgt, target=tname,
                                   vocab=vocab)

    def stat(self, name: str) -> torch.Tensor:
        """``[n_layers, T]`` statistic by name (also ``top1_prob``)."""
        if name == "top1_prob":
            return self.top_probs[..., 0]
        if name not in STATS:
            raise InputError(f"stat={name!r} is unknown; choose one of {STATS + ('top1_prob',)}.")
        return getattr(self, name)

    def top_tokens(self, k: int = 1) -> list[list[list[str]]]:
        """Token strings of the top-``k`` predictions: ``[n_layers][T][k]``."""
        ids = self.top_ids[..., :k].tolist()
        return [[[self.vocab.get(i, f"<{i}>") for i in pos] for pos in row] for row in ids]

    def to_dataframe(self):
        """Long table: one row per (layer, position) with every statistic and the top-1 token."""
        import pandas as pd
        n, T = self.entropy.shape
        top1 = self.top_tokens(1)
        rows = {
            "layer": np.repeat(self.layers, T),
            "position": np.tile(np.arange(T), n),
            "token": self.tokens * n,
            "top1": [top1[i][t][0] for i in range(n) for t in range(T)],
            "top1_prob": self.top_probs[..., 0].reshape(-1).numpy(),
        }
        for s in STATS:
            rows[s] = getattr(self, s).reshape(-1).numpy()
        return pd.DataFrame(rows)

    def figure(self, stat: str = "top1_prob", **kw):
        """Plotly heatmap (layers × positions) coloured by ``stat``, cells labelled with top-1 tokens."""
        from ..plots import lens_heatmap
        return lens_heatmap(self, stat=stat, **kw)

    def _repr_html_(self) -> str:
        import html
        top1 = self.top_tokens(1)
        head = "".join(f"<th>{html.escape(t)}</th>" for t in self.tokens[:16])
        rows = "".join(
            f"<tr><th>{la}</th>" + "".join(f"<td>{html.escape(top1[i][t][0])}</td>" for t in range(min(16, len(self.tokens))))
            + "</tr>" for i, la in list(enumerate(self.layers))[::-1][:12])
        return (f"<b>LensResult</b> ({self.lens} lens, {html.escape(self.model_name)}): {len(self.layers)} layers × "
                f"{len(self.tokens)} tokens, top-1 per cell (last layers first); <code>.figure()</code> plots it."
                f"<table><tr><th>layer</th>{head}</tr>{rows}</table>")


# --------------------------------------------------------------------------------------------- public API
def logit_lens(m: LensModel, text: str | Sequence[str], *, top_k: int = 10, target: str | int | None = None,
               layers: Sequence[int] | int | None = None, lens: TunedLens | None = None,
               apply_final_norm: bool = True, batch_size: int | str = "auto", add_bos: bool | None = None,
               truncate: bool = False, backend: str | None = None, chunk_bytes: int = 8 * 2**20,
               keep_hidden: bool = False, progress: bool = True) -> LensResult | list[LensResult]:
    """Logit lens (or tuned lens with ``lens=``) of one text, or of each text of a list.

    Args:
        text: a string (returns one :class:`LensResult`) or a list of strings (returns a list).
        top_k: number of top predictions kept per (layer, position); 1 <= top_k <= vocab size.
        target: token whose probability/rank is tracked (string like ``" Paris"`` or id); default: the actual
            next token at each position.
        layers: layers to show (default all, 0..L); negatives count from the end.
        lens: a :class:`TunedLens` from :func:`train_tuned_lens`; None = logit lens.
        apply_final_norm: apply the model's final norm before unembedding (default True).
        batch_size, add_bos, truncate, backend: passed to the capture engine.
        chunk_bytes: memory budget for one ``[positions, vocab]`` float32 block on the device.
        keep_hidden: keep the residuals in the result (CPU float32) so :meth:`LensResult.retarget` can
            recolour by any token without another forward pass (what the explorer widget does).

    Example:
        >>> res = lb.logit_lens(m, "The capital of France is", target=" Paris")
        >>> res.target_prob[-1, -1]    # = the model's own p(" Paris")
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= m.vocab_size:
        raise InputError(f"top_k must be an int in [1, {m.vocab_size}] (the vocabulary size), got {top_k!r}.")
    if lens is not None:
        if not isinstance(lens, TunedLens):
            raise InputError("lens must be None (logit lens) or a TunedLens from lb.train_tuned_lens().")
        lens.check(m)
    single = isinstance(text, (str, torch.Tensor))  # one string or one 1-D tensor of token ids
    shown = m.check_layers(layers)
    needed = sorted(set(shown) | {m.n_layers})
    chunk = _chunk_for(m, chunk_bytes)
    if target is not None:
        m.token_id(target, param="target")  # validate before any forward pass

    def reduce(batch: CaptureBatch) -> list:
        outs = []
        for b in range(len(batch.indices)):
            sp = batch.span(b)
            hidden = {la: batch.hidden[la][b, sp] for la in needed}
            ids = batch.ids_of(b).cpu()
            tgt, _ = _targets(m, ids, target)
            outs.append(_lens_stats(m, hidden, shown, ids, tgt, top_k=top_k, lens=lens,
                                    apply_final_norm=apply_final_norm, chunk=chunk, keep_hidden=keep_hidden))
        return outs

    cap = capture(m, text, layers=needed, reduce=reduce, batch_size=batch_size, progress=progress,
                  add_bos=add_bos, truncate=truncate, backend=backend, logits=False)
    results = []
    for i in range(len(cap)):
        st = cap.results[i]
        ids = cap.input_ids(i)
        tgt, tname = _targets(m, ids, target)
        uniq = torch.unique(torch.cat([st["top_ids"].reshape(-1), tgt[tgt >= 0]])).tolist()
        vocab = {int(u): m.tokenizer.decode([int(u)]) for u in uniq}
        results.append(LensResult(
            text=cap.texts[i], tokens=cap.tokens(i), input_ids=ids, layers=shown, top_ids=st["top_ids"],
            top_probs=st["top_probs"], entropy=st["entropy"], kl_to_final=st["kl_to_final"],
            ce_next=st["ce_next"], top1_confidence=st["top1_confidence"], target_prob=st["target_prob"],
            target_rank=st["target_rank"], target_ids=tgt, target=tname, vocab=vocab, lens=_lens_name(lens),
            model_name=m.name, apply_final_norm=apply_final_norm, logsumexp=st["logsumexp"],
            hidden=st.get("hidden")))
    return results[0] if single else results


# --------------------------------------------------------------------------------------------- dataset sweep
_HIST_MAX = {"entropy": None, "kl_to_final": 40.0, "ce_next": 40.0, "top1_confidence": 40.0, "target_prob": 1.0,
             "target_rank": None}
N_BINS = 2048


@dataclasses.dataclass(eq=False)
class LensSweepResult(Result):
    """Per-layer means and quantiles of lens statistics over a dataset.

    Attributes:
        layers: layers (0..L); stats: statistic names.
        mean: ``[n_stats, n_layers]``; quantiles: ``[n_stats, n_layers, n_q]`` at levels ``q``.
        hist: ``[n_stats, n_layers, N_BINS]`` counts over ``[0, hist_max[stat]]`` (quantiles come from these;
            error <= one bin width); n_tokens: tokens aggregated; n_texts; lens; model_name.
    """

    layers: list
    stats: list
    q: list
    mean: torch.Tensor
    quantiles: torch.Tensor
    hist: torch.Tensor
    hist_max: list
    n_tokens: int
    n_texts: int
    lens: str = "logit"
    model_name: str = ""

    def to_dataframe(self):
        import pandas as pd
        rows = []
        for si, s in enumerate(self.stats):
            for li, la in enumerate(self.layers):
                r = {"stat": s, "layer": la, "mean": float(self.mean[si, li])}
                for qi, qv in enumerate(self.q):
                    r[f"q{qv:g}"] = float(self.quantiles[si, li, qi])
                rows.append(r)
        return pd.DataFrame(rows)

    def figure(self, stat: str = "kl_to_final", **kw):
        from ..plots import sweep_figure
        return sweep_figure(self, stat=stat, **kw)


def _hist_max(m: LensModel) -> dict[str, float]:
    import math
    d = dict(_HIST_MAX)
    d["entropy"] = math.log(m.vocab_size)
    d["target_rank"] = float(m.vocab_size)
    return d


def lens_sweep(m: LensModel, texts, *, lens: TunedLens | None = None, q: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9),
               batch_size: int | str = "auto", max_tokens_per_text: int | None = 512, cache_dir: str | None = None,
               progress: bool = True, chunk_bytes: int = 8 * 2**20) -> LensSweepResult:
    """Per-layer mean and quantiles of every lens statistic over ``texts`` with bounded memory.

    Memory does not grow with the corpus: each text's statistics are folded into running sums and fixed-size
    histograms. With ``cache_dir`` each text's statistics are written to disk as it finishes, so an interrupted
    sweep resumes where it stopped and returns exactly what an uninterrupted one does.

    Args:
        texts: list of strings or a ``datasets.Dataset`` with a ``text`` column.
        max_tokens_per_text: only each text's first this-many tokens are used (keeps batches even);
            None = whole texts (each must fit the model's context).
        cache_dir: folder for per-text results (resume); None = no disk cache.
    """
    if isinstance(texts, str):
        texts = [texts]
    if max_tokens_per_text is not None:
        texts = windows(m, texts, max_tokens_per_text, max_windows_per_text=1)
    else:
        texts = tokenize(m, texts)[1]
    hmax = _hist_max(m)
    L = m.n_layers
    layers = list(range(L + 1))
    S = len(STATS)
    settings = {"lens": None if lens is None else float(lens.A.sum()), "maxtok": max_tokens_per_text}
    cache = ItemCache(cache_dir, kind="lens-sweep-text", required=STATS)
    sums = torch.zeros(S, L + 1, dtype=torch.float64)
    counts = torch.zeros(S, L + 1, dtype=torch.float64)
    hist = torch.zeros(S, L + 1, N_BINS, dtype=torch.float64)
    n_tokens = 0

    def fold(st: dict[str, torch.Tensor]) -> None:
        nonlocal n_tokens
        n_tokens += st["entropy"].shape[1]
        for si, s in enumerate(STATS):
            v = st[s].double()
            ok = torch.isfinite(v)
            sums[si] += torch.where(ok, v, 0).sum(1)
            counts[si] += ok.sum(1)
            b = (v / hmax[s] * N_BINS).floor().clamp(0, N_BINS - 1).long()
            b = torch.where(ok, b, N_BINS)  # overflow bin for NaN, dropped below
            for li in range(L + 1):
                hist[si, li] += torch.bincount(b[li], minlength=N_BINS + 1)[:N_BINS].double()

    todo = []
    for i, t in enumerate(texts):
        key = cache.key(m.name, m.n_layers, m.d_model, str(m.dtype), t.tolist(), settings)
        hit = cache.get(key)
        if hit is not None:
            fold(hit[0])
        else:
            todo.append((i, t, key))
    bar = tqdm(total=len(todo), desc="lens sweep", disable=not progress or len(todo) <= 1, leave=False)
    # process in groups so the cache is written as texts finish (resumable)
    group = 8
    for g in range(0, len(todo), group):
        part = todo[g: g + group]
        res = logit_lens(m, [t for _, t, _ in part], top_k=1, lens=lens, batch_size=batch_size, progress=False,
                         chunk_bytes=chunk_bytes)
        for (_, _, key), r in zip(part, res):
            st = {s: getattr(r, s) for s in STATS}
            cache.put(key, st)
            fold(st)
        bar.update(len(part))
    bar.close()
    mean = (sums / counts.clamp_min(1)).float()
    cdf = hist.cumsum(-1) / hist.sum(-1, keepdim=True).clamp_min(1)
    qs = torch.empty(S, L + 1, len(q))
    for qi, qv in enumerate(q):
        idx = (cdf < qv).sum(-1).clamp(max=N_BINS - 1)
        for si, s in enumerate(STATS):
            qs[si, :, qi] = (idx[si].double() + 0.5) / N_BINS * hmax[s]
    return LensSweepResult(layers=layers, stats=list(STATS), q=list(q), mean=mean, quantiles=qs, hist=hist.float(),
                           hist_max=[hmax[s] for s in STATS], n_tokens=n_tokens, n_texts=len(texts),
                           lens=_lens_name(lens), model_name=m.name)


# --------------------------------------------------------------------------------------------- training
def train_tuned_lens(m: LensModel, texts, *, steps: int = 100, lr: float = 1e-4, max_tokens: int = 4096,
                     batch_tokens: int = 64, layers_per_step: int = 4, init: str = "lstsq", ridge: float = 1e-2,
                     seed: int = 0, progress: bool = True) -> TunedLens:
    """Train a tuned lens: per-layer affine translators minimising KL(p_final || p_l), model frozen.

    Training is made cheap on a CPU by (1) initialising each translator by ridge least squares from
    ``h_l`` to the last block's output ``h_L`` (closed form on the captured tokens, ``init="lstsq"``; use
    ``"identity"`` for the paper's identity start), then (2) ``steps`` Adam steps on the exact KL objective,
    each on ``batch_tokens`` random positions of ``layers_per_step`` random layers.

    Args:
        texts: training texts (e.g. ``lb.sample_texts()``); at most ``max_tokens`` tokens are captured.
        steps: KL fine-tuning steps (0 = least squares only).
        lr: Adam learning rate.
        ridge: L2 penalty of the least-squares initialisation, relative to the mean squared activation.
        seed: seeds token/layer sampling.
    """
    if init not in ("lstsq", "identity"):
        raise InputError("init must be 'lstsq' or 'identity'.")
    if isinstance(texts, str):
        texts = [texts]
    L, d = m.n_layers, m.d_model
    g = torch.Generator().manual_seed(seed)
    # only capture about max_tokens tokens: seeded random windows, spread over the texts
    wins = windows(m, texts, min(256, m.max_length))
    order = torch.randperm(len(wins), generator=g).tolist()
    picked, total = [], 0
    for i in order:
        if total >= max_tokens:
            break
        picked.append(wins[i])
        total += len(wins[i])
    cap = capture(m, picked, layers=None, batch_size="auto", progress=progress)
    H = torch.cat([cap.hidden_states(i) for i in range(len(cap))], dim=1)  # [L+1, N, d] float32 CPU
    if H.shape[1] > max_tokens:
        keep = torch.randperm(H.shape[1], generator=g)[:max_tokens]
        H = H[:, keep]
    N = H.shape[1]
    if N < 8:
        raise InputError("texts give fewer than 8 tokens; pass more training text.")
    A = torch.eye(d).repeat(L, 1, 1)
    b = torch.zeros(L, d)
    if init == "lstsq":
        Y = H[L].double()
        for la in range(L):
            X = torch.cat([H[la].double(), torch.ones(N, 1, dtype=torch.float64)], 1)
            lam = ridge * float((X[:, :-1] ** 2).mean()) * N
            G = X.T @ X + lam * torch.eye(d + 1, dtype=torch.float64)
            W = torch.linalg.solve(G, X.T @ Y)              # [d+1, d]
            A[la] = W[:-1].T.float()
            b[la] = W[-1].float()
    A = A.requires_grad_(steps > 0)
    b = b.requires_grad_(steps > 0)
    history: list[float] = []
    if steps > 0:
        opt = torch.optim.Adam([A, b], lr=lr)
        frozen = [(p, p.requires_grad) for p in m.model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        bar = tqdm(range(steps), desc="tuned lens", disable=not progress, leave=False)
        for _ in bar:
            pos = torch.randint(0, N, (min(batch_tokens, N),), generator=g)
            lay = torch.randperm(L, generator=g)[:layers_per_step]
            with torch.no_grad():
                final_lp = torch.log_softmax(m.unembed(H[L, pos].to(m.device)), -1)
                final_p = final_lp.exp()
            opt.zero_grad()
            total = 0.0
            for la in lay.tolist():
                h = H[la, pos].to(m.device).float() @ A[la].to(m.device).T + b[la].to(m.device)
                lp = torch.log_softmax(m.unembed(h), -1)
                loss = (final_p * (final_lp - lp)).sum(-1).mean() / len(lay)
                loss.backward()
                total += float(loss.detach())
            opt.step()
            history.append(total)
            bar.set_postfix(kl=f"{total:.3f}")
        for p, flag in frozen:
            p.requires_grad_(flag)
    return TunedLens(A.detach(), b.detach(), m.name, history,
                     {"steps": steps, "lr": lr, "init": init, "tokens": N, "seed": seed})

"""Contextual memory (LLM-Microscope's contextualisation score): how much of the preceding text a single
token's hidden states let a small trained decoder reconstruct.

For token i with prefix w_{i-W}..w_{i-1} (at most ``window`` tokens, BOS excluded), a reconstruction head
reads only e_i — the token's residual at a few layers, each RMS-normalised, concatenated — and decodes the
prefix backwards (w_{i-1} first), teacher-forced with the model's own frozen token embeddings as inputs:

    C_i = −log P(w_{i-1}, …, w_{i-W} | e_i)      (nats; lower = more of the context is stored in token i)

reported as the sum over the prefix (``score``) and per reconstructed prefix token (``score_per_token``).
The head is a small MLP decoder (``hidden`` units; step t predicts w_{i-t} from e_i, t and the teacher-forced
w_{i-t+1}: an order-one autoregressive factorisation, so C_i is the code length under that decoder — an upper
bound on what a stronger decoder would need) with a softmax over the token types occurring in ``texts``
(a closed vocabulary: the scores are relative to it, which keeps training to minutes on a CPU). By default
scores are cross-fitted: texts are split into ``folds`` groups and every token is scored by a head that never
saw its text. Per token class (punctuation, stopwords — scikit-learn's ``ENGLISH_STOP_WORDS`` —, content
words, other) the mean per-token score gets a confidence interval from :func:`lensbench.stats.mean_ci` that
resamples **texts**, not tokens: tokens of one text share its prefixes (a window of W overlapping tokens), so
they are not independent, and a token-level bootstrap is far too narrow. Below 20 texts the interval is a
cluster-robust Student-t one (percentile bootstraps under-cover at small n), from 20 on a BCa bootstrap over
texts; every summary states the number of tokens and of texts behind each row.

Caveat (measured): on the default model with 12 windows of 512 tokens the head overfits — training loss 0.70
nats per prefix token vs 12.5 held out, above the uniform 7.6 — so held-out class differences are small and
mostly reflect unfamiliar prefixes. Use more text (or ``folds=1`` for in-sample scores, as a descriptive
measure) before reading the class ranking.

>>> res = lb.contextual_memory(m, lb.sample_texts(12), n_steps=300)
>>> res.summary()          # per class: n_tokens, n_texts, mean C per prefix token, 95% CI over texts
"""

from __future__ import annotations

import dataclasses
import math
import string
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .. import stats
from ..capture import Capture
from ..devices import offloaded_tensor
from ..errors import InputError
from ..model import LensModel
from ..plots.memory import memory_figure
from ..results import Result
from ..validation import Interval, Options, renamed_params, validate_params
from .geometry import EXCLUDE_BOS_RENAME, _skip

CLASSES = ("punctuation", "stopword", "content", "other")

#: the head's training settings, shared by :func:`fit_contextual_memory` and :func:`contextual_memory`
_HEAD_PARAMS = {
    "window": [Interval(int, 1, None)],
    "n_steps": [Interval(int, 1, None)],
    "lr": [Interval(float, 0, None, closed="neither")],
    "train_batch_size": [Interval(int, 1, None)],
    "hidden": [Interval(int, 1, None)],
    "folds": [Interval(int, 1, None)],
    "seed": [int],
    "progress": [bool],
}
#: old names of the head's settings
_HEAD_RENAMES = {"steps": "n_steps", "batch": "train_batch_size"}


def token_class(token: str) -> str:
    """"punctuation" (only punctuation characters), "stopword" (scikit-learn's English list, case-folded),
    "content" (other alphabetic tokens) or "other" (numbers, whitespace, mixed)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    t = token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n").strip()
    if not t:
        return "other"
    if all(ch in string.punctuation or ch in "“”‘’—–…«»" for ch in t):
        return "punctuation"
    if t.isalpha():
        return "stopword" if t.lower() in ENGLISH_STOP_WORDS else "content"
    return "other"


# --------------------------------------------------------------------------------------------- the head
class PrefixDecoder(nn.Module):
    """Reconstructs a token's prefix backwards from its features, all steps in parallel: step t predicts
    w_{i-t} from a projection of e_i, a learned embedding of t, and (teacher forcing, t > 1) the projected
    frozen model embedding of w_{i-t+1} — an autoregressive decoder of order one, through a two-layer MLP."""

    def __init__(self, d_feat: int, d_emb: int, n_vocab: int, window: int, hidden: int = 128):
        super().__init__()
        self.norm = nn.LayerNorm(d_feat, elementwise_affine=False)
        self.cond = nn.Linear(d_feat, hidden)
        self.inp = nn.Linear(d_emb, hidden, bias=False)
        self.step = nn.Parameter(torch.zeros(window, hidden))
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.out = nn.Linear(hidden, n_vocab)

    def forward(self, feats: torch.Tensor, prev_emb: torch.Tensor) -> torch.Tensor:
        """feats [B, d_feat]; prev_emb [B, W, d_emb]: slot t holds the embedding of w_{i-t} (t = 1..W), the
        input of step t + 1; the last slot is unused. Returns logits [B, W, n_vocab]."""
        z = self.cond(self.norm(feats))[:, None]
        x = self.inp(prev_emb[:, :-1])
        x = torch.cat([torch.zeros_like(x[:, :1]), x], 1)            # step 1 sees no previous token
        return self.out(self.mlp(z + x + self.step))


def _examples(ids: list[torch.Tensor], window: int, skip_first: list[int]):
    """Per scored token: (text, position, prefix ids reversed & padded [W], prefix length)."""
    rows, prefixes, lengths = [], [], []
    for t, seq in enumerate(ids):
        seq = seq.tolist()
        for i in range(skip_first[t] + 1, len(seq)):
            pre = seq[max(skip_first[t], i - window):i][::-1]       # w_{i-1}, w_{i-2}, …
            rows.append((t, i))
            prefixes.append(pre + [0] * (window - len(pre)))
            lengths.append(len(pre))
    return rows, torch.tensor(prefixes, dtype=torch.long).reshape(-1, window), torch.tensor(lengths)


_FIT_CONTEXTUAL_MEMORY_PARAMS = {**_HEAD_PARAMS, "embeddings": [torch.Tensor]}


@renamed_params(_HEAD_RENAMES)
@validate_params(_FIT_CONTEXTUAL_MEMORY_PARAMS)
def fit_contextual_memory(features: Sequence[torch.Tensor], ids: Sequence[torch.Tensor], embeddings: torch.Tensor,
                          *, window: int = 16, n_steps: int = 300, lr: float = 3e-3, train_batch_size: int = 128,
                          hidden: int = 128, folds: int = 2, seed: int = 0, skip_first: Sequence[int] | None = None,
                          progress: bool = True) -> dict:
    """Array-level contextual memory. ``features[t]``: ``[T_t, d_feat]`` per-token features of text t;
    ``ids[t]``: ``[T_t]`` its token ids; ``embeddings``: ``[V, d_emb]`` frozen input embeddings for teacher
    forcing; ``skip_first[t]``: leading tokens (BOS) that are neither scored nor reconstructed.
    ``n_steps``: training steps per fold; ``train_batch_size``: prefixes per training step (old names
    ``steps``, ``batch``).

    Returns a dict of per-token arrays (``text``, ``position``, ``n_prefix``, ``score``, ``score_per_token``)
    and ``train_loss`` (last training loss per fold, nats per prefix token) and ``n_vocab``.
    """
    from tqdm.auto import tqdm
    if len(features) != len(ids) or not len(ids):
        raise InputError("features and ids must be non-empty lists of the same length (one entry per text).")
    if folds > 1 and len(ids) < folds:
        raise InputError(f"folds={folds} cross-fitting needs at least {folds} texts, got {len(ids)}; pass more "
                         "texts or folds=1 (in-sample scores).")
    skip_first = list(skip_first) if skip_first is not None else [0] * len(ids)
    rows, prefix, length = _examples(list(ids), window, skip_first)
    if not rows:
        raise InputError("no token has a prefix to reconstruct: the texts are too short.")
    feats = torch.cat([f[torch.tensor([i for t2, i in rows if t2 == t], dtype=torch.long)].float()
                       for t, f in enumerate(features)])
    text_of = torch.tensor([t for t, _ in rows])
    vocab, local = torch.unique(prefix[length[:, None] > torch.arange(window)], return_inverse=True)
    lut = torch.full((int(prefix.max()) + 1,), 0, dtype=torch.long)
    lut[vocab] = torch.arange(len(vocab))
    target = lut[prefix]                                            # [n, W] in the closed vocabulary
    mask = length[:, None] > torch.arange(window)                   # valid prefix slots
    emb = embeddings.detach().float().cpu()
    nll = torch.zeros(len(rows), window)
    train_loss = []
    n_groups = max(1, folds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        for f in range(n_groups):
            test = (text_of % n_groups == f) if folds > 1 else torch.ones(len(rows), dtype=torch.bool)
            train = ~test if folds > 1 else test
            tr = torch.nonzero(train).flatten()
            head = PrefixDecoder(feats.shape[1], emb.shape[1], len(vocab), window, hidden)
            opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01, foreach=True)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=n_steps,
                                                        pct_start=max(0.1, 2 / n_steps))  # >= 1 warm-up step
            bar = tqdm(range(n_steps), desc=f"contextual memory fold {f + 1}/{n_groups}", disable=not progress)
            for _ in bar:
                b = tr[torch.randint(len(tr), (min(train_batch_size, len(tr)),), generator=g)]
                logits = head(feats[b], emb[prefix[b]])
                lp = torch.log_softmax(logits, -1).gather(-1, target[b, :, None])[..., 0]
                loss = -(lp * mask[b]).sum() / mask[b].sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            train_loss.append(float(loss.detach()))
            te = torch.nonzero(test).flatten()
            with torch.no_grad():
                for s in range(0, len(te), 512):
                    b = te[s:s + 512]
                    lp = torch.log_softmax(head(feats[b], emb[prefix[b]]), -1).gather(-1, target[b, :, None])[..., 0]
                    nll[b] = -lp * mask[b]
    score = nll.sum(1).double().numpy()
    n_pre = length.numpy()
    return {"text": text_of.numpy(), "position": np.array([i for _, i in rows]), "n_prefix": n_pre,
            "score": score, "score_per_token": score / np.maximum(n_pre, 1), "train_loss": train_loss,
            "n_vocab": len(vocab)}


def bootstrap_ci(x: np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Deprecated: use :func:`lensbench.stats.mean_ci` (with ``clusters=`` the text of each value). This alias
    treats every value as its own cluster and returns ``mean_ci(x, level=level).as_tuple()``."""
    warnings.warn("lensbench.probes.memory.bootstrap_ci is deprecated: use lensbench.stats.mean_ci(values, "
                  "clusters=text_index) — tokens of one text are not independent.", DeprecationWarning, stacklevel=2)
    return stats.mean_ci(np.asarray(x, dtype=float), level=level, n_boot=n_boot, seed=seed).as_tuple()


# --------------------------------------------------------------------------------------------- result
@dataclasses.dataclass(eq=False)
class ContextualMemoryResult(Result):
    """Per-token contextual memory scores and a per-class summary.

    Attributes:
        texts: the texts. token, token_class: per scored token (flattened over texts).
        text_index, position, n_prefix: ``[n]`` the token's text, position (in the model's tokens) and the
            number of prefix tokens reconstructed (≤ window).
        score: ``[n]`` C_i = −log P(prefix | e_i) in nats, summed over the prefix.
        score_per_token: ``[n]`` score / n_prefix.
        classes, class_n, class_mean, class_lo, class_hi: the per-class summary of ``score_per_token`` over
            tokens with a full window (all tokens if none has): tokens, mean and the 95% CI of
            :func:`lensbench.stats.mean_ci` with the texts as clusters.
        class_n_texts: ``[n_classes]`` texts those tokens come from; class_ci_method: "t" / "bca" / "none".
        settings: layers, window, n_steps, folds, seed, hidden, lr, train_batch_size, exclude_first, n_vocab,
            train_loss, ci (results saved before the renaming hold ``steps`` and ``batch``).

    ``to_dataframe()``: one row per scored token: ``text`` (index), ``position``, ``token``, ``class``,
    ``n_prefix``, ``C`` (``score``, nats) and ``C_per_token`` (``score_per_token``).
    """

    texts: list
    token: list
    token_class: list
    text_index: np.ndarray
    position: np.ndarray
    n_prefix: np.ndarray
    score: np.ndarray
    score_per_token: np.ndarray
    classes: list
    class_n: np.ndarray
    class_mean: np.ndarray
    class_lo: np.ndarray
    class_hi: np.ndarray
    settings: dict = dataclasses.field(default_factory=dict)
    model_name: str = ""
    class_n_texts: np.ndarray | None = None
    class_ci_method: list = dataclasses.field(default_factory=list)

    def to_dataframe(self):
        import pandas as pd
        return pd.DataFrame({"text": self.text_index, "position": self.position, "token": self.token,
                             "class": self.token_class, "n_prefix": self.n_prefix, "C": self.score,
                             "C_per_token": self.score_per_token})

    def summary(self):
        """Per token class: tokens (``n_tokens``) and texts (``n_texts``) behind it, mean C per prefix token
        (nats) and its 95% CI over texts (``ci_method``: "t" below 20 texts, else "bca"); most contextual first."""
        import pandas as pd
        nt = self.class_n_texts if self.class_n_texts is not None else np.full(len(self.classes), -1)
        meth = self.class_ci_method or ["percentile bootstrap over tokens (old result)"] * len(self.classes)
        df = pd.DataFrame({"class": self.classes, "n_tokens": self.class_n, "n_texts": nt,
                           "mean_C_per_token": self.class_mean, "ci_low": self.class_lo, "ci_high": self.class_hi,
                           "ci_method": meth})
        return df.sort_values("mean_C_per_token").reset_index(drop=True)

    def figure(self, kind: str = "classes", text: int = 0):
        """``kind="classes"``: mean C per prefix token per class with CIs; ``"tokens"``: per token of ``text``
        (see :func:`lensbench.plots.memory.memory_figure`)."""
        return memory_figure(self, kind, text)


def _summarise(score_pt: np.ndarray, classes: list[str], full: np.ndarray, text: np.ndarray, n_boot: int,
               seed: int):
    """Per class: tokens, texts, mean and :func:`lensbench.stats.mean_ci` over texts (clusters)."""
    use = full if full.any() else np.ones_like(full)
    cls = np.asarray(classes)
    n, n_texts, mean, lo, hi, method = [], [], [], [], [], []
    for c in CLASSES:
        sel = (cls == c) & use
        iv = stats.mean_ci(score_pt[sel], clusters=np.asarray(text)[sel], n_boot=n_boot, seed=seed)
        n.append(int(sel.sum()))
        n_texts.append(iv.n_clusters)
        mean.append(iv.estimate)
        lo.append(iv.lo)
        hi.append(iv.hi)
        method.append(iv.method)
    return np.array(n), np.array(n_texts), np.array(mean), np.array(lo), np.array(hi), method


_CONTEXTUAL_MEMORY_PARAMS = {
    **_HEAD_PARAMS,
    "m": [LensModel],
    "n_boot": [Interval(int, 1, None)],
    "exclude_first": [Options((True, False, "bos"))],
    "batch_size": [Options({"auto"}), Interval(int, 1, None)],
}


@renamed_params({**_HEAD_RENAMES, **EXCLUDE_BOS_RENAME})
@validate_params(_CONTEXTUAL_MEMORY_PARAMS)
def contextual_memory(m: LensModel, texts, *, layers=None, window: int = 16, n_steps: int = 300, lr: float = 3e-3,
                      train_batch_size: int = 128, hidden: int = 128, folds: int = 2, seed: int = 0,
                      n_boot: int = 1000, exclude_first: bool | str = "bos", batch_size: int | str = "auto",
                      progress: bool = True) -> ContextualMemoryResult:
    """LLM-Microscope's contextualisation score C_i = −log P(w_{i-W}..w_{i-1} | e_i) for every token of
    ``texts`` (a list of strings, or a :class:`Capture` with the layers: no model pass then), from a small
    prefix decoder trained on frozen hidden states (see the module docstring).

    Args:
        layers: layers whose residuals form e_i (concatenated; default: four evenly spaced, 1/4 … L).
        window: prefix tokens reconstructed (W).
        n_steps, lr, train_batch_size, hidden: the head's training (steps per fold, learning rate, prefixes
            per step, hidden units; old names ``steps``, ``batch``).
        folds: cross-fitting groups of texts (each token scored by a head not trained on its text);
            ``folds=1`` scores in-sample.
        n_boot: bootstrap resamples for the per-class confidence intervals (from 20 texts on; below, a t
            interval over texts needs none).
        exclude_first: leading position neither scored nor reconstructed: "bos" (default) only a literal BOS
            token, True position 0 whatever it is, False none (old name ``exclude_bos``: True is "bos").
        batch_size: texts per forward pass of the model (not used with a :class:`Capture`).
    """
    L = m.n_layers
    if layers is None:
        layers = sorted({max(1, round(L * f)) for f in (0.25, 0.5, 0.75, 1.0)})
    layers = m.check_layers(layers)
    if isinstance(texts, Capture):
        cap = texts
        missing = set(layers) - set(cap.layers or [])
        if cap.hidden is None or missing:
            raise InputError(f"the capture lacks layers {sorted(missing)} (or was reduced); capture them first.")
    else:
        if isinstance(texts, str):
            texts = [texts]
        cap = m.capture(texts, layers=layers, batch_size=batch_size, progress=progress)
    feats, ids, skip = [], [], []
    for i in range(len(cap)):
        h = cap.hidden_states(i)[[cap.layers.index(la) for la in layers]].float()     # [n_l, T, d]
        h = h / h.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)                # RMS-normalise per layer
        feats.append(h.permute(1, 0, 2).reshape(h.shape[1], -1))
        seq = cap.input_ids(i)
        ids.append(seq)
        skip.append(_skip(m, seq, exclude_first))
    emb = m.embed_module.weight
    if emb.device.type == "meta":  # offloaded by accelerate (device_map / disk offload): its hook holds the values
        emb = offloaded_tensor(m.model, f"{m.anatomy.embed}.weight")
        if emb is None:
            raise InputError(f"the input embedding of {m.name} is on the meta device and no accelerate hook holds its "
                             "weights; load the model with its weights (device_map / offload_folder).")
    out = fit_contextual_memory(feats, ids, emb, window=window, n_steps=n_steps, lr=lr,
                                train_batch_size=train_batch_size, hidden=hidden, folds=folds, seed=seed,
                                skip_first=skip, progress=progress)
    toks_all = [cap.tokens(i) for i in range(len(cap))]
    token = [toks_all[t][p] for t, p in zip(out["text"], out["position"])]
    cls = [token_class(t) for t in token]
    n, n_texts, mean, lo, hi, method = _summarise(out["score_per_token"], cls, out["n_prefix"] == window,
                                                  out["text"], n_boot, seed)
    settings = {"layers": list(layers), "window": window, "n_steps": n_steps, "folds": folds, "seed": seed,
                "hidden": hidden, "lr": lr, "train_batch_size": train_batch_size, "n_vocab": out["n_vocab"],
                "exclude_first": exclude_first,
                "train_loss": out["train_loss"], "uniform_baseline": math.log(out["n_vocab"]),
                "summary_over": "full-window tokens" if (out["n_prefix"] == window).any() else "all tokens",
                "ci": "lensbench.stats.mean_ci over texts (clusters): t below 20 texts, BCa from 20",
                "n_texts": len(cap)}
    return ContextualMemoryResult(texts=list(cap.texts), token=token, token_class=cls, text_index=out["text"],
                                  position=out["position"], n_prefix=out["n_prefix"], score=out["score"],
                                  score_per_token=out["score_per_token"], classes=list(CLASSES), class_n=n,
                                  class_mean=mean, class_lo=lo, class_hi=hi, settings=settings, model_name=m.name,
                                  class_n_texts=n_texts, class_ci_method=method)



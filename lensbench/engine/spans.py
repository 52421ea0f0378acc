"""Span scoring: log-probs of given continuation spans, batched, through the model's backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError
from .batches import run_batches


@dataclass
class SpanScore:
    """Teacher-forced score of one span: ``logprob`` = Σ log p(span tokens), ``exact`` = every span token is the
    argmax, ``token_logprobs`` ``[n_span]`` float64 (CPU)."""

    logprob: float
    exact: bool
    token_logprobs: torch.Tensor

    def __iter__(self):  # unpacks as (logprob, exact, token_logprobs)
        return iter((self.logprob, self.exact, self.token_logprobs))

    def __getitem__(self, i):
        return (self.logprob, self.exact, self.token_logprobs)[i]


def readout(m, h: torch.Tensor, gold: Sequence[int], chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(gold) [n] float64 CPU, argmax == gold [n] bool CPU)`` for last-block outputs ``h`` ``[n, d]``:
    the unembedding on its own device, float32 log-softmax, ``chunk`` positions at a time (never ``[n, V]``
    beyond a chunk)."""
    lp_all, hit = [], []
    for s in range(0, len(gold), chunk):
        z = m.unembed(h[s:s + chunk])
        g = torch.tensor(list(gold[s:s + chunk]), device=z.device)
        lps = torch.log_softmax(z, -1)
        lp_all.append(lps.gather(-1, g[:, None])[:, 0].double().cpu())
        hit.append((z.argmax(-1) == g).cpu())
    if not lp_all:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    return torch.cat(lp_all), torch.cat(hit)


@torch.no_grad()
def score_spans(m, seqs: Sequence[Sequence[int]], n_span: Sequence[int], *, batch_size: int | str = "auto",
                progress: bool = False, backend: str | None = None, desc: str = "scoring") -> list[SpanScore]:
    """Score the last ``n_span[i]`` tokens of each full sequence ``seqs[i]`` (token ids) given the rest.

    One padded forward per batch through the model's backend (``hf``, ``nnsight``, ``transformer_lens``), the
    last block's output read at the span-predicting positions only and unembedded there. ``batch_size="auto"``
    halves on out-of-memory (identical scores). Returns one :class:`SpanScore` per sequence, in order.
    """
    from ..capture import reduce_batch
    if len(seqs) != len(n_span):
        raise InputError(f"score_spans: {len(seqs)} sequences but {len(n_span)} span lengths.")
    for i, (s, a) in enumerate(zip(seqs, n_span)):
        if not 0 < a < len(s):
            raise InputError(f"score_spans: sequence {i} has {len(s)} tokens; its span of {a} must leave at least "
                             "one context token.")
        if len(s) > m.max_length:
            raise InputError(f"sequence {i} has {len(s)} tokens, more than {m.name}'s {m.max_length}; shorten it.")
    L = m.n_layers
    ids = [torch.tensor(list(s), dtype=torch.long) for s in seqs]
    out: list[SpanScore | None] = [None] * len(seqs)

    def step(idx: list[int]) -> None:
        rows, cols, gold = [], [], []
        for r, i in enumerate(idx):
            n, a = len(ids[i]), n_span[i]
            rows += [r] * a
            cols += list(range(n - a - 1, n - 1))
            gold += list(seqs[i][n - a:])

        def reduce(batch):  # torch only: on nnsight this runs inside the trace and only [n] scores are saved
            h = batch.hidden[L]
            return readout(m, h[torch.tensor(rows, device=h.device), torch.tensor(cols, device=h.device)], gold)

        lp, ok = reduce_batch(m, [ids[i] for i in idx], [L], reduce, backend=backend, indices=idx, logits=False)
        lp, ok = lp.cpu(), ok.cpu()
        k = 0
        for i in idx:
            a = n_span[i]
            out[i] = SpanScore(float(lp[k:k + a].sum()), bool(ok[k:k + a].all()), lp[k:k + a])
            k += a

    run_batches(m, ids, step, batch_size=batch_size, progress=progress, desc=desc)
    return out  # type: ignore[return-value]

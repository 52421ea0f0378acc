"""The capture engine: batched forward passes that record the residual stream and reduce it on the device.

Every probe gets its activations from here, so batching, padding, out-of-memory back-off, progress bars and
backends live in one place. Index convention: layer 0 is the residual entering block 0 (embeddings), layer
``l`` the output of block ``l-1``, layer ``L`` the last block's output before the final norm.

Padding: texts of a batch are right-padded by default. With a causal mask, right padding never changes the
real tokens' activations, for every architecture; ``padding_side="left"`` is supported too (position ids are
derived from the attention mask) and is what generation needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .engine.batches import default_token_budget, run_batches  # noqa: F401 - re-exported
from .errors import InputError
from .model import LensModel, check_text, model_errors


@dataclass
class CaptureBatch:
    """What a ``reduce`` function receives for one batch (tensors stay on the model's device).

    Attributes:
        model: the :class:`LensModel`.
        indices: positions of this batch's texts in the caller's list.
        input_ids: ``[B, T]`` padded token ids.
        attention_mask: ``[B, T]`` 1 for real tokens.
        lengths: real length of each row.
        hidden: layer -> ``[B, T, d_model]`` residual stream in the model's dtype.
        logits: ``[B, T, V]`` the model's own output logits (None if the backend skips them).
        padding_side: ``"right"`` or ``"left"``.
    """

    model: LensModel
    indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]
    hidden: dict[int, torch.Tensor]
    logits: torch.Tensor | None
    padding_side: str = "right"

    def span(self, b: int) -> slice:
        """Slice of the real (unpadded) positions of row ``b``."""
        T = self.input_ids.shape[1]
        return slice(T - self.lengths[b], T) if self.padding_side == "left" else slice(0, self.lengths[b])

    def hidden_of(self, b: int, layers: Sequence[int] | None = None) -> torch.Tensor:
        """``[n_layers, T_b, d_model]`` unpadded residuals of row ``b`` (on device, model dtype)."""
        layers = sorted(self.hidden) if layers is None else layers
        s = self.span(b)
        dev = self.hidden[layers[0]].device  # blocks may live on several devices
        return torch.stack([self.hidden[la][b, s].to(dev) for la in layers])

    def ids_of(self, b: int) -> torch.Tensor:
        return self.input_ids[b, self.span(b)]


@dataclass
class Capture:
    """Result of :meth:`LensModel.capture`.

    Without ``reduce``: :meth:`hidden_states` gives each text's residual stream (CPU, float32, unpadded).
    With ``reduce``: ``results[i]`` holds what ``reduce`` returned for text ``i``.
    ``losses[i]``: text ``i``'s mean next-token cross-entropy from the model's own logits (NaN for 1 token).
    """

    layers: list[int]
    texts: list[str]
    ids: list[torch.Tensor]
    str_tokens: list[list[str]]
    hidden: list[torch.Tensor] | None = None
    results: list[Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    losses: list[float] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def hidden_states(self, i: int) -> torch.Tensor:
        """``Tensor[n_layers_captured, T_i, d_model]`` for text ``i`` (all layers: index = layer number)."""
        if self.hidden is None:
            raise InputError("this capture kept no hidden states: it was made with reduce=..., whose per-text outputs are in .results")
        return self.hidden[i]

    def tokens(self, i: int) -> list[str]:
        """Token strings of text ``i``."""
        return self.str_tokens[i]

    def input_ids(self, i: int) -> torch.Tensor:
        return self.ids[i]


def tokenize(m: LensModel, texts, *, add_bos: bool | None = None, truncate: bool = False,
             param: str = "texts") -> tuple[list[str], list[torch.Tensor]]:
    """Validate and tokenize one string or a list of strings (1-D token-id tensors pass through).

    Returns (texts, list of 1-D id tensors)."""
    if isinstance(texts, (str, torch.Tensor)):
        texts, param = [texts], ("text" if param == "texts" else param)
    elif hasattr(texts, "column_names") and "text" in getattr(texts, "column_names", []):  # datasets.Dataset
        texts = list(texts["text"])
    elif not isinstance(texts, (list, tuple)):
        raise InputError(f"{param} must be a string or a list of strings, got {type(texts).__name__}.")
    texts = list(texts)
    if not texts:
        raise InputError(f"{param} is an empty list; pass at least one text.")
    ids = []
    for i, t in enumerate(texts):
        name = f"{param}[{i}]" if len(texts) > 1 else param
        if isinstance(t, torch.Tensor):
            if t.dim() != 1 or t.numel() == 0 or t.dtype not in (torch.long, torch.int, torch.int32):
                raise InputError(f"{name}: token ids must be a non-empty 1-D integer tensor.")
            if t.numel() > m.max_length:
                raise InputError(f"{name} has {t.numel()} tokens; the model accepts at most {m.max_length}.")
            ids.append(t.long().cpu())
            texts[i] = m.tokenizer.decode(t)
        else:
            ids.append(m.encode(t, add_bos=add_bos, truncate=truncate, param=name))
    return texts, ids


def windows(m: LensModel, texts, max_tokens: int, *, max_windows_per_text: int | None = None) -> list[torch.Tensor]:
    """Split each text's tokens into consecutive windows of at most ``max_tokens`` (for sweeps/training).

    Windows shorter than 2 tokens are dropped; if nothing is left, an :class:`InputError` says so."""
    if isinstance(texts, str):
        texts = [texts]
    if hasattr(texts, "column_names") and "text" in getattr(texts, "column_names", []):  # datasets.Dataset
        texts = list(texts["text"])
    if not isinstance(texts, (list, tuple)):
        raise InputError(f"texts must be a string or a list of strings, got {type(texts).__name__}.")
    if not texts:
        raise InputError("texts is an empty list; pass at least one text.")
    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise InputError(f"max_tokens must be an int >= 2 (tokens per window), got {max_tokens!r}.")
    out = []
    for i, t in enumerate(texts):
        check_text(t, f"texts[{i}]")
        kw = {"add_special_tokens": True}
        ids = m.tokenizer(t, return_tensors="pt", **kw)["input_ids"][0]
        pieces = [ids[s: s + max_tokens] for s in range(0, len(ids), max_tokens)]
        pieces = [p for p in pieces if len(p) >= 2]
        out += pieces[:max_windows_per_text] if max_windows_per_text else pieces
    if not out:
        raise InputError("every text is shorter than 2 tokens; pass longer texts (each window needs a next token).")
    return out


def pad_batch(m: LensModel, ids: list[torch.Tensor], padding_side: str = "right"):
    """Stack 1-D id tensors into ``(input_ids [B,T], attention_mask [B,T])`` with the model's pad token."""
    T = max(len(x) for x in ids)
    pad = m.pad_token_id if m.pad_token_id is not None else 0
    out = torch.full((len(ids), T), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for b, x in enumerate(ids):
        if padding_side == "left":
            out[b, T - len(x):] = x
            mask[b, T - len(x):] = 1
        else:
            out[b, : len(x)] = x
            mask[b, : len(x)] = 1
    return out, mask


def forward_batch(m: LensModel, ids: list[torch.Tensor], layers: list[int], *, padding_side: str = "right",
                  backend: str | None = None, indices: list[int] | None = None, logits: bool = True) -> CaptureBatch:
    """One padded forward pass through the chosen backend, recording ``layers``."""
    from .backends import run_backend
    input_ids, mask = pad_batch(m, ids, padding_side)
    input_ids, mask = input_ids.to(m.input_device), mask.to(m.input_device)
    with torch.no_grad():
        with model_errors(m, f"in a capture of {tuple(input_ids.shape)} tokens through the "
                             f"{backend or m.backend!r} backend"):
            hidden, out_logits = run_backend(backend or m.backend, m, input_ids, mask, layers, padding_side,
                                             logits=logits)
    return CaptureBatch(model=m, indices=list(indices or range(len(ids))), input_ids=input_ids, attention_mask=mask,
                        lengths=[len(x) for x in ids], hidden=hidden, logits=out_logits, padding_side=padding_side)


def reduce_batch(m: LensModel, ids: list[torch.Tensor], layers: list[int], fn: Callable[[CaptureBatch], Any], *,
                 padding_side: str = "right", backend: str | None = None, indices: list[int] | None = None,
                 logits: bool = True) -> Any:
    """``fn(batch)`` on one padded forward pass through the chosen backend.

    On the ``nnsight`` backend ``fn`` runs inside the trace on the trace's tensors and only what it returns is
    saved (with ``m.remote`` set, only that leaves NDIF): write ``fn`` with torch only."""
    from .backends import run_reduced
    name = backend or m.backend
    input_ids, mask = pad_batch(m, ids, padding_side)
    input_ids, mask = input_ids.to(m.input_device), mask.to(m.input_device)

    def work(hidden: dict, out_logits):
        return fn(CaptureBatch(model=m, indices=list(indices or range(len(ids))), input_ids=input_ids,
                               attention_mask=mask, lengths=[len(x) for x in ids], hidden=hidden, logits=out_logits,
                               padding_side=padding_side))

    with torch.no_grad():
        with model_errors(m, f"in a capture of {tuple(input_ids.shape)} tokens through the {name!r} backend"):
            return run_reduced(name, m, input_ids, mask, layers, work, padding_side, logits=logits)


def capture(m: LensModel, texts, layers=None, reduce: Callable[[CaptureBatch], list] | None = None,
            batch_size: int | str = "auto", progress: bool = True, *, add_bos: bool | None = None,
            truncate: bool = False, padding_side: str = "right", backend: str | None = None,
            logits: bool = True) -> Capture:
    """Batched capture of the residual stream.

    Args:
        texts: a string, a list of strings, or a ``datasets.Dataset`` with a ``text`` column.
        layers: None (all, 0..L), an int or a list; negatives count from the end.
        reduce: ``f(batch: CaptureBatch) -> list`` with one entry per row of the batch, run on the device
            while the batch's activations are alive; its outputs land in ``Capture.results`` in text order.
            On the ``nnsight`` backend it runs inside the trace and only its outputs are saved (NDIF-ready when it
            uses torch only).
            Without it, every text's hidden states are copied to CPU float32.
        batch_size: texts per forward pass or ``"auto"`` (a token budget, halved on out-of-memory).
        progress: show a ``tqdm`` bar when there is more than one batch.
        add_bos: None = the tokenizer's default; True/False force a BOS token on/off.
        truncate: cut over-long texts to the model's context with a warning instead of raising.
        padding_side: ``"right"`` (default, exact for every architecture) or ``"left"`` (for models whose
            recurrence does not mask left pads, measured once per model, right padding is used instead).
        backend: ``"hf"``, ``"nnsight"`` or ``"transformer_lens"``; default: how the model was loaded.
        logits: False lets the backend skip the model's output logits (saves a ``[B, T, V]`` tensor and one full
            unembedding); ``Capture.losses`` are then NaN.
    """
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    if reduce is not None and not callable(reduce):
        raise InputError("reduce must be a function f(batch) -> list with one entry per text of the batch.")
    layers = m.check_layers(layers)
    if padding_side == "left" and not m.capabilities["left_padding"]:
        padding_side = "right"  # the recurrence does not mask left pads; right padding is exact and gives the
        # same per-text (unpadded) states, which is all a capture returns
    texts, ids = tokenize(m, texts, add_bos=add_bos, truncate=truncate)
    n = len(texts)
    hidden: list[torch.Tensor | None] = [None] * n
    results: list[Any] = [None] * n
    losses: list[float] = [float("nan")] * n

    def per_batch(batch: CaptureBatch) -> tuple[list[float], list]:
        n_rows = len(batch.indices)
        lo = ([mean_next_token_loss(batch.logits[b, batch.span(b)], batch.ids_of(b)) for b in range(n_rows)]
              if batch.logits is not None else [float("nan")] * n_rows)
        if reduce is not None:
            return lo, reduce(batch)
        return lo, [batch.hidden_of(b, layers).float().cpu() for b in range(n_rows)]

    def step(idx: list[int]) -> None:
        lo, out = reduce_batch(m, [ids[i] for i in idx], layers, per_batch, padding_side=padding_side,
                               backend=backend, indices=idx, logits=logits)
        if len(out) != len(idx):
            raise InputError(f"reduce returned {len(out)} items for a batch of {len(idx)} texts; return one "
                             "per text.")
        for i, loss, o in zip(idx, lo, out):
            losses[i] = loss
            if reduce is not None:
                results[i] = o
            else:
                hidden[i] = o

    stats = run_batches(m, ids, step, batch_size=batch_size, progress=progress, desc="capture")
    stats["tokens"] = int(sum(len(x) for x in ids))
    return Capture(layers=layers, texts=texts, ids=ids, str_tokens=[m.to_str_tokens(x) for x in ids],
                   hidden=None if reduce is not None else hidden, results=results if reduce is not None else None,
                   stats=stats, losses=losses)


def mean_next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean cross-entropy (nats) of ``ids[1:]`` under ``logits[:-1]`` ([T, V]); NaN for a single token."""
    if len(ids) < 2:
        return float("nan")
    ids = ids.to(logits.device)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for sl in chunked(len(ids) - 1, positions_per_chunk(logits.shape[-1])):  # never a float [T, V] copy
        lp = torch.log_softmax(logits[sl].float(), -1)
        total += -lp.gather(-1, ids[sl.start + 1: sl.stop + 1, None])[:, 0].double().sum()
    return float(total / (len(ids) - 1))


def chunked(T: int, chunk: int):
    """Yield slices covering ``range(T)`` in pieces of at most ``chunk``."""
    for s in range(0, T, chunk):
        yield slice(s, min(T, s + chunk))


def positions_per_chunk(vocab_size: int, budget_bytes: int = 16 * 1024 * 1024) -> int:
    """How many positions of float32 logits fit in ``budget_bytes`` (at least 1)."""
    return max(1, int(budget_bytes // (4 * max(1, vocab_size))))


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / b))

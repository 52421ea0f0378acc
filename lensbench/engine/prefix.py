"""One KV-cache implementation for every probe that continues a shared prefix (rollouts, filler sweeps)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch

from ..errors import InputError, LensbenchError
from .batches import check_cancelled
from .spans import SpanScore, readout


class CropUnsupported(LensbenchError):
    """The model's cache cannot be cut back to a shorter prefix (callers recompute from scratch)."""


def cache_of(out):
    """The cache a forward returned (transformers >= 5.2x names it ``cache``, earlier ``past_key_values``)."""
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


class KVCache:
    """A model's key/value cache of ``rows`` equal-length prefixes, extended, cropped and repeated in place.

    ``extend(rows, score_last=a)`` runs new tokens on top (one row per cache row) and can score each row's last
    ``a`` ids; ``crop(n)`` cuts back to ``n`` tokens; ``repeat(k)`` repeats every row ``k`` times; ``copy()`` a
    private copy. The cache keyword, ``logits_to_keep`` and crop support come from ``m.capabilities``.
    """

    def __init__(self, m):
        self.m = m
        self.cache = None
        self.forward_tokens = 0  # tokens run through the model (for benchmarks)

    @property
    def length(self) -> int:
        return 0 if self.cache is None else int(self.cache.get_seq_length())

    @torch.no_grad()
    def extend(self, rows: Sequence[Sequence[int]], score_last: int = 0, *, logits: bool = False):
        """Run ``rows`` (equal lengths) on top of the cache. Returns per row a :class:`SpanScore` of its last
        ``score_last`` ids (the position before each predicts it), else — with ``logits=True`` — the float32
        logits at the last position ``[rows, V]``, else None."""
        from ..model import model_errors
        check_cancelled()
        m, caps = self.m, self.m.capabilities
        x = torch.tensor([list(r) for r in rows], dtype=torch.long, device=m.input_device)
        if x.dim() != 2 or x.shape[1] == 0:
            raise InputError("internal: KVCache.extend needs equal-length, non-empty rows")
        past = self.length
        kw = {"use_cache": True, "attention_mask": torch.ones((x.shape[0], past + x.shape[1]), dtype=torch.long,
                                                              device=m.input_device)}
        if self.cache is not None:
            kw[caps["cache_kwarg"]] = self.cache
        if caps["logits_to_keep"]:
            kw["logits_to_keep"] = 1
        L = m.n_layers
        with model_errors(m, f"extending a cache of {past} tokens by {tuple(x.shape)}"), \
                (m.hooks([L]) if score_last else contextlib.nullcontext({})) as store:
            out = m.model(input_ids=x, **kw)
        self.forward_tokens += x.numel()
        self.cache = cache_of(out)
        if score_last:
            a, n = score_last, x.shape[1]
            if a >= n:
                raise InputError("internal: the scored span must be preceded by at least one token in the same call")
            h = store[L][:, n - a - 1:n - 1].reshape(-1, store[L].shape[-1])
            lp, ok = readout(m, h, [t for r in rows for t in list(r)[n - a:]])
            return [SpanScore(float(lp[r * a:(r + 1) * a].sum()), bool(ok[r * a:(r + 1) * a].all()),
                              lp[r * a:(r + 1) * a]) for r in range(len(rows))]
        if logits:
            return out.logits[:, -1].float()
        return None

    def crop(self, length: int) -> None:
        """Cut the cache back to its first ``length`` tokens (raises :class:`CropUnsupported` if it cannot)."""
        cur = self.length
        if cur == length:
            return
        if self.cache is None or not hasattr(self.cache, "crop"):
            raise CropUnsupported(f"{type(self.cache).__name__} cannot be cropped")
        try:
            self.cache.crop(length - cur)  # transformers 5: minus the number of tokens to drop
        except Exception as e:  # noqa: BLE001 - sliding-window / exotic caches: the caller recomputes
            raise CropUnsupported(str(e)) from e
        if self.length != length:
            raise CropUnsupported(f"crop left {self.length} tokens instead of {length}")

    def repeat(self, k: int) -> None:
        """Repeat every row ``k`` times (row r becomes rows r*k .. r*k+k-1)."""
        if k > 1:
            self.cache.batch_repeat_interleave(k)

    def copy(self) -> KVCache:
        c = KVCache(self.m)
        c.cache = copy.deepcopy(self.cache)
        return c


class PrefixCache:
    """The cache of the current prefix (one row), moved to each new prefix by keeping the common part: a
    scan over growing prefixes of a response costs one new token per step."""

    def __init__(self, m):
        self.m = m
        self.ids: list[int] = []
        self.kv = KVCache(m)
        self.logits: torch.Tensor | None = None
        self.reuse = True

    @property
    def forward_tokens(self) -> int:
        return self.kv.forward_tokens

    @property
    def cache(self):
        return self.kv.cache

    @torch.no_grad()
    def advance(self, ids: Sequence[int]) -> torch.Tensor:
        """Make the cache hold ``ids`` and return the float32 logits at its last position ``[V]``."""
        ids = [int(i) for i in ids]
        if not ids:
            raise InputError("internal: PrefixCache.advance needs at least one token")
        if self.kv.cache is not None and ids == self.ids and self.logits is not None:
            return self.logits
        common = 0
        if self.kv.cache is not None:
            while common < min(len(ids), len(self.ids)) and ids[common] == self.ids[common]:
                common += 1
        if common == len(ids):  # at least one new token is needed to get logits at the end
            common -= 1
        try:
            if self.kv.cache is not None and common > 0:
                try:
                    self.kv.crop(common)
                except CropUnsupported:
                    self.kv, common = KVCache(self.m), 0
            else:
                self.kv, common = KVCache(self.m) if self.kv.cache is not None else self.kv, 0
            self.logits = self.kv.extend([ids[common:]], logits=True)[0]
        except BaseException:  # an OOM (or cancel) part-way leaves layers of unequal length: start afresh
            self.kv, self.ids, self.logits = KVCache(self.m), [], None
            raise
        self.ids = ids
        return self.logits

    def expanded(self, rows: int, drop_last: bool):
        """A private copy of the underlying model cache, repeated over ``rows`` (optionally without the last
        position, for callers that re-run it)."""
        c = self.kv.copy()
        if drop_last:
            c.crop(c.length - 1)
        c.repeat(rows)
        return c.cache

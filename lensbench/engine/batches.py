"""Batching with out-of-memory back-off, progress bars and cooperative cancellation (shared by every primitive)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..devices import empty_cache, is_oom
from ..errors import InputError, LensbenchError


class Cancelled(LensbenchError):  # noqa: N818 - reads naturally: "raise Cancelled"
    """Raised by a primitive at its next batch (or generation step) after its cancel event was set."""


_local = threading.local()


@contextlib.contextmanager
def cancel_scope(event: threading.Event):
    """Within the block (on this thread), every primitive raises :class:`Cancelled` once ``event`` is set."""
    old = getattr(_local, "event", None)
    _local.event = event
    try:
        yield event
    finally:
        _local.event = old


def check_cancelled() -> None:
    """Raise :class:`Cancelled` if the current thread's cancel event is set."""
    ev = getattr(_local, "event", None)
    if ev is not None and ev.is_set():
        raise Cancelled("cancelled")


def default_token_budget(device: torch.device) -> int:
    """Tokens per batch for ``batch_size="auto"`` before any out-of-memory back-off."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(max(2048, min(65536, free // (2 * 1024 * 1024) * 32)))
    return 4096


def initial_batch_size(batch_size: int | str, n: int, longest: int, device: torch.device,
                       param: str = "batch_size") -> int:
    """The first batch size: an int as given, or ``"auto"``: the token budget over the longest item."""
    if batch_size == "auto":
        bs = max(1, default_token_budget(device) // max(1, longest))
    elif isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 0:
        bs = batch_size
    else:
        raise InputError(f"{param} must be a positive int or 'auto', got {batch_size!r}.")
    return max(1, min(bs, n))


def run_batches(m, ids: Sequence[Any], step: Callable[[list[int]], Any], *, batch_size: int | str = "auto",
                progress: bool = True, desc: str = "lensbench", longest_first: bool = True) -> dict:
    """Run ``step(indices)`` over batches of ``ids`` (items with ``len``; longest first), halving the batch on
    out-of-memory and retrying it, so results never depend on where memory ran out.

    Returns stats: batches run, OOM retries, final batch size.
    """
    n = len(ids)
    order = sorted(range(n), key=lambda i: -len(ids[i])) if longest_first else list(range(n))
    if n == 0:
        return {"batches": 0, "oom_retries": 0, "batch_size": 0}
    bs = initial_batch_size(batch_size, n, len(ids[order[0]]), m.device)
    stats = {"batches": 0, "oom_retries": 0, "batch_size": bs}
    bar = tqdm(total=n, desc=desc, disable=not progress or bs >= n, leave=False)
    pos = 0
    try:
        while pos < n:
            check_cancelled()
            idx = order[pos: pos + bs]
            try:
                step(idx)
            except Exception as e:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not is_oom(e):
                    raise
                empty_cache(m.device)
                if bs == 1:
                    raise InputError("out of memory with batch_size=1: use a shorter text, fewer layers, a smaller "
                                     "dtype (dtype='bfloat16') or a larger device.") from e
                bs = max(1, bs // 2)
                stats["oom_retries"] += 1
                continue
            pos += len(idx)
            stats["batches"] += 1
            bar.update(len(idx))
    finally:
        bar.close()
    stats["batch_size"] = bs
    return stats


def split_on_oom(m, rows: list, run: Callable[[list], list]) -> list:
    """``run(rows)`` for a list of independent rows; on out-of-memory, run each half separately (recursively)
    and concatenate — for calls whose rows do not influence each other (seeded per row)."""
    check_cancelled()
    try:
        return run(rows)
    except Exception as e:  # noqa: BLE001 - only OOM is handled
        if not is_oom(e):
            raise
        empty_cache(m.device)
        if len(rows) == 1:
            raise InputError("out of memory with a single row: use a shorter prompt, fewer new tokens, "
                             "dtype='bfloat16' or a larger device.") from e
        h = len(rows) // 2
        return split_on_oom(m, rows[:h], run) + split_on_oom(m, rows[h:], run)

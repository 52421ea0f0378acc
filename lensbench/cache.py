"""Per-item disk cache for long sweeps, so an interrupted run resumes to exactly the uninterrupted result.

One file per item (``<dir>/<key>.safetensors``), written atomically with a checksum by
:func:`lensbench.results.save_tensors`. An entry that is truncated, altered, or of another kind is never read as
complete: it is reported with a warning and treated as missing (the caller recomputes and overwrites it).

>>> cache = ItemCache("runs/sweep", kind="lens-sweep-text")
>>> key = cache.key(model_fingerprint, ids.tolist(), settings)
>>> st = cache.get(key)                  # dict of tensors or None
>>> cache.put(key, {"entropy": ...})
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import LensbenchError
from .results import load_tensors, save_tensors


class ItemCache:
    """A folder of checksummed safetensors entries of one ``kind``; ``None`` folder = a no-op cache.

    Args:
        folder: directory (created on first use) or None to disable caching.
        kind: a label stored in every entry; entries of another kind are ignored.
        required: tensor names an entry must hold to count as complete.
    """

    def __init__(self, folder: str | os.PathLike | None, *, kind: str, required: tuple[str, ...] = ()):
        self.folder = Path(folder) if folder is not None else None
        self.kind, self.required = kind, tuple(required)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(*parts: Any) -> str:
        """A stable 24-hex-digit key of JSON-serialisable ``parts`` (model fingerprint, token ids, settings)."""
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.safetensors"

    def get(self, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """``(tensors, meta)`` of a complete entry, or None (absent, damaged, foreign or incomplete)."""
        f = self.path(key)
        if f is None or not f.exists():
            return None
        try:
            tensors, meta = load_tensors(f)
        except LensbenchError as e:
            warnings.warn(f"ignoring a damaged cache file and recomputing it: {e}", stacklevel=2)
            return None
        if meta.get("kind") != self.kind or any(r not in tensors for r in self.required):
            warnings.warn(f"ignoring {f}: not a complete {self.kind!r} cache entry; recomputing it", stacklevel=2)
            return None
        return tensors, meta

    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        f = self.path(key)
        if f is not None:
            save_tensors(f, tensors, {**(meta or {}), "kind": self.kind})

    def __len__(self) -> int:
        return 0 if self.folder is None else len(list(self.folder.glob("*.safetensors")))


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and a rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path: str | os.PathLike):
    """The JSON in ``path``, or None when it is missing or damaged (the caller recomputes it)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None

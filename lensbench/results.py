"""Result base class: dataframes, plotly figures, and exact save/load as safetensors + JSON (no pickle).

A result is a dataclass whose tensor/ndarray fields go into a ``.safetensors`` file and whose other fields
(strings, numbers, lists, dicts) go, as JSON, into that file's metadata. One file, loadable without pickle::

    res.save("lens.safetensors"); again = lb.LensResult.load("lens.safetensors")   # or Result.load(...)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .errors import LensbenchError

_REGISTRY: dict[str, type[Result]] = {}
_FORMAT = "lensbench-result/1"


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` and JSON ``meta`` into one safetensors file (with a checksum)."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta_json = json.dumps(meta, allow_nan=True)
    digest = hashlib.sha256(meta_json.encode())
    for k in sorted(tensors):
        digest.update(k.encode())
        digest.update(tensors[k].numpy().tobytes() if tensors[k].dtype != torch.bfloat16
                      else tensors[k].view(torch.int16).numpy().tobytes())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": _FORMAT, "meta": meta_json, "sha256": digest.hexdigest()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`; a damaged or foreign file raises a clear error."""
    from safetensors import safe_open
    path = Path(path)
    if not path.exists() and path.with_name(path.name + ".safetensors").exists():
        path = path.with_name(path.name + ".safetensors")
    if not path.exists():
        raise LensbenchError(f"no results file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for damaged headers
        raise LensbenchError(f"{path} is not a readable lensbench results file (damaged or truncated?): {e}") from e
    if md.get("format") != _FORMAT:
        raise LensbenchError(f"{path} is a safetensors file but not a lensbench results file")
    digest = hashlib.sha256(md["meta"].encode())
    for k in sorted(tensors):
        t = tensors[k]
        digest.update(k.encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    if digest.hexdigest() != md.get("sha256"):
        raise LensbenchError(f"{path} failed its checksum: the file is corrupted; recompute the result.")
    return tensors, json.loads(md["meta"])


@dataclasses.dataclass
class Result:
    """Base of every probe result. Subclasses are dataclasses; override ``to_dataframe`` and ``figure``."""

    _kind: ClassVar[str] = "result"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _REGISTRY[cls.__name__] = cls

    # ---- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write this result to ``path`` (``.safetensors`` added if missing). Returns the path written."""
        tensors, meta = {}, {"__class__": type(self).__name__, "fields": {}, "arrays": {}}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                tensors[f.name] = v
            elif isinstance(v, np.ndarray):
                tensors[f.name] = torch.from_numpy(np.ascontiguousarray(v))
                meta["arrays"][f.name] = True
            else:
                meta["fields"][f.name] = _jsonable(v)
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Result:
        """Load a result saved with :meth:`save` (any subclass when called on ``Result``)."""
        tensors, meta = load_tensors(path)
        klass = _REGISTRY.get(meta.get("__class__", ""))
        if klass is None:
            raise LensbenchError(f"{path} holds a {meta.get('__class__')!r}, which this lensbench does not know")
        if cls is not Result and not issubclass(klass, cls):
            raise LensbenchError(f"{path} holds a {klass.__name__}, not a {cls.__name__}")
        kw = dict(meta["fields"])
        for k, t in tensors.items():
            kw[k] = t.numpy() if meta["arrays"].get(k) else t
        names = {f.name for f in dataclasses.fields(klass)}
        return klass(**{k: _unjson(v) for k, v in kw.items() if k in names})

    # ---- views
    def to_dataframe(self):  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def figure(self, **kw):  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def _repr_html_(self) -> str:
        df = self.to_dataframe()
        return f"<b>{type(self).__name__}</b> ({len(df)} rows)" + df.head(12).to_html(max_cols=12)

    def __eq__(self, other) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                        and a.shape == b.shape and torch.equal(a.nan_to_num(0.123), b.nan_to_num(0.123))
                        and torch.equal(a.isnan(), b.isnan())):
                    return False
            elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True):
                    return False
            elif _jsonable(a) != _jsonable(b):
                return False
        return True


def _jsonable(v):
    if isinstance(v, dict):
        return {"__dict__": [[_jsonable(k), _jsonable(x)] for k, x in v.items()]}
    if isinstance(v, tuple):
        return {"__tuple__": [_jsonable(x) for x in v]}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    raise LensbenchError(f"cannot save a field of type {type(v).__name__}")


def _unjson(v):
    if isinstance(v, dict) and "__dict__" in v:
        return {_unjson(k): _unjson(x) for k, x in v["__dict__"]}
    if isinstance(v, dict) and "__tuple__" in v:
        return tuple(_unjson(x) for x in v["__tuple__"])
    if isinstance(v, list):
        return [_unjson(x) for x in v]
    return v

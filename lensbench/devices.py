"""Device and dtype helpers: one place that turns user strings into torch objects."""

from __future__ import annotations

import torch

from .errors import InputError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``torch.bfloat16`` / ``None`` (keep the checkpoint's) -> torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    if isinstance(dtype, str) and dtype == "auto":
        return None
    raise InputError(f"dtype={dtype!r} is not understood; use one of {sorted(set(_DTYPES))} or a torch.dtype.")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` picks the best available accelerator, else CPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device={device!r} is not a valid torch device ('cpu', 'cuda', 'cuda:1', 'mps').") from e


def is_oom(err: BaseException) -> bool:
    """True for an out-of-memory error on any device."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def tolerance(dtype: torch.dtype) -> float:
    """Absolute tolerance on log-probs for identities that should hold up to rounding in ``dtype``."""
    return {torch.float32: 1e-4, torch.float64: 1e-8}.get(dtype, 0.15)

"""Device and dtype helpers: one place that turns user strings into torch objects."""

from __future__ import annotations

import itertools

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


def _hook_device(hook) -> torch.device | None:
    """The execution device of an accelerate hook (``AlignDevicesHook``, ``CpuOffload``, a ``SequentialHook`` of them)."""
    if hook is None:
        return None
    for h in getattr(hook, "hooks", None) or (hook,):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return None


def module_device(mod: torch.nn.Module) -> torch.device:
    """The device ``mod`` computes on.

    For a module dispatched by accelerate (``device_map``, ``dispatch_model``, ``cpu_offload``, ``disk_offload``) its
    weights may sit on the ``meta`` device or on the CPU between calls; the device it runs on is its hook's
    ``execution_device`` (the module's own hook, else the first hooked submodule's). Otherwise the device of its
    first parameter or buffer that holds data; CPU for a module without any.
    """
    for sub in mod.modules():
        dev = _hook_device(getattr(sub, "_hf_hook", None))
        if dev is not None:
            return dev
        for t in itertools.chain(sub.parameters(recurse=False), sub.buffers(recurse=False)):
            if t.device.type != "meta":
                return t.device
    return torch.device("cpu")


def is_dispatched(model: torch.nn.Module) -> bool:
    """True when accelerate hooks place (and maybe offload) any of ``model``'s modules."""
    return any(getattr(sub, "_hf_hook", None) is not None for sub in model.modules())


def offloaded_tensor(model: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The value of parameter/buffer ``name`` of ``model`` whose tensor accelerate offloaded (it sits on ``meta``;
    the hook of its module keeps a ``weights_map`` in CPU memory or on disk); None where no hook holds it.
    Loads that one tensor (on the CPU)."""
    owner, _, local = name.rpartition(".")
    try:
        mod = model.get_submodule(owner) if owner else model
    except AttributeError:
        return None
    hook = getattr(mod, "_hf_hook", None)
    for h in (getattr(hook, "hooks", None) or (hook,)) if hook is not None else ():
        wm = getattr(h, "weights_map", None)
        if wm is not None:
            try:
                return wm[local]
            except KeyError:
                continue
    return None

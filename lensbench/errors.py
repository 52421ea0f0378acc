"""Errors lensbench raises on purpose. Each message names the parameter and says what to do."""

from __future__ import annotations


class LensbenchError(Exception):
    """Base class for every error lensbench raises deliberately."""


class InputError(LensbenchError, ValueError):
    """A user-supplied argument is invalid (empty text, bad layer index, ...)."""


class AnatomyError(LensbenchError, RuntimeError):
    """The model's anatomy could not be discovered or failed validation."""


class ModelLoadError(LensbenchError, OSError):
    """A model could not be loaded (missing package, unknown name offline, unsafe weights)."""


class ModelRunError(LensbenchError, RuntimeError):
    """The model itself failed on an input lensbench gave it (its message and the model's error are shown)."""

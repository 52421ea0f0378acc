"""Attribution methods as registered objects: each method is a small dataclass that carries and checks its own
options, registered by name, so ``attribute(m, text, method="occlusion", baseline="remove")`` and
``attribute(m, text, method=Occlusion(baseline="remove"))`` are the same call.

A new method subclasses :class:`AttributionMethod`, declares its options as dataclass fields with a
``parameter_constraints`` table (:mod:`lensbench.validation`), implements :meth:`AttributionMethod.run`, and is
made available by name with :func:`register`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch

from ...errors import InputError
from ...model import LensModel
from ...validation import check_params
from ._passes import _require_hf

_REGISTRY: dict[str, type[AttributionMethod]] = {}

#: what each kind of pass needs from the backend (the reason given when a non-hf backend is refused)
_NEEDS_WHY = {
    "gradients": "takes gradients through the input embeddings",
    "embeds": "runs the model from edited input embeddings",
    "attention": "reads the eager kernel's attention weights from the model's own forward",
    "ids": "",
}


@dataclasses.dataclass(frozen=True)
class Call:
    """The per-call settings a method runs under (its own options live on the method object).

    foil: the contrast token id or None (also None in :meth:`AttributionMethod.check`, which runs before the
    tokens are resolved: ``contrast`` says whether one is given); objective: ``"logprob"``, ``"logit"`` or
    ``"prob"``; seed: the random draws of stochastic methods; progress: show a bar for long batched loops;
    upcast: run gradient passes in float32.
    """

    foil: int | None
    objective: str
    contrast: bool = False
    seed: int = 0
    progress: bool = False
    upcast: bool = True


@dataclasses.dataclass
class Scores:
    """What a method computes for ``n`` targets over ``n_sources`` sources.

    scores: ``[n, n_sources]`` (NaN where a source is not before its target); f: ``[n]`` F(x);
    completeness, f_baseline: ``[n]`` (integrated gradients); baseline_embeds: per target ``[P_k, d]``;
    settings: what the run adds to ``result.settings`` (e.g. steps used); upcast: whether float32 was active.
    """

    scores: torch.Tensor
    f: torch.Tensor
    completeness: torch.Tensor | None = None
    f_baseline: torch.Tensor | None = None
    baseline_embeds: list[torch.Tensor] | None = None
    settings: dict = dataclasses.field(default_factory=dict)
    upcast: bool = False


@dataclasses.dataclass
class AttributionMethod:
    """Base of an attribution method. Subclasses are dataclasses whose fields are the method's options.

    Class attributes: ``name`` (the registry key), ``needs`` (``"gradients"``, ``"embeds"``, ``"attention"`` or
    ``"ids"``: what the pass needs from the model, so non-hf backends are refused by name), ``linear`` (linear in
    F: a contrast flips the sign), ``uses_baseline`` (the result records ``baseline``), ``parameter_constraints``
    (the options' table), ``renamed`` (old option name → new, accepted by :func:`lensbench.attribute` with a
    ``FutureWarning``).
    """

    name: ClassVar[str] = ""
    needs: ClassVar[str] = "embeds"
    linear: ClassVar[bool] = False
    uses_baseline: ClassVar[bool] = False
    parameter_constraints: ClassVar[dict[str, list]] = {}
    renamed: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        check_params(self.parameter_constraints, self.options(), caller=type(self).__name__)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def options(self) -> dict[str, Any]:
        """The method's options, name → value."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def settings(self) -> dict[str, Any]:
        """The options recorded in ``result.settings`` (JSON-able values: no tensors or callables)."""
        return {k: v for k, v in self.options().items()
                if v is None or isinstance(v, (bool, int, float, str))}

    def baseline_kind(self) -> str:
        """The recorded baseline ("" for methods without one)."""
        return ""

    def check(self, m: LensModel, call: Call) -> None:
        """Refuse, before any model pass, what this method cannot do (a backend, a contrast, an objective)."""
        if self.needs != "ids":
            _require_hf(m, f"attribute(method={self.name!r})", _NEEDS_WHY[self.needs])

    def run(self, m: LensModel, ids: torch.Tensor, targets: list[tuple[int, int]], call: Call) -> Scores:
        """Scores of each target ``(position, token id)`` over the tokens ``ids[:position]`` of ``ids`` ``[T]``."""
        raise NotImplementedError


def register(cls: type[AttributionMethod] | None = None, *, replace: bool = False):
    """Register an :class:`AttributionMethod` subclass under its ``name`` (usable as a decorator).

    A name already taken is an error unless ``replace=True``.
    """

    def deco(c: type[AttributionMethod]) -> type[AttributionMethod]:
        if not (isinstance(c, type) and issubclass(c, AttributionMethod)) or not c.name:
            raise TypeError(f"register: {c!r} is not an AttributionMethod subclass with a name")
        if c.name in _REGISTRY and _REGISTRY[c.name] is not c and not replace:
            raise InputError(f"register: an attribution method named {c.name!r} exists "
                             f"({_REGISTRY[c.name].__name__}); pass replace=True to replace it.")
        _REGISTRY[c.name] = c
        return c

    return deco if cls is None else deco(cls)


def unregister(name: str) -> None:
    """Remove a registered method (for methods registered by the user)."""
    _REGISTRY.pop(name, None)


def method_class(name: str) -> type[AttributionMethod]:
    """The registered class of ``name``; an unknown name is an :class:`InputError` listing the known ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise InputError(f"method={name!r} is unknown; choose one of {tuple(_REGISTRY)} "
                         "or pass an AttributionMethod object.")
    return _REGISTRY[name]


def get_method(method: str | AttributionMethod, *, caller: str = "get_method", **options) -> AttributionMethod:
    """An :class:`AttributionMethod` object from a registered name and its options (or an object, with
    ``options`` replacing some of its own). An option the method does not take is an :class:`InputError` naming
    the method and the option; bad values name the option, the value and what is allowed."""
    if isinstance(method, AttributionMethod):
        cls, base = type(method), method.options()
    else:
        cls, base = method_class(method), {}
    names = cls.option_names()
    unknown = [k for k in options if k not in names]
    if unknown:
        took = ", ".join(f"{n}=" for n in names) or "none"
        raise InputError(f"{caller}: method={cls.name!r} takes no option {unknown[0]}= (its options: {took}).")
    check_params(cls.parameter_constraints, options, caller=f"{caller}(method={cls.name!r})")
    return cls(**{**base, **options})


class _Names(Sequence):
    """A live, read-only view of registered method names (optionally those whose class meets ``keep``)."""

    def __init__(self, keep=None):
        self._keep = keep

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, c in _REGISTRY.items() if self._keep is None or self._keep(c))

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __eq__(self, other) -> bool:
        return self._names() == tuple(other) if isinstance(other, (tuple, list, _Names)) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


METHODS = _Names()                                                  #: every registered method name
GRADIENT_METHODS = _Names(lambda c: c.needs == "gradients")         #: methods that take gradients
LINEAR_METHODS = _Names(lambda c: c.linear)                          #: linear in F: a contrast flips the sign

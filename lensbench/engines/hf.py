"""The in-process engine: batched ``generate`` reusing one prefix KV cache, and span scoring (lensbench.engine)."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InputError


class HF:
    """The default engine: the model in this process (``lensbench.engine.sample`` / ``score_spans``)."""

    name = "hf"

    def sample(self, req) -> list[list[int]]:
        from ..engine import sample
        return sample(req)

    def score(self, m, seqs: Sequence[Sequence[int]], n_span: Sequence[int], *, batch_size="auto"):
        from ..engine import score_spans
        return score_spans(m, seqs, n_span, batch_size=batch_size)

    @property
    def reuses_prefix_state(self) -> bool:
        return True

    def describe(self) -> dict:
        return {"engine": "hf"}

    def __repr__(self) -> str:
        return "HF()"


def resolve_engine(engine) -> object:
    """``None``/``"hf"`` → :class:`HF`; an engine object (``VLLM(...)``) passes through."""
    if engine is None or engine == "hf":
        return HF()
    if hasattr(engine, "sample") and hasattr(engine, "score") and hasattr(engine, "describe"):
        return engine
    raise InputError(f"engine={engine!r} is not an engine; pass 'hf' (in-process, default) or "
                     "lb.engines.VLLM(url, model=...).")

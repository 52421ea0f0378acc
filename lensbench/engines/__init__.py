"""Engines that generate and score for the probes: the in-process :class:`HF` engine (default) and :class:`VLLM`,
a client of a vLLM OpenAI-compatible server (continuous batching, prefix caching, tensor/pipeline parallelism),
with :func:`vllm_server` to start one. Every engine has the same two calls, so results do not depend on which
ran them (beyond sampling noise): ``sample(req) -> generated ids per row`` and ``score(m, seqs, n_span)``.
"""

from __future__ import annotations

from .hf import HF, resolve_engine
from .vllm import VLLM, EngineError, vllm_server

__all__ = ["HF", "VLLM", "vllm_server", "EngineError", "resolve_engine"]

"""Shared fixtures: the real default model and tiny random models of every architecture in the matrix."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
# one torch thread per xdist worker (`-n 2` on 2 cores: 2 workers x 2 OpenMP threads spin-wait on each other)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

import lensbench as lb  # noqa: E402
from lensbench.testing import ARCHITECTURES, tiny_model  # noqa: E402

ARCHS = sorted(ARCHITECTURES)
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct in float32 (loaded once per worker)."""
    return lb.load()


@pytest.fixture(scope="session")
def tiny():
    """Factory ``tiny(arch, dtype)`` of validated LensModels, cached per session."""
    cache = {}

    def make(arch: str = "llama", dtype=torch.float32):
        key = (arch, dtype)
        if key not in cache:
            cache[key] = lb.load(*tiny_model(arch, dtype=dtype))
        return cache[key]
    return make


@pytest.fixture(scope="session")
def saved_tiny(tmp_path_factory):
    """A tiny llama saved to a local directory as safetensors (model + tokenizer)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    model, tok = tiny_model("llama")
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d

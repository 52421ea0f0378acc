"""The options glossary covers every option that two public probes share, and names nothing that no probe takes."""

from __future__ import annotations

import collections
import inspect
import re
from pathlib import Path

import lensbench as lb

ROOT = Path(__file__).resolve().parents[1]
GLOSSARY = ROOT / "docs" / "options.md"
NOT_OPTIONS = {"m", "m_pos", "m_neg", "result", "prompt", "response", "kw", "from_pretrained_kw"}


def _probes():
    out = {}
    for name in lb.__all__:
        fn = getattr(lb, name)
        if inspect.isfunction(fn) and name != "load" and fn.__module__.startswith("lensbench.probes"):
            out[name] = inspect.signature(fn)
    return out


def _documented() -> set[str]:
    heads = re.findall(r"^### (.+)$", GLOSSARY.read_text(), flags=re.M)
    return {w.strip() for h in heads for w in h.split("/")}


def test_every_shared_option_is_explained_once():
    uses = collections.Counter(p for sig in _probes().values() for p in sig.parameters if p not in NOT_OPTIONS)
    shared = {p for p, n in uses.items() if n >= 2}
    assert len(shared) > 10, shared  # the probes do share a vocabulary
    missing = shared - _documented()
    assert not missing, f"docs/options.md lacks {sorted(missing)}"
    heads = re.findall(r"^### (.+)$", GLOSSARY.read_text(), flags=re.M)
    assert len(heads) == len(set(heads)), "an option is explained twice"


def test_glossary_names_only_real_options():
    taken = {p for sig in _probes().values() for p in sig.parameters}
    extra = _documented() - taken
    assert not extra, f"docs/options.md explains options no public probe takes: {sorted(extra)}"

"""What every figure module shares."""

from __future__ import annotations


def _clean(tok: str) -> str:
    """A token as a readable label: newlines and tabs escaped."""
    return tok.replace("\n", "\\n").replace("\t", "\\t")

"""Sample texts written for this project (no downloaded corpora) for sweeps and tuned-lens training."""

from __future__ import annotations

from importlib import resources


def sample_texts(n: int | None = None) -> list[str]:
    """The shipped paragraphs-groups, one string per file (sorted by name); ``n`` limits the count."""
    files = sorted(p for p in resources.files(__package__).joinpath("texts").iterdir() if p.name.endswith(".txt"))
    texts = [f.read_text(encoding="utf-8").strip() for f in files]
    return texts[:n] if n is not None else texts


MULTILINGUAL_PROMPTS = {
    "fr": 'Français: "fleur" - 中文: "',
    "de": 'Deutsch: "Wasser" - English: "',
    "es": 'Español: "libro" - English: "',
}

"""Text edits for the filler ablation: units (words / single punctuation marks with their leading whitespace),
token classes (punctuation, stop words, articles, commas), and removing units from a text."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from ...errors import InputError

ARTICLES = frozenset({"a", "an", "the"})
CLASSES = ("punctuation", "stopwords", "articles", "commas")
_UNIT = re.compile(r"(\s*)(\w+(?:['’]\w+)*|[^\w\s])")


#: "system", "fire", "bill", "interest", "amount", "found", "call", ... — removing those deletes content, not
#: filler. Close in spirit to NLTK's English list (function words only), which is what "removing stopwords" means
#: in LLM-Microscope's ablation (determiners, articles, punctuation: "tokens often seen as minor").
FUNCTION_WORDS = frozenset("""
a an the this that these those each every either neither some any no all both several enough such what which
whose whatever whichever another other others
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she her hers
herself it its itself they them their theirs themselves who whom whoever whomever oneself
someone somebody something anyone anybody anything everyone everybody everything nobody nothing none
about above across after against along amid among amongst around as at before behind below beneath beside
besides between beyond by despite down during except for from in inside into near of off on onto out outside
over per since than through throughout till to toward towards under underneath unlike until up upon via with
within without
and but or nor so yet because although though while whereas if unless whether once lest when whenever where
wherever whereby wherein why how
am is are was were be been being have has had having do does did doing will would shall should can could may
might must ought
isn't aren't wasn't weren't hasn't haven't hadn't doesn't don't didn't won't wouldn't shan't shouldn't can't
cannot couldn't mightn't mustn't
not also just only even too very then there here
""".split())
STOPWORD_SOURCES = ("function", "sklearn")


def stop_words(source: str = "function") -> frozenset[str]:
    """The stop-word list of the ``"stopwords"`` class.

    ``"function"`` (default): :data:`FUNCTION_WORDS`, a closed-class function-word list. ``"sklearn"``:
    scikit-learn's ``ENGLISH_STOP_WORDS`` (318 words, ships offline; the old default — it also holds
    numerals and content words such as "one", "fifty", "system", "fire", "bill", "interest", "amount").
    """
    if source == "function":
        return FUNCTION_WORDS
    if source == "sklearn":
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
        return frozenset(ENGLISH_STOP_WORDS)
    raise InputError(f"stop-word source {source!r}; use one of {STOPWORD_SOURCES} or pass a list of words.")


def split_units(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, piece)`` of every unit; ``text[start:end]`` is the unit with its leading whitespace.

    Trailing whitespace of the text is not part of any unit (it is kept by :func:`remove_units`).
    """
    return [(mt.start(), mt.end(), mt.group(2)) for mt in _UNIT.finditer(text)]


def is_punctuation(piece: str) -> bool:
    return len(piece) == 1 and unicodedata.category(piece).startswith("P")


def _class_test(name: str, stopwords: frozenset[str]):
    if name == "punctuation":
        return is_punctuation
    if name == "stopwords":
        return lambda p: p.lower() in stopwords
    if name == "articles":
        return lambda p: p.lower() in ARTICLES
    if name == "commas":
        return lambda p: p == ","
    raise InputError(f"classes contains {name!r}; known classes are {CLASSES} or combinations of them such as "
                     "('punctuation', 'stopwords') or 'punctuation+stopwords'.")


def normalize_classes(classes) -> list[tuple[str, tuple[str, ...]]]:
    """``[(label, (class, ...)), ...]`` from ``("punctuation", ("punctuation", "stopwords"), "a+b", ...)``."""
    if isinstance(classes, str):
        classes = (classes,)
    if not isinstance(classes, (list, tuple)) or not classes:
        raise InputError(f"classes must be a non-empty tuple of class names from {CLASSES} (or tuples / '+'-joined "
                         f"names for combinations), got {classes!r}.")
    out = []
    for c in classes:
        parts = tuple(c.split("+")) if isinstance(c, str) else tuple(c) if isinstance(c, (list, tuple)) else None
        if not parts or not all(isinstance(p, str) and p for p in parts):
            raise InputError(f"classes contains {c!r}; use a class name from {CLASSES}, a '+'-joined name or a "
                             "tuple of names.")
        for p in parts:
            _class_test(p, frozenset())
        out.append(("+".join(parts), parts))
    return out


def class_mask(units: Sequence[tuple[int, int, str]], parts: Sequence[str], stopwords: frozenset[str]) -> list[bool]:
    tests = [_class_test(p, stopwords) for p in parts]
    return [any(t(piece) for t in tests) for _, _, piece in units]


def remove_units(text: str, units: Sequence[tuple[int, int, str]], drop: Sequence[bool]) -> str:
    """``text`` without the dropped units. A dropped unit's leading whitespace moves to the next kept unit when
    that one had none (``"word (see"`` minus ``(`` gives ``"word see"``)."""
    out, pending, pos = [], "", 0
    for (s, e, piece), d in zip(units, drop):
        out.append(text[pos:s])  # inter-unit text (none for a regex match sequence) kept verbatim
        ws = text[s:e - len(piece)]
        if d:
            pending = pending or ws
        else:
            out.append((ws or pending) + piece)
            pending = ""
        pos = e
    out.append(text[pos:])
    res = "".join(out)
    return res.lstrip() if drop and drop[0] and not text[:1].isspace() else res

"""The widgets' shared chrome: error and status messages, progress lines, placeholders and DOM classes.

Every explorer shows bad input in its ``error`` area with :func:`error_html`; the Workbench shows job outcomes
with :func:`status_html` and its progress line with :func:`progress_html`. No widget writes this markup itself.
"""

from __future__ import annotations

import html

import ipywidgets as W

import lensbench as lb

__all__ = ["USER_ERRORS", "error_html", "status_html", "progress_html", "placeholder_html", "tag"]

#: Exceptions that mean "this input cannot be used": shown as their message alone (no type name).
USER_ERRORS: tuple[type[Exception], ...] = (lb.LensbenchError, ValueError)

_KINDS = {  # kind -> (colour, icon)
    "error": ("#b00", "⚠"),
    "busy": ("#a60", "⏳"),
    "cancelled": ("#a60", "■"),
}


def status_html(text: str, kind: str = "error") -> str:
    """One message line: ``kind`` is ``"error"``, ``"busy"``, ``"cancelled"`` (coloured, with an icon) or
    ``"note"`` (small print). ``text`` is escaped."""
    if kind == "note":
        return f"<small>{html.escape(text)}</small>"
    colour, icon = _KINDS[kind]
    return f"<span style='color:{colour}'>{icon} {html.escape(text)}</span>"


def error_html(error: BaseException | str) -> str:
    """An error message: the text of a :data:`USER_ERRORS` exception (or a plain string); any other exception
    is prefixed with its type name (``RuntimeError: boom``)."""
    if isinstance(error, BaseException) and not isinstance(error, USER_ERRORS):
        error = f"{type(error).__name__}: {error}"
    return status_html(str(error), "error")


def progress_html(label: str, *, outcome: str | None = None, passes: int | None = None,
                  seconds: float | None = None) -> str:
    """A job's progress line: ``label…`` when nothing is counted yet, else
    ``label[: outcome] · N forward passes · t s``."""
    if passes is None:
        return status_html(f"{label}…", "note")
    head = label if outcome is None else f"{label}: {outcome}"
    return status_html(f"{head} · {passes} forward passes · {seconds or 0.0:.1f} s", "note")


def placeholder_html(text: str) -> str:
    """Italic stand-in text for a view that has nothing to show yet."""
    return f"<i>{html.escape(text)}</i>"


def tag(*pairs: tuple[W.DOMWidget, str]) -> None:
    """Give each widget its DOM class (``(widget, "lb-...")`` pairs); the browser tests select by these."""
    for widget, cls in pairs:
        widget.add_class(cls)

"""Generate ``docs/api.md``: a one-page API reference from the docstrings of ``lensbench.__all__`` and
``lensbench.widgets.__all__``.

    python scripts/api_docs.py            # (re)write docs/api.md
    python scripts/api_docs.py --check    # exit 1 if docs/api.md differs from what the docstrings give

The output is deterministic (no memory addresses, names in ``__all__`` order) so a test can compare it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"
_ADDR = re.compile(r" at 0x[0-9a-fA-F]+")
_SECTION = re.compile(r"^(Args|Arguments|Attributes|Returns|Raises|Yields|Examples?|Notes?):\s*$")


def _sig(obj) -> str:
    try:
        s = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return _ADDR.sub("", s)


def _doc(obj, first_paragraph: bool = False) -> str:
    doc = inspect.getdoc(obj) or ""
    if first_paragraph:
        return doc.split("\n\n")[0].replace("\n", " ").strip()
    out, in_section = [], False
    for line in doc.splitlines():
        if _SECTION.match(line):
            out += ["", f"**{line.strip()[:-1]}**", ""]
            in_section = True
            continue
        if in_section and line.startswith("    ") and not line.startswith("        "):
            item = line.strip()
            m = re.match(r"^([\w*, .]+?)(\s*\([^)]*\))?:\s+(.*)$", item)
            out.append(f"- `{m.group(1)}`{m.group(2) or ''}: {m.group(3)}" if m else f"- {item}")
        elif in_section and line.startswith("        "):
            out[-1] += " " + line.strip()
        else:
            if in_section and line.strip():
                in_section = False
            out.append(line[4:] if line.startswith("    ") and line.lstrip().startswith(">>>") else line)
    text = "\n".join(out).strip()
    return _ADDR.sub("", text)


def _members(cls) -> list[tuple[str, object]]:
    out = []
    for name, val in cls.__dict__.items():
        if name.startswith("_"):
            continue
        if isinstance(val, (staticmethod, classmethod)):
            val = val.__func__
        if inspect.isfunction(val) or isinstance(val, property):
            out.append((name, val))
    return out


def _entry(qual: str, obj) -> list[str]:
    lines: list[str] = []
    if inspect.ismodule(obj):
        lines += [f"### `{qual}` (module)", "", _doc(obj, True), ""]
        names = getattr(obj, "__all__", None) or [n for n, v in vars(obj).items()
                                                   if inspect.isfunction(v) and v.__module__ == obj.__name__
                                                   and not n.startswith("_")]
        for n in names:
            lines += [f"- `{qual}.{n}{_sig(getattr(obj, n))}`: {_doc(getattr(obj, n), True)}"]
        return lines + [""]
    if inspect.isclass(obj):
        lines += [f"### `{qual}{_sig(obj)}`", "", _doc(obj), ""]
        if dataclasses.is_dataclass(obj) and not (inspect.getdoc(obj) or "").count("Attributes"):
            fields = ", ".join(f"`{f.name}`" for f in dataclasses.fields(obj))
            lines += [f"Fields: {fields}", ""]
        for name, val in _members(obj):
            if isinstance(val, property):
                lines.append(f"- `.{name}` (property): {_doc(val.fget, True)}")
            else:
                sig = _sig(val).replace("(self, ", "(").replace("(self)", "()")
                lines.append(f"- `.{name}{sig}`: {_doc(val, True)}")
        return lines + [""]
    if callable(obj):
        return [f"### `{qual}{_sig(obj)}`", "", _doc(obj), ""]
    return [f"### `{qual}`", "", f"`{_ADDR.sub('', repr(obj))[:200]}`", ""]


def generate() -> str:
    import lensbench.widgets as lw

    import lensbench as lb
    lines = ["# lensbench API reference", "",
             "Generated from the docstrings by `python scripts/api_docs.py` — do not edit by hand; a test checks "
             "that this page is up to date.", "",
             "```python", "import lensbench as lb", "from lensbench.widgets import Workbench  # Jupyter layer",
             "```", "", "## `lensbench`", ""]
    lines += [f"- [`{n}`](#{n.lower()})" for n in lb.__all__] + [""]
    for name in lb.__all__:
        lines += _entry(f"lb.{name}" if not inspect.isclass(getattr(lb, name)) else name, getattr(lb, name))
    lines += ["## `lensbench.widgets`", "", _doc(lw, True), ""]
    for name in lw.__all__:
        lines += _entry(name, getattr(lw, name))
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    args = ap.parse_args(argv)
    text = generate()
    if args.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run `python scripts/api_docs.py` and commit it.")
            return 1
        print(f"{OUT.relative_to(ROOT)} is up to date")
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

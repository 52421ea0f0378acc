"""Real JupyterLab + headless Chromium: the ``Workbench`` of ``tests/assets/browser_workbench.ipynb`` on the
default model. Open it, type a sentence and press Run (the lens redraws for it), switch to the geometry tab and back,
move the lens position slider and follow the "Attribute position p →" link: the attribution tab shows the
prediction made at p (sources = tokens 0..p, their text + the target = the start of the sentence). No cell error,
no uncaught page error, no console error.

Screenshots go to ``test-artifacts/browser/``; the ``gallery-*.png`` ones (the Workbench element only) feed the
README gallery (copies in ``docs/img/``)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

try:  # plain `tests/` dir on sys.path (rootdir-relative import) or `tests` as a package
    from browser_harness import ACTIVE_NOTEBOOK, lab_server, skip_module_without_chromium, wait_for_plot_title
except ImportError:  # pragma: no cover
    from tests.browser_harness import (
        ACTIVE_NOTEBOOK,
        lab_server,
        skip_module_without_chromium,
        wait_for_plot_title,
    )

ASSET = Path(__file__).resolve().parent / "assets" / "browser_workbench.ipynb"

skip_module_without_chromium()
pytestmark = pytest.mark.browser

WB = f"{ACTIVE_NOTEBOOK} .lb-workbench"
LENS = f"{WB} .lb-lens-explorer"
ATT = f"{WB} .lb-attribution-explorer"
GEO = f"{WB} .lb-geometry-explorer"
SENTENCE = "The Eiffel Tower is in the city of Paris"
RUN_TIMEOUT_S = 600
WAIT_MS = 300_000

_JS_XTICKS = "(sel) => Array.from(document.querySelectorAll(sel + ' .xtick text')).map(t => t.textContent)"
_JS_SPANS = ("(sel) => Array.from(document.querySelectorAll(sel + ' .lb-attr-main span.lb-src'))"
             ".map(s => s.textContent)")


def _gallery(lab, root, name: str) -> None:
    """Screenshot of the Workbench element only (for the README gallery) plus the usual viewport one."""
    root.scroll_into_view_if_needed()
    lab.artifacts_dir.mkdir(parents=True, exist_ok=True)
    root.screenshot(path=str(lab.artifacts_dir / f"gallery-workbench-{name}.png"))
    lab.screenshot(root.page, f"workbench-{name}")


def _nudged_wait(lab, page, root_sel: str, js: str, arg, what: str, timeout_s: float = 300.0) -> None:
    """``page.wait_for_function(js, arg)``; every 20 s scroll ``root_sel`` into view and send a window resize
    (plotly redraws on resize) — under heavy load the first draw of a FigureWidget can be lost (the same nudge as
    tests/test_browser_lens.py). On failure save a screenshot and the plot markup."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            page.wait_for_function(js, arg=arg, timeout=20_000)
            return
        except PlaywrightTimeout:
            page.locator(root_sel).first.scroll_into_view_if_needed()
            page.evaluate("window.dispatchEvent(new Event('resize'))")
    lab.screenshot(page, "workbench-00-timeout")
    svgs = page.evaluate("(sel) => Array.from(document.querySelectorAll(sel + ' .main-svg')).map("
                         "s => s.outerHTML.slice(0, 400))", root_sel)
    pytest.fail(f"{what} not seen in {root_sel} within {timeout_s:.0f} s; plot markup: {svgs}")


def _wait_title(lab, page, root_sel: str, pattern: str) -> str:
    js = ("([sel, pat]) => { const r = document.querySelector(sel); if (!r) return false;"
          " return Array.from(r.querySelectorAll('.gtitle')).some(t => new RegExp(pat).test(t.textContent)); }")
    _nudged_wait(lab, page, root_sel, js, [root_sel, pattern], f"a plot title matching {pattern!r}")
    return wait_for_plot_title(page, root_sel, pattern)


def _tab(page, name: str):
    return page.locator(f"{WB} .lb-wb-tabs .lm-TabBar-tab", has_text=name).first


def test_workbench_type_switch_tabs_and_follow_the_lens_link(tmp_path):
    with lab_server(tmp_path, ASSET) as lab:
        page = lab.open_notebook(ASSET.name)
        lab.run_all(page, timeout_s=RUN_TIMEOUT_S)
        errors = lab.cell_errors(page)
        assert not errors, "notebook cells raised:\n\n" + "\n\n".join(errors)

        root = page.locator(WB).first
        root.wait_for(state="attached", timeout=WAIT_MS)
        page.locator(f"{LENS} .main-svg").first.wait_for(state="attached", timeout=WAIT_MS)
        _wait_title(lab, page, LENS, r"^logit lens")

        # 1. type a sentence, press Run: the lens heatmap is redrawn for its tokens
        box = root.locator(".lb-wb-text textarea").first
        box.fill(SENTENCE)
        root.locator("button.lb-wb-run").first.click()
        _nudged_wait(lab, page, LENS, f"(sel) => ({_JS_XTICKS})(sel).some(t => t.includes('Tower'))", LENS,
                     "the new sentence's tokens on the heatmap")
        page.wait_for_function(
            "(sel) => { const b = document.querySelector(sel); return b && !b.disabled; }",
            arg=f"{WB} button.lb-wb-run", timeout=WAIT_MS)  # the job ended
        assert not root.locator(".lb-wb-message").first.inner_text().strip(), "the app shows an error"
        assert "done" in root.locator(".lb-wb-progress-label").first.inner_text()
        _gallery(lab, root, "lens")

        # 2. switch tabs: geometry is built on first visit, then back to the lens
        _tab(page, "geometry").click()
        page.locator(f"{GEO} .main-svg").first.wait_for(state="attached", timeout=WAIT_MS)
        _wait_title(lab, page, GEO, r"^id per layer")
        _gallery(lab, root, "geometry")
        _tab(page, "lens").click()
        page.locator(f"{LENS} .noUi-handle").first.wait_for(state="visible", timeout=WAIT_MS)

        # 3. pick a position in the lens (two steps left of the last token) and follow the link to attribution
        ticks = [t for t in page.evaluate(_JS_XTICKS, LENS) if re.match(r"^\d+:", t)]  # heatmap: "i:token"
        p = len(ticks) - 3
        assert p > 0, ticks
        handle = page.locator(f"{LENS} .lb-position-slider .noUi-handle").first
        handle.focus()
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("ArrowLeft")
        link = root.locator("button.lb-wb-to-attribution").first
        page.wait_for_function(  # the kernel saw the slider move: the link names the new position
            "([sel, want]) => document.querySelector(sel).textContent.includes(want)",
            arg=[f"{WB} button.lb-wb-to-attribution", f"Attribute position {p} "], timeout=WAIT_MS)
        link.click()
        page.locator(f"{ATT} .lb-attr-main span.lb-src").first.wait_for(state="attached", timeout=WAIT_MS)
        assert "lm-mod-current" in (_tab(page, "attribution").get_attribute("class") or "")
        sources = page.evaluate(_JS_SPANS, ATT)
        target = page.locator(f"{ATT} .lb-attr-main code").first.text_content()
        assert len(sources) == p + 1, (p, sources)
        assert SENTENCE.startswith("".join(sources) + target), (sources, target)
        _gallery(lab, root, "attribution")

        assert not lab.cell_errors(page), "widget callbacks raised:\n\n" + "\n\n".join(lab.cell_errors(page))
        assert not lab.console_errors, "errors in the browser console:\n" + "\n".join(lab.console_errors)

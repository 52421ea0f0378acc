"""Real JupyterLab + headless Chromium: the ``Workbench`` of ``tests/assets/browser_workbench.ipynb`` on the
default model. Open it, type a sentence and press Run (the lens redraws for it), switch to the geometry tab and back,
move the lens position slider and follow the "Attribute position p →" link: the attribution tab shows the
prediction made at p (sources = tokens 0..p, their text + the target = the start of the sentence). No cell error,
no uncaught page error, no console error.

Screenshots go to ``test-artifacts/browser/``; the ``gallery-*.png`` ones (the Workbench element only) feed the
README gallery (copies in ``docs/img/``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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
    root.screenshot(path=str(lab.artifacts_dir / f"gallery-{name}.png"))
    lab.screenshot(page=root.page, name=f"workbench-{name}")


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
        wait_for_plot_title(page, LENS, r"^logit lens", timeout_ms=WAIT_MS)

        # 1. type a sentence, press Run: the lens heatmap is redrawn for its tokens
        box = root.locator(".lb-wb-text textarea").first
        box.fill(SENTENCE)
        root.locator("button.lb-wb-run").first.click()
        page.wait_for_function(f"(sel) => ({_JS_XTICKS})(sel).some(t => t.includes('Tower'))", arg=LENS,
                               timeout=WAIT_MS)
        page.wait_for_function(
            "(sel) => { const b = document.querySelector(sel); return b && !b.disabled; }",
            arg=f"{WB} button.lb-wb-run", timeout=WAIT_MS)  # the job ended
        assert not root.locator(".lb-wb-message").first.inner_text().strip(), "the app shows an error"
        assert "done" in root.locator(".lb-wb-progress-label").first.inner_text()
        _gallery(lab, root, "workbench-lens")

        # 2. switch tabs: geometry is built on first visit, then back to the lens
        _tab(page, "geometry").click()
        page.locator(f"{GEO} .main-svg").first.wait_for(state="attached", timeout=WAIT_MS)
        wait_for_plot_title(page, GEO, r"^id per layer", timeout_ms=WAIT_MS)
        _gallery(lab, root, "workbench-geometry")
        _tab(page, "lens").click()
        page.locator(f"{LENS} .noUi-handle").first.wait_for(state="visible", timeout=WAIT_MS)

        # 3. pick a position in the lens (two steps left of the last token) and follow the link to attribution
        handle = page.locator(f"{LENS} .lb-position-slider .noUi-handle").first
        handle.focus()
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("ArrowLeft")
        link = root.locator("button.lb-wb-to-attribution").first
        page.wait_for_function(
            "(sel) => /Attribute position \\d+/.test(document.querySelector(sel).textContent)",
            arg=f"{WB} button.lb-wb-to-attribution", timeout=WAIT_MS)
        p = int(re.search(r"Attribute position (\d+)", link.inner_text()).group(1))
        ticks = page.evaluate(_JS_XTICKS, LENS)
        assert ticks and p == len(ticks) - 3, (p, ticks)
        link.click()
        page.locator(f"{ATT} .lb-attr-main span.lb-src").first.wait_for(state="attached", timeout=WAIT_MS)
        assert "lm-mod-current" in (_tab(page, "attribution").get_attribute("class") or "")
        sources = page.evaluate(_JS_SPANS, ATT)
        target = page.locator(f"{ATT} .lb-attr-main code").first.text_content()
        assert len(sources) == p + 1, (p, sources)
        assert SENTENCE.startswith("".join(sources) + target), (sources, target)
        _gallery(lab, root, "workbench-attribution")

        assert not lab.cell_errors(page), "widget callbacks raised:\n\n" + "\n\n".join(lab.cell_errors(page))
        assert not lab.console_errors, "errors in the browser console:\n" + "\n".join(lab.console_errors)

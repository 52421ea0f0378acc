"""Real JupyterLab + headless Chromium: the ``FillerExplorer`` of ``tests/assets/browser_filler.ipynb`` renders
its ablation bars and sweep curves; switching the sweep metric redraws the sweep plot (new title, new y values),
and switching the class changes the struck-through words of the text view.  Screenshots / logs go to
``test-artifacts/browser/`` (``filler-01-rendered.png``, ``filler-02-metric.png``, ``filler-03-class.png``)."""

from __future__ import annotations

from pathlib import Path

import pytest

try:  # plain `tests/` dir on sys.path (rootdir-relative import) or `tests` as a package
    from browser_harness import (
        ACTIVE_NOTEBOOK,
        lab_server,
        plot_titles,
        skip_module_without_chromium,
        wait_for_plot_title,
    )
except ImportError:  # pragma: no cover
    from tests.browser_harness import (
        ACTIVE_NOTEBOOK,
        lab_server,
        plot_titles,
        skip_module_without_chromium,
        wait_for_plot_title,
    )

ASSET = Path(__file__).resolve().parent / "assets" / "browser_filler.ipynb"

skip_module_without_chromium()
pytestmark = pytest.mark.browser

ROOT = f"{ACTIVE_NOTEBOOK} .lb-filler-explorer"
RUN_TIMEOUT_S = 600

_JS_REMOVED = """
(sel) => Array.from(document.querySelectorAll(sel + ' del.lb-filler-removed')).map(d => d.textContent)
"""


def test_filler_explorer_renders_and_reacts():
    import tempfile
    with tempfile.TemporaryDirectory() as root, lab_server(root, ASSET) as lab:
        page = lab.open_notebook(ASSET.name)
        lab.run_all(page, timeout_s=RUN_TIMEOUT_S)
        errors = lab.cell_errors(page)
        assert not errors, "notebook cells raised:\n\n" + "\n\n".join(errors)

        root_el = page.locator(ROOT).first
        root_el.wait_for(state="attached", timeout=120_000)
        root_el.locator(".main-svg").first.wait_for(state="attached", timeout=180_000)
        try:
            wait_for_plot_title(page, ROOT, r"filler ablation", timeout_ms=300_000)
            before = wait_for_plot_title(page, ROOT, r"filler sweep · Δ log p", timeout_ms=300_000)
        except Exception:
            lab.screenshot(page, "filler-00-no-title")
            raise AssertionError(f"plot titles shown: {plot_titles(page, ROOT)}; svgs: "
                                 f"{root_el.locator('.main-svg').count()}") from None
        root_el.locator(".lb-filler-textview del.lb-filler-removed").first.wait_for(state="attached",
                                                                                    timeout=120_000)
        removed_before = page.evaluate(_JS_REMOVED, ROOT)
        assert removed_before, "the text view shows no removed words"
        root_el.scroll_into_view_if_needed()
        lab.screenshot(page, "filler-01-rendered")

        root_el.locator(".lb-filler-sweep-metric select").first.select_option(label="exact match")
        after = wait_for_plot_title(page, ROOT, r"filler sweep · greedy exact match", timeout_ms=300_000)
        assert after != before
        assert before not in plot_titles(page, ROOT), "the old sweep title is still shown"
        lab.screenshot(page, "filler-02-metric")

        root_el.locator(".lb-filler-class select").first.select_option(label="stopwords")
        page.wait_for_function(
            "([sel, old]) => { const d = Array.from(document.querySelectorAll(sel + ' del.lb-filler-removed'))"
            ".map(x => x.textContent); return JSON.stringify(d) !== JSON.stringify(old); }",
            arg=[ROOT, removed_before], timeout=120_000)
        removed_after = page.evaluate(_JS_REMOVED, ROOT)
        assert len(removed_after) > len(removed_before), (removed_before, removed_after)  # stopwords > punctuation
        lab.screenshot(page, "filler-03-class")

        assert not lab.cell_errors(page), "widget callbacks raised:\n\n" + "\n\n".join(lab.cell_errors(page))
        page_errors = [e for e in lab.console_errors if e.startswith("pageerror")]
        assert not page_errors, "uncaught errors in the page:\n" + "\n".join(page_errors)

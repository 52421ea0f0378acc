"""Real JupyterLab + headless Chromium: ``notebooks/00_tour.ipynb`` runs, its ``LogitLensExplorer`` renders,
and the layer slider and the target box redraw the plots.  Screenshots / logs go to ``test-artifacts/browser/``
(``lens-01-rendered.png``, ``lens-02-slider.png``, ``lens-03-target.png``)."""

from __future__ import annotations

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

REPO = Path(__file__).resolve().parents[1]
TOUR = REPO / "notebooks" / "00_tour.ipynb"

skip_module_without_chromium()
pytestmark = pytest.mark.browser

EXPLORER = f"{ACTIVE_NOTEBOOK} .lb-lens-explorer"


@pytest.fixture
def lab(tmp_path):
    with lab_server(tmp_path, TOUR) as server:
        yield server


def _wait_title(page, pattern: str, timeout_ms: int = 120_000) -> str:
    """Wait until some plotly title in the explorer matches the JS regex ``pattern``; return it."""
    return wait_for_plot_title(page, EXPLORER, pattern, timeout_ms)


def _wait_heatmap_image(lab, page, root, timeout_s: float = 240.0) -> None:
    """Wait for the heatmap's raster ``<image>``; every 20 s scroll the explorer into view and send a window resize
    (plotly redraws on resize) — under heavy CI load the first draw of a FigureWidget can be lost.  On failure save
    a screenshot and the explorer's plot markup for diagnosis."""
    images = root.locator("g.hm image, g.heatmaplayer image")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            images.first.wait_for(state="attached", timeout=20_000)
            return
        except PlaywrightTimeout:
            root.scroll_into_view_if_needed()
            page.evaluate("window.dispatchEvent(new Event('resize'))")
    lab.screenshot(page, "lens-00-no-heatmap-image")
    svgs = page.evaluate("(sel) => Array.from(document.querySelectorAll(sel + ' .main-svg')).map("
                         "s => s.outerHTML.slice(0, 600))", EXPLORER)
    pytest.fail(f"heatmap <image> never attached within {timeout_s:.0f} s; plot markup: {svgs}")


def test_tour_explorer_in_lab(lab):
    page = lab.open_notebook(TOUR.name)
    lab.run_all(page, timeout_s=600)
    errors = lab.cell_errors(page)
    assert not errors, "notebook cells raised:\n\n" + "\n\n".join(errors)

    root = page.locator(EXPLORER).first
    root.wait_for(state="attached", timeout=120_000)
    # heatmap rendered (plotly draws asynchronously inside the widget views)
    root.locator(".main-svg").first.wait_for(state="attached", timeout=180_000)
    _wait_heatmap_image(lab, page, root)
    topk_before = _wait_title(page, r"^layer 30 · pos ")
    heat_before = _wait_title(page, r" lens · ")
    assert "target: next token" in heat_before, heat_before
    root.scroll_into_view_if_needed()
    lab.screenshot(page, "lens-01-rendered")

    # layer slider: one step down redraws the top-k bar chart
    handle = root.locator(".lb-layer-slider .noUi-handle").first
    handle.focus()
    page.keyboard.press("ArrowLeft")
    topk_after = _wait_title(page, r"^layer 29 · pos ")
    assert topk_after != topk_before
    lab.screenshot(page, "lens-02-slider")

    # target box: recolour by p(" Paris") (retarget, no forward pass)
    box = root.locator(".lb-target-box input").first
    box.click()
    box.fill(" Paris")
    box.press("Enter")
    heat_after = _wait_title(page, r"target:  Paris|target probability")
    assert heat_after != heat_before
    assert "target probability" in heat_after and "Paris" in heat_after, heat_after
    lab.screenshot(page, "lens-03-target")

    errors = lab.cell_errors(page)
    assert not errors, "widget callbacks raised:\n\n" + "\n\n".join(errors)
    page_errors = [e for e in lab.console_errors if e.startswith("pageerror")]
    assert not page_errors, "uncaught errors in the page:\n" + "\n".join(page_errors)

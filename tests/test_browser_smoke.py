"""Real JupyterLab + headless Chromium: a FigureWidget heatmap driven by an IntSlider renders
and reacts to the slider.  Screenshots / logs go to ``test-artifacts/browser/``."""

from __future__ import annotations

from pathlib import Path

import pytest

try:  # plain `tests/` dir on sys.path (rootdir-relative import) or `tests` as a package
    from browser_harness import ACTIVE_NOTEBOOK, lab_server, skip_module_without_chromium
except ImportError:  # pragma: no cover
    from tests.browser_harness import ACTIVE_NOTEBOOK, lab_server, skip_module_without_chromium

ASSET = Path(__file__).resolve().parent / "assets" / "browser_smoke.ipynb"

skip_module_without_chromium()
pytestmark = pytest.mark.browser


@pytest.fixture
def lab(tmp_path):
    with lab_server(tmp_path, ASSET) as server:
        yield server


def test_figurewidget_heatmap_follows_slider(lab):
    page = lab.open_notebook(ASSET.name)
    lab.screenshot(page, "smoke-01-opened")

    lab.run_all(page, timeout_s=300)
    errors = lab.cell_errors(page)
    assert not errors, "notebook cells raised:\n\n" + "\n\n".join(errors)

    box = page.locator(f"{ACTIVE_NOTEBOOK} .lb-test-box")
    box.wait_for(state="visible", timeout=30_000)
    # plotly draws asynchronously inside the anywidget view
    box.locator(".main-svg").first.wait_for(state="attached", timeout=30_000)
    heatmap = box.locator("g.hm image")
    heatmap.first.wait_for(state="attached", timeout=30_000)
    title = box.locator(".gtitle").first
    title.wait_for(state="attached", timeout=30_000)
    assert title.text_content() == "layer = 0"
    z_before = heatmap.first.get_attribute("href") or heatmap.first.get_attribute("xlink:href")
    box.scroll_into_view_if_needed()
    lab.screenshot(page, "smoke-02-rendered")

    handle = box.locator(".lb-test-slider .noUi-handle").first
    handle.focus()
    page.keyboard.press("ArrowRight")

    page.wait_for_function(
        "(sel) => { const t = document.querySelector(sel); return t && t.textContent === 'layer = 1'; }",
        arg=f"{ACTIVE_NOTEBOOK} .lb-test-box .gtitle",
        timeout=20_000,
    )
    z_after = heatmap.first.get_attribute("href") or heatmap.first.get_attribute("xlink:href")
    assert z_after and z_after != z_before, "heatmap image did not change with the slider"
    lab.screenshot(page, "smoke-03-after-slider")

    page_errors = [e for e in lab.console_errors if e.startswith("pageerror")]
    assert not page_errors, "uncaught errors in the page:\n" + "\n".join(page_errors)

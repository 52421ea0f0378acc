"""Real JupyterLab + headless Chromium: ``notebooks/00_tour.ipynb`` runs, its ``LogitLensExplorer`` renders,
and the layer slider and the target box redraw the plots.  Screenshots / logs go to ``test-artifacts/browser/``
(``lens-01-rendered.png``, ``lens-02-slider.png``, ``lens-03-target.png``)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

try:  # plain `tests/` dir on sys.path (rootdir-relative import) or `tests` as a package
    from browser_harness import ACTIVE_NOTEBOOK, CHROMIUM_PATH, JupyterLab
except ImportError:  # pragma: no cover
    from tests.browser_harness import ACTIVE_NOTEBOOK, CHROMIUM_PATH, JupyterLab

REPO = Path(__file__).resolve().parents[1]
TOUR = REPO / "notebooks" / "00_tour.ipynb"
ARTIFACTS = Path(os.environ.get("LENSBENCH_BROWSER_ARTIFACTS", REPO / "test-artifacts" / "browser"))
IN_CI = bool(os.environ.get("CI"))

if not Path(CHROMIUM_PATH).exists() and not IN_CI:
    pytest.skip(f"Chromium not found at {CHROMIUM_PATH} (apt-get install chromium)", allow_module_level=True)

pytestmark = pytest.mark.browser

EXPLORER = f"{ACTIVE_NOTEBOOK} .lb-lens-explorer"

# Titles of the plotly figures inside the explorer, in DOM order.
_JS_TITLES = """
(sel) => {
  const root = document.querySelector(sel);
  if (!root) return [];
  return Array.from(root.querySelectorAll('.gtitle')).map(t => t.textContent);
}
"""


@pytest.fixture
def lab(tmp_path):
    if not Path(CHROMIUM_PATH).exists():  # only reachable in CI: fail loudly, never skip
        pytest.fail(
            f"Chromium not found at {CHROMIUM_PATH}: browser tests need it in CI - "
            "`apt-get install chromium` (or set LENSBENCH_CHROMIUM)",
            pytrace=False,
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("playwright is not installed: pip install 'lensbench[dev]'", pytrace=False)
        pytest.skip("playwright is not installed")
    shutil.copy(TOUR, tmp_path / TOUR.name)
    with JupyterLab(root_dir=tmp_path, artifacts_dir=ARTIFACTS) as server:
        yield server


def _titles(page) -> list[str]:
    return page.evaluate(_JS_TITLES, EXPLORER)


def _wait_title(page, pattern: str, timeout_ms: int = 30_000) -> str:
    """Wait until some plotly title in the explorer matches the JS regex ``pattern``; return it."""
    page.wait_for_function(
        "([sel, pat]) => { const r = document.querySelector(sel); if (!r) return false;"
        " return Array.from(r.querySelectorAll('.gtitle')).some(t => new RegExp(pat).test(t.textContent)); }",
        arg=[EXPLORER, pattern],
        timeout=timeout_ms,
    )
    return next(t for t in _titles(page) if re.search(pattern, t))


def test_tour_explorer_in_lab(lab):
    page = lab.open_notebook(TOUR.name)
    lab.run_all(page, timeout_s=240)
    errors = lab.cell_errors(page)
    assert not errors, "notebook cells raised:\n\n" + "\n\n".join(errors)

    root = page.locator(EXPLORER).first
    root.wait_for(state="attached", timeout=30_000)
    # heatmap rendered (plotly draws asynchronously inside the widget views)
    root.locator(".main-svg").first.wait_for(state="attached", timeout=60_000)
    root.locator("g.hm image, g.heatmaplayer image").first.wait_for(state="attached", timeout=60_000)
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

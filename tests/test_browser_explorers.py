"""Real JupyterLab + headless Chromium: the ``GeometryExplorer`` and ``AttributionExplorer`` of the small asset
notebook ``tests/assets/browser_explorers.ipynb`` render; switching the geometry view redraws the plot, and
clicking another generated token recolours the attributed text.  The notebook runs once per module.
Screenshots / logs go to ``test-artifacts/browser/`` (``geometry-01-rendered.png``, ``geometry-02-view.png``,
``attribution-01-rendered.png``, ``attribution-02-target.png``)."""

from __future__ import annotations

import ast
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

ASSET = Path(__file__).resolve().parent / "assets" / "browser_explorers.ipynb"

skip_module_without_chromium()
pytestmark = pytest.mark.browser

GEOMETRY = f"{ACTIVE_NOTEBOOK} .lb-geometry-explorer"
ATTRIBUTION = f"{ACTIVE_NOTEBOOK} .lb-attribution-explorer"
RUN_TIMEOUT_S = 600

# background colour of every highlighted source token, in order
_JS_SPAN_STYLES = """
(sel) => Array.from(document.querySelectorAll(sel + ' span.lb-src')).map(s => s.getAttribute('style'))
"""


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """(lab, page, cell errors) after Run All on the asset notebook (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("explorers")
    with lab_server(root, ASSET) as lab:
        page = lab.open_notebook(ASSET.name)
        lab.run_all(page, timeout_s=RUN_TIMEOUT_S)
        yield lab, page, lab.cell_errors(page)


def _no_page_errors(lab) -> None:
    page_errors = [e for e in lab.console_errors if e.startswith("pageerror")]
    assert not page_errors, "uncaught errors in the page:\n" + "\n".join(page_errors)


def test_geometry_explorer_view_switch(ran):
    lab, page, errors = ran
    assert not errors, "notebook cells raised:\n\n" + "\n\n".join(errors)

    root = page.locator(GEOMETRY).first
    root.wait_for(state="attached", timeout=120_000)
    root.locator(".main-svg").first.wait_for(state="attached", timeout=180_000)  # the plot's SVG
    root.locator(".scatterlayer .trace").first.wait_for(state="attached", timeout=120_000)
    before = wait_for_plot_title(page, GEOMETRY, r"^id per layer")
    assert not root.locator(".widget-html-content").first.inner_text().strip(), "explorer shows an error"
    root.scroll_into_view_if_needed()
    lab.screenshot(page, "geometry-01-rendered")

    view = root.locator(".lb-geo-view select").first
    view.select_option(label="cosine similarity")
    after = wait_for_plot_title(page, GEOMETRY, r"^cosine per layer")
    assert after != before
    assert not any(t == before for t in plot_titles(page, GEOMETRY)), "the old title is still shown"
    root.scroll_into_view_if_needed()
    lab.screenshot(page, "geometry-02-view")

    assert not lab.cell_errors(page), "widget callbacks raised:\n\n" + "\n\n".join(lab.cell_errors(page))
    _no_page_errors(lab)


def test_attribution_explorer_target_click(ran):
    lab, page, errors = ran
    assert not errors, "notebook cells raised:\n\n" + "\n\n".join(errors)

    root = page.locator(ATTRIBUTION).first
    root.wait_for(state="attached", timeout=120_000)
    buttons = root.locator(".lb-attr-targets button")
    buttons.first.wait_for(state="visible", timeout=120_000)
    assert buttons.count() == 3, f"expected one target button per generated token, got {buttons.count()}"
    main = root.locator(".lb-attr-main").first
    main.locator("span.lb-src").first.wait_for(state="attached", timeout=120_000)
    active = [i for i in range(3) if "mod-active" in (buttons.nth(i).get_attribute("class") or "")]
    assert active == [2], f"the last generated token should be the initial target, active buttons: {active}"
    html_before = main.inner_html()
    styles_before = page.evaluate(_JS_SPAN_STYLES, ATTRIBUTION + " .lb-attr-main")
    root.scroll_into_view_if_needed()
    lab.screenshot(page, "attribution-01-rendered")

    buttons.nth(0).click()
    page.wait_for_function(
        "([sel, old]) => { const r = document.querySelector(sel); return r && r.innerHTML !== old; }",
        arg=[ATTRIBUTION + " .lb-attr-main", html_before],
        timeout=120_000,
    )
    styles_after = page.evaluate(_JS_SPAN_STYLES, ATTRIBUTION + " .lb-attr-main")
    assert styles_after != styles_before, "the highlighted sources did not change with the target"
    # target 0 has fewer sources than target 2: the later (generated) tokens are not coloured for it
    assert styles_after[-1] and "transparent" in styles_after[-1], styles_after
    label = buttons.nth(0).inner_text()  # "0: ' Paris'"
    token = ast.literal_eval(label.split(": ", 1)[1])
    assert main.locator("code").first.text_content() == token, (label, main.inner_html()[:300])
    assert "mod-active" in (buttons.nth(0).get_attribute("class") or "")
    root.scroll_into_view_if_needed()
    lab.screenshot(page, "attribution-02-target")

    assert not lab.cell_errors(page), "widget callbacks raised:\n\n" + "\n\n".join(lab.cell_errors(page))
    _no_page_errors(lab)

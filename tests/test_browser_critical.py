"""Real JupyterLab + headless Chromium: the ``CriticalTokenExplorer`` of ``tests/assets/browser_critical.ipynb``
renders (one coloured button per response token, the success-rate curve), and clicking a token shows the
continuations sampled there, kept vs replaced, with verdicts. Screenshots / logs go to ``test-artifacts/browser/``
(``critical-01-rendered.png``, ``critical-02-clicked.png``)."""

from __future__ import annotations

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

ASSET = Path(__file__).resolve().parent / "assets" / "browser_critical.ipynb"
N_SAMPLES = 2  # as in the asset notebook

skip_module_without_chromium()
pytestmark = pytest.mark.browser

ROOT = f"{ACTIVE_NOTEBOOK} .lb-critical-explorer"
RUN_TIMEOUT_S = 600

_JS_BUTTON_COLOURS = """
(sel) => Array.from(document.querySelectorAll(sel + ' .lb-crit-token')).map(
    b => getComputedStyle(b).backgroundColor)
"""


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    root = tmp_path_factory.mktemp("critical")
    with lab_server(root, ASSET) as lab:
        page = lab.open_notebook(ASSET.name)
        lab.run_all(page, timeout_s=RUN_TIMEOUT_S)
        yield lab, page, lab.cell_errors(page)


def test_critical_explorer_click_shows_continuations(ran):
    lab, page, errors = ran
    assert not errors, "notebook cells raised:\n\n" + "\n\n".join(errors)

    root = page.locator(ROOT).first
    root.wait_for(state="attached", timeout=120_000)
    buttons = root.locator(".lb-crit-token")
    buttons.first.wait_for(state="visible", timeout=120_000)
    n = buttons.count()
    assert n >= 5, f"expected one button per response token, got {n}"
    root.locator(".main-svg").first.wait_for(state="attached", timeout=180_000)
    wait_for_plot_title(page, ROOT, r"^success rate per token")
    assert root.locator(".scatterlayer .trace").count() >= 2, "keep and replace curves (plus bands) expected"
    colours = page.evaluate(_JS_BUTTON_COLOURS, ROOT)
    assert len(colours) == n and all(c.startswith("rgb") for c in colours), colours
    detail = root.locator(".lb-crit-continuations").first
    assert "click a token" in detail.inner_text()
    root.scroll_into_view_if_needed()
    lab.screenshot(page, "critical-01-rendered")

    k = n - 2  # the token before the final "."
    label = buttons.nth(k).inner_text()
    buttons.nth(k).click()
    page.wait_for_function(
        "([sel, k]) => { const r = document.querySelector(sel + ' .lb-crit-continuations');"
        " return r && r.querySelector(`.lb-crit-unit[data-unit='${k}']`) !== null; }",
        arg=[ROOT, k],
        timeout=120_000,
    )
    rows = detail.locator("tr")
    assert rows.count() == 1 + N_SAMPLES, f"header + one row per sample expected, got {rows.count()}"
    keep_cells = detail.locator("td.lb-crit-keep")
    replace_cells = detail.locator("td.lb-crit-replace")
    assert keep_cells.count() == N_SAMPLES and replace_cells.count() == N_SAMPLES
    for i in range(N_SAMPLES):
        text = keep_cells.nth(i).inner_text()
        assert text[:1] in "✓✗", f"kept continuation {i} has no verdict: {text!r}"
        assert replace_cells.nth(i).inner_text()[:1] in "✓✗"
    shown = detail.locator("code").first.inner_text().strip("'\"")
    assert shown.strip() == label.strip(), (shown, label)  # the clicked token's text heads the panel
    border = buttons.nth(k).evaluate("b => getComputedStyle(b).borderTopStyle")
    assert border == "solid", "the clicked token is not highlighted"
    root.scroll_into_view_if_needed()
    lab.screenshot(page, "critical-02-clicked")

    assert not lab.cell_errors(page), "widget callbacks raised:\n\n" + "\n\n".join(lab.cell_errors(page))
    page_errors = [e for e in lab.console_errors if e.startswith("pageerror")]
    assert not page_errors, "uncaught errors in the page:\n" + "\n".join(page_errors)

"""JupyterLab in headless chromium runs a method notebook, and its slider moves the ID/OOD plot.

For each case the test copies the notebook (with a shorter schedule injected as papermill
parameters) into a fresh server's folder, waits for a real kernel, runs all cells, moves the
explorer's slider with the keyboard, and checks that

* the plot's title (SVG text) and the ``selected`` marker's position changed;
* the title's ID/OOD numbers are the ones the library wrote to the results store for that value;
* the browser contacted nothing but loopback, raised no page error, and left no process behind.

Screenshots before and after the move land in ``test-artifacts/browser/``.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import nbformat
import pytest

from rftlib.results import load

from .conftest import ARTIFACTS, ROOT, processes_mentioning

pytestmark = pytest.mark.browser

KERNEL_TIMEOUT_MS = 90_000
RUN_ALL_TIMEOUT_MS = 300_000
ARROW_PRESSES = 2

# notebook, its knob, shorter-than-default parameters (still the real methods on synthwild)
CASES = {
    "wiseft": ("alpha", {"epochs": 1, "grid_points": 11, "exact_subset": 200}),
    "drm": ("beta", {"epochs": 1, "grid_points": 11}),
}
LOOPBACK = re.compile(r"^(https?|wss?)://(127\.0\.0\.1|localhost)(:\d+)?/")
ERROR_OUTPUT = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"


def _prepare_notebook(name: str, folder: Path, parameters: dict) -> Path:
    """Copy ``notebooks/<name>.ipynb`` with ``parameters`` injected the way papermill does."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = parameterize_notebook(load_notebook_node(str(ROOT / "notebooks" / f"{name}.ipynb")), parameters)
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


def _title_pattern(knob: str) -> re.Pattern:
    return re.compile(rf"{knob}=(\d\.\d+) · ID (\d\.\d+) · OOD (\d\.\d+)")


def _stored_values(db: Path, method: str, knob: str, value: float) -> dict[str, float]:
    """``{split: macro_f1}`` the library recorded for ``knob == value`` (latest run)."""
    rows = load(db, method=method, metric="macro_f1")
    rows = rows[(rows[knob] - value).abs() < 1e-9]
    rows = rows[rows["run_id"] == rows["run_id"].iloc[-1]]
    return {split: float(rows[rows["split"] == split]["value"].iloc[-1]) for split in ("id_test", "test")}


def _run_all(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel:visible", has_text="Run All Cells").first.click()


def _wait_for_slider(page, timeout_ms: int) -> None:
    """Wait until the explorer's slider renders; fail at once on an error output or a dialog."""
    handle, error, dialog = page.locator(".widget-hslider .noUi-handle"), page.locator(ERROR_OUTPUT), \
        page.locator(".jp-Dialog")
    handle.or_(error).or_(dialog).first.wait_for(timeout=timeout_ms)
    if dialog.count():
        pytest.fail(f"JupyterLab opened a dialog instead of running: {dialog.first.inner_text()[:500]}")
    if error.count():
        pytest.fail(f"a cell wrote to stderr:\n{error.first.inner_text()[:3000]}")


@pytest.mark.parametrize("name", list(CASES))
def test_slider_moves_the_id_ood_plot(name, lab_server, chromium_path):
    from playwright.sync_api import expect, sync_playwright

    knob, parameters = CASES[name]
    db = lab_server.root / f"{name}.db"
    _prepare_notebook(name, lab_server.root, {**parameters, "results_db": str(db), "progress": "off"})
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pattern = _title_pattern(knob)
    outside, page_errors = [], []

    def guard(route):
        url = route.request.url
        if LOOPBACK.match(url) or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rft-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=chromium_path, headless=True, viewport={"width": 1280, "height": 900},
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            context.route("**/*", guard)
            page = context.pages[0] if context.pages else context.new_page()
            page.on("pageerror", lambda err: page_errors.append(str(err)))
            page.on("websocket", lambda ws: None if LOOPBACK.match(ws.url) else outside.append(ws.url))
            page.goto(f"{lab_server.url}/lab/tree/{name}.ipynb?reset")
            page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(timeout=KERNEL_TIMEOUT_MS)
            # the toolbar says "idle" before a kernel exists; the status bar does not
            expect(page.locator("#jp-main-statusbar")).to_contain_text("Python 3 (ipykernel) | Idle",
                                                                        timeout=KERNEL_TIMEOUT_MS)
            _run_all(page)
            _wait_for_slider(page, RUN_ALL_TIMEOUT_MS)

            explorer = page.locator(".widget-vbox").filter(has=page.locator(".widget-hslider"))
            expect(explorer).to_have_count(1)
            title, handle = explorer.locator(".js-plotly-plot .gtitle"), explorer.locator(".noUi-handle")
            readout = explorer.locator(".widget-hslider .widget-readout")
            expect(title).to_have_text(pattern, timeout=60_000)
            start_value = float(parameters.get(knob, 0.5))
            expect(readout).to_have_text(f"{start_value:.2f}")
            points = explorer.locator(".scatterlayer path.point")
            before_points = [points.nth(i).get_attribute("transform") for i in range(points.count())]
            before_title = title.text_content()
            page.wait_for_timeout(500)
            page.screenshot(path=ARTIFACTS / f"{name}_before.png")

            handle.focus()
            for _ in range(ARROW_PRESSES):
                page.keyboard.press("ArrowRight")
            moved_to = round(start_value + ARROW_PRESSES * 0.1, 2)
            expect(readout).to_have_text(f"{moved_to:.2f}")
            expect(title).to_contain_text(f"{knob}={moved_to:.2f}", timeout=30_000)
            after_points = [points.nth(i).get_attribute("transform") for i in range(points.count())]
            page.wait_for_timeout(500)
            page.screenshot(path=ARTIFACTS / f"{name}_after.png")
            after_title = title.text_content()
        finally:
            context.close()
        assert not processes_mentioning(profile), "chromium outlived its context"

    assert before_title != after_title
    assert before_points != after_points, "the selected marker did not move"
    shown = pattern.search(after_title)
    stored = _stored_values(db, name, knob, moved_to)
    assert (shown.group(2), shown.group(3)) == (f"{stored['id_test']:.3f}", f"{stored['test']:.3f}"), \
        f"plot shows {after_title!r}, the results store has {stored}"
    assert not outside, f"the browser tried to reach non-loopback addresses: {outside}"
    assert not page_errors, f"page errors: {page_errors}"
    print(f"{name}: {before_title!r} -> {after_title!r} in {time.monotonic() - start:.0f} s")

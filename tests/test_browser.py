"""Notebook 03 in a real browser: JupyterLab + headless Chromium, the window slider redraws the plot.

nbval proves every notebook runs in a kernel; this test proves what a reader sees. It starts
JupyterLab on a copy of notebooks/03_windowing.ipynb (so the browser's autosave never writes to the
repository), runs all cells through JupyterLab's own command, moves the window slider with the
keyboard and checks that the plotly figure's data follows it, then moves it again and re-runs the cells
that confirm the preview with the engine (they must run at the new window, without an error), and that
the page logged no errors.

It needs /usr/bin/chromium and the `playwright` package (the `test` extra); `.ci/run` installs
Chromium. Playwright drives the system Chromium: never `playwright install` (no browser downloads).
Set FLASHNB_SCREENSHOT=path.png to keep a screenshot of the slider and its plot (the README's tour
uses notebooks/images/03_windowing.png made this way).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "03_windowing.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Generous limits for a loaded 2-core machine; every wait below ends as soon as its condition holds.
SERVER_START_S = 120
KERNEL_READY_S = 120
RUN_ALL_S = 480  # the notebook itself (convert the model, two 48-token engine runs, a sweep)
REDRAW_S = 60

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium; .ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is absent (pip install -e '.[test]')")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server by its PID (SIGTERM: it shuts its kernels down), then its process group if needed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:  # anything the server started and left behind (a kernel) is in its process group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on 127.0.0.1:<free port>, root = a temporary directory holding a copy of notebook 03."""
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy2(NOTEBOOK, root / NOTEBOOK.name)
    home = tmp_path / "jupyter"  # config, data, settings and workspaces away from the user's own
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"))
    # No "get notified about Jupyter news?" toast over the notebook (and no news fetch).
    notification = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port = _free_port()
    log_path = tmp_path / "jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", "--ServerApp.token=", "--ServerApp.password=", "--allow-root",
           f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run cells through Lab's commands
           # No requests to the internet (this machine has none; CI need not either): no update check,
           # no news feed.
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url=None"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with direct.open(url + "api/status", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer in {SERVER_START_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.25)
        yield {"url": url, "root": root, "log": log_path}
    finally:
        _stop(proc)


# The plotly graph div in the cell output that holds the IntSlider described "window", looked up afresh
# on every call (widget views can be re-rendered, so no element handle is kept).
FIND_PLOT_JS = """(() => {
    for (const out of document.querySelectorAll('.jp-OutputArea-output')) {
        const labels = Array.from(out.querySelectorAll('.widget-slider .widget-label'));
        if (labels.some(l => /window/i.test(l.textContent))) return out.querySelector('.js-plotly-plot');
    }
    return null;
})()"""

# Its plotted data as JSON, so two states compare as strings: typed arrays made plain, and plotly's and
# the widget's private bookkeeping keys (`_doNotReportToPy`, set once a trace was updated from Python)
# left out. null until plotly has drawn the traces.
PLOT_DATA_JS = f"""() => {{
    const el = {FIND_PLOT_JS};
    if (!el || !Array.isArray(el.data) || el.data.length === 0 || !el.querySelector('g.trace')) return null;
    return JSON.stringify(el.data, (k, v) =>
        k.startsWith('_') ? undefined : ArrayBuffer.isView(v) ? Array.from(v) : v);
}}"""

KERNEL_IDLE_JS = """() => {
    const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const sc = w && w.sessionContext;
    const k = sc && sc.session && sc.session.kernel;
    return !!(w && w.content && w.content.widgets && sc.isReady && k && k.status === 'idle');
}"""

RUN_ALL_JS = """async () => {
    const app = window.jupyterapp;
    const ok = await app.commands.execute('notebook:run-all-cells');
    const nb = app.shell.currentWidget;
    const errors = [];
    let unrun = 0;
    for (const cell of nb.content.widgets) {
        if (cell.model.type !== 'code') continue;
        if (cell.model.executionCount === null) unrun += 1;
        for (const out of cell.model.toJSON().outputs || []) {
            if (out.output_type === 'error') errors.push(out.ename + ': ' + out.evalue);
        }
    }
    return {ok: ok, unrun: unrun, errors: errors};
}"""


def test_window_slider_redraws_plot(lab, tmp_path):
    console_errors: list[str] = []
    screenshot = tmp_path / "03_windowing.png"
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 1000})
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.on("console", lambda m: console_errors.append(f"console: {m.text} @ {m.location}")
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: console_errors.append(f"pageerror: {e}"))
            try:
                _run_all(page, lab)
                window = _move_slider(page, screenshot)
                _rerun_after_moving(page, window)
            except BaseException:
                page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                print(f"\nfailure screenshot: {tmp_path / 'failure.png'}\nserver log: {lab['log']}")
                raise
        finally:
            ctx.close()
    print(f"\nscreenshot: {screenshot}")
    if os.environ.get("FLASHNB_SCREENSHOT"):
        dest = Path(os.environ["FLASHNB_SCREENSHOT"]).resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, dest)
        print(f"screenshot copied to FLASHNB_SCREENSHOT={dest}")
    # Nothing is allow-listed: JupyterLab, ipywidgets and plotly's anywidget log no error on this path.
    assert not console_errors, "the page logged errors:\n" + "\n".join(console_errors)


def _run_all(page, lab) -> None:
    page.goto(lab["url"] + "lab/tree/" + NOTEBOOK.name, timeout=SERVER_START_S * 1000)
    page.wait_for_function(KERNEL_IDLE_JS, timeout=KERNEL_READY_S * 1000, polling=250)

    page.set_default_timeout(RUN_ALL_S * 1000)
    result = page.evaluate(RUN_ALL_JS)
    assert result["ok"] and not result["errors"] and result["unrun"] == 0, f"running all cells: {result}"
    page.wait_for_function(KERNEL_IDLE_JS, timeout=RUN_ALL_S * 1000, polling=250)
    page.set_default_timeout(REDRAW_S * 1000)


RERUN_JS = """async (marker) => {
    const app = window.jupyterapp;
    const nb = app.shell.currentWidget;
    const cells = nb.content.widgets;
    const i = cells.findIndex(c => c.model.type === 'code' && c.model.sharedModel.getSource().includes(marker));
    if (i < 0) return {found: false};
    nb.content.activeCellIndex = i;
    await app.commands.execute('notebook:run-cell');
    const outs = cells[i].model.toJSON().outputs || [];
    return {found: true, errors: outs.filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue),
            text: outs.map(o => [].concat(o.text || []).join('')).join('')};
}"""


def _rerun_after_moving(page, window: int) -> None:
    """Move the window slider one more step, then re-run the engine check and its assertion: they must run at
    the slider's new window (the notebook's store and recording are still there) without an error."""
    slider = page.locator(".widget-slider").filter(has=page.locator(".widget-label", has_text="window")).first
    handle, readout = slider.locator(".noUi-handle"), slider.locator(".widget-readout")
    smax = int(float(handle.get_attribute("aria-valuemax")))
    key, moved = ("ArrowRight", window + 1) if window < smax else ("ArrowLeft", window - 1)
    handle.focus()
    page.keyboard.press(key)
    sync_api.expect(readout).to_have_text(str(moved), timeout=REDRAW_S * 1000)
    page.wait_for_function(KERNEL_IDLE_JS, polling=250)
    page.set_default_timeout(RUN_ALL_S * 1000)
    confirm = page.evaluate(RERUN_JS, "w, b = slider.value, budget_slider.value")
    assert confirm["found"] and not confirm["errors"], confirm
    assert confirm["text"].startswith(f"window {moved} at "), confirm["text"]
    check = page.evaluate(RERUN_JS, "assert measured == replayed")
    assert check["found"] and not check["errors"] and "True" in check["text"], check
    page.wait_for_function(KERNEL_IDLE_JS, polling=250)
    page.set_default_timeout(REDRAW_S * 1000)


def _move_slider(page, screenshot: Path) -> int:
    """Move the window slider one step and back, checking the plot follows; returns the slider's value."""
    # The IntSlider whose description says "window", and the cell output that holds it and its plot.
    # (A `has=` locator is matched inside the element it filters, hence page.locator(...) built fresh.)
    window_slider = page.locator(".widget-slider").filter(has=page.locator(".widget-label", has_text="window"))
    output = page.locator(".jp-OutputArea-output").filter(has=window_slider).first   # the first: the preview
    sync_api.expect(output).to_have_count(1, timeout=REDRAW_S * 1000)
    slider = output.locator(".widget-slider").filter(has=page.locator(".widget-label", has_text="window"))
    sync_api.expect(slider).to_have_count(1, timeout=REDRAW_S * 1000)
    output.scroll_into_view_if_needed()
    plot = output.locator(".js-plotly-plot")
    sync_api.expect(plot).to_have_count(1, timeout=REDRAW_S * 1000)
    page.wait_for_function(PLOT_DATA_JS)  # data arrived and traces drawn

    handle = slider.locator(".noUi-handle")
    readout = slider.locator(".widget-readout")
    sync_api.expect(readout).to_have_text(re.compile(r"^\s*\d+\s*$"), timeout=REDRAW_S * 1000)   # rendered
    start = int(readout.text_content())   # the text the check above matched (innerText depends on layout:
                                          # it once came back empty here, on a loaded machine)
    smin, smax = (int(float(handle.get_attribute(a))) for a in ("aria-valuemin", "aria-valuemax"))
    assert smin <= start <= smax and smin < smax, (smin, start, smax)
    key, step = ("ArrowRight", 1) if start < smax else ("ArrowLeft", -1)
    back = "ArrowLeft" if key == "ArrowRight" else "ArrowRight"

    before = page.evaluate(PLOT_DATA_JS)
    handle.focus()
    page.keyboard.press(key)
    sync_api.expect(readout).to_have_text(str(start + step), timeout=REDRAW_S * 1000)
    # The kernel's observer redraws the FigureWidget; the browser receives the new data.
    page.wait_for_function(f"before => {{ const d = ({PLOT_DATA_JS})(); return d !== null && d !== before; }}",
                           arg=before, polling=100)
    moved = page.evaluate(PLOT_DATA_JS)
    assert moved is not None and moved != before
    assert len(json.loads(moved)) == len(json.loads(before)), "the redraw changed the number of traces"

    page.wait_for_function(KERNEL_IDLE_JS, polling=250)
    cell = page.locator(".jp-Cell").filter(has=window_slider).first
    cell.screenshot(path=str(screenshot))

    # And back: the plot returns to exactly what it showed at the start.
    handle.focus()
    page.keyboard.press(back)
    sync_api.expect(readout).to_have_text(str(start), timeout=REDRAW_S * 1000)
    page.wait_for_function(f"before => ({PLOT_DATA_JS})() === before", arg=before, polling=100)
    page.wait_for_function(KERNEL_IDLE_JS, polling=250)
    return start

"""End to end: the layer explorer in a real JupyterLab, driven by headless Chromium (Playwright).

JupyterLab runs on 127.0.0.1 on a free port with a random token, in a temporary folder holding a
copy of notebooks/12_explorer.ipynb with its smallest parameters injected (papermill's
parameterisation, no execution). Chromium opens it, runs all cells, waits for the explorer, changes
the layer selector and checks that the panels' pixels changed (the ipympl canvases' images, not just
a URL); then clicks the per-layer curve at a layer's point and a bar of the channel panel, and checks
that the selectors followed and that hovering shows the values. A second copy whose last cell
detaches the layer callback shows that the check catches a broken callback. Everything is shut down
afterwards (the server's shutdown API, then its process group).

Skipped only where Chromium (Debian's ``chromium``, /usr/bin/chromium) or Playwright is missing;
``.ci/run`` installs Chromium with apt-get. The screenshot of the explorer after the layer change
is written to results/browser/12_explorer_browser.png (or $TMLIB_SCREENSHOT_DIR).
"""

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tmlib.paths import project_root

ROOT = project_root(Path(__file__).parent)
CHROMIUM = os.environ.get("TMLIB_CHROMIUM", "/usr/bin/chromium")
# Flags that headless Chromium needs on the CI machines (no sandbox as root, no GPU, no network).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
PARAMETERS = {"n_train": 200, "epochs": 1, "n_samples": 20, "n_rotations": 4, "max_st_samples": 8,
              "report_layers": ["conv0"], "check_claims": False, "progress": False}
DONE = "tmlib: explorer notebook done"  # printed by the notebook's last cell
# Where a person would click: the point of layer conv1 on the curve, and the bar of rank 3 among
# conv1's channels (the same drawing function on a figure of the canvas's size), as fractions of the
# canvases; with the channel that bar stands for.
POINTS = """import json
from matplotlib.figure import Figure
def _where(fig, ax, x, y):
    px, py = ax.transData.transform((x, y))
    return [px / fig.bbox.width, 1 - py / fig.bbox.height]
_fig = explorer.curve.figure
_k = explorer.data.layers.index("conv1")
_curve = _where(_fig, _fig.axes[0], _k, float(explorer.data.results["NV"].layer_means()["conv1"]))
_bars = widgets.plot_channel_values(explorer.data, "NV", "conv1", 0, Figure(figsize=explorer.heatmap.figure.get_size_inches()))
_order = widgets.channel_order(explorer.data, "NV", "conv1")
print("POINTS", json.dumps({"curve": _curve, "bar": _where(_bars, _bars.axes[0], 3, 0.05), "channel": int(_order[3])}))"""
BREAK_CALLBACK = ('explorer.layer.unobserve(explorer._on_layer, names="value")\n'
                  'print("layer callback detached")')

if not Path(CHROMIUM).exists():
    pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium): the browser test of the "
                "layer explorer needs it", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright (pip, dev extra) is not installed")
papermill = pytest.importorskip("papermill")
nbformat = pytest.importorskip("nbformat")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_notebook(folder: Path, name: str, parameters: dict, extra_cell: str | None = None) -> str:
    nb = papermill.iorw.load_notebook_node(str(ROOT / "notebooks" / "12_explorer.ipynb"))  # adds the tags papermill wants
    nb = papermill.parameterize.parameterize_notebook(nb, parameters)
    if extra_cell:
        nb.cells.append(nbformat.v4.new_code_cell(extra_cell))
    nbformat.write(nb, folder / name)
    return name


def _api(base: str, token: str, path: str, method: str = "GET"):
    request = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read() or b"null")


class Lab:
    """A JupyterLab server of this virtual environment, isolated in a temporary folder."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.token = folder, _free_port(), secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        home = folder / ".jupyter-home"
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
               "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "IPYTHONDIR": str(home / "ipython"),
               "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "ws"),
               "OMP_NUM_THREADS": "2"}
        # No "get notified about Jupyter news?" toast over the explorer in the screenshot.
        news = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        news.parent.mkdir(parents=True)
        news.write_text(json.dumps({"fetchNews": "false"}))
        self.log = open(folder / "jupyter.log", "w")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
             "--port-retries=0", f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={folder}",
             # Nothing that would reach for the network: news, update checks, the PyPI extension manager.
             "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--LabApp.extension_manager=readonly", *(["--allow-root"] if os.geteuid() == 0 else [])],
            cwd=folder, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.process.returncode}:\n{self.logs()}")
            try:
                _api(self.base, self.token, "/api/status")
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"jupyter lab did not answer on port {self.port} in {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.folder / "jupyter.log").read_text()[-4000:]

    def url(self, notebook: str, workspace: str) -> str:
        return f"{self.base}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={self.token}"

    def stop(self) -> None:
        """Shut the server and its kernels down; kill the process group if it does not comply."""
        try:
            if self.process.poll() is None:
                _api(self.base, self.token, "/api/shutdown", method="POST")
                self.process.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
            self.log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lab")
    shared = {"data_root": str(ROOT / "data"), "models_dir": str(folder / "models"),
              "figures_dir": str(folder / "figures"), "results_dir": str(folder / "results")}
    _write_notebook(folder, "explorer.ipynb", {**PARAMETERS, **shared}, extra_cell=POINTS)
    _write_notebook(folder, "broken.ipynb", {**PARAMETERS, **shared}, extra_cell=BREAK_CALLBACK)
    server = Lab(folder)
    try:
        server.wait()
        yield server
    finally:
        server.stop()
    assert server.process.returncode is not None
    with socket.socket() as s:  # the port is free again: nothing left listening
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT don't count
        s.bind(("127.0.0.1", server.port))


@pytest.fixture(scope="module")
def page(lab):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1600, "height": 1500})
        finally:
            browser.close()


def _run_all(page, lab, notebook: str) -> None:
    """Open ``notebook`` in a fresh workspace, run all cells, wait for the last cell's output."""
    page.goto(lab.url(notebook, notebook.split(".")[0]))
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=90_000)
    # Run only once the kernel is up: earlier, JupyterLab asks which kernel to start.
    page.locator(".jp-StatusBar-TextItem", has_text="| Idle").first.wait_for(timeout=90_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    dialog = page.locator(".jp-Dialog .jp-mod-accept")
    try:  # should the question come anyway: the notebook's own kernel (python3 of this venv)
        dialog.wait_for(timeout=2_000)
        dialog.click()
    except playwright.TimeoutError:
        pass
    # The marker in an *output* (the cell's source holds it too), i.e. the last cell has run.
    page.wait_for_function(
        f"Array.from(document.querySelectorAll('.jp-OutputArea-output')).some(e => e.textContent.includes({json.dumps(DONE)}))",
        timeout=240_000)
    for css in CANVASES:
        page.wait_for_function("el => el && el.toDataURL().length > 5000",
                               arg=page.locator(f".tmlib-explorer .{css} canvas").first.element_handle(),
                               timeout=30_000)


CANVASES = ("tmlib-curve", "tmlib-heatmap", "tmlib-st")  # ipympl canvases; maps and inputs are images
PIXELS = "el => el.toDataURL()"  # what the canvas shows (its first <canvas> holds the figure's image)


def _pixels(page, css: str) -> str:
    return page.locator(f".tmlib-explorer .{css} canvas").first.evaluate(PIXELS)


def _wait_redrawn(page, old: dict[str, str], timeout_ms: int) -> bool:
    """Wait until every canvas of ``old`` (css → its pixels then) shows other pixels."""
    handles = [page.locator(f".tmlib-explorer .{css} canvas").first.element_handle() for css in old]
    try:
        page.wait_for_function("([els, old]) => els.every((el, i) => el.toDataURL() !== old[i])",
                               arg=[handles, list(old.values())], timeout=timeout_ms)
        return True
    except playwright.TimeoutError:
        return False  # the caller decides: for a broken callback this is the expected outcome


def _change_layer(page, layer: str, timeout_ms: int) -> tuple[str, str, bool]:
    """Select ``layer`` in the explorer and wait until panels 1–3 are redrawn;
    → (old digest, new digest of the channel panel's pixels, whether all three were redrawn)."""
    selector = page.locator(".tmlib-explorer .tmlib-layer select")
    assert selector.input_value() != layer
    old = {css: _pixels(page, css) for css in CANVASES}
    selector.select_option(label=layer)
    redrawn = _wait_redrawn(page, old, timeout_ms)
    return _digest(old["tmlib-heatmap"]), _digest(_pixels(page, "tmlib-heatmap")), redrawn


def _digest(pixels: str) -> str:
    return hashlib.sha256(pixels.encode()).hexdigest()


def _click(page, css: str, fraction: list[float], hover_only: bool = False) -> None:
    """Click (or only move the pointer) at ``fraction`` (x, y from the top-left) of a canvas."""
    canvas = page.locator(f".tmlib-explorer .{css} canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x, y = box["x"] + fraction[0] * box["width"], box["y"] + fraction[1] * box["height"]
    page.mouse.move(x, y)
    if not hover_only:
        page.mouse.click(x, y)


def _screenshot_path() -> Path:
    folder = Path(os.environ.get("TMLIB_SCREENSHOT_DIR", ROOT / "results" / "browser"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "12_explorer_browser.png"


def test_layer_selector_redraws_the_heatmap_in_jupyterlab(lab, page):
    start = time.monotonic()
    _run_all(page, lab, "explorer.ipynb")
    selector = page.locator(".tmlib-explorer .tmlib-layer select")
    assert selector.input_value() == "conv2"  # the notebook's starting layer
    options = [t.strip() for t in selector.locator("option").all_text_contents()]
    assert options[:3] == ["conv0", "act0", "conv1"] and options[-1] == "fc1" and len(options) == 15
    old, new, redrawn = _change_layer(page, "fc0", timeout_ms=60_000)
    assert redrawn and new != old, "the panels were not redrawn"
    assert selector.input_value() == "fc0"
    # The plots drive the selection: a click at conv1's point of the curve chooses conv1 …
    page.wait_for_function(
        "Array.from(document.querySelectorAll('.jp-OutputArea-output')).some(e => e.textContent.includes('POINTS {'))",
        timeout=60_000)
    text = next(t for t in page.locator(".jp-OutputArea-output").all_inner_texts() if "POINTS {" in t)
    points = json.loads(text[text.index("POINTS {") + 7:].strip())
    before = {css: _pixels(page, css) for css in CANVASES}
    _click(page, "tmlib-curve", points["curve"])
    page.wait_for_function("el => el.value === 'conv1'", arg=selector.element_handle(), timeout=30_000)
    assert _wait_redrawn(page, before, 30_000), "a click on the curve did not redraw the panels"
    # … hovering says what is under the pointer (the layer means of the checkpoints drawn) …
    _click(page, "tmlib-curve", points["curve"], hover_only=True)
    footer = page.locator(".tmlib-explorer .tmlib-curve .jupyter-matplotlib-footer")
    page.wait_for_function("el => el.textContent.startsWith('conv1: ')", arg=footer.element_handle(),
                           timeout=30_000)
    assert "rotation augmentation" in footer.inner_text() and "untrained" in footer.inner_text()
    # … and a click on a bar of the channel panel chooses that channel.
    unit = page.locator(".tmlib-explorer .tmlib-unit .widget-readout")
    _click(page, "tmlib-heatmap", points["bar"])
    page.wait_for_function(f"el => el.textContent.trim() === '{points['channel']}'", arg=unit.element_handle(),
                           timeout=30_000)
    # The compare overlay is there (the notebook compares with the rotation-augmented checkpoint),
    # the status says what was computed, and no progress bar stays up when idle.
    assert page.locator(".tmlib-explorer .tmlib-compare select").input_value() == "rotation augmentation"
    status = page.locator(".tmlib-explorer .tmlib-status").inner_text()
    assert status.startswith(("computed ", "from cache")), status
    assert not page.locator(".tmlib-explorer .tmlib-progress").is_visible()
    # The five panels are there and drawn.
    for css in CANVASES:
        size = page.locator(f".tmlib-explorer .{css} canvas").first.evaluate("el => [el.width, el.height]")
        assert min(size) > 100, (css, size)
    for css in ("tmlib-maps", "tmlib-inputs"):
        size = page.locator(f".tmlib-explorer .{css}").evaluate("el => [el.naturalWidth, el.naturalHeight]")
        assert min(size) > 100, (css, size)
    # The export button writes the view's PNG into the notebook's figures_dir and says where.
    page.locator(".tmlib-explorer .tmlib-save-png").click()
    saved = page.locator(".tmlib-explorer .tmlib-saved")
    page.wait_for_function("el => el.textContent.includes('wrote')", arg=saved.element_handle(), timeout=60_000)
    written = sorted((lab.folder / "figures").glob(f"explorer_*_conv1_ch{points['channel']}.png"))
    assert len(written) == 1 and written[0].read_bytes()[:4] == b"\x89PNG" and written[0].name in saved.inner_text()
    # At 1440 × 900 the explorer fits: its controls and its panels in view together.
    page.set_viewport_size({"width": 1440, "height": 900})
    explorer = page.locator(".tmlib-explorer")
    explorer.evaluate("el => el.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)
    box = explorer.bounding_box()
    notebook = page.locator(".jp-NotebookPanel-notebook").first.bounding_box()  # beside the open file browser
    assert box["height"] <= 800 and box["x"] + box["width"] <= notebook["x"] + notebook["width"], (box, notebook)
    for css in ("tmlib-layer", "tmlib-unit", "tmlib-curve", "tmlib-maps"):
        part = page.locator(f".tmlib-explorer .{css}").bounding_box()
        assert part["y"] >= 0 and part["y"] + part["height"] <= 900, (css, part)
    path = _screenshot_path()
    explorer.screenshot(path=str(path))
    assert path.stat().st_size > 50_000
    print(f"browser check: channel panel digest {old[:12]} → {new[:12]}; screenshot {path}; "
          f"{time.monotonic() - start:.0f} s")


def test_a_broken_layer_callback_is_caught(lab, page):
    """The same check against a notebook whose layer callback is detached must see no redraw."""
    _run_all(page, lab, "broken.ipynb")
    assert page.locator(".jp-OutputArea-output", has_text="layer callback detached").count() == 1
    old, new, redrawn = _change_layer(page, "fc0", timeout_ms=8_000)
    assert not redrawn and new == old, "a detached callback cannot redraw the panels"

"""Widgets proven in a real browser: every learner notebook, opened in JupyterLab in headless Chromium.

For each lesson in notebooks/ the test opens the learner copy (exercise stubs raise NotImplementedError;
the check cells catch it, so "Run All" must never crash) in a JupyterLab served on loopback, runs all
cells from the browser (``notebook:run-all-cells`` through ``window.jupyterapp``, which
``--LabApp.expose_app_in_browser`` exposes) and waits for the kernel to go idle. Then it asserts:

- no cell has an error output and no output area shows a traceback or "Error displaying widget";
- every cell that calls a ``*_widget(...)`` / ``*_browser(...)`` shows a widget, and every lesson has one;
- each widget's controls are visible, its output shows a picture (an ``<img>``, not a figure's text repr),
  and moving each of its controls (a key press on a slider, another dropdown option or toggle button,
  the checkbox, swapped text prompts, the button) changes what the widget's output shows.

A screenshot of every widget (after its controls were moved) is written to ``$KANDLAB_BROWSER_SHOTS``
(default: a pytest temporary folder; the path is in each failure message).

One JupyterLab server and one browser serve all lessons. To fit the suite's time budget on two cores,
lessons are opened and run ahead of the test that checks them, two Run Alls at a time on one kernel
thread each (``OMP_NUM_THREADS=1``: on two cores, two one-thread processes beat one two-thread process);
each lesson's kernel is shut down when its check is done. The kernels inherit the suite's environment from conftest.py
(FAST mode, blocked network, offline hub) except ``MPLBACKEND=Agg``: a learner's kernel uses the
inline backend, under Agg a widget would print ``<Figure size ...>`` instead of drawing.

Needs Debian's ``chromium`` and the ``playwright`` Python package (no ``playwright install``: the test
drives the system browser). Without them the test skips, unless ``KANDLAB_REQUIRE_BROWSER=1`` (set by
.ci/run), where it fails.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LESSONS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CHROMIUM = Path(os.environ.get("KANDLAB_CHROMIUM", "/usr/bin/chromium"))
REQUIRE_BROWSER = os.environ.get("KANDLAB_REQUIRE_BROWSER") == "1"
HOW_TO_INSTALL = ('install it with `sudo apt-get install chromium` (Debian/Ubuntu) and `pip install playwright` '
                  '(or `pip install -e ".[dev]"`); no `playwright install` is needed, the test drives the '
                  'system browser (another path: KANDLAB_CHROMIUM=/path/to/chromium)')

SERVER_START_TIMEOUT_S = 90
PAGE_READY_TIMEOUT_S = 120      # JupyterLab loaded, kernel started and idle
RUN_ALL_TIMEOUT_S = 480         # one lesson's Run All (FAST mode: 7-80 s on an idle 2-core CPU)
WIDGET_RENDER_TIMEOUT_S = 60
CHANGE_TIMEOUT_S = 150          # one control moved -> the widget's output redrawn (05 samples images)
CONCURRENT_RUNS = 2             # lessons running their Run All at once (2 cores, one kernel thread each)
LIVE_LESSONS = 4                # lessons open at once (run ahead and not yet checked): bounds memory
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # the browser reaches loopback only
]
# JupyterLab user settings: every cell stays in the DOM (no virtual scrolling), nothing is saved,
# no news or update checks.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False},
}
WIDGET_CALL = re.compile(r"\b\w+_(?:widget|browser)\(")

# What counts as a control a learner moves (the Play button of a trajectory only drives its slider).
CONTROLS = ".noUi-handle, select, .widget-toggle-button, input[type=checkbox], input[type=text], button.widget-button"

JS_KERNEL = "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"

JS_READY = """(name) => {
    const w = window.jupyterapp?.shell?.currentWidget;
    const k = w?.sessionContext?.session?.kernel;
    return w?.context?.path === name && !!k && k.connectionStatus === 'connected' && k.status === 'idle';
}"""

JS_RUN_ALL = """() => {
    window.__klRunAll = undefined;
    window.jupyterapp.commands.execute('notebook:run-all-cells').then(
        ok => { window.__klRunAll = {ok: ok}; }, e => { window.__klRunAll = {error: String(e)}; });
}"""

JS_RUN_ALL_DONE = f"() => window.__klRunAll !== undefined && {JS_KERNEL}.status === 'idle'"

JS_CELLS = """() => window.jupyterapp.shell.currentWidget.content.widgets.map((c, i) => ({
    index: i, type: c.model.type,
    source: c.model.sharedModel.getSource(),
    count: c.model.type === 'code' ? c.model.executionCount : null,
    running: c.model.type === 'code' && c.model.executionState === 'running',
    outputs: c.model.type === 'code' ? c.model.outputs.toJSON() : [],
}))"""

JS_KERNEL_EXEC = f"""async (code) => {{
    const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error('no reply in 60 s')), 60000));
    const future = {JS_KERNEL}.requestExecute({{code: code, store_history: false}});
    let text = '';
    future.onIOPub = (msg) => {{
        if (msg.header.msg_type === 'stream') text += msg.content.text;
        if (msg.header.msg_type === 'error') text += msg.content.ename + ': ' + msg.content.evalue;
    }};
    await Promise.race([future.done, timeout]);
    return text;
}}"""

# Marks each top-level widget with controls (data-kl-panel="cell-k"); tqdm bars and plain displays have none.
JS_MARK_PANELS = """(controls) => {
    const found = [];
    document.querySelectorAll('.jp-Notebook .jp-Cell').forEach((cell, i) => {
        let k = 0;
        cell.querySelectorAll('.jp-Cell-outputArea .jupyter-widgets').forEach((el) => {
            if (el.parentElement.closest('.jupyter-widgets')) return;
            if (!el.querySelector(controls)) return;
            const id = `${i}-${k++}`;
            el.setAttribute('data-kl-panel', id);
            found.push({cell: i, id: id});
        });
    });
    return found;
}"""

# What a widget shows: its output areas (figures as <img src=data:...>, printed text), images and HTML.
JS_SHOWN = """(el) => Array.from(el.querySelectorAll('.widget-output, img.widget-image, .widget-html-content'))
    .map(e => e.tagName === 'IMG' ? e.src : e.innerHTML).join('\\n')"""

JS_CHANGED = f"""([el, before]) => {{
    const now = ({JS_SHOWN})(el);
    return now !== before && now.trim() !== '' && {JS_KERNEL}.status === 'idle';
}}"""

JS_OUTPUT_TEXTS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output'))
    .map(e => [e.closest('.jp-Cell') ? Array.from(document.querySelectorAll('.jp-Notebook .jp-Cell'))
               .indexOf(e.closest('.jp-Cell')) : -1, e.innerText])"""

JS_NO_PLACEHOLDER = """() => !Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output'))
    .some(e => e.innerText.includes('Loading widget'))"""

PROBLEM_TEXTS = ("Traceback", "Error displaying widget")


# ---------------------------------------------------------------------------
# Availability: skip with instructions, or fail under KANDLAB_REQUIRE_BROWSER=1 (.ci/run)


def _unavailable(reason: str):
    message = f"browser widget test: {reason}; {HOW_TO_INSTALL}"
    if REQUIRE_BROWSER:
        pytest.fail(message + " (KANDLAB_REQUIRE_BROWSER=1, as in .ci/run, makes this a failure, not a skip)",
                    pytrace=False)
    pytest.skip(message)


def _require_tools():
    missing = []
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"no Chromium at {CHROMIUM}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright is not installed")
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        missing.append("JupyterLab is not installed")
    if missing:
        _unavailable(" and ".join(missing))


# ---------------------------------------------------------------------------
# Fixtures: one JupyterLab server on loopback and one headless Chromium for all lessons


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    def __init__(self, root: Path, port: int, token: str, log: Path):
        self.root, self.port, self.token, self.log = root, port, token, log
        self.url = f"http://127.0.0.1:{port}"

    def api(self, method: str, path: str, timeout: float = 10):
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def shutdown_kernel(self, path: str):
        for session in self.api("GET", "/api/sessions"):
            if session.get("path") == path:
                self.api("DELETE", f"/api/sessions/{session['id']}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    _require_tools()
    base = tmp_path_factory.mktemp("browser-lab")
    root = base / "lessons"
    shutil.copytree(REPO / "notebooks", root)  # the repo's learner copies; Run All never touches the repo
    for rel, values in LAB_SETTINGS.items():
        (base / "settings" / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / "settings" / rel).write_text(json.dumps(values))
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # kernels draw with the inline backend, as a learner's do
    env.setdefault("OMP_NUM_THREADS", "1")  # two kernels side by side on two cores
    env.update({
        "JUPYTERLAB_SETTINGS_DIR": str(base / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
        "JUPYTER_CONFIG_DIR": str(base / "config"),    # no user config
        "JUPYTER_DATA_DIR": str(base / "data"),        # no user kernelspecs: python3 is this venv's
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
        "JUPYTER_PREFER_ENV_PATH": "1",
    })
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root
    log = base / "jupyterlab.log"
    with open(log, "wb") as log_file:
        server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    instance = Lab(root, port, token, log)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {server.returncode} on start:\n{instance.log_tail()}")
            try:
                instance.api("GET", "/api/status", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer on {instance.url} within {SERVER_START_TIMEOUT_S} s:\n"
                                f"{instance.log_tail()}")
                time.sleep(0.5)
        yield instance
    finally:
        try:
            instance.api("POST", "/api/shutdown", timeout=10)  # shuts its kernels down too
            server.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import Error, sync_playwright

    with sync_playwright() as pw:
        try:  # launch() gives the browser a fresh temporary profile (user-data-dir) of its own
            chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
                                          timeout=90_000)
        except Error as error:
            _unavailable(f"{CHROMIUM} did not start under playwright ({str(error).splitlines()[0]})")
        try:
            yield chromium
        finally:
            chromium.close()


class Lesson:
    """One notebook's page in the browser and its Run All; ``problem`` says what went wrong, if anything."""

    def __init__(self, notebook: Path, page):
        self.notebook, self.page = notebook, page
        self.page_errors: list[str] = []
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.problem: str | None = None
        self.opened = time.monotonic()
        self.started = self.done = None
        self.alongside = 0  # the most other lessons seen running their Run All beside this one

    @property
    def running(self) -> bool:
        return self.problem is None and self.started is not None and self.done is None


class Runner:
    """Opens the lessons in test order and starts their Run All ahead of the test that checks them,
    CONCURRENT_RUNS at a time and at most LIVE_LESSONS open."""

    def __init__(self, lab: Lab, browser, notebooks: list[Path]):
        self.lab, self.browser, self.queue = lab, browser, list(notebooks)
        self.live: dict[str, Lesson] = {}

    def _start(self, notebook: Path):
        from playwright.sync_api import Error

        page = self.browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        lesson = self.live[notebook.name] = Lesson(notebook, page)
        try:
            page.goto(f"{self.lab.url}/lab/workspaces/{notebook.stem}/tree/{notebook.name}?token={self.lab.token}")
            if not _wait(page, JS_READY, notebook.name, PAGE_READY_TIMEOUT_S):
                lesson.problem = (f"JupyterLab did not open the notebook with an idle kernel within "
                                  f"{PAGE_READY_TIMEOUT_S} s; server log:\n{self.lab.log_tail()}")
                return
            # The kernel is this virtualenv's Python and has the suite's environment.
            seen = json.loads(page.evaluate(JS_KERNEL_EXEC, "import sys, os, json, matplotlib; print(json.dumps("
                                            "[sys.prefix, os.environ.get('KANDLAB_FAST'), matplotlib.get_backend()]))"))
            if seen[:2] != [sys.prefix, "1"] or "inline" not in seen[2]:
                lesson.problem = (f"the kernel runs in {seen[0]} with KANDLAB_FAST={seen[1]} and matplotlib backend "
                                  f"{seen[2]}; expected {sys.prefix}, FAST mode (1) and the inline backend")
                return
            lesson.started = time.monotonic()
            page.evaluate(JS_RUN_ALL)
        except Error as error:
            lesson.problem = f"the browser failed while opening the notebook: {error}"

    def _poll(self):
        running = [lesson for lesson in self.live.values() if lesson.running]
        for lesson in running:
            lesson.alongside = max(lesson.alongside, len(running) - 1)
            if lesson.page.evaluate(JS_RUN_ALL_DONE):
                lesson.done = time.monotonic()
            elif time.monotonic() - lesson.started > RUN_ALL_TIMEOUT_S:
                busy = [c for c in lesson.page.evaluate(JS_CELLS) if c["running"]]
                now = f"cell {busy[0]['index']} `{_cell_head(busy[0]['source'])}` still running" if busy else \
                    "no cell running"
                lesson.problem = f"Run All did not finish within {RUN_ALL_TIMEOUT_S} s ({now})"

    def pump(self):
        """Note finished runs and start the next lessons while there is room."""
        self._poll()
        while (self.queue and len(self.live) < LIVE_LESSONS
               and sum(lesson.running for lesson in self.live.values()) < CONCURRENT_RUNS):
            self._start(self.queue.pop(0))

    def wait(self, notebook: Path) -> Lesson:
        """The lesson with its Run All finished (or its ``problem`` set)."""
        if notebook.name not in self.live:
            if notebook in self.queue:
                self.queue.remove(notebook)
            self._start(notebook)
        lesson = self.live[notebook.name]
        while lesson.problem is None and lesson.done is None:
            self.pump()
            time.sleep(0.5)
        self.pump()
        return lesson

    def finish(self, lesson: Lesson):
        try:
            self.lab.shutdown_kernel(lesson.notebook.name)
        except OSError:
            pass
        lesson.page.close()
        del self.live[lesson.notebook.name]


@pytest.fixture(scope="module")
def runner(lab, browser, request):
    selected = [item.callspec.params["notebook"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_widgets_work_in_a_real_browser"]
    instance = Runner(lab, browser, selected)
    yield instance
    for lesson in list(instance.live.values()):
        instance.finish(lesson)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("KANDLAB_BROWSER_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    return tmp_path_factory.mktemp("browser-shots")


# ---------------------------------------------------------------------------
# Moving controls


def _controls(panel):
    """(what, action) for every enabled control of a widget, sliders and pickers first, buttons last.

    Each action changes the control's value once (and returns what it did, for messages)."""
    actions = []
    for i in range(panel.locator(".noUi-handle").count()):
        handle = panel.locator(".noUi-handle").nth(i)
        disabled = handle.locator("xpath=ancestor::*[contains(@class, 'noUi-target')][1]").get_attribute("disabled")
        single = handle.get_attribute("aria-valuemin") == handle.get_attribute("aria-valuemax")  # one option only
        if disabled is None and not single:
            actions.append((f"slider {_label(handle)}", lambda h=handle: _nudge_slider(h)))
    for i in range(panel.locator("select").count()):
        select = panel.locator("select").nth(i)
        if select.is_enabled():
            actions.append((f"dropdown {_label(select)}", lambda s=select: _next_option(s)))
    for i in range(panel.locator(".widget-toggle-buttons").count()):
        group = panel.locator(".widget-toggle-buttons").nth(i)
        actions.append((f"toggle buttons {_label(group)}", lambda g=group: _other_toggle(g)))
    for i in range(panel.locator("input[type=checkbox]").count()):
        box = panel.locator("input[type=checkbox]").nth(i)
        if box.is_enabled():
            actions.append((f"checkbox {_label(box)}", lambda b=box: (b.click(), f"clicked to {b.is_checked()}")[1]))
    buttons = panel.locator("button.widget-button:not(.widget-toggle-button)")
    buttons = [buttons.nth(i) for i in range(buttons.count())
               if not buttons.nth(i).locator("xpath=ancestor::*[contains(@class, 'widget-play')]").count()]
    texts = panel.locator("input[type=text]")
    texts = [texts.nth(i) for i in range(texts.count()) if texts.nth(i).is_enabled()]
    if not buttons and len(texts) >= 2:
        # Text fields redraw on Enter; swapping two prompts keeps both valid (a made-up prompt may use
        # words the model never saw).
        values = [t.input_value() for t in texts]
        for i, text in enumerate(texts):
            other = next((v for v in values[i + 1:] + values[:i] if v != values[i]), None)
            if other is not None:
                actions.append((f"text {_label(text)}", lambda t=text, v=other: _type(t, v)))
    for button in buttons:  # a button acts on the fields beside it as they are
        if button.is_enabled():
            actions.append((f"button {button.inner_text().strip()!r}", lambda b=button: (b.click(), "clicked")[1]))
    return actions


def _label(control) -> str:
    """The control's description, e.g. 'index' (a checkbox has it beside the box)."""
    return repr(control.evaluate("""(el) => {
        const w = el.closest('.jupyter-widgets');
        const l = w && (w.querySelector('.widget-label-basic span') || w.querySelector('.widget-label'));
        return l ? l.textContent.replace(/\u200b/g, '').trim() : '';
    }"""))


def _nudge_slider(handle) -> str:
    readout = handle.locator("xpath=ancestor::*[contains(@class, 'widget-slider')][1]//*[contains(@class, "
                             "'widget-readout')]").first
    before = readout.inner_text().strip()
    at_end = float(handle.get_attribute("aria-valuenow")) >= float(handle.get_attribute("aria-valuemax"))
    key = "ArrowLeft" if at_end else "ArrowRight"
    handle.focus()
    handle.press(key)
    return f"moved from {before} to {readout.inner_text().strip()} ({key})"


def _next_option(select) -> str:
    options = [o.replace("\xa0", " ") for o in select.locator("option").all_inner_texts()]
    current = select.evaluate("s => s.selectedIndex")
    pick = (current + 1) % len(options)
    select.select_option(index=pick)
    return f"picked {options[pick]!r} instead of {options[current]!r}"


def _other_toggle(group) -> str:
    other = group.locator(".widget-toggle-button:not(.mod-active)").first
    name = other.inner_text().strip()
    other.click()
    return f"clicked {name!r}"


def _type(text, value: str) -> str:
    text.fill(value)
    text.press("Enter")
    return f"typed {value!r} and pressed Enter"


# ---------------------------------------------------------------------------
# The test


def _wait(page, js: str, arg=None, timeout_s: float = 30, polling: float = 250) -> bool:
    """Poll ``js(arg)`` in the page until it is truthy (True) or ``timeout_s`` passes (False)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(js, arg=arg, timeout=timeout_s * 1000, polling=polling)
        return True
    except PlaywrightTimeout:
        return False


def _problem_excerpt(text: str, head: int = 500, tail: int = 1500) -> str:
    """The start of an output that shows a problem and, when it is long, its end too: a traceback's
    last lines name the exception and its message (the start only shows where it was raised)."""
    if len(text) <= head + tail:
        return repr(text)
    return f"{text[:head]!r} … {text[-tail:]!r}"


def _cell_head(source: str) -> str:
    """The line of a cell that calls a widget, else its first line (for messages)."""
    lines = source.strip().splitlines() or [""]
    return next((ln for ln in lines if WIDGET_CALL.search(ln)), lines[0]).strip()[:100]


@pytest.mark.parametrize("notebook", LESSONS, ids=lambda p: p.stem)
def test_widgets_work_in_a_real_browser(notebook, runner, shots):
    from playwright.sync_api import Error

    lesson = runner.wait(notebook)
    page = lesson.page
    where = f"{notebook.name} (screenshots: {shots})"

    def fail(message: str):
        try:
            page.screenshot(path=str(shots / f"{notebook.stem}-failure.png"))
        except Error:
            pass
        extra = f"\nbrowser errors: {lesson.page_errors[-5:]}" if lesson.page_errors else ""
        pytest.fail(f"{where}: {message}{extra}", pytrace=False)

    try:
        if lesson.problem:
            fail(lesson.problem)
        started, ran = lesson.started, time.monotonic()
        result = page.evaluate("() => window.__klRunAll")

        cells = page.evaluate(JS_CELLS)
        for cell in cells:
            for out in cell["outputs"]:
                if out.get("output_type") == "error":
                    fail(f"cell {cell['index']} `{_cell_head(cell['source'])}` raised "
                         f"{out.get('ename')}: {out.get('evalue')}")
        not_run = [c for c in cells if c["type"] == "code" and c["source"].strip() and c["count"] is None]
        if not_run or result != {"ok": True}:
            first = f"cell {not_run[0]['index']} `{_cell_head(not_run[0]['source'])}`" if not_run else "none"
            fail(f"Run All did not run every cell ({result}); first cell not run: {first}")

        # Widgets have rendered: no placeholder or error text left in any output area.
        if not _wait(page, JS_NO_PLACEHOLDER, None, WIDGET_RENDER_TIMEOUT_S):
            fail(f"a widget still shows 'Loading widget...' {WIDGET_RENDER_TIMEOUT_S} s after Run All")
        _assert_no_problem_text(page, cells, fail)

        # Every cell that calls a widget shows one with controls (views render shortly after their output).
        wanted = {c["index"] for c in cells if c["type"] == "code" and WIDGET_CALL.search(c["source"])}
        deadline = time.monotonic() + WIDGET_RENDER_TIMEOUT_S
        while True:
            panels = page.evaluate(JS_MARK_PANELS, CONTROLS)
            missing = sorted(wanted - {p["cell"] for p in panels})
            if not missing or time.monotonic() > deadline:
                break
            page.wait_for_timeout(500)
        if missing:
            cell = cells[missing[0]]
            shows = page.locator(".jp-Notebook .jp-Cell").nth(cell["index"]).locator(".jp-Cell-outputArea")
            fail(f"cell {cell['index']} `{_cell_head(cell['source'])}` shows no widget with controls "
                 f"{WIDGET_RENDER_TIMEOUT_S} s after Run All (its output: {shows.inner_text()[:300]!r})")
        if not panels:
            fail("the lesson shows no widget (by the course's design every lesson has at least one)")

        for number, info in enumerate(panels, 1):
            panel = page.locator(f"[data-kl-panel='{info['id']}']")
            what = f"widget {number} (cell {info['cell']} `{_cell_head(cells[info['cell']]['source'])}`)"
            panel.scroll_into_view_if_needed()
            controls = panel.locator(CONTROLS)
            invisible = [i for i in range(controls.count()) if not controls.nth(i).is_visible()]
            if invisible:
                fail(f"{what}: {len(invisible)} of its {controls.count()} controls are not visible")
            actions = _controls(panel)
            if not actions:
                fail(f"{what}: no enabled control to move")
            shown = panel.evaluate(JS_SHOWN)
            pictures = int("<img" in shown)
            moved = []
            for name, act in actions:
                did = act()
                if not _wait(page, JS_CHANGED, [panel.element_handle(), shown], CHANGE_TIMEOUT_S):
                    fail(f"{what}: {name} {did}, but the widget's output did not change within "
                         f"{CHANGE_TIMEOUT_S} s (it shows: {panel.inner_text()[:300]!r})")
                moved.append(f"{name} {did}")
                runner.pump()  # keep the lessons ahead running
                page.wait_for_timeout(300)  # let the redraw settle before the next comparison
                shown = panel.evaluate(JS_SHOWN)
                pictures += "<img" in shown
                text = panel.inner_text()
                bad = [t for t in PROBLEM_TEXTS + ("⚠",) if t in text]
                if bad:
                    fail(f"{what}: after {name} {did} the widget shows {bad}: {_problem_excerpt(text)}")
            if "<Figure size" in panel.inner_text():
                fail(f"{what}: shows a figure's text repr instead of the figure (kernel not on the inline backend?)")
            if not pictures:
                fail(f"{what}: its output never showed a picture (seen: {panel.inner_text()[:300]!r})")
            panel.screenshot(path=str(shots / f"{notebook.stem}-widget{number}.png"))
            print(f"{notebook.stem} {what}: each of these changed its output: " + "; ".join(moved))

        _assert_no_problem_text(page, page.evaluate(JS_CELLS), fail)
        print(f"{notebook.stem}: opened in {started - lesson.opened:.0f} s, Run All {lesson.done - started:.0f} s "
              f"(beside up to {lesson.alongside} other), {len(panels)} widget(s) checked in "
              f"{time.monotonic() - ran:.0f} s")
    finally:
        runner.finish(lesson)


def _assert_no_problem_text(page, cells, fail):
    for index, text in page.evaluate(JS_OUTPUT_TEXTS):
        bad = [t for t in PROBLEM_TEXTS if t in text]
        if bad:
            head = _cell_head(cells[index]["source"]) if 0 <= index < len(cells) else "?"
            fail(f"cell {index} `{head}` shows {bad} in its output: {_problem_excerpt(text)}")

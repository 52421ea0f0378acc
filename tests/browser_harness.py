"""Real-browser test harness: a throw-away JupyterLab server driven by headless Chromium.

Helper module only (no tests in here).  Typical use::

    with JupyterLab(root_dir=tmp_path, artifacts_dir=ARTIFACTS) as lab:
        page = lab.open_notebook("demo.ipynb")
        lab.run_all(page, timeout_s=90)
        assert not lab.cell_errors(page)
        lab.screenshot(page, "after-run")

Test modules share the skip/fail policy through :func:`skip_module_without_chromium` (module level) and
:func:`lab_server` (in a fixture): without Chromium the module is skipped locally but fails in CI (``$CI`` set);
without playwright the test is skipped locally and fails in CI.

Design notes
------------
* The server is ``sys.executable -m jupyter lab`` on a free loopback port with a random token.
  It gets private ``JUPYTER_CONFIG_DIR`` / ``JUPYTER_RUNTIME_DIR`` / settings / workspaces
  directories so the developer's own Jupyter configuration never leaks into a test run, and
  everything that would touch the network (news feed, update check, PyPI extension manager)
  is switched off.
* Chromium is never downloaded: playwright launches the system binary (``/usr/bin/chromium``
  or ``$LENSBENCH_CHROMIUM``).
* ``LabApp.expose_app_in_browser`` is on, so helpers can ask ``window.jupyterapp`` for the
  kernel status / output models; every helper also works from the DOM alone.
* Teardown closes the browser, deletes all sessions/kernels through the REST API, terminates
  the server and finally kills any kernel process that survived (kernels run in their own
  process session, so killing the server's process group alone would not reach them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "ACTIVE_NOTEBOOK",
    "ARTIFACTS",
    "CHROMIUM_ARGS",
    "CHROMIUM_PATH",
    "IN_CI",
    "JupyterLab",
    "NotebookExecutionHalted",
    "cell_errors",
    "cell_states",
    "kernel_status",
    "lab_server",
    "plot_titles",
    "run_all",
    "skip_module_without_chromium",
    "wait_for_kernel_idle",
    "wait_for_plot_title",
]

CHROMIUM_PATH = os.environ.get("LENSBENCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Screenshots, server log and browser console log of the browser tests.
ARTIFACTS = Path(
    os.environ.get("LENSBENCH_BROWSER_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts" / "browser")
)
#: On CI a missing Chromium / playwright fails the browser tests instead of skipping them.
IN_CI = bool(os.environ.get("CI"))
#: The notebook panel that is currently shown in the main area.
ACTIVE_NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"
VIEWPORT = {"width": 1400, "height": 1000}

# User settings written into the private settings dir of every server.
_USER_SETTINGS: dict[str, dict[str, Any]] = {
    # no "Would you like to receive official Jupyter news?" toast, no update check
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    # keep every cell attached to the DOM so prompts/outputs of all cells can be inspected
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}

# --------------------------------------------------------------------------------------------
# In-page JavaScript
# --------------------------------------------------------------------------------------------

# Kernel status of the active notebook: DOM indicator, cross-checked with the app model.
_JS_KERNEL_STATUS = """
(sel) => {
  const panel = document.querySelector(sel);
  if (!panel) return {dom: null, model: null, connection: null};
  const ind = panel.querySelector('.jp-Notebook-ExecutionIndicator');
  const res = {dom: ind ? ind.dataset.status : null, model: null, connection: null};
  const app = window.jupyterapp;
  if (app && app.shell) {
    const w = app.shell.currentWidget;
    const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
    if (k) { res.model = k.status; res.connection = k.connectionStatus; }
    else if (w && w.sessionContext) { res.model = 'no-kernel'; }
  }
  return res;
}
"""

# One entry per code cell of the active notebook.
_JS_CELL_STATES = """
(sel) => {
  const panel = document.querySelector(sel);
  if (!panel) return [];
  return Array.from(panel.querySelectorAll('.jp-Notebook .jp-Cell.jp-CodeCell')).map((cell, i) => {
    const prompt = cell.querySelector('.jp-InputArea-prompt');
    const src = cell.querySelector('.cm-content');
    const out = cell.querySelector('.jp-OutputArea');
    return {
      index: i,
      prompt: prompt ? prompt.textContent.trim() : '',
      source: src ? src.innerText : '',
      output: out ? out.innerText.slice(-2000) : '',
    };
  });
}
"""

_JS_CELL_ERRORS = """
(sel) => {
  const panel = document.querySelector(sel);
  if (!panel) return {dom: [], model: []};
  const dom = [];
  const pattern = /Traceback|^\\s*[A-Za-z_][\\w.]*(Error|Exception|Interrupt|Exit)\\b/m;
  for (const node of panel.querySelectorAll(
      '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')) {
    const text = node.innerText;
    if (pattern.test(text)) dom.push(text);
  }
  const model = [];
  const app = window.jupyterapp;
  const w = app && app.shell && app.shell.currentWidget;
  const nbModel = w && w.content && w.content.model;
  if (nbModel && nbModel.cells) {
    for (let i = 0; i < nbModel.cells.length; i++) {
      const cell = nbModel.cells.get(i);
      if (cell.type !== 'code' || !cell.outputs) continue;
      for (const o of cell.outputs.toJSON()) {
        if (o.output_type === 'error') {
          model.push({ename: o.ename, evalue: o.evalue, traceback: (o.traceback || []).join('\\n')});
        }
      }
    }
  }
  return {dom, model};
}
"""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PROMPT_DONE = re.compile(r"^\[\d+\]:?$")


# --------------------------------------------------------------------------------------------
# Page-level helpers (usable without a JupyterLab instance)
# --------------------------------------------------------------------------------------------


def kernel_status(page) -> dict[str, str | None]:
    """``{"dom": ..., "model": ..., "connection": ...}`` for the active notebook's kernel."""
    return page.evaluate(_JS_KERNEL_STATUS, ACTIVE_NOTEBOOK)


def _is_idle(status: dict[str, str | None]) -> bool:
    if status.get("dom") != "idle":
        return False
    # model is None when window.jupyterapp is not exposed: trust the DOM then
    if status.get("model") is not None and (
        status["model"] != "idle" or status.get("connection") != "connected"
    ):
        return False
    return True


def wait_for_kernel_idle(page, timeout_s: float = 60.0) -> None:
    """Block until the active notebook's kernel is connected and idle."""
    deadline = time.monotonic() + timeout_s
    status: dict[str, str | None] = {}
    while time.monotonic() < deadline:
        status = kernel_status(page)
        if _is_idle(status):
            return
        page.wait_for_timeout(200)
    raise TimeoutError(f"kernel of the active notebook not idle after {timeout_s:.0f}s (status={status})")


def cell_states(page) -> list[dict[str, Any]]:
    """Prompt (``[3]:``, ``[*]:``, ``[ ]:``), source and output tail of every code cell."""
    return page.evaluate(_JS_CELL_STATES, ACTIVE_NOTEBOOK)


def _click_run_all(page) -> None:
    """Run → Run All Cells through the main menu; falls back to the app command registry."""
    try:
        page.locator(ACTIVE_NOTEBOOK).first.click(position={"x": 5, "y": 5}, timeout=5_000)  # focus
        page.locator(".lm-MenuBar-itemLabel").filter(has_text=re.compile(r"^Run$")).first.click(timeout=5_000)
        # the Run menu's entry is the generic `runmenu:run-all` command; match on its label too
        items = page.locator(".lm-Menu .lm-Menu-item")
        item = (
            items.filter(has=page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")))
            .or_(page.locator('.lm-Menu .lm-Menu-item[data-command="runmenu:run-all"]'))
            .first
        )
        item.wait_for(state="visible", timeout=5_000)
        if "lm-mod-disabled" in (item.get_attribute("class") or ""):
            raise RuntimeError("'Run All Cells' menu item is disabled")
        item.click(timeout=5_000)
        return
    except Exception as exc:  # noqa: BLE001 - fall back to the command registry
        warnings.warn(f"run_all: menu path failed ({exc!s:.200}); using jupyterapp.commands", stacklevel=3)
        page.keyboard.press("Escape")  # close a half-open menu
        ok = page.evaluate(
            "() => window.jupyterapp ? window.jupyterapp.commands.execute('notebook:run-all-cells')"
            ".then(() => true) : false"
        )
        if not ok:
            raise RuntimeError(f"could not trigger 'Run All Cells': {exc}") from exc


class NotebookExecutionHalted(RuntimeError):
    """Run All stopped at an exception before every cell got an execution count."""

    def __init__(self, message: str, errors: list[str], states: list[dict[str, Any]]):
        super().__init__(message)
        self.errors = errors
        self.states = states


def _describe(cell: dict[str, Any]) -> str:
    return (
        f"cell #{cell.get('index')} prompt={cell.get('prompt')!r} "
        f"source={cell.get('source', '')[:300]!r} output tail={cell.get('output', '')[-800:]!r}"
    )


def run_all(page, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Run all cells of the active notebook (Run → Run All Cells) and wait for completion.

    Completion = every non-empty code cell shows an execution count (``[N]:``, no ``[*]``)
    and the kernel is idle, stable over two polls.  Returns the final :func:`cell_states`
    (error outputs in the *last* cells do not raise: check :func:`cell_errors`).

    Raises ``NotebookExecutionHalted`` (listing the tracebacks) when JupyterLab aborted the
    run at an exception so that later cells will never execute, and ``TimeoutError``
    (describing the first unfinished / last cell and the kernel state) after ``timeout_s``.
    """
    wait_for_kernel_idle(page, timeout_s=min(timeout_s, 60.0))
    before = [c["prompt"] for c in cell_states(page)]
    _click_run_all(page)

    deadline = time.monotonic() + timeout_s
    progressed = False
    stable_done = stable_halted = 0
    states: list[dict[str, Any]] = []
    status: dict[str, str | None] = {}
    while time.monotonic() < deadline:
        states = cell_states(page)
        status = kernel_status(page)
        prompts = [c["prompt"] for c in states]
        running = any("*" in p for p in prompts)
        if prompts != before or running:
            progressed = True
        settled = progressed and not running and _is_idle(status)
        pending = [c for c in states if c["source"].strip() and not _PROMPT_DONE.match(c["prompt"])]
        stable_done = stable_done + 1 if settled and not pending else 0
        stable_halted = stable_halted + 1 if settled and pending else 0
        if stable_done >= 2:
            return states
        if stable_halted >= 4:  # ~1 s idle with unexecuted cells: the run was aborted
            errors = cell_errors(page)
            if errors:
                raise NotebookExecutionHalted(
                    f"run_all: execution stopped at an exception; {len(pending)}/{len(states)} code "
                    f"cells never ran (first: {_describe(pending[0])}).\nErrors:\n\n" + "\n\n".join(errors),
                    errors,
                    states,
                )
        page.wait_for_timeout(250)

    pending = [c for c in states if c["source"].strip() and not _PROMPT_DONE.match(c["prompt"])]
    last = (pending or states or [{}])[0 if pending else -1]
    raise TimeoutError(
        f"run_all: not finished after {timeout_s:.0f}s; kernel={status}; "
        f"{len(pending)}/{len(states)} code cells without execution count; "
        f"prompts={[c['prompt'] for c in states]}; "
        f"{'first unfinished' if pending else 'last'} {_describe(last)}"
    )


def cell_errors(page) -> list[str]:
    """Texts of error outputs (exceptions / tracebacks) in the active notebook.

    DOM: stderr-mime outputs (how JupyterLab 4 renders ``error`` outputs and stderr streams)
    that contain a traceback or an ``XxxError:`` line.  Model: ``output_type == "error"``
    outputs that the DOM scan missed (e.g. a ``SyntaxError`` rendered without "Traceback").
    """
    found = page.evaluate(_JS_CELL_ERRORS, ACTIVE_NOTEBOOK)
    errors = [_ANSI.sub("", t).strip() for t in found["dom"]]
    for err in found["model"]:
        tb = _ANSI.sub("", err["traceback"]).strip()
        # the DOM text of an error output is its traceback: match on the final "Name: value" line
        key = next((ln.strip() for ln in reversed(tb.splitlines()) if ln.strip()), err["ename"])
        if not any(key in t for t in errors):
            errors.append(f"{err['ename']}: {err['evalue']}\n{tb}")
    return errors


# Titles of the plotly figures inside an element, in DOM order.
_JS_PLOT_TITLES = """
(sel) => {
  const root = document.querySelector(sel);
  if (!root) return [];
  return Array.from(root.querySelectorAll('.gtitle')).map(t => t.textContent);
}
"""


def plot_titles(page, root: str) -> list[str]:
    """Text of every plotly title (``.gtitle``) inside the first element matching ``root``."""
    return page.evaluate(_JS_PLOT_TITLES, root)


def wait_for_plot_title(page, root: str, pattern: str, timeout_ms: int = 120_000) -> str:
    """Wait until a plotly title inside ``root`` matches the JS regex ``pattern``; return that title."""
    page.wait_for_function(
        "([sel, pat]) => { const r = document.querySelector(sel); if (!r) return false;"
        " return Array.from(r.querySelectorAll('.gtitle')).some(t => new RegExp(pat).test(t.textContent)); }",
        arg=[root, pattern],
        timeout=timeout_ms,
    )
    return next(t for t in plot_titles(page, root) if re.search(pattern, t))


# --------------------------------------------------------------------------------------------
# pytest integration (skip/fail policy shared by the browser test modules)
# --------------------------------------------------------------------------------------------


def skip_module_without_chromium() -> None:
    """Call at module level: skip the whole module when Chromium is missing, except on CI."""
    import pytest  # noqa: PLC0415 - only needed by test modules

    if not Path(CHROMIUM_PATH).exists() and not IN_CI:
        pytest.skip(f"Chromium not found at {CHROMIUM_PATH} (apt-get install chromium)", allow_module_level=True)


@contextlib.contextmanager
def lab_server(root_dir: str | os.PathLike[str], *notebooks: str | os.PathLike[str], artifacts_dir=ARTIFACTS):
    """A :class:`JupyterLab` on ``root_dir`` with ``notebooks`` copied into it, for use in a fixture.

    Fails (never skips) on CI when Chromium or playwright is missing; skips locally without playwright.
    """
    import pytest  # noqa: PLC0415 - only needed by test modules

    if not Path(CHROMIUM_PATH).exists():  # only reachable in CI: fail loudly, never skip
        pytest.fail(
            f"Chromium not found at {CHROMIUM_PATH}: browser tests need it in CI - "
            "`apt-get install chromium` (or set LENSBENCH_CHROMIUM)",
            pytrace=False,
        )
    try:
        import playwright.sync_api  # noqa: F401, PLC0415
    except ImportError:
        if IN_CI:
            pytest.fail("playwright is not installed: pip install 'lensbench[dev]'", pytrace=False)
        pytest.skip("playwright is not installed")
    for nb in notebooks:
        shutil.copy(nb, Path(root_dir) / Path(nb).name)
    with JupyterLab(root_dir=root_dir, artifacts_dir=artifacts_dir) as server:
        yield server


# --------------------------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, starttime) from /proc, None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def _descendants(pid: int) -> dict[int, int]:
    """{pid: starttime} of all live descendants of ``pid`` (Linux /proc only)."""
    if not os.path.isdir("/proc"):
        return {}
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st:
                children.setdefault(st[0], []).append((int(entry), st[1]))
    out: dict[int, int] = {}
    todo = [pid]
    while todo:
        for child, start in children.get(todo.pop(), []):
            if child not in out:
                out[child] = start
                todo.append(child)
    return out


def _alive(pid: int, starttime: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[1] == starttime and not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return raw[raw.rfind(")") + 2 :].startswith("Z")


# --------------------------------------------------------------------------------------------
# JupyterLab server + browser
# --------------------------------------------------------------------------------------------


class JupyterLab:
    """A private JupyterLab server plus a headless Chromium, as a context manager.

    Attributes after ``__enter__``: ``url`` (``http://127.0.0.1:<port>``), ``token``, ``port``,
    ``root_dir``, ``artifacts_dir``, ``log_path`` (server log), ``console_errors`` (browser
    console errors and uncaught page errors of every page opened), ``pages``.
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        artifacts_dir: str | os.PathLike[str],
        *,
        startup_timeout_s: float = 60.0,
        headless: bool = True,
        chromium_path: str | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.root_dir = Path(root_dir).resolve()
        self.artifacts_dir = Path(artifacts_dir).resolve()
        self.startup_timeout_s = startup_timeout_s
        self.headless = headless
        self.chromium_path = chromium_path or CHROMIUM_PATH
        self.extra_args = list(extra_args or [])
        self.token = secrets.token_hex(24)
        self.port: int | None = None
        self.url = ""
        self.log_path = self.artifacts_dir / "jupyter-server.log"
        self.console_log_path = self.artifacts_dir / "browser-console.log"
        self.console_errors: list[str] = []
        self.pages: list[Any] = []
        self._console_lines: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file = None
        self._tmp: Path | None = None
        self._pw = None
        self._browser = None
        self._context = None

    # ---------------------------------------------------------------- context manager
    def __enter__(self) -> JupyterLab:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for i, page in enumerate(self.pages):
                try:
                    self.screenshot(page, f"failure-{i}")
                except Exception:  # noqa: BLE001 - best effort
                    pass
        self.stop()

    # ---------------------------------------------------------------- server
    def start(self) -> None:
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix="lb-jlab-"))
        config_dir, runtime_dir = self._tmp / "config", self._tmp / "runtime"
        settings_dir, workspaces_dir = self._tmp / "settings", self._tmp / "workspaces"
        data_dir = self._tmp / "data"
        for d in (config_dir, runtime_dir, settings_dir, workspaces_dir, data_dir):
            d.mkdir()
        for plugin, values in _USER_SETTINGS.items():
            f = settings_dir / f"{plugin}.jupyterlab-settings"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(values))

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable, "-m", "jupyter", "lab",
            "--no-browser",
            "--allow-root",
            f"--ServerApp.token={self.token}",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={self.root_dir}",
            "--ServerApp.disable_check_xsrf=True",
            "--ServerApp.open_browser=False",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
            "--LabApp.expose_app_in_browser=True",
            f"--LabApp.user_settings_dir={settings_dir}",
            f"--LabApp.workspaces_dir={workspaces_dir}",
            *self.extra_args,
        ]  # fmt: skip
        env = dict(os.environ)
        env.update(
            JUPYTER_CONFIG_DIR=str(config_dir),
            JUPYTER_RUNTIME_DIR=str(runtime_dir),
            JUPYTER_DATA_DIR=str(data_dir),
            JUPYTER_PLATFORM_DIRS="1",
            PYDEVD_DISABLE_FILE_VALIDATION="1",
            PYTHONUNBUFFERED="1",
            PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        )
        env.pop("JUPYTER_TOKEN", None)
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._log_file.write(("$ " + " ".join(cmd).replace(self.token, "<token>") + "\n").encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.root_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"jupyter lab exited with code {self._proc.returncode} during startup:\n{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
                last_err = err
            time.sleep(0.2)
        raise TimeoutError(
            f"jupyter lab not answering /api/status after {self.startup_timeout_s:.0f}s "
            f"({last_err}):\n{self._log_tail()}"
        )

    def _log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no server log>"

    def api(self, method: str, path: str, body: Any = None, timeout_s: float = 10.0) -> Any:
        """Call the server's REST API (``path`` like ``/api/kernels``); returns decoded JSON or None."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Authorization", f"token {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def shutdown_kernels(self) -> None:
        """Delete every session and kernel of the server (best effort)."""
        if not self._proc or self._proc.poll() is not None:
            return
        try:
            for sess in self.api("GET", "/api/sessions") or []:
                try:
                    self.api("DELETE", f"/api/sessions/{sess['id']}", timeout_s=20)
                except Exception:  # noqa: BLE001
                    pass
            for kern in self.api("GET", "/api/kernels") or []:
                try:
                    self.api("DELETE", f"/api/kernels/{kern['id']}", timeout_s=20)
                except Exception:  # noqa: BLE001
                    pass
        except Exception:  # noqa: BLE001 - server already unhealthy; the kill path handles it
            pass

    def stop(self) -> None:
        """Close the browser, shut kernels down, terminate the server; idempotent."""
        self._close_browser()
        self._write_console_log()
        proc = self._proc
        if proc is not None:
            self.shutdown_kernels()
            survivors = _descendants(proc.pid)
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=10)
            # kernels live in their own sessions: kill whatever outlived the server
            for sig in (signal.SIGTERM, signal.SIGKILL):
                alive = [p for p, st in survivors.items() if _alive(p, st)]
                if not alive:
                    break
                for p in alive:
                    try:
                        os.kill(p, sig)
                    except ProcessLookupError:
                        pass
                end = time.monotonic() + 5
                while time.monotonic() < end and any(_alive(p, survivors[p]) for p in alive):
                    time.sleep(0.1)
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # ---------------------------------------------------------------- browser
    def _ensure_browser(self) -> None:
        if self._context is not None:
            return
        from playwright.sync_api import sync_playwright  # noqa: PLC0415 - optional dependency

        if not Path(self.chromium_path).exists():
            raise FileNotFoundError(
                f"Chromium not found at {self.chromium_path}; install it with `apt-get install chromium` "
                "or point $LENSBENCH_CHROMIUM at a Chromium binary"
            )
        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(
            executable_path=self.chromium_path, args=CHROMIUM_ARGS, headless=self.headless
        )
        self._context = self._browser.new_context(viewport=VIEWPORT)

    def _close_browser(self) -> None:
        for obj in (self._context, self._browser):
            if obj is not None:
                try:
                    obj.close()
                except Exception:  # noqa: BLE001
                    pass
        if self._pw is not None:
            try:
                self._pw.stop()
            except Exception:  # noqa: BLE001
                pass
        self._context = self._browser = self._pw = None
        self.pages = []

    def _attach_listeners(self, page) -> None:
        def on_console(msg) -> None:
            loc = msg.location or {}
            line = f"[{msg.type}] {msg.text} ({loc.get('url', '')}:{loc.get('lineNumber', '')})"
            self._console_lines.append(line)
            if msg.type == "error":
                self.console_errors.append(f"console: {msg.text}")

        def on_pageerror(err) -> None:
            self._console_lines.append(f"[pageerror] {err}")
            self.console_errors.append(f"pageerror: {err}")

        page.on("console", on_console)
        page.on("pageerror", on_pageerror)

    def _write_console_log(self) -> None:
        if self._console_lines:
            try:
                self.artifacts_dir.mkdir(parents=True, exist_ok=True)
                self.console_log_path.write_text("\n".join(self._console_lines) + "\n")
            except OSError:
                pass

    def open_notebook(self, relpath: str, timeout_s: float = 240.0):
        """Open ``relpath`` (relative to ``root_dir``) in a fresh lab workspace; returns the Page
        once the notebook panel is shown and its kernel is idle."""
        self._ensure_browser()
        page = self._context.new_page()
        self.pages.append(page)
        self._attach_listeners(page)
        rel = Path(relpath).as_posix().lstrip("/")
        page.goto(f"{self.url}/lab/tree/{rel}?reset&token={self.token}", wait_until="domcontentloaded")
        page.locator(ACTIVE_NOTEBOOK).first.wait_for(state="visible", timeout=timeout_s * 1000)
        page.locator(f"{ACTIVE_NOTEBOOK} .jp-Notebook .jp-Cell").first.wait_for(
            state="attached", timeout=timeout_s * 1000
        )
        wait_for_kernel_idle(page, timeout_s=timeout_s)
        return page

    # ---------------------------------------------------------------- conveniences
    def run_all(self, page, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        return run_all(page, timeout_s=timeout_s)

    def cell_errors(self, page) -> list[str]:
        return cell_errors(page)

    def screenshot(self, page, name: str) -> Path:
        """Save a PNG of the viewport as ``<artifacts_dir>/<name>.png``; returns its path."""
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        path = self.artifacts_dir / (name if name.endswith(".png") else f"{name}.png")
        page.screenshot(path=str(path))
        return path

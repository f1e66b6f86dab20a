"""Real-browser checks (marked ``browser``): the notebooks in JupyterLab, and the run report offline.

Headless Chromium and ChromeDriver come from Debian's ``chromium`` and ``chromium-driver`` packages; nothing here
downloads a browser or a driver (``Service(executable_path=...)`` skips Selenium Manager, ``SE_OFFLINE=true`` is a
second guard). Without them the tests skip, except under ``CI=true``, where a missing browser is a failure.

1. JupyterLab on 127.0.0.1 (free port, random token) opens copies of notebooks 01 and 03 with the ``smoke``
   preset's parameters injected (papermill's ``parameterize_notebook``, as the runner does) and the session's
   model cache (``LORA_LENS_CACHE``) in the server's environment, runs all cells, waits for the kernel to go idle,
   operates a widget (01: the probe browser's probe set; 03: the attribution picker's probe) and checks that the
   page changed. Any SEVERE console entry fails. Screenshots go to the test's tmp dir (paths printed).
2. A run report (``index.html`` and a notebook export made by the report code) loads from ``file://`` with the
   network cut: every request the pages make is a ``file://`` one, and MathJax typesets the formulas.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import nbformat
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[2]
HAVE_BROWSER = Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()
if not HAVE_BROWSER and os.environ.get("CI") == "true":
    raise RuntimeError(f"CI=true but {CHROMIUM} / {CHROMEDRIVER} are missing: "
                       "apt-get install -y chromium chromium-driver (see .ci/run)")
webdriver = None
if HAVE_BROWSER:  # selenium is in the dev extra; under CI=true a missing one is an error, not a skip
    webdriver = (importlib.import_module("selenium.webdriver") if os.environ.get("CI") == "true"
                 else pytest.importorskip("selenium.webdriver"))

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not HAVE_BROWSER, reason="needs Debian packages chromium and chromium-driver")]

os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch anything

IGNORED_CONSOLE = ("favicon.ico",)
# Network off: host names fail to resolve, proxied connections go to a dead port; loopback stays reachable.
NETWORK_OFF = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
               "--proxy-server=http://127.0.0.1:9",
               "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate",
               "--no-pings", "--disable-domain-reliability", "--disable-client-side-phishing-detection")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chrome(tmp_path: Path, extra_args=()):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
              "--no-first-run", "--disable-extensions", "--disable-background-networking",
              "--disable-component-update", "--disable-default-apps", "--disable-sync", "--metrics-recording-only",
              f"--user-data-dir={tmp_path / 'chrome-profile'}", *extra_args):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER,
                                              log_output=str(tmp_path / "chromedriver.log")), options=opts)
    driver.set_page_load_timeout(60)
    driver.get("about:blank")  # leave Chromium's own new-tab page, then forget what it logged
    driver.get_log("performance")
    driver.get_log("browser")
    return driver


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(s in e["message"] for s in IGNORED_CONSOLE)]


def requested_urls(driver) -> list[str]:
    """Every URL the page asked for (CDP ``Network.requestWillBeSent`` / ``webSocketCreated``), blocked ones too."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
        elif msg["method"] == "Network.webSocketCreated":
            urls.append(msg["params"]["url"])
    return urls


def leaving_machine(urls: list[str]) -> list[str]:
    local = ("chrome", "data", "blob", "file", "about", "chrome-extension", "devtools")
    return [u for u in urls if urlsplit(u).scheme not in local
            and urlsplit(u).hostname not in ("127.0.0.1", "localhost", "::1")]


def shot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


# ------------------------------------------------------------------------------------------------ JupyterLab
# On top of the smoke preset: notebook 01's sweep reduced to the adapters it trains anyway (rank 4, all modules;
# from the adapter cache), so the browser test trains three adapters, not five.
BROWSER_PARAMS = {"01": {"ranks": [4], "target_sets": ["all"]}}


def notebook_copy(prefix: str, root: Path, out: Path) -> str:
    """Copy notebook ``prefix`` into ``root`` with the smoke preset's parameters injected; return its name."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from lora_lens.workshop.presets import PRESETS

    [src] = sorted((REPO / "notebooks").glob(f"{prefix}_*.ipynb"))
    nb = load_notebook_node(str(src))  # papermill's reader (it gives every cell a tags list)
    params = {**PRESETS["smoke"][prefix], **BROWSER_PARAMS.get(prefix, {}), "output_dir": str(out / src.stem)}
    nb = parameterize_notebook(nb, params, kernel_name="python3", language="python")
    nbformat.write(nb, root / src.name)
    return src.name


@pytest.fixture(scope="module")
def lab(tmp_path_factory, test_cache):
    """JupyterLab on 127.0.0.1 (free port, token) over copies of notebooks 01 and 03 with smoke parameters."""
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "nbs"
    root.mkdir()
    names = {p: notebook_copy(p, root, tmp / "out") for p in ("01", "03")}
    settings = tmp / "user-settings" / "@jupyterlab"
    (settings / "apputils-extension").mkdir(parents=True)
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    (settings / "notebook-extension").mkdir()  # every cell in the DOM, so widgets far down can be found
    (settings / "notebook-extension" / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), JUPYTER_CONFIG_DIR=str(tmp / "jupyter-config"),
               LORA_LENS_CACHE=str(test_cache), LORA_LENS_LEDGER=str(tmp / "ledger.sqlite"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               MPLBACKEND="module://matplotlib_inline.backend_inline")
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", f"--LabApp.user_settings_dir={tmp / 'user-settings'}",
           f"--LabApp.workspaces_dir={tmp / 'workspaces'}", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp / "jupyter-lab.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"

    def api(path):
        req = urllib.request.Request(base + path, headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited: {(tmp / 'jupyter-lab.log').read_text()[-2000:]}")
        try:
            api("/api/status")
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.3)
    yield {"base": base, "token": token, "api": api, "root": root, "names": names, "log": tmp / "jupyter-lab.log"}
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


_TRACEBACK_JS = """return [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
  .map(e => e.textContent).filter(t => t.includes('Traceback') || t.includes('Error')).slice(0, 1)"""


def open_and_run_all(driver, lab, name: str, timeout: float = 1500):
    """Open a notebook, wait for its kernel, run all cells and wait until every code cell ran and the kernel idles."""
    from selenium.webdriver.support.ui import WebDriverWait

    # ?reset: a fresh workspace, so only this notebook is open (the server remembers the previous one's tabs)
    driver.get(f"{lab['base']}/lab/tree/{name}?reset&token={lab['token']}")
    kernel = WebDriverWait(driver, 120, poll_frequency=0.5).until(lambda d: d.execute_script(
        "const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
        "const k = w && w.context && w.context.path === arguments[0] && w.sessionContext"
        " && w.sessionContext.session && w.sessionContext.session.kernel;"
        "return k && k.connectionStatus === 'connected' && w.content.widgets.length > 3 ? k.name : null", name))
    assert kernel == "python3"
    # not awaited: the command's promise resolves only when every cell has run
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells'); return true")

    def done(d):
        errors = d.execute_script(_TRACEBACK_JS)
        if errors:
            raise AssertionError(f"{name}: a cell failed in JupyterLab:\n{errors[0][-3000:]}")
        prompts = d.execute_script(
            "return [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent)")
        if not prompts or any("*" in p or p.strip() in ("[ ]:", "") for p in prompts):
            return False
        return all(k["execution_state"] == "idle" for k in lab["api"]("/api/kernels"))
    WebDriverWait(driver, timeout, poll_frequency=1).until(done)


def select_option(driver, label: str, index: int):
    """Choose option ``index`` of the ipywidgets Dropdown labelled ``label``; return the option's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    for box in driver.find_elements(By.CSS_SELECTOR, ".widget-dropdown"):
        if box.find_element(By.CSS_SELECTOR, "label").text.strip() == label:
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
            select = Select(box.find_element(By.TAG_NAME, "select"))
            select.select_by_index(index)
            return select.first_selected_option.text
    raise AssertionError(f"no dropdown labelled {label!r} in the page")


def widget_output(driver, near_label: str) -> str:
    """innerHTML of the widget Output area in the same widget box as the dropdown labelled ``near_label``
    (read in one JS call: the output's nodes are replaced on every update)."""
    return driver.execute_script("""
      const lab = [...document.querySelectorAll('.widget-dropdown label')].find(l => l.textContent.trim() === arguments[0]);
      let box = lab && lab.closest('.widget-vbox');
      while (box && !box.querySelector('.widget-output')) box = box.parentElement.closest('.widget-vbox');
      const out = box && box.querySelector('.widget-output');
      return out ? out.innerHTML : null;""", near_label)


@pytest.mark.parametrize("prefix, label, index", [("01", "probe set", 1), ("03", "probe", 1)])
def test_notebook_widgets_respond_in_jupyterlab(lab, tmp_path, prefix, label, index):
    from selenium.webdriver.support.ui import WebDriverWait

    t0 = time.monotonic()
    driver = chrome(tmp_path, NETWORK_OFF)
    try:
        open_and_run_all(driver, lab, lab["names"][prefix])
        t_run = time.monotonic()
        WebDriverWait(driver, 30).until(lambda d: widget_output(d, label))
        before = widget_output(driver, label)
        shot(driver, tmp_path, f"{prefix}-1-after-run-all")
        chosen = select_option(driver, label, index)
        WebDriverWait(driver, 60, poll_frequency=0.5).until(
            lambda d: (widget_output(d, label) or before) != before)  # the kernel ran the callback, the view changed
        time.sleep(0.5)
        shot(driver, tmp_path, f"{prefix}-2-after-widget")
        errors = console_errors(driver)
        outside = leaving_machine(requested_urls(driver))
        print(f"\n{prefix}: chose {chosen!r}; run-all {t_run - t0:.0f} s, total {time.monotonic() - t0:.0f} s")
        assert not errors, errors
        assert not outside, outside
    finally:
        driver.quit()


# ------------------------------------------------------------------------------------------- offline report
FORMULA_NB = [
    "import ipywidgets as w\nw.IntSlider(value=3, description='k')",
    "print('done', 6 * 7)",
]


def test_run_report_is_offline_with_formulas(tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from conftest import write_notebook
    from lora_lens.workshop import presets
    from lora_lens.workshop.runner import run_series

    t0 = time.monotonic()
    monkeypatch.setattr(presets, "PRESETS", {"workshop": {}, "smoke": {}})
    monkeypatch.setenv("LORA_LENS_LEDGER", str(tmp_path / "ledger.sqlite"))
    folder = tmp_path / "nbs"
    path = write_notebook(folder / "00_formulas.ipynb", FORMULA_NB)
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell(
        "LoRA learns $\\Delta W = \\frac{\\alpha}{r} BA$ with\n\n$$\\operatorname{rank}(\\Delta W) \\le r$$"))
    nbformat.write(nb, path)
    run = run_series(notebooks_dir=folder, out=tmp_path / "run")
    t_report = time.monotonic()
    driver = chrome(tmp_path, NETWORK_OFF)
    try:
        urls = []
        driver.get((run / "index.html").as_uri())
        assert "00_formulas" in driver.page_source
        urls += requested_urls(driver)
        driver.get((run / "report" / "00_formulas.html").as_uri())
        wait = WebDriverWait(driver, 60, poll_frequency=0.5)
        wait.until(lambda d: d.execute_script(
            "return !!(window.MathJax && MathJax.Hub && MathJax.Hub.queue && MathJax.Hub.queue.pending === 0"
            " && document.querySelectorAll('.jp-MarkdownCell .MathJax').length >= 2)"))
        assert not driver.find_elements(By.CSS_SELECTOR, ".MathJax_Error, merror, .mjx-merror")
        assert "interactive widget: open the notebook in JupyterLab" in driver.page_source
        time.sleep(1)  # late loads (fonts) into the log
        shot(driver, tmp_path, "report-export-offline")
        urls += requested_urls(driver)
        errors = console_errors(driver)
        (tmp_path / "requests.txt").write_text("\n".join(urls))
        print(f"\nrun + report {t_report - t0:.0f} s, browser {time.monotonic() - t_report:.0f} s, "
              f"{len(urls)} requests, all file:// : {all(u.startswith('file://') for u in urls)}")
        assert urls, "the performance log recorded nothing: the request listing is broken"
        # about:blank is the browser's own empty document (never a request over the network)
        assert all(u.startswith(("file://", "data:", "about:blank")) for u in urls), \
            [u for u in urls if not u.startswith("file")]
        assert all(Path(urlsplit(u).path).resolve().is_relative_to(run) for u in urls if u.startswith("file://"))
        assert not errors, errors
    finally:
        driver.quit()

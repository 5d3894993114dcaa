"""What a person sees in the MLflow UI for a sweep: a real `mlflow server` and headless Chromium.

Runs are written in the project's schema (orchestration/tracking.py) through
the REST client against the server; their data is checked through the REST
API, and the browser only checks what a person sees: the nested trial runs of
the sweep in the runs table, a val_map column and a searched param made
visible with the Columns dropdown, and the compare view of two runs.
Screenshots go to test-output/mlflow_ui/ in the repository root (gitignored).

Needs Debian's `chromium` and `chromium-driver` (/usr/bin/chromium,
/usr/bin/chromedriver); skipped with a reason without them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-output" / "mlflow_ui"

if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is absent: apt-get install chromium chromium-driver "
                "(CI installs them)", allow_module_level=True)
if not Path(CHROMEDRIVER).is_file():
    pytest.skip(f"{CHROMEDRIVER} is absent: apt-get install chromium-driver", allow_module_level=True)

webdriver = pytest.importorskip("selenium.webdriver")
from mlflow.tracking import MlflowClient  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from orchestration import tracking as T  # noqa: E402
from tests.test_aggregate import RunSpec, curve, final_specs, write_sweep  # noqa: E402

CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1600,1000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(what: str, fn, timeout: float = 60.0, interval: float = 0.25, on_timeout=None):
    """Call fn until it returns something truthy (exceptions count as not yet); fail after timeout."""
    end = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < end:
        try:
            value = fn()
            if value:
                return value
        except Exception as err:  # noqa: BLE001 - the page is still changing
            last = err
        time.sleep(interval)
    if on_timeout:
        on_timeout()
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                         + (f" (last error: {type(last).__name__}: {last})" if last else ""))


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1:<free port> against a SQLite store in tmp_path; yields its URL."""
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
         "--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        if proc.poll() is not None:
            raise RuntimeError("exited")
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200

    try:
        try:
            poll("mlflow server /health", healthy, timeout=120, interval=0.5)
        except AssertionError:
            log.flush()
            raise AssertionError(f"mlflow server did not come up (exit {proc.poll()}):\n"
                                 + (tmp_path / "server.log").read_text()[-3000:]) from None
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)          # stops its workers too
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)   # its own session: only what it started
                proc.wait(timeout=10)
        log.close()


@pytest.fixture
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    driver.save_screenshot(str(path))
    return path


def _close_assistant(driver) -> None:
    """Close the "MLflow Assistant" side panel when it is open."""
    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        try:
            if button.is_displayed():
                button.click()
        except WebDriverException:
            pass


def _show_column(driver, name: str) -> None:
    """Columns dropdown -> search `name` -> tick the entry called exactly `name` -> close."""
    popover_css = "[data-component-id='mlflow.experiment_page.runs_table.column_selector']"
    driver.find_element(By.CSS_SELECTOR, "button[data-testid='column-selection-dropdown']").click()
    pop = poll("the Columns dropdown", lambda: driver.find_element(By.CSS_SELECTOR, popover_css))
    pop.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']").send_keys(name)
    node = poll(f"column {name!r} in the Columns dropdown",
                lambda: [n for n in pop.find_elements(By.CSS_SELECTOR, ".du-bois-light-tree-treenode")
                         if n.text.strip() == name])[0]
    node.find_element(By.CSS_SELECTOR, ".du-bois-light-tree-node-content-wrapper").click()
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    poll("the Columns dropdown to close", lambda: not driver.find_elements(By.CSS_SELECTOR, popover_css))


def test_sweep_runs_in_the_mlflow_ui(mlflow_server, browser, tmp_path):
    t_start = time.monotonic()
    url = mlflow_server
    client = MlflowClient(tracking_uri=url)                    # the REST client
    rng = np.random.default_rng(7)
    specs = [RunSpec("LL-R", delta_rel=2.0, lr=1e-3, val_map=curve(51, 5, rng)),
             RunSpec("LL-Ct", delta_rel=3.5, lr=2e-3, val_map=curve(45, 2, rng), end_reason="asha_stopped"),
             RunSpec("AN", delta_rel=0.0, lr=1e-3, val_map=curve(42, 5, rng))]
    specs += final_specs("LL-R", [50.2, 51.1])
    exp_id, parent_id, run_ids = write_sweep(client, "ui-sweep", "digits", "end-to-end", specs)
    trial_ids = run_ids[:3]

    # Data correctness through the REST API: nesting, tags, params, the val_map history.
    names, last_val = {}, {}
    for spec, rid in zip(specs, run_ids):
        run = client.get_run(rid)
        assert run.data.tags[T.TAG_PARENT] == parent_id
        assert run.data.tags[T.TAG_ROLE] == spec.role and run.data.tags[T.TAG_SCHEME] == spec.scheme
        assert float(run.data.params["delta_rel"]) == spec.delta_rel
        assert float(run.data.params["lr"]) == spec.lr and run.data.params["scheme"] == spec.scheme
        hist = sorted((m.step, m.value) for m in client.get_metric_history(rid, T.VAL_MAP))
        assert hist == [(e, pytest.approx(v)) for e, v in enumerate(spec.val_map, start=1)]
        assert run.data.metrics[T.VAL_MAP] == pytest.approx(spec.val_map[-1])
        names[rid] = run.info.run_name
        last_val[rid] = run.data.metrics[T.VAL_MAP]
    assert client.get_run(parent_id).data.tags[T.TAG_ROLE] == T.ROLE_SWEEP

    # The runs table: the sweep's parent run, expanded to its nested trials.
    d = browser
    d.get(f"{url}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
    fail = lambda name: lambda: _shot(d, name)  # noqa: E731
    parent_link = poll("the sweep's parent run in the runs table",
                       lambda: d.find_element(By.CSS_SELECTOR, f"a[href$='/runs/{parent_id}']"),
                       timeout=90, on_timeout=fail("timeout-runs-table.png"))
    assert parent_link.text == "ui-sweep"
    _close_assistant(d)
    poll("the parent row's expander", lambda: parent_link.find_element(
        By.XPATH, "./ancestor::*[contains(@class,'ag-cell-wrapper')][1]//button").click() or True,
        on_timeout=fail("timeout-expand.png"))

    def trial_rows():
        rows = {}
        for rid in trial_ids:
            link = d.find_element(By.LINK_TEXT, names[rid])          # found by its run name
            assert link.get_attribute("href").endswith(f"/runs/{rid}")
            rows[rid] = link.find_element(By.XPATH, "./ancestor::*[@role='row'][1]").get_attribute("row-id")
        return rows

    rows = poll("the nested trial runs by name", trial_rows, on_timeout=fail("timeout-trials.png"))
    assert rows == {rid: rid for rid in trial_ids}

    # Columns dropdown: the val_map metric and the searched delta_rel param become columns.
    for column in ("val_map", "delta_rel"):
        _show_column(d, column)
    headers = poll("the new column headers", lambda: (lambda h: "val_map" in h and "delta_rel" in h and h)(
        [h.text for h in d.find_elements(By.CSS_SELECTOR, ".ag-header-cell")]),
        on_timeout=fail("timeout-columns.png"))
    assert headers.index("val_map") < headers.index("delta_rel")

    def cell(rid: str, col_id: str) -> str:
        return d.find_element(By.CSS_SELECTOR, f"[row-id='{rid}'] [role='gridcell'][col-id='{col_id}']").text

    def cells_shown():
        return all(cell(rid, "metrics.`val_map`") and cell(rid, "params.`delta_rel`") for rid in trial_ids)

    poll("val_map and delta_rel cells of every trial", cells_shown, on_timeout=fail("timeout-cells.png"))
    for spec, rid in zip(specs, trial_ids):
        assert float(cell(rid, "metrics.`val_map`")) == pytest.approx(last_val[rid], abs=1e-3)
        assert cell(rid, "params.`delta_rel`") == client.get_run(rid).data.params["delta_rel"]
    _close_assistant(d)
    _shot(d, "runs-table.png")

    # The compare view of two trials: both run names and val_map, no clicks needed.
    pair = trial_ids[:2]
    q_runs = urllib.parse.quote(json.dumps(pair))
    q_exps = urllib.parse.quote(json.dumps([exp_id]))
    d.get(f"{url}/#/compare-runs?runs={q_runs}&experiments={q_exps}")

    def compare_text():
        text = d.find_element(By.TAG_NAME, "body").text
        want = ["Comparing 2 Runs", "val_map", "delta_rel", *(names[r] for r in pair),
                *(f"{last_val[r]:.2f}" for r in pair)]
        return text if all(w in text for w in want) else None

    text = poll("the compare view with both runs and val_map", compare_text, timeout=90,
                on_timeout=fail("timeout-compare.png"))
    assert names[trial_ids[2]] not in text                      # only the two compared runs
    _close_assistant(d)
    _shot(d, "compare.png")
    details = d.find_elements(By.XPATH, "//*[normalize-space(text())='Run details']")
    if details:
        d.execute_script("arguments[0].scrollIntoView({block: 'start'});", details[-1])
        _shot(d, "compare-details.png")

    # The val_map row of the compare view's Metrics table holds both runs' values, in run order.
    values = poll("the val_map row of the Metrics table", lambda: _metric_row(d, "val_map"),
                  on_timeout=fail("timeout-compare-metrics.png"))
    assert [float(v) for v in values] == [pytest.approx(last_val[r], abs=0.006) for r in pair]
    assert time.monotonic() - t_start < 240


_ROW_JS = """
const box = arguments[0], key = arguments[1];
const grids = [...box.querySelectorAll('.ReactVirtualized__Grid')];
const cells = grids.map(g => [...g.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > *')]);
const name = cells[0].find(c => c.textContent.trim() === key);
if (!name) return null;
const row = cells.slice(1).flat().filter(c => c.style.top === name.style.top);
return row.length ? row.map(c => c.textContent.trim()) : null;
"""


def _metric_row(driver, key: str) -> list[str] | None:
    """Values of metric `key` in the compare view's Metrics table (a virtualised grid: the
    metric names in one grid, the values in another, rows matched by their offset)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    link = [a for a in driver.find_elements(By.CSS_SELECTOR, "a[title='Plot chart']")
            if a.get_attribute("textContent").strip() == key][0]
    box = link.find_element(By.XPATH, "./ancestor::*[contains(@class,'collapse-content-box')][1]")
    row = driver.execute_script(_ROW_JS, box, key)
    if row:
        return row
    values_grid = box.find_elements(By.CSS_SELECTOR, ".ReactVirtualized__Grid")[-1]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", values_grid)
    ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(values_grid), 0, 400).perform()
    return None

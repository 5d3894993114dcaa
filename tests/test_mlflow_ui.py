"""What a person sees in the MLflow UI for a sweep: a real `mlflow server` and headless Chromium.

Runs are written in the project's schema (orchestration/common.py) through
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
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.service, pytest.mark.slow, pytest.mark.timeout(300)]

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

from orchestration import common as T  # noqa: E402
from tests.helpers import poll  # noqa: E402
from tests.synthetic_runs import RunSpec, curve, final_specs, write_sweep  # noqa: E402

CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1600,1000"]


def _chromium():
    """A headless Chromium with a fresh profile (nothing remembered of earlier visits)."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    return driver


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module's tests (each loads its own page)."""
    driver = _chromium()
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    driver.save_screenshot(str(path))
    return path


def _click(what: str, find, on_timeout=None, timeout: float = 60.0):
    """Click what `find` returns once the page lets it be clicked: a tree node that has just been
    rendered can be found before it is interactable (it was, once, in CI)."""
    def attempt():
        element = find()
        element.click()
        return element
    return poll(what, attempt, timeout=timeout, on_timeout=on_timeout)


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
    _click("the Columns button", lambda: driver.find_element(
        By.CSS_SELECTOR, "button[data-testid='column-selection-dropdown']"))
    pop = poll("the Columns dropdown", lambda: driver.find_element(By.CSS_SELECTOR, popover_css))
    pop.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']").send_keys(name)
    _click(f"column {name!r} in the Columns dropdown", lambda: next(
        n for n in pop.find_elements(By.CSS_SELECTOR, ".du-bois-light-tree-treenode") if n.text.strip() == name
    ).find_element(By.CSS_SELECTOR, ".du-bois-light-tree-node-content-wrapper"))
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    poll("the Columns dropdown to close", lambda: not driver.find_elements(By.CSS_SELECTOR, popover_css))


def test_sweep_runs_in_the_mlflow_ui(mlflow_server, browser, tmp_path):
    t_start = time.monotonic()
    url = mlflow_server.url
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
    _click("the parent row's expander", lambda: parent_link.find_element(
        By.XPATH, "./ancestor::*[contains(@class,'ag-cell-wrapper')][1]//button"),
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


def test_the_sweep_run_shows_table1_and_the_figures_in_its_artifacts(browser, tmp_path, monkeypatch):
    """A local store as the sweep leaves it (sqlite mlflow.db, artifacts in MLflow's default ./mlruns),
    aggregated and attached to the sweep's run by the sweep's own code; then `mlflow server` on that
    store, as `mlflow ui --backend-store-uri sqlite:///mlflow.db` runs it, and the run's Artifacts tab."""
    from PIL import Image

    from orchestration.tracking import store
    from orchestration.aggregate import aggregate
    from tests.helpers import MlflowServer

    monkeypatch.chdir(tmp_path)                 # the sweep's working folder: mlflow.db and mlruns/ go here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    writer = store.client(uri)
    rng = np.random.default_rng(3)
    specs = [RunSpec("AN", delta_rel=0.0, val_map=curve(60, 5, rng)),
             RunSpec("LL-R", delta_rel=2.0, val_map=curve(70, 5, rng))]
    tests = {"AN": [61.0, 62.5, 60.4], "LL-R": [71.2, 70.1, 72.0]}
    specs += final_specs("AN", tests["AN"]) + final_specs("LL-R", tests["LL-R"])
    exp_id, parent_id, _ = write_sweep(writer, "ui-results", "digits", "end-to-end", specs)
    res = aggregate(uri, None, tmp_path / "results")
    logged = store.log_results(writer, parent_id, res.out_dir, res.files + res.figures)
    assert {"table1.md", "figures/table1_vs_paper.png"} <= set(logged)
    assert (tmp_path / "mlruns" / exp_id / parent_id / "artifacts" / "table1.md").is_file()

    server = MlflowServer(tmp_path / "mlflow.db", tmp_path / "server-artifacts", tmp_path / "server.log").start()
    try:
        client = MlflowClient(tracking_uri=server.url)
        # the server lists and serves them (what the UI asks it for)
        assert {f.path for f in client.list_artifacts(parent_id)} >= {"table1.md", "figures"}
        d = browser
        d.get(f"{server.url}/#/experiments/{exp_id}/runs/{parent_id}/artifacts")
        fail = lambda name: lambda: _shot(d, name)  # noqa: E731

        def node(name: str):
            return d.find_element(By.CSS_SELECTOR, f"[data-testid='artifact-tree-node'][artifact-name='{name}']")

        _click("table1.md in the run's artifact tree", lambda: node("table1.md"), timeout=90,
               on_timeout=fail("timeout-artifacts.png"))
        # the markdown is rendered: the title, and the digits cells of AN and LL-R (a cell may wrap)
        want = ["Table 1: test mAP, ours vs. the paper"] + [
            f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f} (n=3)" for v in tests.values()]
        poll("Table 1 in the artifact preview",
             lambda: all(w in " ".join(d.find_element(By.TAG_NAME, "body").text.split()) for w in want),
             on_timeout=fail("timeout-table1.png"))
        _close_assistant(d)
        _shot(d, "artifacts-table1.png")

        _click("the figures folder in the tree", lambda: node("figures"), on_timeout=fail("timeout-folder.png"))
        _click("the Table 1 figure in the tree", lambda: node("table1_vs_paper.png"),
               on_timeout=fail("timeout-figures.png"))
        width = Image.open(tmp_path / "results" / "figures" / "table1_vs_paper.png").size[0]

        def shown_image():
            return [i for i in d.find_elements(By.TAG_NAME, "img")
                    if (i.get_attribute("src") or "").startswith("blob:")
                    and int(i.get_attribute("naturalWidth") or 0) == width]

        poll("the Table 1 figure in the artifact preview", shown_image, on_timeout=fail("timeout-figure.png"))
        _shot(d, "artifacts-table1-figure.png")
    finally:
        server.stop()


def test_the_links_a_sweep_prints_open_its_runs_table(mlflow_server, tmp_path):
    """The experiment as a sweep creates it (orchestration.tracking.store.start_parent: tagged model training), its
    sweep run with a nested trial; the link the sweep prints, in a fresh browser, shows the runs table
    holding the sweep's run, not MLflow 3's GenAI overview. (MLflow 3.17 opens the bare experiment page on
    its GenAI overview whatever the experiment's kind: the link carries workflowType.)"""
    from orchestration.tracking import store

    c = MlflowClient(tracking_uri=mlflow_server.url)
    exp_id, parent_id = store.start_parent(c, "ui-links", "digits", {"num_samples": "1"}, resume=False)
    trial = c.create_run(exp_id, run_name="LL-R d=2 lr=0.001 #t1",
                         tags={T.TAG_PARENT: parent_id, T.TAG_ROLE: T.ROLE_TRIAL}).info.run_id
    c.log_metric(trial, T.VAL_MAP, 50.0, step=1)
    assert c.get_experiment(exp_id).tags[T.TAG_EXPERIMENT_KIND] == T.KIND_MODEL_TRAINING
    printed = store.experiment_url(mlflow_server.url, exp_id)
    d = _chromium()                                   # a fresh profile: nothing remembered of another visit
    try:
        d.get(printed)
        link = poll("the sweep's run in the runs table behind the printed link",
                    lambda: d.find_element(By.CSS_SELECTOR, f"a[href$='/runs/{parent_id}']"), timeout=90,
                    on_timeout=lambda: _shot(d, "timeout-printed-link.png"))
        assert link.text == "sweep ui-links"
        body = " ".join(d.find_element(By.TAG_NAME, "body").text.split())
        assert "No data available" not in body and "Evaluation runs" not in body, body[:500]
        _shot(d, "printed-link.png")
    finally:
        d.quit()

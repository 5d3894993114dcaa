"""orchestration/aggregate.py against MLflow stores written in the project's schema.

Every store is built here with the MlflowClient, exactly as the sweep writes
runs (orchestration/common.py): a parent run per sweep (role=sweep) and
nested trial / final runs with tags, params, per-epoch and final metrics.
Every table cell is checked against numbers computed straight from the
client's runs with numpy.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from orchestration import aggregate as A  # noqa: E402
from orchestration import common as T  # noqa: E402
from orchestration.report import paper
from orchestration.common import AggregateError  # noqa: E402
from tests.synthetic_runs import RunSpec, curve, final_specs, write_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = ("table1.md", "table1.csv", "table1.tex", "sweeps.md", "sweeps.csv")


@pytest.fixture(scope="module")
def _store_db(tmp_path_factory) -> Path:
    """Build the store once per module (writing ~70 runs to SQLite takes seconds); tests get a copy."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    build_store(f"sqlite:///{path}")
    return path


@pytest.fixture
def store(_store_db, tmp_path):
    """A copy of the module's store in tmp_path: (uri, client)."""
    shutil.copyfile(_store_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return uri, MlflowClient(tracking_uri=uri)


def build_store(uri: str) -> None:
    """A digits sweep (4 schemes), VOC end-to-end and LinearInit finals; COCO/NUS/CUB without runs."""
    client = MlflowClient(tracking_uri=uri)
    rng = np.random.default_rng(0)
    digits = []
    # Search trials: 4 schemes; ASHA stops (tagged and one untagged short run), a stop_drop, a failure.
    digits += [RunSpec("AN", delta_rel=0.0, lr=1e-3, val_map=curve(42, 5, rng), gpu_hours=0.01),
               RunSpec("AN", delta_rel=0.0, lr=3e-3, val_map=curve(38, 2, rng), end_reason="asha_stopped",
                       gpu_hours=0.004)]
    digits += [RunSpec("LL-R", delta_rel=2.0, lr=1e-3, val_map=curve(51, 5, rng), gpu_hours=0.01),
               RunSpec("LL-R", delta_rel=4.0, lr=2e-3, val_map=curve(45, 2, rng), end_reason="asha_stopped",
                       gpu_hours=0.004),
               RunSpec("LL-R", delta_rel=1.0, lr=5e-4, val_map=curve(44, 3, rng), end_reason=None,
                       gpu_hours=0.006),                    # untagged, 3 < 5 epochs: ASHA
               RunSpec("LL-R", delta_rel=3.0, lr=1e-3, val_map=curve(47, 4, rng), end_reason="stop_drop",
                       gpu_hours=0.008)]
    digits += [RunSpec("LL-Ct", delta_rel=2.5, lr=1e-3, val_map=curve(50, 5, rng), gpu_hours=0.01),
               RunSpec("LL-Ct", delta_rel=1.5, lr=8e-4, val_map=curve(49.5, 5, rng), gpu_hours=0.01),
               RunSpec("LL-Ct", delta_rel=5.0, lr=1e-3, val_map=curve(40, 1, rng),
                       end_reason="failed: CUDA out of memory", status="FAILED")]
    digits += [RunSpec("LL-Cp", delta_rel=1.0, lr=1e-3, val_map=curve(48, 5, rng), gpu_hours=0.01),
               RunSpec("LL-Cp", delta_rel=2.0, lr=1e-3, val_map=curve(43, 2, rng), end_reason="asha_stopped",
                       gpu_hours=0.004)]
    digits += final_specs("AN", [41.2, 42.9, 40.7])
    digits += final_specs("LL-R", [50.1, 51.3, 49.8], delta_rel=2.0)
    digits += final_specs("LL-Ct", [49.0, 50.6, 50.2], delta_rel=2.5)
    digits += final_specs("LL-Cp", [47.5, 48.8, 48.1], delta_rel=1.0)
    write_sweep(client, "digits-ll", "digits", "end-to-end", digits)

    voc = [RunSpec("LL-R", delta_rel=0.2, lr=1e-5, epochs=10, val_map=curve(88, 10, rng), gpu_hours=0.3),
           RunSpec("LL-R", delta_rel=0.4, lr=2e-5, epochs=10, val_map=curve(86, 3, rng),
                   end_reason="asha_stopped", gpu_hours=0.1),
           RunSpec("AN", delta_rel=0.0, lr=1e-5, epochs=10, val_map=curve(85, 10, rng), gpu_hours=0.3)]
    voc += final_specs("LL-R", [89.31, 88.72, 89.05], epochs=10, delta_rel=0.2, lr=1e-5)
    voc += final_specs("AN", [85.4, 84.9, 85.0], epochs=10)
    voc += final_specs("full", [90.4], epochs=10)          # n = 1: no std
    write_sweep(client, "voc-e2e", "pascal", "end-to-end", voc)

    li = [RunSpec("LL-R", delta_rel=0.3, lr=1e-5, epochs=10, val_map=curve(88, 10, rng), gpu_hours=0.2)]
    li += final_specs("LL-R", [89.9, 89.1], epochs=10, delta_rel=0.3, lr=1e-5)
    write_sweep(client, "voc-li", "pascal", "linear-init", li)


def finals_from_mlflow(client: MlflowClient) -> dict[tuple[str, str, str], np.ndarray]:
    """test_map of every finished role=final run, straight from the client, by (scheme, dataset, mode)."""
    out: dict[tuple[str, str, str], list[float]] = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=10000):
            t = run.data.tags
            if t.get(T.TAG_ROLE) != T.ROLE_FINAL or run.info.status != "FINISHED":
                continue
            key = (t[T.TAG_SCHEME], t[T.TAG_DATASET], t[T.TAG_MODE])
            out.setdefault(key, []).append(run.data.metrics[T.TEST_MAP])
    return {k: np.array(v) for k, v in out.items()}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def md_table(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """(header cells, {row label: cells}) of the first Markdown table in a file."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    header, rows = split[0], split[2:]
    return header, {r[0]: r[1:] for r in rows}


def expected_cell(values: np.ndarray | None, ref: float | None) -> str:
    """The cell text computed independently from the raw values."""
    if values is None or values.size == 0:
        ours = "–"
    elif values.size == 1:
        ours = f"{values.mean():.2f} (n=1)"
    else:
        ours = f"{values.mean():.2f} ± {values.std(ddof=1):.2f} (n={values.size})"
    parts = [ours]
    if ref is not None:
        parts.append(f"paper {ref}")         # as published: Table 1 with one decimal, later papers two
        if values is not None and values.size:
            parts.append(f"Δ {values.mean() - ref:+.2f}")
    return " · ".join(parts)


# --------------------------------------------------------------------------- Table 1

def test_table1_every_cell_matches_mlflow(store, tmp_path):
    uri, client = store
    out = tmp_path / "results"
    res = A.aggregate(uri, None, out, all_columns=True)       # the paper's whole grid (the default: below)
    assert sorted(res.experiments) == ["digits-ll", "voc-e2e", "voc-li"]
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert not (out / "openimages.md").exists()          # no OpenImages runs
    assert not list(out.glob(".*.tmp"))                   # no temp files left behind

    finals = finals_from_mlflow(client)
    assert set(finals) == {("AN", "digits", "end-to-end"), ("LL-R", "digits", "end-to-end"),
                           ("LL-Ct", "digits", "end-to-end"), ("LL-Cp", "digits", "end-to-end"),
                           ("LL-R", "pascal", "end-to-end"), ("AN", "pascal", "end-to-end"),
                           ("full", "pascal", "end-to-end"), ("LL-R", "pascal", "linear-init")}

    # CSV: one tidy row per (method, dataset, mode), every one checked.
    rows = read_csv(out / "table1.csv")
    datasets = ["pascal", "coco", "nuswide", "cub", "digits"]      # the paper's four always, then ours
    modes = ["end-to-end", "linear-init"]
    assert {(r["method"], r["dataset"], r["mode"]) for r in rows} == {
        (m, d, mo) for m in paper.METHODS for d in datasets for mo in modes}
    assert len(rows) == len(paper.METHODS) * len(datasets) * len(modes)
    for r in rows:
        vals = finals.get((r["method"], r["dataset"], r["mode"]))
        ref = paper.table1(r["method"], r["dataset"], r["mode"])
        n = 0 if vals is None else vals.size
        assert int(r["n"]) == n
        if ref is None:
            assert r["paper"] == "" and r["diff"] == ""
        else:
            assert float(r["paper"]) == pytest.approx(ref)
        if n == 0:
            assert r["mean"] == r["std"] == r["diff"] == ""
            continue
        assert float(r["mean"]) == pytest.approx(vals.mean(), abs=1e-4)
        if n == 1:
            assert r["std"] == ""                                  # std blank for n = 1
        else:
            assert float(r["std"]) == pytest.approx(vals.std(ddof=1), abs=1e-4)
        if ref is not None:
            assert float(r["diff"]) == pytest.approx(vals.mean() - ref, abs=1e-4)

    # Markdown: the paper's columns in the paper's order, then ours; every cell's text.
    header, table = md_table(out / "table1.md")
    labels = {"pascal": "VOC", "coco": "COCO", "nuswide": "NUS", "cub": "CUB", "digits": "digits"}
    mode_labels = {"end-to-end": "End-to-end", "linear-init": "LinearInit"}
    cols = [(mo, d) for mo in modes for d in datasets]
    assert header[1:] == [f"{mode_labels[mo]} {labels[d]}" for mo, d in cols]
    assert list(table) == list(paper.METHODS)
    for method in paper.METHODS:
        for (mo, d), cell in zip(cols, table[method], strict=True):
            want = expected_cell(finals.get((method, d, mo)), paper.table1(method, d, mo))
            assert cell == want, (method, d, mo)
    text = (out / "table1.md").read_text()
    for v in paper.TABLE1.values():                    # every published number is there
        assert f"paper {v:.1f}" in text
    assert table["LL-Cp"][cols.index(("end-to-end", "coco"))] == "– · paper 70.7"   # empty, marked
    assert table["LL-R"][cols.index(("end-to-end", "digits"))].startswith("50.40 ± 0.79 (n=3)")
    assert table["full"][cols.index(("end-to-end", "pascal"))] == "90.40 (n=1) · paper 90.2 · Δ +0.20"

    # LaTeX: exists, booktabs, and every CSV mean / paper number is in its method's row.
    tex = (out / "table1.tex").read_text()
    assert "\\begin{tabular}" in tex and "\\toprule" in tex and "\\end{tabular}" in tex
    tex_rows = {ln.split("&")[0].strip(): ln for ln in tex.splitlines() if "&" in ln}
    for r in rows:
        line = tex_rows[r["method"]]
        cells = [c.strip().rstrip("\\").strip() for c in line.split("&")[1:]]
        cell = cells[cols.index((r["mode"], r["dataset"]))]
        if r["mean"]:
            assert cell.startswith(f"{float(r['mean']):.2f}")
            assert f"(n={r['n']})" in cell
        else:
            assert cell.startswith("--")
        if r["paper"]:
            assert f"paper {float(r['paper']):.1f}" in cell

    # The result object carries the same tidy table.
    t1 = res.table1.set_index(["method", "dataset", "mode"])
    assert t1.loc[("LL-R", "pascal", "linear-init"), "n"] == 2
    assert t1.loc[("LL-R", "pascal", "linear-init"), "mean"] == pytest.approx(89.5)


def test_sweep_summary_counts(store, tmp_path):
    uri, client = store
    out = tmp_path / "results"
    A.aggregate(uri, ["digits-ll"], out)
    rows = {(r["sweep"], r["scheme"]): r for r in read_csv(out / "sweeps.csv")}
    assert set(rows) == {("digits-ll", s) for s in ("AN", "LL-R", "LL-Ct", "LL-Cp", "all")}

    # Independently from the client: count trials, ASHA stops (tag, or fewer epochs than configured
    # without a tag), sums of epochs_run and gpu_hours, the best trial by best_val_map.
    exp = client.get_experiment_by_name("digits-ll")
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(T.TAG_ROLE) == "trial"]
    for scheme in ("AN", "LL-R", "LL-Ct", "LL-Cp"):
        mine = [r for r in trials if r.data.tags[T.TAG_SCHEME] == scheme]
        asha = [r for r in mine if r.data.tags.get(T.TAG_STATUS_REASON) == "asha_stopped"
                or (T.TAG_STATUS_REASON not in r.data.tags
                    and r.data.metrics[T.EPOCHS_RUN] < int(r.data.params["epochs"]))]
        ok = [r for r in mine if r.info.status == "FINISHED"]
        best = max(ok, key=lambda r: r.data.metrics[T.BEST_VAL_MAP])
        row = rows[("digits-ll", scheme)]
        assert int(row["trials"]) == len(mine)
        assert int(row["asha_stopped"]) == len(asha)
        assert float(row["epochs"]) == sum(r.data.metrics[T.EPOCHS_RUN] for r in mine)
        assert float(row["gpu_hours"]) == pytest.approx(sum(r.data.metrics[T.GPU_HOURS] for r in mine))
        assert float(row["best_val_map"]) == pytest.approx(best.data.metrics[T.BEST_VAL_MAP], abs=1e-4)
        assert row["best_trial"] == best.data.tags[T.TAG_TRIAL_ID]
        assert row["best_run_id"] == best.info.run_id
        assert f"delta_rel={float(best.data.params['delta_rel']):.3g}" in row["best_config"]
        assert f"lr={float(best.data.params['lr']):.3g}" in row["best_config"]
        assert int(row["final_runs"]) == 3
    assert int(rows[("digits-ll", "LL-R")]["asha_stopped"]) == 2         # one tagged, one untagged
    assert int(rows[("digits-ll", "LL-R")]["stop_drop"]) == 1           # not an ASHA stop
    assert int(rows[("digits-ll", "LL-Ct")]["failed"]) == 1
    assert rows[("digits-ll", "LL-Ct")]["best_config"] == "delta_rel=2.5, lr=0.001"
    total = rows[("digits-ll", "all")]
    assert int(total["trials"]) == len(trials) == 11
    assert int(total["asha_stopped"]) == 4
    assert float(total["epochs"]) == sum(r.data.metrics[T.EPOCHS_RUN] for r in trials)
    md = (out / "sweeps.md").read_text()
    assert "## digits-ll (digits, End-to-end)" in md and "asha_stopped" in md
    # Table 1 for one experiment only: the columns with runs (digits end-to-end), the CSV the paper's grid
    header, table = md_table(out / "table1.md")
    assert header[1:] == ["End-to-end digits"] and table["LL-R"][0].startswith("50.40 ± 0.79 (n=3)")
    csv_cols = {(r["dataset"], r["mode"]) for r in read_csv(out / "table1.csv")}
    assert ("pascal", "end-to-end") in csv_cols and ("coco", "linear-init") in csv_cols
    A.aggregate(uri, ["digits-ll"], out / "all", figures=False, all_columns=True)
    header, table = md_table(out / "all" / "table1.md")
    assert table["LL-R"][header.index("End-to-end VOC") - 1] == "– · paper 89.2"


def test_figures_written_and_readable(store, tmp_path):
    uri, _ = store
    out = tmp_path / "results"
    res = A.aggregate(uri, None, out)
    names = sorted(p.name for p in res.figures)
    assert names == sorted(["digits-ll-val_map.png", "digits-ll-memorization.png",
                            "voc-e2e-val_map.png", "voc-e2e-memorization.png",
                            "voc-li-val_map.png", "voc-li-memorization.png", "table1_vs_paper.png"])
    from PIL import Image
    for p in res.figures:
        assert p.parent == out / "figures"
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 300


def test_boostlu_rows_and_table(tmp_path):
    """Runs with the BoostLU head are rows of their own ("LL-R + BoostLU", right under LL-R) in Table 1,
    and boostlu.md lays them out as the BoostLU paper's table with its published numbers beside ours."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    plain, boosted = [50.1, 51.3, 49.8], [51.0, 52.2, 50.6]
    specs = (final_specs("LL-R", plain) + final_specs("LL-R", boosted, boostlu_alpha=5.0)
             + final_specs("AN", [41.0, 42.0]))
    write_sweep(client, "boost", "digits", "end-to-end", specs)
    header, _ = md_table(A.aggregate(uri, None, tmp_path / "ours", figures=False).out_dir / "boostlu.md")
    assert header[1:] == ["single positive label digits"]      # by default the columns with runs only
    res = A.aggregate(uri, None, tmp_path / "out", figures=False, all_columns=True)
    t1 = res.table1.set_index(["method", "dataset", "mode"])
    cell = t1.loc[("LL-R + BoostLU", "digits", "end-to-end")]
    assert cell["n"] == 3 and cell["mean"] == pytest.approx(np.mean(boosted))
    assert t1.loc[("LL-R", "digits", "end-to-end")]["mean"] == pytest.approx(np.mean(plain))
    rows = list(dict.fromkeys(res.table1["method"]))
    assert rows.index("LL-R + BoostLU") == rows.index("LL-R") + 1
    header, table = md_table(tmp_path / "out" / "boostlu.md")
    assert list(table)[:3] == ["full", "AN", "LS"] and "LL-R + BoostLU" in table and "EM + APL" in table
    digits = header.index("single positive label digits") - 1
    voc = header.index("single positive label VOC") - 1
    assert table["LL-R + BoostLU"][digits] == expected_cell(np.array(boosted), None)
    assert table["LL-R + BoostLU"][voc] == expected_cell(None, 89.29)              # the BoostLU paper
    assert table["AN"][digits] == expected_cell(np.array([41.0, 42.0]), None)
    assert table["EM"][voc] == expected_cell(None, 89.09)                            # no EM runs here
    rows = {(r["method"], r["dataset"]): r for r in read_csv(tmp_path / "out" / "boostlu.csv")}
    assert float(rows[("LL-R + BoostLU", "pascal")]["paper"]) == 89.29
    assert (tmp_path / "out" / "boostlu.tex").read_text().count("BoostLU") >= 3
    # without BoostLU runs, no BoostLU table
    plain_uri = f"sqlite:///{tmp_path}/plain.db"
    write_sweep(MlflowClient(tracking_uri=plain_uri), "plain", "digits", "end-to-end", final_specs("LL-R", plain))
    A.aggregate(plain_uri, None, tmp_path / "out3", figures=False)
    assert not (tmp_path / "out3" / "boostlu.md").exists() and (tmp_path / "out3" / "table1.md").exists()


def test_openimages_table(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    rng = np.random.default_rng(3)
    groups = {"test_map_g1": 77.0, "test_map_g2": 79.0, "test_map_g3": 81.9, "test_map_g4": 84.4,
              "test_map_g5": 89.2}
    specs = []
    for scheme, shift in (("AN", -0.4), ("LL-R", 0.0)):
        specs.append(RunSpec(scheme, epochs=3, val_map=curve(80, 3, rng)))
        for seed in range(3):
            g = {k: v + shift + 0.1 * seed for k, v in groups.items()}
            specs.append(RunSpec(scheme, role=T.ROLE_FINAL, seed=seed, epochs=3, val_map=curve(80, 3, rng),
                                 test_map=82.0 + shift + 0.2 * seed, extra_metrics=g))
    write_sweep(client, "oi", "openimages", "end-to-end", specs)
    out = tmp_path / "results"
    res = A.aggregate(uri, None, out)
    assert (out / "openimages.md").is_file() and (out / "openimages.csv").is_file()
    rows = read_csv(out / "openimages.csv")
    exp = client.get_experiment_by_name("oi")
    finals = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(T.TAG_ROLE) == "final"]
    header, table = md_table(out / "openimages.md")
    assert header == ["method", "G1", "G2", "G3", "G4", "G5", "All"]
    assert list(table) == ["AN", "LL-R", "LL-Ct", "LL-Cp"]
    for r in rows:
        vals = np.array([f.data.metrics[r["metric"]] for f in finals if f.data.tags[T.TAG_SCHEME] == r["method"]])
        ref = paper.openimages(r["method"], r["group"])
        assert int(r["n"]) == vals.size
        cell = table[r["method"]][header.index(r["group"]) - 1]
        assert cell == expected_cell(vals, ref)
        if vals.size:
            assert float(r["mean"]) == pytest.approx(vals.mean(), abs=1e-4)
            assert float(r["std"]) == pytest.approx(vals.std(ddof=1), abs=1e-4)
    assert "paper 77.7" in table["LL-Ct"][0] and table["LL-Ct"][0].startswith("–")
    # OpenImages also gets a Table 1 column, without a paper number.
    t1 = res.table1.set_index(["method", "dataset", "mode"])
    assert t1.loc[("LL-R", "openimages", "end-to-end"), "n"] == 3


def test_latest_experiment_wins_for_a_cell(store, tmp_path):
    uri, client = store
    later = int(time.time() * 1000) + 3_600_000
    write_sweep(client, "digits-ll-again", "digits", "end-to-end",
                [RunSpec("LL-R", val_map=[30, 40, 50, 52, 53])] + final_specs("LL-R", [52.0, 53.0]), t0=later)
    out = tmp_path / "results"
    res = A.aggregate(uri, None, out)
    t1 = res.table1.set_index(["method", "dataset", "mode"])
    cell = t1.loc[("LL-R", "digits", "end-to-end")]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(52.5) and cell["experiment"] == "digits-ll-again"
    assert t1.loc[("LL-Ct", "digits", "end-to-end"), "experiment"] == "digits-ll"
    assert any("digits-ll-again" in n for n in res.notes)
    assert "using the latest, 'digits-ll-again'" in (out / "table1.md").read_text()


# --------------------------------------------------------------------------- nothing to aggregate

def _cli(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "orchestration" / "aggregate.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_missing_store_writes_nothing_and_creates_no_db(tmp_path):
    p = _cli("--out", "res", cwd=tmp_path)              # default URI: sqlite mlflow.db in cwd
    assert p.returncode == 1
    assert p.stderr.startswith(f"aggregate: no MLflow store at sqlite:///{tmp_path}/mlflow.db"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "res").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_empty_store_unknown_and_unfinished_experiments(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    client.search_experiments()                               # creates the (empty) store
    out = tmp_path / "res"
    with pytest.raises(AggregateError, match="holds no sweep runs"):
        A.aggregate(uri, None, out)
    with pytest.raises(AggregateError, match=r"unknown experiment 'nope'.*experiments there: Default"):
        A.aggregate(uri, ["nope"], out)
    # An experiment whose only runs are still running or failed.
    write_sweep(client, "stuck", "digits", "end-to-end",
                [RunSpec("LL-R", val_map=[10.0], status="RUNNING", end_reason=None),
                 RunSpec("AN", val_map=[10.0], status="FAILED", end_reason="failed: boom")])
    with pytest.raises(AggregateError, match=r"experiment 'stuck' .* has no finished runs \(2 trial/final run\(s\): 1 (running|failed), 1 (running|failed)\)"):
        A.aggregate(uri, ["stuck"], out)
    with pytest.raises(AggregateError, match="holds sweep runs but none finished"):
        A.aggregate(uri, None, out)
    client.create_experiment("empty-sweep")
    with pytest.raises(AggregateError, match=r"'empty-sweep' .* has no finished runs \(no trial or final runs\)"):
        A.aggregate(uri, ["empty-sweep"], out)
    assert not out.exists()

    # The CLI: one line, exit 1, nothing written.
    for args in (["--experiment", "stuck"], []):
        p = _cli("--mlflow-uri", uri, "--out", str(out), *args, cwd=tmp_path)
        assert p.returncode == 1, p.stdout + p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("aggregate: "), p.stderr
    assert not out.exists()


def test_cli_writes_tables(store, tmp_path):
    uri, _ = store
    out = tmp_path / "cli-out"
    p = _cli("--mlflow-uri", uri, "--experiment", "voc-e2e", "--experiment", "voc-li",
             "--out", str(out), "--no-figures", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "aggregated voc-e2e, voc-li" in p.stdout
    assert sorted(x.name for x in out.iterdir()) == sorted(OUTPUTS)
    header, table = md_table(out / "table1.md")
    assert table["LL-R"][header.index("LinearInit VOC") - 1] == "89.50 ± 0.57 (n=2) · paper 89.4 · Δ +0.10"
    assert "End-to-end digits" not in header                  # digits is not in these sweeps


def test_only_trials_no_final_runs_writes_sweeps_but_no_table1(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    write_sweep(client, "search-only", "digits", "end-to-end",
                [RunSpec("LL-R", val_map=[20.0, 30.0, 35.0]), RunSpec("AN", val_map=[20.0, 25.0],
                                                                      end_reason="asha_stopped")])
    out = tmp_path / "res"
    res = A.aggregate(uri, None, out, figures=False)
    assert res.table1 is None and not (out / "table1.md").exists()
    assert (out / "sweeps.md").is_file()
    assert any("table1 not written" in n for n in res.notes)


def test_default_uri_is_mlflows_and_the_callers_setting_is_kept(store, tmp_path, monkeypatch):
    uri, _ = store
    monkeypatch.chdir(tmp_path)                                  # the store is tmp_path/mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    res = A.aggregate(None, ["voc-li"], "out", figures=False)    # MLflow's default: ./mlflow.db
    assert res.experiments == ["voc-li"] and Path("out/table1.md").is_file()
    assert mlflow.get_tracking_uri() == before and "MLFLOW_TRACKING_URI" not in os.environ
    other = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    A.aggregate(uri, ["voc-li"], "out2", figures=False)
    assert mlflow.get_tracking_uri() == other                    # the caller's setting is kept
    assert not (tmp_path / "elsewhere.db").exists()


@pytest.mark.slow
def test_cli_masks_a_password_in_the_uri(tmp_path):
    """Every line the aggregate prints about a store whose URI holds a password masks it."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(ROOT))
    port = _free_port()
    for uri in ("postgresql://alice:s3cr3t@127.0.0.1:1/db", f"http://alice:s3cr3t@127.0.0.1:{port}",
                f"mysql://alice:s3cr3t@127.0.0.1:{port}/db", f"sqlite:///{tmp_path}/none.db?password=s3cr3t"):
        r = subprocess.run([sys.executable, str(ROOT / "orchestration" / "aggregate.py"), "--mlflow-uri", uri,
                            "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 1, (uri, r.stdout, r.stderr)
        assert "s3cr3t" not in r.stdout + r.stderr, (uri, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("aggregate: ") and "***" in lines[0], (uri, r.stderr)
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_gives_up_on_an_unreachable_server_within_30_s(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(ROOT))
    # 192.0.2.1 (TEST-NET-1) is never routed: connections hang rather than being refused
    for uri in (f"http://127.0.0.1:{_free_port()}", "http://192.0.2.1:5000"):
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, str(ROOT / "orchestration" / "aggregate.py"), "--mlflow-uri", uri,
                            "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
        took = time.monotonic() - t0
        assert r.returncode == 1 and "unreachable" in r.stderr, (uri, r.stderr)
        assert took < 30, (uri, took)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- a real sweep

def test_real_digits_sweep_end_to_end(digits_sweep):
    """The session's real digits sweep (tests/shared_sweep.py: AN and the LL schemes, a tiny budget), then
    the tables it aggregated, cell by cell, against the runs in its MLflow store."""
    from tests.shared_sweep import FINAL_SEEDS, NAME

    uri, out = digits_sweep["uri"], digits_sweep["cwd"] / "results"
    schemes = digits_sweep["space"]["search"]["scheme"]
    assert schemes == ["AN", "LL-R", "LL-Ct", "LL-Cp"]
    for name in OUTPUTS:
        assert (out / name).is_file(), f"the sweep did not aggregate {name}:\n{digits_sweep['out'][-2000:]}"
    figs = sorted(x.name for x in (out / "figures").iterdir())
    assert figs == [f"{NAME}-memorization.png", f"{NAME}-val_map.png", "table1_vs_paper.png"]

    client = MlflowClient(tracking_uri=uri)
    finals = finals_from_mlflow(client)
    assert {k[0] for k in finals} <= set(schemes) and all(k[1:] == ("digits", "end-to-end") for k in finals)
    rows = {(r["method"], r["dataset"], r["mode"]): r for r in read_csv(out / "table1.csv")}
    header, table = md_table(out / "table1.md")
    col = header.index("End-to-end digits") - 1
    for method in paper.METHODS:
        vals = finals.get((method, "digits", "end-to-end"))
        r = rows[(method, "digits", "end-to-end")]
        assert table[method][col] == expected_cell(vals, None)
        if vals is None:
            assert int(r["n"]) == 0
            continue
        assert int(r["n"]) == vals.size == FINAL_SEEDS
        assert float(r["mean"]) == pytest.approx(vals.mean(), abs=1e-4)
        assert float(r["std"]) == pytest.approx(vals.std(ddof=1), abs=1e-4)

    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags.get(T.TAG_ROLE) == T.ROLE_TRIAL]
    assert len(trials) == len(schemes)
    summary = {r["scheme"]: r for r in read_csv(out / "sweeps.csv")}
    for scheme in {t.data.tags[T.TAG_SCHEME] for t in trials}:
        mine = [t for t in trials if t.data.tags[T.TAG_SCHEME] == scheme]
        asha = [t for t in mine if t.data.tags.get(T.TAG_STATUS_REASON) == "asha_stopped"]
        best = max(mine, key=lambda t: t.data.metrics[T.BEST_VAL_MAP])
        row = summary[scheme]
        assert int(row["trials"]) == len(mine) and int(row["asha_stopped"]) == len(asha)
        assert float(row["epochs"]) == sum(t.data.metrics[T.EPOCHS_RUN] for t in mine)
        assert row["best_run_id"] == best.info.run_id
        assert int(row["final_runs"]) == (FINAL_SEEDS if (scheme, "digits", "end-to-end") in finals else 0)
    if len(summary) > 1:
        assert int(summary["all"]["trials"]) == len(schemes)


def test_sweeps_md_shows_the_estimate_beside_what_was_spent(tmp_path):
    """A sweep run holding the estimate made at its start (`estimate.*` params): sweeps.md shows it beside
    the epochs, trial-hours and GPU-hours its runs spent and the sweep run's wall time."""
    from mlflow.entities import Metric, Param

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    rng = np.random.default_rng(3)
    specs = [RunSpec("LL-R", val_map=curve(50, 5, rng), gpu_hours=0.25),
             RunSpec("LL-R", lr=3e-3, val_map=curve(45, 2, rng), end_reason="asha_stopped", gpu_hours=0.1),
             RunSpec("LL-R", role="final", seed=1, val_map=curve(50, 5, rng), gpu_hours=0.25, test_map=49.0)]
    t0 = int(time.time() * 1000) - 3_600_000
    _, parent, _ = write_sweep(client, "est", "pascal", "end-to-end", specs, t0=t0)
    client.log_batch(parent, params=[Param(f"estimate.{k}", v) for k, v in {
        "device": "A10G", "slots": "4", "epochs": "11", "epochs_most": "15", "trial_hours": "0.7",
        "gpu_hours": "0.7", "wall_s": "1800"}.items()], metrics=[Metric(T.REUSED_PROPOSALS, 2.0, t0, 2)])
    client.set_terminated(parent, "FINISHED", end_time=t0 + 3_000_000)
    out = tmp_path / "results"
    res = A.aggregate(uri, None, out, figures=False)
    [row] = A.estimates_frame(res.runs).to_dict("records")
    assert row["epochs_spent"] == 5 + 2 + 5 and row["epochs_estimated"] == 11 and row["epochs_most"] == 15
    assert row["gpu_hours_spent"] == pytest.approx(0.6) and row["gpu_hours_estimated"] == pytest.approx(0.7)
    assert row["trial_hours_spent"] == pytest.approx(0.6)
    assert row["wall_s_spent"] == pytest.approx(3000) and row["wall_s_estimated"] == 1800
    assert row["reused_proposals"] == 2
    md = (out / "sweeps.md").read_text()
    section = md[md.index("## Estimated at the start vs spent"):]
    header, line = [ln for ln in section.splitlines() if ln.startswith("|") and "---" not in ln][:2]
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in line.split("|")[1:-1]]))
    assert cells["sweep"] == "est" and cells["device"] == "A10G"
    assert cells["epochs est. (most)"] == "11 (15)" and cells["epochs spent"] == "12"
    assert cells["GPU-h est."] == "0.7" and cells["GPU-h spent"] == "0.6"
    assert cells["wall est."] == "1,800 s" and cells["wall spent"] == "3,000 s" and cells["reused"] == "2"

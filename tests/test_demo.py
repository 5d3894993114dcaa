"""The demo as a person runs it, shrunk: `scripts/demo.sh`'s space file with fewer trials, epochs, seeds and
mosaics, Ray in-process, default output (no --verbose), MLflow's default store in the working folder.

One sweep for the session (tests/shared_sweep.py); these tests read it: the table shows AN beside the large-loss schemes with
seeds, the output is one line per trial event and a status line (no Ray table, no library info lines),
and the sweep's parent run in MLflow carries results/ (Table 1 and the figures) as artifacts.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import mlflow_runs, ray_trials
from tests.shared_sweep import FINAL_SEEDS, demo_space_path

pytestmark = [pytest.mark.timeout(900)]

EVENT = re.compile(r"^\[(\d+:)?\d+:\d\d\] (start|end|failed|retry) +(.+?)(  .*)?$")


@pytest.fixture
def demo(digits_sweep):
    return digits_sweep


def _without_rays_worker_exit(err: str) -> str:
    """stderr less the traceback Ray 2.60 sometimes prints when it ends an idle trial worker (its SIGTERM
    handler raises SystemExit inside a weakref callback: "Exception ignored in ... SystemExit: 1").
    Ray's own noise, harmless, and not on every run; everything else on stderr still fails the test."""
    lines, out, skipping = err.splitlines(), [], False
    for line in lines:
        body = re.sub(r"^(\x1b\[\d+m)?\(\w+ pid=\d+\)(\x1b\[0m)? ?", "", line)
        if body.startswith("Exception ignored in: <function WeakSet"):
            skipping = True
        if not skipping:
            out.append(line)
        if skipping and body.strip() == "SystemExit: 1":
            skipping = False
    return "\n".join(out)


def test_demo_space_is_the_papers_point():
    """AN, the baseline the paper improves on, beside the large-loss schemes, each rerun with seeds."""
    from orchestration.search.space import load_space

    s = load_space("digits", demo_space_path())
    assert "AN" in s.search.scheme and {"LL-R", "LL-Ct", "LL-Cp"} <= set(s.search.scheme)
    assert s.final_seeds >= 3 and s.num_samples >= 2 * len(s.search.groups())
    assert s.train["max_train_images"] < 3000                    # the demo's own shrinking, not the default's
    default = load_space("digits")
    assert "max_train_images" not in default.train and default.epochs == 10


def test_demo_table_has_an_beside_the_large_loss_schemes_with_seeds(demo):
    table = pd.read_csv(demo["cwd"] / "results" / "table1.csv")
    digits = table[(table["dataset"] == "digits") & (table["mode"] == "end-to-end")].set_index("method")
    for scheme in demo["space"]["search"]["scheme"]:
        assert digits.loc[scheme, "n"] == FINAL_SEEDS, scheme
        assert 0 < digits.loc[scheme, "mean"] <= 100 and digits.loc[scheme, "std"] >= 0
        assert digits.loc[scheme, "seeds"] == ", ".join(str(s) for s in range(FINAL_SEEDS))
    md = (demo["cwd"] / "results" / "table1.md").read_text()
    rows = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert f"(n={FINAL_SEEDS})" in rows["AN"] and f"(n={FINAL_SEEDS})" in rows["LL-R"]
    assert [c.strip() for c in rows["method"].split("|")[2:-1]] == ["End-to-end digits"]   # one column: ours


def test_default_output_is_one_line_per_trial_event_and_status_lines(demo):
    out, err = demo["out"], demo["err"]
    lines = out.splitlines()
    # no Ray status table, no per-result lines
    assert "== Status ==" not in out and "Current best trial" not in out and "Trial status" not in out
    assert not any(ln.startswith(("+--", "| ")) for ln in lines), out
    # no informational lines of Ray, MLflow or Optuna; nothing on stderr at all in a clean run
    for noise in ("Started a local Ray instance", "A new study created", "Creating initial MLflow database",
                  "Token authentication", "INFO"):
        assert noise not in out + err, noise
    assert _without_rays_worker_exit(err).strip() == "", err[-3000:]

    events = [EVENT.match(ln) for ln in lines]
    events = [m for m in events if m]
    search = ray_trials(demo["cwd"] / "ray_results" / "demo")
    final = ray_trials(demo["cwd"] / "ray_results" / "demo-final")
    assert len(search) == demo["groups"] and len(final) == demo["groups"] * FINAL_SEEDS
    # every trial: exactly one start and one end line, under its MLflow run name
    runs = mlflow_runs(f"sqlite:///{demo['cwd'] / 'mlflow.db'}", "demo")
    names = sorted(r.info.run_name for r in runs["trial"] + runs["final"])
    for kind in ("start", "end"):
        assert sorted(m.group(3) for m in events if m.group(2) == kind) == names, kind
    assert len(events) == 2 * len(names)
    for m in events:
        if m.group(2) == "end":
            assert re.fullmatch(r"  epoch 2/2  val mAP \d+\.\d \(best \d+\.\d @ [12]\)  completed", m.group(4))

    # the end of each stage: a status line with the best so far of every scheme, from Ray's own results
    [done] = [ln for ln in lines if re.match(r"\[\d+:\d\d\] search done: ", ln)]
    best = {}
    for t in search.values():
        scheme = t["config"]["scheme"]
        best[scheme] = max(best.get(scheme, 0.0), max(row["val_map"] for row in t["results"]))
    want = ", ".join(f"{s} {best[s]:.1f}" for s in demo["space"]["search"]["scheme"])
    assert f"search done: {len(search)} trials in " in done and done.endswith(f"| best val mAP: {want}"), done
    [final_done] = [ln for ln in lines if re.match(r"\[\d+:\d\d\] final stage done: ", ln)]
    assert f"({FINAL_SEEDS})" in final_done
    # and nothing much else: the summary tables and where things are
    assert len(lines) - len(events) < 45, out


def test_parent_run_carries_table1_and_the_figures_as_artifacts(demo):
    from mlflow import MlflowClient

    cwd = demo["cwd"]
    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    [parent] = mlflow_runs(uri, "demo")["sweep"]
    client = MlflowClient(uri)

    def listing(path=None):
        out = []
        for f in client.list_artifacts(parent.info.run_id, path):
            out += listing(f.path) if f.is_dir else [f.path]
        return out

    artifacts = set(listing())
    results = cwd / "results"
    written = {p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file()}
    assert artifacts == written                                  # everything aggregated, nothing else
    assert {"table1.md", "table1.csv", "sweeps.md", "figures/table1_vs_paper.png", "figures/demo-val_map.png",
            "figures/demo-memorization.png"} <= artifacts
    # in MLflow's default artifact location for a local store: ./mlruns of the working folder
    assert parent.info.artifact_uri.endswith(f"/mlruns/{parent.info.experiment_id}/{parent.info.run_id}/artifacts")
    stored = Path(parent.info.artifact_uri.removeprefix("file://"))
    assert stored.is_relative_to(cwd / "mlruns")
    assert (stored / "table1.md").read_bytes() == (results / "table1.md").read_bytes()
    assert f"#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}/artifacts" in demo["out"]
    # the runs table, in MLflow 3's model-training view (tests/test_mlflow_ui.py opens it in a browser)
    assert f"the sweep's runs: http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs?workflowType=" \
           "machine_learning" in demo["out"]

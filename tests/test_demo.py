"""The demo as a person runs it, shrunk: `scripts/demo.sh`'s space file with fewer trials, epochs, seeds and
mosaics, Ray in-process, default output (no --verbose), MLflow's default store in the working folder.

One sweep for the module; its tests read it: the table shows AN beside the large-loss schemes with
seeds, the output is one line per trial event and a status line (no Ray table, no library info lines),
and the sweep's parent run in MLflow carries results/ (Table 1 and the figures) as artifacts.
"""
from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.helpers import ROOT, mlflow_runs, ray_trials, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FINAL_SEEDS = 2
EVENT = re.compile(r"^\[(\d+:)?\d+:\d\d\] (start|end|failed|retry) +(.+?)(  .*)?$")


def demo_space_path() -> Path:
    """The space file scripts/demo.sh runs (read from the script, not assumed)."""
    words = shlex.split((ROOT / "scripts" / "demo.sh").read_text().splitlines()[-1])
    assert words[:3] == ["exec", ".venv/bin/python", "orchestration/sweep.py"] and words[-1] == "$@"
    return ROOT / words[words.index("--space") + 1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's space with 1 trial per scheme, 2 epochs, 2 final seeds and 200 training mosaics."""
    cwd = tmp_path_factory.mktemp("demo")
    space = yaml.safe_load(demo_space_path().read_text())
    space["train"]["max_train_images"] = 200
    (cwd / "space.yaml").write_text(yaml.safe_dump(space))
    groups = len(space["search"]["scheme"])
    t0 = time.time()
    r = run_cli(["--dataset", "digits", "--space", "space.yaml", "--name", "demo", "--num-samples", str(groups),
                 "--epochs", "2", "--final-seeds", str(FINAL_SEEDS)], cwd=cwd)
    print(f"shrunk demo took {time.time() - t0:.0f} s, {len(r.stdout.splitlines())} lines")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return {"cwd": cwd, "out": r.stdout, "err": r.stderr, "space": space, "groups": groups}


def test_demo_space_is_the_papers_point():
    """AN, the baseline the paper improves on, beside the large-loss schemes, each rerun with seeds."""
    from orchestration.space import load_space

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
    assert err.strip() == "", err[-3000:]

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

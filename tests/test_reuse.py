"""No configuration trained twice, and warm starts from earlier sweeps in the MLflow store.

The searcher's own behaviour is tested directly (no Ray needed: Tune's calls are made by hand); then two
real digits sweeps join one Ray cluster (`ray_address`) and write one MLflow store.
"""
from __future__ import annotations

import dataclasses
import pickle
import re
import textwrap
from pathlib import Path

import pytest

from orchestration import common
from orchestration.search import known, per_scheme
from orchestration.search.space import FloatParam, Group, load_space
from tests.helpers import mlflow_runs, ray_trials, run_cli, write_grid_space, write_space


LLR = Group("LL-R", "end-to-end")


def grid_space(tmp_path: Path, deltas=(1.0, 2.0), lrs=(1e-3,), num_samples=4, epochs=4):
    space = load_space("digits", write_space(tmp_path / "s.yaml", num_samples=num_samples, epochs=epochs,
                                             schemes="[LL-R]"))
    space.search = dataclasses.replace(space.search, delta_rel=FloatParam(values=list(deltas)),
                                       lr=FloatParam(values=list(lrs)))
    return space.validate()


def run_trial(search, tid: str, config: dict, epochs: int, stop_at: int | None = None) -> list[float]:
    """Tune's calls for one trial whose val mAP is 50 + epoch + delta_rel; ASHA stops it at `stop_at`."""
    last = stop_at or epochs
    curve = [50 + e + config["delta_rel"] for e in range(1, last + 1)]
    for e, v in enumerate(curve, 1):
        search.on_trial_result(tid, {"epoch": e, "val_map": v, "training_iteration": e})
    search.on_trial_complete(tid, {"epoch": last, "val_map": curve[-1]})
    return curve


def study(search, group=LLR):
    return search.searchers[group]._ot_study


def test_a_repeated_proposal_is_answered_from_its_record_not_handed_to_tune(tmp_path):
    space = grid_space(tmp_path, deltas=(1.0, 2.0, 3.0))
    marks = []
    search, _ = per_scheme.build(space, "val_map", "max", marker=lambda rec, total: marks.append((rec, total)))
    first = search.suggest("t0")
    assert (first["lr"], first["delta_rel"]) == (1e-3, 2.0)      # the digits default, the start point
    curve = run_trial(search, "t0", first, epochs=4)
    study(search).enqueue_trial({"lr": 1e-3, "delta_rel": 2.0})     # TPE proposes t0's configuration again
    second = search.suggest("t1")
    assert second["delta_rel"] != 2.0                            # ... which is not handed to Tune
    assert len(search.reused) == len(marks) >= 1 and marks[0][0].trial_id == "t0"
    assert [total for _, total in marks] == list(range(1, len(marks) + 1))
    # the answer was told to the study as t0's recorded result: COMPLETE, its best val mAP, its curve
    [answer] = [t for t in study(search).trials if t.number == 1]
    assert answer.params == {"lr": 1e-3, "delta_rel": 2.0}
    assert answer.state.name == "COMPLETE" and answer.value == pytest.approx(max(curve))
    assert answer.intermediate_values == {e: v for e, v in enumerate(curve, 1)}
    run_trial(search, "t1", second, epochs=4)
    third = search.suggest("t2")
    assert third["delta_rel"] not in (2.0, second["delta_rel"])
    # the grid (3 configurations) is exhausted: the group ends below its share, and says so
    assert search.suggest("t3") == "FINISHED"
    assert search.planned == 3 == search.assigned[LLR] < search.quota[LLR]
    assert "all 3 configurations" in search.closed[LLR]


def test_asha_stopped_trials_are_told_pruned_and_a_busy_configuration_is_not_proposed_twice(tmp_path):
    space = grid_space(tmp_path, deltas=(1.0, 2.0, 3.0))
    search, _ = per_scheme.build(space, "val_map", "max")
    a = search.suggest("a")
    b = search.suggest("b")                 # a is still training: b is another configuration
    assert b["delta_rel"] != a["delta_rel"]
    run_trial(search, "a", a, epochs=4, stop_at=2)          # ASHA stopped it at epoch 2
    t = study(search).trials[search.searchers[LLR]._ot_trials["a"].number]
    assert t.state.name == "PRUNED" and t.intermediate_values == {1: 51 + a["delta_rel"], 2: 52 + a["delta_rel"]}
    rec = search.known[known.key(known.searched_values(a))]
    assert not rec.complete and rec.reusable and rec.epochs == 2


def test_warm_start_records_are_in_each_study_before_the_first_proposal(tmp_path):
    space = grid_space(tmp_path, deltas=(1.0, 2.0, 3.0), lrs=(1e-3, 2e-3))
    done = known.Known(group=LLR,
                       values={"scheme": "LL-R", "mode": "end-to-end", "optimizer": "adam", "lr": 1e-3,
                               "delta_rel": 2.0},
                       curve=[(1, 60.0), (2, 70.0), (3, 69.0), (4, 68.0)], complete=True, sweep="earlier",
                       trial_id="x1", run_id="r1")
    stopped = dataclasses.replace(done, values={**done.values, "delta_rel": 1.0}, curve=[(1, 50.0), (2, 55.0)],
                                  complete=False, trial_id="x2")
    short = dataclasses.replace(done, values={**done.values, "lr": 2e-3}, curve=[(1, 50.0)], complete=False,
                                reusable=False, trial_id="x3")
    search, _ = per_scheme.build(space, "val_map", "max", known=[done, stopped, short])
    before = [t for t in study(search).trials if t.state.name != "WAITING"]     # (the start point is queued)
    assert [(t.state.name, t.value) for t in before] == [("COMPLETE", 70.0), ("PRUNED", None), ("PRUNED", None)]
    assert before[1].intermediate_values == {1: 50.0, 2: 55.0}
    assert before[0].params == {"lr": 1e-3, "delta_rel": 2.0}
    # the start point (lr 1e-3, delta_rel 2: the digits default) was trained by "earlier": answered, not trained
    config = search.suggest("t0")
    assert (config["lr"], config["delta_rel"]) != (1e-3, 2.0)
    assert search.reused and search.reused[0]["answered_by"] == "earlier/x1"
    assert known.key(known.searched_values(config)) not in {done.key, stopped.key}
    # the searcher, its studies and records survive pickling (Tune saves it for --resume)
    copy = pickle.loads(pickle.dumps(search))
    assert len(copy.searchers[LLR]._ot_study.trials) == len(study(search).trials)
    path = tmp_path / "state.pkl"
    search.save(str(path))
    fresh, _ = per_scheme.build(space, "val_map", "max")
    fresh.restore(str(path))
    assert fresh.known.keys() == search.known.keys() and fresh.reused == search.reused


# ------------------------------------------------------------------ real sweeps


def write_grid(path: Path, *, num_samples: int, deltas: str, lrs: str, epochs: int = 3) -> Path:
    return write_grid_space(path, deltas=deltas, lrs=lrs, start_with="paper", num_samples=num_samples,
                            epochs=epochs, max_failures=1,
                            train="num_workers: 0, max_train_images: 200, stop_drop: null")


def configs(trials: dict) -> list[tuple[float, float]]:
    return sorted((t["config"]["lr"], t["config"]["delta_rel"]) for t in trials.values())


def best_val(stdout: str) -> float:
    """best_val_map of the LL-R row of the summary's best-configuration table."""
    lines = stdout.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("best configuration per scheme"))
    header, row = lines[i + 1].split(), lines[i + 2].split()
    return float(row[header.index("best_val_map")])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_sweep_whose_grid_runs_out_ends_normally_with_one_run_per_configuration(tmp_path, ray_address):
    """Two configurations in the space, four trials asked for: each is trained once, the search ends when
    the grid is used up (not taken for an interrupted sweep), and MLflow holds one run per configuration."""
    space = write_grid(tmp_path / "two.yaml", num_samples=4, deltas="[2.0, 3.0]", lrs="[1.0e-3]", epochs=2)
    r = run_cli(["--dataset", "digits", "--space", str(space), "--name", "two", "--address", ray_address],
                cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "interrupted" not in r.stdout + r.stderr
    trials = ray_trials(tmp_path / "ray_results" / "two")
    assert configs(trials) == [(1e-3, 2.0), (1e-3, 3.0)]
    assert "LL-R (end-to-end) ended early: all 2 configurations of its space are trained" in r.stdout
    runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "two")
    assert sorted(float(x.data.params["delta_rel"]) for x in runs["trial"]) == [2.0, 3.0]
    assert all(x.info.status == "FINISHED" for x in runs["trial"] + runs["sweep"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_warm_started_sweep_trains_nothing_the_first_trained(tmp_path, ray_address):
    """Sweep "a" trains 3 of the space's 6 configurations; "b" (--warm-start a, the same space) is told a's
    results first, trains 3 others, never one of a's (its start point, a's too, is answered from the store),
    and its best is at least a's. One MLflow run per configuration over both sweeps."""
    space = write_grid(tmp_path / "grid.yaml", num_samples=3, deltas="[1.0, 2.0, 3.0]", lrs="[1.0e-3, 3.0e-3]")
    args = ["--dataset", "digits", "--space", str(space), "--address", ray_address]
    ra = run_cli([*args, "--name", "a"], cwd=tmp_path)
    assert ra.returncode == 0, ra.stdout[-3000:] + ra.stderr[-3000:]
    rb = run_cli([*args, "--name", "b", "--warm-start", "a"], cwd=tmp_path)
    assert rb.returncode == 0, rb.stdout[-3000:] + rb.stderr[-3000:]
    ta, tb = ray_trials(tmp_path / "ray_results" / "a"), ray_trials(tmp_path / "ray_results" / "b")
    assert len(ta) == 3 and len(tb) == 3
    assert not set(configs(ta)) & set(configs(tb)), (configs(ta), configs(tb))
    assert (1e-3, 2.0) in configs(ta)                           # the start point, trained by a only
    epochs_a = sum(t["results"][-1]["epoch"] for t in ta.values())
    epochs_b = sum(t["results"][-1]["epoch"] for t in tb.values())
    assert re.search(rf"3 trials \(0 failed\), {epochs_a} epochs trained", ra.stdout)
    assert re.search(rf"3 trials \(0 failed\), {epochs_b} epochs trained", rb.stdout)
    print(f"epochs trained: a {epochs_a}, b {epochs_b}; best val mAP a {best_val(ra.stdout):.2f}, "
          f"b {best_val(rb.stdout):.2f}")
    assert best_val(rb.stdout) >= best_val(ra.stdout)
    assert "warm_start" in mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "b")["sweep"][0].data.params
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs_a, runs_b = mlflow_runs(uri, "a")["trial"], mlflow_runs(uri, "b")["trial"]
    keys = [(float(r.data.params["lr"]), float(r.data.params["delta_rel"])) for r in runs_a + runs_b]
    assert len(keys) == len(set(keys)) == 6                     # one run per configuration, none duplicated
    # a's runs that b answered proposals from (a may have too: proposals made after results can repeat)
    reused = [r for r in runs_a if "b" in r.data.tags.get(common.TAG_REUSED_BY, "").split(",")]
    assert reused and all(int(r.data.tags[common.TAG_REUSED]) >= 1 for r in reused)
    assert ((1e-3, 2.0) in {(float(r.data.params["lr"]), float(r.data.params["delta_rel"])) for r in reused})

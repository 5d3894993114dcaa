"""What a person sees, piece by piece (fast; the whole sweep's output is checked in tests/test_demo.py):
the trial-event lines, the status line and its 30-s rhythm, progress bars of long steps, and the
parameter importances behind the importance figure."""
from __future__ import annotations

import io
import math
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from orchestration import common as T
from orchestration.report import importance
from orchestration.run import progress
from orchestration.search.space import Group
from wsml.progress import Progress

EPOCHS = 6


def fake_trial(index: int, scheme: str, status: str, epochs: list[float] | None = None, *, lr: float = 1e-3,
               delta_rel: float | None = 2.0, final: bool = False, seed: int = 0, test_map: float = 50.0, **last):
    """What the display reads of a Tune trial: id, status, config (as the sweep builds it), last result."""
    config = {"scheme": scheme, "mode": "end-to-end", "lr": lr, "dataset": "digits", "seed": 0}
    if delta_rel is not None and scheme.startswith("LL"):
        config["delta_rel"] = delta_rel
    if final:
        config = {"dataset": "digits", "seed": 0, "point": {**config, "seed": seed, "wsml_source_trial": "x"}}
    result = {}
    if epochs:
        best = int(np.argmax(epochs))
        result = {"epoch": len(epochs), "val_map": epochs[-1], "best_val_map": max(epochs), "best_epoch": best + 1,
                  "test_map_at_best": test_map}
    result.update(last)
    return SimpleNamespace(trial_id=f"id{index}", experiment_tag=f"{index}_scheme={scheme}", status=status,
                           config=config, last_result=result, num_failures=last.pop("failures", 0), max_failures=2,
                           get_error=lambda: "Traceback ...\nRuntimeError: CUDA error: out of memory")


# ------------------------------------------------------------------ trial events
def test_one_line_per_trial_event_with_its_run_name_epoch_map_and_reason(capsys):
    events = progress.TrialEvents(final=False, started=0.0, epochs=EPOCHS)
    events.on_trial_start(0, [], fake_trial(1, "AN", "RUNNING"))
    events.on_trial_complete(0, [], fake_trial(1, "AN", "TERMINATED", [40, 55, 61.26, 66.54, 66.0, 66.2]))
    events.on_trial_complete(0, [], fake_trial(2, "LL-R", "TERMINATED", [40, 52.31], lr=2.5e-3, delta_rel=3.02))
    events.on_trial_complete(0, [], fake_trial(3, "LL-Ct", "TERMINATED", [40, 60, 55], trainer_stop=1.0))
    events.on_trial_complete(0, [], fake_trial(4, "LL-Cp", "TERMINATED", [40],
                                               wsml_error="TrainingDiverged: training loss became nan"))
    events.on_trial_start(0, [], fake_trial(5, "LL-R", "RUNNING", [40, 50, 52]))
    events.on_trial_recover(0, [], fake_trial(5, "LL-R", "RUNNING", [40, 50, 52], failures=1))
    events.on_trial_error(0, [], fake_trial(5, "LL-R", "ERROR", [40, 50, 52], failures=3))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8                                          # one per event, nothing else
    assert all(re.match(r"\[\d+:\d\d:\d\d\] \S", ln) for ln in lines), lines    # the sweep's clock first
    assert lines[0].endswith("start    AN lr=0.001 #t1")
    assert lines[1].endswith("end      AN lr=0.001 #t1  epoch 6/6  val mAP 66.2 (best 66.5 @ 4)  completed")
    assert lines[2].endswith("end      LL-R d=3.02 lr=0.0025 #t2  epoch 2/6  val mAP 52.3 (best 52.3 @ 2)  "
                             "stopped early by ASHA")
    assert "LL-Ct d=2 lr=0.001 #t3  epoch 3/6" in lines[3] and "stopped: val mAP fell below its best" in lines[3]
    assert lines[4].split()[1] == "failed" and lines[4].endswith("failed: TrainingDiverged: training loss became nan")
    assert lines[5].endswith("start    LL-R d=2 lr=0.001 #t5  continues after epoch 3")
    assert lines[6].split()[1] == "retry" and "RuntimeError: CUDA error: out of memory" in lines[6]
    assert "attempt 2 of 3" in lines[6]
    assert lines[7].split()[1] == "failed" and lines[7].endswith("failed: RuntimeError: CUDA error: out of memory")


def test_final_runs_are_named_with_their_seed(capsys):
    events = progress.TrialEvents(final=True, started=0.0, epochs=EPOCHS)
    events.on_trial_complete(0, [], fake_trial(0, "LL-R", "TERMINATED", [50, 60, 70], final=True, seed=2))
    [line] = capsys.readouterr().out.splitlines()
    assert "LL-R d=2 lr=0.001 seed=2 #f0  epoch 3/6" in line and line.endswith("stopped early")


# ------------------------------------------------------------------ the status line
GROUPS = [Group("AN", "end-to-end"), Group("LL-R", "end-to-end"), Group("LL-Ct", "end-to-end")]


def search_trials():
    return [fake_trial(1, "AN", "TERMINATED", [40, 50, 60, 66.54, 66, 65]),
            fake_trial(2, "LL-R", "TERMINATED", [40, 45]),
            fake_trial(3, "LL-R", "RUNNING", [40, 60, 74.96]),
            fake_trial(4, "AN", "RUNNING", [30]),
            fake_trial(5, "LL-Ct", "PENDING")]


def test_status_line_counts_best_per_scheme_and_time_left(monkeypatch):
    clock = {"now": 1000.0}
    monkeypatch.setattr(progress.time, "time", lambda: clock["now"])
    status = progress.StatusLine(final=False, started=940.0, epochs=EPOCHS, groups=GROUPS, later_epochs=0)
    status.setup(start_time=1000.0, total_samples=6)
    fresh = [fake_trial(i, "AN", "PENDING") for i in range(1, 6)]
    assert not status.should_report(fresh)                 # nothing trained yet in this driver: epochs start at 0
    clock["now"] = 1029.0
    assert not status.should_report(search_trials())       # under 30 s since the last line
    assert status.should_report(search_trials(), done=True)
    clock["now"] = 1030.0
    trials = search_trials()
    assert status.should_report(trials)
    line = status.line(trials, done=False, now=clock["now"])
    assert line.startswith("[1:30] search: 2 done, 2 running, 2 pending of 6 trials")
    assert "best val mAP: AN 66.5, LL-R 75.0, LL-Ct –" in line
    # 12 epochs in 30 s; left: the two ended ran (6 + 2) / 2 = 4 on average, so running 1 + 3,
    # pending 4 + 4 (one not created yet): 12 epochs, 30 s
    assert line.endswith("under a minute left")
    status.later_epochs = 60                                # the final stage: 72 epochs, 180 s
    assert status.line(trials, done=False, now=clock["now"]).endswith("about 3 min left (with the final stage)")
    done = status.line(trials, done=True, now=1100.0)
    assert done.startswith("[2:40] search done: 2 trials in 1:40 (1 stopped early, 0 failed)")
    assert "left" not in done


def test_status_line_of_the_final_stage_averages_test_map_of_finished_seeds():
    status = progress.StatusLine(final=True, started=0.0, epochs=3, groups=GROUPS[:2])
    status.setup(start_time=0.0, total_samples=4)
    trials = [fake_trial(0, "AN", "TERMINATED", [1, 2, 3], final=True, test_map=60.0),
              fake_trial(1, "AN", "TERMINATED", [1, 2, 3], final=True, seed=1, test_map=61.0),
              fake_trial(2, "LL-R", "RUNNING", [1, 2], final=True, test_map=70.0),
              fake_trial(3, "LL-R", "PENDING", final=True, seed=1)]
    line = status.line(trials, done=False, now=30.0)
    assert "final stage: 2 done, 1 running, 1 pending of 4 runs" in line
    assert "test mAP, mean of the seeds done: AN 60.5 (2), LL-R –" in line


def test_a_restored_trial_head_start_is_not_counted_as_speed():
    status = progress.StatusLine(final=False, started=0.0, epochs=EPOCHS, groups=GROUPS)
    status.setup(start_time=0.0, total_samples=2)
    before = [fake_trial(1, "AN", "RUNNING", [1, 2, 3, 4, 5]), fake_trial(2, "AN", "PENDING")]
    status.should_report(before)                            # seen at epoch 5: trained by an earlier driver
    assert status.line(before, done=False, now=10.0).endswith("time left: estimating")


def test_verbose_gives_rays_table_and_no_event_lines():
    from ray.tune import CLIReporter

    reporter, callbacks = progress.watchers(final=False, verbose=True, started=0.0, epochs=3, groups=GROUPS,
                                            with_delta_rel=False)
    assert isinstance(reporter, CLIReporter) and callbacks == []
    reporter, callbacks = progress.watchers(final=False, verbose=False, started=0.0, epochs=3, groups=GROUPS,
                                            with_delta_rel=False)
    assert isinstance(reporter, progress.StatusLine) and [type(c) for c in callbacks] == [progress.TrialEvents]


def test_clock():
    assert [progress.clock(s) for s in (0, 59.9, 61, 3599, 3600, 3725)] == \
        ["0:00", "0:59", "1:01", "59:59", "1:00:00", "1:02:05"]


# ------------------------------------------------------------------ progress of long steps
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_is_plain_lines(monkeypatch):
    said = []
    with Progress(100, "features", "img", log=said.append) as shown:
        for _ in range(100):
            shown.update()
    assert len(said) == 10                                   # every 10 %, the last one the end line
    assert all("\r" not in s for s in said)
    assert said[0].startswith("features: 10/100 img (10 %)") and said[-1].startswith("features: 100/100 img (100 %)")


def test_a_short_step_with_timed_lines_only_says_nothing():
    said = []
    with Progress(5, "aggregate", "runs", log=said.append, lines=0) as shown:
        shown.update(5)
    assert said == []


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    with Progress(3, "image cache", "img") as shown:
        for _ in range(3):
            shown.update()
    text = term.getvalue()
    assert text.startswith("\rimage cache:") and "0/3" in text      # redrawn in place
    assert text.endswith("\r") and text.count("\n") == 0            # and cleared at the end: no line left


def test_progress_without_a_terminal_writes_lines_to_stderr(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    with Progress(2 * 2**20, "  archive.tgz", "B") as shown:
        shown.update(2**20)
        shown.update(2**20)
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("  archive.tgz: 1 MiB/2 MiB (50 %)") and lines[-1].startswith("  archive.tgz: 2 MiB/2 MiB")


# ------------------------------------------------------------------ parameter importance
def _trials(n: int, rng) -> pd.DataFrame:
    lr = 10 ** rng.uniform(-3.7, -2.3, n)
    delta = rng.uniform(0.5, 4.0, n)
    best = 90 - 30 * np.abs(np.log10(lr) + 3) + rng.normal(0, 0.2, n)       # lr matters, delta_rel not
    return pd.DataFrame({"role": T.ROLE_TRIAL, "status": "FINISHED", "outcome": "completed", "experiment": "s",
                         "dataset": "digits", "mode": "end-to-end", "scheme": "LL-R", T.BEST_VAL_MAP: best,
                         "params.lr": [f"{v:.6g}" for v in lr], "params.delta_rel": [f"{v:.4g}" for v in delta],
                         "params.optimizer": "adam"})


def test_importance_finds_the_value_that_mattered():
    rng = np.random.default_rng(3)
    frame = importance.importances(_trials(20, rng))
    got = dict(zip(frame["param"], frame["importance"]))
    assert set(got) == {"lr", "delta_rel"}                      # optimizer never varied
    assert got["lr"] > 0.7 > got["delta_rel"] and math.isclose(sum(got.values()), 1.0)
    assert set(frame["trials"]) == {20} and set(frame["scheme"]) == {"LL-R"}
    again = importance.importances(_trials(20, np.random.default_rng(3)))
    assert again.equals(frame)                                  # seeded: the same runs give the same numbers


def test_importance_needs_enough_finished_trials():
    rng = np.random.default_rng(0)
    few = _trials(importance.MIN_TRIALS - 1, rng)
    assert importance.importances(few).empty
    failed = _trials(importance.MIN_TRIALS, rng).assign(outcome=["failed"] + ["completed"] * (importance.MIN_TRIALS - 1))
    assert importance.importances(failed).empty                 # a failed trial does not count


@pytest.mark.parametrize("script", ["sweep", "aggregate"])
def test_help_starts_with_example_command_lines(script):
    import subprocess
    import sys

    from tests.helpers import ROOT, clean_env

    out = subprocess.run([sys.executable, str(ROOT / "orchestration" / f"{script}.py"), "--help"],
                         capture_output=True, text=True, env=clean_env(), timeout=120).stdout.splitlines()
    assert out[0].startswith(f"usage: python orchestration/{script}.py")
    examples = [ln for ln in out[:3] if f"python orchestration/{script}.py" in ln]
    assert len(examples) == 3 and all("#" in ln for ln in examples)       # each says what it does


def test_aggregate_draws_the_importance_figure_from_the_stores_runs(tmp_path):
    """Through the store: the trials' params and best_val_map as MLflow holds them -> the figure."""
    from mlflow import MlflowClient

    from orchestration.aggregate import aggregate
    from tests.synthetic_runs import RunSpec, final_specs, write_sweep

    rng = np.random.default_rng(5)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    specs = []
    for lr in 10 ** rng.uniform(-3.7, -2.3, 8):         # 8 LL-R trials: enough; 2 AN trials: too few
        peak = 90 - 30 * abs(np.log10(lr) + 3)
        specs.append(RunSpec("LL-R", lr=float(lr), delta_rel=float(rng.uniform(0.5, 4)),
                             val_map=[peak - 10, float(peak)]))
    specs += [RunSpec("AN", lr=1e-3, val_map=[50.0, 60.0]), RunSpec("AN", lr=2e-3, val_map=[50.0, 55.0])]
    write_sweep(MlflowClient(uri), "imp", "digits", "end-to-end", specs + final_specs("LL-R", [70.0, 71.0]))
    res = aggregate(uri, None, tmp_path / "results")
    assert set(res.importance["scheme"]) == {"LL-R"} and set(res.importance["trials"]) == {8}
    got = dict(zip(res.importance["param"], res.importance["importance"]))
    assert got["lr"] > got["delta_rel"]
    figure = tmp_path / "results" / "figures" / "imp-importance.png"
    assert figure in res.figures and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

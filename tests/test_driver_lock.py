"""One driver per sweep at a time (orchestration.run.record.DriverLock): a second `--resume` of a running sweep is
refused in one line before anything is touched; a driver that died (kill -9) holds nothing."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from orchestration.run import record
from orchestration.common import SweepError
from orchestration.search.space import load_space

HOLD = """
import sys, time
from orchestration.run.record import DriverLock
lock = DriverLock(sys.argv[1], sys.argv[2])
print("held", flush=True)
time.sleep(600)
"""


def _sweep_folder(storage, name="s1"):
    record.write(str(storage), record.SweepRecord(
        dataset="digits", name=name, space=load_space("digits").to_dict(), mlflow_uri="sqlite:///x.db",
        experiment_id="1", parent_run_id="r", resources={"cpu": 1.0}, data_root=None, cache_dir="/c",
        command="orchestration/sweep.py --dataset digits", created="2026-12-05T00:00:00"))


def test_a_second_driver_of_a_running_sweep_is_refused_and_a_killed_one_holds_nothing(tmp_path):
    _sweep_folder(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "s1"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SweepError) as err:
            record.DriverLock(str(tmp_path), "s1")
        line = str(err.value)
        assert "is being run by another driver" in line and f"pid {holder.pid}" in line and "\n" not in line
        holder.send_signal(signal.SIGKILL)          # the driver dies without a word
        holder.wait(30)
        lock = record.DriverLock(str(tmp_path), "s1")   # the kernel released its lock
        assert lock.file is not None
        lock.release()
        again = record.DriverLock(str(tmp_path), "s1")
        assert again.file is not None
        again.release()
    finally:
        holder.kill()


def test_resume_of_a_sweep_another_driver_runs_fails_before_anything(tmp_path, monkeypatch, capsys):
    """The whole command: `--resume` while another driver holds the sweep exits 2 with the one line."""
    from orchestration import sweep

    _sweep_folder(tmp_path / "runs")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "runs"), "s1"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr("ray.tune.Tuner.can_restore", lambda path: True)   # a real Tune folder: not needed
        before = sorted(p.name for p in (tmp_path / "runs" / "s1").iterdir())
        rc = sweep.main(["--dataset", "digits", "--name", "s1", "--resume", "--storage", str(tmp_path / "runs")])
        err = capsys.readouterr().err
        assert rc == 2 and "is being run by another driver" in err, err
        assert sorted(p.name for p in (tmp_path / "runs" / "s1").iterdir()) == before
        assert not (tmp_path / "mlflow.db").exists()
    finally:
        holder.kill()
        time.sleep(0.1)


@pytest.mark.parametrize("extra,refused", [
    (["--epochs", "4"], None),                           # the same command again (a SLURM resubmission): fine
    (["--epochs", "6"], "--epochs"),
    (["--num-samples", "5"], "--num-samples"),
    (["--schemes", "LL-R"], "--schemes"),
    (["--max-failures", "7"], "--max-failures"),
    (["--space", "search_spaces/digits-demo.yaml"], "--space"),
    (["--final-seeds", "1"], None),                      # applies to the final stage still to run
])
def test_options_given_with_resume_apply_or_are_refused_by_name(tmp_path, monkeypatch, capsys, extra, refused):
    """Issue 30, finding 9: --epochs, --num-samples, --schemes, --space, --max-failures given with --resume were
    ignored without a word. The same values pass; other values are refused in one line naming the option."""
    from orchestration import sweep
    from orchestration.search.space import with_overrides
    from tests.helpers import ROOT

    started = with_overrides(load_space("digits"), epochs=4)
    record.write(str(tmp_path / "runs"), record.SweepRecord(
        dataset="digits", name="s9", space=started.to_dict(), mlflow_uri=f"sqlite:///{tmp_path / 'm.db'}",
        experiment_id="1", parent_run_id="r", resources={"cpu": 1.0}, data_root=None, cache_dir="/c",
        command="orchestration/sweep.py --dataset digits --epochs 4", created="2026-12-05T00:00:00"))
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").search_experiments()      # the sweep's store exists
    capsys.readouterr()
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("ray.tune.Tuner.can_restore", lambda path: True)
    monkeypatch.setattr("orchestration.run.runner.run_sweep", lambda plan: 0)      # the plan is what is checked
    monkeypatch.setattr("orchestration.sweep.run_sweep", lambda plan: 0)
    rc = sweep.main(["--dataset", "digits", "--name", "s9", "--resume", "--storage", str(tmp_path / "runs"), *extra])
    err = capsys.readouterr().err
    if refused is None:
        assert rc == 0 and "would change" not in err, err
    else:
        assert rc == 2 and f"error: {refused} would change sweep s9" in err and len(err.splitlines()) == 1, err

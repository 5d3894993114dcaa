"""Sweeps that are raced, terminated, resumed and robbed of their checkpoints, with real driver processes.

* two sweeps started together on a folder without an MLflow store: with
  different names both run, with the same name one runs and the other gets
  one error line; the store works afterwards;
* SIGTERM to the driver: trials stop at a checkpoint, runs end KILLED, the
  resume command is printed, status 143; `--resume` finishes the sweep and
  every trial keeps one `train.log` holding both sessions;
* a trial whose checkpoint folders were deleted starts over from epoch 1 on
  `--resume` (said in its log and tag) instead of failing;
* a trial that fails before its first checkpoint leaves its log in the sweep folder;
* Ray started by the sweep listens on 127.0.0.1 only.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (SWEEP, SweepProcess, clean_env, mlflow_runs, ray_trials, rows_by_trial, run_cli,
                           write_space)

pytestmark = [pytest.mark.slow, pytest.mark.service, pytest.mark.timeout(900)]


def _start(cwd: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=cwd, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_sweeps_started_together_on_a_fresh_store(tmp_path, ray_address):
    space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=2, schemes="[LL-R]", train_images=200)
    common = ["--dataset", "digits", "--space", str(space), "--address", ray_address, "--final-seeds", "0"]
    # different names: both run (the second waits for the first to create the store)
    a, b = (_start(tmp_path, [*common, "--name", n]) for n in ("race-a", "race-b"))
    out = [p.communicate(timeout=600) for p in (a, b)]
    assert [a.returncode, b.returncode] == [0, 0], out
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name in ("race-a", "race-b"):
        runs = mlflow_runs(uri, name)
        assert [r.info.status for r in runs["sweep"]] == ["FINISHED"] and len(runs["trial"]) == 1

    # the same name, on another fresh store: one runs, the other is refused in one line
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    c, d = (_start(fresh, [*common, "--name", "same"]) for _ in range(2))
    out = {p.wait(timeout=600): p for p in (c, d)}
    assert sorted(out) == [0, 2], {rc: p.stderr.read()[-2000:] for rc, p in out.items()}
    [line] = [ln for ln in out[2].stderr.read().splitlines() if ln.startswith("error:")]
    assert "already" in line and ("--resume" in line or "another --name" in line), line
    runs = mlflow_runs(f"sqlite:///{fresh / 'mlflow.db'}", "same")
    assert len(runs["sweep"]) == 1 and runs["sweep"][0].info.status == "FINISHED"
    # and the store takes a third sweep
    r = run_cli([*common, "--name", "after"], cwd=fresh)
    assert r.returncode == 0, r.stderr[-3000:]


def test_sigterm_stops_like_ctrl_c_and_resume_keeps_one_log_per_trial(tmp_path, ray_address):
    # 3 trials on 2 CPUs: the third starts only after one ends, so in the resumed session
    space = write_space(tmp_path / "space.yaml", num_samples=3, epochs=6, grace=6, schemes="[LL-R]",
                        train_images=300)
    args = ["--dataset", "digits", "--space", str(space), "--name", "term", "--address", ray_address,
            "--final-seeds", "0"]
    exp_dir = tmp_path / "ray_results" / "term"
    with SweepProcess(tmp_path, args) as sweep:
        sweep.wait_until("a trial at epoch 2", lambda: any(r[-1]["epoch"] >= 2 for r in rows_by_trial(exp_dir).values()))
        started = set(rows_by_trial(exp_dir))
        sweep.proc.send_signal(signal.SIGTERM)               # the driver alone, as `kill` would
        assert sweep.finish(timeout=300) == 143, sweep.output()
        out = sweep.log_path.read_text()
    assert "interrupted: continue with  python orchestration/sweep.py --dataset digits --name term" in out
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = mlflow_runs(uri, "term")
    assert runs["sweep"][0].info.status == "KILLED"
    assert runs["trial"] and {r.info.status for r in runs["trial"]} <= {"KILLED", "FINISHED"}
    assert any(r.info.status == "KILLED" for r in runs["trial"])
    assert len(started) < 3                                 # the third trial was not started yet
    # what the first session left: each begun trial's log (a trial may have written "epoch 1/6" to it and been
    # stopped before it reported and checkpointed that epoch: it is not in `started`, yet it began)
    first_logs = {d: (d / "train.log").read_text() for d in exp_dir.iterdir() if (d / "train.log").is_file()}
    assert len(first_logs) < 3

    r = run_cli(["--dataset", "digits", "--name", "term", "--resume", "--address", ray_address], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = ray_trials(exp_dir)
    assert len(trials) == 3
    runs = mlflow_runs(uri, "term")
    assert runs["sweep"][0].info.status == "FINISHED"
    assert sorted(x.data.tags["wsml.trial_id"] for x in runs["trial"]) == sorted(trials)
    assert {x.info.status for x in runs["trial"]} == {"FINISHED"}
    for tid, t in trials.items():
        log = (t["dir"] / "train.log").read_text()
        epochs = [ln for ln in log.splitlines() if ln.startswith("epoch ")]
        assert epochs[-1].startswith("epoch 6/6"), (tid, log)
        attempts = [ln for ln in log.splitlines() if ln.startswith("# attempt")]
        if t["dir"] in first_logs:                          # began in the first session: one log, both sessions
            assert log.startswith(first_logs[t["dir"]]) and len(attempts) == 2, (tid, log)
            assert "resuming after epoch 0" in attempts[0] and "epoch 1/6" in log, (tid, log)
            if tid in started:                              # it had reported an epoch: not trained again from 0
                assert any(f"resuming after epoch {x}" in attempts[1] for x in range(1, 6)), (tid, log)
        else:                                               # not begun before the SIGTERM: trained in one go
            assert attempts and all("resuming after epoch 0" in a for a in attempts), (tid, log)
            assert log.count("epoch 1/6") == 1, (tid, log)
    assert {tid for tid, t in trials.items() if t["dir"] in first_logs} >= started


def test_a_trial_whose_checkpoints_are_gone_starts_over(tmp_path, ray_address):
    space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=4, grace=4, schemes="[LL-Cp]",
                        train_images=300)
    args = ["--dataset", "digits", "--space", str(space), "--name", "gone", "--address", ray_address,
            "--final-seeds", "0"]
    exp_dir = tmp_path / "ray_results" / "gone"
    with SweepProcess(tmp_path, args) as sweep:
        sweep.wait_until("epoch 2", lambda: any(r[-1]["epoch"] >= 2 for r in rows_by_trial(exp_dir).values()))
        os.killpg(sweep.proc.pid, signal.SIGKILL)           # the driver and its trials, without a word
        sweep.proc.wait()
    [trial_dir] = [p for p in exp_dir.iterdir() if p.name.startswith("trial_")]
    gone = sorted(trial_dir.glob("checkpoint_*"))
    assert gone
    for d in gone:                                          # docs/troubleshooting.md's advice: delete them
        shutil.rmtree(d)

    r = run_cli(["--dataset", "digits", "--name", "gone", "--resume", "--address", ray_address], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "starts over" in r.stdout
    [trial] = ray_trials(exp_dir).values()
    rows = trial["results"]
    again = [x for x in rows if x.get("checkpoints_lost")]
    assert again and again[0]["epoch"] == 1 and again[0]["restored_from_epoch"] == 0
    assert rows[-1]["epoch"] == 4
    first = {x["epoch"]: x["val_map"] for x in rows[: rows.index(again[0])]}
    assert all(first[e] == x["val_map"] for x in again if (e := x["epoch"]) in first)   # deterministic retrain
    log = (trial["dir"] / "train.log").read_text()
    assert "the checkpoints of this trial are gone" in log and "starting over from epoch 1" in log
    [run] = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "gone")["trial"]
    assert run.info.status == "FINISHED" and run.data.tags["wsml.started_over"] == "checkpoints gone"


def test_a_trial_that_fails_before_its_first_checkpoint_leaves_its_log(tmp_path, ray_address):
    from tests.fixtures_official import make_voc
    from wsml.data.prepare import prepare

    make_voc(tmp_path / "raw")
    prepare("pascal", tmp_path / "raw", tmp_path / "voc")
    space = tmp_path / "space.yaml"                     # a weights file that is not there: the trial fails
    space.write_text(write_space(tmp_path / "d.yaml", num_samples=1, epochs=2, schemes="[LL-R]", max_failures=0)
                     .read_text().replace("dataset: digits", "dataset: pascal")
                     .replace("train: {", f"train: {{weights: {tmp_path / 'no.pt'}, image_size: 32, ")
                     + "start_with: none\n")
    r = run_cli(["--dataset", "pascal", "--space", str(space), "--data-root", str(tmp_path / "voc"),
                 "--name", "noweights", "--address", ray_address, "--final-seeds", "0"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]              # the sweep ends; its trial failed
    [trial_dir] = [p for p in (tmp_path / "ray_results" / "noweights").iterdir() if p.name.startswith("trial_")]
    log = (trial_dir / "train.log").read_text()
    assert "# attempt" in log and "# failed: ConfigError: weights file" in log, log


def _descendants(pid: int) -> set[int]:
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    family, grew = {pid}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in family} - family
        family |= more
        grew = bool(more)
    return family


def test_local_ray_listens_on_loopback_only(tmp_path):
    """The sweep's own Ray (no --address): every listening socket of its processes is on 127.0.0.1."""
    import re

    space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=2, schemes="[LL-R]", train_images=200)
    with SweepProcess(tmp_path, ["--dataset", "digits", "--space", str(space), "--name", "lo",
                                 "--final-seeds", "0"]) as sweep:
        exp_dir = tmp_path / "ray_results" / "lo"
        sweep.wait_until("epoch 1", lambda: rows_by_trial(exp_dir))
        family = _descendants(sweep.proc.pid)
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        listening = [line.split()[3] for line in out.splitlines()
                     if any(int(p) in family for p in re.findall(r"pid=(\d+)", line))]
        assert len(listening) >= 2, out                     # GCS and raylet at least
        for address in listening:
            assert address.rpartition(":")[0] in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"), (address, out)
        assert sweep.finish() == 0, sweep.output()

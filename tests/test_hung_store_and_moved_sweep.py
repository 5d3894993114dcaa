"""Issue 30, findings 5 and 6: a hung MLflow store never stalls a trial; `--resume` works from a moved folder.

5. The MLflow callback's calls are sent by the outbox's own thread: a store that hangs (a server stopped
   with SIGSTOP, SQLite on a frozen file system) holds that thread, not Tune's result loop. In-process
   with a client whose calls hang; end to end with a real `mlflow server` SIGSTOPped mid-sweep.
6. A sweep whose working directory moved (its storage and its local MLflow store with it) is continued by
   `--resume` from the new place: the store, cache and data beside the storage are found there, nothing is
   written at the old place, and `--mlflow-uri` (or `--data-root`, `--cache-dir`) given with `--resume`
   applies when it names the sweep's own store (data), instead of being ignored.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import (MlflowServer, SweepProcess, history, mlflow_runs, ray_trials, rows_by_trial, run_cli,
                           trial_result, write_space)


# =================================================================== 5. a hung store
class _HungClient:
    """A real MlflowClient whose calls hang while `go` is clear (a server stopped with SIGSTOP), giving
    up after `hang_s` like an HTTP timeout."""

    def __init__(self, real, hang_s: float = 2.0):
        self.real, self.hang_s, self.go = real, hang_s, threading.Event()
        self.go.set()

    def __getattr__(self, name):
        fn = getattr(self.real, name)

        def call(*args, **kwargs):
            if not self.go.wait(self.hang_s):
                raise TimeoutError("read timed out")
            return fn(*args, **kwargs)

        return call


class _Trial:
    def __init__(self, tid: str, index: int):
        self.trial_id, self.experiment_tag = tid, f"{index}_x"
        self.config = {"dataset": "digits", "epochs": 6, "seed": 0, "train": {"num_workers": 0},
                       "scheme": "LL-R", "mode": "end-to-end", "lr": 1e-3, "delta_rel": 2.0}
        self.last_result: dict = {}
        self.status, self.num_failures = "RUNNING", 0
        self.error_file = None

    def get_error(self):
        return ""



def test_the_callbacks_hooks_never_wait_on_a_store_that_hangs(tmp_path, capfd):
    from mlflow import MlflowClient

    from orchestration import common as T
    from orchestration.tracking import store
    from orchestration.tracking.mlflow_callback import MLflowTrialLogger

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    real = MlflowClient(uri)
    exp, parent = store.start_parent(real, "hung", "digits", {"command": "x"}, resume=False)
    cb = MLflowTrialLogger(uri, exp, parent, "hung", "digits", T.ROLE_TRIAL, epochs=6)
    hung = cb._client = _HungClient(real)
    a = _Trial("a", 1)
    cb.log_trial_start(a)
    cb.log_trial_result(0, a, trial_result(1))
    assert cb.outbox.drain(30) == 0                          # delivered while the store answers

    hung.go.clear()                                          # the store hangs: every call waits 2 s
    t0 = time.monotonic()
    for e in range(2, 7):
        a.last_result = trial_result(e)
        cb.log_trial_result(0, a, a.last_result)
    cb.log_trial_end(a)
    spent = time.monotonic() - t0
    assert spent < 1.0, f"the hooks waited {spent:.1f} s on a hung store"
    time.sleep(3)                                            # a call timed out: the store counts as down
    hung.go.set()                                            # it answers again: all of it arrives, in order
    assert cb.finish(wait_s=60) == 0
    [run] = store.find_runs(real, exp, **{T.TAG_TRIAL_ID: "a"})
    assert (run.info.status, run.data.tags[T.TAG_STATUS_REASON]) == ("FINISHED", "completed")
    assert [s for s, _ in history(uri, run.info.run_id)] == [1, 2, 3, 4, 5, 6]
    err = capfd.readouterr().err
    assert "cannot be reached (read timed out)" in err and "answers again" in err

    # a store that never answers again: the end of the sweep waits wait_s, not for the call in flight
    b = _Trial("b", 2)
    cb.log_trial_start(b)
    hung.hang_s = 3600
    hung.go.clear()
    cb.log_trial_result(0, b, trial_result(1))
    t0 = time.monotonic()
    assert cb.finish(wait_s=2) >= 1                          # b's epoch and its end (KILLED) at least
    assert time.monotonic() - t0 < 10
    assert "not delivered" in capfd.readouterr().err
    hung.go.set()


@pytest.mark.slow
@pytest.mark.service
@pytest.mark.timeout(900)
def test_a_hung_mlflow_server_does_not_stall_the_trials(tmp_path, ray_address):
    """The issue's run: the server SIGSTOPped mid-sweep; epochs keep their pace (about 2 s here; the
    issue saw 25-35 s while it was stopped), and after SIGCONT every epoch reaches MLflow."""
    server = MlflowServer(tmp_path / "server.db", tmp_path / "artifacts", tmp_path / "server.log").start()
    work = tmp_path / "cwd"
    work.mkdir()
    epochs, stopped_s = 20, 30.0
    space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=epochs, grace=epochs, schemes="[LL-R]",
                        train_images=300)
    exp_dir = work / "ray_results" / "hung"
    assert server.proc is not None
    group = os.getpgid(server.proc.pid)
    try:
        with SweepProcess(work, ["--dataset", "digits", "--space", str(space), "--name", "hung", "--mlflow-uri",
                                 server.url, "--address", ray_address, "--final-seeds", "0"]) as sweep:
            sweep.wait_until("the trial at epoch 2", lambda: any(
                r[-1]["epoch"] >= 2 for r in rows_by_trial(exp_dir).values()))
            os.killpg(group, signal.SIGSTOP)
            stopped = time.time()
            try:
                time.sleep(stopped_s)
            finally:
                os.killpg(group, signal.SIGCONT)
            assert sweep.finish() == 0, sweep.output()
            out = sweep.log_path.read_text() + sweep.err_path.read_text()
        [trial] = ray_trials(exp_dir).values()
        rows = trial["results"]
        assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
        # each epoch's wall time as the driver saw it (Tune stamps a result when its loop takes it)
        gaps = [b["timestamp"] - a["timestamp"] for a, b in zip(rows, rows[1:])]
        during = [r for r in rows if stopped <= r["timestamp"] <= stopped + stopped_s]
        # normal about 2 s, stalled 25-35 s: 12 s is generous for a loaded machine
        assert max(gaps) <= 12, (gaps, out[-3000:])
        assert len(during) >= 3, (gaps, len(during))           # the trial trained on while the store hung

        runs = mlflow_runs(server.url, "hung")
        assert runs["sweep"][0].info.status == "FINISHED"
        [run] = runs["trial"]
        assert run.info.status == "FINISHED" and run.data.tags["wsml.end_reason"] == "completed"
        assert history(server.url, run.info.run_id) == [(r["epoch"], pytest.approx(r["val_map"])) for r in rows]
        assert run.data.metrics["epochs_run"] == epochs
    finally:
        try:
            os.killpg(group, signal.SIGCONT)
        except ProcessLookupError:
            pass
        server.stop()


# =================================================================== 6. --resume from a moved folder
def _started(monkeypatch, where: Path, name: str = "mv") -> tuple[str, str]:
    """A sweep record of `name` whose storage was `where`/ray_results, and its MLflow store beside it (as a
    sweep started in `where` makes them); the (experiment id, run id) of its run."""
    from mlflow import MlflowClient

    from orchestration.run import record
    from orchestration.search.space import load_space
    from orchestration.tracking import store

    where.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(where)            # MLflow's artifact locations are made from the working directory
    uri = f"sqlite:///{where / 'mlflow.db'}"
    exp, run = store.start_parent(MlflowClient(uri), name, "digits", {"command": "x"}, resume=False)
    record.write(str(where / "ray_results"), record.SweepRecord(
        dataset="digits", name=name, space=load_space("digits", write_space(
            where.parent / f"{name}-space.yaml", num_samples=2, epochs=4, grace=4, schemes="[LL-R]")).to_dict(),
        mlflow_uri=uri, experiment_id=exp, parent_run_id=run, resources={"cpu": 1.0}, data_root=None,
        cache_dir=str(where / ".cache"), command="orchestration/sweep.py --dataset digits", created="2026-12-05"))
    return exp, run


def _plan(monkeypatch, capsys, cwd: Path, *extra: str):
    """The plan of `--resume` in `cwd` (what run_sweep would be given), and stderr; nothing is run."""
    from orchestration import sweep

    plans: list = []
    monkeypatch.chdir(cwd)
    monkeypatch.setattr("ray.tune.Tuner.can_restore", lambda path: True)
    monkeypatch.setattr("orchestration.sweep.run_sweep", lambda plan: plans.append(plan) or 0)
    capsys.readouterr()
    rc = sweep.main(["--dataset", "digits", "--name", "mv", "--resume", *extra])
    out, err = capsys.readouterr()
    return (plans[0] if plans else None), rc, out, err


def test_resume_from_a_moved_folder_finds_its_store_and_cache_there(tmp_path, monkeypatch, capsys):
    from orchestration.tracking import store

    exp, run = _started(monkeypatch, tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    plan, rc, out, err = _plan(monkeypatch, capsys, tmp_path / "b")
    assert rc == 0, err
    assert plan.uri == f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}" and plan.cache_dir == str(tmp_path / "b" / ".cache")
    assert f"note: sweep mv started in {tmp_path / 'a'} and is continued from {tmp_path / 'b'}" in out
    assert plan.moved_paths() == {str(tmp_path / "a" / ".cache"): str(tmp_path / "b" / ".cache")}
    # the writers Tune restores with the old URI write to the store where it is now
    assert store._MOVED[f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"] == plan.uri
    # its artifact locations follow it: the tables attached at the end are not written at the old place
    c = store.client(plan.uri)
    assert c.get_experiment(exp).artifact_location.startswith(str(tmp_path / "b" / "mlruns"))
    assert c.get_run(run).info.artifact_uri.startswith(str(tmp_path / "b" / "mlruns"))
    assert not (tmp_path / "a").exists()
    store._MOVED.clear()


def test_resume_takes_mlflow_uri_when_it_holds_the_sweep_and_refuses_another_store(tmp_path, monkeypatch, capsys):
    """The store alone moved elsewhere: --mlflow-uri naming it applies (it was ignored); a store without the
    sweep's run is refused by name (the sweep would be split over two stores), and a store that is gone is
    told so, with the advice that applies."""
    from orchestration.tracking import store

    _started(monkeypatch, tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "mlflow.db").rename(tmp_path / "elsewhere" / "mlflow.db")
    plan, rc, out, err = _plan(monkeypatch, capsys, tmp_path)
    assert rc == 2 and "mlflow.db is gone" in err and "pass --mlflow-uri with where it is now" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "mlflow.db").exists()

    moved = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    plan, rc, out, err = _plan(monkeypatch, capsys, tmp_path, "--mlflow-uri", moved)
    assert rc == 0 and plan.uri == moved and "ignored" not in out + err, err

    _started(monkeypatch, tmp_path / "other", name="other")
    plan, rc, out, err = _plan(monkeypatch, capsys, tmp_path, "--mlflow-uri",
                               f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}")
    assert rc == 2 and plan is None, err
    assert "does not hold sweep mv's run" in err and len(err.splitlines()) == 1, err
    store._MOVED.clear()


@pytest.mark.slow
@pytest.mark.service
@pytest.mark.timeout(900)
def test_resume_after_moving_the_working_directory(tmp_path, ray_address):
    """The issue's run: a sweep stopped, its working directory (storage, MLflow store, cache) moved, then
    `--resume` from the new place: it finishes there, every epoch once in the moved store, nothing at the
    old place."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    space = write_space(tmp_path / "space.yaml", num_samples=2, epochs=4, grace=4, schemes="[LL-R]", train_images=300)
    with SweepProcess(a, ["--dataset", "digits", "--space", str(space), "--name", "mv", "--address", ray_address,
                          "--final-seeds", "0"]) as sweep:
        sweep.wait_until("a trial at epoch 2", lambda: any(
            r[-1]["epoch"] >= 2 for r in rows_by_trial(a / "ray_results" / "mv").values()))
        sweep.proc.send_signal(signal.SIGTERM)
        assert sweep.finish(timeout=300) == 143, sweep.output()
    a.rename(b)

    r = run_cli(["--dataset", "digits", "--name", "mv", "--resume", "--address", ray_address], cwd=b)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"note: sweep mv started in {a} and is continued from {b}" in r.stdout
    assert not a.exists()                                   # nothing written at the old place

    uri = f"sqlite:///{b / 'mlflow.db'}"
    trials = ray_trials(b / "ray_results" / "mv")
    runs = mlflow_runs(uri, "mv")
    assert runs["sweep"][0].info.status == "FINISHED" and runs["sweep"][0].data.tags.get("wsml.resumed") == "1"
    assert sorted(x.data.tags["wsml.trial_id"] for x in runs["trial"]) == sorted(trials)   # one run per trial
    for x in runs["trial"]:
        assert x.info.status == "FINISHED", x.data.tags
        assert [s for s, _ in history(uri, x.info.run_id)] == [1, 2, 3, 4]
    parent = runs["sweep"][0]
    assert parent.info.artifact_uri.startswith(str(b / "mlruns"))
    assert (b / "mlruns").is_dir()                           # the tables were attached beside the moved store
    for t in trials.values():                                # the continued trials read the cache where it is now
        attempts = [ln for ln in (t["dir"] / "train.log").read_text().splitlines() if ln.startswith("# attempt")]
        assert str(b / ".cache") in attempts[-1], attempts

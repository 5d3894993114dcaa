"""Faults injected into real sweeps of `digits` on CPUs, and what must come out of them.

* a trial's worker process SIGKILLed mid-epoch: retried from its last
  checkpoint, with exactly the per-epoch validation mAP of an uninterrupted run;
* the trial's newest checkpoint truncated on disk before it is restored: the
  earlier checkpoint Tune kept is used, the trial still finishes, same numbers;
* the MLflow tracking server stopped mid-sweep and started again: trials train
  on, their logging is buffered and delivered once, nothing stays RUNNING;
  credentials in the tracking URI appear in no param, tag or output line;
* a trial whose loss becomes NaN: FAILED with the reason, not retried, while
  the other trials finish;
* the MLflow callback alone against a store that drops out (no Ray): calls are
  kept in order and delivered exactly once.

Covered elsewhere: the driver SIGKILLed and `--resume`
(tests/test_sweep.py::test_resume_after_driver_killed), a worker node removed
mid-sweep (tests/test_sweep_cluster.py::test_multi_node_fractional_gpus_and_node_loss),
a truncated checkpoint file detected (tests/test_train.py::test_truncated_checkpoint_detected),
NaN raising TrainingDiverged (tests/test_train.py::test_divergence_is_reported).
"""
from __future__ import annotations

import functools
import glob
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_sweep import (  # noqa: F401 - ray_address is a fixture (a 2-CPU Ray cluster per module)
    SWEEP, clean_env, free_port, history, mlflow_runs, ray_address, ray_trials, write_space)



# ------------------------------------------------------------------ helpers
def rows_by_trial(exp_dir: Path) -> dict[str, list[dict]]:
    """Ray's result.json rows of each trial, read while the sweep runs (a line being written is skipped)."""
    out = {}
    for f in glob.glob(str(exp_dir / "*/result.json")):
        rows = []
        for line in Path(f).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


class Sweep:
    """The sweep CLI in a subprocess, its output in a file."""

    def __init__(self, cwd: Path, args: list[str], **env: str):
        self.log_path = cwd / "driver.log"
        self.err_path = cwd / "driver.err"
        self._out, self._err = open(self.log_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=cwd, env=clean_env(**env),
                                     stdout=self._out, stderr=self._err)

    def output(self) -> str:
        return self.log_path.read_text()[-3000:] + self.err_path.read_text()[-4000:]

    def wait_until(self, what: str, predicate, timeout: float = 300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = predicate()
            if value:
                return value
            assert self.proc.poll() is None, f"sweep ended while waiting for {what}: " + self.output()
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}: " + self.output())

    def finish(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)

    def __enter__(self) -> "Sweep":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        self._err.close()


def by_epoch(rows: list[dict]) -> dict[int, float]:
    """epoch -> val_map; an epoch trained twice (after a restore) must give the same value."""
    seen: dict[int, float] = {}
    for r in rows:
        if r.get("val_map") is None:
            continue
        e = int(r["epoch"])
        assert seen.setdefault(e, r["val_map"]) == r["val_map"], f"epoch {e} trained again differently"
    return seen


@functools.lru_cache(maxsize=4)
def _plain(config_json: str) -> tuple[tuple[int, float], ...]:
    import torch

    from orchestration.trainable import train_config
    from wsml.train import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # as in a Ray worker with one CPU (OMP_NUM_THREADS=1)
    try:
        result = run(train_config(json.loads(config_json)), log=None)
    finally:
        torch.set_num_threads(threads)
    return tuple((int(h["epoch"]), h["val_map"]) for h in result.history)


def uninterrupted(config: dict) -> dict[int, float]:
    """The per-epoch val_map of a plain `wsml.train.run` of a trial's config, in this process."""
    keep = {k: v for k, v in config.items() if k not in ("wsml_sweep",)}
    keep["train"] = {k: v for k, v in (config.get("train") or {}).items() if k != "cache_dir"}
    return dict(_plain(json.dumps(keep, sort_keys=True)))


def one_trial_space(tmp_path: Path) -> Path:
    # LL-Cp: its corrected labels are part of the state to restore; grace = epochs: ASHA stops nothing
    return write_space(tmp_path / "space.yaml", num_samples=1, epochs=5, grace=5, schemes="[LL-Cp]",
                       max_failures=2, train_images=300)


# ------------------------------------------------- a trial's worker SIGKILLed
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_trial_is_retried_from_its_checkpoint_with_identical_metrics(tmp_path, ray_address):
    space = one_trial_space(tmp_path)
    exp_dir = tmp_path / "ray_results" / "kill"
    with Sweep(tmp_path, ["--dataset", "digits", "--space", str(space), "--name", "kill",
                          "--address", ray_address]) as sweep:
        # Tune's own `pid` result field names the trial's worker process.
        rows = sweep.wait_until("epoch 2", lambda: next(
            (r for r in rows_by_trial(exp_dir).values() if r[-1]["epoch"] >= 2), None))
        victim, killed_after = rows[-1]["pid"], rows[-1]["epoch"]
        os.kill(victim, signal.SIGKILL)          # the trial is now inside its next epoch
        assert sweep.finish() == 0, sweep.output()

    [trial] = ray_trials(exp_dir).values()
    rows = trial["results"]
    after = [r for r in rows if r["pid"] != victim]
    assert after, "no result after the kill"
    first = after[0]
    # continued from the checkpoint of the last epoch reported before the kill (or one more, had it
    # just finished), not from scratch
    assert first["restored_from_epoch"] in (killed_after, killed_after + 1), first
    assert first["epoch"] == first["restored_from_epoch"] + 1
    assert rows[-1]["epoch"] == 5
    # bit for bit the run it would have been without the kill
    assert by_epoch(rows) == uninterrupted(trial["config"])

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    [run] = mlflow_runs(uri, "kill")["trial"]
    assert run.info.status == "FINISHED" and run.data.tags["wsml.end_reason"] == "completed"
    assert run.data.tags["wsml.failures"] == "1"
    assert run.data.tags["wsml.restored_from_epoch"] == str(first["restored_from_epoch"])
    assert dict(history(uri, run.info.run_id)) == uninterrupted(trial["config"])     # each epoch once


# ------------------------------------------- the newest checkpoint truncated
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_truncated_latest_checkpoint_falls_back_to_the_earlier_one(tmp_path, ray_address):
    space = one_trial_space(tmp_path)
    exp_dir = tmp_path / "ray_results" / "trunc"
    with Sweep(tmp_path, ["--dataset", "digits", "--space", str(space), "--name", "trunc",
                          "--address", ray_address]) as sweep:
        rows = sweep.wait_until("epoch 3", lambda: next(
            (r for r in rows_by_trial(exp_dir).values() if r[-1]["epoch"] >= 3), None))
        victim = rows[-1]["pid"]
        os.kill(victim, signal.SIGSTOP)          # freeze the trial: no new checkpoint from here on
        try:
            time.sleep(1.5)                      # let the driver record what the trial had sent
            [rows] = rows_by_trial(exp_dir).values()
            latest = rows[-1]["epoch"]           # the checkpoint Tune will hand to the retry
            trial_dir = next(p for p in exp_dir.iterdir() if (p / "result.json").exists())
            metas = {int(json.loads((d / "meta.json").read_text())["epoch"]): d
                     for d in trial_dir.glob("checkpoint_*") if (d / "meta.json").exists()}
            assert latest in metas and latest - 1 in metas, metas          # keep_checkpoints: 2
            state = metas[latest] / "state.pt"
            data = state.read_bytes()
            state.write_bytes(data[: len(data) // 2])                       # cut short, as by a full disk
        finally:
            os.kill(victim, signal.SIGKILL)
        assert sweep.finish() == 0, sweep.output()

    [trial] = ray_trials(exp_dir).values()
    rows = trial["results"]
    first = next(r for r in rows if r["pid"] != victim)
    assert first["restored_from_epoch"] == latest - 1 and first["epoch"] == latest, first
    assert rows[-1]["epoch"] == 5
    assert by_epoch(rows) == uninterrupted(trial["config"])            # epoch `latest` trained again, same value
    log = (trial["dir"] / "train.log").read_text()
    assert f"checkpoint {metas[latest]} is unusable" in log and "checksum mismatch" in log
    assert f"resuming from the earlier {metas[latest - 1]}" in log

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    [run] = mlflow_runs(uri, "trunc")["trial"]
    assert run.info.status == "FINISHED" and run.data.tags["wsml.end_reason"] == "completed"
    assert [s for s, _ in history(uri, run.info.run_id)] == [1, 2, 3, 4, 5]


# ------------------------------------------------ the MLflow server goes away
def _start_mlflow(port: int, db: Path, artifacts: Path, log: Path) -> subprocess.Popen:
    env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri", f"sqlite:///{db}",
                               "--default-artifact-root", str(artifacts), "--workers", "1"],
                              cwd=db.parent, env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            pass
        assert server.poll() is None and time.time() < deadline, log.read_text()[-2000:]
        time.sleep(0.3)


def _stop(server: subprocess.Popen) -> None:
    server.terminate()                       # SIGTERM: the server stops its workers
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mlflow_server_down_mid_sweep_loses_nothing(tmp_path, ray_address):
    port = free_port()
    db, artifacts, server_log = tmp_path / "server.db", tmp_path / "artifacts", tmp_path / "server.log"
    password, token = "pw-S3CRET-4711", "tok-S3CRET-0815"
    uri = f"http://alice:{password}@127.0.0.1:{port}"
    plain_uri = f"http://127.0.0.1:{port}"
    server = _start_mlflow(port, db, artifacts, server_log)
    work = tmp_path / "cwd"
    work.mkdir()
    # grace = epochs: both trials run every epoch, so the outage falls inside them
    space = write_space(tmp_path / "space.yaml", num_samples=2, epochs=8, grace=8, schemes="[LL-R, LL-Ct]",
                        train_images=300)
    exp_dir = work / "ray_results" / "down"
    try:
        with Sweep(work, ["--dataset", "digits", "--space", str(space), "--name", "down", "--mlflow-uri", uri,
                          "--address", ray_address], MLFLOW_TRACKING_TOKEN=token) as sweep:
            sweep.wait_until("two trials at epoch 1", lambda: len(
                [r for r in rows_by_trial(exp_dir).values() if r[-1]["epoch"] >= 1]) == 2)
            _stop(server)
            down_at = sum(len(r) for r in rows_by_trial(exp_dir).values())
            time.sleep(6)
            during = sum(len(r) for r in rows_by_trial(exp_dir).values())
            server = _start_mlflow(port, db, artifacts, server_log)        # same port, same store
            assert sweep.finish() == 0, sweep.output()
            out = sweep.log_path.read_text() + sweep.err_path.read_text()
        assert during >= down_at + 2, (down_at, during)                 # trials trained on meanwhile
        assert "cannot be reached" in out and "answers again" in out

        trials = ray_trials(exp_dir)
        assert len(trials) == 2
        runs = mlflow_runs(plain_uri, "down")
        [parent] = runs["sweep"]
        assert parent.info.status == "FINISHED"
        children = runs["trial"]
        assert sorted(c.data.tags["wsml.trial_id"] for c in children) == sorted(trials)   # one run per trial
        for c in children:
            assert c.info.status == "FINISHED" and c.data.tags["wsml.end_reason"] == "completed"
            rows = trials[c.data.tags["wsml.trial_id"]]["results"]
            assert history(plain_uri, c.info.run_id) == [(r["epoch"], pytest.approx(r["val_map"])) for r in rows]
            assert [s for s, _ in history(plain_uri, c.info.run_id, "train_loss")] == list(range(1, 9))
            assert c.data.metrics["epochs_run"] == 8
        # no credential in what was logged or printed
        for r in [parent, *children]:
            for value in [*r.data.params.values(), *r.data.tags.values()]:
                assert password not in value and token not in value, value
        assert "http://***@127.0.0.1" in parent.data.params["command"]
        assert password not in out and token not in out
    finally:
        _stop(server)


# --------------------------------------------------------- a diverging trial
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_diverging_trial_fails_alone_and_is_not_retried(tmp_path, ray_address):
    """The sweep's own trainable, callback, scheduler and failure settings, with one trial's lr
    pushed to 1e30 through its config (a space file cannot reach it: lr is at most 1)."""
    import ray
    from mlflow import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from orchestration import mlflow_log as M
    from orchestration import tracking as T
    from orchestration.sweep import connect_ray
    from orchestration.trainable import train_trial, trial_dirname

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    experiment_id, parent = M.start_parent(c, "nan", "digits", {"command": "test"}, resume=False)
    logger = M.MLflowTrialLogger(uri, experiment_id, parent, "nan", "digits", T.ROLE_TRIAL, epochs=3)
    config = {"dataset": "digits", "epochs": 3, "seed": 0, "device": "cpu", "data_root": None,
              "train": {"num_workers": 0, "max_train_images": 200, "stop_drop": None}, "wsml_sweep": "nan",
              "scheme": "LL-R", "mode": "end-to-end", "delta_rel": 2.0,
              "lr": tune.grid_search([1e30, 1e-3, 2e-3])}
    assert connect_ray(ray_address)
    try:
        tuner = tune.Tuner(
            tune.with_resources(train_trial, {"cpu": 1}), param_space=config,
            tune_config=tune.TuneConfig(metric="val_map", mode="max", reuse_actors=True,
                                        scheduler=ASHAScheduler(time_attr="epoch", max_t=3, grace_period=3),
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name="nan", storage_path=str(tmp_path / "ray_results"),
                                      failure_config=tune.FailureConfig(max_failures=2),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                      callbacks=[logger], verbose=0))
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert not results.errors and len(results) == 3
    by_lr = {r.config["lr"]: r for r in results}
    diverged = by_lr[1e30]
    assert diverged.metrics["wsml_error"].startswith("TrainingDiverged: training loss became nan in epoch 1")
    log = (Path(diverged.path) / "train.log").read_text()
    assert log.count("# attempt") == 1 and "# diverged" in log                 # not retried
    for lr in (1e-3, 2e-3):
        assert by_lr[lr].metrics["epoch"] == 3 and "wsml_error" not in by_lr[lr].metrics

    runs = {float(r.data.params["lr"]): r for r in M.find_runs(c, experiment_id, **{T.TAG_ROLE: T.ROLE_TRIAL})}
    assert len(runs) == 3
    bad = runs[1e30]
    assert bad.info.status == "FAILED"
    assert bad.data.tags[T.TAG_STATUS_REASON].startswith("failed: TrainingDiverged: training loss became nan")
    assert "lower the learning rate" in bad.data.tags[T.TAG_STATUS_REASON]
    assert "wsml.failures" not in bad.data.tags
    assert history(uri, bad.info.run_id) == []                                # no epoch finished
    for lr in (1e-3, 2e-3):
        good = runs[lr]
        assert good.info.status == "FINISHED" and good.data.tags[T.TAG_STATUS_REASON] == "completed"
        assert [s for s, _ in history(uri, good.info.run_id)] == [1, 2, 3]


# ------------------------------------- the MLflow callback, a store that drops out
class _Trial:
    def __init__(self, tid: str, index: int):
        self.trial_id, self.experiment_tag = tid, f"{index}_x"
        self.config = {"dataset": "digits", "epochs": 3, "seed": 0, "train": {"num_workers": 0},
                       "scheme": "LL-R", "mode": "end-to-end", "lr": 1e-3, "delta_rel": 2.0}
        self.last_result: dict = {}
        self.status, self.num_failures = "RUNNING", 0

    def get_error(self):
        return "Traceback ...\nRuntimeError: boom"


class _FlakyClient:
    """A real MlflowClient whose calls fail like an unreachable server while `down` is set;
    `fail_in` > 0 lets that many more calls through first (a failure half-way through a call)."""

    def __init__(self, real):
        self.real, self.down, self.fail_in, self.refuse, self.calls = real, False, 0, None, []

    def __getattr__(self, name):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        fn = getattr(self.real, name)

        def call(*args, **kwargs):
            if self.refuse == name:
                self.refuse = None
                raise MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)
            if self.down:
                if self.fail_in > 0:
                    self.fail_in -= 1
                else:
                    raise MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/runs failed with "
                                          "exception ConnectionError: Connection refused")
            self.calls.append(name)
            return fn(*args, **kwargs)

        return call


def _result(epoch: int) -> dict:
    return {"epoch": epoch, "val_map": 10.0 + epoch, "train_loss": 1.0 / epoch, "best_val_map": 10.0 + epoch,
            "best_epoch": epoch, "test_map_at_best": 20.0 + epoch, "train_seconds": 10.0 * epoch,
            "node_id": "n1", "device": "cpu", "restored_from_epoch": 0}


def test_callback_buffers_while_the_store_is_down(tmp_path, capfd):
    from mlflow import MlflowClient

    from orchestration import mlflow_log as M
    from orchestration import tracking as T

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    real = MlflowClient(uri)
    exp, parent = M.start_parent(real, "flaky", "digits", {"command": "x"}, resume=False)
    cb = M.MLflowTrialLogger(uri, exp, parent, "flaky", "digits", T.ROLE_TRIAL, epochs=3, flush_wait_s=1.0)
    cb.RETRY_FIRST_S = 0.0                                  # retry at the next hook
    flaky = cb._client = _FlakyClient(real)
    a, b = _Trial("a", 1), _Trial("b", 2)
    trials = [a, b]
    cb.on_step_begin(0, trials)
    cb.on_trial_start(0, trials, a)                         # a's run exists before the outage
    cb.on_trial_result(0, trials, a, _result(1))

    flaky.down = True
    cb.on_trial_result(0, trials, a, _result(2))            # queued
    cb.on_trial_start(0, trials, b)                         # b's run cannot even be created
    cb.on_trial_result(0, trials, b, _result(1))
    b.num_failures = 1
    cb.on_trial_recover(0, trials, b)
    cb.on_trial_result(0, trials, b, _result(1))            # a repeated epoch: queued once
    for _ in range(3):
        cb.on_step_begin(0, trials)                         # retries, still down
    assert len(M.find_runs(real, exp, **{T.TAG_ROLE: T.ROLE_TRIAL})) == 1
    err = capfd.readouterr().err
    assert err.count("cannot be reached") == 1 and "trials go on" in err   # said once per outage

    flaky.down, flaky.fail_in = False, 0
    cb.on_step_begin(0, trials)                             # the store answers: all delivered
    err = capfd.readouterr().err
    assert "answers again" in err
    runs = {r.data.tags[T.TAG_TRIAL_ID]: r for r in M.find_runs(real, exp, **{T.TAG_ROLE: T.ROLE_TRIAL})}
    assert set(runs) == {"a", "b"}
    assert [s for s, _ in history(uri, runs["a"].info.run_id)] == [1, 2]
    assert [s for s, _ in history(uri, runs["b"].info.run_id)] == [1]
    assert runs["b"].data.params["scheme"] == "LL-R" and runs["b"].data.tags["wsml.failures"] == "1"
    assert runs["b"].info.status == "RUNNING"

    # down again, failing half-way through the end of `a` (its metrics and tag got through)
    for e in (2, 3):
        b.last_result = _result(e)
        cb.on_trial_result(0, trials, b, b.last_result)
    a.last_result = _result(3)
    cb.on_trial_result(0, trials, a, a.last_result)
    flaky.down, flaky.fail_in = True, 2
    a.status = "TERMINATED"
    cb.on_trial_complete(0, trials, a)
    assert runs["a"].info.status == real.get_run(runs["a"].info.run_id).info.status == "RUNNING"
    flaky.down = False
    cb.on_step_begin(0, trials)
    assert real.get_run(runs["a"].info.run_id).info.status == "FINISHED"
    flaky.refuse = "set_tag"                                # a refused call is dropped, not retried forever
    b.num_failures = 2
    cb.on_trial_recover(0, trials, b)
    b.status = "TERMINATED"
    cb.on_trial_complete(0, trials, b)
    cb.on_experiment_end(trials)
    err = capfd.readouterr().err
    assert "refused a tag call of trial b" in err
    runs = {r.data.tags[T.TAG_TRIAL_ID]: r for r in M.find_runs(real, exp, **{T.TAG_ROLE: T.ROLE_TRIAL})}
    for tid in ("a", "b"):
        r = runs[tid]
        assert (r.info.status, r.data.tags[T.TAG_STATUS_REASON]) == ("FINISHED", "completed"), tid
        assert [s for s, _ in history(uri, r.info.run_id)] == [1, 2, 3], tid      # each epoch exactly once
        assert len(real.get_metric_history(r.info.run_id, T.TEST_MAP)) == 1, tid  # final metrics once
    assert runs["b"].data.tags["wsml.failures"] == "1"     # the refused update was dropped
    assert M.EXPERIMENT_INTERRUPTED[("flaky", T.ROLE_TRIAL)] is False

    # a store that never comes back: the end waits flush_wait_s, says what was lost, does not raise
    c = _Trial("c", 3)
    cb.on_trial_start(0, [c], c)
    flaky.down = True
    cb.on_trial_result(0, [c], c, _result(1))
    t0 = time.monotonic()
    cb.on_experiment_end([c])
    assert time.monotonic() - t0 < 10
    err = capfd.readouterr().err
    assert "could not be reached for 1 s: 2 logging call(s) of 1 trial run(s) not delivered" in err

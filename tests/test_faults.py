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
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import (MlflowServer, SweepProcess, history, mlflow_runs, ray_trials, rows_by_trial,
                           trial_result, write_space)


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

    from orchestration.trial import Trial
    from wsml.train import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # as in a Ray worker with one CPU (OMP_NUM_THREADS=1)
    try:
        result = run(Trial.parse(json.loads(config_json)).train_config(), log=None)
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
    with SweepProcess(tmp_path, ["--dataset", "digits", "--space", str(space), "--name", "kill",
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
    with SweepProcess(tmp_path, ["--dataset", "digits", "--space", str(space), "--name", "trunc",
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
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mlflow_server_down_mid_sweep_loses_nothing(tmp_path, ray_address):
    server = MlflowServer(tmp_path / "server.db", tmp_path / "artifacts", tmp_path / "server.log").start()
    password, token = "pw-S3CRET-4711", "tok-S3CRET-0815"
    uri = f"http://alice:{password}@127.0.0.1:{server.port}"
    plain_uri = server.url
    work = tmp_path / "cwd"
    work.mkdir()
    # grace = epochs: both trials run every epoch, so the outage falls inside them
    space = write_space(tmp_path / "space.yaml", num_samples=2, epochs=8, grace=8, schemes="[LL-R, LL-Ct]",
                        train_images=300)
    exp_dir = work / "ray_results" / "down"
    try:
        with SweepProcess(work, ["--dataset", "digits", "--space", str(space), "--name", "down", "--mlflow-uri", uri,
                          "--address", ray_address], MLFLOW_TRACKING_TOKEN=token) as sweep:
            sweep.wait_until("two trials at epoch 1", lambda: len(
                [r for r in rows_by_trial(exp_dir).values() if r[-1]["epoch"] >= 1]) == 2)
            server.stop()
            down_at = sum(len(r) for r in rows_by_trial(exp_dir).values())
            # the trials train on while the store is down (waited for, not timed: a loaded machine is slow)
            during = sweep.wait_until("two more epochs while the MLflow server is down", lambda: (
                lambda n: n if n >= down_at + 2 else 0)(sum(len(r) for r in rows_by_trial(exp_dir).values())),
                timeout=180)
            server.start()                                                  # same port, same store
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
        server.stop()


# --------------------------------------------------------- a diverging trial
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_diverging_trial_fails_alone_and_is_not_retried(tmp_path, ray_address):
    """The sweep's own trainable, callback, scheduler and failure settings, with one trial's lr
    pushed to 1e30 through its config (a space file cannot reach it: lr is at most 1)."""
    import ray
    from mlflow import MlflowClient
    from ray import tune

    from orchestration.cluster import connect as cluster
    from orchestration.tracking import store
    from orchestration.run import tuner
    from orchestration import common as T
    from orchestration.tracking.mlflow_callback import MLflowTrialLogger
    from orchestration.search.space import load_space
    from orchestration.run.trainable import train_trial

    space = load_space("digits", write_space(tmp_path / "space.yaml", num_samples=1, epochs=3, grace=3, schemes="[LL-R]",
                                             max_failures=2))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    experiment_id, parent = store.start_parent(c, "nan", "digits", {"command": "test"}, resume=False)
    logger = MLflowTrialLogger(uri, experiment_id, parent, "nan", "digits", T.ROLE_TRIAL, epochs=3)
    config = {"dataset": "digits", "epochs": 3, "seed": 0, "device": "cpu", "data_root": None,
              "train": {"num_workers": 0, "max_train_images": 200, "stop_drop": None}, "wsml_sweep": "nan",
              "scheme": "LL-R", "mode": "end-to-end", "delta_rel": 2.0,
              "lr": tune.grid_search([1e30, 1e-3, 2e-3])}
    assert cluster.connect(ray_address)
    try:
        results = tuner.build(space, name="nan", storage=str(tmp_path / "ray_results"), trainable=train_trial,
                              resources={"cpu": 1}, param_space=config, num_samples=1, search=False,
                              callbacks=[logger], verbose=0).fit()
        logger.finish(wait_s=5)
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

    runs = {float(r.data.params["lr"]): r for r in store.find_runs(c, experiment_id, **{T.TAG_ROLE: T.ROLE_TRIAL})}
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



def test_callback_buffers_while_the_store_is_down(tmp_path, capfd):
    from mlflow import MlflowClient

    from orchestration import common as T
    from orchestration.tracking import store
    from orchestration.tracking.mlflow_callback import MLflowTrialLogger

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    real = MlflowClient(uri)
    exp, parent = store.start_parent(real, "flaky", "digits", {"command": "x"}, resume=False)
    cb = MLflowTrialLogger(uri, exp, parent, "flaky", "digits", T.ROLE_TRIAL, epochs=3)
    cb.outbox.RETRY_FIRST_S = 0.0                           # retry at the next call
    cb.outbox.background = False                            # sent in this thread: each step checked at once
    flaky = cb._client = _FlakyClient(real)
    a, b = _Trial("a", 1), _Trial("b", 2)
    cb.log_trial_start(a)                                   # a's run exists before the outage
    cb.log_trial_result(0, a, trial_result(1, 10.0))

    flaky.down = True
    cb.log_trial_result(0, a, trial_result(2, 10.0))                   # queued
    cb.log_trial_start(b)                                   # b's run cannot even be created
    cb.log_trial_result(0, b, trial_result(1, 10.0))
    b.num_failures = 1
    cb.log_trial_start(b)                                   # Tune restarts it after a failure
    cb.log_trial_result(0, b, trial_result(1, 10.0))                   # a repeated epoch: queued once
    for _ in range(3):
        cb.outbox.flush()                                   # retries, still down
    assert len(store.find_runs(real, exp, **{T.TAG_ROLE: T.ROLE_TRIAL})) == 1
    err = capfd.readouterr().err
    assert err.count("cannot be reached") == 1 and "trials go on" in err   # said once per outage

    flaky.down, flaky.fail_in = False, 0
    cb.outbox.flush()                                       # the store answers: all delivered
    err = capfd.readouterr().err
    assert "answers again" in err
    runs = {r.data.tags[T.TAG_TRIAL_ID]: r for r in store.find_runs(real, exp, **{T.TAG_ROLE: T.ROLE_TRIAL})}
    assert set(runs) == {"a", "b"}
    assert [s for s, _ in history(uri, runs["a"].info.run_id)] == [1, 2]
    assert [s for s, _ in history(uri, runs["b"].info.run_id)] == [1]
    assert runs["b"].data.params["scheme"] == "LL-R" and runs["b"].data.tags["wsml.failures"] == "1"
    assert runs["b"].info.status == "RUNNING"

    # down again, failing half-way through the end of `a` (its metrics and tag got through)
    for e in (2, 3):
        b.last_result = trial_result(e, 10.0)
        cb.log_trial_result(0, b, b.last_result)
    a.last_result = trial_result(3, 10.0)
    cb.log_trial_result(0, a, a.last_result)
    flaky.down, flaky.fail_in = True, 2
    cb.log_trial_end(a)
    assert real.get_run(runs["a"].info.run_id).info.status == "RUNNING"
    flaky.down = False
    cb.outbox.flush()
    assert real.get_run(runs["a"].info.run_id).info.status == "FINISHED"
    flaky.refuse = "set_tag"                                # a refused call is dropped, not retried forever
    b.num_failures = 2
    cb.log_trial_start(b)
    cb.log_trial_end(b)
    assert cb.finish(wait_s=1) == 0
    err = capfd.readouterr().err
    assert "refused the tag call of trial b" in err
    runs = {r.data.tags[T.TAG_TRIAL_ID]: r for r in store.find_runs(real, exp, **{T.TAG_ROLE: T.ROLE_TRIAL})}
    for tid in ("a", "b"):
        r = runs[tid]
        assert (r.info.status, r.data.tags[T.TAG_STATUS_REASON]) == ("FINISHED", "completed"), tid
        assert [s for s, _ in history(uri, r.info.run_id)] == [1, 2, 3], tid      # each epoch exactly once
        assert len(real.get_metric_history(r.info.run_id, T.TEST_MAP)) == 1, tid  # final metrics once
    assert runs["b"].data.tags["wsml.failures"] == "1"     # the refused update was dropped

    # a store that never comes back: the end waits wait_s, says what was lost, does not raise
    c = _Trial("c", 3)
    cb.log_trial_start(c)
    flaky.down = True
    cb.log_trial_result(0, c, trial_result(1, 10.0))
    t0 = time.monotonic()
    assert cb.finish(wait_s=1) == 2                         # c's epoch and its end (KILLED: never ended)
    assert time.monotonic() - t0 < 10
    err = capfd.readouterr().err
    assert "could not be reached for 1 s: 2 logging call(s) of 1 trial run(s) not delivered" in err


def test_runs_a_killed_driver_could_not_end_are_completed_from_tunes_record(tmp_path):
    """A driver SIGKILLed after Tune recorded a trial's end but before its outbox sent it: the resumed
    driver never starts that trial again, so at the experiment's end its run gets the epochs it lacks
    (from result.json) and its end; a run that did end is left as it is."""
    import pyarrow.fs
    from mlflow import MlflowClient

    from orchestration import common as T
    from orchestration.tracking import store
    from orchestration.tracking.mlflow_callback import MLflowTrialLogger

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    real = MlflowClient(uri)
    exp, parent = store.start_parent(real, "killed", "digits", {"command": "x"}, resume=False)
    trials = {tid: _Trial(tid, i) for i, tid in enumerate("abc")}
    first = MLflowTrialLogger(uri, exp, parent, "killed", "digits", T.ROLE_TRIAL, epochs=3)
    first.outbox.background = False
    for tid, t in trials.items():
        t.path = str(tmp_path / tid)
        t.storage = type("Storage", (), {"storage_filesystem": pyarrow.fs.LocalFileSystem()})
        os.makedirs(t.path)
        rows = [{**trial_result(e), "timestamp": 1_700_000_000 + e} for e in (1, 2, 3)]
        Path(t.path, "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        first.log_trial_start(t)
        first.log_trial_result(0, t, rows[0])
        t.last_result = rows[-1]
    first.log_trial_result(0, trials["c"], trial_result(2))
    first.log_trial_result(0, trials["c"], trial_result(3))
    first.log_trial_end(trials["c"])            # c's end got through; a's and b's did not
    trials["a"].status, trials["b"].status, trials["c"].status = "TERMINATED", "ERROR", "TERMINATED"
    trials["b"].error_file = None

    resumed = MLflowTrialLogger(uri, exp, parent, "killed", "digits", T.ROLE_TRIAL, epochs=3)
    resumed.outbox.background = False
    resumed.on_experiment_end(list(trials.values()))
    assert resumed.finish(wait_s=1) == 0
    runs = {r.data.tags[T.TAG_TRIAL_ID]: r for r in store.find_runs(real, exp, **{T.TAG_ROLE: T.ROLE_TRIAL})}
    assert (runs["a"].info.status, runs["a"].data.tags[T.TAG_STATUS_REASON]) == ("FINISHED", "completed")
    assert runs["b"].info.status == "FAILED" and "RuntimeError: boom" in runs["b"].data.tags[T.TAG_STATUS_REASON]
    for tid in "abc":
        assert [s for s, _ in history(uri, runs[tid].info.run_id)] == [1, 2, 3], tid     # each epoch once
        assert len(real.get_metric_history(runs[tid].info.run_id, T.TEST_MAP)) == 1, tid
    assert runs["a"].data.metrics[T.TEST_MAP] == trial_result(3)["test_map_at_best"]


def test_outbox_order_retry_and_refusal_without_tune(capfd):
    """The outbox alone, with calls that fail like a store that is down, then refuse."""
    from orchestration.tracking.outbox import Outbox

    class Down(OSError):
        pass

    class Refused(ValueError):
        pass

    now = [0.0]
    box = Outbox("http://***@store", is_transient=lambda e: isinstance(e, Down), clock=lambda: now[0])
    sent, state = [], {"down": False}

    def call(name, refuse=False):
        def send():
            if state["down"]:
                raise Down("connection refused")
            if refuse:
                raise Refused(f"bad {name}")
            sent.append(name)
        return send

    box.put("a", call("a1"), "open", opens=True)
    state["down"] = True
    box.put("a", call("a2"), "epoch 1")
    box.put("b", call("b1"), "open", opens=True)
    box.put("b", call("b2"), "epoch 1")
    assert sent == ["a1"] and box.pending == 3 and box.down
    now[0] += 1.0                                           # before the first retry (2 s): nothing is tried
    state["down"] = False
    box.put("a", call("a3"), "epoch 2")
    assert sent == ["a1"] and box.pending == 4
    now[0] += 1.5
    box.flush()
    assert sent == ["a1", "a2", "a3", "b1", "b2"] and box.pending == 0 and not box.down
    err = capfd.readouterr().err
    assert err.count("cannot be reached") == 1 and "answers again after 2 s: 4 buffered" in err
    assert "http://***@store" in err

    box.put("c", call("c1", refuse=True), "open", opens=True)      # its run refused: the queue goes
    box.put("d", call("d1"), "open", opens=True)
    box.put("d", call("d2", refuse=True), "tag")                   # one call refused: dropped alone
    box.put("d", call("d3"), "end")
    assert sent[-2:] == ["d1", "d3"] and box.pending == 0
    err = capfd.readouterr().err
    assert "refused the run of trial c (bad c1)" in err and "refused the tag call of trial d (bad d2)" in err

    state["down"] = True
    box.put("e", call("e1"), "open", opens=True)
    slept = []
    lost = box.drain(5.0, sleep=lambda s: (slept.append(s), now.__setitem__(0, now[0] + s)))
    assert lost == 1 and sum(slept) == pytest.approx(5.0)
    assert "could not be reached for 5 s: 1 logging call(s) of 1 trial run(s) not delivered" in capfd.readouterr().err

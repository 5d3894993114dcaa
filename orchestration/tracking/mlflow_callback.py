"""Every trial of a sweep as a nested MLflow run of the sweep's run: a Tune callback in the driver.

Three hooks, as Ray's own `MLflowLoggerCallback`: a trial starts (its run is
found by its tags, or created with the trial's config as params; a run that a
stopped driver left KILLED is set RUNNING again), reports an epoch (the epoch's
metrics, once per epoch, with step = epoch), ends (final metrics, the end
reason as tag `wsml.end_reason`, status FINISHED or FAILED). After `Tuner.fit` the
driver calls `finish`: runs of trials that Tune stopped without ending them
(an interrupted sweep) end KILLED, to be continued by `--resume`, and the
outbox delivers what it holds. At the end of a resumed sweep, runs of trials
that ended under a driver killed before it could end them are completed from
Tune's record (`on_experiment_end`).

Exactly once: a trial that is retried, moved to another node or continued by
`--resume` (a new driver) keeps its run, found by (sweep, role, trial id);
epochs a run already holds are not logged again. Every call goes through the
trial's queue in `orchestration.tracking.outbox`, sent by the outbox's own thread, so a
store that cannot be reached, or one that hangs, never stops the sweep: the hooks
only queue. What the calls share with the hooks is split by thread: the runs
found and what they held (`_runs`, `_on_server`, `_nodes_before`) are the
outbox thread's, the rest the driver's.

Picklable (Tune saves callbacks with the experiment for `--resume`): only the
settings are kept; the client, queues and caches start empty in a new driver
and the runs are found again by tag.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, TypeGuard

from ray.tune.logger import LoggerCallback

from orchestration.tracking import store
from orchestration import trial as trial_config
from orchestration.common import (BEST_EPOCH, BEST_VAL_MAP, CLEAN_RATE, EPOCH_SECONDS, EPOCHS_RUN, GPU_HOURS,
                                  LINEAR_INIT_SATURATED_FRAC, MODIFIED_FRAC, MODIFIED_TRUE_POS_FRAC, TAG_DATA,
                                  TAG_DATASET, TAG_DEVICE, TAG_FAILURES, TAG_METHOD, TAG_MODE, TAG_NODE, TAG_NODES,
                                  TAG_PARENT, TAG_RESTORED_FROM, TAG_ROLE, TAG_SCHEME, TAG_SEED, TAG_SOURCE_TRIAL,
                                  TAG_STARTED_OVER, TAG_STATUS_REASON, TAG_SWEEP, TAG_TRIAL_ID, TEST_MAP,
                                  TEST_MAP_AT_BEST, TRAIN_HOURS, TRAIN_LOSS, VAL_MAP, first_line, result_rows,
                                  trial_outcome)

EPOCH_METRICS = (VAL_MAP, TRAIN_LOSS, MODIFIED_FRAC, MODIFIED_TRUE_POS_FRAC, CLEAN_RATE, EPOCH_SECONDS,
                 BEST_VAL_MAP, TEST_MAP_AT_BEST, "images_per_s", LINEAR_INIT_SATURATED_FRAC)


def _finite(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _error_text(trial) -> str:
    """The trial's error trace. Tune reads it from the storage copy of its error.txt, which a busy driver
    may not have synced yet when the callback runs; the local file is written before the callback."""
    text = trial.get_error()
    if not text and trial.error_file and os.path.isfile(trial.error_file):
        with open(trial.error_file, errors="replace") as f:
            text = f.read()
    return text or "error"


def _results(trial) -> list[dict]:
    """The trial's reports as Tune recorded them (result.json in its storage folder); its last one when
    that file cannot be read."""
    try:
        return result_rows(trial.storage.storage_filesystem, trial.path)
    except (OSError, AttributeError, RuntimeError):
        return [trial.last_result] if trial.last_result else []


class MLflowTrialLogger(store.Writer, LoggerCallback):
    _SETTINGS = ("uri", "experiment_id", "parent_run_id", "sweep", "dataset", "role", "epochs")

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, sweep: str, dataset: str,
                 role: str, epochs: int):
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.dataset = dataset
        self.role = role
        self.epochs = epochs
        self._reset()

    def _reset(self) -> None:
        super()._reset()
        self._runs: dict[str, str] = {}          # trial id -> run id (once its opening call was sent)
        self._trials: dict[str, Any] = {}        # trial id -> trial, once its run's opening call is queued
        self._ended: set[str] = set()
        self._logged: dict[str, set[int]] = {}   # trial id -> epochs queued by this driver
        self._on_server: dict[str, set[int]] = {}   # trial id -> epochs the run held when found
        # the trial's nodes: seen by this driver (its thread), and held by the run when found (the outbox's)
        self._nodes: dict[str, list[str]] = {}
        self._nodes_before: dict[str, list[str]] = {}
        self._last: dict[str, dict] = {}         # trial id -> its last result

    # -- the three hooks -------------------------------------------------
    def log_trial_start(self, trial) -> None:
        tid = trial.trial_id
        self._ended.discard(tid)
        self._open(trial)
        self._put(tid, "reopen", self._reopen, tid)
        if trial.num_failures:      # started again after a failure (FailureConfig)
            self._put(tid, "tag", self._tag, tid, TAG_FAILURES, str(trial.num_failures))

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        from mlflow.entities import Metric, RunTag

        if result.get("epoch") is None:
            return
        tid, epoch = trial.trial_id, int(result["epoch"])
        self._last[tid] = result
        self._open(trial)
        tags = []
        node = result.get("node_id")
        nodes = self._nodes.setdefault(tid, [])
        if node and (not nodes or nodes[-1] != node):
            if node not in nodes:
                nodes.append(node)
            tags += [RunTag(TAG_NODE, node), RunTag(TAG_NODES, ",".join(nodes)),
                     RunTag(TAG_DEVICE, str(result.get("device", "")))]
        restored = result.get("restored_from_epoch")
        if restored is not None and epoch == int(restored) + 1:
            tags.append(RunTag(TAG_RESTORED_FROM, str(int(restored))))
            if result.get("checkpoints_lost"):
                tags.append(RunTag(TAG_STARTED_OVER, "checkpoints gone"))
        metrics = []
        logged = self._logged.setdefault(tid, set())
        if epoch not in logged:
            logged.add(epoch)
            ts = int(time.time() * 1000)
            metrics = [Metric(k, float(result[k]), ts, epoch) for k in EPOCH_METRICS if _finite(result.get(k))]
        if metrics or tags:
            self._put(tid, f"epoch {epoch}", self._log_epoch, tid, epoch, metrics, tags)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        self._end(trial, *self._outcome(trial, failed), trial.last_result or {})

    def on_experiment_end(self, trials: list, **info) -> None:
        """Trials that ended under an earlier driver (restored TERMINATED or ERROR: Tune starts them no
        more) whose run that driver could not end, being killed before its outbox delivered: their runs
        get the epochs they lack from the trial's result.json, then their end."""
        for trial in trials:
            if trial.trial_id in self._trials or trial.status not in ("TERMINATED", "ERROR"):
                continue
            status, reason = self._outcome(trial, trial.status == "ERROR")
            self._ended.add(trial.trial_id)
            self._open(trial)
            self._put(trial.trial_id, "settle", self._settle, trial, status, reason[:5000])

    def _outcome(self, trial, failed: bool) -> tuple[str, str]:
        if failed:
            return "FAILED", "failed: " + first_line(_error_text(trial), last=True)
        outcome = trial_outcome(trial.last_result or {}, self.epochs, self.role)
        return outcome.status, outcome.reason

    # -- the driver's side ---------------------------------------------------
    def finish(self, wait_s: float = 120.0) -> int:
        """After `Tuner.fit`: the runs of trials that Tune stopped without ending them (an interrupted
        sweep) end KILLED, to be reopened by `--resume`; then everything queued is delivered, waiting
        up to `wait_s` for the store. Returns the calls not delivered."""
        for tid, trial in self._trials.items():
            if tid not in self._ended:
                self._end(trial, "KILLED", "interrupted", self._last.get(tid, {}))
        return self.outbox.drain(wait_s)

    # -- calls -----------------------------------------------------------
    def _put(self, tid: str, label: str, send, *args, opens: bool = False) -> None:
        self.outbox.put(tid, lambda: send(*args), label, opens=opens)

    def _open(self, trial) -> None:
        if trial.trial_id not in self._trials:
            self._trials[trial.trial_id] = trial
            self._put(trial.trial_id, "open", self._find_or_create, trial.trial_id, dict(trial.config or {}),
                      trial_config.run_name(trial), opens=True)

    def _find_or_create(self, tid: str, config: dict, name: str) -> None:
        from mlflow.entities import Param

        c = self.client
        trial_ = trial_config.Trial.parse(config)      # parsed once: its tags and its params
        found = store.find_runs(c, self.experiment_id, **{TAG_SWEEP: self.sweep, TAG_ROLE: self.role,
                                                          TAG_TRIAL_ID: tid})
        if found:
            run = found[0]
            rid = run.info.run_id
            self._on_server[tid] = {int(m.step) for m in c.get_metric_history(rid, VAL_MAP)}
            self._nodes_before[tid] = [n for n in run.data.tags.get(TAG_NODES, "").split(",") if n]
            has_params = bool(run.data.params)
        else:
            point = trial_.point
            tags = {TAG_PARENT: self.parent_run_id, TAG_ROLE: self.role, TAG_SWEEP: self.sweep,
                    TAG_DATASET: self.dataset, TAG_SCHEME: point.scheme, TAG_METHOD: point.method,
                    TAG_MODE: point.mode,
                    TAG_SEED: str(point.seed), TAG_TRIAL_ID: tid}
            if point.source_trial:
                tags[TAG_SOURCE_TRIAL] = point.source_trial
            if trial_.data_id:
                tags[TAG_DATA] = trial_.data_id
            rid = c.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id
            self._on_server[tid] = set()
            has_params = False
        if not has_params:      # a new run, or one whose creator died before its params
            c.log_batch(rid, params=[Param(k, v[:6000]) for k, v in trial_.params().items()])
        self._runs[tid] = rid

    def _reopen(self, tid: str) -> None:
        rid = self._runs[tid]
        if self.client.get_run(rid).info.status != "RUNNING":
            self.client.update_run(rid, status="RUNNING")
            self.client.set_tag(rid, TAG_STATUS_REASON, "running")

    def _tag(self, tid: str, key: str, value: str) -> None:
        self.client.set_tag(self._runs[tid], key, value)

    def _log_epoch(self, tid: str, epoch: int, metrics: list, tags: list) -> None:
        from mlflow.entities import RunTag

        if epoch in self._on_server.get(tid, ()):       # logged by an earlier driver
            metrics = []
        # every node of the trial, with those an earlier driver saw (known once its run was found)
        before = self._nodes_before.get(tid, [])
        nodes = before + [n for n in list(self._nodes.get(tid, [])) if n not in before]
        tags = [RunTag(TAG_NODES, ",".join(nodes)) if t.key == TAG_NODES else t for t in tags]
        if metrics or tags:
            self.client.log_batch(self._runs[tid], metrics=metrics, tags=tags)

    def _end(self, trial, status: str, reason: str, last: dict) -> None:
        tid = trial.trial_id
        if tid in self._ended:
            return
        self._ended.add(tid)
        self._open(trial)
        self._put(tid, "end", self._log_end, tid, status, reason[:5000], self._final_metrics(last))

    def _log_end(self, tid: str, status: str, reason: str, metrics: list) -> None:
        rid = self._runs[tid]
        if metrics:
            self.client.log_batch(rid, metrics=metrics)
        self.client.set_tag(rid, TAG_STATUS_REASON, reason)
        self.client.set_terminated(rid, status=status)

    def _settle(self, trial, status: str, reason: str) -> None:
        from mlflow.entities import Metric

        tid = trial.trial_id
        if self.client.get_run(self._runs[tid]).info.status in ("FINISHED", "FAILED"):
            return
        held = self._on_server.get(tid, set())
        rows = [r for r in _results(trial) if r.get("epoch") is not None and int(r["epoch"]) not in held]
        metrics = [Metric(k, float(r[k]), int(r.get("timestamp", time.time())) * 1000, int(r["epoch"]))
                   for r in rows for k in EPOCH_METRICS if _finite(r.get(k))]
        for i in range(0, len(metrics), 1000):      # MLflow's limit per batch
            self.client.log_batch(self._runs[tid], metrics=metrics[i:i + 1000])
        self._log_end(tid, status, reason, self._final_metrics(trial.last_result or {}))

    @staticmethod
    def _final_metrics(last: dict[str, Any]) -> list:
        from mlflow.entities import Metric

        if last.get("epoch") is None:
            return []
        now, epoch = int(time.time() * 1000), int(last.get("epoch", 0) or 0)
        values = {TEST_MAP: last.get(TEST_MAP_AT_BEST), BEST_VAL_MAP: last.get("best_val_map"),
                  BEST_EPOCH: last.get("best_epoch"), EPOCHS_RUN: epoch,
                  TRAIN_HOURS: (last.get("train_seconds") or 0.0) / 3600.0,
                  GPU_HOURS: (last.get("gpu_seconds") or 0.0) / 3600.0}
        return [Metric(k, float(v), now, epoch) for k, v in values.items() if _finite(v)]

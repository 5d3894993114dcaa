"""MLflow logging of a sweep, done from the Tune driver.

One parent run per sweep (role=sweep) and one nested child run per trial
(role=trial) or final rerun (role=final), written by `MLflowTrialLogger`, a
`tune.Callback` that runs in the driver:

* exactly once: a trial's run is found by its tags (sweep, role, trial id)
  before one is created, so a trial that is retried, moved to another node or
  continued by `--resume` (a new driver process) keeps its run; per-epoch
  metrics are logged once per epoch (step = epoch) even when a trial repeats
  epochs after restoring an older checkpoint;
* never left RUNNING by a live driver: a run ends FINISHED when its trial ends
  (completed, stopped by ASHA, or stopped by the trainer's stop rule; tag
  `wsml.end_reason` says which), FAILED when the trial errors for good, and
  KILLED when the sweep is interrupted (Ctrl-C). `--resume` sets KILLED runs
  back to RUNNING and continues them. Only a driver killed outright (SIGKILL,
  a lost machine) leaves RUNNING runs, until `--resume` picks them up.
  ASHA-stopped trials are FINISHED, not KILLED: the trial ran as intended and
  its metrics are valid, just shorter.

Tag and metric names come from `orchestration.tracking`.
"""
from __future__ import annotations

import math
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ray import tune

from orchestration import tracking as T

# Tags of ours that the aggregation does not read (diagnostics).
TAG_NODE = "wsml.node_id"                 # node of the trial's latest attempt
TAG_NODES = "wsml.nodes"                  # every node the trial ran on, comma-separated
TAG_DEVICE = "wsml.device"
TAG_RESTORED_FROM = "wsml.restored_from_epoch"   # latest attempt resumed after this epoch
TAG_FAILURES = "wsml.failures"            # attempts that failed and were retried
TAG_SOURCE_TRIAL = "wsml.source_trial"    # final runs: the sweep trial whose config they rerun
TAG_RUN_KIND = "wsml.kind"

EPOCH_METRICS = (T.VAL_MAP, T.TRAIN_LOSS, T.MODIFIED_FRAC, T.MODIFIED_TRUE_POS_FRAC, T.CLEAN_RATE,
                 T.EPOCH_SECONDS, "best_val_map", "test_map_at_best", "images_per_s")
# TrainConfig fields not logged as params (machine-specific paths).
_RUN_PARAM_SKIP = {"data_root", "cache_dir"}


# (sweep, role) -> True when the driver's Tuner ended with unfinished trials
# (Ctrl-C / SIGINT): set by `on_experiment_end`, read by the driver.
EXPERIMENT_INTERRUPTED: dict[tuple[str, str], bool] = {}


class TrackingError(RuntimeError):
    """The MLflow store cannot be used (one-line message)."""


# ------------------------------------------------------------------ the store
def default_tracking_uri() -> str:
    """MLflow's own default (MLFLOW_TRACKING_URI, else sqlite mlflow.db in the working directory)."""
    import mlflow

    return absolute_uri(mlflow.get_tracking_uri())


def absolute_uri(uri: str) -> str:
    """Make a local store's path absolute, so the printed `mlflow ui` command works from anywhere."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "" and uri:
        return str(Path(uri).resolve())
    return uri


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (TrackingError) when the store cannot be reached, before anything is created."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - a URI the user gave
                if resp.status >= 400:
                    raise TrackingError(f"MLflow server {uri} answered {resp.status} on /health: check --mlflow-uri")
        except urllib.error.HTTPError as err:
            raise TrackingError(f"MLflow server {uri} answered HTTP {err.code} on /health: check --mlflow-uri") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(f"MLflow server {uri} is unreachable ({reason}): start it or pass another "
                                "--mlflow-uri") from None
        return
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else parsed.path
        _check_writable_file(Path(path), uri)
        return
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else uri)
        _check_writable_dir(path, uri)
        return
    # databricks, postgresql, mysql, ...: MLflow reports problems itself


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_file(path: Path, uri: str) -> None:
    if path.exists():
        if not path.is_file() or not os.access(path, os.W_OK):
            raise TrackingError(f"MLflow store {uri} is not a writable file: pass another --mlflow-uri")
        return
    base = _nearest_existing(path.parent)
    if base != path.parent or not base.is_dir() or not os.access(base, os.W_OK):
        raise TrackingError(f"MLflow store {uri}: folder {path.parent} does not exist or is not writable: "
                            "create it or pass another --mlflow-uri")


def _check_writable_dir(path: Path, uri: str) -> None:
    base = _nearest_existing(path)
    if not base.is_dir() or not os.access(base, os.W_OK):
        raise TrackingError(f"MLflow store {uri} is not a writable folder: pass another --mlflow-uri")


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


# ------------------------------------------------------- experiment / parent
def find_experiment_id(c, name: str) -> str | None:
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return None
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow experiment {name!r} exists in the deleted state: restore or purge it "
                            "(mlflow gc), or choose another --name")
    return exp.experiment_id


def find_runs(c, experiment_id: str, **tags: str) -> list:
    filt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return list(c.search_runs([experiment_id], filter_string=filt, max_results=1000))


def find_parent(c, experiment_id: str, sweep: str):
    runs = find_runs(c, experiment_id, **{T.TAG_ROLE: T.ROLE_SWEEP, T.TAG_SWEEP: sweep})
    return runs[0] if runs else None


def start_parent(c, sweep: str, dataset: str, params: dict[str, str], resume: bool) -> tuple[str, str]:
    """Create (or, on resume, reopen) the sweep's experiment and parent run; returns (experiment_id, run_id)."""
    experiment_id = find_experiment_id(c, sweep)
    if experiment_id is None:
        experiment_id = c.create_experiment(sweep, tags={T.TAG_DATASET: dataset, T.TAG_SWEEP: sweep})
    parent = find_parent(c, experiment_id, sweep)
    if parent is not None:
        if not resume:
            raise TrackingError(f"MLflow experiment {sweep!r} already holds this sweep's run: pass --resume to "
                                "continue it or choose another --name")
        c.update_run(parent.info.run_id, status="RUNNING")
        n = int(parent.data.tags.get("wsml.resumed", "0")) + 1
        c.set_tag(parent.info.run_id, "wsml.resumed", str(n))
        return experiment_id, parent.info.run_id
    run = c.create_run(experiment_id, run_name=f"sweep {sweep}",
                       tags={T.TAG_ROLE: T.ROLE_SWEEP, T.TAG_DATASET: dataset, T.TAG_SWEEP: sweep})
    from mlflow.entities import Param

    c.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return experiment_id, run.info.run_id


def end_parent(c, run_id: str, status: str) -> None:
    c.set_terminated(run_id, status=status)


# -------------------------------------------------------------- trial runs
def run_name(config: dict[str, Any], index: str) -> str:
    point = {**config, **(config.get("point") or {})}
    scheme = point.get("scheme", "?")
    parts = [scheme]
    if point.get("mode", "end-to-end") != "end-to-end":
        parts.append("LI")
    if point.get("delta_rel") is not None and scheme.startswith("LL-"):
        parts.append(f"d={point['delta_rel']:.3g}")
    if point.get("lr") is not None:
        parts.append(f"lr={point['lr']:.2g}")
    if "point" in config:
        parts.append(f"seed={point.get('seed', 0)}")
    parts.append(f"#{'f' if 'point' in config else 't'}{index}")
    return " ".join(parts)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class MLflowTrialLogger(tune.Callback):
    """Logs every trial of a Tuner as a nested MLflow run of the sweep's parent run.

    Picklable (Tune saves it with the experiment): the MLflow client is made
    lazily and dropped when pickled; runs are found again by tag.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str, dataset: str,
                 role: str, epochs: int):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.dataset = dataset
        self.role = role
        self.epochs = epochs
        self._client = None
        self._runs: dict[str, str] = {}          # trial id -> run id
        self._logged: dict[str, set[int]] = {}   # trial id -> epochs logged
        self._nodes: dict[str, list[str]] = {}
        self._ended: set[str] = set()
        self._live: set[str] = set()             # trials whose run this driver (re)opened and not yet ended
        self._done_before: set[str] | None = None   # trials already finished when this driver started

    def __getstate__(self) -> dict:
        # A driver that unpickles this (--resume) starts with empty caches and
        # finds its runs, logged epochs and nodes again in MLflow.
        state = self.__dict__.copy()
        state.update(_client=None, _runs={}, _logged={}, _nodes={}, _ended=set(), _live=set(),
                     _done_before=None)
        return state

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.tracking_uri)
        return self._client

    # -- helpers --------------------------------------------------------
    def _train_params(self, config: dict[str, Any]) -> dict[str, str]:
        from orchestration.trainable import train_config
        from wsml.config import LL_SCHEMES

        try:
            cfg = train_config(config).to_dict()
        except Exception:  # noqa: BLE001 - log what we have; the trial will report the error
            cfg = {k: v for k, v in config.items() if not isinstance(v, dict)}
        if cfg.get("scheme") not in LL_SCHEMES:
            cfg.pop("delta_rel", None)
        out = {k: str(v) for k, v in cfg.items() if k not in _RUN_PARAM_SKIP}
        if config.get("point", {}).get("wsml_source_trial"):
            out["source_trial"] = config["point"]["wsml_source_trial"]
        return out

    def run_id(self, trial) -> str:
        """The trial's run: cached, else found by tag, else created."""
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        c = self.client
        found = find_runs(c, self.experiment_id, **{T.TAG_SWEEP: self.sweep, T.TAG_ROLE: self.role,
                                                    T.TAG_TRIAL_ID: tid})
        if found:
            run = found[0]
            rid = run.info.run_id
            self._logged[tid] = {int(m.step) for m in c.get_metric_history(rid, T.VAL_MAP)}
            nodes = run.data.tags.get(TAG_NODES, "")
            self._nodes[tid] = [n for n in nodes.split(",") if n]
        else:
            from mlflow.entities import Param

            config = trial.config
            point = {**config, **(config.get("point") or {})}
            index = trial.experiment_tag.split("_", 1)[0] if trial.experiment_tag else tid
            tags = {T.TAG_PARENT: self.parent_run_id, T.TAG_ROLE: self.role, T.TAG_SWEEP: self.sweep,
                    T.TAG_DATASET: self.dataset, T.TAG_SCHEME: str(point.get("scheme")),
                    T.TAG_MODE: str(point.get("mode", "end-to-end")), T.TAG_SEED: str(point.get("seed", 0)),
                    T.TAG_TRIAL_ID: tid}
            if point.get("wsml_source_trial"):
                tags[TAG_SOURCE_TRIAL] = point["wsml_source_trial"]
            run = c.create_run(self.experiment_id, tags=tags, run_name=run_name(config, index))
            rid = run.info.run_id
            c.log_batch(rid, params=[Param(k, v[:6000]) for k, v in self._train_params(config).items()])
            self._logged[tid] = set()
            self._nodes[tid] = []
        self._runs[tid] = rid
        return rid

    def _reopen(self, trial) -> str:
        rid = self.run_id(trial)
        self._ended.discard(trial.trial_id)
        self._live.add(trial.trial_id)
        run = self.client.get_run(rid)
        if run.info.status != "RUNNING":
            self.client.update_run(rid, status="RUNNING")
            self.client.set_tag(rid, T.TAG_STATUS_REASON, "running")
        return rid

    def _final_metrics(self, rid: str, last: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        epoch = int(last.get("epoch", 0) or 0)
        values = {
            T.TEST_MAP: last.get("test_map_at_best"),
            T.BEST_VAL_MAP: last.get("best_val_map"),
            T.BEST_EPOCH: last.get("best_epoch"),
            T.EPOCHS_RUN: epoch,
            T.TRAIN_HOURS: (last.get("train_seconds") or 0.0) / 3600.0,
            T.GPU_HOURS: (last.get("gpu_seconds") or 0.0) / 3600.0,
        }
        metrics = [Metric(k, float(v), now, epoch) for k, v in values.items() if _finite(v)]
        if metrics:
            self.client.log_batch(rid, metrics=metrics)

    def _end(self, trial, status: str, reason: str) -> None:
        tid = trial.trial_id
        if tid in self._ended:
            return
        rid = self.run_id(trial)
        last = trial.last_result or {}
        if last.get("epoch") is not None:
            self._final_metrics(rid, last)
        self.client.set_tag(rid, T.TAG_STATUS_REASON, reason[:5000])
        self.client.set_terminated(rid, status=status)
        self._ended.add(tid)
        self._live.discard(tid)

    # -- Tune hooks -----------------------------------------------------
    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._done_before is None:
            self._done_before = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._reopen(trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        from mlflow.entities import Metric, RunTag

        rid = self.run_id(trial)
        tid = trial.trial_id
        epoch = result.get("epoch")
        if epoch is None:
            return
        epoch = int(epoch)
        tags = []
        node = result.get("node_id")
        if node:
            nodes = self._nodes.setdefault(tid, [])
            if not nodes or nodes[-1] != node:
                if node not in nodes:
                    nodes.append(node)
                tags += [RunTag(TAG_NODE, node), RunTag(TAG_NODES, ",".join(nodes)),
                         RunTag(TAG_DEVICE, str(result.get("device", "")))]
        restored = result.get("restored_from_epoch")
        if restored is not None and epoch == int(restored) + 1:
            tags.append(RunTag(TAG_RESTORED_FROM, str(int(restored))))
        logged = self._logged.setdefault(tid, set())
        metrics = []
        if epoch not in logged:
            ts = int(time.time() * 1000)
            metrics = [Metric(k, float(result[k]), ts, epoch) for k in EPOCH_METRICS if _finite(result.get(k))]
            logged.add(epoch)
        if metrics or tags:
            self.client.log_batch(rid, metrics=metrics, tags=tags)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        rid = self.run_id(trial)
        self.client.set_tag(rid, TAG_FAILURES, str(trial.num_failures))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        if last.get("wsml_error"):
            self._end(trial, "FAILED", f"failed: {last['wsml_error']}")
            return
        epoch = int(last.get("epoch", 0) or 0)
        if epoch >= self.epochs:
            reason = "completed"
        elif last.get("trainer_stop"):
            reason = "stop_drop"
        elif self.role == T.ROLE_TRIAL:
            reason = "asha_stopped"
        else:
            reason = "stopped"
        self._end(trial, "FINISHED", reason)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        why = "error"
        try:
            text = trial.get_error() or ""
            lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
            # the last line of a traceback names the exception
            why = lines[-1] if lines else why
        except Exception:  # noqa: BLE001
            pass
        self._end(trial, "FAILED", f"failed: {why}")

    def on_experiment_end(self, trials: list, **info) -> None:
        # Trials not ended here were interrupted (Ctrl-C, a stopped sweep):
        # KILLED, to be reopened by --resume.
        # (Tune has already set every trial TERMINATED here, so look at what ended normally.)
        # No step at all: a restored experiment that was already complete.
        done = self._ended | (self._done_before or set())
        EXPERIMENT_INTERRUPTED[(self.sweep, self.role)] = (
            self._done_before is not None and any(t.trial_id not in done for t in trials))
        for trial in trials:
            if trial.trial_id in self._live:
                self._end(trial, "KILLED", "interrupted")

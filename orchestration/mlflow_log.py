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
  its metrics are valid, just shorter;
* never stopped by the store: every MLflow call of a trial goes through that
  trial's queue. When the store cannot be reached (a tracking server
  restarting, a network blip) the calls stay queued, the trials train on, and
  the queue is sent again every few seconds, in order and each call once,
  until the store answers; at the end of the sweep the driver waits up to
  `flush_wait_s` for it and otherwise says how much was not delivered. The
  MLflow client's own HTTP retries are made short (`client`) so a dead server
  blocks the driver for seconds, not minutes.

Nothing secret is logged: URIs and command lines pass through `redact` before
they become params, tags, messages or printed lines.

Tag and metric names come from `orchestration.tracking`.
"""
from __future__ import annotations

import math
import os
import re
import socket
import sys
import time
from collections import deque
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
    shown = redact(uri)
    if parsed.scheme in ("http", "https"):
        # user:password@ in the URI: sent as basic auth (urllib does not take it from the URL)
        netloc = parsed.netloc.rpartition("@")[2]
        url = urllib.parse.urlunparse(parsed._replace(netloc=netloc)).rstrip("/") + "/health"
        request = urllib.request.Request(url)
        if parsed.username is not None:
            import base64

            pair = f"{urllib.parse.unquote(parsed.username)}:{urllib.parse.unquote(parsed.password or '')}"
            request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - a URI the user gave
                if resp.status >= 400:
                    raise TrackingError(f"MLflow server {shown} answered {resp.status} on /health: check --mlflow-uri")
        except urllib.error.HTTPError as err:
            raise TrackingError(f"MLflow server {shown} answered HTTP {err.code} on /health: check --mlflow-uri") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(f"MLflow server {shown} is unreachable ({reason}): start it or pass another "
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


# The MLflow client retries a failed HTTP call for minutes by default (7 retries,
# exponential backoff, 120 s timeout). The callback below retries on its own
# without blocking the sweep, so the driver's client gives up after seconds.
# Set these variables yourself to override.
HTTP_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def client(uri: str):
    from mlflow import MlflowClient

    for key, value in HTTP_FAIL_FAST.items():
        os.environ.setdefault(key, value)
    if redact(uri) != uri:
        # MLflow prints "View run ... at: <tracking URI>/#/..." when a run ends: not with credentials in it
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=uri)


_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&;](?:[a-z0-9_.-]*(?:token|secret|password|passwd|pwd|key|signature|"
                           r"credential|auth)[a-z0-9_.-]*))=[^&;\s]*", re.IGNORECASE)
_SECRET_OPTION = re.compile(r"(?P<key>--?[a-z0-9_-]*(?:token|secret|password|passwd|credential)[a-z0-9_-]*)"
                            r"(?P<sep>[= ])\S+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with credentials masked: `user:password@` in URIs, secret-looking query
    parameters (`?token=...`) and options (`--password ...`)."""
    text = _USERINFO.sub(lambda m: m.group("scheme") + "***@", text)
    text = _SECRET_QUERY.sub(lambda m: m.group("key") + "=***", text)
    return _SECRET_OPTION.sub(lambda m: m.group("key") + m.group("sep") + "***", text)


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {redact(uri)} in a browser"
    return f"mlflow ui --backend-store-uri {redact(uri)}"


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

    c.log_batch(run.info.run_id, params=[Param(k, redact(str(v))[:6000]) for k, v in params.items()])
    return experiment_id, run.info.run_id


def end_parent(c, run_id: str, status: str, wait_s: float = 120.0) -> None:
    """End the sweep's run; while the store cannot be reached, try again for up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    delay = 1.0
    while True:
        try:
            c.set_terminated(run_id, status=status)
            return
        except Exception as err:  # noqa: BLE001 - see is_transient
            if not is_transient(err) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


def is_transient(err: BaseException) -> bool:
    """Whether a failed MLflow call may succeed later: the store unreachable, timing out, failing
    on its side (HTTP 5xx, 429) or locked; not a refusal of the call itself (HTTP 4xx)."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        try:
            code = int(err.get_http_status_code())
        except (TypeError, ValueError):
            code = 500
        return code >= 500 or code == 429
    if isinstance(err, OSError):        # connection refused / reset, timeouts (requests' errors are OSErrors)
        return True
    return type(err).__name__ == "OperationalError"     # SQLAlchemy: database locked or gone


def _first_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return redact(lines[0] if lines else type(err).__name__)


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

    Every MLflow call of a trial is queued, then delivered in order; a call
    that fails because the store cannot be reached stays first in its queue
    and is tried again after `RETRY_FIRST_S`, backing off to `RETRY_MAX_S`
    (each retry is one attempt for all queues; Tune's loop is never held up
    for longer than the client's own short retries). A call the store refuses
    (HTTP 4xx) is dropped with a warning. Every call is idempotent (runs are
    found by tag before one is created, metrics carry their timestamp, tags
    and status are set, not added), so one that failed half-way is simply
    sent again.

    Picklable (Tune saves it with the experiment): the client, the caches and
    the queues are dropped when pickled; runs are found again by tag.
    """

    RETRY_FIRST_S = 2.0
    RETRY_MAX_S = 30.0
    _SETTINGS = ("tracking_uri", "experiment_id", "parent_run_id", "sweep", "dataset", "role", "epochs",
                 "flush_wait_s")

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str, dataset: str,
                 role: str, epochs: int, flush_wait_s: float = 120.0):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.dataset = dataset
        self.role = role
        self.epochs = epochs
        self.flush_wait_s = flush_wait_s    # how long the end of the sweep waits for an unreachable store
        self._reset()

    def _reset(self) -> None:
        self._client = None
        self._runs: dict[str, str] = {}          # trial id -> run id
        self._logged: dict[str, set[int]] = {}   # trial id -> epochs logged or queued
        self._on_server: dict[str, set[int]] = {}   # trial id -> epochs the run held when this driver found it
        self._nodes: dict[str, list[str]] = {}
        self._ended: set[str] = set()
        self._live: set[str] = set()             # trials whose run this driver (re)opened and not yet ended
        self._done_before: set[str] | None = None   # trials already finished when this driver started
        self._trials: dict[str, Any] = {}        # trial id -> trial (its run is created from it)
        self._queue: dict[str, deque] = {}       # trial id -> MLflow calls not delivered yet, in order
        self._retry_at = 0.0                     # monotonic time of the next attempt while the store is down
        self._backoff = 0.0
        self._down_since: float | None = None
        self._delivered_late = 0

    def __getstate__(self) -> dict:
        # A driver that unpickles this (--resume) starts with empty caches and
        # finds its runs, logged epochs and nodes again in MLflow.
        return {k: self.__dict__[k] for k in self._SETTINGS if k in self.__dict__}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({k: v for k, v in state.items() if k in self._SETTINGS})
        self.__dict__.setdefault("flush_wait_s", 120.0)
        self._reset()

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
        out = {k: redact(str(v)) for k, v in cfg.items() if k not in _RUN_PARAM_SKIP}
        if config.get("point", {}).get("wsml_source_trial"):
            out["source_trial"] = config["point"]["wsml_source_trial"]
        return out

    def _open_run(self, tid: str) -> str:
        """The trial's run, found by its tags or else created (with its params queued first)."""
        c = self.client
        found = find_runs(c, self.experiment_id, **{T.TAG_SWEEP: self.sweep, T.TAG_ROLE: self.role,
                                                    T.TAG_TRIAL_ID: tid})
        queue = self._queue.setdefault(tid, deque())
        trial = self._trials[tid]
        if found:
            run = found[0]
            rid = run.info.run_id
            steps = {int(m.step) for m in c.get_metric_history(rid, T.VAL_MAP)}
            self._on_server[tid] = steps
            self._logged[tid] = self._logged.get(tid, set()) | steps
            known = [n for n in run.data.tags.get(TAG_NODES, "").split(",") if n]
            local = self._nodes.get(tid, [])
            self._nodes[tid] = known + [n for n in local if n not in known]
            if local and self._nodes[tid] != local:      # nodes seen before the run was found
                queue.append(("tag", TAG_NODES, ",".join(self._nodes[tid])))
            if not run.data.params:                      # created by a driver that died before its params
                queue.appendleft(("params", self._train_params(trial.config)))
        else:
            config = trial.config
            point = {**config, **(config.get("point") or {})}
            index = trial.experiment_tag.split("_", 1)[0] if trial.experiment_tag else tid
            tags = {T.TAG_PARENT: self.parent_run_id, T.TAG_ROLE: self.role, T.TAG_SWEEP: self.sweep,
                    T.TAG_DATASET: self.dataset, T.TAG_SCHEME: str(point.get("scheme")),
                    T.TAG_MODE: str(point.get("mode", "end-to-end")), T.TAG_SEED: str(point.get("seed", 0)),
                    T.TAG_TRIAL_ID: tid}
            if point.get("wsml_source_trial"):
                tags[TAG_SOURCE_TRIAL] = point["wsml_source_trial"]
            rid = c.create_run(self.experiment_id, tags=tags, run_name=run_name(config, index)).info.run_id
            self._on_server[tid] = set()
            queue.appendleft(("params", self._train_params(config)))
        self._runs[tid] = rid
        return rid

    def _call(self, tid: str, rid: str, call: tuple) -> None:
        """Send one queued call (each kind may be sent again after failing half-way)."""
        from mlflow.entities import Param

        c = self.client
        kind, *args = call
        if kind == "params":
            c.log_batch(rid, params=[Param(k, v[:6000]) for k, v in args[0].items()])
        elif kind == "reopen":
            if c.get_run(rid).info.status != "RUNNING":
                c.update_run(rid, status="RUNNING")
                c.set_tag(rid, T.TAG_STATUS_REASON, "running")
        elif kind == "epoch":
            epoch, metrics, tags = args
            if epoch in self._on_server.get(tid, ()):    # logged by an earlier driver
                metrics = []
            if metrics or tags:
                c.log_batch(rid, metrics=metrics, tags=tags)
        elif kind == "tag":
            c.set_tag(rid, args[0], args[1])
        elif kind == "end":
            status, reason, metrics = args
            if metrics:
                c.log_batch(rid, metrics=metrics)
            c.set_tag(rid, T.TAG_STATUS_REASON, reason[:5000])
            c.set_terminated(rid, status=status)
        else:
            raise ValueError(f"unknown MLflow call {kind!r}")

    def _enqueue(self, trial, call: tuple) -> None:
        self._trials[trial.trial_id] = trial
        self._queue.setdefault(trial.trial_id, deque()).append(call)
        self._deliver()

    def _deliver(self, force: bool = False) -> None:
        """Send the queued calls of every trial, in order; stop at the first sign that the store is down."""
        if not self._queue or (not force and time.monotonic() < self._retry_at):
            return
        for tid in list(self._queue):
            queue = self._queue[tid]
            try:
                rid = self._runs.get(tid) or self._open_run(tid)
            except Exception as err:  # noqa: BLE001 - see is_transient
                if is_transient(err):
                    self._store_down(err)
                    return
                _warn(f"MLflow refused the run of trial {tid} ({_first_line(err)}): {len(queue)} logging "
                      "call(s) dropped")
                del self._queue[tid]
                continue
            while queue:
                try:
                    self._call(tid, rid, queue[0])
                except Exception as err:  # noqa: BLE001 - see is_transient
                    if is_transient(err):
                        self._store_down(err)
                        return
                    _warn(f"MLflow refused a {queue[0][0]} call of trial {tid} ({_first_line(err)}): dropped")
                queue.popleft()
                if self._down_since is not None:
                    self._delivered_late += 1
            del self._queue[tid]
        self._store_up()

    def _store_down(self, err: BaseException) -> None:
        now = time.monotonic()
        self._backoff = min(max(2 * self._backoff, self.RETRY_FIRST_S), self.RETRY_MAX_S)
        self._retry_at = now + self._backoff
        if self._down_since is None:
            self._down_since = now
            self._delivered_late = 0
            _warn(f"MLflow {redact(self.tracking_uri)} cannot be reached ({_first_line(err)}): trials go on; "
                  "their logging is kept and sent when it answers again")

    def _store_up(self) -> None:
        if self._down_since is not None:
            _warn(f"MLflow {redact(self.tracking_uri)} answers again after {time.monotonic() - self._down_since:.0f} s: "
                  f"{self._delivered_late} buffered logging call(s) delivered", kind="note")
        self._down_since, self._backoff, self._retry_at = None, 0.0, 0.0

    def _drain(self) -> None:
        """Deliver everything still queued, waiting up to `flush_wait_s` for the store."""
        deadline = time.monotonic() + self.flush_wait_s
        self._deliver(force=True)
        while self._queue and time.monotonic() < deadline:
            time.sleep(max(0.0, min(self._retry_at, deadline) - time.monotonic()))
            self._deliver(force=True)
        if self._queue:
            calls = sum(len(q) for q in self._queue.values())
            _warn(f"MLflow {redact(self.tracking_uri)} could not be reached for {self.flush_wait_s:.0f} s: {calls} "
                  f"logging call(s) of {len(self._queue)} trial run(s) not delivered; those runs lack them and may "
                  "show RUNNING (Ray's results in the sweep folder are complete)")
            self._queue.clear()

    def _final_metrics(self, last: dict[str, Any]) -> list:
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
        return [Metric(k, float(v), now, epoch) for k, v in values.items() if _finite(v)]

    def _end(self, trial, status: str, reason: str) -> None:
        tid = trial.trial_id
        if tid in self._ended:
            return
        last = trial.last_result or {}
        metrics = self._final_metrics(last) if last.get("epoch") is not None else []
        self._ended.add(tid)
        self._live.discard(tid)
        self._enqueue(trial, ("end", status, reason, metrics))

    # -- Tune hooks -----------------------------------------------------
    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._done_before is None:
            self._done_before = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        self._deliver()         # retries while the store is down

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended.discard(trial.trial_id)
        self._live.add(trial.trial_id)
        self._enqueue(trial, ("reopen",))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        from mlflow.entities import Metric, RunTag

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
            self._enqueue(trial, ("epoch", epoch, metrics, tags))

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._enqueue(trial, ("tag", TAG_FAILURES, str(trial.num_failures)))

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
        self._end(trial, "FAILED", f"failed: {redact(why)}")

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
        self._drain()


def _warn(message: str, kind: str = "warning") -> None:
    print(f"{kind}: {message}", file=sys.stderr, flush=True)

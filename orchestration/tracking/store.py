"""The MLflow store: where it is, whether it can be used, and the sweep's own run in it.

* `resolve_uri` / `check_uri`: the tracking URI made absolute and checked
  before anything is created (a server's /health answers within seconds; a
  local file or folder is writable).
* `client`: an `MlflowClient` whose HTTP retries are short, so that a dead
  server costs seconds, not minutes, and whose failed SQLite writes are not
  logged with their traceback (every command that reads or writes the store
  goes through it).
* `find_experiment_id`, `find_runs`, `start_parent`, `end_parent`: the sweep's
  experiment and parent run, found by their tags (never duplicated).
* `is_transient`: whether a failed call may succeed later (the store down, not
  a refusal), which `orchestration.tracking.outbox` retries.
* `Writer`: the base of the driver's writers (trial runs, reuse tags): an
  outbox and a client made on first use, pickled as its settings only.

Messages name the store through `redact`: no credentials are printed.
"""
from __future__ import annotations

import base64
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wsml.files import writable_folder

from orchestration.common import (KIND_MODEL_TRAINING, ROLE_SWEEP, TAG_DATASET, TAG_EXPERIMENT_KIND, TAG_RESUMED,
                                  TAG_ROLE, TAG_SWEEP, TrackingError, first_line, redact, split_userinfo)

# The MLflow client retries a failed HTTP call for minutes by default (7 retries,
# exponential backoff, 120 s timeout). The sweep's outbox retries on its own
# without blocking the sweep, and a table command should fail fast, so every
# client here gives up after seconds. Set these variables yourself to override.
HTTP_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


# ------------------------------------------------------------------ where
def default_uri() -> str:
    """MLflow's own default (MLFLOW_TRACKING_URI, else sqlite mlflow.db in the working directory)."""
    import mlflow

    return resolve_uri(mlflow.get_tracking_uri())


def resolve_uri(uri: str) -> str:
    """Make a local store's path absolute, so the printed `mlflow ui` command works from anywhere."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if urllib.parse.urlparse(uri).scheme == "" and uri:
        return str(Path(uri).resolve())
    return uri


def local_path(uri: str) -> Path | None:
    """The file (sqlite) or folder (file store) of a local store; None for a server or database."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else parsed.path
        path = urllib.parse.unquote(path.split("?", 1)[0])
        return Path(path) if path not in ("", ":memory:") else None
    if parsed.scheme in ("", "file"):
        return Path(urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else uri)
    return None


def at_path(uri: str, path: Path) -> str:
    """The URI of a local store (`local_path`) moved to `path`: same kind, same query."""
    scheme = urllib.parse.urlparse(uri).scheme
    query = "?" + uri.split("?", 1)[1] if scheme == "sqlite" and "?" in uri else ""
    if scheme == "sqlite":
        return f"sqlite:///{path}{query}"
    return path.as_uri() if scheme == "file" else str(path)


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {redact(uri)} in a browser"
    return f"mlflow ui --backend-store-uri {redact(uri)}"


# ----------------------------------------------------------------- checks
def check_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (TrackingError) when the store cannot be used, before anything is created."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        _check_server(uri, parsed, timeout)
    elif parsed.scheme == "sqlite":
        path = local_path(uri)
        if path is None:
            raise TrackingError(f"MLflow store {redact(uri)} names no file: pass --mlflow-uri sqlite:///PATH")
        _check_writable_file(path, uri)
    elif parsed.scheme in ("", "file"):
        folder = local_path(uri)
        assert folder is not None       # a file store always names its folder
        _check_file_store_allowed(folder, uri)
        _check_writable_dir(folder, uri)
    # databricks, postgresql, mysql, ...: MLflow reports problems itself (through `client`, redacted)


USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"   # MLflow's basic auth


def credentials_to_env(uri: str) -> str:
    """An http(s) MLflow URI without its `user:password@`, which go to MLflow's own basic-auth settings
    in this process's environment (USERNAME_ENV, PASSWORD_ENV): the URI is kept in the sweep record
    and in the callbacks and searcher that Tune pickles with the experiment, and those must hold no
    secret. Other URIs are returned as they are."""
    userinfo, plain = split_userinfo(uri)
    if userinfo is None or urllib.parse.urlparse(plain).scheme not in ("http", "https"):
        return uri
    user, _, password = userinfo.partition(":")
    os.environ[USERNAME_ENV] = urllib.parse.unquote(user)
    os.environ[PASSWORD_ENV] = urllib.parse.unquote(password)
    return plain


def _check_server(uri: str, parsed, timeout: float) -> None:
    shown = redact(uri)
    # user:password@ in the URI, else MLflow's environment: sent as basic auth (urllib does not take it from the URL)
    netloc = parsed.netloc.rpartition("@")[2]
    url = urllib.parse.urlunparse(parsed._replace(netloc=netloc)).rstrip("/") + "/health"
    request = urllib.request.Request(url)
    if parsed.username is not None:
        pair = f"{urllib.parse.unquote(parsed.username)}:{urllib.parse.unquote(parsed.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    elif os.environ.get(USERNAME_ENV):
        pair = f"{os.environ[USERNAME_ENV]}:{os.environ.get(PASSWORD_ENV, '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            if resp.status >= 400:
                raise TrackingError(f"MLflow server {shown} answered {resp.status} on /health: check --mlflow-uri")
    except urllib.error.HTTPError as err:
        raise TrackingError(f"MLflow server {shown} answered HTTP {err.code} on /health: check --mlflow-uri") from None
    except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"MLflow server {shown} is unreachable ({first_line(str(reason))}): start it or pass "
                            "another --mlflow-uri") from None


def _check_writable_file(path: Path, uri: str) -> None:
    if path.exists():
        if not path.is_file() or not os.access(path, os.W_OK):
            raise TrackingError(f"MLflow store {redact(uri)} is not a writable file: pass another --mlflow-uri")
        return
    if path.parent.is_dir() and writable_folder(path.parent) == path.parent:
        return
    raise TrackingError(f"MLflow store {redact(uri)}: folder {path.parent} does not exist or is not writable: "
                        "create it or pass another --mlflow-uri")


def _check_file_store_allowed(folder: Path, uri: str) -> None:
    """MLflow 3 refuses its file store (a folder as tracking URI) unless told otherwise: said before anything
    starts, not as a traceback when the first client is made."""
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:         # an MLflow that still takes folders
        return
    if not MLFLOW_ALLOW_FILE_STORE.get():
        db = folder if folder.suffix == ".db" else folder / "mlflow.db"
        raise TrackingError(f"MLflow store {redact(uri)} is a folder (MLflow's file store), which this MLflow "
                            f"refuses: pass --mlflow-uri sqlite:///{db.resolve()} (a database file), or set "
                            "MLFLOW_ALLOW_FILE_STORE=true to use the folder")


def _check_writable_dir(path: Path, uri: str) -> None:
    if (path.exists() and not path.is_dir()) or writable_folder(path) is None:
        raise TrackingError(f"MLflow store {redact(uri)} is not a writable folder: pass another --mlflow-uri")


# ----------------------------------------------------------------- access
@contextmanager
def lock(uri: str, timeout: float = 600) -> Iterator[None]:
    """Hold the store's lock while creating it and the sweep's run in it (local stores only).

    MLflow creates and migrates a new SQLite store on first use; two sweeps
    started at once on a fresh file race on that migration and leave the
    store broken for good. Under this lock the first creates it, the second
    waits and finds it ready (and, with the same sweep name, finds the run).
    A server serialises this itself.
    """
    path = local_path(uri)
    if path is None:
        yield
        return
    from filelock import FileLock

    with FileLock(str(path.with_name(f".{path.name}.lock")), timeout=timeout):
        yield


class _NoTraceback(logging.Filter):
    """MLflow logs a failed SQLite write with its whole traceback (about 80 lines: SQLAlchemy's, chained)
    before it raises it; whoever called says what failed in one line (the outbox, `start_parent`, the
    tables), so that record is left out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.levelno >= logging.ERROR)


_NO_TRACEBACK = _NoTraceback()


def client(uri: str):
    from mlflow import MlflowClient

    logging.getLogger("mlflow.store.db.utils").addFilter(_NO_TRACEBACK)     # once: the same filter is not added twice
    for key, value in HTTP_FAIL_FAST.items():
        os.environ.setdefault(key, value)
    if redact(uri) != uri:
        # MLflow prints "View run ... at: <tracking URI>/#/..." when a run ends: not with credentials in it
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=uri)


# A sweep continued with its store somewhere else (`--resume` from a moved folder, or with --mlflow-uri naming
# it anew): the store's URI in its record -> where it is now. The writers Tune restores with the experiment
# hold the URI of then; they write to the store of now.
_MOVED: dict[str, str] = {}


def follow(then: str, now: str) -> None:
    """The store at `then` (as the sweep's record and Tune's saved writers name it) is at `now`."""
    if then != now:
        _MOVED[then] = now


class Writer:
    """Writes to the store at `self.uri` through an outbox (see `orchestration.tracking.outbox`).

    Tune saves its callbacks and searchers with the experiment, so a writer is pickled as its
    `_SETTINGS` only; `_reset` (extended by subclasses for their own state) makes the rest anew, and
    the client is made on first use, in whichever process that is (a store that moved: `follow`).
    """

    _SETTINGS: tuple[str, ...] = ("uri",)
    uri: str

    def _reset(self) -> None:
        from orchestration.tracking.outbox import Outbox

        self._client = None
        # sent by the outbox's thread: Tune's result loop never waits on the store (a hung server)
        self.outbox = Outbox(redact(self.uri), is_transient, background=True)

    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in self._SETTINGS}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({k: state[k] for k in self._SETTINGS})
        self.uri = _MOVED.get(self.uri, self.uri)
        self._reset()

    @property
    def client(self):
        if self._client is None:
            self.uri = _MOVED.get(self.uri, self.uri)
            self._client = client(self.uri)
        return self._client


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
    runs = find_runs(c, experiment_id, **{TAG_ROLE: ROLE_SWEEP, TAG_SWEEP: sweep})
    return runs[0] if runs else None


def start_parent(c, sweep: str, dataset: str, params: dict[str, str], resume: bool) -> tuple[str, str]:
    """Create (or, on resume, reopen) the sweep's experiment and parent run; returns (experiment_id, run_id).
    A write the store fails (locked, full, refused) is a TrackingError of one line; a run created before
    it is deleted again, so that the same command can be run again."""
    created: list[str] = []
    try:
        return _start_parent(c, sweep, dataset, params, resume, created)
    except TrackingError:
        raise
    except Exception as err:  # noqa: BLE001 - MLflow's and SQLAlchemy's errors: one line, not a traceback
        for run_id in created:
            try:
                c.delete_run(run_id)
            except Exception:  # noqa: BLE001 - the store that failed may refuse this too
                pass
        shown = redact(getattr(getattr(c, "_tracking_client", None), "tracking_uri", "") or "") or "of the sweep"
        raise TrackingError(f"cannot write to the MLflow store {shown} ({first_line(err)}): check that it can be "
                            "written (no other program holding it, free space, write permission on a server), "
                            "then run the same command again") from None


def _start_parent(c, sweep: str, dataset: str, params: dict[str, str], resume: bool,
                  created: list[str]) -> tuple[str, str]:
    from mlflow.entities import Param

    experiment_id = find_experiment_id(c, sweep)
    if experiment_id is None:
        experiment_id = c.create_experiment(sweep, tags={TAG_DATASET: dataset, TAG_SWEEP: sweep})
    # MLflow 3's UI opens an experiment without this tag on its GenAI pages (traces, evaluation runs), where a
    # sweep looks empty; set also on experiments of earlier versions of this tool when they are continued
    c.set_experiment_tag(experiment_id, TAG_EXPERIMENT_KIND, KIND_MODEL_TRAINING)
    parent = find_parent(c, experiment_id, sweep)
    if parent is not None:
        if not resume:
            raise TrackingError(f"MLflow experiment {sweep!r} already holds this sweep's run: pass --resume to "
                                "continue it or choose another --name")
        c.update_run(parent.info.run_id, status="RUNNING")
        c.set_tag(parent.info.run_id, TAG_RESUMED, str(int(parent.data.tags.get(TAG_RESUMED, "0")) + 1))
        return experiment_id, parent.info.run_id
    run = c.create_run(experiment_id, run_name=f"sweep {sweep}",
                       tags={TAG_ROLE: ROLE_SWEEP, TAG_DATASET: dataset, TAG_SWEEP: sweep})
    created.append(run.info.run_id)
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
        except Exception as err:
            if not is_transient(err) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 10.0)


def log_results(c, run_id: str, out_dir: Path, files: list[Path]) -> list[str]:
    """Attach the aggregated tables and figures to the sweep's run, where the MLflow UI shows them (the run's
    Artifacts tab): each file at its path under `out_dir` (`table1.md`, `figures/...png`). Returns the
    artifact paths. A local store keeps them in MLflow's default artifact location (`./mlruns` of the
    folder the experiment was created in); a tracking server, where it keeps artifacts."""
    out_dir = Path(out_dir)
    logged = []
    for f in files:
        folder = Path(f).parent.relative_to(out_dir).as_posix()
        c.log_artifact(run_id, str(f), artifact_path=None if folder == "." else folder)
        logged.append(Path(f).relative_to(out_dir).as_posix())
    return logged


def _ui_base(uri: str) -> str:
    """The MLflow UI: the tracking server, or `mlflow ui`'s default address."""
    return redact(uri).rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def experiment_url(uri: str, experiment_id: str) -> str:
    """The experiment's runs table (the sweep's run, its trials nested), in MLflow 3's model-training view:
    without `workflowType` the UI opens an experiment on its GenAI pages (traces, evaluation runs)."""
    return f"{_ui_base(uri)}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def run_url(uri: str, experiment_id: str, run_id: str, tab: str = "") -> str:
    """The run's page in the MLflow UI."""
    return f"{_ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}" + (f"/{tab}" if tab else "")

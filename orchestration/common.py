"""The bottom of `orchestration/`: the checkout's root, errors, names shared with the MLflow store, and redaction.

Every other module of the package may import this one; it imports none of them.

* Errors: each carries one line naming the problem and the fix; the command
  lines print `error: <line>` and exit with status 2 (the aggregate: 1).
* Names: the tags and metrics the sweep writes and the aggregation reads.
* `redact`: the one path by which URIs, command lines and error messages
  lose their credentials before they are printed or logged.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsml.errors import WSMLError

# the checkout: cluster.yaml, search_spaces/ and scripts/ are found from here
ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------- errors
class SweepError(WSMLError):
    """Bad input to a sweep (one-line message)."""


class SpaceError(SweepError, ValueError):
    """A search-space file or an override is invalid (one-line message)."""


class TrackingError(SweepError, RuntimeError):
    """The MLflow store cannot be used (one-line message)."""


class AggregateError(WSMLError):
    """Nothing to aggregate: an empty or missing store, an unknown experiment, no finished runs."""


# Tune's metric and its direction: what the search maximises and ASHA compares.
METRIC, MODE = "val_map", "max"
RECORD = "wsml_sweep.json"          # a sweep's settings, beside Ray's experiment state
FINAL_SUFFIX = "-final"             # the final stage's Ray experiment: <sweep>-final


# ------------------------------------------------------------ MLflow names
# Tags on every run this project writes.
TAG_ROLE = "wsml.role"              # "sweep" (parent), "trial" (search), "final" (final-seed rerun)
TAG_DATASET = "wsml.dataset"
TAG_SCHEME = "wsml.scheme"
TAG_METHOD = "wsml.method"          # the Table row: the scheme, or "<scheme> + BoostLU"
TAG_MODE = "wsml.mode"
TAG_SEED = "wsml.seed"
TAG_TRIAL_ID = "wsml.trial_id"
TAG_SWEEP = "wsml.sweep"            # the sweep's name (also the experiment's name)
# The identity of the data a run trained and was scored on (`wsml.data.loading.data_id`): a tag of every
# sweep, trial and final run, and the param `data_fingerprint`. Results of other data are never reused
# (`orchestration.search.known`) nor averaged together (`orchestration.aggregate`); "" : not recorded.
TAG_DATA = "wsml.data"
PARAM_DATA = "data_fingerprint"
TAG_STATUS_REASON = "wsml.end_reason"   # "completed", "asha_stopped", "stop_drop", "failed: <why>", "interrupted"
TAG_PARENT = "mlflow.parentRunId"
# The experiment's kind for MLflow 3's UI (its own tag and value, read from its JavaScript): model training.
TAG_EXPERIMENT_KIND, KIND_MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# Diagnostics (not read by the aggregation).
TAG_RESUMED = "wsml.resumed"        # the sweep run: how often it was continued with --resume
TAG_NODE = "wsml.node_id"           # node of the trial's latest attempt
TAG_NODES = "wsml.nodes"            # every node the trial ran on, comma-separated
TAG_DEVICE = "wsml.device"
TAG_RESTORED_FROM = "wsml.restored_from_epoch"   # the latest attempt resumed after this epoch
TAG_FAILURES = "wsml.failures"      # attempts that failed and were retried
TAG_STARTED_OVER = "wsml.started_over"   # the trial's checkpoints were gone: it trained again from epoch 1
TAG_SOURCE_TRIAL = "wsml.source_trial"   # final runs: the search trial whose config they rerun
TAG_REUSED = "wsml.reused"          # a run whose result answered proposals instead of a training: how many
TAG_REUSED_BY = "wsml.reused_by"    # ... and the sweeps whose proposals it answered, comma-separated

ROLE_SWEEP = "sweep"
ROLE_TRIAL = "trial"
ROLE_FINAL = "final"

# Per-epoch metrics (step = epoch, 1-based).
VAL_MAP = "val_map"
TRAIN_LOSS = "train_loss"
MODIFIED_FRAC = "modified_frac"
MODIFIED_TRUE_POS_FRAC = "modified_true_pos_frac"
CLEAN_RATE = "clean_rate"
EPOCH_SECONDS = "epoch_seconds"
# LinearInit, epoch 1 only: share of the head's logits past +-10 at the switch to fine-tuning (wsml.train's guard)
LINEAR_INIT_SATURATED_FRAC = "linear_init_saturated_frac"

# Final metrics of a run.
TEST_MAP = "test_map"
BEST_VAL_MAP = "best_val_map"
BEST_EPOCH = "best_epoch"
EPOCHS_RUN = "epochs_run"
GPU_HOURS = "gpu_hours"             # device-hours spent (GPU fraction x wall hours; 0 on CPU)
TRAIN_HOURS = "train_hours"         # wall-clock hours the trial trained
REUSED_PROPOSALS = "reused_proposals"   # the sweep run: proposals answered from recorded results
# The sweep run's params `estimate.*` (orchestration.cost.estimate.Estimate.params): the cost estimated at its start.
ESTIMATE_PREFIX = "estimate."


# ------------------------------------------------------- a trial's report
# Keys of the dict a trial reports after each epoch (`orchestration.run.trainable`), besides the trainer's
# metrics; read by the searcher, the schedulers, the MLflow logger, the progress lines and the final stage.
EPOCH = "epoch"                     # epochs finished (Tune's time attribute for ASHA)
TEST_MAP_AT_BEST = "test_map_at_best"
TRIAL_ERROR = "wsml_error"          # a deterministic failure: the trial ended with this reason, not retried
TRAINER_STOP = "trainer_stop"       # 1.0 when the trainer's own stop rule (stop_drop) fired
TRAIN_SECONDS = "train_seconds"
GPU_SECONDS = "gpu_seconds"

# How a trial ended (tag `wsml.end_reason`).
COMPLETED, STOP_DROP, ASHA_STOPPED, STOPPED = "completed", "stop_drop", "asha_stopped", "stopped"


@dataclass(frozen=True)
class Outcome:
    """How a trial ended: its MLflow status and `wsml.end_reason`."""

    status: str            # "FINISHED" or "FAILED"
    reason: str            # COMPLETED, STOP_DROP, ASHA_STOPPED, STOPPED or "failed: <why>"

    @property
    def failed(self) -> bool:
        return self.status == "FAILED"

    @property
    def complete(self) -> bool:
        """The trial ran as far as it would ever run: all its epochs, or the trainer's own stop rule."""
        return self.reason in (COMPLETED, STOP_DROP)

    @property
    def stopped_early(self) -> bool:
        return self.reason in (ASHA_STOPPED, STOP_DROP, STOPPED)


def trial_outcome(last: dict[str, Any] | None, epochs: int, role: str) -> Outcome:
    """How a trial that Tune ended without an error ended, from its last report (`role`: a search trial
    is stopped by ASHA, a final run by the sweep)."""
    last = last or {}
    if last.get(TRIAL_ERROR):
        return Outcome("FAILED", f"failed: {last[TRIAL_ERROR]}")
    if int(last.get(EPOCH, 0) or 0) >= epochs:
        return Outcome("FINISHED", COMPLETED)
    if last.get(TRAINER_STOP):
        return Outcome("FINISHED", STOP_DROP)     # the published code's rule: val mAP fell too far below its best
    return Outcome("FINISHED", ASHA_STOPPED if role == ROLE_TRIAL else STOPPED)


def result_rows(fs, trial_path: str) -> list[dict[str, Any]]:
    """A trial's reports as Tune recorded them: the rows of `result.json` in its folder `trial_path` on the
    pyarrow file system `fs`; a line that does not parse (cut by a killed driver) is skipped. Raises
    OSError (FileNotFoundError: none yet) where the file cannot be read."""
    import json

    with fs.open_input_stream(f"{trial_path.rstrip('/')}/result.json") as f:
        lines = f.read().decode(errors="replace").splitlines()
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict)]


def method_name(scheme: str, boostlu_alpha: float | None) -> str:
    """A table row's name: the scheme, with " + BoostLU" when the BoostLU head is on (as the BoostLU paper)."""
    return f"{scheme} + BoostLU" if boostlu_alpha is not None else scheme


# -------------------------------------------------------------- redaction
# A URI's userinfo: everything from `scheme://` to its last `@` before the path's query or the next
# blank (a password may hold `@`; an AWS secret may hold `/`, which pyarrow accepts unescaped).
_URI_TOKEN = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<rest>[^\s?#\"'<>]*)")
_HOST_PORT_PATH = re.compile(r"^[^:/@]*:\d*/")     # host:port/...: a ':' that is no password
_SECRET_NAME = r"(?:token|secret|password|passwd|pwd|key|signature|credential|auth)"
_SECRET_QUERY = re.compile(rf"(?P<key>[?&;](?:sig|[a-z0-9_.-]*{_SECRET_NAME}[a-z0-9_.-]*))=[^&;\s\"']*",
                           re.IGNORECASE)     # sig: Azure's SAS signature
_SECRET_OPTION = re.compile(r"(?P<key>(?<!\S)--?[a-z0-9_-]*(?:token|secret|password|passwd|credential)[a-z0-9_-]*)"
                            r"(?P<sep>[= ])\S+", re.IGNORECASE)
# NAME=value and 'NAME': 'value' of secret-looking names (environment variables, a runtime env's repr)
_SECRET_ASSIGN = re.compile(r"(?P<key>(?<![\w?&;/-])[a-z_][a-z0-9_]*(?:secret|password|passwd|token|access_key|"
                            r"credential|api_key)[a-z0-9_]*)=(?!\*\*\*)\S+", re.IGNORECASE)
_SECRET_ITEM = re.compile(r"(?P<key>([\"'])[a-z0-9_]*(?:secret|password|passwd|token|access_key|credential|"
                          r"api_key)[a-z0-9_]*\2\s*:\s*)([\"'])(?:(?!\3).)*\3", re.IGNORECASE)
MAX_LINE = 500       # an error line longer than this is cut (a line that quotes a whole file helps nobody)


def _userinfo_end(rest: str) -> int:
    """Where the userinfo of a URI (after `scheme://`) ends (the index of its `@`), or -1 for none."""
    for at in [i for i, c in enumerate(rest) if c == "@"][::-1]:
        before = rest[:at]
        if "/" not in before or (":" in before and not _HOST_PORT_PATH.match(before)):
            return at
    return -1


def _mask_userinfo(m: re.Match) -> str:
    rest = m.group("rest")
    at = _userinfo_end(rest)
    return m.group(0) if at < 0 else m.group("scheme") + "***" + rest[at:]


def redact(text: str) -> str:
    """`text` with credentials masked: the userinfo of URIs (`user:password@`, also with `@` or `/`
    in the password), secret-looking query parameters (`?token=...`, `X-Amz-Signature=`, Azure's
    `sig=`), options (`--password ...`) and assignments (`AWS_SECRET_ACCESS_KEY=...`, `'...TOKEN': '...'`)."""
    text = _URI_TOKEN.sub(_mask_userinfo, text)
    text = _SECRET_QUERY.sub(lambda m: m.group("key") + "=***", text)
    text = _SECRET_OPTION.sub(lambda m: m.group("key") + m.group("sep") + "***", text)
    text = _SECRET_ASSIGN.sub(lambda m: m.group("key") + "=***", text)
    return _SECRET_ITEM.sub(lambda m: m.group("key") + m.group(3) + "***" + m.group(3), text)


def has_secret(text: str) -> bool:
    """Whether `redact` would mask anything in `text`."""
    return redact(text) != text


def split_userinfo(uri: str) -> tuple[str | None, str]:
    """(the userinfo of a URI or None, the URI without it), by `redact`'s reading of a URI."""
    m = _URI_TOKEN.match(uri)
    at = _userinfo_end(m.group("rest")) if m is not None else -1
    if m is None or at < 0:
        return None, uri
    return m.group("rest")[:at], m.group("scheme") + uri[m.start("rest") + at + 1:]


def carries_credentials(uri: str) -> bool:
    """Whether a URI holds a password (`user:password@`) or a secret query parameter. A user name alone
    is none: `abfs://container@account...` names a container."""
    userinfo, _ = split_userinfo(uri)
    return (userinfo is not None and ":" in userinfo) or _SECRET_QUERY.search(uri) is not None


def first_line(err: BaseException | str, *, last: bool = False) -> str:
    """One printable line of an error (its first, or with `last` its last non-empty line:
    a traceback's last line names the exception), redacted and cut to `MAX_LINE`."""
    text = err if isinstance(err, str) else str(err)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = (lines[-1] if last else lines[0]) if lines else (
        "error" if isinstance(err, str) else type(err).__name__)
    line = redact(line)
    return line if len(line) <= MAX_LINE else line[:MAX_LINE - 3] + "..."


def safe_name(name: str) -> str:
    """A file-name-safe form of a sweep name, the name itself where it is one. Other names get a short hash
    of themselves, so that two names never share a file (`a/b` and `a_b` would both be `a_b`)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "sweep"
    return safe if safe == name else f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"

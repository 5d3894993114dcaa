"""The bottom of `orchestration/`: errors, names shared with the MLflow store, and redaction.

Every other module of the package may import this one; it imports none of them.

* Errors: each carries one line naming the problem and the fix; the command
  lines print `error: <line>` and exit with status 2 (the aggregate: 1).
* Names: the tags and metrics the sweep writes and the aggregation reads.
* `redact`: the one path by which URIs, command lines and error messages
  lose their credentials before they are printed or logged.
"""
from __future__ import annotations

import re

from wsml.errors import WSMLError


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
TAG_STATUS_REASON = "wsml.end_reason"   # "completed", "asha_stopped", "stop_drop", "failed: <why>", "interrupted"
TAG_PARENT = "mlflow.parentRunId"
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

# Final metrics of a run.
TEST_MAP = "test_map"
BEST_VAL_MAP = "best_val_map"
BEST_EPOCH = "best_epoch"
EPOCHS_RUN = "epochs_run"
GPU_HOURS = "gpu_hours"             # device-hours spent (GPU fraction x wall hours; 0 on CPU)
TRAIN_HOURS = "train_hours"         # wall-clock hours the trial trained
REUSED_PROPOSALS = "reused_proposals"   # the sweep run: proposals answered from recorded results
# The sweep run's params `estimate.*` (orchestration.estimate.Estimate.params): the cost estimated at its start.
ESTIMATE_PREFIX = "estimate."


def method_name(scheme: str, boostlu_alpha: float | None) -> str:
    """A table row's name: the scheme, with " + BoostLU" when the BoostLU head is on (as the BoostLU paper)."""
    return f"{scheme} + BoostLU" if boostlu_alpha is not None else scheme


# -------------------------------------------------------------- redaction
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&;](?:[a-z0-9_.-]*(?:token|secret|password|passwd|pwd|key|signature|"
                           r"credential|auth)[a-z0-9_.-]*))=[^&;\s]*", re.IGNORECASE)
_SECRET_OPTION = re.compile(r"(?P<key>--?[a-z0-9_-]*(?:token|secret|password|passwd|credential)[a-z0-9_-]*)"
                            r"(?P<sep>[= ])\S+", re.IGNORECASE)
MAX_LINE = 500       # an error line longer than this is cut (a line that quotes a whole file helps nobody)


def redact(text: str) -> str:
    """`text` with credentials masked: `user:password@` in URIs, secret-looking query
    parameters (`?token=...`) and options (`--password ...`)."""
    text = _USERINFO.sub(lambda m: m.group("scheme") + "***@", text)
    text = _SECRET_QUERY.sub(lambda m: m.group("key") + "=***", text)
    return _SECRET_OPTION.sub(lambda m: m.group("key") + m.group("sep") + "***", text)


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
    """A file-name-safe form of a sweep name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "sweep"

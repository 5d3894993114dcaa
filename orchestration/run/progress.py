"""What a person watching a sweep sees.

By default (`watchers(verbose=False)`):

* `TrialEvents`, a Tune callback: one line when a trial starts (or continues
  after a checkpoint), ends, fails or is retried, naming it as its MLflow run
  (`LL-R d=2 lr=0.001 #t3`) with the epoch it reached, its last and best
  validation mAP, and why it ended (completed, stopped early by ASHA, stopped
  by the trainer's val-mAP-drop rule, failed: <why>);
* `StatusLine`, a Tune progress reporter: one line at most every 30 s, and
  one when the stage ends, with the trials done / running / pending, the best
  so far per scheme (search: best validation mAP; final stage: the mean test
  mAP of the seeds finished), the time since the sweep started and an
  estimate of the time left (search and final stage);
* `quiet_logs`: Ray's, MLflow's and Optuna's informational log lines
  (Ray started, database tables created, one Optuna study per scheme, Tune's
  run-time summary) are left out; warnings and errors still show.

With `--verbose`, Ray's own progress table (`table`) every 15 s and every
library's informational lines instead.
"""
from __future__ import annotations

import logging
import math
import time

from ray.tune import Callback, ProgressReporter

from orchestration import trial as trial_config
from orchestration.common import (ASHA_STOPPED, COMPLETED, ROLE_FINAL, ROLE_TRIAL, STOP_DROP, STOPPED, TEST_MAP_AT_BEST,
                                  first_line, method_name, trial_outcome)
from orchestration.search.per_scheme import group_of
from orchestration.search.space import Group

log = logging.getLogger(__name__)

STATUS_EVERY_S = 30.0

# Informational loggers left out by default: Ray's "Started a local Ray instance" and token
# notice, Tune's run-time summary, MLflow creating its database tables.
_QUIET = {"ray._private.worker": logging.WARNING, "ray.tune": logging.WARNING,
          "ray._private.authentication.authentication_token_setup": logging.ERROR,
          "mlflow.store.db.utils": logging.WARNING, "alembic": logging.WARNING}
_REASONS = {COMPLETED: "completed", ASHA_STOPPED: "stopped early by ASHA",
            STOP_DROP: "stopped: val mAP fell below its best (the trainer's stop rule)",
            STOPPED: "stopped early"}


def quiet_logs() -> None:
    """Leave out the libraries' informational log lines (see the module docstring)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name, level in _QUIET.items():
        logging.getLogger(name).setLevel(level)


def watchers(*, final: bool, verbose: bool, started: float, epochs: int, groups: list[Group],
             with_delta_rel: bool, later_epochs: int = 0) -> tuple[ProgressReporter, list[Callback]]:
    """(progress reporter, callbacks) of one stage (the search, or with `final` the final stage).

    `started`: when the sweep started (time.time()); `epochs`: a trial's epochs;
    `groups`: the (scheme, mode, BoostLU) groups of the stage, in the order shown;
    `later_epochs`: trial epochs of the stages after this one, for the estimate.
    """
    if verbose:
        return table(final=final, with_delta_rel=with_delta_rel), []
    return (StatusLine(final=final, started=started, epochs=epochs, groups=groups, later_epochs=later_epochs),
            [TrialEvents(final=final, started=started, epochs=epochs)])


def table(*, final: bool, with_delta_rel: bool):
    """Ray's CLIReporter: scheme, delta_rel, lr (and seed for final runs) beside epoch and val mAP.

    Baseline trials have no delta_rel, and Ray's "current best trial" line
    looks every parameter column up without a default, so the column is only
    shown when every searched scheme has one.
    """
    from ray.tune import CLIReporter

    prefix = "point/" if final else ""
    names = ["scheme"] + (["delta_rel"] if with_delta_rel else []) + ["lr"] + (["seed"] if final else [])
    return CLIReporter(parameter_columns={prefix + n: n for n in names},
                       metric_columns={"epoch": "epoch", "val_map": "val_map", "best_val_map": "best"},
                       max_report_frequency=15, sort_by_metric=True)


# ------------------------------------------------------------------ formatting
def clock(seconds: float) -> str:
    """`4:05`, `1:02:03`."""
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _map(value) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def _group_label(group: Group) -> str:
    return method_name(group.scheme, 1.0 if group.boostlu else None) + (" LI" if group.mode != "end-to-end" else "")


def _left(seconds: float) -> str:
    if seconds < 60:
        return "under a minute left"
    return f"about {math.ceil(seconds / 60)} min left"


# ------------------------------------------------------------------ trial events
class TrialEvents(Callback):
    """One line per trial event (see the module docstring)."""

    def __init__(self, *, final: bool, started: float, epochs: int):
        self.final, self.started, self.epochs = final, started, epochs

    def _say(self, trial, event: str, detail: str = "") -> None:
        line = f"[{clock(time.time() - self.started)}] {event:<8} {trial_config.run_name(trial)}"
        log.info(line + (f"  {detail}" if detail else ""))

    def _reached(self, last: dict) -> str:
        epoch = int(last.get("epoch", 0) or 0)
        if not epoch:
            return "no epoch finished"
        best = last.get("best_val_map")
        return (f"epoch {epoch}/{self.epochs}  val mAP {_map(last.get('val_map'))} "
                f"(best {_map(best)} @ {int(last.get('best_epoch', 0) or 0)})")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        epoch = int((trial.last_result or {}).get("epoch", 0) or 0)
        self._say(trial, "start", f"continues after epoch {epoch}" if epoch else "")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        outcome = trial_outcome(last, self.epochs, ROLE_FINAL if self.final else ROLE_TRIAL)
        event = "failed" if outcome.failed else "end"
        self._say(trial, event, f"{self._reached(last)}  {_REASONS.get(outcome.reason, outcome.reason)}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(trial, "failed", f"{self._reached(trial.last_result or {})}  failed: {self._error(trial)}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._say(trial, "retry", f"{self._reached(trial.last_result or {})}  failed ({self._error(trial)}); "
                                  f"attempt {trial.num_failures + 1} of {trial.max_failures + 1} continues "
                                  "from its last checkpoint")

    @staticmethod
    def _error(trial) -> str:
        try:
            return first_line(str(trial.get_error() or "error"), last=True)
        except Exception:  # noqa: BLE001 - the error file may not be readable yet; the event still counts
            return "error"


# ------------------------------------------------------------------ status line
class StatusLine(ProgressReporter):
    """A status line at most every `every_s` seconds and at the end of the stage (see the module docstring)."""

    def __init__(self, *, final: bool, started: float, epochs: int, groups: list[Group], later_epochs: int = 0,
                 every_s: float = STATUS_EVERY_S):
        self.final, self.started, self.epochs = final, started, epochs
        self.groups, self.later_epochs, self.every_s = list(groups), later_epochs, every_s
        self.total = 0
        self.stage_start = time.time()
        self.last_line = time.time()
        self.first_epoch: dict[str, int] = {}    # trial id -> its epoch when first seen (a resumed trial's)

    def setup(self, start_time=None, total_samples=None, metric=None, mode=None, **kwargs) -> None:
        self.total = int(total_samples or 0)
        self.stage_start = start_time or time.time()
        self.last_line = time.time()

    def should_report(self, trials, done: bool = False) -> bool:
        for t in trials:        # called every step: sees each trial before it trains in this driver
            self.first_epoch.setdefault(t.trial_id, int((t.last_result or {}).get("epoch", 0) or 0))
        return done or time.time() - self.last_line >= self.every_s

    def report(self, trials, done: bool, *sys_info: str) -> None:
        self.last_line = time.time()
        log.info(self.line(trials, done, now=self.last_line))

    # -- the line -------------------------------------------------------
    def line(self, trials, done: bool, now: float) -> str:
        stage = "final stage" if self.final else "search"
        unit = "runs" if self.final else "trials"
        ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        running = [t for t in trials if t.status == "RUNNING"]
        total = max(self.total, len(trials))
        head = f"[{clock(now - self.started)}] {stage}"
        if done:
            outcomes = [trial_outcome(t.last_result, self.epochs, ROLE_FINAL if self.final else ROLE_TRIAL)
                        for t in trials if t.status == "TERMINATED"]
            failed = sum(t.status == "ERROR" for t in trials) + sum(o.failed for o in outcomes)
            stopped = sum(o.stopped_early for o in outcomes)
            parts = [f"{head} done: {len(ended)} {unit} in {clock(now - self.stage_start)} "
                     f"({stopped} stopped early, {failed} failed)"]
        else:
            parts = [f"{head}: {len(ended)} done, {len(running)} running, {total - len(ended) - len(running)} "
                     f"pending of {total} {unit}"]
        parts.append(self._best(trials))
        if not done:
            parts.append(self._estimate(trials, now))
        return " | ".join(parts)

    def _best(self, trials) -> str:
        """Search: each group's best validation mAP so far; final stage: the mean test mAP of its seeds done."""
        values: dict[Group, list[float]] = {g: [] for g in self.groups}
        for t in trials:
            last = t.last_result or {}
            if self.final:
                value = last.get(TEST_MAP_AT_BEST) if t.status == "TERMINATED" else None
            else:
                value = last.get("best_val_map")
            if isinstance(value, (int, float)) and math.isfinite(value):
                values.setdefault(group_of(t.config or {}), []).append(float(value))
        if self.final:
            cells = [f"{_group_label(g)} {_map(sum(v) / len(v)) if v else '–'}" + (f" ({len(v)})" if v else "")
                     for g, v in values.items()]
            return "test mAP, mean of the seeds done: " + ", ".join(cells)
        return "best val mAP: " + ", ".join(f"{_group_label(g)} {_map(max(v)) if v else '–'}"
                                            for g, v in values.items())

    def _estimate(self, trials, now: float) -> str:
        """Epochs still to train over the rate measured since the stage started. A trial is expected
        to run as many epochs as the trials that ended ran on average (ASHA stops some early), or all."""
        done_epochs, ended = 0, []
        for t in trials:
            epoch = int((t.last_result or {}).get("epoch", 0) or 0)
            done_epochs += max(0, epoch - self.first_epoch.get(t.trial_id, 0))
            if t.status in ("TERMINATED", "ERROR"):
                ended.append(epoch)
        seconds = now - self.stage_start
        if done_epochs == 0 or seconds <= 0:
            return "time left: estimating"
        expected = sum(ended) / len(ended) if ended else self.epochs
        left = 0.0
        for t in trials:
            if t.status in ("RUNNING", "PENDING", "PAUSED"):
                left += max(0.0, expected - int((t.last_result or {}).get("epoch", 0) or 0))
        left += max(0, self.total - len(trials)) * expected + self.later_epochs
        return _left(left * seconds / done_epochs) + (" (with the final stage)" if self.later_epochs else "")

    def __getstate__(self) -> dict:
        # pickled with the Tuner: a restored one measures afresh
        state = dict(self.__dict__)
        state["first_epoch"] = {}
        return state

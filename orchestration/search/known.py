"""Configurations already trained: what a sweep may reuse instead of training again.

A `Known` is one trained configuration of a (scheme, mode, BoostLU) group: its searched
values, its validation mAP per epoch and how it ended. A sweep knows

* its own finished trials (`orchestration.search.per_scheme.PerSchemeSearch` records
  them as Tune reports them), and
* with `--warm-start NAME[,NAME]` or `auto`, the finished trials of earlier
  sweeps of the same data set in the MLflow store (`load`), kept only where
  they were trained on the same data (the identity `wsml.data`, logged with
  every run: the same data set name prepared with other labels, another
  split or other observed labels is other data; a run without it, logged
  before it was recorded, is never reused), the whole training config is
  this sweep's (the same fixed settings and seed; the epochs, the device and
  where things live may differ) and the searched values lie inside this
  sweep's space.

A configuration counts as trained when its run ended `completed` (all its
epochs), `stop_drop` (the trainer's own stop rule: training it again stops at
the same epoch, the trainer being deterministic) or `asha_stopped` (ASHA
stopped it at a rung: the same curve would meet the same rung). A record of
more epochs than this sweep's is cut to this sweep's epochs (the trainer has no
schedule over the epochs, so the first epochs of a longer run are a shorter
run); one that completed fewer epochs than this sweep's is not reused (it is
told to the searcher as stopped at its last epoch). Schemes that do have a
schedule over the epochs (the registry's `epoch_schedule`: EM+APL, GR) are
reused only from runs of this sweep's epochs. Failed and interrupted runs are
never reused.

`ReuseMarker` marks in MLflow the run whose result answered a proposal: tag
`wsml.reused` (how often) and `wsml.reused_by` (the sweeps), and the metric
`reused_proposals` on the answering sweep's run; no run is created.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from wsml import schemes
from wsml.config import RESUME_FREE, resume_free

from orchestration.tracking import store
from orchestration import trial as trial_config
from orchestration.common import (ASHA_STOPPED, COMPLETED, EPOCHS_RUN, PARAM_DATA, REUSED_PROPOSALS, ROLE_FINAL,
                                  ROLE_TRIAL, STOP_DROP, TAG_DATA, TAG_DATASET, TAG_REUSED, TAG_REUSED_BY, TAG_ROLE,
                                  TAG_STATUS_REASON, TAG_SWEEP, TAG_TRIAL_ID, TEST_MAP, TEST_MAP_AT_BEST, VAL_MAP,
                                  SweepError, first_line, method_name, redact)
from orchestration.search.space import Group

log = logging.getLogger(__name__)

REUSABLE_ENDS = (COMPLETED, STOP_DROP, ASHA_STOPPED)
# Params that may differ between runs of the same configuration: where and how fast it ran, how many
# epochs (compared on their own), the search trial a final run reran, and the data (compared on its own).
_FREE = set(RESUME_FREE) | {"source_trial", PARAM_DATA}


def data_of(tags: dict[str, str], params: dict[str, str]) -> str:
    """The identity of the data a run was trained on ("" : not recorded)."""
    return tags.get(TAG_DATA) or params.get(PARAM_DATA) or ""


def key(values: dict[str, Any]) -> tuple:
    """What identifies a configuration within a sweep: its scheme, mode and searched values."""
    return tuple((k, values[k]) for k in trial_config.SEARCHED if values.get(k) is not None)


def group_of(values: dict[str, Any]) -> Group:
    """The group of a configuration's searched values (trainer names)."""
    return Group(values.get("scheme") or "", values.get("mode", "end-to-end"), values.get("boostlu_alpha") is not None)


def searched_values(config: dict[str, Any]) -> dict[str, Any]:
    """The searched values of a trial config or a proposal, in the trainer's names."""
    v = trial_config.Trial.parse(config).values
    return {k: v[k] for k in trial_config.SEARCHED if v.get(k) is not None}


@dataclass
class Known:
    """One trained configuration of a group (see the module docstring)."""

    group: Group
    values: dict[str, Any]                  # searched values, trainer names (scheme, mode, optimizer, lr, ...)
    curve: list[tuple[int, float]]          # (epoch, val_map), epochs ascending
    complete: bool                          # trained as far as this sweep trains it
    reusable: bool = True                   # answers a proposal of it (complete, or stopped by ASHA)
    sweep: str = ""                         # where it was trained ("" : this sweep)
    trial_id: str = ""
    run_id: str = ""                        # its MLflow run, when known
    test_map: dict[int, float] = field(default_factory=dict)   # test mAP at the best epoch so far, by epoch

    @property
    def key(self) -> tuple:
        return key(self.values)

    @property
    def epochs(self) -> int:
        return self.curve[-1][0] if self.curve else 0

    @property
    def best(self) -> tuple[int, float]:
        """(epoch, val_map) of the best epoch (the first of equals, as the trainer keeps it)."""
        best = (0, -math.inf)
        for e, v in self.curve:
            if v > best[1]:
                best = (e, v)
        return best

    def label(self) -> str:
        where = f"{self.sweep}/" if self.sweep else ""
        return f"{where}{self.trial_id}" if self.trial_id else where.rstrip("/")

    def better_than(self, other: Known | None) -> bool:
        return other is None or (self.complete, self.reusable, self.epochs) > (other.complete, other.reusable,
                                                                              other.epochs)


@dataclass
class WarmStart:
    """Records of earlier sweeps for `--warm-start`."""

    sweeps: list[str]
    records: list[Known]
    skipped: dict[str, int] = field(default_factory=dict)     # why -> runs left out

    def summary(self) -> str:
        if not self.sweeps:
            return "warm start: no earlier sweep of this data set in the store"
        left = "; ".join(f"{n} {why}" for why, n in self.skipped.items())
        return (f"warm start: {len(self.records)} configuration(s) from {', '.join(self.sweeps)} told to the "
                f"searchers before they propose" + (f" (left out: {left})" if left else ""))


def parse(text: str | None) -> list[str] | str | None:
    """`--warm-start`: None, "auto" or a list of sweep names."""
    if text is None:
        return None
    if text.strip() == "auto":
        return "auto"
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SweepError(f"--warm-start {text!r} names no sweep: give NAME[,NAME] or auto")
    return list(dict.fromkeys(names))


def _in_space(space, values: dict[str, Any]) -> bool:
    """Whether a configuration lies inside the space (its group searched, every searched value in range)."""
    s = space.search
    group = group_of(values)
    if group not in s.groups():
        return False
    optimizer = values.get("optimizer", "adam")
    if optimizer not in s.optimizer or not s.lr_for(optimizer).contains(float(values["lr"])):
        return False
    params = {name: getattr(s, name) for name in ("delta_rel", "linear_init_lr", "boostlu_alpha")}
    params.update(s.scheme_params.get(group.scheme, {}))
    for name, param in params.items():
        applies = group.boostlu if name == "boostlu_alpha" else trial_config.applies(name, group.scheme, group.mode)
        if applies and param is not None:
            if name not in values or not param.contains(float(values[name])):
                return False
    return True


def _values_of(params: dict[str, str], space) -> dict[str, Any]:
    """A run's values of what this space searches (trainer names); the rest is compared as fixed settings."""
    s = space.search
    out: dict[str, Any] = {k: params[k] for k in ("scheme", "mode", "optimizer") if k in params}
    if "lr" in params:
        out["lr"] = float(params["lr"])
    for name in ("delta_rel", "linear_init_lr", "boostlu_alpha"):
        if params.get(name) not in (None, "None") and getattr(s, name) is not None:
            out[name] = float(params[name])
    for name in s.scheme_params.get(params.get("scheme", ""), {}):
        if params.get(name) not in (None, "None"):
            out[name] = int(params[name]) if schemes.hyper(name).integer else float(params[name])
    return out


def _same_config(run_params: dict[str, str], expected: dict[str, str]) -> bool:
    """The same fixed settings; the same epochs too for a scheme with a schedule over them (`resume_free`)."""
    free = _FREE - (RESUME_FREE - resume_free(expected.get("scheme")))
    return all(run_params.get(k) == v for k, v in expected.items() if k not in free)


def _sweeps(c, dataset: str, names, current: str) -> list[tuple[str, str]]:
    """(name, experiment id) of the sweeps to warm-start from."""
    from mlflow.entities import ViewType

    if names == "auto":
        found, token = [], None
        while True:
            page = c.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            found += list(page)
            token = page.token
            if not token:
                break
        out = []
        for e in sorted(found, key=lambda e: int(e.experiment_id) if e.experiment_id.isdigit() else 0):
            if e.name == current:
                continue
            parent = store.find_parent(c, e.experiment_id, e.name)
            if parent is not None and parent.data.tags.get(TAG_DATASET) == dataset:
                out.append((e.name, e.experiment_id))
        return out
    out = []
    for name in names:
        if name == current:
            raise SweepError(f"--warm-start {name}: that is this sweep's own name: name an earlier sweep")
        exp = c.get_experiment_by_name(name)
        parent = store.find_parent(c, exp.experiment_id, name) if exp is not None else None
        if parent is None:
            raise SweepError(f"--warm-start {name}: no sweep {name!r} in the MLflow store: name a sweep of that "
                             "store (its experiment name) or use auto")
        other = parent.data.tags.get(TAG_DATASET)
        if other != dataset:
            raise SweepError(f"--warm-start {name}: that sweep is of {other}, not {dataset}: name a {dataset} sweep")
        out.append((name, exp.experiment_id))
    return out


def load(uri: str, names, space, base: dict[str, Any], current: str) -> WarmStart:
    """The reusable records of the sweeps `names` ("auto": every other sweep of the data set) in the store,
    trained on the data of `base` (its `wsml_data`)."""
    from mlflow.entities import ViewType

    data = trial_config.Trial.parse(base).data_id
    if not data:
        raise SweepError("--warm-start needs the identity of this sweep's data: run the sweep where its data set "
                         "is, or drop --warm-start")

    path = store.local_path(uri)
    if path is not None and not path.exists():
        if names == "auto":
            return WarmStart([], [])
        raise SweepError(f"--warm-start: no MLflow store at {redact(uri)}: pass the --mlflow-uri of the earlier "
                         "sweeps")
    try:
        c = store.client(uri)
        sweeps = _sweeps(c, space.dataset, names, current)
        runs = []
        for _, eid in sweeps:
            token = None
            while True:
                page = c.search_runs([eid], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token,
                                     filter_string="attributes.status = 'FINISHED'")
                runs += [r for r in page if r.data.tags.get(TAG_ROLE) in (ROLE_TRIAL, ROLE_FINAL)]
                token = page.token
                if not token:
                    break
        best: dict[tuple, Known] = {}
        skipped: dict[str, int] = {}

        def skip(why: str) -> None:
            skipped[why] = skipped.get(why, 0) + 1

        for r in runs:
            reason = r.data.tags.get(TAG_STATUS_REASON, "")
            values = _values_of(r.data.params, space)
            if reason not in REUSABLE_ENDS or "lr" not in values:
                skip("not finished")
                continue
            if not _in_space(space, values):
                skip("outside this space")
                continue
            trained_on = data_of(r.data.tags, r.data.params)
            if trained_on != data:
                skip("trained on other data" if trained_on else "trained on data not recorded")
                continue
            if not _same_config(r.data.params, trial_config.Trial.parse({**base, **values}).params()):
                skip("other fixed settings or seed")
                continue
            curve = [(int(m.step), float(m.value)) for m in c.get_metric_history(r.info.run_id, VAL_MAP)]
            curve = sorted(dict(curve).items())
            trained = int(r.data.metrics.get(EPOCHS_RUN, curve[-1][0] if curve else 0))
            if not curve:
                skip("no epochs logged")
                continue
            cut = [(e, v) for e, v in curve if e <= space.epochs]
            complete = trained >= space.epochs or reason == STOP_DROP
            # completed with fewer epochs than this sweep's: a smaller budget, not a verdict (trained again)
            reusable = complete or reason == ASHA_STOPPED
            tests = {int(m.step): float(m.value)
                     for m in c.get_metric_history(r.info.run_id, TEST_MAP_AT_BEST) if int(m.step) <= space.epochs}
            if not tests and TEST_MAP in r.data.metrics and trained <= space.epochs:
                tests = {trained: float(r.data.metrics[TEST_MAP])}
            rec = Known(group=group_of(values), values=values, curve=cut,
                        complete=complete, reusable=reusable, sweep=r.data.tags.get(TAG_SWEEP, ""),
                        trial_id=r.data.tags.get(TAG_TRIAL_ID, ""), run_id=r.info.run_id, test_map=tests)
            if rec.better_than(best.get(rec.key)):
                best[rec.key] = rec
    except SweepError:
        raise
    except Exception as err:  # noqa: BLE001 - the store cannot be read: one line
        raise SweepError(f"--warm-start: cannot read the MLflow store {redact(uri)}: {first_line(err)}") from None
    return WarmStart([n for n, _ in sweeps], list(best.values()), skipped)


def rows(records: list[Known], base: dict[str, Any]) -> list[dict[str, Any]]:
    """Warm-start records as result rows (`orchestration.search.final.ROW_COLUMNS`), so that the final stage picks each
    group's best over the earlier sweeps' configurations too."""
    out = []
    for r in records:
        epoch, value = r.best
        test = r.test_map.get(epoch, math.nan)
        out.append({"trial_id": r.label(), "method": method_name(r.group.scheme, r.values.get("boostlu_alpha")),
                    "scheme": r.group.scheme, "mode": r.group.mode,
                    "delta_rel": r.values.get("delta_rel", math.nan), "lr": r.values.get("lr", math.nan),
                    "seed": int(base.get("seed", 0)), "epochs_run": r.epochs, "best_val_map": value,
                    "best_epoch": epoch, "test_map": test, "error": "", "config": {**base, **r.values}})
    return out


class ReuseMarker(store.Writer):
    """Marks in MLflow the runs whose results answered proposals (see the module docstring).

    Called by the searcher in the driver; its calls go through an outbox, so a store that cannot be
    reached holds them until it answers (`finish` delivers the rest). Picklable: only the settings are
    kept (Tune saves the searcher with the experiment).
    """

    _SETTINGS = ("uri", "sweep", "experiment_id", "parent_run_id")

    def __init__(self, uri: str, sweep: str, experiment_id: str, parent_run_id: str):
        self.uri, self.sweep, self.experiment_id, self.parent_run_id = uri, sweep, experiment_id, parent_run_id
        self._reset()

    def _reset(self) -> None:
        super()._reset()
        self._times: dict[tuple, int] = {}              # record key -> proposals it answered in this driver
        self._before: dict[str, tuple[int, list]] = {}  # run id -> its reuse tags when first marked

    def __call__(self, record: Known, total: int) -> None:
        """`record` answered a proposal; `total`: proposals this sweep answered so far. Every call sets values
        (never adds), so one sent again after a failure changes nothing."""
        times = self._times[record.key] = self._times.get(record.key, 0) + 1
        self.outbox.put("reuse", lambda: self._mark(record, times), f"reused {record.label()}")
        self.outbox.put("reuse", lambda: self._count(total), "reused count")

    def _mark(self, record: Known, times: int) -> None:
        c = self.client
        run_id = record.run_id
        if not run_id:     # a trial of this sweep: its run, found by its tags
            found = store.find_runs(c, self.experiment_id, **{TAG_SWEEP: self.sweep, TAG_ROLE: ROLE_TRIAL,
                                                              TAG_TRIAL_ID: record.trial_id})
            if not found:
                log.warning("warning: no MLflow run of trial %s to mark as reused", record.trial_id)
                return
            run_id = found[0].info.run_id
        if run_id not in self._before:
            tags = c.get_run(run_id).data.tags
            self._before[run_id] = (int(tags.get(TAG_REUSED, "0")),
                                    [s for s in tags.get(TAG_REUSED_BY, "").split(",") if s])
        count, by = self._before[run_id]
        c.set_tag(run_id, TAG_REUSED, str(count + times))
        c.set_tag(run_id, TAG_REUSED_BY, ",".join(dict.fromkeys(by + [self.sweep])))

    def _count(self, total: int) -> None:
        import time

        from mlflow.entities import Metric

        self.client.log_batch(self.parent_run_id, metrics=[Metric(REUSED_PROPOSALS, float(total),
                                                                  int(time.time() * 1000), total)])

    def finish(self, wait_s: float = 120.0) -> int:
        return self.outbox.drain(wait_s)

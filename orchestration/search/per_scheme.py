"""Per-scheme search: every (scheme, mode[, BoostLU]) of a sweep is searched as its own study inside one Tuner.

Table 1 compares every scheme at its own best, as the paper's per-scheme grid
did, so one TPE study over `scheme` is the wrong tool: it spends the budget on
whichever scheme looks best early and starves the others. Here each group
(scheme, mode) gets

* its own share of `num_samples` (`quotas`: as equal as possible);
* its own seeded Optuna TPE study over the values that apply to it, its own
  start points first (`OptunaSearch`, one per group);
* its own ASHA brackets (`ASHAScheduler`, one per group), so a trial is only
  ever compared with trials of its own scheme.

`PerSchemeSearch` hands out trials round robin over the groups (the one
furthest below its share goes next), so all schemes progress side by side on a
cluster; `PerSchemeScheduler` routes each trial to its group's ASHA. The
sweep, its MLflow run and its results stay one.
"""
from __future__ import annotations

import logging
import os
import pickle
from typing import Any

import numpy as np
import optuna
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from orchestration.run import private
from orchestration.common import EPOCH, ROLE_TRIAL, trial_outcome
from orchestration.search.known import Known, searched_values
from orchestration.search.known import group_of as known_group
from orchestration.search.known import key as known_key
from orchestration.search.space import Group
from orchestration.search import study
from orchestration.search.study import STUDY, GroupSpace, study_storage, told, tpe_sampler

log = logging.getLogger(__name__)

MAX_REPEATS = 100           # proposals in a row answered without training before a group is taken as exhausted


def quotas(groups: list[Group], num_samples: int) -> dict[Group, int]:
    """Split `num_samples` over the groups as evenly as possible (the first groups get the remainder)."""
    base, extra = divmod(num_samples, len(groups))
    return {g: base + (i < extra) for i, g in enumerate(groups)}


def group_of(config: dict[str, Any]) -> Group:
    """The group of a trial config or a proposal."""
    return known_group(searched_values(config))


def build(space, metric: str, mode: str, known: list[Known] | None = None, marker=None,
          experiment: str | None = None, sweep: str = STUDY) -> tuple[PerSchemeSearch, PerSchemeScheduler]:
    """The sweep's searcher and scheduler: per (scheme, mode, BoostLU) group a seeded TPE study (told `known`, the
    warm-start records, first; its start points first among its proposals) and an ASHA on `metric` with
    the epoch as time. `marker(record, total)` is called when a record answers a proposal. The studies,
    named after `sweep` and their group, are kept in the journal in the sweep's folder `experiment`
    (`study.open_journal`; None, or a journal that cannot be written: in memory).

    TPE: `tpe_sampler`. (On the earlier bench/sweep.py grid, lr fixed, 15 configurations: telling
    ASHA-stopped trials COMPLETE with their last value instead of PRUNED left the epochs to target unchanged;
    not training a configuration twice took the seeds that never got there from 49 of 150 to 0.)
    """
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    groups = space.search.groups()
    quota = quotas(groups, space.num_samples)
    by_group: dict[Group, list[Known]] = {}
    for r in known or []:
        by_group.setdefault(r.group, []).append(r)
    searchers: dict[Group, Searcher] = {}
    schedulers: dict[Group, TrialScheduler] = {}
    grids: dict[Group, list | None] = {}
    storages: dict[Group, Any] = {}
    journal = study.open_journal(experiment) if experiment is not None else None
    names = {g: study.study_name(sweep, g) for g in groups}
    spaces: dict[Group, GroupSpace] = {}
    for i, g in enumerate(groups):
        group_space = spaces[g] = GroupSpace.of(space.search, g)
        grid = group_space.grid()
        grids[g] = None if grid is None else [(v, group_space.optuna_params(v)) for v in grid]
        storages[g] = study_storage(group_space, by_group.get(g, []), journal, names[g])
        searchers[g] = OptunaSearch(
            space=group_space, metric=metric, mode=mode,
            points_to_evaluate=space.group_points(g) or None,
            sampler=tpe_sampler((space.search_seed + i) % 2**32, quota[g]),
            storage=storages[g], study_name=names[g])
        schedulers[g] = ASHAScheduler(
            time_attr=EPOCH, max_t=space.epochs, grace_period=space.scheduler.grace_period,
            reduction_factor=space.scheduler.reduction_factor)
    return (PerSchemeSearch(searchers, quota, metric, mode, epochs=space.epochs,
                            known=[r for r in known or [] if r.reusable], marker=marker, grids=grids,
                            storages=storages, seed=space.search_seed, names=names,
                            journal=study.journal_path(experiment) if journal is not None and experiment else None,
                            spaces=spaces),
            PerSchemeScheduler(schedulers))


class PerSchemeSearch(Searcher):
    """One Optuna study per group; trials handed out round robin up to each group's quota.

    No configuration is trained twice. A proposal equal to a configuration already trained (one of this
    sweep's finished trials, or a warm-start record; `orchestration.search.known`) is not handed to Tune: its
    recorded result is told to the group's study (`told`), `marker` marks it in MLflow, and the study is
    asked again. One equal to a trial still training is not evaluated (told FAIL, which TPE ignores) and
    asked again. Such answers do not count against the quota, so Tune's trials are the trainings.

    Where a group's space is a grid (every value searched over a list), TPE soon proposes nothing but the
    best configurations it knows; after such a repeat the next proposal is one of the grid's untried
    configurations, drawn with the sweep's seed (queued in the study, so TPE is told its result as usual),
    and the group ends, below its share, once every configuration is trained or training. Where a value
    is searched over a range, repeats come only from start points and warm-start records; after
    `MAX_REPEATS` in a row the group is taken as exhausted and ends. `planned` counts the trials handed to
    Tune in the end.
    """

    def __init__(self, searchers: dict[Group, Searcher], quota: dict[Group, int], metric: str, mode: str,
                 epochs: int = 0, known: list[Known] | None = None, marker=None,
                 grids: dict[Group, list | None] | None = None, storages: dict | None = None, seed: int = 0,
                 names: dict[Group, str] | None = None, journal: str | None = None,
                 spaces: dict[Group, GroupSpace] | None = None):
        super().__init__(metric=metric, mode=mode)
        self.searchers = searchers
        self.quota = quota
        self.epochs = epochs
        self.marker = marker
        self.assigned = {g: 0 for g in searchers}
        self.owner: dict[str, Group] = {}        # trial id -> its group
        self.asked: dict[str, str] = {}          # trial id -> the id its group's study knows it by
        self.values: dict[str, dict] = {}        # trial id -> its searched values
        self.curves: dict[str, dict[int, float]] = {}    # trial id -> epoch -> val_map
        self.training: dict[str, tuple] = {}     # trial id -> its configuration's key, until it ends
        self.known: dict[tuple, Known] = {r.key: r for r in known or []}
        self.repeats = {g: 0 for g in searchers}     # proposals answered in a row, per group
        self.reused: list[dict[str, Any]] = []       # one per proposal answered from a record
        self.closed: dict[Group, str] = {}           # group -> why it was closed
        # each group's configurations as (values, Optuna params) when its space is a grid (None: a range)
        self.grids: dict[Group, list | None] = dict(grids or {})
        self.storages = dict(storages or {})     # each group's Optuna storage (its study: names[group])
        self.names = dict(names or {g: STUDY for g in searchers})    # each group's study
        self.spaces = dict(spaces or {})         # each group's Optuna space (to place a trial in its study)
        self.journal = journal                   # the studies' journal file (None: in memory)
        self.settled: set[str] = set()           # asks whose trial had ended in the journal at --resume (restore)
        self.in_flight: list[str] | None = None  # at --resume: the trials Tune runs again, for `Limiter`
        self.rng = np.random.default_rng(seed)   # which untried configuration replaces a repeated proposal

    @property
    def planned(self) -> int:
        """The trials this search hands to Tune: num_samples, less what closed groups did not use."""
        return sum(self.assigned[g] if g in self.closed else q for g, q in self.quota.items())

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return False            # every study was built with its space, metric and mode

    def suggest(self, trial_id: str) -> dict | None:
        for attempt in range(10**6):
            for g in self.searchers:
                if g not in self.closed and self.assigned[g] < self.quota[g] and self._grid_left(g) == []:
                    self._close(g, f"all {len(self.grids[g] or [])} configurations of its space are trained or "
                                   "training")
            open_groups = [g for g in self.searchers if self.assigned[g] < self.quota[g] and g not in self.closed]
            if not open_groups:
                return Searcher.FINISHED    # type: ignore[return-value]  # Ray's annotation leaves FINISHED out
            group = min(open_groups, key=lambda g: self.assigned[g] / self.quota[g])
            ask = trial_id if attempt == 0 else f"{trial_id}~{attempt}"    # the study's id of this proposal
            searcher = self.searchers[group]
            config = searcher.suggest(ask)
            if config is None or config == Searcher.FINISHED:
                return config
            values = searched_values(config)
            k = known_key(values)
            record = self.known.get(k)
            if record is None and k not in self.training.values():
                self.repeats[group] = 0
                self.assigned[group] += 1
                self.owner[trial_id], self.asked[trial_id], self.values[trial_id] = group, ask, values
                self.training[trial_id], self.curves[trial_id] = k, {}
                return config
            if record is not None:
                self._tell(searcher, ask, record)
                self.reused.append({"group": group, "values": values, "answered_by": record.label(),
                                    "trial": trial_id})
                if self.marker is not None:
                    self.marker(record, len(self.reused))
            else:       # the same configuration is training now: not evaluated twice
                searcher.on_trial_complete(ask, result=None, error=True)
            self.repeats[group] += 1
            left = self._grid_left(group)
            if left:        # a grid: TPE settled on what it knows; the next proposal is one it has not tried
                _, params = left[int(self.rng.integers(len(left)))]
                optuna.load_study(study_name=self.names[group], storage=self.storages[group]).enqueue_trial(params)
            elif self.repeats[group] >= MAX_REPEATS:
                self._close(group, f"{MAX_REPEATS} proposals in a row were configurations already trained or "
                                   "training")
        raise AssertionError("unreachable")

    def _grid_left(self, group: Group) -> list | None:
        """The configurations of a grid group neither trained nor training (None: not a grid)."""
        grid = self.grids.get(group)
        if grid is None:
            return None
        taken = set(self.known) | set(self.training.values())
        return [(v, p) for v, p in grid if known_key(v) not in taken]

    def _close(self, group: Group, why: str) -> None:
        self.closed[group] = why
        log.info(f"note: {group.label}: {why}; its search ends after {self.assigned[group]} of "
              f"{self.quota[group]} trials")

    def _tell(self, searcher: Searcher, ask: str, record: Known) -> None:
        """Tell a study a recorded result under the id of a proposal it made (see `told`)."""
        for epoch, value in record.curve:
            searcher.on_trial_result(ask, {self.metric: value, TRAINING_ITERATION: epoch})
        value, _ = told(record)
        searcher.on_trial_complete(ask, result=None if value is None else {self.metric: value})

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.owner:
            return
        if result.get(EPOCH) is not None and result.get(self.metric) is not None:
            self.curves[trial_id][int(result[EPOCH])] = float(result[self.metric])
        if self.asked[trial_id] not in self.settled:
            self.searchers[self.owner[trial_id]].on_trial_result(self.asked[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.owner:
            return
        if result and not error and result.get(EPOCH) is not None and result.get(self.metric) is not None \
                and int(result[EPOCH]) not in self.curves[trial_id]:
            # Tune hands the result that stops a trial (ASHA's STOP, which the last epoch gets too) to
            # on_trial_complete alone: its epoch joins the curve and the study's intermediate values here
            self.on_trial_result(trial_id, {TRAINING_ITERATION: int(result[EPOCH]), **result})
        searcher = self.searchers[self.owner[trial_id]]
        ask, curve = self.asked[trial_id], self.curves[trial_id]
        self.training.pop(trial_id, None)
        outcome = trial_outcome(result, self.epochs, ROLE_TRIAL)
        if error or not result or outcome.failed or not curve:
            if ask not in self.settled:
                searcher.on_trial_complete(ask, result=None, error=True)
            return
        complete = outcome.complete
        record = Known(group=self.owner[trial_id], values=self.values[trial_id], curve=sorted(curve.items()),
                       complete=complete, reusable=True, trial_id=trial_id)
        if record.better_than(self.known.get(record.key)):
            self.known[record.key] = record
        value, _ = told(record)
        if ask not in self.settled:
            searcher.on_trial_complete(ask, result=None if value is None else {self.metric: value})

    def save(self, checkpoint_path: str) -> None:
        state = {k: getattr(self, k) for k in self._STATE}
        state["studies"] = {g: private.searcher_state(s) for g, s in self.searchers.items()}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        for k in self._STATE:
            if k in state:
                setattr(self, k, state[k])
        for g, d in state["studies"].items():
            private.restore_searcher_state(self.searchers[g], d)
        saved = private.saved_trials(os.path.dirname(checkpoint_path))
        adopted = self._adopt(saved)
        for g, storage in self.storages.items():
            mine = {t.trial_id: self.spaces[g].optuna_params(self.values[t.trial_id]) for t in adopted
                    if self.owner[t.trial_id] == g}
            places: dict[str, Any] = {}
            if self.journal is not None and private.reopen_journal(storage, self.journal):
                asked, answered = private.asked_trials(self.searchers[g])
                done, places = study.settle(storage, self.names[g], asked, answered, mine)
                self.settled |= done
            for tid, params in mine.items():
                place = places.get(tid) or study.running_trial(storage, self.names[g], params,
                                                               self.spaces[g].distributions())
                private.adopt_asked(self.searchers[g], tid, place)
        for t in saved:
            if t.status == "TERMINATED" and t.trial_id in self.training:   # ended since the checkpoint
                self.on_trial_complete(t.trial_id, t.last_result or None)
        if saved:           # Tune runs the others again (errored ones too: `tuner.restore`)
            self.in_flight = [t.trial_id for t in saved if t.status != "TERMINATED"]

    def _adopt(self, trials: list) -> list:
        """Of the trials Tune saved (`private.saved_trials`), those this searcher's checkpoint predates: Tune
        writes its trials, then its searcher, and a driver killed between the two leaves them unknown here.
        Each counts against its group's share (else --resume hands Tune more than num_samples trials) and
        is training. Returns them."""
        out = []
        for t in trials:
            g = group_of(t.config)
            if t.trial_id in self.owner or g not in self.searchers or g not in self.spaces:
                continue
            values = searched_values(t.config)
            self.assigned[g] += 1
            self.owner[t.trial_id], self.asked[t.trial_id], self.values[t.trial_id] = g, t.trial_id, values
            self.training[t.trial_id], self.curves[t.trial_id] = known_key(values), {}
            out.append(t)
        return out

    def relocate(self, experiment: str) -> None:
        """Before --resume restores this searcher: the sweep's folder as it is found now (it may have moved
        since the sweep started), whose journal the restored studies use."""
        if self.journal is not None:
            self.journal = study.journal_path(experiment)

    # saved with the studies in one pickle: each study and `storages` keep sharing their storage
    _STATE = ("assigned", "owner", "asked", "values", "curves", "training", "known", "repeats", "reused", "closed",
              "grids", "storages", "rng", "settled", "spaces")


class Limiter(ConcurrencyLimiter):
    """Tune's `ConcurrencyLimiter` around a `PerSchemeSearch`, its trials in flight as Tune has them at --resume.

    Tune restores the limiter's trials in flight from the searcher's checkpoint, which may predate its
    trials (`PerSchemeSearch.restore`): a trial that ended since would hold its place for good (the sweep
    waits forever), and one made since would pass its end to no study. (Tune takes a searcher given
    already in a `ConcurrencyLimiter` as it is, and keeps `max_concurrent` trials pending.)
    """

    def _sync(self) -> None:
        searcher = self.searcher
        if isinstance(searcher, PerSchemeSearch) and searcher.in_flight is not None:
            self.live_trials = set(searcher.in_flight)
            self.num_unfinished_live_trials = len(searcher.in_flight)
            searcher.in_flight = None

    def suggest(self, trial_id: str):
        self._sync()
        return super().suggest(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._sync()
        super().on_trial_complete(trial_id, result=result, error=error)


class PerSchemeScheduler(TrialScheduler):
    """One scheduler (ASHA) per group; a trial's results go to its group's only."""

    def __init__(self, schedulers: dict[Group, TrialScheduler]):
        super().__init__()
        self.schedulers = schedulers

    def _of(self, trial) -> TrialScheduler:
        return self.schedulers[group_of(trial.config)]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        ok = [s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values()]
        # the metric Tune reads from this scheduler (`.metric`): the one its groups' schedulers took
        TrialScheduler.set_search_properties(self, next(iter(self.schedulers.values())).metric, mode)
        return all(ok)

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        # the groups' schedulers all pick the first pending trial of the experiment (FIFO)
        return next(iter(self.schedulers.values())).choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return "\n".join(f"{g.label}: {s.debug_string()}" for g, s in self.schedulers.items())

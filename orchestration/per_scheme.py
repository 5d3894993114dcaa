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

import itertools
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from orchestration import private
from orchestration.common import EPOCH, ROLE_TRIAL, trial_outcome
from orchestration.known import Known, searched_values
from orchestration.known import group_of as known_group
from orchestration.known import key as known_key
from orchestration.space import Group

STUDY = "wsml"              # the name of each group's Optuna study (one per storage)
MAX_REPEATS = 100           # proposals in a row answered without training before a group is taken as exhausted


def quotas(groups: list[Group], num_samples: int) -> dict[Group, int]:
    """Split `num_samples` over the groups as evenly as possible (the first groups get the remainder)."""
    base, extra = divmod(num_samples, len(groups))
    return {g: base + (i < extra) for i, g in enumerate(groups)}


def group_of(config: dict[str, Any]) -> Group:
    """The group of a trial config or a proposal."""
    return known_group(searched_values(config))


@dataclass
class GroupSpace:
    """Optuna's define-by-run space of one group: the values searched for its scheme and mode.

    With one lr range per optimizer the optimizer is suggested first and the lr
    under that optimizer's own name (`lr_sgd`), so TPE models each range apart;
    the proposal carries it as `lr`. A plain class (not a closure) so that Ray
    can pickle it with the searcher's state and `--resume` can restore it.
    """

    scheme: str
    mode: str
    optimizers: list[str]
    params: dict[str, Any]          # Optuna name -> orchestration.space.FloatParam, in the order suggested

    @classmethod
    def of(cls, search, group: Group) -> GroupSpace:
        params = {k: v for k, v in search.params(group).items() if k != "optimizer"}
        return cls(group.scheme, group.mode, list(search.optimizer), params)

    def distributions(self) -> dict[str, Any]:
        """Optuna's distribution of every name the space can suggest (to add trials to its study)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        out: dict[str, Any] = {}
        if len(self.optimizers) > 1:
            out["optimizer"] = CategoricalDistribution(self.optimizers)
        for name, p in self.params.items():
            out[name] = (CategoricalDistribution(list(p.values)) if p.values is not None
                         else FloatDistribution(p.low, p.high, log=p.log))
        return out

    def grid(self) -> list[dict[str, Any]] | None:
        """Every configuration of the space (searched values, trainer names) when each value is searched over
        a list; None when one is searched over a range."""
        if any(p.values is None for p in self.params.values()):
            return None
        out = []
        for optimizer in self.optimizers:
            names = [n for n in self.params if not (n.startswith("lr_") and n != f"lr_{optimizer}")]
            for combo in itertools.product(*(self.params[n].values for n in names)):
                values = {"scheme": self.scheme, "mode": self.mode, "optimizer": optimizer}
                values.update({"lr" if n.startswith("lr") else n: x for n, x in zip(names, combo)})
                out.append(values)
        return out

    def optuna_params(self, values: dict[str, Any]) -> dict[str, Any]:
        """A configuration's searched values (trainer names) under the names this space suggests them by."""
        optimizer = values.get("optimizer", self.optimizers[0])
        out: dict[str, Any] = {"optimizer": optimizer} if len(self.optimizers) > 1 else {}
        for name in self.params:
            if name.startswith("lr_") and name != f"lr_{optimizer}":
                continue                # another optimizer's range
            out[name] = values["lr" if name.startswith("lr") else name]
        return out

    def __call__(self, trial: Any) -> dict[str, Any]:
        optimizer = (trial.suggest_categorical("optimizer", self.optimizers) if len(self.optimizers) > 1
                     else self.optimizers[0])
        out = {"scheme": self.scheme, "mode": self.mode, "optimizer": optimizer}
        for name, p in self.params.items():
            if name.startswith("lr_") and name != f"lr_{optimizer}":
                continue                # another optimizer's range
            v = (trial.suggest_categorical(name, list(p.values)) if p.values is not None
                 else trial.suggest_float(name, p.low, p.high, log=p.log))
            if name.startswith("lr_"):
                out["lr"] = v
        return out


def study_storage(group_space: GroupSpace, records: list[Known]):
    """An Optuna in-memory storage holding one study, `STUDY`, told `records` before anything is proposed
    (warm start): a record trained as far as this sweep trains is COMPLETE with its best validation mAP, one
    that ASHA stopped (or that ran a smaller budget) PRUNED with its validation mAP per epoch (`told`)."""
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name=STUDY, direction="maximize")
    dists = group_space.distributions()
    for r in records:
        value, state = told(r)
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value, params=group_space.optuna_params(r.values), distributions=dists,
            intermediate_values={e: v for e, v in r.curve}))
    return storage


def told(record: Known):
    """(value, state) a study is told for a trained configuration.

    A configuration trained to the end is COMPLETE with its best validation mAP (what the final stage
    ranks by). One that ASHA stopped is PRUNED with its per-epoch values: its best so far is not its
    result, and TPE ranks PRUNED trials below every COMPLETE one (then by how far they got), which is what
    ASHA decided. (Ray's OptunaSearch tells a stopped trial COMPLETE with its last value.)
    """
    from optuna.trial import TrialState

    return (record.best[1], TrialState.COMPLETE) if record.complete else (None, TrialState.PRUNED)


STARTUP_SHARE = 0.25        # of a study's share of the trials: proposed at random before TPE models them (see tpe_sampler)


def tpe_sampler(seed: int, share: int):
    """A group's TPE: Optuna's sampler with the sweep's settings, for a study of `share` trials.

    `constant_liar` (a proposal made while others of the study are still running treats them as bad
    results, so it moves away from them instead of being an independent draw near the same optimum) and
    `multivariate` (lr and delta_rel modelled jointly) are Optuna 5's defaults, pinned here. TPE models the
    results after `n_startup_trials` random proposals: Optuna's 10 was more than most studies' share (8 in
    search_spaces/digits.yaml), so they were random searches; here it is a quarter of the share (at least
    2). bench/sweep.py (a lr x delta_rel grid, 15 search seeds, the digits space's ASHA, proposals made as
    slots free; median over schemes of epochs to within 1 mAP of the scheme's grid best / its grid epochs,
    one trial at a time / 8 in flight): these settings 0.26 / 0.39, Optuna's 10 start-up trials (half
    the bench's share of 20) 0.30 / 0.42, RandomSampler 0.37 / 0.46; a tenth of the share 0.27 / 0.38,
    constant_liar off 0.26 / 0.38 and multivariate off 0.27 / 0.36 are within the seeds' noise there
    (about 3 trials of a study in flight). With every trial proposed at once (max_concurrent =
    num_samples, the default) every proposal precedes every result and TPE is random search (0.37 / 0.46).
    """
    from optuna.samplers import TPESampler

    return TPESampler(seed=seed, constant_liar=True, multivariate=True,
                      n_startup_trials=max(2, round(STARTUP_SHARE * share)))


def build(space, metric: str, mode: str, known: list[Known] | None = None, marker=None
          ) -> tuple[PerSchemeSearch, PerSchemeScheduler]:
    """The sweep's searcher and scheduler: per (scheme, mode, BoostLU) group a seeded TPE study (told `known`, the
    warm-start records, first; its start points first among its proposals) and an ASHA on `metric` with
    the epoch as time. `marker(record, total)` is called when a record answers a proposal.

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
    for i, g in enumerate(groups):
        group_space = GroupSpace.of(space.search, g)
        grid = group_space.grid()
        grids[g] = None if grid is None else [(v, group_space.optuna_params(v)) for v in grid]
        storages[g] = study_storage(group_space, by_group.get(g, []))
        searchers[g] = OptunaSearch(
            space=group_space, metric=metric, mode=mode,
            points_to_evaluate=space.group_points(g) or None,
            sampler=tpe_sampler((space.search_seed + i) % 2**32, quota[g]),
            storage=storages[g], study_name=STUDY)
        schedulers[g] = ASHAScheduler(
            time_attr=EPOCH, max_t=space.epochs, grace_period=space.scheduler.grace_period,
            reduction_factor=space.scheduler.reduction_factor)
    return (PerSchemeSearch(searchers, quota, metric, mode, epochs=space.epochs,
                            known=[r for r in known or [] if r.reusable], marker=marker, grids=grids,
                            storages=storages, seed=space.search_seed),
            PerSchemeScheduler(schedulers))


class PerSchemeSearch(Searcher):
    """One Optuna study per group; trials handed out round robin up to each group's quota.

    No configuration is trained twice. A proposal equal to a configuration already trained (one of this
    sweep's finished trials, or a warm-start record; `orchestration.known`) is not handed to Tune: its
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
                 grids: dict[Group, list | None] | None = None, storages: dict | None = None, seed: int = 0):
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
        self.storages = dict(storages or {})     # each group's Optuna storage (its study: STUDY)
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
                optuna.load_study(study_name=STUDY, storage=self.storages[group]).enqueue_trial(params)
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
        print(f"note: {group.label}: {why}; its search ends after {self.assigned[group]} of "
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
        self.searchers[self.owner[trial_id]].on_trial_result(self.asked[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.owner:
            return
        searcher = self.searchers[self.owner[trial_id]]
        ask, curve = self.asked[trial_id], self.curves[trial_id]
        self.training.pop(trial_id, None)
        outcome = trial_outcome(result, self.epochs, ROLE_TRIAL)
        if error or not result or outcome.failed or not curve:
            searcher.on_trial_complete(ask, result=None, error=True)
            return
        complete = outcome.complete
        record = Known(group=self.owner[trial_id], values=self.values[trial_id], curve=sorted(curve.items()),
                       complete=complete, reusable=True, trial_id=trial_id)
        if record.better_than(self.known.get(record.key)):
            self.known[record.key] = record
        value, _ = told(record)
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

    # saved with the studies in one pickle: each study and `storages` keep sharing their storage
    _STATE = ("assigned", "owner", "asked", "values", "curves", "training", "known", "repeats", "reused", "closed",
              "grids", "storages", "rng")


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

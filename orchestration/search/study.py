"""One group's Optuna study: its define-by-run space (`GroupSpace`), its storage told the warm-start records,
and its TPE sampler. `orchestration.search.per_scheme` builds one per (scheme, mode[, BoostLU]) group.

A sweep's studies live in one Optuna journal file in the sweep's folder (`journal_path`, `open_journal`),
named after the sweep and the group (`study_name`), where `optuna-dashboard` shows them while they run.
"""
from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from orchestration.common import first_line, method_name, redact
from orchestration.search.known import Known
from orchestration.search.space import Group

STUDY = "wsml"              # the sweep name in the studies' names where a sweep has none (benchmarks, tests)
JOURNAL = "optuna.journal"  # the studies' file in the sweep's folder (see journal_path)


def journal_path(experiment: str) -> str | None:
    """The Optuna journal of the sweep whose folder (Ray's experiment, `<storage>/<sweep>`) is `experiment`.

    Beside Ray's state and the sweep's record rather than beside the MLflow store: --resume needs this
    folder anyway (the studies are wherever the sweep continues: on a cluster the shared storage a new
    head reads), an MLflow server has no folder, and one file per sweep goes with the sweep's folder when
    it is moved or deleted. None for a bucket (`s3://`): a journal is appended to in place, which an
    object store cannot do.
    """
    return None if "://" in experiment else f"{experiment.rstrip('/')}/{JOURNAL}"


def study_name(sweep: str, group: Group) -> str:
    """A group's study as optuna-dashboard lists it: after the sweep and the group (`demo/LL-R/end-to-end`)."""
    return f"{sweep}/{method_name(group.scheme, 1.0 if group.boostlu else None)}/{group.mode}"


def open_journal(experiment: str):
    """The Optuna storage of the sweep in `experiment` (`journal_path`), made with its folder; None, with a
    one-line warning, where it cannot be written: the studies are then kept in memory as they were before
    the journal (the sweep and --resume work the same; optuna-dashboard cannot show them)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    path = journal_path(experiment)
    if path is None:
        why = f"{redact(experiment)} is a bucket, where a journal file cannot be appended to"
    else:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            lock = JournalFileSymlinkLock(path)
            backend = JournalFileBackend(path, lock_obj=lock)
            # every write takes this lock (a symbolic link beside the file) first: a file system without
            # links fails here rather than at the sweep's first proposal
            lock.acquire()
            lock.release()
            return JournalStorage(backend)          # reads what the file holds
        except (OSError, RuntimeError, ValueError) as err:
            why = f"{redact(path)} cannot be written: {first_line(err)}"
    print(f"warning: the Optuna studies are kept in memory ({why}); optuna-dashboard cannot show them",
          file=sys.stderr)
    return None


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
    params: dict[str, Any]          # Optuna name -> orchestration.search.space.FloatParam, in the order suggested

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


def study_storage(group_space: GroupSpace, records: list[Known], storage=None, name: str = STUDY):
    """`storage` (None: a new in-memory one) holding a new study `name`, told `records` before anything is
    proposed (warm start): a record trained as far as this sweep trains is COMPLETE with its best validation
    mAP, one that ASHA stopped (or that ran a smaller budget) PRUNED with its validation mAP per epoch
    (`told`)."""
    storage = optuna.storages.InMemoryStorage() if storage is None else storage
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
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
    num_samples; the default is the cluster's slots, cluster/slots.py) every proposal precedes every
    result and TPE is random search (0.37 / 0.46).
    """
    from optuna.samplers import TPESampler

    return TPESampler(seed=seed, constant_liar=True, multivariate=True,
                      n_startup_trials=max(2, round(STARTUP_SHARE * share)))


def settle(storage, name: str, asked: dict[str, Any], told: set[str],
           adopted: dict[str, dict[str, Any]]) -> tuple[set[str], dict[str, Any]]:
    """A group's study `name` in a journal matched, on --resume, to its searcher as Tune restored it: `asked`
    (the searcher's id -> the Optuna trial it asked), `told` (the ids it has told a result) and `adopted`
    (Tune's trial id -> Optuna params: trials Tune holds that the searcher's checkpoint predates).

    Tune restores the searcher from its last checkpoint, while the journal goes on to when the driver
    stopped. A trial asked after that checkpoint is the place of an adopted trial of the same params
    (RUNNING, or already told by the stopped driver); any other ends FAIL, which TPE ignores (left RUNNING,
    the constant liar would count it as running for good), and a start point it had taken is queued
    again. Returns the ids whose trial the study has already ended (told again, Optuna refuses: their
    results are not told twice), and each adopted trial's place (an `optuna.Trial`; none found: a new one,
    `running_trial`).
    """
    from optuna.trial import TrialState

    study_ = optuna.load_study(study_name=name, storage=storage)
    trials = study_.get_trials(deepcopy=False)
    state = {t.number: t.state for t in trials}
    asked_numbers = {t.number for t in asked.values()}
    later = [t for t in trials if t.number not in asked_numbers and t.state != TrialState.WAITING]
    places: dict[str, Any] = {}
    for tid, params in adopted.items():
        twin = next((t for t in later if t.params == params and t not in places.values()
                     and t.state in (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)), None)
        if twin is not None:
            places[tid] = twin
    for t in later:
        if t.state == TrialState.RUNNING and t not in places.values():
            if t.system_attrs.get("fixed_params"):
                study_.enqueue_trial(t.system_attrs["fixed_params"])
            study_.tell(t.number, state=TrialState.FAIL)
    done = {ask for ask, t in asked.items() if ask not in told and state.get(t.number, TrialState.RUNNING).is_finished()}
    done |= {tid for tid, t in places.items() if t.state.is_finished()}
    sid = storage.get_study_id_from_name(name)
    return done, {tid: optuna.trial.Trial(study_, storage.get_trial_id_from_study_id_trial_number(sid, t.number))
                  for tid, t in places.items()}


def running_trial(storage, name: str, params: dict[str, Any], distributions: dict[str, Any]):
    """A new RUNNING trial of study `name` holding `params`, made without asking the sampler: the place in
    the study of a trial Tune restored that its searcher's checkpoint predates."""
    from optuna.trial import Trial, TrialState, create_trial

    study_ = optuna.load_study(study_name=name, storage=storage)
    frozen = create_trial(state=TrialState.RUNNING, params=params,
                          distributions={k: distributions[k] for k in params})
    return Trial(study_, storage.create_new_trial(storage.get_study_id_from_name(name), template_trial=frozen))


def dashboard_command(journal: str) -> str:
    """The command that opens a sweep's studies in optuna-dashboard (http://127.0.0.1:8080 by default)."""
    import shlex

    return f"optuna-dashboard {shlex.quote(redact(journal))}"

"""The one place a `tune.Tuner` is built: the search, the final stage and the benchmarks share it.

`build` makes a Tuner over a trainable with the space file's resources,
failure handling (`max_failures`) and checkpoint retention
(`keep_checkpoints`), trial folders named by `orchestration.trial.dirname`,
and either the sweep's search (seeded Optuna TPE over the space, its start
points first, with ASHA on validation mAP and the epoch as time) or a plain
grid (the final stage's (configuration, seed) points; the benchmarks' grid).
The search is per scheme: each (scheme, mode) has its own share of the
trials, its own TPE study and its own ASHA brackets.

How many search trials pend at once is `max_concurrent` (the space's, or
unset, the cluster's trial slots: cluster/slots.py). With a searcher and no
limit, Tune keeps ONE trial pending (`TUNE_MAX_PENDING_TRIALS_PG` "auto"), so an
autoscaler sees one trial's demand at a time and adds nodes one by one. With
the searcher in a `ConcurrencyLimiter` (`per_scheme.Limiter`), its "auto" keeps
that many pending (`_get_max_pending_trials` in Ray 2.60's
tune_controller.py), so no environment variable is needed (one set by the user
still wins). The final stage's grid has no searcher: Tune lets up to 200 of
its trials pend.
`restore` continues one from its folder; `interrupted` reads from Tune's
results whether it was stopped before it ended; `planned_trials` and
`search_outcome` read what the search did (trials planned, proposals answered
from recorded results, groups that ran out of new configurations).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

from orchestration import trial as trial_config
from orchestration.common import METRIC, MODE, redact, result_rows
from orchestration.search import per_scheme, study
from orchestration.search.space import SweepSpace

log = logging.getLogger(__name__)


def searcher_and_scheduler(space: SweepSpace, known=None, marker=None, experiment: str | None = None,
                           sweep: str = study.STUDY):
    """The sweep's search: per (scheme, mode), a seeded Optuna TPE study (told the warm-start records
    `known`, its start points first) with its share of the trials, no configuration trained twice, and
    ASHA on validation mAP with the epoch as time (`orchestration.search.per_scheme`); the studies are kept
    in the Optuna journal in the sweep's folder `experiment` (None: in memory)."""
    return per_scheme.build(space, METRIC, MODE, known=known, marker=marker, experiment=experiment, sweep=sweep)


def build(space: SweepSpace, *, name: str, storage: str, trainable: Callable, resources: dict[str, float],
          param_space: dict[str, Any], num_samples: int, search: bool, callbacks: list | None = None,
          reporter=None, verbose: int = 1, known=None, marker=None, max_concurrent: int | None = None):
    """A Tuner for `name` under `storage`; `search` adds the sweep's searcher and scheduler (`known`,
    `marker`: see `searcher_and_scheduler`), its studies in the Tuner's folder, proposing `max_concurrent`
    trials ahead of results (None: the space's `concurrency`)."""
    from ray import tune

    searcher, scheduler = (searcher_and_scheduler(space, known, marker, f"{storage.rstrip('/')}/{name}", name)
                           if search else (None, None))
    if searcher is not None:
        searcher = per_scheme.Limiter(searcher, max_concurrent=max_concurrent or space.concurrency)
    return tune.Tuner(
        tune.with_resources(trainable, resources), param_space=param_space,
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                    num_samples=num_samples, reuse_actors=True,
                                    trial_dirname_creator=trial_config.dirname),
        run_config=tune.RunConfig(
            name=name, storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=space.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=space.keep_checkpoints),
            callbacks=callbacks or [], progress_reporter=reporter, verbose=verbose))


def restore(path: str, trainable: Callable, resources: dict[str, float], keep_checkpoints: int,
            moved: dict[str, str] | None = None):
    """The Tuner saved at `path`, to continue it: unfinished and errored trials resume from their checkpoints.

    Tune restores each trial's config as the trial started; `moved` (then -> now: the data and cache
    folders of a sweep continued from where they moved, `orchestration.search.plan.Plan.moved_paths`)
    gives the trials the folders of now.

    Tune refuses to restore a trial whose latest checkpoint folder is gone
    ("does not exist on storage anymore") and fails it for good. So where a
    trial's recent checkpoints were deleted, an empty folder is put in their
    place first: the trial's own restore (`orchestration.run.trainable.restore`)
    then falls back to an earlier checkpoint or starts over from epoch 1.
    """
    from ray import tune

    from orchestration.run import private

    for folder in stand_in_for_lost_checkpoints(path, keep_checkpoints):
        log.info(f"note: the checkpoints of trial folder {redact(folder)} are gone: that trial starts over")
    if moved:
        trainable = _with_paths(trainable, moved)
    restored = tune.Tuner.restore(path, trainable=tune.with_resources(trainable, resources), resume_errored=True)
    searcher = private.tuner_searcher(restored)
    if isinstance(searcher, per_scheme.PerSchemeSearch):
        searcher.relocate(path)         # its studies' journal as found now, before Tune restores the searcher
    return restored


def _with_paths(trainable: Callable, moved: dict[str, str]) -> Callable:
    """`trainable` with a trial config's data and cache folders that are in `moved` replaced."""

    def at_new_paths(config: dict[str, Any]) -> Any:
        config = dict(config)
        train = dict(config.get("train") or {})
        if config.get("data_root") in moved:
            config["data_root"] = moved[config["data_root"]]
        if train.get("cache_dir") in moved:
            train["cache_dir"] = moved[train["cache_dir"]]
        return trainable({**config, "train": train})

    at_new_paths.__name__ = trainable.__name__      # Tune restores the trials of the trainable of that name
    return at_new_paths


def stand_in_for_lost_checkpoints(path: str, keep_checkpoints: int) -> list[str]:
    """Make the missing folders of each trial's last checkpoints (named in its result.json) that are newer
    than any it still has; returns the trial folders that needed them."""
    import posixpath
    import re

    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(path) if "://" in path else (pyarrow.fs.LocalFileSystem(), path)
    repaired = []
    for trial in fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True)):
        if trial.type != pyarrow.fs.FileType.Directory:
            continue
        try:
            rows = result_rows(fs, trial.path)
        except OSError:
            continue
        names = list(dict.fromkeys(n for r in rows if (n := r.get("checkpoint_dir_name"))))
        have = [int(m.group(1)) for i in fs.get_file_info(pyarrow.fs.FileSelector(trial.path))
                if (m := re.fullmatch(r"checkpoint_(\d+)", i.base_name))]
        newest = max(have, default=-1)
        lost = [n for n in names[-(keep_checkpoints + 1):]
                if (m := re.fullmatch(r"checkpoint_(\d+)", n)) and int(m.group(1)) > newest]
        for name in lost:
            fs.create_dir(posixpath.join(trial.path, name), recursive=True)
        if lost:
            repaired.append(trial.path)
    return repaired


def planned_trials(the_tuner) -> int:
    """The trials the sweep's search (a Tuner built with `search`) hands to Tune: num_samples, less what
    groups whose space ran out did not use (`orchestration.search.per_scheme.PerSchemeSearch.planned`)."""
    from orchestration.run import private

    return private.tuner_searcher(the_tuner).planned


@dataclass
class SearchOutcome:
    """What the sweep's search did besides its trials."""

    reused: list[dict]              # proposals answered from recorded results (not trained)
    closed: dict                    # Group -> why its search ended before its share
    earlier: list                   # orchestration.search.known.Known of earlier sweeps (--warm-start)
    journal: str | None = None      # the Optuna journal holding the studies (None: kept in memory)


def search_outcome(the_tuner) -> SearchOutcome:
    """After `fit` of the sweep's search: its outcome; the MLflow marks of reused results are delivered."""
    from orchestration.run import private

    searcher = private.tuner_searcher(the_tuner)
    if searcher.marker is not None:
        searcher.marker.finish()
    return SearchOutcome(reused=list(searcher.reused), closed=dict(searcher.closed),
                         earlier=[r for r in searcher.known.values() if r.sweep], journal=searcher.journal)


def interrupted(results, expected: int) -> bool:
    """Whether the Tuner that gave `results` was stopped before it ended (Ctrl-C, SIGTERM).

    Tune marks the last result of every trial that ended (it finished, ASHA
    stopped it, it diverged) `done`; a trial that failed for good has its
    error. A trial stopped with the Tuner has neither, one never started has
    no result at all, and a searcher stopped early proposed fewer than
    `expected` trials.
    """
    cut = any(r.error is None and not (r.metrics or {}).get("done") for r in results)
    return cut or len(results) < expected

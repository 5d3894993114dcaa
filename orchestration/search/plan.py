"""A sweep's plan: the command line and the space file checked into a `Plan` before anything is created.

Every input (options, space file, data set and its identity, storage folder, MLflow URI, Ray address,
--resume's record, --warm-start's sweeps) is checked here; a bad one raises `SweepError` with one line,
and nothing (no sweep folder, MLflow run or cache) exists yet. `orchestration/run/runner.py` runs a plan.

--resume takes the sweep's MLflow store, data and cache folders from its record; given again
(--mlflow-uri, --data-root, --cache-dir) they apply, checked to be the sweep's own store and data. A
sweep folder that moved since it started (`orchestration.run.record.Moved`: a working directory moved
with the store and cache beside its storage) finds them where they moved; the one write of a plan
is then to point the moved local store's artifact locations at their new place.
"""
from __future__ import annotations

import logging
import argparse
import datetime as _dt
import os
import shlex
from dataclasses import dataclass
from pathlib import Path


from orchestration.cost import estimate, throughput
from orchestration.search import known
from orchestration.run import preflight, record
from orchestration.tracking import store
from orchestration import trial as trial_config
from orchestration.common import FINAL_SUFFIX, SweepError, redact
from orchestration.search.space import SweepSpace, load_space, space_from_dict, with_overrides

log = logging.getLogger(__name__)



@dataclass
class Plan:
    """A sweep, checked: everything the later steps need, and nothing created yet."""

    name: str
    storage: str
    space: SweepSpace
    uri: str                        # the MLflow store, absolute
    address: str | None             # None: Ray in-process
    data_root: str | None
    cache_dir: str                  # decoded images / features, once per node (same path on every node)
    results_dir: str
    command: str                    # the command line, redacted
    previous: record.SweepRecord | None = None   # the sweep continued by --resume
    verbose: bool = False           # Ray's progress table instead of orchestration.run.progress's lines
    warm: known.WarmStart | None = None          # --warm-start: earlier sweeps' records
    gpus: float | None = None                    # --gpus / --gpu-type: the estimate's devices
    gpu_type: str | None = None
    data_id: str | None = None      # the identity of the data (None: the data set is not on this machine)
    lock: record.DriverLock | None = None   # held while this driver runs the sweep (one driver at a time)
    concurrency: int | None = None  # trials proposed ahead of results when the space leaves it open (cluster/slots.py)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def moved_paths(self) -> dict[str, str]:
        """The data and cache folders of a continued sweep that are elsewhere now (then -> now): the trials
        Tune restores keep the folders of their start in their configs."""
        if self.previous is None:
            return {}
        pairs = ((self.previous.data_root, self.data_root), (self.previous.cache_dir, self.cache_dir))
        return {a: b for a, b in pairs if a and b and a != b}

    @property
    def path(self) -> str:
        return f"{self.storage}/{self.name}"

    @property
    def resume(self) -> bool:
        return self.previous is not None

    def base(self) -> dict:
        """The trials' constant config (Tune's param_space before the searched values)."""
        s = self.space
        return trial_config.base_config(dataset=s.dataset, epochs=s.epochs, train=s.train, sweep=self.name,
                                        data_root=self.data_root, cache_dir=self.cache_dir, data_id=self.data_id)

    def train_config(self):
        """The `TrainConfig` of the sweep's first group: what every trial shares (data, cache)."""
        group = {"scheme": self.space.search.scheme[0], "mode": self.space.search.mode[0]}
        return trial_config.Trial.parse({**self.base(), **group}).train_config()


def _overridden(args: argparse.Namespace, loaded: SweepSpace) -> SweepSpace:
    """The space file with the command line's overrides, as a new sweep takes it."""
    return with_overrides(loaded, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                          epochs=args.epochs, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                          final_seeds=args.final_seeds, max_failures=args.max_failures,
                          search_seed=args.search_seed, schemes=preflight.parse_schemes(args.schemes),
                          boostlu=args.boostlu)


# What a sweep takes at its start only: with --resume, an option that would change it is refused by name
# (the same command again, as a SLURM job's resubmission sends it, passes; --final-seeds applies).
_FIXED = (("--epochs", "epochs", lambda s: s.epochs), ("--num-samples", "num_samples", lambda s: s.num_samples),
          ("--max-concurrent", "max_concurrent", lambda s: s.concurrency),
          ("--max-failures", "max_failures", lambda s: s.max_failures),
          ("--cpus-per-trial", "cpus_per_trial", lambda s: s.resources.cpus_per_trial),
          ("--gpus-per-trial", "gpus_per_trial", lambda s: s.resources.gpus_per_trial),
          ("--schemes", "schemes", lambda s: s.search.scheme), ("--search-seed", "search_seed", lambda s: s.search_seed),
          ("--boostlu", "boostlu", lambda s: s.search.boostlu))


def _check_unchanged(args: argparse.Namespace, started: SweepSpace) -> None:
    given = [(opt, value) for opt, attr, value in _FIXED if getattr(args, attr) not in (None, False)]
    if not given and args.space is None:
        return
    now = _overridden(args, load_space(args.dataset, args.space) if args.space else started)
    changed = [opt for opt, value in given if value(now) != value(started)]
    if not changed and args.space and {**now.to_dict(), "source": "", "final_seeds": 0} != \
            {**started.to_dict(), "source": "", "final_seeds": 0}:
        changed = ["--space"]
    if changed:
        raise SweepError(f"{changed[0]} would change sweep {args.name or 'being resumed'} from how it started: "
                         "--resume continues it with the settings in its record; drop the option, or start a new "
                         "sweep with it (another --name)")


def plan(args: argparse.Namespace, argv: list[str]) -> Plan:
    """Check every input (SweepError naming the first bad one); creates nothing."""
    preflight.check_working_directory()     # first: every relative path below is made from it
    preflight.check_dataset(args.dataset)
    if args.dry_run and args.resume:
        raise SweepError("--dry-run estimates a new sweep: drop --resume (or --dry-run)")
    if args.gpu_type is not None and args.gpu_type not in throughput.GPUS:
        raise SweepError(f"--gpu-type {args.gpu_type!r} is not in the throughput table: choose one of "
                         f"{', '.join(throughput.gpu_names())}")
    if args.gpus is not None and not args.gpus > 0:
        raise SweepError(f"--gpus {args.gpus:g}: give a positive number of GPUs")
    warm_names = known.parse(args.warm_start)
    storage = preflight.resolve_storage(args.storage)
    preflight.check_results_dir(args.results_dir)
    command = redact(" ".join(shlex.quote(a) for a in argv))
    if args.resume:
        previous = record.find_resumable(storage, args.dataset, args.name)
        _check_unchanged(args, space_from_dict(previous.space))
        lock = record.DriverLock(storage, previous.name)        # before anything of the sweep is touched
        space = space_from_dict(previous.space)
        if args.final_seeds is not None:
            space = with_overrides(space, final_seeds=args.final_seeds)
        if warm_names is not None:
            log.info("note: --resume keeps what the sweep was told at its start (--warm-start ignored)")
        uri, data_root, cache_dir = _where_now(args, previous, storage)
        sweep = Plan(name=previous.name, storage=storage, space=space, uri=uri, address=None,
                     data_root=data_root, cache_dir=cache_dir, results_dir=args.results_dir,
                     command=command, previous=previous, lock=lock)
    else:
        loaded = load_space(args.dataset, args.space)
        space = _overridden(args, loaded)
        if space.scheduler.grace_period != loaded.scheduler.grace_period:
            rungs = estimate.asha_rungs(space.scheduler.grace_period, space.scheduler.reduction_factor, space.epochs)
            log.info(f"note: --epochs {space.epochs} (the space: {loaded.epochs}): ASHA's grace period "
                  f"{loaded.scheduler.grace_period} -> {space.scheduler.grace_period}, comparing trials at epoch(s) "
                  f"{', '.join(str(r) for r in rungs if r < space.epochs) or 'none (too few epochs)'}")
        name = args.name or f"{args.dataset}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        preflight.check_name(name)
        for n in (name, name + FINAL_SUFFIX):
            if record.exists(storage, n):
                raise SweepError(f"sweep {n!r} already exists in {storage}: pass --resume to continue it or "
                                 "choose another --name")
        remote_hint = args.address is not None or bool(os.environ.get("RAY_ADDRESS"))
        # a dry run estimates before the data is downloaded: a missing data set is no error then
        data_root = (preflight.data_root_path(args.dataset, args.data_root) if args.dry_run
                     else preflight.check_data_root(args.dataset, args.data_root, remote_hint))
        sweep = Plan(name=name, storage=storage, space=space,
                     uri=store.credentials_to_env(store.resolve_uri(args.mlflow_uri) if args.mlflow_uri
                                                  else store.default_uri()),
                     address=None, data_root=data_root,
                     cache_dir=preflight.resolve_cache_dir(args.cache_dir, args.dataset, data_root, space.train),
                     results_dir=args.results_dir, command=command, gpus=args.gpus, gpu_type=args.gpu_type)
    then = sweep.previous
    elsewhere = then is not None and sweep.uri != then.mlflow_uri     # the store moved, or given anew
    preflight.check_store(sweep.uri, sweep.name, sweep.resume,
                          (then.experiment_id, then.parent_run_id) if elsewhere and then else None)
    _check_data(sweep, args.dry_run)
    if elsewhere and then is not None:
        _follow_store(then.mlflow_uri, sweep.uri)
    if warm_names is not None and not sweep.resume:
        if sweep.data_id is None:
            raise SweepError(f"--warm-start needs the data set on this machine, to reuse only results trained on "
                             f"the same data: run the sweep where {sweep.data_root} is, or drop --warm-start")
        sweep.warm = known.load(sweep.uri, warm_names, sweep.space, sweep.base(), sweep.name)
    sweep.address = preflight.resolve_address(args.address)
    if sweep.address is None:               # trials on this machine: its own folders
        preflight.check_ray_temp_dir()      # Ray started in-process keeps its session there
        preflight.check_weights_cache(sweep.train_config())
    sweep.verbose = args.verbose
    return sweep


def _where_now(args: argparse.Namespace, previous: record.SweepRecord, storage: str) -> tuple[str, str | None, str]:
    """(MLflow URI, data folder, cache folder) of a sweep continued with --resume: given again, else found
    where they moved with the sweep's storage, else as its record says."""
    moved = record.moved(previous.storage, storage)
    uri = previous.mlflow_uri
    if args.mlflow_uri:     # given again (its credentials too: the record keeps none), or where it is now
        uri = store.credentials_to_env(store.resolve_uri(args.mlflow_uri))
    elif moved is not None and (db := store.local_path(uri)) is not None:
        uri = store.at_path(uri, Path(moved.find(str(db))))
    if args.data_root and previous.data_root is not None:
        data_root: str | None = preflight.data_root_path(previous.dataset, args.data_root)
    else:
        data_root = moved.find(previous.data_root) if moved and previous.data_root else previous.data_root
    if args.cache_dir:
        cache_dir = str(Path(args.cache_dir).expanduser().resolve())
    else:
        cache_dir = moved.find(previous.cache_dir, made_if_missing=True) if moved else previous.cache_dir
    if moved is not None:
        found = [f"{what} {redact(str(now))}" for what, then, now in (
            ("MLflow store", previous.mlflow_uri, uri), ("data", previous.data_root, data_root),
            ("cache", previous.cache_dir, cache_dir)) if now != then]
        log.info(f"note: sweep {previous.name} started in {moved.before} and is continued from {moved.now}"
              + (f": using {', '.join(found)} found there" if found else ""))
    return uri, data_root, cache_dir


def _follow_store(then: str, now: str) -> None:
    """A continued sweep's store is at `now`, not at `then` where its record (and Tune's saved writers) name
    it: the writers follow; a local store moved from its folder gets its artifact locations pointed beside
    it, so the tables attached at the end are not written at the old place."""
    from orchestration.tracking import store_copy

    store.follow(then, now)
    a, b = store.local_path(then), store.local_path(now)
    if a is None or b is None or not now.startswith("sqlite:") or a.parent == b.parent or a.parent.exists():
        return
    with store.lock(now):
        store_copy.relocate(b, a.parent, b.parent)


def _check_data(sweep: Plan, dry_run: bool) -> None:
    """The identity of the sweep's data, its images checked (`preflight.data_identity`); a sweep continued
    with --resume must find the data it started on."""
    if dry_run and sweep.data_root is not None and not Path(sweep.data_root).is_dir():
        return      # a dry run estimates before the data set is downloaded
    sweep.data_id = preflight.data_identity(sweep.train_config())
    then = sweep.previous.data_id if sweep.previous is not None else ""
    if then and sweep.data_id is not None and sweep.data_id != then:
        raise SweepError(f"the data set at {sweep.data_root} is not the one sweep {sweep.name} started on (data "
                         f"{then} then, {sweep.data_id} now): put that data back, or start a new sweep on it")


def estimate_for(sweep: Plan, cpus_per_trial: float, gpus_per_trial: float, cpus: float | None, gpus: float,
              gpu_name: str | None, where: str) -> estimate.Estimate:
    if sweep.gpus is not None:
        gpus, where = sweep.gpus, "--gpus"
        cpus = cpus if gpus_per_trial == 0 else None      # the GPUs given are not this machine's
    return estimate.for_resources(sweep.space, sweep.data_root, cpus_per_trial=cpus_per_trial,
                                  gpus_per_trial=gpus_per_trial, cpus=cpus, gpus=gpus, gpu_name=gpu_name,
                                  gpu_type=sweep.gpu_type, where=where)

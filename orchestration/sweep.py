#!/usr/bin/env python
"""Sweep the large-loss trainer with Ray Tune, Optuna, ASHA and MLflow.

    python orchestration/sweep.py --dataset digits                # Ray in-process, MLflow in ./mlflow.db
    python orchestration/sweep.py --dataset cub --address auto    # join the running cluster (on its head)
    python orchestration/sweep.py --dataset digits --name N --resume   # continue an interrupted sweep

A sweep runs in four steps: every input is checked before anything is created
(`plan`); Ray, the sweep's MLflow run and the sweep record are set up; the
search runs (seeded Optuna TPE over `search_spaces/<dataset>.yaml`, the
paper's default configurations first, ASHA stopping weak trials on validation
mAP with the epoch as time; every trial one `wsml.train.run` that checkpoints
each epoch); then each scheme's best configuration is rerun with
`--final-seeds` seeds, the best configurations are printed and
`orchestration/aggregate.py` writes the tables. Every trial is a nested MLflow
run of the sweep's run.

A bad option, space file, data set, storage folder, MLflow URI or Ray address
prints one line `error: ...` on stderr and exits with status 2, leaving no
sweep folder and no MLflow run behind. Ctrl-C stops the trials at their last
checkpoint, ends their runs KILLED, prints the command that continues the
sweep and exits with status 130; SIGTERM and SIGHUP do the same (status 143, 129).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from wsml.config import DATASETS, SCHEMES
from wsml.errors import WSMLError

from orchestration import cluster, estimate, final, known, preflight, progress, record, store, throughput, tuner
from orchestration import trial as trial_config
from orchestration.common import FINAL_SUFFIX, ROLE_FINAL, ROLE_TRIAL, SweepError, first_line, redact
from orchestration.mlflow_callback import MLflowTrialLogger
from orchestration.space import SweepSpace, load_space, space_from_dict, with_overrides

ROOT = Path(__file__).resolve().parent.parent


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        raise SweepError(f"{message} (see --help)")


# `--help` starts with these (argparse prints them after "usage: ")
EXAMPLES = """python orchestration/sweep.py --dataset digits                      # Ray in-process, MLflow in ./mlflow.db, tables in results/
       python orchestration/sweep.py --dataset cub --address auto          # on a running Ray cluster (run it on the head)
       python orchestration/sweep.py --dataset digits --name N --resume    # continue a stopped sweep"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="orchestration/sweep.py", usage=EXAMPLES, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--space", help="search-space YAML (default search_spaces/<dataset>.yaml)")
    p.add_argument("--address", help="Ray cluster to join: auto or host:port (default: start Ray in-process; "
                                     "$RAY_ADDRESS is honoured)")
    p.add_argument("--num-samples", type=int, help="trials to run (default: the space file's num_samples)")
    p.add_argument("--max-concurrent", type=int,
                   help="trials proposed and pending at once, so an autoscaler starts every node they need "
                        "together (default: the space file's max_concurrent, else num_samples)")
    p.add_argument("--epochs", type=int, help="epochs per trial, ASHA's max_t (default: the space file's)")
    p.add_argument("--name", help="sweep name: Ray experiment folder and MLflow experiment "
                                  "(default <dataset>-<YYYYmmdd-HHMMSS>; with --resume: the latest sweep of the data set)")
    p.add_argument("--storage", default=os.environ.get("WSML_STORAGE") or "ray_results",
                   help="where Ray keeps results and checkpoints: a folder (default $WSML_STORAGE, which the "
                        "cluster files set to shared storage, else ./ray_results) or a bucket URI; on a "
                        "multi-node cluster a path every node shares")
    p.add_argument("--cache-dir", help="decoded-image cache, the same path on every node (default: "
                                       "$WSML_SHARED_CACHE for a compact cache, $WSML_CACHE for a raw one, as "
                                       "the cluster files set them; else ./.cache)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLflow's default, sqlite mlflow.db "
                                        "in the working directory, or $MLFLOW_TRACKING_URI)")
    p.add_argument("--resume", action="store_true", help="continue the sweep --name (or the latest one)")
    p.add_argument("--max-failures", type=int, help="retries of a failed trial from its last checkpoint")
    p.add_argument("--cpus-per-trial", type=float)
    p.add_argument("--gpus-per-trial", type=float, help="a fraction (0.5) packs trials on a GPU; "
                                                        "ignored where the cluster has no GPU")
    p.add_argument("--final-seeds", type=int, help="seeds of the final reruns of each scheme's best "
                                                   "configuration (0 skips the final stage)")
    p.add_argument("--schemes", help=f"comma list replacing the space's schemes, from {','.join(SCHEMES)}")
    p.add_argument("--search-seed", type=int, help="seed of Optuna's TPE sampler")
    p.add_argument("--boostlu", action="store_true", help="search every scheme with the BoostLU head too "
                                                          "(rows of their own: \"LL-R + BoostLU\")")
    p.add_argument("--data-root", help="data set folder (default data/<dataset>; unused for digits)")
    p.add_argument("--results-dir", default="results", help="where the aggregated tables go (default results)")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's progress table every 15 s and the libraries' info lines (default: a line per trial "
                        "event and a status line every 30 s)")
    p.add_argument("--warm-start", metavar="NAME[,NAME]|auto",
                   help="tell each scheme's searcher the results of earlier sweeps of the data set in the MLflow "
                        "store before it proposes (auto: every earlier sweep of the data set); configurations "
                        "they trained are not trained again")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything a start checks, print what the sweep will cost (trials, epochs, images, "
                        "GPU-hours, wall time) and stop: nothing is started or created")
    p.add_argument("--gpus", type=float, help="the GPUs the estimate's wall time is for (default: those of the "
                                              "cluster at --address, else this machine's)")
    p.add_argument("--gpu-type", help=f"the GPU of the estimate, one of {', '.join(throughput.gpu_names())} "
                                      "(default: the GPUs found, else A10G)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ 1. plan
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
    verbose: bool = False           # Ray's progress table instead of orchestration.progress's lines
    warm: known.WarmStart | None = None          # --warm-start: earlier sweeps' records
    gpus: float | None = None                    # --gpus / --gpu-type: the estimate's devices
    gpu_type: str | None = None

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
                                        data_root=self.data_root, cache_dir=self.cache_dir)


def plan(args: argparse.Namespace, argv: list[str]) -> Plan:
    """Check every input (SweepError naming the first bad one); creates nothing."""
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
        space = space_from_dict(previous.space)
        if args.final_seeds is not None:
            space = with_overrides(space, final_seeds=args.final_seeds)
        if args.mlflow_uri and store.resolve_uri(args.mlflow_uri) != previous.mlflow_uri:
            print(f"note: --resume keeps the sweep's MLflow store {redact(previous.mlflow_uri)} (--mlflow-uri ignored)")
        if warm_names is not None:
            print("note: --resume keeps what the sweep was told at its start (--warm-start ignored)")
        sweep = Plan(name=previous.name, storage=storage, space=space, uri=previous.mlflow_uri, address=None,
                     data_root=previous.data_root, cache_dir=previous.cache_dir, results_dir=args.results_dir,
                     command=command, previous=previous)
    else:
        loaded = load_space(args.dataset, args.space)
        space = with_overrides(loaded, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                               epochs=args.epochs,
                               cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                               final_seeds=args.final_seeds, max_failures=args.max_failures,
                               search_seed=args.search_seed, schemes=preflight.parse_schemes(args.schemes),
                               boostlu=args.boostlu)
        if space.scheduler.grace_period != loaded.scheduler.grace_period:
            print(f"note: --epochs {space.epochs} is below ASHA's grace period {loaded.scheduler.grace_period}: "
                  f"grace period {space.scheduler.grace_period}")
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
                     uri=store.resolve_uri(args.mlflow_uri) if args.mlflow_uri else store.default_uri(),
                     address=None, data_root=data_root,
                     cache_dir=preflight.resolve_cache_dir(args.cache_dir, args.dataset, data_root, space.train),
                     results_dir=args.results_dir, command=command, gpus=args.gpus, gpu_type=args.gpu_type)
    preflight.check_store(sweep.uri, sweep.name, sweep.resume)
    if warm_names is not None and not sweep.resume:
        sweep.warm = known.load(sweep.uri, warm_names, sweep.space, sweep.base(), sweep.name)
    sweep.address = preflight.resolve_address(args.address)
    sweep.verbose = args.verbose
    return sweep


# ------------------------------------------------------------- 1b. estimate
def dry_run(sweep: Plan) -> int:
    """`--dry-run`: the estimate of a checked sweep, from the devices of `--address` (or `--gpus`), else this
    machine's; neither Ray nor a trial is started, and no store, run, folder or cache is created."""
    print(f"dry run of sweep {sweep.name} ({sweep.space.dataset}, {sweep.space.source}): every input checked; "
          "nothing started or created")
    if sweep.warm is not None:
        print(sweep.warm.summary())
    if sweep.address is not None:
        cpus, gpus, gpu_name = cluster.describe(sweep.address)
        where = f"the Ray cluster at {sweep.address}"
    else:
        cpus, gpus, gpu_name = cluster.local_devices()
        where = "this machine"
    for line in _estimate(sweep, sweep.space.resources.cpus_per_trial, sweep.space.resources.gpus_per_trial,
                          cpus, gpus, gpu_name, where).lines():
        print(line)
    return 0


def _estimate(sweep: Plan, cpus_per_trial: float, gpus_per_trial: float, cpus: float, gpus: float,
              gpu_name: str | None, where: str) -> estimate.Estimate:
    if sweep.gpus is not None:
        gpus, where = sweep.gpus, "--gpus"
        cpus = cpus if gpus_per_trial == 0 else None      # the GPUs given are not this machine's
    return estimate.for_resources(sweep.space, sweep.data_root, cpus_per_trial=cpus_per_trial,
                                  gpus_per_trial=gpus_per_trial, cpus=cpus, gpus=gpus, gpu_name=gpu_name,
                                  gpu_type=sweep.gpu_type, where=where)


# ------------------------------------------------------------------ 2. run
@dataclass
class Tracking:
    """The sweep's place in MLflow."""

    client: object
    experiment_id: str
    parent_run_id: str

    def logger(self, sweep: Plan, role: str) -> MLflowTrialLogger:
        return MLflowTrialLogger(sweep.uri, self.experiment_id, self.parent_run_id, sweep.name,
                                 sweep.space.dataset, role, sweep.space.epochs)


def run_sweep(sweep: Plan) -> int:
    """Run a planned sweep: Ray, MLflow and the record, the search, the final stage, the tables."""
    t0 = time.time()            # the progress lines count from here
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")       # Tune's output engine that takes our reporter
    # Tune snapshots the experiment state whenever a trial has made num_to_keep
    # checkpoints; with epochs of seconds (digits) it warns about that: quiet.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray

    if not sweep.verbose:
        progress.quiet_logs()
    started = cluster.connect(sweep.address)
    STOP.install()          # again: ray.init puts its own SIGTERM handler (sys.exit) in place
    interrupted = False
    try:
        if sweep.resume:
            resources = sweep.previous.resources
        else:
            r = sweep.space.resources
            resources = cluster.trial_resources(r.cpus_per_trial, r.gpus_per_trial, remote=sweep.address is not None)
        cost = None if sweep.resume else _estimate_here(sweep, resources)
        with store.lock(sweep.uri):      # a sweep started at the same moment waits here (see store.lock)
            c = store.client(sweep.uri)
            experiment_id, parent_id = store.start_parent(c, sweep.name, sweep.space.dataset,
                                                          _sweep_params(sweep, resources, cost), resume=sweep.resume)
        tracking = Tracking(c, experiment_id, parent_id)
        status = "FAILED"
        try:
            interrupted = _search_and_final(sweep, tracking, resources, started=t0)
            status = "KILLED" if interrupted else "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            try:
                store.end_parent(c, parent_id, status)
            except Exception as err:  # noqa: BLE001
                print(f"warning: could not end the sweep's MLflow run: {first_line(err)}", file=sys.stderr)
    finally:
        if started:
            ray.shutdown()
    if interrupted:
        print(f"\ninterrupted: continue with  python orchestration/sweep.py --dataset {sweep.space.dataset} "
              f"--name {sweep.name} --storage {redact(sweep.storage)} --resume")
        return STOP.status
    _aggregate(sweep, tracking)
    return 0


def _estimate_here(sweep: Plan, resources: dict) -> estimate.Estimate | None:
    """The estimate on the cluster the sweep runs on (printed, and logged beside what is spent)."""
    cpus, gpus, gpu_name = cluster.connected_devices()
    try:
        cost = _estimate(sweep, resources["cpu"], resources["gpu"], cpus, gpus, gpu_name, "the Ray cluster")
    except SweepError as err:
        print(f"note: no estimate of this sweep's cost: {err}")
        return None
    print(f"estimate: {cost.search_epochs_expected + cost.final_epochs:.0f} epochs, "
          f"{cost.device_hours:.3g} {'GPU' if cost.gpus_per_trial > 0 else 'trial'}-hours, wall time "
          f"{cost.wall_seconds:.0f} s with {cost.slots} trial(s) at once (python orchestration/sweep.py ... "
          "--dry-run tells how)")
    return cost


def _sweep_params(sweep: Plan, resources: dict, cost: estimate.Estimate | None = None) -> dict[str, str]:
    """The sweep run's MLflow params (credentials masked by `store.start_parent`)."""
    out = {**sweep.space.summary(), "command": sweep.command, "git_commit": _git_commit(),
           "storage": sweep.path, "ray_address": sweep.address or "local", "resources": json.dumps(resources)}
    if sweep.warm is not None:
        out["warm_start"] = ",".join(sweep.warm.sweeps) or "none found"
    return {**out, **(cost.params() if cost is not None else {})}


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() if out.returncode == 0 else "none"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _fit(the_tuner, logger: MLflowTrialLogger, expected: int | None):
    """Run a Tuner; returns (its results, whether it was interrupted). The runs of trials that did not
    end are ended KILLED, also when a second Ctrl-C breaks out of Tune. `expected` None: the trials the
    search planned (`tuner.planned_trials`)."""
    try:
        results = the_tuner.fit()
    except KeyboardInterrupt:
        logger.finish(wait_s=10)
        raise
    logger.finish()
    if expected is None:
        expected = tuner.planned_trials(the_tuner)
    return results, tuner.interrupted(results, expected)


def _restored(the_tuner, watch: tuple) -> MLflowTrialLogger:
    """The MLflow logger of a Tuner made by `Tuner.restore`; its progress output becomes `watch`
    (this driver's clock, and --verbose as given now)."""
    from orchestration import private

    callbacks = private.tuner_callbacks(the_tuner)
    reporter, shown = watch
    private.set_tuner_output(the_tuner, reporter,
                             [cb for cb in callbacks if not isinstance(cb, progress.TrialEvents)] + shown)
    return next(cb for cb in callbacks if isinstance(cb, MLflowTrialLogger))


def _search_and_final(sweep: Plan, tracking: Tracking, resources: dict, started: float) -> bool:
    """The search, then the final stage; prints the summary. Returns True when interrupted."""
    from orchestration.trainable import train_trial

    space = sweep.space
    base = sweep.base()
    with_delta_rel = all(trial_config.applies("delta_rel", s) for s in space.search.scheme)

    def watch(final_stage: bool, groups: list, later_epochs: int = 0) -> tuple:
        return progress.watchers(final=final_stage, verbose=sweep.verbose, started=started, epochs=space.epochs,
                                 groups=groups, with_delta_rel=with_delta_rel, later_epochs=later_epochs)

    groups = space.search.groups()
    search_watch = watch(False, groups, len(groups) * space.final_seeds * space.epochs)
    _build_image_cache(sweep, base)
    if sweep.resume:
        print(f"resuming sweep {sweep.name} from {sweep.path}")
        search = tuner.restore(sweep.path, train_trial, resources, space.keep_checkpoints)
        logger = _restored(search, search_watch)
    else:
        logger = tracking.logger(sweep, ROLE_TRIAL)
        reporter, shown = search_watch
        marker = known.ReuseMarker(sweep.uri, sweep.name, tracking.experiment_id, tracking.parent_run_id)
        search = tuner.build(space, name=sweep.name, storage=sweep.storage, trainable=train_trial,
                             resources=resources, param_space=base, num_samples=space.num_samples, search=True,
                             callbacks=[logger, *shown], reporter=reporter,
                             known=sweep.warm.records if sweep.warm else None, marker=marker)
        # beside Ray's tuner.pkl (written just now): what --resume needs besides Ray's state
        record.write(sweep.storage, record.SweepRecord(
            dataset=space.dataset, name=sweep.name, space=space.to_dict(), mlflow_uri=sweep.uri,
            experiment_id=tracking.experiment_id, parent_run_id=tracking.parent_run_id, resources=resources,
            data_root=sweep.data_root, cache_dir=sweep.cache_dir, command=sweep.command,
            created=_dt.datetime.now().isoformat(timespec="seconds")))
    results, cut = _fit(search, logger, None)
    searched = tuner.search_outcome(search)
    if cut:
        return True

    rows = final.result_rows(results)
    trained = rows.copy()
    if searched.earlier:        # the final stage picks each group's best over the earlier sweeps' too
        import pandas as pd

        rows = pd.concat([rows, pd.DataFrame(known.rows(searched.earlier, base), columns=final.ROW_COLUMNS)],
                         ignore_index=True)
    best = final.best_per_scheme(rows)
    final_rows = None
    if space.final_seeds > 0 and not best.empty:
        points = final.final_points(best, space.final_seeds)
        print(f"\nfinal stage: {len(best)} configuration(s) x {space.final_seeds} seed(s), {space.epochs} epochs")
        path = sweep.path + FINAL_SUFFIX
        from ray import tune

        chosen = set(zip(best["scheme"], best["mode"]))
        final_watch = watch(True, [g for g in groups if g in chosen])
        if sweep.resume and tune.Tuner.can_restore(path):
            stage = tuner.restore(path, train_trial, resources, space.keep_checkpoints)
            logger = _restored(stage, final_watch)
        else:
            logger = tracking.logger(sweep, ROLE_FINAL)
            reporter, shown = final_watch
            stage = tuner.build(space, name=sweep.name + FINAL_SUFFIX, storage=sweep.storage, trainable=train_trial,
                                resources=resources, param_space={**base, "point": tune.grid_search(points)},
                                num_samples=1, search=False, callbacks=[logger, *shown], reporter=reporter)
        final_results, cut = _fit(stage, logger, len(points))
        if cut:
            return True
        final_rows = final.result_rows(final_results)
    _summary(sweep, trained, best, final_rows, searched)
    return False


def _build_image_cache(sweep: Plan, base: dict) -> None:
    """A compact image cache (large data sets), built before any trial starts: its shards as Ray tasks
    spread over the cluster, each once. Where the driver cannot see the data set, the trials build
    what they need themselves (under the same per-shard locks)."""
    from orchestration.image_cache import build_image_cache

    if sweep.data_root is None or not Path(sweep.data_root).is_dir():
        return
    group = {"scheme": sweep.space.search.scheme[0], "mode": sweep.space.search.mode[0]}
    build_image_cache(trial_config.train_config({**base, **group}))


def _summary(sweep: Plan, rows, best, final_rows, searched: tuner.SearchOutcome) -> None:
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20):
        failed = rows[rows["error"] != ""]
        print(f"\nsweep {sweep.name}: {len(rows)} trials ({len(failed)} failed), "
              f"{int(pd.to_numeric(rows['epochs_run'], errors='coerce').fillna(0).sum())} epochs trained")
        if searched.reused:
            print(f"{len(searched.reused)} proposal(s) were configurations already trained: answered from their "
                  "recorded results, not trained again")
        for group, why in searched.closed.items():
            print(f"{group.label} ended early: {why}")
        if searched.earlier:
            print(f"the best per scheme is chosen over {len(searched.earlier)} configuration(s) of earlier "
                  "sweeps too (--warm-start; their trial ids name their sweep)")
        if best.empty:
            print("no trial finished an epoch: nothing to report")
        else:
            shown = best[["method", "mode", "delta_rel", "lr", "best_val_map", "best_epoch", "test_map",
                          "epochs_run", "trial_id"]]
            print("best configuration per scheme (by validation mAP; test mAP at the best validation epoch):")
            print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        if final_rows is not None:
            summary = final.summarize_final(final_rows)
            print(f"\nfinal runs ({sweep.space.final_seeds} seeds each), test mAP:")
            print(summary.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"\nRay results and checkpoints: {sweep.path}")
    print(f"MLflow store: {redact(sweep.uri)} (experiment {sweep.name!r})")
    print(f"  open it with: {store.ui_command(sweep.uri)}")


def _aggregate(sweep: Plan, tracking: Tracking) -> None:
    """results/ from the store, then the same files attached to the sweep's MLflow run."""
    from orchestration.aggregate import aggregate

    try:
        res = aggregate(sweep.uri, None, sweep.results_dir)   # every sweep in the store: one Table 1
    except Exception as err:  # noqa: BLE001 - the sweep itself succeeded; say why the tables did not
        print(f"warning: aggregation failed: {first_line(err)}", file=sys.stderr)
        return
    print(f"tables: {sweep.results_dir}/ ({len(res.files) + len(res.figures)} files)")
    try:
        store.log_results(tracking.client, tracking.parent_run_id, res.out_dir, res.files + res.figures)
    except Exception as err:  # noqa: BLE001 - results/ is written; say why the run lacks them
        print(f"warning: the tables were not attached to the sweep's MLflow run: {first_line(err)}", file=sys.stderr)
        return
    print("  also on the sweep's MLflow run (Artifacts): "
          f"{store.run_url(sweep.uri, tracking.experiment_id, tracking.parent_run_id, 'artifacts')}")


class _Stop:
    """SIGTERM (SLURM, Kubernetes, systemd, `kill`) and SIGHUP stop a sweep as Ctrl-C does.

    They are passed on as SIGINT, which Tune catches: it stops the trials at
    their last checkpoint and returns, the runs end KILLED and the command to
    continue is printed. The exit status says which signal came: 128 + its
    number (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP).
    """

    def __init__(self) -> None:
        self.signum = signal.SIGINT

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():     # Python allows handlers only there
            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        os.kill(os.getpid(), signal.SIGINT)

    @property
    def status(self) -> int:
        return 128 + int(self.signum)


STOP = _Stop()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        sweep = plan(args, ["orchestration/sweep.py", *argv])
        return dry_run(sweep) if args.dry_run else run_sweep(sweep)
    except WSMLError as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: continue with the same command and --resume", file=sys.stderr)
        return STOP.status


if __name__ == "__main__":
    STOP.install()
    sys.exit(main())

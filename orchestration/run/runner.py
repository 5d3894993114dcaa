"""Running a planned sweep (`orchestration.search.plan`): Ray, the sweep's MLflow run and record, the search,
the final stage and the tables.

Ctrl-C stops the trials at their last checkpoint, ends their runs KILLED, prints the command that continues
the sweep and exits with status 130; SIGTERM and SIGHUP do the same (`STOP`: status 143, 129).
"""
from __future__ import annotations

import logging
import datetime as _dt
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


from orchestration.cluster import connect as cluster
from orchestration.cluster import slots
from orchestration.cost import estimate
from orchestration.search import final, known, study
from orchestration.run import private, progress, record, tuner
from orchestration.tracking import store, store_copy
from orchestration import trial as trial_config
from orchestration.common import ROOT, FINAL_SUFFIX, PARAM_DATA, ROLE_FINAL, ROLE_TRIAL, SweepError, first_line, redact
from orchestration.tracking.mlflow_callback import MLflowTrialLogger

from orchestration.search.plan import Plan, estimate_for

log = logging.getLogger(__name__)

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
    if sweep.warm is not None:
        log.info(sweep.warm.summary())
    kept = private.keep_cloud_secrets_from_trials()
    if kept and sweep.address is not None:
        log.info(f"note: {', '.join(kept)} of this shell are not handed to the trials (Ray would write them into its "
              "logs): the cluster's nodes use their own credentials (instance profile, ~/.aws/credentials, or "
              "the environment `ray start` ran in)")
    started = cluster.connect(sweep.address)
    STOP.install()          # again: ray.init puts its own SIGTERM handler (sys.exit) in place
    interrupted, watch = False, None
    backup = store_copy.from_env(sweep.uri)     # the store's copy on shared storage (a head may be lost)
    try:
        if sweep.resume:
            assert sweep.previous is not None       # a resumed sweep's record (Plan)
            resources = sweep.previous.resources
        else:
            r = sweep.space.resources
            if sweep.space.max_concurrent is None:   # propose as many trials as the cluster can run (cluster/slots.py)
                sweep.concurrency = min(sweep.space.num_samples, slots.trial_slots(r.cpus_per_trial, r.gpus_per_trial))
            resources = cluster.trial_resources(r.cpus_per_trial, r.gpus_per_trial, remote=sweep.address is not None,
                                                at_once=sweep.concurrency or sweep.space.concurrency)
        if sweep.address is not None and resources["gpu"] > 0:     # GPU nodes the autoscaler starts: watched
            watch = cluster.LaunchWatch(cluster.watch_launches(resources["cpu"], resources["gpu"],
                                                               sweep.concurrency or sweep.space.concurrency)).start()
        cost = None if sweep.resume else _estimate_here(sweep, resources)
        # before the sweep's MLflow run exists: a set-up that fails here leaves its name free for the same command
        _build_image_cache(sweep)
        with store.lock(sweep.uri):      # a sweep started at the same moment waits here (see store.lock)
            c = store.client(sweep.uri)
            experiment_id, parent_id = store.start_parent(c, sweep.name, sweep.space.dataset,
                                                          _sweep_params(sweep, resources, cost), resume=sweep.resume)
        tracking = Tracking(c, experiment_id, parent_id)
        if backup is not None:
            log.info(f"MLflow store copied to {backup.folder} every {backup.every_s / 60:g} min and at the end")
            backup.start()
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
                log.warning(f"warning: could not end the sweep's MLflow run: {first_line(err)}")
    finally:
        if watch is not None:
            watch.stop()
        cluster.release_request()
        if started:
            ray.shutdown()
        if backup is not None and interrupted:
            backup.stop()
    if interrupted and watch is not None and watch.reason is not None:
        log.warning(f"error: {watch.reason}; the trials keep their checkpoints: continue with  python orchestration/sweep.py "
              f"--dataset {sweep.space.dataset} --name {sweep.name} --storage {redact(sweep.storage)} --resume")
        return 2
    if interrupted:
        log.info(f"\ninterrupted: continue with  python orchestration/sweep.py --dataset {sweep.space.dataset} "
              f"--name {sweep.name} --storage {redact(sweep.storage)} --resume")
        return STOP.status
    _aggregate(sweep, tracking)
    if backup is not None:
        backup.stop()           # with the tables and figures the aggregation attached
    return 0


def _estimate_here(sweep: Plan, resources: dict) -> estimate.Estimate | None:
    """The estimate on the cluster the sweep runs on (printed, and logged beside what is spent)."""
    cpus, gpus, gpu_name = cluster.connected_devices()
    try:
        cost = estimate_for(sweep, resources["cpu"], resources["gpu"], cpus, gpus, gpu_name, "the Ray cluster")
    except SweepError as err:
        log.info(f"note: no estimate of this sweep's cost: {err}")
        return None
    log.info(f"estimate: {cost.search_epochs_expected + cost.final_epochs:.0f} epochs, "
          f"{cost.device_hours:.3g} {'GPU' if cost.gpus_per_trial > 0 else 'trial'}-hours, wall time "
          f"{cost.wall_seconds:.0f} s with {cost.slots} trial(s) at once (python orchestration/sweep.py ... "
          "--dry-run tells how)")
    return cost


def _sweep_params(sweep: Plan, resources: dict, cost: estimate.Estimate | None = None) -> dict[str, str]:
    """The sweep run's MLflow params (credentials masked by `store.start_parent`)."""
    out = {**sweep.space.summary(), "command": sweep.command, "git_commit": _git_commit(),
           "storage": sweep.path, "ray_address": sweep.address or "local", "resources": json.dumps(resources),
           PARAM_DATA: sweep.data_id or "not known where the driver ran"}
    if sweep.concurrency is not None:
        out["max_concurrent"] = str(sweep.concurrency)       # what the cluster's slots made of the open default
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
    from orchestration.run import private

    callbacks = private.tuner_callbacks(the_tuner)
    reporter, shown = watch
    private.set_tuner_output(the_tuner, reporter,
                             [cb for cb in callbacks if not isinstance(cb, progress.TrialEvents)] + shown)
    return next(cb for cb in callbacks if isinstance(cb, MLflowTrialLogger))


def _search_and_final(sweep: Plan, tracking: Tracking, resources: dict, started: float) -> bool:
    """The search, then the final stage; prints the summary. Returns True when interrupted."""
    from orchestration.run.trainable import train_trial

    space = sweep.space
    base = sweep.base()
    with_delta_rel = all(trial_config.applies("delta_rel", s) for s in space.search.scheme)

    def watch(final_stage: bool, groups: list, later_epochs: int = 0) -> tuple:
        return progress.watchers(final=final_stage, verbose=sweep.verbose, started=started, epochs=space.epochs,
                                 groups=groups, with_delta_rel=with_delta_rel, later_epochs=later_epochs)

    groups = space.search.groups()
    search_watch = watch(False, groups, len(groups) * space.final_seeds * space.epochs)
    if sweep.resume:
        log.info(f"resuming sweep {sweep.name} from {redact(sweep.path)}")
        search = tuner.restore(sweep.path, train_trial, resources, space.keep_checkpoints, sweep.moved_paths())
        logger = _restored(search, search_watch)
    else:
        logger = tracking.logger(sweep, ROLE_TRIAL)
        reporter, shown = search_watch
        marker = known.ReuseMarker(sweep.uri, sweep.name, tracking.experiment_id, tracking.parent_run_id)
        search = tuner.build(space, name=sweep.name, storage=sweep.storage, trainable=train_trial,
                             resources=resources, param_space=base, num_samples=space.num_samples, search=True,
                             callbacks=[logger, *shown], reporter=reporter,
                             known=sweep.warm.records if sweep.warm else None, marker=marker,
                             max_concurrent=sweep.concurrency)
        # beside Ray's tuner.pkl (written just now): what --resume needs besides Ray's state
        record.write(sweep.storage, record.SweepRecord(
            dataset=space.dataset, name=sweep.name, space=space.to_dict(), mlflow_uri=sweep.uri,
            experiment_id=tracking.experiment_id, parent_run_id=tracking.parent_run_id, resources=resources,
            data_root=sweep.data_root, cache_dir=sweep.cache_dir, command=sweep.command,
            created=_dt.datetime.now().isoformat(timespec="seconds"), data_id=sweep.data_id or ""))
        sweep.lock = record.DriverLock(sweep.storage, sweep.name)     # its folder exists from here
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
        log.info(f"\nfinal stage: {len(best)} configuration(s) x {space.final_seeds} seed(s), {space.epochs} epochs")
        path = sweep.path + FINAL_SUFFIX
        from ray import tune

        chosen = set(zip(best["scheme"], best["mode"]))
        final_watch = watch(True, [g for g in groups if g in chosen])
        if sweep.resume and tune.Tuner.can_restore(path):
            stage = tuner.restore(path, train_trial, resources, space.keep_checkpoints, sweep.moved_paths())
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
    _summary(sweep, tracking, trained, best, final_rows, searched)
    return False


def _build_image_cache(sweep: Plan) -> None:
    """A compact image cache (large data sets), built before any trial starts: its shards as Ray tasks
    spread over the cluster, each once. Where the driver cannot see the data set, the trials build
    what they need themselves (under the same per-shard locks)."""
    from orchestration.image_cache import build_image_cache

    if sweep.data_root is None or not Path(sweep.data_root).is_dir():
        return
    cfg = sweep.train_config()
    if build_image_cache(cfg).shards and cfg.skip_bad_images:
        # Built, the cache opens without decoding: the trainer's check of skipped images
        # (wsml.data.loading, TooManySkipped) fails the sweep here once rather than every trial.
        from wsml.data.loading import load_data

        load_data(cfg)


def _summary(sweep: Plan, tracking: Tracking, rows, best, final_rows, searched: tuner.SearchOutcome) -> None:
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20):
        failed = rows[rows["error"] != ""]
        log.info(f"\nsweep {sweep.name}: {len(rows)} trials ({len(failed)} failed), "
              f"{int(pd.to_numeric(rows['epochs_run'], errors='coerce').fillna(0).sum())} epochs trained")
        if searched.reused:
            log.info(f"{len(searched.reused)} proposal(s) were configurations already trained: answered from their "
                  "recorded results, not trained again")
        for group, why in searched.closed.items():
            log.info(f"{group.label} ended early: {why}")
        if searched.earlier:
            log.info(f"the best per scheme is chosen over {len(searched.earlier)} configuration(s) of earlier "
                  "sweeps too (--warm-start; their trial ids name their sweep)")
        if best.empty:
            log.info("no trial finished an epoch: nothing to report")
        else:
            shown = best[["method", "mode", "delta_rel", "lr", "best_val_map", "best_epoch", "test_map",
                          "epochs_run", "trial_id"]]
            log.info("best configuration per scheme (by validation mAP; test mAP at the best validation epoch):")
            log.info(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        if final_rows is not None:
            summary = final.summarize_final(final_rows)
            log.info(f"\nfinal runs ({sweep.space.final_seeds} seeds each), test mAP:")
            log.info(summary.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    log.info(f"\nRay results and checkpoints: {redact(sweep.path)}")
    log.info(f"MLflow store: {redact(sweep.uri)} (experiment {sweep.name!r})")
    log.info(f"  open it with: {store.ui_command(sweep.uri)}")
    log.info(f"  the sweep's runs: {store.experiment_url(sweep.uri, tracking.experiment_id)}")
    if searched.journal is not None:
        log.info(f"Optuna studies: {redact(searched.journal)}\n  open them with: {study.dashboard_command(searched.journal)}")


def _aggregate(sweep: Plan, tracking: Tracking) -> None:
    """results/ from the store, then the same files attached to the sweep's MLflow run."""
    from orchestration.aggregate import aggregate

    try:
        res = aggregate(sweep.uri, None, sweep.results_dir)   # every sweep in the store: one Table 1
    except Exception as err:  # noqa: BLE001 - the sweep itself succeeded; say why the tables did not
        log.warning(f"warning: aggregation failed: {first_line(err)}")
        return
    log.info(f"tables: {sweep.results_dir}/ ({len(res.files) + len(res.figures)} files)")
    try:
        store.log_results(tracking.client, tracking.parent_run_id, res.out_dir, res.files + res.figures)
    except Exception as err:  # noqa: BLE001 - results/ is written; say why the run lacks them
        log.warning(f"warning: the tables were not attached to the sweep's MLflow run: {first_line(err)}")
        return
    log.info("  also on the sweep's MLflow run (Artifacts): "
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

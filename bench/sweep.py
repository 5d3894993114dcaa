"""Epochs an Optuna + ASHA sweep spends to come within 1 mAP of the full grid's best (digits).

The grid is what one runs with the published code: every scheme (LL-R, LL-Ct,
LL-Cp) x every delta_rel of a 5-value grid, at the default lr (digits: 1e-3),
each trained for all its epochs. It runs as one `tune.grid_search` without a
scheduler. The trainer's own stop rule (the published code's: stop once val
mAP falls 3 below its best) is off by default for both the grid and the sweep
(`--stop-drop 3` turns it on), so that every grid trial runs all its epochs.

The sweep is the project's own: `search_spaces/digits.yaml` with the space
narrowed to the same schemes, the same 5 delta_rel values as a choice and lr
fixed, searched by the sweep's own seeded OptunaSearch + ASHAScheduler
(`orchestration.tuner.build`, the same Tuner the sweep builds; the space
file's start points first), with the sweep's own trainable (`orchestration.trainable.train_trial`,
checkpoints every epoch) and resources. No MLflow: Ray's results go to a
temporary folder.

Both are measured on validation mAP (a trial's best_val_map). The sweep's
reported results are taken in the order the driver received them; epochs are
accumulated (one result = one epoch) up to the first result whose running best
val_map is within 1 of the grid's best.

Which configurations a sweep samples, and when, depends on its search seed,
so the same sweep is also run with more seeds (`--replay-seeds`) through the
same Tune machinery (OptunaSearch + ASHA), with a trainable
that replays the grid's recorded curve of each configuration instead of
training it. That is exact because the trainer is deterministic (one seed, same
data): the real sweep's trials are checked to reproduce the grid's curves.
The replays run once with the space file's start points (the paper's default
of each scheme first, as the real sweep) and once without (`start_with: none`:
what the search finds on its own), each at the concurrency levels of
`--max-concurrent` (trials proposed ahead of results and running at once; by
default 1, fully sequential, and num_samples, all at once: the sweep's
default, so that an autoscaler sees every trial's demand). A proposal of a
configuration the sweep has trained already is answered from its record and
trains nothing (`orchestration.per_scheme`), so it adds no epochs. Last line:
the median over the search seeds of the replays without start points at the
first concurrency level, `sweep ratio <epochs to target / grid epochs> (target
0.25)` (`inf`: not reached in most seeds; without replays, the real sweep's
ratio).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from wsml.config import DEFAULTS, LL_SCHEMES

from orchestration.space import FloatParam, load_space, with_overrides

ROOT = Path(__file__).resolve().parent.parent

DATASET = "digits"
# False negatives are ~15 % of all entries on digits (VOC/COCO ~2 %), so the
# paper's 0.1-0.5 % per epoch becomes 0.5-4 % here; 2 % is the digits default.
DELTAS = (0.5, 1.0, 2.0, 3.0, 4.0)
TOLERANCE = 1.0   # mAP points
TARGET = 0.25
REPLAY_EPOCH_S = 0.5   # a replayed epoch: long against a trial's start-up (~1 s), as a real one (~4 s) is
REPLAY_RESOURCES = {"cpu": 0.01, "gpu": 0}   # a replay sleeps: any number of them run at once on this machine


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the space file's)")
    p.add_argument("--num-samples", type=int, default=15, help="sweep trials (default 15, the grid's size)")
    p.add_argument("--deltas", default=",".join(f"{d:g}" for d in DELTAS), help="delta_rel grid, percent")
    p.add_argument("--max-train-images", type=int, default=None, help="train on the first N images only")
    p.add_argument("--stop-drop", type=float, default=None,
                   help="the trainer's stop rule (stop once val mAP falls this far below its best); default off: "
                        "every trial runs all its epochs, as the grid is meant to")
    p.add_argument("--grace-period", type=int, default=None,
                   help="ASHA's grace period instead of the space file's (a what-if; stated in the output)")
    p.add_argument("--search-seed", type=int, default=None, help="Optuna's seed (default: the space file's)")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="default: the space file's")
    p.add_argument("--replay-seeds", default="1,2,3,4,5",
                   help="more search seeds, replayed on the grid's recorded curves (no training; '' for none)")
    p.add_argument("--max-concurrent", default=None,
                   help="comma list: the replays' concurrency levels (trials proposed and running at once; "
                        "default: 1 and num_samples)")
    p.add_argument("--grid-json", default=None,
                   help="where the grid's reported results are written; if the file exists, the grid is read "
                        "from it instead of being trained again (it must match the other options)")
    p.add_argument("--workdir", default=None, help="Ray results (default: a temporary folder, removed)")
    return p.parse_args(argv)


def bench_space(args: argparse.Namespace):
    """The space file, narrowed to the grid: LL schemes, delta_rel values, lr fixed at the default."""
    space = load_space(DATASET)
    space = with_overrides(space, epochs=args.epochs, num_samples=args.num_samples, final_seeds=0,
                           cpus_per_trial=args.cpus_per_trial, gpus_per_trial=0, schemes=list(LL_SCHEMES))
    deltas = [float(x) for x in args.deltas.split(",")]
    space.search = dataclasses.replace(space.search, delta_rel=FloatParam(values=deltas),
                                       lr=FloatParam(values=[DEFAULTS[DATASET].lr]), mode=["end-to-end"])
    if args.search_seed is not None:
        space.search_seed = args.search_seed
    if args.grace_period is not None:
        space.scheduler.grace_period = args.grace_period
    space.train = {**space.train, "stop_drop": args.stop_drop}
    if args.max_train_images is not None:
        space.train = {**space.train, "max_train_images": args.max_train_images}
    space.source = f"{space.source} (bench: grid space)"
    return space.validate(), deltas


def recorder(quiet: bool = False):
    from ray import tune

    class Recorder(tune.Callback):
        """Every reported result, in the order the driver receives them."""

        def __init__(self):
            self.rows: list[dict] = []
            self.start = time.monotonic()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.rows.append({"t": time.monotonic() - self.start, "trial": trial.trial_id,
                              "scheme": trial.config.get("scheme"), "delta_rel": trial.config.get("delta_rel"),
                              "epoch": int(result["epoch"]), "val_map": float(result["val_map"]),
                              "best_val_map": float(result["best_val_map"])})

        def on_trial_complete(self, iteration, trials, trial, **info):
            if quiet:
                return
            mine = [r for r in self.rows if r["trial"] == trial.trial_id]
            if mine:
                print(f"  [{time.monotonic() - self.start:6.0f}s] {mine[-1]['scheme']:5s} delta_rel "
                      f"{mine[-1]['delta_rel']:g}: {len(mine)} epochs, best val mAP "
                      f"{max(r['best_val_map'] for r in mine):.2f}", flush=True)

    return Recorder()


def run_tuner(name: str, storage: str, space, resources, param_space, *, search: bool, num_samples: int = 1,
              trainable=None, quiet: bool = False):
    """Run one Tuner built exactly as the sweep builds it (`orchestration.tuner.build`)."""
    from orchestration import tuner
    from orchestration.trainable import train_trial

    rec = recorder(quiet)
    start = time.monotonic()
    the_tuner = tuner.build(space, name=name, storage=storage, trainable=trainable or train_trial,
                            resources=resources, param_space=param_space, num_samples=num_samples, search=search,
                            callbacks=[rec], verbose=0)
    results = the_tuner.fit()
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise SystemExit(f"error: {len(errors)} trial(s) of {name} failed: {errors[0]}")
    answered = len(tuner.search_outcome(the_tuner).reused) if search else 0
    return rec.rows, time.monotonic() - start, answered


def curves_of(rows: list[dict]) -> dict[tuple[str, float], list[dict]]:
    """(scheme, delta_rel) -> that trial's reported results by epoch."""
    out: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        out.setdefault((r["scheme"], float(r["delta_rel"])), []).append(r)
    return {k: sorted(v, key=lambda r: r["epoch"]) for k, v in out.items()}


def replay_trainable(curves: dict, seconds_per_epoch: float):
    """A trainable that reports a configuration's recorded grid curve instead of training it.

    Valid because the trainer is deterministic (same seed, same data): a sweep's
    trial of a configuration reports exactly the grid's curve of it (checked).
    """
    from ray import tune

    def replay(config):
        for r in curves[(config["scheme"], float(config["delta_rel"]))]:
            time.sleep(seconds_per_epoch)
            tune.report({"epoch": r["epoch"], "val_map": r["val_map"], "best_val_map": r["best_val_map"]})

    return replay


def epochs_to_target(rows: list[dict], target: float) -> int | None:
    best = -math.inf
    for i, r in enumerate(rows, 1):
        best = max(best, r["best_val_map"])
        if best >= target:
            return i
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import pandas as pd
    import ray
    from ray import tune

    from orchestration import cluster
    from orchestration import trial as trial_config

    space, deltas = bench_space(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="wsml-bench-sweep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    storage = str(workdir.resolve())
    lr = DEFAULTS[DATASET].lr
    sub = f", first {args.max_train_images} training images" if args.max_train_images else ""
    print(f"digits: schemes {', '.join(LL_SCHEMES)} x delta_rel {', '.join(f'{d:g}' for d in deltas)} % "
          f"(false negatives are ~15 % of entries here), lr {lr:g} fixed, {space.epochs} epochs{sub}, "
          f"trainer stop rule {'off' if args.stop_drop is None else f'{args.stop_drop:g} mAP'}")
    started = cluster.connect(None)
    try:
        resources = cluster.trial_resources(space.resources.cpus_per_trial, space.resources.gpus_per_trial,
                                            remote=False)
        print(f"trials: {resources['cpu']:g} CPU each on {ray.cluster_resources().get('CPU', 0):g} CPUs; "
              f"Ray results in {storage}")
        base = trial_config.base_config(dataset=space.dataset, epochs=space.epochs, train=space.train,
                                        sweep="bench", data_root=None, cache_dir=str((ROOT / ".cache").resolve()))
        settings = {"epochs": space.epochs, "deltas": deltas, "lr": lr, "train": space.train}

        # 1. the grid, as one runs the published code: every configuration, all epochs
        print(f"\ngrid: {len(LL_SCHEMES) * len(deltas)} trials, no scheduler")
        grid_space = {**base, "scheme": tune.grid_search(list(LL_SCHEMES)),
                      "delta_rel": tune.grid_search(deltas), "lr": lr, "mode": "end-to-end"}
        saved = Path(args.grid_json) if args.grid_json else None
        if saved is not None and saved.is_file():
            data = json.loads(saved.read_text())
            if data["settings"] != settings:
                raise SystemExit(f"error: {saved} holds a grid of {data['settings']}, not {settings}: "
                                 "pass another --grid-json")
            grid_rows, grid_s = data["rows"], data["seconds"]
            print(f"  read from {saved} (not trained again)")
        else:
            grid_rows, grid_s, _ = run_tuner("grid", storage, space, resources, grid_space, search=False)
            if saved is not None:
                saved.write_text(json.dumps({"settings": settings, "rows": grid_rows, "seconds": grid_s}))

        # 2. the project's sweep: seeded Optuna TPE (start points first) + ASHA
        grace = f"{space.scheduler.grace_period}" + (" (--grace-period, not the space file's)"
                                                     if args.grace_period is not None else "")
        print(f"\nsweep: {space.num_samples} trials, OptunaSearch (seed {space.search_seed}, start_with "
              f"{space.start_with}) + ASHA (grace {grace}, "
              f"rf {space.scheduler.reduction_factor:g}, max_t {space.epochs})")
        sweep_rows, sweep_s, sweep_answered = run_tuner("sweep", storage, space, resources, base, search=True,
                                                        num_samples=space.num_samples)

        # 3. the same sweep with other search seeds, replaying the grid's curves (a sweep is a lottery
        #    of which configurations it samples and when: one seed says little)
        #    Also without the start points: what TPE + ASHA find on their own.
        replays: dict[str, dict[int, tuple[list[dict], int]]] = {}
        seeds = [int(x) for x in args.replay_seeds.split(",") if x.strip()]
        if seeds:
            print(f"\nreplays: the same sweep with search seeds {', '.join(map(str, seeds))} on the grid's "
                  "recorded curves (no training), with the space file's start points and without")
            replay = replay_trainable(curves_of(grid_rows), REPLAY_EPOCH_S)
            starts = [space.start_with] + (["none"] if space.start_with != "none" else [])
            levels = ([int(x) for x in args.max_concurrent.split(",")] if args.max_concurrent
                      else sorted({1, space.num_samples}))
            for i, start in enumerate(starts):
                for level in levels:
                    label = (f"start_with {start}" if isinstance(start, str) else "the space file's start points") \
                        + f", max_concurrent {level}"
                    variant = dataclasses.replace(space, start_with=start, max_concurrent=level).validate()
                    for seed in seeds:
                        variant.search_seed = seed
                        rows, _, answered = run_tuner(
                            f"replay-{i}-{level}-{seed}", storage, variant, REPLAY_RESOURCES, base, search=True,
                            num_samples=variant.num_samples, trainable=replay, quiet=True)
                        replays.setdefault(label, {})[seed] = (rows, answered)
    finally:
        if started:
            ray.shutdown()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    grid = pd.DataFrame(grid_rows)
    per_trial = grid.groupby(["scheme", "delta_rel"])["best_val_map"].max().unstack("delta_rel")
    per_trial = per_trial.reindex(list(LL_SCHEMES))
    epochs_grid = grid.groupby(["scheme", "delta_rel"])["epoch"].count().unstack("delta_rel").reindex(list(LL_SCHEMES))
    grid_best = float(grid["best_val_map"].max())
    grid_epochs = len(grid_rows)
    top = grid.loc[grid["best_val_map"].idxmax()]
    print("\ngrid: best validation mAP per scheme x delta_rel (%):")
    print(per_trial.to_string(float_format=lambda v: f"{v:.2f}"))
    if (epochs_grid != space.epochs).any().any():
        print("epochs run (the trainer's stop rule ends a trial once val mAP falls 3 below its best):")
        print(epochs_grid.to_string())
    print(f"grid best {grid_best:.2f} ({top['scheme']}, delta_rel {top['delta_rel']:g}); "
          f"within 1: {int((per_trial >= grid_best - TOLERANCE).sum().sum())} of {per_trial.size} configurations")
    rungs = [e for e in (2, 4, 8) if e < space.epochs]
    if rungs:
        curve = grid.pivot_table(index=["scheme", "delta_rel"], columns="epoch", values="val_map")
        shown = curve.reindex(columns=rungs).rename(columns=lambda e: f"ep{e}")
        shown["best"] = grid.groupby(["scheme", "delta_rel"])["best_val_map"].max()
        shown = shown.reindex(list(LL_SCHEMES), level="scheme")
        print(f"grid val mAP at epochs {', '.join(map(str, rungs))} (ASHA's rungs) and the trial's best:")
        print(shown.to_string(float_format=lambda v: f"{v:.1f}"))
    print(f"grid epochs {grid_epochs} ({grid_s:.0f} s)")

    sweep = pd.DataFrame(sweep_rows)
    target = grid_best - TOLERANCE
    n = epochs_to_target(sweep_rows, target)
    sweep_best = float(sweep["best_val_map"].max())
    trials = sweep.groupby("trial").agg(scheme=("scheme", "first"), delta_rel=("delta_rel", "first"),
                                        epochs=("epoch", "count"), best=("best_val_map", "max"))
    print("\nsweep trials (in order of their first result):")
    order = sweep.drop_duplicates("trial")["trial"].tolist()
    print(trials.loc[order].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"sweep best {sweep_best:.2f}; {len(trials)} trials, {len(sweep_rows)} epochs in total ({sweep_s:.0f} s); "
          f"{sweep_answered} proposal(s) of configurations already trained answered without training")
    if n is None:
        print(f"sweep epochs to target (val mAP >= {target:.2f}): not reached")
        ratio = math.inf
    else:
        hit = sweep_rows[n - 1]
        print(f"sweep epochs to target (val mAP >= {target:.2f}): {n} (reached by {hit['scheme']} "
              f"delta_rel {hit['delta_rel']:g} at its epoch {hit['epoch']}: {hit['best_val_map']:.2f})")
        ratio = n / grid_epochs
    print(f"sweep epochs total {len(sweep_rows)} ({len(sweep_rows) / grid_epochs:.2f} of the grid's)")
    grid_curves = curves_of(grid_rows)
    by_epoch = {k: {r["epoch"]: r["val_map"] for r in v} for k, v in grid_curves.items()}
    diffs = [abs(r["val_map"] - by_epoch[(r["scheme"], float(r["delta_rel"]))].get(r["epoch"], math.nan))
             for r in sweep_rows]
    print(f"the sweep's trials reproduce the grid's curves of the same configurations: largest val mAP "
          f"difference {max(diffs):.2g} over {len(diffs)} epochs")
    print(f"the real sweep (trained, the space file's start points first): ratio {ratio:.2f}")
    final, final_label = ratio, "the real sweep's (no replays)"
    for label, runs in replays.items():
        print(f"replayed sweeps, {label} (seed: epochs to target / epochs in all; proposals answered without "
              "training):")
        ratios = []
        for seed, (rows, answered) in runs.items():
            k = epochs_to_target(rows, target)
            ratios.append(math.inf if k is None else k / grid_epochs)
            print(f"  seed {seed}: {'not reached' if k is None else k} / {len(rows)}"
                  + ("" if k is None else f"  (ratio {k / grid_epochs:.2f})") + f"; {answered} answered")
        median = statistics.median(ratios)
        hit = sum(r <= TARGET for r in ratios)
        print(f"replayed ratios, {label}: median {median:.2f}; {hit} of {len(ratios)} seeds reach the target "
              f"within {TARGET} of the grid's epochs")
        if final_label.startswith("the real") and label.startswith("start_with none"):
            final, final_label = median, f"{label}: median over search seeds {', '.join(map(str, runs))}"
    print(f"({final_label})")
    print(f"sweep ratio {final:.2f} (target {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

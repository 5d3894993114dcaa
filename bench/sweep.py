"""Per scheme, epochs a sweep spends to come within 1 mAP of that scheme's own grid best (digits).

The grid: LL-R, LL-Ct, LL-Cp x delta_rel x lr (default 5 x 4 per scheme, lr on
a factor-2 log grid around the digits default 1e-3 inside the space file's
range 2e-4..5e-3), every configuration trained for all its epochs with the
trainer (`wsml.train.run`, what every trial runs, with its stop rule as the
sweep's trials and the published code run it: a configuration whose val mAP
falls 3 below its best stops there), recorded once (`--grid-json`) and replayed thereafter (exact: the
trainer is deterministic, one seed, same data).

The search, replayed on the recorded curves by a small discrete-event
simulation that drives the REAL library objects: the sweep's own searcher and
scheduler (`orchestration.search.per_scheme.build`: one Optuna study and one Ray
`ASHAScheduler` per scheme, Ray's `OptunaSearch` around Optuna's samplers),
called as Tune calls them (`suggest`, `on_trial_add`, `on_trial_result`,
`on_trial_complete`) with minimal trial stand-ins. `--gpus` trials run at
once, each reporting one epoch per time step (every configuration's epoch
takes as long); the searcher proposes as many trials as run at once (the
sweep's default `max_concurrent`, orchestration/cluster/slots.py; variant
token `all`: every trial at once). Nothing of TPE or ASHA is re-implemented here.

The measure, per scheme: epochs spent on that scheme's trials (in the order
results arrive) up to the first result within 1 mAP (validation, best_val_map)
of the scheme's grid best, divided by the scheme's grid epochs (inf: not
reached). Median over the search seeds, no start points (`start_with: none`),
for each variant (the sweep as shipped, random search + ASHA, TPE without
ASHA, and what-ifs) at each level of `--gpus`. Last line: `sweep ratio X
(target 0.25)`, X the median over schemes of the shipped sweep's per-scheme
medians at the last level (8 trials in flight).

`--tune-check` also runs the shipped sweep once (first seed, one trial at a
time, max_concurrent 1) through a real Ray Tune run with a trainable that
replays the curves, and compares its per-scheme epochs to target with the
simulation's (on a synthetic grid: the same, epoch for epoch).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

from wsml.config import LL_SCHEMES

ROOT = Path(__file__).resolve().parent.parent

DATASET = "digits"
# False negatives are ~15 % of entries on digits, so the paper's 0.1-0.5 % becomes 0.5-4 %.
DELTAS = (0.5, 1.0, 2.0, 3.0, 4.0)
LRS = (5e-4, 1e-3, 2e-3, 4e-3)      # search_spaces/digits.yaml: lr 2e-4..5e-3 (log), default 1e-3
TOLERANCE = 1.0     # mAP points
TARGET = 0.25


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10, help="epochs per configuration (default 10, the digits space's)")
    p.add_argument("--deltas", default=",".join(f"{d:g}" for d in DELTAS), help="delta_rel grid, percent")
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS), help="lr grid")
    p.add_argument("--max-train-images", type=int, default=None, help="record the grid on the first N images")
    p.add_argument("--stop-drop", type=float, default=3.0,
                   help="the trainer's stop rule, as every sweep trial runs it (default 3, the trainer's and the "
                        "published code's: stop once val mAP falls 3 below its best); 0: off")
    p.add_argument("--workers", type=int, default=2, help="grid configurations trained at once (one thread each)")
    p.add_argument("--grid-json", default=None, help="the recorded grid: read if it exists, else written")
    p.add_argument("--num-samples", type=int, default=None,
                   help="sweep trials in all (default: the grid's size, every configuration could be tried)")
    p.add_argument("--seeds", default="1,2,3,4,5,6,7", help="search seeds")
    p.add_argument("--gpus", default="1,8", help="trials running at once (comma list); the last one is scored")
    p.add_argument("--variants", default="shipped,random,no-asha",
                   help="comma list of: shipped, random, no-asha, or what-ifs (see variant_of)")
    p.add_argument("--tune-check", action="store_true",
                   help="also run the shipped sweep through real Ray Tune (first seed, 1 trial at a time)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ the grid
def _train_one(job):
    import torch

    torch.set_num_threads(1)
    from wsml.config import TrainConfig
    from wsml.train import run

    scheme, delta, lr, epochs, max_images, stop_drop = job
    cfg = TrainConfig.from_dict({"dataset": DATASET, "scheme": scheme, "delta_rel": delta, "lr": lr,
                                 "epochs": epochs, "seed": 0, "device": "cpu", "num_workers": 0,
                                 "stop_drop": stop_drop,
                                 "max_train_images": max_images, "cache_dir": str(ROOT / ".cache")})
    rows = []
    run(cfg, lambda r, _state: rows.append({"epoch": r.epoch, "val_map": r.val_map,
                                            "best_val_map": r.best_val_map, "seconds": r.epoch_seconds}),
        log=None)
    return {"scheme": scheme, "delta_rel": delta, "lr": lr, "curve": rows}


def record_grid(settings: dict, path: Path | None, workers: int) -> dict:
    """Train every configuration of the grid (or read the file `path` holds); returns the JSON's data."""
    if path is not None and path.is_file():
        data = json.loads(path.read_text())
        if data["settings"] != settings:
            raise SystemExit(f"error: {path} holds a grid of {data['settings']}, not {settings}")
        print(f"grid read from {path} (not trained again)")
        return data
    jobs = [(s, d, lr, settings["epochs"], settings["max_train_images"], settings["stop_drop"])
            for s in settings["schemes"] for d in settings["deltas"] for lr in settings["lrs"]]
    print(f"grid: training {len(jobs)} configurations x {settings['epochs']} epochs, {workers} at once", flush=True)
    start = time.monotonic()
    runs = []
    with mp.get_context("spawn").Pool(workers) as pool:
        for i, r in enumerate(pool.imap_unordered(_train_one, jobs), 1):
            runs.append(r)
            print(f"  [{time.monotonic() - start:6.0f}s] {i}/{len(jobs)} {r['scheme']} delta_rel {r['delta_rel']:g} "
                  f"lr {r['lr']:g}: best val mAP {r['curve'][-1]['best_val_map']:.2f}", flush=True)
    data = {"settings": settings, "runs": runs, "seconds": time.monotonic() - start}
    if path is not None:
        path.write_text(json.dumps(data))
    return data


# ------------------------------------------------------------- the variants
@dataclasses.dataclass(frozen=True)
class Variant:
    """A search to replay: the shipped settings, with some replaced."""
    label: str
    sampler: str = "shipped"            # shipped (per_scheme.build's TPE), random, or tpe:<kw>=<v>,...
    asha: bool = True
    grace_period: int | None = None     # None: the space file's
    reduction_factor: float | None = None
    ahead: str = "gpus"                 # proposals ahead of results: gpus (the default: cluster/slots.py) or all
    startup_share: float | None = None  # study.STARTUP_SHARE instead of the shipped one


VARIANTS = {
    "shipped": Variant("shipped (TPE + ASHA)"),
    "random": Variant("random + ASHA", sampler="random"),
    "no-asha": Variant("TPE, no ASHA", asha=False),
}


def variant_of(name: str) -> Variant:
    """A named variant, or a what-if: '+'-joined tokens over the shipped settings: random, tpe (Optuna's
    defaults, the sampler shipped before), liar / liar0 (constant_liar on / off), mv / mv0 (multivariate),
    s<N> (n_startup_trials N), sh<P> (n_startup_trials P % of a study's share, study.STARTUP_SHARE),
    noasha, g<N> (grace period), rf<N> (reduction factor), all (every trial proposed at once:
    max_concurrent = num_samples, the default before proposing as slots free), gpus (as shipped)."""
    if name in VARIANTS:
        return VARIANTS[name]
    v, tpe = Variant(name), {}
    for tok in name.split("+"):
        if tok == "random":
            v = dataclasses.replace(v, sampler="random")
        elif tok == "tpe":
            tpe.setdefault("_", "")
        elif tok in ("liar", "liar0"):
            tpe["constant_liar"] = "0" if tok.endswith("0") else "1"
        elif tok in ("mv", "mv0"):
            tpe["multivariate"] = "0" if tok.endswith("0") else "1"
        elif tok.startswith("sh") and tok[2:].isdigit():
            v = dataclasses.replace(v, startup_share=int(tok[2:]) / 100)
        elif tok.startswith("s") and tok[1:].isdigit():
            tpe["n_startup_trials"] = tok[1:]
        elif tok == "noasha":
            v = dataclasses.replace(v, asha=False)
        elif tok.startswith("g") and tok[1:].isdigit():
            v = dataclasses.replace(v, grace_period=int(tok[1:]))
        elif tok.startswith("rf") and tok[2:].isdigit():
            v = dataclasses.replace(v, reduction_factor=float(tok[2:]))
        elif tok in ("gpus", "all"):
            v = dataclasses.replace(v, ahead=tok)
        elif tok != "shipped":
            raise SystemExit(f"error: unknown variant token {tok!r} in {name!r}")
    if tpe:
        v = dataclasses.replace(v, sampler="tpe:" + ",".join(f"{k}={x}" for k, x in tpe.items() if k != "_"))
    return v


def bench_space(settings: dict, num_samples: int, seed: int, variant: Variant):
    from orchestration.search.space import FloatParam, load_space, with_overrides

    space = load_space(DATASET)
    space = with_overrides(space, epochs=settings["epochs"], num_samples=num_samples, final_seeds=0,
                           gpus_per_trial=0, schemes=list(settings["schemes"]))
    space.search = dataclasses.replace(space.search, delta_rel=FloatParam(values=list(settings["deltas"])),
                                       lr=FloatParam(values=list(settings["lrs"])), mode=["end-to-end"])
    space = dataclasses.replace(space, start_with="none")
    space.search_seed = seed
    if variant.grace_period is not None:
        space.scheduler.grace_period = variant.grace_period
    if variant.reduction_factor is not None:
        space.scheduler.reduction_factor = variant.reduction_factor
    return space.validate()


def build_search(space, variant: Variant):
    """The sweep's searcher and scheduler (`per_scheme.build`), with the variant's sampler / no ASHA."""
    from unittest import mock

    import optuna

    from orchestration.common import METRIC, MODE
    from orchestration.search import per_scheme, study

    real_tpe = optuna.samplers.TPESampler
    share = mock.patch.object(study, "STARTUP_SHARE", variant.startup_share or study.STARTUP_SHARE)
    if variant.sampler == "shipped":
        with share:
            searcher, scheduler = per_scheme.build(space, METRIC, MODE)
    else:
        if variant.sampler == "random":
            make = lambda seed=None, **_: optuna.samplers.RandomSampler(seed=seed)   # noqa: E731
        else:
            kw = dict(x.split("=") for x in variant.sampler[4:].split(",") if x)
            kw = {k: (int(v) if k == "n_startup_trials" else bool(int(v))) for k, v in kw.items()}
            make = lambda seed=None, **_: real_tpe(seed=seed, **kw)   # noqa: E731
        with mock.patch("optuna.samplers.TPESampler", make):
            searcher, scheduler = per_scheme.build(space, METRIC, MODE)
    if not variant.asha:
        scheduler = None
    return searcher, scheduler


# ------------------------------------------------------------ the simulation
class _Trial:
    """What Ray's schedulers read of a trial: its id and config."""

    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config = trial_id, config


def key_of(config: dict) -> tuple[str, float, float]:
    return config["scheme"], float(config["delta_rel"]), float(config["lr"])


def simulate(space, variant: Variant, curves: dict, gpus: int) -> list[dict]:
    """Replay one search on the recorded curves; returns every reported result in arrival order."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

    from orchestration.common import EPOCH, METRIC, MODE

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher, scheduler = build_search(space, variant)
    if scheduler is not None:
        scheduler.set_search_properties(METRIC, MODE)
    ahead = space.num_samples if variant.ahead == "all" else gpus
    pending: list[_Trial] = []          # proposed, waiting for a slot (FIFO, as Tune)
    running: list[list] = []            # [trial, next epoch index]
    rows: list[dict] = []
    made, finished = 0, False

    def propose():
        nonlocal made, finished
        while not finished and made < space.num_samples and len(pending) + len(running) < ahead:
            tid = f"t{made:04d}"
            config = searcher.suggest(tid)
            if config is None or config == Searcher.FINISHED:
                finished = True
                return
            trial = _Trial(tid, config)
            if scheduler is not None:
                scheduler.on_trial_add(None, trial)
            pending.append(trial)
            made += 1

    propose()
    while pending or running:
        while pending and len(running) < gpus:
            running.append([pending.pop(0), 0])
        ended = []
        for slot in running:            # one epoch each, in the order the trials started
            trial, i = slot
            r = curves[key_of(trial.config)][i]
            result = {EPOCH: r["epoch"], METRIC: r["val_map"], "training_iteration": r["epoch"]}
            rows.append({"trial": trial.trial_id, "scheme": trial.config["scheme"], "epoch": r["epoch"],
                         "best_val_map": r["best_val_map"]})
            slot[1] += 1
            searcher.on_trial_result(trial.trial_id, result)
            action = scheduler.on_trial_result(None, trial, result) if scheduler is not None else "CONTINUE"
            if action == TrialScheduler.STOP or slot[1] >= len(curves[key_of(trial.config)]):   # (stop rule)
                ended.append((slot, result))
        for slot, result in ended:
            running.remove(slot)
            if scheduler is not None:
                scheduler.on_trial_complete(None, slot[0], result)
            searcher.on_trial_complete(slot[0].trial_id, result)
            propose()
    return rows


def per_scheme_epochs(rows: list[dict], targets: dict[str, float]) -> dict[str, int | None]:
    """Per scheme: its results counted in arrival order up to its first within the target (None: never)."""
    out: dict[str, int | None] = {}
    for s, target in targets.items():
        n = 0
        out[s] = None
        for r in rows:
            if r["scheme"] != s:
                continue
            n += 1
            if r["best_val_map"] >= target:
                out[s] = n
                break
    return out


def tune_check(space, curves: dict, targets: dict[str, float]) -> dict[str, int | None]:
    """The shipped sweep through a real Ray Tune run (one trial at a time), replaying the curves."""
    import os
    import tempfile

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune

    from orchestration.run import tuner

    rows: list[dict] = []

    class Rec(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            rows.append({"trial": trial.trial_id, "scheme": trial.config["scheme"], "epoch": int(result["epoch"]),
                         "best_val_map": float(result["best_val_map"])})

    def replay(config):
        for r in curves[(config["scheme"], float(config["delta_rel"]), float(config["lr"]))]:
            tune.report({"epoch": r["epoch"], "val_map": r["val_map"], "best_val_map": r["best_val_map"]})

    space = dataclasses.replace(space, max_concurrent=1).validate()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tuner.build(space, name="check", storage=tmp, trainable=replay, resources={"cpu": 1},
                        param_space={"epochs": space.epochs}, num_samples=space.num_samples, search=True,
                        callbacks=[Rec()], verbose=0).fit()
    finally:
        ray.shutdown()
    return per_scheme_epochs(rows, targets)


def fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = {"epochs": args.epochs, "schemes": list(LL_SCHEMES),
                "deltas": [float(x) for x in args.deltas.split(",")], "lrs": [float(x) for x in args.lrs.split(",")],
                "max_train_images": args.max_train_images, "stop_drop": args.stop_drop or None}
    sub = f"first {args.max_train_images} training images" if args.max_train_images else "all training images"
    print(f"digits: {', '.join(LL_SCHEMES)} x delta_rel {args.deltas} % x lr {args.lrs}, {args.epochs} epochs, "
          f"{sub}, trainer stop rule {f'{args.stop_drop:g} mAP' if args.stop_drop else 'off'}")
    data = record_grid(settings, Path(args.grid_json) if args.grid_json else None, args.workers)
    curves = {(r["scheme"], float(r["delta_rel"]), float(r["lr"])): r["curve"] for r in data["runs"]}
    n_configs = len(curves)
    grid_epochs = {s: sum(len(c) for k, c in curves.items() if k[0] == s) for s in LL_SCHEMES}
    best = {s: max(c[-1]["best_val_map"] for k, c in curves.items() if k[0] == s) for s in LL_SCHEMES}
    targets = {s: best[s] - TOLERANCE for s in LL_SCHEMES}
    print(f"grid: {n_configs} configurations, {sum(grid_epochs.values())} epochs, recorded in "
          f"{data['seconds']:.0f} s with {args.workers} at once on this machine")
    for s in LL_SCHEMES:
        print(f"\n{s}: best validation mAP per delta_rel (rows) x lr (columns); grid best {best[s]:.2f}, "
              f"within 1: {sum(c[-1]['best_val_map'] >= targets[s] for k, c in curves.items() if k[0] == s)}")
        print("        " + "".join(f"{lr:>9g}" for lr in settings["lrs"]))
        for d in settings["deltas"]:
            print(f"  {d:5g} " + "".join(f"{curves[(s, d, lr)][-1]['best_val_map']:9.2f}" for lr in settings["lrs"]))

    num_samples = args.num_samples or n_configs
    seeds = [int(x) for x in args.seeds.split(",")]
    levels = [int(x) for x in args.gpus.split(",")]
    names = [x.strip() for x in args.variants.split(",") if x.strip()]
    space0 = bench_space(settings, num_samples, seeds[0], VARIANTS["shipped"])
    print(f"\nsearch: {num_samples} trials ({num_samples // len(LL_SCHEMES)} per scheme), no start points, "
          f"seeds {args.seeds}; ASHA (shipped) grace {space0.scheduler.grace_period}, rf "
          f"{space0.scheduler.reduction_factor:g}; per-scheme ratio = epochs on the scheme to within "
          f"{TOLERANCE:g} mAP of its grid best / its grid epochs ("
          + ", ".join(f"{s} {grid_epochs[s]}" for s in LL_SCHEMES) + "; fewer than configurations x epochs where "
          "the trainer's stop rule ended a configuration)")
    started = time.monotonic()
    table: dict[tuple[str, int], dict[str, float]] = {}
    for name in names:
        variant = variant_of(name)
        for level in levels:
            per: dict[str, list[float]] = {s: [] for s in LL_SCHEMES}
            spent = []
            for seed in seeds:
                space = bench_space(settings, num_samples, seed, variant)
                with contextlib.redirect_stdout(io.StringIO()):     # per_scheme's notes on groups that ended
                    rows = simulate(space, variant, curves, level)
                spent.append(len(rows))
                for s, n in per_scheme_epochs(rows, targets).items():
                    per[s].append(math.inf if n is None else n / grid_epochs[s])
            table[(name, level)] = {s: statistics.median(v) for s, v in per.items()}
            table[(name, level)]["all epochs"] = statistics.median(spent) / sum(grid_epochs.values())
    print(f"(simulated in {time.monotonic() - started:.0f} s)\n")
    head = f"{'variant':34s} {'gpus':>4s} " + " ".join(f"{s:>6s}" for s in LL_SCHEMES) + "  median  all-epochs"
    print(head)
    print("-" * len(head))
    for (name, level), v in table.items():
        med = statistics.median([v[s] for s in LL_SCHEMES])
        print(f"{variant_of(name).label:34s} {level:4d} " + " ".join(f"{fmt(v[s]):>6s}" for s in LL_SCHEMES)
              + f"  {fmt(med):>6s}  {v['all epochs']:10.2f}")
    print("(per scheme: median over seeds of epochs to within 1 mAP / grid epochs; all-epochs: the whole "
          "search's epochs / the grid's)")

    if args.tune_check:
        space = bench_space(settings, num_samples, seeds[0], VARIANTS["shipped"])
        with contextlib.redirect_stdout(io.StringIO()):
            sim = per_scheme_epochs(simulate(space, variant_of("gpus"), curves, 1), targets)
        real = tune_check(space, curves, targets)
        print(f"tune check (shipped, seed {seeds[0]}, 1 at a time, max_concurrent 1; per scheme: epochs to "
              f"target): simulation {sim}, real Tune {real}: "
              f"{'same' if sim == real else 'DIFFERENT'}")

    key = ("shipped", levels[-1])
    x = statistics.median([table[key][s] for s in LL_SCHEMES]) if key in table else math.nan
    print(f"sweep ratio {fmt(x)} (target {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Sweep the large-loss trainer with Ray Tune, Optuna, ASHA and MLflow.

    python orchestration/sweep.py --dataset digits                # Ray in-process, MLflow in ./mlflow.db
    python orchestration/sweep.py --dataset cub --address auto    # join the running cluster (on its head)
    python orchestration/sweep.py --dataset digits --name N --resume   # continue an interrupted sweep

A sweep runs in four steps: every input is checked before anything is created
(`orchestration/search/plan.py`); then (`orchestration/run/runner.py`) Ray, the sweep's MLflow run and the sweep record are set up; the
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
import os
import sys
from typing import NoReturn

from wsml.config import DATASETS, SCHEMES, TrainConfig
from wsml.errors import WSMLError
from wsml.logs import show_on_console, show_on_stderr

from orchestration.cluster import connect as cluster
from orchestration.cost import disk, throughput
from orchestration.common import SweepError, first_line
from orchestration.search.plan import Plan, estimate_for, plan
from orchestration.run.runner import STOP, run_sweep

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + error
        raise SweepError(f"{message} (see --help)")


# `--help` starts with these (argparse prints them after "usage: ")
EXAMPLES = """python orchestration/sweep.py --dataset digits                      # Ray in-process, MLflow in ./mlflow.db
       python orchestration/sweep.py --dataset cub --address auto          # on the Ray cluster this machine heads
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
                        "together (default: the space file's max_concurrent, else the trials the cluster can run at once, "
                        "counting the workers its autoscaler may start)")
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
                        "they trained on the same data (labels, split, observed labels, image list) are not "
                        "trained again")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything a start checks, print what the sweep will cost (trials, epochs, images, "
                        "GPU-hours, wall time) and stop: nothing is started or created")
    p.add_argument("--gpus", type=float, help="the GPUs the estimate's wall time is for (default: those of the "
                                              "cluster at --address, else this machine's)")
    p.add_argument("--gpu-type", help=f"the GPU of the estimate, one of {', '.join(throughput.gpu_names())} "
                                      "(default: the GPUs found, else A10G)")
    return p.parse_args(argv)


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
    est = estimate_for(sweep, sweep.space.resources.cpus_per_trial, sweep.space.resources.gpus_per_trial,
                    cpus, gpus, gpu_name, where)
    cfg = TrainConfig.from_dict({"dataset": sweep.space.dataset, **sweep.space.train,
                                 "data_root": sweep.data_root}).resolve()
    use = disk.disk_use(cfg, images=est.data.train + est.data.val + est.data.test,
                        linear_init_images=est.linear_init_images, runs=est.trials_with_finals,
                        keep=sweep.space.keep_checkpoints)
    for line in est.lines() + use.lines():
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    show_on_console("orchestration")     # the library modules' notes, progress and summary
    show_on_stderr()                     # and wsml's (data and cache lines)
    try:
        args = parse_args(argv)
        sweep = plan(args, ["orchestration/sweep.py", *argv])
        try:
            return dry_run(sweep) if args.dry_run else run_sweep(sweep)
        finally:
            sweep.release()
    except WSMLError as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: continue with the same command and --resume", file=sys.stderr)
        return STOP.status


def cli() -> int:
    """The `wsml-sweep` command (and `python orchestration/sweep.py`): main() with Ctrl-C handled."""
    STOP.install()
    return main()


if __name__ == "__main__":
    sys.exit(cli())

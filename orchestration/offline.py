#!/usr/bin/env python
"""What a sweep's trials take from the internet, fetched on a login node; and a SLURM job's check that it is there.

    python -m orchestration.offline fetch --dataset cub [--space FILE] [--data-root DIR]   # on the login node
    python -m orchestration.offline check SWEEP_ARGUMENTS                                 # cluster.slurm.sh

Compute nodes of a campus cluster often have no internet. A trial takes two things from it: ResNet-50's
ImageNet weights (torch.hub, wsml/model.py) and its data set; without them every trial fails at its start, on
every node, after the allocation has been paid for. Both commands take the sweep's own arguments
(orchestration/sweep.py --help: --dataset, --space, --data-root, --gpus-per-trial, --resume, ...), so they see
the backbone, weights and data of the sweep the job runs.

`fetch` downloads the ImageNet weights (unless the space trains with weights none or a file) into $TORCH_HOME
(default <shared>/torch) and downloads and prepares the data set (wsml.data.download) into --data-root
(default $WSML_DATA_ROOT/<dataset>, else <shared>/data/<dataset>), where <shared> is $WSML_SHARED, else
$SCRATCH/wsml, else this checkout: the defaults of cluster.slurm.sh, which exports the same TORCH_HOME to
every node. The packages come from scripts/setup.sh on the login node (the venv lies on storage the nodes
share).

`check` runs in the job before Ray starts: it names everything missing and the fetch command in one line and
exits 2; otherwise it prints what it found on stderr and the GPUs per trial on stdout (for the GPU check of
every node, orchestration/gpu_check.py).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from wsml.config import TrainConfig
from wsml.errors import WSMLError
from wsml.logs import show_on_console

from orchestration.run import preflight, record
from orchestration import trial as trial_config
from orchestration.common import ROOT, SweepError, first_line
from orchestration.search.space import SweepSpace, load_space, space_from_dict, with_overrides



def shared() -> Path:
    """The folder the job's nodes share: cluster.slurm.sh's WSML_SHARED and its defaults."""
    scratch = os.environ.get("SCRATCH")
    return Path(os.environ.get("WSML_SHARED") or (f"{scratch}/wsml" if scratch else ROOT))


@dataclass
class Needs:
    """What the trials of a sweep load from outside the venv."""

    space: SweepSpace
    cfg: TrainConfig                # the trials' resolved config (arch, weights, data root)
    argv: list[str]                 # the fetch command's arguments for this sweep

    @property
    def dataset(self) -> str:
        return self.space.dataset


def needs(argv: list[str]) -> Needs:
    """The sweep's space and trial config, from the sweep's arguments."""
    from orchestration.sweep import parse_args

    args = parse_args(argv)
    preflight.check_dataset(args.dataset)
    if args.resume:
        previous = record.find_resumable(preflight.resolve_storage(args.storage), args.dataset, args.name)
        space, data_root = space_from_dict(previous.space), previous.data_root
    else:
        space = with_overrides(load_space(args.dataset, args.space), gpus_per_trial=args.gpus_per_trial)
        default = Path(os.environ.get("WSML_DATA_ROOT") or shared() / "data") / args.dataset
        data_root = preflight.data_root_path(args.dataset, args.data_root or str(default))
    base = trial_config.base_config(dataset=space.dataset, epochs=space.epochs, train=space.train, sweep="offline",
                                    data_root=data_root, cache_dir=".cache")
    cfg = trial_config.Trial.parse(
        {**base, "scheme": space.search.scheme[0], "mode": space.search.mode[0]}).train_config()
    fetch = ["--dataset", space.dataset]
    if args.space and not args.resume:
        fetch += ["--space", str(Path(args.space).resolve())]
    if data_root is not None:
        fetch += ["--data-root", data_root]
    return Needs(space, cfg, fetch)


def missing(n: Needs) -> list[str]:
    """What the trials would have to download, or cannot find: one phrase each."""
    from wsml.model import imagenet_weights_file

    out = []
    if n.cfg.weights == "imagenet":
        if not imagenet_weights_file().is_file():
            out.append(f"ResNet-50's ImageNet weights {imagenet_weights_file()}")
    elif n.cfg.weights not in (None, "none") and not Path(n.cfg.weights).is_file():
        out.append(f"the weights file {n.cfg.weights}")
    if n.dataset != "digits":        # digits is built from scikit-learn's copy: nothing to download
        if not n.cfg.data_root or not Path(n.cfg.data_root).is_dir():
            out.append(f"data set {n.dataset} at {n.cfg.data_root}")
        else:
            try:
                preflight.data_identity(n.cfg)
            except WSMLError as err:
                out.append(f"a prepared data set {n.dataset} at {n.cfg.data_root} ({first_line(err)})")
    return out


def fetch_command(n: Needs) -> str:
    env = f"WSML_SHARED={shlex.quote(str(shared()))} "
    if os.environ.get("TORCH_HOME") and Path(os.environ["TORCH_HOME"]) != shared() / "torch":
        env += f"TORCH_HOME={shlex.quote(os.environ['TORCH_HOME'])} "
    return f"{env}.venv/bin/python -m orchestration.offline fetch {shlex.join(n.argv)}"


def check(n: Needs) -> int:
    lost = missing(n)
    if lost:
        print(f"error: offline check: the trials would download what compute nodes may not reach: "
              f"{'; '.join(lost)} missing; fix: on the login node, in the project, run {fetch_command(n)}",
              file=sys.stderr)
        return 2
    weights = n.cfg.weights if n.cfg.weights != "imagenet" else f"imagenet ({os.environ.get('TORCH_HOME')})"
    data = n.cfg.data_root if n.dataset != "digits" else "built in"
    print(f"offline check: {n.cfg.arch} weights {weights}, data {data}: nothing to download", file=sys.stderr)
    print(f"{n.space.resources.gpus_per_trial:g}")
    return 0


def fetch(n: Needs) -> int:
    from wsml.data import download
    from wsml.model import imagenet_weights_file, resnet50

    if subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--check"]).returncode != 0:
        print("error: fetch: the venv is not current: run bash scripts/setup.sh first (with TORCH_CUDA for the "
              "nodes' driver, see docs/slurm.md)", file=sys.stderr)
        return 2
    if n.cfg.weights == "imagenet":
        print(f"fetch: ResNet-50's ImageNet weights into {imagenet_weights_file()}")
        resnet50("imagenet")        # downloads once, checks the hash, and loads them as a trial will
    if n.dataset != "digits" and any(m.startswith(("data set", "a prepared")) for m in missing(n)):
        print(f"fetch: data set {n.dataset} into {n.cfg.data_root}")
        if download.main([n.dataset, "--dest", n.cfg.data_root]) != 0:
            return 2
    lost = missing(n)
    if lost:
        print(f"error: fetch: still missing: {'; '.join(lost)}", file=sys.stderr)
        return 2
    print(f"fetch: everything the trials of {n.dataset} load is here (weights {n.cfg.weights}, TORCH_HOME "
          f"{os.environ['TORCH_HOME']}); submit with the same WSML_SHARED ({shared()})")
    return 0


def main(argv: list[str] | None = None) -> int:
    show_on_console("orchestration")
    p = argparse.ArgumentParser(prog="python -m orchestration.offline", description=__doc__.split("\n\n")[0],
                                epilog="The sweep's arguments: orchestration/sweep.py --help (--dataset, --space, "
                                       "--data-root, --gpus-per-trial, --resume, ...).")
    p.add_argument("action", choices=("fetch", "check"), help="fetch on the login node; check in the job")
    p.add_argument("sweep_args", nargs=argparse.REMAINDER, help="the sweep's arguments")
    args = p.parse_args(argv)
    # torch.hub's folder: the shared one cluster.slurm.sh exports to every node
    os.environ.setdefault("TORCH_HOME", str(shared() / "torch"))
    try:
        n = needs(args.sweep_args)
        return fetch(n) if args.action == "fetch" else check(n)
    except (SweepError, WSMLError) as err:
        print(f"error: {args.action}: {first_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

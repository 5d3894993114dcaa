#!/usr/bin/env python
"""Can this node run a GPU trial? One line that says why not, for the trial and for a GPU node's set-up.

    python -m orchestration.gpu_check       # a node's set-up: exit 1 with that line when it has an NVIDIA
                                            # GPU that torch cannot use; exit 0 otherwise (CPU nodes too)
    python -m orchestration.gpu_check --gpus-per-trial N
                                            # a SLURM job's node, before Ray starts (cluster.slurm.sh): the
                                            # node, its driver (nvidia-smi) and torch's CUDA in one line; exit 1
                                            # when trials use GPUs and the driver is too old for torch's build
                                            # (the TORCH_CUDA build that fits, scripts/setup.sh), or there is
                                            # no driver or no CUDA device

torch's CUDA 13 wheels (requirements.txt) need an NVIDIA driver 580 or newer.
With an older driver, or none, `torch.cuda.is_available()` is False and
nothing else fails: a trial given a GPU would train ResNet-50 at 448 px on a
few CPUs, hundreds of times slower, saying so only in a log line. So a trial
that asked for a GPU and finds no CUDA device fails at once with `problem()`'s
line (orchestration/run/trainable.py), and the GPU nodes of the cluster files run
this module in their set-up, which fails the set-up loudly: Ray's autoscaler
then terminates the node and, while trials still wait, starts another one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

FAKE_GPUS_ENV = "WSML_FAKE_GPUS"   # "1": this node's Ray GPUs are declared for a test, not real (see trainable)


class NoCudaError(RuntimeError):
    """A trial asked for a GPU on a node where torch sees no CUDA device (one line: `problem()`)."""


# The oldest driver each CUDA major version of torch's wheels runs on (NVIDIA's CUDA release notes,
# "minimum required driver version" for Linux; minor-version compatibility).
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
# scripts/setup.sh's TORCH_CUDA builds, newest first: (build, the driver its toolkit ships with, so every feature
# works: CUDA 13.0 GA 580.65.06, 12.8 GA 570.26, 12.6 GA 560.28.03 in NVIDIA's CUDA toolkit release notes)
TORCH_BUILDS = (("cu130", 580), ("cu128", 570), ("cu126", 560))
NVIDIA_PCI_VENDOR = "0x10de"
PCI_DISPLAY_CLASS = "0x03"         # VGA and 3D controllers: the GPUs (not NVSwitches or audio functions)


def nvidia_gpus(pci_root: Path = Path("/sys/bus/pci/devices")) -> int:
    """NVIDIA GPUs on the PCI bus, with or without a working driver."""
    count = 0
    for dev in pci_root.glob("*"):
        try:
            vendor = (dev / "vendor").read_text().strip()
            cls = (dev / "class").read_text().strip()
        except OSError:
            continue
        count += vendor == NVIDIA_PCI_VENDOR and cls.startswith(PCI_DISPLAY_CLASS)
    return count


def driver_version() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it; None without a (working) driver."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def required_driver(torch_cuda: str | None) -> int | None:
    if not torch_cuda:
        return None
    return MIN_DRIVER.get(int(torch_cuda.split(".")[0]))


def build_for(driver: str) -> str | None:
    """The TORCH_CUDA build for a driver: the newest whose toolkit's driver it has, else the oldest it runs
    with minor-version compatibility (MIN_DRIVER); None when it is older than every build needs."""
    major = int(driver.split(".")[0])
    for build, full in TORCH_BUILDS:
        if major >= full:
            return build
    build = TORCH_BUILDS[-1][0]
    return build if major >= MIN_DRIVER[int(build[2:4])] else None


def _rebuild(driver: str) -> str:
    build = build_for(driver)
    return (f"on the login node, rebuild the venv for it: TORCH_CUDA={build} bash scripts/setup.sh" if build
            else f"ask for nodes with a driver >= {MIN_DRIVER[12]}")


def problem(node: str, *, driver: str | None, torch_cuda: str | None, torch_version: str) -> str:
    """The one line for a node where torch sees no CUDA device: what is there, and the fix."""
    need = required_driver(torch_cuda)
    if torch_cuda is None:
        fix = "install torch's CUDA wheels (bash scripts/setup.sh)"
    elif driver is None:
        fix = f"install an NVIDIA driver >= {need or 'the one torch needs'} (the cluster's GPU AMI has one)"
    elif need is not None and int(driver.split(".")[0]) < need:
        fix = (f"a driver >= {need} for torch's CUDA {torch_cuda.split('.')[0]} wheels (a newer GPU AMI), or "
               f"torch built for this driver ({_rebuild(driver)})")
    else:
        fix = "check the GPUs with nvidia-smi (CUDA_VISIBLE_DEVICES, a failed GPU)"
    return (f"no CUDA device on node {node} for a trial that asked for a GPU: NVIDIA driver "
            f"{driver or 'none (no driver)'}, torch {torch_version} built for CUDA {torch_cuda or 'none (CPU build)'}; "
            f"fix: {fix}, or pass --gpus-per-trial 0 to train on CPUs")


def this_node(ray_node_id: str | None = None) -> str:
    host = socket.gethostname()
    return f"{host} (Ray node {ray_node_id[:12]})" if ray_node_id else host


def check(ray_node_id: str | None = None) -> str | None:
    """None when torch sees a CUDA device here, else `problem()`'s line."""
    import torch

    if torch.cuda.is_available():
        return None
    return problem(this_node(ray_node_id), driver=driver_version(), torch_cuda=torch.version.cuda,
                   torch_version=torch.__version__)


def job_node(gpus_per_trial: float) -> tuple[bool, str]:
    """A SLURM job's node before Ray starts: (fits, one line). Trials that use no GPU fit any driver; trials
    that use GPUs need a driver (nvidia-smi) that torch's CUDA build runs on, and a CUDA device."""
    import torch

    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    driver, cuda = driver_version(), torch.version.cuda
    need = required_driver(cuda)
    what = (f"node {node}: NVIDIA driver {driver or 'none'}, torch {torch.__version__} built for CUDA "
            f"{cuda or 'none (CPU build)'}")
    if gpus_per_trial <= 0:
        return True, f"{what}; the trials use no GPU"
    if driver is not None and need is not None and int(driver.split(".")[0]) < need:
        return False, (f"{what}, which needs a driver >= {need}: the driver is too old for torch's build; fix: "
                       f"{_rebuild(driver)}, or pass --gpus-per-trial 0 to train on CPUs")
    if not torch.cuda.is_available():
        return False, problem(node, driver=driver, torch_cuda=cuda, torch_version=torch.__version__)
    return True, f"{what}; {torch.cuda.device_count()} CUDA device(s) ({torch.cuda.get_device_name(0)})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestration.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus-per-trial", type=float,
                   help="a SLURM job's check of its node: the GPUs each trial uses (0: CPU trials)")
    args = p.parse_args(argv)
    if args.gpus_per_trial is not None:
        fits, line = job_node(args.gpus_per_trial)
        print(f"gpu check: {line}" if fits else f"error: gpu check: {line}", file=sys.stdout if fits else sys.stderr)
        return 0 if fits else 1
    gpus = nvidia_gpus()
    if gpus == 0:
        print("gpu check: no NVIDIA GPU on this node: nothing to check")
        return 0
    problem_line = check()
    if problem_line is not None:
        print(f"error: gpu check: {gpus} NVIDIA GPU(s) but {problem_line}", file=sys.stderr)
        return 1
    import torch

    print(f"gpu check: {torch.cuda.device_count()} CUDA device(s) ({torch.cuda.get_device_name(0)}), "
          f"driver {driver_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

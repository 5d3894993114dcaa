"""Ray for a sweep: start it in-process or join a cluster, and size one trial for what is there."""
from __future__ import annotations

from pathlib import Path

from orchestration import private
from orchestration.common import SweepError, first_line

ROOT = Path(__file__).resolve().parent.parent


def connect(address: str | None) -> bool:
    """Connect to (or start) Ray; returns True when this process started it (and must shut it down)."""
    import ray

    if ray.is_initialized():        # an embedding program (a test) already connected
        return False
    if address is None:
        with private.local_ray_on_loopback():    # nothing of this sweep listens beyond this machine
            ray.init(address="local", include_dashboard=False)
        return True
    # Ship the two packages to every node (they need not be installed there).
    runtime_env = {"py_modules": [str(ROOT / "wsml"), str(ROOT / "orchestration")],
                   "excludes": ["__pycache__", "*.pyc"]}
    try:
        ray.init(address=address, runtime_env=runtime_env)
    except Exception as err:  # noqa: BLE001
        raise SweepError(f"cannot join the Ray cluster at {address}: {first_line(err)}") from None
    return True


def trial_resources(cpus: float, gpus: float, remote: bool) -> dict[str, float]:
    """{"cpu", "gpu"} of one trial on the cluster Ray is connected to.

    On this machine without a GPU, GPU trials run on CPUs (said); on a cluster
    they wait for the autoscaler to start GPU nodes.
    """
    import ray

    total_gpus = ray.cluster_resources().get("GPU", 0)
    if gpus > 0 and total_gpus == 0:
        if not remote:
            print(f"note: this machine has no GPU for Ray: trials run on CPUs (gpus_per_trial {gpus:g} -> 0)")
            gpus = 0.0
        else:
            print(f"note: the Ray cluster has no GPU node yet: trials ask for {gpus:g} GPU each and wait for the "
                  "autoscaler (pass --gpus-per-trial 0 to train on CPUs)")
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        msg = (f"no node of the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs free for one trial (largest node: "
               f"{largest.get('CPU', 0):g} CPUs, {largest.get('GPU', 0):g} GPUs): lower --cpus-per-trial / "
               "--gpus-per-trial")
        if not remote:
            raise SweepError(msg)
        print(f"note: {msg}; waiting for the autoscaler")
    return {"cpu": cpus, "gpu": gpus}


def connected_devices() -> tuple[float, float, str | None]:
    """(CPUs, GPUs, GPU type) of the Ray cluster this process is connected to (the type from Ray's
    `accelerator_type:<name>` resource, None without one)."""
    import ray

    res = ray.cluster_resources()
    types = sorted(k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:"))
    return float(res.get("CPU", 0)), float(res.get("GPU", 0)), (types[0] if types else None)


def describe(address: str) -> tuple[float, float, str | None]:
    """`connected_devices` of the cluster at `address`, joined for that question alone (as a driver: no
    packages are shipped, nothing is started there)."""
    import ray

    if ray.is_initialized():        # an embedding program (a test) already connected
        return connected_devices()
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except Exception as err:  # noqa: BLE001
        raise SweepError(f"cannot join the Ray cluster at {address}: {first_line(err)}") from None
    try:
        return connected_devices()
    finally:
        ray.shutdown()


def local_devices() -> tuple[float, float, str | None]:
    """(CPUs, GPUs, GPU type) of this machine, without starting Ray."""
    import os

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return float(os.cpu_count() or 1), float(gpus), (torch.cuda.get_device_name(0) if gpus else None)

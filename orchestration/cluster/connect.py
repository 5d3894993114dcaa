"""Ray for a sweep: start it in-process or join a cluster, and size one trial for what is there."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestration.run import private
from orchestration.common import ROOT, SweepError, first_line

log = logging.getLogger(__name__)



def connect(address: str | None) -> bool:
    """Connect to (or start) Ray; returns True when this process started it (and must shut it down)."""
    import ray

    if ray.is_initialized():        # an embedding program (a test) already connected
        return False
    if address is None:
        private.ephemeral_ray_token()            # nothing left in ~/.ray that a later `ray up` would pick up
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


# How long a sweep whose trials ask for GPUs waits for a cluster without any to start a GPU node: an AWS
# GPU worker takes a few minutes to boot and unpack the venv (docs/aws.md), so 15 minutes is several
# tries of the autoscaler; WSML_GPU_WAIT_S changes it.
GPU_WAIT_S = 900.0


def trial_resources(cpus: float, gpus: float, remote: bool, at_once: int = 1) -> dict[str, float]:
    """{"cpu", "gpu"} of one trial on the cluster Ray is connected to.

    A GPU space never becomes a CPU sweep: on this machine without a GPU it is refused; on a cluster
    without a GPU node yet, the sweep asks the autoscaler for the nodes of its first `at_once` trials
    and waits (`wait_for_gpus`).
    """
    import ray

    total_gpus = ray.cluster_resources().get("GPU", 0)
    if gpus > 0 and total_gpus == 0:
        if not remote:
            raise SweepError(f"the space asks for {gpus:g} GPU per trial and this machine has none for Ray: pass "
                             "--gpus-per-trial 0 to train on its CPUs, or run the sweep on a GPU cluster's head")
        wait_for_gpus(cpus, gpus, at_once, float(os.environ.get("WSML_GPU_WAIT_S", GPU_WAIT_S)))
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        largest: dict[str, float] = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        msg = (f"no node of the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs free for one trial (largest node: "
               f"{largest.get('CPU', 0):g} CPUs, {largest.get('GPU', 0):g} GPUs): lower --cpus-per-trial / "
               "--gpus-per-trial")
        if not remote:
            raise SweepError(msg)
        log.info(f"note: {msg}; waiting for the autoscaler")
    return {"cpu": cpus, "gpu": gpus}


# The autoscaler v2 reconciles every 5 s (AUTOSCALER_UPDATE_INTERVAL_S): asking more often shows nothing new.
POLL_S = 5.0
# Nodes in a row (no node joining between them) that left their set-up without joining Ray: a fault of every
# node (a bad AMI or NVIDIA driver, which `orchestration.gpu_check` fails in set-up; a broken venv archive;
# EFS unreachable), not a passing one, and each is a billed boot and set-up (about 5 min, orchestration/cost/prices.py)
# that the autoscaler would repeat without end. Three tell that apart from one unlucky node.
MAX_FAILED_NODES = 3
# The resource a GPU worker type of the cluster file carries to be asked for by name (`wsml_type_<type>: 1` in
# its `resources`; no trial asks for it): a resource request naming it is met by that type alone.
TYPE_RESOURCE = "wsml_type_"
# The cluster file on a `ray up` head: Ray copies it there, and cluster.yaml's head start command hands it to
# the autoscaler (--autoscaling-config). WSML_AUTOSCALING_CONFIG names another.
AUTOSCALING_CONFIG = "~/ray_bootstrap_config.yaml"


def wait_for_gpus(cpus: float, gpus: float, trials: int, limit_s: float, poll_s: float = POLL_S) -> None:
    """Ask the autoscaler for the nodes of `trials` trials at once (a resource request: the demand Tune will
    make, all of it, so every node starts in one round) and wait until the cluster has a GPU, at most
    `limit_s`; say what the autoscaler reports as it changes, and stop with it (SweepError) when no GPU
    came. Launches the cloud refuses at once fall back to the next GPU node type, and nodes that keep
    failing their set-up stop the wait (`Launches`). The request stands until `release_request` (the
    sweep's end): Tune's own demand takes over."""
    import ray

    log.info(f"note: the Ray cluster has no GPU node yet: trials ask for {gpus:g} GPU each; asking the autoscaler for "
          f"the nodes of {trials} and waiting up to {limit_s:.0f} s for the first (WSML_GPU_WAIT_S)")
    launches = watch_launches(cpus, gpus, trials)
    launches.request()
    deadline, said = time.monotonic() + limit_s, None
    while ray.cluster_resources().get("GPU", 0) == 0:
        status = autoscaler_status()
        report = describe_launches(status) if not isinstance(status, str) else status
        if report != said:
            log.info(f"note: the autoscaler: {report}")
            said = report
        stop = None if isinstance(status, str) else launches.poll(status, running=False)
        if stop is None and time.monotonic() >= deadline:
            stop = (f"no GPU node joined the Ray cluster within {limit_s:.0f} s; the autoscaler: {report}: raise the "
                    "account's GPU quota or pick another instance type or zone (cluster.yaml), or pass "
                    "--gpus-per-trial 0 to train on CPUs")
        if stop is not None:
            release_request()
            raise SweepError(stop)
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


NO_REASON = "the reason is in the head's /tmp/ray/session_latest/logs/monitor.*"


@dataclass(frozen=True)
class NodeType:
    """A GPU worker type of the cluster file."""

    name: str
    cpus: float
    gpus: float
    priority: int
    marked: bool            # carries its TYPE_RESOURCE


def gpu_node_types(config: dict | None) -> list[NodeType]:
    """The GPU worker types of an autoscaling config in the order the autoscaler takes them: higher
    `priority` first, then as the file lists them."""
    types = []
    config = config or {}
    for name, t in (config.get("available_node_types") or {}).items():
        res = t.get("resources") or {}
        if name != config.get("head_node_type") and float(res.get("GPU", 0)) > 0:
            types.append(NodeType(name, float(res.get("CPU", 0)), float(res["GPU"]), int(t.get("priority", 0)),
                                  float(res.get(TYPE_RESOURCE + name, 0)) >= 1))
    return sorted(types, key=lambda t: -t.priority)


def read_autoscaling_config() -> dict | None:
    """The cluster file the autoscaler runs with (AUTOSCALING_CONFIG; Ray writes it as JSON), None without one
    (a cluster of `ray start` alone)."""
    import yaml

    path = Path(os.environ.get("WSML_AUTOSCALING_CONFIG", AUTOSCALING_CONFIG)).expanduser()
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


@dataclass
class Launches:
    """The sweep's watch on the autoscaler (`poll` each ClusterStatus), while it waits for its first GPU node
    and while it runs.

    Fallback: Ray 2.60's autoscaler moves off a node type only when an instance times out in allocation
    (ALLOCATION_TIMEOUT, after an hour); a launch EC2 refuses at once (no quota, no capacity:
    ALLOCATION_FAILED) leaves the type first in line, and it is tried again every round without end
    (autoscaler/v2/instance_manager/reconciler.py). So once a GPU type's launch failed, the standing
    resource request is made again in a form only the next type satisfies (its TYPE_RESOURCE): the
    autoscaler starts that type, and Tune's trials, which ask for CPUs and GPUs alone, run on it. With
    every type refused and no GPU in the cluster, the sweep stops with the cloud's reasons.

    Failed set-ups: a node whose set-up fails (cluster.yaml's setup_commands, `orchestration.gpu_check`)
    never becomes a Ray node; the autoscaler reports it pending, then terminates it, and says nothing more
    (Ray 2.60 keeps no record of it in the cluster status). So a node of a type that left the pending list
    without a Ray node of that type joining counts as failed; MAX_FAILED_NODES in a row stop the sweep.
    """

    cpus: float
    gpus: float
    trials: int
    types: list[NodeType]
    since: float = field(default_factory=time.time)     # launch failures before this are another sweep's
    refused: dict[str, str] = field(default_factory=dict)     # node type -> the cloud's reason
    target: str | None = None                           # the type the request names; None: the autoscaler's pick
    pending: dict[str, str] = field(default_factory=dict)             # instance id -> node type name
    details: dict[str, str] = field(default_factory=dict)              # instance id -> what the autoscaler said
    seen: set[str] | None = None                        # Ray node ids seen (None: not polled yet)
    credit: dict[str, int] = field(default_factory=dict)    # per type: joins not yet matched by a pending node
    failed_in_a_row: int = 0
    last_failure: str = ""

    def bundles(self) -> list[dict[str, float]]:
        bundle = {"CPU": self.cpus, "GPU": self.gpus}
        if self.target is not None:
            [t] = [t for t in self.types if t.name == self.target]
            bundle[TYPE_RESOURCE + t.name] = self.gpus / t.gpus      # a trial's share of one node of the type
        return [bundle] * self.trials

    def request(self) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=self.bundles())
        _REQUESTS.append(self.trials)

    def poll(self, status, running: bool) -> str | None:
        """Take in one `ray.autoscaler.v2.schema.ClusterStatus`; returns why the sweep must stop, or None.
        `running`: the sweep runs on GPU nodes already (a refused type then never stops it)."""
        self._count_set_ups(status)
        if self.failed_in_a_row >= MAX_FAILED_NODES:
            return (f"{self.failed_in_a_row} nodes in a row failed their set-up ({self.last_failure}): fix the nodes' "
                    "set-up (cluster.yaml's AMI and its NVIDIA driver: docs/aws.md; the set-up's output is in the "
                    "head's /tmp/ray/session_latest/logs/monitor.*) before the autoscaler starts more of them")
        for r in status.failed_launches:
            if r.ray_node_type_name in {t.name for t in self.types} and (r.failed_ts_s or 0) >= int(self.since):
                # Ray 2.60 drops EC2's answer on the way (InstanceManager keeps no details of the update to
                # ALLOCATION_FAILED); its autoscaler's log has it
                self.refused[r.ray_node_type_name] = first_line(r.details) if r.details else NO_REASON
        if not self.refused:
            return None
        left = [t for t in self.types if t.name not in self.refused and t.cpus >= self.cpus and t.gpus >= self.gpus]
        nameable = [t for t in left if t.marked]
        if nameable and nameable[0].name != self.target:
            self.target = nameable[0].name
            log.info(f"note: the cloud refused to start {', '.join(self.refused)} "
                  f"({'; '.join(self.refused.values())}): asking the autoscaler for {self.target} instead")
            self.request()
        if nameable or running:
            return None
        why = "; ".join(f"{k}: {v}" for k, v in self.refused.items())
        if left:
            rest = ", ".join(t.name for t in left)
            return (f"the cloud refused to start {', '.join(self.refused)} ({why}) and {rest} cannot be asked for "
                    "by name: give each GPU worker type in cluster.yaml the resource "
                    f"{TYPE_RESOURCE}<type>: 1 (docs/aws.md)")
        return (f"the cloud refused to start every GPU node type ({why}): raise the account's G/VT vCPU quotas "
                "(python -m orchestration.aws_check says which) or pick other instance types or zones in cluster.yaml")

    def _count_set_ups(self, status) -> None:
        nodes = {n.node_id: n.ray_node_type_name for n in [*status.active_nodes, *status.idle_nodes,
                                                           *status.failed_nodes]}
        pending = {n.instance_id: n.ray_node_type_name for n in status.pending_nodes}
        if self.seen is None:
            self.seen = set(nodes)
        joined: dict[str, int] = {}
        for node_id, kind in nodes.items():
            if node_id not in self.seen:
                joined[kind] = joined.get(kind, 0) + 1
        if joined:
            self.failed_in_a_row = 0
        gone: dict[str, int] = {}
        for instance, kind in self.pending.items():
            if instance not in pending:
                gone[kind] = gone.get(kind, 0) + 1
                self.last_failure = f"{kind}: {self.details.get(instance) or 'no detail'}"
        for kind in set(joined) | set(gone):
            credit = self.credit.get(kind, 0) + joined.get(kind, 0) - gone.get(kind, 0)
            self.failed_in_a_row += max(0, -credit)
            self.credit[kind] = max(0, credit)
        self.seen |= set(nodes)
        self.pending = pending
        self.details.update({n.instance_id: first_line(n.details) for n in status.pending_nodes if n.details})


_REQUESTS: list[int] = []      # resource requests this process made (`Launches.request`)
_WATCH: list[Launches] = []    # the sweep's watch (`watch_launches`)


def watch_launches(cpus: float, gpus: float, trials: int) -> Launches:
    """The sweep's `Launches` (one per process: the GPU wait and the sweep share it)."""
    if not _WATCH:
        _WATCH.append(Launches(cpus, gpus, trials, gpu_node_types(read_autoscaling_config())))
    return _WATCH[0]


class LaunchWatch:
    """During the sweep, in a thread: `Launches.poll` every POLL_S; a reason to stop is kept in `reason` and
    stops the sweep as Ctrl-C does (SIGINT: Tune ends the trials at their last checkpoint; --resume continues)."""

    def __init__(self, launches: Launches, poll_s: float = POLL_S):
        import threading

        self.launches, self.poll_s = launches, poll_s
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wsml-launch-watch", daemon=True)

    def start(self) -> LaunchWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        import signal

        while not self._stop.wait(self.poll_s):
            status = autoscaler_status()
            if isinstance(status, str):
                continue
            self.reason = self.launches.poll(status, running=True)
            if self.reason is not None:
                log.info(f"\nstopping the sweep: {self.reason}")
                os.kill(os.getpid(), signal.SIGINT)
                return


def release_request() -> None:
    """Withdraw the resource request of `wait_for_gpus`, if one was made (idle nodes may then go)."""
    import ray
    from ray.autoscaler.sdk import request_resources

    if _REQUESTS and ray.is_initialized():
        request_resources(bundles=[])
    _REQUESTS.clear()
    _WATCH.clear()


def autoscaler_status():
    """The autoscaler's `ray.autoscaler.v2.schema.ClusterStatus`, or a line saying why there is none."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        return get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception as err:  # noqa: BLE001 - the report is advice, never the failure
        return f"no status ({first_line(err)})"


def describe_launches(status) -> str:
    """One line of what the autoscaler says about launches: pending, failed (with the cloud's reason),
    or that it says nothing (no autoscaler runs, e.g. a cluster of `ray start` alone)."""
    parts = [f"{r.count} x {r.instance_type_name or r.ray_node_type_name} launching"
             for r in status.pending_launches]
    failed: dict[tuple[str, str], int] = {}        # Ray lists each failed instance on its own: summed
    for r in status.failed_launches:
        key = (r.instance_type_name or r.ray_node_type_name, first_line(r.details) if r.details else "")
        failed[key] = failed.get(key, 0) + r.count
    parts += [f"{count} x {name} failed to launch" + (f" ({why})" if why else "")
              for (name, why), count in failed.items()]
    parts += [f"node {n.instance_id or n.node_id} ({n.ray_node_type_name}) failed"
              + (f": {first_line(n.failure_detail)}" if n.failure_detail else "") for n in status.failed_nodes]
    parts += [f"{len(status.pending_nodes)} node(s) starting"] if status.pending_nodes else []
    return "; ".join(parts) or ("no launch pending or failed (is an autoscaler running? a cluster of `ray start` "
                                "alone never adds nodes)")


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
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except Exception as err:  # noqa: BLE001
        raise SweepError(f"cannot join the Ray cluster at {address}: {first_line(err)}") from None
    try:
        return connected_devices()
    finally:
        ray.shutdown()


def local_devices() -> tuple[float, float, str | None]:
    """(CPUs, GPUs, GPU type) of this machine, without starting Ray."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return float(os.cpu_count() or 1), float(gpus), (torch.cuda.get_device_name(0) if gpus else None)

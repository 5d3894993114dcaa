"""An autoscaling Ray cluster on this machine: Ray's fake multi-node provider behind Ray's autoscaler v2.

Ray tests autoscaling on one machine with `FakeMultiNodeProvider`
(`ray.autoscaler._private.fake_multi_node`): the autoscaler "launches" a
worker node by starting a raylet on this machine with the node type's
resources (GPUs included, declared only). Ray's own wrapper,
`ray.cluster_utils.AutoscalingCluster`, is not usable here: it runs `ray stop
--force` (every Ray process of the machine, other tests' too) and reads a
defaults file the installed wheel lacks. So the head is started here with
`ray start --head --block` in its own session, the provider is named as an
`external` module (which needs no defaults file), and everything is stopped by
process group and by the cluster's own temp folder, never by name.

As `ray up` does since Ray 2.50, the autoscaler is v2. The cluster asks for a
fresh token (RAY_AUTH_MODE=token): the test process and the sweep get it
through the environment, no file of the user's is read or written.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import ROOT as REPO
from tests.helpers import free_port, poll

PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
REFUSING_PROVIDER = "tests.fake_cluster.RefusingProvider"
HEAD_TYPE = "ray.head.default"


class FakeAutoscalingCluster:
    def __init__(self, worker_types: dict[str, dict], *, upscaling_speed: float, max_workers: int,
                 node_env: dict[str, str] | None = None, refuse: dict[str, str] | None = None):
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

        self.head_id = FAKE_HEAD_NODE_ID
        self.tmp = Path(tempfile.mkdtemp(prefix="wfa-", dir="/tmp"))   # short: Ray's sockets live below
        self.port = free_port()
        import ray

        self.ip = ray.util.get_node_ip_address()
        self.address = f"{self.ip}:{self.port}"
        self.token = secrets.token_hex(32)
        self.config = {
            "cluster_name": "wsml-fake", "max_workers": max_workers, "upscaling_speed": upscaling_speed,
            "idle_timeout_minutes": 5,
            # `refuse`: node type -> the error every launch of it fails with at once (RefusingProvider)
            "provider": {"type": "external", "module": REFUSING_PROVIDER if refuse else PROVIDER,
                         "refuse": refuse or {}, "gcs_address": self.address,
                         "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "auth": {"ssh_user": "nobody"},
            "available_node_types": {HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                                     **worker_types},
            "head_node_type": HEAD_TYPE,
            **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                               "setup_commands", "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands")},
            "file_mounts": {}, "file_mounts_sync_continuously": False,
        }
        self.node_env = node_env or {}
        self.proc: subprocess.Popen | None = None
        self.watcher: subprocess.Popen | None = None
        self.log = None
        self.watch_file = self.tmp / "watch.jsonl"

    def client_env(self) -> dict[str, str]:
        """What a process on the head needs to join: the cluster's token, and the autoscaling config (where a
        `ray up` head has it in ~/ray_bootstrap_config.yaml)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                "WSML_AUTOSCALING_CONFIG": str(self.tmp / "autoscaling.json")}

    def start(self, timeout: float = 180) -> "FakeAutoscalingCluster":
        cfg = self.tmp / "autoscaling.json"
        cfg.write_text(json.dumps(self.config))
        env = {**os.environ, **self.client_env(), **self.node_env,
               "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_enable_autoscaler_v2": "1",
               "RAY_CLOUD_INSTANCE_ID": self.head_id, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": self.head_id,
               "RAY_NODE_TYPE_NAME": HEAD_TYPE, "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        env.pop("RAY_ADDRESS", None)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # RefusingProvider
        agent, metrics, client, runtime_env = (free_port() for _ in range(4))
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={self.port}",
               f"--autoscaling-config={cfg}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false",
               f"--temp-dir={self.tmp}", f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
               f"--ray-client-server-port={client}", f"--runtime-env-agent-port={runtime_env}"]
        self.log = open(self.tmp / "head.out", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        # The GCS is read by a watcher process of its own: Ray fixes a process's token mode when it is
        # first imported, and this test process may have imported Ray already.
        self.watcher = subprocess.Popen([sys.executable, "-m", "tests.fake_cluster", self.address,
                                         str(self.watch_file)], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        poll("the fake cluster's head", self._head_up, timeout=timeout, interval=0.5,
             on_timeout=lambda: print(self.logs()))
        return self

    def _head_up(self) -> bool:
        assert self.proc.poll() is None, "ray start --head exited:\n" + self.logs()
        assert self.watcher.poll() is None, "the watcher exited:\n" + self.logs()
        samples = self.samples()
        return bool(samples) and any(n["head"] and n["alive"] for n in samples[-1]["nodes"])

    def samples(self) -> list[dict]:
        """What the watcher saw so far, oldest first (see `watch`)."""
        out = []
        if self.watch_file.exists():
            for line in self.watch_file.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass            # being written
        return out

    def logs(self) -> str:
        out = []
        for p in [self.tmp / "head.out", *sorted(self.tmp.glob("session_latest/logs/monitor*"))]:
            if p.is_file() and p.stat().st_size:
                out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)[-9000:]

    def shutdown(self) -> None:
        """Stop the watcher and the head's session (its processes and the fake nodes the autoscaler
        started in it), then any process still running from this cluster's temp folder; by process id."""
        for proc in (self.watcher, self.proc):
            if proc is None or proc.poll() is not None:
                continue
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for _ in range(2):
            for pid in self._pids_in_tmp():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        if self.log is not None:
            self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _pids_in_tmp(self) -> list[int]:
        mine = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(self.tmp) in cmd and int(proc.name) != os.getpid():
                mine.append(int(proc.name))
        return mine


def _refusing_provider():
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
    from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

    class RefusingProvider(FakeMultiNodeProvider):
        """The fake provider, whose launches of the node types in the provider config's `refuse` fail at once
        with the error given there, as EC2 refuses an instance type beyond the account's vCPU quota."""

        def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
            refused = self.provider_config.get("refuse", {}).get(tags[TAG_RAY_USER_NODE_TYPE])
            if refused:
                raise RuntimeError(refused)
            return super().create_node_with_resources_and_labels(node_config, tags, count, resources, labels)

    return RefusingProvider


def __getattr__(name: str):
    if name == "RefusingProvider":      # made on demand: importing this module must not import Ray
        return _refusing_provider()
    raise AttributeError(name)


def watch(address: str, out: Path, interval: float = 0.3) -> None:
    """Append what the GCS says every `interval` s to `out`, one JSON line each: seconds since the start,
    every node (id, alive, head, start time in ms, labels), the GPU bundles of the demand that waits (placement
    groups, tasks and resource requests), and the autoscaler's pending launch requests ([node type, count, time])."""
    from ray._raylet import GcsClient
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
    from ray.core.generated import autoscaler_pb2, gcs_pb2

    t0 = time.monotonic()
    gcs = None
    while True:
        try:
            gcs = gcs or GcsClient(address=address)
            nodes = [{"id": nid.hex(), "alive": info.state == gcs_pb2.GcsNodeInfo.ALIVE,
                      "head": nid.hex() == FAKE_HEAD_NODE_ID, "start_ms": info.start_time_ms,
                      "labels": dict(info.labels)}
                     for nid, info in gcs.get_all_node_info().items()]
            status = autoscaler_pb2.GetClusterStatusReply.FromString(gcs.get_cluster_status())
        except Exception:  # noqa: BLE001 - the head is starting, or busy starting a node: ask again
            time.sleep(interval)
            continue
        demand = status.cluster_resource_state
        # GPU bundles asked for: Tune's placement groups and tasks, and the sweep's own resource request
        # (orchestration.cluster.connect.wait_for_gpus) made before Tune starts on a cluster without GPU nodes
        gpus = (sum(int(b.resources_bundle.get("GPU", 0) > 0)
                    for g in demand.pending_gang_resource_requests for b in g.requests)
                + sum(r.count for r in demand.pending_resource_requests
                      if r.request.resources_bundle.get("GPU", 0) > 0)
                + sum(r.count for c in demand.cluster_resource_constraints for r in c.resource_requests
                      if r.request.resources_bundle.get("GPU", 0) > 0))
        launches = [[r.ray_node_type_name, r.count, r.request_ts]
                    for r in status.autoscaling_state.pending_instance_requests]
        with open(out, "a") as f:
            f.write(json.dumps({"t": time.monotonic() - t0, "nodes": nodes, "pending_gpus": gpus,
                                "launches": launches}) + "\n")
        time.sleep(interval)


if __name__ == "__main__":
    watch(sys.argv[1], Path(sys.argv[2]))

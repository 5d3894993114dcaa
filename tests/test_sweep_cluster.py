"""A sweep on a multi-node Ray cluster (several raylets on this machine, each advertising a GPU) that loses a node.

Trials ask for half a GPU, so two share a node; the GPUs are declared only
(WSML_FAKE_GPUS=1 in the nodes' environment lets such trials train on the
CPU). A worker node is removed while two trials run on it:

* lost (a crash, a terminated on-demand instance): Tune counts a failure for
  each of its trials and retries them from their last checkpoint on the other
  nodes (max_failures 3);
* preempted (a spot instance): EC2's interruption notice, served by a fake
  instance-metadata service, makes orchestration/cluster/spot_watch.py drain the node
  as preempted before it goes; its trials continue from their checkpoints
  elsewhere although max_failures is 0, since Tune does not count preemptions.

Either way every trial finishes and each has one MLflow run with each epoch
logged once.
"""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import SWEEP, clean_env, history, mlflow_runs, ray_trials, rows_by_trial, write_space

pytestmark = [pytest.mark.slow, pytest.mark.service, pytest.mark.timeout(900)]


class FakeMetadata(http.server.ThreadingHTTPServer):
    """EC2's instance metadata (IMDSv2) of a spot instance; `notice` is the interruption, once announced."""

    def __init__(self):
        self.notice: dict | None = None
        self.token = "test-token"
        super().__init__(("127.0.0.1", 0), _MetadataHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code: int, body: str = "") -> None:
        self.send_response(code)
        self.end_headers()
        self.wfile.write(body.encode())

    def do_PUT(self):
        ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        self._send(200, self.server.token) if ok else self._send(400)

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != self.server.token:
            return self._send(401)
        if self.path == "/latest/meta-data/instance-life-cycle":
            return self._send(200, "spot")
        if self.path == "/latest/meta-data/spot/instance-action" and self.server.notice:
            return self._send(200, json.dumps(self.server.notice))
        self._send(404)


def _sweep_that_loses_a_node(tmp_path, monkeypatch, *, max_failures: int, take_node):
    """Run a 6-trial sweep on 3 workers, call take_node(cluster, node) on a node running two trials mid-way;
    returns (Ray's trials, the node's id, its two trials, the MLflow store)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("WSML_FAKE_GPUS", "1")           # the raylets started here pass it to their workers
    from ray.cluster_utils import Cluster

    # A head without CPUs (the driver only) and three 1-CPU / 1-GPU workers;
    # a trial takes 0.5 CPU + 0.5 GPU, so two fit on a node.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(3)]
        worker_ids = {n.node_id: n for n in workers}
        # grace = epochs: ASHA stops nothing, so every trial must reach the last epoch
        space = write_space(tmp_path / "space.yaml", num_samples=6, epochs=5, grace=5, max_failures=max_failures,
                            train_images=300)
        args = ["--dataset", "digits", "--space", str(space), "--name", "cl", "--address", cluster.address,
                "--cpus-per-trial", "0.5", "--gpus-per-trial", "0.5"]
        log_path = tmp_path / "driver.log"
        log = open(log_path, "w")
        # no TUNE_MAX_PENDING_TRIALS_PG: the sweep's max_concurrent (num_samples) lets Tune place all six at once
        proc = subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=tmp_path, env=clean_env(),
                                stdout=log, stderr=subprocess.STDOUT)
        exp_dir = tmp_path / "ray_results" / "cl"
        victim, victim_trials = None, []
        try:
            deadline = time.time() + 400
            while victim is None and time.time() < deadline:
                assert proc.poll() is None, log_path.read_text()[-4000:]
                by_node: dict[str, list[str]] = {}
                for tid, rows in rows_by_trial(exp_dir).items():
                    last = rows[-1]
                    if 1 <= last["epoch"] <= 3:                  # mid-run, with a checkpoint
                        by_node.setdefault(last["node_id"], []).append(tid)
                for node_id, tids in by_node.items():
                    if node_id in worker_ids and len(tids) == 2:  # two trials share this node's GPU
                        victim, victim_trials = node_id, tids
                        break
                time.sleep(0.3)
            assert victim is not None, "no node ran two trials at once: " + log_path.read_text()[-3000:]
            take_node(cluster, worker_ids[victim])
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        out = log_path.read_text()
        assert proc.returncode == 0, out[-5000:]
    finally:
        cluster.shutdown()

    trials = ray_trials(exp_dir)
    assert len(trials) == 6
    first_nodes = {t["results"][0]["node_id"] for t in trials.values()}
    assert len(first_nodes) >= 2, first_nodes                     # trials ran on several nodes
    for tid, t in trials.items():
        rows = t["results"]
        assert rows[-1]["epoch"] == 5                              # every trial finished
        assert all(r["device"] == "cpu" for r in rows)             # declared GPUs: the CPU (WSML_FAKE_GPUS)
    for tid in victim_trials:
        rows = trials[tid]["results"]
        moved = [r for r in rows if r["node_id"] != victim]
        assert moved, f"trial {tid} never left the removed node"
        resumed_from = moved[0]["restored_from_epoch"]
        # continued from its last checkpoint on the lost node, not from scratch
        assert resumed_from >= 1 and moved[0]["epoch"] == resumed_from + 1 > 1, moved[0]
        assert [r["epoch"] for r in rows if r["node_id"] == victim][-1] >= resumed_from

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    children = mlflow_runs(uri, "cl")["trial"]
    assert sorted(c.data.tags["wsml.trial_id"] for c in children) == sorted(trials)   # one run per trial
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["wsml.end_reason"] == "completed"
        assert [s for s, _ in history(uri, c.info.run_id)] == [1, 2, 3, 4, 5]   # each epoch once
        if c.data.tags["wsml.trial_id"] in victim_trials:
            assert int(c.data.tags["wsml.restored_from_epoch"]) >= 1
            assert victim in c.data.tags["wsml.nodes"].split(",")
            assert len(c.data.tags["wsml.nodes"].split(",")) == 2
    return trials, victim, victim_trials, children


def test_lost_node_trials_retry_from_checkpoints_as_failures(tmp_path, monkeypatch):
    trials, victim, victim_trials, runs = _sweep_that_loses_a_node(
        tmp_path, monkeypatch, max_failures=3, take_node=lambda cluster, node: cluster.remove_node(node))
    # Tune counted the lost node as one failure of each of its trials (the MLflow run says so), none elsewhere
    failures = {c.data.tags["wsml.trial_id"]: c.data.tags.get("wsml.failures") for c in runs}
    assert {t: failures[t] for t in victim_trials} == {t: "1" for t in victim_trials}, failures
    assert all(failures[t] is None for t in trials if t not in victim_trials), failures
    for tid in victim_trials:
        assert "Failure # 1" in (trials[tid]["dir"] / "error.txt").read_text()


def test_preempted_spot_node_trials_continue_without_counting_failures(tmp_path, monkeypatch):
    metadata = FakeMetadata()
    watcher_out = {}

    def preempt(cluster, node):
        # EC2 announces the interruption; the watcher on that node drains it as preempted; then it goes
        metadata.notice = {"action": "terminate",
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))}
        watcher = subprocess.run(
            [sys.executable, "-m", "orchestration.cluster.spot_watch", "--address", cluster.address,
             "--node-id", node.node_id, "--interval", "0.2"],
            env=clean_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=metadata.url, WSML_SPOT_DIR=str(tmp_path / "spot")),
            capture_output=True, text=True,
            timeout=120)
        watcher_out.update(rc=watcher.returncode, out=watcher.stdout + watcher.stderr)
        assert watcher.returncode == 0, watcher_out["out"]
        cluster.remove_node(node, allow_graceful=False)      # the instance is gone: no goodbye from its raylet

    try:
        trials, victim, victim_trials, runs = _sweep_that_loses_a_node(
            tmp_path, monkeypatch, max_failures=0, take_node=preempt)
    finally:
        metadata.shutdown()
    assert "drained" in watcher_out["out"] and "DRAIN_NODE_REASON_PREEMPTION" in watcher_out["out"]
    # max_failures 0, yet the preempted trials were retried: Tune did not count the preemption
    assert all("wsml.failures" not in c.data.tags for c in runs), {c.data.tags["wsml.trial_id"]: c.data.tags.get(
        "wsml.failures") for c in runs}
    for tid in victim_trials:    # Tune noted the error, its failure count stayed 0
        assert "Failure # 0" in (trials[tid]["dir"] / "error.txt").read_text()


def test_spot_watch_leaves_on_demand_instances_and_other_machines_alone(tmp_path):
    from orchestration.cluster import spot_watch

    lines = []
    assert spot_watch.watch(spot_watch.Metadata("http://127.0.0.1:9", timeout=0.5), "127.0.0.1:1", None, 0.1,
                            log=lines.append) == 0
    assert "no EC2 instance metadata" in lines[-1]

    class OnDemand(spot_watch.Metadata):
        def get(self, path):
            return "on-demand" if path == "instance-life-cycle" else None

    assert spot_watch.watch(OnDemand(), "127.0.0.1:1", None, 0.1, log=lines.append) == 0
    assert "not spot" in lines[-1]
    import datetime as dt

    now = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    assert spot_watch.seconds_left({"time": "2030-01-01T12:02:00Z"}, now) == 120
    assert spot_watch.seconds_left({"time": "2030-01-01T11:59:00Z"}, now) == 0

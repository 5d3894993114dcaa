"""What a first real run on a cluster needs that fakes do not show (issue: the first real run on AWS).

* The sweep started on a cluster's head without --address joins that cluster (`ray start` runs there),
  and a Ray it starts for itself leaves no ~/.ray/auth_token behind for a later `ray up` to require.
* A GPU space never becomes a CPU sweep: refused on a machine without a GPU; on a cluster without a GPU
  node, the sweep asks the autoscaler for one and gives up after a bounded wait, saying what the
  autoscaler reported (launch failures with the cloud's reason), and at once when nodes keep failing
  their set-up.
* Before `ray up`, `python -m orchestration.aws_check` asks the account what would keep GPU nodes from
  starting (G/VT vCPU quotas, zones offering the types, EFS mount targets and throughput mode), answered
  here from recorded answers (tests/aws_answers/).
* A failed drain at a spot notice is tried again until the announced time.
* The MLflow store outlives the head: the sweep keeps a copy with its artifacts on shared storage
  (WSML_MLFLOW_BACKUP) that opens where it is, after a copy to a laptop, and on --resume on a new head.
* `--dry-run` prints dollars with what they assume.
* Prepared data moves with its images: `meta.json` names the image folder relative to the prepared
  folder, so the two copied or moved together (`ray rsync-up` to shared storage, another node) still
  find each other, and the folder moved alone still finds the images where they were prepared.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import fixtures_official as fx
from wsml.data import formats, prepare

ROOT = Path(__file__).resolve().parent.parent


def _prepared_cub(base: Path) -> Path:
    """CUB in the layout `python -m wsml.data.download cub --dest base/cub` leaves: the official files in the
    sibling `cub_raw/`, the prepared folder `cub/`."""
    fx.make_cub(base / "cub_raw")
    return prepare.prepare("cub", base / "cub_raw", base / "cub")


@pytest.mark.slow
def test_a_prepared_set_moved_with_its_images_trains(tmp_path):
    from wsml.config import TrainConfig
    from wsml.train import run

    _prepared_cub(tmp_path / "laptop")
    moved = tmp_path / "shared" / "data"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "laptop"), str(moved))           # nothing left where it was prepared
    data = formats.read_formatted(moved / "cub")
    assert data.image_root == moved / "cub_raw" / "CUB_200_2011" / "images"
    cfg = TrainConfig(dataset="cub", data_root=str(moved / "cub"), cache_dir=str(tmp_path / "cache"),
                      weights="none", arch="smallcnn", image_size=16, epochs=1, batch_size=2, device="cpu",
                      num_workers=0, val_frac=0.34)
    result = run(cfg, log=None)
    assert [h["epoch"] for h in result.history] == [1] and 0 <= result.test_map <= 100


def test_a_prepared_folder_moved_alone_finds_the_images_where_they_were(tmp_path):
    dest = _prepared_cub(tmp_path / "a")
    images = (tmp_path / "a" / "cub_raw" / "CUB_200_2011" / "images").resolve()
    meta = json.loads((dest / "meta.json").read_text())
    assert meta["image_root"] == "../cub_raw/CUB_200_2011/images" and meta["image_root_absolute"] == str(images)
    shutil.move(str(dest), str(tmp_path / "elsewhere"))
    assert formats.read_formatted(tmp_path / "elsewhere").image_root == images


def test_meta_json_of_earlier_versions_with_an_absolute_image_root_still_reads(tmp_path):
    dest = _prepared_cub(tmp_path)
    images = (tmp_path / "cub_raw" / "CUB_200_2011" / "images").resolve()
    meta = json.loads((dest / "meta.json").read_text())
    meta["image_root"] = str(images)
    del meta["image_root_absolute"]
    (dest / "meta.json").write_text(json.dumps(meta))
    assert formats.read_formatted(dest).image_root == images


# --------------------------------------------------------------- the sweep on the head
def test_the_autoscalers_launch_failures_are_said_with_the_clouds_reason():
    from ray.autoscaler.v2.schema import ClusterStatus, LaunchRequest, NodeInfo

    from orchestration.cluster.connect import describe_launches

    quota = ("An error occurred (VcpuLimitExceeded) when calling the RunInstances operation: You have requested "
             "more vCPU capacity than your current vCPU limit of 0 allows")
    status = ClusterStatus(
        pending_launches=[LaunchRequest("g5.2xlarge", "gpu_spot", 1, "REQUESTED", 0)],
        failed_launches=[LaunchRequest("g5.2xlarge", "gpu_on_demand", 2, "FAILED", 0, 1, quota)],
        failed_nodes=[NodeInfo("g5.xlarge", "gpu", "i-0abc", "10.0.0.7", "DEAD", failure_detail="set-up failed")])
    line = describe_launches(status)
    assert line == ("1 x g5.2xlarge launching; 2 x g5.2xlarge failed to launch (" + quota + "); "
                    "node i-0abc (gpu) failed: set-up failed")
    assert describe_launches(ClusterStatus()).startswith("no launch pending or failed (is an autoscaler running?")


def _pending(n: int, kind: str = "gpu_1x", detail: str = ""):
    """An instance the autoscaler reports in set-up (its IM id: Ray 2.60 reports no cloud id for it)."""
    from ray.autoscaler.v2.schema import NodeInfo

    return NodeInfo(kind, kind, f"im-{n}", "", "", details=detail)


def test_the_gpu_wait_stops_once_nodes_keep_failing_their_set_up(monkeypatch, capsys):
    """A bad AMI: every GPU node fails its set-up (orchestration.gpu_check) and never becomes a Ray node; the
    autoscaler reports it pending, terminates it and starts another without end. The sweep stops after
    MAX_FAILED_NODES such nodes, long before its wait is up."""
    import ray
    import ray.autoscaler.sdk
    from ray.autoscaler.v2.schema import ClusterStatus

    from orchestration.cluster import connect as cluster
    from orchestration.common import SweepError

    seen = {"polls": 0, "requests": []}

    def status():           # one node in set-up per poll, gone by the next, no Ray node joining
        seen["polls"] += 1
        return ClusterStatus(pending_nodes=[_pending(seen["polls"], detail="installing ray")])

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: seen["requests"].append(bundles))
    monkeypatch.setattr(cluster, "autoscaler_status", status)
    monkeypatch.setattr(cluster, "read_autoscaling_config", lambda: None)
    monkeypatch.setattr(cluster.time, "sleep", lambda s: None)
    with pytest.raises(SweepError, match=r"^3 nodes in a row failed their set-up \(gpu_1x: installing ray\): fix the "
                                         r"nodes' set-up \(cluster.yaml's AMI"):
        cluster.wait_for_gpus(8, 1, 4, limit_s=900)
    assert seen["polls"] == cluster.MAX_FAILED_NODES + 1
    assert seen["requests"] == [[{"CPU": 8, "GPU": 1}] * 4, []]          # asked for the wave, then withdrawn


def test_failed_set_ups_during_the_sweep_stop_it_resumably_after_three_in_a_row(monkeypatch):
    """While the sweep runs: a node that joins between failures resets the count (one unlucky node is not a
    broken set-up); three failed in a row stop the sweep as Ctrl-C does (its trials keep their checkpoints)."""
    import signal as sig

    from ray.autoscaler.v2.schema import ClusterStatus, NodeInfo

    from orchestration.cluster import connect as cluster

    running = [NodeInfo("g5.2xlarge", "gpu_1x", "i-a", "10.0.0.1", "RUNNING", node_id="n-a")]
    joined = [*running, NodeInfo("g5.2xlarge", "gpu_1x", "i-b", "10.0.0.2", "RUNNING", node_id="n-b")]
    feed = [ClusterStatus(active_nodes=running, pending_nodes=[_pending(1)]),
            ClusterStatus(active_nodes=running, pending_nodes=[_pending(2)]),               # 1 failed
            ClusterStatus(active_nodes=running, pending_nodes=[_pending(3)]),               # 2 failed
            ClusterStatus(active_nodes=joined, pending_nodes=[_pending(4)]),                # 3 left, 1 joined
            ClusterStatus(active_nodes=joined, pending_nodes=[_pending(5)]),                # 1 in a row
            ClusterStatus(active_nodes=joined, pending_nodes=[_pending(6, detail="set-up failed")]),  # 2
            ClusterStatus(active_nodes=joined)]                                             # 3: stop
    launches = cluster.Launches(8, 1, 4, [])
    assert [launches.poll(st, running=True) for st in feed[:-1]] == [None] * 6
    assert launches.poll(feed[-1], running=True).startswith("3 nodes in a row failed their set-up (gpu_1x: set-up "
                                                            "failed): fix the nodes' set-up")

    # the watch thread of the sweep: the reason kept, the sweep sent SIGINT (Tune stops at the checkpoints)
    statuses, kills = iter(feed), []
    monkeypatch.setattr(cluster, "autoscaler_status", lambda: next(statuses))
    monkeypatch.setattr(cluster.os, "kill", lambda pid, signum: kills.append((pid, signum)))
    watch = cluster.LaunchWatch(cluster.Launches(8, 1, 4, []), poll_s=0.01).start()
    watch._thread.join(10)
    assert kills == [(os.getpid(), sig.SIGINT)] and watch.reason.startswith("3 nodes in a row failed")


def test_with_every_gpu_type_refused_the_wait_stops_with_the_reason(monkeypatch, capsys):
    """The fallback's end: on-demand refused, spot asked for by name and refused too: no type is left."""
    import ray.autoscaler.sdk
    from ray.autoscaler.v2.schema import ClusterStatus, LaunchRequest

    from orchestration.cluster import connect as cluster

    requests = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: requests.append(bundles))
    config = {"head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0}},
        "gpu_1x_spot": {"priority": 0, "resources": {"CPU": 8, "GPU": 1, "wsml_type_gpu_1x_spot": 1}},
        "gpu_4x": {"priority": 1, "resources": {"CPU": 48, "GPU": 4, "wsml_type_gpu_4x": 1}},
        "gpu_1x": {"priority": 1, "resources": {"CPU": 8, "GPU": 1, "wsml_type_gpu_1x": 1}}}}
    types = cluster.gpu_node_types(config)
    assert [t.name for t in types] == ["gpu_4x", "gpu_1x", "gpu_1x_spot"]       # priority, then the file's order
    launches = cluster.Launches(8, 1, 2, types, since=100)
    refused = []

    def status(*kinds):
        refused.extend(LaunchRequest(k, k, 1, "FAILED", 100, 101) for k in kinds)
        return ClusterStatus(failed_launches=list(refused))

    assert launches.poll(ClusterStatus(failed_launches=[LaunchRequest("gpu_1x", "gpu_1x", 1, "FAILED", 0, 99)]),
                         running=False) is None and requests == []            # another sweep's failure: ignored
    assert launches.poll(status("gpu_4x", "gpu_1x"), running=False) is None
    assert requests == [[{"CPU": 8, "GPU": 1, "wsml_type_gpu_1x_spot": 1.0}] * 2]
    assert "asking the autoscaler for gpu_1x_spot instead" in capsys.readouterr().out
    assert launches.poll(status("gpu_1x_spot"), running=True) is None         # GPU nodes run: the sweep goes on
    assert launches.poll(status(), running=False) == (
        "the cloud refused to start every GPU node type (gpu_4x: " + cluster.NO_REASON + "; gpu_1x: "
        + cluster.NO_REASON + "; gpu_1x_spot: " + cluster.NO_REASON + "): raise the account's G/VT vCPU quotas "
        "(python -m orchestration.aws_check says which) or pick other instance types or zones in cluster.yaml")


def _ray_head(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """`ray start --head --block` as on a cluster's head (2 CPUs, no GPU), its files in env's RAY_TMPDIR."""
    from tests.helpers import free_port, poll

    log = tmp_path / "head.log"
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             f"--port={free_port()}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false",
                             f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}",
                             "--disable-usage-stats"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    poll("the Ray head", lambda: "Ray runtime started" in log.read_text()
         or (head.poll() is not None and pytest.fail(log.read_text()[-3000:])), timeout=120, interval=0.5)
    return head


def _stop(head: subprocess.Popen) -> None:
    """The head and what it started, by its process group (never `ray stop`: it stops every Ray here)."""
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


@pytest.mark.slow
@pytest.mark.service
@pytest.mark.timeout(600)
def test_a_sweep_on_the_head_without_address_joins_the_cluster_and_leaves_no_token_file(tmp_path):
    """On a machine where `ray start` runs (a cluster's head), the sweep joins that cluster instead of
    starting a Ray of its own; a Ray the sweep starts for itself writes nothing into ~/.ray that a later
    `ray up` would take for the cluster's token."""
    from tests.helpers import clean_env, mlflow_runs, write_space

    ray_tmp = Path(tempfile.mkdtemp(prefix="wsr", dir="/tmp"))      # Ray's unix sockets: a short path
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="cd" * 32, HOME=str(home))
    del env["RAY_ADDRESS"]                                           # as on the head: nothing set
    space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=2, schemes="[LL-R]", train_images=100)
    args = [sys.executable, str(ROOT / "orchestration" / "sweep.py"), "--dataset", "digits", "--space",
            str(space), "--final-seeds", "0"]
    head = _ray_head(tmp_path, env)
    try:
        address = (ray_tmp / "ray" / "ray_current_cluster").read_text().strip()
        r = subprocess.run([*args, "--name", "on-head"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert f"joining the Ray cluster started on this machine (ray start / ray up) at {address}" in r.stdout
        [parent] = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "on-head")["sweep"]
        assert parent.data.params["ray_address"] == address
    finally:
        _stop(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # the sweep's own Ray (no RAY_AUTH_MODE set, as for a user): started, used, nothing left in ~/.ray
    own = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    script = ("import ray\nfrom orchestration.cluster import connect as cluster\nassert cluster.connect(None)\n"
              "assert ray.get(ray.remote(lambda: 42).remote()) == 42\nray.shutdown()\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=own, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (home / ".ray").exists(), list((home / ".ray").iterdir())


@pytest.mark.timeout(300)
def test_a_gpu_space_on_a_cluster_that_starts_no_gpu_gives_up_with_the_reason(tmp_path, ray_address):
    from tests.helpers import run_cli, write_space

    space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=2, schemes="[LL-R]", gpus=1)
    r = run_cli(["--dataset", "digits", "--space", str(space), "--name", "nogpu", "--address", ray_address],
                cwd=tmp_path, timeout=240, WSML_GPU_WAIT_S="3")
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    [line] = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]   # Ray may log its package upload
    assert r.stderr.strip().endswith(line) and line.startswith("error: no GPU node joined the Ray cluster within 3 s; the autoscaler: no launch pending "
                           "or failed (is an autoscaler running?"), line
    assert "--gpus-per-trial 0" in line
    assert "asking the autoscaler for the nodes of 1 and waiting up to 3 s for the first" in r.stdout


@pytest.mark.slow
@pytest.mark.service
@pytest.mark.timeout(300)
def test_a_gpu_space_on_a_machine_without_gpu_is_refused_not_run_on_cpus(tmp_path):
    from tests.helpers import run_cli, write_space

    space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=2, schemes="[LL-R]", gpus=1)
    r = run_cli(["--dataset", "digits", "--space", str(space), "--name", "cpu"], cwd=tmp_path, timeout=240)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stderr.strip() == ("error: the space asks for 1 GPU per trial and this machine has none for Ray: pass "
                                "--gpus-per-trial 0 to train on its CPUs, or run the sweep on a GPU cluster's head")
    assert not (tmp_path / "ray_results").exists()


# --------------------------------------------------------------- dollars
def test_dry_run_prints_dollars_and_what_they_assume(tmp_path, capsys):
    """`--dry-run --dataset cub`: the dollar figure of cluster.yaml's cluster, its parts adding up, each part's
    hours from the estimate's GPU-hours and wall time, and the sources of prices and assumptions."""
    import re

    from orchestration.cost import prices
    from tests.helpers import sweep_in_process

    r = sweep_in_process(["--dataset", "cub", "--dry-run", "--gpus", "4"], tmp_path, capsys)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    total = float(re.search(r"estimate: \$([\d,.]+) on AWS, all on demand \(", out)[1].replace(",", ""))
    assert prices.PRICES_DATE in out and "us-west-2" in out and "spot workers cost less" in out
    gpu_hours = float(re.search(r"estimate: ([\d,.]+) GPU-hours on A10G", out)[1])
    wall_s = float(re.search(r"estimate: wall time ([\d,]+) s", out)[1].replace(",", ""))
    workers = re.search(r"GPU workers g5\.2xlarge \$1\.212/h: \$([\d,.]+) for ([\d,.]+) h \(([\d,.]+) GPU-hours "
                        r"of trials, plus (\d+) node\(s\) x \(5 min boot and set-up, assumed, \+ 10 min idle", out)
    head = re.search(r"head m6i\.2xlarge \$0\.384/h: \$([\d,.]+) for the wall time and its start \(([\d,.]+) h\)", out)
    efs = re.search(r"EFS \$0\.3/GB-month: \$([\d,.]+) for ([\d,.]+) GB of checkpoints", out)
    assert workers and head and efs, out
    nodes = int(workers[4])
    assert nodes == 4                                                    # --gpus 4, one GPU per trial and node
    assert float(workers[2]) == pytest.approx(gpu_hours + nodes * 15 / 60, abs=0.01)
    assert float(workers[1]) == pytest.approx(float(workers[2]) * 1.212, abs=0.02)
    assert float(head[2]) == pytest.approx(wall_s / 3600 + 5 / 60, abs=0.01)
    assert float(head[1]) == pytest.approx(float(head[2]) * 0.384, abs=0.02)
    assert total == pytest.approx(float(workers[1]) + float(head[1]) + float(efs[1]), abs=0.02)

    # another GPU than cluster.yaml's workers carry: no dollars, said why
    r = sweep_in_process(["--dataset", "cub", "--dry-run", "--gpu-type", "H200"], tmp_path, capsys)
    assert "on AWS" not in r.stdout and "no dollar figure: cluster.yaml's workers (g5.2xlarge) carry A10G" in r.stdout


# --------------------------------------------------------------- MLflow outlives the head
@pytest.mark.timeout(600)
def test_the_mlflow_store_and_its_artifacts_survive_the_heads_disk(tmp_path, ray_address, monkeypatch):
    """A sweep on a head (its store on the head's disk) with WSML_MLFLOW_BACKUP on shared storage: once the
    head's disk is gone, the copy holds every run and the tables attached to the sweep's run, opens where
    it is and after a copy to a laptop, and `--resume` puts it back instead of starting an empty store."""
    from mlflow import MlflowClient

    from orchestration.run import preflight
    from orchestration.tracking import store_copy
    from orchestration.common import SweepError
    from tests.helpers import mlflow_runs, run_cli, write_space

    head, shared = tmp_path / "head", tmp_path / "shared"
    head.mkdir()
    space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=2, schemes="[LL-R]", train_images=100)
    r = run_cli(["--dataset", "digits", "--space", str(space), "--name", "kept", "--address", ray_address,
                 "--storage", str(shared / "ray_results")], cwd=head,
                WSML_MLFLOW_BACKUP=str(shared / "mlflow-backup"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"MLflow store copied to {shared / 'mlflow-backup'} every 5 min and at the end" in r.stdout
    want = mlflow_runs(f"sqlite:///{head / 'mlflow.db'}", "kept")
    shutil.rmtree(head)                                                # the head's disk, gone

    def check(folder: Path) -> None:
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        runs = mlflow_runs(uri, "kept")
        assert {k: sorted(x.info.run_id for x in v) for k, v in runs.items()} == \
            {k: sorted(x.info.run_id for x in v) for k, v in want.items()}
        [parent] = runs["sweep"]
        assert parent.info.status == "FINISHED"
        assert parent.info.artifact_uri.startswith(str(folder / "mlruns"))
        sweeps_md = MlflowClient(uri).download_artifacts(parent.info.run_id, "sweeps.md", str(tmp_path / "dl"))
        assert "kept" in Path(sweeps_md).read_text()

    check(shared / "mlflow-backup")
    laptop = tmp_path / "laptop"
    assert store_copy.main([str(shared / "mlflow-backup"), str(laptop)]) == 0
    check(laptop)
    # docs/aws.md's fetch: the copy's files brought down as they are (rsync), then made to open there
    fetched = tmp_path / "fetched"
    shutil.copytree(shared / "mlflow-backup", fetched)
    (shared / "mlflow-backup").rename(shared / "away")                # not reachable from the laptop
    assert store_copy.main([str(fetched), str(fetched)]) == 0
    check(fetched)
    (shared / "away").rename(shared / "mlflow-backup")

    # --resume on a new head: the store is put back from the copy, or refused without one
    lost = f"sqlite:///{head / 'mlflow.db'}"
    head.mkdir()                                                       # the project's folder on the new head
    monkeypatch.delenv(store_copy.BACKUP_ENV, raising=False)
    with pytest.raises(SweepError, match=r"mlflow.db is gone and no copy of it is at \$WSML_MLFLOW_BACKUP"):
        preflight.check_store(lost, "kept", resume=True)
    monkeypatch.setenv(store_copy.BACKUP_ENV, str(shared / "mlflow-backup"))
    preflight.check_store(lost, "kept", resume=True)
    check(head)


# --------------------------------------------------------------- spot notice
def test_a_failed_drain_at_a_spot_notice_is_tried_again_until_the_announced_time(tmp_path, monkeypatch):
    import datetime as dt

    from orchestration.cluster import spot_watch

    at = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=120)).strftime("%Y-%m-%dT%H:%M:%SZ")

    class Meta:
        endpoint = "fake"

        def get(self, path):
            return {"instance-life-cycle": "spot",
                    "spot/instance-action": json.dumps({"action": "terminate", "time": at})}[path]

    calls, lines = [], []

    def run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0 if len(calls) == 3 else 1, "", "GCS busy")

    monkeypatch.setattr(spot_watch.subprocess, "run", run)
    monkeypatch.setattr(spot_watch.time, "sleep", lambda s: None)
    assert spot_watch.watch(Meta(), "10.0.0.1:6379", "ab" * 14, 5.0, log=lines.append,
                            notice=spot_watch.Notice(tmp_path)) == 0
    assert len(calls) == 3 and "drain-node" in " ".join(calls[0])
    assert sum("ray drain-node failed (1: GCS busy); again in 5 s" in ln for ln in lines) == 2
    assert lines[-1].startswith("spot watch: drained")


def _digits(tmp_path: Path, **kw):
    from wsml.config import TrainConfig

    return TrainConfig(dataset="digits", scheme="LL-Cp", epochs=2, batch_size=16, max_train_images=96, device="cpu",
                       num_workers=0, cache_dir=str(tmp_path / "cache"), **kw)


class _Stop(Exception):
    pass


def test_a_run_resumed_within_an_epoch_ends_as_one_never_stopped(tmp_path):
    """A state got before a batch of epoch 2 (`run`'s on_batch) continues within that epoch: the same losses,
    label corrections, mAPs and weights as the run never stopped."""
    import torch

    from wsml.train import run

    cfg = _digits(tmp_path)
    whole_states = []
    whole = run(cfg, log=None, on_epoch=lambda r, get_state: whole_states.append(get_state()) and None)
    kept = {}

    def stop_in_epoch_2(get_state):
        state = get_state()
        if state["in_epoch"]["epoch"] == 2 and state["in_epoch"]["batch"] == 3:
            kept["state"] = state
            raise _Stop

    with pytest.raises(_Stop):
        run(cfg, log=None, on_batch=stop_in_epoch_2)
    assert kept["state"]["epoch"] == 1 and kept["state"]["in_epoch"]["loss_sum"] > 0
    lines = []
    resumed = run(cfg, log=lines.append, resume_state=kept["state"],
                  on_epoch=lambda r, g: whole_states.append(g()) and None)
    assert "resumed after epoch 1, batch 3 of epoch 2" in lines
    timing = ("epoch_seconds", "images_per_s")
    assert [{k: v for k, v in h.items() if k not in timing} for h in resumed.history] == \
        [{k: v for k, v in h.items() if k not in timing} for h in whole.history]
    assert resumed.test_map == whole.test_map
    first, again = whole_states[1], whole_states[2]
    assert all(torch.equal(first["model"][k], again["model"][k]) for k in first["model"])
    assert torch.equal(first["observed"], again["observed"])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_spot_notice_checkpoints_the_trials_on_its_node_before_the_drain(tmp_path, monkeypatch):
    """A trial trains (orchestration.run.trainable, outside Tune); EC2's notice comes: the watcher has the trial save
    within its epoch and drains only once it has; the trial's next attempt resumes there and ends as a trial
    never interrupted."""
    import datetime as dt
    import threading

    import ray
    from ray import tune

    from orchestration.cluster import spot_watch
    from orchestration.run import trainable

    monkeypatch.setenv(spot_watch.NOTICE_DIR_ENV, str(tmp_path / "spot"))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("C", (), {"get_node_id": lambda self: "n1"})())
    import time

    from wsml.trainer import Trainer

    reports = []

    def report(metrics, checkpoint=None):
        kept = None
        if checkpoint is not None:
            kept = tmp_path / f"ckpt{len(reports)}"
            shutil.copytree(checkpoint.path, kept)
        reports.append((dict(metrics), kept))

    step = Trainer._step

    def slow_step(self, *a):        # an epoch long enough for the notice to come within it
        time.sleep(0.2)
        return step(self, *a)

    monkeypatch.setattr(Trainer, "_step", slow_step)
    monkeypatch.setattr(tune, "report", report)
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    config = {**_digits(tmp_path).to_dict()}

    def attempt(folder: Path, name: str):
        folder.mkdir(exist_ok=True)
        monkeypatch.chdir(folder)                          # TrialLog outside Tune: train.log here
        t = threading.Thread(target=trainable.train_trial, args=(config,), name=name)
        t.start()
        return t

    at = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120)).strftime("%Y-%m-%dT%H:%M:%SZ")
    trial_dir, notices = tmp_path / "trial", spot_watch.Notice()

    class Meta:
        endpoint = "fake"

        def get(self, path):
            if path == "instance-life-cycle":
                return "spot"
            # the notice once the trial has reported epoch 1 and trains epoch 2
            return json.dumps({"action": "terminate", "time": at}) if reports else None

    drained = []

    def run(cmd, **kw):
        drained.append((trial_dir / trainable.WITHIN_EPOCH / trainable.STATE_FILE).is_file())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    t = attempt(trial_dir, "first")
    monkeypatch.setattr(spot_watch.subprocess, "run", run)
    lines = []
    assert spot_watch.watch(Meta(), "10.0.0.1:6379", None, 0.05, log=lines.append, notice=notices) == 0
    t.join(120)
    assert drained == [True], lines                          # saved before the drain
    assert "spot watch: every trial here saved" in lines and not (tmp_path / "spot" / "notice").exists()
    log = (trial_dir / "train.log").read_text()
    assert "# spot notice: saved within epoch 2 at batch" in log

    # the next attempt: Tune hands it the epoch-1 checkpoint; it resumes within epoch 2
    epoch1 = next(kept for m, kept in reports if m["epoch"] == 1)
    monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(str(epoch1)))
    first_attempt = len(reports)
    attempt(trial_dir, "second").join(120)
    assert "from the state saved at a spot notice" in (trial_dir / "train.log").read_text()
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    attempt(tmp_path / "whole", "whole").join(120)
    resumed, whole = reports[first_attempt][0], reports[-1][0]
    assert resumed["epoch"] == whole["epoch"] == 2
    assert resumed["val_map"] == whole["val_map"] and resumed["train_loss"] == whole["train_loss"]


# --------------------------------------------------------------- the account, before `ray up`
class _Recorded:
    """A boto3 client of one service answering from tests/aws_answers/<account>.json (any call it was not
    recorded for fails the test)."""

    def __init__(self, answers: dict, service: str, calls: list):
        self.answers, self.service, self.calls = answers[service], service, calls

    def __getattr__(self, operation):
        def call(**kw):
            self.calls.append((self.service, operation, kw))
            answer = self.answers[operation]
            return answer[kw["QuotaCode"]] if operation == "get_service_quota" else answer
        return call


def _account(name: str, **changes) -> tuple:
    answers = json.loads((ROOT / "tests" / "aws_answers" / f"{name}.json").read_text())
    for path, value in changes.items():
        *keys, last = path.split("/")
        node = answers
        for k in keys:
            node = node[k] if not isinstance(node, list) else node[int(k)]
        node[int(last) if isinstance(node, list) else last] = value
    calls: list = []
    return (lambda service: _Recorded(answers, service, calls)), calls


def test_the_account_check_names_zero_quotas_missing_offerings_and_efs_with_the_fix(capsys):
    from orchestration import aws_check

    client, calls = _account("new_account")
    assert aws_check.main([], client=client) == 1
    out = capsys.readouterr().out.splitlines()
    # cluster.yaml: on demand gpu_1x 2 x 8 + gpu_4x 2 x 48 vCPUs, spot gpu_1x_spot 8 x 8
    assert out[0] == ("problem: quota Running On-Demand G and VT instances (L-DB2E81BA) in us-west-2 is 0 vCPUs; the GPU "
                      "node types may use 112: request 112 in the Service Quotas console (EC2, L-DB2E81BA), or lower "
                      "max_workers in the cluster file")
    assert out[1].startswith("problem: quota All G and VT Spot Instance Requests (L-3819A6DF) in us-west-2 is 0 vCPUs; "
                             "the GPU node types may use 64: request 64")
    assert out[2].startswith("problem: g5.12xlarge is not offered in us-west-2b")
    assert out[3].startswith("problem: EFS fs-0123456789abcdef0 is in Bursting throughput mode") and "elastic" in out[3]
    assert out[4].startswith("problem: EFS fs-0123456789abcdef0 has no mount target in us-west-2b")
    assert out[5] == "us-west-2 (us-west-2a, us-west-2b): 5 problem(s)"
    assert all(op.startswith(("describe_", "get_")) for _, op, _ in calls)        # it only reads

    ready, _ = _account("new_account", **{
        "service-quotas/get_service_quota/L-DB2E81BA/Quota/Value": 112.0,
        "service-quotas/get_service_quota/L-3819A6DF/Quota/Value": 64.0,
        "efs/describe_file_systems/FileSystems/0/ThroughputMode": "elastic"})
    answers_ok = ready("ec2").answers
    answers_ok["describe_instance_type_offerings"]["InstanceTypeOfferings"].append(
        {"InstanceType": "g5.12xlarge", "LocationType": "availability-zone", "Location": "us-west-2b"})
    ready("efs").answers["describe_mount_targets"]["MountTargets"].append(
        {"MountTargetId": "fsmt-2", "FileSystemId": "fs-0123456789abcdef0", "AvailabilityZoneName": "us-west-2b"})
    assert aws_check.main([], client=ready) == 0
    assert capsys.readouterr().out.strip() == "us-west-2 (us-west-2a, us-west-2b): nothing keeps the GPU nodes from starting"


# --------------------------------------------------------------- launches refused at once
@pytest.mark.slow
@pytest.mark.service
@pytest.mark.timeout(600)
def test_launches_refused_at_once_fall_back_to_the_spot_type(tmp_path):
    """cluster.yaml's on-demand and spot GPU types (priority, max_workers, their wsml_type_ resources) on Ray's
    fake multi-node provider behind autoscaler v2, EC2 refusing every on-demand launch at once (a vCPU quota of
    0): the driver waiting for GPUs gets spot nodes. Without the fallback the autoscaler asks for gpu_1x again
    every round and no GPU ever comes."""
    import yaml

    from tests.fake_cluster import FakeAutoscalingCluster

    real = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = real["available_node_types"]
    workers = {name: {"resources": {**types[name]["resources"], "CPU": 1}, "node_config": {}, "min_workers": 0,
                      "max_workers": types[name]["max_workers"], "priority": types[name]["priority"]}
               for name in ("gpu_1x", "gpu_1x_spot")}
    quota = ("An error occurred (VcpuLimitExceeded) when calling the RunInstances operation: You have requested more "
             "vCPU capacity than your current vCPU limit of 0 allows")
    fake = FakeAutoscalingCluster(workers, upscaling_speed=real["upscaling_speed"], max_workers=real["max_workers"],
                                  refuse={"gpu_1x": quota})
    script = ("import ray\nfrom orchestration.cluster import connect as cluster\nfrom wsml.logs import show_on_console\n"
              "show_on_console('orchestration')\nray.init(address=%r)\n"
              "print('resources', cluster.trial_resources(1, 1, remote=True, at_once=2))\n"
              "print('gpu nodes', sorted(k for n in ray.nodes() if n['Alive'] and n['Resources'].get('GPU')\n"
              "                          for k in n['Resources'] if k.startswith('wsml_type_')))\n"
              "cluster.release_request()\n")
    try:
        fake.start()
        r = subprocess.run([sys.executable, "-c", script % fake.address], cwd=ROOT, capture_output=True, text=True,
                           timeout=400, env={**os.environ, **fake.client_env(), "WSML_GPU_WAIT_S": "240",
                                             "WSML_AUTOSCALING_CONFIG": str(fake.tmp / "autoscaling.json")})
    finally:
        fake.shutdown()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert ("note: the cloud refused to start gpu_1x (the reason is in the head's /tmp/ray/session_latest/logs/"
            "monitor.*): asking the autoscaler for gpu_1x_spot instead") in r.stdout, r.stdout
    assert "resources {'cpu': 1, 'gpu': 1}" in r.stdout
    [nodes] = [ln for ln in r.stdout.splitlines() if ln.startswith("gpu nodes ")]
    assert set(ast.literal_eval(nodes[len("gpu nodes "):])) == {"wsml_type_gpu_1x_spot"}, r.stdout

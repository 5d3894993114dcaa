"""A sweep on a multi-node Ray cluster (several raylets on this machine, each advertising a GPU).

Trials ask for half a GPU, so two share a node; they find no CUDA device and
train on the CPU. A worker node is removed while its trials run: they are
retried from their last checkpoint on the remaining nodes and every trial
finishes, each epoch logged once.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_sweep import SWEEP, clean_env, history, mlflow_runs, ray_trials, write_space

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _rows(exp_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for f in glob.glob(str(exp_dir / "*/result.json")):
        rows = []
        for ln in Path(f).read_text().splitlines():
            try:
                rows.append(json.loads(ln))
            except ValueError:       # a line being written
                pass
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def test_multi_node_fractional_gpus_and_node_loss(tmp_path):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch
    from ray.cluster_utils import Cluster

    # A head without CPUs (the driver only) and three 1-CPU / 1-GPU workers;
    # a trial takes 0.5 CPU + 0.5 GPU, so two fit on a node.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(3)]
        worker_ids = {n.node_id: n for n in workers}
        # grace = epochs: ASHA stops nothing, so every trial must reach the last epoch
        space = write_space(tmp_path / "space.yaml", num_samples=6, epochs=5, grace=5, max_failures=3,
                            train_images=300)
        args = ["--dataset", "digits", "--space", str(space), "--name", "cl", "--address", cluster.address,
                "--cpus-per-trial", "0.5", "--gpus-per-trial", "0.5"]
        log_path = tmp_path / "driver.log"
        log = open(log_path, "w")
        # let Tune place all six trials at once (its default with a searcher: one pending at a time)
        proc = subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=tmp_path,
                                env=clean_env(TUNE_MAX_PENDING_TRIALS_PG="6"),
                                stdout=log, stderr=subprocess.STDOUT)
        exp_dir = tmp_path / "ray_results" / "cl"
        victim, victim_trials = None, []
        try:
            deadline = time.time() + 400
            while victim is None and time.time() < deadline:
                assert proc.poll() is None, log_path.read_text()[-4000:]
                by_node: dict[str, list[str]] = {}
                for tid, rows in _rows(exp_dir).items():
                    last = rows[-1]
                    if 1 <= last["epoch"] <= 3:                  # mid-run, with a checkpoint
                        by_node.setdefault(last["node_id"], []).append(tid)
                for node_id, tids in by_node.items():
                    if node_id in worker_ids and len(tids) == 2:  # two trials share this node's GPU
                        victim, victim_trials = node_id, tids
                        break
                time.sleep(0.3)
            assert victim is not None, "no node ran two trials at once: " + log_path.read_text()[-3000:]
            cluster.remove_node(worker_ids[victim])
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
        if not torch.cuda.is_available():
            assert all(r["device"] == "cpu" for r in rows)         # a GPU trial without CUDA runs on the CPU
    for tid in victim_trials:
        rows = trials[tid]["results"]
        moved = [r for r in rows if r["node_id"] != victim]
        assert moved, f"trial {tid} never left the removed node"
        resumed_from = moved[0]["restored_from_epoch"]
        # continued from its last checkpoint on the lost node, not from scratch
        assert resumed_from >= 1 and moved[0]["epoch"] == resumed_from + 1 > 1, moved[0]
        assert [r["epoch"] for r in rows if r["node_id"] == victim][-1] >= resumed_from

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = mlflow_runs(uri, "cl")
    children = runs["trial"]
    assert sorted(c.data.tags["wsml.trial_id"] for c in children) == sorted(trials)
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["wsml.end_reason"] == "completed"
        assert [s for s, _ in history(uri, c.info.run_id)] == [1, 2, 3, 4, 5]   # each epoch once
        if c.data.tags["wsml.trial_id"] in victim_trials:
            assert int(c.data.tags["wsml.restored_from_epoch"]) >= 1
            assert victim in c.data.tags["wsml.nodes"].split(",")
            assert len(c.data.tags["wsml.nodes"].split(",")) == 2

"""A sweep of GPU trials on an autoscaling cluster makes the autoscaler ask for every node it needs at once.

The cluster is Ray's fake multi-node provider behind Ray's autoscaler v2 (what
`ray up` runs), with `cluster.yaml`'s `upscaling_speed`, `max_workers` and its
1-GPU node types (on-demand `gpu_1x` first, `gpu_1x_spot` for the rest, their
`priority` and `max_workers` as in the file) scaled to this machine: 1 CPU, the
GPU declared only (WSML_FAKE_GPUS=1 lets the trials train on the CPU). With
Tune's default for a searcher (one trial pending) the autoscaler would see one
GPU's demand at a time and add nodes one by one; the sweep's `max_concurrent`
(default: num_samples) puts every trial's demand up at once, and the
autoscaler asks for all the nodes together: the on-demand ones the file
allows, then spot nodes for the rest.
"""
from __future__ import annotations

import time

import pytest
import yaml

from tests.fake_cluster import FakeAutoscalingCluster
from tests.helpers import ROOT, SweepProcess, ray_trials, write_space

pytestmark = [pytest.mark.slow, pytest.mark.service, pytest.mark.timeout(900)]

ON_DEMAND, SPOT = "gpu_1x", "gpu_1x_spot"


def test_gpu_trials_start_every_node_at_once(tmp_path):
    real = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = real["available_node_types"]
    on_demand = types[ON_DEMAND]["max_workers"]
    trials = on_demand + 2                  # two more than the on-demand type takes: spot nodes
    workers = {name: {"resources": {"CPU": 1, "GPU": types[name]["resources"]["GPU"]}, "node_config": {},
                      "min_workers": 0, "max_workers": types[name]["max_workers"],
                      "priority": types[name]["priority"]}
               for name in (ON_DEMAND, SPOT)}
    cluster = FakeAutoscalingCluster(workers, upscaling_speed=real["upscaling_speed"],
                                     max_workers=real["max_workers"], node_env={"WSML_FAKE_GPUS": "1"})
    try:
        cluster.start()
        space = write_space(tmp_path / "space.yaml", num_samples=trials, epochs=2, max_failures=0,
                            train_images=100)
        args = ["--dataset", "digits", "--space", str(space), "--name", "scale", "--address", cluster.address,
                "--cpus-per-trial", "1", "--gpus-per-trial", "1"]
        with SweepProcess(tmp_path, args, **cluster.client_env()) as sweep:
            rc = sweep.finish(timeout=600)
            out = sweep.output()
        time.sleep(1)                  # one more look at the nodes
        samples = cluster.samples()
    finally:
        cluster.shutdown()
    assert rc == 0, out
    nodes = samples[-1]["nodes"]

    # Tune put every trial's GPU demand up before the first worker existed ...
    def workers(s):
        return [n for n in s["nodes"] if n["alive"] and not n["head"]]

    before = [s["pending_gpus"] for s in samples if not workers(s)]
    assert max(before) == trials, [(s["t"], len(workers(s)), s["pending_gpus"]) for s in samples][:60]
    # ... and the autoscaler asked for all the nodes at once, not one per round (Tune's placement groups
    # can straddle a round: at most two), the on-demand ones the file allows first, spot for the rest
    requests: dict[tuple[str, int], int] = {}     # (node type, round) -> nodes asked for (shrinks as they start)
    for s in samples:
        for name, count, ts in s["launches"]:
            requests[(name, ts)] = max(count, requests.get((name, ts), 0))
    rounds = {ts for _, ts in requests}
    assert len(rounds) <= 2 < trials, requests
    by_type = {}
    for (name, _), count in requests.items():
        by_type[name] = by_type.get(name, 0) + count
    assert by_type == {ON_DEMAND: on_demand, SPOT: trials - on_demand}, requests

    started = sorted(n["start_ms"] for n in nodes if not n["head"])
    assert len(started) == trials, nodes                     # as many nodes as trials, no more
    ran = ray_trials(tmp_path / "ray_results" / "scale")
    assert len(ran) == trials
    worker_ids = {n["id"] for n in nodes if not n["head"]}
    for t in ran.values():
        assert t["results"][-1]["epoch"] == 2
        assert {r["node_id"] for r in t["results"]} <= worker_ids     # never on the head
    first = next(s["t"] for s in samples if s["pending_gpus"])
    up = ", ".join(f"{(ms - started[0]) / 1000:.1f}" for ms in started)
    print(f"\nGPU demand of {trials} trials pending at {first:.0f} s; launch requests {requests}; nodes up "
          f"{up} s after the first (the fake provider starts its raylets one after another)")

"""What a sweep on the AWS cluster of cluster.yaml costs in dollars: `--dry-run`'s price lines.

The table holds AWS's published on-demand prices (Linux, us-west-2, cluster.yaml's region) of the
instance types cluster.yaml starts, and EFS's storage price, as recorded on PRICES_DATE from AWS's
price pages (aws.amazon.com/ec2/pricing/on-demand and aws.amazon.com/efs/pricing). Prices change and
differ by region: check them before relying on a figure. Spot workers (cluster.yaml's `gpu_1x_spot`)
are usually far cheaper, at a price that varies by the hour; the figure here is on-demand, an upper
bound for the same work.

What the figure counts, beyond the trials' GPU-hours (`estimate.Estimate.device_hours`):
* each GPU worker's boot and set-up (NODE_START_MIN, an assumption: docs/aws.md says "a few minutes"
  to boot and unpack the venv), and its idle tail before the autoscaler terminates it
  (cluster.yaml's `idle_timeout_minutes`);
* the head for the whole wall time plus its own start;
* the trials' checkpoints on EFS for the wall time (the data set's own storage is not counted: it
  stays between sweeps).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestration.common import ROOT

PRICES_DATE = "2025-06"
PRICES_SOURCE = "AWS on-demand prices, Linux, us-west-2, as published on its pricing pages"
# $ per instance-hour
INSTANCE_PRICE = {"m6i.2xlarge": 0.384, "g5.2xlarge": 1.212, "g5.12xlarge": 5.672}
EFS_GB_MONTH = 0.30                 # EFS Standard storage, $ per GB-month
HOURS_PER_MONTH = 730.0
NODE_START_MIN = 5.0                # boot + set-up of a worker, assumed (docs/aws.md: "a few minutes")
# The GPU of the throughput table (orchestration/cost/throughput.py) that each worker type carries.
GPU_OF_TYPE = {"g5.2xlarge": "A10G", "g5.12xlarge": "A10G"}
# ResNet-50's parameters (torchvision), each saved with Adam's two moments: the bytes of one checkpoint.
RESNET50_CHECKPOINT_BYTES = 25_557_032 * 4 * 3


@dataclass
class Cluster:
    """What cluster.yaml says about cost: the head's type, the first GPU worker type, the idle timeout."""

    head_type: str
    worker_type: str
    gpus_per_worker: float
    idle_minutes: float

    @classmethod
    def from_file(cls, path: Path = ROOT / "cluster.yaml") -> Cluster:
        cfg = yaml.safe_load(path.read_text())
        types = cfg["available_node_types"]
        head = types[cfg["head_node_type"]]["node_config"]["InstanceType"]
        # the worker type the autoscaler takes first: the highest priority (cluster.yaml's order)
        workers = sorted((t for name, t in types.items() if name != cfg["head_node_type"]
                          and t.get("resources", {}).get("GPU", 0) > 0), key=lambda t: -t.get("priority", 0))
        worker = workers[0]
        return cls(head, worker["node_config"]["InstanceType"], float(worker["resources"]["GPU"]),
                   float(cfg.get("idle_timeout_minutes", 5)))


def cost_lines(est, keep_checkpoints: int, cluster: Cluster | None = None) -> list[str]:
    """--dry-run's lines in dollars for a GPU estimate on cluster.yaml's AWS cluster; [] for CPU trials, and a
    note where the GPU estimated is not the one cluster.yaml's workers carry."""
    if est.gpus_per_trial <= 0:
        return []
    c = cluster or Cluster.from_file()
    if GPU_OF_TYPE.get(c.worker_type) != est.rate.device:
        return [f"note: no dollar figure: cluster.yaml's workers ({c.worker_type}) carry "
                f"{GPU_OF_TYPE.get(c.worker_type, 'another GPU')}, the estimate is for {est.rate.device}"]
    worker_price, head_price = INSTANCE_PRICE[c.worker_type], INSTANCE_PRICE[c.head_type]
    wall_h = est.wall_seconds / 3600
    nodes = max(1, int(-(-est.slots * est.gpus_per_trial // c.gpus_per_worker)))
    overhead_h = nodes * (NODE_START_MIN + c.idle_minutes) / 60
    worker_h = est.device_hours / c.gpus_per_worker + overhead_h
    head_h = wall_h + NODE_START_MIN / 60
    gb = est.trials_with_finals * keep_checkpoints * RESNET50_CHECKPOINT_BYTES / 1e9
    workers, head, storage = worker_h * worker_price, head_h * head_price, gb * EFS_GB_MONTH * wall_h / HOURS_PER_MONTH
    total = workers + head + storage
    return [f"estimate: ${total:,.2f} on AWS, all on demand ({PRICES_SOURCE}, {PRICES_DATE}; spot workers cost "
            "less, at a varying price):",
            f"  GPU workers {c.worker_type} ${worker_price:g}/h: ${workers:,.2f} for {worker_h:,.2f} h "
            f"({est.device_hours:,.2f} GPU-hours of trials, plus {nodes} node(s) x ({NODE_START_MIN:g} min boot "
            f"and set-up, assumed, + {c.idle_minutes:g} min idle before termination, cluster.yaml))",
            f"  head {c.head_type} ${head_price:g}/h: ${head:,.2f} for the wall time and its start ({head_h:,.2f} h)",
            f"  EFS ${EFS_GB_MONTH:g}/GB-month: ${storage:,.2f} for {gb:,.1f} GB of checkpoints "
            f"({keep_checkpoints} per run of a ResNet-50 with Adam's state) over the wall time"]

"""How many trials a Ray cluster can run at once: the searcher's default `max_concurrent`.

TPE learns only from results it has when it proposes: with every trial proposed at once it is random
search. bench/sweep.py (digits, LL-R/LL-Ct/LL-Cp x delta_rel x lr grid, 8 trials in flight): proposing
only as slots free needs 0.39 of a scheme's grid epochs to come within 1 mAP of its best, every trial at
once 0.46 (one at a time: 0.26). So a sweep proposes as many trials as its cluster can run: the nodes
alive now plus every worker the autoscaler may still start (the cluster file's `max_workers`), so an
autoscaling cluster still sees the demand of all its nodes at once.
"""
from __future__ import annotations

import math
from typing import Any

from orchestration.cluster.connect import read_autoscaling_config


def fits(resources: dict[str, Any], cpus: float, gpus: float) -> int:
    """Trials of (cpus, gpus) one node of `resources` holds."""
    out = math.inf
    if cpus > 0:
        out = min(out, float(resources.get("CPU", 0)) // cpus)
    if gpus > 0:
        out = min(out, float(resources.get("GPU", 0)) // gpus)
    return 0 if out == math.inf else int(out)


def autoscaled(config: dict | None, cpus: float, gpus: float) -> int:
    """Trials the workers an autoscaling config may still start hold: per worker type its `max_workers`,
    within the cluster's `max_workers` (the largest types counted first)."""
    if not config:
        return 0
    per_type = []
    for name, t in (config.get("available_node_types") or {}).items():
        if name != config.get("head_node_type"):
            per_type += [fits(t.get("resources") or {}, cpus, gpus)] * int(t.get("max_workers", 0))
    per_type.sort(reverse=True)
    return sum(per_type[:int(config.get("max_workers", len(per_type)))])


def trial_slots(cpus: float, gpus: float) -> int:
    """Trials of (cpus, gpus) the cluster Ray is connected to can run at once, now or once scaled up; at
    least 1."""
    import ray

    now = sum(fits(n["Resources"], cpus, gpus) for n in ray.nodes() if n.get("Alive"))
    return max(1, now + autoscaled(read_autoscaling_config(), cpus, gpus))

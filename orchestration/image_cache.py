#!/usr/bin/env python
"""Build a data set's compact image cache once per cluster: its missing shards as Ray tasks on all nodes.

    build_image_cache(cfg)      # the sweep driver, connected to Ray, before the trials start
    python orchestration/image_cache.py --dataset coco --address auto --cache-dir "$WSML_SHARED/cache"

The cache (`wsml.data.compact`) lives under the run's `cache_dir`: on a cluster the storage every node
shares, so the trials of every node read the one copy. Each missing shard is one task asking for one
CPU, scheduled SPREAD so that every node builds its share. A shard is written to a temporary name and
renamed into place under a per-shard lock, so it is committed exactly once: a task whose worker dies
(killed, node lost) is retried by Ray and redoes its shard, the dead attempt's temporary file is
deleted by the retry and never read; a second build, or a trial, finds the shard done and reuses it.
Progress: a tqdm bar on a terminal, else a line every 5 % of the images or 30 s (`wsml.progress`).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wsml.config import TrainConfig
from wsml.data.compact import CompactPlan, DiskFull, ShardResult, ShardSpec, build_shard, disk_full, missing_shards
from wsml.errors import DataError, WSMLError
from wsml.logs import show_on_console
from wsml.progress import Progress

from orchestration.cluster import connect as cluster
from orchestration.run import preflight
from orchestration.common import first_line

BuildFn = Callable[[ShardSpec], ShardResult]


@dataclass
class CacheReport:
    """What one build did: shard counts, images, the nodes that built, seconds."""

    shards: int = 0                 # in the plans
    built: int = 0                  # committed by this call
    reused: int = 0                 # current already (before the call, or found so by a task)
    images: int = 0                 # in the shards built
    bad: int = 0                    # unreadable images in the shards built
    seconds: float = 0.0
    nodes: Counter = field(default_factory=Counter)   # node id -> shards built there


def build_image_cache(cfg: TrainConfig, *, build: BuildFn = build_shard, max_retries: int = 3,
                      log: Callable[[str], None] = print) -> CacheReport:
    """Build what is missing of the compact caches a run with `cfg` reads (none: the raw cache or
    `digits`, nothing to do), as Ray tasks on the connected cluster. `cfg.cache_dir` must be a path
    every node sees (the cluster's shared storage) and the same one the trials get."""
    from wsml.data.loading import compact_plans

    return build_shards(compact_plans(cfg), build=build, max_retries=max_retries, log=log)


def build_shards(plans: Sequence[CompactPlan], *, build: BuildFn = build_shard, max_retries: int = 3,
                 log: Callable[[str], None] = print) -> CacheReport:
    """Build the plans' missing shards as Ray tasks (Ray must be connected); raise if one fails."""
    import ray

    start = time.monotonic()
    report = CacheReport(shards=sum(len(p.shards) for p in plans))
    todo = [spec for p in plans for spec in missing_shards(p)]
    report.reused = report.shards - len(todo)
    if not todo:
        report.seconds = time.monotonic() - start
        if plans:
            log(f"image cache: all {report.shards} shards current in {plans[0].entry.parent}")
        return report
    images = sum(s.stop - s.start for s in todo)
    log(f"image cache: building {len(todo)} of {report.shards} shards ({images} images) as Ray tasks "
        f"in {plans[0].entry.parent}")
    task = ray.remote(_build_on_node).options(num_cpus=1, scheduling_strategy="SPREAD", max_retries=max_retries)
    pending = {task.remote(build, spec): spec for spec in todo}
    progress = Progress(images, "image cache", "img", lines=20)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(done[0])
            try:
                result, node = ray.get(done[0])
            except Exception as err:  # noqa: BLE001 - the task's own error, or Ray's after the retries
                cause = getattr(err, "cause", err)     # a RayTaskError holds the task's exception
                if isinstance(cause, DiskFull):        # the space for every shard not built yet
                    unbuilt = sum(s.stop - s.start for s in (spec, *pending.values()))
                    raise disk_full(Path(spec.entry), spec.size, unbuilt) from None
                lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
                why = str(cause) if isinstance(cause, WSMLError) else lines[-1] if lines else type(err).__name__
                raise DataError(f"building shard {spec.index} of {spec.entry} failed: {why}") from None
            if result.built:
                report.built += 1
                report.images += result.images
                report.bad += result.bad
                report.nodes[node] += 1
            else:
                report.reused += 1
            progress.update(spec.stop - spec.start)
    finally:
        progress.close()
        for ref in pending:         # an error above: leave no task running
            ray.cancel(ref, force=True)
    left = [s for p in plans for s in missing_shards(p)]
    if left:
        raise DataError(f"{len(left)} shard(s) of {left[0].entry} are still missing after the build "
                        f"(e.g. {left[0].path}); run the build again")
    report.seconds = time.monotonic() - start
    log(f"image cache: built {report.built} shards ({report.images} images, {report.bad} unreadable) on "
        f"{len(report.nodes)} node(s) in {report.seconds:.0f} s; {report.reused} reused")
    return report


def _build_on_node(build: BuildFn, spec: ShardSpec) -> tuple[ShardResult, str]:
    import ray

    return build(spec), ray.get_runtime_context().get_node_id()


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    show_on_console("orchestration")
    p = argparse.ArgumentParser(prog="python orchestration/image_cache.py", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-root", help="the prepared data set (default data/<dataset>)")
    p.add_argument("--cache-dir", help="where the cache goes: on a cluster the shared storage (default .cache)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--image-cache", default="compact", choices=("auto", "compact"),
                   help="compact (default), or auto: nothing to build for a data set that stays raw")
    p.add_argument("--address", help="Ray cluster to join (auto: the one this machine is part of); "
                                     "default: Ray on this machine only")
    args = p.parse_args(argv)
    try:
        cfg = TrainConfig(dataset=args.dataset, data_root=args.data_root, cache_dir=args.cache_dir,
                          image_size=args.image_size, image_cache=args.image_cache).resolve()
        if cfg.dataset == "digits":
            raise DataError("digits is generated in memory and has no image cache; choose a prepared data set")
        from wsml.data.loading import compact_plans

        plans = compact_plans(cfg)      # a bad data folder fails here, before Ray starts
        if not plans:
            print(f"{cfg.dataset} at {cfg.image_size} px stays in the raw cache (--image-cache auto): nothing to build")
            return 0
        started = cluster.connect(preflight.resolve_address(args.address))
        try:
            build_shards(plans)
        finally:
            if started:
                import ray

                ray.shutdown()
    except WSMLError as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

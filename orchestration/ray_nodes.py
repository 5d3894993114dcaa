#!/usr/bin/env python
"""Wait until a Ray cluster has a number of alive nodes (used by cluster.slurm.sh).

    python -m orchestration.ray_nodes --address 10.0.0.5:6379 --nodes 4 --timeout 300
    python -m orchestration.ray_nodes --address 10.0.0.5:6379 --nodes 0    # only: the head's port answers

Prints `ray: 4 of 4 node(s) alive, 32 CPU(s), 4 GPU(s)` and exits 0 once the
cluster at `--address` reports that many alive nodes; after `--timeout`
seconds it prints `error: ...` and exits 1. Ray's token authentication is
taken from the environment (`RAY_AUTH_MODE`, `RAY_AUTH_TOKEN`).
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys
import time


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def alive_nodes(nodes: list[dict]) -> list[dict]:
    return [n for n in nodes if n.get("Alive")]


def summary(alive: list[dict], wanted: int) -> str:
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in alive)
    gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in alive)
    return f"ray: {len(alive)} of {wanted} node(s) alive, {cpus:g} CPU(s), {gpus:g} GPU(s)"


def wait_for_nodes(address: str, wanted: int, timeout: float) -> str | None:
    """Return the summary line once `wanted` nodes are alive (None for 0: once the head's port
    accepts connections, without joining as a driver); raise TimeoutError otherwise."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while not _reachable(host.strip("[]"), int(port)):          # the head is still starting
        if time.monotonic() > deadline:
            raise TimeoutError(f"no Ray head answers at {address} after {timeout:g} s: see the head's "
                               "`ray start` output above")
        time.sleep(1)
    if wanted == 0:
        return None
    import ray

    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        while True:
            alive = alive_nodes(ray.nodes())
            if len(alive) >= wanted:
                return summary(alive, wanted)
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(alive)} of {wanted} Ray node(s) joined {address} within "
                                   f"{timeout:g} s: see the workers' `ray start` output above")
            time.sleep(1)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestration.ray_nodes", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, help="the head's host:port")
    p.add_argument("--nodes", type=int, required=True, help="alive nodes to wait for (0: the head's port only)")
    p.add_argument("--timeout", type=float, default=300, help="seconds (default 300)")
    args = p.parse_args(argv)
    try:
        line = wait_for_nodes(args.address, args.nodes, args.timeout)
    except TimeoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if line:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

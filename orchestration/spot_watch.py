#!/usr/bin/env python
"""Mark this Ray node as preempted when EC2 announces its spot interruption, so Tune does not count it.

    python -m orchestration.spot_watch --address HEAD:6379     # on every worker of cluster.yaml, in the background

EC2 announces the interruption of a spot instance two minutes ahead in the
instance metadata (`spot/instance-action`: the action and its time; 404
until then). This watcher polls it every 5 s and, on a notice, drains the
node with Ray's reason DRAIN_NODE_REASON_PREEMPTION and the deadline EC2 gave
(`ray drain-node`). Ray then schedules nothing new there, and when the
instance goes, the actors that ran on it die with `preempted` set: Tune
(Ray 2.60, `Trial._handle_ray_actor_error`) retries such a trial from its last
checkpoint on another node without counting it against `max_failures`
(unless RAY_TRAIN_COUNT_PREEMPTION_AS_FAILURE=1). Without the drain, the loss
of a node is an ordinary failure and counts. On an on-demand instance
(`instance-life-cycle` is not `spot`) and off EC2 it exits at once.

IMDSv2 is used (a session token first); AWS_EC2_METADATA_SERVICE_ENDPOINT
points it elsewhere, as it does for AWS's own SDKs (the tests serve a fake).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

TOKEN_TTL_S = 21600


class Metadata:
    """EC2's instance metadata service (IMDSv2: a token, then GETs that carry it)."""

    def __init__(self, endpoint: str | None = None, timeout: float = 2.0):
        self.endpoint = (endpoint or os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
                         or "http://169.254.169.254").rstrip("/")
        self.timeout = timeout
        self._token: tuple[str, float] | None = None

    def _headers(self) -> dict[str, str]:
        if self._token is None or time.monotonic() > self._token[1]:
            req = urllib.request.Request(f"{self.endpoint}/latest/api/token", method="PUT",
                                         headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                self._token = (r.read().decode().strip(), time.monotonic() + TOKEN_TTL_S / 2)
        return {"X-aws-ec2-metadata-token": self._token[0]}

    def get(self, path: str) -> str | None:
        """The value at latest/meta-data/<path>; None when it is not there (404)."""
        req = urllib.request.Request(f"{self.endpoint}/latest/meta-data/{path}", headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read().decode().strip()
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise


def seconds_left(notice: dict, now: _dt.datetime | None = None) -> int:
    """Seconds until the announced action (EC2 gives its time as 2026-01-01T12:00:00Z), at least 0."""
    at = _dt.datetime.strptime(notice["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.timezone.utc)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return max(0, int((at - now).total_seconds()))


def drain_command(address: str, notice: dict, node_id: str | None) -> list[str]:
    """`ray drain-node` marking the node preempted until the announced time (`orchestration.private`)."""
    from orchestration import private

    message = f"EC2 spot interruption notice: {notice.get('action', '?')} at {notice.get('time', '?')}"
    return private.drain_as_preempted_command(address, node_id, message, seconds_left(notice))


def watch(meta: Metadata, address: str, node_id: str | None, interval: float, log=print) -> int:
    try:
        lifecycle = meta.get("instance-life-cycle")
    except (OSError, urllib.error.URLError) as err:
        log(f"spot watch: no EC2 instance metadata ({err}): nothing to watch")
        return 0
    if lifecycle != "spot":
        log(f"spot watch: instance-life-cycle is {lifecycle!r}, not spot: nothing to watch")
        return 0
    log(f"spot watch: polling {meta.endpoint} every {interval:g} s for an interruption notice")
    while True:
        try:
            raw = meta.get("spot/instance-action")
        except (OSError, urllib.error.URLError) as err:     # a hiccup of the service: ask again
            log(f"spot watch: metadata unreachable ({err}); retrying")
            raw = None
        if raw:
            notice = json.loads(raw)
            cmd = drain_command(address, notice, node_id)
            log(f"spot watch: {notice}: draining this node as preempted ({' '.join(cmd[1:])})")
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                log(f"spot watch: ray drain-node failed ({done.returncode}): {(done.stderr or done.stdout)[-500:]}")
                return 1
            log("spot watch: drained; the node's trials continue elsewhere without counting as failures")
            return 0
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, help="the Ray head's GCS, host:port")
    p.add_argument("--node-id", help="the Ray node to drain (default: the one this runs on)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default 5)")
    args = p.parse_args(argv)
    return watch(Metadata(), args.address, args.node_id, args.interval,
                 log=lambda line: print(f"{_dt.datetime.now():%Y-%m-%d %H:%M:%S} {line}", flush=True))


if __name__ == "__main__":
    sys.exit(main())

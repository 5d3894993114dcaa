#!/usr/bin/env python
"""Mark this Ray node as preempted when EC2 announces its spot interruption, so Tune does not count it.

    python -m orchestration.cluster.spot_watch --address HEAD:6379     # on every worker of cluster.yaml, in the background

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

Before the drain, the trials on the node save their state within the epoch
in progress (an epoch can take 17 minutes: COCO on an A10G, docs/performance.md):
the watcher announces the notice in a folder on the node (`Notice`), each trial
there (`orchestration.run.trainable`) saves at its next batch and says so, and the
watcher drains once all have, or after CHECKPOINT_WAIT_S.

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
# How long the trials get to save at the notice: half of EC2's two minutes, the rest left for the drain (and
# its retries). A ResNet-50 trial's state with Adam's moments is about 300 MB: seconds to EFS.
CHECKPOINT_WAIT_S = 60
NOTICE_DIR_ENV = "WSML_SPOT_DIR"        # the folder of `Notice` (tests use their own)


class Notice:
    """The word between the spot watcher and the trials on its node, as files in one folder of the node:
    the watcher writes `notice` (EC2's notice); each trial registers as `trial-<pid>` while it trains and,
    seeing the notice, saves its state and writes `trial-<pid>.saved`."""

    def __init__(self, folder: str | os.PathLike | None = None):
        from pathlib import Path

        # one folder per user: another user's trials on a shared machine can neither block nor read it
        self.folder = Path(folder or os.environ.get(NOTICE_DIR_ENV) or f"/tmp/wsml-spot-{os.getuid()}")

    def register(self, pid: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"trial-{pid}").touch()

    def unregister(self, pid: int) -> None:
        for name in (f"trial-{pid}", f"trial-{pid}.saved"):
            try:
                (self.folder / name).unlink(missing_ok=True)
            except OSError:
                pass            # a folder it could not register in: nothing of it to remove

    def announce(self, notice: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "notice").write_text(json.dumps(notice))

    def withdraw(self) -> None:
        (self.folder / "notice").unlink(missing_ok=True)

    def announced(self) -> bool:
        """Whether the watcher announced a notice (one stat: asked before every batch)."""
        return (self.folder / "notice").exists()

    def saved(self, pid: int) -> None:
        (self.folder / f"trial-{pid}.saved").touch()

    def waiting(self) -> list[int]:
        """The trials registered here, still running, that have not said they saved."""
        out = []
        for p in self.folder.glob("trial-*"):
            if p.suffix or not p.name[6:].isdigit():
                continue
            pid = int(p.name[6:])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue            # ended without unregistering (killed): nothing to wait for
            except PermissionError:
                pass
            if not (self.folder / f"trial-{pid}.saved").exists():
                out.append(pid)
        return sorted(out)

    def wait_saved(self, limit_s: float, poll_s: float = 0.5) -> list[int]:
        """Wait until every registered trial saved, at most `limit_s`; returns those that did not."""
        deadline = time.monotonic() + limit_s
        while (left := self.waiting()) and time.monotonic() < deadline:
            time.sleep(poll_s)
        return left


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
    at = _dt.datetime.strptime(notice["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.UTC)
    now = now or _dt.datetime.now(_dt.UTC)
    return max(0, int((at - now).total_seconds()))


def drain_command(address: str, notice: dict, node_id: str | None) -> list[str]:
    """`ray drain-node` marking the node preempted until the announced time (`orchestration.run.private`)."""
    from orchestration.run import private

    message = f"EC2 spot interruption notice: {notice.get('action', '?')} at {notice.get('time', '?')}"
    return private.drain_as_preempted_command(address, node_id, message, seconds_left(notice))


def watch(meta: Metadata, address: str, node_id: str | None, interval: float, log=print,
          notice: Notice | None = None) -> int:
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
            trials = notice or Notice()
            try:
                return _drain(_checkpoint(json.loads(raw), trials, log), address, node_id, interval, log)
            finally:
                trials.withdraw()       # no trial started on this machine later takes it for its own notice
        time.sleep(interval)


def _checkpoint(notice: dict, trials: Notice, log) -> dict:
    """Tell the trials on this node to save where they are, and wait for them (at most CHECKPOINT_WAIT_S, and
    never past half the time EC2 gave)."""
    trials.announce(notice)
    limit = min(CHECKPOINT_WAIT_S, seconds_left(notice) / 2)
    log(f"spot watch: {notice}: the trials on this node save their state (up to {limit:.0f} s)")
    left = trials.wait_saved(limit)
    log("spot watch: every trial here saved" if not left else
        f"spot watch: trial process(es) {left} did not save in time: they continue from their last epoch")
    return notice


def _drain(notice: dict, address: str, node_id: str | None, interval: float, log) -> int:
    """Drain the node as preempted; a failed drain (the head busy, a network hiccup) is tried again every
    `interval` until the announced time: a node lost undrained costs its trials a counted failure."""
    while True:
        cmd = drain_command(address, notice, node_id)
        log(f"spot watch: {notice}: draining this node as preempted ({' '.join(cmd[1:])})")
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            failure = None if done.returncode == 0 else f"{done.returncode}: {(done.stderr or done.stdout)[-500:]}"
        except (OSError, subprocess.TimeoutExpired) as err:
            failure = str(err)
        if failure is None:
            log("spot watch: drained; the node's trials continue elsewhere without counting as failures")
            return 0
        left = seconds_left(notice)
        log(f"spot watch: ray drain-node failed ({failure}); " + (f"again in {interval:g} s ({left} s left)"
                                                                 if left > 0 else "the announced time has passed"))
        if left <= 0:
            return 1
        time.sleep(min(interval, left))


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

"""An outbox for MLflow calls: queued per run, sent in order, each once, held while the store is down.

A sweep must never wait on its tracking server. Every MLflow call of a trial
is put into that trial's queue and sent at once when the store answers. When
a call fails because the store cannot be reached (`is_transient`: a server
restarting, a network blip, a locked SQLite file) it stays first in its queue,
nothing more is sent, and the whole outbox is tried again after
`RETRY_FIRST_S`, backing off to `RETRY_MAX_S`; the caller goes on. A call the
store refuses (HTTP 4xx) is dropped with a warning; when that call opened the
trial's run, the rest of its queue goes with it.

Calls must be idempotent (a call that failed half-way is sent again): find a
run before creating it, set tags and status rather than add, give metrics
their timestamp and step.

`drain(wait_s)` at the end of a sweep waits up to `wait_s` for the store and
says how many calls were not delivered.

With `background` (the driver's writers) `put` only queues: a thread of the
outbox sends, so a store that hangs (a server stopped with SIGSTOP, SQLite on
a frozen file system) holds that thread, never Tune's result loop. Each call is
bounded by the client's own timeouts (`orchestration.tracking.store.client`),
the end of a sweep by `drain`'s `wait_s`, whether or not the call in flight
ever returns. Without it, `put` sends in the caller's thread (tests).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestration.common import first_line

log = logging.getLogger(__name__)


@dataclass
class _Call:
    send: Callable[[], Any]
    label: str              # for messages: "params", "epoch 3", "end", ...
    opens: bool = False     # refused -> the rest of this queue is dropped too


def warn(message: str, kind: str = "warning") -> None:
    log.warning(f"{kind}: {message}")


class Outbox:
    RETRY_FIRST_S = 2.0
    RETRY_MAX_S = 30.0

    def __init__(self, store: str, is_transient: Callable[[BaseException], bool],
                 clock: Callable[[], float] = time.monotonic, background: bool = False):
        self.store = store                  # the store's name for messages (redacted)
        self.is_transient = is_transient
        self.clock = clock
        self.background = background
        self._queues: dict[str, deque[_Call]] = {}
        self._retry_at = 0.0                # clock time of the next attempt while the store is down
        self._backoff = 0.0
        self._down_since: float | None = None
        self._delivered_late = 0
        # _lock guards the queues and the sender's state; a call is sent outside it, under _sending
        # (one sender at a time, so each queue's calls go in order and once)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._sending = threading.Lock()
        self._sender: threading.Thread | None = None

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._queues.values())

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def put(self, key: str, send: Callable[[], Any], label: str, *, opens: bool = False) -> None:
        """Queue `send` behind the calls of `key` and try to deliver (in the background: never waits)."""
        with self._lock:
            self._queues.setdefault(key, deque()).append(_Call(send, label, opens))
            if self.background:
                self._start_sender()
                self._wake.notify()
                return
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Send what is queued, in order per key; stop at the first sign that the store is down."""
        with self._sending:
            with self._lock:
                if not self._queues or (not force and self.clock() < self._retry_at):
                    return
                keys = list(self._queues)
            for key in keys:
                while True:
                    with self._lock:
                        queue = self._queues.get(key)
                        if not queue:
                            self._queues.pop(key, None)
                            break
                        call = queue[0]
                    try:
                        call.send()
                    except Exception as err:  # noqa: BLE001 - sorted by is_transient
                        if self.is_transient(err):
                            self._store_down(err)
                            return
                        if call.opens:
                            warn(f"MLflow refused the run of trial {key} ({first_line(err)}): {len(queue)} "
                                 "logging call(s) dropped")
                            with self._lock:
                                queue.clear()
                            continue
                        warn(f"MLflow refused the {call.label} call of trial {key} ({first_line(err)}): dropped")
                    with self._lock:
                        if queue and queue[0] is call:      # not given up by `drain` meanwhile
                            queue.popleft()
                            if self.down:
                                self._delivered_late += 1
            self._store_up()

    def drain(self, wait_s: float, sleep: Callable[[float], None] = time.sleep) -> int:
        """Deliver everything, waiting up to `wait_s` for the store; returns the calls not delivered."""
        deadline = self.clock() + wait_s
        if self.background:
            with self._lock:
                self._retry_at = 0.0            # try at once, not at the end of a backoff
                if self._queues:
                    self._start_sender()
                self._wake.notify()
            # waits on the queues, never on the sender: a call that hangs costs wait_s at most
            while self.pending and self.clock() < deadline:
                sleep(min(0.05, max(0.0, deadline - self.clock())))
        else:
            self.flush(force=True)
            while self._queues and self.clock() < deadline:
                sleep(max(0.0, min(self._retry_at, deadline) - self.clock()))
                self.flush(force=True)
        with self._lock:
            lost, runs = sum(len(q) for q in self._queues.values()), len(self._queues)
            self._queues.clear()
        if lost:
            warn(f"MLflow {self.store} could not be reached for {wait_s:.0f} s: {lost} logging call(s) of "
                 f"{runs} trial run(s) not delivered; those runs lack them and may show RUNNING "
                 "(Ray's results in the sweep folder are complete)")
        return lost

    # -- the sender thread (background) ------------------------------------
    def _start_sender(self) -> None:
        """Under _lock: a sender thread, unless one runs (it ends when nothing is queued)."""
        if self._sender is None:
            # a daemon: a driver that exits does not wait for a call that hangs
            self._sender = threading.Thread(target=self._send_loop, name=f"mlflow-outbox {self.store}",
                                            daemon=True)
            self._sender.start()

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                while self._queues and self.clock() < self._retry_at:
                    self._wake.wait(timeout=max(0.01, self._retry_at - self.clock()))
                if not self._queues:
                    self._sender = None         # decided under the lock: a later put starts another
                    return
            try:
                self.flush()
            except Exception as err:  # noqa: BLE001 - the thread must outlive a surprise, or logging stops unseen
                self._store_down(err)

    def _store_down(self, err: BaseException) -> None:
        now = self.clock()
        with self._lock:
            self._backoff = min(max(2 * self._backoff, self.RETRY_FIRST_S), self.RETRY_MAX_S)
            self._retry_at = now + self._backoff
            first = self._down_since is None
            if first:
                self._down_since = now
                self._delivered_late = 0
        if first:
            warn(f"MLflow {self.store} cannot be reached ({first_line(err)}): trials go on; their logging is "
                 "kept and sent when it answers again")

    def _store_up(self) -> None:
        with self._lock:
            since, late = self._down_since, self._delivered_late
            self._down_since, self._backoff, self._retry_at = None, 0.0, 0.0
        if since is not None:
            warn(f"MLflow {self.store} answers again after {self.clock() - since:.0f} s: "
                 f"{late} buffered logging call(s) delivered", kind="note")

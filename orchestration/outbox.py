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
"""
from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestration.common import first_line


@dataclass
class _Call:
    send: Callable[[], Any]
    label: str              # for messages: "params", "epoch 3", "end", ...
    opens: bool = False     # refused -> the rest of this queue is dropped too


def warn(message: str, kind: str = "warning") -> None:
    print(f"{kind}: {message}", file=sys.stderr, flush=True)


class Outbox:
    RETRY_FIRST_S = 2.0
    RETRY_MAX_S = 30.0

    def __init__(self, store: str, is_transient: Callable[[BaseException], bool],
                 clock: Callable[[], float] = time.monotonic):
        self.store = store                  # the store's name for messages (redacted)
        self.is_transient = is_transient
        self.clock = clock
        self._queues: dict[str, deque[_Call]] = {}
        self._retry_at = 0.0                # clock time of the next attempt while the store is down
        self._backoff = 0.0
        self._down_since: float | None = None
        self._delivered_late = 0

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def put(self, key: str, send: Callable[[], Any], label: str, *, opens: bool = False) -> None:
        """Queue `send` behind the calls of `key` and try to deliver."""
        self._queues.setdefault(key, deque()).append(_Call(send, label, opens))
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Send what is queued, in order per key; stop at the first sign that the store is down."""
        if not self._queues or (not force and self.clock() < self._retry_at):
            return
        for key in list(self._queues):
            queue = self._queues[key]
            while queue:
                call = queue[0]
                try:
                    call.send()
                except Exception as err:  # noqa: BLE001 - sorted by is_transient
                    if self.is_transient(err):
                        self._store_down(err)
                        return
                    if call.opens:
                        warn(f"MLflow refused the run of trial {key} ({first_line(err)}): {len(queue)} logging "
                             "call(s) dropped")
                        queue.clear()
                        break
                    warn(f"MLflow refused the {call.label} call of trial {key} ({first_line(err)}): dropped")
                queue.popleft()
                if self.down:
                    self._delivered_late += 1
            del self._queues[key]
        self._store_up()

    def drain(self, wait_s: float, sleep: Callable[[float], None] = time.sleep) -> int:
        """Deliver everything, waiting up to `wait_s` for the store; returns the calls not delivered."""
        deadline = self.clock() + wait_s
        self.flush(force=True)
        while self._queues and self.clock() < deadline:
            sleep(max(0.0, min(self._retry_at, deadline) - self.clock()))
            self.flush(force=True)
        lost = self.pending
        if lost:
            warn(f"MLflow {self.store} could not be reached for {wait_s:.0f} s: {lost} logging call(s) of "
                 f"{len(self._queues)} trial run(s) not delivered; those runs lack them and may show RUNNING "
                 "(Ray's results in the sweep folder are complete)")
            self._queues.clear()
        return lost

    def _store_down(self, err: BaseException) -> None:
        now = self.clock()
        self._backoff = min(max(2 * self._backoff, self.RETRY_FIRST_S), self.RETRY_MAX_S)
        self._retry_at = now + self._backoff
        if self._down_since is None:
            self._down_since = now
            self._delivered_late = 0
            warn(f"MLflow {self.store} cannot be reached ({first_line(err)}): trials go on; their logging is "
                 "kept and sent when it answers again")

    def _store_up(self) -> None:
        if self._down_since is not None:
            warn(f"MLflow {self.store} answers again after {self.clock() - self._down_since:.0f} s: "
                 f"{self._delivered_late} buffered logging call(s) delivered", kind="note")
        self._down_since, self._backoff, self._retry_at = None, 0.0, 0.0

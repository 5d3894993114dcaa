"""Ctrl-C, SIGTERM and SIGHUP stop `python -m wsml.train` at a safe point.

SIGTERM is what SLURM, Kubernetes, systemd and `kill` send, SIGHUP what a closed
terminal sends; both are handled like Ctrl-C. The epoch in progress is
abandoned at the next batch rather than finished: schedulers send SIGKILL a
fixed time after SIGTERM (SLURM's KillWait and Kubernetes' grace period: 30 s
by default), less than a large data set's epoch. Nothing is lost that a resume
cannot redo, because the checkpoint of the last completed epoch is only
replaced inside `deferred()`, where a signal waits until the write is done.

Until training starts (reading data, building the image cache) a signal stops
the process where it is. Once the trainer calls `check()` between batches,
signals wait for the next `check()`: raised anywhere, the exception could
land inside a DataLoader starting or stopping its workers and leave them in
a half-built state.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# What signal.signal() takes and returns
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _ignore(_signum: int, _frame) -> None:
    pass


class Interrupted(BaseException):
    """One of SIGNALS arrived. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignal:
    """Within `with StopOnSignal() as stop:` the first of SIGNALS raises `Interrupted` in
    the main thread at once, or, once `check()` has been called, at the next `check()`;
    inside `stop.deferred()` not before that block ends. Later signals are ignored (the
    process is already stopping). `stop.signum` is the signal received."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._depth = 0
        self._pending = False
        self._checked = False    # check() is being called: wait for it
        self._previous: dict[int, _Handler] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():   # only there can handlers be set
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
            self._previous[signal.SIGCHLD] = signal.getsignal(signal.SIGCHLD)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        # A signal sent to the whole process group (Ctrl-C, SLURM, `kill -- -PGID`) also ends the
        # DataLoader workers; torch's SIGCHLD handler would then raise "worker killed" while they
        # are shut down. The process is stopping anyway: let their exit pass silently.
        signal.signal(signal.SIGCHLD, _ignore)
        if self._depth or self._checked:
            self._pending = True
        else:
            raise Interrupted(signum)

    def check(self) -> None:
        """A safe point (between batches): raise `Interrupted` if a signal arrived."""
        self._checked = True
        if self._pending and not self._depth:
            self._raise_pending()

    def _raise_pending(self) -> NoReturn:
        self._pending = False
        assert self.signum is not None    # set before _pending is
        raise Interrupted(self.signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A block a signal does not cut short (a checkpoint or metrics write)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self._pending:
            self._raise_pending()

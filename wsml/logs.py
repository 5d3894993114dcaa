"""Where the lines of the library modules go (wsml's, and orchestration's through `show_on_console`).

Each module logs to `logging.getLogger(__name__)` (or to a `log` callback its caller passes); a
command line shows those lines on stderr, as plain lines, with `show_on_stderr()`.
"""
from __future__ import annotations

import logging
import sys


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged, not the one there when it was made (a test,
    or a caller that redirects stderr, may replace it in between)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


_HANDLER = _Stderr()


def show_on_stderr() -> None:
    """wsml's log lines at INFO and above on stderr, one plain line each (once, however often called)."""
    logger = logging.getLogger("wsml")
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)
    logger.setLevel(logging.INFO)


class _Console(logging.Handler):
    """Plain lines as a command line prints them: INFO on stdout, WARNING and above on stderr (whatever
    sys.stdout and sys.stderr are when the line is logged)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 (logging's own contract: report, never raise)
            self.handleError(record)


_CONSOLE = _Console()


def show_on_console(name: str) -> None:
    """The lines of the package `name` at INFO and above on the console, one plain line each (once, however
    often called): what `orchestration`'s command lines show of its library modules."""
    logger = logging.getLogger(name)
    if _CONSOLE not in logger.handlers:
        logger.addHandler(_CONSOLE)
    logger.setLevel(logging.INFO)
    logger.propagate = False        # not also through the root logger's handlers (Ray's, pytest's)

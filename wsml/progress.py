"""Progress of a long step for the person waiting: a tqdm bar on a terminal, plain lines in a log.

    with Progress(total=len(batches), desc="features", unit="batch", log=log) as bar:
        for batch in batches:
            ...
            bar.update(1)

A bar redraws itself in place, which only a terminal shows well; written to a
file (a SLURM log, `ray exec`, a trial's train.log) it would be one line per
redraw. So a bar is drawn only when nothing else was asked for (`log` None)
and stderr is a terminal; otherwise `log` (default: print to stderr) gets a
line each time another `1/lines` of the total is done or `every_s` seconds
passed, and one at the end. `lines=0`: only the timed lines, and the end line
after them (a step that ends within `every_s` prints nothing).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _amount(n: float, unit: str) -> str:
    if unit == "B":
        return f"{n / 2**20:,.0f} MiB"
    return f"{n:,.0f}"


class Progress:
    """Counts `total` units of work; see the module docstring for how it is shown."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", *,
                 log: Callable[[str], None] | None = None, lines: int = 10, every_s: float = 30.0,
                 initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.lines, self.every_s = lines, every_s
        self.done = self.initial = initial
        self.start = self.last = time.monotonic()
        self.next_line = self._step_after(initial)
        self.bar = None
        self.log: Callable[[str], None] | None = log
        if log is None and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, leave=False,
                            unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000)
        elif log is None:
            self.log = _stderr

    def _step_after(self, done: int) -> float:
        if not self.total or self.lines <= 0:
            return float("inf")
        step = self.total / self.lines
        return (int(done / step) + 1) * step

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if not finished and (self.done >= self.next_line or now - self.last >= self.every_s):
            if self.log is not None:    # None once closed
                self.log(self._line(now))
            self.last = now
            self.next_line = self._step_after(self.done)

    def _line(self, now: float) -> str:
        seconds = now - self.start
        rate = (self.done - self.initial) / seconds if seconds > 0 else 0.0
        of = f"/{_amount(self.total, self.unit)}" if self.total else ""
        pct = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        unit = "" if self.unit == "B" else f" {self.unit}"
        return (f"{self.desc}: {_amount(self.done, self.unit)}{of}{unit}{pct}, {seconds:.0f} s, "
                f"{_amount(rate, self.unit)}{unit}/s")

    def close(self) -> None:
        """The end line (a bar clears itself)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.log is not None:
            if self.lines > 0 or self.last > self.start:
                self.log(self._line(time.monotonic()))
            self.log = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

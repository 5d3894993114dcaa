"""Methods as modules: each module of this package declares schemes of the trainer and holds their losses.

A module here names its schemes in `SCHEMES` (a tuple of `Scheme`): the batch loss ("module:function"),
the label state the trainer keeps for it, its hyper-parameters (`Hyper`: names, published defaults per
data set and where they come from, valid values, a search range) and its published numbers.
`wsml.schemes` reads every module of this package, in the order of their names, after the built-in
schemes of the 2022 paper (Table 1's rows); a `wsml/methods/` folder under another entry of the Python
path counts too (a method kept outside this checkout, on PYTHONPATH). Everything else follows from
the registry: the trainer's `--<hyper-parameter>` options and `TrainConfig.scheme_params`, the
validation, the sweep's `search.scheme_params` checks, the tables. Adding a method is this one module
and its entry in the space files (docs/method.md, "Adding a method").

The registry is read where torch is not imported (`wsml.config`, the sweep's driver), so a module here
imports torch inside its functions, not at its top.
"""
from __future__ import annotations

import importlib
import math
import os
import pkgutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

# the modules of wsml/methods/ folders elsewhere on the Python path are this package's too
__path__ += [p for d in sys.path if (p := os.path.join(d or ".", "wsml", "methods")) not in __path__
             and os.path.isdir(p) and not os.path.samefile(p, __path__[0])]

Family = Literal["baseline", "large-loss", "recent"]
NO_STATE, LL_FLIPS, ROLE_ESTIMATOR, APL_SOFT_LABELS = "none", "ll-flips", "role-estimator", "apl-soft-labels"
BENCHMARKS = ("pascal", "coco", "nuswide", "cub")
MODES = ("end-to-end", "linear-init")


@dataclass(frozen=True)
class Range:
    """A search range: uniform (or log-uniform) in [low, high], integers where `integer`."""

    low: float
    high: float
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class PublishedTraining:
    """The optimisation setting the published code trains a method with (start points for the search)."""

    optimizer: str
    lr: float
    lr_head_mult: float     # the linear head's lr = lr * lr_head_mult
    batch_size: int
    epochs: int


@dataclass(frozen=True)
class Hyper:
    """One hyper-parameter of a scheme: a key of `TrainConfig.scheme_params` and the trainer's option
    `--<name>` (delta_rel, whose defaults are the data set's, is a TrainConfig field of its own)."""

    name: str
    help: str                                   # the command line's help
    defaults: Mapping[str, float] | None        # per data set; None: the data set's (wsml.config.DEFAULTS)
    source: str                                 # where the published defaults come from
    low: float | None = None                    # valid values: >= low (> low where low_open), <= high
    low_open: bool = False
    high: float | None = None
    integer: bool = False
    below_epochs: bool = False                  # must be below the run's number of epochs
    search: Range | None = None                 # a proposed search range around the defaults

    def default(self, dataset: str) -> float | None:
        return None if self.defaults is None else self.defaults[dataset]

    def invalid(self, value: object, epochs: int | None = None) -> str | None:
        """Why `value` is not valid ("a number above 0"), or None."""
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)) \
                or not math.isfinite(value):
            return kind
        v = float(value)
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return f"{kind} {'above' if self.low_open else 'at least'} {self.low:g}"
        if self.high is not None and v > self.high:
            return f"{kind} at most {self.high:g}"
        if self.below_epochs and epochs is not None and v >= epochs:
            return f"{kind} below the number of epochs ({epochs})"
        return None


@dataclass(frozen=True)
class Scheme:
    name: str
    family: Family                  # the table it belongs to: the 2022 paper's Table 1 rows, or the recent methods
    loss: str                       # "module:function" of its batch loss
    state: str = NO_STATE           # NO_STATE, LL_FLIPS, ROLE_ESTIMATOR or APL_SOFT_LABELS
    hypers: tuple[Hyper, ...] = ()
    epoch_schedule: bool = False    # its loss or label update depends on the number of epochs
    linear_phase: str = "LSAN"      # LinearInit's linear phase: the published setting of LSAN or ROLE
    published: Mapping[tuple[str, str], float] = field(default_factory=dict)   # (data set, mode) -> test mAP
    published_in: str = ""          # the paper and table of `published`

    def hyper(self, name: str) -> Hyper | None:
        return next((h for h in self.hypers if h.name == name), None)


def check_finite(name: str, value: float, low: float | None = None, low_open: bool = False) -> None:
    """Refuse a method parameter that is no finite number, or not above (at least) `low`."""
    from wsml.errors import ConfigError

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"invalid {name}={value!r}: a finite number")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"invalid {name}={value!r}: {'above' if low_open else 'at least'} {low:g}")


def end_to_end(published: Mapping[str, float]) -> dict[tuple[str, str], float]:
    """A paper's end-to-end test mAP per data set as `Scheme.published`."""
    return {(ds, "end-to-end"): v for ds, v in published.items()}


def declared() -> tuple[Scheme, ...]:
    """The schemes the modules of this package declare, module by module in the order of their names."""
    out: list[Scheme] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        out += importlib.import_module(f"{__name__}.{info.name}").SCHEMES
    return tuple(out)

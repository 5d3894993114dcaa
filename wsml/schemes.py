"""The registry of schemes: every loss a run can train, in one place.

Each `Scheme` names

* its batch loss (`loss`, "module:function", imported when a run trains: this module and `wsml.config`
  import no torch), a function of one `wsml.losses.Batch` returning a `wsml.losses.LossOutput`;
* the label state the trainer keeps for it beside the observed labels (`state`): none, LL-Cp's
  permanent flips, ROLE's label estimator or EM+APL's soft pseudo-labels (`wsml.trainer`);
* its hyper-parameters (`hypers`): TrainConfig fields of the same names, with the published defaults per
  data set and where they come from, their valid values and a proposed search range (what a sweep
  searches is the space files' `search.scheme_params`);
* whether it depends on the run's number of epochs (`epoch_schedule`: then `epochs` is compared on resume
  and a recorded trial of other epochs is never reused);
* the linear phase of LinearInit it takes (`linear_phase`: whose published setting, `wsml.config`);
* its published test mAP per (data set, mode), and the paper they come from.

`wsml.config` (SCHEMES, defaults, validation), `wsml.losses.scheme_loss` (the dispatch), `wsml.trainer`
(label state), `orchestration.trial` (which searched value applies to which scheme), the space checks and
the tables read it. Adding a method: docs/method.md, "Adding a method".
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from wsml.spml_params import ACK_LINES, APL_DEFAULTS, GR_PUBLISHED, PUBLISHED_MAP, SEARCH_RANGES, Range

Family = Literal["baseline", "large-loss", "recent"]
NO_STATE, LL_FLIPS, ROLE_ESTIMATOR, APL_SOFT_LABELS = "none", "ll-flips", "role-estimator", "apl-soft-labels"
BENCHMARKS = ("pascal", "coco", "nuswide", "cub")
MODES = ("end-to-end", "linear-init")


@dataclass(frozen=True)
class Hyper:
    """One hyper-parameter of a scheme: the TrainConfig field `name`, None there meaning its default here."""

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


# ------------------------------------------------------------------------------------------- hyper-parameters
# delta_rel's defaults are the data set's (wsml.config.DEFAULTS: the paper's 0.2, digits 2).
_DELTA_REL = Hyper("delta_rel", "percent of label entries per epoch (paper: 0.1-0.5)", None,
                   "the paper's code (0.2); its authors' grid {0.1, ..., 0.5}: LargeLossMatters issue #8",
                   low=0.0, high=100.0)

# digits (ours, CPU-sized; no published value), by single runs of 10 epochs, seed 0 (docs/method.md):
# EM's alpha 0.1 (COCO's and NUS-WIDE's: test mAP 99.6; 0.2 gave 98.6, 0.01 collapsed to 26); APL's
# warm-up 3 (CUB's, within the published 3 to 5 of 10 epochs: after epoch 3 the model is at ~89
# validation mAP and its pseudo-negatives were 99.9 % right; 2 gave 99.0, 3 gave 99.4); neg_proportion
# 0.8, below the share of true negatives among digits' unobserved entries (~0.86: 1.3 of 9 are positive;
# VOC 0.98), as 0.9 is below VOC's (0.9 left 4.7 % of the last epoch's pseudo-negatives positive); beta
# 0.2 (NUS-WIDE's; 0.9 gave 97.7). OpenImages has no published value: COCO's, as for the linear phase.
_DIGITS_APL = {"alpha": 0.1, "beta": 0.2, "neg_proportion": 0.8, "warmup_epoch": 3}


def _apl(attr: str) -> dict[str, float]:
    out = {ds: float(getattr(APL_DEFAULTS[ds], attr)) for ds in BENCHMARKS}
    out["openimages"] = out["coco"]
    out["digits"] = _DIGITS_APL[attr]
    return out


_ACK = "AckTheUnknown " + ", ".join(f"{ds} {ACK_LINES[ds]}" for ds in BENCHMARKS)
_EM_ALPHA = Hyper("em_alpha", "EM, EM+APL: weight alpha of the entropy of unobserved entries", _apl("alpha"),
                  _ACK, low=0.0, search=SEARCH_RANGES["EM"]["alpha"])
_APL = (
    _EM_ALPHA,
    Hyper("apl_beta", "EM+APL: weight beta of the pseudo-negative entries", _apl("beta"), _ACK, low=0.0,
          search=SEARCH_RANGES["EM+APL"]["beta"]),
    Hyper("apl_neg_proportion", "EM+APL: share of each class's unobserved entries pseudo-labelled over the run",
          _apl("neg_proportion"), _ACK, low=0.0, high=1.0, search=SEARCH_RANGES["EM+APL"]["neg_proportion"]),
    Hyper("apl_warmup_epoch", "EM+APL: the epoch after whose training pass the first pseudo-labels are "
          "assigned (below --epochs)", {k: int(v) for k, v in _apl("warmup_epoch").items()}, _ACK, low=1.0,
          integer=True, below_epochs=True, search=SEARCH_RANGES["EM+APL"]["warmup_epoch"]),
)

# GR: the published code's defaults for every data set (GRLoss config.py:100-102); digits takes them
# too, as the schedules are fractions of the run whatever its length (test mAP 99.6, seed 0).
_GR_SOURCE = "GRLoss config.py:100-102 (--beta w0 wT b0 bT, --alpha mu0 sigma0 muT sigmaT, --q2q3 q2 q3)"
_GR_HELP = {"w_start": "GR: k(p) = sigmoid(w p + b), w in the first epoch", "w_end": "GR: w at the end",
            "b_start": "GR: b in the first epoch", "b_end": "GR: b at the end",
            "mu_start": "GR: v(p) = exp(-(p - mu)^2 / (2 sigma^2)), mu in the first epoch",
            "sigma_start": "GR: sigma in the first epoch", "mu_end": "GR: mu at the end",
            "sigma_end": "GR: sigma at the end", "q2": "GR: q2 of the robust term (1 - p^q2)/q2",
            "q3": "GR: q3 of the robust term (1 - (1-p)^q3)/q3"}
_GR = tuple(Hyper(f"gr_{attr}", text, dict.fromkeys((*BENCHMARKS, "openimages", "digits"),
                                                    float(getattr(GR_PUBLISHED, attr))),
                  _GR_SOURCE, low=0.0 if attr in ("sigma_start", "sigma_end", "q2", "q3") else None,
                  low_open=True, search=SEARCH_RANGES["GR"].get(attr))
            for attr, text in _GR_HELP.items())

# ----------------------------------------------------------------------------------------- published numbers
LL_PAPER = "Kim et al., Large Loss Matters in Weakly Supervised Multi-Label Classification, CVPR 2022, Table 1"
# The 2022 paper's Table 1: (end-to-end VOC, COCO, NUS, CUB, LinearInit VOC, COCO, NUS, CUB).
_TABLE1 = {
    "full":  (90.2, 78.0, 54.5, 32.9, 91.1, 77.2, 54.9, 34.0),
    "AN":    (85.1, 64.1, 42.0, 19.1, 86.9, 68.7, 47.6, 20.9),
    "WAN":   (86.5, 64.8, 46.3, 20.3, 87.1, 68.0, 47.5, 21.1),
    "LSAN":  (86.7, 66.9, 44.9, 17.9, 86.5, 69.2, 50.5, 16.6),
    "EPR":   (85.5, 63.3, 46.0, 20.0, 84.9, 66.8, 48.1, 21.2),
    "ROLE":  (87.9, 66.3, 43.1, 15.0, 88.2, 69.0, 51.0, 16.8),
    "LL-R":  (89.2, 71.0, 47.4, 19.5, 89.4, 71.9, 49.1, 21.5),
    "LL-Ct": (89.0, 70.5, 48.0, 20.4, 89.3, 71.6, 49.6, 21.8),
    "LL-Cp": (88.4, 70.7, 48.3, 20.1, 88.3, 71.0, 49.4, 21.4),
}


def _table1(name: str) -> dict[tuple[str, str], float]:
    columns = [(ds, mode) for mode in MODES for ds in BENCHMARKS]
    return dict(zip(columns, _TABLE1[name], strict=True))


def _end_to_end(name: str) -> dict[tuple[str, str], float]:
    return {(ds, "end-to-end"): v for ds, v in PUBLISHED_MAP[name].items()}


ACK_PAPER = ("Zhou et al., Acknowledging the Unknown for Multi-label Learning with Single Positive Labels, "
             "ECCV 2022 (github:Correr-Zhou/SPML-AckTheUnknown)")
GR_PAPER = ("Chen et al., Boosting Single Positive Multi-label Classification with Generalized Robust Loss, "
            "IJCAI 2024 (github:yan4xi1/GRLoss)")

# ------------------------------------------------------------------------------------------------ the registry
_LOSSES = "wsml.losses"
_SPML = "wsml.spml_losses"
_SCHEMES = (
    Scheme("full", "baseline", f"{_LOSSES}:full_loss", published=_table1("full"), published_in=LL_PAPER),
    Scheme("AN", "baseline", f"{_LOSSES}:an_loss", published=_table1("AN"), published_in=LL_PAPER),
    Scheme("WAN", "baseline", f"{_LOSSES}:wan_loss", published=_table1("WAN"), published_in=LL_PAPER),
    Scheme("LSAN", "baseline", f"{_LOSSES}:lsan_loss", published=_table1("LSAN"), published_in=LL_PAPER),
    Scheme("EPR", "baseline", f"{_LOSSES}:epr_loss", linear_phase="ROLE", published=_table1("EPR"),
           published_in=LL_PAPER),
    Scheme("ROLE", "baseline", f"{_LOSSES}:role_scheme_loss", state=ROLE_ESTIMATOR, linear_phase="ROLE",
           published=_table1("ROLE"), published_in=LL_PAPER),
    Scheme("LL-R", "large-loss", f"{_LOSSES}:large_loss", hypers=(_DELTA_REL,), published=_table1("LL-R"),
           published_in=LL_PAPER),
    Scheme("LL-Ct", "large-loss", f"{_LOSSES}:large_loss", hypers=(_DELTA_REL,), published=_table1("LL-Ct"),
           published_in=LL_PAPER),
    Scheme("LL-Cp", "large-loss", f"{_LOSSES}:large_loss", state=LL_FLIPS, hypers=(_DELTA_REL,),
           published=_table1("LL-Cp"), published_in=LL_PAPER),
    Scheme("EM", "recent", f"{_SPML}:em_scheme", hypers=(_EM_ALPHA,), published=_end_to_end("EM"),
           published_in=ACK_PAPER),
    Scheme("EM+APL", "recent", f"{_SPML}:em_apl_scheme", state=APL_SOFT_LABELS, hypers=_APL, epoch_schedule=True,
           published=_end_to_end("EM+APL"), published_in=ACK_PAPER),
    Scheme("GR", "recent", f"{_SPML}:gr_scheme", hypers=_GR, epoch_schedule=True, published=_end_to_end("GR"),
           published_in=GR_PAPER),
)
REGISTRY: dict[str, Scheme] = {s.name: s for s in _SCHEMES}


def names(family: Family | None = None) -> tuple[str, ...]:
    """The schemes (of `family`), in the registry's order (the tables' row order)."""
    return tuple(s.name for s in _SCHEMES if family is None or s.family == family)


def hyper_names(with_dataset_defaults: bool = True) -> tuple[str, ...]:
    """Every scheme's hyper-parameter names, once each, in registry order; without `with_dataset_defaults`
    those whose defaults are the data set's (delta_rel) are left out: the fields the registry fills."""
    out = [h.name for s in _SCHEMES for h in s.hypers if with_dataset_defaults or h.defaults is not None]
    return tuple(dict.fromkeys(out))


def applies(name: str, scheme: str) -> bool:
    """Whether the hyper-parameter `name` means something to `scheme`."""
    return scheme in REGISTRY and REGISTRY[scheme].hyper(name) is not None


def hyper(name: str) -> Hyper:
    """The hyper-parameter `name` (the same object in every scheme that has it)."""
    return next(h for s in _SCHEMES for h in s.hypers if h.name == name)

"""The registry of schemes: every loss a run can train, in one place.

Each `Scheme` (`wsml.methods`) names

* its batch loss (`loss`, "module:function", imported when a run trains: this module and `wsml.config`
  import no torch), a function of one `wsml.losses.Batch` returning a `wsml.losses.LossOutput`;
* the label state the trainer keeps for it beside the observed labels (`state`): none, LL-Cp's
  permanent flips, ROLE's label estimator or EM+APL's soft pseudo-labels (`wsml.trainer`);
* its hyper-parameters (`hypers`): keys of `TrainConfig.scheme_params` and the trainer's options of the
  same names (delta_rel: a field of its own), with the published defaults per data set and where they
  come from, their valid values and a proposed search range (what a sweep searches is the space files'
  `search.scheme_params`);
* whether it depends on the run's number of epochs (`epoch_schedule`: then `epochs` is compared on resume
  and a recorded trial of other epochs is never reused);
* the linear phase of LinearInit it takes (`linear_phase`: whose published setting, `wsml.config`);
* its published test mAP per (data set, mode), and the paper they come from.

The 2022 paper's schemes are declared here; every later method in its own module of `wsml/methods/`,
which this registry reads. `wsml.config` (SCHEMES, defaults, validation, `scheme_params`),
`wsml.losses.scheme_loss` (the dispatch), `wsml.trainer` (label state), `orchestration.trial` (which
searched value applies to which scheme), the space checks and the tables read it. Adding a method:
docs/method.md, "Adding a method".
"""
from __future__ import annotations

from wsml import methods as _methods
from wsml.methods import (APL_SOFT_LABELS, BENCHMARKS, LL_FLIPS, MODES, NO_STATE, ROLE_ESTIMATOR, Family, Hyper,
                          Range, Scheme, declared)

__all__ = ["APL_SOFT_LABELS", "BENCHMARKS", "LL_FLIPS", "MODES", "NO_STATE", "ROLE_ESTIMATOR", "Family", "Hyper",
           "Range", "Scheme"]

# ------------------------------------------------------------------------------------------- hyper-parameters
# delta_rel's defaults are the data set's (wsml.config.DEFAULTS: the paper's 0.2, digits 2).
_DELTA_REL = Hyper("delta_rel", "percent of label entries per epoch (paper: 0.1-0.5)", None,
                   "the paper's code (0.2); its authors' grid {0.1, ..., 0.5}: LargeLossMatters issue #8",
                   low=0.0, high=100.0)

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


# ------------------------------------------------------------------------------------------------ the registry
_LOSSES = "wsml.losses"
_BUILT_IN = (
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
)
# the 2022 paper's rows first (Table 1's order), then the methods of wsml/methods/, module by module
_SCHEMES = _BUILT_IN + declared()
REGISTRY: dict[str, Scheme] = {s.name: s for s in _SCHEMES}
if len(REGISTRY) < len(_SCHEMES):       # e.g. one method module in two wsml/methods/ folders on the Python path
    _twice = sorted({s.name for s in _SCHEMES if sum(t.name == s.name for t in _SCHEMES) > 1})
    raise ImportError(f"scheme(s) {', '.join(_twice)} declared twice in {', '.join(_methods.__path__)}: keep one "
                      "module per method")


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

"""Search spaces: `search_spaces/<dataset>.yaml` loaded into a small typed schema.

Everything a sweep needs besides the command line lives in one YAML file per
data set: what is searched (schemes, modes, optimizers, an lr range per
optimizer, delta_rel, the LinearInit head's lr, each method's own
hyper-parameters under `scheme_params`), the configurations evaluated
first, the budget (num_samples, epochs), ASHA's settings, the resources of one
trial, the fixed training settings and the number of final seeds.
The dataclasses below are the file's schema: pydantic checks the keys and the
types (`_parse`), `SweepSpace.validate` the values against each other, and
either raises `SpaceError` with one line that names the key, the value and the
fix, so a bad file fails before Ray or MLflow are touched. YAML aliases are refused (a few nested ones expand to
gigabytes).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import yaml
from pydantic import (BeforeValidator, ConfigDict, Discriminator, StrictBool, StrictStr, Tag, TypeAdapter,
                      ValidationError)
from pydantic_core import PydanticCustomError

from wsml import schemes
from wsml.config import DATASETS, DEFAULTS, OPTIMIZERS, linear_phase_defaults

from orchestration import trial as trial_config
from orchestration.common import ROOT, SpaceError, method_name
from orchestration.report.paper_boostlu import PAPER_ALPHA
from orchestration.search import space_checks
from orchestration.search.space_checks import PAPER, keys, one_line

SPACES_DIR = ROOT / "search_spaces"
MAX_FILE_BYTES = 1 << 20        # a space file is a page of YAML; anything larger is a mistake



# ------------------------------------------------------------ value types
# The types of a space file's values, checked by pydantic (`_parse`): YAML's true is no number, a lone
# name is a list of one, and an lr is one range or a mapping optimizer -> range.
def _no_bool(kind: str):
    def check(v: Any) -> Any:
        if isinstance(v, bool):
            raise PydanticCustomError(kind, "not a number")
        return v
    return check


def _one_or_list(v: Any) -> Any:
    return [v] if isinstance(v, (str, bool)) else v


def _lr_kind(v: Any) -> str:
    per_optimizer = isinstance(v, dict) and v and set(v) <= set(OPTIMIZERS)
    return "per_optimizer" if per_optimizer else "range"


Number = Annotated[float, BeforeValidator(_no_bool("float_type"))]     # YAML 1.1's "1e-5" string counts
Whole = Annotated[int, BeforeValidator(_no_bool("int_type"))]
Names = Annotated[list[StrictStr], BeforeValidator(_one_or_list)]
Flags = Annotated[list[StrictBool], BeforeValidator(_one_or_list)]
_STRICT = ConfigDict(extra="forbid")


@dataclass
class FloatParam:
    """A float searched either over a list of values (a grid) or a range."""

    __pydantic_config__ = _STRICT
    values: list[Number] | None = None
    low: Number | None = None
    high: Number | None = None
    log: StrictBool = False

    def contains(self, v: float) -> bool:
        if self.values is not None:
            return any(math.isclose(v, x, rel_tol=1e-9) for x in self.values)
        return self.low is not None and self.high is not None and self.low <= v <= self.high

    def describe(self) -> str:
        if self.values is not None:
            return "choice(" + ", ".join(f"{x:g}" for x in self.values) + ")"
        return f"{'loguniform' if self.log else 'uniform'}({self.low:g}, {self.high:g})"


class Group(NamedTuple):
    """What is searched on its own, with its own share of the trials: a table row in one column."""

    scheme: str
    mode: str
    boostlu: bool = False       # with the BoostLU head: its own row ("LL-R + BoostLU"), alpha searched

    @property
    def label(self) -> str:
        return f"{method_name(self.scheme, 1.0 if self.boostlu else None)} ({self.mode})"


Lr = Annotated[Annotated[FloatParam, Tag("range")] | Annotated[dict[str, FloatParam], Tag("per_optimizer")],
               Discriminator(_lr_kind)]


@dataclass
class Search:
    __pydantic_config__ = _STRICT
    scheme: Names
    lr: Lr                                    # one range, or one per optimizer
    delta_rel: FloatParam | None = None       # needed when an LL scheme is searched
    mode: Names = field(default_factory=lambda: ["end-to-end"])
    optimizer: Names = field(default_factory=lambda: ["adam"])
    linear_init_lr: FloatParam | None = None  # the LinearInit head's lr; searched in linear-init groups
    boostlu: Flags = field(default_factory=lambda: [False])   # true: BoostLU rows too
    boostlu_alpha: FloatParam | None = None   # BoostLU's alpha, searched in its groups
    # per scheme, its own hyper-parameters (wsml/schemes.py: TrainConfig names), searched in its groups only
    scheme_params: dict[StrictStr, dict[StrictStr, FloatParam]] = field(default_factory=dict)

    def lr_for(self, optimizer: str) -> FloatParam:
        return self.lr[optimizer] if isinstance(self.lr, dict) else self.lr

    def groups(self) -> list[Group]:
        """The groups searched each on its own (orchestration.search.per_scheme): scheme x mode x BoostLU."""
        return [Group(s, m, b) for m in self.mode for b in self.boostlu for s in self.scheme]

    def params(self, group: Group) -> dict[str, Any]:
        """Optuna's names and distributions for one group, in the order suggested.

        `optimizer` is searched when several are listed; the lr is named
        `lr_<optimizer>` when each optimizer has its own range (one TPE model per
        range), else `lr`."""
        out: dict[str, Any] = {}
        if len(self.optimizer) > 1:
            out["optimizer"] = list(self.optimizer)
        for opt in self.optimizer:
            out[lr_name(self, opt)] = self.lr_for(opt)
        if self.delta_rel is not None and trial_config.applies("delta_rel", group.scheme, group.mode):
            out["delta_rel"] = self.delta_rel
        if self.linear_init_lr is not None and trial_config.applies("linear_init_lr", group.scheme, group.mode):
            out["linear_init_lr"] = self.linear_init_lr
        if group.boostlu:
            out["boostlu_alpha"] = self.boostlu_alpha
        out.update(self.scheme_params.get(group.scheme, {}))
        return out


def lr_name(search: Search, optimizer: str) -> str:
    return f"lr_{optimizer}" if isinstance(search.lr, dict) else "lr"


@dataclass
class Scheduler:
    __pydantic_config__ = _STRICT
    grace_period: Whole = 2
    reduction_factor: Number = 2.0


@dataclass
class Resources:
    __pydantic_config__ = _STRICT
    cpus_per_trial: Number = 1.0
    gpus_per_trial: Number = 0.0


@dataclass
class SweepSpace:
    __pydantic_config__ = _STRICT
    dataset: StrictStr
    search: Search
    num_samples: Whole = 16                 # trials in all, shared evenly by the (scheme, mode) groups
    # Trials proposed and pending at once (None: num_samples). Tune keeps this many trials asking
    # for resources, so an autoscaler sees the whole demand and starts every node it needs at once.
    max_concurrent: Whole | None = None
    epochs: Whole = 10
    search_seed: Whole = 0                  # seeds the groups' Optuna TPE samplers
    start_with: Any = PAPER                 # "paper", "none" or a list of configurations (and "paper")
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Resources = field(default_factory=Resources)
    final_seeds: Whole = 3
    max_failures: Whole = 2
    keep_checkpoints: Whole = 2             # per trial; the latest is what a trial resumes from
    train: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"                # where it was read from (not a YAML key)

    # --------------------------------------------------------------- derived
    def start_points(self) -> list[dict[str, Any]]:
        """The configurations evaluated first, each {scheme, [mode], optimizer, lr, ...} in the trainer's names."""
        items: list[Any] = [] if self.start_with == "none" else [PAPER] if self.start_with == PAPER else self.start_with
        points: list[dict[str, Any]] = []
        for item in items:
            if item == PAPER:
                points += self._defaults()
            elif item["scheme"] in self.search.scheme and item.get("mode", self.search.mode[0]) in self.search.mode:
                points.append(dict(item))
        return points

    def _defaults(self) -> list[dict[str, Any]]:
        """Each scheme's default configuration (the trainer's; for the benchmarks the published code's)."""
        d = DEFAULTS[self.dataset]
        out = []
        for scheme, mode in dict.fromkeys((g.scheme, g.mode) for g in self.search.groups()):
            p: dict[str, Any] = {"scheme": scheme, "mode": mode, "optimizer": "adam", "lr": d.lr}
            if trial_config.applies("delta_rel", scheme, mode):
                p["delta_rel"] = d.delta_rel
            if self.search.linear_init_lr is not None and trial_config.applies("linear_init_lr", scheme, mode):
                p["linear_init_lr"] = linear_phase_defaults(self.dataset, scheme).lr
            for name in self.search.scheme_params.get(scheme, {}):     # the published defaults of the data set
                p[name] = schemes.hyper(name).default(self.dataset)
            out.append(p)
        return out

    @property
    def concurrency(self) -> int:
        """Trials the searcher proposes ahead of results: `max_concurrent`, at most (and by default) num_samples."""
        return min(self.max_concurrent or self.num_samples, self.num_samples)

    def group_points(self, group: Group) -> list[dict[str, Any]]:
        """The start points of one group in Optuna's names (see `Search.params`). A point without
        `boostlu_alpha` starts the plain group and the BoostLU group with the BoostLU authors' alpha (5)."""
        names = self.search.params(group)
        out = []
        for p in self.start_points():
            if p["scheme"] != group.scheme or p.get("mode", group.mode) != group.mode:
                continue
            if "boostlu_alpha" in p and not group.boostlu:
                continue
            q = {}
            optimizer = p.get("optimizer", self.search.optimizer[0])
            if "optimizer" in names:
                q["optimizer"] = optimizer
            q[lr_name(self.search, optimizer)] = p["lr"]
            q.update({k: p[k] for k in names if k in p and k not in q and k != "boostlu_alpha"})
            if group.boostlu:
                alpha = p.get("boostlu_alpha", PAPER_ALPHA)
                if self.search.boostlu_alpha is not None and self.search.boostlu_alpha.contains(alpha):
                    q["boostlu_alpha"] = alpha
            if q not in out:
                out.append(q)
        return out

    def summary(self) -> dict[str, str]:
        """Flat, human-readable description (MLflow params of the sweep run)."""
        s = self.search
        lr = (s.lr.describe() if isinstance(s.lr, FloatParam)
              else ", ".join(f"{o}: {p.describe()}" for o, p in s.lr.items()))
        out = {
            "space.scheme": ",".join(s.scheme),
            "space.mode": ",".join(s.mode),
            "space.optimizer": ",".join(s.optimizer),
            "space.lr": lr,
            "space.delta_rel": s.delta_rel.describe() if s.delta_rel else "-",
            "space.linear_init_lr": s.linear_init_lr.describe() if s.linear_init_lr else "-",
            "space.boostlu": ",".join(map(str, s.boostlu)),
            "space.boostlu_alpha": s.boostlu_alpha.describe() if s.boostlu_alpha else "-",
            # "space.em_alpha": "EM: loguniform(...); EM+APL: ..." (a scheme name is no MLflow key: its "+")
            **{f"space.{k}": "; ".join(f"{sc}: {ps[k].describe()}" for sc, ps in s.scheme_params.items()
                                       if sc in s.scheme and k in ps)
               for k in dict.fromkeys(k for sc, ps in s.scheme_params.items() if sc in s.scheme for k in ps)},
            "space.file": self.source,
            "num_samples": str(self.num_samples),
            "max_concurrent": str(self.concurrency),
            "epochs": str(self.epochs),
            "search_seed": str(self.search_seed),
            "asha.grace_period": str(self.scheduler.grace_period),
            "asha.reduction_factor": f"{self.scheduler.reduction_factor:g}",
            "cpus_per_trial": f"{self.resources.cpus_per_trial:g}",
            "gpus_per_trial": f"{self.resources.gpus_per_trial:g}",
            "final_seeds": str(self.final_seeds),
            "max_failures": str(self.max_failures),
        }
        for k, v in sorted(self.train.items()):
            out[f"train.{k}"] = str(v)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> SweepSpace:
        """This space, its values checked (`orchestration.search.space_checks`)."""
        return space_checks.validate(self)

# ---------------------------------------------------------------- building
def _parse(data: dict[str, Any], source: str) -> SweepSpace:
    """`data` (a space file's mapping) as a SweepSpace, its types checked by pydantic; the first problem
    becomes one line naming the key, the value and the fix (the values' ranges: `SweepSpace.validate`)."""
    if "source" in data:        # a field of SweepSpace, not a key of the file
        raise SpaceError(f"{source}: source is an unknown key: known keys here are {', '.join(keys(SweepSpace))}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        raise SpaceError(one_line(err.errors()[0], source, _SECTIONS)) from None


_ADAPTER = TypeAdapter(SweepSpace)
# The dataclass behind each mapping of a space file, by its key (an lr per optimizer: search.lr.<optimizer>).
_SECTIONS: dict[str, type] = {"": SweepSpace, "search": Search, "scheduler": Scheduler, "resources": Resources,
                              **{f"search.{k}": FloatParam for k in ("lr", "delta_rel", "linear_init_lr",
                                                                     "boostlu_alpha")},
                              **{f"search.lr.{o}": FloatParam for o in OPTIMIZERS}}


class _NoAliasLoader(yaml.SafeLoader):
    """`yaml.safe_load` without aliases: `*name` is refused where it appears ("billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "an alias (*name): aliases are not allowed in a space "
                                              "file, write the value out", event.start_mark)
        return super().compose_node(parent, index)


def space_path(dataset: str) -> Path:
    return SPACES_DIR / f"{dataset}.yaml"


def load_space(dataset: str, path: str | Path | None = None) -> SweepSpace:
    """Read and validate the space of `dataset` (default file search_spaces/<dataset>.yaml)."""
    if dataset not in DATASETS:
        raise SpaceError(f"unknown data set {dataset!r}: choose one of {', '.join(DATASETS)}")
    p = Path(path) if path is not None else space_path(dataset)
    source = str(p)
    if not p.is_file():
        raise SpaceError(f"search space {source} not found: write it (see search_spaces/digits.yaml) or pass --space")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise SpaceError(f"{source} is {p.stat().st_size} bytes: a space file is a page of YAML; pass the right --space")
    try:
        data = yaml.load(p.read_text(errors="replace"), Loader=_NoAliasLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpaceError(f"{source}: malformed YAML{where}: {problem}; fix the syntax") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: expected a mapping of keys (dataset, search, ...), found {type(data).__name__}")
    space = _parse(data, source)
    space.source = source
    if space.dataset != dataset:
        raise SpaceError(f"{source}: dataset={space.dataset!r} is invalid: this file is for --dataset {dataset}; "
                         f"set dataset: {dataset} or pass the right --space")
    return space.validate()


def space_from_dict(data: dict[str, Any]) -> SweepSpace:
    """A space saved with `SweepSpace.to_dict` (the sweep record), validated again."""
    data = dict(data)
    source = data.pop("source", "<record>")
    space = _parse(data, source)
    space.source = source
    return space.validate()


def shrunk_grace_period(grace_period: int, epochs: int, fewer: int) -> int:
    """ASHA's grace period for trials shortened from `epochs` to `fewer` epochs: scaled with them (at least
    2: epoch 1 is the same for every scheme), and below `fewer` where `fewer` >= 3, so that ASHA keeps a rung
    before the end (a grace period of 5 kept for 4 epochs left it none: every trial ran to the end)."""
    scaled = max(2, min(grace_period, round(grace_period * fewer / epochs)))
    return min(scaled, fewer - 1) if fewer >= 3 else fewer


def with_overrides(space: SweepSpace, **overrides: Any) -> SweepSpace:
    """Apply command-line overrides (None = keep) and validate again.

    Keys: num_samples, max_concurrent, epochs, cpus_per_trial, gpus_per_trial, final_seeds,
    max_failures, search_seed, schemes (list of scheme names), boostlu (True: BoostLU rows too).
    Fewer `epochs` than the space's shrink ASHA's grace period with them (`shrunk_grace_period`).
    """
    s = dataclasses.replace(space, search=dataclasses.replace(space.search),
                            scheduler=dataclasses.replace(space.scheduler),
                            resources=dataclasses.replace(space.resources), train=dict(space.train))
    s.source = space.source + " + command line"
    for key in ("num_samples", "max_concurrent", "epochs", "final_seeds", "max_failures", "search_seed"):
        if overrides.get(key) is not None:
            setattr(s, key, overrides[key])
    if overrides.get("epochs") is not None and 2 <= s.epochs < space.epochs:
        s.scheduler.grace_period = shrunk_grace_period(space.scheduler.grace_period, space.epochs, s.epochs)
    for key in ("cpus_per_trial", "gpus_per_trial"):
        if overrides.get(key) is not None:
            setattr(s.resources, key, float(overrides[key]))
    if overrides.get("schemes") is not None:
        s.search.scheme = list(overrides["schemes"])
    if overrides.get("boostlu"):
        s.search.boostlu = [False, True]
    return s.validate()

"""Search spaces: `search_spaces/<dataset>.yaml` loaded into a small typed schema.

Everything a sweep needs besides the command line lives in one YAML file per
data set: what is searched (schemes, modes, optimizers, an lr range per
optimizer, delta_rel, the LinearInit head's lr), the configurations evaluated
first, the budget (num_samples, epochs), ASHA's settings, the resources of one
trial, the fixed training settings and the number of final seeds.
`load_space` checks every key and value and raises `SpaceError` with one line
that names the key, the value and the fix, so a bad file fails before Ray or
MLflow are touched. YAML aliases are refused (a few nested ones expand to
gigabytes).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from wsml.config import DATASETS, DEFAULTS, MODES, OPTIMIZERS, SCHEMES, TrainConfig, linear_phase_defaults
from wsml.errors import ConfigError

from orchestration import trial as trial_config
from orchestration.common import SpaceError, method_name
from orchestration.paper_boostlu import PAPER_ALPHA

ROOT = Path(__file__).resolve().parent.parent
SPACES_DIR = ROOT / "search_spaces"
MAX_FILE_BYTES = 1 << 20        # a space file is a page of YAML; anything larger is a mistake
MAX_SEED = 2**32 - 1            # numpy (and so Optuna's TPE) takes seeds below 2**32

# TrainConfig fields a space may fix under `train:`; the searched ones and
# those the sweep sets itself are left out.
_SWEEP_SET = {"dataset", "epochs", "seed", "data_root", "device", *trial_config.SEARCHED}
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _SWEEP_SET)
PAPER = "paper"          # start_with keyword: each scheme's default configuration (the published code's)


@dataclass
class FloatParam:
    """A float searched either over a list of values (a grid) or a range."""

    values: list[float] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    def contains(self, v: float) -> bool:
        if self.values is not None:
            return any(math.isclose(v, x, rel_tol=1e-9) for x in self.values)
        return self.low <= v <= self.high

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


@dataclass
class Search:
    scheme: list[str]
    lr: FloatParam | dict[str, FloatParam]    # one range, or one per optimizer
    delta_rel: FloatParam | None = None       # needed when an LL scheme is searched
    mode: list[str] = field(default_factory=lambda: ["end-to-end"])
    optimizer: list[str] = field(default_factory=lambda: ["adam"])
    linear_init_lr: FloatParam | None = None  # the LinearInit head's lr; searched in linear-init groups
    boostlu: list[bool] = field(default_factory=lambda: [False])   # true: BoostLU rows too
    boostlu_alpha: FloatParam | None = None   # BoostLU's alpha, searched in its groups

    def lr_for(self, optimizer: str) -> FloatParam:
        return self.lr[optimizer] if isinstance(self.lr, dict) else self.lr

    def groups(self) -> list[Group]:
        """The groups searched each on its own (orchestration.per_scheme): scheme x mode x BoostLU."""
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
        return out


def lr_name(search: Search, optimizer: str) -> str:
    return f"lr_{optimizer}" if isinstance(search.lr, dict) else "lr"


@dataclass
class Scheduler:
    grace_period: int = 2
    reduction_factor: float = 2.0


@dataclass
class Resources:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0


@dataclass
class SweepSpace:
    dataset: str
    search: Search
    num_samples: int = 16                   # trials in all, shared evenly by the (scheme, mode) groups
    # Trials proposed and pending at once (None: num_samples). Tune keeps this many trials asking
    # for resources, so an autoscaler sees the whole demand and starts every node it needs at once.
    max_concurrent: int | None = None
    epochs: int = 10
    search_seed: int = 0                    # seeds the groups' Optuna TPE samplers
    start_with: Any = PAPER                 # "paper", "none" or a list of configurations (and "paper")
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Resources = field(default_factory=Resources)
    final_seeds: int = 3
    max_failures: int = 2
    keep_checkpoints: int = 2               # per trial; the latest is what a trial resumes from
    train: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"                # where it was read from (not a YAML key)

    # --------------------------------------------------------------- derived
    def start_points(self) -> list[dict[str, Any]]:
        """The configurations evaluated first, each {scheme, [mode], optimizer, lr, ...} in the trainer's names."""
        items = [] if self.start_with == "none" else [PAPER] if self.start_with == PAPER else self.start_with
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
            q.update({k: p[k] for k in ("delta_rel", "linear_init_lr") if k in names and k in p})
            if group.boostlu:
                alpha = p.get("boostlu_alpha", PAPER_ALPHA)
                if self.search.boostlu_alpha.contains(alpha):
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

    # ------------------------------------------------------------ validation
    def _bad(self, key: str, value: Any, fix: str) -> None:
        raise SpaceError(f"{self.source}: {key}={value!r} is invalid: {fix}")

    def validate(self) -> "SweepSpace":
        bad = self._bad
        if self.dataset not in DATASETS:
            bad("dataset", self.dataset, f"choose one of {', '.join(DATASETS)}")
        s = self.search
        for key, values, known in (("search.scheme", s.scheme, SCHEMES), ("search.mode", s.mode, MODES),
                                   ("search.optimizer", s.optimizer, OPTIMIZERS)):
            if not values:
                bad(key, values, f"list at least one of {', '.join(known)}")
            for v in values:
                if v not in known:
                    bad(key, v, f"choose among {', '.join(known)}")
            if len(set(values)) != len(values):
                bad(key, values, "list each name once")
        if isinstance(s.lr, dict):
            if set(s.lr) != set(s.optimizer):
                bad("search.lr", sorted(s.lr), f"give one range per searched optimizer ({', '.join(s.optimizer)}), "
                    "or one range for all")
            for opt, p in s.lr.items():
                self._check_param(f"search.lr.{opt}", p, lo=0.0, lo_open=True, hi=1.0,
                                  what="a learning rate: positive, at most 1")
        else:
            self._check_param("search.lr", s.lr, lo=0.0, lo_open=True, hi=1.0,
                              what="a learning rate: positive, at most 1")
        if s.delta_rel is None:
            if any(trial_config.applies("delta_rel", sc) for sc in s.scheme):
                bad("search.delta_rel", None, "give a grid (values: [...]) or a range (low, high) for the LL schemes")
        else:
            self._check_param("search.delta_rel", s.delta_rel, lo=0.0, lo_open=False, hi=100.0,
                              what="a percentage of label entries per epoch, between 0 and 100")
        if s.linear_init_lr is not None:
            self._check_param("search.linear_init_lr", s.linear_init_lr, lo=0.0, lo_open=True, hi=10.0,
                              what="a learning rate: positive")
        if not s.boostlu or len(set(s.boostlu)) != len(s.boostlu):
            bad("search.boostlu", s.boostlu, "list false (the plain head), true (BoostLU) or both, each once")
        if True in s.boostlu:
            if s.boostlu_alpha is None:
                bad("search.boostlu_alpha", None, "give BoostLU's alpha as values: [...] or low/high "
                    "(the BoostLU authors use 5)")
            self._check_param("search.boostlu_alpha", s.boostlu_alpha, lo=0.0, lo_open=True, hi=1000.0,
                              what="a positive factor for the positive class-activation values (1 = no boost)")
        for key, v, lo in (("num_samples", self.num_samples, 1), ("epochs", self.epochs, 1),
                           ("keep_checkpoints", self.keep_checkpoints, 1)):
            if v < lo:
                bad(key, v, f"use an integer >= {lo}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            bad("max_concurrent", self.max_concurrent, "use an integer >= 1 (trials pending at once), or leave it "
                "out for num_samples")
        if self.num_samples < len(s.groups()):
            bad("num_samples", self.num_samples, f"give each of the {len(s.groups())} (scheme, mode, BoostLU) groups at "
                "least one trial: raise num_samples or search fewer schemes")
        for key, v in (("final_seeds", self.final_seeds), ("max_failures", self.max_failures)):
            if v < 0:
                bad(key, v, "use an integer >= 0")
        if not 0 <= self.search_seed <= MAX_SEED:
            bad("search_seed", self.search_seed, f"use an integer from 0 to {MAX_SEED}")
        g = self.scheduler.grace_period
        if g < 2:
            bad("scheduler.grace_period", g, "use 2 or more: epoch 1 is the same for every scheme, so a grace "
                "period of 1 prunes on the learning rate alone")
        if g > self.epochs:
            bad("scheduler.grace_period", g, f"must not exceed epochs={self.epochs}: lower it or raise epochs")
        if not self.scheduler.reduction_factor > 1:
            bad("scheduler.reduction_factor", self.scheduler.reduction_factor, "use a number > 1 (2, 3 or 4)")
        r = self.resources
        if not (math.isfinite(r.cpus_per_trial) and r.cpus_per_trial > 0):
            bad("resources.cpus_per_trial", r.cpus_per_trial, "use a positive number of CPUs")
        if not (math.isfinite(r.gpus_per_trial) and r.gpus_per_trial >= 0):
            bad("resources.gpus_per_trial", r.gpus_per_trial, "use 0, a fraction such as 0.5, or a whole number")
        if r.gpus_per_trial > 1 and r.gpus_per_trial != int(r.gpus_per_trial):
            bad("resources.gpus_per_trial", r.gpus_per_trial, "fractions are allowed only below 1; above, use whole GPUs")
        self._check_train()
        self._check_start_with()
        return self

    def _check_train(self) -> None:
        for k in self.train:
            if k not in TRAIN_KEYS:
                self._bad(f"train.{k}", self.train[k], f"not a fixed training setting; known: {', '.join(TRAIN_KEYS)}")
        try:    # the trainer's own checks, before any trial runs
            TrainConfig.from_dict({"dataset": self.dataset, **self.train}).resolve()
        except (ConfigError, TypeError) as err:
            raise SpaceError(f"{self.source}: train: {err}") from None

    def _check_param(self, key: str, p: FloatParam, *, lo: float, lo_open: bool, hi: float, what: str) -> None:
        bad = self._bad

        def ok(v: float) -> bool:
            return math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi

        if p.values is not None:
            if p.low is not None or p.high is not None:
                bad(key, {"values": p.values, "low": p.low, "high": p.high}, "give either values or low/high, not both")
            if not p.values:
                bad(f"{key}.values", p.values, "list at least one value")
            for v in p.values:
                if not ok(v):
                    bad(f"{key}.values", v, what)
            return
        if p.low is None or p.high is None:
            bad(key, {"low": p.low, "high": p.high}, "give values: [...] or both low and high")
        for k in ("low", "high"):
            v = getattr(p, k)
            if not ok(v):
                bad(f"{key}.{k}", v, what)
        if not p.low < p.high:
            bad(f"{key}.low", p.low, f"must be below {key}.high={p.high!r}")

    def _check_start_with(self) -> None:
        sw = self.start_with
        if isinstance(sw, str):
            if sw not in (PAPER, "none"):
                self._bad("start_with", sw, "use paper, none or a list of configurations (and paper)")
            items = []
        elif isinstance(sw, list):
            items = sw
        else:
            self._bad("start_with", sw, "use paper, none or a list of configurations (and paper)")
        for i, p in enumerate(items):
            if p == PAPER:
                continue
            if not isinstance(p, dict):
                self._bad(f"start_with[{i}]", p, "write a mapping like {scheme: LL-R, optimizer: adam, lr: 1.0e-5, "
                          "delta_rel: 0.2}, or paper")
            self._check_point(f"start_with[{i}]", p)
        if sw == PAPER or PAPER in items:    # the defaults evaluated first must lie inside the space
            for p in self._defaults():
                self._check_point(f"start_with: {PAPER} ({p['scheme']} default)", p)

    def _check_point(self, key: str, p: dict[str, Any]) -> None:
        bad = self._bad
        s = self.search
        unknown = set(p) - {"scheme", "mode", "optimizer", "lr", "delta_rel", "linear_init_lr", "boostlu_alpha"}
        if unknown:
            raise SpaceError(f"{self.source}: {key}.{sorted(unknown)[0]} is unknown: use scheme, mode, optimizer, "
                             "lr, delta_rel, linear_init_lr, boostlu_alpha")
        if "boostlu_alpha" in p:
            alpha = _as_float(p["boostlu_alpha"])
            if True not in s.boostlu or alpha is None or not s.boostlu_alpha.contains(alpha):
                bad(f"{key}.boostlu_alpha", p["boostlu_alpha"], "it must lie in search.boostlu_alpha, with true in "
                    "search.boostlu")
            p["boostlu_alpha"] = alpha
        if p.get("scheme") not in SCHEMES:
            bad(f"{key}.scheme", p.get("scheme"), f"choose among {', '.join(SCHEMES)}")
        if "mode" in p and p["mode"] not in s.mode:
            bad(f"{key}.mode", p["mode"], f"choose among search.mode={s.mode}")
        optimizer = p.setdefault("optimizer", s.optimizer[0])
        if optimizer not in s.optimizer:
            bad(f"{key}.optimizer", optimizer, f"choose among search.optimizer={s.optimizer}")
        ranges = {"lr": s.lr_for(optimizer), "delta_rel": s.delta_rel, "linear_init_lr": s.linear_init_lr}
        for name, param in ranges.items():
            if not trial_config.applies(name, p["scheme"], p.get("mode", s.mode[0])) or param is None:
                p.pop(name, None)       # means nothing to this scheme / mode, or is not searched
                continue
            if name not in p:
                if name == "linear_init_lr":
                    continue            # the group's default is used
                raise SpaceError(f"{self.source}: {key}.{name} is missing: give a value inside search.{name}")
            v = _as_float(p[name])
            where = f"search.lr.{optimizer}" if name == "lr" and isinstance(s.lr, dict) else f"search.{name}"
            if v is None or not param.contains(v):
                bad(f"{key}.{name}", p[name], f"it must lie in {where}={param.describe()}: widen the range "
                    "or change the start point")
            p[name] = v


# ---------------------------------------------------------------- building
def _as_float(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):      # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _convert(value: Any, typ: Any, key: str, source: str) -> Any:
    def bad(fix: str) -> None:
        raise SpaceError(f"{source}: {key}={value!r} is invalid: {fix}")

    if typ == "lr":          # one range, or a mapping optimizer -> range
        if isinstance(value, dict) and value and set(value) <= set(OPTIMIZERS):
            return {opt: _convert(v, FloatParam, f"{key}.{opt}", source) for opt, v in value.items()}
        return _convert(value, FloatParam, key, source)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            bad(f"write a mapping with keys {', '.join(f.name for f in dataclasses.fields(typ))}")
        return _build(typ, value, key + ".", source)
    if typ == "float":
        f = _as_float(value)
        if f is None:
            bad("write a number")
        return f
    if typ == "int":
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            bad("write a whole number")
        return int(value)
    if typ == "bool":
        if not isinstance(value, bool):
            bad("write true or false")
        return value
    if typ == "str":
        if not isinstance(value, str):
            bad("write a string")
        return value
    if typ in ("list[str]", "list[bool]"):
        kind, what = (str, "names") if typ == "list[str]" else (bool, "true/false")
        if isinstance(value, kind):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
            bad(f"write a list of {what}")
        return list(value)
    if typ == "list[float]":
        if not isinstance(value, list):
            bad("write a list of numbers")
        out = [_as_float(v) for v in value]
        if any(v is None for v in out):
            bad("write a list of numbers")
        return out
    if typ == "dict":
        if not isinstance(value, dict):
            bad("write a mapping")
        return dict(value)
    return value


_TYPES = {
    FloatParam: {"values": "list[float]", "low": "float", "high": "float", "log": "bool"},
    Search: {"scheme": "list[str]", "lr": "lr", "delta_rel": FloatParam, "mode": "list[str]",
             "optimizer": "list[str]", "linear_init_lr": FloatParam, "boostlu": "list[bool]",
             "boostlu_alpha": FloatParam},
    Scheduler: {"grace_period": "int", "reduction_factor": "float"},
    Resources: {"cpus_per_trial": "float", "gpus_per_trial": "float"},
    SweepSpace: {"dataset": "str", "search": Search, "num_samples": "int", "max_concurrent": "int", "epochs": "int",
                 "search_seed": "int", "start_with": "any", "scheduler": Scheduler, "resources": Resources,
                 "final_seeds": "int", "max_failures": "int", "keep_checkpoints": "int", "train": "dict"},
}


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    types = _TYPES[cls]
    for k in data:
        if k not in types:
            raise SpaceError(f"{source}: {prefix}{k} is an unknown key: known keys here are {', '.join(types)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name in types]
    for k in required:
        if k not in data:
            raise SpaceError(f"{source}: {prefix}{k} is missing: add it")
    kwargs = {}
    for k, v in data.items():
        if v is None and k in ("delta_rel", "values", "low", "high", "linear_init_lr", "boostlu_alpha",
                               "max_concurrent"):
            kwargs[k] = None
            continue
        kwargs[k] = _convert(v, types[k], prefix + k, source)
    return cls(**kwargs)


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
        data = yaml.load(p.read_text(errors="replace"), Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpaceError(f"{source}: malformed YAML{where}: {problem}; fix the syntax") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: expected a mapping of keys (dataset, search, ...), found {type(data).__name__}")
    space = _build(SweepSpace, data, "", source)
    space.source = source
    if space.dataset != dataset:
        raise SpaceError(f"{source}: dataset={space.dataset!r} is invalid: this file is for --dataset {dataset}; "
                         f"set dataset: {dataset} or pass the right --space")
    return space.validate()


def space_from_dict(data: dict[str, Any]) -> SweepSpace:
    """A space saved with `SweepSpace.to_dict` (the sweep record), validated again."""
    data = dict(data)
    source = data.pop("source", "<record>")
    space = _build(SweepSpace, data, "", source)
    space.source = source
    return space.validate()


def with_overrides(space: SweepSpace, **overrides: Any) -> SweepSpace:
    """Apply command-line overrides (None = keep) and validate again.

    Keys: num_samples, max_concurrent, epochs, cpus_per_trial, gpus_per_trial, final_seeds,
    max_failures, search_seed, schemes (list of scheme names), boostlu (True: BoostLU rows too).
    An `epochs` below the grace period (and at least 2) lowers the grace period to it.
    """
    s = dataclasses.replace(space, search=dataclasses.replace(space.search),
                            scheduler=dataclasses.replace(space.scheduler),
                            resources=dataclasses.replace(space.resources), train=dict(space.train))
    s.source = space.source + " + command line"
    for key in ("num_samples", "max_concurrent", "epochs", "final_seeds", "max_failures", "search_seed"):
        if overrides.get(key) is not None:
            setattr(s, key, overrides[key])
    if overrides.get("epochs") is not None and 2 <= s.epochs < s.scheduler.grace_period:
        s.scheduler.grace_period = s.epochs     # fewer epochs than the grace period: ASHA's one rung is the end
    for key in ("cpus_per_trial", "gpus_per_trial"):
        if overrides.get(key) is not None:
            setattr(s.resources, key, float(overrides[key]))
    if overrides.get("schemes") is not None:
        s.search.scheme = list(overrides["schemes"])
    if overrides.get("boostlu"):
        s.search.boostlu = [False, True]
    return s.validate()

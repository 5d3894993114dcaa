"""Search spaces: `search_spaces/<dataset>.yaml` loaded into a small typed schema.

Everything a sweep needs besides the command line lives in one YAML file per
data set: the space Optuna searches (scheme, mode, delta_rel, lr), the paper's
defaults to evaluate first, the budget (num_samples, epochs), ASHA's settings,
the resources of one trial and the number of final seeds. `load_space` checks
every key and value and raises `SpaceError` with one line that names the key,
the value and the fix, so a bad file fails before Ray or MLflow are touched.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsml.config import DATASETS, DEFAULTS, LL_SCHEMES, MODES, SCHEMES, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
SPACES_DIR = ROOT / "search_spaces"

# TrainConfig fields a space may fix under `train:`; the searched ones and
# those the sweep sets itself are left out.
_SWEEP_SET = {"dataset", "scheme", "delta_rel", "lr", "mode", "epochs", "seed", "data_root", "device"}
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _SWEEP_SET)


class SpaceError(ValueError):
    """A search-space file or an override is invalid (one-line message)."""


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


@dataclass
class Search:
    scheme: list[str]
    lr: FloatParam
    delta_rel: FloatParam | None = None     # needed when an LL scheme is searched
    mode: list[str] = field(default_factory=lambda: ["end-to-end"])


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
    num_samples: int = 16
    epochs: int = 10
    search_seed: int = 0                    # seeds Optuna's TPE sampler
    start_with: Any = "paper"               # "paper", "none" or a list of configurations
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Resources = field(default_factory=Resources)
    final_seeds: int = 3
    max_failures: int = 2
    keep_checkpoints: int = 2               # per trial; the latest is what a trial resumes from
    train: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"                # where it was read from (not a YAML key)

    # --------------------------------------------------------------- derived
    def start_points(self) -> list[dict[str, Any]]:
        """The configurations evaluated first (`points_to_evaluate`)."""
        if self.start_with == "none":
            return []
        if self.start_with == "paper":
            d = DEFAULTS[self.dataset]
            points = []
            for scheme in self.search.scheme:
                p: dict[str, Any] = {"scheme": scheme}
                if len(self.search.mode) > 1:
                    p["mode"] = self.search.mode[0]
                if scheme in LL_SCHEMES:
                    p["delta_rel"] = d.delta_rel
                p["lr"] = d.lr
                points.append(p)
            return points
        return [dict(p) for p in self.start_with if p["scheme"] in self.search.scheme]

    def summary(self) -> dict[str, str]:
        """Flat, human-readable description (MLflow params of the sweep run)."""
        s = self.search
        out = {
            "space.scheme": ",".join(s.scheme),
            "space.mode": ",".join(s.mode),
            "space.lr": s.lr.describe(),
            "space.delta_rel": s.delta_rel.describe() if s.delta_rel else "-",
            "space.file": self.source,
            "num_samples": str(self.num_samples),
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
    def validate(self) -> "SweepSpace":
        def bad(key: str, value: Any, fix: str) -> None:
            raise SpaceError(f"{self.source}: {key}={value!r} is invalid: {fix}")

        if self.dataset not in DATASETS:
            bad("dataset", self.dataset, f"choose one of {', '.join(DATASETS)}")
        s = self.search
        if not s.scheme:
            bad("search.scheme", s.scheme, "list at least one scheme")
        for sc in s.scheme:
            if sc not in SCHEMES:
                bad("search.scheme", sc, f"choose among {', '.join(SCHEMES)}")
        if len(set(s.scheme)) != len(s.scheme):
            bad("search.scheme", s.scheme, "list each scheme once")
        if not s.mode:
            bad("search.mode", s.mode, "list at least one mode")
        for m in s.mode:
            if m not in MODES:
                bad("search.mode", m, f"choose among {', '.join(MODES)}")
        self._check_param("search.lr", s.lr, lo=0.0, lo_open=True, hi=1.0,
                          what="a learning rate: positive, at most 1")
        if s.delta_rel is None:
            if any(sc in LL_SCHEMES for sc in s.scheme):
                bad("search.delta_rel", None, "give a grid (values: [...]) or a range (low, high) for the LL schemes")
        else:
            self._check_param("search.delta_rel", s.delta_rel, lo=0.0, lo_open=False, hi=100.0,
                              what="a percentage of label entries per epoch, between 0 and 100")
        for key, v, lo in (("num_samples", self.num_samples, 1), ("epochs", self.epochs, 1),
                           ("keep_checkpoints", self.keep_checkpoints, 1)):
            if v < lo:
                bad(key, v, f"use an integer >= {lo}")
        for key, v in (("final_seeds", self.final_seeds), ("max_failures", self.max_failures),
                       ("search_seed", self.search_seed)):
            if v < 0:
                bad(key, v, "use an integer >= 0")
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
        for k in self.train:
            if k not in TRAIN_KEYS:
                bad(f"train.{k}", self.train[k], f"not a fixed training setting; known: {', '.join(TRAIN_KEYS)}")
        self._check_start_with()
        return self

    def _check_param(self, key: str, p: FloatParam, *, lo: float, lo_open: bool, hi: float, what: str) -> None:
        def ok(v: float) -> bool:
            return math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi

        def bad(k: str, v: Any, fix: str) -> None:
            raise SpaceError(f"{self.source}: {k}={v!r} is invalid: {fix}")

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
            if sw not in ("paper", "none"):
                raise SpaceError(f"{self.source}: start_with={sw!r} is invalid: use paper, none or a list of configurations")
            if sw == "paper":
                d = DEFAULTS[self.dataset]
                if not self.search.lr.contains(d.lr):
                    raise SpaceError(f"{self.source}: search.lr={self.search.lr.describe()} is invalid: it must contain "
                                     f"the default lr {d.lr:g} evaluated first (start_with: paper); widen it or set start_with")
                if (self.search.delta_rel is not None and any(s in LL_SCHEMES for s in self.search.scheme)
                        and not self.search.delta_rel.contains(d.delta_rel)):
                    raise SpaceError(f"{self.source}: search.delta_rel={self.search.delta_rel.describe()} is invalid: it must "
                                     f"contain the default delta_rel {d.delta_rel:g} (start_with: paper); widen it or set start_with")
            return
        if not isinstance(sw, list):
            raise SpaceError(f"{self.source}: start_with={sw!r} is invalid: use paper, none or a list of configurations")
        for i, p in enumerate(sw):
            key = f"start_with[{i}]"
            if not isinstance(p, dict):
                raise SpaceError(f"{self.source}: {key}={p!r} is invalid: write a mapping like {{scheme: LL-R, delta_rel: 0.2, lr: 1.0e-5}}")
            unknown = set(p) - {"scheme", "delta_rel", "lr", "mode"}
            if unknown:
                raise SpaceError(f"{self.source}: {key}.{sorted(unknown)[0]} is unknown: use scheme, delta_rel, lr, mode")
            if p.get("scheme") not in SCHEMES:
                raise SpaceError(f"{self.source}: {key}.scheme={p.get('scheme')!r} is invalid: choose among {', '.join(SCHEMES)}")
            for name, param in (("lr", self.search.lr), ("delta_rel", self.search.delta_rel)):
                if name == "delta_rel" and p["scheme"] not in LL_SCHEMES:
                    p.pop("delta_rel", None)
                    continue
                if name not in p:
                    raise SpaceError(f"{self.source}: {key}.{name} is missing: give a value inside search.{name}")
                v = _as_float(p[name])
                if v is None or param is None or not param.contains(v):
                    raise SpaceError(f"{self.source}: {key}.{name}={p[name]!r} is invalid: it must lie in search.{name}="
                                     f"{param.describe() if param else None}")
                p[name] = v
            if "mode" in p and p["mode"] not in self.search.mode:
                raise SpaceError(f"{self.source}: {key}.mode={p['mode']!r} is invalid: choose among search.mode={self.search.mode}")


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
    if typ == "list[str]":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            bad("write a list of names")
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
    Search: {"scheme": "list[str]", "lr": FloatParam, "delta_rel": FloatParam, "mode": "list[str]"},
    Scheduler: {"grace_period": "int", "reduction_factor": "float"},
    Resources: {"cpus_per_trial": "float", "gpus_per_trial": "float"},
    SweepSpace: {"dataset": "str", "search": Search, "num_samples": "int", "epochs": "int",
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
        if v is None and k in ("delta_rel", "values", "low", "high"):
            kwargs[k] = None
            continue
        kwargs[k] = _convert(v, types[k], prefix + k, source)
    return cls(**kwargs)


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
    try:
        data = yaml.safe_load(p.read_text())
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


def with_overrides(space: SweepSpace, **overrides: Any) -> SweepSpace:
    """Apply command-line overrides (None = keep) and validate again.

    Keys: num_samples, epochs, cpus_per_trial, gpus_per_trial, final_seeds,
    max_failures, schemes (list of scheme names).
    """
    s = dataclasses.replace(space, search=dataclasses.replace(space.search),
                            scheduler=dataclasses.replace(space.scheduler),
                            resources=dataclasses.replace(space.resources), train=dict(space.train))
    s.source = space.source + " + command line"
    for key in ("num_samples", "epochs", "final_seeds", "max_failures"):
        if overrides.get(key) is not None:
            setattr(s, key, overrides[key])
    for key in ("cpus_per_trial", "gpus_per_trial"):
        if overrides.get(key) is not None:
            setattr(s.resources, key, float(overrides[key]))
    if overrides.get("schemes") is not None:
        s.search.scheme = list(overrides["schemes"])
    return s.validate()


@dataclass
class OptunaSpace:
    """Define-by-run space for `OptunaSearch`: delta_rel is searched only for the LL schemes.

    A plain class (not a closure) so that Ray can pickle it with the searcher's
    state and `--resume` can restore it.
    """

    schemes: list[str]
    modes: list[str]
    lr: FloatParam
    delta_rel: FloatParam | None

    @classmethod
    def of(cls, space: SweepSpace) -> "OptunaSpace":
        s = space.search
        return cls(list(s.scheme), list(s.mode), s.lr, s.delta_rel)

    @staticmethod
    def _suggest(trial: Any, name: str, p: FloatParam) -> float:
        if p.values is not None:
            return trial.suggest_categorical(name, list(p.values))
        return trial.suggest_float(name, p.low, p.high, log=p.log)

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        scheme = trial.suggest_categorical("scheme", list(self.schemes))
        constants: dict[str, Any] = {}
        if len(self.modes) > 1:
            trial.suggest_categorical("mode", list(self.modes))
        else:
            constants["mode"] = self.modes[0]
        if scheme in LL_SCHEMES:
            self._suggest(trial, "delta_rel", self.delta_rel)
        self._suggest(trial, "lr", self.lr)
        return constants or None

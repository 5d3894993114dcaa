"""The checks of a space file: pydantic's type errors as one line naming the key, the value and the fix
(`one_line`), and a space's values against each other and against the trainer's own checks
(`validate`, as `SweepSpace.validate`). Each raises `SpaceError`."""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic_core import ErrorDetails

from wsml import schemes
from wsml.config import DATASETS, MODES, OPTIMIZERS, SCHEMES, TrainConfig
from wsml.errors import ConfigError

from orchestration import trial as trial_config
from orchestration.common import SpaceError

if TYPE_CHECKING:
    from orchestration.search.space import FloatParam, SweepSpace

MAX_SEED = 2**32 - 1            # numpy (and so Optuna's TPE) takes seeds below 2**32
# TrainConfig fields a space may fix under `train:`; the searched ones and
# those the sweep sets itself are left out.
_SWEEP_SET = {"dataset", "epochs", "seed", "data_root", "device", "scheme_params", *trial_config.SEARCHED}
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _SWEEP_SET)
PAPER = "paper"          # start_with keyword: each scheme's default configuration (the published code's)
LR_TAGS = ("range", "per_optimizer")     # the two forms of search.lr (orchestration.search.space.Lr)

# What the file should hold instead, by pydantic's error type.
_FIXES = {"int_type": "write a whole number", "int_parsing": "write a whole number",
          "int_from_float": "write a whole number", "float_type": "write a number", "float_parsing": "write a number",
          "bool_type": "write true or false", "bool_parsing": "write true or false", "string_type": "write a string",
          "list_type": "write a list", "dict_type": "write a mapping", "finite_number": "write a finite number"}

def keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "source"]


def one_line(e: ErrorDetails, source: str, sections: dict[str, type]) -> str:
    """pydantic's error `e` as one line naming the key, the value and the fix (`sections`: the dataclass of
    each mapping of the file, by its key)."""
    # pydantic's location also names union members and validators: keep the file's keys and list indexes
    names = {name for cls in sections.values() for name in keys(cls)} | set(OPTIMIZERS) | set(SCHEMES) \
        | set(schemes.hyper_names())
    loc = [p for i, p in enumerate(e["loc"]) if isinstance(p, int) or p in names
           or (i == len(e["loc"]) - 1 and p not in LR_TAGS)]
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    parent = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
    kind = e["type"]
    if kind == "missing":
        return f"{source}: {key} is missing: add it"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        known = keys(sections[parent]) if parent in sections else []
        return f"{source}: {key} is an unknown key: known keys here are {', '.join(known)}"
    if kind in ("dataclass_type", "dataclass_args_type", "model_type", "dict_type") and key in sections:
        fix = f"write a mapping with keys {', '.join(keys(sections[key]))}"
    else:
        fix = _FIXES.get(kind) or e["msg"]
    return f"{source}: {key}={e['input']!r} is invalid: {fix}"


def as_float(v: Any) -> float | None:
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


def _bad(space: SweepSpace, key: str, value: Any, fix: str) -> NoReturn:
    raise SpaceError(f"{space.source}: {key}={value!r} is invalid: {fix}")

def validate(space: SweepSpace) -> SweepSpace:
    """`space` (checked), or `SpaceError` naming the first key whose value is out of range or inconsistent."""
    if space.dataset not in DATASETS:
        _bad(space, "dataset", space.dataset, f"choose one of {', '.join(DATASETS)}")
    s = space.search
    for key, values, known in (("search.scheme", s.scheme, SCHEMES), ("search.mode", s.mode, MODES),
                               ("search.optimizer", s.optimizer, OPTIMIZERS)):
        if not values:
            _bad(space, key, values, f"list at least one of {', '.join(known)}")
        for v in values:
            if v not in known:
                _bad(space, key, v, f"choose among {', '.join(known)}")
        if len(set(values)) != len(values):
            _bad(space, key, values, "list each name once")
    if isinstance(s.lr, dict):
        if set(s.lr) != set(s.optimizer):
            _bad(space, "search.lr", sorted(s.lr), f"give one range per searched optimizer ({', '.join(s.optimizer)}), "
                "or one range for all")
        for opt, p in s.lr.items():
            _check_param(space, f"search.lr.{opt}", p, lo=0.0, lo_open=True, hi=1.0,
                              what="a learning rate: positive, at most 1")
    else:
        _check_param(space, "search.lr", s.lr, lo=0.0, lo_open=True, hi=1.0,
                          what="a learning rate: positive, at most 1")
    if s.delta_rel is None:
        if any(trial_config.applies("delta_rel", sc) for sc in s.scheme):
            _bad(space, "search.delta_rel", None, "give a grid (values: [...]) or a range (low, high) for the LL schemes")
    else:
        _check_param(space, "search.delta_rel", s.delta_rel, lo=0.0, lo_open=False, hi=100.0,
                          what="a percentage of label entries per epoch, between 0 and 100")
    if s.linear_init_lr is not None:
        _check_param(space, "search.linear_init_lr", s.linear_init_lr, lo=0.0, lo_open=True, hi=10.0,
                          what="a learning rate: positive")
    _check_scheme_params(space)
    if not s.boostlu or len(set(s.boostlu)) != len(s.boostlu):
        _bad(space, "search.boostlu", s.boostlu, "list false (the plain head), true (BoostLU) or both, each once")
    if True in s.boostlu:
        if s.boostlu_alpha is None:
            _bad(space, "search.boostlu_alpha", None, "give BoostLU's alpha as values: [...] or low/high "
                "(the BoostLU authors use 5)")
        _check_param(space, "search.boostlu_alpha", s.boostlu_alpha, lo=0.0, lo_open=True, hi=1000.0,
                          what="a positive factor for the positive class-activation values (1 = no boost)")
    for key, count, lo in (("num_samples", space.num_samples, 1), ("epochs", space.epochs, 1),
                           ("keep_checkpoints", space.keep_checkpoints, 1)):
        if count < lo:
            _bad(space, key, count, f"use an integer >= {lo}")
    if space.max_concurrent is not None and space.max_concurrent < 1:
        _bad(space, "max_concurrent", space.max_concurrent, "use an integer >= 1 (trials pending at once), or leave it "
            "out for num_samples")
    if space.num_samples < len(s.groups()):
        _bad(space, "num_samples", space.num_samples, f"give each of the {len(s.groups())} (scheme, mode, BoostLU) groups at "
            "least one trial: raise num_samples or search fewer schemes")
    for key, count in (("final_seeds", space.final_seeds), ("max_failures", space.max_failures)):
        if count < 0:
            _bad(space, key, count, "use an integer >= 0")
    if not 0 <= space.search_seed <= MAX_SEED:
        _bad(space, "search_seed", space.search_seed, f"use an integer from 0 to {MAX_SEED}")
    g = space.scheduler.grace_period
    if g < 2:
        _bad(space, "scheduler.grace_period", g, "use 2 or more: epoch 1 is the same for every scheme, so a grace "
            "period of 1 prunes on the learning rate alone")
    if g > space.epochs:
        _bad(space, "scheduler.grace_period", g, f"must not exceed epochs={space.epochs}: lower it or raise epochs")
    if not space.scheduler.reduction_factor > 1:
        _bad(space, "scheduler.reduction_factor", space.scheduler.reduction_factor, "use a number > 1 (2, 3 or 4)")
    r = space.resources
    if not (math.isfinite(r.cpus_per_trial) and r.cpus_per_trial > 0):
        _bad(space, "resources.cpus_per_trial", r.cpus_per_trial, "use a positive number of CPUs")
    if not (math.isfinite(r.gpus_per_trial) and r.gpus_per_trial >= 0):
        _bad(space, "resources.gpus_per_trial", r.gpus_per_trial, "use 0, a fraction such as 0.5, or a whole number")
    if r.gpus_per_trial > 1 and r.gpus_per_trial != int(r.gpus_per_trial):
        _bad(space, "resources.gpus_per_trial", r.gpus_per_trial, "fractions are allowed only below 1; above, use whole GPUs")
    _check_train(space, )
    _check_start_with(space, )
    return space

def _check_scheme_params(space: SweepSpace) -> None:
    """search.scheme_params: per scheme, ranges of its own hyper-parameters (wsml/schemes.py) within their valid
    values (an integer one as a list of whole numbers; a searched scheme's warm-up below the space's epochs)."""
    for scheme, params in space.search.scheme_params.items():
        if scheme not in SCHEMES:
            _bad(space, "search.scheme_params", scheme, f"name a scheme among {', '.join(SCHEMES)}")
        own = [h.name for h in schemes.REGISTRY[scheme].hypers if h.name != "delta_rel"]
        for name, p in params.items():
            key = f"search.scheme_params.{scheme}.{name}"
            if name not in own:
                _bad(space, key, name, f"not a hyper-parameter of {scheme}: its own are {', '.join(own) or 'none'}"
                     + (" (delta_rel: search.delta_rel)" if name == "delta_rel" else ""))
            h = schemes.hyper(name)
            if (p.values is None) == (p.low is None or p.high is None) or (p.values is not None and p.low is not None):
                _bad(space, key, dataclasses.asdict(p), "give either values: [...] or both low and high")
            if h.integer and p.values is None:
                _bad(space, key, dataclasses.asdict(p), "a whole number: list the values, e.g. values: [2, 3, 4]")
            ends = [v for v in (p.values if p.values is not None else [p.low, p.high]) if v is not None]
            for v in ends:
                # the epochs bound APL's warm-up only where the scheme is searched (a shorter sweep of others)
                epochs = space.epochs if scheme in space.search.scheme else None
                why = h.invalid(int(v) if h.integer and v.is_integer() else v, epochs)
                if why:
                    _bad(space, key, v, why + (": lower it or raise epochs" if h.below_epochs else ""))
            if p.values is None and not ends[0] < ends[1]:
                _bad(space, f"{key}.low", p.low, f"must be below {key}.high={p.high!r}")


def _check_train(space: SweepSpace) -> None:
    for k in space.train:
        if k not in TRAIN_KEYS:
            _bad(space, f"train.{k}", space.train[k], f"not a fixed training setting; known: {', '.join(TRAIN_KEYS)}")
    try:    # the trainer's own checks, before any trial runs
        TrainConfig.from_dict({"dataset": space.dataset, **space.train}).resolve()
    except (ConfigError, TypeError) as err:
        raise SpaceError(f"{space.source}: train: {err}") from None
    for scheme in space.search.scheme:      # each scheme's defaults with the space's epochs (APL's warm-up)
        try:
            TrainConfig.from_dict({"dataset": space.dataset, **space.train, "scheme": scheme,
                                   "epochs": space.epochs}).resolve()
        except (ConfigError, TypeError) as err:
            raise SpaceError(f"{space.source}: search.scheme {scheme} with epochs={space.epochs}: {err}; raise epochs "
                             f"or search the setting in search.scheme_params.{scheme}") from None

def _check_param(space: SweepSpace, key: str, p: FloatParam, *, lo: float, lo_open: bool, hi: float, what: str) -> None:

    def ok(v: float) -> bool:
        return math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi

    if p.values is not None:
        if p.low is not None or p.high is not None:
            _bad(space, key, {"values": p.values, "low": p.low, "high": p.high}, "give either values or low/high, not both")
        if not p.values:
            _bad(space, f"{key}.values", p.values, "list at least one value")
        for v in p.values:
            if not ok(v):
                _bad(space, f"{key}.values", v, what)
        return
    if p.low is None or p.high is None:
        _bad(space, key, {"low": p.low, "high": p.high}, "give values: [...] or both low and high")
    for k in ("low", "high"):
        v = getattr(p, k)
        if not ok(v):
            _bad(space, f"{key}.{k}", v, what)
    if not p.low < p.high:
        _bad(space, f"{key}.low", p.low, f"must be below {key}.high={p.high!r}")

def _check_start_with(space: SweepSpace) -> None:
    sw = space.start_with
    if isinstance(sw, str):
        if sw not in (PAPER, "none"):
            _bad(space, "start_with", sw, "use paper, none or a list of configurations (and paper)")
        items = []
    elif isinstance(sw, list):
        items = sw
    else:
        _bad(space, "start_with", sw, "use paper, none or a list of configurations (and paper)")
    for i, p in enumerate(items):
        if p == PAPER:
            continue
        if not isinstance(p, dict):
            _bad(space, f"start_with[{i}]", p, "write a mapping like {scheme: LL-R, optimizer: adam, lr: 1.0e-5, "
                      "delta_rel: 0.2}, or paper")
        _check_point(space, f"start_with[{i}]", p)
    if sw == PAPER or PAPER in items:    # the defaults evaluated first must lie inside the space
        for p in space._defaults():
            _check_point(space, f"start_with: {PAPER} ({p['scheme']} default)", p)

def _check_point(space: SweepSpace, key: str, p: dict[str, Any]) -> None:
    s = space.search
    unknown = set(p) - {"scheme", "mode", "optimizer", "lr", "delta_rel", "linear_init_lr", "boostlu_alpha",
                        *schemes.hyper_names()}
    if unknown:
        raise SpaceError(f"{space.source}: {key}.{sorted(unknown)[0]} is unknown: use scheme, mode, optimizer, "
                         "lr, delta_rel, linear_init_lr, boostlu_alpha or the scheme's own hyper-parameters")
    if "boostlu_alpha" in p:
        alpha = as_float(p["boostlu_alpha"])
        if True not in s.boostlu or s.boostlu_alpha is None or alpha is None or not s.boostlu_alpha.contains(alpha):
            _bad(space, f"{key}.boostlu_alpha", p["boostlu_alpha"], "it must lie in search.boostlu_alpha, with true in "
                "search.boostlu")
        p["boostlu_alpha"] = alpha
    if p.get("scheme") not in SCHEMES:
        _bad(space, f"{key}.scheme", p.get("scheme"), f"choose among {', '.join(SCHEMES)}")
    if "mode" in p and p["mode"] not in s.mode:
        _bad(space, f"{key}.mode", p["mode"], f"choose among search.mode={s.mode}")
    optimizer = p.setdefault("optimizer", s.optimizer[0])
    if optimizer not in s.optimizer:
        _bad(space, f"{key}.optimizer", optimizer, f"choose among search.optimizer={s.optimizer}")
    ranges = {"lr": s.lr_for(optimizer), "delta_rel": s.delta_rel, "linear_init_lr": s.linear_init_lr}
    for name in schemes.hyper_names(with_dataset_defaults=False):      # the methods' own, where searched
        ranges[name] = s.scheme_params.get(p["scheme"], {}).get(name)
        if ranges[name] is not None and name not in p:                 # not given: the published default
            p[name] = schemes.hyper(name).default(space.dataset)
    for name, param in ranges.items():
        if not trial_config.applies(name, p["scheme"], p.get("mode", s.mode[0])) or param is None:
            p.pop(name, None)       # means nothing to this scheme / mode, or is not searched
            continue
        if name not in p:
            if name == "linear_init_lr":
                continue            # the group's default is used
            raise SpaceError(f"{space.source}: {key}.{name} is missing: give a value inside search.{name}")
        v = as_float(p[name])
        where = (f"search.lr.{optimizer}" if name == "lr" and isinstance(s.lr, dict) else f"search.{name}"
                 if name in ("lr", "delta_rel", "linear_init_lr") else f"search.scheme_params.{p['scheme']}.{name}")
        if v is None or not param.contains(v):
            _bad(space, f"{key}.{name}", p[name], f"it must lie in {where}={param.describe()}: widen the range "
                "or change the start point")
        p[name] = int(v) if name in schemes.hyper_names() and schemes.hyper(name).integer else v

"""The trial config: what one trial trains, in one place.

A Tune trial's config dict holds

* the searched values at top level (`scheme`, `mode`, `delta_rel`, `lr`, a
  method's own hyper-parameters such as `em_alpha`), as Optuna proposes them
  (a search trial);
* the sweep's constants at top level (`dataset`, `epochs`, `seed`, `device`,
  `data_root`), `wsml_sweep` (the sweep's name) and `wsml_data` (the identity of
  the data the driver planned the sweep on, `wsml.data.loading.data_id`, which
  the trainable passes on to the trainer to refuse any other);
* the space file's fixed training settings under `train`;
* for a final rerun, the chosen configuration and its seed under `point`
  (with `wsml_source_trial`, the search trial it reruns).

`Trial.parse` reads such a dict once into a typed `Trial`: one flat dict of
TrainConfig fields (`point` over the searched values over `train` over the
constants) without what does not apply to the trial's scheme (`applies`:
`delta_rel` means something only to the large-loss schemes), its data's
identity and whether it is a final rerun (the scheme registry, wsml/schemes.py,
says which hyper-parameter belongs to which scheme). Everything downstream reads a trial
through it: the trainable (`train_config`), the MLflow logger (`params`,
`point`), warm start (`params`), the final stage (`point`, `final_point`), the
trial folders (`dirname`) and the benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wsml import schemes
from wsml.config import OPTIMIZERS, TrainConfig, flat

from orchestration.common import PARAM_DATA, method_name, redact

# Values a sweep may search (the order in which they are shown): then every method's own hyper-parameters
# (the registry's, wsml/schemes.py; a space file's `search.scheme_params`).
METHOD_PARAMS = tuple(n for n in schemes.hyper_names() if n != "delta_rel")
SEARCHED = ("scheme", "mode", "optimizer", "delta_rel", "lr", "linear_init_lr", "boostlu_alpha", *METHOD_PARAMS)
# Searched values that are whole numbers (Optuna proposes a list's values as floats)
_INTEGER = frozenset(n for n in schemes.hyper_names() if schemes.hyper(n).integer)
# Keys of a trial's config that are not TrainConfig fields.
DATA_KEY = "wsml_data"
_META = ("wsml_sweep", "wsml_source_trial", "point", "train", DATA_KEY)
# Optuna's names of an lr searched with one range per optimizer (orchestration.search.space): the
# proposal carries the value as `lr` too.
_OPTUNA_ONLY = {f"lr_{o}" for o in OPTIMIZERS}
# TrainConfig fields not logged as params: machine-specific paths.
_NOT_PARAMS = ("data_root", "cache_dir")


def applies(name: str, scheme: str, mode: str = "end-to-end") -> bool:
    """Whether the searched value `name` means something to a trial of `scheme` in `mode`: a scheme's
    hyper-parameter (delta_rel, em_alpha, ...) to that scheme only (the registry)."""
    if name in schemes.hyper_names():
        return schemes.applies(name, scheme)
    if name == "linear_init_lr":
        return mode == "linear-init"
    return True


def base_config(*, dataset: str, epochs: int, train: dict[str, Any], sweep: str, data_root: str | None,
                cache_dir: str, data_id: str | None = None) -> dict[str, Any]:
    """A sweep's constants: Tune's param_space before the searched values are added. `data_id`: the
    identity of the data (None: not known where the driver runs)."""
    base = {"dataset": dataset, "epochs": epochs, "seed": 0, "device": "auto", "data_root": data_root,
            "train": {"cache_dir": cache_dir, **train}, "wsml_sweep": sweep}
    if data_id is not None:
        base[DATA_KEY] = data_id
    return base


@dataclass(frozen=True)
class Trial:
    """One trial, parsed once from Tune's config dict (its layout: the module docstring).

    `values` is the trial's training configuration as one flat dict of TrainConfig fields, without what
    does not apply to its scheme.
    """

    values: dict[str, Any]
    sweep: str | None = None
    data_id: str | None = None          # the identity of the data it is planned on; None: not known
    final: bool = False                 # a final-seed rerun of a search trial
    source_trial: str | None = None     # ... that search trial

    @classmethod
    def parse(cls, config: dict[str, Any]) -> Trial:
        values = {k: v for k, v in config.items() if k not in _META and k not in _OPTUNA_ONLY}
        values.update(config.get("train") or {})
        point = config.get("point") or {}
        values.update({k: v for k, v in point.items() if k not in _META})
        return cls(values=_applying(values), sweep=config.get("wsml_sweep"), data_id=config.get(DATA_KEY),
                   final="point" in config, source_trial=point.get("wsml_source_trial"))

    def train_config(self) -> TrainConfig:
        """The trial's `TrainConfig`, resolved and validated (the trainer's own checks)."""
        return TrainConfig.from_dict(self.values).resolve()

    def params(self) -> dict[str, str]:
        """Its MLflow params: the whole training config (redacted, paths left out), the identity of its
        data (`data_fingerprint`) and the search trial a final run reruns."""
        try:
            values = _applying(flat(self.train_config().to_dict()))
        except Exception:  # noqa: BLE001 - a config the trainer refuses: log what it says; the trial reports why
            values = dict(self.values)
        out = {k: redact(str(v)) for k, v in values.items() if k not in _NOT_PARAMS}
        if self.data_id:
            out[PARAM_DATA] = str(self.data_id)
        if self.source_trial:
            out["source_trial"] = str(self.source_trial)
        return out

    @property
    def point(self) -> Point:
        v = self.values
        searched = {k: v[k] for k in SEARCHED[2:] if v.get(k) is not None}
        return Point(scheme=str(v.get("scheme", "?")), mode=str(v.get("mode", "end-to-end")),
                     seed=int(v.get("seed", 0)), values=searched, final=self.final, source_trial=self.source_trial)


def _applying(values: dict[str, Any]) -> dict[str, Any]:
    """`values` without the searched values that mean nothing to its scheme and mode, whole numbers as int."""
    scheme, mode = values.get("scheme", ""), values.get("mode", "end-to-end")
    return {k: int(v) if k in _INTEGER and isinstance(v, float) and v.is_integer() else v
            for k, v in values.items() if k not in SEARCHED or applies(k, scheme, mode)}


@dataclass(frozen=True)
class Point:
    """What identifies a trial to a person: its scheme, mode, searched values and seed."""

    scheme: str
    mode: str
    seed: int
    values: dict[str, Any] = field(default_factory=dict)   # searched values that apply, e.g. delta_rel, lr
    final: bool = False
    source_trial: str | None = None

    @classmethod
    def of(cls, config: dict[str, Any]) -> Point:
        return Trial.parse(config).point

    @property
    def method(self) -> str:
        """The table row this trial fills: the scheme, or "<scheme> + BoostLU"."""
        return method_name(self.scheme, self.values.get("boostlu_alpha"))

    def label(self) -> str:
        """`LL-R d=2 lr=0.001` (+ ` LI` for linear-init, ` seed=1` for final runs)."""
        parts = [self.scheme] + (["LI"] if self.mode != "end-to-end" else [])
        short = {"delta_rel": "d", "lr": "lr", "linear_init_lr": "lr0", "boostlu_alpha": "boostlu"}
        for k, v in self.values.items():
            # a method's hyper-parameter by its paper's name: em_alpha -> alpha, gr_q2 -> q2
            name = short.get(k) or (k.split("_", 1)[1] if k in METHOD_PARAMS else k)
            if k == "optimizer":
                parts += [v] if v != "adam" else []      # Adam is the trainer's default: not named
            else:
                parts.append(f"{name}={v:.3g}" if k == "delta_rel" else f"{name}={v:.2g}")
        if self.final:
            parts.append(f"seed={self.seed}")
        return " ".join(parts)


def trial_index(trial) -> int:
    """Tune's running number of a trial (its experiment tag starts with it)."""
    head = (trial.experiment_tag or "0").split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def run_name(trial) -> str:
    """The MLflow run's name: `LL-R d=2 lr=0.001 #t3` (search) or `... seed=1 #f3` (final)."""
    point = Point.of(trial.config or {})
    return f"{point.label()} #{'f' if point.final else 't'}{trial_index(trial)}"


def dirname(trial) -> str:
    """Short trial folder names: `trial_003_LL-Ct_1a2b3c4d` (Tune's default packs the whole config in)."""
    point = Point.of(trial.config or {})
    kind, seed = ("final", f"_seed{point.seed}") if point.final else ("trial", "")
    return f"{kind}_{trial_index(trial):03d}_{point.scheme}{seed}_{trial.trial_id}"


def final_point(config: dict[str, Any], seed: int, source_trial: str) -> dict[str, Any]:
    """The `point` of a final rerun of the search trial whose config is `config`."""
    v = Trial.parse(config).values
    point = {k: v[k] for k in SEARCHED if k in v}
    return {**point, "seed": seed, "wsml_source_trial": source_trial}

"""Typed configuration of one training run.

`TrainConfig.resolve()` fills every field left as None with the defaults of
the data set (the paper's settings for benchmarks, CPU-sized ones for the
built-in `digits`) and validates the result, so bad values fail before any
data is read or any GPU time is spent.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from wsml import schemes
from wsml.errors import ConfigError

_T = TypeVar("_T")

# The schemes and their families, from the registry (wsml/schemes.py): the 2022 paper's baselines and
# large-loss schemes (its Table 1 rows), then the methods published since (EM, EM+APL, GR).
LL_SCHEMES = schemes.names("large-loss")
BASELINES = schemes.names("baseline")
RECENT_SCHEMES = schemes.names("recent")
SCHEMES = schemes.names()
MODES = ("end-to-end", "linear-init")
DATASETS = ("digits", "pascal", "coco", "nuswide", "cub", "openimages")
PRECISIONS = ("auto", "bf16", "fp32")
IMAGE_CACHES = ("auto", "raw", "compact")
IMAGE_DECODERS = ("cpu", "gpu")
OPTIMIZERS = ("adam", "sgd")

# Expected positives per image used by EPR and ROLE, as the single-positive work
# set them (its train.py, `lookup['expected_num_pos']`); any other data set uses
# the mean over its training labels.
EXPECTED_POSITIVES = {"pascal": 1.5, "coco": 2.9, "nuswide": 1.9, "cub": 31.4}


@dataclass(frozen=True)
class DatasetDefaults:
    arch: str
    weights: str
    image_size: int
    batch_size: int
    epochs: int
    lr: float
    delta_rel: float
    hflip: bool


# The paper: ResNet-50 from ImageNet, 448 px, batch 16, Adam lr 1e-5, 10 epochs.
# `digits`: a small CNN from scratch that shows the effect on a CPU in minutes;
# false negatives are ~15 % of entries there, so delta_rel is larger.
# No flip for digits: a mirrored digit is not a digit (MNIST-style data is never
# flipped), and learning both orientations left 10 epochs short of converging.
_BENCHMARK = DatasetDefaults(arch="resnet50", weights="imagenet", image_size=448, batch_size=16,
                             epochs=10, lr=1e-5, delta_rel=0.2, hflip=True)
DEFAULTS = {name: _BENCHMARK for name in DATASETS if name != "digits"}
DEFAULTS["digits"] = DatasetDefaults(arch="smallcnn", weights="none", image_size=32, batch_size=32,
                                     epochs=10, lr=1e-3, delta_rel=2.0, hflip=False)


@dataclass(frozen=True)
class LinearPhase:
    """The linear phase of LinearInit: the head (and ROLE's label estimator) on frozen features, with Adam."""

    epochs: int
    lr: float
    batch_size: int


# As the single-positive work (Cole et al., CVPR 2021) set it per loss and data set:
# github:elijahcole/single-positive-multi-label, train.py, `lookup['linear_init_params']`
# ("best learning rate and batch size for linear_fixed_features phase of linear_init"),
# `P['num_epochs'] = 25` for that phase, Adam. It published these for its two
# LinearInit losses only, LSAN (`an_ls`) and ROLE (`role`).
_SPML_LINEAR_PHASE = {
    "LSAN": {"pascal": LinearPhase(25, 1e-4, 8), "coco": LinearPhase(25, 1e-4, 8),
             "nuswide": LinearPhase(25, 1e-4, 16), "cub": LinearPhase(25, 1e-4, 8)},
    "ROLE": {"pascal": LinearPhase(25, 1e-3, 16), "coco": LinearPhase(25, 1e-3, 16),
             "nuswide": LinearPhase(25, 1e-3, 16), "cub": LinearPhase(25, 1e-3, 8)},
}
# `digits`: CPU-sized, for every scheme.
_DIGITS_LINEAR_PHASE = LinearPhase(5, 1e-2, 64)


def linear_phase_defaults(dataset: str, scheme: str) -> LinearPhase:
    """The default linear phase of LinearInit for `scheme` on `dataset`.

    Schemes that work did not run under LinearInit take the setting of its
    closest loss (our choice, no published value exists; the registry's
    `linear_phase`): EPR is ROLE's classifier half without the cross term, so
    ROLE's; full, AN, WAN and the LL schemes (plain AN in the linear phase: the
    large-loss rule starts in epoch 2) are BCE over every entry like LSAN, so
    LSAN's; so are EM and EM+APL (a term on every entry; no pseudo-labels yet in
    the linear phase) and GR (its start values there). OpenImages, not in that
    work, takes COCO's.
    """
    if dataset == "digits":
        return _DIGITS_LINEAR_PHASE
    family = schemes.REGISTRY[scheme].linear_phase
    return _SPML_LINEAR_PHASE[family]["coco" if dataset == "openimages" else dataset]


def filled(value: _T | None, name: str) -> _T:
    """A setting that `TrainConfig.resolve()` fills in, typed as filled: what code reading a resolved
    config uses instead of the Optional field."""
    if value is None:
        raise ValueError(f"TrainConfig.{name} is unset: resolve() the configuration first")
    return value


def option(default: Any, help: str | None = None, **argparse_settings: Any) -> Any:
    """A TrainConfig field that `python -m wsml.train` takes as `--<name>`: its help text and any argparse
    setting the field's type does not imply (choices, metavar). The command line is built from these."""
    return field(default=default, metadata={"option": {"help": help, **argparse_settings}})


def _either(choices: tuple[str, ...]) -> str:
    return " or ".join([", ".join(choices[:-1]), choices[-1]]) if len(choices) > 1 else choices[0]


@dataclass
class TrainConfig:
    """Everything that defines one run; `None` means "the data set's default".

    Fields made with `option` are the trainer's command-line options; the others are set by a
    sweep's space file or by callers of `wsml.train.run`.
    """

    dataset: str = option("digits")
    scheme: str = option("LL-R", _either(SCHEMES))
    delta_rel: float | None = option(None, "percent of label entries per epoch (paper: 0.1-0.5)")
    lr: float | None = option(None, "backbone learning rate; the head gets 10x")
    lr_head_mult: float = option(10.0, "the linear head's lr = lr * this")
    optimizer: str = option("adam", f"{_either(OPTIMIZERS)} (momentum 0.9, weight decay 1e-3, as the paper's "
                                     "code); the linear phase of LinearInit is always Adam")
    epochs: int | None = option(None)
    batch_size: int | None = option(None)
    mode: str = option("end-to-end", _either(MODES))
    weights: str | None = option(None, "imagenet, none, or a local ResNet-50 state-dict file")
    arch: str | None = option(None, "resnet50 or smallcnn (default: by data set)")
    image_size: int | None = option(None)
    data_root: str | None = option(None, "folder in the published layout (default data/<dataset>)")
    cache_dir: str | None = option(None, "decoded-image and feature cache (default .cache)")
    image_cache: str = option("auto", "raw uint8 pixels, JPEG shards, or auto: raw up to 16 GB of pixels "
                                      "(default auto)", choices=IMAGE_CACHES)
    image_decode: str = option("cpu", "compact cache: decode in the DataLoader workers, or batched on the GPU "
                                      "(nvJPEG)", choices=IMAGE_DECODERS)
    seed: int = option(0, "training seed (initialisation, shuffling, flips)")
    obs_seed: int = option(1200, "which positive stays observed")
    split_seed: int = 1200                # train/validation split (paper: 1200)
    val_frac: float = 0.2
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    precision: str = option("auto", "auto (bf16 on CUDA), bf16 or fp32")
    channels_last: bool = True            # only applied on CUDA
    hflip: bool | None = option(None, "random horizontal flip in training (default: on, off for digits)")
    cuda_graph: bool = option(False, "capture each training step as one CUDA graph")
    num_workers: int = option(2)
    stop_drop: float | None = 3.0         # stop once val mAP falls this far below its best
    expected_positives: float | None = None
    # the linear phase's defaults: linear_phase_defaults(dataset, scheme)
    linear_init_epochs: int | None = option(None, "epochs of the linear phase (default: per scheme)")
    linear_init_lr: float | None = option(None, "Adam lr of the linear phase (default: per scheme)")
    linear_init_batch_size: int | None = option(None, "batch size of the linear phase (default: per scheme)")
    skip_bad_images: bool = option(False, "skip unreadable images (counted); refused past 1 %% of a split's "
                                          "images, or when a class loses every observed positive of the "
                                          "training split")
    max_train_images: int | None = option(None, "train on the first N images only (quick checks)")
    boostlu_alpha: float | None = option(None, "BoostLU (CVPR 2023): multiply positive class-activation-map "
                                               "values by A before pooling (the authors use 5; default: off)",
                                         metavar="A")
    # The methods' own hyper-parameters by name (wsml/schemes.py: their defaults per data set, sources,
    # valid values and search ranges; the trainer's `--<name>` options); unset: the published default of
    # the data set. Only the scheme's own may be set.
    scheme_params: dict[str, float] = field(default_factory=dict)

    def param(self, name: str) -> float:
        """The scheme's hyper-parameter `name` of a resolved configuration."""
        if name not in self.scheme_params:
            raise ValueError(f"TrainConfig.scheme_params[{name!r}] is unset: resolve() the configuration of a "
                             "scheme that has it first")
        return self.scheme_params[name]

    def resolve(self) -> TrainConfig:
        """Return a copy with data-set defaults filled in, validated."""
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown data set {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        d = DEFAULTS[self.dataset]
        filled = {f.name: getattr(d, f.name) for f in fields(d)
                  if getattr(self, f.name, None) is None}
        if self.data_root is None:
            filled["data_root"] = f"data/{self.dataset}"
        if self.cache_dir is None:
            filled["cache_dir"] = ".cache"
        if self.scheme in SCHEMES:   # an unknown scheme is reported by validate()
            phase = linear_phase_defaults(self.dataset, self.scheme)
            for name in ("epochs", "lr", "batch_size"):
                if getattr(self, f"linear_init_{name}") is None:
                    filled[f"linear_init_{name}"] = getattr(phase, name)
            # the scheme's own hyper-parameters, in the registry's order (anything else is left for validate())
            given = {k: v for k, v in self.scheme_params.items() if v is not None}
            params = {h.name: given.pop(h.name, h.default(self.dataset))
                      for h in schemes.REGISTRY[self.scheme].hypers if h.defaults is not None}
            filled["scheme_params"] = {**params, **given}
        cfg = replace(self, **filled)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ConfigError(f"invalid {name}={getattr(self, name)!r}: {why}")

        for name, choices in (("scheme", SCHEMES), ("mode", MODES), ("precision", PRECISIONS),
                              ("image_cache", IMAGE_CACHES), ("image_decode", IMAGE_DECODERS),
                              ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in choices:
                bad(name, f"choose one of {', '.join(choices)}")
        if self.arch not in ("resnet50", "smallcnn"):
            bad("arch", "choose resnet50 or smallcnn")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad("device", "choose auto, cpu, cuda or cuda:N")
        for name in ("delta_rel",):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 100):
                bad(name, "a percentage between 0 and 100 (the paper uses 0.1 to 0.5)")
        for name in ("lr", "lr_head_mult", "linear_init_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                bad(name, "a positive number")
        for name in ("epochs", "batch_size", "image_size", "linear_init_epochs", "linear_init_batch_size"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                bad(name, "a positive integer")
        if not isinstance(self.hflip, bool):
            bad("hflip", "true or false")
        if self.num_workers < 0:
            bad("num_workers", "0 or more")
        if not 0 < self.val_frac < 1:
            bad("val_frac", "a fraction between 0 and 1")
        if self.stop_drop is not None and not self.stop_drop > 0:
            bad("stop_drop", "a positive number of mAP points, or None to disable")
        if self.expected_positives is not None and not self.expected_positives > 0:
            bad("expected_positives", "a positive number")
        if self.max_train_images is not None and self.max_train_images < 1:
            bad("max_train_images", "a positive integer")
        a = self.boostlu_alpha
        if a is not None and not (isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)
                                  and a > 0):
            bad("boostlu_alpha", "a positive number (the BoostLU paper uses 5; 1 is the plain linear head), "
                                 "or None for no BoostLU")
        self._validate_hypers()

    def _validate_hypers(self) -> None:
        """The scheme's own hyper-parameters (wsml/schemes.py: valid values), and no other method's set."""
        scheme = schemes.REGISTRY[self.scheme]
        for name, value in self.scheme_params.items():
            h = scheme.hyper(name)
            if h is None:
                users = [s for s in SCHEMES if schemes.applies(name, s)]
                if not users or name not in schemes.hyper_names(with_dataset_defaults=False):
                    own = [h.name for h in scheme.hypers if h.defaults is not None]
                    raise ConfigError(f"invalid scheme_params.{name}={value!r}: no scheme has it; {self.scheme}'s "
                                      f"own are {', '.join(own) or 'none'}")
                raise ConfigError(f"invalid {name}={value!r}: a hyper-parameter of {_either(tuple(users))}, not "
                                  f"of {self.scheme}: leave it unset")
            why = h.invalid(value, self.epochs)
            if why:
                raise ConfigError(f"invalid {name}={value!r}: {why}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """From TrainConfig's fields; the methods' hyper-parameters may also come as keys of their own
        (a trial's flat configuration), gathered into `scheme_params`."""
        known = {f.name for f in fields(cls)}
        methods = set(schemes.hyper_names(with_dataset_defaults=False))
        unknown = sorted(set(values) - known - methods)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}: known keys are "
                              f"{', '.join(sorted(known | methods))}")
        params = dict(values.get("scheme_params") or {})
        params.update({k: v for k, v in values.items() if k in methods and v is not None})
        return cls(**{k: v for k, v in values.items() if k in known and k != "scheme_params"}, scheme_params=params)


# Fields that may differ between a checkpoint and the run resuming it: where and how fast it runs,
# where the data lives (the data itself is compared by its fingerprint), how many epochs (not for a scheme
# with a schedule over the epochs: `resume_free`).
RESUME_FREE = frozenset({"device", "num_workers", "data_root", "cache_dir", "precision", "channels_last", "epochs",
                         "skip_bad_images", "image_decode"})


def resume_free(scheme: str | None) -> frozenset[str]:
    """RESUME_FREE for `scheme`: without `epochs` where its loss or label update depends on them (EM+APL's
    per-update count, GR's schedules), so that a resumed run is the run it continues."""
    spec = schemes.REGISTRY.get(scheme or "")
    return RESUME_FREE - {"epochs"} if spec is not None and spec.epoch_schedule else RESUME_FREE


def flat(config: dict[str, Any]) -> dict[str, Any]:
    """A `TrainConfig.to_dict()` with the methods' hyper-parameters by their own names, as a sweep's trials
    and the trainer's options name them (`em_alpha`, not `scheme_params`)."""
    return {**{k: v for k, v in config.items() if k != "scheme_params"}, **(config.get("scheme_params") or {})}


def resume_mismatch(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first setting (outside `resume_free` of the scheme) that differs, as "scheme='LL-Ct' but this run
    has scheme='LL-R'", or None. Keys missing on either side are not compared."""
    free = resume_free(now.get("scheme"))
    saved, now = flat(saved), flat(now)
    for key, value in now.items():
        if key not in free and key in saved and saved[key] != value:
            return f"{key}={saved[key]!r} but this run has {key}={value!r}"
    return None


@dataclass
class EpochReport:
    """What the trainer tells its caller after every epoch (1-based `epoch`)."""

    epoch: int
    val_map: float
    train_loss: float
    modified_frac: float            # modified entries / all label entries seen this epoch
    modified_true_pos_frac: float   # of the modified entries, the fraction truly positive (nan if none)
    clean_rate: float
    best_val_map: float
    best_epoch: int
    test_map_at_best: float | None  # test mAP of the best-validation epoch so far
    epoch_seconds: float
    images_per_s: float
    # LinearInit, first epoch only: share of the head's logits past +-10 on the first fine-tuning batch
    # (above wsml.linear_init.SATURATED_SHARE the head is saturated and the log warns)
    linear_init_saturated_frac: float | None = None
    stop: bool = False              # the trainer's own stop rule fired (val mAP dropped)

    def metrics(self) -> dict[str, float]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "stop" and v is not None}
        return out


@dataclass
class RunResult:
    test_map: float
    best_val_map: float
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    empty_test_classes: int = 0     # classes with no positive in the test set (AP 0 as published)
    stopped_early: bool = False

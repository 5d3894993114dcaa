"""The hyper-parameters of EM, EM+APL (ECCV 2022) and GR (IJCAI 2024), their published defaults per data set,
the settings their code trains with, proposed search ranges and the published test mAP: data without torch,
so that `wsml.config` and the scheme registry (`wsml.schemes`) can read them where torch is not imported.
The losses are `wsml.spml_losses`; the sources ("AckTheUnknown <file>:<line>", "GRLoss <file>:<line>") are
named in its docstring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from wsml.errors import ConfigError

EM_SCHEMES = ("EM", "EM+APL")
GR_SCHEMES = ("GR",)
SPML_SCHEMES = EM_SCHEMES + GR_SCHEMES


def _finite(name: str, value: float, low: float | None = None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"invalid {name}={value!r}: a finite number")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"invalid {name}={value!r}: {'above' if low_open else 'at least'} {low:g}")


# --------------------------------------------------------------------------------------------------
# Hyper-parameters, with the published defaults per data set
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EMParams:
    """EM: the weight of the (negated) entropy on unobserved entries."""

    alpha: float

    def __post_init__(self) -> None:
        _finite("alpha", self.alpha, 0.0)


@dataclass(frozen=True)
class APLParams:
    """EM+APL: EM's `alpha`, the weight `beta` of pseudo-negative entries, the share `neg_proportion` of
    each class's unobserved entries to pseudo-label over the run, and the 1-based `warmup_epoch` after
    whose training pass the first pseudo-labels are assigned."""

    alpha: float
    beta: float
    neg_proportion: float
    warmup_epoch: int

    def __post_init__(self) -> None:
        _finite("alpha", self.alpha, 0.0)
        _finite("beta", self.beta, 0.0)
        _finite("neg_proportion", self.neg_proportion, 0.0)
        if self.neg_proportion > 1:
            raise ConfigError(f"invalid neg_proportion={self.neg_proportion!r}: a fraction between 0 and 1")
        if isinstance(self.warmup_epoch, bool) or not isinstance(self.warmup_epoch, int) or self.warmup_epoch < 1:
            raise ConfigError(f"invalid warmup_epoch={self.warmup_epoch!r}: a positive integer (1-based epoch)")


@dataclass(frozen=True)
class GRParams:
    """GR: the published `beta = [w0, wT, b0, bT]` (the soft pseudo-label k(p) = sigmoid(w p + b)),
    `alpha = [mu0, sigma0, muT, sigmaT]` (the weight v(p) = exp(-(p - mu)^2 / (2 sigma^2))), each moving
    linearly from its start to its end value over the epochs, and `q2q3 = [q2, q3]` (the two robust
    terms (1 - p^q2)/q2 and (1 - (1-p)^q3)/q3)."""

    w_start: float
    w_end: float
    b_start: float
    b_end: float
    mu_start: float
    sigma_start: float
    mu_end: float
    sigma_end: float
    q2: float
    q3: float

    def __post_init__(self) -> None:
        for name in ("w_start", "w_end", "b_start", "b_end", "mu_start", "mu_end"):
            _finite(name, getattr(self, name))
        for name in ("sigma_start", "sigma_end", "q2", "q3"):     # divisors
            _finite(name, getattr(self, name), 0.0, low_open=True)

    @classmethod
    def from_published(cls, beta: tuple[float, float, float, float] | list[float],
                       alpha: tuple[float, float, float, float] | list[float],
                       q2q3: tuple[float, float] | list[float]) -> GRParams:
        """From the published command line's lists, in their order (GRLoss README, config.py:100-102)."""
        (w0, wt, b0, bt), (mu0, s0, mut, st), (q2, q3) = beta, alpha, q2q3
        return cls(w0, wt, b0, bt, mu0, s0, mut, st, q2, q3)


@dataclass(frozen=True)
class PublishedTraining:
    """The optimisation setting the published code trains a method with (start points for the search)."""

    optimizer: str
    lr: float
    lr_head_mult: float     # the linear head's lr = lr * lr_head_mult
    batch_size: int
    epochs: int


# AckTheUnknown main.py:322-350, one block per data set (bsize, lr, alpha, neg_proportion, warmup_epoch,
# beta); the README ("Usage Tips", 2) names those lines as the method's hyper-parameters. EM without APL
# runs with the same `alpha` (main.py uses one P['alpha'] for both losses).
ACK_LINES = {"pascal": "main.py:323-329", "cub": "main.py:330-336", "nuswide": "main.py:337-343",
              "coco": "main.py:344-350"}
APL_DEFAULTS = {
    "pascal": APLParams(alpha=0.2, beta=0.02, neg_proportion=0.9, warmup_epoch=5),
    "coco": APLParams(alpha=0.1, beta=0.9, neg_proportion=0.9, warmup_epoch=5),
    "nuswide": APLParams(alpha=0.1, beta=0.2, neg_proportion=0.9, warmup_epoch=4),
    "cub": APLParams(alpha=0.01, beta=0.4, neg_proportion=0.9, warmup_epoch=3),
}
EM_DEFAULTS = {name: EMParams(alpha=p.alpha) for name, p in APL_DEFAULTS.items()}
# Adam over all parameters at one lr (main.py:211-216: no 10x for the head), 10 epochs (main.py:372).
# Its stop rule (main.py:127-134: stop at the first epoch whose validation mAP is not a new best) is
# not part of the method: the project's own stop rule applies to every scheme alike.
EM_TRAINING = {
    "pascal": PublishedTraining("adam", 1e-5, 1.0, 8, 10),
    "coco": PublishedTraining("adam", 1e-5, 1.0, 16, 10),
    "nuswide": PublishedTraining("adam", 1e-5, 1.0, 16, 10),
    "cub": PublishedTraining("adam", 1e-4, 1.0, 8, 10),
}

# GRLoss config.py:100-102 (`--beta`, `--alpha`, `--q2q3` defaults), the same values the README gives as
# its example. The published code holds no per-data-set values: these are its defaults for every data set.
GR_PUBLISHED = GRParams.from_published(beta=[0, 2, -2, -2], alpha=[0.5, 2, 0.8, 0.5], q2q3=[0.01, 1])
GR_DEFAULTS = {name: GR_PUBLISHED for name in ("pascal", "coco", "nuswide", "cub")}
# config.py:78 (num_epochs 8), :91 (adam), :93 (bsize 8), :94 (lr 1e-5), :95 (lr_mult 10, used for the
# head in train.py:30-34), :97 (linear_init 0). Its stop rule (train.py:150-160: stop when validation
# mAP falls more than 2 points below its best) is likewise not part of the method.
GR_TRAINING = {name: PublishedTraining("adam", 1e-5, 10.0, 8, 8) for name in GR_DEFAULTS}


@dataclass(frozen=True)
class Range:
    """A search range: uniform (or log-uniform) in [low, high], integers where `integer`."""

    low: float
    high: float
    log: bool = False
    integer: bool = False


# Proposed search ranges, ours: neither paper publishes the ranges it searched in the code or README
# read here. Each contains every published default above with room on both sides; the GR entries
# keep the published shape (w rising from 0, b constant, mu rising, sigma falling) and search its ends.
SEARCH_RANGES: dict[str, dict[str, Range]] = {
    "EM": {"alpha": Range(0.005, 0.5, log=True)},
    "EM+APL": {"alpha": Range(0.005, 0.5, log=True), "beta": Range(0.01, 1.0, log=True),
               "neg_proportion": Range(0.5, 1.0), "warmup_epoch": Range(2, 8, integer=True)},
    "GR": {"w_end": Range(0.0, 4.0), "b_start": Range(-4.0, 0.0), "b_end": Range(-4.0, 0.0),
           "mu_end": Range(0.5, 1.0), "sigma_end": Range(0.2, 2.0, log=True),
           "q2": Range(0.001, 0.5, log=True), "q3": Range(0.5, 1.0)},
}

# Test mAP (%) the papers report, end-to-end, ResNet-50, under Cole et al.'s protocol (VOC / COCO /
# NUS-WIDE / CUB). AckTheUnknown trains on the official NUS-WIDE release, not the re-crawled subset the
# earlier work used (its README, "NUS-WIDE"), so its NUS-WIDE column is on other images.
PUBLISHED_MAP = {
    "EM": {"pascal": 89.09, "coco": 70.70, "nuswide": 47.15, "cub": 20.85},
    "EM+APL": {"pascal": 89.19, "coco": 70.87, "nuswide": 47.59, "cub": 21.84},
    "GR": {"pascal": 89.83, "coco": 73.17, "nuswide": 49.08, "cub": 21.64},
}

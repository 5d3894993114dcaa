"""GR: Chen, Li, Dai, Li, Sun, Wang, Zhang, Zhang, Wang, "Boosting Single Positive Multi-label
Classification with Generalized Robust Loss", IJCAI 2024; code github:yan4xi1/GRLoss at commit 5e13f7f9
(`losses.py`, `models.py`, `train.py`, `config.py`). Cited below as "GRLoss <file>:<line>".

Read from the published code and written anew, as the rest of `wsml`: logits in (B x C, computed in
fp32), label matrices with 1 (observed positive), 0 (unobserved), -1 (observed negative), 1-based
epochs. The published code works on probabilities `p = sigmoid(logits)` with an epsilon inside every
log (1e-7); so does this module. Where the published code forms `1 - p`, this module uses
`sigmoid(-logits)`, the same number without fp32 cancellation, and writes `x ** q` as `exp(q * log x)`
of the log-sigmoid, the same value whose gradient stays finite where `p` or `1 - p` underflow to 0
(there `torch.pow`'s gradient is inf and the chain rule makes it NaN).

Observed negatives (-1, only OpenImages has them) appear in none of the paper's data sets: the
published code leaves them at loss 0 (losses.py:10-12); here they take `-log(1 - p + eps)`, the
negative term of the same BCE (our extension). The trainer keeps nothing for GR but the epoch:
`gr_schedule` is a function of (epoch, epochs).

torch is imported inside the functions: the registry reads `SCHEMES` where torch is not imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from wsml.errors import ConfigError
from wsml.methods import BENCHMARKS, Hyper, PublishedTraining, Range, Scheme, check_finite, end_to_end

if TYPE_CHECKING:
    import torch

    from wsml.config import TrainConfig
    from wsml.losses import Batch, LossOutput

GR_LOG_EPSILON = 1e-7   # GRLoss losses.py:37 (`LOG_EPSILON`, inside `neg_log`, losses.py:39-40)


# --------------------------------------------------------------------------------------------------
# Hyper-parameters
# --------------------------------------------------------------------------------------------------

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
            check_finite(name, getattr(self, name))
        for name in ("sigma_start", "sigma_end", "q2", "q3"):     # divisors
            check_finite(name, getattr(self, name), 0.0, low_open=True)

    @classmethod
    def from_published(cls, beta: tuple[float, float, float, float] | list[float],
                       alpha: tuple[float, float, float, float] | list[float],
                       q2q3: tuple[float, float] | list[float]) -> GRParams:
        """From the published command line's lists, in their order (GRLoss README, config.py:100-102)."""
        (w0, wt, b0, bt), (mu0, s0, mut, st), (q2, q3) = beta, alpha, q2q3
        return cls(w0, wt, b0, bt, mu0, s0, mut, st, q2, q3)


# GRLoss config.py:100-102 (`--beta`, `--alpha`, `--q2q3` defaults), the same values the README gives as
# its example. The published code holds no per-data-set values: these are its defaults for every data set.
GR_PUBLISHED = GRParams.from_published(beta=[0, 2, -2, -2], alpha=[0.5, 2, 0.8, 0.5], q2q3=[0.01, 1])
GR_DEFAULTS = {name: GR_PUBLISHED for name in ("pascal", "coco", "nuswide", "cub")}
# config.py:78 (num_epochs 8), :91 (adam), :93 (bsize 8), :94 (lr 1e-5), :95 (lr_mult 10, used for the
# head in train.py:30-34), :97 (linear_init 0). Its stop rule (train.py:150-160: stop when validation
# mAP falls more than 2 points below its best) is likewise not part of the method.
GR_TRAINING = {name: PublishedTraining("adam", 1e-5, 10.0, 8, 8) for name in GR_DEFAULTS}



# Proposed search ranges, ours: the paper publishes none in its code or README. They contain every
# published default with room on both sides and keep the published shape (w rising from 0, b constant,
# mu rising, sigma falling), searching its ends.
SEARCH_RANGES: dict[str, Range] = {
    "w_end": Range(0.0, 4.0), "b_start": Range(-4.0, 0.0), "b_end": Range(-4.0, 0.0), "mu_end": Range(0.5, 1.0),
    "sigma_end": Range(0.2, 2.0, log=True), "q2": Range(0.001, 0.5, log=True), "q3": Range(0.5, 1.0)}

# Test mAP (%) the paper reports, end-to-end, ResNet-50, under Cole et al.'s protocol.
PUBLISHED_MAP = {"pascal": 89.83, "coco": 73.17, "nuswide": 49.08, "cub": 21.64}

# The published code's defaults for every data set (config.py:100-102); digits takes them too, as the
# schedules are fractions of the run whatever its length (test mAP 99.6, seed 0).
_SOURCE = "GRLoss config.py:100-102 (--beta w0 wT b0 bT, --alpha mu0 sigma0 muT sigmaT, --q2q3 q2 q3)"
_HELP = {"w_start": "GR: k(p) = sigmoid(w p + b), w in the first epoch", "w_end": "GR: w at the end",
         "b_start": "GR: b in the first epoch", "b_end": "GR: b at the end",
         "mu_start": "GR: v(p) = exp(-(p - mu)^2 / (2 sigma^2)), mu in the first epoch",
         "sigma_start": "GR: sigma in the first epoch", "mu_end": "GR: mu at the end",
         "sigma_end": "GR: sigma at the end", "q2": "GR: q2 of the robust term (1 - p^q2)/q2",
         "q3": "GR: q3 of the robust term (1 - (1-p)^q3)/q3"}
_HYPERS = tuple(Hyper(f"gr_{attr}", text, dict.fromkeys((*BENCHMARKS, "openimages", "digits"),
                                                       float(getattr(GR_PUBLISHED, attr))),
                      _SOURCE, low=0.0 if attr in ("sigma_start", "sigma_end", "q2", "q3") else None,
                      low_open=True, search=SEARCH_RANGES.get(attr))
                for attr, text in _HELP.items())
PAPER = ("Chen et al., Boosting Single Positive Multi-label Classification with Generalized Robust Loss, "
         "IJCAI 2024 (github:yan4xi1/GRLoss)")

SCHEMES = (Scheme("GR", "recent", f"{__name__}:gr_scheme", hypers=_HYPERS, epoch_schedule=True,
                  published=end_to_end(PUBLISHED_MAP), published_in=PAPER),)


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GRSchedule:
    """GR's epoch-dependent values: k(p) = sigmoid(w p + b), v(p) = exp(-(p - mu)^2 / (2 sigma^2))."""

    w: float
    b: float
    mu: float
    sigma: float


def gr_schedule(epoch: int, epochs: int, params: GRParams, linear_init_epochs: int = 0) -> GRSchedule:
    """w, b, mu and sigma in 1-based `epoch` of `epochs` (GRLoss train.py:68-75), where the published
    `linear_init` (n) epochs are the first n of `epochs`, trained with the backbone frozen (train.py:61-67).

    w and b move with max(epoch - n - 1, 0) / (epochs - n), but mu and sigma with
    max(epoch - n, 0) / (epochs - n): as published, w and b stay at their start values one epoch longer
    and never reach their end values (in the last epoch they are (T-n-1)/(T-n) of the way), while mu
    and sigma reach theirs in the last epoch. That off-by-one is the published method and is kept.
    Any epoch <= n (epoch 0 included) gives the start values.
    """
    n = linear_init_epochs
    if epochs <= n:
        raise ConfigError(f"invalid linear_init_epochs={n}: GR needs it below the number of epochs ({epochs}); "
                          f"the published schedule divides by their difference")
    t_wb = max(epoch - n - 1, 0) / (epochs - n)
    t_v = max(epoch - n, 0) / (epochs - n)
    return GRSchedule(w=params.w_start + (params.w_end - params.w_start) * t_wb,
                      b=params.b_start + (params.b_end - params.b_start) * t_wb,
                      mu=params.mu_start + (params.mu_end - params.mu_start) * t_v,
                      sigma=params.sigma_start + (params.sigma_end - params.sigma_start) * t_v)


def gr_k(probs: torch.Tensor, sched: GRSchedule) -> torch.Tensor:
    """The soft pseudo-label k(p; beta) = 1 / (1 + exp(-(w p + b))) (GRLoss models.py:82-89)."""
    import torch


    return torch.sigmoid(sched.w * probs + sched.b)


def gr_v(probs: torch.Tensor, sched: GRSchedule) -> torch.Tensor:
    """The weight v(p; alpha) = exp(-0.5 ((p - mu) / sigma)^2) (GRLoss models.py:118-119)."""
    import torch


    return torch.exp(-0.5 * ((probs - sched.mu) / sched.sigma) ** 2)


def gr_loss(logits: torch.Tensor, observed: torch.Tensor, epoch: int, epochs: int, params: GRParams,
            linear_init_epochs: int = 0) -> torch.Tensor:
    """GR over a batch in 1-based `epoch` of `epochs` (GRLoss losses.py:8-14, train.py:109-117).

    Observed positives take -log(p + 1e-7); an unobserved entry takes
    V * (K * (1 - p^q2)/q2 + (1 - K) * (1 - (1-p)^q3)/q3), with K = k(p) and V = v(p) computed on the
    detached p (train.py:110-115: `preds1 = preds.detach()`), so no gradient flows through K or V;
    observed negatives take -log(1 - p + 1e-7) (ours). Reduction as published: `loss_mtx.mean()`
    over the B x C entries (losses.py:13).
    """
    import torch
    import torch.nn.functional as F

    from wsml.losses import neg_log


    logits = logits.float()
    sched = gr_schedule(epoch, epochs, params, linear_init_epochs)
    p = torch.sigmoid(logits)
    detached = p.detach()
    k, v = gr_k(detached, sched), gr_v(detached, sched)
    # (1 - p^q2)/q2 and (1 - (1-p)^q3)/q3 with x^q = exp(q log x): GRLoss losses.py:42-46
    p_q2 = torch.exp(params.q2 * F.logsigmoid(logits))
    not_p_q3 = torch.exp(params.q3 * F.logsigmoid(-logits))
    robust = k * (1 - p_q2) / params.q2 + (1 - k) * (1 - not_p_q3) / params.q3
    loss = torch.where(observed == 1, neg_log(p, GR_LOG_EPSILON), v * robust)
    loss = torch.where(observed == -1, neg_log(torch.sigmoid(-logits), GR_LOG_EPSILON), loss)
    return loss.mean()


# --------------------------------------------------------------------------------------------------
# As a scheme of the trainer: the hyper-parameters from the run's config
# --------------------------------------------------------------------------------------------------

def gr_params(cfg: TrainConfig) -> GRParams:
    return GRParams(**{name: cfg.param(f"gr_{name}") for name in GRParams.__dataclass_fields__})


def gr_scheme(b: Batch) -> LossOutput:
    """GR in `b.epoch` of the run's epochs; epoch 0 (LinearInit's linear phase) takes the start values."""
    from wsml.config import filled
    from wsml.losses import LossOutput

    cfg = b.run_config()
    epochs = b.epochs or filled(cfg.epochs, "epochs")
    return LossOutput(gr_loss(b.logits, b.observed, b.epoch, epochs, gr_params(cfg)), b.no_selection())

"""Single-positive methods since 2022 as pure functions: EM and EM+APL (ECCV 2022) and GR (IJCAI 2024).

* EM, EM+APL: Zhou, Chen, Wang, Chen, Heng, "Acknowledging the Unknown for Multi-label Learning with
  Single Positive Labels", ECCV 2022; code github:Correr-Zhou/SPML-AckTheUnknown at commit ae1ccafe
  (`losses.py`, `main.py`). Cited below as "AckTheUnknown <file>:<line>".
* GR: Chen, Li, Dai, Li, Sun, Wang, Zhang, Zhang, Wang, "Boosting Single Positive Multi-label
  Classification with Generalized Robust Loss", IJCAI 2024; code github:yan4xi1/GRLoss at commit
  5e13f7f9 (`losses.py`, `models.py`, `train.py`, `config.py`). Cited below as "GRLoss <file>:<line>".

Read from the published code and written anew, as the rest of `wsml`: logits in (B x C, computed in
fp32), label matrices with 1 (observed positive), 0 (unobserved), -1 (observed negative), 1-based
epochs. The published code works on probabilities `p = sigmoid(logits)` with an epsilon inside every
log; so does this module, with the published epsilons (1e-5 for EM/APL, 1e-7 for GR). Where the
published code forms `1 - p`, this module uses `sigmoid(-logits)`, the same number without fp32
cancellation, and writes `x ** q` as `exp(q * log x)` of the log-sigmoid, the same value whose
gradient stays finite where `p` or `1 - p` underflow to 0 (there `torch.pow`'s gradient is inf and
the chain rule makes it NaN).

Observed negatives (-1, only OpenImages has them) appear in none of the papers' data sets: the
published EM asserts there are none (AckTheUnknown losses.py:62), EM+APL would read -1 as a soft
label of 1 (losses.py:91), and GR leaves them at loss 0 (GRLoss losses.py:10-12). Here they take
`-log(1 - p + eps)`, the negative term of the same BCE, in every method (our extension).

The hyper-parameters, their published defaults and the published numbers are data without torch in
`wsml.spml_params` (re-exported here); the registry (`wsml.schemes`) names the functions at the end of
this module as the schemes' batch losses.

What the trainer keeps (none of it is held here):

* EM: nothing; `em_loss` is a function of the batch.
* EM+APL: a float matrix of soft pseudo-negative labels over the whole training set (N x C), NaN where
  an entry has none (`apl_initial_soft_labels`), looked up by image index for each batch
  (`em_apl_loss`), replaced after the training pass of each epoch `apl_update_due` names by
  `apl_update` on an eval-mode pass over the training set, and saved in every checkpoint.
* GR: nothing but the epoch; `gr_schedule` is a function of (epoch, epochs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wsml.config import TrainConfig, filled
from wsml.errors import ConfigError
from wsml.losses import Batch, LossOutput
# the hyper-parameters and the published tables live without torch in wsml.spml_params; re-exported here
from wsml.spml_params import (APL_DEFAULTS, EM_DEFAULTS, EM_SCHEMES, EM_TRAINING, GR_DEFAULTS, GR_PUBLISHED,
                              GR_SCHEMES, GR_TRAINING, PUBLISHED_MAP, SEARCH_RANGES, SPML_SCHEMES, APLParams,
                              EMParams, GRParams, PublishedTraining, Range)

__all__ = ["APL_DEFAULTS", "EM_DEFAULTS", "EM_SCHEMES", "EM_TRAINING", "GR_DEFAULTS", "GR_PUBLISHED", "GR_SCHEMES",
           "GR_TRAINING", "PUBLISHED_MAP", "SEARCH_RANGES", "SPML_SCHEMES", "APLParams", "EMParams", "GRParams",
           "PublishedTraining", "Range"]

EM_LOG_EPSILON = 1e-5   # AckTheUnknown losses.py:153 (`LOG_EPSILON`, inside `neg_log`, losses.py:156-157)
GR_LOG_EPSILON = 1e-7   # GRLoss losses.py:37 (`LOG_EPSILON`, inside `neg_log`, losses.py:39-40)

# --------------------------------------------------------------------------------------------------
# EM and EM+APL
# --------------------------------------------------------------------------------------------------

def _neg_log(probs: torch.Tensor, eps: float) -> torch.Tensor:
    """-log(p + eps), the published `neg_log` (an epsilon inside the log, no clamp)."""
    return -torch.log(probs + eps)


def _em_entries(logits: torch.Tensor, observed: torch.Tensor, alpha: float) -> torch.Tensor:
    """The B x C loss matrix of EM: -log(p + eps) on observed positives, -alpha * H(p) on unobserved
    entries with H(p) = p * -log(p + eps) + (1-p) * -log(1-p + eps) (AckTheUnknown losses.py:66-70),
    -log(1-p + eps) on observed negatives (ours)."""
    p = torch.sigmoid(logits)
    q = torch.sigmoid(-logits)                  # 1 - p
    nl_p, nl_q = _neg_log(p, EM_LOG_EPSILON), _neg_log(q, EM_LOG_EPSILON)
    entropy = p * nl_p + q * nl_q
    loss = torch.where(observed == 1, nl_p, -alpha * entropy)
    return torch.where(observed == -1, nl_q, loss)


def _em_reduce(loss: torch.Tensor) -> torch.Tensor:
    # AckTheUnknown losses.py:121,135: (loss_mtx / (B * C)).sum(): every entry of the batch divided by
    # B*C, then summed; the same as the mean over the B x C entries up to rounding, written as published.
    batch, classes = loss.shape
    return (loss / (batch * classes)).sum()


def em_loss(logits: torch.Tensor, observed: torch.Tensor, params: EMParams) -> torch.Tensor:
    """EM (entropy maximisation), averaged over the B x C entries (a scalar)."""
    return _em_reduce(_em_entries(logits.float(), observed, params.alpha))


def apl_initial_soft_labels(observed: torch.Tensor) -> torch.Tensor:
    """The training set's soft-label matrix before any pseudo-labelling: all NaN (N x C, float32).

    The published code stores a pseudo-negative as `-p` in the observed label matrix itself
    (main.py:296) and reads it back as the soft label `-label` (losses.py:91). Here it lives in its
    own matrix as `p`, NaN meaning "none", so that -1 keeps meaning an observed negative.
    """
    return torch.full(observed.shape, math.nan, dtype=torch.float32, device=observed.device)


def em_apl_loss(logits: torch.Tensor, observed: torch.Tensor, soft_labels: torch.Tensor,
                params: APLParams) -> torch.Tensor:
    """EM+APL over a batch: EM, except that an unobserved entry with a soft pseudo-label s (from
    `soft_labels`, B x C, NaN for none) takes beta * (s * -log(p + eps) + (1-s) * -log(1-p + eps))
    (AckTheUnknown losses.py:91-95). Averaged over the B x C entries as EM is."""
    logits = logits.float()
    loss = _em_entries(logits, observed, params.alpha)
    s = soft_labels.to(device=logits.device, dtype=torch.float32)
    pseudo = (observed == 0) & ~torch.isnan(s)
    s = torch.where(pseudo, s, torch.zeros_like(s))        # no NaN enters the graph, even where unused
    p, q = torch.sigmoid(logits), torch.sigmoid(-logits)
    soft = params.beta * (s * _neg_log(p, EM_LOG_EPSILON) + (1 - s) * _neg_log(q, EM_LOG_EPSILON))
    return _em_reduce(torch.where(pseudo, soft, loss))


def apl_update_due(epoch: int, epochs: int, params: APLParams) -> bool:
    """Whether pseudo-labels are assigned after the training pass of 1-based `epoch` of `epochs`.

    The published code does it after every training pass from `warmup_epoch` on
    (AckTheUnknown main.py:115-116), the last epoch's included; labels assigned after the last epoch
    train nothing, so that pass is skipped here (`epoch < epochs`). Every pseudo-label that trains
    the model is the same.
    """
    return params.warmup_epoch <= epoch < epochs


def apl_per_class_count(observed: torch.Tensor, epochs: int, params: APLParams) -> list[int]:
    """How many entries of each class become pseudo-negatives in one update:
    int(neg_proportion * U_c / (epochs - warmup_epoch)), U_c the class's unobserved entries in the
    training set before training (AckTheUnknown main.py:203-205 and :290; `int` truncates).

    `observed` is the whole training set's N x C matrix (APL never changes it here, so its zeros are
    the published `unlabel_num`)."""
    if epochs <= params.warmup_epoch:
        raise ConfigError(f"invalid warmup_epoch={params.warmup_epoch}: APL needs it below the number of "
                          f"epochs ({epochs}); the published count divides by their difference")
    unobserved = (observed == 0).sum(dim=0).tolist()
    # the published expression, in its order: float64 `neg_proportion * U_c`, divided, truncated
    return [int(params.neg_proportion * u / (epochs - params.warmup_epoch)) for u in unobserved]


def apl_update(observed: torch.Tensor, soft_labels: torch.Tensor, preds: torch.Tensor, epoch: int,
               epochs: int, params: APLParams) -> torch.Tensor:
    """The soft-label matrix after the pseudo-labelling of 1-based `epoch` (a new tensor; the inputs
    are not modified).

    `observed` (N x C), `soft_labels` (N x C, NaN for none) and `preds` (N x C probabilities of the
    eval-mode model after this epoch's training pass) cover the whole training set, row i = image i.
    When `apl_update_due`, for each class the `apl_per_class_count` candidates with the lowest
    prediction become pseudo-negatives with soft label p, their prediction (AckTheUnknown
    main.py:279-296). Candidates are the entries still unobserved and not yet pseudo-labelled
    (main.py:282-287 select `label == 0`, and a pseudo-labelled entry holds `-p`); if fewer remain,
    all of them are taken.

    Ties: the published code sorts with `np.argsort` (quicksort, not stable) over the training set in
    the order its shuffled loader visited it, so which of two equal predictions goes first is
    arbitrary there. Here the lower image index goes first, so an update is reproducible.
    """
    if not apl_update_due(epoch, epochs, params):
        return soft_labels.clone()
    if observed.shape != soft_labels.shape or observed.shape != preds.shape:
        raise ValueError(f"APL needs observed, soft labels and predictions of one shape, got "
                         f"{tuple(observed.shape)}, {tuple(soft_labels.shape)} and {tuple(preds.shape)}")
    preds = preds.detach().to(device=soft_labels.device, dtype=torch.float32)
    if not bool(torch.isfinite(preds).all()):
        raise ValueError("APL got non-finite predictions for the training set")
    observed = observed.to(soft_labels.device)
    counts = torch.tensor(apl_per_class_count(observed, epochs, params), device=soft_labels.device)
    candidates = (observed == 0) & torch.isnan(soft_labels)
    scores = preds.masked_fill(~candidates, math.inf)
    # per class, ascending prediction; stable: equal predictions keep the lower image index first
    order = torch.sort(scores, dim=0, stable=True).indices
    rank = torch.arange(order.shape[0], device=order.device).unsqueeze(1)
    chosen_in_order = (rank < counts.unsqueeze(0)) & candidates.gather(0, order)
    chosen = torch.zeros_like(candidates).scatter(0, order, chosen_in_order)
    return torch.where(chosen, preds, soft_labels)


def apl_pseudo_labelled(soft_labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the entries that hold a pseudo-negative (for the trainer's per-epoch metrics)."""
    return ~torch.isnan(soft_labels)


# --------------------------------------------------------------------------------------------------
# GR
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
    return torch.sigmoid(sched.w * probs + sched.b)


def gr_v(probs: torch.Tensor, sched: GRSchedule) -> torch.Tensor:
    """The weight v(p; alpha) = exp(-0.5 ((p - mu) / sigma)^2) (GRLoss models.py:118-119)."""
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
    logits = logits.float()
    sched = gr_schedule(epoch, epochs, params, linear_init_epochs)
    p = torch.sigmoid(logits)
    detached = p.detach()
    k, v = gr_k(detached, sched), gr_v(detached, sched)
    # (1 - p^q2)/q2 and (1 - (1-p)^q3)/q3 with x^q = exp(q log x): GRLoss losses.py:42-46
    p_q2 = torch.exp(params.q2 * F.logsigmoid(logits))
    not_p_q3 = torch.exp(params.q3 * F.logsigmoid(-logits))
    robust = k * (1 - p_q2) / params.q2 + (1 - k) * (1 - not_p_q3) / params.q3
    loss = torch.where(observed == 1, _neg_log(p, GR_LOG_EPSILON), v * robust)
    loss = torch.where(observed == -1, _neg_log(torch.sigmoid(-logits), GR_LOG_EPSILON), loss)
    return loss.mean()


# --------------------------------------------------------------------------------------------------
# As schemes of the trainer (wsml/schemes.py names these): the hyper-parameters from the run's config
# --------------------------------------------------------------------------------------------------

def em_params(cfg: TrainConfig) -> EMParams:
    return EMParams(alpha=filled(cfg.em_alpha, "em_alpha"))


def apl_params(cfg: TrainConfig) -> APLParams:
    return APLParams(alpha=filled(cfg.em_alpha, "em_alpha"), beta=filled(cfg.apl_beta, "apl_beta"),
                     neg_proportion=filled(cfg.apl_neg_proportion, "apl_neg_proportion"),
                     warmup_epoch=filled(cfg.apl_warmup_epoch, "apl_warmup_epoch"))


def gr_params(cfg: TrainConfig) -> GRParams:
    return GRParams(**{name: filled(getattr(cfg, f"gr_{name}"), f"gr_{name}")
                       for name in GRParams.__dataclass_fields__})


def _config(b: Batch) -> TrainConfig:
    if b.config is None:
        raise ValueError(f"{b.scheme} needs the run's resolved config (its hyper-parameters)")
    return b.config


def em_scheme(b: Batch) -> LossOutput:
    return LossOutput(em_loss(b.logits, b.observed, em_params(_config(b))), b.no_selection())


def em_apl_scheme(b: Batch) -> LossOutput:
    """EM+APL; the entries it reports as modified are the pseudo-negatives the batch trained with. Without
    soft labels (none yet: LinearInit's linear phase) it is EM."""
    soft = apl_initial_soft_labels(b.observed) if b.soft_labels is None else b.soft_labels
    loss = em_apl_loss(b.logits, b.observed, soft, apl_params(_config(b)))
    return LossOutput(loss, (b.observed == 0) & apl_pseudo_labelled(soft.to(b.observed.device)))


def gr_scheme(b: Batch) -> LossOutput:
    """GR in `b.epoch` of the run's epochs; epoch 0 (LinearInit's linear phase) takes the start values."""
    cfg = _config(b)
    epochs = b.epochs or filled(cfg.epochs, "epochs")
    return LossOutput(gr_loss(b.logits, b.observed, b.epoch, epochs, gr_params(cfg)), b.no_selection())

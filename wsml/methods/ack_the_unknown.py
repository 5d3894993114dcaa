"""EM and EM+APL: Zhou, Chen, Wang, Chen, Heng, "Acknowledging the Unknown for Multi-label Learning with
Single Positive Labels", ECCV 2022; code github:Correr-Zhou/SPML-AckTheUnknown at commit ae1ccafe
(`losses.py`, `main.py`). Cited below as "AckTheUnknown <file>:<line>".

Read from the published code and written anew, as the rest of `wsml`: logits in (B x C, computed in
fp32), label matrices with 1 (observed positive), 0 (unobserved), -1 (observed negative), 1-based
epochs. The published code works on probabilities `p = sigmoid(logits)` with an epsilon inside every
log (1e-5); so does this module. Where the published code forms `1 - p`, this module uses
`sigmoid(-logits)`, the same number without fp32 cancellation.

Observed negatives (-1, only OpenImages has them) appear in none of the paper's data sets: the
published EM asserts there are none (losses.py:62) and EM+APL would read -1 as a soft label of 1
(losses.py:91). Here they take `-log(1 - p + eps)`, the negative term of the same BCE (our extension).

What the trainer keeps (none of it is held here):

* EM: nothing; `em_loss` is a function of the batch.
* EM+APL: a float matrix of soft pseudo-negative labels over the whole training set (N x C), NaN where
  an entry has none (`apl_initial_soft_labels`), looked up by image index for each batch
  (`em_apl_loss`), replaced after the training pass of each epoch `apl_update_due` names by
  `apl_update` on an eval-mode pass over the training set, and saved in every checkpoint.

torch is imported inside the functions: the registry reads `SCHEMES` where torch is not imported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wsml.errors import ConfigError
from wsml.methods import (APL_SOFT_LABELS, BENCHMARKS, Hyper, PublishedTraining, Range, Scheme, check_finite,
                          end_to_end)

if TYPE_CHECKING:
    import torch

    from wsml.config import TrainConfig
    from wsml.losses import Batch, LossOutput

EM_LOG_EPSILON = 1e-5   # AckTheUnknown losses.py:153 (`LOG_EPSILON`, inside `neg_log`, losses.py:156-157)


# --------------------------------------------------------------------------------------------------
# Hyper-parameters, with the published defaults per data set
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EMParams:
    """EM: the weight of the (negated) entropy on unobserved entries."""

    alpha: float

    def __post_init__(self) -> None:
        check_finite("alpha", self.alpha, 0.0)


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
        check_finite("alpha", self.alpha, 0.0)
        check_finite("beta", self.beta, 0.0)
        check_finite("neg_proportion", self.neg_proportion, 0.0)
        if self.neg_proportion > 1:
            raise ConfigError(f"invalid neg_proportion={self.neg_proportion!r}: a fraction between 0 and 1")
        if isinstance(self.warmup_epoch, bool) or not isinstance(self.warmup_epoch, int) or self.warmup_epoch < 1:
            raise ConfigError(f"invalid warmup_epoch={self.warmup_epoch!r}: a positive integer (1-based epoch)")


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

# Proposed search ranges, ours: the paper publishes none in its code or README. Each contains every
# published default above with room on both sides.
SEARCH_RANGES: dict[str, dict[str, Range]] = {
    "EM": {"alpha": Range(0.005, 0.5, log=True)},
    "EM+APL": {"alpha": Range(0.005, 0.5, log=True), "beta": Range(0.01, 1.0, log=True),
               "neg_proportion": Range(0.5, 1.0), "warmup_epoch": Range(2, 8, integer=True)},
}

# Test mAP (%) the paper reports, end-to-end, ResNet-50, under Cole et al.'s protocol. It trains on the
# official NUS-WIDE release, not the re-crawled subset the earlier work used (its README, "NUS-WIDE"),
# so its NUS-WIDE column is on other images.
PUBLISHED_MAP = {
    "EM": {"pascal": 89.09, "coco": 70.70, "nuswide": 47.15, "cub": 20.85},
    "EM+APL": {"pascal": 89.19, "coco": 70.87, "nuswide": 47.59, "cub": 21.84},
}

# digits (ours, CPU-sized; no published value), by single runs of 10 epochs, seed 0 (docs/method.md):
# EM's alpha 0.1 (COCO's and NUS-WIDE's: test mAP 99.6; 0.2 gave 98.6, 0.01 collapsed to 26); APL's
# warm-up 3 (CUB's, within the published 3 to 5 of 10 epochs: after epoch 3 the model is at ~89
# validation mAP and its pseudo-negatives were 99.9 % right; 2 gave 99.0, 3 gave 99.4); neg_proportion
# 0.8, below the share of true negatives among digits' unobserved entries (~0.86: 1.3 of 9 are positive;
# VOC 0.98), as 0.9 is below VOC's (0.9 left 4.7 % of the last epoch's pseudo-negatives positive); beta
# 0.2 (NUS-WIDE's; 0.9 gave 97.7). OpenImages has no published value: COCO's, as for the linear phase.
_DIGITS_APL = {"alpha": 0.1, "beta": 0.2, "neg_proportion": 0.8, "warmup_epoch": 3}


def _apl(attr: str) -> dict[str, float]:
    out = {ds: float(getattr(APL_DEFAULTS[ds], attr)) for ds in BENCHMARKS}
    out["openimages"] = out["coco"]
    out["digits"] = _DIGITS_APL[attr]
    return out


_ACK = "AckTheUnknown " + ", ".join(f"{ds} {ACK_LINES[ds]}" for ds in BENCHMARKS)
_EM_ALPHA = Hyper("em_alpha", "EM, EM+APL: weight alpha of the entropy of unobserved entries", _apl("alpha"),
                  _ACK, low=0.0, search=SEARCH_RANGES["EM"]["alpha"])
_APL = (
    _EM_ALPHA,
    Hyper("apl_beta", "EM+APL: weight beta of the pseudo-negative entries", _apl("beta"), _ACK, low=0.0,
          search=SEARCH_RANGES["EM+APL"]["beta"]),
    Hyper("apl_neg_proportion", "EM+APL: share of each class's unobserved entries pseudo-labelled over the run",
          _apl("neg_proportion"), _ACK, low=0.0, high=1.0, search=SEARCH_RANGES["EM+APL"]["neg_proportion"]),
    Hyper("apl_warmup_epoch", "EM+APL: the epoch after whose training pass the first pseudo-labels are "
          "assigned (below --epochs)", {k: int(v) for k, v in _apl("warmup_epoch").items()}, _ACK, low=1.0,
          integer=True, below_epochs=True, search=SEARCH_RANGES["EM+APL"]["warmup_epoch"]),
)
PAPER = ("Zhou et al., Acknowledging the Unknown for Multi-label Learning with Single Positive Labels, "
         "ECCV 2022 (github:Correr-Zhou/SPML-AckTheUnknown)")

SCHEMES = (
    Scheme("EM", "recent", f"{__name__}:em_scheme", hypers=(_EM_ALPHA,), published=end_to_end(PUBLISHED_MAP["EM"]),
           published_in=PAPER),
    Scheme("EM+APL", "recent", f"{__name__}:em_apl_scheme", state=APL_SOFT_LABELS, hypers=_APL, epoch_schedule=True,
           published=end_to_end(PUBLISHED_MAP["EM+APL"]), published_in=PAPER),
)


# --------------------------------------------------------------------------------------------------
# The losses and APL's pseudo-labels
# --------------------------------------------------------------------------------------------------

def _em_entries(logits: torch.Tensor, observed: torch.Tensor, alpha: float) -> torch.Tensor:
    """The B x C loss matrix of EM: -log(p + eps) on observed positives, -alpha * H(p) on unobserved
    entries with H(p) = p * -log(p + eps) + (1-p) * -log(1-p + eps) (AckTheUnknown losses.py:66-70),
    -log(1-p + eps) on observed negatives (ours)."""
    import torch

    from wsml.losses import neg_log

    p = torch.sigmoid(logits)
    q = torch.sigmoid(-logits)                  # 1 - p
    nl_p, nl_q = neg_log(p, EM_LOG_EPSILON), neg_log(q, EM_LOG_EPSILON)
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
    import torch

    return torch.full(observed.shape, math.nan, dtype=torch.float32, device=observed.device)


def em_apl_loss(logits: torch.Tensor, observed: torch.Tensor, soft_labels: torch.Tensor,
                params: APLParams) -> torch.Tensor:
    """EM+APL over a batch: EM, except that an unobserved entry with a soft pseudo-label s (from
    `soft_labels`, B x C, NaN for none) takes beta * (s * -log(p + eps) + (1-s) * -log(1-p + eps))
    (AckTheUnknown losses.py:91-95). Averaged over the B x C entries as EM is."""
    import torch

    from wsml.losses import neg_log


    logits = logits.float()
    loss = _em_entries(logits, observed, params.alpha)
    s = soft_labels.to(device=logits.device, dtype=torch.float32)
    pseudo = (observed == 0) & ~torch.isnan(s)
    s = torch.where(pseudo, s, torch.zeros_like(s))        # no NaN enters the graph, even where unused
    p, q = torch.sigmoid(logits), torch.sigmoid(-logits)
    soft = params.beta * (s * neg_log(p, EM_LOG_EPSILON) + (1 - s) * neg_log(q, EM_LOG_EPSILON))
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
    import torch


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
    import torch


    return ~torch.isnan(soft_labels)


# --------------------------------------------------------------------------------------------------
# As schemes of the trainer: the hyper-parameters from the run's config
# --------------------------------------------------------------------------------------------------

def em_params(cfg: TrainConfig) -> EMParams:
    return EMParams(alpha=cfg.param("em_alpha"))


def apl_params(cfg: TrainConfig) -> APLParams:
    return APLParams(alpha=cfg.param("em_alpha"), beta=cfg.param("apl_beta"),
                     neg_proportion=cfg.param("apl_neg_proportion"),
                     warmup_epoch=int(cfg.param("apl_warmup_epoch")))


def em_scheme(b: Batch) -> LossOutput:
    from wsml.losses import LossOutput

    return LossOutput(em_loss(b.logits, b.observed, em_params(b.run_config())), b.no_selection())


def em_apl_scheme(b: Batch) -> LossOutput:
    """EM+APL; the entries it reports as modified are the pseudo-negatives the batch trained with. Without
    soft labels (none yet: LinearInit's linear phase) it is EM."""
    from wsml.losses import LossOutput

    soft = apl_initial_soft_labels(b.observed) if b.soft_labels is None else b.soft_labels
    loss = em_apl_loss(b.logits, b.observed, soft, apl_params(b.run_config()))
    return LossOutput(loss, (b.observed == 0) & apl_pseudo_labelled(soft.to(b.observed.device)))

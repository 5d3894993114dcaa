"""Losses of the paper's Table 1, each averaged over the B x C entries, and the dispatch of every scheme's
batch loss through the registry (`scheme_loss`; wsml/schemes.py names each scheme's function).

Label matrices hold 1 (observed positive), 0 (unobserved) and -1 (observed
negative). Every function takes logits, not probabilities, and works in fp32
with log-sigmoid forms, so bf16 autocast cannot turn log(0) into inf.
"""
from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wsml import schemes
from wsml.config import TrainConfig
from wsml.large_loss import LargeLossRule, apply_large_loss_rule, select_large_losses

LABEL_SMOOTHING = 0.1  # LSAN, as in the single-positive work


@dataclass
class LossOutput:
    loss: torch.Tensor        # scalar
    selected: torch.Tensor    # B x C bool: entries the large-loss rule modified


def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


def neg_log(probs: torch.Tensor, eps: float) -> torch.Tensor:
    """-log(p + eps): the log with an epsilon inside and no clamp, as the published EM, APL and GR write it."""
    return -torch.log(probs + eps)


def an_targets(observed: torch.Tensor) -> torch.Tensor:
    """Assume negative: 1 for observed positives, 0 for everything else."""
    return (observed == 1).float()


def expected_positive_regularizer(probs: torch.Tensor, expected_positives: float) -> torch.Tensor:
    """(batch mean of each image's summed probabilities - expected positives)^2 / C^2.

    The batch mean is taken inside the square, as the single-positive work's
    `expected_positive_regularizer` does (`(preds.sum(1).mean(0) - k) ** 2`,
    divided by C^2 in its `loss_epr` and `loss_role`).
    """
    num_classes = probs.shape[1]
    return (probs.sum(dim=1).mean() - expected_positives) ** 2 / num_classes ** 2


def _positives_only(logits: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """BCE on observed entries only (positives, and negatives where observed)."""
    loss = torch.zeros_like(logits)
    loss = torch.where(observed == 1, -F.logsigmoid(logits), loss)
    return torch.where(observed == -1, -F.logsigmoid(-logits), loss)


def role_loss(logits: torch.Tensor, estimator_logits: torch.Tensor, observed: torch.Tensor,
              expected_positives: float) -> torch.Tensor:
    """ROLE: the classifier and a per-image label estimator teach each other.

    As the single-positive work's `loss_role`: each side fits the observed
    labels and the other side's probabilities, detached (the classifier's
    cross term trains only the classifier, the estimator's only the
    estimator), and has its own expected-positive regularizer; the entry
    terms of both sides are averaged (0.5 each, then the mean over B x C) and
    so are the two regularizers.
    """
    probs = torch.sigmoid(logits)
    estimates = torch.sigmoid(estimator_logits)
    classifier = _positives_only(logits, observed) + bce(logits, estimates.detach())
    estimator = _positives_only(estimator_logits, observed) + bce(estimator_logits, probs.detach())
    reg = 0.5 * (expected_positive_regularizer(probs, expected_positives)
                 + expected_positive_regularizer(estimates, expected_positives))
    return 0.5 * (classifier + estimator).mean() + reg


def init_role_estimator(observed: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Estimator logits: logit(0.995) for observed positives, logit(0.005) for observed
    negatives, uniform in +-logit(0.6) for the rest (as the ROLE paper initialises them)."""
    bound = math.log(0.6 / 0.4)
    init = (torch.rand(observed.shape, generator=generator) * 2 - 1) * bound
    init[observed == 1] = math.log(0.995 / 0.005)
    init[observed == -1] = math.log(0.005 / 0.995)
    return init


@dataclass
class Batch:
    """What a scheme's batch loss may read (the registry's `Scheme.loss` takes one)."""

    scheme: str
    logits: torch.Tensor                            # B x C, fp32
    observed: torch.Tensor                          # B x C: 1, 0, -1 (LL-Cp: with its corrections)
    complete: torch.Tensor                          # the full labels: read by `full` only
    epoch: int                                      # 1-based; 0 in LinearInit's linear phase
    delta_rel: float = 0.0                          # the LL schemes
    expected_positives: float = 1.0                 # EPR, ROLE
    estimator_logits: torch.Tensor | None = None    # ROLE: the label estimator's rows of the batch
    soft_labels: torch.Tensor | None = None         # EM+APL: the pseudo-labels' rows of the batch (NaN: none)
    epochs: int = 0                                 # the run's epochs (EM+APL, GR)
    config: TrainConfig | None = None               # the resolved run: the scheme's hyper-parameters

    def no_selection(self) -> torch.Tensor:
        return torch.zeros_like(self.observed, dtype=torch.bool)

    def run_config(self) -> TrainConfig:
        """The resolved run, for schemes that read their hyper-parameters (`TrainConfig.param`)."""
        if self.config is None:
            raise ValueError(f"{self.scheme} needs the run's resolved config (its hyper-parameters)")
        return self.config


def full_loss(b: Batch) -> LossOutput:
    return LossOutput(bce(b.logits, (b.complete == 1).float()).mean(), b.no_selection())


def an_loss(b: Batch) -> LossOutput:
    return LossOutput(bce(b.logits, an_targets(b.observed)).mean(), b.no_selection())


def wan_loss(b: Batch) -> LossOutput:
    num_classes = b.logits.shape[1]
    weights = torch.where(b.observed == 0, 1.0 / (num_classes - 1), 1.0)
    return LossOutput((weights * bce(b.logits, an_targets(b.observed))).mean(), b.no_selection())


def lsan_loss(b: Batch) -> LossOutput:
    targets = an_targets(b.observed) * (1 - LABEL_SMOOTHING) + (1 - an_targets(b.observed)) * LABEL_SMOOTHING
    return LossOutput(bce(b.logits, targets).mean(), b.no_selection())


def epr_loss(b: Batch) -> LossOutput:
    reg = expected_positive_regularizer(torch.sigmoid(b.logits), b.expected_positives)
    return LossOutput(_positives_only(b.logits, b.observed).mean() + reg, b.no_selection())


def role_scheme_loss(b: Batch) -> LossOutput:
    if b.estimator_logits is None:
        raise ValueError("ROLE needs the label estimator's logits for the batch")
    return LossOutput(role_loss(b.logits, b.estimator_logits.float(), b.observed, b.expected_positives),
                      b.no_selection())


def large_loss(b: Batch) -> LossOutput:
    """LL-R, LL-Ct, LL-Cp: the AN loss with the large-loss rule of `b.scheme` in `b.epoch`."""
    loss_an = bce(b.logits, an_targets(b.observed))
    rule = LargeLossRule(b.scheme, b.delta_rel)
    selected = select_large_losses(loss_an, b.observed, b.epoch, rule)
    loss = apply_large_loss_rule(loss_an, -F.logsigmoid(b.logits), selected, b.scheme)
    return LossOutput(loss.mean(), selected)


@functools.cache
def loss_function(scheme: str) -> Callable[[Batch], LossOutput]:
    """The batch loss the registry names for `scheme` (imported on first use)."""
    if scheme not in schemes.REGISTRY:
        raise ValueError(f"unknown scheme {scheme!r}")
    module, _, name = schemes.REGISTRY[scheme].loss.partition(":")
    return getattr(importlib.import_module(module), name)


def scheme_loss(scheme: str, logits: torch.Tensor, observed: torch.Tensor, complete: torch.Tensor,
                epoch: int, delta_rel: float, expected_positives: float,
                estimator_logits: torch.Tensor | None = None, *, soft_labels: torch.Tensor | None = None,
                epochs: int = 0, config: TrainConfig | None = None) -> LossOutput:
    """The batch loss of `scheme` for 1-based `epoch` (0: LinearInit's linear phase), through the registry.

    `complete` (the full labels) is used only by `full`; `estimator_logits` only by ROLE;
    `soft_labels` only by EM+APL; `config` (the resolved run, for the scheme's hyper-parameters)
    and `epochs` by the methods since 2022.
    """
    return loss_function(scheme)(Batch(scheme, logits.float(), observed, complete, epoch, delta_rel,
                                       expected_positives, estimator_logits, soft_labels, epochs, config))

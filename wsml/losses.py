"""Losses of the paper's Table 1, each averaged over the B x C entries.

Label matrices hold 1 (observed positive), 0 (unobserved) and -1 (observed
negative). Every function takes logits, not probabilities, and works in fp32
with log-sigmoid forms, so bf16 autocast cannot turn log(0) into inf.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wsml.config import LL_SCHEMES
from wsml.large_loss import LargeLossRule, apply_large_loss_rule, select_large_losses

LABEL_SMOOTHING = 0.1  # LSAN, as in the single-positive work


@dataclass
class LossOutput:
    loss: torch.Tensor        # scalar
    selected: torch.Tensor    # B x C bool: entries the large-loss rule modified


def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


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


def scheme_loss(scheme: str, logits: torch.Tensor, observed: torch.Tensor, complete: torch.Tensor,
                epoch: int, delta_rel: float, expected_positives: float,
                estimator_logits: torch.Tensor | None = None) -> LossOutput:
    """The batch loss of `scheme` for 1-based `epoch`.

    `complete` (the full labels) is used only by `full`; `estimator_logits`
    only by ROLE.
    """
    logits = logits.float()
    no_selection = torch.zeros_like(observed, dtype=torch.bool)
    if scheme == "full":
        return LossOutput(bce(logits, (complete == 1).float()).mean(), no_selection)
    if scheme == "AN":
        return LossOutput(bce(logits, an_targets(observed)).mean(), no_selection)
    if scheme == "WAN":
        num_classes = logits.shape[1]
        weights = torch.where(observed == 0, 1.0 / (num_classes - 1), 1.0)
        return LossOutput((weights * bce(logits, an_targets(observed))).mean(), no_selection)
    if scheme == "LSAN":
        targets = an_targets(observed) * (1 - LABEL_SMOOTHING) + (1 - an_targets(observed)) * LABEL_SMOOTHING
        return LossOutput(bce(logits, targets).mean(), no_selection)
    if scheme == "EPR":
        reg = expected_positive_regularizer(torch.sigmoid(logits), expected_positives)
        return LossOutput(_positives_only(logits, observed).mean() + reg, no_selection)
    if scheme == "ROLE":
        if estimator_logits is None:
            raise ValueError("ROLE needs the label estimator's logits for the batch")
        return LossOutput(role_loss(logits, estimator_logits.float(), observed, expected_positives),
                          no_selection)
    if scheme not in LL_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}")
    loss_an = bce(logits, an_targets(observed))
    rule = LargeLossRule(scheme, delta_rel)
    selected = select_large_losses(loss_an, observed, epoch, rule)
    loss = apply_large_loss_rule(loss_an, -F.logsigmoid(logits), selected, scheme)
    return LossOutput(loss.mean(), selected)

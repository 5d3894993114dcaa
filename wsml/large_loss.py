"""The large-loss rule of the paper (LL-R, LL-Ct, LL-Cp), as pure functions.

`select_large_losses(losses, observed, epoch, rule)` picks which label entries
of a batch are rejected or corrected; `apply_large_loss_rule` turns the AN loss
matrix into the scheme's loss matrix. Both are free of state: LL-Cp's
permanent flips are written by the trainer into its own label matrix.

Tie rule (the published code selects with `>` the k-th value but modifies
`>=`): here exactly `min(k, candidates)` entries are chosen, by loss
descending and, among equal losses, by lower flat index (row-major), so the
entries chosen are the entries modified.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from wsml.config import LL_SCHEMES


@dataclass(frozen=True)
class LargeLossRule:
    scheme: str        # "LL-R", "LL-Ct" or "LL-Cp"
    delta_rel: float   # percent of the batch's entries per epoch (0.2 means 0.2 %)


def num_to_modify(batch_size: int, num_classes: int, epoch: int, rule: LargeLossRule) -> int:
    """k for a batch in `epoch` (1-based), as the paper and its published code compute it: 0 in epoch 1;
    then ceil(B * C * (1 - clean_rate)), the clean rate dropping by delta_rel / 100 after each epoch
    (LL-R, LL-Ct) or held at 1 - delta_rel / 100 (LL-Cp: corrected entries stay corrected)."""
    if rule.scheme not in LL_SCHEMES or epoch <= 1:
        return 0
    epochs_of_decay = 1 if rule.scheme == "LL-Cp" else epoch - 1
    k = batch_size * num_classes * epochs_of_decay * rule.delta_rel / 100
    # round first so that e.g. 16 * 20 * 0.5 / 100 * 10 is 16, not ceil(16.000000000000004)
    return math.ceil(round(k, 9))


def clean_rate(epoch: int, rule: LargeLossRule) -> float:
    """The fraction of unmodified entries the schedule aims at in `epoch`."""
    if rule.scheme not in LL_SCHEMES:
        return 1.0
    if rule.scheme == "LL-Cp":
        return 1.0 if epoch <= 1 else 1.0 - rule.delta_rel / 100
    return max(0.0, 1.0 - (epoch - 1) * rule.delta_rel / 100)


def select_large_losses(losses: torch.Tensor, observed: torch.Tensor, epoch: int,
                        rule: LargeLossRule) -> torch.Tensor:
    """Boolean B x C mask of the unobserved entries with the k largest losses.

    `losses`: B x C loss against the AN targets; `observed`: B x C with 1
    (observed positive), 0 (unobserved), -1 (observed negative). Only 0
    entries are candidates.
    """
    k = num_to_modify(losses.shape[0], losses.shape[1], epoch, rule)
    if k == 0:
        return torch.zeros_like(observed, dtype=torch.bool)
    candidates = (observed == 0).flatten()
    scores = losses.detach().flatten().masked_fill(~candidates, -math.inf)
    # stable sort: equal losses keep row-major order, so ties resolve to lower index
    order = torch.sort(scores, descending=True, stable=True).indices
    chosen_in_order = torch.arange(order.numel(), device=order.device) < k
    chosen_in_order &= candidates[order]        # fewer candidates than k: take them all
    mask = torch.zeros_like(candidates)
    mask[order] = chosen_in_order
    return mask.view_as(observed)


def apply_large_loss_rule(loss_an: torch.Tensor, loss_positive: torch.Tensor,
                          selected: torch.Tensor, scheme: str) -> torch.Tensor:
    """LL-R: selected losses become 0; LL-Ct / LL-Cp: the loss against target 1."""
    if scheme == "LL-R":
        return loss_an.masked_fill(selected, 0.0)
    return torch.where(selected, loss_positive, loss_an)

"""Mean average precision in percent, with per-class AP from scikit-learn.

As in the published code, a class with no positive in the evaluated set gets
AP 0 (kept for comparability); `MapResult.empty_classes` says how many.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score


@dataclass
class MapResult:
    map: float                 # percent
    per_class: np.ndarray      # AP per class, percent
    empty_classes: int         # classes with no positive among the evaluated entries


def mean_average_precision(scores: np.ndarray, labels: np.ndarray, observed_only: bool = False) -> MapResult:
    """mAP of `scores` (N x C) against `labels` (N x C in {-1, 0, 1}).

    Complete labels (benchmark protocol): 1 is positive, anything else negative.
    `observed_only` (OpenImages): AP per class over the entries labelled 1 or -1.
    """
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    ap = np.zeros(labels.shape[1])
    empty = 0
    for c in range(labels.shape[1]):
        keep = labels[:, c] != 0 if observed_only else slice(None)
        positive = labels[keep, c] == 1
        if not positive.any():
            empty += 1
            continue
        ap[c] = average_precision_score(positive, scores[keep, c])
    return MapResult(map=float(100 * ap.mean()), per_class=100 * ap, empty_classes=empty)

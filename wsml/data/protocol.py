"""The benchmark protocol: the train/validation split and the observed labels."""
from __future__ import annotations

import numpy as np

from wsml.errors import DataError


def split_train_val(num_images: int, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of train and validation: `val_frac` of the official train split
    goes to validation, drawn with `seed` (the paper: 20 %, seed 1200)."""
    num_val = int(round(val_frac * num_images))
    order = np.random.RandomState(seed).permutation(num_images)
    return np.sort(order[: num_images - num_val]), np.sort(order[num_images - num_val:])


def observe_single_positive(labels: np.ndarray, seed: int) -> np.ndarray:
    """Keep one positive per image, drawn uniformly with `seed`; others become 0
    (unobserved). Observed negatives (-1) are kept: they are real observations."""
    rng = np.random.RandomState(seed)
    observed = np.where(labels == -1, -1, 0).astype(np.int8)
    for i in range(labels.shape[0]):
        positives = np.flatnonzero(labels[i] == 1)
        if positives.size == 0:
            raise DataError(f"training image {i} has no positive label: single-positive training "
                            "needs at least one; drop such images when preparing the data")
        observed[i, rng.choice(positives)] = 1
    return observed

"""The published numbers of "Large Loss Matters in Weakly Supervised
Multi-Label Classification" (Kim, Kim, Akata, Lee, CVPR 2022), as data.

Test mAP in percent, ResNet-50. `aggregate.py` puts them beside our own
numbers; nothing here is computed. Table 1's numbers are kept with each scheme
in the registry (wsml/schemes.py); the methods published since, with their own
papers' numbers, are the recent-methods table (`orchestration.report.tables`).
"""
from __future__ import annotations

from wsml import schemes

# Our scheme names in the paper's row order (Table 1): the registry's baselines and large-loss schemes.
METHODS = schemes.names("baseline") + schemes.names("large-loss")
# The paper's own row labels.
METHOD_LABELS = {
    "full": "Full label", "AN": "Naive AN", "WAN": "WAN", "LSAN": "LSAN", "EPR": "EPR",
    "ROLE": "ROLE", "LL-R": "LL-R", "LL-Ct": "LL-Ct", "LL-Cp": "LL-Cp",
}

# Training modes (the `mode` config value) and the paper's column labels.
MODES = ("end-to-end", "linear-init")
MODE_LABELS = {"end-to-end": "End-to-end", "linear-init": "LinearInit"}

# Data set config names, the paper's four first, and their column labels.
PAPER_DATASETS = ("pascal", "coco", "nuswide", "cub")
DATASETS = PAPER_DATASETS + ("openimages", "digits")
DATASET_LABELS = {
    "pascal": "VOC", "coco": "COCO", "nuswide": "NUS", "cub": "CUB",
    "openimages": "OpenImages", "digits": "digits",
}

# TABLE1[(method, dataset, mode)] = published test mAP: the registry's numbers from the paper's Table 1
# (wsml/schemes.py, `published` of the schemes `published_in` it).
TABLE1: dict[tuple[str, str, str], float] = {
    (s.name, ds, mode): value
    for s in schemes.REGISTRY.values() if s.published_in == schemes.LL_PAPER
    for (ds, mode), value in s.published.items()
}

# OpenImages V3 (real partial labels): mAP per class-frequency group and over
# all classes. The paper reports one setting for this data set; we compare it
# with our end-to-end runs.
OPENIMAGES_GROUPS = ("G1", "G2", "G3", "G4", "G5", "All")
OPENIMAGES_MODE = "end-to-end"
# The metric each group is read from on our runs.
OPENIMAGES_METRICS = {"G1": "test_map_g1", "G2": "test_map_g2", "G3": "test_map_g3",
                      "G4": "test_map_g4", "G5": "test_map_g5", "All": "test_map"}
_OPENIMAGES_ROWS = {
    "AN":    (77.1, 78.7, 81.5, 84.1, 88.8, 82.0),
    "LL-R":  (77.4, 79.1, 82.0, 84.5, 89.5, 82.5),
    "LL-Ct": (77.7, 79.3, 82.1, 84.7, 89.4, 82.6),
    "LL-Cp": (77.6, 79.1, 81.9, 84.6, 89.4, 82.5),
}
# OPENIMAGES[(method, group)] = published mAP.
OPENIMAGES: dict[tuple[str, str], float] = {
    (method, group): value
    for method, values in _OPENIMAGES_ROWS.items()
    for group, value in zip(OPENIMAGES_GROUPS, values, strict=True)
}


def table1(method: str, dataset: str, mode: str) -> float | None:
    """The published Table 1 test mAP, or None where the paper has none."""
    return TABLE1.get((method, dataset, mode))


def openimages(method: str, group: str, mode: str = OPENIMAGES_MODE) -> float | None:
    """The published OpenImages mAP of a group ("G1".."G5", "All"), or None."""
    if mode != OPENIMAGES_MODE:
        return None
    return OPENIMAGES.get((method, group))


# The authors' best settings, end-to-end, published by the paper's authors after the code, in
# the published repository's issue #4 (https://github.com/snucml/LargeLossMatters/issues/4,
# answered 2022-11-21); the published code's defaults (Adam, lr 1e-5, delta_rel 0.2) are not these.
# delta_rel was chosen per scheme by a grid search over {0.1, ..., 0.5} (issue #8 there).
# data set -> (optimizer, backbone lr, {scheme: delta_rel}); the head's lr is 10x.
_AUTHORS_BEST = {
    "pascal": ("sgd", 5e-3, {"LL-R": 0.2, "LL-Ct": 0.2, "LL-Cp": 0.1}),
    "coco": ("adam", 1e-5, {"LL-R": 0.4, "LL-Ct": 0.2, "LL-Cp": 0.2}),
    "nuswide": ("adam", 1e-5, {"LL-R": 0.4, "LL-Ct": 0.2, "LL-Cp": 0.2}),
    "cub": ("adam", 7.5e-5, {"LL-R": 0.4, "LL-Ct": 0.4, "LL-Cp": 0.2}),
}


def authors_best(dataset: str, scheme: str) -> dict | None:
    """{scheme, optimizer, lr, delta_rel} of the authors' best setting, or None where they gave none."""
    if dataset not in _AUTHORS_BEST or scheme not in _AUTHORS_BEST[dataset][2]:
        return None
    optimizer, lr, deltas = _AUTHORS_BEST[dataset]
    return {"scheme": scheme, "optimizer": optimizer, "lr": lr, "delta_rel": deltas[scheme]}

"""The published numbers of "Bridging the Gap between Model Explanations in
Partially Annotated Multi-label Classification" (Kim, Kim, Jeong, Schmid,
Akata, Lee, CVPR 2023; "BoostLU"), as data.

Test mAP in percent, in the paper's row order (its two tables, also shown in
the authors' README: github.com/youngwk/BridgeGapExplanationPAMC,
imgs/quantitative1.png and imgs/quantitative2.png). The paper reran its baselines,
so its LL-R, LL-Ct and LL-Cp rows differ from the 2022 paper's Table 1
(`paper.py`); each BoostLU row is to be read against the row above it. The
authors' default is alpha = 5 (`--alpha` in their config.py). Every row says
which of our configurations it compares with: `scheme` (our name; None where
we do not implement the method, so our cell is "–"), `mode` and whether
BoostLU is on (`boostlu_alpha` set). Nothing here is computed.
"""
from __future__ import annotations

from dataclasses import dataclass

PAPER_ALPHA = 5.0


@dataclass(frozen=True)
class Row:
    label: str              # the paper's row label
    scheme: str | None      # our scheme; None: not implemented here
    mode: str = "end-to-end"
    boostlu: bool = False


# Single positive label (the paper's first table): data set config names and the paper's column labels.
DATASETS = ("pascal", "coco", "nuswide", "cub")
DATASET_LABELS = {"pascal": "VOC", "coco": "COCO", "nuswide": "NUS", "cub": "CUB"}

# row key -> (row, (VOC, COCO, NUS, CUB)).
_SINGLE_POSITIVE = {
    "full":                (Row("Full Label", "full"),                     (89.42, 76.78, 52.08, 30.90)),
    "AN":                  (Row("AN", "AN"),                               (85.89, 64.92, 42.27, 18.31)),
    "LS":                  (Row("LS", "LSAN"),                             (87.90, 67.15, 43.77, 16.26)),
    "ASL":                 (Row("ASL", None),                              (87.76, 68.78, 46.93, 18.81)),
    "ROLE":                (Row("ROLE", "ROLE"),                           (87.77, 67.04, 41.63, 13.66)),
    "ROLE + LinearInit":   (Row("ROLE + LI", "ROLE", mode="linear-init"),  (88.26, 69.12, 45.98, 14.86)),
    "EM":                  (Row("EM", "EM"),                               (89.09, 70.70, 47.15, 20.85)),
    "EM + APL":            (Row("EM + APL", "EM+APL"),                     (89.19, 70.87, 47.59, 21.84)),
    "LL-R":                (Row("LL-R", "LL-R"),                           (88.27, 70.70, 48.76, 19.56)),
    "LL-R + BoostLU":      (Row("+ BoostLU", "LL-R", boostlu=True),        (89.29, 72.89, 49.59, 19.80)),
    "LL-Ct":               (Row("LL-Ct", "LL-Ct"),                         (87.79, 70.29, 48.08, 19.06)),
    "LL-Ct + BoostLU":     (Row("+ BoostLU", "LL-Ct", boostlu=True),       (88.61, 71.78, 48.37, 19.25)),
    "LL-Cp":               (Row("LL-Cp", "LL-Cp"),                         (87.44, 70.27, 47.92, 19.21)),
    "LL-Cp + BoostLU":     (Row("+ BoostLU", "LL-Cp", boostlu=True),       (87.81, 71.41, 48.61, 19.34)),
}
SINGLE_POSITIVE_ROWS: dict[str, Row] = {key: row for key, (row, _) in _SINGLE_POSITIVE.items()}
# SINGLE_POSITIVE[(row key, dataset)] = published test mAP.
SINGLE_POSITIVE: dict[tuple[str, str], float] = {
    (key, ds): value
    for key, (_, values) in _SINGLE_POSITIVE.items()
    for ds, value in zip(DATASETS, values, strict=True)
}

# OpenImages V3 (real partial labels, the paper's second table): mAP per class-frequency group
# (the groups and metric names of `paper.py`) and over all classes. The first four rows are other
# authors' methods, which we do not implement.
OPENIMAGES_GROUPS = ("G1", "G2", "G3", "G4", "G5", "All")
_OPENIMAGES = {
    "CNN-RNN":             (Row("CNN-RNN", None),                          (68.76, 69.70, 74.18, 78.52, 84.61, 75.16)),
    "Curriculum Labeling": (Row("Curriculum Labeling", None),              (70.37, 71.32, 76.23, 80.54, 86.81, 77.05)),
    "IMCL":                (Row("IMCL", None),                             (70.95, 72.59, 77.64, 81.83, 87.34, 78.07)),
    "P-ASL":               (Row("P-ASL", None),                            (73.19, 78.61, 85.11, 87.70, 90.61, 83.03)),
    "LL-R":                (Row("LL-R", "LL-R"),                           (77.76, 79.07, 81.94, 84.51, 89.36, 82.53)),
    "LL-R + BoostLU":      (Row("+ BoostLU", "LL-R", boostlu=True),        (79.28, 80.81, 83.32, 85.63, 90.27, 83.86)),
    "LL-Ct":               (Row("LL-Ct", "LL-Ct"),                         (77.76, 79.18, 81.97, 84.46, 89.51, 82.58)),
    "LL-Ct + BoostLU":     (Row("+ BoostLU", "LL-Ct", boostlu=True),       (79.43, 80.75, 83.41, 85.70, 90.41, 83.94)),
    "LL-Cp":               (Row("LL-Cp", "LL-Cp"),                         (77.49, 79.22, 81.89, 84.51, 89.18, 82.46)),
    "LL-Cp + BoostLU":     (Row("+ BoostLU", "LL-Cp", boostlu=True),       (79.53, 81.04, 83.40, 85.85, 90.39, 84.04)),
}
OPENIMAGES_ROWS: dict[str, Row] = {key: row for key, (row, _) in _OPENIMAGES.items()}
# OPENIMAGES[(row key, group)] = published mAP.
OPENIMAGES: dict[tuple[str, str], float] = {
    (key, group): value
    for key, (_, values) in _OPENIMAGES.items()
    for group, value in zip(OPENIMAGES_GROUPS, values, strict=True)
}


def single_positive(key: str, dataset: str) -> float | None:
    """The published single-positive test mAP of a row ("LL-R + BoostLU", ...), or None."""
    return SINGLE_POSITIVE.get((key, dataset))


def openimages(key: str, group: str) -> float | None:
    """The published OpenImages mAP of a row and group ("G1".."G5", "All"), or None."""
    return OPENIMAGES.get((key, group))


def row_key(scheme: str, mode: str, boostlu: bool, rows: dict[str, Row] = SINGLE_POSITIVE_ROWS) -> str | None:
    """The row a configuration of ours fills (our LinearInit LL rows have none), or None."""
    for key, row in rows.items():
        if (row.scheme, row.mode, row.boostlu) == (scheme, mode, boostlu):
            return key
    return None

"""Everything one run trains and evaluates on, as uint8 image arrays and label matrices.

Benchmarks come from the published layout (`wsml.data.formats`), split and
observed by the benchmark protocol, with images decoded once per node into the
image cache (`wsml.data.cache`); `digits` is generated in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsml.config import EXPECTED_POSITIVES, TrainConfig
from wsml.data.protocol import observe_single_positive, split_train_val


@dataclass
class Split:
    images: np.ndarray        # uint8 (N, H, W, 3); a read-only memmap for benchmarks
    labels: np.ndarray        # int8 (N, C): complete labels (OpenImages: its partial labels)


@dataclass
class WSMLData:
    name: str
    class_names: list[str]
    train: Split
    val: Split
    test: Split
    train_observed: np.ndarray    # int8 (N, C): the observed labels training starts from
    expected_positives: float     # for EPR and ROLE
    observed_only_metric: bool    # OpenImages: AP over observed entries only
    image_key: str                # identifies the images (for the LinearInit feature cache)
    bad_images: int = 0           # unreadable images skipped (--skip-bad-images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_data(cfg: TrainConfig) -> WSMLData:
    data = _load_digits(cfg) if cfg.dataset == "digits" else _load_formatted(cfg)
    if cfg.max_train_images is not None and cfg.max_train_images < len(data.train.labels):
        n = cfg.max_train_images
        data.train = Split(data.train.images[:n], data.train.labels[:n])
        data.train_observed = data.train_observed[:n]
    return data


def _load_digits(cfg: TrainConfig) -> WSMLData:
    from wsml.data.digits import CLASS_NAMES, make_digits

    splits = make_digits()
    train = Split(*splits["train"])
    return WSMLData(
        name="digits", class_names=list(CLASS_NAMES), train=train,
        val=Split(*splits["val"]), test=Split(*splits["test"]),
        train_observed=observe_single_positive(train.labels, cfg.obs_seed),
        expected_positives=float((train.labels == 1).sum(1).mean()),
        observed_only_metric=False, image_key="digits:v2")


def _load_formatted(cfg: TrainConfig) -> WSMLData:
    from wsml.data.cache import load_image_cache
    from wsml.data.formats import read_formatted

    raw = read_formatted(Path(cfg.data_root))
    partial = cfg.dataset == "openimages"   # real partial labels: no split, no sampling
    train_idx, val_idx = split_train_val(len(raw.train_labels), cfg.val_frac, cfg.split_seed)
    if raw.train_labels_obs is not None:
        observed_all = raw.train_labels_obs.astype(np.int8)
    elif partial:
        observed_all = raw.train_labels.astype(np.int8)
    else:
        observed_all = None

    def images(paths: np.ndarray):
        return load_image_cache(list(paths), cfg.image_size, Path(cfg.cache_dir) / "images",
                                skip_bad=cfg.skip_bad_images)

    train_cache = images(raw.train_images)
    test_cache = images(raw.val_images)
    train_labels = raw.train_labels[train_idx]
    train_observed = (observed_all[train_idx] if observed_all is not None
                      else observe_single_positive(train_labels, cfg.obs_seed))
    expected = cfg.expected_positives or EXPECTED_POSITIVES.get(
        cfg.dataset, float((train_labels == 1).sum(1).mean()))
    # The train and validation parts index into one cached array of the official train split.
    return WSMLData(
        name=cfg.dataset, class_names=list(raw.class_names),
        train=Split(_Rows(train_cache.array, train_idx), train_labels),
        val=Split(_Rows(train_cache.array, val_idx), raw.train_labels[val_idx]),
        test=Split(test_cache.array, raw.val_labels),
        train_observed=train_observed, expected_positives=float(expected),
        observed_only_metric=partial,
        image_key=f"{cfg.dataset}:{Path(cfg.data_root).resolve()}:{cfg.image_size}:"
                  f"{cfg.split_seed}:{cfg.val_frac}:{len(raw.train_labels)}:{len(raw.val_labels)}",
        bad_images=len(train_cache.bad) + len(test_cache.bad))


class _Rows:
    """A row subset of a memmapped array that reads only the rows asked for."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, rows
        self.shape = (len(rows),) + array.shape[1:]
        self.dtype = array.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        return self.array[self.rows[index]]

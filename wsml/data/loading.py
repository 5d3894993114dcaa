"""Everything one run trains and evaluates on, as uint8 image arrays and label matrices.

Benchmarks come from the published layout (`wsml.data.formats`), split and
observed by the benchmark protocol, with images decoded and resized once into an
image cache: the raw uint8 memmap (`wsml.data.cache`) for small data sets, JPEG
shards (`wsml.data.compact`) above `RAW_CACHE_MAX_BYTES`; `digits` is generated
in memory.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsml.config import EXPECTED_POSITIVES, TrainConfig
from wsml.data.protocol import observe_single_positive, split_train_val

# `image_cache: auto` keeps raw uint8 pixels up to this size (train + test images), JPEG shards
# above. From the page cache, raw pixels cost ~20x less CPU than decoding JPEGs (bench/loader.py),
# but once they no longer fit there an epoch reads 602 KB per 448 px image from storage, which one
# node's disk (let alone shared network storage) delivers slower than its GPUs train, whereas
# decoding scales with a trial's cores. 16 GB fits with room to spare in the 32 GiB of the smallest
# GPU worker of cluster.yaml and takes VOC (7 GB at 448 px) and CUB (7 GB), not COCO (74 GB).
RAW_CACHE_MAX_BYTES = 16 * 10**9


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
    # what the run trains and is scored on, {part: "<rows>:<hash>"}: saved in checkpoints, a
    # resume on other data is refused (see `fingerprint_changes`)
    fingerprint: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_data(cfg: TrainConfig) -> WSMLData:
    data = _load_digits(cfg) if cfg.dataset == "digits" else _load_formatted(cfg)
    if cfg.max_train_images is not None and cfg.max_train_images < len(data.train.labels):
        n = cfg.max_train_images
        data.train = Split(data.train.images[:n], data.train.labels[:n])
        data.train_observed = data.train_observed[:n]
    data.fingerprint.update({
        "training labels": _digest(data.train.labels), "observed labels": _digest(data.train_observed),
        "validation labels": _digest(data.val.labels), "test labels": _digest(data.test.labels)})
    return data


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data)
    return f"{sum(len(a) for a in arrays)}:{h.hexdigest()[:16]}"


def fingerprint_changes(saved: dict[str, str], now: dict[str, str]) -> list[str]:
    """The parts of the data that differ between two fingerprints, e.g. ["images (12 then, 11 now)"]."""
    changed = []
    for part, value in now.items():
        old = saved.get(part)
        if old is not None and old != value:
            rows_then, rows_now = old.split(":")[0], value.split(":")[0]
            changed.append(part if rows_then == rows_now else f"{part} ({rows_then} rows then, {rows_now} now)")
    return changed


def _load_digits(cfg: TrainConfig) -> WSMLData:
    from wsml.data.digits import CLASS_NAMES, make_digits

    splits = make_digits()
    train = Split(*splits["train"])
    return WSMLData(
        name="digits", class_names=list(CLASS_NAMES), train=train,
        val=Split(*splits["val"]), test=Split(*splits["test"]),
        train_observed=observe_single_positive(train.labels, cfg.obs_seed),
        expected_positives=float((train.labels == 1).sum(1).mean()),
        observed_only_metric=False, image_key="digits:v2",
        fingerprint={"images": _digest(*(s[0] for s in splits.values()))})


def image_cache_format(cfg: TrainConfig, num_images: int) -> str:
    """`raw` or `compact`: the configured one, or for `auto` the one the data set's size calls for."""
    if cfg.image_cache != "auto":
        return cfg.image_cache
    raw_bytes = num_images * cfg.image_size * cfg.image_size * 3
    return "raw" if raw_bytes <= RAW_CACHE_MAX_BYTES else "compact"


def image_cache_root(cfg: TrainConfig) -> Path:
    return Path(cfg.cache_dir) / "images"


def compact_plans(cfg: TrainConfig) -> list:
    """The compact-cache entries (`wsml.data.compact.CompactPlan`) a run with `cfg` reads, created
    if new and not built: none when it reads the raw cache or `digits`. For building them
    before the trials start (orchestration/image_cache.py)."""
    from wsml.data.compact import plan
    from wsml.data.formats import read_formatted

    cfg = cfg.resolve()
    if cfg.dataset == "digits":
        return []
    raw = read_formatted(Path(cfg.data_root))
    if image_cache_format(cfg, len(raw.train_paths) + len(raw.val_paths)) != "compact":
        return []
    return [plan(paths, cfg.image_size, image_cache_root(cfg), image_root=str(raw.image_root))
            for paths in (raw.train_paths, raw.val_paths)]


def _load_formatted(cfg: TrainConfig) -> WSMLData:
    from wsml.data.cache import load_image_cache
    from wsml.data.compact import load_compact_cache
    from wsml.data.formats import read_formatted

    raw = read_formatted(Path(cfg.data_root))
    compact = image_cache_format(cfg, len(raw.train_paths) + len(raw.val_paths)) == "compact"
    partial = cfg.dataset == "openimages"   # real partial labels: no split, no sampling
    train_idx, val_idx = split_train_val(len(raw.train_labels), cfg.val_frac, cfg.split_seed)
    if raw.train_labels_obs is not None:
        observed_all = raw.train_labels_obs          # int8 (memory-mapped): rows are copied below
    elif partial:
        observed_all = raw.train_labels
    else:
        observed_all = None

    def images(split: str):
        if compact:  # paths stay relative (memory-mapped) for millions of images
            return load_compact_cache(getattr(raw, f"{split}_paths"), cfg.image_size, image_cache_root(cfg),
                                      image_root=str(raw.image_root), skip_bad=cfg.skip_bad_images)
        return load_image_cache(list(getattr(raw, f"{split}_images")), cfg.image_size, image_cache_root(cfg),
                                skip_bad=cfg.skip_bad_images)

    train_cache = images("train")
    test_cache = images("val")
    # The images as listed: paths relative to the image root and file sizes. Not the absolute
    # root or mtimes, which change when the data set is copied elsewhere (another node, shared
    # storage) although it is the same; not the pixels, which would mean reading every file.
    listed = hashlib.sha256()
    for paths, sizes in ((raw.train_paths, train_cache.file_sizes), (raw.val_paths, test_cache.file_sizes)):
        for path, size in zip(paths.tolist(), sizes.tolist()):
            listed.update(f"{path}\0{size}\n".encode())
    images_id = f"{len(raw.train_paths) + len(raw.val_paths)}:{listed.hexdigest()[:16]}"
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
        # the compact cache's pixels differ slightly: LinearInit's features are cached apart
        image_key=f"{cfg.dataset}:{Path(cfg.data_root).resolve()}:{cfg.image_size}:"
                  f"{cfg.split_seed}:{cfg.val_frac}:{len(raw.train_labels)}:{len(raw.val_labels)}"
                  + (":compact" if compact else ""),
        bad_images=len(train_cache.bad) + len(test_cache.bad), fingerprint={"images": images_id})


class _Rows:
    """A row subset of a memmapped (or compact-cache) array that reads only the rows asked for."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, rows
        self.shape = (len(rows),) + array.shape[1:]
        self.dtype = array.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):  # a subset again: nothing read yet
            return _Rows(self.array, self.rows[index])
        return self.array[self.rows[index]]

    def encoded(self, index):
        """The rows' JPEG bytes (compact cache only): see `CompactImages.encoded`."""
        return self.array.encoded(self.rows[index])

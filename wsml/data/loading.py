"""Everything one run trains and evaluates on, as uint8 image arrays and label matrices.

Benchmarks come from the published layout (`wsml.data.formats`), split and
observed by the benchmark protocol, with images decoded and resized once into an
image cache: the raw uint8 memmap (`wsml.data.cache`) for small data sets, JPEG
shards (`wsml.data.compact`) above `RAW_CACHE_MAX_BYTES`; `digits` is generated
in memory.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from wsml.config import EXPECTED_POSITIVES, TrainConfig, filled
from wsml.data.protocol import observe_single_positive, split_train_val
from wsml.errors import TooManySkipped

if TYPE_CHECKING:     # the caches are imported when they are read (PIL, filelock)
    from wsml.data.cache import ImageArray
    from wsml.data.compact_images import CompactImages

# `image_cache: auto` keeps raw uint8 pixels up to this size (train + test images), JPEG shards
# above. From the page cache, raw pixels cost ~20x less CPU than decoding JPEGs (bench/loader.py),
# but once they no longer fit there an epoch reads 602 KB per 448 px image from storage, which one
# node's disk (let alone shared network storage) delivers slower than its GPUs train, whereas
# decoding scales with a trial's cores. 16 GB fits with room to spare in the 32 GiB of the smallest
# GPU worker of cluster.yaml and takes VOC (7 GB at 448 px) and CUB (7 GB), not COCO (74 GB).
RAW_CACHE_MAX_BYTES = 16 * 10**9
# --skip-bad-images: a run refuses to train when more than this percentage of a split's images were
# skipped as unreadable (or when a class lost every observed positive of the training split to
# skips). A few broken files of a large data set are worth skipping; a wrong image folder skips
# all of them, and training on blank images would still write a test mAP that looks like a result.
MAX_SKIPPED_PERCENT = 1.0


@dataclass
class Split:
    images: ImageArray        # uint8 (N, H, W, 3); read-only, memory-mapped or decoded on access for benchmarks
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
    # the identity of that data (`data_id`): what a sweep logs with every result and compares
    # before reusing one
    data_id: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_data(cfg: TrainConfig) -> WSMLData:
    return _load_digits(cfg) if cfg.dataset == "digits" else _load_formatted(cfg)


def _data_root(cfg: TrainConfig) -> Path:
    return Path(filled(cfg.data_root, "data_root"))


@dataclass
class _Labels:
    """The label side of a run's data, by the benchmark protocol: the split, the observed labels and
    `--max-train-images` applied. Reading it opens no image."""

    train_rows: np.ndarray        # rows of the official train split that are training images
    val_rows: np.ndarray          # ... and validation images
    train: np.ndarray             # complete labels of the training images
    train_observed: np.ndarray
    val: np.ndarray
    test: np.ndarray
    mean_positives: float         # positives per training image before --max-train-images (EPR's, ROLE's prior)

    def fingerprint(self) -> dict[str, str]:
        """The label parts of the checkpoint fingerprint."""
        return {"training labels": _digest(self.train), "observed labels": _digest(self.train_observed),
                "validation labels": _digest(self.val), "test labels": _digest(self.test)}


def _protocol_labels(cfg: TrainConfig, train_labels: np.ndarray, test_labels: np.ndarray,
                     observed_labels: np.ndarray | None) -> _Labels:
    """The labels a run with `cfg` trains and is scored on, from the official splits' labels."""
    train_rows, val_rows = split_train_val(len(train_labels), cfg.val_frac, cfg.split_seed)
    mean_positives = float((train_labels[train_rows] == 1).sum(1).mean())
    if cfg.max_train_images is not None:
        train_rows = train_rows[:cfg.max_train_images]
    if observed_labels is None and cfg.dataset == "openimages":
        observed_labels = train_labels               # real partial labels: nothing to sample
    train = train_labels[train_rows]
    observed = (observed_labels[train_rows] if observed_labels is not None    # memory-mapped: rows copied
                else observe_single_positive(train, cfg.obs_seed))
    return _Labels(train_rows=train_rows, val_rows=val_rows, train=train, train_observed=observed,
                   val=train_labels[val_rows], test=test_labels, mean_positives=mean_positives)


# Bump when the protocol (`_protocol_labels`, `wsml.data.protocol`) would derive other labels from
# the same prepared files: results made before would not be of the same data.
PROTOCOL_VERSION = 1
_HASH_BLOCK_CELLS = 1 << 24     # cells hashed at a time: memory-mapped label matrices are never copied whole


def _identity(cfg: TrainConfig, class_names: list[str], arrays: list[np.ndarray | None]) -> str:
    """`data_id` of the official splits' `arrays` (image lists or pixels, labels, observed labels)."""
    sampled = cfg.dataset != "openimages" and arrays[-1] is None
    h = hashlib.sha256(json.dumps({
        "protocol": PROTOCOL_VERSION, "dataset": cfg.dataset, "classes": list(class_names),
        "val_frac": cfg.val_frac, "split_seed": cfg.split_seed, "max_train_images": cfg.max_train_images,
        "obs_seed": cfg.obs_seed if sampled else None}, sort_keys=True).encode())
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        h.update(f"{a.dtype.str}{a.shape}".encode())
        rows = max(1, _HASH_BLOCK_CELLS // max(1, int(np.prod(a.shape[1:], dtype=np.int64))))
        for start in range(0, len(a), rows):
            h.update(np.ascontiguousarray(a[start:start + rows]).data)
    return h.hexdigest()[:16]


def data_id(cfg: TrainConfig) -> str:
    """The identity of the data a run with `cfg` trains and is scored on: a hash of the prepared
    set's files as read (the image lists, relative to the image root; the labels; the observed
    labels when given), its class names, and the protocol that derives the run's data from them
    (the train/validation split, the seed of the sampled observed labels, --max-train-images).
    The same data prepared twice or copied elsewhere has one identity; other labels, other
    observed labels, another split or another image list never share it.

    For a sweep's driver before any trial runs: it reads the prepared .npy files and opens no image
    (the digits are generated). `load_data` computes it from the same arrays (`WSMLData.data_id`).
    Unlike the checkpoint fingerprint it holds no file sizes: a stat per image is not cheap on
    shared storage.
    """
    from wsml.data.digits import make_digits
    from wsml.data.formats import read_formatted

    cfg = cfg.resolve()
    if cfg.dataset == "digits":
        return _digits_identity(cfg, make_digits())
    return _formatted_identity(cfg, read_formatted(_data_root(cfg)))


def _formatted_identity(cfg: TrainConfig, raw) -> str:
    return _identity(cfg, raw.class_names, [raw.train_paths, raw.val_paths, raw.train_labels, raw.val_labels,
                                            raw.train_labels_obs])


def _digits_identity(cfg: TrainConfig, splits: dict) -> str:
    from wsml.data.digits import CLASS_NAMES

    return _identity(cfg, CLASS_NAMES, [a for split in splits.values() for a in split] + [None])


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
    images, complete = splits["train"]
    n = len(complete) if cfg.max_train_images is None else min(cfg.max_train_images, len(complete))
    # digits has its own validation split: no protocol split; EPR's and ROLE's prior over all of train
    labels = _Labels(train_rows=np.arange(n), val_rows=np.arange(len(splits["val"][1])), train=complete[:n],
                     train_observed=observe_single_positive(complete[:n], cfg.obs_seed), val=splits["val"][1],
                     test=splits["test"][1], mean_positives=float((complete == 1).sum(1).mean()))
    return WSMLData(
        name="digits", class_names=list(CLASS_NAMES), train=Split(images[:n], labels.train),
        val=Split(*splits["val"]), test=Split(*splits["test"]),
        train_observed=labels.train_observed,
        expected_positives=labels.mean_positives,
        observed_only_metric=False, image_key="digits:v2",
        fingerprint={"images": _digest(*(s[0] for s in splits.values())), **labels.fingerprint()},
        data_id=_digits_identity(cfg, splits))


def image_cache_format(cfg: TrainConfig, num_images: int) -> str:
    """`raw` or `compact`: the configured one, or for `auto` the one the data set's size calls for."""
    if cfg.image_cache != "auto":
        return cfg.image_cache
    size = filled(cfg.image_size, "image_size")
    raw_bytes = num_images * size * size * 3
    return "raw" if raw_bytes <= RAW_CACHE_MAX_BYTES else "compact"


def image_cache_root(cfg: TrainConfig) -> Path:
    return Path(filled(cfg.cache_dir, "cache_dir")) / "images"


def compact_plans(cfg: TrainConfig) -> list:
    """The compact-cache entries (`wsml.data.compact.CompactPlan`) a run with `cfg` reads, created
    if new and not built: none when it reads the raw cache or `digits`. For building them
    before the trials start (orchestration/image_cache.py)."""
    from wsml.data.compact import plan
    from wsml.data.formats import read_formatted

    cfg = cfg.resolve()
    if cfg.dataset == "digits":
        return []
    raw = read_formatted(_data_root(cfg))
    if image_cache_format(cfg, len(raw.train_paths) + len(raw.val_paths)) != "compact":
        return []
    size = filled(cfg.image_size, "image_size")
    return [plan(paths, size, image_cache_root(cfg), image_root=str(raw.image_root))
            for paths in (raw.train_paths, raw.val_paths)]


def _load_formatted(cfg: TrainConfig) -> WSMLData:
    from wsml.data.cache import load_image_cache
    from wsml.data.compact_images import load_compact_cache
    from wsml.data.formats import read_formatted

    raw = read_formatted(_data_root(cfg))
    compact = image_cache_format(cfg, len(raw.train_paths) + len(raw.val_paths)) == "compact"
    labels = _protocol_labels(cfg, raw.train_labels, raw.val_labels, raw.train_labels_obs)
    size = filled(cfg.image_size, "image_size")

    def images(split: str):
        if compact:  # paths stay relative (memory-mapped) for millions of images
            return load_compact_cache(getattr(raw, f"{split}_paths"), size, image_cache_root(cfg),
                                      image_root=str(raw.image_root), skip_bad=cfg.skip_bad_images)
        return load_image_cache(list(getattr(raw, f"{split}_images")), size, image_cache_root(cfg),
                                skip_bad=cfg.skip_bad_images)

    train_cache = images("train")
    test_cache = images("val")
    if len(train_cache.bad) or len(test_cache.bad):
        _check_skipped(cfg, raw, labels, train_cache.bad, test_cache.bad)
    # The images as listed and their file sizes: a changed file is another image. Not the absolute
    # root or mtimes, which change when the data set is copied elsewhere (another node, shared
    # storage) although it is the same; not the pixels, which would mean reading every file.
    listed = hashlib.sha256()
    for paths, sizes in ((raw.train_paths, train_cache.file_sizes), (raw.val_paths, test_cache.file_sizes)):
        for path, size in zip(paths.tolist(), sizes.tolist()):
            listed.update(f"{path}\0{size}\n".encode())
    images_id = f"{len(raw.train_paths) + len(raw.val_paths)}:{listed.hexdigest()[:16]}"
    expected = cfg.expected_positives or EXPECTED_POSITIVES.get(cfg.dataset, labels.mean_positives)
    # The train and validation parts index into one cached array of the official train split.
    return WSMLData(
        name=cfg.dataset, class_names=list(raw.class_names),
        train=Split(_Rows(train_cache.array, labels.train_rows), labels.train),
        val=Split(_Rows(train_cache.array, labels.val_rows), labels.val),
        test=Split(test_cache.array, labels.test),
        train_observed=labels.train_observed, expected_positives=float(expected),
        observed_only_metric=cfg.dataset == "openimages",
        # the compact cache's pixels differ slightly: LinearInit's features are cached apart
        image_key=f"{cfg.dataset}:{_data_root(cfg).resolve()}:{cfg.image_size}:"
                  f"{cfg.split_seed}:{cfg.val_frac}:{len(raw.train_labels)}:{len(raw.val_labels)}"
                  + (":compact" if compact else ""),
        bad_images=len(train_cache.bad) + len(test_cache.bad),
        fingerprint={"images": images_id, **labels.fingerprint()}, data_id=_formatted_identity(cfg, raw))


def _check_skipped(cfg: TrainConfig, raw, labels: _Labels, bad_train: np.ndarray, bad_test: np.ndarray) -> None:
    """Refuse to train when `--skip-bad-images` skipped too much (TooManySkipped): more than
    MAX_SKIPPED_PERCENT of the training, validation or test images, or every observed positive of a
    class in the training split (the observed labels are what training learns from). `bad_train`,
    `bad_test`: indices into the official train and val (= test) splits."""
    skipped = np.zeros(len(raw.train_paths), dtype=bool)
    skipped[bad_train] = True
    in_training = skipped[labels.train_rows]
    counts = {"training": (int(in_training.sum()), len(labels.train_rows)),
              "validation": (int(skipped[labels.val_rows].sum()), len(labels.val_rows)),
              "test": (len(bad_test), len(raw.val_paths))}
    had = (labels.train_observed == 1).any(axis=0)
    kept = (labels.train_observed[~in_training] == 1).any(axis=0)
    lost = [raw.class_names[c] for c in np.flatnonzero(had & ~kept)]
    example = raw.image_root / str(raw.train_paths[bad_train[0]] if len(bad_train) else raw.val_paths[bad_test[0]])
    fix = _image_root_fix(cfg, raw)
    for split, (n, total) in counts.items():
        if n * 100 > MAX_SKIPPED_PERCENT * total:
            raise TooManySkipped(f"--skip-bad-images skipped {n} of {total} {split} images as unreadable "
                                 f"(more than {MAX_SKIPPED_PERCENT:g} %), e.g. {example}: {fix}")
    if lost:
        more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
        raise TooManySkipped(f"--skip-bad-images skipped every training image with an observed positive of "
                             f"class {lost[0]!r}{more}, e.g. {example}: {fix}")


def _image_root_fix(cfg: TrainConfig, raw) -> str:
    from wsml.data.formats import META_FILE

    return (f"check that the images are in {raw.image_root} (image_root in {_data_root(cfg) / META_FILE}) "
            "and that --data-root is the prepared set you mean, or prepare the data set again")


def check_image_files(cfg: TrainConfig, sample: int = 1000) -> None:
    """Before any image is decoded (a sweep's driver): refuse (TooManySkipped) when more than
    MAX_SKIPPED_PERCENT of up to `sample` images of each official split, spread evenly over it, do
    not exist. A wrong image root then fails at once with the fix, instead of in every trial (or,
    with --skip-bad-images, after every image was skipped). One stat per image checked: cheap on
    shared storage too; the exact count is the run's (`_check_skipped`)."""
    from wsml.data.formats import images_file, read_formatted

    cfg = cfg.resolve()
    if cfg.dataset == "digits":
        return
    raw = read_formatted(_data_root(cfg))
    for split, paths in (("train", raw.train_paths), ("val", raw.val_paths)):
        rows = np.unique(np.linspace(0, len(paths) - 1, num=min(sample, len(paths))).astype(np.int64))
        missing = [r for r in rows.tolist() if not (raw.image_root / str(paths[r])).is_file()]
        if len(missing) * 100 > MAX_SKIPPED_PERCENT * len(rows):
            raise TooManySkipped(f"{len(missing)} of {len(rows)} images checked of {images_file(split)} do not "
                                 f"exist (more than {MAX_SKIPPED_PERCENT:g} %), e.g. "
                                 f"{raw.image_root / str(paths[missing[0]])}: {_image_root_fix(cfg, raw)}")


class _Rows:
    """A row subset of a memmapped (or compact-cache) array that reads only the rows asked for."""

    def __init__(self, array: ImageArray, rows: np.ndarray):
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
        return cast("CompactImages", self.array).encoded(self.rows[index])

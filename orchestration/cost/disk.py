"""The disk a sweep will use, before it starts (`--dry-run`): on the storage its nodes share and on each node.

Shared storage (the sweep's `--storage`, `$WSML_SHARED_CACHE`, the MLflow store):
  * checkpoints: every run (search trials and final runs) keeps `keep_checkpoints` of them (the space
    file's; the latest is what a trial resumes from), each the model's weights with Adam's two moments;
  * a compact image cache (JPEG shards), where the data set is too large for raw pixels: at most
    `COMPACT_BYTES_PER_IMAGE` per image at 448 px (wsml/data/compact.py's measurement), scaled by area;
  * LinearInit's cached features (train + validation images x feature size x 4 bytes).
Each node (`$WSML_CACHE`, its own disk, the same path on every node):
  * a raw image cache (uint8 pixels of every image at the trained size) where it fits
    `RAW_CACHE_MAX_BYTES` (wsml/data/loading.py: `image_cache: auto` picks raw up to there).
The images counted are those the estimate trains and evaluates (train + validation + test).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wsml.config import TrainConfig
from wsml.data.loading import RAW_CACHE_MAX_BYTES


COMPACT_BYTES_PER_IMAGE = 80_000       # at 448 px (wsml/data/compact.py: quality 92 stays under 80 KB per image)
COMPACT_SIZE = 448
FLOAT_BYTES = 4


@dataclass(frozen=True)
class DiskUse:
    checkpoints: int        # bytes, shared
    compact_cache: int      # bytes, shared
    features: int           # bytes, shared (LinearInit)
    raw_cache: int          # bytes, on each node
    runs: int
    keep: int
    checkpoint_bytes: int

    @property
    def shared(self) -> int:
        return self.checkpoints + self.compact_cache + self.features

    def lines(self) -> list[str]:
        out = [f"disk on shared storage: {_gb(self.shared)} (checkpoints {self.runs} run(s) x {self.keep} kept x "
               f"{_gb(self.checkpoint_bytes)} = {_gb(self.checkpoints)}"
               + (f"; compact image cache {_gb(self.compact_cache)}" if self.compact_cache else "")
               + (f"; LinearInit features {_gb(self.features)}" if self.features else "") + ")",
               f"disk on each node: {_gb(self.raw_cache)} (raw image cache in $WSML_CACHE)" if self.raw_cache
               else "disk on each node: none (no raw image cache)"]
        return out


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def num_classes(dataset: str, data_root: str | None) -> int:
    """The label columns: the prepared data set's, else its official count (digits: 10; OpenImages V3 as the
    paper trains it: 5000 classes)."""
    import numpy as np

    from wsml.data.prepare import OFFICIAL_COUNTS

    labels = Path(data_root or "") / "formatted_train_labels.npy"
    if data_root and labels.is_file():
        return int(np.load(labels, mmap_mode="r").shape[1])
    return {"digits": 10, "openimages": 5000}.get(dataset) or OFFICIAL_COUNTS[dataset][0]


def model_sizes(arch: str, classes: int) -> tuple[int, int]:
    """(bytes of one checkpoint, the backbone's feature size), counted on the model itself: its fp32
    parameters with Adam's two moments."""
    from wsml.model import build_model

    model = build_model(arch, classes, "none")
    return sum(p.numel() for p in model.parameters()) * FLOAT_BYTES * 3, model.head.in_features


def disk_use(cfg: TrainConfig, *, images: int, linear_init_images: int, runs: int, keep: int) -> DiskUse:
    """`cfg`: the trials' resolved config; `images`: those cached (train + validation + test)."""
    assert cfg.image_size is not None and cfg.arch is not None      # resolve() fills them in
    raw = images * 3 * cfg.image_size ** 2
    compact = cfg.image_cache == "compact" or (cfg.image_cache == "auto" and raw > RAW_CACHE_MAX_BYTES)
    if cfg.dataset == "digits":             # built in memory from scikit-learn's copy: no image cache
        raw, compact = 0, False
    one, feature_dim = model_sizes(cfg.arch, num_classes(cfg.dataset, cfg.data_root))
    return DiskUse(checkpoints=runs * keep * one,
                   compact_cache=round(images * COMPACT_BYTES_PER_IMAGE * (cfg.image_size / COMPACT_SIZE) ** 2)
                   if compact else 0,
                   features=linear_init_images * feature_dim * FLOAT_BYTES,
                   raw_cache=0 if compact else raw, runs=runs, keep=keep, checkpoint_bytes=one)

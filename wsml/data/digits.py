"""The built-in `digits` data set: multi-label mosaics of scikit-learn's real digits.

scikit-learn ships 1,797 real 8 x 8 handwritten digits. Each mosaic is a 32 x 32
canvas of 4 x 4 cells holding 1-4 digits in random cells; its labels are the
digit classes present. Train, validation and test mosaics come from disjoint
digit images. Everything is generated from a fixed seed, so every trial and
every machine sees the same images without a download.
"""
from __future__ import annotations

import numpy as np

CLASS_NAMES = [str(d) for d in range(10)]
# 3,000 training mosaics (94 steps of 32 per epoch): with 1,500, 10 epochs left every
# configuration short of converging, so its final val mAP was mostly noise.
SPLIT_SIZES = {"train": 3000, "val": 500, "test": 500}
DIGIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
CELL = 8
GRID = 4


def make_digits(seed: int = 1200) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images uint8 (N, 32, 32, 3), labels int8 (N, 10))}."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(digits.target))
    bounds = np.cumsum([0] + [int(round(f * len(order))) for f in DIGIT_FRACTIONS.values()])
    bounds[-1] = len(order)
    out = {}
    for (split, size), lo, hi in zip(SPLIT_SIZES.items(), bounds[:-1], bounds[1:]):
        pool = order[lo:hi]
        out[split] = _mosaics(digits.images[pool], digits.target[pool], size, rng)
    return out


def _mosaics(images: np.ndarray, targets: np.ndarray, count: int, rng: np.random.RandomState):
    side = CELL * GRID
    canvas = np.zeros((count, side, side), dtype=np.float32)
    labels = np.zeros((count, len(CLASS_NAMES)), dtype=np.int8)
    for i in range(count):
        n = rng.randint(1, 5)
        cells = rng.choice(GRID * GRID, size=n, replace=False)
        picks = rng.choice(len(images), size=n, replace=False)
        for cell, pick in zip(cells, picks):
            r, c = divmod(cell, GRID)
            canvas[i, r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = images[pick]
            labels[i, targets[pick]] = 1
    gray = np.round(canvas * (255 / 16)).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=3), labels


def write_digits(dest, image_root, *, train: int | None = None) -> None:
    """The digits set as PNG files in the published layout (`wsml.data.formats`), to try the
    file-based data path (prepare -> image cache -> loader) without a download.

    Official train = the train and validation mosaics (the trainer splits off its own validation),
    official val = the test mosaics; `train` keeps the first N official train mosaics.
    """
    from pathlib import Path

    from PIL import Image

    from wsml.data.formats import write_formatted

    splits = make_digits()
    official = {"train": tuple(np.concatenate([splits["train"][k], splits["val"][k]])[:train] for k in (0, 1)),
                "val": splits["test"]}
    image_root = Path(image_root)
    names = {}
    for split, (images, _) in official.items():
        (image_root / split).mkdir(parents=True, exist_ok=True)
        names[split] = [f"{split}/{i:05d}.png" for i in range(len(images))]
        for name, pixels in zip(names[split], images):
            Image.fromarray(pixels).save(image_root / name)
    write_formatted(dest, dataset="digits", class_names=CLASS_NAMES, image_root=image_root,
                    train_images=names["train"], train_labels=official["train"][1],
                    val_images=names["val"], val_labels=official["val"][1])

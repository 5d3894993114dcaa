"""Training on the compact image cache against the raw one: digits as image files, several seeds.

The built-in digits set is written as PNG files in the published layout (`wsml.data.digits.write_digits`:
3,500 official-train mosaics, 500 test) and read like any prepared benchmark, once through the raw
uint8 cache and once through the compact JPEG cache (quality as in `wsml.data.compact`); each is
trained with the digits defaults (small CNN, 32 px, LL-R, delta_rel 2, 10 epochs) for every seed
of `--seeds`, everything else equal. Prints the PSNR of the compact cache's pixels against the raw
ones, every run's test mAP, and per cache the mean and sample std over the seeds. Last line:
`compact minus raw test mAP <d> (standard error <se>, <n> seeds)`: within noise when |d| < 2 se.

Run: `.venv/bin/python bench/compact_train.py [--seeds 0,1,2] [--epochs 10] [--workdir DIR]`.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wsml.config import DEFAULTS, TrainConfig
from wsml.data.digits import write_digits
from wsml.train import run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", type=lambda v: [int(s) for s in v.split(",")])
    ap.add_argument("--epochs", type=int, default=DEFAULTS["digits"].epochs)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (they decode the JPEGs)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "wsml-bench-compact-train"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)     # as a digits trial runs (search_spaces/digits.yaml: one CPU per trial)
    work = Path(args.workdir)
    if not (work / "data" / "meta.json").exists():
        write_digits(work / "data", work / "images")
    d = DEFAULTS["digits"]
    # `pascal`: any benchmark name reads a prepared folder; the digits defaults otherwise
    base = dict(dataset="pascal", data_root=str(work / "data"), cache_dir=str(work / "cache"), arch=d.arch,
                weights=d.weights, image_size=d.image_size, batch_size=d.batch_size, lr=d.lr, delta_rel=d.delta_rel,
                hflip=d.hflip, scheme="LL-R", epochs=args.epochs, device="cpu", num_workers=args.workers)

    from wsml.data.loading import load_data

    raw = load_data(TrainConfig(**base, image_cache="raw").resolve())
    compact = load_data(TrainConfig(**base, image_cache="compact").resolve())
    a = np.asarray(compact.test.images[np.arange(len(compact.test.labels))], dtype=np.float64)
    b = np.asarray(raw.test.images, dtype=np.float64)
    mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
    db = 10 * np.log10(255**2 / np.maximum(mse, 1e-12))
    print(f"digits as files: {len(raw.train.labels)} train / {len(raw.val.labels)} val / {len(raw.test.labels)} "
          f"test images; compact vs raw pixels: PSNR {db.mean():.1f} dB mean ({db.min():.1f} min)")

    maps: dict[str, list[float]] = {"raw": [], "compact": []}
    for seed in args.seeds:
        for cache in maps:
            start = time.perf_counter()
            result = run(TrainConfig(**base, image_cache=cache, seed=seed), log=None)
            maps[cache].append(result.test_map)
            print(f"seed {seed} {cache:7s}: test mAP {result.test_map:.2f} (best val {result.best_val_map:.2f} at "
                  f"epoch {result.best_epoch}), {time.perf_counter() - start:.0f} s")
    for cache, values in maps.items():
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"{cache:7s}: test mAP {statistics.mean(values):.2f} +- {std:.2f} over {len(values)} seeds")
    diff = statistics.mean(maps["compact"]) - statistics.mean(maps["raw"])
    n = len(args.seeds)
    se = (math.sqrt((statistics.variance(maps["raw"]) + statistics.variance(maps["compact"])) / n) if n > 1
          else float("nan"))
    print(f"compact minus raw test mAP {diff:+.2f} (standard error {se:.2f}, {n} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

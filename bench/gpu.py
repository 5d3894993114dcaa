"""GPU training throughput: our step against the published code's fp32 step, side by side.

ResNet-50, 448 x 448, batch 16, Adam, on one GPU, each figure measured after
warm-up over the same time window:
  1. published: fp32, NCHW, BCE, as the published code runs;
  2. ours: the trainer's own step (LL-R with its top-k) with bf16 autocast + channels_last,
     eager and captured as one CUDA graph;
  3. an epoch read from the image cache (generated VOC-sized JPEGs) through the
     trainer's real input pipeline, against the synthetic-input rate of the same step;
  4. aggregate images/s of 1, 2 and 4 trials in separate processes sharing the GPU.
Without CUDA it says so and exits 0. Last line: `gpu ratio <x> (target 1.8)`.

`--compact`: only the compact image cache (JPEG shards, `wsml.data.compact`) instead: an epoch
read from it through the trainer's real input pipeline, with the JPEGs decoded in `--workers`
DataLoader workers (the default, `image_decode: cpu`) and batched on the GPU with nvJPEG
(`image_decode: gpu`), each against the synthetic-input rate of the same step; and what the
loader alone delivers (no step). Without CUDA it measures the loader alone. Last line:
`compact epoch ratio <best epoch rate / synthetic> (target 0.9)` (or `... no GPU`).
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsml.config import TrainConfig
from wsml.data.loading import Split, WSMLData
from wsml.trainer import Trainer, _GraphedStep

BATCH, SIZE, CLASSES = 16, 448, 20


def timed(step, seconds: float, warmup: int = 10) -> float:
    """images/s of `step()` over a `seconds` window after `warmup` calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        n += 5
    return n * BATCH / (time.perf_counter() - start)


def published_step():
    """The published code's step: fp32 model, sigmoid + BCE on AN targets, Adam with a 10x head."""
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Linear(2048, CLASSES)
    model = model.cuda()
    backbone = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    opt = torch.optim.Adam([{"params": backbone, "lr": 1e-5}, {"params": model.fc.parameters(), "lr": 1e-4}])
    x = torch.randn(BATCH, 3, SIZE, SIZE, device="cuda")
    y = (torch.rand(BATCH, CLASSES, device="cuda") < 0.1).float()

    def step():
        preds = torch.sigmoid(model(x))
        loss = torch.nn.functional.binary_cross_entropy(preds, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def synthetic_data(images: np.ndarray) -> WSMLData:
    rng = np.random.RandomState(0)
    labels = (rng.rand(len(images), CLASSES) < 0.1).astype(np.int8)
    labels[np.arange(len(images)), rng.randint(0, CLASSES, len(images))] = 1
    observed = np.zeros_like(labels)
    observed[np.arange(len(images)), labels.argmax(1)] = 1
    split = Split(images, labels)
    return WSMLData(name="pascal", class_names=[str(c) for c in range(CLASSES)], train=split, val=split,
                    test=split, train_observed=observed, expected_positives=1.5,
                    observed_only_metric=False, image_key="bench")


def our_trainer(images: np.ndarray, precision: str, graph: bool, workers: int = 8, decode: str = "cpu") -> Trainer:
    cfg = TrainConfig(dataset="pascal", scheme="LL-R", delta_rel=0.2, weights="none", precision=precision,
                      cuda_graph=graph, device="cuda", num_workers=workers, image_decode=decode).resolve()
    return Trainer(cfg, synthetic_data(images), torch.device("cuda"), log=lambda _m: None)


def our_step(precision: str, graph: bool):
    trainer = our_trainer(np.zeros((BATCH, 8, 8, 3), np.uint8), precision, graph)
    x = trainer.to_input(torch.randint(0, 255, (BATCH, SIZE, SIZE, 3), dtype=torch.uint8),
                          torch.rand(BATCH) < 0.5)
    index = torch.arange(BATCH, device="cuda")
    if graph:
        graphed = _GraphedStep(trainer, 2, x, index, warmup=True)
        return lambda: graphed(x, index)
    return lambda: trainer._step(x, index, 2)


def _sharing_worker(seconds: float, barrier, queue) -> None:
    step = our_step("bf16", graph=True)
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    barrier.wait()
    queue.put(timed(step, seconds, warmup=0))


def shared_gpu(trials: int, seconds: float) -> float:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(trials), ctx.Queue()
    procs = [ctx.Process(target=_sharing_worker, args=(seconds, barrier, queue)) for _ in range(trials)]
    for p in procs:
        p.start()
    rates = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def cache_epoch(workdir: Path, count: int) -> tuple[float, float, float]:
    """(epoch images/s from the cache, synthetic rate of the same trainer, cache build seconds)."""
    from PIL import Image

    from wsml.data.cache import load_image_cache

    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    paths = []
    for i in range(count):
        path = workdir / f"{i:05d}.jpg"
        if not path.exists():
            base = rng.randint(0, 255, (47, 63, 3), dtype=np.uint8)
            Image.fromarray(base).resize((500, 375), Image.BICUBIC).save(path, quality=90)
        paths.append(str(path))
    start = time.perf_counter()
    cache = load_image_cache(paths, SIZE, workdir / "cache", workers=os.cpu_count())
    build = time.perf_counter() - start
    trainer = our_trainer(cache.array, "bf16", graph=True)
    trainer.train_epoch(2)                      # warm-up epoch: capture, cudnn autotuning, page cache
    torch.cuda.synchronize()
    epoch_rate = trainer.train_epoch(2)["images_per_s"]
    x = trainer.to_input(torch.from_numpy(np.array(cache.array[:BATCH])))
    index = torch.arange(BATCH, device="cuda")
    graphed = _GraphedStep(trainer, 2, x, index, warmup=False)
    synthetic = timed(lambda: graphed(x, index), 10)
    return epoch_rate, synthetic, build


def loader_rate(images, workers: int, batches: int) -> float:
    """images/s the trainer's DataLoader delivers from `images` with `workers` workers, no step."""
    from wsml.trainer import _BatchReader

    order = np.random.RandomState(0).permutation(len(images))
    index = [np.sort(order[i:i + BATCH]) for i in range(0, min(len(order), batches * BATCH), BATCH)]
    loader = torch.utils.data.DataLoader(_BatchReader(images, index), batch_size=None, num_workers=workers)
    it = iter(loader)
    for _ in range(min(4, len(index))):   # start the workers
        next(it)
    n, start = 0, time.perf_counter()
    for _, batch in it:
        n += len(batch)
    return n / (time.perf_counter() - start)


def compact_epochs(args) -> int:
    """The `--compact` measurements; see the module docstring."""
    from loader import make_images   # bench/loader.py's photo-like VOC-sized JPEGs (decode costs of a photo)

    from wsml.data.compact_images import load_compact_cache

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="wsml-gpu-bench-"))
    paths = make_images(workdir / "jpeg", args.images)
    start = time.perf_counter()
    cache = load_compact_cache(paths, SIZE, workdir / "cache", workers=os.cpu_count())
    build = time.perf_counter() - start
    print(f"compact cache: {args.images} JPEGs at {SIZE} px built in {build:.1f} s on {os.cpu_count()} cores, "
          f"{cache.array.disk_bytes / args.images:.0f} bytes per image")
    for w in args.workers:
        print(f"loader alone, {w} workers decoding: {loader_rate(cache.array, w, 64):.0f} images/s")
    if not torch.cuda.is_available():
        print("compact epoch ratio: no GPU (CUDA) here; the loader figures above are what a GPU trial's "
              "workers would deliver")
        return 0
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    rates = {}
    for decode in ("cpu", "gpu"):
        for w in (args.workers if decode == "cpu" else [min(args.workers)]):
            trainer = our_trainer(cache.array, "bf16", graph=True, workers=w, decode=decode)
            trainer.train_epoch(2)                  # warm-up epoch: capture, cudnn autotuning, page cache
            torch.cuda.synchronize()
            rates[(decode, w)] = trainer.train_epoch(2)["images_per_s"]
    x = trainer.to_input(torch.from_numpy(cache.array[np.arange(BATCH)]))
    index = torch.arange(BATCH, device="cuda")
    graphed = _GraphedStep(trainer, 2, x, index, warmup=False)
    synthetic = timed(lambda: graphed(x, index), args.seconds)
    for (decode, w), rate in rates.items():
        how = f"CPU decode in {w} DataLoader workers" if decode == "cpu" else f"GPU decode (nvJPEG), {w} workers reading"
        print(f"epoch from the compact cache, {how}: {rate:.1f} images/s vs synthetic input {synthetic:.1f} "
              f"({rate / synthetic:.0%}; target 90 %)")
    print(f"compact epoch ratio {max(rates.values()) / synthetic:.2f} (target 0.9)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="timing window per figure")
    parser.add_argument("--images", type=int, default=2048, help="generated JPEGs for the cache epoch")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--skip-sharing", action="store_true")
    parser.add_argument("--compact", action="store_true", help="only the compact-cache epochs (see above)")
    parser.add_argument("--workers", default="2,4", type=lambda v: [int(w) for w in v.split(",")],
                        help="--compact: DataLoader worker counts to measure (a trial's CPUs: 4 in the space files)")
    args = parser.parse_args()
    if args.compact:
        return compact_epochs(args)
    if not torch.cuda.is_available():
        print("gpu: no CUDA device here; run this on a machine with a GPU (nothing measured)")
        return 0
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows = {}
    rows["published fp32 step"] = timed(published_step(), args.seconds)
    torch.cuda.empty_cache()
    rows["ours fp32 eager"] = timed(our_step("fp32", graph=False), args.seconds)
    rows["ours bf16+channels_last eager"] = timed(our_step("bf16", graph=False), args.seconds)
    rows["ours bf16+channels_last CUDA graph"] = timed(our_step("bf16", graph=True), args.seconds)
    for name, rate in rows.items():
        print(f"{name:40s} {rate:8.1f} images/s  ({rate / rows['published fp32 step']:.2f}x)")
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (all steps above)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="wsml-gpu-bench-"))
    epoch_rate, synthetic, build = cache_epoch(workdir, args.images)
    print(f"epoch from the image cache {epoch_rate:.1f} images/s vs synthetic input {synthetic:.1f} "
          f"({epoch_rate / synthetic:.0%}; target 90 %); cache built once in {build:.1f} s "
          f"({args.images / build:.0f} images/s on {os.cpu_count()} cores)")
    if not args.skip_sharing:
        for trials in (1, 2, 4):
            print(f"{trials} trial(s) sharing the GPU: {shared_gpu(trials, args.seconds):.1f} images/s together")
    best = max(rows["ours bf16+channels_last eager"], rows["ours bf16+channels_last CUDA graph"])
    print(f"gpu ratio {math.floor(10 * best / rows['published fp32 step']) / 10:.1f} (target 1.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

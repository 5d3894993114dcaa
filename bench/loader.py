"""Images/s of the cached loaders against the published per-epoch pipeline, and the caches' size, on CPU.

All read the same VOC-sized JPEGs (500 x 375) with the same DataLoader worker count and batch
size; each is warmed up, then timed over full shuffled passes (alternating, best of --rounds).
The published pipeline decodes and resizes every image every epoch; ours gathers uint8 batches
from the decoded cache and does the flip, the conversion to float and the normalisation in the
training process (on the GPU in the trainer). The ratio compares what each loader delivers to
the training process: normalised float batches (published) against uint8 batches (ours), whose
flip and normalisation the trainer does on the GPU; the same on this CPU is printed beside it,
as what a CPU-only trainer pays.

Then, per CPU core (one process, one thread, no DataLoader): the published pipeline, the raw
memmap (in the page cache, and evicted from it: an epoch of a raw cache larger than the RAM), and
the compact cache's JPEG decoding; and the compact cache's bytes per image and its fidelity to the
raw cache (PSNR), on these JPEGs and on real photos (crops of the ones scikit-learn and matplotlib
ship, VOC-sized). Last lines:
`cache bytes per image <compact cache, these JPEGs> (target 80000)` and
`loader ratio <ours / published> (target 5)`.

Run: `.venv/bin/python bench/loader.py [--images N] [--workers W] [--workdir DIR] [--rounds R]`.
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from torchvision import transforms

from wsml.data.cache import load_image_cache
from wsml.data.compact import QUALITY
from wsml.data.compact_images import load_compact_cache

SIZE, BATCH, WARMUP_BATCHES = 448, 16, 4
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_images(folder: Path, n: int) -> list[str]:
    """n photo-like 500 x 375 JPEGs (smooth shapes plus texture, so decoding costs what a photo does)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.jpg" for i in range(n)]
    for i, p in enumerate(paths):
        if p.exists():  # reused between runs
            continue
        rng = np.random.default_rng(i)
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        texture = rng.normal(0, 18, (375, 500, 1)) * rng.uniform(0.3, 1.0, (1, 1, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + texture, 0, 255).astype(np.uint8)
        tmp = p.with_suffix(".tmp")
        Image.fromarray(pixels).save(tmp, format="JPEG", quality=90)
        tmp.rename(p)  # never leave a half-written image for the next run to reuse
    return [str(p) for p in paths]


def make_photos(folder: Path, n: int) -> list[str]:
    """n VOC-sized camera-like JPEGs (500 x 375, quality 90) cut from real photos: random crops of
    60-100 % of each side of the photos scikit-learn and matplotlib ship, every other one mirrored."""
    import matplotlib.cbook
    from sklearn.datasets import load_sample_images

    sources = [Image.fromarray(a) for a in load_sample_images().images]
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        sources.append(Image.open(f).convert("RGB"))
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        im = sources[i % len(sources)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.6, 1)), int(h * rng.uniform(0.6, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = im.crop((x, y, x + cw, y + ch)).resize((500, 375), Image.BICUBIC)
        if i % 2:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(folder / f"{i:03d}.jpg", quality=90)
        paths.append(str(folder / f"{i:03d}.jpg"))
    return paths


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(255**2 / np.maximum(mse, 1e-12))


def fidelity(paths: list[str], root: Path) -> tuple[float, float, float]:
    """(bytes per image on disk, mean and min PSNR in dB) of the compact cache against the raw one."""
    compact = load_compact_cache(paths, SIZE, root, workers=1)
    raw = np.asarray(load_image_cache(paths, SIZE, root, workers=1).array)
    quality = psnr(compact.array[np.arange(len(paths))], raw)
    return disk_bytes(compact.array) / len(paths), float(quality.mean()), float(quality.min())


def quality_sweep(sets: dict[str, np.ndarray]) -> None:
    """Per encoder setting and image set: bytes per image, PSNR against the raw pixels, and decodes
    per CPU-second (best of 2 passes): the measurement the compact cache's setting was chosen by."""
    import io

    from torchvision.io import decode_jpeg, decode_webp

    settings = [(f"JPEG quality {q} {name}", "JPEG", dict(quality=q, subsampling=sub, optimize=True), decode_jpeg)
                for q in (85, 90, 92, 95) for sub, name in ((2, "4:2:0"), (0, "4:4:4"))]
    settings += [(f"WebP quality {q}", "WEBP", dict(quality=q), decode_webp) for q in (85, 90)]
    print(f"encoder settings at {SIZE} px (bytes / PSNR dB / decodes per CPU-second): {', '.join(sets)}")
    for label, fmt, options, decode in settings:
        cells = []
        for raws in sets.values():
            blobs = []
            for raw in raws:
                buf = io.BytesIO()
                Image.fromarray(raw).save(buf, format=fmt, **options)
                blobs.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
            rate = 0.0
            for _ in range(2):
                cpu = time.thread_time()
                decoded = [decode(b) for b in blobs]
                rate = max(rate, len(blobs) / max(time.thread_time() - cpu, 1e-9))
            db = psnr(np.stack([d.permute(1, 2, 0).numpy() for d in decoded]), raws).mean()
            cells.append(f"{np.mean([len(b) for b in blobs]):.0f} / {db:.1f} / {rate:.0f}")
        chosen = "  <- the compact cache" if label == f"JPEG quality {QUALITY} 4:2:0" else ""
        print(f"  {label:22s} {'   '.join(cells)}{chosen}")


def disk_bytes(compact) -> int:
    """The compact cache's shard files (their indexes included)."""
    return sum(p.stat().st_size for p in compact.entry.glob("shard-*.jpgs"))


def evict(paths) -> None:
    """Drop files from the page cache (pages nobody maps): the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)        # only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def per_core(read_batch, n: int, rng: np.random.Generator) -> tuple[float, float]:
    """(images per second, images per CPU-second of this thread) of one shuffled pass of
    `read_batch(sorted indices)` over batches of BATCH. The second is what one core does when it
    has the core to itself: on a shared machine, wall time also counts the other processes."""
    order = rng.permutation(n)
    start, cpu = time.perf_counter(), time.thread_time()
    for i in range(0, n, BATCH):
        read_batch(np.sort(order[i:i + BATCH]))
    return n / (time.perf_counter() - start), n / max(time.thread_time() - cpu, 1e-9)


class Published(Dataset):
    """The published code's training pipeline: decode and transform each image every epoch."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.transform = transforms.Compose([
            transforms.Resize((SIZE, SIZE)), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB"))


class CachedBatches(Dataset):
    """Whole uint8 batches gathered from the cache: the sampler hands over a batch of indices."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, batch: list[int]) -> tuple[list[int], torch.Tensor]:
        idx = np.sort(batch)  # ascending reads from the memmap; labels are looked up by the returned indices
        # The indices go back as a list: a tensor would cost a shared-memory segment of its own.
        return idx.tolist(), torch.from_numpy(self.array[idx])


class ToInput:
    """Random horizontal flip, uint8 -> float, normalise: the trainer's on-device step, here on the CPU.

    Works in the cache's NHWC layout and returns an NCHW view of it (channels_last, as the trainer
    trains), into a reused buffer as the device's caching allocator would reuse its memory.
    """

    def __init__(self):
        # Mean and std tiled along a whole image row: a broadcast over a last dimension of 3 is
        # several times slower on the CPU than one over full rows.
        self.scale = (1 / (255 * torch.tensor(STD))).repeat(SIZE)   # (x / 255 - mean) / std
        self.shift = (-torch.tensor(MEAN) / torch.tensor(STD)).repeat(SIZE)
        self.reverse = torch.arange(SIZE - 1, -1, -1)
        self.out = torch.empty(0)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        for i in torch.nonzero(torch.rand(len(images)) < 0.5).flatten().tolist():
            images[i] = images[i].index_select(1, self.reverse)
        if self.out.shape != images.shape:
            self.out = torch.empty(images.shape, dtype=torch.float32)
        rows = self.out.copy_(images).view(-1, SIZE * 3)
        torch.addcmul(self.shift, rows, self.scale, out=rows)
        return self.out.permute(0, 3, 1, 2)


def warm_up(loader: DataLoader, consume) -> None:
    it = iter(loader)
    for _ in range(WARMUP_BATCHES):  # starts the workers and fills their prefetch queues
        consume(next(it))


def one_pass(loader: DataLoader, consume) -> float:
    n, start = 0, time.perf_counter()
    for batch in loader:
        n += consume(batch)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for both pipelines")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "wsml-bench-loader"),
                    help="generated JPEGs are kept here and reused")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes of each pipeline, alternating")
    ap.add_argument("--photos", type=int, default=24, help="real-photo crops for the size and fidelity figures")
    ap.add_argument("--quality-sweep", action="store_true",
                    help="also measure other JPEG qualities, 4:4:4 chroma and WebP (how the setting was chosen)")
    args = ap.parse_args()
    torch.manual_seed(0)
    # The loader workers need the CPUs; the training process's own share of work is device work in
    # the trainer, so it gets one thread rather than competing with the workers.
    torch.set_num_threads(1)
    work = Path(args.workdir)
    paths = make_images(work / "jpeg", args.images)
    print(f"{len(paths)} JPEGs 500x375 in {work / 'jpeg'}; batch {BATCH}, {args.workers} loader workers, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")

    shutil.rmtree(work / "cache", ignore_errors=True)  # time the one-off build every run
    start = time.perf_counter()
    cache = load_image_cache(paths, SIZE, work / "cache", workers=args.workers)
    build = time.perf_counter() - start
    print(f"cache build (one-off, {args.workers} processes, their start-up included): {build:.1f} s, "
          f"{len(paths) / build:.0f} images/s, {cache.array.nbytes / 1e9:.2f} GB")

    start = time.perf_counter()
    compact = load_compact_cache(paths, SIZE, work / "cache", workers=args.workers)
    build = time.perf_counter() - start
    print(f"compact cache build (one-off, JPEG quality {QUALITY}, {args.workers} processes): {build:.1f} s, "
          f"{len(paths) / build:.0f} images/s, {disk_bytes(compact.array) / 1e9:.3f} GB")

    common = dict(num_workers=args.workers, persistent_workers=args.workers > 0)
    published = DataLoader(Published(paths), batch_size=BATCH, shuffle=True, **common)
    to_input = ToInput()
    sampler = BatchSampler(RandomSampler(range(len(paths))), BATCH, drop_last=False)
    cached = DataLoader(CachedBatches(cache.array), sampler=sampler, batch_size=None, **common)
    decoded = DataLoader(CachedBatches(compact.array), sampler=sampler, batch_size=None, **common)
    runs = {
        "published": ("published pipeline (decode + Resize + flip + ToTensor + Normalize)", published, len),
        "ours": ("cached loader (uint8 batches + flip/float/normalise in the training process)", cached,
                 lambda batch: len(to_input(batch[1]))),
        "batches": ("cached loader, batches only (what a GPU trainer's process waits for)", cached,
                    lambda batch: len(batch[1])),
        "compact": ("compact cache loader, batches only (JPEGs decoded in the workers)", decoded,
                    lambda batch: len(batch[1])),
    }
    for _, loader, consume in runs.values():
        warm_up(loader, consume)
    # Alternating passes, best of each: other load on the machine slows single passes unevenly.
    passes = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, (_, loader, consume) in runs.items():
            passes[key].append(one_pass(loader, consume))
    best = {key: max(rates) for key, rates in passes.items()}
    for key, (what, _, _) in runs.items():
        print(f"{what}: {best[key]:.0f} images/s (passes: {', '.join(f'{r:.0f}' for r in passes[key])})")

    del published, cached, decoded      # stops their workers
    # Per core: what one DataLoader worker (or one trial's core) can deliver.
    rng = np.random.default_rng(0)
    one = Published(paths)
    raw_file = work / "cold.npy"        # a copy no other process maps, so that its pages can be dropped
    shutil.copyfile(cache.array.filename, raw_file)

    def raw_cold(index):
        return np.ascontiguousarray(cold[0][index])

    cores = {
        "published": ("published pipeline (PIL decode + Resize + flip + ToTensor + Normalize)",
                      lambda index: [one[i] for i in index], None),
        "raw": ("raw memmap, in the page cache", lambda index: np.ascontiguousarray(cache.array[index]), None),
        "raw_cold": ("raw memmap, evicted from the page cache (read from the disk)", raw_cold, [raw_file]),
        "compact": ("compact cache (libjpeg-turbo via torchvision.io.decode_jpeg)", lambda index: compact.array[index],
                    None),
    }
    core_passes = {key: [] for key in cores}
    cold = [None]
    for _ in range(args.rounds):
        for key, (_, read, files) in cores.items():
            if files:
                cold[0] = None      # unmapped, so that its pages can be dropped
                evict(files)
                cold[0] = np.load(raw_file, mmap_mode="r")
            core_passes[key].append(per_core(read, len(paths), rng))
    print("per CPU core (one process, one thread, shuffled batches of 16, best pass): images/s, "
          "images per CPU-second")
    for key, (what, _, _) in cores.items():
        target = " (target 400)" if key == "compact" else ""
        wall, cpu = max(r[0] for r in core_passes[key]), max(r[1] for r in core_passes[key])
        print(f"  {what}: {wall:.0f}, {cpu:.0f}{target} (passes: {', '.join(f'{r[0]:.0f}' for r in core_passes[key])})")

    size, mean_db, min_db = fidelity(paths, work / "cache")
    photos = make_photos(work / "photos", args.photos)
    photo_size, photo_db, photo_min = fidelity(photos, work / "cache")
    print(f"bytes per {SIZE} px image on disk: raw {SIZE * SIZE * 3}, compact {size:.0f} on these JPEGs, "
          f"{photo_size:.0f} on {len(photos)} real photos")
    print(f"compact vs raw pixels, PSNR: {mean_db:.1f} dB mean ({min_db:.1f} min) on these JPEGs, "
          f"{photo_db:.1f} dB ({photo_min:.1f}) on the real photos (target 38)")
    if args.quality_sweep:
        first = {"these JPEGs": paths[:100], "real photos": photos}
        quality_sweep({name: np.asarray(load_image_cache(ps, SIZE, work / "cache", workers=1).array)
                       for name, ps in first.items()})
    print(f"cache bytes per image {size:.0f} (target 80000)")
    print(f"loader ratio {best['batches'] / best['published']:.1f} (target 5)")

if __name__ == "__main__":
    main()

"""Images/s of the cached loader against the published per-epoch pipeline, on CPU.

Both read the same VOC-sized JPEGs (500 x 375) with the same DataLoader worker count and batch
size; each is warmed up, then timed over full shuffled passes (alternating, best of --rounds).
The published pipeline decodes and resizes every image every epoch; ours gathers uint8 batches
from the decoded cache and does the flip, the conversion to float and the normalisation in the
training process (on the GPU in the trainer). The ratio compares what each loader delivers to
the training process: normalised float batches (published) against uint8 batches (ours), whose
flip and normalisation the trainer does on the GPU; the same on this CPU is printed beside it,
as what a CPU-only trainer pays. Last line:
`loader ratio <ours / published> (target 5)`.

Run: `.venv/bin/python bench/loader.py [--images N] [--workers W] [--workdir DIR] [--rounds R]`.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also runs as `python bench/loader.py`

from wsml.data.cache import load_image_cache  # noqa: E402

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

    common = dict(num_workers=args.workers, persistent_workers=args.workers > 0)
    published = DataLoader(Published(paths), batch_size=BATCH, shuffle=True, **common)
    to_input = ToInput()
    sampler = BatchSampler(RandomSampler(range(len(paths))), BATCH, drop_last=False)
    cached = DataLoader(CachedBatches(cache.array), sampler=sampler, batch_size=None, **common)
    runs = {
        "published": ("published pipeline (decode + Resize + flip + ToTensor + Normalize)", published, len),
        "ours": ("cached loader (uint8 batches + flip/float/normalise in the training process)", cached,
                 lambda batch: len(to_input(batch[1]))),
        "batches": ("cached loader, batches only (what a GPU trainer's process waits for)", cached,
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
    print(f"loader ratio {best['batches'] / best['published']:.1f} (target 5)")

if __name__ == "__main__":
    main()

"""The compact image cache: each image decoded and resized once, stored as a JPEG in large shards.

The raw cache (`wsml.data.cache`) keeps 602 KB of uint8 pixels per 448 px image: about 1 TB for
OpenImages. This one keeps the same resized pixels JPEG-encoded (quality 92, 4:2:0; 40-80 KB per
448 px image, 38-41 dB PSNR against the raw pixels, by `bench/loader.py`), packed into shard files of
`shard_images` images each, and decodes them in the trial's DataLoader workers (libjpeg-turbo
through `torchvision.io.decode_jpeg`) or, batched, on the GPU (nvJPEG).

An entry `<cache root>/compact<size>-<digest>/` holds

    plan.json         format, size, quality, image count, images per shard, image root
    paths.npy         the image paths (relative to the image root when one is given)
    shard-00000.jpgs  rows 0 .. shard_images-1, and so on

Shards are built independently (`build_shard(spec)`), so that many machines can build one entry
on shared storage: each is written to a temporary name, fsync'd and renamed, under a per-shard
file lock. A shard file that exists is complete; a killed builder leaves only a temporary file,
which the next builder of that shard deletes. A shard records each image's file size and mtime,
and is built again when one of them changes. Usable with no cluster: `load_compact_cache` plans,
builds what is missing in local processes and opens the result; `orchestration/image_cache.py`
builds the missing shards as Ray tasks spread over a cluster's nodes.

A shard file: the JPEG bytes of its images back to back (nothing for an unreadable image), then
its index (offsets, count + 1 int64; file sizes and mtimes, int64; unreadable flags, uint8), then
a trailer (magic, count, index offset).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import secrets
import shutil
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from filelock import FileLock

from wsml.data.cache import ImageCache, check_bad, fsync_path, resized
from wsml.errors import DataError
from wsml.progress import Progress

# Bump when the stored bytes would differ for the same files and settings.
FORMAT_VERSION = 1
# JPEG quality and chroma subsampling, chosen by measurement (`bench/loader.py --quality-sweep`):
# at 448 px, quality 92 with 4:2:0 stays at or above 38 dB PSNR against the raw cache and under
# 80 KB per image on noisy photo-like JPEGs and on real photos; quality 90 falls below 38 dB on the
# former, 95 above 80 KB; 4:4:4 costs 22 % more bytes and decodes slower; WebP decodes 3-4x slower.
QUALITY = 92
# About 200-300 MB per 448 px shard: few files on shared storage, and a shard a task builds in a
# minute or two on one core (a killed task loses at most that).
SHARD_IMAGES = 4096

_MAGIC = b"WSMLJPG1"
_TRAILER = struct.Struct("<8sQQ")     # magic, image count, index offset
_MISSING = -1                         # size and mtime recorded for a file that could not be stat'ed


@dataclass(frozen=True)
class ShardSpec:
    """One shard to build: rows [start, stop) of the entry's path list. Small and picklable."""

    entry: str
    index: int
    start: int
    stop: int
    size: int
    quality: int

    @property
    def path(self) -> Path:
        return Path(self.entry) / shard_name(self.index)


@dataclass(frozen=True)
class CompactPlan:
    """A cache entry and all its shards (built or not)."""

    entry: Path
    count: int
    size: int
    shards: list[ShardSpec]


@dataclass(frozen=True)
class ShardResult:
    index: int
    images: int
    bad: int
    built: bool                  # False: it was already there and current
    seconds: float
    host: str


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.jpgs"


def plan(paths: Sequence[str] | np.ndarray, size: int, cache_root: str | os.PathLike, *,
         image_root: str | None = None, quality: int = QUALITY, shard_images: int = SHARD_IMAGES) -> CompactPlan:
    """The cache entry for `paths` resized to `size`, created (plan.json, paths.npy) if new.

    `paths` are relative to `image_root` when it is given (a memory-mapped array of them is read in
    chunks, never copied whole), else made absolute. Nothing is built here; see `missing_shards`
    and `build_shard`. The entry's name hashes the paths and settings, not the files' contents:
    a changed file is caught per shard by its recorded size and mtime.
    """
    if len(paths) == 0:
        raise DataError("no images to cache: the image list is empty; check the data set's image folder "
                        "and split files")
    if image_root is None:
        names = np.asarray([os.path.abspath(p) for p in paths], dtype=str)
        root = ""
    else:
        names = paths if isinstance(paths, np.ndarray) and paths.dtype.kind == "U" else np.asarray(paths, dtype=str)
        root = str(Path(image_root).absolute())
    settings = {"format": FORMAT_VERSION, "size": int(size), "quality": int(quality), "shard_images": int(shard_images),
                "pillow": PIL.__version__, "image_root": root, "count": len(names)}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for chunk in _chunks(names):
        digest.update("\0".join(chunk.tolist()).encode())
        digest.update(b"\0")
    cache_root = Path(cache_root).absolute()
    entry = cache_root / f"compact{size}-{digest.hexdigest()[:32]}"
    if not (entry / "plan.json").is_file():
        _create_entry(entry, settings, names)
    n = len(names)
    shards = [ShardSpec(str(entry), i, start, min(start + shard_images, n), int(size), int(quality))
              for i, start in enumerate(range(0, n, shard_images))]
    return CompactPlan(entry=entry, count=n, size=int(size), shards=shards)


def _chunks(array: np.ndarray, rows: int = 1 << 16):
    for i in range(0, len(array), rows):
        yield array[i:i + rows]


def _create_entry(entry: Path, settings: dict, paths: np.ndarray) -> None:
    """plan.json and paths.npy, renamed into place together: an entry folder that exists is usable."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".{entry.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        np.save(tmp / "paths.npy", paths, allow_pickle=False)   # a memmap is written from its pages
        (tmp / "plan.json").write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "plan.json").is_file():  # not another planner's entry winning the race
                raise
        fsync_path(entry.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_plan(entry: Path) -> dict:
    try:
        return json.loads((entry / "plan.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{entry / 'plan.json'} is unreadable ({e}); delete {entry} to rebuild the compact cache") from None


def _spec_paths(spec: ShardSpec) -> list[str]:
    entry = Path(spec.entry)
    root = _read_plan(entry)["image_root"]
    rel = np.load(entry / "paths.npy", mmap_mode="r")[spec.start:spec.stop].tolist()
    return [os.path.join(root, p) for p in rel] if root else rel


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return _MISSING, _MISSING
    return st.st_size, st.st_mtime_ns


# ------------------------------------------------------------------ reading a shard's index
@dataclass(frozen=True)
class _Index:
    offsets: np.ndarray   # int64 (count + 1,)
    sizes: np.ndarray     # int64 (count,)
    mtimes: np.ndarray    # int64 (count,)
    bad: np.ndarray       # bool (count,)


def _read_index(path: Path) -> _Index | None:
    """The shard's index, or None when the file is absent, truncated or not a shard."""
    try:
        with open(path, "rb") as f:
            length = f.seek(0, os.SEEK_END)
            if length < _TRAILER.size:
                return None
            f.seek(length - _TRAILER.size)
            magic, count, at = _TRAILER.unpack(f.read(_TRAILER.size))
            if magic != _MAGIC or at + 8 * (3 * count + 1) + count + _TRAILER.size != length:
                return None
            f.seek(at)
            raw = f.read(8 * (3 * count + 1) + count)
    except OSError:
        return None
    ints = np.frombuffer(raw, dtype="<i8", count=3 * count + 1)
    index = _Index(offsets=ints[:count + 1], sizes=ints[count + 1:2 * count + 1], mtimes=ints[2 * count + 1:],
                   bad=np.frombuffer(raw, dtype=np.uint8, offset=8 * (3 * count + 1)).astype(bool))
    if index.offsets[0] != 0 or index.offsets[-1] != at or np.any(np.diff(index.offsets) < 0):
        return None
    return index


def _current(spec: ShardSpec, paths: list[str] | None = None) -> bool:
    """Whether the shard exists, is whole and its files are unchanged since it was built."""
    index = _read_index(spec.path)
    if index is None or len(index.sizes) != spec.stop - spec.start:
        return False
    stats = np.array([_stat(p) for p in (paths if paths is not None else _spec_paths(spec))], dtype=np.int64)
    return bool(np.array_equal(stats[:, 0], index.sizes) and np.array_equal(stats[:, 1], index.mtimes))


def missing_shards(plan: CompactPlan, *, threads: int = 16) -> list[ShardSpec]:
    """The shards to build: absent, unreadable, or holding an image whose file changed since.

    Stats every image file (in `threads` threads: fast on network storage too).
    """
    with ThreadPoolExecutor(max_workers=threads) as pool:
        current = list(pool.map(_current, plan.shards))
    return [s for s, ok in zip(plan.shards, current) if not ok]


# ------------------------------------------------------------------ building a shard
def encode(image, quality: int) -> bytes:
    """A resized PIL image as a baseline JPEG (4:2:0, optimised Huffman tables: 2-3 % smaller, same decode)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling=2, optimize=True)
    return buf.getvalue()


def build_shard(spec: ShardSpec, *, on_image: Callable[[int], None] | None = None) -> ShardResult:
    """Build one shard unless it is already current; idempotent, safe to call from many processes.

    Holds the shard's file lock (other builders of the same shard wait, then find it built),
    writes a temporary file, fsyncs it and renames it into place. `on_image(i)` is called after the
    i-th image of the shard is written (progress). An unreadable image is recorded as such (no
    bytes) and does not stop the build; the loader decides what to do with it.
    """
    start = time.monotonic()
    host = socket.gethostname()
    final = spec.path
    paths = _spec_paths(spec)
    with FileLock(f"{final}.lock"):
        for leftover in final.parent.glob(f"{final.name}.tmp-*"):  # a killed builder's: none is live
            leftover.unlink(missing_ok=True)
        index = _read_index(final) if _current(spec, paths) else None
        if index is not None:
            return ShardResult(spec.index, len(paths), int(index.bad.sum()), False, time.monotonic() - start, host)
        tmp = final.parent / f"{final.name}.tmp-{host}-{os.getpid()}-{secrets.token_hex(4)}"
        n = len(paths)
        offsets = np.zeros(n + 1, dtype=np.int64)
        stats = np.full((n, 2), _MISSING, dtype=np.int64)
        bad = np.zeros(n, dtype=np.uint8)
        try:
            with open(tmp, "wb") as f:
                for i, p in enumerate(paths):
                    # stat before reading: a file replaced while we read it is seen as changed next time
                    stats[i] = _stat(p)
                    try:
                        jpeg = encode(resized(p, spec.size), spec.quality)
                    except Exception:  # noqa: BLE001 - PIL signals bad files with OSError, SyntaxError, ValueError, ...
                        jpeg, bad[i] = b"", 1
                    f.write(jpeg)          # outside the try: a full disk is an error, not a bad image
                    offsets[i + 1] = f.tell()
                    if on_image is not None:
                        on_image(i)
                at = f.tell()
                f.write(offsets.astype("<i8").tobytes() + stats[:, 0].astype("<i8").tobytes()
                        + stats[:, 1].astype("<i8").tobytes() + bad.tobytes())
                f.write(_TRAILER.pack(_MAGIC, n, at))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fsync_path(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return ShardResult(spec.index, n, int(bad.sum()), True, time.monotonic() - start, host)


def build_missing(plan: CompactPlan, *, workers: int = 1, log: Callable[[str], None] | None = None) -> list[ShardResult]:
    """Build the plan's missing shards on this machine, in `workers` processes; no Ray."""
    todo = missing_shards(plan)
    if not todo:
        return []
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    images = sum(s.stop - s.start for s in todo)
    say(f"building {len(todo)} of {len(plan.shards)} shards ({images} images) of {plan.entry}")
    start = time.monotonic()
    results = []
    with Progress(images, "image cache: shards", "img", log=log) as shown:
        if workers <= 1 or len(todo) == 1:
            for spec in todo:
                results.append(build_shard(spec))
                shown.update(spec.stop - spec.start)
        else:
            # spawn keeps worker start-up safe in threaded parents (torch, Ray)
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)),
                                     mp_context=multiprocessing.get_context("spawn")) as pool:
                for spec, result in zip(todo, pool.map(build_shard, todo)):
                    results.append(result)
                    shown.update(spec.stop - spec.start)
    seconds = time.monotonic() - start
    say(f"built {plan.entry} in {seconds:.1f} s ({images / max(seconds, 1e-9):.0f} images/s)")
    return results


# ------------------------------------------------------------------ reading images
class CompactImages:
    """The cached images as a read-only array-like of shape (N, size, size, 3), uint8 HWC RGB.

    `images[index]` decodes the rows asked for (int, slice or index array) on this CPU;
    `images.encoded(index)` returns their JPEG bytes for decoding elsewhere (the GPU). Shards are
    memory-mapped lazily in each process (and never pickled: DataLoader workers reopen them).
    Unreadable images decode as zeros.
    """

    def __init__(self, plan: CompactPlan):
        self.entry, self.size = plan.entry, plan.size
        self.shape = (plan.count, plan.size, plan.size, 3)
        self.dtype = np.dtype(np.uint8)
        self._paths = [s.path for s in plan.shards]
        self._shard_images = plan.shards[0].stop - plan.shards[0].start
        offsets, bad, sizes = [], [], []
        for s in plan.shards:
            index = _read_index(s.path)
            if index is None or len(index.bad) != s.stop - s.start:
                raise DataError(f"compact cache shard {s.path} is missing or damaged; build the cache again "
                                f"(or delete {plan.entry})")
            offsets.append(index.offsets)
            bad.append(index.bad)
            sizes.append(index.sizes)
        self._offsets = offsets
        self.file_sizes = np.concatenate(sizes)     # bytes of each image file when cached (the data fingerprint)
        self.bad = np.flatnonzero(np.concatenate(bad)).astype(np.int64)
        self.disk_bytes = sum(int(o[-1]) for o in offsets)  # the JPEG bytes (indexes excluded)
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    def _rows(self, index) -> np.ndarray:
        if isinstance(index, slice):
            return np.arange(len(self))[index]
        rows = np.asarray(index, dtype=np.int64)
        return np.where(rows < 0, rows + len(self), rows)

    def _bytes(self, row: int) -> np.ndarray:
        if not 0 <= row < len(self):
            raise IndexError(f"image {row} out of range for {len(self)} images")
        shard, local = divmod(int(row), self._shard_images)
        data = self._maps.get(shard)
        if data is None:
            data = self._maps[shard] = np.memmap(self._paths[shard], dtype=np.uint8, mode="r")
        offsets = self._offsets[shard]
        return data[offsets[local]:offsets[local + 1]]

    def encoded(self, index) -> tuple:
        """(all the rows' JPEG bytes back to back as one uint8 tensor, int64 tensor of their lengths).

        One tensor rather than a list: a DataLoader worker hands each tensor over in its own
        shared-memory segment. An unreadable image has length 0.
        """
        import torch

        parts = [self._bytes(r) for r in self._rows(index).reshape(-1)]
        lengths = torch.tensor([len(p) for p in parts], dtype=torch.int64)
        data = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.uint8))
        return data, lengths

    def __getitem__(self, index) -> np.ndarray:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        rows = self._rows(index)
        flat = rows.reshape(-1)
        out = torch.zeros((len(flat), self.size, self.size, 3), dtype=torch.uint8)
        for k, r in enumerate(flat):
            jpeg = self._bytes(r)
            if len(jpeg):
                # a writable copy of the bytes (torch warns on read-only buffers); decode gives a CHW
                # view of HWC memory, so the permute back is a plain copy
                out[k] = decode_jpeg(torch.from_numpy(np.array(jpeg)), mode=ImageReadMode.RGB).permute(1, 2, 0)
        return out.numpy().reshape(rows.shape + self.shape[1:])


class GpuDecoder:
    """Batched nvJPEG decoding of `CompactImages.encoded` batches onto a CUDA device.

    nvJPEG writes its outputs from a stream of its own that does not wait for the caller's
    (pytorch/vision#9606): a block the caching allocator recycles may still be read by kernels
    queued on the caller's stream when the decoder overwrites it. So decoding runs on a side
    stream that holds nothing else, drained before each call, and the result is handed to the
    current stream with `record_stream`, so its block is not recycled before that stream is done.
    """

    def __init__(self, device, size: int):
        import torch

        self.device, self.size = torch.device(device), size
        self.stream = torch.cuda.Stream(self.device)

    def __call__(self, data, lengths):
        """uint8 (n, 3, size, size) on the device, ready for work queued next on the current stream."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        current = torch.cuda.current_stream(self.device)
        sizes = lengths.tolist()
        parts = torch.split(data, sizes)
        present = [i for i, n in enumerate(sizes) if n]     # unreadable images stay zeros
        with torch.cuda.stream(self.stream):
            self.stream.synchronize()
            if len(present) == len(sizes):
                out = torch.stack(decode_jpeg(list(parts), mode=ImageReadMode.RGB, device=self.device))
            else:
                out = torch.zeros((len(sizes), 3, self.size, self.size), dtype=torch.uint8, device=self.device)
                if present:
                    decoded = decode_jpeg([parts[i] for i in present], mode=ImageReadMode.RGB, device=self.device)
                    out[present] = torch.stack(decoded)
        current.wait_stream(self.stream)
        out.record_stream(current)
        return out


def load_compact_cache(paths: Sequence[str] | np.ndarray, size: int, cache_root: str | os.PathLike, *,
                       image_root: str | None = None, skip_bad: bool = False, workers: int | None = None,
                       quality: int = QUALITY, shard_images: int = SHARD_IMAGES) -> ImageCache:
    """The compact cache of `paths` at `size`, built first where shards are missing or stale.

    The counterpart of `wsml.data.cache.load_image_cache` (same pixels before encoding, same
    handling of unreadable images), with `array` a `CompactImages`. Missing shards are built by
    `workers` local processes (default: the CPUs this process may use); on a cluster the sweep
    builds them beforehand as Ray tasks, so trials find them.
    """
    p = plan(paths, size, cache_root, image_root=image_root, quality=quality, shard_images=shard_images)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    build_missing(p, workers=workers)
    images = CompactImages(p)

    def path_of(i: int) -> str:
        return _spec_paths(p.shards[i // shard_images])[i % shard_images]

    check_bad(images.bad, len(images), path_of, skip_bad)
    return ImageCache(array=images, bad=images.bad, file_sizes=images.file_sizes)

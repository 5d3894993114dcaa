"""The compact image cache: each image decoded and resized once, stored as a JPEG in large shards;
here its entries are planned and its shards built (reading them: `wsml.data.compact_images`).

The raw cache (`wsml.data.cache`) keeps 602 KB of uint8 pixels per 448 px image: about 1 TB for
OpenImages. This one keeps the same resized pixels JPEG-encoded (quality 92, 4:2:0; 40-80 KB per
448 px image, 38-41 dB PSNR against the raw pixels, by `bench/loader.py`), packed into shard files of
`shard_images` images each, and decodes them in the trial's DataLoader workers (libjpeg-turbo
through `torchvision.io.decode_jpeg`) or, batched, on the GPU (nvJPEG).

An entry `<cache root>/compact<size>-<digest>/` holds

    plan.json         format, size, quality, image count, images per shard, image root
    paths.npy         the image paths (relative to the image root when one is given)
    shard-00000.jpgs  rows 0 .. shard_images-1, and so on
    shard-00000.jpgs.ok   the stamp of its verified checksum (`wsml.data.compact_shard`)

Shards are built independently (`build_shard(spec)`), so that many machines can build one entry
on shared storage: each is written to a temporary name, fsync'd and renamed, under a per-shard
file lock. A shard file that exists is complete; a killed builder leaves only a temporary file,
which the next builder of that shard deletes. A shard records each image's file size and mtime,
and is built again when one of them changes. Usable with no cluster: `build_missing` builds what is
missing in local processes (`wsml.data.compact_images.load_compact_cache` then opens the result);
`orchestration/image_cache.py` builds the missing shards as Ray tasks spread over a cluster's nodes.

A shard file (`wsml.data.compact_shard`): the JPEG bytes of its images, their index, and a checksum
of both bound to the shard's entry and rows, verified when the cache is opened (once per shard file:
a stamp beside it remembers it); a shard that fails it is built again. A full disk while building is
one `DiskFull` line naming the folder, the space needed and the fix.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from filelock import FileLock

from wsml.data.cache import fsync_path, resized
from wsml.data.compact_shard import HEAD, MAGIC, identity, read_index, verified, write_stamp
from wsml.errors import DataError
from wsml.progress import Progress

# Bump when the stored bytes would differ for the same files and settings.
FORMAT_VERSION = 2     # 2: shards carry a checksum (wsml.data.compact_shard)
# JPEG quality and chroma subsampling, chosen by measurement (`bench/loader.py --quality-sweep`):
# at 448 px, quality 92 with 4:2:0 stays at or above 38 dB PSNR against the raw cache and under
# 80 KB per image on noisy photo-like JPEGs and on real photos; quality 90 falls below 38 dB on the
# former, 95 above 80 KB; 4:4:4 costs 22 % more bytes and decodes slower; WebP decodes 3-4x slower.
QUALITY = 92
# About 200-300 MB per 448 px shard: few files on shared storage, and a shard a task builds in a
# minute or two on one core (a killed task loses at most that).
SHARD_IMAGES = 4096

_MISSING = -1                         # size and mtime recorded for a file that could not be stat'ed

_logger = logging.getLogger(__name__)


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
        try:
            _create_entry(entry, settings, names)
        except OSError as err:
            if err.errno not in _NO_SPACE:
                raise
            raise disk_full(entry, int(size), len(names)) from None
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


def spec_paths(spec: ShardSpec) -> list[str]:
    entry = Path(spec.entry)
    root = _read_plan(entry)["image_root"]
    try:
        rel = np.load(entry / "paths.npy", mmap_mode="r")[spec.start:spec.stop].tolist()
    except (OSError, ValueError, EOFError) as e:   # cut short: mmap length past the file's end, or no header
        raise DataError(f"{entry / 'paths.npy'} is unreadable ({e}); delete {entry} to rebuild the compact "
                        "cache") from None
    return [os.path.join(root, p) for p in rel] if root else rel


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return _MISSING, _MISSING
    return st.st_size, st.st_mtime_ns


# ------------------------------------------------------------------ whether a shard is current
def _state(spec: ShardSpec, paths: list[str] | None = None) -> str:
    """"current", "absent", "stale" (an image's file changed since it was built), "damaged" (unreadable,
    or its bytes fail their checksum) or "lost" (damaged, and its images are not there to rebuild it)."""
    index = read_index(spec.path)
    if index is None and not spec.path.exists():
        return "absent"
    paths = paths if paths is not None else spec_paths(spec)
    stats = np.array([_stat(p) for p in paths], dtype=np.int64)
    root = _read_plan(Path(spec.entry))["image_root"]
    reachable = os.path.isdir(root) if root else bool(np.any(stats[:, 0] != _MISSING))
    if index is None or len(index.sizes) != len(paths):
        return "damaged" if reachable else "lost"
    changed = not (np.array_equal(stats[:, 0], index.sizes) and np.array_equal(stats[:, 1], index.mtimes))
    if changed and reachable:
        return "stale"             # built again whatever its bytes: no need to read them
    if not verified(spec.path, identity(spec.entry, spec.index, spec.start, spec.stop), index):
        return "damaged" if reachable else "lost"
    return "stale" if changed else "current"


def _lost(spec: ShardSpec) -> DataError:
    root = _read_plan(Path(spec.entry))["image_root"]
    where = f"{root} is missing" if root else f"none of its files exists, e.g. {spec_paths(spec)[0]}"
    return DataError(f"compact cache shard {spec.path} is damaged (unreadable, or its bytes fail their checksum) and "
                     f"its images are not there to rebuild it ({where}): make the images available and run again, "
                     f"or delete {spec.path} and build it where they are")


def missing_shards(plan: CompactPlan, *, threads: int = 16) -> list[ShardSpec]:
    """The shards to build: absent, damaged, or holding an image whose file changed since.

    Stats every image file and verifies each shard's checksum where no stamp says it was (in
    `threads` threads: fast on network storage too). A damaged shard whose images are gone is an error.
    """
    with ThreadPoolExecutor(max_workers=threads) as pool:
        states = list(pool.map(_state, plan.shards))
    for spec, state in zip(plan.shards, states):
        if state == "lost":
            raise _lost(spec)
        if state == "damaged":
            _logger.warning(f"warning: compact cache shard {spec.path} is damaged (unreadable, or its bytes fail "
                            "their checksum): building it again")
    return [s for s, state in zip(plan.shards, states) if state != "current"]


# ------------------------------------------------------------------ building a shard
class DiskFull(DataError):
    """No space left (or a disk quota reached) where the compact cache is built."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def disk_full(entry: Path, size: int, images: int) -> DiskFull:
    """The one line for a full disk while building `images` images of `entry`: the space they need, measured
    on the entry's built shards, else estimated (80 KB per 448 px image, by area)."""
    per_image = 80_000 * (size / 448) ** 2
    for shard in sorted(entry.glob("shard-*.jpgs"))[:1]:
        index = read_index(shard)
        if index is not None and len(index.sizes):
            per_image = float(index.offsets[-1]) / len(index.sizes)
    try:
        free = f", {_size(shutil.disk_usage(entry.parent).free)} free"
    except OSError:
        free = ""
    return DiskFull(f"no space left in {entry.parent} to build the compact cache (about {_size(images * per_image)} "
                    f"more needed for {images} images{free}): free space there, or pass --cache-dir a folder on a "
                    "disk with room")


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.0f} KB"


def encode(image, quality: int) -> bytes:
    """A resized PIL image as a baseline JPEG (4:2:0, optimised Huffman tables: 2-3 % smaller, same decode)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling=2, optimize=True)
    return buf.getvalue()


def build_shard(spec: ShardSpec, *, on_image: Callable[[int], None] | None = None) -> ShardResult:
    """Build one shard unless it is already current; idempotent, safe to call from many processes.

    Holds the shard's file lock (other builders of the same shard wait, then find it built),
    writes a temporary file, fsyncs it, renames it into place and stamps it verified. `on_image(i)`
    is called after the i-th image of the shard is written (progress). An unreadable image is
    recorded as such (no bytes) and does not stop the build; the loader decides what to do with it.
    A full disk is a `DiskFull`, with nothing left behind.
    """
    start = time.monotonic()
    final = spec.path
    paths = spec_paths(spec)
    try:
        with FileLock(f"{final}.lock"):
            for leftover in final.parent.glob(f"{final.name}.tmp-*"):  # a killed builder's: none is live
                leftover.unlink(missing_ok=True)
            state = _state(spec, paths)
            if state == "lost":
                raise _lost(spec)
            index = read_index(final) if state == "current" else None
            if index is not None:
                return ShardResult(spec.index, len(paths), int(index.bad.sum()), False, time.monotonic() - start,
                                   socket.gethostname())
            bad = _write(spec, paths, on_image)
    except OSError as err:
        if err.errno not in _NO_SPACE:
            raise
        raise disk_full(Path(spec.entry), spec.size, len(paths)) from None
    return ShardResult(spec.index, len(paths), bad, True, time.monotonic() - start, socket.gethostname())


def _write(spec: ShardSpec, paths: list[str], on_image: Callable[[int], None] | None) -> int:
    """Write the shard (its lock held): a temporary file, hashed as written, fsync'd, renamed into place
    and stamped. Returns its count of unreadable images."""
    final = spec.path
    tmp = final.parent / f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    n = len(paths)
    offsets = np.zeros(n + 1, dtype=np.int64)
    stats = np.full((n, 2), _MISSING, dtype=np.int64)
    bad = np.zeros(n, dtype=np.uint8)
    ident = identity(spec.entry, spec.index, spec.start, spec.stop)
    digest = hashlib.sha256(ident)
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
                digest.update(jpeg)
                offsets[i + 1] = f.tell()
                if on_image is not None:
                    on_image(i)
            tail = (offsets.astype("<i8").tobytes() + stats[:, 0].astype("<i8").tobytes()
                    + stats[:, 1].astype("<i8").tobytes() + bad.tobytes() + HEAD.pack(MAGIC, n, f.tell()))
            digest.update(tail)
            f.write(tail + digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    write_stamp(final, os.stat(final), digest.digest(), ident)     # what was just written: no need to read it back
    return int(bad.sum())


def build_missing(plan: CompactPlan, *, workers: int = 1, log: Callable[[str], None] | None = None) -> list[ShardResult]:
    """Build the plan's missing shards on this machine, in `workers` processes; no Ray. `log` gets the
    start and end lines and the progress lines (default: this module's logger, and `Progress`'s own)."""
    todo = missing_shards(plan)
    if not todo:
        return []
    say = log or _logger.info
    images = sum(s.stop - s.start for s in todo)
    say(f"building {len(todo)} of {len(plan.shards)} shards ({images} images) of {plan.entry}")
    start = time.monotonic()
    results: list[ShardResult] = []
    try:
        with Progress(images, "image cache: shards", "img", log=log) as shown:
            if workers <= 1 or len(todo) == 1:
                for spec in todo:
                    results.append(build_shard(spec))
                    shown.update(spec.stop - spec.start)
            else:
                # spawn keeps worker start-up safe in threaded parents (torch, Ray)
                with ProcessPoolExecutor(max_workers=min(workers, len(todo)),
                                         mp_context=multiprocessing.get_context("spawn")) as pool:
                    futures = [pool.submit(build_shard, spec) for spec in todo]
                    try:
                        for future in as_completed(futures):
                            results.append(future.result())
                            shown.update(results[-1].images)
                    except BaseException:
                        pool.shutdown(cancel_futures=True)      # start no other shard
                        raise
    except DiskFull:       # the space for every shard not built yet, not only the one that failed
        raise disk_full(plan.entry, plan.size, images - sum(r.images for r in results)) from None
    seconds = time.monotonic() - start
    say(f"built {plan.entry} in {seconds:.1f} s ({images / max(seconds, 1e-9):.0f} images/s)")
    return sorted(results, key=lambda r: r.index)

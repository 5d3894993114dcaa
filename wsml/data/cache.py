"""Build-once-per-node caches of derived arrays (decoded, resized images; frozen-backbone features).

Every trial on a node trains on the same images, so decoding and resizing them each epoch in each
trial wastes 3-4 CPU cores per trial (the published per-epoch PIL pipeline gives about 250 VOC
images/s per core: docs/performance.md). Instead the first caller builds the array once and every
later caller, in any process, memory-maps it read-only.

A cache entry is a directory `<name>-<hash of key>/` holding one `.npy` per array and `key.json`.
It is built in a temporary sibling directory while holding a file lock and renamed into place
only after every file is written and fsync'd: an entry directory that exists is complete, and a
temporary one left by a killed builder is never read (the next builder deletes it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import PIL
from filelock import FileLock, Timeout
from PIL import Image

from wsml.errors import DataError
from wsml.progress import Progress

# Bump when the stored pixels would differ for the same files and size (decode or resize change).
IMAGE_FORMAT_VERSION = 1

Shape = tuple[int, ...]

_logger = logging.getLogger(__name__)


def cached_arrays(cache_root: str | os.PathLike, key: Mapping, arrays: Mapping[str, tuple[Shape, np.dtype]],
                  build: Callable[[dict[str, np.memmap]], None], *, name: str = "cache") -> dict[str, np.memmap]:
    """Return read-only memmaps of the arrays cached under `key`, building them first if needed.

    `key` is a JSON-able dict that identifies the content; `arrays` maps each array's name to its
    (shape, dtype). `build` receives writable, zero-filled memmaps and fills them; it runs at most
    once per node at a time, and callers in other processes wait for it and reuse its result. An
    entry whose arrays do not match the requested shapes and dtypes is rebuilt.
    """
    root = Path(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]
    entry = root / f"{name}-{digest}"
    lock = FileLock(f"{entry}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _logger.info(f"waiting for another process to finish building {entry}")
        lock.acquire()
    try:
        for leftover in root.glob(f"{entry.name}.tmp-*"):  # from a killed builder: holding the lock, none is live
            shutil.rmtree(leftover, ignore_errors=True)
        found = _open_entry(entry, arrays)
        if found is not None:
            return found
        _logger.info(f"building {entry} (once per node)")
        start = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f"{entry.name}.tmp-", dir=root))
        try:
            out = {n: _allocate(tmp / f"{n}.npy", shape, dtype, name) for n, (shape, dtype) in arrays.items()}
            build(out)
            for a in out.values():
                a.flush()
            (tmp / "key.json").write_text(json.dumps(key, sort_keys=True))
            for f in tmp.iterdir():
                fsync_path(f)
            fsync_path(tmp)
            _move_into_place(tmp, entry)
            fsync_path(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _logger.info(f"built {entry} in {time.monotonic() - start:.1f} s")
        return {n: np.load(entry / f"{n}.npy", mmap_mode="r") for n in arrays}
    finally:
        lock.release()


def cached_array(cache_root: str | os.PathLike, key: Mapping, shape: Shape, dtype: np.dtype,
                 build: Callable[[np.memmap], None], *, name: str = "array") -> np.memmap:
    """One array cached under `key`: see `cached_arrays`."""
    return cached_arrays(cache_root, key, {"array": (tuple(shape), np.dtype(dtype))},
                         lambda out: build(out["array"]), name=name)["array"]


def _open_entry(entry: Path, arrays: Mapping[str, tuple[Shape, np.dtype]]) -> dict[str, np.memmap] | None:
    """The entry's arrays memory-mapped read-only, or None when it is absent or does not match."""
    if not entry.is_dir():
        return None
    out = {}
    for n, (shape, dtype) in arrays.items():
        try:
            a = np.load(entry / f"{n}.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):  # missing, truncated or not an .npy: rebuild
            return None
        if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
            return None
        out[n] = a
    return out


def _allocate(path: Path, shape: Shape, dtype: np.dtype, name: str) -> np.memmap:
    """A zero-filled .npy memmap whose disk blocks are reserved now.

    A sparse file that hits a full disk later kills the writer with SIGBUS; reserving first turns
    that into a clear error before any work is done.
    """
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DataError(f"not enough disk space in {path.parent.parent} for the {name} cache "
                                f"({os.fstat(fd).st_size / 1e9:.1f} GB); free space there or point "
                                f"--cache-dir at a larger disk") from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # no reservation there: stay sparse
                raise
        finally:
            os.close(fd)
    return out


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's (its entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, entry: Path) -> None:
    """Rename the finished directory to its final name, replacing a stale entry.

    Processes that still map the stale entry's files keep reading them: unlinking does not
    invalidate an existing mapping.
    """
    if entry.exists():
        stale = Path(tempfile.mkdtemp(prefix=f"{entry.name}.tmp-", dir=entry.parent))
        os.replace(entry, stale / "old")
        os.replace(tmp, entry)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, entry)


class ImageArray(Protocol):
    """Images as a read-only uint8 (N, H, W, 3) array that reads only the rows indexed: a memmap, the
    compact cache's `CompactImages`, or a row subset of either."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: Any) -> Any: ...


@dataclass(frozen=True)
class ImageCache:
    """Decoded images resized to size x size, in the order of the path list given."""

    array: ImageArray  # (N, size, size, 3) uint8 HWC RGB, read-only: a memmap (the compact cache: CompactImages)
    bad: np.ndarray   # int64 indices of unreadable images that were skipped; their pixels are 0
    file_sizes: np.ndarray  # int64 bytes of each file as found (-1: missing), for the data fingerprint


def load_image_cache(paths: Sequence[str], size: int, cache_root: str | os.PathLike, *,
                     skip_bad: bool = False, workers: int | None = None) -> ImageCache:
    """Decode, convert to RGB and resize every image once per node, exactly as the published
    pipeline does each epoch (PIL, `transforms.Resize((size, size))`), and memory-map the result.

    The cache is rebuilt when the path list, any file's size or mtime, or `size` changes. Images
    are decoded by `workers` processes (default: the CPUs this process may use). An unreadable
    image raises DataError unless `skip_bad`, which leaves it as zeros, lists it in `.bad` and
    prints a one-line warning with the count.
    """
    if not paths:
        raise DataError("no images to cache: the image list is empty; check the data set's image folder "
                        "and split files")
    files = [os.path.abspath(p) for p in paths]
    stats: list[list[str | int | None]] = []
    for p in files:
        try:
            st = os.stat(p)
        except OSError as e:
            if not skip_bad:  # fail before building: a wrong folder would otherwise cache N blank images
                raise DataError(f"cannot read image {p} ({e.strerror}); fix the data set or pass "
                                f"--skip-bad-images to leave it out") from None
            stats.append([p, None, None])
        else:
            stats.append([p, st.st_size, st.st_mtime_ns])
    key = {"format": IMAGE_FORMAT_VERSION, "pillow": PIL.__version__, "size": size, "files": stats}
    n = len(files)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def build(out: dict[str, np.memmap]) -> None:
        out["bad"][_decode_all(files, size, out["images"], workers)] = True

    got = cached_arrays(cache_root, key, {"images": ((n, size, size, 3), np.dtype(np.uint8)),
                                          "bad": ((n,), np.dtype(bool))}, build, name=f"images{size}")
    bad = np.flatnonzero(got["bad"]).astype(np.int64)
    check_bad(bad, n, files.__getitem__, skip_bad)
    sizes = np.array([-1 if s is None else s for _, s, _ in stats], dtype=np.int64)
    return ImageCache(array=got["images"], bad=bad, file_sizes=sizes)


def check_bad(bad: np.ndarray, n: int, path_of: Callable[[int], str], skip_bad: bool) -> None:
    """Raise on unreadable images (their indices `bad` of `n`) unless `skip_bad`; then warn once."""
    if bad.size and not skip_bad:
        more = f" and {bad.size - 1} more" if bad.size > 1 else ""
        first = path_of(int(bad[0]))
        raise DataError(f"unreadable image {first} ({_why_unreadable(first)}){more}; fix or "
                        f"remove it, or pass --skip-bad-images to train without it")
    if bad.size:
        _logger.warning(f"warning: skipped {bad.size} unreadable image(s) of {n} (left as zeros), "
                        f"e.g. {path_of(int(bad[0]))}")


def resized(path: str, size: int) -> Image.Image:
    """The image as the published pipeline feeds it to ToTensor: RGB, `Resize((size, size))`.

    Same calls as torchvision's Resize((size, size)) on a PIL image: PIL's antialiased bilinear.
    """
    with Image.open(path) as im:
        return im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)


def _decode(path: str, size: int) -> np.ndarray:
    return np.asarray(resized(path, size))


def _why_unreadable(path: str) -> str:
    try:
        _decode(path, 1)
    except Exception as e:  # noqa: BLE001 - any decoder error is the reason shown
        return f"{type(e).__name__}: {e}"
    return "it could not be decoded when the cache was built"


def _decode_chunk(npy: str, jobs: list[tuple[int, str]], size: int) -> list[int]:
    """Decode `jobs` (index, path) into the .npy at `npy`; return the indices that failed."""
    out = np.load(npy, mmap_mode="r+")
    bad = []
    for i, path in jobs:
        try:
            out[i] = _decode(path, size)
        except Exception:  # noqa: BLE001 - PIL signals bad files with OSError, SyntaxError, ValueError, ...: all mean "unreadable"
            bad.append(i)
    out.flush()
    return bad


def _decode_all(files: list[str], size: int, out: np.memmap, workers: int) -> list[int]:
    jobs = list(enumerate(files))
    npy = out.filename
    assert npy is not None    # a memmap of a file
    # Small chunks keep the workers evenly loaded and the progress shown moving.
    step = max(1, min(256, len(jobs) // (max(workers, 1) * 8)))
    chunks = [jobs[i:i + step] for i in range(0, len(jobs), step)]
    with Progress(len(jobs), "image cache: decoding", "img") as shown:
        if workers <= 1:
            bad = []
            for chunk in chunks:
                bad += _decode_chunk(npy, chunk, size)
                shown.update(len(chunk))
            return bad
        # spawn keeps worker start-up safe in threaded parents (torch, Ray)
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                bad = []
                for chunk, found in zip(chunks, pool.map(_decode_chunk, [npy] * len(chunks), chunks,
                                                         [size] * len(chunks))):
                    bad += found
                    shown.update(len(chunk))
                return bad
            except BaseException:
                # interrupted (Ctrl-C, SIGTERM): drop the queued chunks instead of decoding them all first
                pool.shutdown(cancel_futures=True)
                raise

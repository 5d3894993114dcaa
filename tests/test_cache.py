"""The build-once image/array cache: same pixels as the published pipeline, built once per node
under concurrency, rebuilt when its inputs change, never used half-built, clear errors on bad files."""

import contextlib
import logging
import multiprocessing
import os
import time

import numpy as np
import pytest
from PIL import Image

from tests.helpers import write_image
from wsml.data.cache import cached_array, load_image_cache
from wsml.errors import DataError
from wsml.logs import show_on_stderr

SIZE = 32
# Spawned children import this module to find their target: keep torch out of module scope.
SPAWN = multiprocessing.get_context("spawn")


def _direct(path, size):
    """What the published pipeline feeds the network before ToTensor: torchvision's PIL resize, as uint8 CHW."""
    import torchvision.transforms.functional as F

    with Image.open(path) as im:
        return F.pil_to_tensor(F.resize(im.convert("RGB"), [size, size]))


def _assert_matches_direct(array, paths, size, skip=()):
    import torch

    for i, p in enumerate(paths):
        if i not in skip:
            assert torch.equal(torch.from_numpy(np.array(array[i])).permute(2, 0, 1), _direct(p, size)), p


@pytest.mark.parametrize("workers", [1, 2])
def test_cache_gives_the_published_pixels(images, tmp_path, workers):
    cache = load_image_cache(images, SIZE, tmp_path / "cache", workers=workers)
    assert cache.array.shape == (len(images), SIZE, SIZE, 3) and cache.array.dtype == np.uint8
    assert cache.bad.tolist() == []
    _assert_matches_direct(cache.array, images, SIZE)
    with pytest.raises(ValueError, match="read-only"):
        cache.array[0, 0, 0, 0] = 1


@pytest.fixture(autouse=True)
def _cache_log(caplog):
    caplog.set_level(logging.INFO, logger="wsml.data.cache")


def _built(caplog):
    """Whether a cache was built since the last check (the builder announces itself in the log)."""
    built = any(message.startswith("building ") for message in caplog.messages)
    caplog.clear()
    return built


def _load_images_in_child(paths, size, root, log, barrier):
    with open(log, "w") as f, contextlib.redirect_stderr(f):
        show_on_stderr()        # as a command line shows the log
        barrier.wait()
        load_image_cache(paths, size, root, workers=1)


def _count_build(out, counter, value):
    with open(counter, "a") as f:
        f.write("build\n")
    time.sleep(1.0)  # long enough that the other caller arrives while this build is under way
    out[:] = value


def _cached_in_child(root, counter, barrier, result):
    barrier.wait()
    arr = cached_array(root, {"what": "test"}, (1000,), np.float32, lambda out: _count_build(out, counter, 3.0))
    result.put(float(arr.sum()))


def test_concurrent_callers_build_once(tmp_path):
    root, counter = tmp_path / "cache", tmp_path / "builds.txt"
    barrier, result = SPAWN.Barrier(2), SPAWN.Queue()
    procs = [SPAWN.Process(target=_cached_in_child, args=(root, counter, barrier, result)) for _ in range(2)]
    for p in procs:
        p.start()
    sums = [result.get(timeout=30), result.get(timeout=30)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert counter.read_text().count("build") == 1
    assert sums == [3000.0, 3000.0]


def test_two_processes_build_the_image_cache_once(images, tmp_path, caplog):
    root = tmp_path / "cache"
    barrier = SPAWN.Barrier(2)
    logs = [tmp_path / f"child{i}.log" for i in range(2)]
    procs = [SPAWN.Process(target=_load_images_in_child, args=(images, SIZE, root, log, barrier)) for log in logs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    lines = [line for log in logs for line in log.read_text().splitlines()]
    assert sum(line.startswith("building ") for line in lines) == 1
    cache = load_image_cache(images, SIZE, root, workers=1)
    assert not _built(caplog)
    _assert_matches_direct(cache.array, images, SIZE)


def test_rebuilt_when_an_image_or_the_size_changes(images, tmp_path, caplog):
    root = tmp_path / "cache"
    before = np.array(load_image_cache(images, SIZE, root, workers=1).array)
    caplog.clear()

    old = os.stat(images[3])
    write_image(images[3], np.random.default_rng(99), 40, 30, "RGB")
    os.utime(images[3], ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))
    after = load_image_cache(images, SIZE, root, workers=1).array
    assert _built(caplog)
    assert not np.array_equal(after[3], before[3])
    _assert_matches_direct(after, images, SIZE)

    now = os.stat(images[5])  # same bytes, new mtime: rebuilt too (the key cannot tell a touch from an edit)
    os.utime(images[5], ns=(now.st_atime_ns, now.st_mtime_ns + 10**9))
    load_image_cache(images, SIZE, root, workers=1)
    assert _built(caplog)

    load_image_cache(images, SIZE, root, workers=1)
    assert not _built(caplog)

    bigger = load_image_cache(images, 24, root, workers=1).array
    assert bigger.shape == (len(images), 24, 24, 3)
    _assert_matches_direct(bigger, images, 24)

    reordered = load_image_cache(images[::-1], SIZE, root, workers=1).array
    _assert_matches_direct(reordered, images[::-1], SIZE)


def test_leftover_temp_directory_is_never_used(images, tmp_path, caplog):
    root = tmp_path / "cache"
    load_image_cache(images, SIZE, root, workers=1)
    (entry,) = [d for d in root.iterdir() if d.is_dir()]
    # What a builder killed before its final rename leaves: a temp directory with wrong pixels.
    dead = root / f"{entry.name}.tmp-dead"
    entry.rename(dead)
    arr = np.load(dead / "images.npy", mmap_mode="r+")
    arr[:] = 255
    arr.flush()
    del arr
    caplog.clear()

    cache = load_image_cache(images, SIZE, root, workers=1)
    assert _built(caplog)
    _assert_matches_direct(cache.array, images, SIZE)
    assert not dead.exists()


def _half_build_then_hang(out, started):
    out[: len(out) // 2] = 7
    out.flush()
    started.set()
    time.sleep(60)


def _build_in_child(root, started):
    cached_array(root, {"what": "killed"}, (100,), np.int64, lambda out: _half_build_then_hang(out, started))


def test_builder_killed_mid_build(tmp_path):
    root = tmp_path / "cache"
    started = SPAWN.Event()
    p = SPAWN.Process(target=_build_in_child, args=(root, started))
    p.start()
    assert started.wait(30)
    p.kill()
    p.join(timeout=30)
    (left,) = [d.name for d in root.iterdir() if d.is_dir()]
    assert ".tmp-" in left  # the half-built array never became visible as an entry

    calls = []

    def build(out):
        calls.append(1)
        out.fill(1)

    arr = cached_array(root, {"what": "killed"}, (100,), np.int64, build)
    assert calls == [1] and arr.tolist() == [1] * 100  # the lock died with the builder; nothing half-built read
    assert not [d for d in root.iterdir() if ".tmp-" in d.name]


def test_failed_build_leaves_nothing(tmp_path):
    def fail(out):
        out[:] = 5
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cached_array(tmp_path, {"k": 1}, (10,), np.int32, fail)
    assert not [d for d in tmp_path.iterdir() if d.is_dir()]
    assert cached_array(tmp_path, {"k": 1}, (10,), np.int32, lambda out: out.fill(2)).tolist() == [2] * 10


def test_entry_not_matching_the_request_is_rebuilt(tmp_path):
    calls = []

    def build(out):
        calls.append(out.shape)
        out[:] = 4

    cached_array(tmp_path, {"k": 1}, (8,), np.int16, build)
    cached_array(tmp_path, {"k": 1}, (8,), np.int16, build)
    assert calls == [(8,)]
    assert cached_array(tmp_path, {"k": 1}, (9,), np.int16, build).shape == (9,)
    assert cached_array(tmp_path, {"k": 1}, (9,), np.float32, build).dtype == np.float32
    assert len(calls) == 3

    (npy,) = tmp_path.glob("*/array.npy")
    with open(npy, "r+b") as f:
        f.truncate(os.path.getsize(npy) - 10)
    assert cached_array(tmp_path, {"k": 1}, (9,), np.float32, build).tolist() == [4.0] * 9
    assert len(calls) == 4


def test_bad_images_raise_naming_the_file(with_bad, tmp_path):
    with pytest.raises(DataError) as err:
        load_image_cache(with_bad, SIZE, tmp_path / "cache", workers=2)
    msg = str(err.value)
    assert "\n" not in msg and with_bad[4] in msg and "truncated" in msg
    assert "1 more" in msg and "--skip-bad-images" in msg


def test_skip_bad_records_and_reports(with_bad, tmp_path, caplog):
    root = tmp_path / "cache"
    cache = load_image_cache(with_bad, SIZE, root, skip_bad=True, workers=2)
    assert cache.bad.tolist() == [4, 9]
    assert not cache.array[4].any() and not cache.array[9].any()
    _assert_matches_direct(cache.array, with_bad, SIZE, skip={4, 9})
    warnings = [message for message in caplog.messages if message.startswith("warning")]
    assert len(warnings) == 1 and "skipped 2 unreadable" in warnings[0]
    caplog.clear()

    # The cache built with skip_bad is reused, but without it the bad files are still an error.
    with pytest.raises(DataError, match="notes.jpg|truncated.jpg"):
        load_image_cache(with_bad, SIZE, root, workers=1)
    assert not _built(caplog)


def test_missing_or_no_images(images, tmp_path):
    missing = images[:3] + [str(tmp_path / "img" / "gone.jpg")]
    with pytest.raises(DataError, match="gone.jpg.*--skip-bad-images"):
        load_image_cache(missing, SIZE, tmp_path / "cache", workers=1)
    assert load_image_cache(missing, SIZE, tmp_path / "cache", skip_bad=True, workers=1).bad.tolist() == [3]
    with pytest.raises(DataError, match="image list is empty"):
        load_image_cache([], SIZE, tmp_path / "cache")

"""Issue 30, findings 8 and 9: compact cache shards carry a checksum bound to their entry and rows,
verified when the cache is opened (once per shard file: a stamp remembers it), a damaged or swapped
shard rebuilt; an image that does not decode while training names its shard in one line; a full disk
while building is one line naming the folder, the space needed and the fix, with no shard left half
written under its name."""

import errno
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from wsml.data import compact, compact_shard
from wsml.data.compact import DiskFull, plan
from wsml.data.compact_images import GpuDecoder, load_compact_cache
from wsml.data.compact_shard import DamagedShard, read_index, stamp_path
from wsml.errors import DataError


def _overwrite(path, at: int, data: bytes) -> None:
    """Write `data` at `at` inside the file, keeping its size and mtime (as bit rot, or a careful hand)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _flip(path, image: int, n: int = 16) -> None:
    """Invert `n` bytes in the middle of the shard's `image`-th JPEG."""
    index = read_index(path)
    start, stop = int(index.offsets[image]), int(index.offsets[image + 1])
    at = (start + stop) // 2
    with open(path, "rb") as f:
        f.seek(at)
        old = f.read(n)
    _overwrite(path, at, bytes(b ^ 0xFF for b in old))


def test_a_shard_with_flipped_bytes_is_found_at_open_and_rebuilt(images, tmp_path, caplog):
    """Before: the shard was accepted (same size and mtime) and its image decoded wrong or not at all."""
    caplog.set_level(logging.INFO, logger="wsml.data.compact")
    want = load_compact_cache(images, 32, tmp_path / "cache", workers=1, shard_images=8).array[np.arange(36)]
    p = plan(images, 32, tmp_path / "cache", shard_images=8)
    _flip(p.shards[1].path, 2)
    caplog.clear()
    got = load_compact_cache(images, 32, tmp_path / "cache", workers=1, shard_images=8).array[np.arange(36)]
    assert f"compact cache shard {p.shards[1].path} is damaged" in caplog.text
    assert "building 1 of 5 shards" in caplog.text
    np.testing.assert_array_equal(got, want)


def _bmp(path, pixels: np.ndarray) -> str:
    Image.fromarray(pixels).save(path)     # BMP: the file's size depends on the image's size alone
    os.utime(path, ns=(10**18, 10**18))    # and every file the same mtime: the shards' indexes agree on both
    return str(path)


def test_a_shard_swapped_for_another_of_the_same_size_and_mtime_is_found(tmp_path, caplog):
    """Shards 0 and 1 hold the same two pictures in the other order: files of one size, whose indexes
    record the same file sizes and mtimes. Before: shard 1's file copied over shard 0's (its mtime set
    back) was accepted, and rows 0 and 1 read the wrong pictures without a word."""
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(2))
    (tmp_path / "img").mkdir()
    paths = [_bmp(tmp_path / "img" / f"{i}.bmp", pixels) for i, pixels in enumerate((a, b, b, a))]
    want = load_compact_cache(paths, 32, tmp_path / "cache", workers=1, shard_images=2).array[np.arange(4)]
    p = plan(paths, 32, tmp_path / "cache", shard_images=2)
    first, second = p.shards[0].path, p.shards[1].path
    before = os.stat(first)
    assert before.st_size == os.path.getsize(second) and not np.array_equal(want[0], want[1])
    shutil.copyfile(second, first)
    os.utime(first, ns=(before.st_atime_ns, before.st_mtime_ns))
    caplog.set_level(logging.INFO, logger="wsml.data.compact")
    got = load_compact_cache(paths, 32, tmp_path / "cache", workers=1, shard_images=2).array[np.arange(4)]
    assert f"compact cache shard {first} is damaged" in caplog.text
    np.testing.assert_array_equal(got, want)


def test_the_stamp_spares_hashing_a_shard_again(images, tmp_path, monkeypatch):
    """A shard is read in full once per file: the builder stamps what it wrote, an unstamped shard is
    hashed at the first open only, and again once its file is touched (another ctime)."""
    hashed = []
    real = compact_shard.hash_file

    def counting(f, ident, length):
        hashed.append(f.name)
        return real(f, ident, length)

    monkeypatch.setattr(compact_shard, "hash_file", counting)

    def open_cache():
        hashed.clear()
        load_compact_cache(images, 32, tmp_path / "cache", workers=1, shard_images=10)
        return sorted(os.path.basename(name) for name in hashed)

    p = plan(images, 32, tmp_path / "cache", shard_images=10)
    assert open_cache() == []                       # built and stamped: nothing to read back
    assert all(stamp_path(s.path).is_file() for s in p.shards)
    for s in p.shards:
        stamp_path(s.path).unlink()
    assert open_cache() == [compact.shard_name(i) for i in range(4)]     # verified once ...
    assert open_cache() == []                                           # ... and remembered
    os.utime(p.shards[2].path, ns=(os.stat(p.shards[2].path).st_atime_ns, os.stat(p.shards[2].path).st_mtime_ns))
    assert open_cache() == [compact.shard_name(2)]  # its ctime moved: verified again


def test_a_damaged_shard_whose_images_are_gone_is_one_line(tmp_path):
    """A damaged shard is rebuilt only from its images: without them, one line naming the shard and
    the fix (before: the shard was rebuilt with every image missing)."""
    folder = tmp_path / "img"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
        names.append(f"{i}.jpg")
    load_compact_cache(names, 16, tmp_path / "cache", image_root=str(folder), workers=1, shard_images=4)
    p = plan(names, 16, tmp_path / "cache", image_root=str(folder), shard_images=4)
    _flip(p.shards[0].path, 1)
    folder.rename(tmp_path / "moved")
    with pytest.raises(DataError) as err:
        load_compact_cache(names, 16, tmp_path / "cache", image_root=str(folder), workers=1, shard_images=4)
    msg = str(err.value)
    assert "\n" not in msg and f"compact cache shard {p.shards[0].path} is damaged" in msg, msg
    assert f"{folder} is missing" in msg and "make the images available" in msg


def test_an_image_that_does_not_decode_while_training_names_its_shard(images, tmp_path):
    """A shard damaged after the cache was opened, read by a DataLoader worker as the trainer does: one
    line naming the shard and the fix (before: torch's decode_jpeg traceback), the shard's stamp dropped
    so that the next start verifies it and rebuilds it."""
    import torch

    cache = load_compact_cache(images, 32, tmp_path / "cache", workers=1, shard_images=8)
    want = cache.array[np.arange(36)]
    shard = cache.array.entry / compact.shard_name(2)
    _overwrite(shard, int(read_index(shard).offsets[3]), b"\x00" * 8)      # row 19: not a JPEG any more

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.from_numpy(cache.array[np.arange(16, 24)])

    with pytest.raises(DamagedShard) as err:
        list(torch.utils.data.DataLoader(Batches(), batch_size=None, num_workers=1))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"compact cache shard {shard} is damaged (its image 3 does not decode"), msg
    assert "run again to verify and rebuild it" in msg and not stamp_path(shard).exists()
    again = load_compact_cache(images, 32, tmp_path / "cache", workers=1, shard_images=8)
    np.testing.assert_array_equal(again.array[np.arange(36)], want)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_an_image_that_does_not_decode_on_the_gpu_names_its_shard(images, tmp_path):
    cache = load_compact_cache(images, 32, tmp_path / "cache", workers=1, shard_images=8)
    shard = cache.array.entry / compact.shard_name(1)
    _overwrite(shard, int(read_index(shard).offsets[5]), b"\x00" * 8)      # row 13
    decoder = GpuDecoder("cuda", 32)
    assert decoder(*cache.array.encoded(np.arange(0, 8))).shape == (8, 3, 32, 32)
    with pytest.raises(DamagedShard) as err:
        decoder(*cache.array.encoded(np.arange(8, 16)))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"compact cache shard {shard} is damaged"), msg


class _FillsUp:
    """A file whose writes fail with ENOSPC once `room` bytes are written, as on a full disk."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_while_building_is_one_line_and_leaves_no_shard(images, tmp_path, monkeypatch):
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return _FillsUp(f, 3000) if "w" in mode else f

    monkeypatch.setattr(compact, "open", full_open, raising=False)      # the shard writer's open
    cache = tmp_path / "cache"
    with pytest.raises(DiskFull) as err:
        load_compact_cache(images, 32, cache, workers=1, shard_images=8)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"no space left in {cache} to build the compact cache (about "), msg
    assert "more needed for 36 images" in msg and "free space there, or pass --cache-dir" in msg
    entry = plan(images, 32, cache, shard_images=8).entry
    left = sorted(os.listdir(entry))
    assert not [n for n in left if n.endswith(".jpgs") or ".tmp-" in n], left      # nothing half written

    # the entry's own files (plan.json, paths.npy) on a full disk: the same line, nothing left either
    monkeypatch.undo()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", no_space)
    with pytest.raises(DiskFull, match=f"no space left in {tmp_path / 'other'} .*--cache-dir"):
        plan(images, 32, tmp_path / "other")
    assert os.listdir(tmp_path / "other") == []


def test_a_full_disk_while_the_cluster_builds_is_one_line(images, tmp_path, ray_address):
    """The sweep's build (shards as Ray tasks): the task's DiskFull reaches the driver as the same one
    line, with the space for every shard not built yet (before: Ray's error, the task's traceback)."""
    import ray

    from orchestration.image_cache import build_shards

    def build_on_a_full_disk(spec):      # defined here, so that Ray ships it by value to its workers
        import errno
        import os

        from wsml.data import compact

        def no_space(path, mode="r", *args, **kwargs):
            if "w" in mode:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return open(path, mode, *args, **kwargs)

        compact.open = no_space
        try:
            return compact.build_shard(spec)
        finally:
            del compact.open

    p = plan(images, 32, tmp_path / "cache", shard_images=8)
    ray.init(address=ray_address)
    try:
        with pytest.raises(DataError) as err:
            build_shards([p], build=build_on_a_full_disk, log=lambda line: None)
    finally:
        ray.shutdown()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"no space left in {tmp_path / 'cache'} to build the compact cache"), msg
    assert "more needed for" in msg and "--cache-dir" in msg
    assert not [n for n in os.listdir(p.entry) if n.endswith(".jpgs") or ".tmp-" in n]


def test_a_truncated_paths_file_of_an_entry_is_one_line(tmp_path):
    """An entry's paths.npy cut short (a full disk, a copy interrupted): one line naming it and the fix."""
    from wsml.data.compact import ShardSpec, spec_paths

    entry = tmp_path / "compact64-x"
    entry.mkdir()
    (entry / "plan.json").write_text('{"image_root": ""}')
    np.save(entry / "paths.npy", np.array([f"img{i:04d}.jpg" for i in range(100)]))
    data = (entry / "paths.npy").read_bytes()
    (entry / "paths.npy").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"paths\.npy is unreadable .*delete .*compact64-x to rebuild"):
        spec_paths(ShardSpec(entry=str(entry), index=0, start=0, stop=100, size=64, quality=92))

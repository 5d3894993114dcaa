"""The compact image cache: JPEG shards of the raw cache's pixels, built shard by shard, atomically and
once, rebuilt where a file changed, read back in DataLoader workers (and on the GPU where there is one)."""

import logging
import multiprocessing
import os
import pickle
import time

import numpy as np
import pytest
from PIL import Image

from bench.loader import make_photos
from tests.helpers import write_image
from wsml.data import compact
from wsml.data.cache import load_image_cache
from wsml.data.compact import build_shard, missing_shards, plan
from wsml.data.compact_images import load_compact_cache
from wsml.errors import DataError

SPAWN = multiprocessing.get_context("spawn")


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 image stacks."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(255**2 / np.maximum(mse, 1e-12))


def test_pixels_match_the_raw_cache_at_448(images, tmp_path):
    """Fidelity at the default quality and the paper's 448 px: mean PSNR against the raw cache
    (the published pipeline's pixels) of at least 38 dB, on real photos and on the raw cache's fixtures."""
    photos = make_photos(tmp_path / "photos", 12)
    for paths, floor in ((photos, 38.0), (images, 38.0)):
        got = load_compact_cache(paths, 448, tmp_path / "cache", workers=1)
        want = np.asarray(load_image_cache(paths, 448, tmp_path / "cache", workers=1).array)
        assert got.array.shape == want.shape and got.array.dtype == np.uint8
        decoded = got.array[np.arange(len(paths))]
        quality = psnr(decoded, want)
        assert quality.mean() >= floor, (quality.mean(), quality.min())
        assert quality.min() >= 33.0, quality.min()
        if paths is photos:   # the size target: 80 KB per 448 px image
            assert got.array.disk_bytes / len(paths) <= 80_000, got.array.disk_bytes / len(paths)


def test_reads_like_an_array_and_pickles_without_its_data(images, tmp_path):
    cache = load_compact_cache(images, 32, tmp_path / "cache", workers=2, shard_images=8)
    arr = cache.array
    assert len(arr) == 36 and arr.shape == (36, 32, 32, 3) and cache.bad.tolist() == []
    all_rows = arr[np.arange(36)]
    np.testing.assert_array_equal(arr[5], all_rows[5])
    np.testing.assert_array_equal(arr[3:11], all_rows[3:11])        # across a shard boundary
    np.testing.assert_array_equal(arr[[30, 2, 17]], all_rows[[30, 2, 17]])
    with pytest.raises(IndexError):
        arr[[36]]
    # what a DataLoader worker started with spawn receives: the index, not the images
    assert len(pickle.dumps(arr)) < arr.disk_bytes / 4
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(arr))[[7, 8]], all_rows[[7, 8]])
    # the bytes handed to a GPU decoder are the very JPEGs decoded here
    import torch
    from torchvision.io import decode_jpeg

    data, lengths, shards = arr.encoded(np.array([4, 9]))
    assert shards == (str(arr.entry / compact.shard_name(0)), str(arr.entry / compact.shard_name(1)))
    first, second = torch.split(data, lengths.tolist())
    np.testing.assert_array_equal(decode_jpeg(second).permute(1, 2, 0).numpy(), all_rows[9])
    assert len(first) == lengths[0] > 0


def test_shards_are_built_once_and_rebuilt_only_where_a_file_changed(images, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="wsml.data.compact")
    root = tmp_path / "cache"
    p = plan(images, 32, root, shard_images=10)
    assert [(s.start, s.stop) for s in p.shards] == [(0, 10), (10, 20), (20, 30), (30, 36)]
    assert len(missing_shards(p)) == 4
    results = [build_shard(s) for s in p.shards]
    assert [r.built for r in results] == [True] * 4 and [r.images for r in results] == [10, 10, 10, 6]
    assert missing_shards(p) == []
    assert [r.built for r in (build_shard(s) for s in p.shards)] == [False] * 4   # idempotent
    before = load_compact_cache(images, 32, root, workers=1, shard_images=10).array[np.arange(36)]
    assert "building" not in caplog.text

    old = os.stat(images[13])
    write_image(images[13], np.random.default_rng(7), 40, 30, "RGB")
    os.utime(images[13], ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))
    assert [s.index for s in missing_shards(plan(images, 32, root, shard_images=10))] == [1]
    after = load_compact_cache(images, 32, root, workers=1, shard_images=10).array[np.arange(36)]
    assert "building 1 of 4 shards" in caplog.text
    assert psnr(after[13:14], before[13:14])[0] < 20          # the new picture
    np.testing.assert_array_equal(np.delete(after, 13, 0), np.delete(before, 13, 0))

    # another size, quality or path list is another entry; the same list finds this one
    assert plan(images, 24, root).entry != p.entry
    assert plan(images[::-1], 32, root, shard_images=10).entry != p.entry
    assert plan(list(images), 32, root, shard_images=10).entry == p.entry


def test_paths_relative_to_an_image_root_read_in_chunks(images, tmp_path):
    folder = os.path.dirname(images[0])
    relative = np.asarray([os.path.basename(p) for p in images])
    np.save(tmp_path / "rel.npy", relative)
    mapped = np.load(tmp_path / "rel.npy", mmap_mode="r")     # as formats.read_formatted gives them
    got = load_compact_cache(mapped, 32, tmp_path / "cache", image_root=folder, workers=1)
    want = load_compact_cache(images, 32, tmp_path / "cache2", workers=1)
    np.testing.assert_array_equal(got.array[np.arange(36)], want.array[np.arange(36)])


def _half_build_then_die(spec, started):
    def on_image(i):
        if i == 3:
            started.set()
            time.sleep(60)       # killed here, its temporary file half written

    build_shard(spec, on_image=on_image)


def test_builder_killed_mid_shard_leaves_nothing_visible(images, tmp_path):
    p = plan(images, 32, tmp_path / "cache", shard_images=16)
    victim = p.shards[1]
    started = SPAWN.Event()
    proc = SPAWN.Process(target=_half_build_then_die, args=(victim, started))
    proc.start()
    assert started.wait(60)
    proc.kill()
    proc.join(30)
    entry = sorted(os.listdir(p.entry))
    assert compact.shard_name(1) not in entry                      # never visible under its name
    assert [n for n in entry if n.startswith(f"{compact.shard_name(1)}.tmp-")]   # only as a temporary file
    assert [s.index for s in missing_shards(p)] == [0, 1, 2]

    result = build_shard(victim)                                   # the lock died with the builder
    assert result.built and result.images == 16
    assert not [n for n in os.listdir(p.entry) if ".tmp-" in n]    # the leftover is gone
    want = load_image_cache(images[16:32], 32, tmp_path / "raw", workers=1).array
    cache = load_compact_cache(images, 32, tmp_path / "cache", workers=1, shard_images=16)
    assert psnr(cache.array[np.arange(16, 32)], np.asarray(want)).mean() > 25


def _build_in_child(spec, log):
    with open(log, "a") as f:
        f.write(f"{build_shard(spec).built}\n")


@pytest.mark.slow
def test_two_processes_build_a_shard_once(images, tmp_path):
    spec = plan(images, 32, tmp_path / "cache").shards[0]
    log = tmp_path / "built.txt"
    procs = [SPAWN.Process(target=_build_in_child, args=(spec, log)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert sorted(log.read_text().split()) == ["False", "True"]


def test_a_damaged_shard_is_rebuilt(images, tmp_path):
    p = plan(images, 32, tmp_path / "cache", shard_images=20)
    for s in p.shards:
        build_shard(s)
    path = p.shards[0].path
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 5)
    assert [s.index for s in missing_shards(p)] == [0]
    assert build_shard(p.shards[0]).built and missing_shards(p) == []


@pytest.fixture
def with_bad_and_gone(with_bad, tmp_path):
    """The raw cache's bad images, and a file that does not exist at index 20."""
    return with_bad[:20] + [str(tmp_path / "gone.jpg")] + with_bad[21:]


def test_unreadable_images_as_in_the_raw_cache(with_bad_and_gone, tmp_path, caplog):
    bad = with_bad_and_gone
    with pytest.raises(DataError) as err:
        load_compact_cache(bad, 32, tmp_path / "cache", workers=2, shard_images=8)
    msg = str(err.value)
    assert "\n" not in msg and bad[4] in msg and "2 more" in msg and "--skip-bad-images" in msg
    cache = load_compact_cache(bad, 32, tmp_path / "cache", skip_bad=True, workers=2, shard_images=8)
    assert cache.bad.tolist() == [4, 9, 20]
    rows = cache.array[np.arange(36)]
    assert not rows[[4, 9, 20]].any() and rows[[3, 5]].any(axis=(1, 2, 3)).all()
    warnings = [m for m in caplog.messages if m.startswith("warning")]
    assert len(warnings) == 1 and "skipped 3 unreadable" in warnings[0]
    with pytest.raises(DataError, match="image list is empty"):
        load_compact_cache([], 32, tmp_path / "cache")


def test_auto_picks_raw_for_small_sets_and_compact_above_the_threshold():
    from wsml.config import TrainConfig
    from wsml.data.loading import RAW_CACHE_MAX_BYTES, image_cache_format

    cfg = TrainConfig(dataset="pascal").resolve()       # 448 px
    per_image = 448 * 448 * 3
    assert image_cache_format(cfg, 5717 + 5823) == "raw"                 # VOC
    assert image_cache_format(cfg, 5994 + 5794) == "raw"                 # CUB
    assert image_cache_format(cfg, 82081 + 40137) == "compact"           # COCO
    assert image_cache_format(cfg, RAW_CACHE_MAX_BYTES // per_image) == "raw"
    assert image_cache_format(cfg, RAW_CACHE_MAX_BYTES // per_image + 1) == "compact"
    forced = TrainConfig(dataset="pascal", image_cache="compact").resolve()
    assert image_cache_format(forced, 10) == "compact"
    with pytest.raises(Exception, match="image_cache"):
        TrainConfig(dataset="pascal", image_cache="jpeg").resolve()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decoding_matches_the_cpu(images, tmp_path):
    import torch

    from wsml.data.compact_images import GpuDecoder

    photos = make_photos(tmp_path / "photos", 6)
    paths = photos + images[:10]
    paths[3] = str(tmp_path / "missing.jpg")
    cache = load_compact_cache(paths, 448, tmp_path / "cache", skip_bad=True, workers=1)
    rows = np.arange(len(paths))
    cpu = torch.from_numpy(cache.array[rows]).permute(0, 3, 1, 2)
    decoder = GpuDecoder("cuda", 448)
    for _ in range(3):           # repeated: later calls get recycled memory
        gpu = decoder(*cache.array.encoded(rows)).cpu()
        assert gpu.shape == cpu.shape and not gpu[3].any()
        # nvJPEG and libjpeg-turbo round differently (IDCT, chroma upsampling): within a few levels
        assert (gpu.int() - cpu.int()).abs().float().mean() < 2.0


_BUILD = r"""
import json, sys
import numpy as np
from wsml.data.compact import build_missing, plan

def peak_mb():   # VmHWM: peak RSS of this program (ru_maxrss would count the forking parent's pages)
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024

folder, cache_root, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
relative = np.load(f"{folder}/paths.npy", mmap_mode="r")       # as formats.read_formatted gives them
before = peak_mb()
build_missing(plan(relative, size, cache_root, image_root=folder), workers=1)   # every shard, in this process
print(json.dumps({"before_mb": before, "after_mb": peak_mb()}))
"""

_READ_BACK = r"""
import io, json, sys
import numpy as np
import torch
from PIL import Image
from torchvision.io import decode_jpeg
from wsml.data.compact_images import load_compact_cache

def anon_mb():   # this process's own resident memory (not the file-backed pages of the mapped shards)
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) / 1024

buf = io.BytesIO(); Image.new("RGB", (8, 8)).save(buf, "JPEG")      # load the decoder before the baseline
decode_jpeg(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
folder, cache_root, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
relative = np.load(f"{folder}/paths.npy", mmap_mode="r")
before, peak = anon_mb(), 0.0
cache = load_compact_cache(relative, size, cache_root, image_root=folder)
means = np.empty((len(relative), 3))
for start in range(0, len(relative), 256):
    means[start:start + 256] = cache.array[np.arange(start, min(start + 256, len(relative)))].mean(axis=(1, 2))
    peak = max(peak, anon_mb())
np.save(f"{folder}/means.npy", means)
print(json.dumps({"grew_mb": peak - before, "bytes": cache.array.disk_bytes}))
"""


@pytest.mark.slow
def test_twenty_thousand_images_with_bounded_memory(tmp_path):
    """20,000 small JPEGs cached at 64 px and read back, with the peak RSS of the building
    processes measured: what an O(images) array of them would cost (246 MB of pixels) is never held."""
    import json
    import subprocess
    import sys

    n, size = 20_000, 64
    folder = tmp_path / "img"
    folder.mkdir()
    ramp = np.add.outer(np.arange(48), np.arange(64))[..., None] % 16 - 8     # texture, mean ~0
    colours = np.stack([np.arange(n) % 32, np.arange(n) // 32 % 32, np.arange(n) // 1024], axis=1) * 7 + 16
    names = []
    for i in range(n):
        pixels = np.clip(colours[i] + ramp, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
        names.append(f"{i:05d}.jpg")
    np.save(folder / "paths.npy", np.asarray(names))
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    got = {}
    for script in (_BUILD, _READ_BACK):
        out = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "cache"), str(size)],
                             capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "building" not in out.stderr or script is _BUILD          # read back: nothing left to build
        got.update(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n20,000 images at {size} px, {got['bytes'] / n:.0f} bytes each: peak RSS of the building process "
          f"{got['before_mb']:.0f} MB before, {got['after_mb']:.0f} MB after building all 5 shards; the reading "
          f"process's own memory grew {got['grew_mb']:.1f} MB while decoding every image")
    pixels_mb = n * size * size * 3 / 2**20
    assert got["after_mb"] - got["before_mb"] < pixels_mb / 4          # 59 MB: no whole-set array
    assert got["grew_mb"] < pixels_mb / 4
    means = np.load(folder / "means.npy")
    # every image decoded, and to its own colour (neighbouring colours are 7 levels apart)
    assert np.abs(means - colours).max() < 3.5


def test_image_cache_key_in_a_space_file_reaches_the_trial(tmp_path):
    from orchestration.search.space import load_space
    from orchestration.search.space_checks import TRAIN_KEYS
    from orchestration.trial import Trial

    assert "image_cache" in TRAIN_KEYS and "image_decode" in TRAIN_KEYS
    source = open(os.path.join(os.path.dirname(__file__), "..", "search_spaces", "coco.yaml")).read()
    space_file = tmp_path / "coco.yaml"
    space_file.write_text(source.replace("train:\n", "train:\n  image_cache: compact\n", 1))
    space = load_space("coco", space_file)
    assert space.train["image_cache"] == "compact"
    cfg = Trial.parse({"dataset": "coco", "scheme": "LL-R", "delta_rel": 0.2, "lr": 1e-5, "epochs": 2,
                        "train": dict(space.train)}).train_config()
    assert cfg.image_cache == "compact"


@pytest.mark.slow
def test_training_reads_the_compact_cache_through_the_cli(tmp_path):
    """`python -m wsml.train --image-cache compact`: DataLoader workers decode the JPEG shards."""
    import json
    import subprocess
    import sys

    from wsml.data.digits import write_digits

    write_digits(tmp_path / "data", tmp_path / "images", train=400)
    common = ["--dataset", "pascal", "--data-root", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"),
              "--arch", "smallcnn", "--weights", "none", "--image-size", "32", "--batch-size", "32", "--lr", "1e-3",
              "--delta-rel", "2", "--no-hflip", "--epochs", "3", "--num-workers", "2", "--device", "cpu"]
    maps = {}
    for cache in ("raw", "compact"):
        out = subprocess.run([sys.executable, "-m", "wsml.train", *common, "--image-cache", cache,
                              "--out", str(tmp_path / cache)], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        maps[cache] = json.loads((tmp_path / cache / "metrics.json").read_text())["test_map"]
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "images").iterdir() if p.is_dir())
    assert entries == ["compact32", "compact32", "images32", "images32"]      # train and test of each
    # the same seed and data; only the pixels differ by the JPEG's error
    assert abs(maps["compact"] - maps["raw"]) < 5, maps
    bad = subprocess.run([sys.executable, "-m", "wsml.train", *common, "--image-cache", "jpeg", "--out",
                          str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--image-cache" in bad.stderr and "invalid choice" in bad.stderr


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decode_trains_like_cpu_decode(tmp_path):
    from wsml.config import TrainConfig
    from wsml.data.digits import write_digits
    from wsml.train import run

    write_digits(tmp_path / "data", tmp_path / "images", train=512)
    common = dict(dataset="pascal", data_root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"),
                  image_cache="compact", arch="smallcnn", weights="none", image_size=32, batch_size=32, lr=1e-3,
                  delta_rel=2.0, hflip=False, epochs=2, device="cuda", num_workers=2, precision="fp32")
    cpu = run(TrainConfig(**common, image_decode="cpu"), log=None)
    gpu = run(TrainConfig(**common, image_decode="gpu"), log=None)
    assert abs(gpu.history[0]["train_loss"] - cpu.history[0]["train_loss"]) < 0.02
    assert abs(gpu.test_map - cpu.test_map) < 5

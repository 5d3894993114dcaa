"""`--dry-run` shows the disk a sweep will use on shared storage and on each node (orchestration/cost/disk.py)."""
from __future__ import annotations

import re

import pytest

from orchestration.cost.disk import COMPACT_BYTES_PER_IMAGE, disk_use, model_sizes
from wsml.config import TrainConfig
from tests.helpers import sweep_in_process


def test_cub_keeps_raw_pixels_on_each_node_and_checkpoints_on_shared_storage():
    cfg = TrainConfig.from_dict({"dataset": "cub"}).resolve()
    images = 5994 + 5794                            # CUB's official train + test
    use = disk_use(cfg, images=images, linear_init_images=0, runs=39, keep=2)
    assert use.raw_cache == images * 3 * 448 * 448 and use.compact_cache == 0     # 7.1 GB: under the raw limit
    one, features = model_sizes("resnet50", 312)
    assert features == 2048 and use.checkpoints == 39 * 2 * one
    assert 22e9 < use.checkpoints < 24e9            # ~0.3 GB a checkpoint (ResNet-50 with Adam's moments)


def test_coco_is_too_large_for_raw_pixels_and_goes_compact_on_shared_storage():
    cfg = TrainConfig.from_dict({"dataset": "coco", "mode": "linear-init"}).resolve()
    use = disk_use(cfg, images=122_218, linear_init_images=82_081, runs=10, keep=2)
    assert use.raw_cache == 0 and use.compact_cache == 122_218 * COMPACT_BYTES_PER_IMAGE
    assert use.features == 82_081 * 2048 * 4
    assert use.shared == use.checkpoints + use.compact_cache + use.features


@pytest.mark.slow
def test_dry_run_prints_the_disk_of_shared_storage_and_of_each_node(tmp_path, capsys):
    r = sweep_in_process(["--dataset", "cub", "--dry-run", "--gpus", "4"], tmp_path, capsys)
    assert r.returncode == 0, r.stderr
    shared = re.search(r"disk on shared storage: ([\d.,]+) GB \(checkpoints (\d+) run\(s\) x 2 kept", r.stdout)
    node = re.search(r"disk on each node: ([\d.,]+) GB \(raw image cache", r.stdout)
    assert shared and node, r.stdout
    runs = re.search(r"final stage: (\d+) run", r.stdout)
    trials = re.search(r"trials: (\d+) in", r.stdout)
    assert int(shared[2]) == int(runs[1]) + int(trials[1])
    assert float(node[1]) == pytest.approx(11_788 * 3 * 448 * 448 / 1e9, abs=0.01)

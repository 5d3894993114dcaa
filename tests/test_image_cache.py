"""The compact cache built once per cluster: shards as Ray tasks over the nodes of a multi-node cluster
(several raylets on this machine), each committed exactly once, a builder killed mid-shard redone
without its partial shard ever becoming visible, and a second build reusing everything."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsml.data.compact import build_shard, missing_shards, plan

pytestmark = [pytest.mark.slow, pytest.mark.service, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
KILLED = 2          # the first builder of a shard with this index dies after writing 4 images


def _recording_build(log_dir: str, spec):
    """Runs in a Ray worker: build the shard, record (shard, node, built); the first builder of
    shard KILLED exits mid-shard, as a killed or crashed worker does, noting what was visible then."""
    import ray

    log_dir = Path(log_dir)
    on_image = None
    if spec.index == KILLED:
        try:
            fd = os.open(log_dir / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass        # the retry, or the other entry's shard
        else:
            os.write(fd, str(spec.path).encode())
            os.close(fd)

            def on_image(i):
                if i == 3:
                    seen = sorted(p.name for p in spec.path.parent.iterdir() if p.name.startswith(spec.path.name))
                    (log_dir / "visible_at_kill").write_text("\n".join(seen))
                    os._exit(1)
    result = build_shard(spec, on_image=on_image)
    node = ray.get_runtime_context().get_node_id()
    with open(log_dir / "builds.log", "a") as f:
        f.write(f"{spec.entry} {spec.index} {node} {int(result.built)}\n")
    return result


def _formatted(tmp_path: Path, n_train: int, n_val: int) -> Path:
    """A prepared data set (published layout) of small generated JPEGs."""
    from wsml.data.formats import write_formatted

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(n_train + n_val):
        pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((64, 48), Image.BICUBIC).save(images / f"{i:04d}.jpg", quality=90)
        names.append(f"{i:04d}.jpg")
    labels = np.zeros((n_train + n_val, 3), dtype=np.int8)
    labels[np.arange(len(labels)), np.arange(len(labels)) % 3] = 1
    dest = tmp_path / "data"
    write_formatted(dest, dataset="pascal", class_names=["a", "b", "c"], image_root=images,
                    train_images=names[:n_train], train_labels=labels[:n_train],
                    val_images=names[n_train:], val_labels=labels[n_train:])
    return dest


def test_shards_built_once_across_nodes_with_a_killed_builder(tmp_path, capfd):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))   # workers import this module
    import ray
    from ray.cluster_utils import Cluster

    from orchestration.image_cache import build_image_cache, build_shards
    from wsml.config import TrainConfig
    from wsml.data.formats import read_formatted
    from wsml.data.loading import load_data

    data_root = _formatted(tmp_path, 72, 24)
    raw = read_formatted(data_root)
    cache_root = tmp_path / "shared" / "cache" / "images"
    plans = [plan(raw.train_paths, 32, cache_root, image_root=str(raw.image_root), shard_images=8),
             plan(raw.val_paths, 32, cache_root, image_root=str(raw.image_root), shard_images=8)]
    record = functools.partial(_recording_build, str(tmp_path))

    # a head without CPUs (the driver) and three 1-CPU nodes
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        report = build_shards(plans, build=record)
        assert report.shards == 12 and report.built == 12 and report.reused == 0
        assert report.images == 96 and report.bad == 0
        assert len(report.nodes) >= 2, report.nodes            # spread over the nodes

        lines = [ln.split() for ln in (tmp_path / "builds.log").read_text().splitlines()]
        commits = [(entry, int(index)) for entry, index, _node, built in lines if built == "1"]
        assert sorted(commits) == sorted((str(p.entry), s.index) for p in plans for s in p.shards)  # each once
        assert len({node for *_, node, _ in lines}) >= 2
        # the killed builder had written 4 images: only its temporary file existed, and the retry
        # (a new worker) deleted it and built the shard whole
        killed = Path((tmp_path / "killed").read_text())
        seen = (tmp_path / "visible_at_kill").read_text().split()
        assert killed.name not in seen and [s for s in seen if s.startswith(f"{killed.name}.tmp-")], seen
        assert not [p for p in killed.parent.iterdir() if ".tmp-" in p.name]
        assert [s for p in plans for s in missing_shards(p)] == []

        # a second build (another sweep) reuses every shard: no task, no build
        again = build_shards(plans, build=record)
        assert (again.built, again.reused) == (0, 12)
        assert len((tmp_path / "builds.log").read_text().splitlines()) == len(lines)

        # the sweep driver's call, from a trial's config: the entries a trial reads, built on the
        # cluster; the trial then finds them and builds nothing
        cfg = TrainConfig(dataset="pascal", data_root=str(data_root), cache_dir=str(tmp_path / "shared" / "cache"),
                          image_size=32, image_cache="compact", arch="smallcnn", weights="none")
        first = build_image_cache(cfg)
        assert first.built == 2 and first.images == 96       # train and test, one default-size shard each
        assert build_image_cache(cfg).built == 0
        capfd.readouterr()
        data = load_data(cfg.resolve())
        assert "building" not in capfd.readouterr().err
        assert data.train.images.shape[1:] == (32, 32, 3) and len(data.test.images) == 24
        assert data.image_key.endswith(":compact")     # LinearInit features cached apart from raw ones
        whole = np.asarray(Image.open(raw.image_root / raw.val_paths[5]).convert("RGB").resize((32, 32), Image.BILINEAR))
        assert np.abs(data.test.images[[5]][0].astype(int) - whole).mean() < 8
    finally:
        ray.shutdown()
        cluster.shutdown()

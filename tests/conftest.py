"""Fixtures shared by the test modules: a Ray cluster and an MLflow server, each started and taken down here."""
from __future__ import annotations

import os

import pytest

from tests.helpers import MlflowServer, small_images


@pytest.fixture(scope="module")
def ray_address():
    """One Ray cluster (2 CPUs, no dashboard) for the sweeps of a module; they join it with --address."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        yield cluster.address
    finally:
        cluster.shutdown()


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1:<free port> with a SQLite store in tmp_path; yields the server."""
    server = MlflowServer(tmp_path / "server.db", tmp_path / "artifacts", tmp_path / "server.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def images(tmp_path):
    """36 small images of varied size, mode and format (tests of the image caches)."""
    return small_images(tmp_path / "img")


@pytest.fixture
def with_bad(images, tmp_path):
    """The image list with a truncated JPEG at index 4 and a text file named .jpg at index 9."""
    paths = list(images)
    data = open(images[0], "rb").read()
    truncated = tmp_path / "img" / "truncated.jpg"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    text = tmp_path / "img" / "notes.jpg"
    text.write_text("not an image\n")
    paths[4], paths[9] = str(truncated), str(text)
    return paths

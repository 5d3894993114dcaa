"""Fixtures shared by the test modules, and the test tiers.

Services (a Ray cluster, an `mlflow server`) are started once per test session (per xdist worker)
and taken down at its end; tests that share one use names of their own (sweep and experiment names).

Tiers: `bash scripts/test.sh --fast` runs `-m "not slow and not service"`. A test that uses one of
the service fixtures below is marked `service` and `slow` here, so the fast tier cannot start one by
accident; tests that start a service themselves carry the marks in their module.
"""
from __future__ import annotations

import os

import pytest

from tests.helpers import MlflowServer, small_images

# fixture -> the marks of every test that uses it (a service is never in the fast tier)
SERVICE_FIXTURES = {
    "ray_address": ("service", "slow"),
    "mlflow_server": ("service", "slow"),
    "digits_sweep": ("service", "slow"),
    "gpu_without_cuda": ("service", "slow"),     # tests/test_gpu_check.py's own cluster
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marks in SERVICE_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                for mark in marks:
                    item.add_marker(mark)


@pytest.fixture(scope="session")
def ray_address():
    """One Ray cluster (2 CPUs, no dashboard) for the whole session; sweeps join it with --address."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        yield cluster.address
    finally:
        cluster.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1:<free port> with a SQLite store, for the whole session: each test
    writes to an experiment of its own name."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(folder / "server.db", folder / "artifacts", folder / "server.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def digits_sweep(tmp_path_factory, worker_id):
    """The demo sweep as `scripts/demo.sh` runs it, shrunk (tests/shared_sweep.py): run once per test
    run, by the first xdist worker that asks (the others wait on the lock and read its outcome), and
    read by the demo, aggregate and UI tests."""
    from filelock import FileLock

    from tests.shared_sweep import shrunk_demo

    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":            # xdist: the workers' temp folders share this parent
        shared = shared.parent
    with FileLock(str(shared / "digits-sweep.lock")):
        return shrunk_demo(shared / "digits-sweep")


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


@pytest.fixture(autouse=True)
def console_lines():
    """orchestration's library modules log; its command lines show those lines on the console
    (`wsml.logs.show_on_console`). Tests that call the modules directly see them as a command line would."""
    from wsml.logs import show_on_console

    show_on_console("orchestration")

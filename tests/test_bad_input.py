"""Bad input and safe defaults: one `error:` line naming the problem and the fix, a non-zero exit,
nothing written; nothing listens beyond loopback, nothing is unpickled or YAML-constructed, no
credential reaches MLflow or the output.

Covered elsewhere (not repeated here):
* search-space files with unknown keys, wrong types or impossible ranges:
  tests/test_space.py::test_bad_values_name_key_value_and_fix, ::test_malformed_yaml_is_one_line,
  and through the CLI tests/test_sweep.py::test_bad_input_one_line_nothing_created;
* a closed port as --address, an unwritable --storage or MLflow store, nothing to resume:
  tests/test_sweep.py::test_bad_input_one_line_nothing_created;
* unreadable images in the image cache itself: tests/test_cache.py::test_bad_images_raise_naming_the_file,
  ::test_skip_bad_records_and_reports; label values and shapes in `wsml.data.prepare`:
  tests/test_prepare.py::test_label_value_two_is_rejected, ::test_wrong_shapes_are_rejected;
* the cluster files bind Ray's dashboard to 127.0.0.1: tests/test_cluster_config.py::test_start_commands.
"""
from __future__ import annotations

import ast
import http.server
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_official import make_prepared
from tests.helpers import clean_env, free_port, write_space

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("wsml", "orchestration", "bench", "scripts") for p in (ROOT / d).rglob("*.py")]


def train_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsml.train", *args], cwd=cwd, capture_output=True, text=True,
                          env=clean_env(), timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A prepared data set (the published layout) of 12 + 6 real JPEGs, 3 classes."""
    return make_prepared(tmp_path, 12, 6)


def small_run(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--dataset", "pascal", "--data-root", str(data), "--arch", "smallcnn", "--weights", "none",
            "--image-size", "16", "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--num-workers", "0",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), *extra]


# ------------------------------------------------------------- bad data
@pytest.mark.slow
def test_bad_images_through_the_trainer_cli(dataset, tmp_path):
    images = tmp_path / "images"
    good = (images / "tr" / "000.jpg").read_bytes()
    (images / "tr" / "003.jpg").write_bytes(good[: len(good) // 2])        # truncated
    (images / "tr" / "007.jpg").write_text("not an image\n")               # not an image at all
    r = train_cli(*small_run(dataset, tmp_path), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    [line] = error_lines(r.stderr)
    assert r.stderr.strip().splitlines()[-1] == line
    assert str(images / "tr" / "003.jpg") in line and "and 1 more" in line and "--skip-bad-images" in line
    assert not (tmp_path / "out").exists()

    # 2 of 12 is past what --skip-bad-images skips (1 % of a split): refused, nothing written (a skip
    # within it: tests/test_identity_and_secrets.py::test_skip_bad_images_within_the_threshold_trains)
    r = train_cli(*small_run(dataset, tmp_path, "--skip-bad-images"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "warning: skipped 2 unreadable image(s) of 12" in r.stderr
    [line] = error_lines(r.stderr)
    assert re.search(r"skipped [12] of \d+ (training|validation) images as unreadable \(more than 1 %\)", line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("labels, message", [
    (np.full((12, 3), 2), "formatted_train_labels.npy holds value 2 in 36 cell(s); labels must be -1, 0 or 1"),
    (np.zeros(12), "formatted_train_labels.npy has shape (12,), expected 2-D"),
    (np.zeros((11, 3)), "formatted_train_images.npy lists 12 images but formatted_train_labels.npy has 11 rows"),
])
def test_bad_label_arrays_through_the_trainer_cli(dataset, tmp_path, labels, message):
    np.save(dataset / "formatted_train_labels.npy", labels)
    r = train_cli(*small_run(dataset, tmp_path), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == error_lines(r.stderr), r.stderr      # the error line and nothing else
    [line] = error_lines(r.stderr)
    assert message in line and "wsml.data.prepare" in line                      # the fix: rebuild it
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_unwritable_out_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    t0 = time.time()
    r = train_cli("--dataset", "digits", "--device", "cpu", "--out", str(blocker / "run"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: --out {blocker / 'run'}: {blocker} is not a writable "
                                             "folder: pass a folder you can write to"]
    assert time.time() - t0 < 60 and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# ------------------------------------------------------- bad Ray address
class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_address_that_is_not_a_ray_cluster(tmp_path, monkeypatch, capsys):
    """A web server where the Ray head should be: one line within seconds (ray.init would retry for minutes)."""
    from orchestration.sweep import main

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=2, schemes="[LL-R]")
    try:
        t0 = time.time()
        rc = main(["--dataset", "digits", "--space", str(space), "--address", f"127.0.0.1:{port}"])
        elapsed = time.time() - t0
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert rc == 2 and elapsed < 20, (rc, elapsed)
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: 127.0.0.1:{port} is not a Ray cluster's head (GCS) port")
    assert "--address auto" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]            # nothing created


# ---------------------------------------------------------- safe defaults
def test_local_ray_starts_without_a_dashboard(monkeypatch):
    import ray

    from orchestration.cluster import connect as cluster
    from orchestration.run import private

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    # (its token is of the sweep's process alone: tests/test_aws_readiness.py checks it in a process of its own)
    monkeypatch.setattr(private, "ephemeral_ray_token", lambda: seen.update(token=True))
    assert cluster.connect(None) is True
    assert seen["address"] == "local" and seen["token"]
    assert seen.get("include_dashboard") is False or seen.get("dashboard_host") == "127.0.0.1", seen


def test_nothing_is_told_to_listen_beyond_loopback():
    """Commands in the docs, configs and scripts bind servers to 127.0.0.1 (or keep the default, which is
    loopback for `mlflow ui` / `mlflow server`)."""
    from mlflow import cli

    [host] = [p for p in cli.server.params if p.name == "host"]      # `mlflow ui` is the same command
    assert host.default == "127.0.0.1"
    files = [ROOT / "README.md", *ROOT.glob("*.yaml"), *ROOT.glob("docs/*.md"), *(ROOT / "scripts").glob("*"),
             *SOURCES]
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        assert "0.0.0.0" not in text, f
        for host in re.findall(r"--(?:dashboard-)?host[= ](\S+)", text):
            assert host.strip("'\"`") in ("127.0.0.1", "localhost"), (f, host)


def _calls(name_pred) -> list[tuple[Path, ast.Call]]:
    out = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
                if name_pred(owner, name):
                    out.append((path, node))
    return out


def test_every_torch_load_is_weights_only():
    calls = _calls(lambda owner, name: (owner == "torch" and name == "load")
                   or name in ("load_state_dict_from_url", "get_state_dict"))
    assert len(calls) >= 3                          # checkpoints, weight files, ImageNet weights
    for path, call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
            f"{path}:{call.lineno}"
    # and nothing else unpickles, but the per-scheme searcher restoring its own state on --resume: it lies in
    # the sweep's Ray folder beside Tune's tuner.pkl and searcher state, which Tune unpickles there anyway
    unpickling = _calls(lambda owner, name: owner in ("pickle", "cloudpickle", "dill") and name in ("load", "loads"))
    assert [p.relative_to(ROOT).as_posix() for p, _ in unpickling] == ["orchestration/search/per_scheme.py"]
    for path, call in _calls(lambda owner, name: owner == "np" and name == "load"):
        kw = {k.arg: k.value for k in call.keywords}
        assert "allow_pickle" not in kw or kw["allow_pickle"].value is False, f"{path}:{call.lineno}"


class _Planted:
    """Unpickling this would run code: it creates the file named."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    from wsml.checkpoint import load_checkpoint, save_checkpoint
    from wsml.errors import CheckpointError

    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "model": {}, "extra": _Planted(marker)})   # checksum matches
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)
    assert not marker.exists()


def test_weight_files_with_a_pickled_object_are_refused(tmp_path):
    import torch
    import torchvision

    from wsml.errors import ConfigError
    from wsml.model import build_model

    marker = tmp_path / "ran"
    bad = tmp_path / "weights.pt"
    torch.save({"conv1.weight": _Planted(marker)}, bad)
    with pytest.raises(ConfigError, match="not a loadable state dict"):
        build_model("resnet50", 3, str(bad))
    # the ImageNet weights, read from torch's download cache
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        cached = tmp_path / "hub" / "checkpoints" / Path(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url).name
        cached.parent.mkdir(parents=True)
        torch.save(torchvision.models.resnet50().state_dict(), cached)
        assert build_model("resnet50", 3, "imagenet").head.out_features == 3        # a plain state dict loads
        torch.save({"conv1.weight": _Planted(marker)}, cached)
        with pytest.raises(ConfigError, match="ImageNet weights"):
            build_model("resnet50", 3, "imagenet")
    finally:
        torch.hub.set_dir(old)
    assert not marker.exists()


def test_yaml_is_read_safely(tmp_path):
    from orchestration.search.space import SpaceError, load_space

    unsafe = {"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all"}
    import yaml

    from orchestration.search import space as space_module

    for path, call in _calls(lambda owner, name: owner == "yaml"):
        loader = {k.arg: k.value for k in call.keywords}.get("Loader")
        if loader is None:
            assert call.func.attr not in unsafe, f"{path}:{call.lineno}"
        else:   # only the space file's loader: a SafeLoader that also refuses aliases
            assert isinstance(loader, ast.Name) and loader.id == "_NoAliasLoader", f"{path}:{call.lineno}"
            assert issubclass(space_module._NoAliasLoader, yaml.SafeLoader)
    assert _calls(lambda owner, name: owner == "yaml" and name == "load")     # the space files, with that loader
    marker = tmp_path / "ran"
    space = tmp_path / "space.yaml"
    space.write_text(f"dataset: !!python/object/apply:pathlib.Path.touch ['{marker}']\n")
    with pytest.raises(SpaceError) as err:
        load_space("digits", space)
    assert "malformed YAML" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


# ---------------------------------------------------------- no credentials
def test_credentials_are_masked():
    from orchestration.common import redact

    cases = {
        "http://alice:pw123@mlflow.example:5000": "http://***@mlflow.example:5000",
        "postgresql://u:pw123@db/x": "postgresql://***@db/x",
        "https://host/api?token=pw123&x=1": "https://host/api?token=***&x=1",
        "s3://bucket/p?access_key=AK&secret_key=pw123": "s3://bucket/p?access_key=***&secret_key=***",
        "--password pw123 --api-token=pw123 --name n": "--password *** --api-token=*** --name n",
        "sqlite:////tmp/mlflow.db": "sqlite:////tmp/mlflow.db",
        "--storage /data/ray_results --address 10.0.0.5:6379": "--storage /data/ray_results --address 10.0.0.5:6379",
    }
    for text, masked in cases.items():
        assert redact(text) == masked


def test_sweep_params_and_errors_carry_no_credentials(tmp_path, monkeypatch, capsys):
    """The parent run's params (the command line is one) and every printed line mask the password.
    (A whole sweep against a server with credentials in its URI: tests/test_faults.py
    ::test_mlflow_server_down_mid_sweep_loses_nothing.)"""
    from mlflow import MlflowClient

    from orchestration.run import runner
    from orchestration.tracking import store
    from orchestration import sweep
    from orchestration.common import redact
    from orchestration.search.plan import Plan
    from orchestration.search.space import load_space

    argv = ["orchestration/sweep.py", "--dataset", "digits", "--mlflow-uri", "http://alice:pw123@h:5000",
            "--storage", "s3://bucket/r?secret_key=pw123"]
    plan = Plan(name="sw", storage="s3://bucket/r?secret_key=pw123", space=load_space("digits"),
                uri="http://alice:pw123@h:5000", address=None, data_root=None, cache_dir="/c",
                results_dir="results", command=redact(" ".join(argv)))
    c = MlflowClient(f"sqlite:///{tmp_path / 'p.db'}")
    _, run_id = store.start_parent(c, "sw", "digits", runner._sweep_params(plan, {"cpu": 1}), resume=False)
    params = c.get_run(run_id).data.params
    assert params and not [k for k, v in params.items() if "pw123" in v], params
    assert "--mlflow-uri http://***@h:5000" in params["command"]
    assert params["storage"] == "s3://bucket/r?secret_key=***"     # the value up to the next & is masked

    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", store.USERNAME_ENV, store.PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)      # restored after: the sweep moves the credentials there
    capsys.readouterr()                                  # MLflow's own lines while creating the store above
    rc = sweep.main(["--dataset", "digits", "--mlflow-uri", f"http://alice:pw123@127.0.0.1:{free_port()}"])
    out = capsys.readouterr()
    assert rc == 2 and "pw123" not in out.err + out.out
    # the credentials went to MLflow's own basic-auth variables, the URI kept and shown without them
    assert out.err.startswith("error: MLflow server http://127.0.0.1:") and "unreachable" in out.err

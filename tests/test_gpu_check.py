"""No silent CPU fallback: a trial given a GPU on a node where torch sees no CUDA device fails at once with one
line; trials that ask for no GPU still train on the CPU; a node's set-up check fails on such a node.

The sweeps run on a Ray cluster of one node that declares a GPU this machine does not have (as a GPU node
with a broken driver looks to Ray). Where CUDA works, the trials would train on it: skipped there.
"""
from __future__ import annotations

import os

import pytest

from orchestration import gpu_check
from tests.helpers import mlflow_runs, ray_trials, run_cli, write_space


def test_problem_names_the_node_the_driver_torchs_cuda_and_the_fix():
    old = gpu_check.problem("n1 (Ray node abc)", driver="550.90.07", torch_cuda="13.0", torch_version="2.14.1")
    assert old.count("\n") == 0
    for part in ("node n1 (Ray node abc)", "NVIDIA driver 550.90.07", "torch 2.14.1 built for CUDA 13.0",
                 "a driver >= 580", "--gpus-per-trial 0"):
        assert part in old, (part, old)
    none = gpu_check.problem("n1", driver=None, torch_cuda="13.0", torch_version="2.14.1")
    assert "NVIDIA driver none (no driver)" in none and "install an NVIDIA driver >= 580" in none
    cpu_build = gpu_check.problem("n1", driver="580.65", torch_cuda=None, torch_version="2.14.1+cpu")
    assert "built for CUDA none (CPU build)" in cpu_build and "torch's CUDA wheels" in cpu_build
    fine = gpu_check.problem("n1", driver="580.65", torch_cuda="13.0", torch_version="2.14.1")
    assert "nvidia-smi" in fine                    # driver and build fit: the GPUs themselves
    assert gpu_check.required_driver("12.8") == 525 and gpu_check.required_driver(None) is None


def test_nvidia_gpus_counts_gpus_on_the_pci_bus(tmp_path):
    def device(name, vendor, cls):
        d = tmp_path / name
        d.mkdir()
        (d / "vendor").write_text(vendor + "\n")
        (d / "class").write_text(cls + "\n")

    device("0000:00:1e.0", "0x10de", "0x030200")    # a 3D controller (A10G, H200)
    device("0000:00:1f.0", "0x10de", "0x030000")    # a VGA controller
    device("0000:00:1d.0", "0x10de", "0x068000")    # an NVSwitch bridge: not a GPU
    device("0000:00:04.0", "0x1d0f", "0x010802")    # an NVMe SSD
    assert gpu_check.nvidia_gpus(tmp_path) == 2
    assert gpu_check.nvidia_gpus(tmp_path / "missing") == 0


def test_setup_check_fails_loudly_only_where_a_gpu_cannot_be_used(monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA works here")
    monkeypatch.setattr(gpu_check, "nvidia_gpus", lambda: 0)
    assert gpu_check.main([]) == 0                     # a CPU node (the head) has nothing to check
    assert "no NVIDIA GPU" in capsys.readouterr().out
    monkeypatch.setattr(gpu_check, "nvidia_gpus", lambda: 1)
    assert gpu_check.main([]) == 1                     # a GPU on the bus that torch cannot use
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: gpu check: 1 NVIDIA GPU(s) but no CUDA device on node")


@pytest.fixture(scope="module")
def gpu_without_cuda():
    """A one-node Ray cluster whose node declares a GPU that torch cannot see."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA works here: a GPU trial would train on it")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    before = os.environ.pop(gpu_check.FAKE_GPUS_ENV, None)     # the raylet must not inherit it
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1,
                                                            "include_dashboard": False})
    try:
        yield cluster.address
    finally:
        cluster.shutdown()
        if before is not None:
            os.environ[gpu_check.FAKE_GPUS_ENV] = before


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_trial_without_cuda_fails_with_one_line(tmp_path, gpu_without_cuda):
    space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=2, schemes="[LL-R]", max_failures=1,
                        train_images=100)
    done = run_cli(["--dataset", "digits", "--space", str(space), "--name", "nocuda", "--address", gpu_without_cuda,
                    "--gpus-per-trial", "1"], cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "1 trials (1 failed)" in out
    [trial] = _trial_dirs(tmp_path / "ray_results" / "nocuda")
    assert not (trial / "result.json").exists() or not (trial / "result.json").read_text().strip(), \
        "the trial trained an epoch (on the CPU) instead of failing"
    log = (trial / "train.log").read_text()
    lines = [ln for ln in log.splitlines() if ln.startswith("# failed:")]
    assert len(lines) == 2, log                      # the attempt and its retry (max_failures 1), each at once
    line = lines[0].removeprefix("# failed: ")
    assert line.startswith("no CUDA device on node ") and "(Ray node " in line
    assert "NVIDIA driver " in line
    assert "built for CUDA" in line and "--gpus-per-trial 0" in line
    assert "Failure # 2" in (trial / "error.txt").read_text() and line in (trial / "error.txt").read_text()
    [run] = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "nocuda")["trial"]
    assert run.info.status == "FAILED"
    reason = run.data.tags["wsml.end_reason"]
    assert reason.startswith("failed: ") and "NoCudaError: " in reason and reason.endswith(line), reason


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cpu_only_space_still_trains_on_the_cpu(tmp_path, gpu_without_cuda):
    space = write_space(tmp_path / "space.yaml", num_samples=1, epochs=2, schemes="[LL-R]", gpus=0,
                        train_images=100)
    done = run_cli(["--dataset", "digits", "--space", str(space), "--name", "cpu", "--address", gpu_without_cuda],
                   cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    [trial] = ray_trials(tmp_path / "ray_results" / "cpu").values()
    assert [r["epoch"] for r in trial["results"]] == [1, 2]
    assert all(r["device"] == "cpu" for r in trial["results"])
    [run] = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "cpu")["trial"]
    assert run.info.status == "FINISHED"


def _trial_dirs(exp_dir):
    """The trial folders of an experiment, also of trials that never reported a result."""
    return sorted(p for p in exp_dir.iterdir() if p.is_dir() and (p / "params.json").exists())

"""cluster.slurm.sh on a real SLURM: two nodes on this machine (tests/slurm_rig.py).

The batch script starts Ray on both nodes (head and worker, Ray's token
authentication), runs the digits sweep against it with storage and the MLflow
store in the test's shared folder, and stops Ray again. The second test gives
the job SLURM's warning signal mid-sweep (as `--signal` does before the time
limit) and submits the same command again, which continues the sweep with
--resume. Both check that neither the job nor SLURM leaves a process behind.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.slurm_rig import SlurmRig, missing_binaries, processes_with
from tests.test_sweep import clean_env, history, mlflow_runs, ray_trials, write_space

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "cluster.slurm.sh"
NAME = "digits-slurm"         # the script's default SWEEP_NAME for DATASET=digits

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _venv_is_current() -> bool:
    """scripts/setup.sh would install nothing (the job runs it; a test must never install packages)."""
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--check"], capture_output=True).returncode == 0


def _needs_slurm() -> None:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge, "
                    "as .ci/run does")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root (SlurmdUser=root) for a SLURM on one machine")
    if not _venv_is_current():
        pytest.skip(".venv is not up to date with requirements.txt and pyproject.toml: the job's scripts/setup.sh would install "
                    "packages (run bash scripts/setup.sh first)")


@dataclass
class Slurm:
    rig: SlurmRig
    tmp: Path
    shared: Path          # WSML_SHARED: what the nodes share (storage, MLflow, results)
    ray_tmp: Path         # WSML_RAY_TMP: Ray's session files on the nodes

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.shared / 'mlflow.db'}"

    def submit(self, *sweep_args: str) -> str:
        # one CPU per node (a node has one); the rest are the script's #SBATCH defaults (one GPU per node)
        return self.rig.sbatch(["--cpus-per-task=1", "--time=20",
                                f"--output={self.tmp}/job-%j.log", str(SCRIPT), *sweep_args], cwd=ROOT)

    def log(self, job: str) -> str:
        f = self.tmp / f"job-{job}.log"
        return f.read_text(errors="replace") if f.exists() else ""

    def job_processes(self) -> list[str]:
        """Processes of the jobs (Ray, the driver, slurmstepd) still alive: not the rig's daemons."""
        daemons = {str(p.pid) for p in self.rig.procs.values()}
        return [p for p in self.rig.leftovers([str(self.ray_tmp)])
                if p.split()[0] not in daemons and "slurmscriptd" not in p]

    def wait_no_job_processes(self, timeout: float = 60) -> list[str]:
        deadline = time.time() + timeout
        while (left := self.job_processes()) and time.time() < deadline:
            time.sleep(1)
        return left


@pytest.fixture
def slurm(tmp_path):
    _needs_slurm()
    # Ray's unix sockets live under its temp folder: keep that path short
    ray_tmp = Path(tempfile.mkdtemp(prefix="wsray", dir="/tmp"))
    shared = tmp_path / "shared"
    shared.mkdir()
    (tmp_path / "slurm").mkdir()
    # TUNE_MAX_PENDING_TRIALS_PG: Tune starts both 1-CPU trials at once, so each node runs one
    env = clean_env(WSML_SHARED=str(shared), WSML_RAY_TMP=str(ray_tmp), TUNE_MAX_PENDING_TRIALS_PG="2")
    rig = SlurmRig(tmp_path / "slurm", env)
    try:
        rig.start()
        yield Slurm(rig, tmp_path, shared, ray_tmp)
    finally:
        rig.stop()
        for line in rig.leftovers([str(ray_tmp), str(tmp_path)]):     # only if a test failed midway
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _wait_job(s: Slurm, job: str, timeout: float) -> dict[str, str]:
    try:
        return s.rig.wait_job(job, timeout)
    except TimeoutError:
        pytest.fail(f"job {job} did not end within {timeout} s; its log:\n{s.log(job)[-6000:]}")


def _epochs_reported(storage: Path) -> int:
    n = 0
    for f in glob.glob(str(storage / "*" / "result.json")):
        n = max(n, sum(1 for ln in Path(f).read_text().splitlines() if ln.strip()))
    return n


def _assert_stopped(s: Slurm) -> None:
    """Nothing of the jobs remains once they ended, and nothing of SLURM after `stop`."""
    left = s.wait_no_job_processes()
    assert not left, "the job left processes behind:\n" + "\n".join(left)
    s.rig.stop()
    left = s.rig.leftovers([str(s.ray_tmp), str(s.tmp)])
    assert not left, "processes left after SLURM was stopped:\n" + "\n".join(left)


# -------------------------------------------------------------- the sweep
def test_sbatch_runs_the_sweep_on_two_nodes(slurm):
    s = slurm
    stamp = ROOT / ".venv" / ".requirements.sha"
    stamp_mtime = stamp.stat().st_mtime
    space = write_space(s.tmp / "space.yaml", num_samples=2, epochs=2, schemes="[LL-R, LL-Cp]", train_images=300)
    job = s.submit("--space", str(space), "--final-seeds", "0")
    info = _wait_job(s, job, 600)
    log = s.log(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:]
    assert stamp.stat().st_mtime == stamp_mtime                   # setup.sh ran and installed nothing
    assert "ray: 2 of 2 node(s) alive, 2 CPU(s), 2 GPU(s)" in log  # a head and a worker: what SLURM granted
    m = re.search(r"nodes (\S+) (\S+) \(head (\S+), (\S+)\)", log)
    assert m and {m[1], m[2]} == {"n1", "n2"} and m[3] == "n1", log[:2000]
    assert f"--address {m[4]}" in log and "--resume" not in log
    assert "sweep exited with status 0" in log and "Ray stopped" in log

    trials = ray_trials(s.shared / "ray_results" / NAME)
    assert len(trials) == 2 and all(t["results"][-1]["epoch"] == 2 for t in trials.values())
    assert len({t["results"][0]["node_id"] for t in trials.values()}) == 2     # the worker node trained too
    runs = mlflow_runs(s.uri, NAME)
    [parent] = runs["sweep"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["ray_address"] == m[4]
    children = runs["trial"]
    assert sorted(c.data.tags["wsml.trial_id"] for c in children) == sorted(trials)   # one run per trial
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert [step for step, _ in history(s.uri, c.info.run_id)] == [1, 2]
    results = s.shared / "results"
    assert (results / "sweeps.md").is_file() and NAME in (results / "sweeps.md").read_text()
    _assert_stopped(s)


# ------------------------------------------- the time-limit warning, then again
def test_warning_signal_stops_cleanly_and_resubmission_resumes(slurm):
    s = slurm
    space = write_space(s.tmp / "space.yaml", num_samples=3, epochs=3, train_images=300)
    args = ("--space", str(space), "--final-seeds", "0")
    first = s.submit(*args)
    storage = s.shared / "ray_results" / NAME
    deadline = time.time() + 480
    while _epochs_reported(storage) < 1:           # mid-sweep: a trial has reported (and checkpointed) epoch 1
        state = s.rig.job(first)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {first} is {state}:\n{s.log(first)[-4000:]}"
        assert time.time() < deadline, "no trial reported an epoch within 480 s:\n" + s.log(first)[-4000:]
        time.sleep(0.2)
    # what `#SBATCH --signal=B:USR1@300` sends to the batch shell 5 minutes before the time limit
    s.rig.run(["scancel", "--signal=USR1", "--batch", first])
    info = _wait_job(s, first, 300)
    log = s.log(first)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "130:0"), (info, log[-6000:])
    assert "received SIGUSR1: stopping the sweep" in log
    assert re.search(rf"interrupted: continue with .*--name {NAME} .*--resume", log), log[-4000:]
    assert "Ray stopped" in log
    runs = mlflow_runs(s.uri, NAME)
    assert runs["sweep"][0].info.status == "KILLED"
    statuses = [c.info.status for c in runs["trial"]]
    assert "KILLED" in statuses and "RUNNING" not in statuses, statuses
    left = s.wait_no_job_processes()
    assert not left, "the stopped job left processes behind:\n" + "\n".join(left)

    second = s.submit(*args)                       # the same command again
    info = _wait_job(s, second, 600)
    log = s.log(second)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:]
    assert f"sweep {NAME} exists" in log and f"resuming sweep {NAME}" in log
    trials = ray_trials(storage)
    assert len(trials) == 3
    runs = mlflow_runs(s.uri, NAME)
    [parent] = runs["sweep"]
    assert parent.info.status == "FINISHED" and parent.data.tags.get("wsml.resumed") == "1"
    ids = [c.data.tags["wsml.trial_id"] for c in runs["trial"]]
    assert sorted(ids) == sorted(trials)                    # one run per trial, none duplicated
    for c in runs["trial"]:
        assert c.info.status == "FINISHED", (c.info.run_name, c.info.status)
        steps = [step for step, _ in history(s.uri, c.info.run_id)]
        assert steps == list(range(1, int(c.data.metrics["epochs_run"]) + 1))   # each epoch logged once
    _assert_stopped(s)


# ------------------------------------------------------------ bad input
@pytest.mark.parametrize("env, args, message", [
    ({}, [], "not inside a SLURM job"),
    ({"SLURM_JOB_ID": "7"}, ["--dataset", "cub"], "--dataset: set it with --export=ALL,DATASET="),
    ({"SLURM_JOB_ID": "7"}, ["--resume"], "--resume: set it with"),
    ({"SLURM_JOB_ID": "7", "SWEEP_NAME": "a b"}, [], "SWEEP_NAME=a b: use letters"),
    ({"SLURM_JOB_ID": "7", "WSML_DIR": "/nonexistent"}, [], "/nonexistent is not the project's folder"),
])
def test_script_refuses_bad_input_before_starting_anything(tmp_path, env, args, message):
    full = clean_env(**env)
    for k in [k for k in full if k.startswith("SLURM_")]:
        if k not in env:
            del full[k]
    r = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=full, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: ")
    assert message in r.stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------ the sweep's address check with Ray's tokens
def test_sweep_address_check_sends_rays_token(tmp_path):
    """A head with token authentication (Ray 2.60): the sweep's check passes with the token and
    names the problem without it."""
    from tests.test_sweep import free_port

    port = free_port()
    token = "ab" * 32
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    ray_tmp = Path(tempfile.mkdtemp(prefix="wsray", dir="/tmp"))
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                             f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}",
                             f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
                            env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    check = ("import sys; from orchestration.common import SweepError; from orchestration.preflight import resolve_address\n"
             "try:\n    print(resolve_address(sys.argv[1]))\n"
             "except SweepError as e:\n    print('error:', e)\n")
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in (tmp_path / "head.log").read_text():
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        address = f"127.0.0.1:{port}"

        def run_check(drop: tuple[str, ...] = (), **extra: str) -> str:
            e = {k: v for k, v in {**env, **extra}.items() if k not in drop}
            return subprocess.run([sys.executable, "-c", check, address], cwd=ROOT, env=e, capture_output=True,
                                  text=True, timeout=120).stdout.strip()

        assert run_check() == address
        missing = run_check(drop=("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"), HOME=str(tmp_path))
        assert missing.startswith("error: the Ray cluster at") and "RAY_AUTH_TOKEN" in missing, missing
        wrong = run_check(RAY_AUTH_TOKEN="cd" * 32)
        assert wrong.startswith("error: the Ray cluster at") and "wants its authentication token" in wrong, wrong
    finally:
        head.send_signal(signal.SIGTERM)          # `ray start --block` stops its processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        deadline = time.time() + 30
        while (left := processes_with([str(ray_tmp)])) and time.time() < deadline:
            time.sleep(0.5)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert head.returncode is not None and not left, left

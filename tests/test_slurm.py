"""cluster.slurm.sh on a real SLURM: two nodes on this machine (tests/slurm_rig.py).

The batch script starts Ray on both nodes (head and worker, Ray's token
authentication), runs the digits sweep against it with storage and the MLflow
store in the test's shared folder, and stops Ray again. The second test gives
the job SLURM's warning signal mid-sweep (as `--signal` does before the time
limit) and submits the same command again, which continues the sweep with
--resume. Both check that neither the job nor SLURM leaves a process behind.

The first runs as a campus cluster's user would: an unprivileged user submits
from a checkout in their home, an `nvidia-smi` reporting driver 550 comes
through the site's set-up file (WSML_ENV_SETUP) to every step with the Python the
venv was built from (a module's, which runs only with the module's
LD_LIBRARY_PATH), the steps have no
network (the set-up file loads tests/offline_site: no DNS, no route out), and
what the trials need was fetched on the "login node" (this machine's network)
beforehand. A GPU
space against torch's CUDA 13 build fails in one line naming the driver, and a
space without its ImageNet weights in one line naming the fetch, both before
Ray starts.
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

from tests.cluster_helpers import ensure_user, lend_venv, run_as
from tests.slurm_rig import SlurmRig, missing_binaries, processes_with
from tests.helpers import clean_env as _clean_env
from tests.test_sweep import history, mlflow_runs, ray_trials, write_space

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "cluster.slurm.sh"
NAME = "digits-slurm"         # the script's default SWEEP_NAME for DATASET=digits
USER = "wsmlslurm"            # the unprivileged user of the campus tests
DRIVER = "550.54.15"          # what the site's nvidia-smi reports: older than CUDA 13's 580

pytestmark = [pytest.mark.slow, pytest.mark.service, pytest.mark.slurm, pytest.mark.timeout(900)]


def _venv_is_current() -> bool:
    """scripts/setup.sh would install nothing (the job runs it; a test must never install packages)."""
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--check"], capture_output=True).returncode == 0


def clean_env(**extra: str) -> dict[str, str]:
    """A job's environment: the tests' clean one, without RAY_ADDRESS (the batch script starts its Ray)."""
    env = _clean_env(**extra)
    env.pop("RAY_ADDRESS", None)
    return env


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

    user: object = None   # pwd entry of the unprivileged user (campus), else root submits from ROOT
    repo: Path = ROOT     # the checkout the job runs
    env_setup: Path | None = None

    def submit(self, *sweep_args: str, env: dict[str, str] | None = None) -> str:
        # one CPU per node (a node has one); the rest are the script's #SBATCH defaults (one GPU per node)
        env = {"WSML_SHARED": str(self.shared), "WSML_RAY_TMP": str(self.ray_tmp), **(env or {})}
        if self.env_setup is not None:
            env["WSML_ENV_SETUP"] = str(self.env_setup)
        return self.rig.sbatch(["--cpus-per-task=1", "--time=20",
                                f"--output={self.tmp}/job-%j.log", str(self.repo / "cluster.slurm.sh"),
                                *sweep_args], cwd=self.repo, env=env, user=self.user)

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


@pytest.fixture(scope="module")
def slurm_rig(tmp_path_factory):
    """One two-node SLURM for the module's jobs; once stopped, nothing of it or its jobs may remain."""
    _needs_slurm()
    # readable by other users (their sbatch reads slurm.conf and talks to the rig's munged): not under
    # pytest's private tmp folder
    base = Path(tempfile.mkdtemp(prefix="wsslurm", dir="/tmp"))
    base.chmod(0o755)
    # TUNE_MAX_PENDING_TRIALS_PG: Tune starts both 1-CPU trials at once, so each node runs one
    rig = SlurmRig(base, clean_env(TUNE_MAX_PENDING_TRIALS_PG="2"))
    try:
        rig.start()
        yield rig
    finally:
        rig.stop()
    left = rig.leftovers([str(base)])
    shutil.rmtree(base, ignore_errors=True)
    assert not left, "processes left after SLURM was stopped:\n" + "\n".join(left)


@pytest.fixture
def slurm(slurm_rig, tmp_path):
    """The rig, with this test's shared folder (WSML_SHARED) and Ray temp folder (WSML_RAY_TMP)."""
    # Ray's unix sockets live under its temp folder: keep that path short
    ray_tmp = Path(tempfile.mkdtemp(prefix="wsray", dir="/tmp"))
    shared = tmp_path / "shared"
    shared.mkdir()
    s = Slurm(slurm_rig, tmp_path, shared, ray_tmp)
    try:
        yield s
    finally:
        jobs = slurm_rig.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
        if jobs:                                                       # only if a test failed midway
            slurm_rig.run(["scancel", *jobs], check=False)
        for line in processes_with([str(ray_tmp), str(tmp_path)]):     # not the rig's daemons
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _module_python(dest: Path) -> Path:
    """A site's Python module: the project venv's base interpreter (linked to a shared libpython) copied with its
    standard library and libpython into `dest`. Its RUNPATH names the original folder, out of the campus user's
    reach, so it runs only with the module's LD_LIBRARY_PATH: what the site's set-up file must give every step."""
    home = Path(next(ln.split(" = ", 1)[1] for ln in (ROOT / ".venv" / "pyvenv.cfg").read_text().splitlines()
                     if ln.startswith("home = ")))
    exe = home / "python3.11"
    libs = [ln.split("=>")[1].split()[0] for ln in subprocess.run(["ldd", str(exe)], capture_output=True,
                                                                    text=True).stdout.splitlines()
            if "libpython3.11" in ln and "=>" in ln]
    if not libs:
        pytest.skip(f"{exe} is not linked to a shared libpython: no stand-in for a module's Python")
    (dest / "bin").mkdir(parents=True)
    (dest / "lib").mkdir()
    shutil.copy2(exe, dest / "bin" / "python3.11")
    shutil.copy2(libs[0], dest / "lib" / Path(libs[0]).name)
    shutil.copytree(home.parent / "lib" / "python3.11", dest / "lib" / "python3.11", symlinks=True,
                    ignore=shutil.ignore_patterns("site-packages", "test", "idlelib", "tkinter", "turtledemo"))
    return dest


@pytest.fixture
def campus(slurm):
    """`slurm` as an unprivileged user: a checkout in their home, the venv lent to them, their shared and Ray
    folders, and a site set-up file that, as `module load` would, puts the site's Python (the only one the venv
    runs on) and an nvidia-smi of driver 550 on PATH, and cuts the nodes off the internet."""
    pw = ensure_user(USER)
    work = Path(pw.pw_dir) / slurm.ray_tmp.name                # one folder per test in the user's home
    repo = work / "wsml"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    sw = work / "sw" / "bin"                                     # the site's software, as `module load` adds it
    sw.mkdir(parents=True)
    (sw / "nvidia-smi").write_text(f"#!/bin/sh\necho {DRIVER}\n")
    (sw / "nvidia-smi").chmod(0o755)
    module = _module_python(work / "sw" / "python-3.11")   # the site's Python, as `module load python/3.11`
    env_setup = work / "site.sh"
    # the nodes have no internet: every Python of the job loads tests/offline_site (no DNS, no route out)
    env_setup.write_text(f"export PATH={module / 'bin'}:{sw}:$PATH\n"
                         f"export LD_LIBRARY_PATH={module / 'lib'}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\n"
                         f"export PYTHONPATH={repo / 'tests' / 'offline_site'}${{PYTHONPATH:+:$PYTHONPATH}}\n"
                         f"export WSML_OFFLINE_LOG={work / 'offline.log'}\n")
    shared = work / "shared"
    shared.mkdir()
    for path in [Path(pw.pw_dir), *work.rglob("*"), work, slurm.ray_tmp]:
        os.lchown(path, pw.pw_uid, pw.pw_gid)
    Path(pw.pw_dir).chmod(0o755)
    # the venv: this machine's packages, over the module's Python (tests/cluster_helpers.py)
    lend_venv(ROOT / ".venv", repo / ".venv", pw, work / "venv", base=module / "bin" / "python3.11",
              base_env={"LD_LIBRARY_PATH": str(module / "lib")})
    s = Slurm(slurm.rig, work, shared, slurm.ray_tmp, user=pw, repo=repo, env_setup=env_setup)
    try:
        yield s
    finally:
        for line in processes_with([str(work)]):
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(work, ignore_errors=True)


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
    """Nothing of the test's jobs remains once they ended (the rig's own end is checked by `slurm_rig`)."""
    left = s.wait_no_job_processes()
    assert not left, "the job left processes behind:\n" + "\n".join(left)
    left = processes_with([str(s.ray_tmp), str(s.tmp)])
    assert not left, "processes of the test's jobs left:\n" + "\n".join(left)


def _network_attempts(s: Slurm) -> list[str]:
    """What the job's Python processes tried to reach outside the allocation (tests/offline_site), less Ray's
    probe of GCE's metadata server for TPUs when a node starts (ray/_private/accelerators/tpu.py, every node,
    refused at once off Google Cloud)."""
    log = s.tmp / "offline.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [ln for ln in lines if not ln.endswith(" resolve metadata.google.internal")]


# ------------------------------------------- a campus cluster: before Ray, one line
def _fails_before_ray(s: Slurm, job: str) -> str:
    """The job's one `error:` line, once it has failed without starting Ray."""
    info = _wait_job(s, job, 300)
    log = s.log(job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), (info, log[-4000:])
    errors = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, log[-4000:]
    assert "Ray runtime started" not in log and "ray: " not in log, log[-4000:]
    return errors[0]


def test_campus_job_fails_in_one_line_before_ray(campus):
    s = campus
    gpu_space = write_space(s.tmp / "gpu.yaml", num_samples=2, epochs=2, schemes="[LL-R, LL-Cp]", gpus=1)
    resnet_space = write_space(s.tmp / "resnet.yaml", num_samples=2, epochs=2, schemes="[LL-R, LL-Cp]")
    resnet_space.write_text(resnet_space.read_text().replace("train: {", "train: {arch: resnet50, weights: imagenet, "))
    for f in (gpu_space, resnet_space):
        os.lchown(f, s.user.pw_uid, s.user.pw_gid)
    # the driver: torch's CUDA 13 build on nodes whose nvidia-smi (from the site's set-up) says 550
    line = _fails_before_ray(s, s.submit("--space", str(gpu_space)))
    for part in ("gpu check: node n", f"NVIDIA driver {DRIVER}", "built for CUDA 13", "needs a driver >= 580",
                 "TORCH_CUDA=cu126 bash scripts/setup.sh"):
        assert part in line, (part, line)
    # the Python: without the site's set-up, the venv's interpreter misses its libpython (it may start with the
    # system's, and fail as the standard library's C modules load)
    s.env_setup, env_setup = None, s.env_setup
    line = _fails_before_ray(s, s.submit("--space", str(gpu_space)))
    s.env_setup = env_setup
    for part in ("does not run on n", "Error", "in the file WSML_ENV_SETUP names"):
        assert part in line, (part, line)
    # the network: ImageNet weights that the login node did not fetch
    line = _fails_before_ray(s, s.submit("--space", str(resnet_space)))
    assert "offline check" in line and "ImageNet weights" in line and "orchestration.offline fetch" in line, line
    assert _network_attempts(s) == []


def test_campus_nodes_have_no_network(campus):
    """What the campus tests' nodes run under: the site set-up's Python resolves no outside name and reaches
    no public address (and logs the attempt), where the login node (this machine) does."""
    s = campus
    probe = ["bash", "-c", 'source "$1" && exec "$2" -c "import urllib.request as u; u.urlopen(\'https://pypi.org\', '
             'timeout=10)"', "probe", str(s.env_setup), str(s.repo / ".venv" / "bin" / "python")]
    out = run_as(s.user, probe, timeout=60)
    assert out.returncode != 0 and "offline node" in out.stderr, out
    assert "resolve pypi.org" in (s.tmp / "offline.log").read_text()


# -------------------------------------------------------------- the sweep
def test_sbatch_runs_the_sweep_on_two_nodes(campus):
    s = campus
    stamp = ROOT / ".venv" / ".requirements.sha"
    stamp_mtime = stamp.stat().st_mtime
    space = write_space(s.tmp / "space.yaml", num_samples=2, epochs=2, schemes="[LL-R, LL-Cp]", train_images=300)
    os.lchown(space, s.user.pw_uid, s.user.pw_gid)
    # the login node's fetch, with its network: for digits' small CNN there is nothing to download
    fetched = run_as(s.user, ["bash", "-c", 'export LD_LIBRARY_PATH="$3" && cd "$1" && exec .venv/bin/python '
                              '-m orchestration.offline fetch --dataset digits --space "$2"', "fetch", str(s.repo),
                              str(space), str(s.tmp / "sw" / "python-3.11" / "lib")],
                     env={"WSML_SHARED": str(s.shared)}, timeout=120)
    assert fetched.returncode == 0 and "everything the trials of digits load is here" in fetched.stdout, fetched
    # the shared folder as if on NFS: SQLite is opened by one mlflow server on the head, never by the nodes
    job = s.submit("--space", str(space), "--final-seeds", "0", env={"WSML_MLFLOW_SERVER": "1"})
    info = _wait_job(s, job, 600)
    log = s.log(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:]
    assert stamp.stat().st_mtime == stamp_mtime                   # nothing was installed
    served = re.search(r"served by mlflow server on n1 at (http://\S+);", log)
    assert served and f"--mlflow-uri {served[1]}" in log, log[:3000]
    assert "offline check: smallcnn weights none, data built in: nothing to download" in log
    assert _network_attempts(s) == []
    for node in ("n1", "n2"):                                     # every node ran the site's set-up (nvidia-smi)
        assert f"gpu check: node {node}: NVIDIA driver {DRIVER}" in log and "the trials use no GPU" in log, log[:3000]
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
    check = ("import sys; from orchestration.common import SweepError; from orchestration.run.preflight import resolve_address\n"
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

"""`ray up` for real, on this machine: cluster.local.yaml with this machine as head.

The test makes a variant of the real cluster.local.yaml that changes only what
must differ here (head address, SSH user/key/port, the shared folder, the
cluster's name and Ray's ports; checked below), starts an sshd on 127.0.0.1
that admits only the dedicated user `wsmlray`, then runs the commands of
docs/aws.md: `ray up`, `ray exec ... 'ray status'`, the digits smoke
sweep, `ray down`. Before `ray down` it runs the set-up a worker node runs
(the file's setup_commands) on the head with the head's venv moved away, as
on a fresh node: the venv comes from the archive the head published on the
shared folder (scripts/cluster_venv.sh). The head's venv is lent from this
machine's (a symlink, or a thin overlay), so that archive is small and that
time says nothing; `WSML_RAY_UP_MEASURE=1` runs one more test that gives the
head a full copy of the venv and measures a worker's set-up with the archive
of it and without (the whole venv from the package index; minutes).

Why a dedicated user: `ray stop`, which `ray up` and `ray down` run on the head,
kills every Ray process on the machine it is allowed to signal (as root: all
of them; seen here: it tries root's too and gets "Could not terminate"). As the
unprivileged `wsmlray` it can stop only this test's Ray, while other tests run
Ray as root beside it. Ray's files go to this test's own temp folder
(RAY_TMPDIR, so `--address auto` finds this cluster) and every port Ray would
take by default is a free one picked here. Set WSML_KEEP_RAY_UP_TMP=1 to keep
the temp folder (commands.log, the head's Ray logs) for a look afterwards.

Needs root (to add the user and start sshd) and the Debian packages
openssh-server, rsync and netcat-openbsd.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import importlib.util
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests import cluster_helpers as ch

pytestmark = [pytest.mark.cluster, pytest.mark.service, pytest.mark.slow]

REPO = ch.REPO
REAL_YAML = REPO / "cluster.local.yaml"
DOCS = REPO / "docs" / "aws.md"
SHARED_IN_REAL_FILE = "WSML_SHARED=/mnt/shared"


def _missing_prereqs() -> str | None:
    if os.geteuid() != 0:
        return "needs root (adds the user wsmlray, starts sshd)"
    for tool in ("/usr/sbin/sshd", "rsync", "nc", "ssh", "ssh-keygen", "useradd"):
        if not shutil.which(tool):
            return f"{tool} missing (apt-get install openssh-server rsync netcat-openbsd)"
    return None


def docs_command(pattern: str) -> str:
    """The one line of docs/aws.md that starts with `ray ` and matches."""
    lines = [ln.strip() for ln in ch.cluster_docs(DOCS).splitlines()]
    found = [ln for ln in lines if ln.startswith("ray ") and re.search(pattern, ln)]
    assert len(found) == 1, f"docs/aws.md: expected one command matching {pattern!r}, got {found}"
    return found[0]


def for_yaml(cmd: str, yaml_path: Path) -> list[str]:
    """A docs command (written for cluster.yaml) as argv for the test's file."""
    argv = shlex.split(cmd)
    assert argv[2] == "cluster.yaml", cmd
    return [ch.ray_cli(), argv[1], str(yaml_path), *argv[3:]]


def make_variant(real: dict, *, name: str, user: str, key: Path, ssh_port: int,
                 shared: Path, ports: dict[str, int]) -> dict:
    cfg = copy.deepcopy(real)
    cfg["cluster_name"] = name
    cfg["provider"]["head_ip"] = "127.0.0.1"
    cfg["provider"]["worker_ips"] = []
    cfg["auth"] = {"ssh_user": user, "ssh_private_key": str(key),
                   "ssh_proxy_command": f"nc %h {ssh_port}"}
    setup = cfg["setup_commands"]
    [i] = [i for i, c in enumerate(setup) if SHARED_IN_REAL_FILE in c]
    setup[i] = setup[i].replace(SHARED_IN_REAL_FILE, f"WSML_SHARED={shared}")
    head = cfg["head_start_ray_commands"]
    [j] = [j for j, c in enumerate(head) if "ray start --head" in c]
    assert "--port=6379" in head[j]
    # this machine has no GPU: the head declares one (docs/aws.md's smoke sweep asks for a GPU per
    # trial; WSML_FAKE_GPUS=1 in the user's environment lets those trials train on the CPU)
    head[j] = head[j].replace("--port=6379", f"--port={ports['gcs']}") + (
        " --num-gpus=1"
        f" --dashboard-port={ports['dashboard']}"
        f" --dashboard-agent-listen-port={ports['agent']}"
        f" --metrics-export-port={ports['metrics']}")
    if importlib.util.find_spec("grpc"):
        # Ray Client's server (default 10001) starts only with ray[client]
        # installed, and `ray start` refuses the flag without it.
        head[j] += f" --ray-client-server-port={ports['client']}"
    return cfg


def changed_paths(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += changed_paths(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += changed_paths(x, y, f"{prefix}[{i}]")
        return out
    return [] if a == b else [prefix]


class Rig:
    """Everything the test starts, and how to take it down again."""

    def __init__(self, venv: str = "lend"):
        self.venv = venv            # "lend" (ch.lend_venv) or "copy" (ch.copy_venv: a full venv of the user's)
        self.tmp = Path(tempfile.mkdtemp(prefix="wru-", dir="/tmp"))
        self.tmp.chmod(0o755)
        self.name = f"wsml-test-{uuid.uuid4().hex[:8]}"
        self.user = ch.ensure_user(ch.RAY_USER)
        self.sshd: ch.SshServer | None = None
        self.yaml_path = self.tmp / "cluster.yaml"
        self.up = False
        self.log = self.tmp / "commands.log"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            # `ray up` on this side: its state/config caches in the temp folder.
            "RAY_TMPDIR": str(self.tmp / "client"),
            "TMPDIR": str(self.tmp / "client"),
            "AUTOSCALER_NODE_START_WAIT_S": "30",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "PATH": f"{Path(ch.ray_cli()).parent}:{env.get('PATH', '')}",
        })
        env.pop("RAY_ADDRESS", None)
        return env

    def ray(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        t0 = time.monotonic()
        try:
            p = subprocess.run(argv, cwd=REPO, env=self.env(), capture_output=True, text=True,
                               timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            raise AssertionError(f"timed out after {timeout}s: {argv}\n{out[-6000:]}") from None
        with open(self.log, "a") as f:
            f.write(f"\n$ {shlex.join(argv)}  # rc={p.returncode} "
                    f"{time.monotonic() - t0:.1f}s\n{p.stdout}\n{p.stderr}\n")
        return p

    def start(self) -> None:
        (self.tmp / "client").mkdir()
        shared = self.tmp / "shared"
        rt = self.tmp / "rt"
        user_tmp = self.tmp / "usertmp"
        for d in (shared, rt, user_tmp):
            d.mkdir()
            os.chown(d, self.user.pw_uid, self.user.pw_gid)
        # A previous run that died may have left this user's Ray running.
        self.stop_user_processes()
        ch.reset_home(self.user, bashrc_extra=(
            "\n# wsml test_ray_up: this user's Ray apart from other Ray users on the machine\n"
            f"export RAY_TMPDIR={rt} TMPDIR={user_tmp}\n"
            "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0\n"
            "export RAY_USAGE_STATS_ENABLED=0\n"
            "export RAY_USAGE_STATS_REPORT_URL=http://127.0.0.1:9/\n"
            "export MLFLOW_DISABLE_TELEMETRY=true\n"
            "export WSML_FAKE_GPUS=1\n"
            # the venv comes from this machine, where its editable install points at another checkout;
            # a node's own scripts/setup.sh points it at ~/wsml
            "export PYTHONPATH=$HOME/wsml\n"))
        home = Path(self.user.pw_dir)
        if self.venv == "copy":
            ch.copy_venv(REPO / ".venv", home / "wsml" / ".venv", self.user)
            self.venv_mode = "copy"
        else:
            self.venv_mode = ch.lend_venv(REPO / ".venv", home / "wsml" / ".venv", self.user, self.tmp)

        ssh_port, *ray_ports = ch.free_ports(6)
        self.sshd = ch.SshServer(self.tmp / "sshd", self.user, ssh_port)
        self.sshd.dir.mkdir()
        self.sshd.start()

        self.shared = shared
        real = ch.load_yaml(REAL_YAML)
        cfg = make_variant(real, name=self.name, user=ch.RAY_USER, key=self.sshd.client_key,
                           ssh_port=ssh_port, shared=shared,
                           ports=dict(zip(["gcs", "dashboard", "client", "agent", "metrics"], ray_ports)))
        self.yaml_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.cfg, self.real = cfg, real

    def stop_user_processes(self) -> None:
        """Stop this test's Ray (all processes of the dedicated user), by pid."""
        ray_bin = Path(self.user.pw_dir) / "wsml" / ".venv" / "bin" / "ray"
        if ch.user_pids(self.user) and ray_bin.exists():
            try:
                ch.run_as(self.user, [str(ray_bin), "stop", "--force"], timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = ch.user_pids(self.user)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if pids:
                time.sleep(2)

    def close(self) -> None:
        if self.up:
            try:
                self.ray([ch.ray_cli(), "down", "-y", str(self.yaml_path)], timeout=120)
            except AssertionError:
                pass
        self.stop_user_processes()
        if self.sshd:
            self.sshd.stop()
        shutil.rmtree(ch.ssh_control_dir(self.name), ignore_errors=True)
        ch.reset_home(self.user)
        if os.environ.get("WSML_KEEP_RAY_UP_TMP"):
            print(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def _rig(venv: str):
    why = _missing_prereqs()
    if why:
        pytest.skip(why)
    # One run at a time on a machine: they share the user wsmlray.
    with open("/tmp/wsml-test-ray-up.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = Rig(venv)
        try:
            r.start()
            yield r
        finally:
            r.close()


@pytest.fixture
def rig():
    with _rig("lend") as r:
        yield r


def _head_logs(r: Rig) -> str:
    logs = sorted((r.tmp / "rt").glob("ray/session_latest/logs/*"))
    out = []
    for p in logs:
        if p.suffix in (".err", ".log", ".out") and p.stat().st_size:
            out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}")
    return "\n".join(out)[-8000:]


def _smoke_sweep(r: Rig) -> None:
    """The smoke sweep of docs/aws.md, word for word, then its results fetched
    with the docs' `ray rsync-down` commands (into the temp folder, not the repo)."""
    sweep_cmd = docs_command(r"sweep\.py --dataset digits")
    sweep_name = re.search(r"--name (\S+)", sweep_cmd).group(1).strip("'\"")
    samples = int(re.search(r"--num-samples (\d+)", sweep_cmd).group(1))
    sweep = r.ray(for_yaml(sweep_cmd, r.yaml_path), timeout=360)
    out = sweep.stdout + sweep.stderr
    assert sweep.returncode == 0, f"sweep failed (rc {sweep.returncode}):\n{out[-10000:]}"
    assert sweep_name in out

    # Ray Tune's results went to the shared folder of the one setup line.
    results = r.shared / "ray_results" / sweep_name
    trials = [p for p in results.glob("*") if p.is_dir()] if results.is_dir() else []
    assert len(trials) >= samples, (f"want {samples} trial folders in {results}; shared has "
                                    f"{sorted(str(p.relative_to(r.shared)) for p in r.shared.rglob('*'))[:40]}")

    # Fetch results/ and the MLflow store as docs/aws.md says.
    fetched = r.tmp / "fetched"
    fetched.mkdir()
    for pattern, target in ((r"rsync-down .*results/", fetched / "results"),
                            (r"rsync-down .*mlflow\.db", fetched / "mlflow.db")):
        argv = for_yaml(docs_command(pattern), r.yaml_path)
        argv[-1] = str(target) + ("/" if argv[-1].endswith("/") else "")
        got = r.ray(argv, timeout=120)
        assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    assert any((fetched / "results").iterdir()), "ray rsync-down fetched no results/"
    with sqlite3.connect(fetched / "mlflow.db") as db:
        runs = db.execute("SELECT count(*) FROM runs").fetchone()[0]
    assert runs >= samples, f"MLflow store on the head has {runs} runs, want >= {samples}"


def _worker_setup(r: Rig, timeout: float) -> tuple[str, float]:
    """Run the file's worker set-up (setup_commands, then worker_setup_commands) on the head with its venv
    moved away, as on a new node (the venv is put back after); returns (output, seconds)."""
    cmds = r.cfg["setup_commands"] + r.cfg.get("worker_setup_commands", [])
    script = "\n".join([
        "set -e", "mv ~/wsml/.venv ~/wsml/.venv.head",
        "trap 'rm -rf ~/wsml/.venv; mv ~/wsml/.venv.head ~/wsml/.venv' EXIT",
        "t0=$(date +%s.%N)", *[f"( {c} )" for c in cmds],
        'echo "worker set-up: $(echo "$(date +%s.%N) - $t0" | bc) s"'])
    got = r.ray([ch.ray_cli(), "exec", str(r.yaml_path), f"bash -c {shlex.quote(script)}"], timeout=timeout)
    out = got.stdout + got.stderr
    assert got.returncode == 0, f"worker set-up failed:\n{out[-6000:]}"
    m = re.search(r"worker set-up: ([0-9.]+) s", out)
    assert m, out[-3000:]
    return out, float(m.group(1))


def _venv_seconds(out: str, how: str) -> int:
    m = re.search(rf"venv: {how} .*?in (\d+) s", out)
    assert m, f"no 'venv: {how}' line:\n{out[-3000:]}"
    return int(m.group(1))


@pytest.mark.timeout(600)
def test_ray_up_sweep_ray_down(rig: Rig):
    r = rig
    # The variant differs from the real file only where it must.
    allowed = {"cluster_name", "provider.head_ip", "provider.worker_ips", "auth.ssh_user",
               "auth.ssh_private_key", "auth.ssh_proxy_command"}
    changed = set(changed_paths(r.real, r.cfg))
    extra = {c for c in changed - allowed
             if not re.fullmatch(r"setup_commands\[\d+\]|head_start_ray_commands\[\d+\]", c)}
    assert not extra, f"test variant changes more than it should: {sorted(extra)}"
    assert len([c for c in changed if c.startswith("setup_commands")]) == 1
    assert len([c for c in changed if c.startswith("head_start_ray_commands")]) == 1

    t0 = time.monotonic()
    assert docs_command(r"^ray up cluster\.yaml$") and docs_command(r"^ray down cluster\.yaml$")
    up = r.ray([ch.ray_cli(), "up", "-y", str(r.yaml_path)], timeout=240)
    r.up = True
    assert up.returncode == 0, f"ray up failed:\n{up.stdout[-6000:]}\n{up.stderr[-3000:]}"
    t_up = time.monotonic() - t0

    # A plain driver on the head reaches the cluster.
    probe = r.ray([ch.ray_cli(), "exec", str(r.yaml_path),
                   "python -c 'import ray; ray.init(address=\"auto\"); "
                   "print(\"RESOURCES\", ray.cluster_resources())'"], timeout=120)
    assert probe.returncode == 0 and "RESOURCES" in probe.stdout, (
        f"{probe.stdout[-4000:]}\n{probe.stderr[-3000:]}\n{_head_logs(r)}")
    assert "'CPU'" in probe.stdout

    status = r.ray(for_yaml(docs_command(r"'ray status'"), r.yaml_path), timeout=120)
    assert status.returncode == 0 and "Node status" in status.stdout, status.stdout[-4000:]

    t1 = time.monotonic()
    _smoke_sweep(r)
    t_sweep = time.monotonic() - t1

    # A worker's set-up: its venv is the archive the head published on the shared folder
    archives = list((r.shared / "venvs").glob("venv-*"))
    assert len(archives) == 1, f"the head published no venv archive (or several): {archives}"
    out, t_worker = _worker_setup(r, timeout=240)
    assert f"venv: unpacked {archives[0]}" in out, out[-3000:]
    assert "gpu check: no NVIDIA GPU on this node" in out, out[-3000:]

    t2 = time.monotonic()
    down = r.ray([ch.ray_cli(), "down", "-y", str(r.yaml_path)], timeout=120)
    r.up = False
    assert down.returncode == 0, down.stdout[-4000:]
    assert "Stopped all" in down.stdout + down.stderr, (
        f"ray down did not stop Ray on the head:\n{down.stdout[-4000:]}")
    t_down = time.monotonic() - t2
    time.sleep(1)
    left = [ch.cmdline(p) for p in ch.user_pids(r.user)]
    left = [c for c in left if re.search(r"gcs_server|raylet|ray/dashboard|default_worker|ray::|"
                                         r"monitor\.py|log_monitor|runtime_env", c)]
    assert not left, f"Ray processes of {ch.RAY_USER} still running after ray down: {left}"
    print(f"venv: {r.venv_mode}; ray up {t_up:.0f}s, sweep {t_sweep:.0f}s, ray down {t_down:.0f}s, "
          f"a worker's set-up from the (lent, small) venv archive {t_worker:.0f}s")


@pytest.mark.timeout(3600)
@pytest.mark.skipif(not os.environ.get("WSML_RAY_UP_MEASURE"), reason="set WSML_RAY_UP_MEASURE=1: downloads the "
                    "whole venv from the package index (minutes)")
def test_worker_setup_time_with_and_without_the_venv_archive():
    with _rig("copy") as r:
        t0 = time.monotonic()
        up = r.ray([ch.ray_cli(), "up", "-y", str(r.yaml_path)], timeout=1200)
        r.up = True
        assert up.returncode == 0, f"ray up failed:\n{up.stdout[-6000:]}\n{up.stderr[-3000:]}"
        t_up = time.monotonic() - t0
        [archive] = (r.shared / "venvs").glob("venv-*")
        size_gb = archive.stat().st_size / 1e9
        published = _venv_seconds(up.stdout + up.stderr, "published")
        with_archive, t_with = _worker_setup(r, timeout=1200)
        unpacked = _venv_seconds(with_archive, "unpacked")
        archive.rename(archive.with_name("away"))          # a cluster without the archive
        without, t_without = _worker_setup(r, timeout=3000)
        built = _venv_seconds(without, "built from the package index")
        print(f"\nhead: ray up {t_up:.0f} s, of which publishing the venv archive ({size_gb:.1f} GB) {published} s")
        print(f"worker set-up with the archive {t_with:.0f} s (venv unpacked in {unpacked} s); without it "
              f"{t_without:.0f} s (venv from the package index in {built} s): {t_without / t_with:.1f}x")

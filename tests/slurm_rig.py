"""A real two-node SLURM on this machine, for the tests of `cluster.slurm.sh`.

Debian's `slurmd -N NAME` runs several SLURM nodes on one host: `SlurmRig`
writes a `slurm.conf` (nodes n1 and n2 on 127.0.0.1, free ports), starts its
own `munged` (its own key and socket, so a system munged is never touched),
`slurmctld` and two `slurmd`, and stops them again by PID. Each node declares
one GPU backed by /dev/null: SLURM grants it (SLURM_GPUS_ON_NODE,
CUDA_VISIBLE_DEVICES) as on a GPU node, though no GPU exists. Every process the
rig starts, and everything SLURM starts for it, carries `SLURM_CONF=<its
slurm.conf>` in its environment; `leftovers` finds them by that.

Its folder and munge socket are open to other users, so that an unprivileged
user can submit (`sbatch(user=)`).
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NODES = ("n1", "n2")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmRig:
    def __init__(self, base: Path, env: dict[str, str], cpus_per_node: int = 1):
        self.base = base
        self.conf = base / "slurm.conf"
        self.sock = base / "munge" / "munge.sock"
        self.cpus_per_node = cpus_per_node
        self.env = {**env, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}

    # -------------------------------------------------------------- start
    def start(self, timeout: float = 60) -> None:
        self._start_munged(timeout)
        self._write_conf()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        for node in NODES:
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", node])
        deadline = time.time() + timeout
        while True:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
            states = dict(ln.split() for ln in out.splitlines() if ln.strip())
            if all(states.get(n) == "idle" for n in NODES):
                return
            self._check_alive()
            if time.time() > deadline:
                raise RuntimeError(f"SLURM nodes not idle after {timeout} s: {states}; "
                                   f"{self.log('slurmctld')[-2000:]}")
            time.sleep(0.5)

    def _start_munged(self, timeout: float) -> None:
        d = self.sock.parent
        d.mkdir(mode=0o755, parents=True)      # the socket must be reachable for an unprivileged user's sbatch
        key = d / "munge.key"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        # --force: the socket folder lies in a private (0700) tmp folder, which munged warns about
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--socket={self.sock}", f"--key-file={key}",
                               f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munged.seed'}",
                               f"--log-file={d / 'munged.log'}"])
        deadline = time.time() + timeout
        while True:
            enc = subprocess.run([_which("munge"), "-S", str(self.sock), "-n"], capture_output=True)
            if enc.returncode == 0:
                dec = subprocess.run([_which("unmunge"), "-S", str(self.sock)], input=enc.stdout,
                                     capture_output=True)
                if dec.returncode == 0:
                    return
            self._check_alive()
            if time.time() > deadline:
                raise RuntimeError(f"munged did not answer within {timeout} s: {enc.stderr.decode()}")
            time.sleep(0.2)

    def _write_conf(self) -> None:
        b = self.base
        host = socket.gethostname()
        ctl, *node_ports = (free_port() for _ in range(1 + len(NODES)))
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus_per_node} "
            "RealMemory=4000 Gres=gpu:1 State=UNKNOWN" for n, p in zip(NODES, node_ports))
        # slurmd reads gres.conf beside slurm.conf
        (b / "gres.conf").write_text(f"NodeName={','.join(NODES)} Name=gpu File=/dev/null\n")
        self.conf.write_text(f"""\
ClusterName=wsmltest
GresTypes=gpu
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctl}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.sock}
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=10
MessageTimeout=20
MailProg=/bin/true
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/slurmd-%n
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd-%n.pid
SlurmctldLogFile={b}/slurmctld.log
SlurmdLogFile={b}/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        (b / "state").mkdir(exist_ok=True)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.base / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with status {p.returncode}: {self.log(name)[-2000:]}")

    def log(self, name: str) -> str:
        parts = []
        for f in (self.base / f"{name}.out", self.base / f"{name}.log"):
            if f.exists():
                parts.append(f.read_text(errors="replace"))
        return "\n".join(parts)

    # ---------------------------------------------------------------- use
    def run(self, cmd: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def sbatch(self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
               user: pwd.struct_passwd | None = None) -> str:
        """Submit a job (as `user`, with their HOME, USER and a plain PATH, when given); its id."""
        cmd = ["sbatch", "--parsable", *args]
        full = {**self.env, **(env or {})}
        if user is not None:
            cmd = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", *cmd]
            full.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name,
                        PATH="/usr/local/bin:/usr/bin:/bin", **(env or {}))
        r = subprocess.run(cmd, env=full, cwd=cwd, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL:
                return info
            self._check_alive()
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout} s")
            time.sleep(1)

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if info.get("JobState") in TERMINAL or time.time() > deadline:
                raise RuntimeError(f"job {job_id} is {info.get('JobState')}, not one of {sorted(states)}")
            time.sleep(0.5)

    # --------------------------------------------------------------- stop
    def stop(self, timeout: float = 60) -> None:
        """Cancel the rig's jobs, then stop slurmd, slurmctld and munged by PID."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                deadline = time.time() + timeout
                while self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split() \
                        and time.time() < deadline:
                    time.sleep(1)
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def leftovers(self, markers: list[str]) -> list[str]:
        """Live processes whose environment names this rig's slurm.conf, or whose command line or
        environment holds one of `markers` (paths only the test uses)."""
        return processes_with([f"SLURM_CONF={self.conf}", *markers])


def processes_with(needles: list[str]) -> list[str]:
    """`PID command line` of the live processes (not this one, not zombies) whose command line or
    environment contains one of `needles`."""
    raw = [n.encode() for n in needles]
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            continue   # a zombie holds nothing; its parent reaps it
        if any(n in environ or n in cmdline for n in raw):
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
            found.append(f"{pid} {shown}")
    return found

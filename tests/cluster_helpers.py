"""Helpers for the cluster tests: checks Ray does not make, and a `ray up` rig.

`config_problems` checks what Ray's own validation (`validate_config`) lets
through: typos inside `provider` and `node_config`, `min_workers > max_workers`,
ports opened to the internet. The rest of the module starts a head node for
`ray up` on this machine: an sshd on loopback that admits only a dedicated
unprivileged user, so the `ray stop` that `ray up` and `ray down` run can only
ever stop that user's Ray, never Ray processes of anybody else on the machine.
"""
from __future__ import annotations

import copy
import hashlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------
# Offline checks of a cluster YAML
# ---------------------------------------------------------------------------

# Provider keys the Ray autoscaler reads (ray/autoscaler/_private, Ray 2.60).
_COMMON_PROVIDER_KEYS = {
    "type", "use_internal_ips", "use_external_head_ip", "disable_node_updaters",
    "disable_launch_config_check", "foreground_node_launch", "worker_liveness_check",
}
PROVIDER_KEYS = {
    "aws": _COMMON_PROVIDER_KEYS | {
        "region", "availability_zone", "cache_stopped_nodes", "security_group",
        "aws_credentials", "cloudwatch", "key_pair",
    },
    "local": _COMMON_PROVIDER_KEYS | {
        "head_ip", "worker_ips", "coordinator_address", "external_head_ip",
    },
}
# EC2 RunInstances parameters (boto3 `create_instances`), plus Ray's own
# `SubnetIds`; Ray passes node_config to EC2 as it is.
AWS_NODE_CONFIG_KEYS = {
    "AdditionalInfo", "BlockDeviceMappings", "CapacityReservationSpecification",
    "ClientToken", "CpuOptions", "CreditSpecification", "DisableApiStop",
    "DisableApiTermination", "DryRun", "EbsOptimized", "ElasticGpuSpecification",
    "ElasticInferenceAccelerators", "EnablePrimaryIpv6", "EnclaveOptions",
    "HibernationOptions", "IamInstanceProfile", "ImageId",
    "InstanceInitiatedShutdownBehavior", "InstanceMarketOptions", "InstanceType",
    "Ipv6AddressCount", "Ipv6Addresses", "KernelId", "KeyName", "LaunchTemplate",
    "LicenseSpecifications", "MaintenanceOptions", "MetadataOptions", "Monitoring",
    "NetworkInterfaces", "NetworkPerformanceOptions", "Operator", "Placement",
    "PrivateDnsNameOptions", "PrivateIpAddress", "RamdiskId", "SecurityGroupIds",
    "SecurityGroups", "SubnetId", "SubnetIds", "TagSpecifications", "UserData",
}
# InstanceMarketOptions of RunInstances: spot instances and their options.
MARKET_TYPES = {"spot", "capacity-block"}
SPOT_OPTION_KEYS = {"MaxPrice", "SpotInstanceType", "BlockDurationMinutes", "ValidUntil",
                    "InstanceInterruptionBehavior"}
SSH_PORT = 22
_OPEN_TO_ALL = {"0.0.0.0/0", "::/0"}


def _ray_start_flags(cmd: str) -> dict[str, str]:
    """`--flag=value`, `--flag value` and bare `--flag` ("") of a `ray start` command."""
    words = shlex.split(cmd.split("ray start", 1)[-1].split(";")[0])
    flags: dict[str, str] = {}
    for i, w in enumerate(words):
        if w.startswith("--"):
            key, eq, val = w[2:].partition("=")
            if not eq and i + 1 < len(words) and not words[i + 1].startswith("-"):
                val = words[i + 1]
            flags[key] = val
    return flags


def config_problems(cfg: dict[str, Any]) -> list[str]:
    """What is wrong with a cluster config that Ray's validation accepts."""
    problems: list[str] = []
    provider = cfg.get("provider", {})
    ptype = provider.get("type")
    known = PROVIDER_KEYS.get(ptype)
    if known is None:
        problems.append(f"provider.type {ptype!r}: only {sorted(PROVIDER_KEYS)} are checked")
        known = set(provider)
    problems += [f"unknown key provider.{k}" for k in sorted(set(provider) - known)]

    global_max = cfg.get("max_workers")
    for name, nt in (cfg.get("available_node_types") or {}).items():
        lo, hi = nt.get("min_workers", 0), nt.get("max_workers")
        if hi is not None and lo > hi:
            problems.append(f"node type {name}: min_workers {lo} > max_workers {hi}")
        if hi is not None and global_max is not None and hi > global_max:
            problems.append(f"node type {name}: max_workers {hi} > cluster max_workers {global_max}")
        if ptype == "aws":
            node_config = nt.get("node_config", {})
            extra = set(node_config) - AWS_NODE_CONFIG_KEYS
            problems += [f"unknown key {name}.node_config.{k}" for k in sorted(extra)]
            subnets = node_config.get("SubnetIds")
            if not (isinstance(subnets, list) and subnets
                    and all(isinstance(x, str) and x.startswith("subnet-") for x in subnets)):
                problems.append(f"node type {name}: node_config.SubnetIds must list the subnets "
                                f"(subnet-...) it starts in, got {subnets!r}")
            market = node_config.get("InstanceMarketOptions")
            if market is not None:
                if market.get("MarketType") not in MARKET_TYPES:
                    problems.append(f"node type {name}: InstanceMarketOptions.MarketType "
                                    f"{market.get('MarketType')!r} is not one of {sorted(MARKET_TYPES)}")
                problems += [f"unknown key {name}.node_config.InstanceMarketOptions.{k}"
                             for k in sorted(set(market) - {"MarketType", "SpotOptions"})]
                problems += [f"unknown key {name}.node_config.InstanceMarketOptions.SpotOptions.{k}"
                             for k in sorted(set(market.get("SpotOptions") or {}) - SPOT_OPTION_KEYS)]
            for bad in ("CPU", "GPU"):
                if (nt.get("resources") or {}).get(bad, 0) < 0:
                    problems.append(f"node type {name}: negative {bad}")
    if global_max is not None and cfg.get("min_workers", 0) > global_max:
        problems.append(f"min_workers {cfg['min_workers']} > max_workers {global_max}")

    for rule in (provider.get("security_group") or {}).get("IpPermissions", []):
        ranges = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
        ranges |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
        ports = (rule.get("FromPort"), rule.get("ToPort"))
        if ranges & _OPEN_TO_ALL and ports != (SSH_PORT, SSH_PORT):
            problems.append(f"security group opens ports {ports} to the internet")

    for cmd in cfg.get("head_start_ray_commands", []):
        if "ray start" in cmd:
            host = _ray_start_flags(cmd).get("dashboard-host")
            if host in (None, "0.0.0.0", "::"):
                problems.append("head `ray start` must bind the dashboard to 127.0.0.1 "
                                f"(--dashboard-host), got {host!r}")
    return problems


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def ray_validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Ray's own offline validation, as `ray up` runs it first (a private API)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


# ---------------------------------------------------------------------------
# A head node on this machine for `ray up`
# ---------------------------------------------------------------------------

RAY_USER = "wsmlray"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > end:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")
            time.sleep(0.2)


def ensure_user(name: str = RAY_USER) -> pwd.struct_passwd:
    """The dedicated login user (created once). Its password is '*': no
    password login, but not 'locked', which sshd without PAM would refuse."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash",
                        "--password", "*", name], check=True)
        pw = pwd.getpwnam(name)
    else:
        subprocess.run(["usermod", "--password", "*", name], check=True)
    return pw


def run_as(pw: pwd.struct_passwd, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run argv as the user (no login shell; setuid in the child)."""
    def demote():
        os.setgid(pw.pw_gid)
        os.initgroups(pw.pw_name, pw.pw_gid)
        os.setuid(pw.pw_uid)

    env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
           "PATH": "/usr/local/bin:/usr/bin:/bin", **kw.pop("env", {})}
    return subprocess.run(argv, preexec_fn=demote, env=env, cwd=pw.pw_dir, timeout=timeout,
                          capture_output=True, text=True, **kw)


def user_pids(pw: pwd.struct_passwd) -> list[int]:
    out = subprocess.run(["pgrep", "-u", str(pw.pw_uid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def reset_home(pw: pwd.struct_passwd, bashrc_extra: str = "") -> None:
    """Empty the user's home and give it a fresh skeleton (+ lines for .bashrc)."""
    home = Path(pw.pw_dir)
    home.mkdir(parents=True, exist_ok=True)
    for child in home.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    for item in Path("/etc/skel").iterdir():
        if item.is_file():
            shutil.copy(item, home / item.name)
    with open(home / ".bashrc", "a") as f:
        f.write(bashrc_extra)
    for path in [home, *home.rglob("*")]:
        os.lchown(path, pw.pw_uid, pw.pw_gid)
    home.chmod(0o755)


class SshServer:
    """sshd on 127.0.0.1:<port> with its own config, host key and pid file,
    admitting only `user`, with a key made here (put into the user's
    ~/.ssh/authorized_keys: sshd refuses key files below a world-writable
    folder such as /tmp)."""

    def __init__(self, workdir: Path, user: pwd.struct_passwd, port: int):
        self.dir = workdir
        self.user = user
        self.port = port
        self.pidfile = workdir / "sshd.pid"
        self.client_key = workdir / "client_key"
        self.log = workdir / "sshd.log"

    def start(self) -> None:
        d = self.dir
        for key in (d / "host_key", self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True)
        ssh_dir = Path(self.user.pw_dir) / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        auth = ssh_dir / "authorized_keys"
        shutil.copy(self.client_key.with_suffix(".pub"), auth)
        auth.chmod(0o600)
        for path in (ssh_dir, auth):
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        (d / "sshd_config").write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile {self.pidfile}
AuthorizedKeysFile .ssh/authorized_keys
AllowUsers {self.user.pw_name}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes yes
PrintMotd no
MaxSessions 50
MaxStartups 50:30:100
""")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        subprocess.run(["/usr/sbin/sshd", "-f", str(d / "sshd_config"), "-E", str(self.log)],
                       check=True)
        wait_port(self.port)

    def stop(self) -> None:
        try:
            pid = int(self.pidfile.read_text())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def lend_venv(venv: Path, dest: Path, user: pwd.struct_passwd, workdir: Path, base: Path | None = None,
              base_env: dict[str, str] | None = None) -> str:
    """Make `dest` (the remote ~/wsml/.venv) a venv the user can run, built from
    the project's installed `venv` without reinstalling anything.

    If the user can run the venv's interpreter, `dest` is a symlink to it.
    Otherwise (its base Python lies in a folder only root can enter, such as
    /root/.pyenv), or when `base` names one, an overlay venv is made from a
    system interpreter of the same major.minor version (or `base`, run with
    `base_env`) that imports the project venv's site-packages.
    Returns "symlink" or "overlay"."""
    try:
        usable = base is None and run_as(user, [str(venv / "bin" / "python"), "-c", "import ray"],
                                         timeout=120).returncode == 0
    except OSError:  # e.g. PermissionError: the interpreter is out of the user's reach
        usable = False
    target = venv
    how = "symlink"
    if not usable:
        cfg = dict(line.split(" = ", 1) for line in (venv / "pyvenv.cfg").read_text().splitlines()
                   if " = " in line)
        major_minor = ".".join(cfg.get("version", cfg.get("version_info", "")).split(".")[:2])
        found = base or shutil.which(f"python{major_minor}", path="/usr/local/bin:/usr/bin:/bin")
        if not found:
            raise RuntimeError(f"{user.pw_name} cannot run {venv}/bin/python and there is no "
                               f"system python{major_minor} to borrow its packages with")
        target = workdir / "venv"
        subprocess.run([str(found), "-m", "venv", "--without-pip", str(target)], check=True,
                       env={**os.environ, **(base_env or {})})
        site = f"lib/python{major_minor}/site-packages"
        (target / site / "_wsml_borrowed.pth").write_text(
            f"import site; site.addsitedir({str(venv / site)!r})\n")
        for script in (venv / "bin").iterdir():
            if script.is_symlink() or not script.is_file() or (target / "bin" / script.name).exists():
                continue
            try:
                text = script.read_text()
            except UnicodeDecodeError:
                continue
            first, _, rest = text.partition("\n")
            if first.startswith("#!") and str(venv) in first:
                out = target / "bin" / script.name
                out.write_text(f"#!{target / 'bin' / 'python'}\n{rest}")
                out.chmod(0o755)
        stamp = venv / ".requirements.sha"
        want = (stamp.read_text() if stamp.exists()
                else hashlib.sha256((REPO / "requirements.txt").read_bytes()).hexdigest() + "\n")
        (target / ".requirements.sha").write_text(want)
        how = "overlay"
        check = run_as(user, [str(target / "bin" / "python"), "-c", "import ray"], timeout=120, env=base_env or {})
        if check.returncode != 0:
            raise RuntimeError(f"overlay venv does not import ray: {check.stderr[-2000:]}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.symlink_to(target)
    for path in (dest.parent, dest):
        os.lchown(path, user.pw_uid, user.pw_gid)
    return how


def copy_venv(venv: Path, dest: Path, user: pwd.struct_passwd) -> None:
    """Make `dest` a real venv of the user's own (the system python3.11, a copy of `venv`'s packages): what
    scripts/setup.sh builds on a node, without downloading it again. For measuring what moving a whole
    venv between nodes costs; `lend_venv` is the fast stand-in otherwise."""
    base = shutil.which("python3.11", path="/usr/local/bin:/usr/bin:/bin")
    if base is None:
        raise RuntimeError("no system python3.11 to build the copy with")
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([base, "-m", "venv", "--without-pip", str(dest)], check=True)
    site = "lib/python3.11/site-packages"
    subprocess.run(["cp", "-a", f"{venv / site}/.", str(dest / site)], check=True)
    stamp = venv / ".requirements.sha"
    (dest / ".requirements.sha").write_text(
        stamp.read_text() if stamp.exists()
        else hashlib.sha256((REPO / "requirements.txt").read_bytes()).hexdigest() + "\n")
    for script in (venv / "bin").iterdir():       # console scripts (ray, pip, ...) pointed at the copy
        if script.is_symlink() or not script.is_file() or (dest / "bin" / script.name).exists():
            continue
        try:
            first, _, rest = script.read_text().partition("\n")
        except UnicodeDecodeError:
            continue
        if first.startswith("#!") and str(venv) in first:
            out = dest / "bin" / script.name
            out.write_text(f"#!{dest / 'bin' / 'python'}\n{rest}")
            out.chmod(0o755)
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(dest.parent)], check=True)


def ssh_control_dir(cluster_name: str, local_user: str = "root") -> Path:
    """Where Ray's ssh keeps its ControlMaster sockets for this cluster."""
    u = hashlib.sha256(local_user.encode()).hexdigest()[:10]
    c = hashlib.sha256(cluster_name.encode()).hexdigest()[:10]
    return Path(f"/tmp/ray_ssh_{u}/{c}")


def ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


def cluster_docs(page: Path) -> str:
    """docs/aws.md: the commands users copy, tested word for word."""
    return page.read_text()

"""A compute node without internet, for the SLURM tests of a campus cluster.

The campus fixture's site set-up file (WSML_ENV_SETUP) puts this folder on
PYTHONPATH, so every Python process of the job, the srun steps and the Ray
workers they start, loads it: host names outside /etc/hosts do not resolve
(the node has no DNS) and no connection to a public address is made (no route
out). A network namespace per step would be the real thing; the sandbox the
tests run in refuses one to slurmd. Each refused attempt is appended to
$WSML_OFFLINE_LOG, so a test can tell that nothing tried.
"""
import ipaddress
import os
import socket


def _hosts() -> set[str]:
    names = {"localhost", socket.gethostname()}
    try:
        with open("/etc/hosts") as f:
            for line in f:
                names.update(line.split("#", 1)[0].split()[1:])
    except OSError:
        pass
    return names


_NAMES = _hosts()


def _refuse(what: str, exc: type[OSError], *args) -> None:
    log = os.environ.get("WSML_OFFLINE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {what}\n")
    raise exc(*args)


def _public(host) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_unspecified)


_getaddrinfo = socket.getaddrinfo
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def getaddrinfo(host, *args, **kw):
    name = host.decode() if isinstance(host, bytes) else host
    if name is not None and name not in _NAMES and not _is_ip(name):
        _refuse(f"resolve {name}", socket.gaierror, socket.EAI_NONAME, "Name or service not known (offline node)")
    return _getaddrinfo(host, *args, **kw)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def connect(self, address):
    if isinstance(address, tuple) and _public(address[0]):
        _refuse(f"connect {address[0]}", OSError, 101, "Network is unreachable (offline node)")
    return _connect(self, address)


def connect_ex(self, address):
    if isinstance(address, tuple) and _public(address[0]):
        _refuse(f"connect {address[0]}", OSError, 101, "Network is unreachable (offline node)")
    return _connect_ex(self, address)


socket.getaddrinfo = getaddrinfo
socket.socket.connect = connect
socket.socket.connect_ex = connect_ex

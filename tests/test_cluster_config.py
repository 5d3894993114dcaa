"""cluster.yaml and cluster.local.yaml, checked offline (no cloud account, no SSH).

First Ray's own validation, as `ray up` runs it before launching anything; then
what Ray lets through (typos inside `provider` and `node_config`, min > max
workers, ports open to the internet) and what this project wants of its
cluster (a head without trials, GPU workers that scale to zero, one install
for both files, the AMI and the paths set in one place). docs/aws.md is
checked against the real `ray` CLI and sweep.py's options.
"""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest

from tests import cluster_helpers as ch

REPO = ch.REPO
AWS = REPO / "cluster.yaml"
LOCAL = REPO / "cluster.local.yaml"
DOCS = REPO / "docs" / "aws.md"


@pytest.fixture(scope="module")
def aws() -> dict:
    return ch.load_yaml(AWS)


@pytest.fixture(scope="module")
def local() -> dict:
    return ch.load_yaml(LOCAL)


def check(cfg: dict) -> None:
    """Ray's validation, then ours; raises on the first failing one."""
    ch.ray_validate(cfg)
    problems = ch.config_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))


def _head_start(cfg: dict) -> str:
    [cmd] = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    return cmd


def _worker_types(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


# --- both files pass Ray's validation and ours -------------------------------

@pytest.mark.parametrize("path", [AWS, LOCAL], ids=["aws", "local"])
def test_ray_accepts_the_file(path):
    prepared = ch.ray_validate(ch.load_yaml(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=["aws", "local"])
def test_no_problems_ray_does_not_check(path):
    assert ch.config_problems(ch.load_yaml(path)) == []


# --- our checks catch what Ray does not ---------------------------------------

def _set(cfg, dotted, value):
    *parents, last = dotted.split(".")
    d = cfg
    for p in parents:
        d = d[p]
    d[last] = value


def _rename(cfg, dotted, new):
    *parents, last = dotted.split(".")
    d = cfg
    for p in parents:
        d = d[p]
    d[new] = d.pop(last)


# name: (mutation, who catches it, what the message names)
MUTATIONS = {
    "top-level max_worker": (lambda c: _rename(c, "max_workers", "max_worker"), "ray", "max_worker"),
    "node type max_worker": (lambda c: _rename(c, "available_node_types.gpu_1x.max_workers", "max_worker"),
                             "ray", "max_worker"),
    "priority not a number": (lambda c: _set(c, "available_node_types.gpu_1x.priority", "high"), "ray", "high"),
    "provider availablity_zone": (lambda c: _rename(c, "provider.availability_zone", "availablity_zone"),
                                  "ours", "provider.availablity_zone"),
    "provider regoin": (lambda c: _rename(c, "provider.region", "regoin"), "ours", "provider.regoin"),
    "node_config InstanceTyp": (lambda c: _rename(c, "available_node_types.gpu_1x.node_config.InstanceType",
                                                  "InstanceTyp"), "ours", "node_config.InstanceTyp"),
    "node_config ImageID": (lambda c: _rename(c, "available_node_types.gpu_4x.node_config.ImageId", "ImageID"),
                            "ours", "node_config.ImageID"),
    "min_workers > max_workers": (lambda c: _set(c, "available_node_types.gpu_4x.min_workers", 3),
                                  "ours", "min_workers 3 > max_workers 2"),
    "type max above cluster max": (lambda c: _set(c, "available_node_types.gpu_1x.max_workers", 99),
                                   "ours", "max_workers 99"),
    "dashboard open to all": (lambda c: c["provider"].update(security_group={"IpPermissions": [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}),
        "ours", "(8265, 8265)"),
    "mlflow open to all (ipv6)": (lambda c: c["provider"].update(security_group={"IpPermissions": [
        {"FromPort": 5000, "ToPort": 5000, "IpProtocol": "tcp", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}]}),
        "ours", "(5000, 5000)"),
    "a node type without SubnetIds": (lambda c: c["available_node_types"]["gpu_4x"]["node_config"].pop("SubnetIds"),
                                      "ours", "gpu_4x: node_config.SubnetIds"),
    "spot MarketType typo": (lambda c: c["available_node_types"]["gpu_1x_spot"]["node_config"][
        "InstanceMarketOptions"].update(MarketType="spto"), "ours", "MarketType 'spto'"),
    "SpotOptions typo": (lambda c: c["available_node_types"]["gpu_1x_spot"]["node_config"][
        "InstanceMarketOptions"]["SpotOptions"].update(InterruptionBehavior="stop"), "ours",
        "SpotOptions.InterruptionBehavior"),
    "dashboard bound to 0.0.0.0": (lambda c: c["head_start_ray_commands"].__setitem__(
        -1, _head_start(c).replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")),
        "ours", "dashboard"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_broken_copy_fails_the_check(aws, name):
    mutate, who, expected = MUTATIONS[name]
    broken = copy.deepcopy(aws)
    mutate(broken)
    if who == "ours":  # Ray lets it through: only our check stands in the way
        ch.ray_validate(broken)
    with pytest.raises(Exception, match=re.escape(expected)):
        check(broken)


@pytest.mark.parametrize("key", ["worker_ip", "head_ipp"])
def test_a_typo_in_the_local_provider_fails_the_check(local, key):
    import click

    broken = copy.deepcopy(local)
    broken["provider"][key] = broken["provider"].pop("worker_ips" if key == "worker_ip" else "head_ip")
    # Ray's own check refuses the local provider without both names, before ours would
    with pytest.raises(click.ClickException, match="supply a `head_ip` and list of `worker_ips`"):
        check(broken)
    assert f"unknown key provider.{key}" in ch.config_problems(broken)


def test_ssh_open_to_all_is_allowed(aws):
    ok = copy.deepcopy(aws)
    ok["provider"]["security_group"] = {"IpPermissions": [
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
    check(ok)


# --- what this project wants of its AWS cluster -------------------------------

def test_head_takes_no_trials(aws):
    head = aws["available_node_types"][aws["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU") == 0
    assert "--num-cpus=0" in _head_start(aws)
    assert "g" not in head["node_config"]["InstanceType"].split(".")[0], "the head is a CPU machine"


def test_gpu_workers_scale_to_zero(aws):
    workers = _worker_types(aws)
    assert workers
    gpus = sorted(w["resources"]["GPU"] for w in workers.values())
    assert gpus[0] == 1 and gpus[-1] >= 4, f"want a 1-GPU and a 4- or 8-GPU type, got GPUs {gpus}"
    for name, w in workers.items():
        assert w.get("min_workers", 0) == 0, f"{name} must scale to zero"
        assert w["max_workers"] >= 1
        assert w["resources"]["CPU"] >= 4 * w["resources"]["GPU"], f"{name}: too few CPUs to feed the GPUs"
    assert 0 < aws["idle_timeout_minutes"] <= 30
    assert aws["provider"]["cache_stopped_nodes"] is False


def test_one_ami_for_every_node(aws):
    amis = {nt["node_config"]["ImageId"] for nt in aws["available_node_types"].values()}
    assert len(amis) == 1 and next(iter(amis)).startswith("ami-")
    code = "\n".join(line.split("#", 1)[0] for line in AWS.read_text().splitlines())
    assert len(re.findall(r"\bami-[0-9a-f]+", code)) == 1, "set the AMI id in one place (a YAML anchor)"
    assert "aws ssm get-parameter" in AWS.read_text(), "say how to look the current AMI up"


def test_only_ssh_is_open(aws):
    rules = aws["provider"].get("security_group", {}).get("IpPermissions", [])
    assert all((r.get("FromPort"), r.get("ToPort")) == (22, 22) for r in rules)
    for path in (AWS, LOCAL):
        assert "0.0.0.0" not in path.read_text().replace("ListenAddress", "")


def test_start_commands(aws, local):
    for cfg in (aws, local):
        head = _head_start(cfg)
        flags = ch._ray_start_flags(head)
        assert flags.get("port") == "6379"
        assert flags.get("autoscaling-config") == "~/ray_bootstrap_config.yaml"
        assert flags.get("dashboard-host") == "127.0.0.1"
        assert cfg["head_start_ray_commands"][0] == "ray stop"
        [worker] = [c for c in cfg["worker_start_ray_commands"] if "ray start" in c]
        assert "--address=$RAY_HEAD_IP:6379" in worker
    assert "--num-cpus" not in _head_start(local), "in a lab the head trains too"


# --- the same install on every node of both files -----------------------------

VENV_STEP = 'cd ~/wsml && PYTHON=python3.11 bash scripts/cluster_venv.sh "$WSML_SHARED"'
GPU_CHECK = "cd ~/wsml && .venv/bin/python -m orchestration.gpu_check"


def _env_line(cfg: dict) -> str:
    return next(c for c in cfg["setup_commands"] if "export WSML_SHARED=" in c)


def test_both_files_install_the_same_way(aws, local):
    for key in ("file_mounts", "rsync_exclude", "rsync_filter"):
        assert aws[key] == local[key], key
    # the same commands, but for the paths (the node-local cache folder differs) and AWS's own steps
    assert all(cmd in aws["setup_commands"] for cmd in local["setup_commands"] if cmd != _env_line(local))
    for cfg in (aws, local):
        install = [c for c in cfg["setup_commands"] if "scripts/cluster_venv.sh" in c]
        assert len(install) == 1 and install[0].startswith(VENV_STEP), install
    assert aws["head_start_ray_commands"][1:] != [] and local["head_start_ray_commands"][1:] != []


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=["aws", "local"])
def test_nodes_run_the_python_the_tests_run_on(path):
    import sys

    cfg = ch.load_yaml(path)
    python = f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert python == "python3.11"
    [install] = [c for c in cfg["setup_commands"] if "scripts/cluster_venv.sh" in c]
    assert f"PYTHON={python} " in install
    if path == AWS:   # the AMI's Ubuntu has another Python: the set-up installs this one
        assert any("install -y -q" in c and f"{python} {python}-venv" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=["aws", "local"])
def test_gpu_nodes_check_driver_and_cuda_in_setup(path):
    cmds = ch.load_yaml(path)["setup_commands"]
    assert cmds[-1] == GPU_CHECK, "the GPU check runs last, once the venv (torch) is there"
    assert next(i for i, c in enumerate(cmds) if "cluster_venv.sh" in c) < len(cmds) - 1


def test_every_node_type_starts_in_the_edited_subnets(aws):
    subnets = [nt["node_config"]["SubnetIds"] for nt in aws["available_node_types"].values()]
    assert all(s == subnets[0] for s in subnets) and subnets[0]
    text = AWS.read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert code.count("SubnetIds: &subnets") == 1
    assert code.count("SubnetIds: *subnets") == len(subnets) - 1, "set the subnets in one place (a YAML anchor)"
    before = text[:text.index("SubnetIds: &subnets")].splitlines()[-8:]
    assert any(">>> EDIT" in line for line in before), "the subnets are marked >>> EDIT <<<"


def test_on_demand_gpus_first_then_spot(aws):
    workers = _worker_types(aws)
    spot = {n: w for n, w in workers.items() if "InstanceMarketOptions" in w["node_config"]}
    assert spot, "a spot GPU worker type"
    for name, w in spot.items():
        assert w["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        twin = [n for n, o in workers.items() if n not in spot and _trial_resources(o) == _trial_resources(w)
                and o["node_config"]["InstanceType"] == w["node_config"]["InstanceType"]]
        assert len(twin) == 1, f"{name}: want one on-demand type of the same instance type"
        on_demand = workers[twin[0]]
        assert on_demand["priority"] > w["priority"], "the autoscaler takes on-demand first, spot for the rest"
        assert w["max_workers"] > on_demand["max_workers"]
    starts = " ".join(aws["worker_start_ray_commands"])
    assert "orchestration.cluster.spot_watch --address=$RAY_HEAD_IP:6379" in starts and "flock -n" in starts


def _trial_resources(node_type: dict) -> dict:
    return {k: v for k, v in node_type["resources"].items() if k in ("CPU", "GPU")}


def test_every_gpu_type_can_be_asked_for_by_name(aws):
    """The sweep falls back from a type EC2 refuses to the next by asking for the next type's own resource."""
    from orchestration.cluster.connect import TYPE_RESOURCE, gpu_node_types

    types = gpu_node_types(aws)
    assert [t.name for t in types][-1] == "gpu_1x_spot" and all(t.marked for t in types)
    for name, w in _worker_types(aws).items():
        assert {k for k in w["resources"] if k not in ("CPU", "GPU")} == {TYPE_RESOURCE + name}


def test_workers_instance_profile_for_s3_is_one_uncomment_away(aws):
    """With --storage s3://, each worker needs an instance profile: the line is there in every worker type,
    commented out (EFS, the default, needs none), and the file with it still passes both checks."""
    line = "      # IamInstanceProfile: {Name: wsml-worker}\n"
    text = AWS.read_text()
    assert text.count(line) == len(_worker_types(aws))
    import yaml

    with_profile = yaml.safe_load(text.replace(line, line.replace("# ", "")))
    check(with_profile)
    assert all(w["node_config"]["IamInstanceProfile"] == {"Name": "wsml-worker"}
               for w in _worker_types(with_profile).values())
    assert "IamInstanceProfile" not in with_profile["available_node_types"]["head"]["node_config"]


def test_one_round_asks_for_every_node(aws):
    # Ray's autoscaler v2 launches per round at most upscaling_speed x the running nodes of a type (>= 1)
    assert aws["upscaling_speed"] >= max(w["max_workers"] for w in _worker_types(aws).values())


def test_raw_image_cache_on_the_nodes_own_disk(aws, local):
    for cfg in (aws, local):
        env = _env_line(cfg)
        local_cache = re.search(r"export WSML_CACHE=(\S+?)'", env).group(1)
        assert "WSML_SHARED" not in local_cache, "the raw cache is read every epoch: not on shared storage"
        assert "'export WSML_SHARED_CACHE=$WSML_SHARED/cache'" in env, "the compact cache: once, shared"
    cmds = aws["setup_commands"]
    prepare = next(i for i, c in enumerate(cmds) if "scripts/local_cache.sh" in c)
    assert cmds[prepare] == 'bash ~/wsml/scripts/local_cache.sh "$WSML_CACHE"'
    assert prepare < next(i for i, c in enumerate(cmds) if "cluster_venv.sh" in c)
    for name, w in _worker_types(aws).items():   # without instance store, the root volume holds it
        [ebs] = [d["Ebs"] for d in w["node_config"]["BlockDeviceMappings"] if d["DeviceName"] == "/dev/sda1"]
        assert ebs["VolumeType"] == "gp3" and ebs["VolumeSize"] >= 200 and ebs["Throughput"] > 125, name
        assert ebs["Iops"] >= 4 * ebs["Throughput"], f"{name}: gp3 wants Iops >= 4 x Throughput (MiB/s)"


@pytest.mark.parametrize("path", [AWS, LOCAL], ids=["aws", "local"])
def test_paths_are_set_in_one_place(path):
    cfg = ch.load_yaml(path)
    cmds = cfg["setup_commands"] + cfg.get("head_setup_commands", []) + cfg.get("worker_setup_commands", [])
    for var in ("WSML_SHARED", "WSML_DATA_ROOT", "WSML_STORAGE", "WSML_SHARED_CACHE", "WSML_CACHE"):
        setting = [c for c in cmds if f"export {var}=" in c]
        assert len(setting) == 1, f"{var} must be set by exactly one setup command"
    env_line = next(c for c in cmds if "export WSML_SHARED=" in c)
    assert "wsml/.venv/bin:$PATH" in env_line, "the venv's bin must be on PATH for Ray's login shell"
    assert env_line.count("/mnt/shared") == 1
    text = path.read_text()
    assert text.count("/mnt/shared") == 1, "the shared folder is named once; the rest uses $WSML_*"


def test_file_mounts_carry_the_source_and_nothing_big(aws):
    mounts = aws["file_mounts"]
    sources = {Path(src).as_posix().removeprefix("./") for src in mounts.values()}
    for remote, src in mounts.items():
        assert remote.startswith("~/wsml/"), remote
        assert remote.removeprefix("~/wsml/") == Path(src).as_posix().removeprefix("./")
        assert (REPO / src).exists(), f"{src} is not in the repo"
        assert Path(src).resolve() != Path(".").resolve() and src not in (".", "./")
    packages = {d.name for d in REPO.iterdir()
                if (d / "__init__.py").exists() and d.name != "tests"}
    needed = packages | {"search_spaces", "scripts", "requirements.txt", "pyproject.toml"}   # setup.sh reads both
    assert needed <= sources, f"not copied to the nodes: {sorted(needed - sources)}"
    assert ".venv" not in sources and "data" not in sources


# --- docs/aws.md only uses commands and options that exist ----------------

def _doc_commands() -> list[str]:
    return [ln.strip() for ln in ch.cluster_docs(DOCS).splitlines() if ln.strip().startswith("ray ")]


def test_docs_ray_commands_parse():
    from ray.scripts.scripts import cli

    cmds = _doc_commands()
    subs = {shlex.split(c)[1] for c in cmds}
    assert {"up", "exec", "attach", "dashboard", "rsync-down", "down"} <= subs
    for cmd in cmds:
        argv = shlex.split(cmd)
        assert argv[1] in cli.commands, cmd
        assert argv[2] == "cluster.yaml", cmd
        cli.commands[argv[1]].make_context(argv[1], argv[2:])  # raises on unknown options


def test_docs_remote_commands_use_real_options():
    sweep_src = (REPO / "orchestration" / "sweep.py").read_text()
    download_src = (REPO / "wsml" / "data" / "download.py").read_text()
    text = ch.cluster_docs(DOCS)
    remote = [shlex.split(c)[3] for c in _doc_commands() if shlex.split(c)[1] == "exec"]
    sweeps = [r for r in remote if "orchestration/sweep.py" in r]
    assert any("--dataset cub" in s for s in sweeps) and any("--dataset digits" in s for s in sweeps)
    for r in sweeps:   # --storage and --cache-dir default to what ~/.wsml_env sets on every node
        assert "--address auto" in r and "--storage" not in r and "--cache-dir" not in r, r
    opts = set(re.findall(r"(--[a-z][a-z-]+)", " ".join(sweeps)))
    prose = set(re.findall(r"`(--[a-z][a-z-]+)`", text))
    for opt in opts | (prose - {"--tmux", "--address", "--help"}):
        assert f'"{opt}"' in sweep_src, f"docs use {opt}, which orchestration/sweep.py does not have"
    downloads = [r for r in remote if "wsml.data.download" in r]
    assert downloads
    for opt in set(re.findall(r"(--[a-z][a-z-]+)", " ".join(downloads))):
        assert f'"{opt}"' in download_src, opt

#!/usr/bin/env python
"""Check an AWS account against cluster.yaml before `ray up`: what would keep GPU nodes from starting.

    python -m orchestration.aws_check [--config cluster.yaml]     # needs boto3 and AWS credentials

A new account usually may run no G-instance vCPUs at all (the quotas "Running On-Demand G and VT
instances", L-DB2E81BA, and "All G and VT Spot Instance Requests", L-3819A6DF, count vCPUs); Ray's
autoscaler then retries a refused launch without end and the sweep waits. This command asks, for the
region and zones of the cluster file:

* the two quotas, against the vCPUs the file's GPU node types may start at once (max_workers x the
  instance type's vCPUs, on-demand and spot apart), and what to request where they fall short;
* which zones offer each instance type the file names;
* the EFS file system the set-up mounts: a mount target in every zone, and its throughput mode
  (Bursting serves about 100 MiB/s on a small file system: every new node unpacks the venv from it).

Exit status 0 when nothing blocks, 1 when something does (each problem one line, with the fix), 2 for
bad input. It reads only (no resource is created). The tests answer its calls from recorded answers.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestration.common import ROOT

QUOTA_ON_DEMAND, QUOTA_SPOT = "L-DB2E81BA", "L-3819A6DF"        # EC2's G and VT vCPU quotas (Service Quotas)
GPU_FAMILIES = ("g", "vt")                                        # instance families those quotas cover


@dataclass
class NodeType:
    name: str
    instance_type: str
    spot: bool
    max_workers: int


@dataclass
class ClusterFile:
    region: str
    zones: list[str]
    node_types: list[NodeType]
    file_system: str | None

    @classmethod
    def read(cls, path: Path) -> ClusterFile:
        cfg = yaml.safe_load(path.read_text())
        provider = cfg["provider"]
        types = [NodeType(name, t["node_config"]["InstanceType"],
                          t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot",
                          int(t.get("max_workers", 0)))
                 for name, t in cfg["available_node_types"].items()]
        fs = re.search(r"\b(fs-[0-9a-f]+)\.efs\.", path.read_text())
        return cls(provider["region"], [z.strip() for z in str(provider.get("availability_zone", "")).split(",")
                                        if z.strip()], types, fs.group(1) if fs else None)


def _gpu_family(instance_type: str) -> bool:
    m = re.match(r"[a-z]+", instance_type)
    family = m.group(0) if m else ""
    return family.startswith(GPU_FAMILIES) and not family.startswith("gr")


def check(cluster: ClusterFile, client) -> list[str]:
    """The problems that would keep the cluster's GPU nodes from starting, each a line with its fix.
    `client(service)` gives a boto3 client (or a recorded stand-in) of the cluster's region."""
    problems: list[str] = []
    ec2 = client("ec2")
    names = sorted({t.instance_type for t in cluster.node_types})
    vcpus = {t["InstanceType"]: t["VCpuInfo"]["DefaultVCpus"]
             for t in ec2.describe_instance_types(InstanceTypes=names)["InstanceTypes"]}
    need = {False: 0, True: 0}
    for t in cluster.node_types:
        if _gpu_family(t.instance_type):
            need[t.spot] += t.max_workers * vcpus[t.instance_type]
    quotas = client("service-quotas")
    for spot, code, what in ((False, QUOTA_ON_DEMAND, "Running On-Demand G and VT instances"),
                             (True, QUOTA_SPOT, "All G and VT Spot Instance Requests")):
        if need[spot] == 0:
            continue
        have = int(quotas.get_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"])
        if have < need[spot]:
            problems.append(f"quota {what} ({code}) in {cluster.region} is {have} vCPUs; the GPU node types may use "
                            f"{need[spot]}: request {need[spot]} in the Service Quotas console (EC2, {code}), or "
                            "lower max_workers in the cluster file")
    offered: dict[str, set[str]] = {}
    answer = ec2.describe_instance_type_offerings(
        LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": names},
                                                   {"Name": "location", "Values": cluster.zones}])
    for o in answer["InstanceTypeOfferings"]:
        offered.setdefault(o["InstanceType"], set()).add(o["Location"])
    for name in names:
        missing = [z for z in cluster.zones if z not in offered.get(name, set())]
        if missing:
            problems.append(f"{name} is not offered in {', '.join(missing)}: list only zones that offer it in "
                            "provider.availability_zone, or choose another instance type")
    if cluster.file_system:
        efs = client("efs")
        [fs] = efs.describe_file_systems(FileSystemId=cluster.file_system)["FileSystems"]
        if fs.get("ThroughputMode") == "bursting":
            problems.append(f"EFS {cluster.file_system} is in Bursting throughput mode (about 100 MiB/s on a small "
                            "file system: new nodes unpack the venv from it for many minutes): switch it to "
                            "Elastic (aws efs update-file-system --file-system-id "
                            f"{cluster.file_system} --throughput-mode elastic)")
        targets = {t["AvailabilityZoneName"]
                   for t in efs.describe_mount_targets(FileSystemId=cluster.file_system)["MountTargets"]}
        missing = [z for z in cluster.zones if z not in targets]
        if missing:
            problems.append(f"EFS {cluster.file_system} has no mount target in {', '.join(missing)}: nodes there "
                            "cannot mount it; add one per zone (aws efs create-mount-target) or drop the zone")
    return problems


def main(argv: list[str] | None = None, client=None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestration.aws_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "cluster.yaml"), help="the cluster file (default cluster.yaml)")
    args = p.parse_args(argv)
    try:
        cluster = ClusterFile.read(Path(args.config))
    except (OSError, KeyError, TypeError, yaml.YAMLError) as err:
        print(f"error: cannot read {args.config} as a Ray cluster file ({err}): give the file `ray up` takes",
              file=sys.stderr)
        return 2
    if client is None:
        try:
            import boto3
        except ImportError:
            print("error: boto3 is not installed: pip install boto3 (as `ray up` needs it too)", file=sys.stderr)
            return 2
        client = lambda service: boto3.client(service, region_name=cluster.region)  # noqa: E731
    try:
        problems = check(cluster, client)
    except Exception as err:  # noqa: BLE001 - credentials, permissions, throttling: one line
        from orchestration.common import first_line

        print(f"error: AWS answered: {first_line(err)}: check your credentials (aws configure) and region",
              file=sys.stderr)
        return 2
    for line in problems:
        print(f"problem: {line}")
    print(f"{cluster.region} ({', '.join(cluster.zones)}): " + ("nothing keeps the GPU nodes from starting"
                                                                if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The project's venv on a cluster node, installed from the package index once per cluster.
#
#   bash scripts/cluster_venv.sh SHARED_DIR      # in the cluster files' set-up, on every node
#
# The first node (the head: `ray up` sets it up before any worker) builds .venv with
# scripts/setup.sh and publishes it as one archive in SHARED_DIR/venvs/; every later node, and
# every node the autoscaler adds, unpacks that archive instead of downloading and installing the
# 6.5 GB of requirements.txt again (docs/aws.md, "Node set-up without the package index": 39 s against 705 s here). The
# archive is named by requirements.txt + pyproject.toml, the Python version, the machine and the
# venv's path (a venv is tied to its path and interpreter: the cluster files give every node the
# same user, home and python3.11), so a changed requirements.txt makes a new one. An unpacked
# venv that does not import torch and ray is thrown away and built from the index instead.
# Idempotent: nothing happens while .venv matches requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:?usage: bash scripts/cluster_venv.sh SHARED_DIR}
PY=${PYTHON:-python3}
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if command -v zstd >/dev/null; then ext=tar.zst; pack=(-I 'zstd -T0 -3'); unpack=(-I zstd); else
  ext=tar.gz; pack=(-z); unpack=(-z); fi
tag=$("$PY" -c 'import platform, sys; print(f"py{sys.version_info[0]}.{sys.version_info[1]}-{platform.machine()}")')
where=$(printf '%s' "$PWD/.venv" | sha256sum | cut -c1-8)
archive="$shared/venvs/venv-$tag-${want:0:16}-$where.$ext"
mkdir -p "$shared/venvs"
t0=$SECONDS

current() { [ "$(cat .venv/.requirements.sha 2>/dev/null)" = "$want" ]; }
usable() { .venv/bin/python -c 'import ray, torch' >/dev/null 2>&1; }

if current; then
  echo "venv: current"
elif [ -f "$archive" ]; then
  rm -rf .venv.unpack && mkdir .venv.unpack
  if tar "${unpack[@]}" -xf "$archive" -C .venv.unpack && [ -e .venv.unpack/.venv ]; then
    rm -rf .venv && mv .venv.unpack/.venv .venv
  fi
  rm -rf .venv.unpack
  if current && usable; then
    echo "venv: unpacked $archive in $((SECONDS - t0)) s"
    exit 0
  fi
  echo "venv: $archive does not give a working venv here: building from the package index" >&2
  rm -rf .venv
fi
if ! current; then
  PYTHON=$PY bash scripts/setup.sh
  echo "venv: built from the package index in $((SECONDS - t0)) s"
fi
# Publish it for the other nodes, once: under a lock on the shared folder (NFS locks on EFS),
# written to a temporary name and renamed, so a node never unpacks a half-written archive.
(
  flock 9
  if [ ! -f "$archive" ]; then
    tmp="$archive.tmp.$(hostname).$$"
    if tar "${pack[@]}" -cf "$tmp" .venv && mv "$tmp" "$archive"; then
      echo "venv: published $archive in $((SECONDS - t0)) s"
    else
      rm -f "$tmp"
      echo "venv: could not publish $archive (the other nodes build their own)" >&2
    fi
  fi
) 9>"$shared/venvs/.lock"

#!/usr/bin/env bash
# Create .venv with the pinned packages and the project installed in it (editable, so that
# `python orchestration/sweep.py` and `python -m wsml.train` import this checkout).
# Idempotent: a second run installs nothing while requirements.txt, pyproject.toml and TORCH_CUDA are
# unchanged (`--check` says whether a run would install anything, and installs nothing).
#
#   PYTHON      the interpreter the venv is built from (default python3.11: pyproject.toml asks for 3.11 or
#               newer, and RHEL 8/9's python3 is 3.6 or 3.9). A module's or conda's Python works: load it
#               first, and in the SLURM job too (WSML_ENV_SETUP, docs/slurm.md).
#   TORCH_CUDA  the torch build, for the NVIDIA driver of the GPU nodes (nvidia-smi's "Driver Version"):
#                 unset   torch as requirements.txt finds it (PyPI's torch is built for CUDA 13)
#                 cu130   PyTorch's CUDA 13.0 build: driver >= 580
#                 cu128   PyTorch's CUDA 12.8 build: driver >= 525 (570 or newer for every feature)
#                 cu126   PyTorch's CUDA 12.6 build: driver >= 525 (560 or newer for every feature)
#                 cpu     no CUDA (CPU-only nodes)
#                 URL     another package index holding torch and torchvision at requirements.txt's versions
#               The minimum drivers: NVIDIA's CUDA minor-version compatibility table (12.x >= 525, 13.x >= 580,
#               https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html); "every
#               feature": the driver each toolkit ships with (12.6 GA 560.28.03, 12.8 GA 570.26, 13.0 GA
#               580.65.06; https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/). The choice is kept in
#               .venv/.torch-cuda, so later runs (and the SLURM job's check) keep it; `rm -rf .venv` goes back
#               to the default.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
stamp=.venv/.requirements.sha
cuda=${TORCH_CUDA:-$(cat .venv/.torch-cuda 2>/dev/null || true)}
case $cuda in
  "") index= ;;
  cpu|cu126|cu128|cu130) index=https://download.pytorch.org/whl/$cuda ;;
  http://*|https://*|file://*) index=$cuda ;;
  *) echo "error: TORCH_CUDA=$cuda: use cu130, cu128, cu126, cpu or a package index URL (see the top of scripts/setup.sh)" >&2
     exit 2 ;;
esac
want=$({ cat requirements.txt pyproject.toml; [ -z "$cuda" ] || echo "TORCH_CUDA=$cuda"; } | sha256sum | cut -d' ' -f1)
if [ "${1:-}" = "--check" ]; then   # exit 0 when this would install nothing, 1 when it would
  [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]
  exit
fi
if [ ! -x .venv/bin/python ]; then
  command -v "$PY" >/dev/null ||
    { echo "error: PYTHON=$PY not found: load a Python 3.11 (e.g. module load python/3.11) or set PYTHON=/path/to/python3.11" >&2; exit 2; }
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "error: $PY is $("$PY" -V 2>&1); the project needs Python 3.11 or newer: set PYTHON=/path/to/python3.11" >&2; exit 2; }
  "$PY" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if [ -n "$index" ]; then
    # requirements.txt's torch and torchvision, from the build's index first (the rest then finds them installed);
    # the named builds carry PyTorch's local version label (+cu126), so no other index's build is taken instead
    label=; [ "$index" = "$cuda" ] || label=+$cuda
    pins=$(grep -E '^(torch|torchvision)==' requirements.txt | sed "s/\$/$label/")
    # shellcheck disable=SC2086  # one argument per pin
    .venv/bin/python -m pip install -q --index-url "$index" $pins
  fi
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  if [ -n "$cuda" ]; then echo "$cuda" > .venv/.torch-cuda; fi
  echo "$want" > "$stamp"
fi

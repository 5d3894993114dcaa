#!/usr/bin/env bash
# Create .venv with the pinned packages and the project installed in it (editable, so that
# `python orchestration/sweep.py` and `python -m wsml.train` import this checkout).
# Idempotent: a second run installs nothing while requirements.txt and pyproject.toml are unchanged
# (`--check` says whether a run would install anything, and installs nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.requirements.sha
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "${1:-}" = "--check" ]; then   # exit 0 when this would install nothing, 1 when it would
  [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]
  exit
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi

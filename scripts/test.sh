#!/usr/bin/env bash
# Set up .venv on a fresh machine if needed, then run the tests on both cores (pytest-xdist).
#   bash scripts/test.sh           the whole suite (what .ci/run runs), the 25 slowest tests listed
#   bash scripts/test.sh --fast    the fast tier after every edit: unit tests and in-process checks, no service
# Further arguments go to pytest (e.g. -k NAME, or -n 0 for one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
if [ "${1:-}" = "--fast" ]; then
  shift
  exec .venv/bin/python -m pytest -m "not slow and not service" -n 2 "$@"
fi
# --dist loadfile: a module's tests stay on one worker, so its module-scoped fixtures run once
exec .venv/bin/python -m pytest -n 2 --dist loadfile --durations=25 "$@"

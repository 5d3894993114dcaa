#!/usr/bin/env bash
# Set up .venv on a fresh machine if needed, then run the demo sweep (search_spaces/digits-demo.yaml:
# AN beside LL-R, LL-Ct and LL-Cp on the built-in digits data, a few minutes on 2 cores; Ray in-process,
# MLflow in ./mlflow.db) and write the tables and figures to results/. Extra options go to the sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
exec .venv/bin/python orchestration/sweep.py --dataset digits --space search_spaces/digits-demo.yaml "$@"

#!/usr/bin/env bash
# Set up .venv on a fresh machine if needed, then run the local default sweep
# (built-in digits data, Ray in-process, MLflow in ./mlflow.db) and print the results table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
exec .venv/bin/python orchestration/sweep.py --dataset digits "$@"

#!/usr/bin/env bash
# The one GPU-machine check: the CUDA-graph equivalence test, the GPU benchmark, the loader benchmark.
# Usage there: bash bench/device_check.sh "$OUT"
set -uo pipefail
out=${1:-/tmp}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py 2>&1 | tail -15 | tee "$out/cuda_graph_test.txt"
python3 bench/gpu.py --seconds 8 --images 2048 2>&1 | tee "$out/gpu_bench.txt"
python3 bench/loader.py --workers 2 2>&1 | tail -8 | tee "$out/loader_bench.txt"

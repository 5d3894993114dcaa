#!/usr/bin/env bash
# The one GPU-machine check: the CUDA-graph equivalence test, the GPU benchmark, the loader benchmark,
# the compact image cache on the GPU (its decode test, then its epochs: CPU vs nvJPEG decode).
# Usage there: bash bench/device_check.sh "$OUT"
set -uo pipefail
out=${1:-/tmp}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
PYTHONPATH=. python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py 2>&1 | tail -15 | tee "$out/cuda_graph_test.txt"
PYTHONPATH=. python3 bench/gpu.py --seconds 8 --images 2048 2>&1 | tee "$out/gpu_bench.txt"
PYTHONPATH=. python3 bench/loader.py --workers 2 2>&1 | tail -14 | tee "$out/loader_bench.txt"
PYTHONPATH=. python3 -m pytest -q -p no:cacheprovider tests/test_compact.py -k gpu 2>&1 | tail -15 | tee "$out/compact_gpu_test.txt"
PYTHONPATH=. python3 bench/gpu.py --compact --seconds 8 --images 2048 --workers 2,4 2>&1 | tee "$out/compact_gpu_bench.txt"

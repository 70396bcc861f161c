#!/usr/bin/env bash
# One device call: the engine's GPU tests, then bench/engine.py. Results land in $OUT (or bench/results).
set -o pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)'
timeout 130 python3 -m pytest -m gpu -x -q -p no:cacheprovider -o addopts="" \
  tests/kernels/test_paged_attention.py tests/kernels/test_kv_store.py tests/engine/test_engine_gpu.py \
  2>&1 | tee "$OUT/engine_gpu_tests.log"
echo "pytest exit: $?"
timeout 300 python3 bench/engine.py --out "$OUT" "$@" 2>&1 | tee "$OUT/engine_bench.log"
echo "bench exit: $?"

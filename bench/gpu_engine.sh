#!/usr/bin/env bash
# One device call: the engine's GPU tests, then bench/engine.py (with the baseline checkout in .data/baseline
# when present). Results land in $OUT (or bench/results).
set -o pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
[ -d .data/shared ] && export LLMRAY_SHARED_DATA=$PWD/.data/shared
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-400} python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --durations=10 \
  tests/kernels/test_paged_attention.py tests/kernels/test_kv_store.py tests/kernels/test_sampling.py tests/kernels/test_gated_swiglu.py tests/engine/test_engine_gpu.py \
  tests/engine/test_fp8_kv.py tests/engine/test_engine_lora_gpu.py 2>&1 | tee "$OUT/engine_gpu_tests.log"
echo "pytest exit: $?"
BASE=""
[ -d .data/baseline/llmray ] && BASE="--baseline .data/baseline"
timeout ${BENCH_TIMEOUT:-300} python3 bench/engine.py --out "$OUT" $BASE "$@" 2>&1 | tee "$OUT/engine_bench.log"
echo "bench exit: $?"

#!/usr/bin/env bash
# One device call for multi-LoRA: GPU tests (kernels, engine with adapters, engine regressions), then
# bench/lora.py. Results land in $OUT (or bench/results).
set -o pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" \
  tests/kernels/test_lora_kernels.py tests/engine/test_engine_lora_gpu.py tests/engine/test_engine_gpu.py \
  2>&1 | tee "$OUT/lora_gpu_tests.log"
echo "pytest exit: $?"
timeout 300 python3 bench/lora.py --out "$OUT/lora.json" "$@" 2>&1 | tee "$OUT/lora_bench.log"
echo "bench exit: $?"

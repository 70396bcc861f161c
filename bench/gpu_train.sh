#!/usr/bin/env bash
# One GPU call for issue 18: LoRA (ours, peft) vs full fine-tuning, eager and CUDA-graphed; qwen3-0.6b MFU
# (torch.compile blocks vs our kernels + CUDA graphs) and shakespeare-char under Ray Train; GPU tests.
#   mkdir -p /tmp/site && tar -xJf .gpu/bundle.tar.xz -C /tmp/site && export PYTHONPATH=$PWD:/tmp/site:$PYTHONPATH
#   OUT=/tmp/out bash bench/gpu_train.sh        (carry .gpu and .data)
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_train}; mkdir -p "$OUT/train"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/steps.log"; }
stamp start
timeout 60 python bench/finetune.py gpu --steps 5 --out "$OUT/finetune.json" \
  --runs full+graphs,ours/attn/r8+graphs,ours/all-linear/r16+graphs,qlora/ours/all-linear/r16,full,ours/attn/r8,ours/all-linear/r16,peft/attn/r8,peft/all-linear/r16,peft/attn/r8+graphs,peft/all-linear/r16+graphs \
  > "$OUT/finetune.log" 2>&1
stamp "finetune rc $?"
W=$(mktemp -d)  # Ray's run state stays out of $OUT (only the JSON comes back)
timeout 150 python bench/train.py --parts ce --c-variants torch:blocks,triton:graphs,triton:none --out "$W" \
  > "$OUT/train/train.log" 2>&1
stamp "train rc $?"
cp "$W"/*.json "$OUT/train/"; cp "$W/e_ray/metrics.jsonl" "$OUT/train/e_metrics.jsonl"; rm -rf "$W"
timeout 60 python -m pytest -q -x -p no:cacheprovider -m gpu tests/train/test_graphs.py tests/kernels/test_rmsnorm.py \
  tests/kernels/test_cross_entropy.py tests/model/test_model_kernels.py > "$OUT/gpu_tests.log" 2>&1
stamp "gpu tests rc $?"

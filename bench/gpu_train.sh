#!/usr/bin/env bash
# One GPU call for issue 18: kernel GPU tests, RMSNorm rows vs torch.compile, qwen3-0.6b MFU and
# shakespeare-char under Ray Train, LoRA (ours vs peft) vs full fine-tuning. Everything lands in $OUT.
#   mkdir -p /tmp/site && tar -xJf .gpu/bundle.tar.xz -C /tmp/site && export PYTHONPATH=$PWD:/tmp/site:$PYTHONPATH
#   bash bench/gpu_train.sh        (carry .gpu and .data)
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/steps.log"; }
stamp start
timeout 50 python -m pytest -q -x -p no:cacheprovider -m gpu tests/kernels/test_rmsnorm.py \
  tests/kernels/test_cross_entropy.py tests/model/test_model_kernels.py > "$OUT/gpu_tests.log" 2>&1
stamp "gpu tests rc $?"
timeout 30 python bench/kernels.py --only rms_norm,rms_norm_4096 --no-sweep --out "$OUT/kernels_rms.json" \
  > "$OUT/kernels.log" 2>&1
stamp "kernels rc $?"
timeout 135 python bench/train.py --parts ec --out "$OUT" > "$OUT/train.log" 2>&1
stamp "train rc $?"
timeout 55 python bench/finetune.py gpu --steps 4 --out "$OUT/finetune.json" > "$OUT/finetune.log" 2>&1
stamp "finetune rc $?"
rm -rf "$OUT/e_ray" "$OUT/ray_c"

#!/usr/bin/env bash
# Every GPU check of one device session, within 8 minutes, results in $OUT as they finish:
#   OUT=/tmp/out bash bench/gpu_all.sh          (carry .wheels: liger, pytest, omegaconf)
# 1. the GPU unit tests (varlen attention, fused kernels, LoRA kernel, GPU monitor)
# 2. the real entry point on CUDA: bf16, packing, LoRA, a few dozen steps
# 3. bench/sft_gpu.py   issue 7: sftkit vs HF vs HF+Liger, 1B full FT, both precision modes
# 4. bench/lora.py      issue 5: 8B LoRA sftkit vs PEFT (+Liger); 1B LoRA vs full
# 5. bench/gpu_fsdp.py  issue 6: 1B FSDP2 on one GPU, activation checkpointing on/off
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $(( 470 - ($(date +%s) - START) )); }

# Offline installs of what the GPU image lacks (pure-Python wheels carried in .wheels/).
pip install --no-index --find-links .wheels --quiet pytest omegaconf liger-kernel \
  > "$OUT/pip.log" 2>&1 || echo "pip install failed (see pip.log)" >> "$OUT/pip.log"
export PYTHONPATH=.
{
  nvidia-smi --query-gpu=name,memory.total,power.limit,driver_version --format=csv
  python -c "import torch, transformers, triton; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'triton', triton.__version__)"
  python -c "import liger_kernel, peft; print('liger ok, peft', peft.__version__)"
} > "$OUT/env.txt" 2>&1

timeout 70 python -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/unit/model/test_attention.py tests/unit/model/test_fused.py \
  tests/unit/model/test_lora_triton.py tests/unit/log/test_log_gpu.py \
  > "$OUT/gpu_tests.log" 2>&1
echo "exit $?" >> "$OUT/gpu_tests.log"

E2E="sft.max_num_steps=60 sft.val_period=30 checkpointing.save_period=30 \
policy.precision=bfloat16 policy.train_global_batch_size=256 policy.train_micro_batch_size=64"
( timeout 60 python examples/run_sft.py $E2E checkpointing.checkpoint_dir=$OUT/e2e/full \
    logger.log_dir=$OUT/e2e/logs_full policy.sequence_packing.enabled=true \
    policy.sequence_packing.train_mb_tokens=2048 \
  && timeout 40 python examples/run_sft.py $E2E checkpointing.checkpoint_dir=$OUT/e2e/lora \
    logger.log_dir=$OUT/e2e/logs_lora policy.dtensor_cfg.lora_cfg.enabled=true
) > "$OUT/e2e.log" 2>&1
echo "exit $?" >> "$OUT/e2e.log"
rm -rf "$OUT"/e2e/full/step_* "$OUT"/e2e/lora/step_* "$OUT"/e2e/*/final_*

timeout 190 python bench/sft_gpu.py --budget 180 --out "$OUT/sft_gpu.jsonl" \
  > "$OUT/sft_gpu.log" 2>&1
echo "exit $?" >> "$OUT/sft_gpu.log"

B=$(( $(left) - 60 )); [ "$B" -gt 30 ] || B=30
timeout $(( B + 10 )) python bench/lora.py --gpu --budget "$B" --out "$OUT/lora_bench.jsonl" \
  > "$OUT/lora_bench.log" 2>&1
echo "exit $?" >> "$OUT/lora_bench.log"

B=$(left); [ "$B" -gt 20 ] || B=20
if [ -f bench/gpu_fsdp.py ]; then
  timeout "$B" python bench/gpu_fsdp.py --out "$OUT/fsdp.jsonl" > "$OUT/fsdp.log" 2>&1
  echo "exit $?" >> "$OUT/fsdp.log"
fi
echo "total $(( $(date +%s) - START ))s" >> "$OUT/env.txt"

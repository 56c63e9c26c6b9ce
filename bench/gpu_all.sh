#!/usr/bin/env bash
# Every GPU check of one device session, within 8 minutes, results in $OUT as they finish:
#   OUT=/tmp/out bash bench/gpu_all.sh          (carry .wheels/, filled beforehand with
#   pip download --no-deps -d .wheels liger-kernel pytest pluggy iniconfig pygments tomli \
#       exceptiongroup omegaconf==2.3.0 antlr4-python3-runtime==4.9.3)
# Only a few files come back from a device run: keep run directories outside $OUT.
# 1. the GPU tests (tests/gpu: varlen attention, fused loss, device-side step, GPU monitor)
#    and the kernel unit tests
# 2. the real entry point on CUDA: bf16, packing, LoRA, a few dozen steps
# 3. bench/sft_gpu.py   issue 7: sftkit vs HF vs HF+Liger, 1B full FT, both precision modes
# 4. bench/lora.py      issue 5: 8B LoRA sftkit vs PEFT (+Liger); 1B LoRA vs full
# 5. bench/gpu_fsdp.py  issue 6: 1B FSDP2 on one GPU, activation checkpointing on/off
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $(( ${BUDGET:-470} - ($(date +%s) - START) )); }

# What the GPU image lacks, unpacked from .wheels/ (pure Python; antlr4 ships only as an
# sdist, which pip cannot build offline, so it is unpacked too).
DEPS=/tmp/sftkit_pydeps
mkdir -p "$DEPS"
for w in .wheels/*.whl; do python -m zipfile -e "$w" "$DEPS"; done
tar -xzf .wheels/antlr4-python3-runtime-*.tar.gz -C /tmp && cp -r /tmp/antlr4-python3-runtime-*/src/antlr4 "$DEPS"/
export PYTHONPATH=.:$DEPS
STEPS=${STEPS:-tests,e2e,sft,lora,fsdp}
on() { [[ ",$STEPS," == *",$1,"* ]]; }
{
  nvidia-smi --query-gpu=name,memory.total,power.limit,driver_version --format=csv
  python -c "import torch, transformers, triton; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'triton', triton.__version__)"
  python -c "import liger_kernel, peft; print('liger ok, peft', peft.__version__)"
} > "$OUT/env.txt" 2>&1

# tests/gpu holds every CUDA test (`gpu` marker); the unit files beside it run their CPU
# fallback checks and Triton kernels (interpreted) on the device image's versions.
on tests && timeout 100 python -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/gpu tests/unit/model/test_attention.py tests/unit/model/test_fused.py \
  tests/unit/model/test_lora_triton.py tests/unit/log/test_log_gpu.py \
  tests/unit/train/test_loss.py tests/unit/train/test_step.py \
  > "$OUT/gpu_tests.log" 2>&1
on tests && echo "exit $?" >> "$OUT/gpu_tests.log"

E2E="--config examples/configs/quickstart.yaml sft.max_num_steps=60 sft.val_period=30 checkpointing.save_period=30 \
policy.precision=bfloat16 policy.train_global_batch_size=256 policy.train_micro_batch_size=64"
if on e2e; then  # run dirs live in /tmp: only the metrics come back (few files)
  ( timeout 45 python examples/run_sft.py $E2E checkpointing.checkpoint_dir=/tmp/e2e/full \
      logger.log_dir=/tmp/e2e/logs_full policy.sequence_packing.enabled=true \
      policy.sequence_packing.train_mb_tokens=2048 \
    && timeout 60 python examples/run_sft.py $E2E checkpointing.checkpoint_dir=/tmp/e2e/lora \
      logger.log_dir=/tmp/e2e/logs_lora policy.dtensor_cfg.lora_cfg.enabled=true
  ) > "$OUT/e2e.log" 2>&1
  echo "exit $?" >> "$OUT/e2e.log"
  cp /tmp/e2e/logs_full/exp_001/metrics.jsonl "$OUT/e2e_full_metrics.jsonl" 2>/dev/null
  cp /tmp/e2e/logs_lora/exp_001/metrics.jsonl "$OUT/e2e_lora_metrics.jsonl" 2>/dev/null
fi

# SFT_ARGS e.g. "--cases liger,sftkit,sftkit_torch_ce --profile /tmp/prof": the profiler
# tables are concatenated into one file (few files come back from a device run).
SFT_BUDGET=${SFT_BUDGET:-175}
on sft && timeout $(( SFT_BUDGET + 15 )) python bench/sft_gpu.py --budget "$SFT_BUDGET" \
  ${SFT_ARGS:-} --out "$OUT/sft_gpu.jsonl" > "$OUT/sft_gpu.log" 2>&1
on sft && echo "exit $?" >> "$OUT/sft_gpu.log"
on sft && for f in /tmp/prof/*.txt; do [ -f "$f" ] && { echo "=== $f"; cat "$f"; }; done \
  > "$OUT/profiles.txt" 2>/dev/null

if on lora; then
  B=$(( $(left) - 100 )); [ "$B" -gt 30 ] || B=30
  timeout $(( B + 10 )) python bench/lora.py --gpu --budget "$B" ${LORA_ARGS:-} \
    --out "$OUT/lora_bench.jsonl" > "$OUT/lora_bench.log" 2>&1
  echo "exit $?" >> "$OUT/lora_bench.log"
fi

B=$(left); [ "$B" -gt 20 ] || B=20
if on fsdp; then
  OUT="$OUT" timeout "$B" python bench/gpu_fsdp.py --timeout $(( B / 2 - 5 )) > "$OUT/fsdp.log" 2>&1
  echo "exit $?" >> "$OUT/fsdp.log"
fi
echo "total $(( $(date +%s) - START ))s" >> "$OUT/env.txt"

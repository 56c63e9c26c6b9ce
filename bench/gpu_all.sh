#!/usr/bin/env bash
# Every GPU check of one device session, within 8 minutes, results in $OUT as they finish:
#   OUT=/tmp/out bash bench/gpu_all.sh          (carry .wheels/, filled beforehand with
#   pip download --no-deps -d .wheels liger-kernel torchao pytest pluggy iniconfig pygments \
#       tomli exceptiongroup omegaconf==2.3.0 antlr4-python3-runtime==4.9.3)
# Only a few files come back from a device run: keep run directories outside $OUT.
# Steps, most important first (issue 16), each skipped when the time left cannot hold it;
# every bench case runs in its own process with a timeout and appends one JSON line as it ends:
# 1. sft     bench/sft_gpu.py: 1B, chat documents, 2 rows/step: sftkit vs HF+Liger (bf16)
# 2. recipe  the same at a recipe's batch: 32 rows/step by accumulation, largest micro-batch
# 3. fp8     8B shape: sftkit bf16 vs sftkit FP8 (torchao tensorwise + compile)
# 4. full8b  8B full fine-tune: HF+Liger (bf16) vs sftkit bf16 + stochastic rounding
# 4b. fp8conv bench/precision.py: an ~85M random-init Llama learning the addition data, 200
#            steps, float32 masters vs FP8 (target: last-window loss within 2%)
# 4c. maxctx bench/max_context.py: longest trainable sequence, 8B LoRA and 1B full, sftkit
#            vs HF+PEFT+Liger (fit of peak memory at 3 lengths, one verifying step each)
# 4d. qlora bench/qlora.py --gpu: Llama-3.1-8B shape (random bf16 weights written once),
#            seq 4096, LoRA r16 on all linears, capped at 24 GB: sftkit QLoRA (NF4) vs PEFT +
#            bitsandbytes (skipped with a note unless a bitsandbytes wheel is in .wheels/),
#            each in its own process; sftkit's memory estimate vs max_memory_allocated
# 5. tests   tests/gpu (every CUDA test, `gpu` marker) and the kernel unit files beside it
#            (varlen attention, fused kernels and loss, LoRA kernel, FP8, bf16 optimizer)
# 6. e2e     the real entry point on CUDA: bf16 + packing, LoRA, FP8, a few dozen steps
# 6b. moe   bench/moe.py (issue 24): Qwen3-30B-A3B and gpt-oss-20b shapes cut to 4 layers,
#           packed 4,096-token rows, full and LoRA (attention + experts): sftkit vs transformers'
#           grouped_mm and eager experts, PEFT for LoRA; MOE_BUDGET (default 300 s; cases run
#           most important first, eager last; not yet timed on a GPU), MOE_ARGS e.g. "--models ..."
# 7. lora, fsdp   earlier issues' benches (bench/lora.py, bench/gpu_fsdp.py) if time is left
# STEPS=sft,fp8 picks steps; SFT_ARGS / RECIPE_ARGS / FP8_ARGS / FULL8B_ARGS replace a step's
# case list (e.g. SFT_ARGS="--cases liger,sftkit,hf --modes bf16,fp32_master").
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $(( ${BUDGET:-470} - ($(date +%s) - START) )); }

# What the GPU image lacks, unpacked from .wheels/ (pure Python; antlr4 ships only as an
# sdist, which pip cannot build offline, so it is unpacked too; torchao's float8 training is
# Python + Triton, its optional C++ extension is not needed).
DEPS=/tmp/sftkit_pydeps
mkdir -p "$DEPS"
for w in .wheels/*.whl; do python -m zipfile -e "$w" "$DEPS"; done
tar -xzf .wheels/antlr4-python3-runtime-*.tar.gz -C /tmp && cp -r /tmp/antlr4-python3-runtime-*/src/antlr4 "$DEPS"/
export PYTHONPATH=.:$DEPS
STEPS=${STEPS:-sft,recipe,fp8,full8b,fp8conv,maxctx,qlora,tests,e2e,moe,lora,fsdp,heavy}
on() { [[ ",$STEPS," == *",$1,"* ]]; }
{
  nvidia-smi --query-gpu=name,memory.total,power.limit,driver_version --format=csv
  python -c "import torch, transformers, triton; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'triton', triton.__version__)"
  python -c "import liger_kernel, peft; print('liger ok, peft', peft.__version__)"
  python -c "import torchao; print('torchao', torchao.__version__)"
} > "$OUT/env.txt" 2>&1

# bench NAME SECONDS ARGS...: bench/sft_gpu.py with at most SECONDS (less if less is left),
# skipped below 40 s; its cases append to $OUT/NAME.jsonl as each finishes.
bench() {
  local name=$1 want=$2; shift 2
  local b; b=$(left); [ "$b" -gt "$want" ] && b=$want
  if [ "$b" -lt 40 ]; then echo "skipped: $b s left" > "$OUT/$name.log"; return; fi
  timeout $(( b + 10 )) python bench/sft_gpu.py --budget "$(( b - 10 ))" "$@" \
    --out "$OUT/$name.jsonl" > "$OUT/$name.log" 2>&1
  echo "exit $? after $(( $(date +%s) - START ))s" >> "$OUT/$name.log"
}
# SFT_ARGS e.g. "--cases liger,sftkit,sftkit_torch_ce --profile /tmp/prof": the profiler
# tables are concatenated into one file (few files come back from a device run).
on sft && bench sft_gpu "${SFT_BUDGET:-70}" ${SFT_ARGS:---cases liger,sftkit --modes bf16}
on sft && for f in /tmp/prof/*.txt; do [ -f "$f" ] && { echo "=== $f"; cat "$f"; }; done \
  > "$OUT/profiles.txt" 2>/dev/null
on recipe && bench sft_recipe "${RECIPE_BUDGET:-90}" --setting recipe \
  ${RECIPE_ARGS:---cases liger,sftkit --modes bf16}
on fp8 && bench sft_fp8 "${FP8_BUDGET:-140}" --model 8b \
  ${FP8_ARGS:---cases sftkit,sftkit_fp8 --modes bf16}
on full8b && bench sft_8b "${FULL8B_BUDGET:-80}" --model 8b \
  ${FULL8B_ARGS:---cases liger,sftkit_sr --modes bf16}
if on fp8conv && [ "$(left)" -gt 60 ]; then
  B=$(left); [ "$B" -gt 90 ] && B=90
  timeout "$B" python bench/precision.py --device cuda --size 100m --modes fp32_master,fp8 \
    --lr 3e-4 --steps 200 --windows 4 --out "$OUT/precision.jsonl" > "$OUT/precision.log" 2>&1
  echo "exit $?" >> "$OUT/precision.log"
fi

# MAXCTX_ARGS replaces the cap on the verified length (one step's time grows as length^2).
if on maxctx && [ "$(left)" -gt 90 ]; then
  B=$(left); [ "$B" -gt "${MAXCTX_BUDGET:-180}" ] && B=${MAXCTX_BUDGET:-180}
  timeout $(( B + 10 )) python bench/max_context.py --budget "$(( B - 10 ))" \
    ${MAXCTX_ARGS:---max-len 65536} --out "$OUT/max_context.jsonl" > "$OUT/max_context.log" 2>&1
  echo "exit $?" >> "$OUT/max_context.log"
fi

if on qlora && [ "$(left)" -gt 120 ]; then
  B=$(left); [ "$B" -gt "${QLORA_BUDGET:-150}" ] && B=${QLORA_BUDGET:-150}
  timeout "$B" python bench/qlora.py --gpu --seq 4096 --steps 3 ${QLORA_ARGS:-} \
    --out "$OUT/qlora.jsonl" > "$OUT/qlora.log" 2>&1
  echo "exit $?" >> "$OUT/qlora.log"
fi

B=$(left)
if on tests && [ "$B" -gt 40 ]; then
  timeout $(( B < 100 ? B - 10 : 90 )) python -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/gpu tests/unit/model/test_model_attention.py tests/unit/model/test_model_fused.py \
    tests/unit/model/test_model_lora_triton.py tests/unit/log/test_log_gpu.py \
    tests/unit/train/test_train_loss.py tests/unit/train/test_train_step.py \
    tests/unit/model/test_model_fp8.py tests/unit/train/test_train_bf16_optim.py \
    > "$OUT/gpu_tests.log" 2>&1
  echo "exit $?" >> "$OUT/gpu_tests.log"
fi

E2E="--config examples/configs/quickstart.yaml sft.max_num_steps=60 sft.val_period=30 checkpointing.save_period=30 \
policy.precision=bfloat16 policy.train_global_batch_size=256 policy.train_micro_batch_size=64"
if on e2e && [ "$(left)" -gt 60 ]; then  # run dirs in /tmp: only the metrics come back
  ( timeout 45 python examples/run_sft.py $E2E checkpointing.checkpoint_dir=/tmp/e2e/full \
      logger.log_dir=/tmp/e2e/logs_full policy.sequence_packing.enabled=true \
      policy.sequence_packing.train_mb_tokens=2048 \
    && timeout 40 python examples/run_sft.py $E2E checkpointing.checkpoint_dir=/tmp/e2e/fp8 \
      logger.log_dir=/tmp/e2e/logs_fp8 policy.dtensor_cfg.fp8_cfg.enabled=true \
    && timeout 60 python examples/run_sft.py $E2E checkpointing.checkpoint_dir=/tmp/e2e/lora \
      logger.log_dir=/tmp/e2e/logs_lora policy.dtensor_cfg.lora_cfg.enabled=true
  ) > "$OUT/e2e.log" 2>&1
  echo "exit $?" >> "$OUT/e2e.log"
  for run in full fp8 lora; do
    cp "/tmp/e2e/logs_$run/exp_001/metrics.jsonl" "$OUT/e2e_${run}_metrics.jsonl" 2>/dev/null
  done
fi

if on moe && [ "$(left)" -gt 90 ]; then
  B=$(left); [ "$B" -gt "${MOE_BUDGET:-300}" ] && B=${MOE_BUDGET:-300}
  timeout $(( B + 10 )) python bench/moe.py --gpu --budget "$(( B - 10 ))" ${MOE_ARGS:-} \
    --out "$OUT/moe.jsonl" > "$OUT/moe.log" 2>&1
  echo "exit $?" >> "$OUT/moe.log"
fi

if on lora && [ "$(left)" -gt 130 ]; then
  B=$(( $(left) - 100 ))
  timeout $(( B + 10 )) python bench/lora.py --gpu --budget "$B" ${LORA_ARGS:-} \
    --out "$OUT/lora_bench.jsonl" > "$OUT/lora_bench.log" 2>&1
  echo "exit $?" >> "$OUT/lora_bench.log"
fi

B=$(left)
if on fsdp && [ "$B" -gt 20 ]; then
  OUT="$OUT" timeout "$B" python bench/gpu_fsdp.py --timeout $(( B / 2 - 5 )) > "$OUT/fsdp.log" 2>&1
  echo "exit $?" >> "$OUT/fsdp.log"
fi
# The heavy CPU tests (3+ gloo ranks each, minutes on a 2-core CI machine, left out of
# `uv run --group dev pytest`) run here on the device machine's 16 cores when time is left.
B=$(left)
if on heavy && [ "$B" -gt 60 ]; then
  timeout $(( B - 10 )) python -m pytest -q -p no:cacheprovider -o addopts="" -m heavy tests \
    > "$OUT/heavy_tests.log" 2>&1
  echo "exit $?" >> "$OUT/heavy_tests.log"
fi
echo "total $(( $(date +%s) - START ))s" >> "$OUT/env.txt"

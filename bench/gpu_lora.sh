#!/usr/bin/env bash
# LoRA benchmark on one GPU, all cases within 8 minutes; results land in $OUT as they finish.
#   PYTHONPATH=. OUT=/tmp/out bash bench/gpu_lora.sh
# 1. Triton kernel check (fused LoRA vs the PyTorch path, bf16, 8B shapes); when it fails the
#    sftkit cases run without Triton and say so (triton_ok=false in their records).
# 2. Llama-3.1-8B shape, LoRA r16 all linear, seq 4096, micro-batch 1/2/4 until OOM:
#    sftkit, PEFT, (PEFT+Liger when liger_kernel imports), sftkit without Triton.
# 3. Llama-3.2-1B shape: sftkit LoRA vs sftkit full fine-tuning, and PEFT.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
# 440 s for the cases, inside a hard 470 s stop: the whole script ends before 8 minutes.
timeout 470 python bench/lora.py --gpu --budget 440 --out "$OUT/lora_bench.jsonl" \
  > "$OUT/lora_bench.log" 2>&1
echo "bench exit: $?" >> "$OUT/lora_bench.log"
python bench/lora.py --summarize "$OUT/lora_bench.jsonl" | tee "$OUT/lora_summary.md"

"""Longest trainable sequence on one GPU (issue 13, item 4): sftkit vs HF + PEFT + Liger.

Two models, random init of real shapes (bench/random_model.py), bf16 parameters, one row of
one fully trained document per step:

* `8b_lora`: Llama-3.1-8B shape, LoRA r16 alpha 32 on every linear layer (not the head);
* `1b_full`: Llama-3.2-1B shape, full fine-tuning, AdamW.

Sides, each case in its own subprocess (an OOM or a hang cannot spoil the next one):

* `sftkit`: sftkit's LoRA (`apply_lora`), fused kernels on CUDA, packed attention, full
  activation checkpointing per decoder layer with activation offload (the checkpointed layer
  inputs in pinned host memory: `apply_activation_checkpointing(model, "full", True)`;
  `--sftkit-ac selective` and `--no-offload` change it, the records say which), the
  chunked head + loss that never materialises the logits, sftkit's own `train_step`;
* `hf`: `apply_liger_kernel_to_llama()` (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU),
  then PEFT's `get_peft_model` (LoRA case), `gradient_checkpointing_enable` (non-reentrant),
  `model(input_ids, labels=...).loss`, AdamW. Missing liger-kernel (GPU) or peft: the case is
  a line with `skipped` and the reason. On CPU (`--tiny`) Liger cannot run: HF runs without
  it and the record says so.

Per case: one training step (forward, backward, clip, AdamW) at each of three lengths, its
peak memory; a least-squares line memory = a + b x length; the predicted longest length
under the budget (GPU: total memory minus `--margin-gib`), rounded down to a multiple of
256 and capped at `--max-len`; then one step at that length to verify it (on OOM, 10% less,
up to 6 tries); the verifying step's tokens/s is reported (one step, after the three
shorter ones warmed the kernels). Memory on GPU is `torch.cuda.max_memory_allocated` over
the step; on CPU (`--tiny`) it is a proxy, the bytes saved for backward that stay on the
device (an outer `saved_tensors_hooks` counts them; offloaded and recomputed tensors are
not counted), against `--budget-mib`; records name the measure in `memory`. One JSON line
per case is appended to `$OUT/max_context.jsonl` as it finishes, then a summary with
sftkit's longest length over HF's per model (target >= 2x).

The verification time grows with the square of the length (attention): `--max-len`
(default 131072, the models' context) keeps one step within the budget; `predicted_len`
is the uncapped fit, `capped` says when the cap decided.

    PYTHONPATH=. OUT=/tmp/out python bench/max_context.py          # GPU, < 8 minutes
    uv run --group dev python bench/max_context.py --tiny --out /tmp/max_context.jsonl   # CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or by path
from sft_gpu import LLAMA_1B, LLAMA_8B, TINY_MODEL, _child_env, _error_line, liger_dir  # noqa: E402

from random_model import random_llama  # noqa: E402
from results import emit  # noqa: E402

MODELS = {"8b_lora": (LLAMA_8B, True), "1b_full": (LLAMA_1B, False)}
SIDES = ("sftkit", "hf")
GPU_LENGTHS = (4096, 8192, 16384)
TINY_LENGTHS = (64, 128, 256)
LORA = dict(r=16, alpha=32.0)
MIN_CASE_S = 60.0  # a case that cannot get this much is skipped
TRIES = 6  # verification steps at most: the prediction, then 10% less each time


# ----------------------------------------------------------------------------- fit and predict


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (a, b) of memory = a + b * length over (length, memory) points."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        raise ValueError("fit_line needs at least two different lengths")
    b = sum((x - mean_x) * (y - mean_y) for x, y in points) / var
    return mean_y - b * mean_x, b


def predict_length(a: float, b: float, budget: float, multiple: int, cap: int) -> int:
    """The longest multiple of `multiple` whose predicted memory a + b * length fits
    `budget`, at most `cap` (also when memory does not grow with length); 0: none fits."""
    if b <= 0:
        return cap if a <= budget else 0
    longest = math.floor((budget - a) / b + 1e-6)  # an exact fit must not lose a multiple
    return max(0, min(cap, longest - longest % multiple))


def back_off(length: int, multiple: int) -> int:
    """10% shorter, rounded down to a multiple of `multiple`."""
    shorter = int(length * 0.9)
    return shorter - shorter % multiple


# ----------------------------------------------------------------------------- one case


def build_case(
    model_name: str, side: str, tiny: bool, ac: str = "full", offload: bool = True
) -> tuple[Any, Any]:
    """(model, step(length) -> loss) for one side; the step is one full optimizer step.
    `ac` and `offload`: sftkit's activation checkpointing mode and activation offload."""
    import torch
    from transformers import LlamaConfig

    shape, lora = MODELS[model_name]
    shape = TINY_MODEL if tiny else shape
    cuda = not tiny
    device = torch.device("cuda" if cuda else "cpu")
    if side == "hf" and cuda:  # patches transformers' Llama classes before the build
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    config = LlamaConfig(**{**shape, "max_position_embeddings": 1 << 20}, use_cache=False)
    model = random_llama(config, torch.bfloat16 if cuda else torch.float32, device)
    vocab = shape["vocab_size"]
    if side == "sftkit":
        from sftkit.batch import collate_packed
        from sftkit.dist import DistEnv
        from sftkit.model.attention import enable_packed_attention
        from sftkit.model.lora import LoraSpec, apply_lora
        from sftkit.model.parallel import apply_activation_checkpointing
        from sftkit.train.step import StepOptions, train_step

        if lora:
            apply_lora(model, LoraSpec(dim=LORA["r"], alpha=LORA["alpha"], use_triton=cuda))
        if cuda:  # the build order of sftkit/model/build.py: LoRA, kernels, AC
            from sftkit.model.fused import apply_fused_kernels

            apply_fused_kernels(model, device=device)
        enable_packed_attention(model)
        apply_activation_checkpointing(model, ac, offload)
        env = DistEnv(device=device)
        opts = StepOptions(compute_dtype=torch.float32, max_grad_norm=1.0, chunked_loss=True,
                           chunk_size=128 if tiny else 2048)  # fmt: skip

        def loss_of(length: int, optimizer: Any) -> float:
            ids = torch.randint(1, vocab, (length,), generator=torch.Generator().manual_seed(0))
            batch = collate_packed([(ids.tolist(), [1] * length)], [[0]], length, 0)
            return train_step(model, optimizer, [batch], batch.num_target_tokens, opts, env, 0)[
                "loss"
            ]
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora:
            from peft import LoraConfig, get_peft_model

            peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                     target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
            model = get_peft_model(model, peft_config)

        def loss_of(length: int, optimizer: Any) -> float:
            ids = torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(0))
            ids = ids.to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=cuda)

    def step(length: int) -> float:
        return loss_of(length, optimizer)

    step.optimizer = optimizer  # type: ignore[attr-defined]
    return model, step


def measure(step: Any, length: int, cuda: bool) -> dict[str, Any]:
    """One step at `length`: {"memory": bytes (see the module doc), "seconds", "loss"}."""
    import torch

    saved = [0]

    def pack(t: Any) -> Any:
        saved[0] += t.numel() * t.element_size()
        return t

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if cuda:
        loss = step(length)
        torch.cuda.synchronize()
        memory = torch.cuda.max_memory_allocated()
    else:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step(length)
        memory = saved[0]
    return {"memory": memory, "seconds": time.perf_counter() - start, "loss": loss}


def run_case(model_name: str, side: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure, fit, predict and verify one (model, side)."""
    import torch

    cuda = not args.tiny
    model, step = build_case(model_name, side, args.tiny, args.sftkit_ac, not args.no_offload)
    multiple = 16 if args.tiny else 256
    if cuda:
        budget = torch.cuda.mem_get_info()[1] - args.margin_gib * 2**30
    else:
        budget = args.budget_mib * 2**20
    lengths = TINY_LENGTHS if args.tiny else GPU_LENGTHS
    points = [(n, measure(step, n, cuda)) for n in lengths]
    a, b = fit_line([(n, m["memory"]) for n, m in points])
    cap = args.max_len or (4096 if args.tiny else 131072)
    uncapped = predict_length(a, b, budget, multiple, 1 << 30)
    length = min(uncapped, cap)
    result: dict[str, Any] = {
        "memory": "max_memory_allocated" if cuda else "cpu_proxy_saved_bytes_on_device",
        "shape": "tiny" if args.tiny else model_name,
        "budget_mib": round(budget / 2**20, 3),
        "measured_mib": {str(n): round(m["memory"] / 2**20, 3) for n, m in points},
        "fit_mib": {"a": round(a / 2**20, 3), "b_per_1k_tokens": round(b * 1000 / 2**20, 3)},
        "predicted_len": uncapped,
        "capped": uncapped > cap,
        "first_loss": round(points[0][1]["loss"], 4),
        **({"ac": args.sftkit_ac, "offload": not args.no_offload} if side == "sftkit" else {}),
        "tried": {},
    }
    if side == "hf" and not cuda:
        result["liger"] = "not applied: liger-kernel needs CUDA"
    for _ in range(TRIES):
        if length < multiple:
            break
        try:
            got = measure(step, length, cuda)
        except torch.OutOfMemoryError:
            got = None
        fits = got is not None and (cuda or got["memory"] <= budget)
        result["tried"][str(length)] = "fits" if fits else "oom"
        if fits:
            assert got is not None
            return {**result, "verified_len": length,
                    "peak_mib": round(got["memory"] / 2**20, 3),
                    "tokens_per_s": round(length / got["seconds"], 1),
                    "step_s": round(got["seconds"], 3)}  # fmt: skip
        step.optimizer.zero_grad(set_to_none=True)  # freed outside the handler (traceback)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        length = back_off(length, multiple)
    return {**result, "error": f"no length fits the budget after {TRIES} tries"}


# ----------------------------------------------------------------------------- driver


def spawn(model_name: str, side: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model_name, side,
           "--margin-gib", str(args.margin_gib), "--budget-mib", str(args.budget_mib)]  # fmt: skip
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--max-len", str(args.max_len)] if args.max_len else []
    cmd += ["--sftkit-ac", args.sftkit_ac] + (["--no-offload"] if args.no_offload else [])
    env = _child_env(liger_dir())
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # both sides alike
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    return {"error": _error_line(proc.stderr or proc.stdout), "returncode": proc.returncode}


def skip_reason(model_name: str, side: str, tiny: bool) -> str | None:
    """Why a case cannot run here (a missing optional package), or None."""
    import importlib.util

    if side == "hf" and MODELS[model_name][1] and importlib.util.find_spec("peft") is None:
        return "peft is not installed"
    if side == "hf" and not tiny and liger_dir() is None:
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed and .wheels/ has no liger wheel"
    return None


def summarize(records: list[dict[str, Any]], target: float = 2.0) -> dict[str, Any]:
    """sftkit's verified (and predicted) longest length over HF's, per model."""
    by = {(r["case"], r["side"]): r for r in records if "side" in r}
    out: dict[str, Any] = {"case": "summary"}
    for model_name in MODELS:
        ours, ref = by.get((model_name, "sftkit"), {}), by.get((model_name, "hf"), {})
        if ours.get("verified_len") and ref.get("verified_len"):
            ratio = round(ours["verified_len"] / ref["verified_len"], 3)
            out[f"{model_name}_sftkit_over_hf"] = ratio
            out[f"{model_name}_target_met"] = ratio >= target
            if ours.get("capped"):  # the cap, not memory, set sftkit's length
                out[f"{model_name}_capped"] = True
        if ours.get("predicted_len") and ref.get("predicted_len"):
            predicted = ours["predicted_len"] / ref["predicted_len"]
            out[f"{model_name}_predicted_sftkit_over_hf"] = round(predicted, 3)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU mode with a tiny model")
    parser.add_argument("--models", default=",".join(MODELS), help="comma list: 8b_lora,1b_full")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma list: sftkit,hf")
    parser.add_argument("--max-len", type=int, help="longest length verified (GPU 131072)")
    parser.add_argument("--margin-gib", type=float, default=4.0, help="GPU memory kept free")
    parser.add_argument("--budget-mib", type=float, default=2.0, help="--tiny: proxy budget")
    parser.add_argument("--sftkit-ac", choices=("full", "selective"), default="full")
    parser.add_argument("--no-offload", action="store_true", help="sftkit without offload")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all cases")
    parser.add_argument("--out", type=Path, help="JSONL (default: $OUT/max_context.jsonl)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = run_case(args.child[0], args.child[1], args)
        print("RESULT " + json.dumps(result), flush=True)
        return [result]
    import torch

    if not args.tiny and not torch.cuda.is_available():
        parser.error("GPU mode needs CUDA; use --tiny on CPU")
    out = args.out or (
        Path(os.environ["OUT"]) / "max_context.jsonl" if "OUT" in os.environ else None
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    models, sides = args.models.split(","), args.sides.split(",")
    for name in models + sides:
        if name not in (*MODELS, *SIDES):
            parser.error(f"unknown model or side {name!r}; models: {list(MODELS)}, sides: {SIDES}")
    start = time.monotonic()
    records: list[dict[str, Any]] = [{
        "case": "environment",
        "device": "cpu" if args.tiny else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "measured_lengths": list(TINY_LENGTHS if args.tiny else GPU_LENGTHS),
    }]  # fmt: skip
    emit(records[0], out)
    for model_name in models:
        for side in sides:
            record: dict[str, Any] = {"case": model_name, "side": side}
            left = args.budget - (time.monotonic() - start)
            reason = skip_reason(model_name, side, args.tiny)
            if reason:
                record["skipped"] = reason
            elif not args.tiny and left < MIN_CASE_S:
                record["skipped"] = f"time budget: {left:.0f} s left"
            else:
                # On CPU the budget is not enforced (interpreter start alone can take 20 s).
                record |= spawn(model_name, side, args, left if not args.tiny else 600.0)
            records.append(record)
            emit(record, out)
    records.append(summarize(records))
    records[-1]["seconds"] = round(time.monotonic() - start, 1)
    emit(records[-1], out)
    return records


if __name__ == "__main__":
    main()

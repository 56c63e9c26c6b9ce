"""MoE training speed: sftkit's path vs transformers' experts implementations (and PEFT).

Each case runs in its own subprocess (an OOM cannot spoil the next) and appends one JSON
line as it ends: tokens/s, MFU on active parameters, peak memory. Models are random-init
(meta build, `to_empty`, N(0, 0.02)): speed depends on shapes, not values; nothing is
downloaded. Rows are packed documents (lengths drawn from [seq/8, seq/2]), every side
isolates them with sftkit's packed attention, so the sides differ in the experts' compute,
the LoRA and the loss only.

    uv run bench/moe.py --tiny --out /tmp/moe.jsonl        # CPU smoke run (tests run this)
    PYTHONPATH=. python bench/moe.py --gpu --out $OUT/moe.jsonl --budget 300
    python bench/moe.py --summarize $OUT/moe.jsonl

Shapes (GPU): Qwen3-30B-A3B (128 experts, 8 per token) and gpt-oss-20b (32 experts, 4 per
token, biases, transposed weights) cut to 4 decoder layers, packed 4,096-token rows, bf16.
Cases, each full fine-tuning (`*_full`) and LoRA r16 on attention and every expert
(`*_lora`):
  sftkit      sftkit's model path (LoRA via `lora_cfg.target_experts`, fused kernels where the
              family has them, chunked linear+CE loss); experts computed by `--sftkit-experts`
              (transformers' `grouped_mm` until sftkit's own experts module is selectable)
  hf / peft   transformers' default experts (`grouped_mm`), HF's loss; PEFT for LoRA
              (`target_parameters` on the fused experts)
  hf_eager / peft_eager   the same with transformers' per-expert loop (`eager`)
MFU = tokens/s x flops per token / peak, flops from `sftkit.log.flops` (6N or 4N for LoRA, N
the active matmul parameters: k of E experts, + causal attention over the mean document).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or by path
from random_model import random_llama  # noqa: E402

QWEN_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    max_position_embeddings=512,
)
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-qwen3-moe": ("Qwen3MoeConfig", QWEN_TINY),
    "tiny-gpt-oss": ("GptOssConfig", dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=8,
        num_experts_per_tok=2, sliding_window=32, max_position_embeddings=131072,
        layer_types=["sliding_attention", "full_attention"])),
    # Qwen/Qwen3-30B-A3B's config.json, 4 of its 48 layers
    "qwen3-30b-a3b-4l": ("Qwen3MoeConfig", dict(
        vocab_size=151936, hidden_size=2048, num_hidden_layers=4, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, intermediate_size=6144, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
        max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False)),
    # openai/gpt-oss-20b's config.json, 4 of its 24 layers
    "gpt-oss-20b-4l": ("GptOssConfig", dict(
        vocab_size=201088, hidden_size=2880, num_hidden_layers=4, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, intermediate_size=2880, num_local_experts=32,
        num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072,
        layer_types=["sliding_attention", "full_attention"] * 2, tie_word_embeddings=False)),
}  # fmt: skip
LORA = dict(r=16, alpha=32.0)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
CASES = ["sftkit_full", "hf_full", "sftkit_lora", "peft_lora", "hf_eager_full", "peft_eager_lora"]
CASE_TIMEOUT_S = {"gpu": 150.0, "tiny": 600.0}  # a hung case must not eat the budget


def gpu_cases(sftkit_experts: str) -> list[dict[str, Any]]:
    """Most important first (the budget may end early): both shapes against transformers'
    default, then the eager loop. One 4,096-token row per step (mb 2 where it fits)."""
    models = ("qwen3-30b-a3b-4l", "gpt-oss-20b-4l")
    order = [(m, c) for m in models for c in CASES[:4]] + [
        (m, c) for m in models for c in CASES[4:]
    ]
    return [dict(model=m, case=c, seq=4096, mbs=[1, 2], warmup=2, steps=4,
                 sftkit_experts=sftkit_experts) for m, c in order]  # fmt: skip


def tiny_cases(names: list[str]) -> list[dict[str, Any]]:
    return [dict(model=m, case=n, seq=128, mbs=[1], warmup=1, steps=2, sftkit_experts="grouped_mm")
            for m in ("tiny-qwen3-moe", "tiny-gpt-oss") for n in names]  # fmt: skip


# --------------------------------------------------------------------------- one case


def experts_impl(case: dict[str, Any]) -> str:
    name = case["case"]
    if name.startswith("sftkit"):
        return str(case.get("sftkit_experts", "grouped_mm"))
    return "eager" if "_eager" in name else "grouped_mm"


def build_model(case: dict[str, Any], device: Any) -> Any:
    import torch
    import transformers

    from sftkit.model.attention import enable_packed_attention

    cls, shape = SHAPES[case["model"]]
    config = getattr(transformers, cls)(**shape)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_llama(config, dtype, device, attn_implementation="eager",
                         experts_implementation=experts_impl(case))  # fmt: skip
    enable_packed_attention(model, device=device)  # every side isolates documents alike
    return model


def packed_rows(case: dict[str, Any], mb: int, device: Any) -> tuple[dict[str, Any], Any, float]:
    """(model kwargs, labels for HF's shifted loss, mean document length) of `mb` packed rows."""
    import torch

    seq, vocab = case["seq"], SHAPES[case["model"]][1]["vocab_size"]
    gen = torch.Generator().manual_seed(mb)
    ids = torch.randint(0, vocab, (mb, seq), generator=gen)
    lengths: list[int] = []
    for _ in range(mb):
        left = seq
        while left:
            n = min(left, int(torch.randint(seq // 8, seq // 2 + 1, (1,), generator=gen)))
            lengths.append(n)
            left -= n
    starts = torch.tensor([0] + lengths).cumsum(0)
    pos = torch.cat([torch.arange(n) for n in lengths]).reshape(mb, seq)
    labels = ids.clone().reshape(-1)
    labels[starts[:-1]] = -100  # a document's first token is no target of the previous one
    kwargs = {"input_ids": ids.to(device), "position_ids": pos.to(device),
              "cu_seq_lens_q": starts.to(device, torch.int32),
              "cu_seq_lens_k": starts.to(device, torch.int32),
              "max_length_q": max(lengths), "max_length_k": max(lengths)}  # fmt: skip
    return kwargs, labels.reshape(mb, seq).to(device), sum(lengths) / len(lengths)


def prepare(case: dict[str, Any], device: Any) -> tuple[Any, Any, int]:
    """(model, step(kwargs, labels) -> loss, active matmul parameters) for one case."""
    import torch

    from sftkit.log.flops import active_matmul_params

    name = case["case"]
    model = build_model(case, device)
    n_active = active_matmul_params(model)  # before any adapter: the frozen-base convention
    lora = name.endswith("_lora")
    if name.startswith("sftkit"):
        from sftkit.model.lora import LoraSpec, apply_lora
        from sftkit.train.loss import chunked_nll_sum

        if lora:
            spec = LoraSpec(target_modules=ATTENTION, match_all_linear=False, dim=LORA["r"],
                            alpha=LORA["alpha"], target_experts=True)  # fmt: skip
            apply_lora(model, spec)
        if device.type == "cuda":
            from sftkit.model.fused import apply_fused_kernels

            apply_fused_kernels(model, device=device)

        def loss_fn(kwargs: dict[str, Any], labels: Any) -> Any:
            hidden = model.model(**kwargs, use_cache=False).last_hidden_state
            h = hidden.reshape(-1, hidden.shape[-1])
            targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
            targets = targets.reshape(-1)
            return chunked_nll_sum(h, model.lm_head.weight, targets, 1024) / (targets >= 0).sum()
    else:
        if lora:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=ATTENTION,
                                target_parameters=["experts.gate_up_proj", "experts.down_proj"])  # fmt: skip
            model = get_peft_model(model, config)

        def loss_fn(kwargs: dict[str, Any], labels: Any) -> Any:
            return model(**kwargs, labels=labels, use_cache=False).loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    def step(kwargs: dict[str, Any], labels: Any) -> float:
        loss = loss_fn(kwargs, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step.opt = opt  # type: ignore[attr-defined]
    return model, step, n_active


def peak_bytes(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def time_mb(step: Any, device: Any, case: dict[str, Any], mb: int) -> dict[str, Any]:
    import torch

    kwargs, labels, doc_len = packed_rows(case, mb, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = [step(kwargs, labels) for _ in range(case["warmup"])]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    losses += [step(kwargs, labels) for _ in range(case["steps"])]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"mb": mb, "tokens_per_s": mb * case["seq"] * case["steps"] / dt,
            "step_s": dt / case["steps"], "step_cpu_s": cpu / case["steps"], "peak_gib": peak_bytes(device) / 2**30,
            "losses": losses, "doc_len": doc_len}  # fmt: skip


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One case in this process; micro-batches in order until one runs out of memory."""
    import gc

    import torch

    from sftkit.log.flops import device_peak_flops, flops_per_token

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model, step, n = prepare(case, device)
    result: dict[str, Any] = {**case, "experts": experts_impl(case), "tried": {},
                              "device": torch.cuda.get_device_name(device)
                              if device.type == "cuda" else "cpu",
                              "build_s": time.perf_counter() - t0}  # fmt: skip
    best = None
    for mb in case["mbs"]:
        try:
            res = time_mb(step, device, case, mb)
        except torch.OutOfMemoryError:
            res = None
        if res is None:  # cleaned up outside `except`, where the traceback pins no tensors
            result["tried"][str(mb)] = "oom"
            step.opt.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            break
        result["tried"][str(mb)] = {k: res[k] for k in ("tokens_per_s", "peak_gib")}
        result.setdefault("first_loss", res["losses"][0])
        best = res
    if best is None:
        return {**result, "error": "no micro-batch fits"}
    fpt = flops_per_token(model.config, round(best["doc_len"]), case["case"].endswith("_lora"), n)
    peak = device_peak_flops(device) if device.type == "cuda" else None
    mfu = best["tokens_per_s"] * fpt / peak if peak else None
    return {**result, **best, "active_params": n, "flops_per_token": fpt, "mfu": mfu}


# --------------------------------------------------------------------------- driver


def append(out: Path, record: dict[str, Any]) -> None:
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "losses"}), flush=True)


def spawn(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One case in a fresh interpreter; its last stdout line is the record."""
    paths = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    try:
        proc = subprocess.run([sys.executable, __file__, "--run-case", json.dumps(case)],
                              capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    return dict(json.loads(lines[-1]))


def drive(cases: list[dict[str, Any]], out: Path, budget: float, timeout: float) -> None:
    start = time.monotonic()
    for case in cases:
        left = budget - (time.monotonic() - start)
        if left < 20:
            append(out, {**case, "error": "skipped: time budget spent"})
            continue
        append(out, {**case, **spawn(case, min(left, timeout))})


def summarize(path: Path) -> str:
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    lines = ["| model | case | experts | mb | tokens/s | CPU s/step | MFU | peak GiB | first loss |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['case']} | | | error: {r['error'][:80]} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        lines.append(f"| {r['model']} | {r['case']} | {r['experts']} | {r['mb']} | "
                     f"{r['tokens_per_s']:,.0f} | {r['step_cpu_s']:.3f} | {mfu} | {r['peak_gib']:.2f} | "
                     f"{r['first_loss']:.4f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny MoE models")
    mode.add_argument("--gpu", action="store_true", help="30B-A3B and gpt-oss-20b shapes")
    mode.add_argument("--run-case", help=argparse.SUPPRESS)  # child: one case as JSON
    mode.add_argument("--summarize", type=Path, help="print a table of a results JSONL")
    ap.add_argument("--out", type=Path, default=Path("moe_bench.jsonl"))
    ap.add_argument("--cases", nargs="*", default=None, help=f"a subset of {CASES}")
    ap.add_argument("--models", nargs="*", default=None, help="--gpu: only these shapes")
    ap.add_argument("--sftkit-experts", default="grouped_mm",
                    help="experts implementation of the sftkit cases")  # fmt: skip
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all cases (default 300 on GPU, 3600 tiny)")  # fmt: skip
    args = ap.parse_args()
    if args.budget is None:
        args.budget = 300.0 if args.gpu else 3600.0
    if args.run_case:
        print(json.dumps(run_case(json.loads(args.run_case))), flush=True)
    elif args.summarize:
        print(summarize(args.summarize))
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        names = args.cases or CASES
        if args.gpu:
            cases = [c for c in gpu_cases(args.sftkit_experts) if c["case"] in names
                     and (args.models is None or c["model"] in args.models)]  # fmt: skip
        else:
            cases = tiny_cases(names)
        drive(cases, args.out, args.budget, CASE_TIMEOUT_S["gpu" if args.gpu else "tiny"])


if __name__ == "__main__":
    main()

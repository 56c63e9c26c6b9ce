"""sftkit LoRA vs PEFT LoRA (and full fine-tuning) on the same model and data.

Each case runs in its own subprocess (a crash or OOM cannot spoil the next one) and its
result is appended to a JSONL file as soon as it finishes. Models are built on the meta
device, then `to_empty` + random init: speed depends on shapes, not values; nothing is
downloaded.

    uv run bench/lora.py --tiny --out /tmp/lora.jsonl     # CPU smoke run (tests run this)
    PYTHONPATH=. python bench/lora.py --gpu --out $OUT/lora.jsonl --budget 440
    python bench/lora.py --summarize $OUT/lora.jsonl

Cases (GPU): Llama-3.1-8B shape, LoRA r16 alpha 32 on all linear layers (not lm_head), seq
4096, micro-batch searched over 1, 2, 4 (largest that fits is the headline), for
sftkit (fused Triton LoRA, bf16 base, chunked linear+CE, fused RMSNorm/SwiGLU/RoPE as the
recipe applies them on CUDA, SDPA), sftkit without any Triton kernel,
PEFT (HF forward with labels, as TRL runs it), and PEFT+Liger when liger_kernel imports;
then Llama-3.2-1B shape: sftkit LoRA vs sftkit full fine-tuning (same loop and loss), and PEFT.
"""

from __future__ import annotations

import argparse
import gc
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

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         tie_word_embeddings=False),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
                         tie_word_embeddings=True),
}  # fmt: skip
LORA = dict(r=16, alpha=32.0)
CASE_TIMEOUT_S = 150.0  # one hung case must not eat the whole GPU budget
PEAK_FLOPS = 989e12  # dense bf16, H100 SXM and H200 (docs/perf.md section 1)


def gpu_cases() -> list[dict[str, Any]]:
    big = dict(model="llama-3.1-8b", seq=4096, mbs=[1, 2, 4], warmup=2, steps=4)
    small = dict(model="llama-3.2-1b", seq=4096, mbs=[1, 2, 4], warmup=2, steps=5)
    cases = [
        dict(big, case="sftkit_lora"),
        dict(big, case="peft_lora"),
        dict(small, case="sftkit_lora"),
        dict(small, case="sftkit_full"),
        dict(big, case="sftkit_lora_notriton"),
        dict(small, case="peft_lora"),
    ]
    if _importable("liger_kernel"):
        cases.insert(2, dict(big, case="peft_liger_lora"))
    return cases


def tiny_cases(names: list[str]) -> list[dict[str, Any]]:
    base = dict(model="tiny", seq=128, mbs=[1, 2], warmup=1, steps=2)
    return [dict(base, case=name) for name in names]


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# --------------------------------------------------------------------------- one case


def build_model(shape: str, device: Any, liger: bool = False) -> Any:
    """Random-weight bf16 Llama of `shape`: meta build, to_empty, normal(0, 0.02) init."""
    import torch
    from transformers import LlamaConfig

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    cfg = LlamaConfig(**SHAPES[shape])
    return random_llama(cfg, torch.bfloat16, device)


def _chunked_nll_sum() -> Any:
    try:
        from sftkit.train.loss import chunked_nll_sum

        return chunked_nll_sum
    except ImportError:  # the loss module is optional here: a plain fallback of the same maths
        import torch.nn.functional as F

        def fallback(hidden: Any, weight: Any, labels: Any, chunk_size: int = 1024) -> Any:
            return sum(
                F.cross_entropy(F.linear(hidden[s : s + chunk_size], weight).float(),
                                labels[s : s + chunk_size], reduction="sum")
                for s in range(0, hidden.shape[0], chunk_size)
            )  # fmt: skip

        return fallback


def prepare(case: dict[str, Any], device: Any) -> tuple[Any, Any]:
    """(model, step function) for a case name: sftkit_lora[_notriton], sftkit_full, peft_*."""
    import torch

    name = case["case"]
    model = build_model(case["model"], device, liger="liger" in name)
    if name.startswith("sftkit"):
        from sftkit.model.lora import LoraSpec, apply_lora

        use_triton = "notriton" not in name and case.get("triton_ok", True)
        if name.startswith("sftkit_lora"):
            apply_lora(model, LoraSpec(dim=LORA["r"], alpha=LORA["alpha"], use_triton=use_triton))
        if use_triton and device.type == "cuda":  # as the recipe does: after LoRA
            from sftkit.model.fused import apply_fused_kernels

            apply_fused_kernels(model, device=device)
        nll_sum = _chunked_nll_sum()

        def loss_fn(ids: Any) -> Any:
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            targets = ids[:, 1:].reshape(-1)
            return nll_sum(h, model.lm_head.weight, targets, 1024) / targets.numel()
    else:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                            target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, config)

        def loss_fn(ids: Any) -> Any:
            return model(input_ids=ids, labels=ids, use_cache=False).loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    def step(ids: Any) -> float:
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step.opt = opt  # type: ignore[attr-defined]
    return model, step


def flops_per_token(model: Any, lora: bool, seq: int) -> float:
    """(4N if LoRA else 6N) + causal attention 6*L*h*S (docs/perf.md convention)."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    n = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    if not cfg.tie_word_embeddings:
        n -= emb.numel()  # an embedding lookup is not a matmul
    return (4 if lora else 6) * n + 6 * cfg.num_hidden_layers * cfg.hidden_size * seq


def peak_bytes(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def time_mb(step: Any, device: Any, case: dict[str, Any], mb: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator(device="cpu").manual_seed(mb)
    vocab = SHAPES[case["model"]]["vocab_size"]
    ids = torch.randint(0, vocab, (mb, case["seq"]), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = [step(ids) for _ in range(case["warmup"])]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    losses += [step(ids) for _ in range(case["steps"])]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    tokens = mb * case["seq"] * case["steps"]
    return {"mb": mb, "tokens_per_s": tokens / dt, "step_s": dt / case["steps"],
            "peak_gib": peak_bytes(device) / 2**30, "losses": losses}  # fmt: skip


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this process; try each micro-batch until one runs out of memory."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_build = time.perf_counter()
    model, step = prepare(case, device)
    result: dict[str, Any] = {**case, "device": _device_name(device),
                              "build_s": time.perf_counter() - t_build, "tried": {}}  # fmt: skip
    best = None
    first_loss = None
    for mb in case["mbs"]:
        try:
            res = time_mb(step, device, case, mb)
        except torch.OutOfMemoryError:
            res = None
        if res is None:  # cleaned up outside `except`, where the traceback no longer pins tensors
            result["tried"][str(mb)] = "oom"
            step.opt.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            break
        result["tried"][str(mb)] = {k: res[k] for k in ("tokens_per_s", "peak_gib")}
        first_loss = res["losses"][0] if first_loss is None else first_loss
        best = res
    if best is None:
        return {**result, "error": "no micro-batch fits"}
    lora = "lora" in case["case"]
    fpt = flops_per_token(model, lora, case["seq"])
    mfu = best["tokens_per_s"] * fpt / PEAK_FLOPS if device.type == "cuda" else None
    # Same weights and data on every side: first losses must agree (a correctness check).
    return {**result, **best, "first_loss": first_loss, "mfu": mfu, "flops_per_token": fpt}


def _device_name(device: Any) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# --------------------------------------------------------------------------- kernel check


def check_kernels() -> dict[str, Any]:
    """Fused Triton LoRA vs the PyTorch path on this GPU, bf16, 8B-like shapes."""
    import torch
    from torch import nn

    from sftkit.model.lora import LoraSpec, apply_lora

    errs: dict[str, float] = {}
    for n_in, n_out in ((4096, 1024), (4096, 14336), (14336, 4096)):
        outs = []
        for use_triton in (False, True):
            torch.manual_seed(0)
            seq = nn.Sequential(nn.Linear(n_in, n_out, bias=False)).cuda().bfloat16()
            apply_lora(seq, LoraSpec(dim=16, alpha=32, use_triton=use_triton))
            nn.init.normal_(seq[0].lora_B.weight, std=0.02)
            x = torch.randn(4100, n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            y = seq(x)
            y.float().square().mean().backward()
            outs.append([y, x.grad, seq[0].lora_A.weight.grad, seq[0].lora_B.weight.grad])
        for i, (a, b) in enumerate(zip(*outs, strict=True)):
            rel = float((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-12))
            errs[f"{n_in}x{n_out}/{['y', 'dx', 'dA', 'dB'][i]}"] = rel
    return {"case": "kernel_check", "ok": max(errs.values()) < 2e-2, "rel_err": errs}


# --------------------------------------------------------------------------- driver


def append(out: Path, record: dict[str, Any]) -> None:
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "losses"}), flush=True)


def spawn(args: list[str], timeout: float) -> dict[str, Any]:
    """Run `bench/lora.py <args>` in a fresh interpreter; its last stdout line is the record."""
    # Keep the caller's PYTHONPATH (carried packages such as liger) after the repo root.
    paths = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    try:
        proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                              timeout=timeout, env=env)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    return json.loads(lines[-1])


def drive(cases: list[dict[str, Any]], out: Path, budget: float, check: bool) -> None:
    start = time.monotonic()
    triton_ok = True
    if check:
        record = spawn(["--check"], timeout=min(120.0, budget))
        append(out, {"case": "kernel_check", **record})
        triton_ok = bool(record.get("ok"))  # a failing kernel must not produce numbers
    for case in cases:
        left = budget - (time.monotonic() - start)
        if left < 30:
            append(out, {**case, "error": "skipped: time budget spent"})
            continue
        case = {**case, "triton_ok": triton_ok}
        record = spawn(["--run-case", json.dumps(case)], timeout=min(left, CASE_TIMEOUT_S))
        append(out, {**case, **record})


def summarize(path: Path) -> str:
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    lines = [
        "| model | case | mb | tokens/s | peak GiB | MFU | tried |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("case") == "kernel_check":
            lines.insert(0, f"kernel check ok={r.get('ok')} {r.get('rel_err', r.get('error'))}\n")
            continue
        if "error" in r:
            lines.append(f"| {r.get('model')} | {r['case']} | - | error: {r['error'][:80]} | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        tried = {
            k: (v if isinstance(v, str) else round(v["tokens_per_s"]))
            for k, v in r["tried"].items()
        }
        lines.append(f"| {r['model']} | {r['case']} | {r['mb']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_gib']:.1f} | {mfu} | {tried} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny Llama")
    mode.add_argument("--gpu", action="store_true", help="8B and 1B shapes on one GPU")
    mode.add_argument("--run-case", help=argparse.SUPPRESS)  # child: one case as JSON
    mode.add_argument("--check", action="store_true", help="Triton vs PyTorch LoRA on this GPU")
    mode.add_argument("--summarize", type=Path, help="print a table of a results JSONL")
    ap.add_argument("--out", type=Path, default=Path("lora_bench.jsonl"))
    ap.add_argument(
        "--cases",
        nargs="*",
        default=None,
        help="which cases (--tiny default: sftkit_lora peft_lora; --gpu: all)",
    )
    ap.add_argument("--models", nargs="*", default=None, help="--gpu: only these shapes")
    ap.add_argument("--no-check", action="store_true", help="--gpu: skip the kernel check")
    ap.add_argument("--budget", type=float, default=440.0, help="seconds for all cases")
    args = ap.parse_args()
    if args.run_case:
        print(json.dumps(run_case(json.loads(args.run_case))), flush=True)
    elif args.check:
        print(json.dumps(check_kernels()), flush=True)
    elif args.summarize:
        print(summarize(args.summarize))
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.gpu:
            cases = [
                c for c in gpu_cases()
                if (args.cases is None or c["case"] in args.cases)
                and (args.models is None or c["model"] in args.models)
            ]  # fmt: skip
        else:
            cases = tiny_cases(args.cases or ["sftkit_lora", "peft_lora"])
        drive(cases, args.out, args.budget, check=args.gpu and not args.no_check)


if __name__ == "__main__":
    main()

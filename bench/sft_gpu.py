"""Single-GPU full fine-tune, side by side (issue 7, bench a): plain HF vs HF + Liger vs sftkit.

Llama-3.2-1B shape (random init from LlamaConfig: hidden 2048, 16 layers, 32 heads, 8 kv
heads, intermediate 8192, vocab 128256, tied embeddings), full fine-tune, rows of 4096
tokens, 2 rows per optimizer step (the micro-batch of `docs/perf.md`'s baseline
table), AdamW (fused), grad-norm clipping at 1.0, in two precision modes:

* `bf16`: bfloat16 parameters, gradients and Adam states;
* `fp32_master`: float32 parameters and optimizer, bfloat16 autocast for compute.

Cases, each in its own subprocess (an OOM or kernel error cannot spoil the next one), one
JSON line appended to `$OUT/sft_gpu.jsonl` as each finishes (errors included):

* `hf`: `model(input_ids, labels=labels).loss` (what TRL's SFTTrainer runs), SDPA;
* `liger`: the same after `apply_liger_kernel_to_llama()` (RMSNorm, RoPE, SwiGLU, fused
  linear cross-entropy); liger-kernel is imported from `.wheels/liger_kernel-*.whl` when it
  is not installed (the wheel is unpacked to a temporary directory);
* `sftkit`: packed rows with document-isolating varlen attention
  (`enable_packed_attention`), the chunked head + loss on trained tokens only, sftkit's own
  fused RMSNorm/SwiGLU(+down projection)/RoPE Triton kernels (`apply_fused_kernels(model,
  backend="triton")`), sftkit's own `train_step`;
* extras, after the main cases of both modes and only while the time budget lasts:
  `sftkit_liger` (as `sftkit` with liger-kernel's RMSNorm/SwiGLU/RoPE) and `sftkit_compile`
  (as `sftkit` with `compile_layers` instead of fused kernels).

Data, the same tokens for every case: each row is filled with chat-like documents whose
lengths follow bench/packing.py's distribution (lognormal, median 700 tokens, sigma 0.8,
clipped to [32, 4096]; the last document of a row is cut to fit), the first 30% of every
document is an untrained prompt. HF and Liger see each row as one causal sequence (packing
without isolation, no padding: their fastest correct-length setting); sftkit isolates the
documents. `--docs full` instead makes each row one fully trained 4096-token document.

Reported per case: tokens/s (all cases process the same tokens; there is no padding), MFU
with docs/perf.md's formula (`sftkit.log.flops`, 989e12 peak on H100 SXM/H200) at seq 4096 (the
baseline table's convention) and at the documents' attention context (`mfu_doc`), peak
`torch.cuda.max_memory_allocated`, first and last loss. The summary line gives sftkit's
tokens/s and memory over Liger's per mode (target: >= 1.25x tokens/s, <= memory).

    PYTHONPATH=. OUT=/tmp/out python bench/sft_gpu.py     # GPU, all cases < 4 minutes
    uv run --group dev python bench/sft_gpu.py --tiny --out /tmp/sft_gpu.jsonl   # CPU smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or by path
from random_model import random_llama  # noqa: E402
from results import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = ("liger", "sftkit", "hf", "sftkit_fp8", "sftkit_sr", "sftkit_torch_ce", "sftkit_liger",
         "sftkit_compile")  # fmt: skip
EXTRAS = CASES[3:]  # after the main cases
MODES = ("bf16", "fp32_master")
MIN_CASE_S = {"hf": 25.0, "liger": 30.0, "sftkit": 30.0, "sftkit_torch_ce": 30.0,
              "sftkit_liger": 30.0, "sftkit_compile": 75.0, "sftkit_fp8": 75.0,
              "sftkit_sr": 30.0}  # fmt: skip


@dataclass
class Setup:
    model: dict[str, Any]
    seq: int  # tokens per row
    rows: int  # rows per optimizer step (one micro-batch)
    warmup: int
    steps: int
    median: float  # document lengths: lognormal (see module docstring)
    sigma: float
    min_len: int
    device: str
    chunk_size: int = 2048  # chunked-loss tokens per chunk (sftkit cases)
    docs: str = "chat"  # chat | full
    # Rows per micro-batch (gradient accumulation over rows / micro_rows); 0: the largest
    # divisor of `rows` up to `max_micro_rows` whose step fits in memory (searched per case).
    micro_rows: int = 2
    max_micro_rows: int = 16


LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
                tie_word_embeddings=True)  # fmt: skip
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
                tie_word_embeddings=False)  # fmt: skip
TINY_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True)  # fmt: skip
GPU = Setup(LLAMA_1B, seq=4096, rows=2, warmup=3, steps=10, median=700, sigma=0.8,
            min_len=32, device="cuda")  # fmt: skip
TINY = Setup(TINY_MODEL, seq=256, rows=2, warmup=1, steps=2, median=44, sigma=0.8,
             min_len=8, device="cpu", chunk_size=128)  # fmt: skip
# `--setting recipe`: a recipe's global batch, 32 rows of 4096 tokens per optimizer step by
# gradient accumulation, each side at its largest micro-batch that fits.
RECIPE = {"gpu": replace(GPU, rows=32, warmup=1, steps=3, micro_rows=0),
          "tiny": replace(TINY, rows=8, steps=1, micro_rows=0, max_micro_rows=4)}  # fmt: skip


# ----------------------------------------------------------------------------- data


def make_rows(setup: Setup, count: int, seed: int) -> list[list[tuple[list[int], list[int]]]]:
    """`count` rows, each a list of (input_ids, loss_mask) documents filling `setup.seq`."""
    rng = random.Random(seed)
    vocab = setup.model["vocab_size"]
    rows = []
    for _ in range(count):
        docs: list[tuple[list[int], list[int]]] = []
        room = setup.seq
        while room > 0:
            if setup.docs == "full":
                length = room
            else:
                drawn = round(math.exp(rng.gauss(math.log(setup.median), setup.sigma)))
                length = min(room, max(setup.min_len, drawn))
            ids = [rng.randrange(1, vocab) for _ in range(length)]
            prompt = 0 if setup.docs == "full" else int(0.3 * length)
            docs.append((ids, [0] * prompt + [1] * (length - prompt)))
            room -= length
        rows.append(docs)
    return rows


def step_batches(setup: Setup, seed: int, micro_rows: int | None = None) -> list[Any]:
    """One PackedBatch per optimizer step (`rows` packed rows, no padding); with
    `micro_rows`, one list of micro-batches of that many rows per optimizer step."""
    from sftkit.batch import collate_packed

    rows = make_rows(setup, setup.rows * (setup.warmup + setup.steps), seed)
    micro = micro_rows or setup.rows
    batches = []
    for s in range(0, len(rows), micro):
        docs = [d for row in rows[s : s + micro] for d in row]
        bins, start = [], 0
        for row in rows[s : s + micro]:
            bins.append(list(range(start, start + len(row))))
            start += len(row)
        batches.append(collate_packed(docs, bins, setup.seq, 0))
    if micro_rows is None:
        return batches
    per_step = setup.rows // micro
    return [batches[i : i + per_step] for i in range(0, len(batches), per_step)]


def micro_candidates(setup: Setup) -> list[int]:
    """Micro-batch sizes to try, largest first: `micro_rows`, or the divisors of `rows` up to
    `max_micro_rows` (so every optimizer step sees all `rows` rows)."""
    if setup.micro_rows:
        return [setup.micro_rows]
    return [m for m in range(min(setup.rows, setup.max_micro_rows), 0, -1) if setup.rows % m == 0]


def largest_fitting(candidates: list[int], try_step: Any, free: Any) -> int:
    """The first of `candidates` for which `try_step(m)` does not run out of memory (that
    step counts as a warm-up step); `free()` releases what a failed try left behind."""
    import torch

    for m in candidates:
        try:
            try_step(m)
            return m
        except torch.OutOfMemoryError:
            pass  # free outside the handler: the traceback holds the failed step's tensors
        free()
    raise RuntimeError(f"out of memory even at micro-batch {candidates[-1]}")


def attention_context(batches: list[Any]) -> float:
    """Token-weighted mean document length sum(L^2)/sum(L): the `seq_len` whose causal
    attention flops per token (flops_per_token) equal those of per-document attention."""
    lengths = [int(n) for b in batches for n in (b.cu_seqlens[1:] - b.cu_seqlens[:-1])]
    return sum(n * n for n in lengths) / sum(lengths)


# ----------------------------------------------------------------------------- one case


def build_model(setup: Setup, mode: str) -> Any:
    """Random-weight Llama: meta build, `to_empty`, normal(0, 0.02) init (fast on GPU)."""
    import torch
    from transformers import LlamaConfig

    device = torch.device(setup.device)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    config = LlamaConfig(**setup.model, use_cache=False)
    return random_llama(config, dtype, device)


def _hf_step(model: Any, optimizer: Any, batches: list[Any], mode: str) -> float:
    """HF's loss per micro-batch (a mean over its tokens), averaged over the micro-batches as
    Trainer's gradient accumulation does."""
    import torch

    from sftkit.train.step import autocast

    dtype = torch.bfloat16 if mode == "fp32_master" else torch.float32
    total = 0.0
    for batch in batches:
        with autocast(batch.input_ids.device, dtype):
            loss = model(input_ids=batch.input_ids, labels=batch.labels, use_cache=False).loss
        (loss / len(batches)).backward()
        total += float(loss.detach()) / len(batches)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def run_case(
    case: str, mode: str, setup: Setup, seed: int, profile: Path | None = None
) -> dict[str, Any]:
    """Build, warm up and time one case; returns its measurements. With `profile`, two more
    steps then run under torch.profiler and its kernel table goes to `profile/CASE_MODE.txt`."""
    import torch

    from sftkit.dist import DistEnv
    from sftkit.log.flops import flops_per_token, mfu, peak_flops
    from sftkit.model.attention import enable_packed_attention, resolve_backend
    from sftkit.model.fused import apply_fused_kernels, compile_layers
    from sftkit.train.step import StepOptions, train_step

    cuda = setup.device == "cuda"
    if case == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()  # patches transformers' Llama classes before the build
    model = build_model(setup, mode)
    info: dict[str, Any] = {}
    if case.startswith("sftkit"):
        enable_packed_attention(model)
        compute = torch.bfloat16 if mode == "fp32_master" else next(model.parameters()).dtype
        info["attention"] = resolve_backend("auto", torch.device(setup.device), compute)
        if case == "sftkit_fp8":  # torchao float8 needs compile to fuse its casts
            from sftkit.model.fp8 import apply_fp8

            report = apply_fp8(model, "tensorwise", "hybrid", torch.device(setup.device))
            info |= {"fp8_layers": len(report.converted), "fp8_emulated": report.emulated}
        if case in ("sftkit_compile", "sftkit_fp8"):
            info["compiled_layers"] = compile_layers(model)
        else:
            backend = "liger" if case == "sftkit_liger" else "triton"
            info["fused"] = apply_fused_kernels(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    if case == "sftkit_sr" and mode == "bf16":  # bf16 parameters, stochastic rounding
        from sftkit.train.bf16_optim import BF16AdamW

        optimizer = BF16AdamW(model.parameters(), lr=1e-5, rounding="stochastic_rounding")
    env = DistEnv(device=torch.device(setup.device))
    opts = StepOptions(
        compute_dtype=torch.bfloat16 if mode == "fp32_master" else torch.float32,
        max_grad_norm=1.0, chunked_loss=True, chunk_size=setup.chunk_size,
        fused_ce=False if case == "sftkit_torch_ce" else None,
    )  # fmt: skip

    def step(i: int, micro: list[Any]) -> float:
        if case.startswith("sftkit"):
            tokens = sum(b.num_target_tokens for b in micro)
            return train_step(model, optimizer, micro, tokens, opts, env, i)["loss"]
        return _hf_step(model, optimizer, micro, mode)

    def on_device(micro: list[Any]) -> list[Any]:
        return [b.to(setup.device) for b in micro]

    def free() -> None:
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    losses: list[float] = []
    micro_rows = largest_fitting(
        micro_candidates(setup),
        lambda m: losses.append(step(0, on_device(step_batches(setup, seed, m)[0]))),
        free,
    )
    info |= {"micro_rows": micro_rows, "grad_accum": setup.rows // micro_rows}
    batches = [on_device(micro) for micro in step_batches(setup, seed, micro_rows)]
    losses += [step(i, b) for i, b in enumerate(batches[1 : setup.warmup], 1)]
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses += [step(i, b) for i, b in enumerate(batches[setup.warmup :], setup.warmup)]
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(b.input_ids.numel() for step_ in batches[setup.warmup :] for b in step_)
    if profile is not None:
        profile_steps(
            lambda i: step(i, batches[i % len(batches)]), cuda, profile / f"{case}_{mode}.txt"
        )
    tps = tokens / seconds
    config = model.config
    peak = peak_flops(torch.cuda.get_device_name()) if cuda else None
    context = attention_context([b for step_ in batches for b in step_])
    result = {
        "tokens_per_s": round(tps, 1),
        "mfu": _round(mfu(tps, flops_per_token(config, setup.seq), peak)),
        "mfu_doc": _round(mfu(tps, flops_per_token(config, round(context)), peak)),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "step_s": round(seconds / setup.steps, 4),
        "measured_steps": setup.steps,
        **info,
    }
    return result


def profile_steps(run_step: Any, cuda: bool, path: Path) -> None:
    """Two steps under torch.profiler; the table of ops by their own device (or CPU) time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(2):
            run_step(i)
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=70)
    kernels, host = [], []
    for event in prof.events():
        span = (event.time_range.start, event.time_range.end)
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append(span)
        elif event.device_type == torch.autograd.DeviceType.CPU:
            host.append((*span, event.name))
    path.write_text(table + "\n" + idle_report(kernels, host))


def idle_report(
    kernels: list[tuple[float, float]], host: list[tuple[float, float, str]], top: int = 15
) -> str:
    """Where the GPU sat idle between its first and last kernel, in microseconds: the total,
    then the longest gaps, each with the host ops running at its middle (innermost first),
    i.e. what the GPU was waiting for."""
    if not kernels:
        return "GPU idle: no device events recorded\n"
    busy: list[list[float]] = []
    for start, end in sorted(kernels):
        if busy and start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], end)
        else:
            busy.append([start, end])
    gaps = [(b[0] - a[1], a[1], b[0]) for a, b in itertools.pairwise(busy)]
    span = busy[-1][1] - busy[0][0]
    idle = sum(g[0] for g in gaps)
    lines = [f"GPU idle: {idle:,.0f} us of {span:,.0f} us ({100 * idle / span:.1f}%) "
             f"in {len(gaps)} gaps; longest:"]  # fmt: skip
    for length, start, end in sorted(gaps, reverse=True)[:top]:
        mid = (start + end) / 2
        active = sorted((e - s, name) for s, e, name in host if s <= mid <= e)
        names = " < ".join(name for _, name in active[:4]) or "(no host op)"
        lines.append(f"  {length:9,.0f} us at +{start - busy[0][0]:,.0f}: {names}")
    return "\n".join(lines) + "\n"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# ----------------------------------------------------------------------------- driver


def liger_dir(root: Path = ROOT) -> Path | None:
    """A directory holding liger_kernel unpacked from `.wheels/`, when it is not installed.

    Unpacked (not imported from the zip) because Triton reads kernel sources from files.
    """
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        return None
    wheels = sorted((root / ".wheels").glob("liger_kernel-*.whl"))
    if not wheels:
        return None
    target = Path(tempfile.gettempdir()) / f"sftkit_{wheels[-1].stem}"
    if not (target / "liger_kernel").is_dir():
        with zipfile.ZipFile(wheels[-1]) as z:
            z.extractall(target)
    return target


def _child_env(extra: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(extra)] if extra else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[-500:]
    return lines[-1][-500:] if lines else "no output"


def run_in_subprocess(
    case: str, mode: str, args: argparse.Namespace, timeout: float, extra: Path | None
) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, mode,
           "--seed", str(args.seed), "--docs", args.docs]  # fmt: skip
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--setting", args.setting, "--model", args.model]
    cmd += ["--micro-rows", str(args.micro_rows)] if args.micro_rows else []
    cmd += ["--steps", str(args.steps)] if args.steps else []
    cmd += ["--chunk-size", str(args.chunk_size)] if args.chunk_size else []
    cmd += ["--profile", str(args.profile)] if args.profile else []
    try:
        proc = subprocess.run(cmd, env=_child_env(extra), capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": _error_line(proc.stderr or proc.stdout), "returncode": proc.returncode}


def summarize(records: list[dict[str, Any]], target: float = 1.25) -> dict[str, Any]:
    """Each sftkit variant over Liger (and HF) per mode: tokens/s and memory ratios; the
    target (>= `target` x Liger's tokens/s at <= its memory) is checked for `sftkit`."""
    by = {(r["case"], r["mode"]): r for r in records if "tokens_per_s" in r}
    out: dict[str, Any] = {"case": "summary"}
    for mode in MODES:
        for variant in ("sftkit", *EXTRAS):
            ours = by.get((variant, mode))
            for base in ("liger", "hf"):
                ref = by.get((base, mode))
                if not ours or not ref:
                    continue
                speed = round(ours["tokens_per_s"] / ref["tokens_per_s"], 3)
                out[f"{mode}_{variant}_over_{base}"] = speed
                if ours.get("peak_gib") and ref.get("peak_gib"):
                    memory = round(ours["peak_gib"] / ref["peak_gib"], 3)
                    out[f"{mode}_{variant}_memory_over_{base}"] = memory
        fp8, bf16 = by.get(("sftkit_fp8", mode)), by.get(("sftkit", mode))
        if fp8 and bf16:  # FP8's target: >= 1.2x sftkit's own bf16
            out[f"{mode}_sftkit_fp8_over_sftkit"] = round(
                fp8["tokens_per_s"] / bf16["tokens_per_s"], 3
            )
        ratio = out.get(f"{mode}_sftkit_over_liger")
        if ratio is not None:
            memory = out.get(f"{mode}_sftkit_memory_over_liger")
            out[f"{mode}_target_met"] = ratio >= target and (memory is None or memory <= 1.0)
    return out


def _environment(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    batches = step_batches(setup, args.seed)
    return {
        "case": "environment",
        "device": torch.cuda.get_device_name() if setup.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "setup": {k: v for k, v in asdict(setup).items() if k != "model"},
        "setting": args.setting,
        "tokens_per_step": setup.seq * setup.rows,
        "trained_fraction": round(
            sum(b.num_target_tokens for b in batches) / sum(b.input_ids.numel() for b in batches),
            4,
        ),
        "attention_context": round(attention_context(batches), 1),
        "docs_per_row": round(
            sum(len(b.cu_seqlens) - 1 for b in batches) / (len(batches) * setup.rows), 2
        ),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU mode with a tiny model")
    parser.add_argument("--cases", default=None, help=f"comma list from {','.join(CASES)}")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list: bf16,fp32_master")
    parser.add_argument("--steps", type=int, help="measured optimizer steps per case")
    parser.add_argument("--chunk-size", type=int, help="sftkit chunked-loss tokens per chunk")
    parser.add_argument("--docs", choices=("chat", "full"), default="chat")
    parser.add_argument(
        "--setting",
        choices=("small", "recipe"),
        default="small",
        help="small: 2 rows per step; recipe: 32 rows by gradient accumulation",
    )
    parser.add_argument("--micro-rows", type=int, help="rows per micro-batch (recipe: auto)")
    parser.add_argument("--model", choices=("1b", "8b"), default="1b", help="GPU model shape")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--budget", type=float, default=210.0, help="seconds for all cases")
    parser.add_argument("--out", type=Path, help="JSONL file (default: $OUT/sft_gpu.jsonl)")
    parser.add_argument("--inline", action="store_true", help="run cases in this process")
    parser.add_argument("--profile", type=Path, help="folder for per-case profiler tables")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    recipe = args.setting == "recipe"
    base = RECIPE["tiny" if args.tiny else "gpu"] if recipe else TINY if args.tiny else GPU
    setup = replace(base, docs=args.docs, micro_rows=args.micro_rows or base.micro_rows)
    if args.model == "8b" and not args.tiny:
        setup = replace(setup, model=LLAMA_8B)
    setup = replace(setup, steps=args.steps or setup.steps,
                    chunk_size=args.chunk_size or setup.chunk_size)  # fmt: skip
    if args.child:
        result = run_case(args.child[0], args.child[1], setup, args.seed, args.profile)
        print("RESULT " + json.dumps(result), flush=True)
        return [result]
    import torch

    if setup.device == "cuda" and not torch.cuda.is_available():
        parser.error("GPU mode needs CUDA; use --tiny on CPU")
    out = args.out or (Path(os.environ["OUT"]) / "sft_gpu.jsonl" if "OUT" in os.environ else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    main_cases = ("liger", "sftkit", "hf")
    default_cases = CASES if setup.device == "cuda" and not recipe else main_cases
    cases = args.cases.split(",") if args.cases else list(default_cases)
    modes = args.modes.split(",")
    for name in cases + modes:
        if name not in CASES + MODES:
            parser.error(f"unknown case or mode {name!r}; cases: {CASES}, modes: {MODES}")
    start = time.monotonic()
    records = [_environment(setup, args)]
    emit(records[0], out)
    extra = liger_dir()
    order = [(c, m) for m in modes for c in cases if c not in EXTRAS]
    order += [(c, m) for c in EXTRAS if c in cases for m in modes]
    for case, mode in order:
        record: dict[str, Any] = {"case": case, "mode": mode}
        left = args.budget - (time.monotonic() - start)
        liger = case in ("liger", "sftkit_liger")
        if liger and setup.device != "cuda":
            record["skipped"] = "liger-kernel needs CUDA"
        elif liger and extra is None and not _importable("liger_kernel"):
            record["skipped"] = "liger-kernel is not installed and .wheels/ has no liger wheel"
        elif setup.device == "cuda" and left < MIN_CASE_S.get(case, 30.0) * (1 + recipe):
            record["skipped"] = f"time budget: {left:.0f} s left"
        elif args.inline:
            try:
                record |= run_case(case, mode, setup, args.seed, args.profile)
            except Exception as exc:  # noqa: BLE001 - a failed case is a result, not a crash
                record["error"] = f"{type(exc).__name__}: {exc}"[:500]
        else:
            # On CPU the budget is not enforced (interpreter start alone can take 20 s there).
            timeout = left if setup.device == "cuda" else max(left, 300.0)
            record |= run_in_subprocess(case, mode, args, timeout, extra)
        records.append(record)
        emit(record, out)
    records.append(summarize(records, target=1.3 if recipe else 1.25))
    records[-1]["seconds"] = round(time.monotonic() - start, 1)
    emit(records[-1], out)
    return records


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    main()

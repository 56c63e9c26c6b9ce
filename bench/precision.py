"""Loss curves of the precision modes on a learnable task: float32 master weights (bf16
autocast) vs bf16 parameters with torch's AdamW (round to nearest), with stochastic rounding,
with Kahan updates, and FP8 linear layers (torchao) over float32 masters.

Each mode is one run of the real entry point (one process each, same data and seed) with a
constant learning rate; one JSON line per mode gives the mean train loss over windows of
steps and the relative gap to float32 master weights. Default: the built-in tiny Llama on
the bundled addition data; `--size 100m` trains a random-init Llama of about 85M parameters
(hidden 768, 12 layers) with the built-in tokenizer instead.

    uv run --group dev python bench/precision.py --lr 3e-5 --steps 300 --windows 6 \
        policy.train_global_batch_size=16 policy.train_micro_batch_size=16      (CPU)
    PYTHONPATH=. python bench/precision.py --device cuda --size 100m --modes fp32_master,fp8 \
        --lr 3e-4 --steps 200 --out $OUT/precision.jsonl                       (GPU, FP8 check)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import emit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "fp32_master": ["policy.precision=bfloat16"],
    "bf16_nearest": ["policy.precision=bfloat16", "policy.dtensor_cfg.bf16_params=true"],
    "bf16_stochastic": [
        "policy.precision=bfloat16",
        "policy.dtensor_cfg.bf16_params=true",
        "policy.dtensor_cfg.bf16_params_update=stochastic_rounding",
    ],
    "bf16_kahan": [
        "policy.precision=bfloat16",
        "policy.dtensor_cfg.bf16_params=true",
        "policy.dtensor_cfg.bf16_params_update=kahan",
    ],
    "fp8": ["policy.precision=bfloat16", "policy.dtensor_cfg.fp8_cfg.enabled=true"],
}
SIZES = {"100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4)}  # fmt: skip


def sized_model(size: str, directory: Path) -> str:
    """A random-init Llama of `SIZES[size]` with the built-in tiny Llama's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sftkit.model.builtin import resolve_model_path

    tiny = resolve_model_path("sftkit:tiny-llama")
    base = LlamaConfig.from_pretrained(tiny)
    config = LlamaConfig(**{**base.to_dict(), **SIZES[size]})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(directory)
    return str(directory)


def run_mode(mode: str, args: argparse.Namespace, work: Path) -> list[float]:
    """Train losses by step of one mode's run."""
    overrides = [
        *MODES[mode],
        f"policy.model_name={args.model}",
        f"policy.optimizer.kwargs.lr={args.lr}",
        "policy.optimizer.kwargs.weight_decay=0.0",
        "policy.scheduler=null",
        f"sft.max_num_steps={args.steps}",
        "sft.val_period=0",
        "sft.val_at_start=false",
        "checkpointing.enabled=false",
        f"logger.log_dir={work / mode}",
        "logger.tensorboard_enabled=false",
        "logger.progress_bar=false",
        f"cluster.device={args.device}",
        *args.extra,
    ]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": path}
    subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "run_sft.py"),
            "--config",
            str(REPO / "examples" / "configs" / "quickstart.yaml"),
            *overrides,
        ],  # fmt: skip
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=(work / f"{mode}.log").open("w"),
    )
    lines = (next((work / mode).glob("exp_*")) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return [r["train/loss"] for r in sorted(rows, key=lambda r: r["step"]) if "train/loss" in r]


def windows(losses: list[float], count: int) -> list[float]:
    """Mean loss over `count` equal windows of steps (per-batch losses are noisy)."""
    size = max(len(losses) // count, 1)
    return [sum(losses[i : i + size]) / size for i in range(0, size * count, size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sftkit:tiny-llama")
    parser.add_argument("--size", choices=tuple(SIZES), help="a random-init model instead")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="more config overrides for every run")
    args = parser.parse_args()
    curves: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.size:
            args.model = sized_model(args.size, Path(tmp) / f"llama-{args.size}")
        for mode in args.modes.split(","):
            losses = run_mode(mode, args, Path(tmp))
            curves[mode] = windows(losses, args.windows)
            ref = curves.get("fp32_master")
            gap = [c / r - 1 for c, r in zip(curves[mode], ref, strict=True)] if ref else None
            record = {"mode": mode, "model": args.size or args.model, "lr": args.lr}
            record |= {"steps": args.steps, "first": losses[0]}
            record |= {"window_loss": [round(x, 5) for x in curves[mode]]}
            if gap is not None:
                record["max_gap_vs_fp32"] = round(max(abs(g) for g in gap), 4)
                record["last_gap_vs_fp32"] = round(gap[-1], 4)
            emit(record, args.out)


if __name__ == "__main__":
    main()
